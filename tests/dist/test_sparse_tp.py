"""Masked models under tensor and data parallelism (gloo, CPU): TP=k reproduces TP=1.

Every rank builds the TP=1 sparse model from a seed (no communication), then its
TP=k shard with the same seed. Weights and mask logits are both functions of the
seed and the global position, and the Gumbel noise is keyed by the global group
index, so each shard must be the TP=1 tensors split for TP=k and must draw the
TP=1 masks (soft and hard). Assertions come after the last collective of each test.
"""
import math

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ext.models import ConfigError, get_config
from megatron_ext.models.build import forward_logits, lm_loss
from megatron_ext.checkpoint import model_state_dict, save_checkpoint, split_tp
from megatron_ext.sparsity import (MaskMetrics, apply_prior, build_sparse_model, finish_mask_backward,
                                   load_prior_masks, masked_linears, model_hard_masks)
from megatron_ext.sparsity.nm import topn_mask

SEED = 2024
BATCH, SEQ = 6, 16
CASES = {
    "tiny-tp2-soft": (get_config("tiny"), 2, False),
    "tiny-tp2-hard": (get_config("tiny"), 2, True),
    # SmolLM2-135M's layer shapes (GQA 9/3, ffn 1536, tied embeddings), one layer: TP=3
    "smollm2-shaped-tp3-soft": (get_config("smollm2-135m", num_layers=1, vocab_size=1100), 3, False),
}


def _sd(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _logit_grads(model):
    return {f"{layer.layer_name}.mask_logits": layer.mask_logits.grad.detach().clone()
            for _, layer in masked_linears(model)}


def _run(model, tokens, labels, rows, dp_group, dp_size):
    """Forward logits, one DP-averaged backward on ``rows``, metrics before/after a prior."""
    state = model.sparsity_state
    state.update(5, 20)
    with torch.no_grad():
        logits = forward_logits(model, tokens[:2])
    lm_loss(model, tokens[rows], labels[rows]).backward()
    finish_mask_backward(model)
    grads = _logit_grads(model)
    if dp_group is not None:
        for g in grads.values():
            dist.all_reduce(g, group=dp_group)
            g /= dp_size
    metrics = MaskMetrics()
    first = metrics(model)
    apply_prior(model, {n: topn_mask(l.weight.detach().abs(), 2, 4) for n, l in
                        ((l.layer_name, l) for _, l in masked_linears(model))}, alpha=1.0)
    second = metrics(model)
    return logits, grads, first, second, _sd(model)


@pytest.mark.parametrize("case", list(CASES))
def test_sparse_tp_reproduces_tp1(parallel, case):
    cfg, tp, hard = CASES[case]
    data = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    tokens, labels = data[:, :-1], data[:, 1:]

    parallel(1, seed=SEED)
    ref = build_sparse_model(cfg, 2, 4, hard=hard, seed=SEED)
    ref_init = _sd(ref)
    ref_logits, ref_grads, ref_first, ref_second, ref_after = _run(ref, tokens, labels, slice(None), None, 1)

    info = parallel(tp, seed=SEED)
    model = build_sparse_model(cfg, 2, 4, hard=hard, seed=SEED)
    init = _sd(model)
    per = BATCH // info.dp_size
    rows = slice(info.dp_rank * per, (info.dp_rank + 1) * per)
    logits, grads, first, second, after = _run(model, tokens, labels, rows,
                                               parallel_state.get_data_parallel_group(), info.dp_size)

    expected_init = split_tp(ref_init, cfg, tp)[info.tp_rank]
    assert init.keys() == expected_init.keys()
    assert [k for k in init if not torch.equal(init[k], expected_init[k])] == []  # weights and logits, bit for bit
    assert ((logits - ref_logits).norm() / ref_logits.norm()).item() < 1e-5
    expected_grads = split_tp(ref_grads, cfg, tp)[info.tp_rank]
    assert grads.keys() == expected_grads.keys()
    for k, g in grads.items():
        ref_g = expected_grads[k]
        assert g.abs().sum() > 0
        assert ((g - ref_g).norm() / ref_g.norm()).item() < 1e-4, k
    # metrics are reduced over the TP shards into the whole-model values
    assert first["mask_groups"] == ref_first["mask_groups"]
    assert math.isclose(first["mask_max_prob"], ref_first["mask_max_prob"], rel_tol=1e-6)
    assert math.isclose(second["mask_flip_fraction"], ref_second["mask_flip_fraction"], rel_tol=1e-9)
    assert second["mask_flip_fraction"] > 0
    # the prior's std is that of the whole layer: the shard logits equal the TP=1 logits split
    expected_after = split_tp({k: v for k, v in ref_after.items() if k.endswith("mask_logits")}, cfg, tp)[info.tp_rank]
    for k, v in expected_after.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-6, msg=k)


def test_prior_masks_from_a_tp1_checkpoint_are_resharded(parallel, tmp_path):
    cfg = get_config("tiny")
    parallel(1, seed=SEED)
    ref = build_sparse_model(cfg, 2, 4, seed=SEED)
    save_checkpoint(tmp_path / "ckpt", [model_state_dict(ref)], cfg, iteration=1)
    full_masks = {k + ".hard_mask": v for k, v in model_hard_masks(ref).items()}
    info = parallel(2, seed=SEED)
    masks = load_prior_masks(tmp_path / "ckpt")
    model = build_sparse_model(cfg, 2, 4, seed=SEED)
    expected = {k[: -len(".hard_mask")]: v for k, v in split_tp(full_masks, cfg, 2)[info.tp_rank].items()}
    own = model_hard_masks(model)
    assert masks.keys() == expected.keys() == own.keys()
    assert all(torch.equal(masks[k], expected[k]) and torch.equal(own[k], expected[k]) for k in masks)


def test_groups_must_stay_whole_on_every_shard(parallel):
    cfg = get_config("tiny", ffn_hidden_size=136)  # fc2 input 136 = 17 groups of 8; 68 per rank at TP=2
    parallel(1)
    build_sparse_model(cfg, 1, 8)
    parallel(2)
    with pytest.raises(ConfigError) as e:
        build_sparse_model(cfg, 1, 8)
    assert ("linear_fc2 (MaskedRowParallelLinear): input size per tensor-parallel rank 68 (input 136 / TP 2) "
            "is not a multiple of M=8 for 1:8 sparsity") in str(e.value)
