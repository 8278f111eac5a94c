"""Where a run reports: stdout, a log file, a JSON-lines metrics file, TensorBoard and
Weights & Biases; and reading a run's metrics back (``tools/plot_run.py``).

Only the first process writes. Per run, ``<log-dir>/<tag>/`` receives
``train-<start time>.log`` (what is printed) and ``metrics-<start time>.jsonl`` (one
object per logged iteration or evaluation). ``--tensorboard-dir`` adds TensorBoard
scalars (the ``tensorboard`` package); ``--wandb-project`` logs the same scalars to
Weights & Biases (the ``wandb`` package), offline when its server cannot be reached
and ``WANDB_MODE`` is not set.
"""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, TextIO
from urllib.parse import urlparse
from megatron_ext.errors import InputError


class LoggingSetupError(InputError):
    """A logging destination that cannot be used (the message names the flag)."""


def tensorboard_writer_class():
    """torch's ``SummaryWriter`` (a clear error when the tensorboard package is missing).
    Every process checks, so all fail alike before any collective."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LoggingSetupError("--tensorboard-dir needs the 'tensorboard' package (pip install tensorboard), "
                                "or leave the flag out") from None
    return SummaryWriter


def open_tensorboard(directory: str):
    """A ``SummaryWriter`` writing to ``--tensorboard-dir``."""
    SummaryWriter = tensorboard_writer_class()
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise LoggingSetupError(f"--tensorboard-dir {directory}: cannot create ({e.strerror})") from None
    return SummaryWriter(log_dir=directory, max_queue=1000)


def wandb_module():
    """The ``wandb`` package (a clear error when it is missing). Every process checks, so
    all fail alike before any collective."""
    try:
        import wandb
    except ImportError:
        raise LoggingSetupError("--wandb-project needs the 'wandb' package (pip install wandb), "
                                "or leave the flag out") from None
    return wandb


def wandb_server_reachable(timeout_s: float = 2.0) -> bool:
    """Whether the Weights & Biases server (``WANDB_BASE_URL``, default api.wandb.ai) answers a
    TCP connection: without it a run logs offline rather than failing or waiting."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host = url.hostname or "api.wandb.ai"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def open_wandb(project: str, name: str, directory: str, config: Optional[Mapping[str, Any]] = None):
    """A Weights & Biases run writing its files under ``directory``; offline (``wandb sync``
    uploads it later) when ``WANDB_MODE`` is unset and the server cannot be reached.
    Returns ``(run, mode)``."""
    wandb = wandb_module()
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise LoggingSetupError(f"--wandb-save-dir {directory}: cannot create ({e.strerror})") from None
    mode = None if "WANDB_MODE" in os.environ else ("online" if wandb_server_reachable() else "offline")
    try:
        run = wandb.init(project=project, name=name, dir=directory, config=dict(config or {}), mode=mode)
    except Exception as e:  # wandb raises its own types (auth, network, settings)
        raise LoggingSetupError(f"--wandb-project {project}: cannot start a Weights & Biases run ({e}); "
                                "WANDB_MODE=offline logs without a server") from None
    return run, mode or os.environ["WANDB_MODE"]


def _scalars(values: Mapping[str, Any]):
    """The finite numbers of ``values`` (what TensorBoard and wandb receive)."""
    for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield name, value


def format_value(value: Any, spec: str = "") -> str:
    """``value`` for a log line: ``spec`` is a format spec for numbers (NaN prints as ``nan``)."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


class RunLogger:
    """Writes lines and metrics; a no-op on processes other than the first."""

    def __init__(self, log_dir: str, tag: str, *, enabled: bool = True, tensorboard_dir: Optional[str] = None,
                 wandb_project: Optional[str] = None, wandb_exp_name: Optional[str] = None,
                 wandb_save_dir: Optional[str] = None, wandb_config: Optional[Mapping[str, Any]] = None,
                 stream: TextIO = sys.stdout) -> None:
        self.enabled = enabled
        self.stream = stream
        self.log_file: Optional[TextIO] = None
        self.metrics_file: Optional[TextIO] = None
        self.writer = None
        self.wandb_run = None
        self.run_dir: Optional[Path] = None
        if tensorboard_dir is not None:
            tensorboard_writer_class()
        if not wandb_project:
            for flag, value in (("--wandb-exp-name", wandb_exp_name), ("--wandb-save-dir", wandb_save_dir)):
                if value:
                    raise LoggingSetupError(f"{flag} {value} needs --wandb-project (the project to log to)")
        else:
            wandb_module()
        if not enabled:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(log_dir) / tag
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.log_path = self._unique(self.run_dir / f"train-{stamp}.log")
            self.metrics_path = self.log_path.with_name(self.log_path.name.replace("train-", "metrics-")
                                                        .replace(".log", ".jsonl"))
            self.log_file = open(self.log_path, "a", encoding="utf-8")
            self.metrics_file = open(self.metrics_path, "a", encoding="utf-8")
        except OSError as e:
            self.close()
            raise LoggingSetupError(f"--log-dir {log_dir}: cannot write run logs under {self.run_dir} "
                                    f"({e.strerror})") from None
        try:
            if tensorboard_dir is not None:
                self.writer = open_tensorboard(tensorboard_dir)
            if wandb_project:
                directory = wandb_save_dir or os.path.join(log_dir, "wandb")
                self.wandb_run, mode = open_wandb(wandb_project, wandb_exp_name or tag, directory, wandb_config)
                self.print(f"> Weights & Biases: project {wandb_project}, run {wandb_exp_name or tag}, {mode}, "
                           f"files under {directory}" + (" (wandb sync uploads them)" if mode == "offline" else ""))
        except LoggingSetupError:
            self.close()
            raise

    @staticmethod
    def _unique(path: Path) -> Path:
        n, candidate = 1, path
        while candidate.exists():
            n += 1
            candidate = path.with_name(f"{path.stem}.{n}{path.suffix}")
        return candidate

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        print(line, file=self.stream, flush=True)
        if self.log_file is not None:
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def metrics(self, kind: str, iteration: int, values: Dict[str, Any],
                consumed_samples: Optional[int] = None) -> None:
        """A JSON line, TensorBoard scalars (``<kind>/<name>`` against the iteration and, for
        training, ``<name> vs samples`` as Megatron-LM logs them) and the same scalars to
        Weights & Biases (step: the iteration)."""
        if not self.enabled:
            return
        record = {"kind": kind, "iteration": iteration, **values}
        if consumed_samples is not None:
            record["consumed_samples"] = consumed_samples
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record, allow_nan=True) + "\n")
            self.metrics_file.flush()
        if self.writer is not None:
            for name, value in _scalars(values):
                self.writer.add_scalar(f"{kind}/{name}", value, iteration)
                if consumed_samples is not None:
                    self.writer.add_scalar(f"{kind}/{name} vs samples", value, consumed_samples)
            self.writer.flush()
        if self.wandb_run is not None:
            scalars = {f"{kind}/{name}": value for name, value in _scalars(values)}
            if consumed_samples is not None:
                scalars[f"{kind}/consumed_samples"] = consumed_samples
            if scalars:   # a record of structure only (the plan) is the JSON line's alone
                self.wandb_run.log(scalars, step=iteration)

    @staticmethod
    def iteration_line(iteration: int, train_iters: int, fields) -> str:
        """Megatron-LM's iteration line from ``(name, value, format spec)`` triples."""
        parts = [f" iteration {iteration:8d}/{train_iters:8d}"]
        parts += [f"{name}: {format_value(value, spec)}" for name, value, spec in fields if value is not None]
        return " | ".join(parts) + " |"

    def close(self) -> None:
        for f in (self.log_file, self.metrics_file):
            if f is not None:
                f.close()
        self.log_file = self.metrics_file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            run, self.wandb_run = self.wandb_run, None
            run.finish()


# --------------------------------------------------------------------------- reading a run's metrics

METRICS_GLOB = "metrics-*.jsonl"


class RunLogsError(InputError):
    """No metrics where a run's logs were looked for (the message says where)."""


def _has_metrics(directory: Path) -> bool:
    return directory.is_dir() and any(directory.glob(METRICS_GLOB))


def _checkpoint_log_dirs(save_dir: Path) -> List[Path]:
    """``<log-dir>/<tag>`` of each checkpoint in ``save_dir``, newest first: the tag from its
    ``checkpoint.json``, ``--log-dir`` from the saved arguments (relative to the working
    directory, as the trainer used it)."""
    from megatron_ext.checkpoint import list_iterations, read_checkpoint_info
    from megatron_ext.checkpoint.io import read_shard
    from megatron_ext.checkpoint.layout import iteration_dir_name
    from megatron_ext.training.arguments import DEFAULT_LOG_DIR

    out: List[Path] = []
    for iteration in sorted(list_iterations(save_dir), reverse=True):
        info = read_checkpoint_info(save_dir / iteration_dir_name(iteration))
        args = read_shard(info, 0).get("args") or {}
        tag = (info.extra.get("training") or {}).get("tag") or args.get("tag")
        if not tag:
            continue
        candidate = Path(args.get("log_dir") or DEFAULT_LOG_DIR) / tag
        if candidate not in out:
            out.append(candidate)
    return out


def find_run_logs(path: str | os.PathLike) -> Path:
    """The directory holding a run's ``metrics-*.jsonl``: ``path`` itself (``<log-dir>/<tag>``),
    the one run under a ``--log-dir``, or, for a ``--save`` directory, the log directory its
    checkpoints name."""
    path = Path(path)
    if not path.is_dir():
        raise RunLogsError(f"{path}: no such directory (give a --save directory or a run's log directory)")
    if _has_metrics(path):
        return path
    from megatron_ext.checkpoint import TRACKER_FILE, list_iterations

    if (path / TRACKER_FILE).is_file() or list_iterations(path):
        looked = _checkpoint_log_dirs(path)
        found = [d for d in looked if _has_metrics(d)]
        if found:
            return found[0]
        where = ", ".join(str(d) for d in looked) or "(the checkpoints name no run tag)"
        raise RunLogsError(f"{path}: a checkpoint directory, but its run's logs are not at {where} "
                           f"(relative paths are taken from the working directory; give the log directory instead)")
    runs = sorted(d for d in path.iterdir() if _has_metrics(d))
    if len(runs) == 1:
        return runs[0]
    if runs:
        raise RunLogsError(f"{path}: holds the logs of {len(runs)} runs ({', '.join(d.name for d in runs)}); "
                           f"give one of them, e.g. {runs[0]}")
    raise RunLogsError(f"{path}: no {METRICS_GLOB} here, and not a checkpoint directory or a --log-dir holding a run")


def _stamp_order(path: Path):
    """``metrics-<start time>[.n].jsonl`` sorts by start time, then by the n of a same-second restart."""
    stem = path.name[len("metrics-"):-len(".jsonl")]
    stamp, _, n = stem.partition(".")
    return stamp, int(n) if n.isdigit() else 1


def read_metrics(run_dir: str | os.PathLike) -> List[Dict[str, Any]]:
    """Every metrics record of a run, its files (a resumed run writes one per start) read in
    time order: a later file's records replace the earlier ones from its first iteration on,
    so a run resumed from an older checkpoint keeps one curve, and a later record of the same
    kind and iteration replaces an earlier one (the evaluation at the end of training repeats
    the last interval's). Unreadable lines (a line cut by a kill) are skipped. Sorted by
    iteration."""
    files = sorted(Path(run_dir).glob(METRICS_GLOB), key=_stamp_order)
    records: List[Dict[str, Any]] = []
    for f in files:
        fresh = []
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and isinstance(r.get("iteration"), int) and isinstance(r.get("kind"), str):
                fresh.append(r)
        if not fresh:
            continue
        start = min(r["iteration"] for r in fresh)
        later = {(r["kind"], r["iteration"]) for r in fresh}
        records = [r for r in records if r["iteration"] < start
                   or (r["iteration"] == start and (r["kind"], r["iteration"]) not in later)]
        records.extend(fresh)
    last = {(r["kind"], r["iteration"]): r for r in records}
    return sorted(last.values(), key=lambda r: r["iteration"])
