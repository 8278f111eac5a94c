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
  4-bit entry (the next step's loads are issued before this step's arithmetic, so two steps'
  bytes are in flight) and the token rows' ``4 x BLOCK_G`` inputs as one contiguous tile,
  split in registers. With ``select_inputs`` it picks each group's two inputs at the kept
  positions and multiplies them by the two values (2 FMAs a group and token row); without,
  it spreads the values over the group's 4 positions (4 FMAs, fewer selects: better at many
  rows). No tensor cores: at a few rows the product is a stream of the weight's bytes. The
  fp32 partial products are summed in a ``[BLOCK_T, BLOCK_N, BLOCK_G]`` accumulator and
  reduced once at the end (a reduction across threads every step costs more than the
  registers). ``SPLIT_K`` programs share a row block's inputs and add their partial sums
  atomically into an fp32 result, for more loads in flight on a short, wide weight.

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
    select_inputs: bool  # two inputs picked per group (few rows) instead of the group spread over 4


# the fastest at 1, 4 and 16 rows on an H100 for the LLaMA-2-7B projections (benchmarks/RESULTS.md)
CONFIGS = (Config(16, 64, 1, 4, True), Config(32, 64, 1, 4, True), Config(16, 64, 2, 4, True),
           Config(16, 128, 2, 4, True), Config(32, 128, 1, 8, True), Config(16, 64, 1, 4, False),
           Config(16, 64, 2, 4, False))


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
    @triton.jit
    def _load_step(v_ptr, meta_ptr, rn, row_ok, row_word, g0, live, KG: tl.constexpr, BLOCK_G: tl.constexpr):
        """One step's kept values ``[BLOCK_N, 2 * BLOCK_G]`` and metadata words ``[BLOCK_N, BLOCK_G // 8]``
        (zeros past the end, or where ``live`` is false)."""
        rj = 2 * g0 + tl.arange(0, 2 * BLOCK_G)
        v = tl.load(v_ptr + rn[:, None] * (2 * KG) + rj[None, :],
                    mask=row_ok[:, None] & (rj[None, :] < 2 * KG) & live, other=0.0)
        tile = g0 // 8 + tl.arange(0, BLOCK_G // 8)
        word = tl.load(meta_ptr + row_word[:, None] + (tile * 32)[None, :],
                       mask=row_ok[:, None] & (tile < KG // 8)[None, :] & live, other=0)
        return v, word

    @triton.jit(do_not_specialize=["T"])
    def _kernel(x_ptr, v_ptr, meta_ptr, y_ptr, T, N, stride_x, stride_y, KG: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, SPLIT_K: tl.constexpr,
                STEPS: tl.constexpr, SELECT: tl.constexpr):
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
        c4 = tl.arange(0, 4 * BLOCK_G)
        acc = tl.zeros((BLOCK_T, BLOCK_N, BLOCK_G), dtype=tl.float32)
        first = pid_k * STEPS * BLOCK_G             # this program's share of the groups (masked past the end)
        v, word = _load_step(v_ptr, meta_ptr, rn, row_ok, row_word, first, True, KG, BLOCK_G)
        for i in range(0, STEPS):
            g0 = first + i * BLOCK_G
            v_next, word_next = _load_step(v_ptr, meta_ptr, rn, row_ok, row_word, g0 + BLOCK_G, i + 1 < STEPS,
                                           KG, BLOCK_G)
            v0, v1 = tl.split(tl.reshape(v.to(tl.float32), (BLOCK_N, BLOCK_G, 2)))
            nib = tl.reshape(((word[:, :, None] >> shift) & 15).to(tl.int32), (BLOCK_N, BLOCK_G))
            p0 = nib & 3                            # i0 < i1: i0 is 0, 1 or 2; i1 is 1, 2 or 3
            p1 = nib >> 2
            # the token rows' 4 inputs of each group: one contiguous load, split in registers
            xs = tl.load(x_ptr + rt[:, None] * stride_x + 4 * g0 + c4[None, :],
                         mask=t_ok[:, None] & (4 * g0 + c4 < 4 * KG)[None, :], other=0.0).to(tl.float32)
            x02, x13 = tl.split(tl.reshape(xs, (BLOCK_T, BLOCK_G, 2, 2)))
            x0, x2 = tl.split(x02)
            x1, x3 = tl.split(x13)
            x0, x1, x2, x3 = x0[:, None, :], x1[:, None, :], x2[:, None, :], x3[:, None, :]
            if SELECT:
                q0 = p0[None, :, :]
                q1 = p1[None, :, :]
                xa = tl.where(q0 == 0, x0, tl.where(q0 == 1, x1, x2))
                xb = tl.where(q1 == 1, x1, tl.where(q1 == 2, x2, x3))
                acc += v0[None, :, :] * xa + v1[None, :, :] * xb
            else:
                zero = tl.zeros_like(v0)
                d0 = tl.where(p0 == 0, v0, zero)[None, :, :]
                d1 = tl.where(p0 == 1, v0, tl.where(p1 == 1, v1, zero))[None, :, :]
                d2 = tl.where(p0 == 2, v0, tl.where(p1 == 2, v1, zero))[None, :, :]
                d3 = tl.where(p1 == 3, v1, zero)[None, :, :]
                acc += d0 * x0 + d1 * x1 + d2 * x2 + d3 * x3
            v, word = v_next, word_next
        y = tl.sum(acc, axis=2)
        out = y_ptr + rt[:, None] * stride_y + rn[None, :]
        out_ok = t_ok[:, None] & row_ok[None, :]
        if SPLIT_K == 1:
            tl.store(out, y.to(y_ptr.dtype.element_ty), mask=out_ok)
        else:
            tl.atomic_add(out, y, mask=out_ok)


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
                  STEPS=triton.cdiv(triton.cdiv(in_f // 4, c.block_g), split), SELECT=c.select_inputs,
                  num_warps=c.num_warps)
    return y.to(x.dtype) if split > 1 else y
