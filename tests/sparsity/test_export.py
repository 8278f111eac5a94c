"""Export of sparse checkpoints (hf, megatron, packed masks) and the N:M checker.

Sources are real checkpoints in our format: a one-shot (Wanda) pruned tiny model and
a mask-learning model built by ``build_sparse_model`` whose ``mask_logits`` are saved
at TP=2.
"""
import importlib.util
import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_ext import platform
from megatron_ext.models import get_config
from megatron_ext.checkpoint import (load_checkpoint, mcore_to_hf, merge_tp, model_state_dict,
                                            save_checkpoint, split_tp)
from megatron_ext.checkpoint import load_hf_state_dict
from megatron_ext.sparsity import build_sparse_model, extract_hard_masks
from megatron_ext.sparsity.export import (ExportError, check_sparsity, decode_mask, encode_mask, export_sparse,
                                          load_packed_masks, save_packed_masks)
from megatron_ext.sparsity.nm import candidates, group_view
from megatron_ext.sparsity.oneshot import PruneOptions, prune_checkpoint

REPO = Path(__file__).resolve().parents[2]
CFG = get_config("tiny")


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool(name, *args):
    return _load_tool(name).main([str(a) for a in args])


@pytest.fixture(scope="module")
def pruned_ckpt(tmp_path_factory, botchan_bpe_model, botchan_txt):
    """Wanda 2:4 one-shot checkpoint of the tiny model, calibrated on botchan."""
    root = tmp_path_factory.mktemp("export")
    tok = root / "tok"
    tok.mkdir()
    shutil.copyfile(botchan_bpe_model, tok / "tokenizer.model")
    platform.init_distributed(1)
    platform.seed_everything(5)
    from megatron_ext.models import build_model

    save_checkpoint(root / "dense", [model_state_dict(build_model(CFG))], CFG, tokenizer_dir=tok)
    prune_checkpoint(root / "dense", root / "wanda", PruneOptions("wanda", 2, 4), calib_data=botchan_txt,
                     num_samples=4, seq_length=64)
    return root / "wanda"


@pytest.fixture(scope="module")
def logits_ckpt_tp2(tmp_path_factory):
    """A mask-learning model's checkpoint (weights + random mask_logits) saved at TP=2."""
    platform.init_distributed(1)
    platform.seed_everything(9)
    model = build_sparse_model(CFG, 2, 4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mask_logits"):
                p.normal_(0.0, 1.0)
    full = model_state_dict(model)
    out = tmp_path_factory.mktemp("logits") / "ckpt"
    save_checkpoint(out, split_tp(full, CFG, 2), CFG)
    return out, full


def _masked_prefixes():
    return [f"decoder.layers.{i}.{n}" for i in range(CFG.num_layers)
            for n in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")]


# --------------------------------------------------------------------------- hf


def test_hf_export_bakes_masks_and_passes_the_check(pruned_ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    assert _tool("export_sparse", "--load", pruned_ckpt, "--save", out, "--format", "hf") == 0
    assert "exported 8 masked linears (2:4) as hf" in capsys.readouterr().out
    _, (sd,) = load_checkpoint(pruned_ckpt)
    masks = extract_hard_masks(sd)
    baked = dict(sd)
    for prefix, mask in masks.items():
        baked[prefix + ".weight"] = sd[prefix + ".weight"] * mask
    expected = mcore_to_hf([baked], CFG)
    got = load_hf_state_dict(out)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert (out / "tokenizer.model").is_file()
    assert set(got) == set(expected)
    for k in expected:
        assert got[k].dtype == torch.float16 and torch.equal(got[k], expected[k].half()), k

    assert _tool("check_sparsity", out, "--N", 2, "--M", 4) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj.weight" in printed and "sparsity 0.5000" in printed
    assert "OK: every masked layer is 2:4 sparse" in printed
    assert check_sparsity(out, 2, 4).ok
    assert not check_sparsity(out, 1, 4).ok  # 2 non-zeros per group is not 1:4


def test_corrupted_export_fails_the_check_naming_layer_and_group(pruned_ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    export_sparse(pruned_ckpt, out, "hf")
    path = out / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.1.mlp.down_proj.weight"
    w = tensors[key].clone()
    row, group = 3, 5
    w[row, group * 4:group * 4 + 4] = torch.tensor([0.5, -0.25, 0.125, 0.0], dtype=w.dtype)
    tensors[key] = w
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert _tool("check_sparsity", out, "--N", 2, "--M", 4) == 1
    err = capsys.readouterr().err
    assert f"{key}: row 3, group 5 (input columns 20-23) has 3 non-zeros, more than N=2 of M=4" in err
    report = check_sparsity(out, 2, 4)
    assert [l.name for l in report.layers if l.bad_groups] == [key]
    assert report.layers[-1].bad_groups == 1


def test_dense_checkpoint_fails_and_bad_paths_are_named(pruned_ckpt, tmp_path, capsys):
    dense = pruned_ckpt.parent / "dense"
    assert _tool("check_sparsity", dense, "--N", 2, "--M", 4) == 1
    err = capsys.readouterr().err
    assert "first: decoder.layers.0.self_attention.linear_qkv.weight: row 0, group 0" in err
    assert _tool("check_sparsity", tmp_path / "nothing", "--N", 2, "--M", 4) == 2
    assert "nothing: no such checkpoint" in capsys.readouterr().err
    assert _tool("export_sparse", "--load", dense, "--save", tmp_path / "o", "--format", "hf") == 1
    assert "no mask_logits or hard_mask tensors to export" in capsys.readouterr().err


# --------------------------------------------------------------------------- megatron, learned logits, TP


def test_megatron_export_of_learned_logits_at_tp2(logits_ckpt_tp2, tmp_path):
    src, full = logits_ckpt_tp2
    expected = extract_hard_masks(full)  # argmax of the logits, TP=1
    out = tmp_path / "meg"
    result = export_sparse(src, out, "megatron")
    assert (result.N, result.M, result.layers) == (2, 4, 8)
    info, sds = load_checkpoint(out)
    assert info.tensor_parallel_size == 2 and info.extra["sparsity"]["N"] == 2
    assert not any(k.endswith("mask_logits") for sd in sds for k in sd)
    merged = merge_tp(sds, CFG)
    for prefix, mask in expected.items():
        assert torch.equal(merged[prefix + ".hard_mask"], mask), prefix
        assert torch.equal(merged[prefix + ".weight"], full[prefix + ".weight"] * mask), prefix
    report = check_sparsity(out, 2, 4)
    assert report.ok and report.source == "megatron" and abs(report.sparsity - 0.5) < 1e-9

    # one shard corrupted: the checker names the layer and the TP rank
    shard = info.shard_path(1)
    payload = torch.load(shard, weights_only=True)
    payload["model"]["decoder.layers.0.mlp.linear_fc2.weight"][7, 8:12] = 1.0
    torch.save(payload, shard)
    report = check_sparsity(out, 2, 4)
    assert not report.ok
    assert report.first_violation.startswith(
        "decoder.layers.0.mlp.linear_fc2.weight (TP rank 1 of 2): row 7, group 2 (input columns 8-11) has 4")


def test_masks_export_is_tp_independent_and_round_trips(logits_ckpt_tp2, tmp_path, capsys):
    src, full = logits_ckpt_tp2
    tp1 = tmp_path / "tp1"
    save_checkpoint(tp1, [full], CFG)
    assert _tool("export_sparse", "--load", src, "--save", tmp_path / "m2", "--format", "masks") == 0
    printed = capsys.readouterr().out
    assert "= 0.7500 bits per parameter" in printed
    r1 = export_sparse(tp1, tmp_path / "m1", "masks")
    assert r1.pack.bits_per_param == 0.75
    a, meta = load_packed_masks(tmp_path / "m2")
    b, _ = load_packed_masks(tmp_path / "m1" / "masks.npz")
    expected = extract_hard_masks(full)
    assert list(a) == _masked_prefixes() and meta["N"] == 2 and meta["M"] == 4
    for prefix in expected:
        assert torch.equal(a[prefix], expected[prefix]) and torch.equal(b[prefix], expected[prefix])
    params = sum(m.numel() for m in expected.values())
    assert r1.pack.params == params and r1.pack.bytes * 8 == 0.75 * params  # a bitmap needs params / 8 bytes
    assert (tmp_path / "m1" / "masks.npz").stat().st_size < r1.pack.bytes + 8192  # + zip/npy headers and metadata
    with pytest.raises(ExportError, match="exists"):
        export_sparse(tp1, tmp_path / "m1", "masks")


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("N,M,bits", [(2, 4, 0.75), (1, 4, 0.5), (4, 8, 0.875), (1, 2, 0.5)])
def test_packed_masks_round_trip_exactly(tmp_path, N, M, bits):
    g = torch.Generator().manual_seed(N * 10 + M)
    cands = candidates(N, M)
    masks = {f"layer{i}": (cands[torch.randint(0, cands.shape[0], (rows, cols // M), generator=g)] != 0)
             .reshape(rows, cols) for i, (rows, cols) in enumerate([(16, 64), (8, 32), (3, 8 * M)])}
    stats = save_packed_masks(tmp_path / "m.npz", masks, N, M)
    back, meta = load_packed_masks(tmp_path / "m.npz")
    assert list(back) == list(masks)
    for k in masks:
        assert back[k].dtype == torch.bool and torch.equal(back[k], masks[k])
    groups = sum(m.numel() // M for m in masks.values())
    ideal_bytes = sum(-(-(m.numel() // M * meta["bits_per_group"]) // 8) for m in masks.values())
    assert stats.bytes == ideal_bytes and groups * meta["bits_per_group"] / stats.params == bits
    assert abs(stats.bits_per_param - bits) < 0.02


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_packed_masks_file_has_the_mode_of_new_files(tmp_path, umask, mask):
    umask(mask)
    masks = {"layer0": candidates(2, 4)[torch.arange(32) % 6].reshape(4, 32) != 0}
    save_packed_masks(tmp_path / "m.npz", masks, 2, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.npz"]
    assert stat.S_IMODE((tmp_path / "m.npz").stat().st_mode) == 0o666 & ~mask
    assert torch.equal(load_packed_masks(tmp_path / "m.npz")[0]["layer0"], masks["layer0"])


def test_packing_rejects_masks_that_are_not_candidates(tmp_path):
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, ::2] = True
    mask[2, 8:12] = torch.tensor([True, True, True, False])
    with pytest.raises(ExportError, match="layer.x: row 2, group 2 .* keeps 3 of 4, not exactly N=2"):
        encode_mask(mask, 2, 4, "layer.x")
    packed = encode_mask(group_view(mask, 4).new_zeros(4, 16).index_fill_(1, torch.arange(0, 16, 2), True), 2, 4)
    with pytest.raises(ExportError, match="too short"):
        decode_mask(packed[:-1], (4, 16), 2, 4)
    bad = tmp_path / "bad.npz"
    np.savez(bad, meta=np.array(json.dumps({"format": "something else", "version": 1})))
    with pytest.raises(ExportError, match="bad.npz: format 'something else'"):
        load_packed_masks(bad)
