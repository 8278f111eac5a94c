"""A split nobody asks samples of is not built, so it cannot fail: a one-document dataset
trains with --eval-iters 0 although its validation share holds no document, and the
"split is empty" message is kept for a split that is really asked to supply samples."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data.blend import build_gpt_datasets
from megatron_ext.data.gpt_dataset import DatasetError, GPTDatasetConfig
from megatron_ext.data.indexed_dataset import IndexedDatasetBuilder, data_file_path, index_file_path

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "examples" / "data" / "tokenizer.model"  # 2000 pieces: the tiny model's vocabulary
ONE_DOCUMENT = [list(range(3, 400))]


def build(prefix, docs) -> None:
    b = IndexedDatasetBuilder(data_file_path(prefix), np.uint16)
    for d in docs:
        b.add_document(np.asarray(d), [len(d)])
    b.finalize(index_file_path(prefix))


def config() -> GPTDatasetConfig:
    return GPTDatasetConfig(sequence_length=32, eod_token_id=2)


@pytest.mark.parametrize("blend", ["one", "weighted", "unweighted"])
def test_a_split_with_no_samples_requested_is_skipped(tmp_path, blend):
    build(tmp_path / "one", ONE_DOCUMENT)
    prefix = str(tmp_path / "one")
    data_path = {"one": prefix, "weighted": f"0.5 {prefix} 0.5 {prefix}",
                 "unweighted": ([prefix, prefix], None)}[blend]
    train, valid, test = build_gpt_datasets(config(), data_path, "98,2,0", [4, 0, 0])
    assert len(train) >= 4 and valid is None and test is None


def test_an_empty_split_asked_for_samples_still_names_itself(tmp_path):
    build(tmp_path / "one", ONE_DOCUMENT)
    with pytest.raises(DatasetError, match=r"valid split, sequences \[0, 0\)\): the split is empty .* "
                                           r"cannot supply 3 samples"):
        build_gpt_datasets(config(), str(tmp_path / "one"), "98,2,0", [4, 3, 0])


def train(tmp_path, prefix, *extra) -> subprocess.CompletedProcess:
    argv = ["--model", "tiny", "--seq-length", "32", "--micro-batch-size", "1", "--train-iters", "2", "--lr", "1e-3",
            "--data-path", str(prefix), "--split", "98,2,0", "--tokenizer-type", "Llama2Tokenizer",
            "--tokenizer-model", str(TOKENIZER), "--log-dir", str(tmp_path / "logs"), *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["MEGATRON_EXT_FORCE_CPU"] = "1"
    return subprocess.run([sys.executable, str(ROOT / "pretrain_maskllm.py"), *argv], capture_output=True,
                          text=True, timeout=300, env=env)


def test_one_document_trains_without_evaluation(tmp_path):
    """The case of the report: --eval-iters 0 asks nothing of the (empty) validation split."""
    build(tmp_path / "one", ONE_DOCUMENT)
    res = train(tmp_path, tmp_path / "one", "--eval-iters", "0")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "split is empty" not in res.stderr
    # with evaluation the same dataset is refused, naming the split that cannot supply it
    res = train(tmp_path, tmp_path / "one", "--eval-iters", "1", "--eval-interval", "1")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "valid split" in res.stderr and "the split is empty" in res.stderr
