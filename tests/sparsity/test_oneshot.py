"""One-shot N:M pruning: the three scores, SparseGPT's reconstruction, calibration data,
the pruning tool on a real checkpoint layout, bad input.

The reconstruction comparison uses a real layer: SmolLM2-135M's layer-0 Q/K/V weights
and their real inputs (RMSNorm of the token embeddings of an English novel).
"""
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ext import platform
from megatron_ext.data.indexed_dataset import IndexedDatasetBuilder
from megatron_ext.data.tokenizers import build_tokenizer
from megatron_ext.models import build_model, get_config
from megatron_ext.checkpoint import load_checkpoint, mcore_to_hf, model_state_dict, save_checkpoint
from megatron_ext.checkpoint import save_hf_checkpoint
from megatron_ext.sparsity import extract_hard_masks
from megatron_ext.sparsity.nm import check_nm, group_view
from megatron_ext.sparsity.oneshot import (
    MASKED_LINEARS,
    OneShotError,
    PruneOptions,
    calibration_windows,
    magnitude_mask,
    prune_checkpoint,
    prune_model,
    sparsegpt_prune,
    wanda_mask,
)

REPO = Path(__file__).resolve().parents[2]
CFG = get_config("tiny")  # vocabulary 1000 = the botchan SentencePiece model
SEQ = 64


@pytest.fixture(scope="module")
def botchan_tokenizer_dir(tmp_path_factory, botchan_bpe_model):
    d = tmp_path_factory.mktemp("tok")
    shutil.copyfile(botchan_bpe_model, d / "tokenizer.model")
    return d


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, botchan_tokenizer_dir):
    """Our checkpoint of the tiny model (seeded weights) with the botchan tokenizer."""
    platform.init_distributed(1)
    platform.seed_everything(7)
    model = build_model(CFG)
    out = tmp_path_factory.mktemp("ckpt") / "dense"
    save_checkpoint(out, [model_state_dict(model)], CFG, tokenizer_dir=botchan_tokenizer_dir)
    return out


@pytest.fixture(scope="module")
def windows(botchan_txt, botchan_tokenizer_dir):
    tok = build_tokenizer("Llama2Tokenizer", botchan_tokenizer_dir)
    return calibration_windows(botchan_txt, 8, SEQ, seed=3, tokenizer=tok, vocab_size=CFG.vocab_size)


def _is_exact_nm(mask, N, M):
    return bool((group_view(mask, M).sum(-1) == N).all())


# --------------------------------------------------------------------------- scores


def test_magnitude_and_wanda_scores_by_hand():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, -1.0, 4.0]])
    assert magnitude_mask(w, 2, 4).tolist() == [[False, True, True, False, True, False, False, True]]
    # feature 0 has a huge input norm: Wanda keeps it over the larger weight at feature 2
    sq = torch.tensor([1e4, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert wanda_mask(w, sq, 2, 4).tolist() == [[True, True, False, False, True, False, False, True]]
    # equal scores: the lower position wins, whatever the values' signs
    assert magnitude_mask(torch.tensor([[1.0, -1.0, 1.0, -1.0]]), 2, 4).tolist() == [[True, True, False, False]]


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning():
    """H = I: no correlation between inputs, so no compensation and saliency ~ w^2."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    mask, updated = sparsegpt_prune(w, torch.eye(64), 2, 4, blocksize=16)
    assert torch.equal(mask, magnitude_mask(w, 2, 4))
    torch.testing.assert_close(updated, w * mask)


def _smollm2_layer0(gguf_path, text_path):
    """Real weights of SmolLM2-135M layer 0 (Q, K, V) and their real inputs."""
    import gguf

    from megatron_ext.checkpoint import gguf as gguf_import

    reader = gguf_import._open(Path(gguf_path))
    files = gguf_import.gguf_tokenizer_files(reader, Path(gguf_path), 8192)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(files["tokenizer.json"])
    tensors = {t.name: t for t in reader.tensors}

    def get(name):
        t = tensors[name]
        return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).float()  # a writable copy

    ids = tok.encode(Path(text_path).read_text(encoding="utf-8")[:60_000]).ids[:3000]
    emb = get("token_embd.weight")[torch.tensor(ids)]
    x = emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + 1e-5) * get("blk.0.attn_norm.weight")
    # Q and K rows are permuted by llama.cpp; rows are pruned independently, so it does not matter.
    w = torch.cat([get("blk.0.attn_q.weight"), get("blk.0.attn_k.weight"), get("blk.0.attn_v.weight")])
    return w, x


def test_sparsegpt_reconstructs_a_real_layer_better_than_wanda_and_magnitude(smollm2_gguf_path, botchan_txt):
    w, x = _smollm2_layer0(smollm2_gguf_path, botchan_txt)
    assert w.shape == (576 + 2 * 192, 576) and x.shape[1] == 576
    ref = x @ w.t()

    def err(pruned):
        return float((x @ pruned.t() - ref).norm() / ref.norm())

    xd = x.double()
    m_mag = magnitude_mask(w, 2, 4)
    m_wanda = wanda_mask(w, xd.pow(2).sum(0), 2, 4)
    m_sgpt, w_sgpt = sparsegpt_prune(w, xd.t() @ xd, 2, 4)
    for m in (m_mag, m_wanda, m_sgpt):
        assert _is_exact_nm(m, 2, 4)
    assert check_nm(w_sgpt, 2, 4) and not (w_sgpt[~m_sgpt] != 0).any()
    e_mag, e_wanda, e_sgpt = err(w * m_mag), err(w * m_wanda), err(w_sgpt)
    assert e_sgpt < e_wanda < e_mag, (e_sgpt, e_wanda, e_mag)
    assert e_sgpt < 0.9 * e_wanda  # the OBS update is worth something real


# --------------------------------------------------------------------------- calibration data


def test_calibration_windows_from_text_and_dataset_prefix(tmp_path, botchan_txt, botchan_tokenizer_dir):
    tok = build_tokenizer("Llama2Tokenizer", botchan_tokenizer_dir)
    stream = np.asarray(tok.tokenize(Path(botchan_txt).read_text(encoding="utf-8")), dtype=np.int64)
    a = calibration_windows(botchan_txt, 5, 32, seed=11, tokenizer=tok)
    assert a.shape == (5, 32) and np.array_equal(a, calibration_windows(botchan_txt, 5, 32, seed=11, tokenizer=tok))
    assert not np.array_equal(a, calibration_windows(botchan_txt, 5, 32, seed=12, tokenizer=tok))
    text = stream.tobytes()
    for row in a:  # each window is a contiguous piece of the tokenized text
        assert text.find(row.tobytes()) % 8 == 0

    # a .bin/.idx of short sequences (one per line): windows cross sequence boundaries
    prefix = tmp_path / "botchan"
    lines = [l for l in Path(botchan_txt).read_text(encoding="utf-8").splitlines() if l.strip()][:400]
    seqs = [np.asarray(tok.tokenize(l), dtype=np.int32) for l in lines]
    with IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16) as b:
        for s in seqs:
            b.add_item(s)
            b.end_document()
        b.finalize(str(prefix) + ".idx")
    joined = np.concatenate(seqs).astype(np.int64)
    assert max(len(s) for s in seqs) < 64
    d = calibration_windows(str(prefix), 6, 64, seed=5)
    assert np.array_equal(d, calibration_windows(str(prefix) + ".bin", 6, 64, seed=5))
    for row in d:
        assert joined.tobytes().find(row.tobytes()) % 8 == 0


def test_calibration_errors_name_the_input(tmp_path, botchan_txt, botchan_tokenizer_dir):
    tok = build_tokenizer("Llama2Tokenizer", botchan_tokenizer_dir)
    with pytest.raises(OneShotError, match="nowhere.txt: neither a text file"):
        calibration_windows(tmp_path / "nowhere.txt", 2, 16, tokenizer=tok)
    short = tmp_path / "short.txt"
    short.write_text("A few words.", encoding="utf-8")
    with pytest.raises(OneShotError, match="short.txt: .* fewer than one window of --seq-length 512"):
        calibration_windows(short, 2, 512, tokenizer=tok)
    with pytest.raises(OneShotError, match="outside the model's vocabulary of 100"):
        calibration_windows(botchan_txt, 2, 16, tokenizer=tok, vocab_size=100)
    with pytest.raises(OneShotError, match="needs the checkpoint's tokenizer"):
        calibration_windows(botchan_txt, 2, 16)


# --------------------------------------------------------------------------- whole model


@pytest.mark.parametrize("method,update", [("magnitude", False), ("wanda", False), ("sparsegpt", False),
                                           ("sparsegpt", True)])
def test_every_method_prunes_every_linear_to_exact_nm(tp1, tiny_ckpt, windows, method, update):
    _, (sd,) = load_checkpoint(tiny_ckpt)
    model = build_model(CFG)
    model.load_state_dict(sd, strict=False)
    masks = prune_model(model, PruneOptions(method, 2, 4, update_weight=update, blocksize=32), windows)
    pruned = model_state_dict(model)
    assert sorted(masks) == sorted(f"decoder.layers.{i}.{n}" for i in range(CFG.num_layers) for n in MASKED_LINEARS)
    changed = False
    for prefix, mask in masks.items():
        w0, w1 = sd[prefix + ".weight"], pruned[prefix + ".weight"]
        assert mask.shape == w0.shape and _is_exact_nm(mask, 2, 4), prefix
        assert not (w1[~mask] != 0).any(), prefix
        if update:
            changed |= not torch.equal(w1[mask], w0[mask])
        else:
            assert torch.equal(w1[mask], w0[mask]), prefix
    assert changed == update
    for k in sd:  # nothing but the masked linears is touched
        if not any(k.startswith(p) for p in masks):
            assert torch.equal(sd[k], pruned[k]), k


def test_methods_choose_different_masks_and_wanda_uses_the_data(tp1, tiny_ckpt, windows):
    _, (sd,) = load_checkpoint(tiny_ckpt)
    masks = []
    one_token = np.full_like(windows[:2], 5)  # other calibration data, other Wanda masks
    for method, data in (("magnitude", None), ("wanda", windows), ("wanda", one_token), ("sparsegpt", windows)):
        model = build_model(CFG)
        model.load_state_dict(sd, strict=False)
        masks.append(prune_model(model, PruneOptions(method, 2, 4, blocksize=32), data))
    key = "decoder.layers.1.mlp.linear_fc2"
    assert len({m[key].numpy().tobytes() for m in masks}) == len(masks)


def test_other_patterns(tp1, tiny_ckpt, windows):
    _, (sd,) = load_checkpoint(tiny_ckpt)
    for N, M in ((1, 4), (4, 8)):
        model = build_model(CFG)
        model.load_state_dict(sd, strict=False)
        masks = prune_model(model, PruneOptions("sparsegpt", N, M, update_weight=True, blocksize=64), windows[:2])
        assert all(_is_exact_nm(m, N, M) for m in masks.values())


def test_bad_options():
    with pytest.raises(OneShotError, match="--update-weight applies to --method sparsegpt only"):
        PruneOptions("wanda", update_weight=True).validate()
    with pytest.raises(OneShotError, match="0 < N < M"):
        PruneOptions("magnitude", 4, 4).validate()
    with pytest.raises(OneShotError, match="--method 'random'"):
        PruneOptions("random").validate()
    with pytest.raises(OneShotError, match="--blocksize 30 must be a positive multiple of M=4"):
        PruneOptions("sparsegpt", blocksize=30).validate()
    with pytest.raises(OneShotError, match="not a multiple of M=4"):
        magnitude_mask(torch.ones(3, 6), 2, 4)


# --------------------------------------------------------------------------- the tool


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prune_tool(*args):
    return _load_tool("prune_oneshot").main([str(a) for a in args])


def test_prune_tool_writes_pruned_weights_and_hard_masks(tiny_ckpt, botchan_txt, tmp_path, capsys):
    out = tmp_path / "sgpt"
    rc = _prune_tool("--load", tiny_ckpt, "--method", "sparsegpt", "--N", 2, "--M", 4, "--calib-data", botchan_txt,
                     "--hessian-samples", 4, "--seq-length", SEQ, "--save", out, "--update-weight",
                     "--blocksize", 32)
    assert rc == 0, capsys.readouterr().err
    assert "of their weights pruned" in capsys.readouterr().out
    info, (sd,) = load_checkpoint(out)
    assert info.extra["sparsity"]["method"] == "sparsegpt" and info.extra["sparsity"]["N"] == 2
    assert info.tokenizer_type == "Llama2Tokenizer"
    masks = extract_hard_masks(sd)  # the mask-learning side reads our prior masks
    assert len(masks) == 4 * CFG.num_layers
    for prefix, mask in masks.items():
        assert sd[prefix + ".hard_mask"].dtype == torch.bool and _is_exact_nm(mask, 2, 4)
        assert not (sd[prefix + ".weight"][~mask] != 0).any()
    # a pruned checkpoint is a valid source again: pruning it by magnitude keeps its masks
    again = tmp_path / "again"
    assert _prune_tool("--load", out, "--method", "magnitude", "--save", again) == 0
    _, (sd2,) = load_checkpoint(again)
    for prefix, mask in masks.items():
        assert torch.equal(sd2[prefix + ".hard_mask"], mask), prefix


def test_hugging_face_directory_is_a_source_too(tiny_ckpt, botchan_txt, tmp_path):
    info, (sd,) = load_checkpoint(tiny_ckpt)
    hf = tmp_path / "hf"
    save_hf_checkpoint(hf, CFG, mcore_to_hf([sd], CFG), tokenizer_dir=info.tokenizer_dir)
    platform.init_distributed(1)
    opts = PruneOptions("wanda", 2, 4)
    kwargs = dict(calib_data=botchan_txt, num_samples=3, seq_length=SEQ, seed=9)
    from_hf = prune_checkpoint(hf, None, opts, **kwargs)
    from_ours = prune_checkpoint(tiny_ckpt, None, opts, **kwargs)
    assert from_hf.masks.keys() == from_ours.masks.keys()
    assert all(torch.equal(from_hf.masks[k], from_ours.masks[k]) for k in from_ours.masks)


def test_prune_tool_bad_input(tiny_ckpt, tmp_path, capsys):
    rc = _prune_tool("--load", tiny_ckpt, "--method", "wanda", "--save", tmp_path / "x")
    assert rc == 1 and "--method wanda needs --calib-data" in capsys.readouterr().err
    rc = _prune_tool("--load", tiny_ckpt, "--method", "wanda", "--calib-data", tmp_path / "none.txt",
                     "--save", tmp_path / "x")
    assert rc == 1 and "none.txt: neither a text file nor a .bin/.idx dataset prefix" in capsys.readouterr().err
    rc = _prune_tool("--load", tmp_path / "missing", "--method", "magnitude", "--save", tmp_path / "x")
    assert rc == 1 and "missing" in capsys.readouterr().err
    rc = _prune_tool("--load", tiny_ckpt, "--method", "magnitude", "--N", 3, "--M", 2, "--save", tmp_path / "x")
    assert rc == 1 and "0 < N < M" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert _prune_tool("--load", tiny_ckpt, "--method", "magnitude", "--save", tmp_path / "x") == 0
    capsys.readouterr()
    assert _prune_tool("--load", tiny_ckpt, "--method", "magnitude", "--save", tmp_path / "x") == 1
    assert "already holds iter_0000000 (pass --overwrite to replace it)" in capsys.readouterr().err
    assert _prune_tool("--load", tiny_ckpt, "--method", "magnitude", "--save", tmp_path / "x", "--overwrite") == 0
