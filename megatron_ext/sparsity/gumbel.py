"""Gumbel-softmax N:M masks with counter-based noise.

For a group with logits ``l`` (one per candidate mask ``S_c``), training draws

    y = softmax((kappa * l + g) / tau),    mask = y @ S

with Gumbel noise ``g`` (``--hard``: the forward uses ``one_hot(argmax y)``, the
backward the soft ``y``: straight-through). The noise is a pure function of
``(seed, step, layer id, global group index, candidate)``: an integer hash on
int64 tensors whose values never leave 32 bits (multipliers below 2**31, so no
product overflows). Hence

* a group draws the same noise whatever tensor-parallel shard holds it (a TP=2
  model samples the masks of the TP=1 model), and every data-parallel replica and
  micro-batch of a step draws the same masks;
* the backward recomputes the noise instead of keeping it: the autograd functions
  here save only the logits (and the weight, which is a parameter anyway).

``W * mask`` is two passes, each with one implementation per device, chosen in one place
(``use_kernels``: the platform's GPU with triton importable): ``sample_pass`` (``W * mask``
and its squared norm) and ``backward_pass`` (the logits' gradient, optionally the weight's,
from ``dL/d(W * mask)`` and / or the regulariser's coefficient; it recomputes the noise).
On the GPU they are the Triton kernels of ``fused_mask`` (one pass each), elsewhere the
same arithmetic as PyTorch ops (the kernels also run on the CPU under ``TRITON_INTERPRET=1``,
which is how the tests compare them). The backward is linear in its inputs for a fixed
draw, so the layers run it once per step on the sum over micro-batches (``layers``).

Where the logits carry a ``main_grad`` fp32 buffer (megatron-core's gradient-accumulation
fusion convention), the backward adds the logits' gradient into it and returns none.

``gumbel_soft_mask`` is the plain PyTorch reference (autograd through every op), kept as
the oracle of tests and benchmarks; ``GumbelSoftMask`` (the mask alone) and
``masked_weight`` / ``masked_weight_sq_norm`` (``W * mask`` and its squared norm, one
backward pass per call) are the memory-lean functional forms, tested against it.

Global group indices: a layer's group ``(row, group column)`` has index
``row * groups_per_row + group_column`` in the unsharded ``[out, in]`` weight;
``GroupIndex`` maps a shard's local rows / group columns to global ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron_ext import platform

MASK32 = 0xFFFFFFFF
_STREAM_NOISE = 0x6E6F6973
_STREAM_INIT = 0x696E6974
_GOLDEN = 0x9E3779B9
_M1, _M2 = 0x2C1B3C6D, 0x297A2D39  # odd, < 2**31: x * m < 2**63 for any 32-bit x


def mix32(x):
    """A bijective 32-bit integer hash (xorshift-multiply) of an int or an int64 tensor."""
    x = x & MASK32
    x = x ^ (x >> 15)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 12)
    x = (x * _M2) & MASK32
    return x ^ (x >> 15)


def _fold(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or value >= 1 << 64:
        raise ValueError(f"{what} must be an integer in [0, 2**64), got {value!r}")
    return mix32(mix32(value & MASK32) ^ (value >> 32))


def _stream_key(stream: int, seed: int, step: int, layer_id: int) -> int:
    key = mix32(stream ^ _fold(seed, "seed"))
    key = mix32(key ^ _fold(step, "step"))
    return mix32(key ^ _fold(layer_id, "layer id"))


def noise_key(seed: int, step: int, layer_id: int) -> int:
    """The 32-bit key of the Gumbel noise one layer draws at one step."""
    return _stream_key(_STREAM_NOISE, seed, step, layer_id)


def init_key(seed: int, layer_id: int) -> int:
    """The 32-bit key of a layer's initial logits (a stream apart from the noise)."""
    return _stream_key(_STREAM_INIT, seed, 0, layer_id)


@dataclass(frozen=True)
class GroupIndex:
    """Global indices of a shard's groups: ``rows[o] * groups_per_row + cols[g]``."""

    rows: torch.Tensor      # int64 [O]: global row of each local row
    cols: torch.Tensor      # int64 [G]: global group column of each local group column
    groups_per_row: int     # groups per row of the unsharded weight

    def flat(self) -> torch.Tensor:
        return self.rows[:, None] * self.groups_per_row + self.cols[None, :]

    @property
    def shape(self) -> tuple:
        return (self.rows.numel(), self.cols.numel())


Offset = Union[int, torch.Tensor, GroupIndex]


def global_group_index(offset: Offset, shape, device=None) -> torch.Tensor:
    """int64 global indices of groups of ``shape`` (= logits.shape[:-1]).

    ``offset`` is a ``GroupIndex`` (2-d shapes), an int64 tensor of ``shape``, or an int:
    groups numbered contiguously from it in row-major order.
    """
    shape = tuple(shape)
    if isinstance(offset, GroupIndex):
        if offset.shape != shape:
            raise ValueError(f"GroupIndex covers groups {offset.shape}, the logits have {shape}")
        return offset.flat().to(device)
    if isinstance(offset, torch.Tensor):
        if tuple(offset.shape) != shape or offset.dtype != torch.int64:
            raise ValueError(f"group index tensor must be int64 of shape {shape}, "
                             f"got {offset.dtype} {tuple(offset.shape)}")
        return offset.to(device)
    if isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0:
        return offset + torch.arange(math.prod(shape), dtype=torch.int64, device=device).view(shape)
    raise ValueError(f"group offset must be a non-negative int, an int64 tensor or a GroupIndex, got {offset!r}")


def _salts(slots: int, device) -> torch.Tensor:
    return torch.tensor([((j + 1) * _GOLDEN) & MASK32 for j in range(slots)], dtype=torch.int64, device=device)


def _bits(key, groups: torch.Tensor, salts: torch.Tensor) -> torch.Tensor:
    h = mix32((groups & MASK32) ^ key)
    h = mix32(h ^ (groups >> 32))
    return mix32(h[..., None] ^ salts)


def hash_bits(key: int, groups: torch.Tensor, slots: int) -> torch.Tensor:
    """32-bit hashes ``[..., slots]`` of ``(key, group index, slot)`` for int64 ``groups``."""
    return _bits(key, groups, _salts(slots, groups.device))


def _open_uniform(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """23 high bits -> a uniform in (0, 1), both ends excluded, exact in float32."""
    return ((bits >> 9).to(dtype) + 0.5) * (2.0 ** -23)


def _noise_from_groups(key, groups: torch.Tensor, salts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    u = _open_uniform(_bits(key, groups, salts), dtype)
    return -torch.log(-torch.log(u))


def gumbel_noise(key: int, offset: Offset, group_shape, num_cands: int, device=None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard Gumbel noise ``[*group_shape, num_cands]``, ``-log(-log(u))`` (the fused
    kernels draw the same hash bits; ``fused_mask.noise``)."""
    groups = global_group_index(offset, group_shape, device)
    return _noise_from_groups(key, groups, _salts(num_cands, groups.device), dtype)


def normal_logits(key: int, offset: Offset, group_shape, num_cands: int, std: float,
                  device=None) -> torch.Tensor:
    """float32 ``N(0, std)`` values by global group index (Box-Muller in float64)."""
    groups = global_group_index(offset, group_shape, device)
    u = _open_uniform(hash_bits(key, groups, 2 * num_cands), torch.float64)
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0::2]))
    return (radius * torch.cos(2.0 * math.pi * u[..., 1::2]) * std).to(torch.float32)


def use_kernels(weight: torch.Tensor, logits: torch.Tensor, offset: Offset = 0) -> bool:
    """The one choice of implementation: the Triton kernels where the platform has them for
    these tensors (its GPU, triton importable, supported dtypes and layout), else the same
    arithmetic as PyTorch ops. The device question is ``platform.triton_available``'s."""
    if not (platform.triton_available() and weight.device == platform.device()):
        return False
    from megatron_ext.sparsity import fused_mask

    return (fused_mask.supports(weight, logits) and weight.dim() == 2 and logits.dim() == 3
            and not isinstance(offset, torch.Tensor))


def _use_kernel(kernel: Optional[bool], weight, logits, offset) -> bool:
    """``kernel``: None = ``use_kernels``; True / False force one implementation (tests, benchmarks)."""
    return use_kernels(weight, logits, offset) if kernel is None else bool(kernel)


def _kernel_index(offset: Offset, group_shape, device) -> GroupIndex:
    """``offset`` as the (rows, cols, groups_per_row) the kernels take."""
    rows, groups = group_shape
    if isinstance(offset, GroupIndex):
        if offset.shape != (rows, groups):
            raise ValueError(f"GroupIndex covers groups {offset.shape}, the logits have {(rows, groups)}")
        return GroupIndex(offset.rows.to(device), offset.cols.to(device), offset.groups_per_row)
    if isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0:
        # contiguous numbering: offset + row * groups + col
        return GroupIndex(torch.arange(rows, dtype=torch.int64, device=device),
                          offset + torch.arange(groups, dtype=torch.int64, device=device), groups)
    raise ValueError(f"the fused mask kernels take a GroupIndex or an int group offset, got {type(offset).__name__}")


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _sample(logits, cands, tau, kappa, key, offset, hard):
    """(soft y, y used by the forward) for ``logits [..., C]``; no autograd."""
    dtype = _compute_dtype(logits)
    noise = gumbel_noise(key, offset, logits.shape[:-1], logits.shape[-1], logits.device, dtype)
    z = (kappa * logits.to(dtype) + noise) / tau
    y = torch.softmax(z, dim=-1)
    if not hard:
        return y, y
    one_hot = torch.zeros_like(y).scatter_(-1, z.argmax(dim=-1, keepdim=True), 1.0)
    return y, one_hot


def _softmax_backward(y, grad_y, tau, kappa):
    """d/dlogits of y = softmax((kappa * logits + g) / tau), given dL/dy."""
    return y * (grad_y - (grad_y * y).sum(dim=-1, keepdim=True)) * (kappa / tau)


def _check(logits, cands, tau, kappa):
    if cands.dim() != 2 or logits.shape[-1] != cands.shape[0]:
        raise ValueError(f"logits have {logits.shape[-1]} candidates, the candidate set is {tuple(cands.shape)}")
    if not (tau > 0 and kappa > 0):
        raise ValueError(f"Gumbel temperature and scale must be > 0, got tau={tau}, kappa={kappa}")


def gumbel_soft_mask(logits: torch.Tensor, candidates: torch.Tensor, tau: float, kappa: float,
                     seed: int, offset: Offset, hard: bool = False) -> torch.Tensor:
    """Reference: masks ``[..., G, M]`` for logits ``[..., G, C]`` (autograd through every op).

    ``seed`` is the 32-bit noise key (``noise_key(seed, step, layer_id)``), ``offset``
    the global group indices (see ``global_group_index``).
    """
    _check(logits, candidates, tau, kappa)
    dtype = _compute_dtype(logits)
    noise = gumbel_noise(seed, offset, logits.shape[:-1], logits.shape[-1], logits.device, dtype)
    z = (kappa * logits.to(dtype) + noise) / tau
    y = torch.softmax(z, dim=-1)
    if hard:
        y_hard = torch.zeros_like(y).scatter_(-1, z.argmax(dim=-1, keepdim=True), 1.0)
        y = y_hard - y.detach() + y
    return y @ candidates.to(dtype)


class GumbelSoftMask(torch.autograd.Function):
    """``gumbel_soft_mask`` saving only the logits: the backward recomputes noise and softmax."""

    @staticmethod
    def forward(ctx, logits, cands, tau, kappa, key, offset, hard):
        _check(logits, cands, tau, kappa)
        _, y_fwd = _sample(logits, cands, tau, kappa, key, offset, hard)
        ctx.save_for_backward(logits, cands)
        ctx.args = (tau, kappa, key, offset, hard)
        return y_fwd @ cands.to(y_fwd.dtype)

    @staticmethod
    def backward(ctx, grad_mask):
        logits, cands = ctx.saved_tensors
        y, _ = _sample(logits, cands, *ctx.args)
        grad_y = grad_mask.to(y.dtype) @ cands.to(y.dtype).t()
        return (_softmax_backward(y, grad_y, ctx.args[0], ctx.args[1]).to(logits.dtype),) + (None,) * 6


def gumbel_soft_mask_recompute(logits, candidates, tau, kappa, seed, offset, hard=False):
    """Same values and gradients as ``gumbel_soft_mask``; keeps no noise for the backward."""
    return GumbelSoftMask.apply(logits, candidates, tau, kappa, seed, offset, hard)


# ---------------------------------------------------------------------- W * mask: two passes
# Everything below is two operations, each with one implementation per device (``kernel``):
# ``sample_pass`` (W * mask and its squared norm, no autograd) and ``backward_pass``
# (dL/dlogits, optionally dL/dW, from dL/d(W * mask) and / or the regulariser's coefficient).


def _weight_mask(y_fwd, cands, weight_shape):
    return (y_fwd @ cands.to(y_fwd.dtype)).reshape(weight_shape)


def _check_weight(weight, logits, candidates):
    if weight.shape[:-1] != logits.shape[:-2] or weight.shape[-1] != logits.shape[-2] * candidates.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match logits {tuple(logits.shape)} "
                         f"with groups of {candidates.shape[-1]}")


def grad_buffer(logits: torch.Tensor) -> Optional[torch.Tensor]:
    """The logits' ``main_grad`` buffer, if they carry one the backward can add into."""
    buf = getattr(logits, "main_grad", None)
    if buf is None:
        return None
    if buf.dtype != torch.float32 or buf.shape != logits.shape or not buf.is_contiguous():
        raise ValueError(f"mask logits' main_grad must be a contiguous fp32 tensor of shape {tuple(logits.shape)}, "
                         f"got {buf.dtype} {tuple(buf.shape)}")
    return buf


@dataclass(frozen=True)
class Draw:
    """One Gumbel draw of one layer: what the two passes need besides the weight and the logits."""

    cands: torch.Tensor
    tau: float
    kappa: float
    key: int
    offset: Offset
    hard: bool
    kernel: bool


@torch.no_grad()
def sample_pass(weight, logits, d: Draw, with_sq: bool):
    """``(weight * mask, sum((weight * mask)^2) or None)``, no autograd."""
    if d.kernel:
        from megatron_ext.sparsity import fused_mask

        idx = _kernel_index(d.offset, logits.shape[:-1], weight.device)
        return fused_mask.forward(weight, logits, d.cands, idx.rows, idx.cols, idx.groups_per_row, d.key, d.tau,
                                  d.kappa, d.hard, with_sq_norm=with_sq)
    _, y_fwd = _sample(logits, d.cands, d.tau, d.kappa, d.key, d.offset, d.hard)
    mask = _weight_mask(y_fwd, d.cands, weight.shape)
    sq = (weight.to(mask.dtype) * mask).square().sum() if with_sq else None
    return weight * mask.to(weight.dtype), sq


@torch.no_grad()
def backward_pass(grad_out, weight, logits, d: Draw, need_weight: bool, reg=None, buffer=None):
    """``(dL/dweight or None, dL/dlogits)`` of ``weight * mask`` given ``grad_out`` (may be None),
    plus ``d/dlogits reg * sum((weight * mask)^2)`` when ``reg`` (a scalar tensor) is given.
    With ``buffer`` the logits' gradient is added into it (and returned). The backward is
    linear in ``grad_out`` and ``reg``: a sum of them gives the sum of the gradients."""
    if d.kernel:
        from megatron_ext.sparsity import fused_mask

        idx = _kernel_index(d.offset, logits.shape[:-1], weight.device)
        grad_logits, grad_weight = fused_mask.backward(
            grad_out, weight, logits, d.cands, idx.rows, idx.cols, idx.groups_per_row, d.key, d.tau, d.kappa,
            d.hard, grad_logits=buffer, reg=reg, want_grad_weight=need_weight)
        return grad_weight, grad_logits
    cands = d.cands
    y, y_fwd = _sample(logits, cands, d.tau, d.kappa, d.key, d.offset, d.hard)
    grad_weight = None
    mask = _weight_mask(y_fwd, cands, weight.shape) if need_weight or reg is not None else None
    if need_weight:
        grad_weight = (grad_out * mask.to(weight.dtype)).to(weight.dtype)
    grad_mask = 0
    if grad_out is not None:
        grad_mask = grad_out.to(y.dtype) * weight.to(y.dtype)
    if reg is not None:
        grad_mask = grad_mask + 2.0 * reg.to(y.dtype) * weight.to(y.dtype).square() * mask
    grad_y = grad_mask.reshape(*logits.shape[:-1], cands.shape[1]) @ cands.to(y.dtype).t()
    grad_logits = _softmax_backward(y, grad_y, d.tau, d.kappa)
    if buffer is not None:
        buffer.add_(grad_logits)
        return grad_weight, buffer
    return grad_weight, grad_logits


@torch.no_grad()
def mask_of(weight, logits, d: Draw) -> torch.Tensor:
    """The draw's mask in the weight's dtype and shape (what ``dL/dweight = grad * mask`` needs)."""
    return sample_pass(torch.ones_like(weight), logits, d, False)[0]


def _draw(candidates, tau, kappa, seed, offset, hard, kernel, weight, logits) -> Draw:
    _check(logits, candidates, tau, kappa)
    _check_weight(weight, logits, candidates)
    return Draw(candidates, tau, kappa, seed, offset, hard, _use_kernel(kernel, weight, logits, offset))


class _MaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, logits, d):
        ctx.save_for_backward(weight, logits)
        ctx.draw = d
        ctx.main_grad = grad_buffer(logits)
        return sample_pass(weight, logits, d, False)[0]

    @staticmethod
    def backward(ctx, grad_out):
        weight, logits = ctx.saved_tensors
        need_weight, need_logits = ctx.needs_input_grad[:2]
        if not need_logits:  # the mask alone (no logits gradient to form)
            return grad_out * mask_of(weight, logits, ctx.draw), None, None
        buffer = ctx.main_grad
        grad_weight, grad_logits = backward_pass(grad_out, weight, logits, ctx.draw, need_weight, buffer=buffer)
        grad_logits = None if buffer is not None else grad_logits.to(logits.dtype)
        return grad_weight, grad_logits, None


def masked_weight(weight: torch.Tensor, logits: torch.Tensor, candidates: torch.Tensor, tau: float,
                  kappa: float, seed: int, offset: Offset, hard: bool = False,
                  kernel: Optional[bool] = None) -> torch.Tensor:
    """``weight * mask`` for ``weight [O, G*M]`` and ``logits [O, G, C]``, gradients to both.

    Saves ``weight`` and ``logits`` only; the mask and its noise are recomputed in the
    backward (one ``backward_pass`` per call; the layers defer theirs to once per step).
    ``kernel``: None = ``use_kernels``; ``True`` forces the Triton kernels, ``False`` the
    PyTorch ops.
    """
    d = _draw(candidates, tau, kappa, seed, offset, hard, kernel, weight, logits)
    return _MaskedWeight.apply(weight, logits, d)


@torch.no_grad()
def sample_masked_weight(weight: torch.Tensor, logits: torch.Tensor, candidates: torch.Tensor, tau: float,
                         kappa: float, seed: int, offset: Offset, hard: bool = False,
                         kernel: Optional[bool] = None):
    """``(weight * mask, sum((weight * mask)^2))`` of one draw, without autograd."""
    d = _draw(candidates, tau, kappa, seed, offset, hard, kernel, weight, logits)
    return sample_pass(weight, logits, d, True)


class _MaskedSqNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, logits, d):
        ctx.save_for_backward(weight, logits)
        ctx.draw = d
        ctx.main_grad = grad_buffer(logits)
        return sample_pass(weight, logits, d, True)[1]

    @staticmethod
    def backward(ctx, grad):
        weight, logits = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None
        buffer = ctx.main_grad
        _, grad_logits = backward_pass(None, weight, logits, ctx.draw, False, reg=grad, buffer=buffer)
        return None, (None if buffer is not None else grad_logits.to(logits.dtype)), None


def masked_weight_sq_norm(weight: torch.Tensor, logits: torch.Tensor, candidates: torch.Tensor, tau: float,
                          kappa: float, seed: int, offset: Offset, hard: bool = False,
                          kernel: Optional[bool] = None) -> torch.Tensor:
    """``sum((weight * mask) ** 2)`` with the gradient reaching ``logits`` only (weight is a constant)."""
    d = _draw(candidates, tau, kappa, seed, offset, hard, kernel, weight, logits)
    return _MaskedSqNorm.apply(weight.detach(), logits, d)
