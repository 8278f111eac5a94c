"""tools/check_dataset.py and tools/merge_datasets.py, called through main(argv) and as scripts."""
from __future__ import annotations

import importlib.util
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from megatron.core.datasets import indexed_dataset as mcore

from megatron_ext import assets
from megatron_ext.data.indexed_dataset import HEADER_BYTES, IndexedDataset, data_file_path, index_file_path

ROOT = Path(__file__).resolve().parents[2]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_tool = load_tool("check_dataset")
merge_tool = load_tool("merge_datasets")


@pytest.fixture(scope="module")
def documents() -> list[list[np.ndarray]]:
    """botchan.txt paragraphs of 1-4 sentences, tokenized with its unigram model."""
    sp = spm.SentencePieceProcessor(model_file=str(assets.botchan_model("unigram")))
    text = " ".join(assets.botchan_text().read_text(encoding="utf-8-sig").split())
    ids = [np.asarray(x, dtype=np.int32) for x in sp.encode(re.split(r"(?<=[.!?])\s+", text)) if x]
    docs, i, k = [], 0, 0
    while i < len(ids):
        size = 1 + k % 4
        docs.append(ids[i : i + size])
        i += size
        k += 1
    return docs


def megatron_build(prefix, docs, dtype=np.uint16) -> None:
    """A dataset written by megatron-core itself, as the tools' input."""
    b = mcore.IndexedDatasetBuilder(data_file_path(prefix), dtype=dtype)
    for doc in docs:
        for s in doc:
            b.add_item(torch.from_numpy(s))
        b.end_document()
    b.finalize(index_file_path(prefix))


def read(path) -> bytes:
    return Path(path).read_bytes()


# -- check_dataset -------------------------------------------------------------------------


def test_check_prints_stats(tmp_path, documents, capsys):
    megatron_build(tmp_path / "good", documents)
    assert check_tool.main([str(tmp_path / "good")]) == 0
    out = capsys.readouterr().out
    lengths = np.array([len(s) for d in documents for s in d])
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99], method="nearest")
    row = (
        f"| {tmp_path / 'good'} | uint16 | {len(documents)} | {lengths.size} | {lengths.sum()} "
        f"| {p50} | {p90} | {p99} | {lengths.max()} | n/a |"  # largest id unknown: no manifest, no scan
    )
    assert row in out.splitlines()
    assert out.startswith("| prefix | dtype | documents |")
    # PREFIX.bin / PREFIX.idx are accepted too.
    assert check_tool.main([str(tmp_path / "good.idx")]) == 0


def test_check_reports_the_first_inconsistency(tmp_path, documents, capsys):
    megatron_build(tmp_path / "good", documents[:100])
    megatron_build(tmp_path / "bad", documents[:100])
    n = sum(len(d) for d in documents[:100])
    with open(tmp_path / "bad.idx", "r+b") as f:  # shift the pointer of sequence 40 by one token
        f.seek(HEADER_BYTES + 4 * n + 8 * 40)
        (pointer,) = struct.unpack("<q", f.read(8))
        f.seek(-8, os.SEEK_CUR)
        f.write(struct.pack("<q", pointer + 2))
    code = check_tool.main([str(tmp_path / "good"), str(tmp_path / "bad"), str(tmp_path / "missing")])
    captured = capsys.readouterr()
    assert code == 1
    assert f"| {tmp_path / 'good'} |" in captured.out
    assert f"{tmp_path / 'bad.idx'}: sequence 40 points at byte {pointer + 2}" in captured.err
    assert "offset error" in captured.err
    assert str(tmp_path / "missing.idx") in captured.err
    assert "2 of 3 datasets failed" in captured.err


def test_check_script_exit_codes(tmp_path, documents):
    megatron_build(tmp_path / "ds", documents[:50])
    script = [sys.executable, str(ROOT / "tools" / "check_dataset.py")]
    ok = subprocess.run(script + [str(tmp_path / "ds")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert f"| {tmp_path / 'ds'} | uint16 | 50 |" in ok.stdout
    with open(tmp_path / "ds.bin", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "ds.bin") - 2)
    bad = subprocess.run(script + [str(tmp_path / "ds")], capture_output=True, text=True)
    assert bad.returncode == 1
    assert f"{tmp_path / 'ds.bin'}: size" in bad.stderr and "truncated" in bad.stderr


# -- merge_datasets ------------------------------------------------------------------------


def test_merge_matches_megatron(tmp_path, documents, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    parts = [documents[:300], documents[300:310], [], documents[310:]]
    for i, part in enumerate(parts):
        megatron_build(shards / f"part_{3 - i:02d}", part)  # sorted order is the reverse of i
    (shards / "README.txt").write_text("not a dataset")
    out = tmp_path / "merged"
    assert merge_tool.main(["--input", str(shards), "--output-prefix", str(out)]) == 0
    assert f"merged 4 datasets into {out}: {len(documents)} documents" in capsys.readouterr().out

    ref = mcore.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for i in range(4):
        ref.add_index(str(shards / f"part_{i:02d}"))
    ref.finalize(str(tmp_path / "ref.idx"))
    assert read(tmp_path / "merged.bin") == read(tmp_path / "ref.bin")
    assert read(tmp_path / "merged.idx") == read(tmp_path / "ref.idx")
    merged = IndexedDataset(out)
    merged.verify()
    flat = [s for d in parts[3] + parts[2] + parts[1] + parts[0] for s in d]
    assert all(np.array_equal(merged[i], flat[i]) for i in range(0, len(flat), 11))


def test_merge_refuses_mixed_dtypes(tmp_path, documents, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    megatron_build(shards / "a", documents[:20], np.uint16)
    megatron_build(shards / "b", documents[20:40], np.int32)
    assert merge_tool.main(["--input", str(shards), "--output-prefix", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{shards / 'b.idx'}: dtype int32 differs from {shards / 'a.idx'} (uint16)" in err
    assert "mixed dtypes" in err
    assert sorted(os.listdir(tmp_path)) == ["shards"]  # nothing written, no temporaries left


def test_merge_input_errors(tmp_path, documents, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    args = ["--input", str(shards), "--output-prefix", str(tmp_path / "out")]
    assert merge_tool.main(args) == 1
    assert "no .bin/.idx pairs to merge" in capsys.readouterr().err
    megatron_build(shards / "a", documents[:20])
    (shards / "lonely.bin").write_bytes(b"\x00\x00")
    assert merge_tool.main(args) == 1
    assert f"{shards / 'lonely.bin'}: no matching lonely.idx" in capsys.readouterr().err
    os.remove(shards / "lonely.bin")
    megatron_build(shards / "b", documents[20:40])
    with open(shards / "b.bin", "r+b") as f:
        f.truncate(10)
    assert merge_tool.main(args) == 1
    assert f"{shards / 'b.bin'}: size 10 bytes" in capsys.readouterr().err
    assert merge_tool.main(["--input", str(tmp_path / "nowhere"), "--output-prefix", str(tmp_path / "o")]) == 1
    assert "not a directory" in capsys.readouterr().err
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "out.idx").exists()


def test_merge_script_into_its_own_directory(tmp_path, documents):
    megatron_build(tmp_path / "a", documents[:30])
    megatron_build(tmp_path / "b", documents[30:60])
    script = [sys.executable, str(ROOT / "tools" / "merge_datasets.py"), "--input", str(tmp_path)]
    run = subprocess.run(script + ["--output-prefix", str(tmp_path / "c")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert IndexedDataset(tmp_path / "c").document_count == 60
    # Running again would merge the previous output into itself: refused.
    again = subprocess.run(script + ["--output-prefix", str(tmp_path / "c")], capture_output=True, text=True)
    assert again.returncode == 1
    assert "the output prefix is also an input" in again.stderr
