"""The training loop on the tiny LLaMA and the shipped Shakespeare sample (one process):
dense training learns, an interrupted run resumes on exactly the same loss curve, a second
held-out set is evaluated and logged beside the validation split, and the command line works."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ext.checkpoint import TRACKER_FILE
from megatron_ext.train import pretrain
from megatron_ext.training.reporting import LoggingSetupError

REPO = Path(__file__).resolve().parents[2]


def _records(log_dir: Path, kind: str):
    (path,) = sorted(log_dir.glob("metrics-*.jsonl"))
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def test_dense_training_reduces_loss_on_real_text(make_argv):
    result = pretrain(make_argv(train_iters=16, eval_interval=8, eval_iters=1, tag="dense"))
    losses = [r["loss"] for r in result.history]
    assert [r["iteration"] for r in result.history] == list(range(1, 17))
    assert result.stop_reason == "train_iters" and result.consumed_train_samples == 16 * 4
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 7.0                      # ~ln(2000): an untrained model
    assert last < first - 0.5, losses       # it learns the text
    lrs = [r["lr"] for r in result.history]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(3e-3) and lrs[-1] < lrs[2]   # warmup, then cosine decay
    assert [(e["set"], e["iteration"]) for e in result.evals] == [("valid", 8), ("valid", 16), ("valid", 16)]
    # the run's own log file and metrics
    assert result.log_dir.name == "dense"
    (log,) = result.log_dir.glob("train-*.log")
    text = log.read_text()
    assert "iteration       16/      16" in text and "lm loss:" in text and "tokens/s:" in text
    train = _records(result.log_dir, "train")
    assert [r["iteration"] for r in train] == list(range(1, 17))
    assert train[-1]["loss"] == pytest.approx(losses[-1]) and train[-1]["consumed_samples"] == 64


RESUME_CASES = {
    "dense-bf16": {"bf16": True},
    "mask-only": {"mask_only": True, "weight_reg": 1e-4, "lr_mult": 10, "lr": 1e-2},
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_continues_on_the_same_loss_curve(make_argv, tmp_path, case):
    """6 iterations uninterrupted vs. stopped after 3 (checkpoint at 3) and resumed: iterations 4-6
    (loss, learning rate, gradient norm) and the evaluations are bit-identical."""
    flags = dict(RESUME_CASES[case], train_iters=6, save_interval=3, eval_interval=2, eval_iters=1)
    whole = pretrain(make_argv(save=str(tmp_path / "whole"), **flags))
    first = pretrain(make_argv(save=str(tmp_path / "split"), exit_interval=3, **flags))
    assert first.stop_reason == "exit_interval" and first.iteration == 3
    assert (tmp_path / "split" / TRACKER_FILE).read_text().strip() == "3"
    second = pretrain(make_argv(save=str(tmp_path / "split"), load=str(tmp_path / "split"), **flags))
    assert second.start_iteration == 3 and second.iteration == 6
    assert [r["iteration"] for r in second.history] == [4, 5, 6]
    assert first.history == whole.history[:3]
    assert second.history == whole.history[3:]          # exact float equality, every field
    key = lambda e: (e["set"], e["iteration"], e["when"], e["loss"])  # noqa: E731
    assert [key(e) for e in first.evals + second.evals] == [key(e) for e in whole.evals]
    if case == "mask-only":
        assert whole.history[0]["tau"] == 4.0 and whole.history[-1]["tau"] == pytest.approx(4.0 - 3.95 * 5 / 6)


def test_eval_data_path_is_evaluated_and_logged_beside_validation(make_argv, tempest_prefix):
    result = pretrain(make_argv(train_iters=2, eval_interval=1, eval_iters=1, eval_data_path=tempest_prefix,
                                mask_only=True, tag="heldout"))
    got = [(e["set"], e["iteration"]) for e in result.evals]
    assert got == [("valid", 1), ("eval_data", 1), ("valid", 2), ("eval_data", 2), ("valid", 2), ("eval_data", 2)]
    held = [e["loss"] for e in result.evals if e["set"] == "eval_data"]
    valid = [e["loss"] for e in result.evals if e["set"] == "valid"]
    assert held != valid and all(4.0 < v < 9.0 for v in held + valid)
    assert [r["iteration"] for r in _records(result.log_dir, "eval/eval_data")] == [1, 2, 2]
    assert [r["iteration"] for r in _records(result.log_dir, "eval/valid")] == [1, 2, 2]
    (log,) = result.log_dir.glob("train-*.log")
    assert "eval_data loss at iteration 1:" in log.read_text()


def test_tensorboard_scalars(make_argv, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = tmp_path / "tb"
    pretrain(make_argv(train_iters=2, eval_interval=1, eval_iters=1, tensorboard_dir=str(tb), mask_only=True))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tau", "train/kappa", "train/mask_max_prob",
            "train/mask_flip_fraction", "eval/valid/loss", "train/loss vs samples"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in acc.Scalars("train/loss vs samples")] == [4, 8]


def test_tensorboard_missing_is_a_clear_error(make_argv, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # as if the package were absent
    with pytest.raises(LoggingSetupError, match="--tensorboard-dir needs the 'tensorboard' package"):
        pretrain(make_argv(train_iters=1, lr_warmup_iters=0, tensorboard_dir=str(tmp_path / "tb")))


def test_command_line_entry_points(make_argv, tmp_path):
    """pretrain_maskllm.py trains and stops cleanly on SIGTERM (--exit-signal-handler), saving a
    checkpoint; python -m megatron_ext.train rejects an unknown flag by name."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    save = tmp_path / "ckpt"
    argv = make_argv(train_iters=100000, save=str(save), exit_signal_handler=True, eval_iters=0)
    proc = subprocess.Popen([sys.executable, str(REPO / "pretrain_maskllm.py"), *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(" iteration        2/"):
                proc.send_signal(signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 0, out
    assert "> stopping at iteration" in out and "(signal)" in out
    saved = int((save / TRACKER_FILE).read_text())
    assert saved >= 2 and (save / f"iter_{saved:07d}" / "mp_rank_00" / "model_optim_rng.pt").is_file()

    bad = subprocess.run([sys.executable, "-m", "megatron_ext.train", *make_argv(), "--no-such-flag"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "error: unrecognized arguments: --no-such-flag" in bad.stderr
