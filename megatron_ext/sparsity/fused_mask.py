"""Triton kernels for the Gumbel-softmax N:M masked weight: one pass forward, one pass backward.

``forward`` writes ``weight * mask`` for ``weight [O, G*M]`` and ``logits [O, G, C]``,
``mask = softmax((kappa * logits + g) / tau) @ S`` (``hard``: the one-hot of the argmax),
reading the weight and the logits once and writing the product once. ``backward`` reads
``dL/d(weight * mask)``, the weight and the logits once, recomputes the noise and the
softmax, and writes (or adds into an fp32 buffer) ``dL/dlogits``; optionally
``dL/dweight = grad * mask`` and the gradient of the regulariser ``coeff * sum((W * mask)^2)``
in the same pass. Nothing but the weight and the logits is needed for the backward.

The noise ``g`` is the counter-based hash of ``megatron_ext.sparsity.gumbel`` (``mix32``,
``_bits``, ``_salts``, ``_open_uniform``) in uint32 arithmetic: products wrap modulo 2**32,
which is the ``& MASK32`` of the int64 path, so the hash bits are identical; the double
logarithm is fp32 (within a few ulp of torch's). All other math is fp32; the mask is
rounded to the weight's dtype before the product, as ``masked_weight`` does.

A program handles ``BLOCK_G`` groups of one weight row (a 2-d grid: rows x blocks of
groups), one group per lane: the candidates are a compile-time loop (no padding, no
exchange between lanes), the group's ``M`` weights a row of a ``[BLOCK_G, MP]`` tile.
Memory per weight for 2:4 (bf16 weight, fp32 logits: 6 logits per 4 weights = 6 bytes):
forward 2 + 6 read, 2 written; backward 2 + 2 + 6 read, 6 written (+ 6 read when adding
into a buffer). See ``benchmarks/KERNEL_NOTES.md``.

Triton is imported here only; ``megatron_ext.sparsity.gumbel`` imports this module when a
kernel is asked for. Set ``TRITON_INTERPRET=1`` before the first import to run the kernels
on CPU tensors (tests).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path of gumbel.py needs none of this
    triton = None

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOGITS_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    """Whether triton is importable (the device question belongs to ``megatron_ext.platform``)."""
    return triton is not None


def interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return triton is not None and not isinstance(_forward_kernel, triton.runtime.JITFunction)


def supports(weight: torch.Tensor, logits: torch.Tensor) -> bool:
    """Whether the kernels take these dtypes (else the caller uses the PyTorch path)."""
    return weight.dtype in WEIGHT_DTYPES and logits.dtype in LOGITS_DTYPES


def _require() -> None:
    if triton is None:
        raise RuntimeError("the fused Gumbel-mask kernels need triton (pip install triton); "
                           "or set the layer's mask_impl = \"torch\" for the PyTorch path")


if triton is not None:
    @triton.jit
    def _mix32(x):
        # gumbel.mix32 on uint32: the products wrap modulo 2**32
        x = x ^ (x >> 15)
        x = x * 0x2C1B3C6D
        x = x ^ (x >> 12)
        x = x * 0x297A2D39
        return x ^ (x >> 15)

    @triton.jit
    def _group_hash(key, gidx):
        """gumbel._bits before the slot: ``mix32(mix32(lo ^ key) ^ hi)`` of int64 global groups."""
        lo = (gidx & 0xFFFFFFFF).to(tl.uint32)
        hi = (gidx >> 32).to(tl.uint32)
        return _mix32(_mix32(lo ^ key.to(tl.uint32)) ^ hi)

    @triton.jit
    def _slot_bits(h, c: tl.constexpr):
        return _mix32(h ^ (((c + 1) * 0x9E3779B9) & 0xFFFFFFFF))  # the salt of slot c (gumbel._salts)

    @triton.jit
    def _noise(h, c: tl.constexpr, FAST_LOG: tl.constexpr):
        u = ((_slot_bits(h, c) >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23
        v = -tl.log(u)  # accurate: relative precision matters where u is near 1
        if FAST_LOG:  # the hardware log2 approximation: absolute error about 1e-7 in g
            return -tl.extra.cuda.libdevice.fast_logf(v)
        return -tl.log(v)

    @triton.jit
    def _round_to(x, dtype: tl.constexpr):
        """fp32 ``x`` rounded to ``dtype`` (to nearest, ties to even, as torch rounds). bf16 by
        hand: Triton's interpreter truncates a bf16 cast; the bits are the same on the GPU."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN stays NaN
        return x.to(dtype)

    @triton.jit
    def _groups(rows_ptr, cols_ptr, G, groups_per_row, key, BLOCK_G: tl.constexpr):
        """This program's groups: ``BLOCK_G`` group columns of one weight row (a 2-d grid, no
        integer division): flat index in the shard, validity, and the per-group hash."""
        row = tl.program_id(0).to(tl.int64)
        col = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
        g_ok = col < G
        gidx = tl.load(rows_ptr + row) * groups_per_row + tl.load(cols_ptr + col, mask=g_ok, other=0)
        return row * G + col, g_ok, _group_hash(key, gidx)

    @triton.jit
    def _sample(l_ptr, g, g_ok, h, kappa, inv_tau,
                C: tl.constexpr, HARD: tl.constexpr, FAST_LOG: tl.constexpr):
        """Per candidate (a tuple of C vectors, one group per lane): the soft sample y; and the
        argmax (first of equal maxima, as torch) for the hard forward."""
        l_base = l_ptr + g * C
        zs = ()
        z_max = tl.full(g.shape, float("-inf"), tl.float32)
        for c in tl.static_range(C):
            logit = tl.load(l_base + c, mask=g_ok, other=0.0).to(tl.float32)
            z = (kappa * logit + _noise(h, c, FAST_LOG)) * inv_tau
            zs = zs + (z,)
            z_max = tl.maximum(z_max, z)
        es = ()
        total = tl.zeros(g.shape, tl.float32)
        for c in tl.static_range(C):
            e = tl.exp(zs[c] - z_max)
            es = es + (e,)
            total += e
        inv_total = 1.0 / total
        ys = ()
        for c in tl.static_range(C):
            ys = ys + (es[c] * inv_total,)
        pick = tl.full(g.shape, 0, tl.int32)
        if HARD:
            for i in tl.static_range(C):
                pick = tl.where(zs[C - 1 - i] == z_max, C - 1 - i, pick)
        return ys, pick

    @triton.jit
    def _mask_tile(ys, pick, c_ptr, m, C: tl.constexpr, M: tl.constexpr, BLOCK_G: tl.constexpr,
                   MP: tl.constexpr, HARD: tl.constexpr):
        """The forward's mask ``[BLOCK_G, MP]``: ``y @ S``, or the candidate picked."""
        if HARD:
            return tl.load(c_ptr + pick[:, None] * M + m[None, :], mask=(m < M)[None, :], other=0.0)
        mask = tl.zeros([BLOCK_G, MP], tl.float32)
        for c in tl.static_range(C):
            s_c = tl.load(c_ptr + c * M + m, mask=m < M, other=0.0)
            mask += ys[c][:, None] * s_c[None, :]
        return mask

    @triton.jit(do_not_specialize=["G", "groups_per_row", "key"])
    def _forward_kernel(w_ptr, l_ptr, c_ptr, rows_ptr, cols_ptr, out_ptr, sq_ptr,
                        G, groups_per_row, key, kappa, inv_tau,
                        C: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                        BLOCK_G: tl.constexpr, HARD: tl.constexpr, WITH_SQ: tl.constexpr,
                        FAST_LOG: tl.constexpr):
        g, g_ok, h = _groups(rows_ptr, cols_ptr, G, groups_per_row, key, BLOCK_G)
        ys, pick = _sample(l_ptr, g, g_ok, h, kappa, inv_tau, C, HARD, FAST_LOG)
        m = tl.arange(0, MP)
        mask = _mask_tile(ys, pick, c_ptr, m, C, M, BLOCK_G, MP, HARD)
        w_off = g[:, None] * M + m[None, :]
        w_mask = g_ok[:, None] & (m < M)[None, :]
        w = tl.load(w_ptr + w_off, mask=w_mask, other=0.0)
        out = w.to(tl.float32) * _round_to(mask, w.dtype).to(tl.float32)
        tl.store(out_ptr + w_off, _round_to(out, out_ptr.dtype.element_ty), mask=w_mask)
        if WITH_SQ:  # the regulariser's sum((W * mask)^2) with the unrounded fp32 mask
            p = w.to(tl.float32) * mask
            tl.store(sq_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
                     tl.sum(tl.sum(p * p, axis=1), axis=0))

    @triton.jit(do_not_specialize=["G", "groups_per_row", "key"])
    def _backward_kernel(gm_ptr, w_ptr, l_ptr, c_ptr, rows_ptr, cols_ptr, gl_ptr, gw_ptr, reg_ptr,
                         G, groups_per_row, key, kappa, inv_tau, scale,
                         C: tl.constexpr, M: tl.constexpr, MP: tl.constexpr, CP: tl.constexpr,
                         BLOCK_G: tl.constexpr, HARD: tl.constexpr, HAS_GRAD: tl.constexpr,
                         HAS_REG: tl.constexpr, ACCUMULATE: tl.constexpr, WITH_GW: tl.constexpr,
                         FAST_LOG: tl.constexpr):
        g, g_ok, h = _groups(rows_ptr, cols_ptr, G, groups_per_row, key, BLOCK_G)
        ys, pick = _sample(l_ptr, g, g_ok, h, kappa, inv_tau, C, HARD, FAST_LOG)
        m = tl.arange(0, MP)
        w_off = g[:, None] * M + m[None, :]
        w_mask = g_ok[:, None] & (m < M)[None, :]
        w = tl.load(w_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32)
        mask = _mask_tile(ys, pick, c_ptr, m, C, M, BLOCK_G, MP, HARD)  # dropped by the compiler when unused
        grad_mask = tl.zeros([BLOCK_G, MP], dtype=tl.float32)
        if HAS_GRAD:
            go = tl.load(gm_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32)
            grad_mask += go * w
            if WITH_GW:
                w_dtype = gw_ptr.dtype.element_ty
                gw = go * _round_to(mask, w_dtype).to(tl.float32)
                tl.store(gw_ptr + w_off, _round_to(gw, w_dtype), mask=w_mask)
        if HAS_REG:  # d/dmask of coeff * sum((W * mask)^2)
            grad_mask += 2.0 * tl.load(reg_ptr).to(tl.float32) * w * w * mask
        # through y @ S (straight-through for hard: the soft y) and the softmax
        dot = tl.zeros(g.shape, tl.float32)
        for c in tl.static_range(C):
            s_c = tl.load(c_ptr + c * M + m, mask=m < M, other=0.0)
            dot += ys[c] * tl.sum(grad_mask * s_c[None, :], axis=1)
        ci = tl.arange(0, CP)
        grad_l = tl.zeros([BLOCK_G, CP], tl.float32)
        for c in tl.static_range(C):  # dL/dy_c again (cheaper than keeping C of them live)
            s_c = tl.load(c_ptr + c * M + m, mask=m < M, other=0.0)
            gy = tl.sum(grad_mask * s_c[None, :], axis=1)
            grad_l = tl.where(ci[None, :] == c, (ys[c] * (gy - dot) * scale)[:, None], grad_l)
        l_off = g[:, None] * C + ci[None, :]
        l_mask = g_ok[:, None] & (ci < C)[None, :]
        if ACCUMULATE:
            grad_l += tl.load(gl_ptr + l_off, mask=l_mask, other=0.0)
        tl.store(gl_ptr + l_off, _round_to(grad_l, gl_ptr.dtype.element_ty), mask=l_mask)

    @triton.jit(do_not_specialize=["G", "groups_per_row", "key"])
    def _noise_kernel(out_ptr, rows_ptr, cols_ptr, G, groups_per_row, key,
                      C: tl.constexpr, BLOCK_G: tl.constexpr, BITS: tl.constexpr, FAST_LOG: tl.constexpr):
        g, g_ok, h = _groups(rows_ptr, cols_ptr, G, groups_per_row, key, BLOCK_G)
        for c in tl.static_range(C):
            if BITS:
                tl.store(out_ptr + g * C + c, _slot_bits(h, c).to(tl.int64), mask=g_ok)
            else:
                tl.store(out_ptr + g * C + c, _noise(h, c, FAST_LOG), mask=g_ok)
else:
    _forward_kernel = None


# ---------------------------------------------------------------------- launch helpers

def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def block_groups(num_cands: int) -> int:
    """Groups per program, one per lane: 4 warps (128 groups); 2 warps for large candidate
    sets (4:8 has 70), whose per-candidate values fill the registers."""
    return 128 if num_cands <= 16 else 64


def _fast(fast_log: bool) -> bool:
    if fast_log and interpreted():
        raise ValueError("fused mask: fast_log needs the GPU (Triton's interpreter has no libdevice)")
    return bool(fast_log)


def _geometry(weight, logits, cands, rows, cols):
    if logits.dim() != 3 or weight.dim() != 2:
        raise ValueError(f"fused mask: weight must be [O, G*M] and logits [O, G, C], got "
                         f"{tuple(weight.shape)} and {tuple(logits.shape)}")
    O, G, C = logits.shape
    M = cands.shape[1]
    if cands.shape[0] != C or tuple(weight.shape) != (O, G * M):
        raise ValueError(f"fused mask: weight {tuple(weight.shape)}, logits {tuple(logits.shape)} and "
                         f"candidates {tuple(cands.shape)} do not fit together")
    if rows.shape != (O,) or cols.shape != (G,) or rows.dtype != torch.int64 or cols.dtype != torch.int64:
        raise ValueError(f"fused mask: the group index needs int64 rows [{O}] and cols [{G}], got "
                         f"{rows.dtype} {tuple(rows.shape)} and {cols.dtype} {tuple(cols.shape)}")
    if not supports(weight, logits):
        raise ValueError(f"fused mask: weight dtype {weight.dtype} / logits dtype {logits.dtype} not supported "
                         f"(weights {WEIGHT_DTYPES}, logits {LOGITS_DTYPES})")
    return O, G, C, M


def _launch(O: int, G: int, C: int, M: int, block: Optional[int], num_warps: Optional[int]):
    """Grid, meta-parameters and warps: a program per (row, block of groups)."""
    bg = block or block_groups(C)
    if bg < 1 or bg & (bg - 1):
        raise ValueError(f"fused mask: groups per program must be a power of two, got {bg}")
    warps = num_warps or max(1, min(8, bg // 32))
    return (O, triton.cdiv(G, bg)), dict(C=C, M=M, MP=_pow2(M), BLOCK_G=bg), warps


def forward(weight: torch.Tensor, logits: torch.Tensor, cands: torch.Tensor, rows: torch.Tensor,
            cols: torch.Tensor, groups_per_row: int, key: int, tau: float, kappa: float, hard: bool,
            with_sq_norm: bool = False, block: Optional[int] = None, num_warps: Optional[int] = None,
            fast_log: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight * mask, sum((weight * mask)^2) in fp32 or None)``; no autograd.

    ``rows [O]`` / ``cols [G]``: int64 global rows and group columns (``gumbel.GroupIndex``);
    the global group of ``(o, g)`` is ``rows[o] * groups_per_row + cols[g]``. ``block``
    (groups per program, a power of two) and ``num_warps`` are tuning knobs; ``fast_log``
    takes the noise's outer logarithm from the GPU's approximation (not under the
    interpreter; the noise then differs from gumbel.py's by about 1e-7).
    """
    _require()
    O, G, C, M = _geometry(weight, logits, cands, rows, cols)
    grid, k, warps = _launch(O, G, C, M, block, num_warps)
    weight, logits = weight.contiguous(), logits.contiguous()
    cands = cands.to(device=weight.device, dtype=torch.float32).contiguous()
    out = torch.empty_like(weight)
    sq = torch.zeros(grid[0] * grid[1] if with_sq_norm else 1, dtype=torch.float32, device=weight.device)
    if O * G:
        _forward_kernel[grid](weight, logits, cands, rows.contiguous(), cols.contiguous(), out, sq,
                              G, groups_per_row, key, float(kappa), 1.0 / tau,
                              HARD=bool(hard), WITH_SQ=bool(with_sq_norm), FAST_LOG=_fast(fast_log),
                              num_warps=warps, **k)
    return out, (sq.sum() if with_sq_norm else None)


def backward(grad_masked: Optional[torch.Tensor], weight: torch.Tensor, logits: torch.Tensor,
             cands: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, groups_per_row: int, key: int,
             tau: float, kappa: float, hard: bool, *, grad_logits: Optional[torch.Tensor] = None,
             reg: Optional[torch.Tensor] = None, want_grad_weight: bool = False, block: Optional[int] = None,
             num_warps: Optional[int] = None, fast_log: bool = False
             ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(dL/dlogits, dL/dweight or None)`` for ``L`` through ``weight * mask``.

    ``grad_masked``: ``dL/d(weight * mask)`` ``[O, G*M]`` (any float dtype), or None for the
    regulariser alone. ``grad_logits``: an fp32 buffer of the logits' shape to add into
    (returned); otherwise a new tensor of the logits' dtype. ``reg``: a scalar tensor
    ``coeff``, adding ``d/dlogits coeff * sum((weight * mask)^2)``. ``want_grad_weight``:
    also ``grad_masked * mask`` in the weight's dtype. ``hard``: straight-through (the
    backward goes through the soft sample).
    """
    _require()
    O, G, C, M = _geometry(weight, logits, cands, rows, cols)
    if grad_masked is None and reg is None:
        raise ValueError("fused mask backward: nothing to differentiate (no grad_masked and no reg)")
    if grad_masked is not None and tuple(grad_masked.shape) != tuple(weight.shape):
        raise ValueError(f"fused mask backward: gradient {tuple(grad_masked.shape)} does not match the weight "
                         f"{tuple(weight.shape)}")
    if want_grad_weight and grad_masked is None:
        raise ValueError("fused mask backward: the weight gradient needs grad_masked")
    grid, k, warps = _launch(O, G, C, M, block, num_warps)
    weight, logits = weight.contiguous(), logits.contiguous()
    cands = cands.to(device=weight.device, dtype=torch.float32).contiguous()
    accumulate = grad_logits is not None
    if accumulate:
        if (grad_logits.dtype != torch.float32 or tuple(grad_logits.shape) != tuple(logits.shape)
                or not grad_logits.is_contiguous()):
            raise ValueError(f"fused mask backward: the buffer to add into must be contiguous fp32 "
                             f"{tuple(logits.shape)}, got {grad_logits.dtype} {tuple(grad_logits.shape)}")
    else:
        grad_logits = torch.empty_like(logits)
    grad_weight = torch.empty_like(weight) if want_grad_weight else None
    gm = grad_masked.contiguous() if grad_masked is not None else weight  # placeholder pointer
    reg_t = (reg.detach().reshape(()).to(device=weight.device, dtype=torch.float32) if reg is not None
             else grad_logits)
    if O * G:
        _backward_kernel[grid](gm, weight, logits, cands, rows.contiguous(), cols.contiguous(), grad_logits,
                               grad_weight if want_grad_weight else weight, reg_t,
                               G, groups_per_row, key, float(kappa), 1.0 / tau, float(kappa / tau),
                               HARD=bool(hard), HAS_GRAD=grad_masked is not None, HAS_REG=reg is not None,
                               ACCUMULATE=accumulate, WITH_GW=bool(want_grad_weight), CP=_pow2(C),
                               FAST_LOG=_fast(fast_log), num_warps=warps, **k)
    return grad_logits, grad_weight


def noise(key: int, rows: torch.Tensor, cols: torch.Tensor, groups_per_row: int, num_cands: int,
          bits: bool = False, fast_log: bool = False) -> torch.Tensor:
    """The Gumbel noise ``[O, G, C]`` fp32 (``bits``: the int64 hash bits) the kernels draw;
    for tests and benchmarks."""
    _require()
    O, G = rows.numel(), cols.numel()
    out = torch.empty(O, G, num_cands, dtype=torch.int64 if bits else torch.float32, device=rows.device)
    if O * G:
        _noise_kernel[(O, triton.cdiv(G, 128))](out, rows.contiguous(), cols.contiguous(), G, groups_per_row,
                                                key, C=num_cands, BLOCK_G=128, BITS=bool(bits),
                                                FAST_LOG=_fast(fast_log), num_warps=4)
    return out
