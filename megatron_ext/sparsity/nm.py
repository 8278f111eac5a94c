"""N:M patterns: the candidate masks of a group and checks on masks and weights.

A group is ``M`` consecutive weights along the **input** dimension (the last
dimension of a ``[out, in]`` weight), of which ``N`` are kept. The candidate set
``S`` holds every binary length-``M`` vector with ``N`` ones, in a fixed order:
``itertools.combinations(range(M), N)`` order of the positions of the ones. The
order is part of the checkpoint format (``mask_logits[..., c]`` scores candidate
``c``), so it never changes.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch


def check_nm_args(N: int, M: int) -> None:
    """Raise ``ValueError`` unless ``0 < N < M`` are integers."""
    for name, value in (("N", N), ("M", M)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"N:M sparsity: {name} must be an integer, got {value!r}")
    if not 0 < N < M:
        raise ValueError(f"N:M sparsity needs 0 < N < M, got {N}:{M}")


def num_candidates(N: int, M: int) -> int:
    """|S| = C(M, N): 6 for 2:4, 4 for 1:4, 70 for 4:8."""
    check_nm_args(N, M)
    return math.comb(M, N)


def candidates(N: int, M: int, dtype: torch.dtype = torch.float32,
               device: Optional[torch.device] = None) -> torch.Tensor:
    """The candidate masks ``[C, M]`` (ones at the kept positions), lexicographic order."""
    check_nm_args(N, M)
    combos = list(itertools.combinations(range(M), N))
    out = torch.zeros(len(combos), M, dtype=dtype, device=device)
    rows = torch.arange(len(combos)).repeat_interleave(N)
    cols = torch.tensor([p for combo in combos for p in combo])
    out[rows, cols] = 1
    return out


def group_view(w: torch.Tensor, M: int) -> torch.Tensor:
    """View ``[..., in]`` as ``[..., in // M, M]`` (groups along the input dimension)."""
    if w.dim() < 1:
        raise ValueError("group_view needs a tensor with at least one dimension")
    if not isinstance(M, int) or M < 1:
        raise ValueError(f"group size M must be a positive integer, got {M!r}")
    size = w.shape[-1]
    if size % M:
        raise ValueError(f"input dimension {size} is not a multiple of the group size M={M}")
    return w.reshape(*w.shape[:-1], size // M, M)


def check_nm(mask_or_weight: torch.Tensor, N: int, M: int, exact: bool = False) -> bool:
    """Whether every group of ``M`` along the last dimension has at most ``N`` nonzeros.

    With ``exact=True`` every group must have exactly ``N`` (what an N:M mask
    chosen from the candidates has). A last dimension that is not a multiple of
    ``M`` raises ``ValueError``.
    """
    check_nm_args(N, M)
    counts = (group_view(mask_or_weight, M) != 0).sum(dim=-1)
    return bool((counts == N).all() if exact else (counts <= N).all())


def topn_mask(scores: torch.Tensor, N: int, M: int) -> torch.Tensor:
    """Bool N:M mask keeping the ``N`` largest scores of each group (e.g. ``|W|`` for magnitude pruning).

    Ties go to the lower position, so the result is deterministic.
    """
    check_nm_args(N, M)
    groups = group_view(scores, M)
    # a stable descending sort keeps the first of equal scores
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :N]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(scores.shape)


def masks_from_choice(choice: torch.Tensor, cands: torch.Tensor) -> torch.Tensor:
    """Candidate indices ``[..., G]`` -> bool masks ``[..., G * M]``."""
    picked = cands.to(device=choice.device)[choice] != 0  # [..., G, M]
    return picked.reshape(*choice.shape[:-1], choice.shape[-1] * cands.shape[-1])


def infer_n(num_cands: int, M: int) -> int:
    """The ``N`` with ``C(M, N) == num_cands``; ``ValueError`` when none or two exist (e.g. 1:4 and 3:4)."""
    found = [n for n in range(1, M) if math.comb(M, n) == num_cands]
    if not found:
        raise ValueError(f"{num_cands} candidates do not match any N:M pattern with M={M}")
    if len(found) > 1:
        raise ValueError(f"{num_cands} candidates with M={M} fit both {found[0]}:{M} and {found[1]}:{M}; "
                         "pass N explicitly")
    return found[0]
