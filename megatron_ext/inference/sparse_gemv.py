"""A Triton 2:4 GEMM for a few token rows (decode), reading cuSPARSELt's compressed weight.

At decode a projection multiplies 1 to a few dozen token rows: the time is the weight's
bytes read, not the arithmetic, and cuSPARSELt's sparse tensor-core kernels run slower
than the dense GEMM there (its tiles are made for many rows). This kernel reads the same
compressed buffer that cuSPARSELt multiplies at prefill, so a model keeps one copy of each
weight (0.5625x of dense bf16) and no dense copy for decode:

* the buffer (``torch._cslt_compress`` of a bf16 ``W [out, in]``) is the kept values,
  ``[out, in/2]`` row-major in input order, then 4 bits of metadata per group of 4 inputs
  (the two kept positions ``i0 | i1 << 2``) in cuSPARSELt's tile order, which
  ``megatron_ext.inference.sparse.cusparselt_layout`` writes in plain torch and
  ``sparse.meta_nibble_index`` states (the kernel computes the same index): tiles of 64
  rows x 8 groups, each of four 16-row sub-tiles, holding row ``r % 8`` in 16-nibble runs
  ordered by group ``g % 4``, then ``g % 8 >= 4``, then ``r % 16 >= 8``. The layout needs
  ``out % 64 == 0`` and ``in % 32 == 0`` (``sparse.layout_supported``), true of every
  LLaMA projection.
* a program computes ``BLOCK_N`` output features for all token rows (``BLOCK_T``, the next
  power of two): per step it loads ``BLOCK_N x BLOCK_G`` groups' two kept values and their
  4-bit entry, spreads them over the group's 4 positions and multiplies with the token rows'
  4 inputs of the group (no tensor cores: at a few rows the product is a stream of the
  weight's bytes through fp32 FMAs), summing in fp32. ``SPLIT_K`` programs share a row
  block's inputs and add their partial sums atomically into an fp32 result, for more
  loads in flight on a short, wide weight.

``CONFIGS`` are the tile shapes the kernel table (``sparse.measure_shape``) times per
weight shape and token count; the winner's index is stored in the table. Triton is
imported here only; ``TRITON_INTERPRET=1`` before the first import runs the kernel on CPU
tensors (the tests).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_ext.inference.sparse import META_COL_TILE, META_ROW_TILE, layout_supported

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

MAX_TOKENS = 16                  # the largest token count the kernel is offered for


class Config(NamedTuple):
    block_n: int         # output features per program
    block_g: int         # groups of 4 inputs per loop step
    split_k: int         # programs sharing one row block's inputs (partial sums added atomically)
    num_warps: int


CONFIGS = (Config(16, 64, 1, 4), Config(16, 64, 2, 4), Config(16, 128, 4, 4), Config(64, 32, 8, 4),
           Config(8, 128, 4, 2), Config(8, 64, 8, 2), Config(32, 32, 8, 4))


def available() -> bool:
    """Whether triton is importable (the device question belongs to ``sparse.sparse_kernels_available``)."""
    return triton is not None


def interpreted() -> bool:
    """Whether the kernel was built for Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return triton is not None and not isinstance(_kernel, triton.runtime.JITFunction)


def block_tokens(tokens: int) -> int:
    """The token tile the kernel is compiled for: the next power of two."""
    return 1 << max(tokens - 1, 0).bit_length()


if triton is not None:
    @triton.jit(do_not_specialize=["T"])
    def _kernel(x_ptr, v_ptr, meta_ptr, y_ptr, T, N, stride_x, stride_y, KG: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, SPLIT_K: tl.constexpr,
                STEPS: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rt = tl.arange(0, BLOCK_T)
        row_ok = rn < N
        t_ok = rt < T
        # The 4-bit entries (sparse.meta_nibble_index): the 8 groups of one column tile of row r
        # are the low (r % 16 < 8) or high nibbles of 8 consecutive bytes, one 64-bit word:
        # word (r // 64) * (KG // 8) * 32 + tile * 32 + ((r % 64) // 16) * 8 + r % 8, group
        # j = g % 8 in byte (j % 4) * 2 + j // 4. BLOCK_G is a multiple of 8.
        row_word = (rn // 64) * (KG // 8) * 32 + ((rn % 64) // 16) * 8 + rn % 8
        row_shift = ((rn % 16) // 8) * 4
        j = tl.arange(0, 8)
        shift = (8 * ((j % 4) * 2 + j // 4))[None, None, :] + row_shift[:, None, None]      # [BLOCK_N, 1, 8]
        a = tl.arange(0, BLOCK_G)
        tiles = tl.arange(0, BLOCK_G // 8)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for i in range(0, STEPS):                  # this program's share of the groups (masked past the end)
            g0 = (pid_k * STEPS + i) * BLOCK_G
            rg = g0 + a
            g_ok = rg < KG
            # the two kept values of each group (contiguous: vector loads) and their 4-bit entry
            rj = 2 * g0 + tl.arange(0, 2 * BLOCK_G)
            v = tl.load(v_ptr + rn[:, None] * (2 * KG) + rj[None, :], mask=row_ok[:, None] & (rj[None, :] < 2 * KG),
                        other=0.0)
            v0, v1 = tl.split(tl.reshape(v.to(tl.float32), (BLOCK_N, BLOCK_G, 2)))
            tile = g0 // 8 + tiles
            word = tl.load(meta_ptr + row_word[:, None] + (tile * 32)[None, :],
                           mask=row_ok[:, None] & (tile < KG // 8)[None, :], other=0)     # [BLOCK_N, BLOCK_G // 8]
            nib = tl.reshape(((word[:, :, None] >> shift) & 15).to(tl.int32), (BLOCK_N, BLOCK_G))
            p0 = nib & 3                            # i0 < i1: i0 is 0, 1 or 2; i1 is 1, 2 or 3
            p1 = nib >> 2
            zero = tl.zeros_like(v0)
            d0 = tl.where(p0 == 0, v0, zero)[None, :, :]
            d1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))[None, :, :]
            d2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))[None, :, :]
            d3 = tl.where(p1 == 3, v1, zero)[None, :, :]
            # the token rows' inputs at the 4 positions of each group: [BLOCK_T, 1, BLOCK_G]
            xp = x_ptr + rt[:, None] * stride_x + 4 * rg[None, :]
            x_ok = t_ok[:, None] & g_ok[None, :]
            x0 = tl.load(xp, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
            x1 = tl.load(xp + 1, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
            x2 = tl.load(xp + 2, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
            x3 = tl.load(xp + 3, mask=x_ok, other=0.0).to(tl.float32)[:, None, :]
            acc += tl.sum(d0 * x0 + d1 * x1 + d2 * x2 + d3 * x3, axis=2)
        out = y_ptr + rt[:, None] * stride_y + rn[None, :]
        out_ok = t_ok[:, None] & row_ok[None, :]
        if SPLIT_K == 1:
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=out_ok)
        else:
            tl.atomic_add(out, acc, mask=out_ok)


def sparse_gemv(compressed: torch.Tensor, x: torch.Tensor, out_f: int, in_f: int, config: int = 0) -> torch.Tensor:
    """``y [T, out] = x [T, in] @ W^T`` for the cuSPARSELt-compressed 2:4 ``W`` (T <= MAX_TOKENS)."""
    if triton is None:
        raise RuntimeError("sparse_gemv needs triton")
    tokens = x.shape[0]
    if tokens > MAX_TOKENS or not layout_supported(out_f, in_f) or x.shape[1] != in_f:
        raise ValueError(f"sparse_gemv: x {tuple(x.shape)} against W [{out_f}, {in_f}] (at most {MAX_TOKENS} "
                         f"rows; out % {META_ROW_TILE} == 0 and in % {META_COL_TILE} == 0)")
    x = x if x.stride(1) == 1 else x.contiguous()
    flat = compressed.reshape(-1)
    half = out_f * in_f // 2
    values = flat[:half]
    meta = flat.view(torch.uint8)[2 * half:].view(torch.int64)       # out * in / 8 bytes, 8-aligned
    c = CONFIGS[config]
    split = c.split_k
    y = (torch.zeros(tokens, out_f, dtype=torch.float32, device=x.device) if split > 1
         else torch.empty(tokens, out_f, dtype=x.dtype, device=x.device))
    grid = (triton.cdiv(out_f, c.block_n), split)
    _kernel[grid](x, values, meta, y, tokens, out_f, x.stride(0), y.stride(0), KG=in_f // 4,
                  BLOCK_T=block_tokens(tokens), BLOCK_N=c.block_n, BLOCK_G=c.block_g, SPLIT_K=split,
                  STEPS=triton.cdiv(triton.cdiv(in_f // 4, c.block_g), split),
                  num_warps=c.num_warps)
    return y.to(x.dtype) if split > 1 else y
