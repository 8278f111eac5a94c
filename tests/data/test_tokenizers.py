"""Tokenizers against Megatron's own: megatron-core 0.16.1's tokenizer library (current
Megatron-LM), the legacy Llama2 wrapper's rule, and transformers for tokenizer.json."""
import json
import os
import pickle
import re
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from megatron_ext import assets
from megatron_ext.data.tokenizers import (
    TOKENIZER_TYPES,
    HuggingFaceTokenizer,
    TokenizerError,
    build_tokenizer,
)


@pytest.fixture(scope="module")
def texts(botchan_txt, shakespeare_files):
    """Real passages: groups of botchan lines, Shakespeare speeches, odd whitespace, empty."""
    lines = botchan_txt.read_text(encoding="utf-8-sig").splitlines()
    out = [" ".join(lines[i : i + 6]) for i in range(0, 600, 6)]
    play = shakespeare_files[0].read_text(encoding="utf-8", errors="replace")
    out += [p for p in re.split(r"\n\s*\n", play)[:100] if p.strip()]
    out += ["", " ", "  leading and trailing  ", "tabs\tand\nnewlines\n", "naïve café — 東京 ✓"]
    return out


def megatron_core_sentencepiece(model_path):
    """What current Megatron-LM's preprocess_data.py builds for SentencePiece types."""
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(
        tokenizer_path=str(model_path), metadata_path={"library": "sentencepiece"},
        legacy=False, special_tokens=None,
    )


def hf_tokenizer_dir(gguf_path: Path) -> Path:
    """SmolLM2's byte-level BPE (a LLaMA-3 style tokenizer.json), exported by transformers from
    the real GGUF once and cached next to the other assets."""
    dest = assets.cache_dir() / "derived" / "smollm2-tokenizer"
    if (dest / "tokenizer.json").is_file():
        return dest
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=dest.parent))
    tok.save_pretrained(str(tmp))
    try:
        os.rename(tmp, dest)
    except OSError:  # another process won the race
        pass
    return dest


@pytest.fixture(scope="module")
def hf_dir(smollm2_gguf_path):
    return hf_tokenizer_dir(smollm2_gguf_path)


def test_llama2_prepends_bos_like_legacy_megatron(llama_sp_model):
    tok = build_tokenizer("Llama2Tokenizer", llama_sp_model)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama_sp_model))
    ids = tok.tokenize("The quick brown fox")
    assert ids[0] == 1 == tok.bos
    assert ids == [sp.bos_id()] + sp.encode_as_ids("The quick brown fox")
    assert tok.tokenize("") == [1]  # legacy tokenize(s, bos=True): BOS even for empty text
    assert (tok.eod, tok.eos, tok.vocab_size) == (2, 2, 32000)
    assert tok.detokenize(ids[1:]) == "The quick brown fox"


def test_sentencepiece_types_match_megatron_core(llama_sp_model, texts):
    oracle = megatron_core_sentencepiece(llama_sp_model)
    for name in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        tok = build_tokenizer(name, llama_sp_model)
        assert [tok.tokenize(t) for t in texts] == [oracle.tokenize(t) for t in texts], name
        assert tok.tokenize("The quick brown fox")[0] != tok.bos  # no BOS
        assert (tok.eod, tok.bos, tok.vocab_size) == (oracle.eod, oracle.bos, oracle.vocab_size)
        assert tok.detokenize(tok.tokenize(texts[3])) == oracle.detokenize(oracle.tokenize(texts[3]))


@pytest.mark.parametrize("name", ["Llama2Tokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer"])
def test_batch_and_arrays_equal_single_calls(name, llama_sp_model, texts):
    tok = build_tokenizer(name, llama_sp_model)
    single = [tok.tokenize(t) for t in texts]
    assert tok.tokenize_batch(texts, num_threads=2) == single
    arrays = tok.tokenize_arrays(texts, num_threads=2)
    assert all(a.dtype == np.int32 for a in arrays)
    assert [a.tolist() for a in arrays] == single
    assert tok.tokenize_batch([]) == [] and tok.tokenize_arrays([]) == []
    with pytest.raises(TypeError, match="text 1"):
        tok.tokenize_batch(["ok", 5])


def test_concurrent_batches_from_threads(llama_sp_model, texts):
    tok = build_tokenizer("Llama2Tokenizer", llama_sp_model)
    expected = tok.tokenize_batch(texts)
    results = [None] * 4

    def run(i):
        results[i] = [a.tolist() for a in tok.tokenize_arrays(texts)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results)


def test_legacy_sentencepiece_special_tokens(llama_sp_model):
    """megatron/training's _SentencePieceTokenizer: specials appended after the pieces,
    recognised in text, eod = <EOD>."""
    tok = build_tokenizer("SentencePieceTokenizer", llama_sp_model, legacy=True)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama_sp_model))
    n = sp.get_piece_size()
    # <CLS> <SEP> <EOD> <MASK> are new; the model has no pad piece, so <PAD> is new too;
    # <s> and </s> are the model's own bos/eos pieces.
    assert tok.special_tokens == {"<CLS>": n, "<SEP>": n + 1, "<EOD>": n + 2, "<MASK>": n + 3,
                                  "<PAD>": n + 4, "<s>": 1, "</s>": 2}
    assert (tok.vocab_size, tok.eod, tok.pad, tok.bos, tok.eos) == (n + 5, n + 2, n + 4, 1, 2)
    text = "Act I.<EOD>Scene </s> two <MASK>"
    expected = (sp.encode_as_ids("Act I.") + [n + 2] + sp.encode_as_ids("Scene ") + [2]
                + sp.encode_as_ids(" two ") + [n + 3] + sp.encode_as_ids(""))
    assert tok.tokenize(text) == expected
    assert tok.tokenize_batch(["plain", text]) == [sp.encode_as_ids("plain"), expected]
    assert [a.tolist() for a in tok.tokenize_arrays([text])] == [expected]
    assert "<EOD>" in tok.detokenize(expected)
    # without legacy the same text is plain SentencePiece
    assert build_tokenizer("SentencePieceTokenizer", llama_sp_model).tokenize(text) == sp.encode_as_ids(text)


def test_huggingface_tokenizer_matches_megatron_core(hf_dir, texts):
    from megatron.core.tokenizers import MegatronTokenizer

    oracle = MegatronTokenizer.from_pretrained(tokenizer_path=str(hf_dir), metadata_path={"library": "huggingface"})
    tok = build_tokenizer("HuggingFaceTokenizer", hf_dir)
    sample = texts[:40] + texts[-5:]
    assert [tok.tokenize(t) for t in sample] == [oracle.tokenize(t) for t in sample]
    assert tok.tokenize_batch(sample) == [tok.tokenize(t) for t in sample]
    assert (tok.eod, tok.vocab_size) == (oracle.eod, oracle.vocab_size)
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert tok.eos == tok.tok.token_to_id(config["eos_token"])
    # the file itself works too, and the tokenizer survives pickling (process workers)
    by_file = HuggingFaceTokenizer(hf_dir / "tokenizer.json")
    assert pickle.loads(pickle.dumps(by_file)).tokenize(texts[0]) == tok.tokenize(texts[0])


def test_huggingface_post_processor_special_tokens(hf_dir, tmp_path):
    """A tokenizer.json whose post-processor adds a BOS (as LLaMA-3's does) gets it, as with
    transformers' tokenizer(text).input_ids."""
    import transformers

    spec = json.loads((hf_dir / "tokenizer.json").read_text())
    bos = json.loads((hf_dir / "tokenizer_config.json").read_text())["bos_token"]
    bos_id = next(t["id"] for t in spec["added_tokens"] if t["content"] == bos)
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text((hf_dir / "tokenizer_config.json").read_text())
    tok = build_tokenizer("HuggingFaceTokenizer", tmp_path)
    oracle = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ("The quick brown fox", "", "def f(x):\n    return x"):
        assert tok.tokenize(text) == oracle(text).input_ids
        assert tok.tokenize(text)[0] == bos_id == tok.bos


def test_sentencepiece_pickles(llama_sp_model):
    tok = build_tokenizer("Llama2Tokenizer", llama_sp_model)
    again = pickle.loads(pickle.dumps(tok))
    assert again.tokenize("The quick brown fox") == tok.tokenize("The quick brown fox")


def test_loading_from_a_directory(llama_sp_model, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(llama_sp_model.read_bytes())
    tok = build_tokenizer("Llama2Tokenizer", tmp_path)
    assert tok.path == tmp_path / "tokenizer.model"
    assert tok.tokenize("The quick brown fox")[0] == 1


def test_missing_model_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    for name in ("Llama2Tokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer"):
        with pytest.raises(TokenizerError, match=re.escape(str(missing))):
            build_tokenizer(name, missing)
    with pytest.raises(TokenizerError, match=f"{re.escape(str(tmp_path))} has no tokenizer.model"):
        build_tokenizer("GPTSentencePieceTokenizer", tmp_path)
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tmp_path)
    with pytest.raises(TokenizerError, match="needs a tokenizer model"):
        build_tokenizer("Llama2Tokenizer", None)


def test_corrupt_model_names_the_path(tmp_path, llama_sp_model, hf_dir):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(llama_sp_model.read_bytes()[:1000])  # truncated protobuf
    with pytest.raises(TokenizerError, match=f"cannot load SentencePiece model {re.escape(str(bad))}"):
        build_tokenizer("SentencePieceTokenizer", bad)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text((hf_dir / "tokenizer.json").read_text()[:5000])
    with pytest.raises(TokenizerError, match=f"cannot load tokenizer.json {re.escape(str(bad_json))}"):
        build_tokenizer("HuggingFaceTokenizer", bad_json)


def test_unknown_type_lists_the_supported_ones(llama_sp_model):
    with pytest.raises(TokenizerError, match="GPT2BPETokenizer.*" + ".*".join(TOKENIZER_TYPES)):
        build_tokenizer("GPT2BPETokenizer", llama_sp_model)


def test_importing_needs_no_torch():
    import subprocess
    import sys

    code = ("import sys, megatron_ext.data.tokenizers, megatron_ext.data.preprocess; "
            "bad = [m for m in ('torch', 'megatron.core', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
