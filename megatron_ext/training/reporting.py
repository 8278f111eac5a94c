"""Where a run reports: stdout, a log file, a JSON-lines metrics file and TensorBoard.

Only the first process writes. Per run, ``<log-dir>/<tag>/`` receives
``train-<start time>.log`` (what is printed) and ``metrics-<start time>.jsonl`` (one
object per logged iteration or evaluation). ``--tensorboard-dir`` adds TensorBoard
scalars; it needs the ``tensorboard`` package.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, TextIO
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
                 stream: TextIO = sys.stdout) -> None:
        self.enabled = enabled
        self.stream = stream
        self.log_file: Optional[TextIO] = None
        self.metrics_file: Optional[TextIO] = None
        self.writer = None
        self.run_dir: Optional[Path] = None
        if tensorboard_dir is not None:
            tensorboard_writer_class()
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
        if tensorboard_dir is not None:
            try:
                self.writer = open_tensorboard(tensorboard_dir)
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

    def metrics(self, kind: str, iteration: int, values: Dict[str, Any], consumed_samples: Optional[int] = None) -> None:
        """A JSON line, and TensorBoard scalars (``<kind>/<name>`` against the iteration and,
        for training, ``<name> vs samples`` as Megatron-LM logs them)."""
        if not self.enabled:
            return
        record = {"kind": kind, "iteration": iteration, **values}
        if consumed_samples is not None:
            record["consumed_samples"] = consumed_samples
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(record, allow_nan=True) + "\n")
            self.metrics_file.flush()
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{name}", value, iteration)
                    if consumed_samples is not None:
                        self.writer.add_scalar(f"{kind}/{name} vs samples", value, consumed_samples)
            self.writer.flush()

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
