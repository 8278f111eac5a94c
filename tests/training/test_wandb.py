"""Weights & Biases logging: optional (a clear error naming the flag and the pip command when
wandb is missing, on every process), never needed by a run without the flags, and offline
when its server cannot be reached; the same scalars as TensorBoard reach the run's files."""
import importlib.util
import io
import socket
import sys
import time

import pytest

from megatron_ext.training.reporting import LoggingSetupError, RunLogger

HAVE_WANDB = importlib.util.find_spec("wandb") is not None


@pytest.mark.parametrize("enabled", [True, False], ids=["first-process", "other-process"])
def test_missing_wandb_names_the_flag_and_the_pip_command(tmp_path, monkeypatch, enabled):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(LoggingSetupError, match=r"--wandb-project needs the 'wandb' package \(pip install wandb\)"):
        RunLogger(str(tmp_path / "logs"), "run", enabled=enabled, wandb_project="proj")
    assert not (tmp_path / "logs").exists()  # refused before anything is written


def test_a_run_without_wandb_flags_never_imports_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    log = RunLogger(str(tmp_path / "logs"), "run", stream=open(tmp_path / "out.txt", "w"))
    log.metrics("train", 1, {"loss": 1.0})
    log.close()
    assert log.wandb_run is None and (tmp_path / "logs" / "run").is_dir()


def test_wandb_name_or_directory_without_a_project_is_refused(tmp_path):
    with pytest.raises(LoggingSetupError, match="--wandb-exp-name x needs --wandb-project"):
        RunLogger(str(tmp_path / "logs"), "run", wandb_exp_name="x")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once closed


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed")
def test_without_a_server_the_run_logs_offline_into_the_save_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{_closed_port()}")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    save = tmp_path / "wb"
    log = RunLogger(str(tmp_path / "logs"), "run", wandb_project="megatron-ext-test", wandb_exp_name="tiny",
                    wandb_save_dir=str(save), stream=io.StringIO())
    for it in (1, 2):
        log.metrics("train", it, {"loss": 7.5 - it, "lr": 1e-3, "grad_norm": float("nan")}, consumed_samples=4 * it)
    log.metrics("eval/valid", 2, {"loss": 6.0, "ppl": 403.4, "accuracy": 0.05})
    log.close()
    out = (tmp_path / "logs" / "run").glob("train-*.log").__next__().read_text()
    assert "Weights & Biases: project megatron-ext-test, run tiny, offline" in out
    (run_dir,) = (save / "wandb").glob("offline-run-*")
    (history,) = run_dir.glob("run-*.wandb")
    # wandb's service process writes the records; finish() may return before they reach the file
    deadline = time.monotonic() + 60
    while b"eval/valid/accuracy" not in (data := history.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for key in (b"train/loss", b"train/lr", b"train/consumed_samples", b"eval/valid/accuracy"):
        assert key in data, key
    assert b"train/grad_norm" not in data  # a NaN is left out, as for TensorBoard
    assert log.wandb_run is None  # finished on close
