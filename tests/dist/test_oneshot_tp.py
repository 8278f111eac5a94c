"""One-shot pruning under tensor and data parallelism (gloo, CPU) reproduces TP=1.

Every rank prunes the TP=1 model (data-parallel over all ranks), then the TP=k shard of
the same weights (``checkpoint.split_tp``), calibrated on the same windows of a real
text, and compares its local masks with the TP=1 masks split for TP=k. Five windows
over six ranks leave one data-parallel rank without data at TP=1. Assertions come
after the last collective of each test so a failing rank cannot leave the others
waiting.
"""
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_ext.data.tokenizers import build_tokenizer
from megatron_ext.models import build_model, get_config
from megatron_ext.checkpoint import load_checkpoint, model_state_dict, save_checkpoint, split_tp
from megatron_ext.sparsity.nm import check_nm
from megatron_ext.sparsity.oneshot import PruneOptions, calibration_windows, prune_checkpoint, prune_model

CASES = {
    "tiny-tp2": (get_config("tiny"), 2),
    # 6 heads / 3 query groups: TP=3 splits every head group; the row-parallel inputs per
    # rank (32 and 64 features) hold whole groups of 4
    "gqa-tp3": (get_config("tiny", hidden_size=96, num_attention_heads=6, num_query_groups=3,
                           ffn_hidden_size=192), 3),
}
SEED = 2024


@pytest.fixture(scope="module")
def windows(botchan_bpe_model, botchan_txt):
    tok = build_tokenizer("Llama2Tokenizer", botchan_bpe_model)
    return calibration_windows(botchan_txt, 5, 32, seed=1, tokenizer=tok)


def _prune(parallel, cfg, tp, opts, windows, full=None):
    info = parallel(tp, seed=SEED)
    model = build_model(cfg)
    if full is not None:
        model.load_state_dict(split_tp(full, cfg, tp)[info.tp_rank], strict=False)
    weights = model_state_dict(model)
    masks = prune_model(model, opts, windows)
    return info, weights, masks, model_state_dict(model)


def _split_masks(masks, cfg, tp, rank):
    shards = split_tp({f"{k}.hard_mask": v for k, v in masks.items()}, cfg, tp)[rank]
    return {k[: -len(".hard_mask")]: v for k, v in shards.items()}


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("case", list(CASES))
def test_magnitude_and_wanda_masks_do_not_depend_on_tp(parallel, windows, case, method):
    cfg, tp = CASES[case]
    opts = PruneOptions(method, 2, 4)
    _, full, ref_masks, ref_pruned = _prune(parallel, cfg, 1, opts, windows)
    info, _, masks, pruned = _prune(parallel, cfg, tp, opts, windows, full)
    expected = _split_masks(ref_masks, cfg, tp, info.tp_rank)
    expected_weights = split_tp(ref_pruned, cfg, tp)[info.tp_rank]
    assert info.tp_size == tp and info.dp_size == info.world_size // tp
    assert sorted(masks) == sorted(expected)
    differing = [k for k in masks if not torch.equal(masks[k], expected[k])]
    assert not differing
    assert all(torch.equal(pruned[k], expected_weights[k]) for k in expected_weights if k in pruned)


@pytest.mark.parametrize("case", list(CASES))
def test_sparsegpt_with_full_row_hessian_matches_tp1(parallel, windows, case):
    """Row-parallel layers gather their inputs' full Hessian and the weight's columns, so
    SparseGPT (masks and OBS-updated weights) is the TP=1 computation split over rows."""
    cfg, tp = CASES[case]
    opts = PruneOptions("sparsegpt", 2, 4, update_weight=True, blocksize=64)
    _, full, ref_masks, ref_pruned = _prune(parallel, cfg, 1, opts, windows)
    info, _, masks, pruned = _prune(parallel, cfg, tp, opts, windows, full)
    expected = _split_masks(ref_masks, cfg, tp, info.tp_rank)
    expected_weights = split_tp(ref_pruned, cfg, tp)[info.tp_rank]
    differing = {k: int((masks[k] != expected[k]).sum()) for k in masks if not torch.equal(masks[k], expected[k])}
    assert not differing
    for k in masks:
        torch.testing.assert_close(pruned[k + ".weight"], expected_weights[k + ".weight"], rtol=1e-4, atol=1e-5)


def test_sparsegpt_with_local_row_hessian(parallel, windows):
    """``row_hessian="local"``: column-parallel layers still see the full input (layer 0's
    qkv input comes before any pruned row layer: the same mask as TP=1); row-parallel
    layers are pruned with their diagonal Hessian block only (valid N:M masks, not
    necessarily TP=1's)."""
    cfg, tp = CASES["tiny-tp2"]
    full_opts = PruneOptions("sparsegpt", 2, 4, blocksize=64)
    local_opts = PruneOptions("sparsegpt", 2, 4, blocksize=64, row_hessian="local")
    _, full, ref_masks, _ = _prune(parallel, cfg, 1, full_opts, windows)
    info, _, masks, pruned = _prune(parallel, cfg, tp, local_opts, windows, full)
    expected = _split_masks(ref_masks, cfg, tp, info.tp_rank)
    assert all(check_nm(m, 2, 4, exact=True) for m in masks.values())
    assert all(not (pruned[k + ".weight"][~m] != 0).any() for k, m in masks.items())
    assert torch.equal(masks["decoder.layers.0.self_attention.linear_qkv"],
                       expected["decoder.layers.0.self_attention.linear_qkv"])


def test_prune_checkpoint_at_tp2_saves_the_tp1_result(parallel, botchan_bpe_model, botchan_txt):
    """The checkpoint path: TP shards gathered on rank 0 and saved; calibration text is
    tokenized with the checkpoint's own tokenizer."""
    cfg, tp = CASES["tiny-tp2"]
    info = parallel(1, seed=SEED)
    root = [tempfile.mkdtemp(prefix="oneshot-tp-") if info.rank == 0 else None]
    dist.broadcast_object_list(root, src=0)
    root = Path(root[0])
    if info.rank == 0:
        (root / "tok").mkdir()
        shutil.copyfile(botchan_bpe_model, root / "tok" / "tokenizer.model")
        save_checkpoint(root / "dense", [model_state_dict(build_model(cfg))], cfg, tokenizer_dir=root / "tok")
    dist.barrier()
    opts = PruneOptions("wanda", 2, 4)
    kwargs = dict(calib_data=botchan_txt, num_samples=5, seq_length=32, seed=3)
    prune_checkpoint(root / "dense", root / "tp1", opts, **kwargs)
    parallel(tp, seed=SEED)
    prune_checkpoint(root / "dense", root / "tp2", opts, **kwargs)
    info1, (sd1,) = load_checkpoint(root / "tp1")
    info2, sds2 = load_checkpoint(root / "tp2")
    dist.barrier()
    if info.rank == 0:
        shutil.rmtree(root)
    expected = split_tp(sd1, cfg, tp)
    assert info2.tensor_parallel_size == tp and info2.extra["sparsity"]["pruned_at_tp"] == tp
    assert info1.extra["sparsity"]["method"] == "wanda"
    masks = [k for k in sd1 if k.endswith(".hard_mask")]
    assert len(masks) == 4 * cfg.num_layers
    for rank in range(tp):
        assert sds2[rank].keys() == expected[rank].keys()
        assert not [k for k in expected[rank] if not torch.equal(sds2[rank][k], expected[rank][k])]
