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
* a program computes ``BLOCK_N`` output features for all (up to ``BLOCK_T``) token rows:
  per step it loads ``BLOCK_N x 2*BLOCK_G`` kept values and their metadata, expands them
  into the dense ``BLOCK_N x 4*BLOCK_G`` tile in registers, and multiplies with the dense
  tensor-core dot against the token rows' ``4*BLOCK_G`` inputs, accumulating in fp32.

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

MAX_TOKENS = 128                 # the largest token count this kernel is compiled for


class Config(NamedTuple):
    block_n: int
    block_g: int
    num_warps: int
    num_stages: int


CONFIGS = (Config(16, 64, 4, 3), Config(16, 128, 4, 3), Config(32, 64, 4, 3), Config(32, 128, 4, 3),
           Config(64, 64, 4, 3), Config(16, 256, 8, 3), Config(32, 32, 2, 4), Config(64, 128, 8, 3))


def available() -> bool:
    """Whether triton is importable (the device question belongs to ``sparse.sparse_kernels_available``)."""
    return triton is not None


def interpreted() -> bool:
    """Whether the kernel was built for Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return triton is not None and not isinstance(_kernel, triton.runtime.JITFunction)


def block_tokens(tokens: int) -> int:
    """The token tile the kernel is compiled for: at least 16 (the dot's smallest), a power of two."""
    return max(16, triton.next_power_of_2(tokens)) if triton is not None else max(16, 1 << (tokens - 1).bit_length())


if triton is not None:
    @triton.jit(do_not_specialize=["T"])
    def _kernel(x_ptr, v_ptr, meta_ptr, y_ptr, T, N, stride_x, stride_y, KG: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, UPCAST: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rt = tl.arange(0, BLOCK_T)
        row_ok = rn < N
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for g0 in range(0, KG, BLOCK_G):
            rg = g0 + tl.arange(0, BLOCK_G)
            ok = row_ok[:, None] & (rg[None, :] < KG)
            # the kept values of these groups, as two [BLOCK_N, BLOCK_G] tiles (first, second kept)
            rj = 2 * g0 + tl.arange(0, 2 * BLOCK_G)
            v = tl.load(v_ptr + rn[:, None] * (2 * KG) + rj[None, :],
                        mask=row_ok[:, None] & (rj[None, :] < 2 * KG), other=0.0)
            v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_G, 2)))
            r = rn[:, None]
            g = rg[None, :]
            e = (((r // 64) * (KG // 8) + g // 8) * 512 + ((r % 64) // 16) * 128 + (r % 8) * 16
                 + (g % 4) * 4 + ((g % 8) // 4) * 2 + (r % 16) // 8)
            byte = tl.load(meta_ptr + e // 2, mask=ok, other=0).to(tl.int32)
            nib = (byte >> ((e % 2) * 4)) & 15
            p0 = nib & 3
            p1 = nib >> 2
            zero = tl.zeros_like(v0)
            d0 = tl.where(p0 == 0, v0, zero)
            d1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))
            d2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))
            d3 = tl.where(p1 == 3, v1, zero)
            w = tl.reshape(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (BLOCK_N, 4 * BLOCK_G))
            rk = 4 * g0 + tl.arange(0, 4 * BLOCK_G)
            x = tl.load(x_ptr + rt[:, None] * stride_x + rk[None, :],
                        mask=(rt[:, None] < T) & (rk[None, :] < 4 * KG), other=0.0)
            if UPCAST:      # Triton's CPU interpreter multiplies 16-bit floats wrongly in tl.dot
                acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        y = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rt[:, None] * stride_y + rn[None, :], y, mask=(rt[:, None] < T) & row_ok[None, :])


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
    meta = flat.view(torch.uint8)[2 * half:]
    y = torch.empty(tokens, out_f, dtype=x.dtype, device=x.device)
    c = CONFIGS[config]
    grid = (triton.cdiv(out_f, c.block_n),)
    _kernel[grid](x, values, meta, y, tokens, out_f, x.stride(0), y.stride(0), KG=in_f // 4,
                  BLOCK_T=block_tokens(tokens), BLOCK_N=c.block_n, BLOCK_G=c.block_g,
                  UPCAST=interpreted(), num_warps=c.num_warps, num_stages=c.num_stages)
    return y
