"""Forward+backward throughput and MFU of our LLaMA spec against megatron-core's local spec.

Default: a 4-layer LLaMA-2-7B-shaped model, sequence 4096, micro-batch 1, bf16, one
GPU, no TransformerEngine or apex. Both specs run in the same process on identical
weights (same seed), so their rows compare directly. ``--tiny`` runs a tiny shape on
the CPU to check the script end to end.

FLOPs per iteration (forward + backward) follow the usual count
``6 * N * T + 12 * L * h * s * T`` with ``T`` tokens, ``N`` the parameters that take
part in matrix products (layers + output projection; not the embedding lookup) and
the second term the attention score/context products (counted without the causal
saving). MFU divides the achieved FLOP/s by a bf16 matrix product's FLOP/s measured
in the same run.

    python benchmarks/bench_model_gpu.py              # GPU
    python benchmarks/bench_model_gpu.py --tiny       # CPU check

Prints a markdown table.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_ext import platform  # noqa: E402
from megatron_ext.models import build_model, get_config  # noqa: E402
from megatron_ext.models.build import lm_loss  # noqa: E402
from megatron_ext.models.spec import megatron_local_layer_spec  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def matmul_tflops(n: int, dtype: torch.dtype, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product on this device (mean of ``reps`` after warm-up)."""
    dev = platform.device()
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    platform.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    platform.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def matmul_params(cfg) -> int:
    """Parameters used in matrix products: all but the input embedding lookup."""
    h, d = cfg.hidden_size, cfg.head_dim
    layer = ((cfg.num_attention_heads + 2 * cfg.num_query_groups) * d * h + cfg.num_attention_heads * d * h
             + 3 * cfg.ffn_hidden_size * h)
    return cfg.num_layers * layer + cfg.vocab_size * h


def run_spec(name: str, cfg, args, dtype) -> dict:
    gc.collect()
    if platform.has_cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    platform.seed_everything(1)
    spec = megatron_local_layer_spec() if name == "local" else None
    model = build_model(cfg, params_dtype=dtype, layer_spec=spec)
    mask = platform.causal_attention_mask(args.seq) if name == "local" else None
    gen = torch.Generator().manual_seed(2)
    data = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1), generator=gen)
    tokens, labels = data[:, :-1], data[:, 1:]

    def step():
        model.zero_grad(set_to_none=True)
        loss = lm_loss(model, tokens, labels, attention_mask=mask)
        loss.backward()
        return loss

    first = step().item()
    for _ in range(args.warmup - 1):
        step()
    platform.synchronize()
    t = time.perf_counter()
    for _ in range(args.iters):
        step()
    platform.synchronize()
    dt = (time.perf_counter() - t) / args.iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if platform.has_cuda() else float("nan")
    del model
    return {"spec": name, "s_per_iter": dt, "loss": first, "peak_gib": peak}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shape on the CPU (script check)")
    p.add_argument("--config", default="llama2-7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--specs", default="sdpa,local", help="comma list of: sdpa (ours), local (megatron-core)")
    p.add_argument("--matmul-n", type=int, default=8192)
    args = p.parse_args(argv)
    if args.tiny:
        args.config, args.layers, args.seq, args.matmul_n = "tiny", 2, 128, 512
        args.warmup, args.iters = min(args.warmup, 2), min(args.iters, 3)
    specs = [s.strip() for s in args.specs.split(",") if s.strip()]
    bad = [s for s in specs if s not in ("sdpa", "local")]
    if bad or args.warmup < 1 or args.iters < 1:
        p.error(f"--specs takes sdpa and/or local (got {bad}); --warmup and --iters must be >= 1")

    dtype = DTYPES[args.dtype]
    platform.init_distributed(1)
    cfg = get_config(args.config, num_layers=args.layers, max_position_embeddings=max(args.seq, 128))
    peak = matmul_tflops(args.matmul_n, dtype)
    tokens = args.micro_batch * args.seq
    flops = 6 * matmul_params(cfg) * tokens + 12 * cfg.num_layers * cfg.hidden_size * args.seq * tokens
    dev = torch.cuda.get_device_name() if platform.has_cuda() else "cpu"

    print(f"\n{dev}: {args.dtype} matmul {args.matmul_n}^3 = {peak:.3g} TFLOP/s (MFU denominator); "
          f"{cfg.name} x{cfg.num_layers} layers, seq {args.seq}, micro-batch {args.micro_batch}, "
          f"{flops / 1e12:.3g} TFLOP per fwd+bwd\n")
    print("| device | model | attention | seq | mb | dtype | ms/iter | tokens/s | TFLOP/s | MFU | peak mem GiB | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in specs:
        label = "ours (SDPA)" if name == "sdpa" else "megatron-core local"
        try:
            r = run_spec(name, cfg, args, dtype)
        except torch.OutOfMemoryError:
            print(f"| {dev} | {cfg.name} x{cfg.num_layers}L | {label} | {args.seq} | {args.micro_batch} "
                  f"| {args.dtype} | out of memory | | | | | |", flush=True)
            continue
        achieved = flops / r["s_per_iter"] / 1e12
        print(f"| {dev} | {cfg.name} x{cfg.num_layers}L | {label} | {args.seq} | {args.micro_batch} | {args.dtype} "
              f"| {r['s_per_iter'] * 1e3:.1f} | {tokens / r['s_per_iter']:,.0f} | {achieved:.3g} "
              f"| {achieved / peak:.1%} | {r['peak_gib']:.2f} | {r['loss']:.4f} |", flush=True)
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
