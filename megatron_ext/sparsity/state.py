"""``SparsityState``: the sparsity settings every masked linear of a model reads.

One object is shared by all masked linears of a model (``build_sparse_model``
creates it). The trainer moves it along each step with ``update(step, total)``:
the Gumbel temperature ``tau`` and the logit scale ``kappa`` follow linear
schedules, and ``step`` keys the counter-based Gumbel noise (so every
micro-batch of one step, and every data-parallel replica, draws the same masks).

``N`` and ``M`` are fixed once layers are built (they shape ``mask_logits``).
``mode``: ``"train"`` samples Gumbel-softmax masks in modules that are in
training mode (``module.train()``); ``"eval"`` (or a module in ``eval()``) uses
the argmax hard N:M mask; ``"dense"`` ignores the masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

from megatron_ext.sparsity.nm import check_nm_args

MODES = ("train", "eval", "dense")


def _positive_pair(name: str, flag: str, pair) -> Tuple[float, float]:
    try:
        a, b = (float(x) for x in pair)
    except (TypeError, ValueError):
        raise ValueError(f"{flag}: {name} must be a pair of numbers (start, end), got {pair!r}") from None
    if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"{flag}: {name} must be finite and > 0, got ({a}, {b})")
    return a, b


def linear_schedule(start: float, end: float, step: int, total_steps: int) -> float:
    """``start`` at step 0 moving linearly to ``end`` at ``total_steps`` (held after)."""
    if total_steps <= 0:
        return end
    frac = min(max(step / total_steps, 0.0), 1.0)
    return (1.0 - frac) * start + frac * end


def weight_reg_coefficient(lam: float, step: int, total_steps: int) -> float:
    """The regulariser weight ``lambda * (1 - t / T)`` (zero at and after the last step)."""
    return linear_schedule(lam, 0.0, step, total_steps)


@dataclass
class SparsityState:
    """Global sparsity settings (mutable: the trainer updates them each step)."""

    N: int = 2
    M: int = 4
    seed: int = 1234
    tau_range: Tuple[float, float] = (4.0, 0.05)      # --gumbel-temperature-range
    kappa_range: Tuple[float, float] = (1e2, 5e2)     # --gumbel-scale-range
    hard: bool = False                                # --hard: straight-through one-hot samples
    mode: str = "train"
    init_std: float = 0.01                            # mask logits ~ N(0, init_std)
    step: int = 0
    tau: float = float("nan")
    kappa: float = float("nan")

    def __post_init__(self) -> None:
        check_nm_args(self.N, self.M)
        self.tau_range = _positive_pair("temperature", "--gumbel-temperature-range", self.tau_range)
        self.kappa_range = _positive_pair("scale", "--gumbel-scale-range", self.kappa_range)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"sparsity seed must be a non-negative integer, got {self.seed!r}")
        if not self.init_std > 0:
            raise ValueError(f"mask logits init_std must be > 0, got {self.init_std!r}")
        self.set_mode(self.mode)
        if math.isnan(self.tau):
            self.tau = self.tau_range[0]
        if math.isnan(self.kappa):
            self.kappa = self.kappa_range[0]

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"sparsity mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def update(self, step: int, total_steps: int) -> None:
        """Set ``step`` and the scheduled ``tau`` / ``kappa`` for it (linear over ``total_steps``)."""
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self.step = step
        self.tau = linear_schedule(*self.tau_range, step, total_steps)
        self.kappa = linear_schedule(*self.kappa_range, step, total_steps)
