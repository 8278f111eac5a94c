"""Cost of learnable N:M masks: time and memory of the Gumbel mask and of a mask-only training step.

Part 1, one layer: ``weight * mask`` forward + backward for a LLaMA-shaped weight
(default: llama2-7b's fc1, 22016 x 4096, bf16, fp32 logits), through

* ``reference``: the plain PyTorch ``gumbel_soft_mask`` (autograd keeps noise, softmax, mask);
* ``torch ops``: ``masked_weight`` on PyTorch ops (keeps weight and logits, recomputes the
  noise in the backward; the CPU's implementation);
* ``kernels``: ``masked_weight`` on the Triton kernels (the GPU's implementation);

and the noise alone.

Part 2, a model: one training step (forward, backward, ``finish_mask_backward``) of a few
llama2-7b layers at sequence 4096, micro-batch 1, bf16: the dense model (all weights train)
against the sparse model in mask-only mode on the device's path, on the PyTorch ops and on
the reference masks (``mask_impl``).

    python benchmarks/bench_sparse_gpu.py             # GPU
    python benchmarks/bench_sparse_gpu.py --tiny      # CPU check of the script

Prints markdown tables.
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
from megatron_ext.sparsity import build_sparse_model, finish_mask_backward, gumbel, masked_linears  # noqa: E402
from megatron_ext.sparsity.nm import candidates  # noqa: E402


def _reset_memory():
    gc.collect()
    if platform.has_cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(base: int = 0) -> float:
    if not platform.has_cuda():
        return float("nan")
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _timed(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    platform.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    platform.synchronize()
    return (time.perf_counter() - t) / iters


def bench_mask(args, dev_name: str) -> None:
    dev = platform.device()
    out_f, in_f = args.out_features, args.in_features
    n, m = args.n, args.m
    cands = candidates(n, m, device=dev)
    weight = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16)
    logits = (torch.randn(out_f, in_f // m, cands.shape[0], device=dev) * 0.01).requires_grad_()
    index = gumbel.GroupIndex(torch.arange(out_f, device=dev), torch.arange(in_f // m, device=dev), in_f // m)
    key = gumbel.noise_key(1, 0, 0)
    upstream = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16)
    tau, kappa = 4.0, 100.0

    def reference():
        mask = gumbel.gumbel_soft_mask(logits, cands, tau, kappa, key, index).reshape(out_f, in_f)
        return weight * mask.to(weight.dtype)

    def ops(kernel):
        return lambda: gumbel.masked_weight(weight, logits, cands, tau, kappa, key, index, kernel=kernel)

    shape = logits.shape[:-1]
    paths = [("reference (autograd)", reference), ("torch ops (recompute noise)", ops(False))]
    if gumbel.use_kernels(weight, logits, index):
        paths.append(("kernels (recompute noise)", ops(True)))
    print(f"\n{dev_name}: weight {out_f} x {in_f} bf16, {n}:{m} ({cands.shape[0]} candidates), "
          f"logits fp32 {logits.numel() * 4 / 2**30:.2f} GiB\n")
    print("| device | op | weight | ms fwd+bwd | extra peak GiB (fwd+bwd) | kept for backward GiB |")
    print("|---|---|---|---|---|---|")
    for name, fn in paths:
        def step():
            logits.grad = None
            fn().backward(upstream)

        _reset_memory()
        base = torch.cuda.memory_allocated() if platform.has_cuda() else 0
        out = fn()
        kept = (torch.cuda.memory_allocated() - base) / 2**30 if platform.has_cuda() else float("nan")
        del out
        _reset_memory()
        base = torch.cuda.memory_allocated() if platform.has_cuda() else 0
        dt = _timed(step, args.warmup, args.iters)
        print(f"| {dev_name} | {name} | {out_f}x{in_f} | {dt * 1e3:.1f} | {_peak_gib(base):.2f} | {kept:.2f} |",
              flush=True)
    _reset_memory()
    dt = _timed(lambda: gumbel.gumbel_noise(key, index, shape, cands.shape[0], dev), args.warmup, args.iters)
    print(f"| {dev_name} | noise only (PyTorch ops) | {out_f}x{in_f} | {dt * 1e3:.2f} | | |", flush=True)


def bench_model(args, dev_name: str) -> None:
    cfg = get_config(args.config, num_layers=args.layers, max_position_embeddings=max(args.seq, 128))
    gen = torch.Generator().manual_seed(2)
    data = torch.randint(0, cfg.vocab_size, (args.micro_batch, args.seq + 1), generator=gen)
    tokens, labels = data[:, :-1], data[:, 1:]
    print(f"\n{cfg.name} x{cfg.num_layers} layers, seq {args.seq}, micro-batch {args.micro_batch}, bf16, "
          f"{args.n}:{args.m}\n")
    print("| device | model | training | ms/iter | tokens/s | peak mem GiB | loss |")
    print("|---|---|---|---|---|---|---|")
    variants = ["dense", None, "torch", "reference"] if platform.has_cuda() else ["dense", None, "reference"]
    for variant in variants:
        _reset_memory()
        platform.seed_everything(1)
        if variant == "dense":
            model = build_model(cfg, params_dtype=torch.bfloat16)
            what = "all weights"
        else:
            model = build_sparse_model(cfg, args.n, args.m, torch.bfloat16, mask_only=True)
            model.sparsity_state.update(10, 100)
            for _, layer in masked_linears(model):
                layer.mask_impl = variant
            what = {None: "mask-only, the device's path", "torch": "mask-only, PyTorch ops",
                    "reference": "mask-only, reference masks"}[variant]

        def step():
            model.zero_grad(set_to_none=True)
            loss = lm_loss(model, tokens, labels)
            loss.backward()
            if variant != "dense":
                finish_mask_backward(model)
            return loss

        try:
            loss = step().item()
            dt = _timed(step, args.warmup - 1, args.iters)
        except torch.OutOfMemoryError:
            print(f"| {dev_name} | {cfg.name} x{cfg.num_layers}L | {what} | out of memory | | | |", flush=True)
            del model
            continue
        tok = args.micro_batch * args.seq
        print(f"| {dev_name} | {cfg.name} x{cfg.num_layers}L | {what} | {dt * 1e3:.1f} | {tok / dt:,.0f} "
              f"| {_peak_gib():.2f} | {loss:.4f} |", flush=True)
        del model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small shapes on the CPU (script check)")
    p.add_argument("--config", default="llama2-7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--out-features", type=int, default=22016)
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--skip-model", action="store_true")
    args = p.parse_args(argv)
    if args.tiny:
        args.config, args.layers, args.seq = "tiny", 2, 128
        args.out_features, args.in_features = 256, 128
        args.warmup, args.iters = 2, 3
    if args.warmup < 1 or args.iters < 1:
        p.error("--warmup and --iters must be >= 1")
    platform.init_distributed(1)
    dev_name = torch.cuda.get_device_name() if platform.has_cuda() else "cpu"
    bench_mask(args, dev_name)
    if not args.skip_model:
        bench_model(args, dev_name)
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
