"""``--micro-batch-size auto``: the largest micro-batch that fits, per stage of the plan.

A micro-batch must divide the stage's global batch per data-parallel rank
(``global / DP``), so the candidates are its divisors. ``probe(seq_length, micro)``
runs one real step (forward, backward, optimizer) and returns its peak memory in bytes
(the largest of all ranks; None when the device ran out of memory). The search probes
the two smallest candidates, predicts the peak of the others from the line through
them (activation memory grows linearly with the micro-batch), takes the largest
predicted to fit under ``budget`` and confirms it with a probe, stepping down while a
probe exceeds the budget. Probes are shared between stages of the same length.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from megatron_ext.errors import RunError
from megatron_ext.training.plan import TrainingPlan

GiB = 1024 ** 3


class MicroBatchError(RunError):
    """Not even a micro-batch of one fits the memory budget."""


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class MicroBatchSearch:
    """Chooses micro-batches for a plan's stages; ``probes`` keeps every measurement."""

    def __init__(self, probe: Callable[[int, int], Optional[int]], budget: int) -> None:
        self.probe_fn = probe
        self.budget = int(budget)
        self.probes: Dict[Tuple[int, int], Optional[int]] = {}

    def _peak(self, seq_length: int, micro: int) -> Optional[int]:
        key = (seq_length, micro)
        if key not in self.probes:
            self.probes[key] = self.probe_fn(seq_length, micro)
        return self.probes[key]

    def _fits(self, seq_length: int, micro: int) -> bool:
        peak = self._peak(seq_length, micro)
        return peak is not None and peak <= self.budget

    def choose(self, seq_length: int, per_rank_batch: int) -> int:
        """The largest divisor of ``per_rank_batch`` whose step fits at ``seq_length``."""
        cands = divisors(per_rank_batch)
        if not self._fits(seq_length, cands[0]):
            peak = self._peak(seq_length, cands[0])
            got = "ran out of memory" if peak is None else f"peaks at {peak / GiB:.2f} GiB"
            raise MicroBatchError(f"--micro-batch-size auto: a micro-batch of 1 at sequence length {seq_length} "
                                  f"{got}, over the budget of {self.budget / GiB:.2f} GiB (raise "
                                  "--memory-target-fraction or --memory-budget-gib, or use more tensor parallelism)")
        if len(cands) == 1:
            return cands[0]
        if not self._fits(seq_length, cands[1]):
            return cands[0]
        (m1, m2) = cands[0], cands[1]
        p1, p2 = self._peak(seq_length, m1), self._peak(seq_length, m2)
        slope = max(0.0, (p2 - p1) / (m2 - m1))
        fitting = [m for m in cands if p1 + (m - m1) * slope <= self.budget]
        for m in reversed(fitting):
            if m <= m2 or self._fits(seq_length, m):
                return m
        return m2


def choose_micro_batches(plan: TrainingPlan, probe: Callable[[int, int], Optional[int]], budget: int,
                         known: Optional[Sequence[Optional[int]]] = None
                         ) -> Tuple[List[Optional[int]], MicroBatchSearch]:
    """Each stage's micro-batch: ``known[i]`` where it is an int (a resumed run's choice),
    else probed for the stages the run reaches; None for a stage not reached (chosen when
    a longer run reaches it)."""
    search = MicroBatchSearch(probe, budget)
    sizes: List[Optional[int]] = []
    for i, s in enumerate(plan.stages):
        if known is not None and isinstance(known[i], int):
            sizes.append(known[i])
        elif s.start >= plan.train_iters:
            sizes.append(None)
        else:
            sizes.append(search.choose(s.seq_length, s.global_batch_size // plan.dp_size))
    return sizes, search


__all__ = ["MicroBatchError", "MicroBatchSearch", "choose_micro_batches", "divisors"]
