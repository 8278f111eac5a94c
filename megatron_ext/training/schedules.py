"""Learning-rate schedule with the semantics of megatron-core's ``OptimizerParamScheduler``.

Steps are counted in samples, as Megatron-LM counts them when training by iterations:
warmup and decay lengths are ``iters * global_batch_size`` and the schedule advances by
one global batch after each optimizer step, so iteration ``k`` (1-based) trains with
the learning rate of step ``(k - 1) * global_batch_size``.

* warmup (``num_steps <= warmup_steps``, when ``warmup_steps > 0``): linear from
  ``init_lr`` to ``max_lr``;
* then ``constant``: ``max_lr``; past ``decay_steps``: ``min_lr``;
* otherwise, with ``r = (num_steps - warmup) / (decay_steps - warmup)``,
  ``linear``: ``min + (max - min) * (1 - r)``, ``cosine``: ``min + (max - min) * (1 + cos(pi r)) / 2``.

A parameter group may carry its own ``max_lr`` / ``min_lr`` (``--lr-mult`` scales both
for the mask logits) and ``wd_mult`` (0 for groups without weight decay).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional
from megatron_ext.errors import MegatronExtError

DECAY_STYLES = ("constant", "linear", "cosine")


class ScheduleError(MegatronExtError, ValueError):
    """A schedule that cannot run, or a checkpoint whose schedule disagrees with the flags."""

    exit_code = 1


@dataclass(frozen=True)
class LRSchedule:
    max_lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int
    decay_style: str
    init_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.decay_style not in DECAY_STYLES:
            raise ScheduleError(f"--lr-decay-style {self.decay_style!r}: expected one of {', '.join(DECAY_STYLES)}")
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise ScheduleError(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.max_lr})")
        if self.init_lr > self.max_lr:
            raise ScheduleError(f"--lr-warmup-init {self.init_lr} is larger than --lr {self.max_lr}")
        if self.decay_steps <= 0:
            raise ScheduleError(f"decay steps must be > 0, got {self.decay_steps}")
        if not 0 <= self.warmup_steps < self.decay_steps:
            raise ScheduleError(f"warmup steps {self.warmup_steps} must be in [0, decay steps {self.decay_steps})")

    def lr(self, num_steps: float, max_lr: float | None = None, min_lr: float | None = None) -> float:
        """The learning rate after ``num_steps`` samples (group overrides ``max_lr`` / ``min_lr``)."""
        max_lr = self.max_lr if max_lr is None else max_lr
        min_lr = self.min_lr if min_lr is None else min_lr
        if self.warmup_steps > 0 and num_steps <= self.warmup_steps:
            return self.init_lr + (max_lr - self.init_lr) * float(num_steps) / float(self.warmup_steps)
        if self.decay_style == "constant":
            return max_lr
        if num_steps > self.decay_steps:
            return min_lr
        ratio = float(num_steps - self.warmup_steps) / float(self.decay_steps - self.warmup_steps)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return min_lr + coeff * (max_lr - min_lr)


def lr_schedule(optim, unit: Optional[int] = None) -> LRSchedule:
    """Megatron-LM's iteration-based schedule for an ``OptimConfig``: lengths in ``unit``s
    per iteration (Megatron's samples of the global batch by default; 1 counts iterations,
    as a staged plan does)."""
    gbs = optim.global_batch_size if unit is None else unit
    decay_iters = optim.lr_decay_iters or optim.train_iters
    decay_steps = decay_iters * gbs
    if optim.lr_warmup_fraction is not None:
        warmup_steps = optim.lr_warmup_fraction * decay_steps
    else:
        warmup_steps = optim.lr_warmup_iters * gbs
    return LRSchedule(max_lr=optim.lr, min_lr=optim.min_lr, warmup_steps=warmup_steps, decay_steps=decay_steps,
                      decay_style=optim.lr_decay_style, init_lr=optim.lr_warmup_init)


class ParamScheduler:
    """Sets ``lr`` and ``weight_decay`` of an optimizer's parameter groups from the schedule.

    ``optimizer``: anything with ``param_groups`` (read at every step, so groups replaced by
    loading optimizer state are followed), each read for ``max_lr``, ``min_lr`` and
    ``wd_mult``. Starts at step 0 (the groups get the first learning rate at once).
    """

    def __init__(self, optimizer, schedule: LRSchedule, weight_decay: float) -> None:
        self.optimizer = optimizer
        self.schedule = schedule
        self.weight_decay = float(weight_decay)
        self.num_steps = 0
        self.scale = 1.0          # a curriculum stage's lr_scale, times every group's LR
        self.step(0)

    def step(self, increment: int) -> None:
        self.num_steps += increment
        for group in self.optimizer.param_groups:
            group["lr"] = self.scale * self.schedule.lr(self.num_steps, group.get("max_lr"), group.get("min_lr"))
            group["weight_decay"] = self.weight_decay * group.get("wd_mult", 1.0)

    @property
    def lr(self) -> float:
        """The base learning rate now (the stage's scale applied, without any group's multiplier)."""
        return self.scale * self.schedule.lr(self.num_steps)

    def state_dict(self) -> Dict[str, Any]:
        """Megatron-LM's keys, so its tools read our files."""
        s = self.schedule
        return {"max_lr": s.max_lr, "min_lr": s.min_lr, "lr_warmup_steps": s.warmup_steps,
                "lr_decay_steps": s.decay_steps, "lr_decay_style": s.decay_style, "num_steps": self.num_steps,
                "init_lr": s.init_lr, "start_wd": self.weight_decay, "end_wd": self.weight_decay,
                "wd_incr_style": "constant"}

    def load_state_dict(self, state: Mapping[str, Any], policy: str = "check", where: str = "checkpoint") -> None:
        """Restore the step count; the schedule itself follows ``policy``:

        ``check`` (Megatron's default): the checkpoint's schedule must equal the flags';
        ``checkpoint`` (``--use-checkpoint-opt_param-scheduler``): take the checkpoint's;
        ``override`` (``--override-opt_param-scheduler``): keep the flags'.
        """
        if policy not in ("check", "checkpoint", "override"):
            raise ValueError(f"unknown scheduler policy {policy!r}")
        try:
            saved = LRSchedule(max_lr=float(state["max_lr"]), min_lr=float(state["min_lr"]),
                               warmup_steps=state["lr_warmup_steps"], decay_steps=state["lr_decay_steps"],
                               decay_style=str(state["lr_decay_style"]),
                               init_lr=float(state.get("init_lr", self.schedule.init_lr)))
            num_steps = state["num_steps"]
        except (KeyError, TypeError, ValueError) as e:
            raise ScheduleError(f"{where}: unreadable learning-rate scheduler state ({e})") from None
        if policy == "check" and saved != self.schedule:
            mine, theirs = asdict(self.schedule), asdict(saved)
            diff = ", ".join(f"{k}: flags {mine[k]!r} vs checkpoint {theirs[k]!r}" for k in mine if mine[k] != theirs[k])
            raise ScheduleError(f"{where}: the learning-rate schedule differs from the checkpoint's ({diff}); pass "
                                "--override-opt_param-scheduler to use the flags or "
                                "--use-checkpoint-opt_param-scheduler to use the checkpoint's")
        if policy == "checkpoint":
            self.schedule = saved
        self.num_steps = 0
        self.step(num_steps)

