"""Bad input the trainer and eval_ppl must refuse before any compute, through the command
line as a user runs it: exit status 2, one line naming the file, flag or id, no traceback."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

from megatron_ext.data.indexed_dataset import HEADER_BYTES, IndexedDatasetBuilder, data_file_path, index_file_path

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "examples" / "data" / "tokenizer.model"  # 2000 pieces: the tiny model's vocabulary
DOCS = [list(range(k, k + 40)) for k in range(0, 1900, 50)]


def build(prefix, docs) -> None:
    b = IndexedDatasetBuilder(data_file_path(prefix), np.uint16)
    for d in docs:
        b.add_document(np.asarray(d), [len(d)])
    b.finalize(index_file_path(prefix))


def train(tmp_path, prefix, *extra) -> subprocess.CompletedProcess:
    argv = ["--model", "tiny", "--seq-length", "32", "--micro-batch-size", "1", "--train-iters", "2", "--lr", "1e-3",
            "--data-path", str(prefix), "--split", "100,0,0", "--eval-iters", "0", "--tokenizer-type",
            "Llama2Tokenizer", "--tokenizer-model", str(TOKENIZER), "--log-dir", str(tmp_path / "logs"), *extra]
    # a world of its own: not the rendezvous a test process before it may have set up
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["MEGATRON_EXT_FORCE_CPU"] = "1"
    return subprocess.run([sys.executable, str(ROOT / "pretrain_maskllm.py"), *argv], capture_output=True,
                          text=True, timeout=300, env=env)


def test_dataset_with_ids_past_the_vocabulary_is_refused_naming_file_and_id(tmp_path):
    build(tmp_path / "ok", DOCS)
    assert train(tmp_path, tmp_path / "ok").returncode == 0
    build(tmp_path / "foreign", DOCS + [[5, 2500, 7]])
    res = train(tmp_path, tmp_path / "foreign")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "--data-path" in res.stderr and data_file_path(tmp_path / "foreign") in res.stderr
    assert "token id 2500" in res.stderr


def test_offset_error_in_the_index_is_refused_at_start(tmp_path):
    build(tmp_path / "ds", DOCS)
    with open(index_file_path(tmp_path / "ds"), "r+b") as f:
        f.seek(HEADER_BYTES + 4 * len(DOCS) + 8 * 5)
        (pointer,) = struct.unpack("<q", f.read(8))
        f.seek(-8, os.SEEK_CUR)
        f.write(struct.pack("<q", pointer + 2))
    res = train(tmp_path, tmp_path / "ds")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{index_file_path(tmp_path / 'ds')}: sequence 5 points at byte {pointer + 2}" in res.stderr


def test_unwritable_save_and_bad_split_fail_before_training(tmp_path):
    build(tmp_path / "ok", DOCS)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = train(tmp_path, tmp_path / "ok", "--save", str(blocker / "ckpt"))
    assert res.returncode == 2 and "--save" in res.stderr and "Traceback" not in res.stderr
    assert "iteration" not in res.stdout  # nothing trained
    # every other place a run writes, a file in the way of each: named before any compute
    # (--log-dir last: the run's log directory is its last flag)
    for flag in ("--tensorboard-dir", "--data-cache-path", "--log-dir"):
        res = train(tmp_path, tmp_path / "ok", flag, str(blocker / "sub"))
        assert res.returncode == 2 and f"{flag} {blocker / 'sub'}" in res.stderr, (flag, res.stderr)
        assert "Traceback" not in res.stderr and "iteration" not in res.stdout
    res = train(tmp_path, tmp_path / "ok", "--split", "abc")
    assert res.returncode == 2 and "--split 'abc'" in res.stderr and "Traceback" not in res.stderr
