"""Training throughput, MFU and peak memory per GPU: dense and MaskLLM 2:4 mask-only training of
LLaMA-2-7B shapes through our trainer.

Cases, each at every ``--seqs`` length, micro-batch ``--mbs`` (1), global batch ``--gbs`` (8
micro-batches), bf16, on a ``.bin/.idx`` dataset:

* ``dense``: megatron-core ``GPTModel`` with stock linears, all weights train (fp32 AdamW);
* ``mask-only``: 2:4 masked linears, only the mask logits train (``--mask-only``);

both through ``megatron_ext.training.Run`` (data, micro-batches, fp32 gradient buffer, clipping,
AdamW, schedules), ``--tp``-way tensor parallel, ``--num-layers`` layers (default 4);

* ``proxy-dense``, ``proxy-mask-only`` (one process only): the "TP4 rank proxy", a TP1 model
  whose every weight has the shape of one rank's shard of the full model at TP ``--proxy-tp``
  (llama2-7b at TP4: hidden 4096, 8 heads of 128, 8 query groups, ffn 2752, all 32 layers:
  qkv [3072, 4096], proj [4096, 1024], fc1 [5504, 4096], fc2 [4096, 2752]). Its peak memory is
  what one GPU of a TP4 run holds, plus the whole rather than a quarter of the vocabulary
  embedding and output layer (slightly more) and without communication buffers. The trainer
  cannot build it from flags (its head dim is not hidden / heads): both go through
  ``Run(model_factory=...)``, the MaskLLM plug-in handing the factory its masked linears, so
  the run is the trainer's own (``Run.train_step``).

``--mbs 1,4`` runs every case at each micro-batch size (dense and mask-only side by side, with
their ratio); ``--profile`` adds a torch.profiler breakdown of a step (kernel categories,
trainer phases, GPU idle time) and, without the profiler, each phase of a step timed with the
GPU synchronized around it (every forward and backward, the optimizer's and plug-ins' calls).

Model FLOPs per iteration and GPU: ``6 * N * T + 12 * L * a * s * T``, with ``N`` the weights
that enter matrix products on this GPU (q/k/v, o, gate/up, down and the output layer, counted
from the shapes; not the embedding lookup), ``T`` the tokens this GPU's model replica processes
per iteration (global batch / DP x seq), ``L`` layers, ``a`` the attention width on this GPU
(heads / TP x head dim) and ``s`` the sequence length (attention counted without the causal
saving). Dense and mask-only count the same FLOPs: the mask work is overhead. MFU divides by
``--peak-tflops`` (default: H100 SXM dense bf16); an 8192^3 bf16 matmul is measured for reference.

    python benchmarks/bench_train_gpu.py --data-path PREFIX --tokenizer-model TOKENIZER   # one GPU
    torchrun --nproc_per_node 4 benchmarks/bench_train_gpu.py --tp 4 --num-layers 32 \\
        --data-path PREFIX --tokenizer-model TOKENIZER                                     # TP4
    python benchmarks/bench_train_gpu.py --cases proxy-dense,proxy-mask-only --seqs 2048 --mbs 1,4 --gbs 64 \\
        --profile --data-path PREFIX --tokenizer-model TOKENIZER                           # the TP4 rank proxy
    python benchmarks/bench_train_gpu.py --tiny                                            # CPU check

Prints one markdown table (also written to ``--out``). An out-of-memory case is reported as
OOM and the others go on; any other failure is reported and the exit status is 1.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_common import (MASK_ONLY_FLAGS, emit, environment, memory_gib, reset_memory, tiny_data,  # noqa: E402
                          timed_steps, trainer_argv)
from bench_model_gpu import matmul_tflops  # noqa: E402
from megatron_ext import platform  # noqa: E402
from megatron_ext.models import get_config  # noqa: E402
from megatron_ext.models.build import build_model  # noqa: E402
from megatron_ext.sparsity.plugin import MaskLLM  # noqa: E402
from megatron_ext.training import Run, parse_args  # noqa: E402

H100_SXM_BF16_DENSE_TFLOPS = 989.4
CASES = ("dense", "mask-only", "proxy-dense", "proxy-mask-only")
PLUGINS = (MaskLLM,)


def proxy_shapes(cfg, proxy_tp: int):
    """(config, megatron overrides) of the TP-rank proxy: heads, query groups and FFN width
    divided by ``proxy_tp``, the head dim (``kv_channels``) kept, which the trainer's flags
    cannot express."""
    cfg.validate_tp(proxy_tp)
    shard = cfg.replace(num_attention_heads=cfg.num_attention_heads // proxy_tp,
                        num_query_groups=cfg.num_query_groups // proxy_tp,
                        ffn_hidden_size=cfg.ffn_hidden_size // proxy_tp)
    return shard, {"kv_channels": cfg.head_dim}


def proxy_model_factory(proxy_tp: int):
    """The proxy through ``Run(model_factory=...)``: called as ``build_model`` is, with the
    MaskLLM plug-in's masked linears in ``linear_overrides`` for the mask-only case."""
    def build(cfg, dtype, **kwargs):
        shard, overrides = proxy_shapes(cfg, proxy_tp)
        return build_model(shard, dtype, config_overrides=overrides, **kwargs)
    return build


def build_run(args, case: str, proxy_tp: int) -> Run:
    """The trainer's ``Run`` for a case: the public API, a model factory for the proxy."""
    return Run(args, PLUGINS, model_factory=proxy_model_factory(proxy_tp) if case.startswith("proxy-") else None)


# --------------------------------------------------------------------------- FLOPs


def matmul_weights(model) -> int:
    """Weights entering matrix products on this rank: every Column/Row parallel linear
    (q/k/v, o, gate/up, down, the output layer); the embedding is a lookup."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    n = sum(m.weight.numel() for m in model.modules()
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)) and m.weight is not None)
    if model.share_embeddings_and_output_weights:
        n += model.embedding.word_embeddings.weight.numel()
    return n


def first_layer_shapes(model) -> str:
    """``qkv [out, in], ...`` of the first decoder layer's four linears."""
    layer = model.decoder.layers[0]
    linears = (("qkv", layer.self_attention.linear_qkv), ("proj", layer.self_attention.linear_proj),
               ("fc1", layer.mlp.linear_fc1), ("fc2", layer.mlp.linear_fc2))
    return ", ".join(f"{name} {list(m.weight.shape)}" for name, m in linears)


def flops_per_iteration(model, seq: int, tokens: int) -> float:
    """``6 N T + 12 L a s T`` for this rank (see the module docstring)."""
    c = model.config
    width = c.num_attention_heads * c.kv_channels // c.tensor_model_parallel_size
    return 6 * matmul_weights(model) * tokens + 12 * c.num_layers * width * seq * tokens


# --------------------------------------------------------------------------- cases


def _parse_value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def layer_settings(items) -> dict:
    """``--layer-attr NAME=VALUE`` pairs as a dict (VALUE: true/false/none/number/text)."""
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            raise SystemExit(f"--layer-attr {item!r}: expected NAME=VALUE")
        out[name] = _parse_value(value)
    return out


def apply_layer_settings(model, settings: dict) -> None:
    """Set attributes on every masked linear (e.g. a switch between mask implementations)."""
    if not settings:
        return
    from megatron_ext.sparsity import masked_linears

    for name, layer in masked_linears(model):
        for attr, value in settings.items():
            if not hasattr(layer, attr):
                raise ValueError(f"--layer-attr {attr}: masked linear {name} ({type(layer).__name__}) "
                                 f"has no attribute {attr!r}")
            setattr(layer, attr, value)


def case_layers(opts, case: str) -> int:
    layers = opts.proxy_num_layers if case.startswith("proxy-") else opts.num_layers
    return layers or get_config(opts.model).num_layers


def run_case(opts, case: str, seq: int, mbs: int) -> dict:
    """Build the case's run, time ``opts.iters`` trainer steps, return the measurements."""
    proxy = case.startswith("proxy-")
    extra = list(MASK_ONLY_FLAGS) if case.endswith("mask-only") else []
    reset_memory()
    flags = argparse.Namespace(**{**vars(opts), "num_layers": case_layers(opts, case), "mbs": mbs})
    args = parse_args(trainer_argv(flags, extra, seq=seq, tp=1 if proxy else opts.tp), PLUGINS)
    run = build_run(args, case, opts.proxy_tp)
    chosen = {}
    if mbs == "auto":
        # what the trainer chose and the probes it chose from; the peak counts training alone
        chosen = {"chosen_mbs": run.plan.stages[0].micro_batch_size,
                  "probes": {f"{m} x {s}": b for (s, m), b in sorted(run.micro_batch_probes.items())}}
        reset_memory()
    try:
        if case.endswith("mask-only"):
            apply_layer_settings(run.model, opts.layer_settings)
        sec, losses = timed_steps(lambda: run.train_step()["loss"], opts.iters, opts.warmup)
        o = run.config.optim
        tokens = o.global_batch_size // run.dinfo.dp_size * seq
        # GPUs sharing one model replica: a proxy stands for one of proxy_tp ranks
        gpus = run.dinfo.dp_size * (opts.proxy_tp if proxy else run.dinfo.tp_size)
        result = {"sec": sec, "losses": losses, "flops": flops_per_iteration(run.model, seq, tokens),
                  "shapes": first_layer_shapes(run.model),
                  "tokens_per_gpu": o.global_batch_size * seq / sec / gpus,
                  "peak": platform.max_over_ranks(memory_gib()),
                  "reserved": platform.max_over_ranks(torch.cuda.max_memory_reserved() / 2**30
                                              if platform.has_cuda() else float("nan")), **chosen}
        if opts.profile and case in opts.profile_cases and mbs == opts.mbs_list[0] and seq == min(opts.seq_list):
            opts.profile_tag = f"{case}-seq{seq}-mb{mbs}"
            try:
                result["profile"] = profile_steps(run, opts)
                result["profile"] += ["", *phase_times(run, opts.profile_steps), *synchronizing_calls(run)]
            except Exception as e:  # noqa: BLE001 - the timings stand without it
                traceback.print_exc()
                result["profile"] = [f"profile failed: {type(e).__name__}: {e}"]
        return result
    finally:
        run.close()
        del run


def case_label(case: str, opts) -> str:
    training = "2:4 mask-only" if case.endswith("mask-only") else "dense, all weights"
    if case.startswith("proxy-"):
        return f"TP{opts.proxy_tp} rank proxy (TP1), {training}"
    return f"TP{opts.tp}, {training}"


def _gib(x: float) -> str:
    return "n/a" if x != x else f"{x:.2f}"


def table_row(opts, case: str, seq: int, mbs: int, r: dict, dense: dict | None = None) -> str:
    """A table row; ``dense``: the dense case's result at the same model, length and micro-batch."""
    label = case_label(case, opts)
    if "chosen_mbs" in r:
        mbs = f"auto: {r['chosen_mbs']}"
    shard = f" TP{opts.proxy_tp}-rank shapes" if case.startswith("proxy-") else ""
    model = f"{opts.model}{shard} x{case_layers(opts, case)}L"
    if "error" in r:
        return f"| {label} | {model} | {seq} | {mbs} | {opts.gbs} | {r['error']} | | | | | | | |"
    achieved = r["flops"] / r["sec"] / 1e12
    ratio = (f"{r['tokens_per_gpu'] / dense['tokens_per_gpu']:.3f}"
             if case.endswith("mask-only") and dense and "error" not in dense else "")
    return (f"| {label} | {model} | {seq} | {mbs} | {opts.gbs} | {r['sec'] * 1e3:.1f} | {r['tokens_per_gpu']:,.0f} "
            f"| {ratio} | {achieved:.4g} | {achieved / opts.peak_tflops:.1%} | {_gib(r['peak'])} "
            f"| {_gib(r['reserved'])} | {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} |")


# --------------------------------------------------------------------------- profile

PROFILE_RANGES = (("optimizer", "step", "AdamW step (+ fp32 -> bf16 copy)"),
                  ("optimizer", "clip_gradients", "gradient norm + clipping"),
                  ("optimizer", "zero_grad", "zero gradient buffer"),
                  ("plugin", "after_backward", "MaskLLM after_backward (the step's mask backward)"),
                  ("plugin", "extra_loss", "MaskLLM extra_loss (regulariser)"))


def _kernel_category(name: str) -> str:
    low = name.lower()
    if name.startswith(("_forward_kernel", "_backward_kernel")):  # the Triton kernels of sparsity.fused_mask
        return "mask kernels (Triton)"
    if any(k in low for k in ("flash", "fmha", "attention", "sdpa", "attn")):
        return "attention"
    if any(k in low for k in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_")):
        return "GEMM"
    if any(k in low for k in ("multi_tensor", "adam", "foreach")):
        return "multi-tensor (optimizer, norms)"
    if any(k in low for k in ("nll", "log_softmax", "cross_entropy", "softmax")):
        return "softmax / loss"
    if "reduce" in low:
        return "reductions"
    return "elementwise / other"


def _device_time(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def _range_time(evt) -> float:
    for attr in ("device_time_total", "cuda_time_total"):
        if hasattr(evt, attr):
            return float(getattr(evt, attr))
    return 0.0


def trainer_calls(run) -> list[tuple]:
    """``(object, method name, label)`` of the optimizer's and plug-ins' calls in ``PROFILE_RANGES``."""
    return [(obj, attr, label) for owner, attr, label in PROFILE_RANGES
            for obj in ([run.optimizer] if owner == "optimizer" else list(run.plugins)) if hasattr(obj, attr)]


@contextlib.contextmanager
def wrapped_calls(targets, wrap):
    """Within the block, each ``(obj, attr, label)`` of ``targets`` calls ``wrap(original, label)``
    instead; afterwards every attribute is as it was (an instance's own, or none)."""
    saved = [(obj, attr, obj.__dict__.get(attr), getattr(obj, attr)) for obj, attr, _ in targets]
    try:
        for (obj, attr, label), (_, _, _, fn) in zip(targets, saved):
            setattr(obj, attr, wrap(fn, label))
        yield
    finally:
        for obj, attr, own, _ in saved:
            if own is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, own)


def profile_steps(run, opts) -> list[str]:
    """Where a step's GPU time goes (torch.profiler over ``--profile-steps`` trainer steps):
    kernel time by category, the trainer phases' GPU time, and the GPU's idle time (wall
    time minus the union of kernel intervals: launch gaps, host work, synchronisation)."""
    import time

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    def wrapped(fn, label):
        def call(*a, **k):
            with record_function(label):
                return fn(*a, **k)
        return call

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if platform.has_cuda() else [])
    with wrapped_calls(trainer_calls(run), wrapped):
        platform.synchronize()
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(opts.profile_steps):
                run.train_step()
            platform.synchronize()
            wall_us = (time.perf_counter() - start) * 1e6
    if opts.profile_dir:
        os.makedirs(opts.profile_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(opts.profile_dir, f"trace-{opts.profile_tag}.json"))
    # GPU-side ranges of record_function annotations (ours, and torch's "Optimizer.step#...")
    # span the kernels inside them: counting them as kernels would count those twice and hide
    # the idle time between them
    annotations = {r[2] for r in PROFILE_RANGES}

    def is_kernel(e) -> bool:
        name = getattr(e, "name", None) or e.key
        return (getattr(e, "device_type", None) == DeviceType.CUDA and name not in annotations
                and not name.startswith(("Optimizer.", "ProfilerStep")))

    kernels = [e for e in prof.events() if is_kernel(e)]
    if opts.profile_dir:  # every kernel's time and launches per step, for comparing two cases' kernels
        per_name: dict[str, list] = {}
        for e in kernels:
            slot = per_name.setdefault(e.name, [0.0, 0])
            slot[0] += e.time_range.elapsed_us() / opts.profile_steps
            slot[1] += 1 / opts.profile_steps
        with open(os.path.join(opts.profile_dir, f"kernels-{opts.profile_tag}.json"), "w") as f:
            json.dump({k: {"us_per_step": v[0], "launches_per_step": v[1]} for k, v in per_name.items()}, f,
                      indent=1, sort_keys=True)
    by_cat: dict[str, float] = {}
    for e in kernels:
        by_cat[_kernel_category(e.name)] = by_cat.get(_kernel_category(e.name), 0.0) + e.time_range.elapsed_us()
    intervals = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, cur_s, cur_e = 0.0, None, None
    for s0, e0 in intervals:
        if cur_e is None or s0 > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s0, e0
        else:
            cur_e = max(cur_e, e0)
    if cur_e is not None:
        busy += cur_e - cur_s
    steps = opts.profile_steps
    lines = ["| kernel category | GPU ms / step | share of wall time |", "|---|---|---|"]
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cat} | {us / 1e3 / steps:.1f} | {us / wall_us:.1%} |")
    lines.append(f"| GPU idle (launch gaps, host work, sync): wall - union of kernels | "
                 f"{(wall_us - busy) / 1e3 / steps:.1f} | {(wall_us - busy) / wall_us:.1%} |")
    lines.append(f"| wall time | {wall_us / 1e3 / steps:.1f} | 100% |")
    ranges = {e.key: _range_time(e) for e in prof.key_averages() if e.key in {r[2] for r in PROFILE_RANGES}}
    if ranges:
        lines += ["", "| trainer phase (GPU time of its kernels) | ms / step |", "|---|---|"]
        lines += [f"| {k} | {v / 1e3 / steps:.1f} |" for k, v in ranges.items()]
    top = sorted(((e.key, _device_time(e)) for e in prof.key_averages() if is_kernel(e)),
                 key=lambda kv: -kv[1])[:12]
    if top:
        lines += ["", "| top kernels | GPU ms / step | category |", "|---|---|---|"]
        lines += [f"| `{k[:90]}` | {v / 1e3 / steps:.2f} | {_kernel_category(k)} |" for k, v in top]
    return lines


def synchronizing_calls(run) -> list[str]:
    """Every call of one trainer step that makes the host wait for the GPU, by the Python line
    it comes from (torch's CUDA sync debug mode): a synchronization in the micro-batch loop
    keeps the host from queueing work ahead of the GPU. Table lines (after a blank one); none
    without CUDA."""
    import traceback
    import warnings
    from collections import Counter

    if not platform.has_cuda():
        return []
    sites: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-2]
                      if "warnings" not in f.filename]
            sites[" <- ".join(reversed(frames[-3:]))] += 1

    platform.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run.train_step()
            platform.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    lines = ["", "| synchronizing calls in one step (where from) | calls |", "|---|---|"]
    return lines + [f"| `{site}` | {n} |" for site, n in sites.most_common(12)]


def phase_times(run, steps: int) -> list[str]:
    """Each phase of ``steps`` trainer steps timed on the host clock with the GPU synchronized
    before and after it: every forward, every backward, and the optimizer's and plug-ins'
    calls (``PROFILE_RANGES``); "rest of the step" is what no phase covers (the loss read
    back, the schedule, the step's bookkeeping). Synchronizing removes the overlap of host and
    GPU, so the phases sum to more than an unsynchronized step: this says where the time is,
    not how a free-running step hides it."""
    import time
    from collections import defaultdict

    spent: dict[str, list[float]] = defaultdict(list)

    def timed(fn, label):
        def call(*a, **k):
            platform.synchronize()
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                platform.synchronize()
                spent[label].append(time.perf_counter() - start)
        return call

    targets = trainer_calls(run) + [(run.model, "forward", "forward (each micro-batch)"),
                                    (torch.Tensor, "backward", "backward (each micro-batch, and the regulariser's)")]
    before = allocator_counts()
    with wrapped_calls(targets, timed):
        platform.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            run.train_step()
        platform.synchronize()
        wall = time.perf_counter() - start
    after = allocator_counts()
    lines = ["| phase (GPU synchronized around it) | calls / step | ms / step | first call ms |", "|---|---|---|---|"]
    for label, ts in spent.items():
        lines.append(f"| {label} | {len(ts) / steps:g} | {sum(ts) * 1e3 / steps:.1f} | {ts[0] * 1e3:.1f} |")
    rest = wall - sum(sum(ts) for ts in spent.values())
    lines += [f"| rest of the step | | {rest * 1e3 / steps:.1f} | |",
              f"| step, phases synchronized | | {wall * 1e3 / steps:.1f} | |"]
    if after:
        # cudaMalloc / cudaFree calls and allocation retries (a retry frees the cache and
        # synchronizes the device): a step that needs them idles the GPU
        lines += ["", "| caching allocator, per step | count |", "|---|---|"]
        lines += [f"| {k} | {(after[k] - before[k]) / steps:g} |" for k in after]
    return lines


def allocator_counts() -> dict:
    """The CUDA caching allocator's counters that cost the GPU time (empty without CUDA)."""
    if not platform.has_cuda():
        return {}
    stats = torch.cuda.memory_stats()
    keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams", "num_ooms")
    return {k: stats.get(k, 0) for k in keys}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--num-layers", type=int, default=4, help="layers of the dense / mask-only cases (default 4)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the dense / mask-only cases")
    p.add_argument("--seqs", default="2048,4096", help="comma list of sequence lengths")
    p.add_argument("--mbs", default="1", help="comma list of micro-batch sizes (each case runs at each); "
                   "auto: the trainer's --micro-batch-size auto, the row says what it chose")
    p.add_argument("--gbs", type=int, default=8)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2, help="iterations not timed (median of the rest)")
    p.add_argument("--cases", help=f"comma list of {', '.join(CASES)} (default: all on one process, "
                                   "dense,mask-only under torchrun)")
    p.add_argument("--proxy-tp", type=int, default=4, help="the TP size whose rank the proxy cases model")
    p.add_argument("--proxy-num-layers", type=int, help="layers of the proxy cases (default: all of --model)")
    p.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS,
                   help="the GPU's dense bf16 peak, the MFU denominator (default: H100 SXM)")
    p.add_argument("--matmul-n", type=int, default=8192, help="size of the reference bf16 matmul")
    p.add_argument("--layer-attr", action="append", metavar="NAME=VALUE",
                   help="set an attribute on every masked linear (repeatable), e.g. to pick a mask implementation")
    p.add_argument("--fp32", dest="bf16", action="store_false")
    p.add_argument("--data-path", help="a .bin/.idx prefix tokenized with the LLaMA tokenizer")
    p.add_argument("--tokenizer-model", help="the 32k LLaMA SentencePiece model the data was tokenized with")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--json", help="also write every case's measurements to this JSON file (rewritten after each case)")
    p.add_argument("--tiny", action="store_true", help="tiny model, short sequences, the shipped sample: a CPU check")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler over --profile-steps more steps of --profile-cases at the smallest "
                        "micro-batch and length: where a step's GPU time goes")
    p.add_argument("--profile-cases", default="proxy-dense,proxy-mask-only,dense,mask-only")
    p.add_argument("--profile-steps", type=int, default=1)
    p.add_argument("--profile-dir", help="also write each profile's Chrome trace here")
    opts = p.parse_args(argv)
    opts.profile_cases = opts.profile_cases.split(",")
    opts.layer_settings = layer_settings(opts.layer_attr)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tmp = tempfile.mkdtemp(prefix="bench-train-gpu-")
    opts.log_dir = os.path.join(tmp, "logs")
    if opts.tiny:
        opts.model, opts.num_layers, opts.seqs, opts.gbs = "tiny", None, "32,64", 4
        opts.iters, opts.warmup, opts.matmul_n = min(opts.iters, 3), min(opts.warmup, 1), 256
        opts.proxy_tp = 2
        opts.data_path, opts.tokenizer_model = tiny_data(tmp)
    if not opts.data_path or not opts.tokenizer_model:
        p.error("--data-path and --tokenizer-model are required (or --tiny)")
    seqs = [int(s) for s in opts.seqs.split(",") if s.strip()]
    opts.seq_list = seqs
    opts.mbs_list = [m.strip() if m.strip() == "auto" else int(m) for m in str(opts.mbs).split(",") if m.strip()]
    if not opts.mbs_list or any(m != "auto" and (m < 1 or opts.gbs % m) for m in opts.mbs_list):
        p.error(f"--mbs {opts.mbs}: each micro-batch size must be 'auto' or >= 1 and divide --gbs {opts.gbs}")
    cases = (opts.cases or ",".join(CASES if world == 1 else CASES[:2])).split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"--cases: unknown {unknown}; choose from {', '.join(CASES)}")
    if world > 1 and any(c.startswith("proxy-") for c in cases):
        p.error("--cases: the proxy cases model one TP rank on one GPU; run them without torchrun")
    if opts.iters <= opts.warmup or not seqs:
        p.error("--iters must exceed --warmup, and --seqs must name at least one length")
    longest = max(seqs)
    opts.max_position_embeddings = longest if longest > get_config(opts.model).max_position_embeddings else None

    try:
        dinfo = platform.init_distributed(opts.tp)
        matmul = matmul_tflops(opts.matmul_n, torch.bfloat16)
        rows, proxy_shapes, profiles, failed = run_all(opts, cases, seqs, dinfo.rank == 0)
        if dinfo.rank == 0:
            emit("\n".join(report(opts, cases, world, matmul, rows, proxy_shapes, profiles)), opts.out)
    finally:
        platform.destroy_distributed()
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


def run_all(opts, cases: list[str], seqs: list[int], rank0: bool):
    """Every case at every length and micro-batch, grouped by model; table rows, the proxy's
    shapes, profiles, whether any failed."""
    failed, rows, proxy_shapes, profiles, records = False, [], None, [], []
    order = [c for c in cases if not c.startswith("proxy-")], [c for c in cases if c.startswith("proxy-")]
    for group in order:
        for seq in seqs:
            for mbs in opts.mbs_list:
                dense = None
                for case in group:
                    try:
                        r = run_case(opts, case, seq, mbs)
                    except torch.OutOfMemoryError:
                        r = {"error": "OOM"}
                    except Exception as e:  # noqa: BLE001 - reported in the table, the other cases go on
                        traceback.print_exc()
                        first = (str(e).splitlines() or [""])[0][:160].replace("|", "/")
                        r = {"error": f"failed: {type(e).__name__}: {first}"}
                        failed = True
                    dense = r if case.endswith("dense") else dense
                    rows.append(table_row(opts, case, seq, mbs, r, dense))
                    proxy_shapes = r.get("shapes", proxy_shapes) if case.startswith("proxy-") else proxy_shapes
                    if "profile" in r:
                        profiles.append((f"{case_label(case, opts)}, seq {seq}, micro-batch {mbs}, global batch "
                                         f"{opts.gbs}", r["profile"]))
                    records.append(json_record(opts, case, seq, mbs, r, dense))
                    if rank0:
                        if opts.json:
                            write_json(opts.json, records)
                        print(f"[bench_train_gpu] {rows[-1]}", flush=True)
                        if "profile" in r:
                            print("\n".join(r["profile"]), flush=True)
    return rows, proxy_shapes, profiles, failed


def json_record(opts, case: str, seq: int, mbs: int, r: dict, dense: dict | None) -> dict:
    """One case's measurements as plain values (the JSON file's entries)."""
    rec = {"case": case, "label": case_label(case, opts), "layers": case_layers(opts, case), "seq": seq,
           "micro_batch": mbs, "global_batch": opts.gbs}
    if "error" in r:
        return {**rec, "error": r["error"]}
    if "chosen_mbs" in r:
        rec.update(chosen_micro_batch=r["chosen_mbs"], probes_bytes=r["probes"])
    rec.update(ms_per_iter=r["sec"] * 1e3, tokens_per_s_per_gpu=r["tokens_per_gpu"],
               tflops_per_gpu=r["flops"] / r["sec"] / 1e12, peak_alloc_gib=r["peak"],
               peak_reserved_gib=r["reserved"], losses=r["losses"], shapes=r.get("shapes"))
    rec["mfu"] = rec["tflops_per_gpu"] / opts.peak_tflops
    if case.endswith("mask-only") and dense and "error" not in dense:
        rec["mask_only_over_dense"] = r["tokens_per_gpu"] / dense["tokens_per_gpu"]
    if "profile" in r:
        rec["profile"] = r["profile"]
    return rec


def write_json(path: str, records: list[dict]) -> None:
    import json

    from megatron_ext.files import atomic_write_text

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(records, indent=1, default=float) + "\n")


def report(opts, cases, world: int, matmul: float, rows: list[str], proxy_shapes, profiles) -> list[str]:
    lines = ["## Training: tokens/s, MFU and peak memory per GPU (bench_train_gpu.py)", ""]
    lines += environment(world)
    lines += [f"- bf16 matmul {opts.matmul_n}^3 measured: {matmul:.4g} TFLOP/s; MFU denominator "
              f"{opts.peak_tflops:.1f} TFLOP/s (--peak-tflops)",
              f"- micro-batch {opts.mbs}, global batch {opts.gbs}, {'bf16' if opts.bf16 else 'fp32'}, "
              f"data {opts.data_path}; median of iterations {opts.warmup + 1}..{opts.iters}"
              + (f"; masked linears with {opts.layer_settings}" if opts.layer_settings else ""),
              "- Model FLOPs per iteration and GPU: 6*N*T + 12*L*a*s*T (N: weights in matrix products on "
              "the GPU, output layer included, embedding not; T: tokens of the GPU's replica per iteration; "
              "a: attention width on the GPU); the same for dense and mask-only"]
    if any(c.startswith("proxy-") for c in cases):
        tp = opts.proxy_tp
        lines.append(f"- TP{tp} rank proxy: one GPU, TP1, every weight shaped as one TP{tp} rank's shard "
                     f"({proxy_shapes or 'not built'}). Its peak memory is what one GPU of that TP run holds, "
                     f"slightly more (the whole vocabulary embedding and output layer, not 1/{tp}), and no "
                     "communication buffers; its tokens/s/GPU is that of the TP run it models without "
                     f"communication (the replica's tokens / {tp}), its MFU that rank's.")
    lines += ["", "| run | model | seq | micro-batch | global batch | ms/iter | tokens/s/GPU | mask-only / dense "
                  "| TFLOP/s/GPU | MFU | peak alloc GiB/GPU | peak reserved GiB/GPU | loss first -> last |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows]
    for title, table in profiles:
        lines += ["", f"Profile ({opts.profile_steps} step(s)): {title}", "", *table]
    return lines


if __name__ == "__main__":
    sys.exit(main())
