"""2:4 semi-structured sparse inference against dense bf16: per LLaMA-2-7B linear, and a whole prefill.

(i) ``F.linear(x, W)`` for each LLaMA-2-7B linear shape (weight [out, in]: qkv 12288x4096,
    proj 4096x4096, fc1 22016x4096, fc2 4096x11008) at ``--tokens`` rows of ``x`` (4096, a
    prefill, and 16, decode-like): the dense bf16 weight against the same weight 2:4-pruned by
    magnitude and converted by ``torch.sparse.to_sparse_semi_structured``, once per backend
    available (cuSPARSELt, and CUTLASS through ``SparseSemiStructuredTensor._FORCE_CUTLASS``).
(ii) A prefill of ``--prefill`` tokens (batch 1) through a LLaMA-2-7B-shaped model in bf16 with
    random weights, every q/k/v/o/gate/up/down projection 2:4-pruned by magnitude:
    the dense masked model, then the same weights as semi-structured sparse tensors. The model
    is transformers' ``LlamaForCausalLM`` built from a config on the GPU (``--model-impl hf``,
    the default where transformers is installed) or our megatron-core ``GPTModel`` in inference
    mode (``--model-impl megatron``). Reported: prefill latency, speed-up, weight memory, and
    the sparse logits against the dense masked logits. A sparse model passes when that
    difference is at most 3x the dense bf16 model's own difference from an fp32 run of the
    same weights (the scale of bf16 rounding), or 1e-3.

Times are CUDA-event averages over back-to-back calls after warm-up (Python dispatch of the
sparse tensor subclass included).

    python benchmarks/bench_sparse_infer_gpu.py [--out FILE]      # GPU
    python benchmarks/bench_sparse_infer_gpu.py --tiny            # CPU: the pruning and layout checks

On a machine without CUDA, ``--tiny`` checks what runs on the CPU (magnitude pruning, the
CUTLASS compressed layout round trip, the masked models and the logits comparison), then
says that the rest needs CUDA and exits 0.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_common import emit, environment  # noqa: E402
from megatron_ext import platform  # noqa: E402
from megatron_ext.models import get_config  # noqa: E402
from megatron_ext.sparsity.nm import check_nm  # noqa: E402
from megatron_ext.sparsity.oneshot import magnitude_mask  # noqa: E402

N, M = 2, 4
# LLaMA-2-7B's linears as megatron-core fuses them, weight [out, in]
LLAMA2_7B_SHAPES = {"qkv": (12288, 4096), "proj": (4096, 4096), "fc1": (22016, 4096), "fc2": (4096, 11008)}
# A small model whose shapes still meet both backends' minimum sizes (rows % 32, columns % 64)
TINY_OVERRIDES = dict(hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=4, num_layers=2)
HF_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BACKENDS = ("cuSPARSELt", "CUTLASS")


# --------------------------------------------------------------------------- pruning and conversion


@torch.no_grad()
def prune_2of4_(weight: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the 2 smallest-magnitude weights of every 4 consecutive inputs."""
    weight.mul_(magnitude_mask(weight, N, M).to(weight.dtype))
    return weight


def available_backends() -> list[str]:
    """cuSPARSELt where torch was built with it; CUTLASS on any CUDA build."""
    if not platform.has_cuda():
        return []
    return [b for b in BACKENDS if b != "cuSPARSELt" or torch.backends.cusparselt.is_available()]


def to_semi_structured(weight: torch.Tensor, backend: str):
    """``to_sparse_semi_structured(weight)`` through ``backend`` (the flag picks the subclass)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "CUTLASS"
    try:
        return to_sparse_semi_structured(weight.contiguous())
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous


def sparse_bytes(t) -> int:
    """Bytes a semi-structured tensor holds (kept values, metadata, transposed copies if any)."""
    parts = (getattr(t, name, None) for name in ("packed", "meta", "packed_t", "meta_t",
                                                 "compressed_swizzled_bitmask"))
    return sum(p.numel() * p.element_size() for p in parts if p is not None)


def check_cutlass_layout(weight: torch.Tensor) -> None:
    """The 2:4 weight survives the round trip through CUTLASS's compressed layout (values +
    metadata), computed by torch's reference conversion, which runs on any device."""
    from torch.sparse._semi_structured_conversions import (sparse_semi_structured_from_dense_cutlass,
                                                           sparse_semi_structured_to_dense_cutlass)

    packed, meta = sparse_semi_structured_from_dense_cutlass(weight)
    if packed.numel() * 2 != weight.numel() or not torch.equal(sparse_semi_structured_to_dense_cutlass(packed, meta),
                                                               weight):
        raise AssertionError(f"weight {list(weight.shape)}: the CUTLASS compressed layout does not round-trip")


def check_pruned(weight: torch.Tensor, original: torch.Tensor, what: str) -> None:
    """Exactly 2 of every 4 kept, and the kept ones are the largest in magnitude."""
    if not check_nm(weight, N, M, exact=True):
        raise AssertionError(f"{what}: not exactly {N}:{M} after pruning")
    groups = original.float().abs().reshape(original.shape[0], -1, M)
    kept = (weight != 0).reshape(groups.shape)
    if (groups.masked_fill(~kept, float("inf")).amin(-1) < groups.masked_fill(kept, 0).amax(-1)).any():
        raise AssertionError(f"{what}: a dropped weight is larger than a kept one")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def cuda_ms(fn, warmup: int, iters: int) -> float:
    """Mean milliseconds per call of ``iters`` back-to-back calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _failure(e: Exception) -> str:
    first = (str(e).splitlines() or [""])[0][:100].replace("|", "/")
    return f"unsupported ({type(e).__name__}: {first})"


# --------------------------------------------------------------------------- (i) single linears


def sparse_linear_cell(x, w_s, dense_out, dense_ms: float, opts) -> str:
    """``ms | speed-up`` of ``F.linear(x, w_s)``, or why there is none (a conversion or matmul
    this GPU or build does not support, or a result that differs from the dense one)."""
    if isinstance(w_s, str):
        return f"{w_s} |"
    try:
        err = rel_diff(F.linear(x, w_s), dense_out)
        if err > 1e-2:
            return f"wrong result (rel. diff {err:.2e}) |"
        ms = cuda_ms(lambda: F.linear(x, w_s), opts.warmup, opts.iters)
    except Exception as e:  # noqa: BLE001
        return f"{_failure(e)} |"
    return f"{ms:.4f} | {dense_ms / ms:.2f}x"


@torch.no_grad()
def bench_linears(shapes: dict, tokens: list[int], backends: list[str], opts) -> list[str]:
    dev = platform.device()
    gen = torch.Generator(device=dev).manual_seed(0)
    header = "| linear | W [out, in] | tokens | dense ms | dense TFLOP/s |" + "".join(
        f" {b} ms | {b} speed-up |" for b in backends)
    lines = [header, "|" + "---|" * (5 + 2 * len(backends))]
    for name, (out_f, in_f) in shapes.items():
        weight = prune_2of4_(torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02)
        sparse = {}
        for b in backends:
            try:
                sparse[b] = to_semi_structured(weight, b)
            except Exception as e:  # noqa: BLE001 - a backend this GPU or build lacks is reported
                sparse[b] = _failure(e)
        for n_tok in tokens:
            x = torch.randn(n_tok, in_f, device=dev, dtype=torch.bfloat16, generator=gen)
            dense_out = F.linear(x, weight)
            dense_ms = cuda_ms(lambda: F.linear(x, weight), opts.warmup, opts.iters)
            tflops = 2 * out_f * in_f * n_tok / dense_ms / 1e9
            row = f"| {name} | {out_f}x{in_f} | {n_tok} | {dense_ms:.4f} | {tflops:.0f} |"
            for b in backends:
                row += f" {sparse_linear_cell(x, sparse[b], dense_out, dense_ms, opts)} |"
            lines.append(row)
        del weight, sparse
    return lines


# --------------------------------------------------------------------------- (ii) a whole prefill


def build_hf(cfg, dtype):
    """transformers' LlamaForCausalLM from our config, random weights, on the platform's device."""
    import transformers

    from megatron_ext.checkpoint import to_hf_config

    hf_cfg = transformers.LlamaConfig(**to_hf_config(cfg), attn_implementation="sdpa")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(platform.device()):
            model = transformers.LlamaForCausalLM(hf_cfg)
    finally:
        torch.set_default_dtype(previous)
    linears = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in HF_PROJECTIONS]
    return model.eval(), linears, lambda ids: model(input_ids=ids, use_cache=False).logits


def build_megatron(cfg, dtype):
    """Our megatron-core GPTModel (TP1), random weights, in inference mode."""
    from megatron_ext.models.build import build_model, forward_logits
    from megatron_ext.models.spec import LINEAR_NAMES

    platform.init_distributed(1)
    platform.seed_everything(0)
    model = build_model(cfg, dtype)
    linears = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LINEAR_NAMES]
    return model.eval(), linears, lambda ids: forward_logits(model, ids, cfg.vocab_size)


def set_param_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast the parameters only (buffers such as rotary frequencies keep their dtype)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.no_grad()
def masked_model(impl: str, cfg, prefill: int):
    """The model with every projection 2:4-pruned, its forward, and the dense logits (bf16) and
    their relative difference from an fp32 run of the same weights."""
    model, linears, forward = (build_hf if impl == "hf" else build_megatron)(cfg, torch.bfloat16)
    for i, m in enumerate(linears):
        original = m.weight.detach().clone()
        check_pruned(prune_2of4_(m.weight.data), original, f"projection {i}")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, prefill), generator=gen).to(platform.device())
    set_param_dtype(model, torch.float32)
    reference = forward(ids).float()
    set_param_dtype(model, torch.bfloat16)
    dense = forward(ids)
    bf16_scale = rel_diff(dense, reference)
    del reference
    return model, linears, forward, ids, dense, bf16_scale


def swap_weights(linears, weights) -> list:
    """Give each linear a new (frozen) weight; returns the old parameters."""
    old = [m.weight for m in linears]
    for m, w in zip(linears, weights):
        m.weight = w if isinstance(w, torch.nn.Parameter) else torch.nn.Parameter(w, requires_grad=False)
    return old


@torch.no_grad()
def bench_prefill(impl: str, cfg, backends: list[str], opts) -> tuple[list[str], list[str], bool]:
    model, linears, forward, ids, dense, bf16_scale = masked_model(impl, cfg, opts.prefill)
    tol = max(3 * bf16_scale, 1e-3)
    dense_ms = cuda_ms(lambda: forward(ids), opts.prefill_warmup, opts.prefill_iters)
    total = param_bytes(model)
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    kind = "transformers LlamaForCausalLM" if impl == "hf" else "megatron-core GPTModel"
    name = f"{cfg.name} x{cfg.num_layers}L ({kind})"
    lines = ["| model | weights | prefill tokens | prefill ms | speed-up | weight GiB | logits rel. diff vs dense "
             "| top-1 agreement | check |", "|---|---|---|---|---|---|---|---|---|",
             f"| {name} | dense bf16, 2:4-masked | {opts.prefill} | {dense_ms:.2f} | 1.00x | {total / 2**30:.2f} "
             f"| 0 (fp32 run: {bf16_scale:.2e}) | | reference |"]
    ok = True
    for b in backends:
        old = None
        try:
            converted = [to_semi_structured(m.weight, b) for m in linears]
            held = total - linear_bytes + sum(sparse_bytes(w) for w in converted)
            old = swap_weights(linears, converted)
            del converted
            logits = forward(ids)
            diff = rel_diff(logits, dense)
            top1 = float((logits.argmax(-1) == dense.argmax(-1)).float().mean())
            del logits
            ms = cuda_ms(lambda: forward(ids), opts.prefill_warmup, opts.prefill_iters)
            passed = diff <= tol
            ok &= passed
            lines.append(f"| {name} | 2:4 sparse, {b} | {opts.prefill} | {ms:.2f} | {dense_ms / ms:.2f}x "
                         f"| {held / 2**30:.2f} | {diff:.2e} | {top1:.2%} "
                         f"| {'pass' if passed else 'FAIL'} (<= {tol:.1e}) |")
        except Exception as e:  # noqa: BLE001 - a backend this GPU or build lacks is reported
            lines.append(f"| {name} | 2:4 sparse, {b} | {opts.prefill} | {_failure(e)} | | | | | |")
        finally:
            if old is not None:
                swap_weights(linears, old)
    notes = [f"- End to end: {name}, random weights (std 0.02), every q/k/v/o/gate/up/down projection 2:4-pruned "
             "by magnitude; embedding and output layer dense. Weight GiB counts what each model needs (the sparse "
             "rows: kept values + metadata of the projections, the rest dense).",
             f"- Logits check: the dense bf16 model differs from an fp32 run of the same weights by {bf16_scale:.2e} "
             f"(relative L2); a sparse model passes when it differs from the dense masked logits by at most "
             f"{tol:.1e} (3x that, at least 1e-3)."]
    return lines, notes, ok


# --------------------------------------------------------------------------- CPU checks and main


def cpu_checks(shapes: dict, cfg, impls: list[str], prefill: int) -> list[str]:
    """What runs without CUDA: pruning, the CUTLASS layout round trip, the masked models."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, (out_f, in_f) in shapes.items():
        original = torch.randn(out_f, in_f, generator=gen).to(torch.bfloat16)
        weight = prune_2of4_(original.clone())
        check_pruned(weight, original, name)
        check_cutlass_layout(weight)
        out.append(f"- {name} [{out_f}, {in_f}]: 2:4 magnitude pruning and the CUTLASS layout round trip: ok")
    for impl in impls:
        model, linears, _, _, _, scale = masked_model(impl, cfg, prefill)
        for m in linears:
            check_cutlass_layout(m.weight.detach())
        out.append(f"- {impl} model ({len(linears)} projections): pruned 2:4, layouts round-trip; dense bf16 logits "
                   f"vs fp32 run: rel. diff {scale:.2e}")
        del model, linears
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4096,16", help="rows of x in the single-linear timings")
    p.add_argument("--prefill", type=int, default=4096, help="prefill tokens of the end-to-end run")
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--layers", type=int, help="layers of the end-to-end model (default: all)")
    p.add_argument("--model-impl", choices=["auto", "hf", "megatron"], default="auto",
                   help="auto: transformers' LlamaForCausalLM where transformers is installed, else megatron-core")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma list of cuSPARSELt, CUTLASS")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--prefill-warmup", type=int, default=2)
    p.add_argument("--prefill-iters", type=int, default=5)
    p.add_argument("--skip-linears", action="store_true")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--out", help="also write the tables to this file")
    p.add_argument("--tiny", action="store_true", help="small shapes; on a CPU only the checks that need no CUDA")
    opts = p.parse_args(argv)
    wanted = [b.strip() for b in opts.backends.split(",") if b.strip()]
    if any(b not in BACKENDS for b in wanted):
        p.error(f"--backends: choose from {', '.join(BACKENDS)}, got {opts.backends!r}")
    has_hf = importlib.util.find_spec("transformers") is not None
    if opts.model_impl == "hf" and not has_hf:
        p.error("--model-impl hf: transformers is not installed (use --model-impl megatron)")
    impl = opts.model_impl if opts.model_impl != "auto" else ("hf" if has_hf else "megatron")

    shapes, tokens = LLAMA2_7B_SHAPES, [int(t) for t in opts.tokens.split(",")]
    cfg = get_config(opts.model, **({"num_layers": opts.layers} if opts.layers else {}))
    if opts.tiny:
        cfg = get_config("tiny", **TINY_OVERRIDES)
        h, f = cfg.hidden_size, cfg.ffn_hidden_size
        shapes = {"qkv": (3 * h, h), "proj": (h, h), "fc1": (2 * f, h), "fc2": (h, f)}
        tokens, opts.prefill = [64, 16], 128
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, opts.prefill))

    if not platform.has_cuda():
        if not opts.tiny:
            p.error("needs CUDA: semi-structured sparse matmuls run only on CUDA GPUs "
                    "(--tiny checks the rest on a CPU)")
        lines = cpu_checks(shapes, cfg, ["hf", "megatron"] if has_hf else ["megatron"], opts.prefill)
        lines.append("- needs CUDA: to_sparse_semi_structured and the sparse matmuls run only on CUDA GPUs; "
                     "the timings were skipped (the CPU checks above passed)")
        emit("\n".join(["## 2:4 sparse inference (bench_sparse_infer_gpu.py), CPU checks", ""] + lines), opts.out)
        platform.destroy_distributed()
        return 0

    backends = [b for b in wanted if b in available_backends()]
    missing = [b for b in wanted if b not in backends]
    lines = ["## 2:4 semi-structured sparse inference against dense bf16 (bench_sparse_infer_gpu.py)", ""]
    lines += environment()
    lines.append(f"- Backends: {', '.join(backends) or 'none'}"
                 + (f" ({', '.join(missing)} not available in this torch build)" if missing else ""))
    ok = True
    if not opts.skip_linears:
        lines += ["", f"Single linears, y = F.linear(x, W), x [tokens, in] bf16; mean of {opts.iters} calls after "
                      f"{opts.warmup}:", ""]
        lines += bench_linears(shapes, tokens, backends, opts)
    if not opts.skip_prefill:
        table, notes, ok = bench_prefill(impl, cfg, backends, opts)
        lines += ["", f"Prefill, batch 1, mean of {opts.prefill_iters} after {opts.prefill_warmup}:", ""]
        lines += table + [""] + notes
    emit("\n".join(lines), opts.out)
    platform.destroy_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
