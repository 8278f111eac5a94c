"""Multi-GPU runs of the seed's configuration (LLaMA-2-7B shapes, TP4 and TP4 x DP2, NCCL), one
command for all of them, every figure in one table.

Items (``--items``, default all):

1. throughput at seq 2048, the incremental script's configuration (TP4, global batch 64,
   ``--micro-batch-size auto``): ``bench_train_gpu.py`` under torchrun, dense and mask-only,
   all 32 layers, ``--steady-iters`` timed iterations after ``--warmup``; tokens/s/GPU, MFU and
   peak memory per GPU at DP1 (4 GPUs) and DP2 (8 GPUs), each beside the TP4 rank proxy's
   prediction (one GPU, ``--cases proxy-*`` at the micro-batch the real run chose and the
   global batch of one DP rank);
2. the same at seq 4096 (the C4 script's length);
3. kill and resume: a TP4 run through ``run_maskllm_native.sh`` is killed (SIGKILL to one
   rank's process) after a checkpoint, resumed with ``1``; its per-iteration losses equal an
   uninterrupted run's to 4 decimals;
4. resharding: saved at TP4, resumed at TP2 x DP2 on the same 4 GPUs; losses match the TP4
   run to ``RESHARD_RTOL``;
5. DP2 against DP1 with twice the accumulation: one trainer step (``Run.train_step``, no
   clipping) of each, dense and mask-only; the loss, the gradient norm and every gradient
   tensor (norm and a fixed strided sample) agree to bf16 tolerance;
6. two nodes on one host: two ``run_maskllm_native.sh`` processes, NNODES=2, NODE_RANK 0/1,
   4 GPUs each (TP4 x DP2), train and save.

The seed's scripts start from the real LLaMA-2-7B checkpoints; what runs here is a randomly
initialised model of the same shapes: ``bench_train_gpu.py``'s for items 1-2 and
``benchmarks/multi_gpu_train.sh`` (the incremental script's settings) for items 3, 4 and 6,
with ``--check-layers`` (4) of the 32 layers there because a mask-only checkpoint holds
fp32 logits and their AdamW moments (about 19 bytes per weight: 130 GB at 32 layers).
Item 5 uses all 32 layers. The data is the shipped sample, tokenized with ``--tokenizer-model``
(default: the 32k LLaMA SentencePiece model when ``megatron_ext.assets`` has it cached, else
the shipped 2,000-piece one, which shrinks the embedding and output layer; the table says which).

An item whose world size the machine cannot give is reported "not run: needs N GPUs".
Results: ``OUT/item<N>.json`` as each item finishes, ``OUT/table.md`` (command, machine and
date per row) rewritten after each; exit status 1 when an item failed.

    python benchmarks/bench_multi_gpu.py --gpus 8 --out output/multi_gpu          # 8 GPUs: every item
    python benchmarks/bench_multi_gpu.py --gpus 4 --items 1,2,3,4 --out DIR       # 4 GPUs
    python benchmarks/bench_multi_gpu.py --tiny --out DIR                         # CPU check

``--tiny``: the same items on the CPU (gloo, ``MEGATRON_EXT_FORCE_CPU=1``), the tiny model, fp32
for the launches (bf16 for items 1-2, as ``bench_train_gpu.py --tiny``), short sequences, and
TP2 for TP4 throughout, so half the processes: 2 for "4 GPUs", 4 for "8 GPUs" (item 4: TP2 ->
TP1 x DP2; item 6: 2 nodes x 2 processes).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from processes import free_port, parent_pid, process_tree  # noqa: E402  (beside this file)

LAUNCHER = REPO / "run_maskllm_native.sh"
TRAIN_SCRIPT = REPO / "benchmarks" / "multi_gpu_train.sh"
BENCH_TRAIN = REPO / "benchmarks" / "bench_train_gpu.py"
ITEMS = {1: "throughput, seq 2048 (incremental script)", 2: "throughput, seq 4096 (C4 script)",
         3: "kill a rank, resume with 1", 4: "save at TP4, resume at TP2 x DP2",
         5: "DP2 gradients = DP1 with twice the accumulation", 6: "2 nodes x 4 GPUs on one host"}
# Set by torchrun or an outer launcher; a launched job must not inherit them.
INHERITED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
             "TORCHELASTIC_RUN_ID", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "DISTRIBUTED_ARGS", "RESUME",
             "MEGATRON_EXT_ROOT", "LOG_DIR", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
LOSS_DECIMALS = 4


@dataclass
class Scale:
    """What the items run at: the GPU configuration or its CPU stand-in (``--tiny``)."""
    tiny: bool
    tp: int                 # the seed's TP (4; tiny 2)
    tp_reshard: int         # item 4's resume TP at the same process count (2; tiny 1)
    model_args: str         # launches of items 3, 4, 6 and item 5
    full_model_args: str    # item 5 (all layers)
    dtype_args: str
    seq: int
    gbs: int
    mbs: str
    train_iters: int
    save_interval: int
    kill_after: int         # item 3: kill once this iteration is logged (after the checkpoint before it)
    grad_gbs: int
    grad_mbs: int
    seqs: dict = field(default_factory=dict)   # items 1, 2: sequence length
    reshard_rtol: float = 0.0
    grad_rtol: float = 0.0
    loss_rtol: float = 0.0
    launch_timeout: float = 0.0

    def procs(self, gpus: int) -> int:
        """Processes standing for ``gpus`` GPUs."""
        return gpus * self.tp // 4


def gpu_scale(check_layers: int) -> Scale:
    return Scale(tiny=False, tp=4, tp_reshard=2, model_args=f"--model llama2-7b --num-layers {check_layers}",
                 full_model_args="--model llama2-7b", dtype_args="--bf16", seq=2048, gbs=64, mbs="auto",
                 train_iters=12, save_interval=4, kill_after=6, grad_gbs=16, grad_mbs=2, seqs={1: 2048, 2: 4096},
                 reshard_rtol=2e-3, grad_rtol=2e-2, loss_rtol=1e-3, launch_timeout=3600)


def tiny_scale() -> Scale:
    return Scale(tiny=True, tp=2, tp_reshard=1, model_args="--model tiny", full_model_args="--model tiny",
                 dtype_args="", seq=64, gbs=8, mbs="2", train_iters=8, save_interval=2, kill_after=3,
                 grad_gbs=8, grad_mbs=2, seqs={1: 32, 2: 64}, reshard_rtol=1e-5, grad_rtol=1e-5, loss_rtol=1e-6,
                 launch_timeout=300)


class ItemFailed(Exception):
    """A launch or a check of an item failed (the message says which)."""


# --------------------------------------------------------------------------- comparisons


def losses_match_to_decimals(got: dict, reference: dict, decimals: int = LOSS_DECIMALS) -> list[str]:
    """Iterations of ``got`` whose loss is not within half a unit of the ``decimals``-th decimal of
    ``reference``'s (or that ``reference`` lacks); empty when all agree."""
    bad = []
    for it, loss in sorted(got.items()):
        if it not in reference:
            bad.append(f"iteration {it}: not in the reference")
        elif abs(loss - reference[it]) > 0.5 * 10.0 ** -decimals:
            bad.append(f"iteration {it}: {loss:.{decimals + 2}f} vs {reference[it]:.{decimals + 2}f}")
    return bad


def losses_match_to_rtol(got: dict, reference: dict, rtol: float) -> list[str]:
    bad = []
    for it, loss in sorted(got.items()):
        if it not in reference:
            bad.append(f"iteration {it}: not in the reference")
        elif abs(loss - reference[it]) > rtol * abs(reference[it]):
            bad.append(f"iteration {it}: {loss:.6f} vs {reference[it]:.6f} (rel {abs(loss / reference[it] - 1):.2e})")
    return bad


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| (0 when both are zero)."""
    import torch

    a, b = a.double(), b.double()
    den = float(torch.linalg.vector_norm(b))
    num = float(torch.linalg.vector_norm(a - b))
    return 0.0 if num == 0 else (num / den if den else math.inf)


def compare_gradients(dp2: dict, dp1: dict, rtol: float, loss_rtol: float) -> tuple[list[str], dict]:
    """``{tp_rank: record}`` of the DP2 and DP1 steps (``grad_worker``'s files): loss, gradient
    norm and each tensor's norm and sample; (mismatches, largest relative errors)."""
    bad, worst = [], {"loss": 0.0, "grad_norm": 0.0, "tensor": 0.0}
    if sorted(dp2) != sorted(dp1):
        return [f"TP ranks differ: {sorted(dp2)} vs {sorted(dp1)}"], worst
    for rank in sorted(dp1):
        a, b = dp2[rank], dp1[rank]
        for key, tol in (("loss", loss_rtol), ("grad_norm", rtol)):
            err = abs(a[key] / b[key] - 1) if b[key] else abs(a[key])
            worst[key] = max(worst[key], err)
            if err > tol:
                bad.append(f"TP rank {rank} {key}: {a[key]:.6g} vs {b[key]:.6g} (rel {err:.2e} > {tol:g})")
        if sorted(a["grads"]) != sorted(b["grads"]):
            bad.append(f"TP rank {rank}: the parameters differ")
            continue
        for name in sorted(b["grads"]):
            ga, gb = a["grads"][name], b["grads"][name]
            errs = [relative_error(ga["sample"], gb["sample"]),
                    abs(ga["norm"] / gb["norm"] - 1) if gb["norm"] else abs(ga["norm"])]
            worst["tensor"] = max(worst["tensor"], *errs)
            if max(errs) > rtol:
                bad.append(f"TP rank {rank} {name}: relative error {max(errs):.2e} > {rtol:g}")
    return bad, worst


# --------------------------------------------------------------------------- processes


def _environ(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            items = f.read().split(b"\0")
    except OSError:
        return {}
    return dict(i.decode(errors="replace").split("=", 1) for i in items if b"=" in i)


def rank_process(root: int, rank: int) -> int | None:
    """The worker process of global ``rank`` under ``root`` (not a child it started)."""
    tree = process_tree(root)
    ranked = {p for p in tree if _environ(p).get("RANK") == str(rank) and "TORCHELASTIC_RUN_ID" in _environ(p)}
    parents = {p: parent_pid(p) for p in ranked}
    tops = [p for p, pp in parents.items() if pp is not None and pp not in ranked]
    return min(tops) if tops else None


class Launch:
    """A command in the background, its output in ``log``; stopped by process id."""

    def __init__(self, cmd: list, env: dict, log: Path):
        self.cmd, self.log, self.env = cmd, log, env
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(log, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.proc.poll() is not None:
                raise ItemFailed(f"the run ended (status {self.proc.returncode}) before '{text.strip()}':\n"
                                 f"{tail(self.output)}")
            if time.monotonic() > deadline:
                raise ItemFailed(f"'{text.strip()}' did not come in {timeout:.0f} s:\n{tail(self.output)}")
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise ItemFailed(f"{shlex.join(self.cmd)} ran past {timeout:.0f} s:\n{tail(self.output)}") from None
        finally:
            self._out.flush()

    def stop(self) -> None:
        """SIGKILL whatever is left of the run."""
        for p in process_tree(self.proc.pid):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        self._out.close()


def first_error(text: str) -> str:
    """The first line of ``text`` that reports an error (the trainer's and the scripts' say "error:")."""
    return next((ln.strip() for ln in text.splitlines() if "error:" in ln), "no error line; see the log")


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- the driver


class Driver:
    def __init__(self, opts, scale: Scale):
        self.opts, self.s = opts, scale
        self.out = Path(opts.out).resolve()
        self.work = Path(opts.work).resolve() if opts.work else self.out / "work"
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.machine = machine_name(scale.tiny)
        self.rows: list[dict] = []
        self.results: dict = {}
        self._references: dict = {}
        self.data = self.tokenizer = None

    # ---------------------------------------------------------- environment
    def env(self, gpus: list | None = None, **extra) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in INHERITED}
        env["NCCL_NVLS_ENABLE"] = "0"   # NVLink multicast off
        env["PYTHONUNBUFFERED"] = "1"
        if self.s.tiny:
            env["MEGATRON_EXT_FORCE_CPU"] = "1"
        elif gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def prepare_data(self) -> None:
        from megatron_ext.data.preprocess import PreprocessConfig, preprocess

        self.tokenizer = self.opts.tokenizer_model or default_tokenizer(self.s.tiny)
        out = self.work / "data"
        prefix = out / "sample_text_document"
        if not (Path(str(prefix) + ".bin").exists() and Path(str(prefix) + ".idx").exists()):
            out.mkdir(parents=True, exist_ok=True)
            res = preprocess(PreprocessConfig(inputs=[str(REPO / "examples" / "data" / "shakespeare_train.jsonl")],
                                              output_prefix=str(out / "sample"), tokenizer_type="Llama2Tokenizer",
                                              tokenizer_model=str(self.tokenizer), append_eod=True), log=None)
            prefix = Path(res.outputs["text"])
        self.data = str(prefix)
        from megatron_ext.data.tokenizers import build_tokenizer

        self.vocab = build_tokenizer("Llama2Tokenizer", str(self.tokenizer)).vocab_size

    # ---------------------------------------------------------- results
    def record(self, item: int, status: str, rows: list[dict], detail: dict) -> None:
        date = time.strftime("%Y-%m-%d %H:%M %Z")
        for r in rows:
            r.update(item=item, machine=self.machine, date=date)
        self.rows += rows
        self.results[item] = status
        payload = {"item": item, "title": ITEMS[item], "status": status, "machine": self.machine, "date": date,
                   "tiny": self.s.tiny, "rows": rows, **detail}
        atomic_write(self.out / f"item{item}.json", json.dumps(payload, indent=1, default=str) + "\n")
        atomic_write(self.out / "table.md", self.table())
        print(f"[bench_multi_gpu] item {item} ({ITEMS[item]}): {status}", flush=True)

    def table(self) -> str:
        lines = ["## Multi-GPU runs of the seed's configuration (bench_multi_gpu.py)", "",
                 f"- Driver: `{shlex.join([sys.executable, *sys.argv])}`",
                 f"- Model: {'the tiny model' if self.s.tiny else 'LLaMA-2-7B shapes, randomly initialised'}; "
                 f"data: the shipped sample tokenized with {self.tokenizer} ({self.vocab:,} pieces)"
                 + ("; CPU stand-in: TP2 for TP4, half the processes" if self.s.tiny else ""), "",
                 f"| item | configuration | status | measured | TP{self.s.tp} rank proxy (prediction) | command "
                 "| machine | date |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            cells = [str(r["item"]), r["config"], r["status"], r.get("measured", ""), r.get("prediction", ""),
                     f"`{r['command']}`" if r.get("command") else "", r["machine"], r["date"]]
            lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
        return "\n".join(lines) + "\n"

    def not_run(self, item: int, needs: int) -> None:
        what = "processes" if self.s.tiny else "GPUs"
        status = f"not run: needs {needs} {what}"
        self.record(item, status, [{"config": ITEMS[item], "status": status}], {})

    # ---------------------------------------------------------- launches
    def launch_train(self, name: str, resume: int, save: Path, logs: Path, nproc: int, tp: int, gpus: list | None,
                     *extra, port: int | None = None, nnodes: int = 1, node_rank: int = 0, **env) -> Launch:
        s = self.s
        settings = dict(NPROC_PER_NODE=nproc, NNODES=nnodes, NODE_RANK=node_rank, MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port or free_port(), LOG_DIR=self.work / "launcher" / name, DATA_PREFIX=self.data,
                        TOKENIZER_MODEL=self.tokenizer, SAVE_DIR=save, LOG_DIR_RUN=logs, MODEL_ARGS=s.model_args,
                        DTYPE_ARGS=s.dtype_args, TP=tp, SEQ_LENGTH=s.seq, MICRO_BATCH_SIZE=s.mbs,
                        GLOBAL_BATCH_SIZE=s.gbs, TRAIN_ITERS=s.train_iters, SAVE_INTERVAL=s.save_interval)
        e = self.env(gpus, **{**settings, **env})
        cmd = ["bash", str(LAUNCHER), str(TRAIN_SCRIPT), str(resume), "--keep-last", "1", *map(str, extra)]
        return Launch(cmd, e, self.work / "output" / f"{name}.log")

    def run_train(self, name: str, resume: int, save: Path, logs: Path, nproc: int, tp: int, gpus, *extra,
                  **kw) -> Launch:
        run = self.launch_train(name, resume, save, logs, nproc, tp, gpus, *extra, **kw)
        status = run.wait(self.s.launch_timeout)
        run.stop()
        if status != 0:
            raise ItemFailed(f"{name}: the launch ended with status {status}:\n{tail(run.output)}")
        return run

    def reference(self) -> tuple[dict, str]:
        """The uninterrupted TP4 run (items 3 and 4 share it): {iteration: loss}, its command."""
        if "tp" not in self._references:
            save, logs = self.work / "reference" / "ckpt", self.work / "reference" / "logs"
            remove(self.work / "reference")
            run = self.run_train("reference", 0, save, logs, self.s.procs(4), self.s.tp, list(range(4)))
            losses = metrics_losses(logs)
            want = list(range(1, self.s.train_iters + 1))
            if sorted(losses) != want:
                raise ItemFailed(f"the reference run logged iterations {sorted(losses)}, expected {want}")
            remove(save)
            self._references["tp"] = (losses, command_line(run))
        return self._references["tp"]

    # ---------------------------------------------------------- items 1, 2
    def throughput(self, item: int) -> None:
        s, seq = self.s, self.s.seqs[item]
        dps = [dp for dp in (1, 2) if 4 * dp <= self.opts.gpus]
        rows, detail, failed = [], {"runs": []}, False
        for dp in (1, 2):
            config = f"TP{s.tp} x DP{dp}, seq {seq}, global batch {s.gbs if not s.tiny else 8}"
            if dp not in dps:
                what = "processes" if s.tiny else "GPUs"
                rows.append({"config": config, "status": f"not run: needs {s.procs(4 * dp)} {what}"})
                continue
            real, real_cmd, err = self._bench_real(item, seq, dp)
            detail["runs"].append({"dp": dp, "records": real, "command": real_cmd, "error": err})
            for case in ("dense", "mask-only"):
                rec = next((r for r in real if r["case"] == case), None)
                pred, pred_cmd, perr = self._bench_proxy(item, seq, dp, case, rec)
                detail["runs"].append({"dp": dp, "proxy": case, "records": pred, "command": pred_cmd, "error": perr})
                pr = next((r for r in pred if r["case"] == f"proxy-{case}"), None)
                ok = rec is not None and "error" not in rec
                failed |= not ok or err is not None
                rows.append({"config": f"{config}, {case}", "status": "measured" if ok else "failed",
                             "measured": figures(rec) if rec else (err or "no record"),
                             "prediction": figures(pr) if pr else (perr or "no record"),
                             "command": f"{real_cmd}; proxy: {pred_cmd}"})
        status = "failed" if failed else ("measured" if len(dps) == 2 else f"measured DP1; DP2 needs "
                                          f"{s.procs(8)} {'processes' if s.tiny else 'GPUs'}")
        self.record(item, status, rows, detail)

    def _bench_common(self, seq: int, gbs: int, mbs) -> list[str]:
        s, o = self.s, self.opts
        args = ["--seqs", str(seq), "--gbs", str(gbs), "--mbs", str(mbs), "--data-path", self.data,
                "--tokenizer-model", str(self.tokenizer)]
        if s.tiny:
            return args + ["--model", "tiny", "--iters", "3", "--warmup", "1", "--matmul-n", "256",
                           "--proxy-tp", str(s.tp)]
        return args + ["--iters", str(o.warmup + o.steady_iters), "--warmup", str(o.warmup)]

    def _bench_real(self, item: int, seq: int, dp: int):
        s = self.s
        nproc = s.procs(4 * dp)
        gbs = 8 if s.tiny else s.gbs
        out = self.work / f"item{item}-dp{dp}.json"
        remove(out)
        layers = [] if s.tiny else ["--num-layers", "32"]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), str(BENCH_TRAIN), "--tp", str(s.tp), *layers,
               "--cases", "dense,mask-only", "--json", str(out), *self._bench_common(seq, gbs, "auto")]
        return self._bench_run(cmd, out, list(range(4 * dp)), f"item{item}-dp{dp}")

    def _bench_proxy(self, item: int, seq: int, dp: int, case: str, real: dict | None):
        """The proxy at the global batch of one DP rank and the micro-batch the real run chose."""
        s = self.s
        gbs = (8 if s.tiny else s.gbs) // dp
        mbs = real.get("chosen_micro_batch", "auto") if real else "auto"
        out = self.work / f"item{item}-dp{dp}-proxy-{case}.json"
        remove(out)
        cmd = [sys.executable, str(BENCH_TRAIN), "--cases", f"proxy-{case}", "--json", str(out),
               *self._bench_common(seq, gbs, mbs)]
        return self._bench_run(cmd, out, [0], f"item{item}-dp{dp}-proxy-{case}")

    def _bench_run(self, cmd: list, out: Path, gpus: list, name: str):
        run = Launch(cmd, self.env(gpus), self.work / "output" / f"{name}.log")
        status = run.wait(self.s.launch_timeout)
        run.stop()
        records = json.loads(out.read_text()) if out.exists() else []
        err = None if status == 0 else f"status {status}: {tail(run.output, 3)}"
        if err:
            print(f"[bench_multi_gpu] {name} failed:\n{tail(run.output)}", flush=True)
        return records, shown(cmd), err

    # ---------------------------------------------------------- item 3
    def kill_and_resume(self) -> None:
        s = self.s
        reference, _ = self.reference()
        root = self.work / "item3"
        remove(root)
        save, nproc = root / "ckpt", s.procs(4)
        victim_rank = nproc - 1
        first = self.launch_train("item3-killed", 0, save, root / "logs1", nproc, s.tp, list(range(4)))
        try:
            first.wait_for(f"> saved checkpoint at iteration {s.save_interval} ", s.launch_timeout)
            first.wait_for(f" iteration {s.kill_after:>8}/", s.launch_timeout)
            pid = rank_process(first.proc.pid, victim_rank)
            if pid is None:
                raise ItemFailed(f"no process of rank {victim_rank} found under the launcher")
            os.kill(pid, signal.SIGKILL)
            status = first.wait(600)
        finally:
            first.stop()
        if status == 0:
            raise ItemFailed("the launcher exited with status 0 after one rank was killed")
        killed_at = int((save / "latest_checkpointed_iteration.txt").read_text())
        before = metrics_losses(root / "logs1")
        resumed = self.run_train("item3-resumed", 1, save, root / "logs2", nproc, s.tp, list(range(4)))
        loaded = "> loaded checkpoint from" in resumed.output
        after = metrics_losses(root / "logs2")
        want = list(range(killed_at + 1, s.train_iters + 1))
        bad = losses_match_to_decimals(before, reference) + losses_match_to_decimals(after, reference)
        if sorted(after) != want:
            bad.append(f"the resumed run logged iterations {sorted(after)}, expected {want}")
        if not loaded:
            bad.append("the resumed run did not load a checkpoint")
        diff = max((abs(after[i] - reference[i]) for i in after if i in reference), default=math.nan)
        status = "passed" if not bad else "failed"
        measured = (f"killed rank {victim_rank} (SIGKILL) after iteration {s.kill_after}; resumed from "
                    f"iteration {killed_at}; iterations {want[0]}-{want[-1]} equal the uninterrupted run's to "
                    f"{LOSS_DECIMALS} decimals (max abs diff {diff:.1e})" if not bad else "; ".join(bad[:5]))
        row = {"config": f"TP{s.tp}, {nproc} {'processes' if s.tiny else 'GPUs'}", "status": status,
               "measured": measured, "command": command_line(resumed)}
        self.record(3, status, [row], {"reference": reference, "before_kill": before, "resumed": after,
                                       "killed_rank": victim_rank, "resumed_from": killed_at, "mismatches": bad})
        remove(root)
        if bad:
            raise ItemFailed("; ".join(bad[:5]))

    # ---------------------------------------------------------- item 4
    def reshard(self) -> None:
        s = self.s
        reference, _ = self.reference()
        root = self.work / "item4"
        remove(root)
        save, nproc = root / "ckpt", s.procs(4)
        self.run_train("item4-save", 0, save, root / "logs1", nproc, s.tp, list(range(4)),
                       "--exit-interval", s.save_interval)
        saved = int((save / "latest_checkpointed_iteration.txt").read_text())
        before = metrics_losses(root / "logs1")
        resumed = self.run_train("item4-resumed", 1, save, root / "logs2", nproc, s.tp_reshard, list(range(4)))
        after = metrics_losses(root / "logs2")
        layout = f"TP={s.tp_reshard} DP={nproc // s.tp_reshard}"
        want = list(range(saved + 1, s.train_iters + 1))
        bad = losses_match_to_decimals(before, reference) + losses_match_to_rtol(after, reference, s.reshard_rtol)
        if saved != s.save_interval:
            bad.append(f"the TP{s.tp} run saved iteration {saved}, expected {s.save_interval}")
        if sorted(after) != want:
            bad.append(f"the resumed run logged iterations {sorted(after)}, expected {want}")
        if layout not in resumed.output:
            bad.append(f"the resumed run did not report {layout}")
        worst = max((abs(after[i] / reference[i] - 1) for i in after if i in reference), default=math.nan)
        status = "passed" if not bad else "failed"
        measured = (f"saved at TP{s.tp} (iteration {saved}), resumed at TP{s.tp_reshard} x DP{nproc // s.tp_reshard}: "
                    f"iterations {want[0]}-{want[-1]} within rel {s.reshard_rtol:g} of the TP{s.tp} run "
                    f"(max rel diff {worst:.1e})" if not bad else "; ".join(bad[:5]))
        row = {"config": f"TP{s.tp} -> TP{s.tp_reshard} x DP{nproc // s.tp_reshard}, {nproc} "
                         f"{'processes' if s.tiny else 'GPUs'}", "status": status, "measured": measured,
               "command": command_line(resumed)}
        self.record(4, status, [row], {"reference": reference, "before_save": before, "resumed": after,
                                       "mismatches": bad, "rtol": s.reshard_rtol})
        remove(root)
        if bad:
            raise ItemFailed("; ".join(bad[:5]))

    # ---------------------------------------------------------- item 5
    def gradients(self) -> None:
        s = self.s
        root = self.work / "item5"
        remove(root)
        root.mkdir(parents=True)
        files, commands = {}, {}
        for dp in (1, 2):
            nproc = s.procs(4 * dp)
            spec = {"argv_base": self.grad_argv(root / f"logs-dp{dp}"), "out": str(root / f"grads-dp{dp}")}
            spec_path = root / f"spec-dp{dp}.json"
            spec_path.write_text(json.dumps(spec))
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), str(Path(__file__).resolve()),
                   "--grad-worker", str(spec_path)]
            run = Launch(cmd, self.env(list(range(4 * dp))), self.work / "output" / f"item5-dp{dp}.log")
            status = run.wait(s.launch_timeout)
            run.stop()
            if status != 0:
                raise ItemFailed(f"item 5, DP{dp}: status {status}:\n{tail(run.output)}")
            files[dp], commands[dp] = spec["out"], shown(cmd)
        rows, detail, failed = [], {"cases": {}}, False
        for case in ("dense", "mask-only"):
            dp1, dp2 = load_grads(files[1], case), load_grads(files[2], case)
            bad, worst = compare_gradients(dp2, dp1, s.grad_rtol, s.loss_rtol)
            failed |= bool(bad)
            n = sum(len(r["grads"]) for r in dp1.values())
            measured = (f"loss {dp1[0]['loss']:.6f} vs {dp2[0]['loss']:.6f}, grad norm {dp1[0]['grad_norm']:.6g} "
                        f"vs {dp2[0]['grad_norm']:.6g}; {n} gradient tensors, max relative error "
                        f"{worst['tensor']:.1e} (tolerance {s.grad_rtol:g})" if not bad else "; ".join(bad[:5]))
            rows.append({"config": f"TP{s.tp} x DP2 ({s.grad_gbs // (2 * s.grad_mbs)} micro-batches of {s.grad_mbs}) "
                                   f"vs TP{s.tp} x DP1 ({s.grad_gbs // s.grad_mbs}), seq {s.seq}, {case}",
                         "status": "failed" if bad else "passed", "measured": measured, "command": commands[2]})
            detail["cases"][case] = {"mismatches": bad, "worst": worst}
        # the gradient files stay (a sample per tensor, no checkpoint) for a second look
        self.record(5, "failed" if failed else "passed", rows,
                    {**detail, "commands": commands, "gradient_files": files})
        if failed:
            raise ItemFailed("gradients differ: " + "; ".join(r["measured"] for r in rows if r["status"] == "failed"))

    def grad_argv(self, logs: Path) -> list[str]:
        s = self.s
        return [*s.full_model_args.split(), *s.dtype_args.split(), "--tensor-model-parallel-size", str(s.tp),
                "--seq-length", str(s.seq), "--micro-batch-size", str(s.grad_mbs), "--global-batch-size",
                str(s.grad_gbs), "--train-iters", "1", "--lr", "2e-5", "--min-lr", "2e-6", "--clip-grad", "0",
                "--data-path", self.data, "--split", "98,2,0", "--tokenizer-type", "Llama2Tokenizer",
                "--tokenizer-model", str(self.tokenizer), "--log-interval", "1", "--eval-iters", "0",
                "--log-dir", str(logs), "--seed", "1234"]

    # ---------------------------------------------------------- item 6
    def two_nodes(self) -> None:
        s = self.s
        root = self.work / "item6"
        remove(root)
        save, logs, port, nproc = root / "ckpt", root / "logs", free_port(), s.procs(4)
        runs = []
        try:
            for node in (0, 1):
                runs.append(self.launch_train(f"item6-node{node}", 0, save, logs, nproc, s.tp,
                                              list(range(4 * node, 4 * node + 4)), port=port, nnodes=2,
                                              node_rank=node))
            status = [r.wait(s.launch_timeout) for r in runs]
        finally:
            for r in runs:
                r.stop()
        out0 = runs[0].output
        bad = [f"node {i}: status {st}: {first_error(runs[i].output)}" for i, st in enumerate(status) if st != 0]
        layout = f"> {2 * nproc} process(es): TP={s.tp} DP={2 * nproc // s.tp}"
        if not bad:
            if layout not in out0:
                bad.append(f"node 0 did not report '{layout}'")
            tracker = save / "latest_checkpointed_iteration.txt"
            if not tracker.exists() or int(tracker.read_text()) != s.train_iters:
                bad.append(f"no checkpoint of iteration {s.train_iters} in {save}")
            losses = metrics_losses(logs) if not bad else {}
            if sorted(losses) != list(range(1, s.train_iters + 1)) or not all(map(math.isfinite, losses.values())):
                bad.append(f"logged losses {losses}")
        status_text = "passed" if not bad else "failed"
        measured = (f"2 launchers x {nproc} {'processes' if s.tiny else 'GPUs'} formed TP{s.tp} x "
                    f"DP{2 * nproc // s.tp}, trained {s.train_iters} iterations and saved" if not bad
                    else "; ".join(bad))
        row = {"config": f"NNODES=2, NODE_RANK 0/1, {nproc} per node", "status": status_text, "measured": measured,
               "command": " & ".join(command_line(r) for r in runs)}
        self.record(6, status_text, [row], {"mismatches": bad})
        remove(root)
        if bad:
            raise ItemFailed("; ".join(bad) + "\n" + "\n".join(tail(r.output, 15) for r in runs))

    # ---------------------------------------------------------- all
    def run(self, items: list[int]) -> int:
        self.prepare_data()
        needs = {3: 4, 4: 4, 5: 8, 6: 8}
        methods = {1: lambda: self.throughput(1), 2: lambda: self.throughput(2), 3: self.kill_and_resume,
                   4: self.reshard, 5: self.gradients, 6: self.two_nodes}
        for item in items:
            if item in needs and needs[item] > self.opts.gpus:
                self.not_run(item, self.s.procs(needs[item]) if self.s.tiny else needs[item])
                continue
            try:
                methods[item]()
            except Exception as e:  # noqa: BLE001 - reported in the table, the other items go on
                text = str(e) if isinstance(e, ItemFailed) else traceback.format_exc()
                if item not in self.results:
                    first = (str(e).splitlines() or [type(e).__name__])[0][:300]
                    self.record(item, "failed", [{"config": ITEMS[item], "status": "failed", "measured": first}],
                                {"error": text})
                print(f"[bench_multi_gpu] item {item} failed:\n{text}", flush=True)
        print(self.table(), flush=True)
        return 1 if any(v == "failed" for v in self.results.values()) else 0


# --------------------------------------------------------------------------- helpers


def figures(rec: dict | None) -> str:
    if not rec:
        return ""
    if "error" in rec:
        return rec["error"]
    mbs = rec.get("chosen_micro_batch", rec.get("micro_batch"))
    peak = rec["peak_alloc_gib"]
    peak = "n/a (CPU)" if peak != peak else f"{peak:.2f} GiB/GPU"
    return (f"{rec['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU, MFU {rec['mfu']:.1%}, peak {peak}, "
            f"micro-batch {mbs}, {rec['ms_per_iter']:.0f} ms/iteration")


def metrics_losses(log_dir: Path) -> dict:
    """{iteration: loss} of the training records of every metrics-*.jsonl under ``log_dir``."""
    out = {}
    for path in sorted(glob.glob(str(log_dir / "*" / "metrics-*.jsonl"))):
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r.get("kind") == "train":
                    out[r["iteration"]] = r["loss"]
    return out


def command_line(run: Launch) -> str:
    """The launch as a user types it: the settings that differ between items, then the command."""
    keys = ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "TP", "SEQ_LENGTH", "MICRO_BATCH_SIZE", "TRAIN_ITERS")
    prefix = " ".join(f"{k}={run.env[k]}" for k in keys if k in run.env)
    return f"{prefix} {shown(run.cmd)}".strip()


def shown(cmd: list) -> str:
    """``cmd`` as a shell line, paths inside the repository relative to it (the launches run there)."""
    return shlex.join(cmd).replace(str(REPO) + "/", "")


def load_grads(prefix: str, case: str) -> dict:
    import torch

    out = {}
    for path in sorted(glob.glob(f"{prefix}-{case}-tp*.pt")):
        rec = torch.load(path, weights_only=True)
        out[rec["tp_rank"]] = rec
    if not out:
        raise ItemFailed(f"no gradient files {prefix}-{case}-tp*.pt")
    return out


def remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def machine_name(tiny: bool) -> str:
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=60).stdout.split("\n")
        names = [n.strip() for n in names if n.strip()]
    except (OSError, subprocess.TimeoutExpired):
        names = []
    cpu = f"CPU, {os.cpu_count()} cores"
    if not names:
        return cpu
    gpus = f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
    return f"{cpu} (GPUs unused: {gpus})" if tiny else gpus


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_tokenizer(tiny: bool) -> Path:
    """The 32k LLaMA SentencePiece model if ``megatron_ext.assets`` has it cached (nothing is
    downloaded: the GPU machine may have no network), else the shipped sample's."""
    shipped = REPO / "examples" / "data" / "tokenizer.model"
    if tiny:
        return shipped
    root = Path(os.environ.get("MEGATRON_EXT_CACHE", Path.home() / ".cache" / "megatron_ext"))
    hits = sorted(glob.glob(str(root / "extracted" / "mistral-common" / "**" / "tokenizer.model.v1"), recursive=True))
    return Path(hits[0]) if hits else shipped


# --------------------------------------------------------------------------- item 5's worker (under torchrun)


def grad_worker(spec_path: str) -> int:
    """One trainer step (no clipping) per case; each TP rank of DP rank 0 writes its loss, gradient
    norm and, per trainable tensor, the norm and a strided sample of the data-parallel-reduced
    gradient (the optimizer's fp32 buffer) to ``<out>-<case>-tp<rank>.pt``."""
    import torch

    from megatron_ext import platform
    from megatron_ext.train import Run, parse_args

    spec = json.loads(Path(spec_path).read_text())
    cases = {"dense": [], "mask-only": ["--mask-only", "--N", "2", "--M", "4", "--lr-mult", "10",
                                        "--weight-reg", "1e-5"]}
    try:
        for case, extra in cases.items():
            run = Run(parse_args(spec["argv_base"] + ["--tag", case] + extra))
            try:
                rec = run.train_step()
                d = run.dinfo
                if d.dp_rank == 0:
                    grads = {}
                    for e in run.optimizer.entries:
                        flat = e.grad.detach().float().flatten()
                        stride = max(1, flat.numel() // 65536)
                        grads[e.name] = {"norm": float(torch.linalg.vector_norm(flat.double())),
                                         "sample": flat[::stride].cpu().clone()}
                    out = {"tp_rank": d.tp_rank, "loss": rec["loss"], "grad_norm": rec["grad_norm"],
                           "dp_size": d.dp_size, "grads": grads}
                    path = f"{spec['out']}-{case}-tp{d.tp_rank}.pt"
                    torch.save(out, path + ".tmp")
                    os.replace(path + ".tmp", path)
            finally:
                run.close()
                del run
    finally:
        platform.destroy_distributed()
    return 0


def parse_items(text: str) -> list[int]:
    try:
        items = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--items {text!r}: expected a comma list of 1-6") from None
    if not items or any(i not in ITEMS for i in items):
        raise SystemExit(f"--items {text!r}: expected a comma list of 1-6")
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", default="1,2,3,4,5,6", help="comma list of the items to run (default all)")
    p.add_argument("--gpus", type=int, choices=(4, 8), help="GPUs this machine gives (default: those visible; "
                   "--tiny: 8, i.e. 4 CPU processes)")
    p.add_argument("--out", help="results: item<N>.json and table.md")
    p.add_argument("--work", help="checkpoints, logs, data (default OUT/work; checkpoints are removed per item)")
    p.add_argument("--tokenizer-model", help="tokenize the shipped sample with this SentencePiece model "
                   "(default: the cached 32k LLaMA model, else the shipped one)")
    p.add_argument("--steady-iters", type=int, default=20, help="items 1-2: timed iterations after --warmup")
    p.add_argument("--warmup", type=int, default=3, help="items 1-2: iterations not timed")
    p.add_argument("--check-layers", type=int, default=4, help="items 3, 4, 6: layers of the LLaMA-2-7B shapes")
    p.add_argument("--tiny", action="store_true", help="the items on the CPU with the tiny model (a check)")
    p.add_argument("--grad-worker", metavar="SPEC", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.grad_worker:
        return grad_worker(opts.grad_worker)
    if not opts.out:
        p.error("--out DIR is required")
    items = parse_items(opts.items)
    if opts.gpus is None:
        if opts.tiny:
            opts.gpus = 8
        else:
            have = gpu_count()
            if have < 4:
                p.error(f"this machine has {have} GPU(s); the items need 4 or 8 (or run --tiny on the CPU)")
            opts.gpus = 8 if have >= 8 else 4
    elif not opts.tiny and gpu_count() < opts.gpus:
        p.error(f"--gpus {opts.gpus}: this machine has {gpu_count()} GPU(s)")
    if opts.steady_iters < 1 or opts.warmup < 1:
        p.error("--steady-iters and --warmup must be >= 1")
    scale = tiny_scale() if opts.tiny else gpu_scale(opts.check_layers)
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    return Driver(opts, scale).run(items)


if __name__ == "__main__":
    sys.exit(main())
