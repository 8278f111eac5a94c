"""The run's plan: stages of sequence length, global batch and learning-rate scale.

A plan is a list of stages, each from an iteration on (``start``, 0-based count of
completed iterations) to the next stage's start or ``--train-iters``. Without
``--curriculum`` or ``--step-batch-size-schedule`` a run is one stage of
``--seq-length`` and ``--global-batch-size`` with scale 1.

``--curriculum FILE`` (YAML): a list of stages, each a mapping with ``iteration``,
``seq_length``, ``global_batch_size`` and ``lr_scale``; the first starts at 0::

    - {iteration: 0,    seq_length: 64,  global_batch_size: 256, lr_scale: 11.3}
    - {iteration: 2000, seq_length: 128, global_batch_size: 128, lr_scale: 7.0}

``--step-batch-size-schedule "0:768 250B:1536"`` (Megatron-LM's batch ramp): the
global batch from a number of training tokens on (K, M, B, T suffixes), at
``--seq-length`` and scale 1; a stage begins at the first iteration whose tokens seen
reach its threshold.

The micro-batch of a stage divides its global batch by the data-parallel size
(``--micro-batch-size N`` for every stage, or ``auto``: chosen per stage by
``microbatch.choose``); a plan with micro-batches chosen is *resolved*.

Tokens seen and samples consumed after ``t`` iterations follow from the plan alone, so
a resumed run finds its data position and its stage from the iteration.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from megatron_ext.training.arguments import ArgsError

STAGE_KEYS = ("iteration", "seq_length", "global_batch_size", "lr_scale")
_SUFFIX = {"": 1, "K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9, "T": 10 ** 12}


@dataclass(frozen=True)
class Stage:
    start: int                      # first iteration of the stage (completed iterations before it)
    seq_length: int
    global_batch_size: int
    lr_scale: float = 1.0
    micro_batch_size: Optional[int] = None   # None: not chosen yet (--micro-batch-size auto)

    def num_microbatches(self, dp_size: int) -> int:
        if self.micro_batch_size is None:
            raise ValueError("the micro-batch size of this stage is not chosen yet")
        return self.global_batch_size // (self.micro_batch_size * dp_size)

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch_size * self.seq_length


@dataclass(frozen=True)
class TrainingPlan:
    stages: Tuple[Stage, ...]
    train_iters: int
    dp_size: int = 1
    source: str = "flags"           # "flags", "--curriculum FILE" or "--step-batch-size-schedule"

    # ------------------------------------------------------------------ queries
    @property
    def staged(self) -> bool:
        """More than one stage: the data is cut per stage and the schedule counts iterations."""
        return len(self.stages) > 1

    @property
    def resolved(self) -> bool:
        return all(s.micro_batch_size is not None for s in self.stages)

    def active(self) -> List[Stage]:
        """The stages that run (those starting before ``train_iters``)."""
        return [s for s in self.stages if s.start < self.train_iters]

    def index_at(self, iteration: int) -> int:
        """The stage that trains iteration ``iteration + 1`` (after ``iteration`` completed)."""
        k = 0
        for i, s in enumerate(self.stages):
            if s.start <= iteration:
                k = i
        return k

    def stage_at(self, iteration: int) -> Stage:
        return self.stages[self.index_at(iteration)]

    def end_of(self, index: int) -> int:
        return self.stages[index + 1].start if index + 1 < len(self.stages) else self.train_iters

    def _accumulate(self, iteration: int, per_iteration) -> int:
        total = 0
        for i, s in enumerate(self.stages):
            if s.start >= iteration:
                break
            total += (min(self.end_of(i), iteration) - s.start) * per_iteration(s)
        return total

    def samples_at(self, iteration: int) -> int:
        """Training samples consumed after ``iteration`` iterations."""
        return self._accumulate(iteration, lambda s: s.global_batch_size)

    def tokens_at(self, iteration: int) -> int:
        """Training tokens seen (samples x their length) after ``iteration`` iterations."""
        return self._accumulate(iteration, lambda s: s.tokens_per_iteration)

    # ------------------------------------------------------------------ changes
    def with_micro_batches(self, sizes: Sequence[Optional[int]]) -> "TrainingPlan":
        """The plan with each stage's micro-batch set (checked against its global batch);
        None leaves a stage's open (a stage the run does not reach)."""
        stages = tuple(replace(s, micro_batch_size=None if m is None else int(m)) for s, m in zip(self.stages, sizes))
        plan = replace(self, stages=stages)
        plan.check_divisible("--micro-batch-size")
        return plan

    def check_divisible(self, flag: str = "--micro-batch-size") -> None:
        """Every stage's global batch splits into whole micro-batches on every data-parallel
        rank (only the data-parallel size when the micro-batch is not chosen yet)."""
        for i, s in enumerate(self.stages):
            per_step = (s.micro_batch_size or 1) * self.dp_size
            if s.global_batch_size % per_step:
                where = f"stage {i + 1} (from iteration {s.start}) of {self.source}: " if self.staged else ""
                what = (f"{flag} {s.micro_batch_size} x data-parallel size {self.dp_size} (= {per_step})"
                        if s.micro_batch_size is not None else f"the data-parallel size {self.dp_size}")
                raise ArgsError(f"{where}--global-batch-size {s.global_batch_size} is not divisible by {what}")

    # ------------------------------------------------------------------ records
    def to_record(self) -> Dict[str, Any]:
        """What a checkpoint stores (``training.plan``) and the run logs at its start (the
        ``plan`` metrics record ``tools/plot_run.py`` draws the stages from)."""
        return {"source": self.source, "train_iters": self.train_iters, "stages": [asdict(s) for s in self.stages]}

    def check_resume(self, saved: Optional[Mapping[str, Any]], iteration: int, where: str) -> None:
        """The stages already trained (up to ``iteration``) are those of the checkpoint."""
        if not saved:
            if self.staged and iteration > 0:
                raise ArgsError(f"{where}: the checkpoint was trained without stages; a plan cannot start at "
                                f"iteration {iteration} (pass --finetune to start the plan afresh)")
            return
        try:
            theirs = [Stage(**{k: v for k, v in s.items() if k != "micro_batch_size"}) for s in saved["stages"]]
        except (KeyError, TypeError) as e:
            raise ArgsError(f"{where}: unreadable plan record ({e})") from None
        mine = [replace(s, micro_batch_size=None) for s in self.stages]
        trained_theirs = [s for s in theirs if s.start < iteration]
        trained_mine = [s for s in mine if s.start < iteration]
        if trained_theirs != trained_mine:
            first = next((i for i, (a, b) in enumerate(zip(trained_theirs, trained_mine)) if a != b),
                         min(len(trained_theirs), len(trained_mine)))
            raise ArgsError(f"{where}: the stages trained up to iteration {iteration} differ from this run's plan "
                            f"(from stage {first + 1}); resume with the same {saved.get('source', 'plan')}")

    def saved_micro_batches(self, saved: Optional[Mapping[str, Any]]) -> Optional[List[Optional[int]]]:
        """The checkpoint's micro-batch per stage when its stages are this plan's (a resumed
        ``auto``): an int where it chose one, None for a stage it did not reach."""
        if not saved:
            return None
        stages = saved.get("stages", [])
        if len(stages) != len(self.stages):
            return None
        sizes: List[Optional[int]] = []
        for s, mine in zip(stages, self.stages):
            if (s.get("seq_length"), s.get("global_batch_size")) != (mine.seq_length, mine.global_batch_size):
                return None
            m = s.get("micro_batch_size")
            sizes.append(m if isinstance(m, int) and not isinstance(m, bool) and m > 0 else None)
        return sizes

    def describe(self) -> List[str]:
        """Lines for the run's start: one per stage."""
        lines = []
        for i, s in enumerate(self.stages):
            end = self.end_of(i)
            mb = "auto" if s.micro_batch_size is None else str(s.micro_batch_size)
            reached = s.start < self.train_iters
            span = f"iterations {s.start}-{end}" if reached else f"from iteration {s.start}"
            tokens = f"tokens {self.tokens_at(end) - self.tokens_at(s.start):,}" if reached else "not reached"
            lines.append(f"  stage {i + 1}: {span} | seq length {s.seq_length} | global batch "
                         f"{s.global_batch_size} | micro-batch {mb} | LR scale {s.lr_scale:g} | {tokens}")
        return lines


# --------------------------------------------------------------------------- building


def parse_tokens(text: str, flag: str) -> int:
    """``250B`` -> 250_000_000_000 (K, M, B, T suffixes; plain integers too)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMBT]?)\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ArgsError(f"{flag}: {text!r} is not a token count (an integer with an optional K, M, B or T suffix)")
    return int(round(float(m.group(1)) * _SUFFIX[m.group(2).upper()]))


def step_batch_stages(schedule: str, seq_length: int) -> List[Stage]:
    """Stages of ``--step-batch-size-schedule "0:768 250B:1536"`` (thresholds in tokens)."""
    flag = "--step-batch-size-schedule"
    entries = []
    for item in schedule.split():
        if ":" not in item:
            raise ArgsError(f"{flag}: {item!r} is not TOKENS:GLOBAL_BATCH (e.g. \"0:768 250B:1536\")")
        tokens, batch = item.split(":", 1)
        try:
            gbs = int(batch)
        except ValueError:
            raise ArgsError(f"{flag}: {item!r}: the global batch {batch!r} is not an integer") from None
        if gbs <= 0:
            raise ArgsError(f"{flag}: {item!r}: the global batch must be > 0")
        entries.append((parse_tokens(tokens, flag), gbs))
    if not entries:
        raise ArgsError(f"{flag}: empty schedule")
    if entries[0][0] != 0:
        raise ArgsError(f"{flag}: the first threshold must be 0 (the batch at the start), got {entries[0][0]:,}")
    for (a, _), (b, _) in zip(entries, entries[1:]):
        if b <= a:
            raise ArgsError(f"{flag}: thresholds must increase ({a:,} then {b:,} tokens)")
    stages = [Stage(0, seq_length, entries[0][1])]
    tokens = 0
    for threshold, gbs in entries[1:]:
        prev = stages[-1]
        start = prev.start + max(1, math.ceil((threshold - tokens) / prev.tokens_per_iteration))
        tokens += (start - prev.start) * prev.tokens_per_iteration
        stages.append(Stage(start, seq_length, gbs))
    return stages


def curriculum_stages(path: str) -> List[Stage]:
    """Stages of a ``--curriculum`` YAML file; ``ArgsError`` naming the file and the stage."""
    import yaml

    flag = f"--curriculum {path}"
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArgsError(f"{flag}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ArgsError(f"{flag}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise ArgsError(f"{flag}: not valid YAML ({e})".replace("\n", " ")) from None
    if isinstance(data, Mapping) and "stages" in data:
        data = data["stages"]
    if not isinstance(data, list) or not data:
        raise ArgsError(f"{flag}: expected a non-empty list of stages, each with {', '.join(STAGE_KEYS)}")
    stages = []
    for i, entry in enumerate(data, 1):
        where = f"{flag}: stage {i}"
        if not isinstance(entry, Mapping):
            raise ArgsError(f"{where}: expected a mapping with {', '.join(STAGE_KEYS)}, got {entry!r}")
        missing = [k for k in STAGE_KEYS if k not in entry]
        unknown = sorted(set(entry) - set(STAGE_KEYS))
        if missing or unknown:
            raise ArgsError(f"{where}: " + (f"missing {', '.join(missing)}" if missing else "")
                            + ("; " if missing and unknown else "")
                            + (f"unknown {', '.join(unknown)}" if unknown else ""))
        values = {}
        for key in ("iteration", "seq_length", "global_batch_size"):
            v = entry[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "iteration" else 1):
                raise ArgsError(f"{where}: {key} must be an integer {'>= 0' if key == 'iteration' else '> 0'}, "
                                f"got {v!r}")
            values[key] = v
        scale = entry["lr_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ArgsError(f"{where}: lr_scale must be a number > 0, got {scale!r}")
        if stages and values["iteration"] <= stages[-1].start:
            raise ArgsError(f"{where}: iteration {values['iteration']} must be larger than the previous stage's "
                            f"{stages[-1].start}")
        if not stages and values["iteration"] != 0:
            raise ArgsError(f"{where}: the first stage must start at iteration 0, got {values['iteration']}")
        stages.append(Stage(values["iteration"], values["seq_length"], values["global_batch_size"], float(scale)))
    return stages


def build_plan(args, dp_size: int) -> TrainingPlan:
    """The plan of the parsed flags (micro-batches set unless ``--micro-batch-size auto``)."""
    if args.curriculum is not None:
        stages, source = curriculum_stages(args.curriculum), f"--curriculum {args.curriculum}"
    elif args.step_batch_size_schedule is not None:
        stages = step_batch_stages(args.step_batch_size_schedule, args.seq_length)
        source = "--step-batch-size-schedule"
    else:
        gbs = args.global_batch_size
        if gbs is None:
            if args.micro_batch_size == "auto":
                raise ArgsError("--micro-batch-size auto needs --global-batch-size (the batch it keeps)")
            gbs = args.micro_batch_size * dp_size
        stages, source = [Stage(0, args.seq_length, gbs)], "flags"
    mb = None if args.micro_batch_size == "auto" else int(args.micro_batch_size)
    plan = TrainingPlan(tuple(replace(s, micro_batch_size=mb) for s in stages), args.train_iters, dp_size, source)
    plan.check_divisible()
    return plan


__all__ = ["Stage", "TrainingPlan", "build_plan", "curriculum_stages", "parse_tokens", "step_batch_stages"]
