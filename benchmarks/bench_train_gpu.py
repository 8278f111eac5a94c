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
  cannot build it from flags (its head dim is not hidden / heads), so the model is built
  through the library and trained by the trainer's own step (``Run.train_step``).

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
    python benchmarks/bench_train_gpu.py --tiny                                            # CPU check

Prints one markdown table (also written to ``--out``). An out-of-memory case is reported as
OOM and the others go on; any other failure is reported and the exit status is 1.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_common import (MASK_ONLY_FLAGS, emit, environment, memory_gib, reset_memory, tiny_data,  # noqa: E402
                          timed_steps, trainer_argv)
from bench_model_gpu import matmul_tflops  # noqa: E402
from megatron_ext import platform  # noqa: E402
from megatron_ext.data.tokenizers import build_tokenizer  # noqa: E402
from megatron_ext.models import get_config  # noqa: E402
from megatron_ext.models.build import build_model  # noqa: E402
from megatron_ext.training import Run, parse_args, validate_parallel  # noqa: E402
from megatron_ext.training.loop import resolve_model_config  # noqa: E402
from megatron_ext.training.reporting import RunLogger  # noqa: E402

H100_SXM_BF16_DENSE_TFLOPS = 989.4
CASES = ("dense", "mask-only", "proxy-dense", "proxy-mask-only")


class ProxyRun(Run):
    """A trainer ``Run`` over the TP-rank proxy model: each weight shaped as one rank's shard at
    TP ``proxy_tp``, trained at TP1 by the inherited ``train_step``, optimizer and data.

    Only the model differs from ``Run``: the head dim (``kv_channels``) stays the full model's
    while the heads shrink, which the trainer's flags cannot express.
    """

    def __init__(self, args, proxy_tp: int) -> None:
        from megatron.core import parallel_state as ps

        self.args = args
        self.dinfo = platform.init_distributed(1)
        validate_parallel(args, self.dinfo.world_size)
        platform.seed_everything(args.seed)
        self.dp_group, self.mp_group = ps.get_data_parallel_group(), ps.get_model_parallel_group()
        self.tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        full = resolve_model_config(args, self.tokenizer, None)
        full.validate_tp(proxy_tp)
        self.cfg = full.replace(num_attention_heads=full.num_attention_heads // proxy_tp,
                                num_query_groups=full.num_query_groups // proxy_tp,
                                ffn_hidden_size=full.ffn_hidden_size // proxy_tp)
        self.log = RunLogger(args.log_dir, args.tag, enabled=True)
        try:
            self._build(full.head_dim)
        except BaseException:
            self.close()
            raise

    def _build(self, kv_channels: int) -> None:
        args = self.args
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        kwargs = dict(init_method_std=args.init_method_std, config_overrides={"kv_channels": kv_channels})
        if args.sparse:
            from megatron_ext.sparsity import SparsityState, build_sparse_model

            self.sparsity = SparsityState(N=args.N, M=args.M, seed=args.seed, tau_range=args.gumbel_temperature_range,
                                          kappa_range=args.gumbel_scale_range, hard=args.hard)
            self.model = build_sparse_model(self.cfg, args.N, args.M, dtype, mask_only=args.mask_only,
                                            state=self.sparsity, **kwargs)
        else:
            self.sparsity = None
            self.model = build_model(self.cfg, dtype, **kwargs)
        self.model.train()
        self.iteration = self.consumed_train = 0
        self._last_reg = None
        self._build_optimizer()
        self._build_data({})


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


def _max_over_ranks(value: float) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=platform.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def case_layers(opts, case: str) -> int:
    layers = opts.proxy_num_layers if case.startswith("proxy-") else opts.num_layers
    return layers or get_config(opts.model).num_layers


def run_case(opts, case: str, seq: int) -> dict:
    """Build the case's run, time ``opts.iters`` trainer steps, return the measurements."""
    proxy = case.startswith("proxy-")
    extra = list(MASK_ONLY_FLAGS) if case.endswith("mask-only") else []
    reset_memory()
    flags = argparse.Namespace(**{**vars(opts), "num_layers": case_layers(opts, case)})
    args = parse_args(trainer_argv(flags, extra, seq=seq, tp=1 if proxy else opts.tp))
    run = ProxyRun(args, opts.proxy_tp) if proxy else Run(args)
    try:
        if args.sparse:
            apply_layer_settings(run.model, opts.layer_settings)
        sec, losses = timed_steps(lambda: run.train_step()["loss"], opts.iters, opts.warmup)
        tokens = args.global_batch_size // run.dinfo.dp_size * seq
        # GPUs sharing one model replica: a proxy stands for one of proxy_tp ranks
        gpus = run.dinfo.dp_size * (opts.proxy_tp if proxy else run.dinfo.tp_size)
        return {"sec": sec, "losses": losses, "flops": flops_per_iteration(run.model, seq, tokens),
                "shapes": first_layer_shapes(run.model),
                "tokens_per_gpu": args.global_batch_size * seq / sec / gpus,
                "peak": _max_over_ranks(memory_gib()),
                "reserved": _max_over_ranks(torch.cuda.max_memory_reserved() / 2**30
                                            if platform.has_cuda() else float("nan"))}
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


def table_row(opts, case: str, seq: int, r: dict) -> str:
    label = case_label(case, opts)
    shard = f" TP{opts.proxy_tp}-rank shapes" if case.startswith("proxy-") else ""
    model = f"{opts.model}{shard} x{case_layers(opts, case)}L"
    if "error" in r:
        return f"| {label} | {model} | {seq} | {r['error']} | | | | | | |"
    achieved = r["flops"] / r["sec"] / 1e12
    return (f"| {label} | {model} | {seq} | {r['sec'] * 1e3:.1f} | {r['tokens_per_gpu']:,.0f} "
            f"| {achieved:.4g} | {achieved / opts.peak_tflops:.1%} | {_gib(r['peak'])} | {_gib(r['reserved'])} "
            f"| {r['losses'][0]:.4f} -> {r['losses'][-1]:.4f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--num-layers", type=int, default=4, help="layers of the dense / mask-only cases (default 4)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the dense / mask-only cases")
    p.add_argument("--seqs", default="2048,4096", help="comma list of sequence lengths")
    p.add_argument("--mbs", type=int, default=1)
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
    p.add_argument("--tiny", action="store_true", help="tiny model, short sequences, the shipped sample: a CPU check")
    opts = p.parse_args(argv)
    opts.layer_settings = layer_settings(opts.layer_attr)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tmp = tempfile.mkdtemp(prefix="bench-train-gpu-")
    opts.log_dir = os.path.join(tmp, "logs")
    if opts.tiny:
        opts.model, opts.num_layers, opts.seqs, opts.gbs, opts.mbs = "tiny", None, "32,64", 4, 1
        opts.iters, opts.warmup, opts.matmul_n = min(opts.iters, 3), min(opts.warmup, 1), 256
        opts.proxy_tp = 2
        opts.data_path, opts.tokenizer_model = tiny_data(tmp)
    if not opts.data_path or not opts.tokenizer_model:
        p.error("--data-path and --tokenizer-model are required (or --tiny)")
    seqs = [int(s) for s in opts.seqs.split(",") if s.strip()]
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
        rows, proxy_shapes, failed = run_all(opts, cases, seqs, dinfo.rank == 0)
        if dinfo.rank == 0:
            emit("\n".join(report(opts, cases, world, matmul, rows, proxy_shapes)), opts.out)
    finally:
        platform.destroy_distributed()
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


def run_all(opts, cases: list[str], seqs: list[int], rank0: bool) -> tuple[list[str], str | None, bool]:
    """Every case at every length, grouped by model; table rows, the proxy's shapes, whether any failed."""
    failed, rows, proxy_shapes = False, [], None
    order = [c for c in cases if not c.startswith("proxy-")], [c for c in cases if c.startswith("proxy-")]
    for group in order:
        for seq in seqs:
            for case in group:
                try:
                    r = run_case(opts, case, seq)
                except torch.OutOfMemoryError:
                    r = {"error": "OOM"}
                except Exception as e:  # noqa: BLE001 - reported in the table, the other cases go on
                    traceback.print_exc()
                    first = (str(e).splitlines() or [""])[0][:160].replace("|", "/")
                    r = {"error": f"failed: {type(e).__name__}: {first}"}
                    failed = True
                rows.append(table_row(opts, case, seq, r))
                proxy_shapes = r.get("shapes", proxy_shapes) if case.startswith("proxy-") else proxy_shapes
                if rank0:
                    print(f"[bench_train_gpu] {rows[-1]}", flush=True)
    return rows, proxy_shapes, failed


def report(opts, cases, world: int, matmul: float, rows: list[str], proxy_shapes) -> list[str]:
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
    return lines + ["", "| run | model | seq | ms/iter | tokens/s/GPU | TFLOP/s/GPU | MFU | peak alloc GiB/GPU "
                        "| peak reserved GiB/GPU | loss first -> last |",
                    "|---|---|---|---|---|---|---|---|---|---|", *rows]


if __name__ == "__main__":
    sys.exit(main())
