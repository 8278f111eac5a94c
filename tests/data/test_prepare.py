"""tools/prepare_dataset.py and megatron_ext.data.prepare on the shipped Shakespeare sample
(eight plays as JSON lines) with its small tokenizer; The Tempest (held-out text) supplies
the new text around injected duplicates."""
import gzip
import io
import json
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data.blend import build_gpt_datasets
from megatron_ext.data.gpt_dataset import GPTDatasetConfig
from megatron_ext.data.indexed_dataset import IndexedDataset
from megatron_ext.data.prepare import PrepareConfig, PrepareError, prepare
from megatron_ext.data.prepare.clean import Cleaner
from megatron_ext.data.prepare.dedup import BloomTable, DiskTable, MemoryTable, digest, digests_array
from megatron_ext.data.prepare.filters import DocumentFilter
from megatron_ext.data.prepare.inputs import RawBlock, read_blocks, resolve_inputs
from megatron_ext.data.prepare.normalize import normalize_text
from megatron_ext.data.prepare.stats import Progress
from megatron_ext.data.preprocess import PreprocessConfig, PreprocessError, preprocess

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "prepare_dataset.py"


@pytest.fixture(scope="module")
def plays(sample_dir):
    return [json.loads(line) for line in (sample_dir / "shakespeare_train.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tempest(sample_dir):
    """Paragraphs of The Tempest of at least 200 characters (text no training document has)."""
    paras = [p.strip() for p in (sample_dir / "shakespeare_heldout.txt").read_text().split("\n\n")]
    return [p for p in paras if len(p) >= 200]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def config(sample_dir, inputs, prefix, **prep):
    pre = PreprocessConfig(inputs=inputs, output_prefix=str(prefix), tokenizer_type="Llama2Tokenizer",
                           tokenizer_model=str(sample_dir / "tokenizer.model"), append_eod=True, workers=2)
    return PrepareConfig(pre, **prep)


def documents(prefix):
    ds = IndexedDataset(prefix)
    return [tuple(ds.document(k).tolist()) for k in range(ds.document_count)]


def long_paragraph(text, at_least=200):
    return next(p for p in text.split("\n\n") if len(p) >= at_least)


def test_no_preparation_option_is_byte_identical_to_preprocess_data(sample_dir, tmp_path):
    c = config(sample_dir, [str(sample_dir / "shakespeare_train.jsonl")], tmp_path / "prep")
    res = prepare(c, log=None)
    assert res.preprocess is not None and res.stats is None
    preprocess(replace(c.preprocess, output_prefix=str(tmp_path / "today")), log=None)
    for ext in (".bin", ".idx"):
        today = (tmp_path / f"today_text_document{ext}").read_bytes()
        assert (tmp_path / f"prep_text_document{ext}").read_bytes() == today


def test_dedup_with_nothing_to_drop_gives_todays_tokens(sample_dir, tmp_path):
    """Preparation reuses preprocess's tokenizing and writing: same documents, same tokens."""
    src = [str(sample_dir / "shakespeare_train.jsonl")]
    prepare(config(sample_dir, src, tmp_path / "prep", dedup="exact"), log=None)
    preprocess(config(sample_dir, src, tmp_path / "today").preprocess, log=None)
    assert documents(tmp_path / "prep_text_document") == documents(tmp_path / "today_text_document")


@pytest.mark.parametrize("table", ["memory", "bloom", "disk"])
def test_dedup_catches_injected_duplicate_document_and_repeated_paragraph(sample_dir, plays, tempest, tmp_path, table):
    repeated = long_paragraph(plays[10]["text"])
    injected = {"text": f"{tempest[0]}\n\n{repeated}\n\n{tempest[1]}"}
    first = write_jsonl(tmp_path / "a.jsonl", plays)
    second = write_jsonl(tmp_path / "b.jsonl", [plays[5], injected])
    res = prepare(config(sample_dir, [first, second], tmp_path / "out", dedup="paragraph", dedup_table=table),
                  log=None)
    base = prepare(config(sample_dir, [first], tmp_path / "base", dedup="paragraph", dedup_table=table), log=None)
    s = res.stats
    reason = "probable_duplicate" if table == "bloom" else "exact_duplicate"  # a Bloom hit may be a false positive
    assert s["dropped"][reason] == base.stats["dropped"][reason] + 1
    assert s["paragraphs_removed"] == base.stats["paragraphs_removed"] + 1  # the sample repeats a few itself
    assert s["kept"] == base.stats["kept"] + 1
    from megatron_ext.data.tokenizers import build_tokenizer

    tok = build_tokenizer("Llama2Tokenizer", sample_dir / "tokenizer.model")
    last = IndexedDataset(tmp_path / "out_text_document").document(len(plays))
    text = tok.detokenize(last.tolist())
    assert tempest[0][:60] in text and tempest[1][:60] in text and repeated[:60] not in text


def test_dedup_tables_agree_on_first_occurrences():
    keys = digests_array([digest(str(i % 700).encode(), b"document") for i in range(1000)])
    expected = np.arange(1000) < 700
    for table in (MemoryTable(capacity=16), BloomTable(10_000, 1e-9), DiskTable(":memory:")):
        got = np.concatenate([table.add(keys[:400]), table.add(keys[400:])])
        assert (got == expected).all(), table.kind


def test_memory_table_stays_within_its_stated_bytes_per_entry():
    """16-32 bytes an entry, 48 for a moment while the table doubles (numpy's buffers are traced
    by tracemalloc). Keys: uniform 64-bit numbers, as BLAKE2b digests are."""
    import tracemalloc

    rng = np.random.default_rng(0)
    table = MemoryTable()
    doubled = 0
    tracemalloc.start()
    try:
        for _ in range(60):  # 1.2 million entries in blocks of 20,000: the table doubles six times
            block = rng.integers(1, 2**64 - 1, size=(20_000, 2), dtype=np.uint64, endpoint=True)
            slots = len(table.slots)
            tracemalloc.reset_peak()
            assert table.add(block).all()
            peak = tracemalloc.get_traced_memory()[1]
            doubled += len(table.slots) > slots
            assert peak <= 48 * table.count + (8 << 20)  # 8 MB: the block and one insertion chunk
            assert 16 * table.count <= table.nbytes <= 32 * table.count
    finally:
        tracemalloc.stop()
    assert doubled == 6


def split_sides(prefix):
    return set(documents(f"{prefix}_train_text_document")), set(documents(f"{prefix}_val_text_document"))


def test_split_is_stable_on_rerun_and_when_files_are_added(sample_dir, plays, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", plays[:200])
    b = write_jsonl(tmp_path / "b.jsonl", plays[200:])
    opts = dict(normalize=True, dedup="exact", val_fraction=0.2)
    prepare(config(sample_dir, [a], tmp_path / "one", **opts), log=None)
    prepare(config(sample_dir, [a], tmp_path / "again", **opts), log=None)
    prepare(config(sample_dir, [a, b], tmp_path / "both", **opts), log=None)
    for side in ("train", "val"):
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"one_{side}_text_document{ext}").read_bytes() == \
                   (tmp_path / f"again_{side}_text_document{ext}").read_bytes()
    train1, val1 = split_sides(tmp_path / "one")
    train2, val2 = split_sides(tmp_path / "both")
    assert val1 and train1 and not train1 & val1
    assert val1 <= val2 and train1 <= train2 and not train2 & val1
    assert 0.1 < len(val2) / (len(val2) + len(train2)) < 0.3


def test_val_docs_gives_that_many_documents(sample_dir, tmp_path):
    res = prepare(config(sample_dir, [str(sample_dir / "shakespeare_train.jsonl")], tmp_path / "out", val_docs=25),
                  log=None)
    assert res.stats["splits"]["val"]["documents"] == 25


def test_no_validation_text_leaks_into_training(sample_dir, plays, tempest, tmp_path):
    """A paragraph of a validation document, repeated in a later training document, is removed there."""
    src = write_jsonl(tmp_path / "a.jsonl", plays)
    opts = dict(dedup="paragraph", val_fraction=0.2)
    res = prepare(config(sample_dir, [src], tmp_path / "first", **opts), log=None)
    assert res.stats["splits"]["val"]["documents"] > 0
    from megatron_ext.data.tokenizers import build_tokenizer

    tok = build_tokenizer("Llama2Tokenizer", sample_dir / "tokenizer.model")
    val_texts = [tok.detokenize(list(d)) for d in documents(tmp_path / "first_val_text_document")]
    repeated = long_paragraph(val_texts[0])
    later = write_jsonl(tmp_path / "b.jsonl", [{"text": f"{t}\n\n{repeated}"} for t in tempest[:20]])
    prepare(config(sample_dir, [src, later], tmp_path / "second", **opts), log=None)
    train_texts = [tok.detokenize(list(d)) for d in documents(tmp_path / "second_train_text_document")]
    assert any(tempest[0][:60] in t or tempest[1][:60] in t for t in train_texts)
    assert not any(repeated[:80] in t for t in train_texts)


def test_shards_concatenated_equal_one_unsharded_output(sample_dir, tmp_path):
    src = [str(sample_dir / "shakespeare_train.jsonl")]
    prepare(config(sample_dir, src, tmp_path / "whole", normalize=True, dedup="exact"), log=None)
    res = prepare(config(sample_dir, src, tmp_path / "cut", normalize=True, dedup="exact", tokens_per_shard=40_000),
                  log=None)
    shards = res.stats["splits"]["all"]["shards"]
    assert len(shards) >= 5 and all(s["tokens"] >= 40_000 for s in shards[:-1])
    joined = [d for prefix in res.datasets["all"] for d in documents(prefix)]
    assert joined == documents(tmp_path / "whole_text_document")


def test_printed_blend_string_loads_in_the_dataset_builder(sample_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_dataset", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rc = tool.main(["--input", str(sample_dir / "shakespeare_train.jsonl"), "--tokenizer-type", "Llama2Tokenizer",
               "--tokenizer-model", str(sample_dir / "tokenizer.model"), "--append-eod", "--workers", "2",
               "--output-prefix", str(tmp_path / "c"), "--dedup", "exact", "--val-fraction", "0.1",
               "--tokens-per-shard", "60000"])
    assert rc == 0
    out = capsys.readouterr().out.splitlines()  # stdout: the train blend, then the val blend, nothing else
    assert len(out) == 2
    blend = out[0]
    assert len(blend.split()) >= 8 and all("_train_" in p for p in blend.split()[1::2])
    train, _, _ = build_gpt_datasets(GPTDatasetConfig(sequence_length=128, eod_token_id=2), blend, "100,0,0",
                                     [64, 0, 0])
    sample = train[5]
    assert len(train) >= 64 and sample["tokens"].shape == (128,)  # megatron rounds each shard up


def test_append_adds_shards_after_the_last_and_keeps_old_ones(sample_dir, plays, tempest, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", plays[:250])
    b = write_jsonl(tmp_path / "b.jsonl", plays[250:] + [plays[3]])
    opts = dict(normalize=True, dedup="exact", tokens_per_shard=50_000)
    first = prepare(config(sample_dir, [a], tmp_path / "c", **opts), log=None).stats
    old = {p: p.read_bytes() for p in tmp_path.glob("c_0*")}
    second = prepare(config(sample_dir, [b], tmp_path / "c", append=True, **opts), log=None).stats
    assert all(p.read_bytes() == data for p, data in old.items())
    n_old = len(first["splits"]["all"]["shards"])
    new = second["splits"]["all"]["shards"][n_old:]
    assert new[0]["prefix"].endswith(f"c_{n_old:05d}_text_document")
    assert second["dropped"]["exact_duplicate"] == 1  # plays[3] was kept by the first run
    assert second["kept"] == len(plays) and len(second["runs"]) == 2
    with pytest.raises(PrepareError, match="--normalize"):
        prepare(config(sample_dir, [b], tmp_path / "c", append=True, dedup="exact", tokens_per_shard=50_000), log=None)


def test_stats_add_up(sample_dir, plays, tempest, tmp_path):
    records = plays + [plays[0], {"text": "  \n "}, {"text": "Exeunt."}, {"text": "|-- 1 | 2 | 3 --|" * 20}]
    src = write_jsonl(tmp_path / "a.jsonl", records)
    res = prepare(config(sample_dir, [src], tmp_path / "s", normalize=True, min_words=3,
                         max_non_alnum_fraction=0.4, dedup="paragraph", val_fraction=0.1, tokens_per_shard=100_000),
                  log=None)
    s = json.loads((tmp_path / "s_stats.json").read_text())
    assert s == res.stats
    assert s["documents_in"] == len(records) == s["kept"] + sum(s["dropped"].values())
    assert s["dropped"]["empty"] == 1 and s["dropped"]["min_words"] == 1
    assert s["dropped"]["max_non_alnum_fraction"] == 1 and s["dropped"]["exact_duplicate"] == 1
    for name, split in s["splits"].items():
        assert split["tokens"] == sum(sh["tokens"] for sh in split["shards"])
        assert split["documents"] == sum(IndexedDataset(tmp_path / sh["prefix"]).document_count
                                         for sh in split["shards"])
        assert res.datasets[name] == [str(tmp_path / sh["prefix"]) for sh in split["shards"]]
    assert s["kept"] == sum(split["documents"] for split in s["splits"].values())
    assert "train:" in res.summary and "dropped:" in res.summary


def test_stats_and_dedup_table_have_the_mode_of_new_files_and_no_temporary_stays(sample_dir, tmp_path, umask):
    umask(0o027)
    src = str(sample_dir / "shakespeare_train.jsonl")
    res = prepare(config(sample_dir, [src], tmp_path / "s", dedup="exact", tokens_per_shard=100_000), log=None)
    table = tmp_path / res.stats["dedup_table"]["file"]
    for path in (tmp_path / "s_stats.json", table):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or ".tmp" in p.name]


def test_directories_globs_gz_zst_and_text_paragraphs(sample_dir, plays, tmp_path):
    if shutil.which("zstd") is None:
        pytest.skip("no zstd program")
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    with gzip.open(d / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(p) + "\n" for p in plays[:10])
    write_jsonl(d / "sub" / "b.jsonl", plays[10:20])
    subprocess.run(["zstd", "-q", "--rm", str(d / "sub" / "b.jsonl")], check=True)
    shutil.copy(sample_dir / "shakespeare_heldout.txt", d / "tempest.txt")
    paragraphs = [p for p in (sample_dir / "shakespeare_heldout.txt").read_text().split("\n\n") if p.strip()]
    res = prepare(config(sample_dir, [str(d)], tmp_path / "o", text_docs_per="paragraph"), log=None)
    assert res.stats["documents_in"] == 20 + len(paragraphs)
    res = prepare(config(sample_dir, [str(d / "**" / "*.zst")], tmp_path / "z", dedup="exact"), log=None)
    assert res.stats["documents_in"] == 10


@pytest.mark.parametrize("reader", ["zstandard", "zstd"])
def test_zst_input_progress_counts_the_compressed_bytes_read(tmp_path, monkeypatch, reader):
    """The progress line's MB/s and ETA need the bytes of the file read so far, also when the
    zstd program does the reading."""
    if reader == "zstandard":
        zstandard = pytest.importorskip("zstandard")
    elif shutil.which("zstd") is None:
        pytest.skip("no zstd program")
    else:
        monkeypatch.setitem(sys.modules, "zstandard", None)  # the import fails: the program reads
    rng = np.random.default_rng(0)
    text = "\n".join(json.dumps({"text": rng.bytes(300).hex()}) for _ in range(4000)).encode() + b"\n"
    path = tmp_path / "a.jsonl.zst"
    if reader == "zstandard":
        path.write_bytes(zstandard.ZstdCompressor().compress(text))
    else:
        (tmp_path / "a.jsonl").write_bytes(text)
        subprocess.run(["zstd", "-q", "--rm", str(tmp_path / "a.jsonl")], check=True)
    files = resolve_inputs([str(path)])
    done = [block.bytes_done for block in read_blocks(files, 1 << 16)]
    assert len(done) > 10 and done == sorted(done) and done[-1] == files[0].size
    assert 0 < done[0] < files[0].size  # counted from the first block, not only at the end

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    progress = Progress(files[0].size, stream=Terminal(), interval=0)
    progress.update(100, 1000, done[len(done) // 2])
    line = progress.stream.getvalue()
    assert " 0.0 MB/s" not in line and "ETA" in line, line


def test_truncated_zst_input_is_an_error_naming_the_file(sample_dir, plays, tmp_path, monkeypatch):
    if shutil.which("zstd") is None:
        pytest.skip("no zstd program")
    monkeypatch.setitem(sys.modules, "zstandard", None)
    write_jsonl(tmp_path / "a.jsonl", plays)
    subprocess.run(["zstd", "-q", "--rm", str(tmp_path / "a.jsonl")], check=True)
    whole = (tmp_path / "a.jsonl.zst").read_bytes()
    (tmp_path / "a.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    c = config(sample_dir, [str(tmp_path / "a.jsonl.zst")], tmp_path / "o", normalize=True)
    for run in (lambda: prepare(c, log=None), lambda: preprocess(c.preprocess, log=None)):
        with pytest.raises(PreprocessError, match=rf"{tmp_path / 'a.jsonl.zst'}: cannot read: zstd -d exited"):
            run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl.zst"]


def test_bad_line_names_file_and_line_and_leaves_nothing(sample_dir, plays, tmp_path):
    src = tmp_path / "a.jsonl"
    write_jsonl(src, plays[:5])
    with open(src, "a") as f:
        f.write('{"text": "unterminated\n')
    with pytest.raises(PreprocessError, match=rf"{src}:6: malformed JSON"):
        prepare(config(sample_dir, [str(src)], tmp_path / "o", dedup="exact", tokens_per_shard=1000), log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_cli_contradicting_options_exit_2_with_one_line(sample_dir, tmp_path):
    res = subprocess.run([sys.executable, str(TOOL), "--input", str(sample_dir / "shakespeare_train.jsonl"),
                          "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                          str(sample_dir / "tokenizer.model"), "--output-prefix", str(tmp_path / "o"),
                          "--val-fraction", "0.1", "--val-docs", "5"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "--val-fraction and --val-docs" in res.stderr
    assert "Traceback" not in res.stderr and list(tmp_path.iterdir()) == []


def test_normalize_rules():
    assert normalize_text("a\r\nb\rc") == "a\nb\nc"
    assert normalize_text("  x \t\n\n\n\n    y  ") == "x\n\n    y"  # indentation kept
    assert normalize_text("a\x00b\x0bc\x0cd\x7f") == "ab c d"
    assert normalize_text("\ufeffe\u0301\u00a0\u2028z") == "\u00e9\nz"
    assert normalize_text("\ufb01 x") == "\ufb01 x" and normalize_text("\ufb01 x", "NFKC") == "fi x"


def test_normalize_one_printable_line_as_the_general_rules():
    """A printable line takes a shortcut; with a line break added it takes every step, and the
    break is stripped again, so both must give the same text."""
    lines = ["  plain ascii  ", "caf\u0065\u0301 \u00e9", "\ufb01 \uff21\u2474 \u00bd", "x\u00a0y \u3000",
             "\u00a8\u0301 \u1e9b\u0323", "\u0130\u212b", "tab\tinside", "\u200bzero width"]
    for line in lines:
        for form in ("NFC", "NFKC"):
            assert normalize_text(line, form) == normalize_text(line + "\n", form), (line, form)


def test_cleaner_reads_json_lines_as_json_loads_does():
    """The Cleaner's fast reading of a JSON line gives what the general rules (``json_lines``)
    give: a line that is not UTF-8 sends the whole block to the general rules, so the two
    readings of the same lines are compared."""
    lines = [b'{"text": "plain"}', b'{"text": "crlf"}\r', b' {"text": "leading space"}', b'{"text": "x"} y',
             '\ufeff{"text": "bom"}'.encode(), b"[1, 2]", b'"str"', b"3", b'{"other": 1}', b'{"text": null}',
             b'{"text": ["a", "b"]}', b'{"text": "\\ud800 surrogate"}', b"", b"  \t", b"\x1c", "\u00a0".encode(),
             b'{"text": "nan", "x": NaN}', b'{"text": "a", "text": "last wins"}', b'{"text": "a"}, {"text": "b"}',
             b'{"text": "trailing space"}  \t ', b'{"text":"tight"}', b'{"text": "caf\\u00e9 \xc3\xa9"}',
             b'{"text": "unterminated']
    cleaner = Cleaner("text", "NFC", DocumentFilter(), False, 50, skip_bad_lines=True)
    data = b"\n".join(lines) + b"\n"
    fast = cleaner(RawBlock("f.jsonl", 1, jsonl=data))
    general = cleaner(RawBlock("f.jsonl", 1, jsonl=data + b'{"text": "\xff"}\n'))
    assert fast.texts == general.texts and fast.wheres == general.wheres and fast.data == general.data
    assert np.array_equal(fast.digests, general.digests)
    assert general.bad_messages[:-1] == fast.bad_messages and general.bad_messages[-1].startswith("f.jsonl:24: not")
    general.counts["bad_lines"] -= 1
    assert fast.counts == general.counts
    assert fast.counts["blank_lines"] == 2 and fast.counts["bad_lines"] == 13 and len(fast.texts) == 8


def test_progress_line_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log, tty = io.StringIO(), Terminal()
    for stream in (log, tty):
        p = Progress(1000, stream=stream, interval=0)
        p.update(10, 500, 250)
        p.done()
    assert log.getvalue() == ""
    assert "10 documents, 500 tokens" in tty.getvalue() and "ETA" in tty.getvalue()


def test_data_layer_imports_no_torch():
    code = ("import sys, megatron_ext.data.prepare; "
            "bad = [m for m in ('torch', 'megatron.core', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def load_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_dataset", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def tool_args(sample_dir, *args):
    return ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(sample_dir / "tokenizer.model"),
            "--append-eod", "--workers", "2", *map(str, args)]


@pytest.fixture(scope="module")
def unique_lines(plays):
    """The distinct lines of the plays, each a short document of its own."""
    return list(dict.fromkeys(line.strip() for p in plays for line in p["text"].splitlines() if line.strip()))


def test_overfilled_bloom_filter_fails_before_publishing(sample_dir, unique_lines, tmp_path):
    src = write_jsonl(tmp_path / "lines.jsonl", [{"text": t} for t in unique_lines[:3000]])
    with pytest.raises(PrepareError, match=r"--dedup-expected-items 1,000: the Bloom filter already holds "
                                           r"[\d,]+ entries"):
        prepare(config(sample_dir, [src], tmp_path / "o", dedup="exact", dedup_table="bloom",
                       dedup_expected_items=1000, tokens_per_shard=10_000), log=None)
    assert [p.name for p in tmp_path.iterdir()] == ["lines.jsonl"]
    # sized for the corpus, every unique line is kept; what a Bloom filter drops is a probable duplicate
    src = write_jsonl(tmp_path / "lines.jsonl", [{"text": t} for t in unique_lines[:3000] + unique_lines[:5]])
    res = prepare(config(sample_dir, [src], tmp_path / "o", dedup="exact", dedup_table="bloom",
                         dedup_expected_items=3000), log=None)
    assert res.stats["kept"] == 3000 and res.stats["dropped"]["probable_duplicate"] == 5
    assert res.stats["dropped"]["exact_duplicate"] == 0


@pytest.mark.parametrize("case", ["empty file", "all filtered", "val-docs takes all", "val-fraction takes none"])
def test_empty_result_is_refused_and_nothing_is_published(sample_dir, plays, tmp_path, case):
    from megatron_ext.data.preprocess import EmptyInputError

    src = write_jsonl(tmp_path / "a.jsonl", [] if case == "empty file" else plays[:20])
    prep, error, message = {
        "empty file": ({}, EmptyInputError, r"--input .*a\.jsonl: no tokens in 0 documents .*--allow-empty"),
        "all filtered": (dict(min_words=100_000), EmptyInputError,
                         r"no tokens in 20 documents \(dropped: min_words 20\)"),
        "val-docs takes all": (dict(val_docs=20), PrepareError,
                               r"--val-docs 20: the training split would be empty \(all 20 kept"),
        "val-fraction takes none": (dict(val_fraction=0.001), PrepareError,
                                    r"--val-fraction 0\.001: the validation split would be empty"),
    }[case]
    for shards in (None, 10_000):
        with pytest.raises(error, match=message):
            prepare(config(sample_dir, [src], tmp_path / "o", dedup="exact", tokens_per_shard=shards, **prep),
                    log=None)
        assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]
    # --allow-empty writes it
    res = prepare(replace(config(sample_dir, [src], tmp_path / "o", dedup="exact", **prep),
                          preprocess=replace(config(sample_dir, [src], tmp_path / "o").preprocess, allow_empty=True)),
                  log=None)
    assert (tmp_path / "o_stats.json").exists() and 0 in [s["documents"] for s in res.stats["splits"].values()]


def test_val_docs_more_than_the_documents_fails_after_the_first_pass(sample_dir, plays, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", plays[:20])
    with pytest.raises(PrepareError, match=r"--val-docs 50: the input has only 20 distinct documents"):
        prepare(config(sample_dir, [src], tmp_path / "o", val_docs=50), log=None)
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]


def test_cli_refuses_an_empty_input_with_exit_2(sample_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    res = subprocess.run([sys.executable, str(TOOL), "--input", str(tmp_path / "empty.jsonl"),
                          *tool_args(sample_dir, "--output-prefix", tmp_path / "o", "--normalize")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stdout == "" and res.stderr.startswith("error: --input ")
    assert "no tokens" in res.stderr and res.stderr.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["empty.jsonl"]


def test_append_from_another_directory_prints_a_blend_that_resolves(sample_dir, plays, tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "a.jsonl", plays[:150])
    write_jsonl(tmp_path / "data" / "b.jsonl", plays[150:])
    tool = load_tool()
    opts = ["--dedup", "exact", "--tokens-per-shard", "100000"]
    monkeypatch.chdir(tmp_path)
    assert tool.main(["--input", "a.jsonl", "--output-prefix", "data/c", *tool_args(sample_dir, *opts)]) == 0
    first = capsys.readouterr().out.split()
    assert first[1].startswith("data/c_00000")
    monkeypatch.chdir(tmp_path / "data")
    assert tool.main(["--input", "b.jsonl", "--output-prefix", "c", "--append", *tool_args(sample_dir, *opts)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1  # stdout: the blend only
    blend = out[0].split()
    prefixes = blend[1::2]
    assert len(prefixes) > len(first) // 2 and prefixes[0] == "c_00000_text_document"
    assert all(Path(p + ".bin").is_file() and Path(p + ".idx").is_file() for p in prefixes)
    stats = json.loads(Path("c_stats.json").read_text())
    assert [sh["prefix"] for sh in stats["splits"]["all"]["shards"]] == prefixes  # beside the stats file
    assert sum(map(int, blend[0::2])) == stats["splits"]["all"]["tokens"]
    assert stats["input_files"] == [str(tmp_path / "a.jsonl"), str(tmp_path / "data" / "b.jsonl")]


def test_append_reads_stats_of_version_1(sample_dir, plays, tmp_path, monkeypatch):
    """Version 1 stored prefixes as given on that run's command line, the table under one name."""
    a = write_jsonl(tmp_path / "a.jsonl", plays[:100])
    b = write_jsonl(tmp_path / "b.jsonl", plays[100:120] + [plays[0]])
    opts = dict(dedup="exact", tokens_per_shard=100_000)
    prepare(config(sample_dir, [a], tmp_path / "c", **opts), log=None)
    stats = json.loads((tmp_path / "c_stats.json").read_text())
    stats["version"] = 1
    for s in [stats] + stats["runs"]:
        for sh in s["splits"]["all"]["shards"]:
            sh["prefix"] = "somewhere/else/" + sh["prefix"]
    del stats["dedup_table"]["file"]
    (tmp_path / "c_dedup_memory_00001.npy").rename(tmp_path / "c_dedup_memory.npy")
    (tmp_path / "c_stats.json").write_text(json.dumps(stats))
    res = prepare(config(sample_dir, [b], tmp_path / "c", append=True, **opts), log=None)
    assert res.stats["version"] == 2 and res.stats["dropped"]["exact_duplicate"] == 1
    assert all(Path(p + ".idx").exists() for p in res.datasets["all"])
    assert not (tmp_path / "c_dedup_memory.npy").exists() and (tmp_path / "c_dedup_memory_00002.npy").exists()


@pytest.mark.parametrize("flags, message", [
    (["--min-paragraph-chars", "80"], "--min-paragraph-chars 80: only used by --dedup paragraph"),
    (["--dedup", "exact", "--dedup-expected-items", "1000"], "--dedup-expected-items / --dedup-false-positive-rate"),
    (["--dedup", "exact", "--dedup-false-positive-rate", "0.01"], "add --dedup-table bloom"),
    (["--dedup", "exact", "--dedup-dir", "."], "--dedup-dir .: only the disk table has a working file"),
    (["--unicode-form", "NFKC"], "--unicode-form needs --normalize"),
    (["--seed", "7"], "--seed 7: only used by the split"),
    (["--normalize", "--log-interval", "0"], "--log-interval 0: must be at least 1"),
])
def test_flags_without_their_mode_are_refused(sample_dir, tmp_path, capsys, flags, message):
    rc = load_tool().main(["--input", str(sample_dir / "shakespeare_train.jsonl"), "--output-prefix",
                           str(tmp_path / "o"), *tool_args(sample_dir, *flags)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_log_interval_logs_progress_lines(sample_dir, tmp_path):
    logged = []
    prepare(config(sample_dir, [str(sample_dir / "shakespeare_train.jsonl")], tmp_path / "o", normalize=True,
                   log_interval=100), log=logged.append)
    progress = [m for m in logged if m.startswith("Processed ")]
    assert len(progress) >= 3 and progress[0].startswith("Processed ") and "tokens" in progress[0]
    logged.clear()
    prepare(config(sample_dir, [str(sample_dir / "shakespeare_train.jsonl")], tmp_path / "p", normalize=True),
            log=logged.append)
    assert not any(m.startswith("Processed ") for m in logged)
