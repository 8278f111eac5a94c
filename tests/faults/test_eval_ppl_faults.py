"""Bad input tools/eval_ppl.py must refuse before any compute, through the command line as a
user runs it: a tokenized dataset with an offset error in its index or with ids past the
model's vocabulary, a missing dataset, and windows longer than the model's positions. Each
exits 1 (the tool's status for a rejected input) with one line naming the file, flag or id,
and no traceback; the same checkpoint evaluates a sound dataset."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data.indexed_dataset import HEADER_BYTES, IndexedDatasetBuilder, data_file_path, index_file_path

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "examples" / "data"           # tokenizer.model: 2000 pieces
VOCAB = 2000
MAX_POSITIONS = 256                            # the tiny model's
DOCS = [list(range(k, k + 40)) for k in range(0, 1900, 50)]


def _env() -> dict:
    # a world of its own: not the rendezvous a test process before it may have set up
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["MEGATRON_EXT_FORCE_CPU"] = "1"
    return env


def build(prefix, docs) -> None:
    b = IndexedDatasetBuilder(data_file_path(prefix), np.uint16)
    for d in docs:
        b.add_document(np.asarray(d), [len(d)])
    b.finalize(index_file_path(prefix))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny LLaMA with the sample tokenizer's vocabulary, saved as our checkpoint
    (in a process of its own, so this one keeps no distributed state)."""
    out = tmp_path_factory.mktemp("eval-ppl-faults") / "ckpt"
    script = (
        "import sys\n"
        "from megatron_ext import platform\n"
        "from megatron_ext.checkpoint import model_state_dict, save_checkpoint\n"
        "from megatron_ext.models import build_model, get_config\n"
        "platform.init_distributed(1); platform.seed_everything(7)\n"
        f"cfg = get_config('tiny', vocab_size={VOCAB})\n"
        "save_checkpoint(sys.argv[1], [model_state_dict(build_model(cfg))], cfg, tokenizer_dir=sys.argv[2])\n"
        "platform.destroy_distributed()\n")
    res = subprocess.run([sys.executable, "-c", script, str(out), str(SAMPLE)], capture_output=True, text=True,
                         timeout=300, env=_env())
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def eval_ppl(checkpoint, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "eval_ppl.py"), "--load", str(checkpoint),
                           *map(str, args)], capture_output=True, text=True, timeout=300, env=_env())


def _refused(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, res.stdout + res.stderr         # bad input, as the trainer's flag errors
    assert "Traceback" not in res.stderr and "PPL" not in res.stdout
    (line,) = [l for l in res.stderr.splitlines() if l.startswith("error: ")]
    return line


def test_a_sound_dataset_is_evaluated(checkpoint, tmp_path):
    build(tmp_path / "ok", DOCS)
    res = eval_ppl(checkpoint, "--data-path", tmp_path / "ok", "--seq-length", 32)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[-1].startswith("PPL ")


def test_offset_error_in_the_index_names_the_idx_and_the_sequence(checkpoint, tmp_path):
    build(tmp_path / "ds", DOCS)
    with open(index_file_path(tmp_path / "ds"), "r+b") as f:
        f.seek(HEADER_BYTES + 4 * len(DOCS) + 8 * 5)   # the pointer of sequence 5
        (pointer,) = struct.unpack("<q", f.read(8))
        f.seek(-8, os.SEEK_CUR)
        f.write(struct.pack("<q", pointer + 2))
    line = _refused(eval_ppl(checkpoint, "--data-path", tmp_path / "ds", "--seq-length", 32))
    assert line.startswith("error: --data-path: ")
    assert f"{index_file_path(tmp_path / 'ds')}: sequence 5 points at byte {pointer + 2}" in line


def test_ids_past_the_vocabulary_name_the_bin_and_the_id(checkpoint, tmp_path):
    build(tmp_path / "foreign", DOCS + [[5, 2500, 7]])
    line = _refused(eval_ppl(checkpoint, "--data-path", tmp_path / "foreign", "--seq-length", 32))
    assert line.startswith("error: --data-path: ")
    assert data_file_path(tmp_path / "foreign") in line and "token id 2500" in line and str(VOCAB) in line


def test_a_missing_dataset_names_what_is_missing(checkpoint, tmp_path):
    line = _refused(eval_ppl(checkpoint, "--data-path", tmp_path / "nowhere", "--seq-length", 32))
    assert f"{tmp_path / 'nowhere'}: tokenized dataset not found" in line


@pytest.mark.parametrize("source", ["text", "dataset"])
def test_windows_past_the_model_positions_are_refused(checkpoint, tmp_path, source):
    build(tmp_path / "ok", DOCS)
    (tmp_path / "t.txt").write_text((SAMPLE / "shakespeare_heldout.txt").read_text(encoding="utf-8")[:20000])
    flag = ["--text-file", tmp_path / "t.txt"] if source == "text" else ["--data-path", tmp_path / "ok"]
    line = _refused(eval_ppl(checkpoint, *flag, "--seq-length", MAX_POSITIONS + 1))
    assert f"--seq-length {MAX_POSITIONS + 1} exceeds the model's max position embeddings {MAX_POSITIONS}" in line
    assert str(checkpoint) in line
    # the longest window the model has is accepted
    assert eval_ppl(checkpoint, *flag, "--seq-length", MAX_POSITIONS, "--max-windows", 1).returncode == 0
