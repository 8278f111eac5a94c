"""The Gumbel N:M mask against the matmul it feeds, per llama2-7b linear layer.

For each layer shape (qkv 12288x4096, proj 4096x4096, fc1 22016x4096, fc2 4096x11008; bf16
weights, fp32 logits) and sequence length (2048, 4096; micro-batch 1):

* the layer's matmul forward + backward: ``x @ W^T``, dgrad ``dy @ W``, wgrad ``dy^T @ x``;
* ``weight * mask`` forward + backward (the logits' gradient) through
  (a) ``reference``: the plain PyTorch ``gumbel_soft_mask`` and a multiply (autograd, eager noise),
  (b) ``lean``: ``masked_weight`` on the PyTorch ops (the CPU's implementation, eager noise),
  (c) ``fused``: ``masked_weight`` on the Triton kernels (the GPU's); also each kernel alone,
      the backward adding into an fp32 buffer (``main_grad``), and what a micro-batch pays in
      training, where the layers draw once and run the mask backward once per step: adding
      its ``dL/d(W * mask)`` (bf16) into the step's fp32 sum, plus the step's forward and
      backward shared by ``--micro-batches``;
* each as a ratio to the matmul; memory per weight held from the forward to the backward and
  the peak of forward + backward (``torch.cuda.max_memory_allocated`` deltas); and the fused
  results against the reference on the device: noise bits, max |diff| of the masked weight,
  relative error of the logits' gradient.

    python benchmarks/bench_mask_kernel.py                 # GPU: markdown tables
    python benchmarks/bench_mask_kernel.py --tiny          # CPU check of the script (Triton interpreter)

Times are medians of ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) on
the GPU, of ``time.perf_counter`` on the CPU.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

if "--tiny" in sys.argv:  # the kernels run on the CPU through Triton's interpreter; set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_ext import platform  # noqa: E402
from megatron_ext.sparsity import fused_mask, gumbel  # noqa: E402
from megatron_ext.sparsity.nm import candidates  # noqa: E402

LAYERS = {  # llama2-7b linear layers at TP 1: [out, in]
    "qkv": (12288, 4096),
    "proj": (4096, 4096),
    "fc1": (22016, 4096),
    "fc2": (4096, 11008),
}
TINY_LAYERS = {"qkv": (12, 32), "proj": (8, 32), "fc1": (22, 32), "fc2": (8, 44)}
TAU, KAPPA = 4.0, 100.0


def _timer(args):
    if platform.has_cuda():
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")

    def cpu(fn):
        fn()
        times = []
        for _ in range(args.cpu_reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    return cpu


def _clear():
    gc.collect()
    if platform.has_cuda():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _memory(forward, backward):
    """(bytes held from forward to backward, peak bytes of forward + backward) over the baseline."""
    if not platform.has_cuda():
        return float("nan"), float("nan")
    _clear()
    base = torch.cuda.memory_allocated()
    out = forward()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    backward(out)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return held, peak


class Layer:
    """One layer's tensors: weight, logits, the upstream gradient of weight * mask, inputs."""

    def __init__(self, out_f: int, in_f: int, n: int, m: int, dev):
        gen = torch.Generator(device=dev).manual_seed(0)
        self.cands = candidates(n, m, device=dev)
        self.weight = torch.randn(out_f, in_f, device=dev, generator=gen).to(torch.bfloat16)
        groups = in_f // m
        self.logits = (torch.randn(out_f, groups, self.cands.shape[0], device=dev, generator=gen) * 0.01)
        self.logits.requires_grad_()
        self.upstream = torch.randn(out_f, in_f, device=dev, generator=gen).to(torch.bfloat16)
        self.index = gumbel.GroupIndex(torch.arange(out_f, device=dev), torch.arange(groups, device=dev), groups)
        self.key = gumbel.noise_key(1234, 7, 3)
        self.buffer = torch.zeros(self.logits.shape, dtype=torch.float32, device=dev)
        self.grad_sum = torch.zeros(self.weight.shape, dtype=torch.float32, device=dev)  # the step's fp32 sum

    def draw(self, kernel=None):
        return (self.cands, TAU, KAPPA, self.key, self.index, False, kernel)

    def reference(self):
        mask = gumbel.gumbel_soft_mask(self.logits, self.cands, TAU, KAPPA, self.key, self.index)
        return self.weight * mask.reshape(self.weight.shape).to(self.weight.dtype)

    def lean(self):
        return gumbel.masked_weight(self.weight, self.logits, *self.draw(kernel=False))

    def fused(self):
        return gumbel.masked_weight(self.weight, self.logits, *self.draw(kernel=True))

    def backward(self, out):
        self.logits.grad = None
        out.backward(self.upstream)

    def kernel_args(self):
        i = self.index
        return (self.weight, self.logits.detach(), self.cands, i.rows, i.cols, i.groups_per_row, self.key, TAU, KAPPA,
                False)


def _matmul_ms(out_f, in_f, seq, dev, timer):
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(seq, in_f, device=dev, generator=gen).to(torch.bfloat16)
    w = torch.randn(out_f, in_f, device=dev, generator=gen).to(torch.bfloat16)
    dy = torch.randn(seq, out_f, device=dev, generator=gen).to(torch.bfloat16)

    def fwd_bwd():
        x @ w.t()      # forward
        dy @ w         # dgrad
        dy.t() @ x     # wgrad

    return timer(fwd_bwd)


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _times(layer: Layer, args, timer, have_kernels: bool) -> dict:
    times = {"reference": timer(lambda: layer.backward(layer.reference())),
             "lean": timer(lambda: layer.backward(layer.lean()))}
    if not have_kernels:
        return times
    times["fused"] = timer(lambda: layer.backward(layer.fused()))
    kargs = layer.kernel_args()
    for prefix, fast in (("", False), ("fast ", True)):
        if fast and not platform.has_cuda():  # the approximate outer log needs the GPU's libdevice
            continue
        tune = dict(block=args.block, num_warps=args.num_warps, fast_log=fast)
        times[prefix + "fwd"] = timer(lambda: fused_mask.forward(*kargs, **tune))
        times[prefix + "bwd"] = timer(lambda: fused_mask.backward(layer.upstream, *kargs, **tune))
        times[prefix + "bwd+="] = timer(lambda: fused_mask.backward(layer.upstream, *kargs, grad_logits=layer.buffer,
                                                                    **tune))
        times[prefix + "sum bwd+="] = timer(lambda: fused_mask.backward(layer.grad_sum, *kargs,
                                                                        grad_logits=layer.buffer, **tune))
    times["acc"] = timer(lambda: layer.grad_sum.add_(layer.upstream))
    return times


def _checks(layer: Layer) -> str:
    """Fused against the reference on this device: noise, masked weight, logits' gradient."""
    i, num_cands = layer.index, layer.cands.shape[0]
    bits = torch.equal(fused_mask.noise(layer.key, i.rows, i.cols, i.groups_per_row, num_cands, bits=True),
                       gumbel.hash_bits(layer.key, i.flat(), num_cands))
    eager = gumbel.gumbel_noise(layer.key, i, i.shape, num_cands)
    noise = [(fused_mask.noise(layer.key, i.rows, i.cols, i.groups_per_row, num_cands, fast_log=fast) - eager)
             .abs().max().item() for fast in ((False, True) if platform.has_cuda() else (False,))]
    grads = {}
    for label, fn in (("reference", layer.reference), ("lean", layer.lean), ("fused", layer.fused)):
        out = fn()
        layer.backward(out)
        grads[label] = (out.detach(), layer.logits.grad.detach().clone())
        del out
    diff = (grads["fused"][0].float() - grads["reference"][0].float()).abs().max().item()
    rel_ref = _rel(grads["fused"][1], grads["reference"][1])
    rel_lean = _rel(grads["fused"][1], grads["lean"][1])
    return (f"| {'yes' if bits else 'NO'} | {' / '.join(f'{x:.2g}' for x in noise)} | {diff:.3g} "
            f"| {rel_ref:.2e} / {rel_lean:.2e} |")


def bench(args) -> None:
    dev = platform.device()
    timer = _timer(args)
    shapes = {k: v for k, v in (TINY_LAYERS if args.tiny else LAYERS).items() if k in args.layers}
    have_kernels = fused_mask.available() and (platform.has_cuda() or fused_mask.interpreted())
    name = torch.cuda.get_device_name() if platform.has_cuda() else "cpu"
    versions = f"torch {torch.__version__}"
    if fused_mask.available():
        versions += f", triton {fused_mask.triton.__version__}"
    print(f"\n{name} ({versions}), {args.n}:{args.m}, bf16 weights, fp32 logits, tau {TAU}, kappa {KAPPA}; "
          f"times in ms (ratio to the layer's matmul forward+backward)\n")
    print("| layer | seq | matmul fwd+bwd | (a) reference | (b) lean | (c) fused fwd+bwd | fused fwd | fused bwd "
          "| fused bwd into buffer | per micro-batch, step cache | per micro-batch, one mask backward per step "
          "| fast_log: fwd / bwd into buffer / per micro-batch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lname, (out_f, in_f) in shapes.items():
        layer = Layer(out_f, in_f, args.n, args.m, dev)
        times = _times(layer, args, timer, have_kernels)
        del layer
        _clear()
        for seq in args.seq:
            mm = _matmul_ms(out_f, in_f, seq, dev, timer)

            def cell(key):
                return f"{times[key]:.3f} ({times[key] / mm:.2f}x)" if key in times else "n/a"

            def per_mb(prefix):
                if prefix + "fwd" not in times:
                    return "n/a"
                ms = times[prefix + "bwd+="] + times[prefix + "fwd"] / args.micro_batches
                return f"{ms:.3f} ({ms / mm:.2f}x)"

            def deferred():
                if "sum bwd+=" not in times:
                    return "n/a"
                ms = times["acc"] + (times["fwd"] + times["sum bwd+="]) / args.micro_batches
                return f"{ms:.3f} ({ms / mm:.2f}x)"

            print(f"| {lname} {out_f}x{in_f} | {seq} | {mm:.3f} | {cell('reference')} | {cell('lean')} "
                  f"| {cell('fused')} | {cell('fwd')} | {cell('bwd')} | {cell('bwd+=')} | {per_mb('')} | {deferred()} "
                  f"| {cell('fast fwd')} / {cell('fast bwd+=')} / {per_mb('fast ')} |", flush=True)
    print(f"\nper micro-batch, step cache: fused backward into the buffer + the forward shared by "
          f"{args.micro_batches} micro-batches (--micro-batches); one mask backward per step: the bf16 "
          f"gradient added into the step's fp32 sum + (forward + backward from the fp32 sum) / "
          f"{args.micro_batches}\n")

    print("| layer | held fwd->bwd B/weight: ref / lean / fused | peak fwd+bwd B/weight: ref / lean / fused "
          "| noise bits equal | max abs diff noise: fused / fast_log | max abs diff masked weight "
          "| rel err grad logits vs ref / vs lean |")
    print("|---|---|---|---|---|---|---|")
    for lname, (out_f, in_f) in shapes.items():
        layer = Layer(out_f, in_f, args.n, args.m, dev)
        numel = layer.weight.numel()
        paths = (layer.reference, layer.lean) + ((layer.fused,) if have_kernels else ())
        mem = [_memory(fn, layer.backward) for fn in paths]
        held = " / ".join(f"{h / numel:.2f}" for h, _ in mem)
        peak = " / ".join(f"{p / numel:.2f}" for _, p in mem)
        tail = _checks(layer) if have_kernels else "| n/a | n/a | n/a | n/a |"
        print(f"| {lname} {out_f}x{in_f} | {held} | {peak} {tail}", flush=True)
        del layer
        _clear()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, kernels in Triton's interpreter")
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--m", type=int, default=4)
    p.add_argument("--micro-batches", type=int, default=8, help="micro-batches sharing one step's forward")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=200)
    p.add_argument("--cpu-reps", type=int, default=2)
    p.add_argument("--block", type=int, default=None, help="groups per program of the fused kernels (power of two)")
    p.add_argument("--num-warps", type=int, default=None, help="warps per program of the fused kernels")
    args = p.parse_args(argv)
    if args.tiny:
        args.seq = [16, 32]
    if args.micro_batches < 1:
        p.error("--micro-batches must be >= 1")
    bench(args)


if __name__ == "__main__":
    main()
