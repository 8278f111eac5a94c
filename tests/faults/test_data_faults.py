"""Bad input and faults in the data tools, run as a user runs them: each case goes through
the command-line tool in a subprocess and checks the exit status, that the message names
the file, flag or id, and that nothing partial is left behind."""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data.indexed_dataset import (
    HEADER_BYTES,
    IndexedDataset,
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
    manifest_file_path,
    read_manifest,
)

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "examples" / "data" / "tokenizer.model"  # LLaMA format, 2000 pieces
TRAIN = ROOT / "examples" / "data" / "shakespeare_train.jsonl"


def tool(name: str, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, **kw)


def preprocess(src, prefix, *extra) -> subprocess.CompletedProcess:
    return tool("preprocess_data", "--input", src, "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                TOKENIZER, "--output-prefix", prefix, "--workers", "1", *extra)


def build(prefix, docs, *, manifest=True, dtype=np.uint16) -> None:
    """Our builder; manifest=False writes exactly the bytes another tool (Megatron-LM) writes."""
    b = IndexedDatasetBuilder(data_file_path(prefix), dtype, manifest=manifest)
    for d in docs:
        b.add_document(np.asarray(d), [len(d)])
    b.finalize(index_file_path(prefix))


def temporaries(directory) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if ".tmp-" in p.name)


DOCS = [list(range(k, k + 7 + k % 5)) for k in range(0, 1500, 37)]
TOP = max(max(d) for d in DOCS)  # 1486


# -- 1. token ids outside the vocabulary -------------------------------------------------------


def test_ids_outside_the_vocabulary_are_reported_with_file_and_id(tmp_path):
    build(tmp_path / "foreign", DOCS, manifest=False)
    res = tool("check_dataset", tmp_path / "foreign", "--vocab-size", 1000)
    assert res.returncode == 1
    bin_path = data_file_path(tmp_path / "foreign")
    assert f"{bin_path}: token id 1000 is outside the vocabulary of 1000 (ids 0..999)" in res.stderr
    assert f"ids span 0..{TOP}" in res.stderr and "Traceback" not in res.stderr
    # the one pass over the foreign .bin is cached beside it; the .bin/.idx are untouched
    assert read_manifest(tmp_path / "foreign").origin == "scan"
    assert temporaries(tmp_path) == []
    ok = tool("check_dataset", tmp_path / "foreign", "--vocab-size", TOP + 1)
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1].endswith(f"| {TOP} |")


def test_tokenizer_flags_give_the_vocabulary(tmp_path, botchan_bpe_model):
    res = preprocess(TRAIN, tmp_path / "plays")  # the shipped 2000-piece tokenizer
    assert res.returncode == 0, res.stderr
    prefix = tmp_path / "plays_text_document"
    same = tool("check_dataset", prefix, "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", TOKENIZER)
    assert same.returncode == 0, same.stderr
    other = tool("check_dataset", prefix, "--tokenizer-type", "SentencePieceTokenizer",
                 "--tokenizer-model", botchan_bpe_model)  # 1000 pieces
    assert other.returncode == 1
    assert f"{data_file_path(prefix)}: token id " in other.stderr and "vocabulary of 1000" in other.stderr
    half = tool("check_dataset", prefix, "--tokenizer-type", "Llama2Tokenizer")
    assert half.returncode == 2 and "--tokenizer-model" in half.stderr
    missing = tool("check_dataset", prefix, "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                   tmp_path / "absent.model")
    assert missing.returncode == 2 and str(tmp_path / "absent.model") in missing.stderr
    assert "Traceback" not in missing.stderr


# -- 2. offset errors ---------------------------------------------------------------------------


def test_offset_error_names_the_idx_and_the_sequence(tmp_path):
    build(tmp_path / "ds", DOCS, manifest=False)
    n = len(DOCS)
    with open(index_file_path(tmp_path / "ds"), "r+b") as f:
        f.seek(HEADER_BYTES + 4 * n + 8 * 5)
        (pointer,) = struct.unpack("<q", f.read(8))
        f.seek(-8, os.SEEK_CUR)
        f.write(struct.pack("<q", pointer + 2))
    res = tool("check_dataset", tmp_path / "ds")
    assert res.returncode == 1
    assert f"{index_file_path(tmp_path / 'ds')}: sequence 5 points at byte {pointer + 2}" in res.stderr


# -- 5 and 6. a killed run: debris and orphaned workers ------------------------------------------


def _children(pid: int) -> set[int]:
    out = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            out |= {int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()}
        except OSError:
            pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_run_leaves_no_orphans_and_its_debris_is_removed_later(tmp_path):
    src = tmp_path / "big.jsonl"
    src.write_bytes(TRAIN.read_bytes() * 6)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(src), "--tokenizer-type",
         "Llama2Tokenizer", "--tokenizer-model", str(TOKENIZER), "--output-prefix", str(out / "plays"),
         "--workers", "2", "--worker-backend", "process", "--partitions", "2", "--log-interval", "200"],
        stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        assert first.startswith("Processed"), first
        workers = _children(proc.pid)
        assert workers, "no worker processes"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    deadline = time.monotonic() + 20
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "workers outlived their killed parent"
    debris = [p.name for p in out.iterdir()]
    assert debris and all(".tmp-" in name for name in debris), debris  # nothing under a final name

    # A live writer of the same prefix (this process) must be left alone.
    live = IndexedDatasetBuilder(data_file_path(out / "plays_text_document"), np.uint16)
    live.add_document([1, 2, 3], [3])
    (live_tmp,) = [p for p in out.iterdir() if p.name.startswith("plays_text_document.bin.tmp-")
                   and p.name not in debris]
    res = tool("check_dataset", out / "plays_text_document")
    assert res.returncode == 1  # the dataset itself does not exist
    for name in debris:
        assert f"removed {out / name}, a temporary left by an interrupted run" in res.stderr
    assert f"{live_tmp} is being written by a running process" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == [live_tmp.name]
    live.discard()

    # the next run of the same prefix removes what a killed run left, and finishes
    small = tmp_path / "small.jsonl"
    small.write_text("".join(TRAIN.read_text().splitlines(keepends=True)[:20]))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(src),
                             "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(TOKENIZER),
                             "--output-prefix", str(out / "plays"), "--workers", "1", "--log-interval", "200"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr.readline().startswith("Processed")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    left = temporaries(out)
    assert left
    again = preprocess(small, out / "plays")
    assert again.returncode == 0, again.stderr
    for name in left:
        assert f"removed {out / name}" in again.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "plays_text_document.bin", "plays_text_document.idx", "plays_text_document.manifest.json"]


# -- 7. the manifest: files from different runs, a .bin changed in place --------------------------


def test_manifest_catches_files_from_different_runs_and_changes_in_place(tmp_path):
    build(tmp_path / "a", DOCS)
    good = tool("check_dataset", tmp_path / "a")
    assert good.returncode == 0 and good.stdout.splitlines()[-1].endswith(f"| {TOP} |")  # id from the manifest

    # a .bin of another run with the same size (same lengths, other tokens)
    build(tmp_path / "b", [[x + 1 for x in d] for d in DOCS])
    os.replace(data_file_path(tmp_path / "b"), data_file_path(tmp_path / "a"))
    res = tool("check_dataset", tmp_path / "a")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert f"{data_file_path(tmp_path / 'a')}: the CRC-32 of its first and last MiB is" in res.stderr
    assert str(manifest_file_path(tmp_path / "a")) in res.stderr and "different runs" in res.stderr

    # an .idx of another run with the same size (same counts, other boundaries)
    build(tmp_path / "c", DOCS)
    flat = [x for d in DOCS for x in d]
    cuts = np.cumsum([len(d) for d in DOCS])[:-1] + 1
    build(tmp_path / "e", [list(p) for p in np.split(np.asarray(flat), cuts)])
    os.replace(index_file_path(tmp_path / "e"), index_file_path(tmp_path / "c"))
    res = tool("check_dataset", tmp_path / "c")
    assert res.returncode == 1
    assert f"{index_file_path(tmp_path / 'c')}: the CRC-32 is" in res.stderr

    # one token changed in place in the middle of a larger .bin: only --deep reads it
    build(tmp_path / "d", [np.arange(1_500_000) % 1000])
    with open(data_file_path(tmp_path / "d"), "r+b") as f:
        f.seek(1_500_000)
        f.write(b"\x07\x00")
    cheap = tool("check_dataset", tmp_path / "d")
    assert cheap.returncode == 0 and "only its first and last MiB were re-read (--deep checks all of it)" in cheap.stderr
    deep = tool("check_dataset", tmp_path / "d", "--deep")
    assert deep.returncode == 1
    assert f"{data_file_path(tmp_path / 'd')}: the CRC-32 is" in deep.stderr


def test_without_a_manifest_the_checker_says_what_it_could_not_check(tmp_path):
    build(tmp_path / "foreign", DOCS, manifest=False)
    res = tool("check_dataset", tmp_path / "foreign")
    assert res.returncode == 0
    assert f"no manifest {manifest_file_path(tmp_path / 'foreign')}" in res.stderr
    assert "could not check that the .idx and .bin come from the same run" in res.stderr
    assert res.stdout.splitlines()[-1].endswith("| n/a |")
    assert not Path(manifest_file_path(tmp_path / "foreign")).exists()  # a plain check writes nothing
    deep = tool("check_dataset", tmp_path / "foreign", "--deep")
    assert deep.returncode == 0 and f"wrote {manifest_file_path(tmp_path / 'foreign')}" in deep.stderr


def test_merge_writes_a_manifest_and_refuses_an_inconsistent_input(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    build(shards / "a", DOCS[:10])
    build(shards / "b", DOCS[10:], manifest=False)
    res = tool("merge_datasets", "--input", shards, "--output-prefix", tmp_path / "merged")
    assert res.returncode == 0, res.stderr
    m = read_manifest(tmp_path / "merged")
    assert m.origin == "builder" and m.documents == len(DOCS) and m.max_token_id == TOP
    assert tool("check_dataset", tmp_path / "merged", "--deep").returncode == 0
    build(tmp_path / "other", [[x + 1 for x in d] for d in DOCS[:10]])
    os.replace(data_file_path(tmp_path / "other"), data_file_path(shards / "a"))
    bad = tool("merge_datasets", "--input", shards, "--output-prefix", tmp_path / "again")
    assert bad.returncode == 1 and f"{data_file_path(shards / 'a')}: the CRC-32 of its first" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("again")) == []


# -- 9. empty input ----------------------------------------------------------------------------


def test_empty_input_fails_naming_it_unless_allowed(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    res = preprocess(empty, tmp_path / "out")
    assert res.returncode == 2
    assert f"--input {empty}: no tokens in 0 documents" in res.stderr and "--allow-empty" in res.stderr
    assert "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]
    blank_docs = tmp_path / "blank.jsonl"
    blank_docs.write_text(json.dumps({"text": ""}) + "\n")
    res = tool("preprocess_data", "--input", blank_docs, "--tokenizer-type", "SentencePieceTokenizer",
               "--tokenizer-model", TOKENIZER, "--output-prefix", tmp_path / "out", "--workers", "1")
    assert res.returncode == 2 and "no tokens in 1 documents" in res.stderr
    ok = preprocess(empty, tmp_path / "out", "--allow-empty")
    assert ok.returncode == 0, ok.stderr
    assert IndexedDataset(tmp_path / "out_text_document").document_count == 0


# -- 11. a GGUF file with a good magic and a corrupt body ---------------------------------------


def test_truncated_gguf_names_the_tensor(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    res = tool("convert_checkpoint", "--source-format", "gguf", "--target-format", "hf", "--load", path,
               "--save", tmp_path / "out")
    assert res.returncode != 0
    assert f"{path}: tensor 'output_norm.weight'" in res.stderr and "runs past the end of the file" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()
