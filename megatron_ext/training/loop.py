"""The generic training loop: dense (pre)training and fine-tuning, and any plug-in's method.

``pretrain(argv, plugins)`` sets up (process groups, run configuration, tokenizer, model,
checkpoint, optimizer, data) and trains from the checkpoint's iteration to
``--train-iters``. One iteration:

1. each plug-in's ``begin_step`` (MaskLLM: the Gumbel schedules move to ``t = iteration``);
2. the stage's ``num_microbatches`` forward/backward passes, each loss (token mean) divided
   by their number; gradients accumulate in one fp32 buffer;
3. each plug-in's ``extra_loss`` (its backward runs once), then ``after_backward``;
4. gradients averaged over data parallelism, clipped by global norm, AdamW step, and the
   learning-rate schedule advances by one global batch (one iteration for a staged plan).

The plan (``plan``: one stage, or ``--curriculum`` / ``--step-batch-size-schedule``
stages) sets each iteration's sequence length, global batch, micro-batch and LR scale.
Entering a stage switches the training samples to its length at the position in the
data the run has reached (``data.TokenStreamView``); ``--micro-batch-size auto`` chooses
each stage's micro-batch by probing real steps before training (``microbatch``).

Every ``--log-interval`` a line is printed and logged, every ``--eval-interval`` the
validation split and each ``--eval-data-path`` set are evaluated (loss, perplexity,
next-token accuracy, the gap to the training loss), every ``--save-interval`` a
checkpoint is saved; ``--exit-interval`` / SIGTERM (``--exit-signal-handler``) /
``--early-stop-patience`` stop after saving. ``--save-best`` keeps ``<save>/best``, the
checkpoint of the lowest validation loss.

Evaluation data: a one-stage run reads the next ``--eval-iters`` global batches at each
evaluation (Megatron-LM's order). A staged run, and the fixed ``--eval-seq-length`` pass
of any run, read the same tokens at every evaluation (the first ``eval-iters x global
batch x sequence length`` of the last stage, cut at the length evaluated), so the numbers
compare across evaluations; early stopping and ``--save-best`` follow the validation
loss at ``--eval-seq-length`` when given, else at the stage's length.

``--load``: a checkpoint this trainer wrote is resumed (weights, plug-in tensors such as
mask logits, optimizer, schedule, random state, data position; at another TP size the
weights and the optimizer state are resharded, the random state is not; ``--no-load-optim``
starts AdamW afresh with the learning rate where the run was, ``--no-load-rng`` keeps
the seeded state). With ``--finetune``, or for a checkpoint from the tools (converted,
pruned: no training state), only the tensors are taken and iteration, optimizer,
schedule and data start at zero; missing mask logits then start from their
initialisation. A directory without a checkpoint starts from scratch (unless
``--finetune`` or ``--exit-on-missing-checkpoint``).
"""
from __future__ import annotations

import math
import signal
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_ext import platform
from megatron_ext.checkpoint import CheckpointError, CheckpointInfo, load_rank_state_dict, read_shard
from megatron_ext.checkpoint.train_state import (load_model_weights, reshard_optimizer_state,
                                                 save_training_checkpoint, set_rng_state)
from megatron_ext.errors import RunError
from megatron_ext.training.arguments import ArgsError, parse_args
from megatron_ext.training.config import RunConfig
from megatron_ext.training.data import (BatchStream, DataError, TokenStreamView, build_datasets, check_data_paths,
                                        eval_sets, positions_needed, sample_counts)
from megatron_ext.training.evaluate import evaluate, masked_loss_sums
from megatron_ext.training.microbatch import GiB, MicroBatchError, choose_micro_batches
from megatron_ext.training.plan import Stage, TrainingPlan
from megatron_ext.training.optimizer import TrainOptimizer, param_groups
from megatron_ext.training.plugins import ModelFactory, TrainerPlugin, build_plugins
from megatron_ext.training.reporting import RunLogger
from megatron_ext.training.schedules import ParamScheduler, lr_schedule
from megatron_ext.training.setup import (find_load_checkpoint, probe_output_dirs, resolve_model_config,
                                         resolve_tokenizer)

class TrainingError(RunError):
    """The run cannot go on (NaN loss or gradient, ...)."""


@dataclass
class TrainResult:
    iteration: int                       # last completed iteration
    start_iteration: int                 # iteration the run started from (0, or the checkpoint's)
    history: List[Dict[str, Any]]        # one record per iteration trained by this run
    evals: List[Dict[str, Any]]          # one record per evaluation
    checkpoints: List[Path]
    consumed_train_samples: int
    stop_reason: str                     # "train_iters", "exit_interval", "signal" or "early_stop"
    log_dir: Optional[Path] = None
    plan: Optional[TrainingPlan] = None  # with the micro-batches the run used
    best: Optional[Dict[str, Any]] = None  # lowest validation loss: {"loss", "iteration"}


class _StopFlag:
    """SIGTERM -> stop after the current iteration (``--exit-signal-handler``)."""

    def __init__(self, enabled: bool) -> None:
        self.received = False
        self._previous = None
        if enabled:
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = True

    def agreed(self) -> bool:
        """Whether any rank got the signal (collective when distributed)."""
        return platform.any_rank(self.received)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class Run:
    """Everything a training run holds; ``pretrain`` builds one and calls ``train``.

    ``args``: the flags parsed with the same ``plugins`` (``parse_args(argv, plugins)``);
    ``plugins``: plug-in classes (``TrainerPlugin``), active when their flags ask;
    ``model_factory``: builds the model instead of ``models.build.build_model`` (a
    benchmark's proxy model, for instance), called as that function is
    (``plugins.ModelFactory``); a plug-in that builds the model (MaskLLM's masked linears)
    hands it its layer-spec overrides, so the two compose.
    """

    def __init__(self, args: Namespace, plugins: Sequence[type] = (),
                 model_factory: Optional[ModelFactory] = None) -> None:
        dinfo = platform.init_distributed(args.tensor_model_parallel_size, backend=args.distributed_backend)
        self.plugins: List[TrainerPlugin] = build_plugins(plugins, args)
        self.config = RunConfig.from_args(args, dinfo.world_size, {p.name: p.config for p in self.plugins})
        platform.seed_everything(self.config.optim.seed)
        self.dinfo = dinfo
        self.dp_group = platform.dp_group()
        self.mp_group = platform.mp_group()
        self.model_factory = model_factory

        c = self.config
        probe_output_dirs(c)
        ckpt = find_load_checkpoint(c.checkpoint)
        self.tokenizer, self.tokenizer_type = resolve_tokenizer(c.data, ckpt)
        self.plan = c.plan
        self.cfg = resolve_model_config(c.model, self.tokenizer, ckpt,
                                        seq_length=max(c.data.seq_length, c.logging.eval_seq_length or 0),
                                        tp=c.parallel.tensor_model_parallel_size, plugins=self.plugins)
        check_data_paths(c.data.data_path, "--data-path", self.cfg.vocab_size)
        for name, blend in eval_sets(c.data.eval_data_path):
            check_data_paths(blend, "--eval-data-path" + (f" {name}" if name != "eval_data" else ""),
                             self.cfg.vocab_size)

        lg = c.logging
        wandb = {k: v for k, v in (("wandb_project", lg.wandb_project), ("wandb_exp_name", lg.wandb_exp_name),
                                   ("wandb_save_dir", lg.wandb_save_dir)) if v is not None}
        if wandb:
            wandb["wandb_config"] = c.run_args()   # the run's flags, as Megatron-LM logs them
        self.log = RunLogger(lg.log_dir, lg.tag, enabled=platform.is_rank0(), tensorboard_dir=lg.tensorboard_dir,
                             **wandb)
        try:
            self._setup(ckpt)
        except BaseException:
            self.close()
            raise

    def _setup(self, ckpt: Optional[CheckpointInfo]) -> None:
        c, log, d = self.config, self.log, self.dinfo
        o = c.optim
        if self.plan.staged:
            log.print(f"> {d.world_size} process(es): TP={d.tp_size} DP={d.dp_size}; {len(self.plan.stages)} stages "
                      f"from {self.plan.source}:")
            for line in self.plan.describe():
                log.print(line)
        else:
            mb = "auto" if o.micro_batch_size is None else o.micro_batch_size
            log.print(f"> {d.world_size} process(es): TP={d.tp_size} DP={d.dp_size}, "
                      + (f"{o.num_microbatches} micro-batch(es) " if o.micro_batch_size else "micro-batches ")
                      + f"of {mb} per global batch of {o.global_batch_size}")
        if o.lr_scaling is not None:
            log.print(f"> --lr-scaling {o.lr_scaling}: LR {o.lr:.6g} and min LR {o.min_lr:.6g} for global batch "
                      f"{o.global_batch_size} (x{o.lr_scale_factor:.4g} of the values for "
                      f"--lr-base-batch-size {o.lr_base_batch_size})")
        log.print(f"> model {self.cfg.name}: {self.cfg.num_parameters():,} parameters, "
                  f"{'bf16' if c.model.bf16 else 'fp32'}, "
                  + (", ".join(p.describe() for p in self.plugins) or "dense"))
        self.model = self._build_model()
        self.model.train()
        # A checkpoint the trainer wrote is resumed; --finetune, or a checkpoint from the
        # tools (converted, pruned: no training state), gives weights only.
        resume = ckpt is not None and not c.checkpoint.finetune and isinstance(ckpt.extra.get("training"), dict)
        payload = self._load_weights(ckpt, resume) if ckpt is not None else None
        train_state = dict(ckpt.extra["training"]) if resume else {}
        self.iteration = int(train_state.get("iteration", 0))
        if ckpt is None and c.checkpoint.load is not None:
            log.print(f"> no checkpoint in {c.checkpoint.load}: starting from scratch")
        for plugin in self.plugins:
            plugin.after_load(self.model, self.iteration, log)
            if resume and plugin.name in ckpt.extra:
                plugin.load_checkpoint_info(ckpt.extra[plugin.name])
        self._build_optimizer()
        if resume:
            self.plan.check_resume(train_state.get("plan"), self.iteration, str(ckpt.iter_dir))
        if not self.plan.resolved:
            self._resolve_micro_batches(train_state.get("plan") if resume else None)
        # the plan this start follows: tools/plot_run.py draws the stage boundaries from it
        log.metrics("plan", self.iteration, {"plan": self.plan.to_record()})
        if resume:
            self._restore_optimizer(ckpt, payload, train_state)
        self.consumed_train = int(train_state.get("consumed_train_samples", 0))
        expected = self.plan.samples_at(self.iteration)
        if self.consumed_train != expected:
            raise ArgsError(f"--global-batch-size {o.global_batch_size}: the checkpoint consumed "
                            f"{self.consumed_train} samples in {self.iteration} iterations, this run's plan "
                            f"{expected} (a different global batch)")
        stopping = dict(train_state.get("early_stop") or {})
        self.best = stopping.get("best")                          # {"loss", "iteration"} or None
        self.reference_loss = stopping.get("reference_loss")     # the loss improvements are measured from
        self.evals_without_improvement = int(stopping.get("evals_without_improvement", 0))
        # training losses since the last evaluation (sum, count) and their mean at the last
        # one: the train/validation gap
        self.train_loss_since_eval = list(train_state.get("train_loss_since_eval", (0.0, 0)))
        self.last_train_loss: Optional[float] = train_state.get("last_train_loss")
        self._build_data(train_state)
        # random state last: everything above may draw from it
        if resume and payload is not None and not c.checkpoint.no_load_rng and payload.get("rng_state"):
            set_rng_state(payload["rng_state"][0], str(ckpt.shard_path(d.tp_rank)))
        self.start_iteration = self.iteration
        self.history: List[Dict[str, Any]] = []
        self.evals: List[Dict[str, Any]] = []
        self.evaluated_at: Optional[int] = None   # the iteration of the last evaluation
        self.checkpoints: List[Path] = []

    def plugin(self, name: str) -> Optional[TrainerPlugin]:
        """The active plug-in called ``name`` (None when its flags did not turn it on)."""
        return next((p for p in self.plugins if p.name == name), None)

    def _build_model(self) -> torch.nn.Module:
        """The model factory's model, through the plug-in that builds the model if one is
        active (``build_plugins`` allows at most one)."""
        from megatron_ext.models.build import build_model

        dtype = torch.bfloat16 if self.config.model.bf16 else torch.float32
        std = self.config.model.init_method_std
        factory = self.model_factory or build_model
        builder = next((p for p in self.plugins if p.builds_model()), None)
        if builder is None:
            return factory(self.cfg, dtype, init_method_std=std)
        return builder.build_model(self.cfg, dtype, std, factory)

    def _load_weights(self, ckpt: CheckpointInfo, resume: bool) -> Optional[Dict[str, Any]]:
        """Weights (and plug-in tensors) of this rank; returns the rank's whole file when read."""
        ck, d = self.config.checkpoint, self.dinfo
        same_tp = ckpt.tensor_parallel_size == d.tp_size
        payload = None
        if same_tp:
            payload = read_shard(ckpt, d.tp_rank)
            weights = payload["model"]
        else:
            _, weights = load_rank_state_dict(ckpt.iter_dir, d.tp_size, d.tp_rank)
            if resume and not ck.no_load_optim:
                payload = self._resharded_training_state(ckpt)
        notes = load_model_weights(self.model, weights,
                                   allow_missing_logits=ck.finetune or ck.enable_partial_load or not resume,
                                   where=str(ckpt.iter_dir))
        self.log.print(f"> loaded {'checkpoint' if resume else 'weights'} from {ckpt.iter_dir}"
                       + (f" (skipped {len(notes['skipped'])} hard_mask entries)" if notes["skipped"] else "")
                       + (f" ({len(notes['fresh'])} mask logits start fresh)" if notes["fresh"] else ""))
        return payload

    def _resharded_training_state(self, ckpt: CheckpointInfo) -> Dict[str, Any]:
        """This rank's optimizer and schedule state from a checkpoint saved at another TP size:
        every rank's AdamW moments and fp32 copies merged and split as the weights are. The
        random state is per TP rank and is not carried over (the seeded one is kept)."""
        saved, d = ckpt.tensor_parallel_size, self.dinfo
        payloads = [read_shard(ckpt, r) for r in range(saved)]
        for r, p in enumerate(payloads):
            if "optimizer" not in p:
                raise CheckpointError(f"{ckpt.shard_path(r)}: no optimizer state (saved with --no-save-optim); "
                                      "pass --no-load-optim or --finetune")
        state = reshard_optimizer_state([p["optimizer"] for p in payloads], ckpt.config, d.tp_size, d.tp_rank,
                                        str(ckpt.iter_dir))
        self.log.print(f"> optimizer state resharded from TP={saved} to TP={d.tp_size} (the random state is per "
                       "TP rank: the seeded one is kept)")
        out = {"optimizer": state}
        if "opt_param_scheduler" in payloads[0]:
            out["opt_param_scheduler"] = payloads[0]["opt_param_scheduler"]
        return out

    def _build_optimizer(self, quiet: bool = False) -> None:
        """AdamW and the schedule, after the weights are loaded (fp32 main copies start from them)."""
        o = self.config.optim
        claimed = [g for p in self.plugins for g in p.param_groups(self.model, o.lr, o.min_lr)]
        groups = param_groups(self.model, claimed)
        self.optimizer = TrainOptimizer(self.model, groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                                        eps=o.adam_eps, fused=platform.fused_optimizer_available(),
                                        dp_group=self.dp_group, model_parallel_group=self.mp_group,
                                        tp_rank=self.dinfo.tp_rank)
        self.scheduler = ParamScheduler(self.optimizer, lr_schedule(o, self._schedule_unit), o.weight_decay)
        trainable = sum(e.param.numel() for e in self.optimizer.entries)
        counts = ", ".join(f"{g['name']}: {len(g['params'])} tensors" for g in self.optimizer.param_groups)
        if not quiet:
            self.log.print(f"> trainable parameters on this rank: {trainable:,} ({counts})")

    @property
    def _schedule_unit(self) -> int:
        """What one iteration advances the schedule by: Megatron's samples of the global batch,
        or one iteration for a staged plan (whose global batch changes)."""
        return 1 if self.plan.staged else self.plan.stages[0].global_batch_size

    def _resolve_micro_batches(self, saved_plan: Optional[Dict[str, Any]]) -> None:
        """``--micro-batch-size auto``: the checkpoint's choice when resuming the same plan,
        else the largest micro-batch per stage that fits (probed, agreed by all ranks)."""
        o, log = self.config.optim, self.log
        saved = self.plan.saved_micro_batches(saved_plan)
        reached = [i for i, s in enumerate(self.plan.stages) if s.start < self.plan.train_iters]
        sizes = saved
        if saved is not None and all(saved[i] is not None for i in reached):
            log.print(f"> --micro-batch-size auto: the checkpoint's choice {saved}")
        else:
            capacity = platform.memory_capacity_bytes()
            if platform.has_cuda() or o.memory_budget_gib is None:
                budget = int(capacity * o.memory_target_fraction)
            else:
                budget = int(o.memory_budget_gib * GiB)
            t0 = time.perf_counter()
            # one unmeasured step first: what training keeps from step to step (AdamW's moments,
            # the plug-ins' buffers) then exists in every measured probe, as in training
            shortest = min(s.seq_length for s in self.plan.active())
            if self._probe_step(shortest, 1) is None:
                raise MicroBatchError(f"--micro-batch-size auto: a micro-batch of 1 at sequence length {shortest} "
                                      "ran out of memory (use more tensor parallelism)")
            sizes, search = choose_micro_batches(self.plan, self._probe_step, budget, saved)
            self.micro_batch_probes = dict(search.probes)   # (seq length, micro-batch) -> peak bytes
            probes = ", ".join(f"{m} x {s}: " + ("out of memory" if b is None else f"{b / GiB:.2f} GiB")
                               for (s, m), b in sorted(search.probes.items()))
            kept = "" if saved is None else f"; kept the checkpoint's choice where it made one {saved}"
            log.print(f"> --micro-batch-size auto: budget {budget / GiB:.2f} GiB; probed (micro-batch x seq) "
                      f"{probes}; chose {sizes}{kept} ({time.perf_counter() - t0:.1f} s)")
            # a fresh optimizer: the probes' AdamW state must not reach training
            self.optimizer.close()
            self._build_optimizer(quiet=True)
        self.plan = self.plan.with_micro_batches(sizes)
        for line in self.plan.describe() if self.plan.staged else ():
            log.print(line)

    def _probe_step(self, seq_length: int, micro_batch_size: int) -> Optional[int]:
        """Peak memory (bytes, largest over ranks) of one training step of ``micro_batch_size``
        samples of ``seq_length`` random tokens: forward, backward, plug-in hooks, clipping
        and an AdamW step at learning rate 0 (weights unchanged). None: out of memory.
        The random state is restored afterwards."""
        from megatron_ext.checkpoint.train_state import rng_state

        saved_rng = rng_state()
        gen = torch.Generator().manual_seed(micro_batch_size * 100003 + seq_length)
        tokens = torch.randint(0, self.cfg.vocab_size, (micro_batch_size, seq_length + 1), generator=gen)
        batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                 "loss_mask": torch.ones(micro_batch_size, seq_length),
                 "position_ids": torch.arange(seq_length).expand(micro_batch_size, seq_length)}
        live = self._live_bytes()
        peak: Optional[int] = None
        try:
            with platform.PeakMemory(live) as measured:
                self._accumulate_gradients(self.iteration, lambda: batch, 1)
                self.optimizer.clip_gradients(self.config.optim.clip_grad)
                for group in self.optimizer.param_groups:
                    group["lr"] = 0.0
                    group["weight_decay"] = 0.0
                self.optimizer.step()
            peak = measured.bytes
        except Exception as e:  # noqa: BLE001 - only running out of memory is an answer
            if not platform.is_out_of_memory(e):
                raise
        finally:
            self.optimizer.zero_grad()
            self.scheduler.step(0)
            set_rng_state(saved_rng, "the micro-batch probe")
            platform.release_cached_memory()
        worst = platform.max_over_ranks(-1.0 if peak is None else float(peak))
        return None if worst < 0 or not platform.all_agree(peak is not None) else int(worst)

    def _live_bytes(self) -> int:
        """What a step keeps besides its activations: parameters, the fp32 gradient buffer,
        fp32 main copies and AdamW's two fp32 moments per trained element."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        trained = sum(e.param.numel() for e in self.optimizer.entries)
        mains = sum(e.main.numel() * 4 for e in self.optimizer.entries if e.main is not e.param)
        return params + self.optimizer.grad_buffer.numel() * 4 + mains + 8 * trained

    def _restore_optimizer(self, ckpt: CheckpointInfo, payload: Optional[Dict[str, Any]],
                           train_state: Dict[str, Any]) -> None:
        ck, o = self.config.checkpoint, self.config.optim
        where = str(ckpt.shard_path(self.dinfo.tp_rank))
        if ck.no_load_optim:
            # a fresh optimizer; the learning rate continues where the run left off
            self.scheduler.step(self.iteration if self.plan.staged else self.plan.samples_at(self.iteration))
            return
        if "optimizer" not in payload:
            raise CheckpointError(f"{where}: no optimizer state (saved with --no-save-optim); pass "
                                  "--no-load-optim or --finetune")
        self.optimizer.load_state_dict(payload["optimizer"], where)
        policy = ("override" if o.override_opt_param_scheduler else
                  "checkpoint" if o.use_checkpoint_opt_param_scheduler else "check")
        if "opt_param_scheduler" in payload:
            self.scheduler.load_state_dict(payload["opt_param_scheduler"], policy, where)

    def _build_data(self, train_state: Dict[str, Any]) -> None:
        """Datasets (rank 0 first, so a shared index cache is written once) and this rank's streams."""
        c, d, log = self.config, self.dinfo, self.log
        counts = self._sample_counts()
        if platform.world_size() > 1 and c.data.data_cache_path is not None:
            datasets = build_datasets(c.data, counts, self.tokenizer) if platform.is_rank0() else None
            platform.barrier()
            if not platform.is_rank0():
                datasets = build_datasets(c.data, counts, self.tokenizer)
        else:
            datasets = build_datasets(c.data, counts, self.tokenizer)
        self.datasets = datasets
        self._stage_index: Optional[int] = None
        self._enter_stage(self.plan.index_at(self.iteration), quiet=True)
        # Megatron's advancing validation order (one-stage runs): where each set stands
        consumed = dict(train_state.get("consumed_eval_samples") or {})
        consumed.setdefault("valid", int(train_state.get("consumed_valid_samples", 0)))
        if "consumed_extra_valid_samples" in train_state:
            consumed.setdefault("eval_data", int(train_state["consumed_extra_valid_samples"]))
        self.eval_streams: Dict[str, BatchStream] = {}
        if not self.plan.staged:
            stage = self.plan.stages[0]
            for name, ds in self._eval_datasets().items():
                self.eval_streams[name] = BatchStream(ds, f"{name} evaluation", int(consumed.get(name, 0)),
                                                      stage.micro_batch_size, d.dp_size, d.dp_rank)
        log.print(f"> data: {len(datasets.train)} training samples"
                  + (f" of {c.data.seq_length} tokens" if self.plan.staged else "")
                  + (f", {len(datasets.valid)} validation" if datasets.valid is not None else "")
                  + "".join(f", {len(ds)} in {name}" for name, ds in datasets.extra_valid.items())
                  + (f"; resuming at iteration {self.iteration} ({self.consumed_train} samples consumed)"
                     if self.iteration else ""))

    def _eval_datasets(self) -> Dict[str, Any]:
        out = {"valid": self.datasets.valid} if self.datasets.valid is not None else {}
        out.update(self.datasets.extra_valid)
        return out

    def _eval_tokens(self) -> int:
        """Tokens a fixed-data evaluation covers: ``--eval-iters`` global batches of the last stage."""
        last = self.plan.active()[-1]
        return self.config.logging.eval_iters * last.tokens_per_iteration

    def _eval_shape(self, seq_length: int, stage: Stage) -> tuple[int, int]:
        """(micro-batch, micro-batch steps) of a fixed-data evaluation at ``seq_length``
        during ``stage``. Every evaluation at one length reads the same samples, whatever the
        stage (enough for ``_eval_tokens``), in micro-batches no larger in tokens than the
        stage's: the largest such micro-batch that divides them."""
        dp = self.dinfo.dp_size
        per_rank = -(-self._eval_tokens() // (seq_length * dp))
        bound = min(per_rank, max(1, stage.micro_batch_size * stage.seq_length // seq_length))
        micro = next(m for m in range(bound, 0, -1) if per_rank % m == 0)
        return micro, per_rank // micro

    def _eval_lengths(self, stage: Stage) -> List[tuple[int, tuple[str, ...]]]:
        """The fixed-data evaluations during ``stage``: ``(length, label suffixes)``. A staged
        run's series at the stage's length is the set's plain name; ``--eval-seq-length L``
        is always ``@L``; one pass serves both where the lengths agree."""
        passes = [(stage.seq_length, ("",))] if self.plan.staged else []
        e = self.config.logging.eval_seq_length
        if e is not None:
            if passes and passes[0][0] == e:
                passes[0] = (e, ("", f"@{e}"))
            else:
                passes.append((e, (f"@{e}",)))
        return passes

    def _sample_counts(self) -> List[int]:
        """``[train, valid, test]`` samples of the base datasets (``--seq-length`` each)."""
        o, lg, base = self.config.optim, self.config.logging, self.config.data.seq_length
        if self.plan.staged:
            counts = [positions_needed(self.plan.tokens_at(o.train_iters), 1, base) + 1, 0, 0]
        else:
            counts = sample_counts(o.train_iters, o.global_batch_size, lg.eval_interval, lg.eval_iters)
        if lg.eval_iters > 0:
            dp = self.dinfo.dp_size
            for stage in self.plan.active():
                for length, _ in self._eval_lengths(stage):
                    micro, steps = self._eval_shape(length, stage)
                    counts[1] = max(counts[1], positions_needed(steps * micro * dp, length, base) + 1)
            if self.plan.staged:
                last = self.plan.active()[-1]
                micro, steps = self._eval_shape(last.seq_length, last)
                counts[2] = positions_needed(steps * micro * dp, last.seq_length, base) + 1
        return counts

    def _view(self, dataset, seq_length: int, start: int = 0):
        """``dataset`` itself at its own length from 0, else a view cut at ``seq_length``."""
        if start == 0 and seq_length == self.config.data.seq_length:
            return dataset
        return TokenStreamView(dataset, seq_length, start, self.config.data.reset_position_ids)

    def _enter_stage(self, index: int, quiet: bool = False) -> None:
        """Training samples, micro-batches and LR scale of stage ``index`` (at the run's position)."""
        stage, d = self.plan.stages[index], self.dinfo
        start = self.plan.tokens_at(stage.start) if self.plan.staged else 0
        view = self._view(self.datasets.train, stage.seq_length, start)
        consumed = self.consumed_train - self.plan.samples_at(stage.start)
        self.train_stream = BatchStream(view, "training", consumed, stage.micro_batch_size, d.dp_size, d.dp_rank)
        self.scheduler.scale = stage.lr_scale
        self.scheduler.step(0)
        self._stage_index = index
        if not quiet or (self.plan.staged and self.iteration > 0):
            self.log.print(f"> stage {index + 1}/{len(self.plan.stages)} from iteration {self.iteration}: seq length "
                           f"{stage.seq_length}, global batch {stage.global_batch_size} "
                           f"({stage.num_microbatches(d.dp_size)} micro-batch(es) of {stage.micro_batch_size}), "
                           f"LR scale {stage.lr_scale:g}, "
                           f"{self.plan.tokens_at(self.iteration):,} tokens seen")

    # ------------------------------------------------------------------ one iteration
    def _accumulate_gradients(self, t: int, next_batch: Callable[[], Dict[str, torch.Tensor]],
                              num_microbatches: int) -> torch.Tensor:
        """A step up to clipping, after ``t`` completed iterations: the plug-ins'
        ``begin_step``, ``num_microbatches`` forward/backward passes on ``next_batch()`` (each
        loss, a token mean, divided by their number), the plug-ins' extra loss and
        ``after_backward``, and the gradients reduced over data parallelism. Returns the sum
        of the micro-batch losses."""
        o = self.config.optim
        for plugin in self.plugins:
            plugin.begin_step(self.model, t, o.train_iters)
        self.optimizer.zero_grad()
        loss_sum = torch.zeros((), dtype=torch.float32, device=platform.device())
        for _ in range(num_microbatches):
            total, count = masked_loss_sums(self.model, next_batch())
            loss = total / count.clamp_min(1.0)
            (loss / num_microbatches).backward()
            loss_sum += loss.detach()
        for plugin in self.plugins:
            extra = plugin.extra_loss(self.model, t, o.train_iters)
            if extra is not None:
                extra.backward()
        for plugin in self.plugins:
            plugin.after_backward(self.model)
        self.optimizer.reduce_gradients()
        return loss_sum

    def train_step(self) -> Dict[str, Any]:
        o = self.config.optim
        t = self.iteration  # completed iterations
        index = self.plan.index_at(t)
        if index != self._stage_index:
            self._enter_stage(index)
        stage = self.plan.stages[index]
        num_microbatches = stage.num_microbatches(self.dinfo.dp_size)
        loss_sum = self._accumulate_gradients(t, self.train_stream.next, num_microbatches)
        loss_avg = (loss_sum / num_microbatches).reshape(1)
        if self.dinfo.dp_size > 1:
            dist.all_reduce(loss_avg, group=self.dp_group)
            loss_avg /= self.dinfo.dp_size
        lr = self.scheduler.lr
        grad_norm = self.optimizer.clip_gradients(o.clip_grad)
        loss_value = float(loss_avg.item())
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            raise TrainingError(f"iteration {t + 1}: loss {loss_value} / grad norm {grad_norm} is not finite "
                                "(lower --lr, or check the data)")
        zeros = self.optimizer.count_zeros() if self.config.logging.log_num_zeros_in_grad else None
        self.optimizer.step()
        self.scheduler.step(self._schedule_unit)
        self.iteration += 1
        self.consumed_train += stage.global_batch_size
        self.train_loss_since_eval = [self.train_loss_since_eval[0] + loss_value, self.train_loss_since_eval[1] + 1]
        record = {"iteration": self.iteration, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "global_batch_size": stage.global_batch_size, "seq_length": stage.seq_length,
                  "tokens": self.plan.tokens_at(self.iteration)}
        if self.plan.staged:
            record.update(stage=index + 1, lr_scale=stage.lr_scale)
        if zeros is not None:
            record["num_zeros"] = zeros
        for plugin in self.plugins:
            record.update(plugin.step_record())
        return record

    # ------------------------------------------------------------------ evaluation, checkpoints
    def _eval_passes(self, datasets: Dict[str, Any], fixed: bool = True) -> List[tuple]:
        """``(labels, stream, steps, seq_length)`` of each evaluation now: per set, the stage's
        length (advancing for one-stage runs, fixed for staged ones) and ``--eval-seq-length``;
        ``fixed=False`` leaves the fixed-data passes out."""
        stage, d = self.plan.stage_at(max(0, self.iteration - 1)), self.dinfo
        passes = []
        for name, ds in datasets.items():
            if name in self.eval_streams:
                steps = self.config.logging.eval_iters * stage.num_microbatches(d.dp_size)
                passes.append(((name,), self.eval_streams[name], steps, stage.seq_length))
            for length, suffixes in self._eval_lengths(stage) if fixed else ():
                micro, steps = self._eval_shape(length, stage)
                labels = tuple(name + x for x in suffixes)
                stream = BatchStream(self._view(ds, length), f"{labels[-1]} evaluation", 0, micro, d.dp_size,
                                     d.dp_rank)
                passes.append((labels, stream, steps, length))
        return passes

    def _evaluate_sets(self, datasets: Dict[str, Any], when: str, train_loss: Optional[float],
                       fixed: bool = True) -> List[Dict[str, Any]]:
        return [record for labels, stream, steps, length in self._eval_passes(datasets, fixed)
                for record in self._evaluate_pass(labels, stream, steps, length, when, train_loss)]

    def _evaluate_pass(self, labels: tuple[str, ...], stream: BatchStream, steps: int, length: int, when: str,
                       train_loss: Optional[float]) -> List[Dict[str, Any]]:
        """``steps`` micro-batches of ``stream`` evaluated once, kept in ``evals`` and logged
        under each of ``labels`` (one pass can serve two series), printed once."""
        result = evaluate(self.model, stream, steps, 1, self.cfg.vocab_size, self.dp_group)
        records = []
        for name in labels:
            record = {"iteration": self.iteration, "set": name, "when": when, "seq_length": length, **result}
            if train_loss is not None:
                record["gap"] = result["loss"] - train_loss
            self.evals.append(record)
            self.log.metrics(f"eval/{name}", self.iteration,
                             {k: record[k] for k in ("loss", "ppl", "accuracy", "tokens", "seq_length", "gap")
                              if k in record}, self.consumed_train)
            records.append(record)
        name, record = " = ".join(labels), records[0]
        self.log.print(f" {name} loss at {when}: {result['loss']:.6E} | {name} PPL: {result['ppl']:.6E} | "
                       f"{name} accuracy: {result['accuracy']:.4f} | tokens: {result['tokens']}"
                       + (f" | gap to training loss: {record['gap']:+.4f}" if "gap" in record else "") + " |")
        return records

    def run_evaluation(self, label: str, fixed: bool = True) -> Optional[float]:
        """Evaluate every set (``fixed=False``: the advancing passes only); returns the loss
        early stopping and ``--save-best`` follow, or None where its series was not evaluated."""
        total, count = self.train_loss_since_eval
        if count:
            self.last_train_loss = total / count
        self.train_loss_since_eval = [0.0, 0]
        results = self._evaluate_sets(self._eval_datasets(), label, self.last_train_loss, fixed)
        self.evaluated_at = self.iteration
        return self._monitored(results)

    def _monitored(self, results: List[Dict[str, Any]]) -> Optional[float]:
        """The validation loss (the first set when there is no validation split), at
        ``--eval-seq-length`` when given; None when that series is not in ``results``."""
        if not results:
            return None
        first = results[0]["set"].split("@")[0]
        e = self.config.logging.eval_seq_length
        wanted = f"{first}@{e}" if e is not None else first
        return next((r["loss"] for r in results if r["set"] == wanted), None)

    def run_test(self) -> None:
        if self.datasets.test is None:
            return
        if self.plan.staged:
            self._evaluate_sets({"test": self.datasets.test}, "the end of training", None)
            return
        stage, d = self.plan.stages[0], self.dinfo
        stream = BatchStream(self.datasets.test, "test", 0, stage.micro_batch_size, d.dp_size, d.dp_rank)
        self._evaluate_pass(("test",), stream, self.config.logging.eval_iters * stage.num_microbatches(d.dp_size),
                            stage.seq_length, "the end of training", None)

    def _update_best(self, loss: Optional[float]) -> bool:
        """Track the lowest validation loss (saving ``<save>/best``) and the evaluations
        without improvement; True when ``--early-stop-patience`` says stop."""
        lg = self.config.logging
        if loss is None:
            return False
        if self.best is None or loss < self.best["loss"]:
            self.best = {"loss": loss, "iteration": self.iteration}
            if self.config.checkpoint.save_best:
                self.save(best=True)
        if self.reference_loss is None or loss < self.reference_loss - lg.early_stop_min_delta:
            self.reference_loss = loss
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        return lg.early_stop_patience is not None and self.evals_without_improvement >= lg.early_stop_patience

    def save(self, best: bool = False) -> Path:
        """A checkpoint of this iteration in ``--save`` (or its ``best`` directory)."""
        ck = self.config.checkpoint
        t0 = time.perf_counter()
        train_state = {"iteration": self.iteration, "consumed_train_samples": self.consumed_train,
                       "consumed_eval_samples": {n: s.consumed for n, s in self.eval_streams.items()},
                       "consumed_valid_samples": self.eval_streams["valid"].consumed if "valid" in self.eval_streams
                       else 0,
                       "plan": self.plan.to_record(), "stage": self.plan.index_at(max(0, self.iteration - 1)) + 1,
                       "tokens_seen": self.plan.tokens_at(self.iteration),
                       "train_loss_since_eval": list(self.train_loss_since_eval),
                       "last_train_loss": self.last_train_loss,
                       "early_stop": {"best": self.best, "reference_loss": self.reference_loss,
                                      "evals_without_improvement": self.evals_without_improvement}}
        info_extra: Dict[str, Any] = {"training": {**train_state, "tag": self.config.logging.tag}}
        for plugin in self.plugins:
            section = plugin.checkpoint_info(self.iteration)
            if section:
                info_extra[plugin.name] = section
        path = save_training_checkpoint(
            Path(ck.save) / "best" if best else ck.save, self.iteration, self.cfg, self.model,
            scheduler=self.scheduler, optimizer=None if ck.no_save_optim else self.optimizer,
            save_rng=not ck.no_save_rng, train_state=train_state, run_args=self.config.run_args(),
            info_extra=info_extra, tokenizer_source=self.tokenizer.path, tokenizer_type=self.tokenizer_type,
            keep_last=1 if best else ck.keep_last)
        if not best:
            self.checkpoints.append(path)
        self.log.print(f"> saved {'the best ' if best else ''}checkpoint at iteration {self.iteration} to {path} "
                       f"({time.perf_counter() - t0:.2f} s)")
        return path

    # ------------------------------------------------------------------ logging
    def _log_interval(self, records: List[Dict[str, Any]], seconds: float) -> None:
        o = self.config.optim
        n = len(records)
        last = records[-1]
        per_iter = seconds / n
        loss = sum(r["loss"] for r in records) / n
        tokens_per_s = sum(r["global_batch_size"] * r["seq_length"] for r in records) / seconds
        staged = self.plan.staged
        fields = [("consumed samples", self.consumed_train, "d"),
                  ("elapsed time per iteration (ms)", per_iter * 1000.0, ".1f"),
                  ("tokens/s", tokens_per_s, ".0f"),
                  ("learning rate", last["lr"], ".6E"),
                  ("global batch size", last["global_batch_size"], "d"),
                  ("stage", last.get("stage"), "d"),
                  ("seq length", last["seq_length"] if staged else None, "d"),
                  ("lr scale", last.get("lr_scale"), "g"),
                  ("tokens seen", last["tokens"] if staged else None, "d"),
                  ("lm loss", loss, ".6E"),
                  ("grad norm", last["grad_norm"], ".3f"),
                  ("num zeros", last.get("num_zeros"), "d")]
        metrics = {"loss": loss, "lr": last["lr"], "grad_norm": last["grad_norm"], "ms_per_iter": per_iter * 1000.0,
                   "tokens_per_s": tokens_per_s, "global_batch_size": last["global_batch_size"],
                   "seq_length": last["seq_length"], "tokens": last["tokens"]}
        if staged:
            metrics.update(stage=last["stage"], lr_scale=last["lr_scale"])
        for plugin in self.plugins:
            for label, value, fmt, key in plugin.log_fields(self.model):
                fields.append((label, value, fmt))
                if key is not None and value is not None:
                    metrics[key] = value
        if "num_zeros" in last:
            metrics["num_zeros"] = last["num_zeros"]
        mem = platform.memory_stats()
        fields += [(k.replace("_", " "), v, ".1f") for k, v in mem.items()]
        metrics.update(mem)
        self.log.metrics("train", self.iteration, metrics, self.consumed_train)
        self.log.print(self.log.iteration_line(self.iteration, o.train_iters, fields))

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        o, lg, ck = self.config.optim, self.config.logging, self.config.checkpoint
        stop = _StopFlag(lg.exit_signal_handler)
        reason = "train_iters"
        saved_at = None
        try:
            window: List[Dict[str, Any]] = []
            platform.synchronize()
            t_window = time.perf_counter()
            while self.iteration < o.train_iters:
                record = self.train_step()
                self.history.append(record)
                window.append(record)
                if self.iteration % lg.log_interval == 0 or self.iteration == o.train_iters:
                    platform.synchronize()
                    now = time.perf_counter()
                    self._log_interval(window, now - t_window)
                    window = []
                early_stop = False
                if lg.eval_iters > 0 and self.iteration % lg.eval_interval == 0:
                    early_stop = self._update_best(self.run_evaluation(f"iteration {self.iteration}"))
                if ck.save is not None and ck.save_interval and self.iteration % ck.save_interval == 0:
                    self.save()
                    saved_at = self.iteration
                if early_stop:
                    reason = "early_stop"
                elif lg.exit_signal_handler and stop.agreed():
                    reason = "signal"
                elif lg.exit_interval and self.iteration % lg.exit_interval == 0:
                    reason = "exit_interval"
                if reason != "train_iters":
                    if ck.save is not None and saved_at != self.iteration:
                        self.save()
                    why = reason.replace("_", " ")
                    if reason == "early_stop":
                        why = (f"early stop: {self.evals_without_improvement} evaluations without the validation "
                               f"loss falling below {self.reference_loss:.6f} - {lg.early_stop_min_delta:g}; the "
                               f"best was {self.best['loss']:.6f} at iteration {self.best['iteration']}")
                    self.log.print(f"> stopping at iteration {self.iteration} ({why})")
                    break
                if not window:
                    platform.synchronize()
                    t_window = time.perf_counter()
            else:
                if ck.save is not None and self.iteration > 0 and saved_at != self.iteration \
                        and self.iteration > self.start_iteration:
                    self.save()
                if lg.eval_iters > 0:
                    # a one-stage run reads the next validation batches (Megatron's order), so the
                    # same model gives another value than at the last interval: the label says so.
                    # Fixed-data passes that just ran at this iteration would repeat themselves
                    fixed = self.evaluated_at != self.iteration
                    if fixed or not self.plan.staged:
                        when = "the end of training" + ("" if self.plan.staged else " (the next validation batches)")
                        self._update_best(self.run_evaluation(when, fixed))
                    self.run_test()
        finally:
            stop.restore()
        return TrainResult(iteration=self.iteration, start_iteration=self.start_iteration, history=self.history,
                           evals=self.evals, checkpoints=self.checkpoints, consumed_train_samples=self.consumed_train,
                           stop_reason=reason, log_dir=self.log.run_dir, plan=self.plan, best=self.best)

    def close(self) -> None:
        opt = getattr(self, "optimizer", None)
        if opt is not None:
            opt.close()
        self.log.close()


def pretrain(argv: Sequence[str] | Namespace | None = None, plugins: Sequence[type] = (),
             model_factory: Optional[ModelFactory] = None) -> TrainResult:
    """Parse (unless given a parsed ``Namespace``), set up and train; see the module docstring."""
    args = argv if isinstance(argv, Namespace) else parse_args(argv, plugins)
    run = Run(args, plugins, model_factory)
    try:
        return run.train()
    finally:
        run.close()


__all__ = ["DataError", "ModelFactory", "Run", "TrainResult", "TrainingError", "pretrain"]
