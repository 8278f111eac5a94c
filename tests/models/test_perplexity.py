"""tools/eval_ppl.py against a direct computation with transformers, on real text.

Real weights (SmolLM2-135M imported from its GGUF, byte-level BPE tokenizer) and a
small random model with the real LLaMA SentencePiece tokenizer (Llama2Tokenizer:
BOS prepended); the reference tokenizes and scores independently of our code.
"""
import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from megatron_ext import platform
from megatron_ext import checkpoint as ckpt
from megatron_ext.checkpoint.gguf import import_gguf
from megatron_ext.checkpoint import from_hf_config
from megatron_ext.evaluation import PerplexityError, evaluate

LAST_LINE = re.compile(r"^PPL (\d+\.\d+) tokens (\d+)$")


def _eval_tool():
    path = Path(__file__).resolve().parents[2] / "tools" / "eval_ppl.py"
    spec = importlib.util.spec_from_file_location("tool_eval_ppl", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_tool(capsys, *argv):
    rc = _eval_tool().main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _reference_ppl(model, ids: list[int], seq_length: int) -> tuple[float, int]:
    """exp(mean NLL) over non-overlapping windows, computed with transformers in float64 sums."""
    n = len(ids) // seq_length
    windows = torch.tensor(ids[: n * seq_length]).view(n, seq_length)
    total = 0.0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0, :-1].double()
            total += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
    count = n * (seq_length - 1)
    return math.exp(total / count), count


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, botchan_txt):
    """The first ~6 KB of botchan.txt, cut at a line end."""
    text = botchan_txt.read_text(encoding="utf-8")
    cut = text.index("\n", 6000) + 1
    path = tmp_path_factory.mktemp("text") / "botchan_head.txt"
    path.write_text(text[:cut], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory, smollm2_gguf_path):
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    import_gguf(smollm2_gguf_path, out)
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, llama_sp_model):
    """A small random LLaMA with the real 32k LLaMA tokenizer, saved at TP=2 in our format."""
    root = tmp_path_factory.mktemp("tiny")
    hf_cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=32000,
                                      max_position_embeddings=256, initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    tok_dir = root / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.model").write_bytes(llama_sp_model.read_bytes())
    cfg = from_hf_config(hf_cfg.to_dict(), name="tiny32k")
    ckpt.save_checkpoint(root / "mc", ckpt.hf_to_mcore(model.state_dict(), cfg, 2), cfg, tokenizer_dir=tok_dir)
    return root / "mc", model


def test_eval_ppl_on_real_weights_matches_transformers(smol_dir, text_file, capsys):
    rc, out, err = _run_tool(capsys, "--load", smol_dir, "--text-file", text_file, "--seq-length", 256)
    assert rc == 0, err
    m = LAST_LINE.match(out.strip().splitlines()[-1])
    assert m, out
    ppl, count = float(m.group(1)), int(m.group(2))
    ref_tok = transformers.AutoTokenizer.from_pretrained(smol_dir)
    ids = ref_tok(text_file.read_text(encoding="utf-8")).input_ids
    ref_model = transformers.LlamaForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    ref_ppl, ref_count = _reference_ppl(ref_model, ids, 256)
    assert count == ref_count == (len(ids) // 256) * 255
    assert 5 < ref_ppl < 200  # a real model on real English text
    assert ppl == pytest.approx(ref_ppl, rel=1e-5)


def test_checkpoint_text_and_dataset_agree(smol_dir, text_file, tmp_path):
    """HF dir vs our TP=3 checkpoint (resharded to TP=1 on load) vs a tokenized .bin/.idx."""
    from megatron_ext.data.indexed_dataset import IndexedDatasetBuilder
    from megatron_ext.data.tokenizers import build_tokenizer

    ckpt.convert_checkpoint("hf", "megatron", smol_dir, tmp_path / "mc", target_tp=3)
    platform.init_distributed(1)
    a = evaluate(smol_dir, seq_length=64, text_file=text_file, max_windows=2)
    b = evaluate(tmp_path / "mc", seq_length=64, text_file=text_file, max_windows=2)
    ids = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "mc" / "iter_0000000" / "tokenizer")).tokenize(
        text_file.read_text(encoding="utf-8"))
    builder = IndexedDatasetBuilder(str(tmp_path / "ds.bin"), dtype=np.uint16)
    half = len(ids) // 2
    builder.add_document(ids[:half], [half])  # two documents: concatenated back in order
    builder.add_document(ids[half:], [len(ids) - half])
    builder.finalize(str(tmp_path / "ds.idx"))
    c = evaluate(tmp_path / "mc", seq_length=64, data_path=tmp_path / "ds", max_windows=2)
    assert a.tokens == b.tokens == c.tokens == 2 * 63
    assert a.window_nll == b.window_nll == c.window_nll
    assert a.ppl == b.ppl == c.ppl


def test_llama2_tokenizer_checkpoint_at_other_tp_matches_transformers(tiny_ckpt, text_file, capsys, llama_sp_model):
    import sentencepiece as spm

    path, model = tiny_ckpt
    rc, out, err = _run_tool(capsys, "--load", path, "--text-file", text_file, "--seq-length", 64,
                             "--micro-batch-size", 3)
    assert rc == 0, err
    ppl, count = LAST_LINE.match(out.strip().splitlines()[-1]).groups()
    sp = spm.SentencePieceProcessor(model_file=str(llama_sp_model))
    ids = [sp.bos_id()] + sp.encode(text_file.read_text(encoding="utf-8"))  # the whole text is one document
    ref_ppl, ref_count = _reference_ppl(model, ids, 64)
    assert int(count) == ref_count
    assert float(ppl) == pytest.approx(ref_ppl, rel=1e-5)


def test_sparse_without_masks_and_bad_input(tiny_ckpt, text_file, tmp_path, capsys):
    path, _ = tiny_ckpt                       # bad input exits 2, as the trainer's does
    rc, out, err = _run_tool(capsys, "--load", path, "--text-file", text_file, "--seq-length", 64, "--sparse")
    assert rc == 2 and "checkpoint has no masks" in err and str(path) in err
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.", encoding="utf-8")
    rc, out, err = _run_tool(capsys, "--load", path, "--text-file", short, "--seq-length", 64)
    assert rc == 2 and "fewer than one window of --seq-length 64" in err
    rc, out, err = _run_tool(capsys, "--load", tmp_path / "nope", "--text-file", text_file, "--seq-length", 64)
    assert rc == 2 and "nope: checkpoint not found" in err
    rc, out, err = _run_tool(capsys, "--load", path, "--text-file", tmp_path / "none.txt", "--seq-length", 64)
    assert rc == 2 and "none.txt: text file not found" in err
    rc, out, err = _run_tool(capsys, "--load", path, "--text-file", text_file, "--seq-length", 64,
                             "--tensor-model-parallel-size", 2)
    assert rc == 2 and "does not divide the world size 1" in err
    with pytest.raises(SystemExit):
        _eval_tool().main(["--load", str(path), "--text-file", str(text_file), "--data-path", "x",
                           "--seq-length", "64"])
    platform.init_distributed(1)
    with pytest.raises(PerplexityError, match="--seq-length must be >= 2"):
        evaluate(path, seq_length=1, text_file=text_file)


def test_wikitext2_script_checks_its_inputs(tmp_path, tiny_ckpt):
    import os
    import subprocess

    script = Path(__file__).resolve().parents[2] / "scripts" / "ppl" / "evaluate_llama2_wikitext2.sh"
    env = dict(os.environ, WIKITEXT2_TEST=str(tmp_path / "missing.raw"))

    def run(*args):
        return subprocess.run(["bash", str(script), *map(str, args)], capture_output=True, text=True, env=env)

    res = run(tmp_path / "no_ckpt", "llama2-7b", 1, "dense")
    assert res.returncode == 1 and "checkpoint not found" in res.stderr
    res = run(tiny_ckpt[0], "llama2-7b", 1, "dense")
    assert res.returncode == 1 and "missing.raw" in res.stderr and "WIKITEXT2_TEST" in res.stderr
    res = run(tiny_ckpt[0], "llama2-7b", 1, "half")
    assert res.returncode == 2 and "dense" in res.stderr
    res = run(tiny_ckpt[0], "llama2-7b")
    assert res.returncode == 2 and "usage" in res.stderr


def test_sparse_eval_applies_the_hard_masks(tiny_ckpt, text_file, tmp_path, capsys, llama_sp_model):
    """A TP=2 checkpoint with 2:4 ``hard_mask`` entries: --sparse scores the masked weights
    (transformers on the same weights multiplied by the masks), a dense run ignores them."""
    import sentencepiece as spm

    path, model = tiny_ckpt
    info = ckpt.read_checkpoint_info(path)
    cfg = info.config
    (full,) = ckpt.hf_to_mcore(model.state_dict(), cfg, 1)
    with_masks, baked = dict(full), dict(full)
    for key, w in full.items():
        if key.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")):
            groups = w.abs().view(w.shape[0], -1, 4)  # 2 largest of every 4 along the input dimension
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
            keep = keep.view_as(w)
            with_masks[key[: -len(".weight")] + ".hard_mask"] = keep
            baked[key] = w * keep
    ckpt.save_checkpoint(tmp_path / "sparse", ckpt.split_tp(with_masks, cfg, 2), cfg, tokenizer_dir=info.tokenizer_dir)

    rc, out, err = _run_tool(capsys, "--load", tmp_path / "sparse", "--text-file", text_file, "--seq-length", 64,
                             "--sparse")
    assert rc == 0, err
    sparse_ppl = float(LAST_LINE.match(out.strip().splitlines()[-1]).group(1))
    rc, out, err = _run_tool(capsys, "--load", tmp_path / "sparse", "--text-file", text_file, "--seq-length", 64)
    assert rc == 0, err
    dense_ppl = float(LAST_LINE.match(out.strip().splitlines()[-1]).group(1))

    sp = spm.SentencePieceProcessor(model_file=str(llama_sp_model))
    ids = [sp.bos_id()] + sp.encode(text_file.read_text(encoding="utf-8"))
    masked_model = transformers.LlamaForCausalLM(model.config).eval()
    masked_model.load_state_dict(ckpt.mcore_to_hf([baked], cfg))
    assert sparse_ppl == pytest.approx(_reference_ppl(masked_model, ids, 64)[0], rel=1e-5)
    assert dense_ppl == pytest.approx(_reference_ppl(model, ids, 64)[0], rel=1e-5)
    assert abs(sparse_ppl / dense_ppl - 1) > 1e-3
