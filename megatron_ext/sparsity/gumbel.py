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

On the GPU the noise is computed by one ``torch.compile``d kernel (``fused``): the
same integer hash, without the eager path's chain of passes over int64 tensors.
``masked_weight`` and ``masked_weight_sq_norm`` go further where Triton is available
(``kernel``; default: on the platform's GPU, see ``platform.triton_available``): one
Triton pass forward and one backward (``fused_mask``), with the same hash.

A sample drawn once can be reused: ``sample_masked_weight`` returns ``weight * mask``
(no autograd) and ``masked_weight(..., sample=that)`` hands it out again as a fresh
autograd output whose backward is the mask backward. The layers use it to build the
masked weight once per training step for all micro-batches.

Where the logits carry a ``main_grad`` fp32 buffer (megatron-core's gradient-accumulation
fusion convention), the backward adds the logits' gradient into it and returns none.

``gumbel_soft_mask`` is the plain PyTorch reference (autograd through every op);
``GumbelSoftMask`` / ``masked_weight`` / ``masked_weight_sq_norm`` are the
memory-lean versions used by the layers, tested against it.

Global group indices: a layer's group ``(row, group column)`` has index
``row * groups_per_row + group_column`` in the unsharded ``[out, in]`` weight;
``GroupIndex`` maps a shard's local rows / group columns to global ones.
"""
from __future__ import annotations

import math
import warnings
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


# Cache of the compiled noise function: one kernel (hash, uniform, double log) instead of
# a chain of elementwise passes over int64 tensors. The key travels as a tensor, so a new
# step or layer does not recompile.
_FUSED: dict = {}


def _fused_noise(key: int, groups: torch.Tensor, salts: torch.Tensor, dtype: torch.dtype):
    """The noise through ``torch.compile``, or None where it cannot be compiled (warned once)."""
    if _FUSED.get("failed"):
        return None
    fn = _FUSED.get("fn")
    if fn is None:
        fn = _FUSED["fn"] = torch.compile(_noise_from_groups, dynamic=False)
    try:
        return fn(torch.tensor(key, dtype=torch.int64, device=groups.device), groups, salts, dtype)
    except Exception as e:  # no compiler toolchain: the eager path gives the same hash
        _FUSED["failed"] = True
        warnings.warn(f"fused Gumbel noise unavailable ({type(e).__name__}: {e}); using the eager path")
        return None


def _default_fused(t: torch.Tensor) -> bool:
    return platform.has_cuda() and t.device == platform.device()


def gumbel_noise(key: int, offset: Offset, group_shape, num_cands: int, device=None,
                 dtype: torch.dtype = torch.float32, fused: Optional[bool] = None) -> torch.Tensor:
    """Standard Gumbel noise ``[*group_shape, num_cands]``, ``-log(-log(u))``.

    ``fused`` (default: on the platform's GPU) computes it in one compiled kernel; the
    hash is the same integer function either way.
    """
    groups = global_group_index(offset, group_shape, device)
    salts = _salts(num_cands, groups.device)
    if fused is None:
        fused = _default_fused(groups)
    if fused:
        noise = _fused_noise(key, groups, salts, dtype)
        if noise is not None:
            return noise
    return _noise_from_groups(key, groups, salts, dtype)


def normal_logits(key: int, offset: Offset, group_shape, num_cands: int, std: float,
                  device=None) -> torch.Tensor:
    """float32 ``N(0, std)`` values by global group index (Box-Muller in float64)."""
    groups = global_group_index(offset, group_shape, device)
    u = _open_uniform(hash_bits(key, groups, 2 * num_cands), torch.float64)
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0::2]))
    return (radius * torch.cos(2.0 * math.pi * u[..., 1::2]) * std).to(torch.float32)


def _default_kernel(weight: torch.Tensor, logits: torch.Tensor, offset: Offset) -> bool:
    if not (platform.triton_available() and weight.device == platform.device()):
        return False
    from megatron_ext.sparsity import fused_mask

    return (fused_mask.supports(weight, logits) and weight.dim() == 2 and logits.dim() == 3
            and not isinstance(offset, torch.Tensor))


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


def _sample(logits, cands, tau, kappa, key, offset, hard, fused=None):
    """(soft y, y used by the forward) for ``logits [..., C]``; no autograd."""
    dtype = _compute_dtype(logits)
    noise = gumbel_noise(key, offset, logits.shape[:-1], logits.shape[-1], logits.device, dtype, fused)
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
                     seed: int, offset: Offset, hard: bool = False, fused: Optional[bool] = None) -> torch.Tensor:
    """Reference: masks ``[..., G, M]`` for logits ``[..., G, C]`` (autograd through every op).

    ``seed`` is the 32-bit noise key (``noise_key(seed, step, layer_id)``), ``offset``
    the global group indices (see ``global_group_index``).
    """
    _check(logits, candidates, tau, kappa)
    dtype = _compute_dtype(logits)
    noise = gumbel_noise(seed, offset, logits.shape[:-1], logits.shape[-1], logits.device, dtype, fused)
    z = (kappa * logits.to(dtype) + noise) / tau
    y = torch.softmax(z, dim=-1)
    if hard:
        y_hard = torch.zeros_like(y).scatter_(-1, z.argmax(dim=-1, keepdim=True), 1.0)
        y = y_hard - y.detach() + y
    return y @ candidates.to(dtype)


class GumbelSoftMask(torch.autograd.Function):
    """``gumbel_soft_mask`` saving only the logits: the backward recomputes noise and softmax."""

    @staticmethod
    def forward(ctx, logits, cands, tau, kappa, key, offset, hard, fused=None):
        _check(logits, cands, tau, kappa)
        _, y_fwd = _sample(logits, cands, tau, kappa, key, offset, hard, fused)
        ctx.save_for_backward(logits, cands)
        ctx.args = (tau, kappa, key, offset, hard, fused)
        return y_fwd @ cands.to(y_fwd.dtype)

    @staticmethod
    def backward(ctx, grad_mask):
        logits, cands = ctx.saved_tensors
        y, _ = _sample(logits, cands, *ctx.args)
        grad_y = grad_mask.to(y.dtype) @ cands.to(y.dtype).t()
        return (_softmax_backward(y, grad_y, ctx.args[0], ctx.args[1]).to(logits.dtype),) + (None,) * 7


def gumbel_soft_mask_recompute(logits, candidates, tau, kappa, seed, offset, hard=False, fused=None):
    """Same values and gradients as ``gumbel_soft_mask``; keeps no noise for the backward."""
    return GumbelSoftMask.apply(logits, candidates, tau, kappa, seed, offset, hard, fused)


def _weight_mask(y_fwd, cands, weight_shape):
    return (y_fwd @ cands.to(y_fwd.dtype)).reshape(weight_shape)


def _check_weight(weight, logits, candidates):
    if weight.shape[:-1] != logits.shape[:-2] or weight.shape[-1] != logits.shape[-2] * candidates.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match logits {tuple(logits.shape)} "
                         f"with groups of {candidates.shape[-1]}")


def _grad_buffer(logits: torch.Tensor) -> Optional[torch.Tensor]:
    """The logits' ``main_grad`` buffer, if they carry one the backward can add into."""
    buf = getattr(logits, "main_grad", None)
    if buf is None:
        return None
    if buf.dtype != torch.float32 or buf.shape != logits.shape or not buf.is_contiguous():
        raise ValueError(f"mask logits' main_grad must be a contiguous fp32 tensor of shape {tuple(logits.shape)}, "
                         f"got {buf.dtype} {tuple(buf.shape)}")
    return buf


def _sample_weight(weight, logits, cands, tau, kappa, key, offset, hard, fused, kernel, with_sq):
    """``(weight * mask, sum((weight * mask)^2) or None)``, no autograd (the forward of both functions)."""
    if kernel:
        from megatron_ext.sparsity import fused_mask

        idx = _kernel_index(offset, logits.shape[:-1], weight.device)
        return fused_mask.forward(weight, logits, cands, idx.rows, idx.cols, idx.groups_per_row, key, tau, kappa,
                                  hard, with_sq_norm=with_sq)
    _, y_fwd = _sample(logits, cands, tau, kappa, key, offset, hard, fused)
    mask = _weight_mask(y_fwd, cands, weight.shape)
    sq = (weight.to(mask.dtype) * mask).square().sum() if with_sq else None
    return weight * mask.to(weight.dtype), sq


def _mask_backward(grad_out, weight, logits, cands, args, need_weight, reg=None, buffer=None):
    """``(dL/dweight or None, dL/dlogits)`` of ``weight * mask`` given ``grad_out`` (may be None),
    plus ``d/dlogits reg * sum((weight * mask)^2)`` when ``reg`` (a scalar tensor) is given.
    With ``buffer`` the logits' gradient is added into it (and returned)."""
    tau, kappa, key, offset, hard, fused, kernel = args
    if kernel:
        from megatron_ext.sparsity import fused_mask

        idx = _kernel_index(offset, logits.shape[:-1], weight.device)
        grad_logits, grad_weight = fused_mask.backward(
            grad_out, weight, logits, cands, idx.rows, idx.cols, idx.groups_per_row, key, tau, kappa, hard,
            grad_logits=buffer, reg=reg, want_grad_weight=need_weight)
        return grad_weight, grad_logits
    y, y_fwd = _sample(logits, cands, tau, kappa, key, offset, hard, fused)
    grad_weight = None
    mask = _weight_mask(y_fwd, cands, weight.shape) if need_weight or reg is not None else None
    if need_weight:
        grad_weight = grad_out * mask.to(weight.dtype)
    grad_mask = 0
    if grad_out is not None:
        grad_mask = grad_out.to(y.dtype) * weight.to(y.dtype)
    if reg is not None:
        grad_mask = grad_mask + 2.0 * reg.to(y.dtype) * weight.to(y.dtype).square() * mask
    grad_y = grad_mask.reshape(*logits.shape[:-1], cands.shape[1]) @ cands.to(y.dtype).t()
    grad_logits = _softmax_backward(y, grad_y, tau, kappa)
    if buffer is not None:
        buffer.add_(grad_logits)
        return grad_weight, buffer
    return grad_weight, grad_logits


class _MaskedWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, logits, sample, cands, tau, kappa, key, offset, hard, fused, kernel):
        ctx.save_for_backward(weight, logits, cands)
        ctx.args = (tau, kappa, key, offset, hard, fused, kernel)
        ctx.main_grad = _grad_buffer(logits)
        if sample is not None:  # a fresh output aliasing the sample drawn before
            return sample.view_as(sample)
        return _sample_weight(weight, logits, cands, tau, kappa, key, offset, hard, fused, kernel, False)[0]

    @staticmethod
    def backward(ctx, grad_out):
        weight, logits, cands = ctx.saved_tensors
        need_weight, need_logits = ctx.needs_input_grad[:2]
        if not (need_weight or need_logits):
            return (None,) * 11
        if not need_logits:  # the mask alone (no logits gradient to form)
            tau, kappa, key, offset, hard, fused, kernel = ctx.args
            mask = _sample_weight(torch.ones_like(weight), logits, cands, tau, kappa, key, offset, hard, fused,
                                  kernel, False)[0]
            return (grad_out * mask,) + (None,) * 10
        buffer = ctx.main_grad
        grad_weight, grad_logits = _mask_backward(grad_out, weight, logits, cands, ctx.args, need_weight,
                                                  buffer=buffer)
        grad_logits = None if buffer is not None else grad_logits.to(logits.dtype)
        return (grad_weight, grad_logits) + (None,) * 9


def _use_kernel(kernel: Optional[bool], weight, logits, offset) -> bool:
    return _default_kernel(weight, logits, offset) if kernel is None else bool(kernel)


def masked_weight(weight: torch.Tensor, logits: torch.Tensor, candidates: torch.Tensor, tau: float,
                  kappa: float, seed: int, offset: Offset, hard: bool = False,
                  fused: Optional[bool] = None, kernel: Optional[bool] = None,
                  sample: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``weight * mask`` for ``weight [O, G*M]`` and ``logits [O, G, C]``, gradients to both.

    Saves ``weight`` and ``logits`` only; the mask and its noise are recomputed in
    the backward. ``kernel``: the Triton kernels (default: on the platform's GPU where
    triton is importable; ``True`` forces them, ``False`` the PyTorch ops). ``sample``:
    the ``weight * mask`` of this very draw from ``sample_masked_weight``; it is returned
    as a fresh view (no work in the forward), the backward is the same.
    """
    _check(logits, candidates, tau, kappa)
    _check_weight(weight, logits, candidates)
    if sample is not None and (sample.shape != weight.shape or sample.dtype != weight.dtype):
        raise ValueError(f"sample {sample.dtype} {tuple(sample.shape)} is not a masked weight of "
                         f"{weight.dtype} {tuple(weight.shape)}")
    kernel = _use_kernel(kernel, weight, logits, offset)
    return _MaskedWeight.apply(weight, logits, sample, candidates, tau, kappa, seed, offset, hard, fused, kernel)


@torch.no_grad()
def sample_masked_weight(weight: torch.Tensor, logits: torch.Tensor, candidates: torch.Tensor, tau: float,
                         kappa: float, seed: int, offset: Offset, hard: bool = False,
                         fused: Optional[bool] = None, kernel: Optional[bool] = None):
    """``(weight * mask, sum((weight * mask)^2))`` of one draw, without autograd: the
    ``sample`` for ``masked_weight`` and the ``value`` for ``masked_weight_sq_norm``."""
    _check(logits, candidates, tau, kappa)
    _check_weight(weight, logits, candidates)
    kernel = _use_kernel(kernel, weight, logits, offset)
    return _sample_weight(weight, logits, candidates, tau, kappa, seed, offset, hard, fused, kernel, True)


class _MaskedSqNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, logits, value, cands, tau, kappa, key, offset, hard, fused, kernel):
        ctx.save_for_backward(weight, logits, cands)
        ctx.args = (tau, kappa, key, offset, hard, fused, kernel)
        ctx.main_grad = _grad_buffer(logits)
        if value is not None:
            return value.clone()
        return _sample_weight(weight, logits, cands, tau, kappa, key, offset, hard, fused, kernel, True)[1]

    @staticmethod
    def backward(ctx, grad):
        weight, logits, cands = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return (None,) * 11
        buffer = ctx.main_grad
        _, grad_logits = _mask_backward(None, weight, logits, cands, ctx.args, False, reg=grad, buffer=buffer)
        grad_logits = None if buffer is not None else grad_logits.to(logits.dtype)
        return (None, grad_logits) + (None,) * 9


def masked_weight_sq_norm(weight: torch.Tensor, logits: torch.Tensor, candidates: torch.Tensor, tau: float,
                          kappa: float, seed: int, offset: Offset, hard: bool = False,
                          fused: Optional[bool] = None, kernel: Optional[bool] = None,
                          value: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum((weight * mask) ** 2)`` with the gradient reaching ``logits`` only (weight is a constant).

    ``value``: this draw's sum from ``sample_masked_weight`` (the forward then does no work).
    """
    _check(logits, candidates, tau, kappa)
    _check_weight(weight, logits, candidates)
    kernel = _use_kernel(kernel, weight, logits, offset)
    return _MaskedSqNorm.apply(weight.detach(), logits, value, candidates, tau, kappa, seed, offset, hard, fused,
                               kernel)
