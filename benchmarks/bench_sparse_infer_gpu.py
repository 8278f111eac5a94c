"""2:4 sparse inference against dense bf16 on the GPU: kernels, a whole prefill, decode, memory.

(i) Single linears, ``y = x W^T`` for each LLaMA-2-7B projection as our inference model fuses
    them (weight [out, in]: qkv 12288x4096, o 4096x4096, gate_up 22016x4096, down 4096x11008)
    at ``--tokens`` rows of x: dense bf16, PyTorch's ``to_sparse_semi_structured`` (the old
    path), and cuSPARSELt called directly (``torch._cslt_sparse_mm`` on a weight compressed
    once) step by step: algorithm 0 with the result transposed by a copy, the fused transpose,
    the searched algorithm; each timed eagerly (host launches included) and from a CUDA graph
    (GPU time alone). Ratios are dense / variant in the same mode.
(ii) The kernel table ``megatron_ext.inference`` measures at load (which kernel per shape and
    token count).
(iii) A ``--prefill``-token prefill (batch 1) of a LLaMA-2-7B-shaped model with random weights
    (std 0.02), every projection 2:4-pruned by magnitude, built by the same code that loads an
    exported Hugging Face directory (``model_from_state_dict``): dense bf16 against the 2:4
    model, eager and from a CUDA graph; transformers' ``LlamaForCausalLM`` on the same weights
    where installed, for scale. The sparse logits pass when they differ from the dense masked
    logits by at most 3x the dense bf16 model's own difference from an fp32 run of the same
    weights (the scale of bf16 rounding), or 1e-3.
(iv) Decode: one step (batch 1 and 16, one new token each, over a ``--context``-token cache)
    replayed from a CUDA graph, and a greedy generation of ``--new-tokens`` tokens (tokens/s).
(v) Memory: the projections' weights on the GPU, dense against sparse.
(vi) ``tools/generate.py`` on a small exported directory (with the sample tokenizer).

    python benchmarks/bench_sparse_infer_gpu.py [--out FILE]      # GPU
    python benchmarks/bench_sparse_infer_gpu.py --tiny            # small shapes; on a CPU the checks only

Without CUDA, ``--tiny`` checks what runs on a CPU (the 2:4 layout round trip, the loader's
fallback to dense masked weights, ``tools/generate.py``) and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import io
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_common import emit, environment  # noqa: E402
from megatron_ext.inference import (DecodeGraph, greedy_generate, model_from_state_dict, pack_2of4,  # noqa: E402
                                    projection_shapes, sparse_kernels_available, unpack_2of4)
from megatron_ext.inference.sparse import (DEFAULT_TOKEN_COUNTS, GEMV_MAX_TOKENS, _graph_ms,  # noqa: E402
                                           capture_graph, cusparselt_layout, gemv, gemv_available, magnitude_2of4_mask,
                                           measure_table, pad_rows, streamed_copies, time_gemv_configs)
from megatron_ext.models import get_config  # noqa: E402

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
HF_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_OVERRIDES = dict(hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, num_query_groups=4, num_layers=2)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def eager_ms(fn, warmup: int, iters: int) -> float:
    """Mean milliseconds per call of back-to-back calls (host launches included)."""
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


class Graphed:
    """``fn()`` captured once in a CUDA graph; calling replays it."""

    def __init__(self, fn):
        self.graph, self.out = capture_graph(fn)

    def __call__(self):
        self.graph.replay()
        return self.out


# --------------------------------------------------------------------------- (i) single linears


def fused_shapes(cfg) -> dict:
    return {"qkv": projection_shapes(cfg)["qkv"], "o": projection_shapes(cfg)["o"],
            "gate_up": projection_shapes(cfg)["gate_up"], "down": projection_shapes(cfg)["down"]}


@torch.no_grad()
def bench_linears(shapes: dict, tokens: list[int], opts) -> list[str]:
    from torch.sparse import to_sparse_semi_structured

    gen = torch.Generator(device="cuda").manual_seed(0)
    layouts = []
    lines = ["| linear | W [out, in] | tokens | dense eager ms | dense graph ms | old path (eager) | cuSPARSELt alg 0, "
             "copy transpose (graph) | + fused transpose (graph) | + searched alg (graph) | + searched alg (eager) "
             "| host us/call, direct | Triton gemv, best config (graph) | best sparse graph ms | rel. diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (o, i) in shapes.items():
        w = torch.randn(o, i, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        w = w * magnitude_2of4_mask(w)
        wc = torch._cslt_compress(w)
        ws = to_sparse_semi_structured(w)
        wds, wcs = streamed_copies(w), streamed_copies(wc)   # graph timings read the weight from memory
        same_layout = bool(torch.equal(wc.reshape(-1).view(torch.uint8), cusparselt_layout(w).view(torch.uint8)))
        log(f"{name}: torch._cslt_compress equals cusparselt_layout byte for byte: {same_layout}")
        layouts.append(f"{name} {o}x{i}: {'equal' if same_layout else 'DIFFERENT'}")
        for t in tokens:
            x = torch.randn(t, i, device="cuda", dtype=torch.bfloat16, generator=gen)
            xp = pad_rows(x)
            ref = F.linear(x, w)
            alg = int(torch._cslt_sparse_mm_search(wc, xp.t(), transpose_result=True))
            dense = lambda wk=w: F.linear(x, wk)  # noqa: E731
            old = lambda: F.linear(xp, ws)  # noqa: E731
            copy_t = lambda c=wc: torch._cslt_sparse_mm(c, xp.t()).t().contiguous()  # noqa: E731
            fused = lambda c=wc: torch._cslt_sparse_mm(c, xp.t(), transpose_result=True)  # noqa: E731
            best = lambda c=wc: torch._cslt_sparse_mm(c, xp.t(), transpose_result=True, alg_id=alg)  # noqa: E731
            err = max(rel_diff(f()[:t], ref) for f in (copy_t, fused, best))
            d_e, d_g = eager_ms(dense, opts.warmup, opts.iters), _graph_ms(dense, args=wds)
            gemv_col, g_g = "n/a", math.inf
            if same_layout and t <= GEMV_MAX_TOKENS and gemv_available():
                g_times = time_gemv_configs(wcs, x, o, i)
                k_best = min(range(len(g_times)), key=g_times.__getitem__)
                g_g = g_times[k_best]
                err = max(err, rel_diff(gemv(wc, x, o, i, k_best), ref))
                gemv_col = f"{d_g / g_g:.2f}x (config {k_best})"
            try:
                old_e = f"{d_e / eager_ms(old, opts.warmup, opts.iters):.2f}x"
            except Exception as e:  # noqa: BLE001 - the old path refuses some shapes
                old_e = f"unsupported ({type(e).__name__})"
            c_g, f_g, b_g = (_graph_ms(f, args=wcs) for f in (copy_t, fused, best))
            b_e = eager_ms(best, opts.warmup, opts.iters)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(opts.iters):
                best()
            host_us = (time.perf_counter() - t0) / opts.iters * 1e6
            torch.cuda.synchronize()
            lines.append(f"| {name} | {o}x{i} | {t} | {d_e:.4f} | {d_g:.4f} | {old_e} | {d_g / c_g:.2f}x "
                         f"| {d_g / f_g:.2f}x | {d_g / b_g:.2f}x (alg {alg}) | {d_e / b_e:.2f}x | {host_us:.0f} "
                         f"| {gemv_col} | {min(b_g, g_g):.4f} | {err:.1e} |")
            log(lines[-1])
    lines += ["", "- The compressed buffer against `cusparselt_layout` (the layout the Triton kernel reads), byte for "
                  "byte: " + "; ".join(layouts)]
    return lines


# --------------------------------------------------------------------------- (iii) the model


@torch.no_grad()
def random_hf_state_dict(cfg, device, seed: int = 0) -> dict:
    """A Hugging Face LLaMA state dict with random bf16 weights (std 0.02), every projection
    2:4-pruned by magnitude: what ``tools/export_sparse.py --format hf`` writes, in memory."""
    from megatron_ext.checkpoint import hf_tensor_shapes

    gen = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for k, shape in hf_tensor_shapes(cfg).items():
        if len(shape) == 1:
            sd[k] = torch.ones(shape, dtype=torch.bfloat16, device=device)
            continue
        w = (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        if k.rsplit(".", 2)[-2] in HF_PROJECTIONS:
            w.mul_(magnitude_2of4_mask(w))
        sd[k] = w
    return sd


def hf_forward(cfg, sd):
    """transformers' LlamaForCausalLM on these weights (prefill logits), or None without transformers."""
    try:
        import transformers

        from megatron_ext.checkpoint import to_hf_config
    except ImportError:
        return None
    hf_cfg = transformers.LlamaConfig(**to_hf_config(cfg), attn_implementation="sdpa")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_cfg)
    model.load_state_dict(sd, assign=True, strict=False)
    model = model.to(torch.bfloat16).eval()
    inv = model.model.rotary_emb.inv_freq
    model.model.rotary_emb.inv_freq = (1.0 / (cfg.rotary_base ** (torch.arange(0, cfg.head_dim, 2, device="cuda",
                                                                                 dtype=torch.float32)
                                                                    / cfg.head_dim))) if inv.is_meta else inv
    model.model.rotary_emb.original_inv_freq = model.model.rotary_emb.inv_freq
    return lambda ids: model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def bench_model(cfg, opts, table) -> tuple[list[str], list[str], bool]:
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    sd = random_hf_state_dict(cfg, dev)
    log(f"random 2:4 state dict: {time.perf_counter() - t0:.1f} s")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, opts.prefill), generator=gen).to(dev)
    pos = torch.arange(opts.prefill, device=dev)
    build = lambda sparse, dtype=torch.bfloat16, keep_dense=True: model_from_state_dict(  # noqa: E731
        cfg, sd, sparse=sparse, dtype=dtype, device=dev, table=table, keep_dense=keep_dense,
        max_len=max(opts.prefill, opts.context + opts.new_tokens))

    ref_model = build(False, torch.float32)
    cache = ref_model.new_cache(1, opts.prefill)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = ref_model(ids, cache, pos, prefill=True).float()
    torch.backends.cuda.matmul.allow_tf32 = prev
    del ref_model, cache
    torch.cuda.empty_cache()

    models = {"dense bf16, 2:4-masked": build(False), "2:4 sparse (kernel table)": build(True)}
    if any("dense" in table.kernels_for(o, i) for o, i in projection_shapes(cfg).values()):
        models["2:4 sparse, compressed weights only"] = build(True, keep_dense=False)
    results, ok = {}, True
    dense_logits = None
    for label, model in models.items():
        cache = model.new_cache(1, opts.prefill)
        fwd = lambda m=model, c=cache: m(ids, c, pos, prefill=True)  # noqa: E731
        logits = fwd()
        e_ms = eager_ms(fwd, opts.prefill_warmup, opts.prefill_iters)
        try:
            g = Graphed(fwd)
            g_ms = eager_ms(g, opts.prefill_warmup, opts.prefill_iters)
            g_logits = g().clone()
            del g
        except RuntimeError as e:  # a kernel that cannot be captured: the row says so
            log(f"prefill {label}: no CUDA graph ({e})")
            g_ms, g_logits = float("nan"), logits
        torch.cuda.empty_cache()
        results[label] = dict(eager=e_ms, graph=g_ms, proj=model.projection_bytes(), total=model.weight_bytes(),
                              logits=logits, graph_diff=rel_diff(g_logits, logits))
        if dense_logits is None:
            dense_logits = logits
        log(f"prefill {label}: eager {e_ms:.2f} ms, graph {g_ms:.2f} ms")
        del cache, g_logits
    bf16_scale = rel_diff(dense_logits, reference)
    tol = max(3 * bf16_scale, 1e-3)
    hf_ms = None
    try:
        hf = hf_forward(cfg, sd)
        if hf is not None:
            hf_logits = hf(ids)
            hf_ms = eager_ms(lambda: hf(ids), opts.prefill_warmup, opts.prefill_iters)
            hf_diff = rel_diff(hf_logits, dense_logits)
            del hf, hf_logits
    except Exception as e:  # noqa: BLE001 - transformers' API moves; the row says so
        log(f"transformers model: {type(e).__name__}: {e}")
        hf_ms = None
    torch.cuda.empty_cache()

    name = f"{cfg.name} x{cfg.num_layers}L"
    d = results["dense bf16, 2:4-masked"]
    lines = [f"Prefill of {opts.prefill} tokens, batch 1 ({name}, our inference model); mean of "
             f"{opts.prefill_iters} after {opts.prefill_warmup}; speed-up against the dense row in the same mode:", "",
             "| weights | eager ms | eager speed-up | CUDA graph ms | graph speed-up | projection GiB | ratio "
             "| logits rel. diff vs dense | top-1 agreement | check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        diff = rel_diff(r["logits"], dense_logits)
        top1 = float((r["logits"].argmax(-1) == dense_logits.argmax(-1)).float().mean())
        passed = diff <= tol
        if label != "dense bf16, 2:4-masked":
            ok &= passed
        lines.append(f"| {label} | {r['eager']:.2f} | {d['eager'] / r['eager']:.2f}x | {r['graph']:.2f} "
                     f"| {d['graph'] / r['graph']:.2f}x | {r['proj'] / 2**30:.2f} | {r['proj'] / d['proj']:.3f} "
                     f"| {diff:.2e} | {top1:.2%} | {'reference' if r is d else ('pass' if passed else 'FAIL')} |")
    if hf_ms is not None:
        lines.append(f"| transformers LlamaForCausalLM, dense bf16 (same weights) | {hf_ms:.2f} "
                     f"| {d['eager'] / hf_ms:.2f}x | | | | | {hf_diff:.2e} | | for scale |")
    notes = [f"- Logits check: the dense bf16 model differs from an fp32 run of the same weights by {bf16_scale:.2e} "
             f"(relative L2); a sparse model passes at most {tol:.1e} (3x that, at least 1e-3) from the dense "
             f"masked logits. CUDA-graph logits equal eager ones within "
             f"{max(r['graph_diff'] for r in results.values()):.1e}."]
    for r in results.values():
        del r["logits"]

    # decode
    lines += ["", f"Decode: one step over a {opts.context}-token cache, replayed from a CUDA graph "
                  f"(median of {opts.decode_iters}), and greedy generation of {opts.new_tokens} tokens after a "
                  f"{opts.context}-token prompt (batch 1, the host reads each token):", "",
              "| weights | step ms, batch 1 | speed-up | step ms, batch 16 | speed-up | generation tokens/s "
              "| speed-up | tokens equal to dense |", "|---|---|---|---|---|---|---|---|"]
    prompt = torch.randint(0, cfg.vocab_size, (opts.context,), generator=gen).tolist()
    dec = {}
    for label, model in models.items():
        row = {}
        for b in (1, 16):
            cache = model.new_cache(b, opts.context + 1)
            ids1 = torch.randint(0, cfg.vocab_size, (b, 1), device=dev)
            try:
                step = DecodeGraph(model, cache, batch=b)
            except RuntimeError as e:  # time eager steps instead
                log(f"decode {label}: no CUDA graph ({e})")
                step = lambda i, p, m=model, c=cache: m(i, c, torch.tensor([p], device=dev))  # noqa: E731
            times = []
            for _ in range(opts.decode_iters):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(ids1, opts.context)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            row[b] = sorted(times)[len(times) // 2]
            del step, cache
            torch.cuda.empty_cache()
        greedy_generate(model, prompt[:16], 2)
        g = greedy_generate(model, prompt, opts.new_tokens)
        row["tps"], row["tokens"] = g.decode_tokens_per_s, g.tokens
        dec[label] = row
        log(f"decode {label}: {row[1]:.3f} ms (b1), {row[16]:.3f} ms (b16), {row['tps']:.1f} tokens/s")
    dd = dec["dense bf16, 2:4-masked"]
    for label, row in dec.items():
        same = sum(a == b for a, b in zip(row["tokens"], dd["tokens"]))
        lines.append(f"| {label} | {row[1]:.3f} | {dd[1] / row[1]:.2f}x | {row[16]:.3f} | {dd[16] / row[16]:.2f}x "
                     f"| {row['tps']:.1f} | {row['tps'] / dd['tps']:.2f}x | {same} of {len(dd['tokens'])} |")
    del models
    torch.cuda.empty_cache()
    return lines, notes, ok


# --------------------------------------------------------------------------- (vi) and the CPU checks


def generate_tool_check(device_note: str) -> list[str]:
    """Write a small exported 2:4 directory with the sample tokenizer; run tools/generate.py on it."""
    import importlib.util

    import sentencepiece

    from megatron_ext.checkpoint import save_hf_checkpoint

    tok_dir = os.path.join(REPO, "examples", "data")
    vocab = sentencepiece.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model")).vocab_size()
    cfg = get_config("tiny", **TINY_OVERRIDES).replace(vocab_size=vocab)
    sd = {k: v.cpu() for k, v in random_hf_state_dict(cfg, torch.device("cpu"), seed=3).items()}
    with tempfile.TemporaryDirectory() as tmp:
        out = save_hf_checkpoint(os.path.join(tmp, "hf"), cfg, sd, dtype="fp16", tokenizer_dir=tok_dir)
        spec = importlib.util.spec_from_file_location("tool_generate", os.path.join(REPO, "tools", "generate.py"))
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = tool.main(["--load", str(out), "--prompt", "To be, or not to be", "--max-new-tokens", "12",
                            "--kernel-table", os.path.join(tmp, "table.json")])
    text = buf.getvalue().strip().splitlines()
    if rc != 0:
        raise AssertionError(f"tools/generate.py returned {rc}")
    return [f"- tools/generate.py on a small exported 2:4 directory ({device_note}), its output:", "", "```"] + \
        text + ["```"]


def cpu_checks() -> list[str]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for o, i in ((768, 256), (256, 512)):
        w = torch.randn(o, i, generator=gen).to(torch.bfloat16)
        w = w * magnitude_2of4_mask(w)
        values, meta = pack_2of4(w)
        if not torch.equal(unpack_2of4(values, meta), w):
            raise AssertionError(f"[{o}, {i}]: the 2:4 layout does not round-trip")
        out.append(f"- W [{o}, {i}]: 2:4 pack/unpack round trip: ok ({values.numel() * 2 + meta.numel()} bytes "
                   f"for {w.numel() * 2})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4096,16,1", help="rows of x in the single-linear timings")
    p.add_argument("--prefill", type=int, default=4096, help="prefill tokens of the end-to-end run")
    p.add_argument("--context", type=int, default=512, help="cache length of the decode timings")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens of the timed greedy generation")
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--layers", type=int, help="layers of the end-to-end model (default: all)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--prefill-warmup", type=int, default=2)
    p.add_argument("--prefill-iters", type=int, default=10)
    p.add_argument("--decode-iters", type=int, default=50)
    p.add_argument("--skip-linears", action="store_true")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--out", help="also write the tables to this file")
    p.add_argument("--tiny", action="store_true", help="small shapes; on a CPU only the checks that need no CUDA")
    opts = p.parse_args(argv)
    cfg = get_config(opts.model, **({"num_layers": opts.layers} if opts.layers else {}))
    tokens = [int(t) for t in opts.tokens.split(",")]
    if opts.tiny:
        cfg = get_config("tiny", **TINY_OVERRIDES)
        tokens, opts.prefill, opts.context = [64, 16, 1], 128, 64
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, opts.prefill, opts.context + 64))

    if not sparse_kernels_available():
        if not opts.tiny:
            p.error("needs a CUDA GPU with cuSPARSELt (--tiny checks the rest on a CPU)")
        lines = cpu_checks() + generate_tool_check("CPU: dense masked weights")
        lines.append("- needs CUDA: the sparse kernels and the timings were skipped (the CPU checks above passed)")
        emit("\n".join(["## 2:4 sparse inference (bench_sparse_infer_gpu.py), CPU checks", ""] + lines), opts.out)
        return 0

    lines = ["## 2:4 sparse inference against dense bf16 (bench_sparse_infer_gpu.py)", ""] + environment()
    lines.append(f"- cuSPARSELt {torch.backends.cusparselt.version()}")
    shapes = fused_shapes(cfg)
    if not opts.skip_linears:
        lines += ["", f"Single linears, y = x W^T, x [tokens, in] bf16. Eager: mean of {opts.iters} back-to-back "
                      f"calls after {opts.warmup} (one weight, which may stay in L2); graph: median replay of at "
                      "least 10 calls captured in a CUDA graph, cycling through copies of the weight that span twice "
                      "the L2 cache (each call reads its weight from memory, as a model's forward does). "
                      "Columns 6-10 and 12: dense / variant speed-up in that mode (the Triton decode kernel, which "
                      f"reads cuSPARSELt's compressed buffer, up to {GEMV_MAX_TOKENS} tokens: its fastest tile "
                      "configuration):", ""]
        try:
            lines += bench_linears(shapes, tokens, opts)
        except Exception:  # noqa: BLE001 - report and go on to the model
            lines.append("linears failed: " + traceback.format_exc())
            log(lines[-1])
    t0 = time.perf_counter()
    table = measure_table(shapes.values(), sorted(set(DEFAULT_TOKEN_COUNTS) | set(tokens) | {opts.prefill}),
                          cache=None, log=log)
    lines += ["", f"Kernel table measured at load ({time.perf_counter() - t0:.1f} s; GPU time from CUDA graphs):",
              ""] + table.rows()
    ok = True
    if not opts.skip_model:
        try:
            table_lines, notes, ok = bench_model(cfg, opts, table)
            lines += [""] + table_lines + [""] + notes
        except Exception:  # noqa: BLE001 - report and go on to the tool check
            ok = False
            lines.append("model failed: " + traceback.format_exc())
            log(lines[-1])
    emit("\n".join(lines), opts.out, echo=False)  # the tables so far are kept if the tool check is cut short
    lines += [""] + generate_tool_check("GPU")
    emit("\n".join(lines), opts.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
