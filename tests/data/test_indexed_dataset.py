"""The native .bin/.idx builder and the reader, against megatron-core 0.16.1 as the oracle."""
from __future__ import annotations

import os
import pickle
import re
import struct
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch
from megatron.core.datasets import indexed_dataset as mcore

from megatron_ext import assets
from megatron_ext.data.indexed_dataset import (
    HEADER_BYTES,
    IndexedDataset,
    IndexedDatasetBuilder,
    IndexedDatasetError,
    check_dataset,
    data_file_path,
    dtype_for_vocab,
    index_file_path,
)


@pytest.fixture(scope="module")
def sentences() -> list[np.ndarray]:
    """botchan.txt split into sentences and tokenized with its own 1000-piece BPE model."""
    sp = spm.SentencePieceProcessor(model_file=str(assets.botchan_model("bpe")))
    text = " ".join(assets.botchan_text().read_text(encoding="utf-8-sig").split())
    pieces = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
    ids = [np.asarray(x, dtype=np.int32) for x in sp.encode(pieces)]
    assert len(ids) > 2000 and sum(map(len, ids)) > 50_000
    return ids


@pytest.fixture(scope="module")
def documents(sentences) -> list[list[np.ndarray]]:
    """Documents of 1 to 8 sentences; every 50th document is empty, one sentence is empty."""
    docs, i, k = [], 0, 0
    while i < len(sentences):
        size = 0 if k % 50 == 49 else 1 + (k * 5) % 8
        docs.append(sentences[i : i + size])
        i += size
        k += 1
    docs[3] = docs[3] + [np.zeros(0, dtype=np.int32)]
    return docs


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def assert_same_files(prefix_a, prefix_b) -> None:
    assert read(data_file_path(prefix_a)) == read(data_file_path(prefix_b))
    assert read(index_file_path(prefix_a)) == read(index_file_path(prefix_b))


def fill(builder, documents, pattern: str, torch_items: bool = False) -> None:
    """Add documents with add_item/end_document ('item'), add_document ('document') or both."""
    for k, doc in enumerate(documents):
        if pattern == "item" or (pattern == "mixed" and k % 2):
            for s in doc:
                builder.add_item(torch.from_numpy(s) if torch_items else s)
            builder.end_document()
        else:
            tokens = np.concatenate(doc) if doc else np.zeros(0, dtype=np.int32)
            builder.add_document(tokens, [len(s) for s in doc])


def build_reference(prefix, documents, dtype, pattern="mixed") -> None:
    ref = mcore.IndexedDatasetBuilder(data_file_path(prefix), dtype=dtype)
    fill(ref, documents, pattern, torch_items=True)
    ref.finalize(index_file_path(prefix))


def build_ours(prefix, documents, dtype, pattern="mixed") -> None:
    ours = IndexedDatasetBuilder(data_file_path(prefix), dtype=dtype)
    fill(ours, documents, pattern)
    ours.finalize(index_file_path(prefix))


# -- byte-identical output ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("pattern", ["item", "document", "mixed"])
def test_byte_identical_to_megatron(tmp_path, documents, dtype, pattern):
    build_reference(tmp_path / "ref", documents, dtype, pattern)
    build_ours(tmp_path / "ours", documents, dtype, pattern)
    assert_same_files(tmp_path / "ref", tmp_path / "ours")
    header = read(index_file_path(tmp_path / "ours"))[:HEADER_BYTES]
    assert header[:9] == b"MMIDIDX\x00\x00"
    assert struct.unpack("<QBQQ", header[9:]) == (
        1,
        mcore.DType.code_from_dtype(dtype),
        sum(len(d) for d in documents),
        len(documents) + 1,
    )


def test_any_integer_input_is_converted(tmp_path, documents):
    """Lists, other integer dtypes, strided views, big-endian arrays and torch tensors as tokens;
    lists, tuples, arrays and numpy scalars as lengths (and durable=True writes the same bytes)."""
    docs = documents[:300]
    build_reference(tmp_path / "ref", docs, np.uint16, "item")
    conversions = [
        lambda s: s.tolist(),
        lambda s: s.astype(np.int64),
        lambda s: s.astype(np.uint16),
        lambda s: s.astype(np.uint32),
        lambda s: np.repeat(s, 2)[::2],  # not contiguous
        lambda s: s.astype(">i4"),
        lambda s: torch.from_numpy(s.astype(np.int64)),
    ]
    length_kinds = [
        lambda ls: ls,
        tuple,
        lambda ls: np.array(ls, dtype=np.int32),
        lambda ls: [np.int64(x) for x in ls],
        lambda ls: np.array(ls, dtype=np.uint8) if max(ls, default=0) < 256 else np.array(ls),
    ]
    ours = IndexedDatasetBuilder(data_file_path(tmp_path / "ours"), dtype=np.uint16, durable=True)
    for k, doc in enumerate(docs):
        convert = conversions[k % len(conversions)]
        if k % 2:
            for s in doc:
                ours.add_item(convert(s))
            ours.end_document()
        else:
            tokens = np.concatenate(doc) if doc else np.zeros(0, dtype=np.int32)
            ours.add_document(convert(tokens), length_kinds[(k // 2) % len(length_kinds)]([len(s) for s in doc]))
    ours.finalize(index_file_path(tmp_path / "ours"))
    assert_same_files(tmp_path / "ref", tmp_path / "ours")


def test_add_index_merge_matches_megatron(tmp_path, documents):
    shards = [documents[:100], [], documents[100:400], documents[400:]]
    for i, shard in enumerate(shards):
        build_reference(tmp_path / f"shard{i}", shard, np.uint16)
    ref = mcore.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    ours = IndexedDatasetBuilder(tmp_path / "ours.bin", dtype=np.uint16)
    # Merge interleaved with direct adds, which exercises the index shift both ways.
    fill(ref, documents[:7], "mixed", torch_items=True)
    fill(ours, documents[:7], "mixed")
    for i in range(len(shards)):
        ref.add_index(str(tmp_path / f"shard{i}"))
        ours.add_index(tmp_path / f"shard{i}")
    ref.finalize(str(tmp_path / "ref.idx"))
    ours.finalize(tmp_path / "ours.idx")
    assert_same_files(tmp_path / "ref", tmp_path / "ours")
    merged = IndexedDataset(tmp_path / "ours")
    assert merged.document_count == 7 + len(documents)
    merged.verify()


# -- interoperability -------------------------------------------------------------------------


def test_megatron_reads_ours_and_we_read_megatron(tmp_path, documents, sentences):
    build_ours(tmp_path / "ours", documents, np.uint16)
    build_reference(tmp_path / "ref", documents, np.uint16)
    theirs_on_ours = mcore.IndexedDataset(str(tmp_path / "ours"))
    ours_on_theirs = IndexedDataset(tmp_path / "ref")
    flat = [s for d in documents for s in d]
    assert len(theirs_on_ours) == len(ours_on_theirs) == len(flat)
    for i in range(0, len(flat), 7):
        assert np.array_equal(theirs_on_ours[i], flat[i])
        assert np.array_equal(ours_on_theirs[i], flat[i])
        if len(flat[i]) >= 3:
            assert np.array_equal(theirs_on_ours.get(i, 1, 2), ours_on_theirs.get(i, 1, 2))
    assert np.array_equal(theirs_on_ours.document_indices, ours_on_theirs.document_indices)
    assert np.array_equal(theirs_on_ours.sequence_lengths, ours_on_theirs.sequence_lengths)
    assert ours_on_theirs.dtype is np.uint16


def test_reader_views_and_attributes(tmp_path, documents):
    build_ours(tmp_path / "ds", documents, np.int32)
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.sequence_lengths.dtype == np.int32
    assert ds.sequence_pointers.dtype == np.int64
    assert ds.document_indices.dtype == np.int64
    assert ds.dtype is np.int32
    flat = [s for d in documents for s in d]
    assert ds.token_count == sum(map(len, flat))
    seq = ds[5]
    assert not seq.flags.owndata and not seq.flags.writeable  # a view into the mapped .bin
    assert np.array_equal(ds[-1], flat[-1])
    assert [a.tolist() for a in ds[10:14]] == [a.tolist() for a in flat[10:14]]
    assert np.array_equal(ds.get(5, offset=2, length=3), flat[5][2:5])
    assert np.array_equal(ds.get(5, offset=2), flat[5][2:])
    for k in (0, 3, 49, len(documents) - 1):
        want = np.concatenate(documents[k]) if documents[k] else np.zeros(0)
        assert np.array_equal(ds.document(k), want)
    again = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(again[7], ds[7]) and len(again) == len(ds)


def test_out_of_range_access(tmp_path, documents):
    build_ours(tmp_path / "ds", documents[:20], np.uint16)
    ds = IndexedDataset(tmp_path / "ds")
    n, size = len(ds), int(ds.sequence_lengths[0])
    with pytest.raises(IndexError, match=f"sequence index {n} out of range"):
        ds[n]
    with pytest.raises(IndexError):
        ds[-n - 1]
    with pytest.raises(IndexError):
        ds.get(n)
    with pytest.raises(ValueError, match="offset"):
        ds.get(0, offset=size + 1)
    with pytest.raises(ValueError, match="length"):
        ds.get(0, offset=1, length=size)
    with pytest.raises(ValueError, match="length"):
        ds.get(0, length=-1)
    with pytest.raises(ValueError, match="contiguous"):
        ds[0:4:2]
    with pytest.raises(TypeError):
        ds["0"]
    assert ds.get(0, offset=size).size == 0


def test_dtype_for_vocab_matches_megatron():
    for vocab in (None, 1000, 32000, 65499, 65500, 128256):
        assert dtype_for_vocab(vocab) is mcore.DType.optimal_dtype(vocab)


# -- atomicity and cleanup ------------------------------------------------------------------


def test_nothing_final_before_finalize(tmp_path, documents):
    out = tmp_path / "out"
    out.mkdir()
    builder = IndexedDatasetBuilder(out / "ds.bin", dtype=np.uint16)
    fill(builder, documents[:50], "mixed")
    names = os.listdir(out)
    assert len(names) == 1 and names[0].startswith("ds.bin.tmp-")  # side files are unlinked
    builder.finalize(out / "ds.idx")
    assert sorted(os.listdir(out)) == ["ds.bin", "ds.idx", "ds.manifest.json"]
    with pytest.raises(RuntimeError, match="already finalized"):
        builder.add_item([1, 2])


def test_finalize_refuses_an_unended_document(tmp_path, sentences):
    builder = IndexedDatasetBuilder(tmp_path / "ds.bin", dtype=np.uint16)
    builder.add_document(sentences[0], [len(sentences[0])])
    builder.add_item(sentences[1])
    builder.add_item(sentences[2])
    with pytest.raises(RuntimeError, match="2 sequences were added after the last document ended"):
        builder.finalize(tmp_path / "ds.idx")
    assert [n for n in os.listdir(tmp_path) if not n.startswith("ds.bin.tmp-")] == []  # nothing final
    builder.end_document()
    builder.finalize(tmp_path / "ds.idx")
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.document_count == 2 and len(ds) == 3
    assert np.array_equal(ds.document(1), np.concatenate(sentences[1:3]))


def test_dropped_builder_leaves_nothing(tmp_path, documents):
    builder = IndexedDatasetBuilder(tmp_path / "ds.bin", dtype=np.uint16)
    fill(builder, documents[:50], "mixed")
    del builder  # the last reference: destroyed here
    assert os.listdir(tmp_path) == []
    with pytest.raises(KeyError):
        with IndexedDatasetBuilder(tmp_path / "ds.bin", dtype=np.uint16) as b:
            fill(b, documents[:5], "item")
            raise KeyError("interrupted")
    assert os.listdir(tmp_path) == []


def test_existing_dataset_replaced_only_at_finalize(tmp_path, documents):
    build_ours(tmp_path / "ds", documents[:10], np.uint16)
    before = read(data_file_path(tmp_path / "ds"))
    builder = IndexedDatasetBuilder(data_file_path(tmp_path / "ds"), dtype=np.uint16)
    fill(builder, documents[10:40], "item")
    assert read(data_file_path(tmp_path / "ds")) == before
    assert IndexedDataset(tmp_path / "ds").document_count == 10
    # A bad index path fails before anything changes, and the builder stays usable.
    with pytest.raises(FileNotFoundError) as err:
        builder.finalize(tmp_path / "missing" / "ds.idx")
    assert err.value.filename == str(tmp_path / "missing" / "ds.idx")
    builder.finalize(index_file_path(tmp_path / "ds"))
    ds = IndexedDataset(tmp_path / "ds")
    assert ds.document_count == 30
    ds.verify()
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx", "ds.manifest.json"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_memory_does_not_grow_with_the_dataset(tmp_path):
    """800k sequences: megatron-core's in-RAM lists grow by tens of MB, ours stay flat."""
    tokens = np.arange(100_000, dtype=np.int64) % 1000
    lengths = np.ones(100_000, dtype=np.int64)
    rounds = 8

    def growth(builder, add) -> int:
        start = _rss_bytes()
        for _ in range(rounds):
            add(builder)
        return _rss_bytes() - start

    ours = IndexedDatasetBuilder(tmp_path / "ours.bin", dtype=np.uint16)
    ours_growth = growth(ours, lambda b: b.add_document(tokens, lengths))
    ref = mcore.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    ref_growth = growth(ref, lambda b: b.add_document(tokens, lengths))
    del ref
    assert ref_growth > 10 << 20  # the measurement can see list growth
    assert ours_growth < 4 << 20
    ours.finalize(tmp_path / "ours.idx")
    ds = IndexedDataset(tmp_path / "ours")
    assert len(ds) == rounds * tokens.size and ds.document_count == rounds
    ds.verify()


# -- bad input to the builder -----------------------------------------------------------------


def test_token_out_of_range_is_refused_and_builder_unchanged(tmp_path, documents):
    docs = documents[:30]
    build_reference(tmp_path / "ref", docs, np.uint16, "item")
    ours = IndexedDatasetBuilder(tmp_path / "ours.bin", dtype=np.uint16)
    for k, doc in enumerate(docs):
        if k == 10:
            with pytest.raises(ValueError, match=r"token id 65536 at position 2 does not fit in uint16"):
                ours.add_item(np.array([5, 6, 65536, 7], dtype=np.int64))
            with pytest.raises(ValueError, match=r"token id -1 at position 0 does not fit in uint16"):
                ours.add_document([-1, 4], [2])
        for s in doc:
            ours.add_item(s)
        ours.end_document()
    ours.finalize(tmp_path / "ours.idx")
    assert_same_files(tmp_path / "ref", tmp_path / "ours")


def test_builder_rejects_bad_arguments(tmp_path, sentences):
    with pytest.raises(ValueError, match="does not fit in uint8"):
        IndexedDatasetBuilder(tmp_path / "a.bin", dtype=np.uint8).add_item(np.concatenate(sentences[:50]))
    b = IndexedDatasetBuilder(tmp_path / "b.bin", dtype=np.int32)
    with pytest.raises(TypeError, match="integers"):
        b.add_item(np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="one-dimensional"):
        b.add_item(np.ones((2, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="sum to 5 but the document has 4 tokens"):
        b.add_document([1, 2, 3, 4], [2, 3])
    with pytest.raises(ValueError, match="negative"):
        b.add_document([1, 2], [3, -1])
    with pytest.raises(TypeError, match="positional arguments"):
        b.add_item()
    with pytest.raises(ValueError, match="does not fit in int32"):
        b.add_document([1], [2**31])
    with pytest.raises(ValueError, match="float32"):
        IndexedDatasetBuilder(tmp_path / "c.bin", dtype=np.float32)
    assert b.sequence_count == 0 and b.document_count == 0


def test_unwritable_output_names_the_file(tmp_path):
    target = tmp_path / "no" / "such" / "dir" / "ds.bin"
    with pytest.raises(FileNotFoundError) as err:
        IndexedDatasetBuilder(target, dtype=np.uint16)
    assert str(target) in str(err.value)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="file/ds.bin"):
        IndexedDatasetBuilder(blocker / "ds.bin", dtype=np.uint16)


def test_add_index_errors_name_the_file_and_change_nothing(tmp_path, documents):
    build_reference(tmp_path / "good", documents[:20], np.uint16)
    build_reference(tmp_path / "wide", documents[:20], np.int32)
    build_reference(tmp_path / "bad", documents[:20], np.uint16)
    raw = bytearray(read(tmp_path / "bad.idx"))
    raw[0:1] = b"X"
    (tmp_path / "bad.idx").write_bytes(bytes(raw))
    build_reference(tmp_path / "short", documents[:20], np.uint16)
    with open(tmp_path / "short.bin", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "short.bin") - 2)

    ours = IndexedDatasetBuilder(tmp_path / "ours.bin", dtype=np.uint16)
    ours.add_index(tmp_path / "good")
    with pytest.raises(FileNotFoundError) as err:
        ours.add_index(tmp_path / "missing")
    assert err.value.filename == str(tmp_path / "missing.idx")
    with pytest.raises(IndexedDatasetError, match=r"bad\.idx: bad magic"):
        ours.add_index(tmp_path / "bad")
    with pytest.raises(IndexedDatasetError, match=r"wide\.idx: dtype int32 does not match the builder's dtype uint16"):
        ours.add_index(tmp_path / "wide")
    with pytest.raises(IndexedDatasetError, match=r"short\.bin: size"):
        ours.add_index(tmp_path / "short")
    ours.add_index(tmp_path / "good")
    ours.finalize(tmp_path / "ours.idx")

    ref = mcore.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    ref.add_index(str(tmp_path / "good"))
    ref.add_index(str(tmp_path / "good"))
    ref.finalize(str(tmp_path / "ref.idx"))
    assert_same_files(tmp_path / "ref", tmp_path / "ours")


# -- bad files for the reader -----------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path, documents):
    prefix = tmp_path / "ds"
    build_ours(prefix, documents[:200], np.uint16)
    return prefix


def _patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_truncated_bin(dataset):
    bin_path = data_file_path(dataset)
    with open(bin_path, "r+b") as f:
        f.truncate(os.path.getsize(bin_path) - 2)
    with pytest.raises(IndexedDatasetError, match=re.escape(bin_path) + ".*truncated"):
        IndexedDataset(dataset)


def test_wrong_magic(dataset):
    _patch(index_file_path(dataset), 0, b"NOTANIDX\x00")
    with pytest.raises(IndexedDatasetError, match=re.escape(index_file_path(dataset)) + ": bad magic"):
        IndexedDataset(dataset)


def test_wrong_version(dataset):
    _patch(index_file_path(dataset), 9, struct.pack("<Q", 2))
    with pytest.raises(IndexedDatasetError, match="unsupported version 2"):
        IndexedDataset(dataset)


def test_unknown_dtype_code(dataset):
    _patch(index_file_path(dataset), 17, bytes([9]))
    with pytest.raises(IndexedDatasetError, match="unknown dtype code 9"):
        IndexedDataset(dataset)


def test_truncated_idx(dataset):
    idx_path = index_file_path(dataset)
    with open(idx_path, "r+b") as f:
        f.truncate(os.path.getsize(idx_path) - 8)
    with pytest.raises(IndexedDatasetError, match="does not match its header"):
        IndexedDataset(dataset)
    with open(idx_path, "r+b") as f:
        f.truncate(20)
    with pytest.raises(IndexedDatasetError, match="too short"):
        IndexedDataset(dataset)


def test_idx_and_bin_from_different_runs(tmp_path, documents, dataset):
    build_ours(tmp_path / "other", documents[200:400], np.uint16)
    os.replace(data_file_path(tmp_path / "other"), data_file_path(dataset))
    with pytest.raises(IndexedDatasetError, match="different runs"):
        IndexedDataset(dataset)


def test_offset_error_in_the_middle_is_caught_by_verify(dataset):
    ds = IndexedDataset(dataset)
    n = len(ds)
    del ds
    _patch(index_file_path(dataset), HEADER_BYTES + 4 * n + 8 * 57, struct.pack("<q", 12345))
    ds = IndexedDataset(dataset)  # the O(1) checks on open cannot see it
    with pytest.raises(IndexedDatasetError, match="sequence 57 points at byte 12345.*offset error"):
        ds.verify()
    with pytest.raises(IndexedDatasetError, match="sequence 57"):
        check_dataset(dataset)


def test_non_monotone_document_index_is_caught_by_verify(dataset):
    ds = IndexedDataset(dataset)
    n, docs = len(ds), ds.document_indices.copy()
    del ds
    _patch(index_file_path(dataset), HEADER_BYTES + 12 * n + 8 * 30, struct.pack("<q", int(docs[31]) + 1))
    with pytest.raises(IndexedDatasetError, match="document index entry 31"):
        IndexedDataset(dataset).verify()


def test_negative_length_is_caught(dataset):
    _patch(index_file_path(dataset), HEADER_BYTES + 4 * 11, struct.pack("<i", -3))
    with pytest.raises(IndexedDatasetError, match="sequence 11 has negative length -3"):
        IndexedDataset(dataset).verify()


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.idx"):
        IndexedDataset(tmp_path / "nothing")
