"""The manifest beside a dataset, the trainer-facing checks, and stale temporaries."""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data import indexed_dataset as idx
from megatron_ext.data.indexed_dataset import (
    HEADER_BYTES,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    TokenRangeError,
    WorkDirectory,
    check_dataset,
    check_token_range,
    data_file_path,
    index_file_path,
    manifest_file_path,
    read_manifest,
    remove_stale_temporaries,
    token_range,
    verify_dataset,
)

RNG = np.random.default_rng(7)
DOCS = [RNG.integers(3, 1900, size=int(n)) for n in RNG.integers(0, 400, size=60)]


def build(prefix, docs=DOCS, *, manifest=True, dtype=np.uint16):
    b = IndexedDatasetBuilder(data_file_path(prefix), dtype, manifest=manifest)
    for d in docs:
        b.add_document(d, [len(d)])
    b.finalize(index_file_path(prefix))


def test_builder_records_the_checksums_and_token_range_of_what_it_wrote(tmp_path):
    b = IndexedDatasetBuilder(data_file_path(tmp_path / "ds"), np.uint16)
    for d in DOCS:
        b.add_document(d, [len(d)])
    with pytest.raises(ValueError, match="does not fit in uint16"):
        b.add_item(np.array([1, 70000]))  # refused: not recorded either
    b.add_item(np.array([2, 1], dtype=np.int8))
    b.end_document()
    b.finalize(index_file_path(tmp_path / "ds"))
    m = read_manifest(tmp_path / "ds")
    flat = np.concatenate(DOCS + [np.array([2, 1])])
    assert m.origin == "builder" and m.dtype == "uint16" and m.documents == len(DOCS) + 1
    assert (m.min_token_id, m.max_token_id) == (int(flat.min()), int(flat.max())) and m.tokens == flat.size
    assert m.bin_crc32 == zlib.crc32(Path(data_file_path(tmp_path / "ds")).read_bytes())
    assert m.idx_crc32 == zlib.crc32(Path(index_file_path(tmp_path / "ds")).read_bytes())
    assert m.idx_bytes == os.path.getsize(index_file_path(tmp_path / "ds"))


def test_merge_records_the_token_range_of_its_inputs(tmp_path):
    build(tmp_path / "a", DOCS[:30])
    build(tmp_path / "b", DOCS[30:], manifest=False)
    idx.merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    m = read_manifest(tmp_path / "m")
    flat = np.concatenate(DOCS)
    assert (m.min_token_id, m.max_token_id) == (int(flat.min()), int(flat.max()))
    assert m.bin_crc32 == zlib.crc32(Path(data_file_path(tmp_path / "m")).read_bytes())
    check_dataset(tmp_path / "m", deep=True)


def test_verify_dataset_raises_the_checkers_message(tmp_path):
    build(tmp_path / "ds", manifest=False)
    verify_dataset(tmp_path / "ds")
    with open(index_file_path(tmp_path / "ds"), "r+b") as f:
        f.seek(HEADER_BYTES + 4 * len(DOCS) + 8 * 7)
        f.write(struct.pack("<q", 2))
    with pytest.raises(IndexedDatasetError) as from_check:
        check_dataset(tmp_path / "ds")
    with pytest.raises(IndexedDatasetError) as from_verify:
        verify_dataset(tmp_path / "ds")
    assert str(from_verify.value) == str(from_check.value)
    assert "sequence 7 points at byte 2" in str(from_verify.value) and "offset error" in str(from_verify.value)


def test_token_range_of_a_foreign_dataset_is_scanned_once_and_cached(tmp_path, monkeypatch):
    build(tmp_path / "ds", manifest=False)
    flat = np.concatenate(DOCS)
    assert token_range(tmp_path / "ds") == (int(flat.min()), int(flat.max()))
    assert read_manifest(tmp_path / "ds").origin == "scan"
    monkeypatch.setattr(idx, "scan_dataset", lambda ds: pytest.fail("scanned again"))
    assert check_token_range(tmp_path / "ds", 2000) == int(flat.max())
    with pytest.raises(TokenRangeError) as err:
        check_token_range(tmp_path / "ds", 1000)
    position = int(np.flatnonzero(flat >= 1000)[0])
    doc = int(np.searchsorted(np.cumsum([len(d) for d in DOCS]), position, side="right"))
    assert f"{data_file_path(tmp_path / 'ds')}: token id {int(flat[position])} is outside" in str(err.value)
    assert f"at document {doc}, sequence {doc}," in str(err.value)


def test_empty_dataset_has_no_token_range(tmp_path):
    build(tmp_path / "e", [])
    assert read_manifest(tmp_path / "e").max_token_id is None
    assert check_token_range(tmp_path / "e", 10) is None


def test_corrupt_manifest_is_named(tmp_path):
    build(tmp_path / "ds")
    Path(manifest_file_path(tmp_path / "ds")).write_text("{not json")
    with pytest.raises(IndexedDatasetError, match=r"ds\.manifest\.json: not a readable dataset manifest"):
        verify_dataset(tmp_path / "ds")


def test_only_stale_temporaries_are_removed(tmp_path):
    prefix = tmp_path / "out_text_document"
    live = IndexedDatasetBuilder(data_file_path(prefix), np.uint16)  # holds the lock on its temporary
    (live_tmp,) = [p for p in tmp_path.iterdir()]
    stale = tmp_path / "out_text_document.idx.tmp-0123456789abcdef"
    stale.write_bytes(b"left by a killed run")
    work = WorkDirectory(tmp_path / "out", "partitions")  # live work directory
    dead = tmp_path / ".out-partitions.tmp-feedface"
    dead.mkdir()
    (dead / ".lock").write_bytes(b"")
    young = tmp_path / ".out-partitions.tmp-young"  # no lock file yet: its creator may be starting
    young.mkdir()
    other = tmp_path / "other_text_document.bin.tmp-0123456789abcdef"
    other.write_bytes(b"another prefix")
    removed = remove_stale_temporaries(prefix)
    assert sorted(removed) == sorted([str(stale), str(dead)])
    assert live_tmp.exists() and Path(work.path).is_dir() and young.is_dir() and other.exists()
    work.close()
    live.discard()
    assert not Path(work.path).exists() and not live_tmp.exists()
