"""tools/preprocess_data.py and megatron_ext.data.preprocess against Megatron-LM's own loop.

The oracle below follows Megatron-LM's tools/preprocess_data.py line by line (partition
files dealt round-robin, Encoder.encode, add_document, add_index merge), writing with
megatron-core's IndexedDatasetBuilder, and tokenizing with megatron-core's tokenizer
(current Megatron-LM) or the legacy _Llama2Tokenizer rule ([bos] + sp.encode).
"""
import gzip
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from megatron_ext.data.indexed_dataset import IndexedDataset
from megatron_ext.data.preprocess import PreprocessConfig, PreprocessError, preprocess
from megatron_ext.data.tokenizers import TokenizerError

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "preprocess_data.py"


# -- the oracle: Megatron-LM's preprocess_data.py, literally ---------------------------------


class MegatronTokenizerSpec:
    def __init__(self, tokenize, eod, vocab_size):
        self.tokenize, self.eod, self.vocab_size = tokenize, eod, vocab_size


def legacy_llama2(model_path):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    # legacy _Llama2Tokenizer.tokenize(s, bos=True, eos=False); eod = eos_id; vocab = n_words
    return MegatronTokenizerSpec(lambda s: [sp.bos_id()] + sp.encode(s), sp.eos_id(), sp.vocab_size())


def current_sentencepiece(model_path):
    from megatron.core.tokenizers import MegatronTokenizer

    tok = MegatronTokenizer.from_pretrained(
        tokenizer_path=str(model_path), metadata_path={"library": "sentencepiece"},
        legacy=False, special_tokens=None,
    )
    return MegatronTokenizerSpec(tok.tokenize, tok.eod, tok.vocab_size)


def megatron_preprocess(input_path, output_prefix, tokenizer, json_keys=("text",), append_eod=False,
                        partitions=1, keep_sequential_samples=False):
    from megatron.core.datasets import indexed_dataset

    def encode(json_line):
        data = json.loads(json_line)
        ids, lens = {}, {}
        for key in json_keys:
            text = data[key]
            sentences = text if isinstance(text, list) else [text]
            doc_ids, sentence_lens = [], []
            for sentence in sentences:
                sentence_ids = tokenizer.tokenize(sentence)
                if len(sentence_ids) > 0:
                    doc_ids.extend(sentence_ids)
                    sentence_lens.append(len(sentence_ids))
            if len(doc_ids) > 0 and append_eod:
                doc_ids.append(tokenizer.eod)
                sentence_lens[-1] += 1
            ids[key], lens[key] = doc_ids, sentence_lens
        return ids, lens

    def builder(prefix, key):
        return indexed_dataset.IndexedDatasetBuilder(
            f"{prefix}_{key}_document.bin", dtype=indexed_dataset.DType.optimal_dtype(tokenizer.vocab_size))

    def process_json_file(in_name, prefix):
        builders = {key: builder(prefix, key) for key in json_keys}
        with open(in_name, "r", encoding="utf-8") as fin:
            for line in fin:
                doc, sentence_lens = encode(line)
                for key in doc.keys():
                    builders[key].add_document(doc[key], sentence_lens[key])
        # Megatron-LM finalizes only the builder of the last key it saw (a loop variable left
        # over); finalizing each key gives what it would write for every key.
        for key in json_keys:
            builders[key].finalize(f"{prefix}_{key}_document.idx")

    if partitions == 1:
        process_json_file(input_path, output_prefix)
        return
    stem, ext = os.path.splitext(str(input_path))
    names = [(f"{stem}_{i}{ext}", f"{output_prefix}_{i}") for i in range(partitions)]
    opener = (lambda p: gzip.open(p, "rt")) if str(input_path).endswith(".gz") else (
        lambda p: open(p, "r", encoding="utf-8"))
    if keep_sequential_samples:
        with opener(input_path) as fin:
            total = sum(1 for _ in fin)
        partition_size = -(-total // partitions)
    outs = [open(name, "w") for name, _ in names]
    index = line_count = 0
    with opener(input_path) as fin:
        for line in fin:
            outs[index].write(line)
            if keep_sequential_samples:
                line_count += 1
                if line_count % partition_size == 0:
                    index += 1
            else:
                index = (index + 1) % partitions
    for f in outs:
        f.close()
    for name, prefix in names:
        process_json_file(name, prefix)
    for key in json_keys:
        merged = builder(output_prefix, key)
        for _, prefix in names:
            merged.add_index(f"{prefix}_{key}_document")
        merged.finalize(f"{output_prefix}_{key}_document.idx")


def assert_identical(ours, theirs, keys=("text",)):
    for key in keys:
        for ext in (".bin", ".idx"):
            a = Path(f"{ours}_{key}_document{ext}").read_bytes()
            b = Path(f"{theirs}_{key}_document{ext}").read_bytes()
            assert a == b, f"{key}{ext} differs ({len(a)} vs {len(b)} bytes)"


# -- corpora -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, botchan_txt):
    """botchan.txt as JSON lines: 8-line passages with a short 'title' key, plus the awkward
    cases (empty text, an empty title, a list of sentences with an empty one, non-ASCII)."""
    lines = botchan_txt.read_text(encoding="utf-8-sig").splitlines()
    records = []
    for i in range(0, len(lines), 8):
        text = "\n".join(lines[i : i + 8])
        records.append({"text": text, "title": " ".join(text.split()[:4])})
    records.insert(3, {"text": "", "title": "empty document"})
    records.insert(7, {"text": "A title-less passage.", "title": ""})
    records.insert(11, {"text": ["First sentence.", "", "  ", "Third sentence."], "title": ["a", "b"]})
    records.insert(13, {"text": "naïve café — 東京 ✓", "title": "unicode"})
    path = tmp_path_factory.mktemp("corpus") / "botchan.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(records):  # both raw UTF-8 and \u escapes
            f.write(json.dumps(r, ensure_ascii=i % 2 == 0) + "\n")
    gz = path.parent / "botchan.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write(path.read_bytes())
    return path, gz, len(records)


def run(tmp_path, inputs, tokenizer_type, model, name="ours", **kw):
    prefix = str(tmp_path / name)
    kw.setdefault("chunk_bytes", 8192)  # many chunks, so the ordering across workers is exercised
    config = PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=prefix,
                              tokenizer_type=tokenizer_type, tokenizer_model=str(model), **kw)
    return prefix, preprocess(config, log=None)


# -- byte identity -----------------------------------------------------------------------------

CASES = {
    "llama2-bos": dict(tokenizer="Llama2Tokenizer", keys=("text",), append_eod=False, partitions=1),
    "llama2-eod-partitions": dict(tokenizer="Llama2Tokenizer", keys=("text", "title"), append_eod=True,
                                  partitions=2),
    "sp-eod-process-workers": dict(tokenizer="SentencePieceTokenizer", keys=("text", "title"),
                                   append_eod=True, partitions=1, backend="process"),
    "sp-gz-partitions": dict(tokenizer="SentencePieceTokenizer", keys=("text",), append_eod=False,
                             partitions=2, gz=True),
    "sp-gz-sequential": dict(tokenizer="SentencePieceTokenizer", keys=("text",), append_eod=True,
                             partitions=2, keep_sequential=True, gz=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_byte_identical_to_megatron(case, corpus, llama_sp_model, tmp_path):
    c = CASES[case]
    plain, gz, n_records = corpus
    source = gz if c.get("gz") else plain
    oracle_tok = legacy_llama2(llama_sp_model) if c["tokenizer"] == "Llama2Tokenizer" else (
        current_sentencepiece(llama_sp_model))
    theirs = str(tmp_path / "megatron")
    megatron_preprocess(source, theirs, oracle_tok, c["keys"], c["append_eod"], c["partitions"],
                        c.get("keep_sequential", False))
    ours, result = run(tmp_path, [source], c["tokenizer"], llama_sp_model, json_keys=c["keys"],
                       append_eod=c["append_eod"], workers=2, partitions=c["partitions"],
                       keep_sequential_samples=c.get("keep_sequential", False),
                       backend=c.get("backend", "thread"))
    assert_identical(ours, theirs, c["keys"])
    assert result.documents == n_records
    ds = IndexedDataset(f"{ours}_text_document")
    assert ds.document_count == n_records
    assert ds.dtype == np.uint16
    if c["tokenizer"] == "Llama2Tokenizer":
        assert int(ds[0][0]) == 1  # BOS first
        assert all(int(s[0]) == 1 for s in ds[:20])
    else:
        assert int(ds[0][0]) != 1
    if c["append_eod"]:
        assert int(ds[0][-1]) == 2
    # no temporaries (partition files, builder temporaries) are left next to the output
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ours")) == sorted(
        f"ours_{k}_document{e}" for k in c["keys"] for e in (".bin", ".idx", ".manifest.json"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_input_order_and_empty_documents(corpus, botchan_bpe_model, tmp_path):
    """Output order is the input order for any worker count; a document without tokens is
    kept as a zero-sequence entry, exactly as Megatron-LM writes it, and counted."""
    plain, _, n_records = corpus
    theirs = str(tmp_path / "megatron")
    megatron_preprocess(plain, theirs, current_sentencepiece(botchan_bpe_model), ("text", "title"))
    outputs = []
    for workers in (1, 3):
        ours, result = run(tmp_path, [plain], "SentencePieceTokenizer", botchan_bpe_model, name=f"w{workers}",
                           json_keys=("text", "title"), workers=workers, chunk_bytes=2048)
        assert_identical(ours, theirs, ("text", "title"))
        outputs.append(Path(f"{ours}_text_document.bin").read_bytes())
        assert result.empty_documents == 0  # record 3 has an empty text but a non-empty title
    ds = IndexedDataset(f"{ours}_text_document")
    empty = int(ds.document_indices[3]), int(ds.document_indices[4])
    assert empty[0] == empty[1]  # zero sequences
    # with only the text key, record 3 is an empty document
    _, result = run(tmp_path, [plain], "SentencePieceTokenizer", botchan_bpe_model)
    assert result.empty_documents == 1 and result.documents == n_records


def test_text_files_one_document_each(shakespeare_files, botchan_bpe_model, tmp_path):
    files = shakespeare_files[:3]
    jsonl = tmp_path / "same.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for p in files:
            f.write(json.dumps({"text": p.read_bytes().decode("utf-8")}) + "\n")
    theirs = str(tmp_path / "megatron")
    megatron_preprocess(jsonl, theirs, current_sentencepiece(botchan_bpe_model), append_eod=True)
    ours, result = run(tmp_path, files, "SentencePieceTokenizer", botchan_bpe_model, append_eod=True, workers=2)
    assert_identical(ours, theirs)
    assert result.documents == 3
    with pytest.raises(PreprocessError, match="one document per file, give one key"):
        run(tmp_path, files, "SentencePieceTokenizer", botchan_bpe_model, json_keys=("text", "title"))


# -- bad input ---------------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = [json.dumps({"text": f"Line number {i} of a small corpus."}) for i in range(6)]


def test_malformed_json_names_file_and_line(tmp_path, botchan_bpe_model):
    src = write_lines(tmp_path / "in.jsonl", GOOD[:2] + ['{"text": "unterminated'] + GOOD[2:])
    with pytest.raises(PreprocessError, match=re.escape(f"{src}:3: malformed JSON")):
        run(tmp_path, [src], "SentencePieceTokenizer", botchan_bpe_model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # nothing written

    prefix, result = run(tmp_path, [src], "SentencePieceTokenizer", botchan_bpe_model, skip_bad_lines=True)
    assert (result.bad_lines, result.documents) == (1, 6)
    assert "1 bad lines skipped" in result.summary()
    good = write_lines(tmp_path / "good.jsonl", GOOD)
    theirs = str(tmp_path / "megatron")
    megatron_preprocess(good, theirs, current_sentencepiece(botchan_bpe_model))
    assert_identical(prefix, theirs)


def test_missing_key_names_file_line_and_key(tmp_path, botchan_bpe_model):
    src = write_lines(tmp_path / "in.jsonl", GOOD[:4] + [json.dumps({"body": "no text key"})])
    with pytest.raises(PreprocessError, match=re.escape(f"{src}:5: missing key 'text'")):
        run(tmp_path, [src], "SentencePieceTokenizer", botchan_bpe_model)
    src2 = write_lines(tmp_path / "in2.jsonl", GOOD[:1] + [json.dumps({"text": 7}), "[1, 2]"])
    with pytest.raises(PreprocessError, match=re.escape(f"{src2}:2: key 'text' is int")):
        run(tmp_path, [src2], "SentencePieceTokenizer", botchan_bpe_model)
    _, result = run(tmp_path, [src2], "SentencePieceTokenizer", botchan_bpe_model, skip_bad_lines=True)
    assert result.bad_lines == 2 and result.documents == 1


def test_invalid_utf8_and_blank_lines(tmp_path, botchan_bpe_model):
    src = tmp_path / "in.jsonl"
    src.write_bytes(("\n".join(GOOD[:2]) + "\n\n   \n").encode() + b'{"text": "caf\xe9"}\n' + GOOD[2].encode())
    with pytest.raises(PreprocessError, match=re.escape(f"{src}:5: not valid UTF-8")):
        run(tmp_path, [src], "SentencePieceTokenizer", botchan_bpe_model)
    _, result = run(tmp_path, [src], "SentencePieceTokenizer", botchan_bpe_model, skip_bad_lines=True)
    assert (result.documents, result.blank_lines, result.bad_lines) == (3, 2, 1)
    # valid JSON whose escape is a lone surrogate: no UTF-8 text for the tokenizer
    src2 = write_lines(tmp_path / "in2.jsonl", GOOD[:2] + ['{"text": "bad \\ud800 escape"}'] + GOOD[2:4])
    with pytest.raises(PreprocessError, match=re.escape(f"{src2}:3: text cannot be encoded as UTF-8")):
        run(tmp_path, [src2], "Llama2Tokenizer", botchan_bpe_model)
    prefix, result = run(tmp_path, [src2], "Llama2Tokenizer", botchan_bpe_model, skip_bad_lines=True)
    assert (result.documents, result.bad_lines) == (4, 1)
    assert IndexedDataset(f"{prefix}_text_document").document_count == 4


def test_progress_and_summary_lines(tmp_path, corpus, botchan_bpe_model):
    plain, _, n_records = corpus
    messages = []
    config = PreprocessConfig(inputs=[str(plain)], output_prefix=str(tmp_path / "o"), log_interval=100,
                              tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(botchan_bpe_model),
                              chunk_bytes=4096)
    preprocess(config, log=messages.append)
    progress = [m for m in messages if m.startswith("Processed")]
    assert len(progress) == n_records // 100
    assert re.match(r"Processed \d+ documents \([\d.]+ docs/s, [\d,]+ tokens/s, [\d.]+ MB/s\)\.", progress[0])
    assert re.match(rf"Done: {n_records} documents, \d+ tokens, 1 empty, 0 bad lines skipped", messages[-1])


def test_tokenizer_checked_before_anything(tmp_path):
    """A missing or corrupt model fails first, even with a bad input and a bad output."""
    src = write_lines(tmp_path / "in.jsonl", ["not json"])
    for model in (tmp_path / "missing.model", src):
        with pytest.raises(TokenizerError, match=re.escape(str(model))):
            run(tmp_path / "no-such-dir", [tmp_path / "nothing-*.jsonl"], "SentencePieceTokenizer", model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_unwritable_output_fails_before_tokenizing(tmp_path, botchan_bpe_model):
    src = write_lines(tmp_path / "in.jsonl", GOOD + ["not json"])  # tokenizing would fail on this
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for prefix in (tmp_path / "missing-dir" / "out", blocker / "out"):
        config = PreprocessConfig(inputs=[str(src)], output_prefix=str(prefix),
                                  tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(botchan_bpe_model))
        with pytest.raises(PreprocessError, match=re.escape(f"--output-prefix {prefix}: directory")):
            preprocess(config, log=None)
    (tmp_path / "out_text_document.idx").mkdir()
    with pytest.raises(PreprocessError, match="out_text_document.idx is a directory"):
        run(tmp_path, [src], "SentencePieceTokenizer", botchan_bpe_model, name="out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "in.jsonl", "out_text_document.idx"]


def test_input_glob_matching_nothing(tmp_path, botchan_bpe_model):
    with pytest.raises(PreprocessError, match=re.escape(f"--input '{tmp_path}/*.jsonl': matches no files")):
        run(tmp_path, [f"{tmp_path}/*.jsonl"], "SentencePieceTokenizer", botchan_bpe_model)
    with pytest.raises(PreprocessError, match="is a directory"):
        run(tmp_path, [tmp_path], "SentencePieceTokenizer", botchan_bpe_model)


def test_glob_inputs_are_sorted_and_concatenated(tmp_path, botchan_bpe_model):
    write_lines(tmp_path / "b.jsonl", GOOD[3:])
    write_lines(tmp_path / "a.jsonl", GOOD[:3])
    whole = write_lines(tmp_path / "whole.txt.jsonl", GOOD)
    theirs = str(tmp_path / "megatron")
    megatron_preprocess(whole, theirs, current_sentencepiece(botchan_bpe_model))
    ours, result = run(tmp_path, [f"{tmp_path}/[ab].jsonl"], "SentencePieceTokenizer", botchan_bpe_model)
    assert_identical(ours, theirs)


def test_failure_midway_leaves_nothing(tmp_path, corpus, botchan_bpe_model):
    """An error after many chunks were written (here a bad last line) removes everything."""
    plain, _, _ = corpus
    src = tmp_path / "in.jsonl"
    src.write_bytes(plain.read_bytes() + b"{broken\n")
    for partitions in (1, 2):
        with pytest.raises(PreprocessError, match=":%d: malformed JSON" % (plain.read_bytes().count(b"\n") + 1)):
            run(tmp_path, [src], "SentencePieceTokenizer", botchan_bpe_model, workers=2, chunk_bytes=4096,
                partitions=partitions)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


# -- the command line --------------------------------------------------------------------------


def tool(*args, **kw):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, **kw)


def test_cli_end_to_end_without_torch(corpus, llama_sp_model, tmp_path):
    _, gz, n_records = corpus
    code = "\n".join([
        "import runpy, sys",
        "sys.argv = sys.argv[1:]",
        "try:",
        "    runpy.run_path(sys.argv[0], run_name='__main__')",
        "except SystemExit as e:",
        "    assert not e.code, e.code",
        "bad = [m for m in ('torch', 'megatron.core') if m in sys.modules]",
        "assert not bad, bad",
    ])
    prefix = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, "-c", code, str(TOOL), "--input", gz, "--tokenizer-type", "Llama2Tokenizer",
         "--tokenizer-model", llama_sp_model, "--output-prefix", prefix, "--workers", "2",
         "--append-eod", "--log-interval", "200"],
        capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"Done: {n_records} documents" in res.stderr
    assert re.search(r"^Processed \d+ documents \(", res.stderr, re.M)
    theirs = str(tmp_path / "megatron")
    megatron_preprocess(corpus[0], theirs, legacy_llama2(llama_sp_model), append_eod=True)
    assert_identical(prefix, theirs)


def test_cli_errors(tmp_path, botchan_bpe_model):
    src = write_lines(tmp_path / "in.jsonl", GOOD[:1] + ["{oops"])
    common = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", botchan_bpe_model,
              "--output-prefix", tmp_path / "o", "--workers", "1"]
    res = tool("--input", src, *common)
    assert res.returncode == 1 and f"error: {src}:2: malformed JSON" in res.stderr
    res = tool("--input", src, "--skip-bad-lines", *common)
    assert res.returncode == 0 and "1 bad lines skipped" in res.stderr and f"{src}:2" in res.stderr
    res = tool("--input", src, "--split-sentences", *common)
    assert res.returncode == 2 and "--split-sentences is not supported" in res.stderr
    res = tool("--input", src, *common[:3], tmp_path / "absent.model", *common[4:])
    assert res.returncode == 1 and f"tokenizer model not found: {tmp_path / 'absent.model'}" in res.stderr


def test_cli_terminated_run_leaves_nothing(tmp_path, shakespeare_files, llama_sp_model):
    src = tmp_path / "plays.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for p in shakespeare_files:
            for para in re.split(r"\n\s*\n", p.read_text(encoding="utf-8", errors="replace")):
                f.write(json.dumps({"text": para}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, str(TOOL), "--input", str(src), "--tokenizer-type", "Llama2Tokenizer",
         "--tokenizer-model", str(llama_sp_model), "--output-prefix", str(out / "plays"), "--workers", "2",
         "--log-interval", "100"], stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        assert first.startswith("Processed"), first
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(out.iterdir()) == []
