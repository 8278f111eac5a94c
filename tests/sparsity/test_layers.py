"""Masked Column/Row parallel linears in the tiny LLaMA (TP=1): layout, modes against a dense
megatron-core model holding the masked weights, priors, regulariser, hard masks, metrics."""
import math

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, VocabParallelEmbedding

from megatron_ext import platform
from megatron_ext.models import ConfigError, build_model, get_config
from megatron_ext.models.build import forward_logits, lm_loss
from megatron_ext.sparsity import (MaskedColumnParallelLinear, MaskedRowParallelLinear, MaskMetrics, SparsityState,
                                   apply_prior, build_sparse_model, check_nm, extract_hard_masks,
                                   finish_mask_backward, gumbel, load_prior_masks, masked_linears, model_hard_masks,
                                   sparse_weight_norm, weight_reg_coefficient)
from megatron_ext.sparsity.nm import candidates, topn_mask

CFG = get_config("tiny")


def _tokens(batch=2, seq=24, seed=0):
    data = torch.randint(0, CFG.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(seed))
    return data[:, :-1], data[:, 1:]


def _dense_twin(model, weights):
    """A plain megatron-core model (no masked layers) with the sparse model's tensors,
    each masked linear's weight replaced by ``weights[name]``."""
    dense = build_model(CFG)
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("mask_logits")}
    for name, w in weights.items():
        sd[name + ".weight"] = w.detach()
    dense.load_state_dict(sd, strict=False)
    return dense


def _reference_masks(model, logits_by_layer=None):
    """Each layer's training mask from the plain reference ``gumbel_soft_mask``."""
    state = model.sparsity_state
    out = {}
    for _, layer in masked_linears(model):
        logits = layer.mask_logits if logits_by_layer is None else logits_by_layer[layer.layer_name]
        key = gumbel.noise_key(state.seed, state.step, layer.layer_id)
        mask = gumbel.gumbel_soft_mask(logits, layer.candidates, state.tau, state.kappa, key, layer.group_index(),
                                       state.hard)
        out[layer.layer_name] = mask.reshape(layer.weight.shape)
    return out


def test_the_four_projections_are_masked_and_the_rest_stays_dense(tp1):
    model = build_sparse_model(CFG, 2, 4, torch.bfloat16)
    for layer in model.decoder.layers:
        assert type(layer.self_attention.linear_qkv) is MaskedColumnParallelLinear
        assert type(layer.mlp.linear_fc1) is MaskedColumnParallelLinear
        assert type(layer.self_attention.linear_proj) is MaskedRowParallelLinear
        assert type(layer.mlp.linear_fc2) is MaskedRowParallelLinear
    assert type(model.embedding.word_embeddings) is VocabParallelEmbedding
    assert type(model.output_layer) is ColumnParallelLinear
    sd = model.state_dict()
    plain = {k for k in build_model(CFG).state_dict()}
    extra = {k for k in sd if k not in plain}
    names = [n for n, _ in masked_linears(model)]
    assert extra == {n + ".mask_logits" for n in names} and len(names) == 4 * CFG.num_layers
    for name, layer in masked_linears(model):
        w, lg = sd[name + ".weight"], sd[name + ".mask_logits"]
        assert lg.dtype == torch.float32 and w.dtype == torch.bfloat16  # fp32 logits in a bf16 model
        assert lg.shape == (w.shape[0], w.shape[1] // 4, 6)
        assert layer.layer_name == name
    assert model.sparsity_state is layer.sparsity


def test_initial_logits_are_small_normal_and_keyed_by_seed_and_layer(tp1):
    a = build_sparse_model(CFG, 2, 4, seed=5)
    b = build_sparse_model(CFG, 2, 4, seed=5)
    c = build_sparse_model(CFG, 2, 4, seed=6)
    la = {n: l.mask_logits for n, l in masked_linears(a)}
    lb = {n: l.mask_logits for n, l in masked_linears(b)}
    lc = {n: l.mask_logits for n, l in masked_linears(c)}
    assert all(torch.equal(la[n], lb[n]) for n in la)
    assert not any(torch.equal(la[n], lc[n]) for n in la)
    every = torch.cat([v.flatten() for v in la.values()])
    assert abs(every.std().item() - 0.01) < 5e-4 and abs(every.mean().item()) < 5e-4
    q0, q1 = la["decoder.layers.0.self_attention.linear_qkv"], la["decoder.layers.1.self_attention.linear_qkv"]
    assert not torch.equal(q0, q1)  # layers draw separate streams


def test_dense_and_eval_modes_equal_a_dense_model_with_those_weights(tp1):
    model = build_sparse_model(CFG, 2, 4)
    tokens, _ = _tokens()
    model.sparsity_state.set_mode("dense")
    dense = _dense_twin(model, {})
    assert torch.equal(forward_logits(model, tokens), forward_logits(dense, tokens))

    model.sparsity_state.set_mode("eval")
    hard = model_hard_masks(model)
    twin = _dense_twin(model, {n: l.weight * hard[n] for n, l in masked_linears(model)})
    expected = forward_logits(twin, tokens)
    assert torch.equal(forward_logits(model, tokens), expected)
    # a module in eval() uses the hard mask even when the state says train
    model.sparsity_state.set_mode("train")
    model.eval()
    assert torch.equal(forward_logits(model, tokens), expected)
    model.train()
    assert not torch.equal(forward_logits(model, tokens), expected)


@pytest.mark.parametrize("hard", [False, True])
def test_training_forward_and_gradients_match_the_reference_mask(tp1, hard):
    """Oracle: a dense megatron model holding W * gumbel_soft_mask(...) (the plain reference);
    dL/dlogits = autograd of the reference mask with dL/dW_eff from the dense model."""
    model = build_sparse_model(CFG, 2, 4, mask_only=False, hard=hard)
    state = model.sparsity_state
    state.update(7, 20)
    tokens, labels = _tokens(seed=1)
    loss = lm_loss(model, tokens, labels)
    loss.backward()
    finish_mask_backward(model)

    logits = {l.layer_name: l.mask_logits.detach().clone().requires_grad_() for _, l in masked_linears(model)}
    masks = _reference_masks(model, logits)
    w_eff = {n: l.weight.detach() * masks[l.layer_name] for n, l in masked_linears(model)}
    dense = _dense_twin(model, w_eff)
    ref_loss = lm_loss(dense, tokens, labels)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    params = dict(dense.named_parameters())
    for name, layer in masked_linears(model):
        g_eff = params[name + ".weight"].grad
        (ref_g_logits,) = torch.autograd.grad(w_eff[name], logits[name], grad_outputs=g_eff)
        torch.testing.assert_close(layer.mask_logits.grad, ref_g_logits, rtol=1e-4, atol=1e-9, msg=name)
        # the weight (trainable here) gets dL/dW_eff * mask
        torch.testing.assert_close(layer.weight.grad, g_eff * masks[name].detach(), rtol=1e-5, atol=1e-9, msg=name)
        assert layer.mask_logits.grad.abs().sum() > 0
    if hard:
        assert all(check_nm(m, 2, 4, exact=True) and set(m.unique().tolist()) == {0.0, 1.0} for m in masks.values())


def test_production_path_equals_the_reference_path(tp1):
    """The device's path (one draw and one mask backward per step) against the layer's plain
    reference path (autograd through every op)."""
    model = build_sparse_model(CFG, 2, 4)
    model.sparsity_state.update(2, 10)
    tokens, labels = _tokens(seed=4)
    results = []
    for impl in (None, "reference"):
        for _, layer in masked_linears(model):
            layer.mask_impl = impl
        model.zero_grad(set_to_none=True)
        loss = lm_loss(model, tokens, labels)
        loss.backward()
        finish_mask_backward(model)
        results.append((loss.detach(), [l.mask_logits.grad.clone() for _, l in masked_linears(model)]))
    (la, ga), (lb, gb) = results
    assert torch.equal(la, lb)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


def test_input_size_per_rank_must_hold_whole_groups(tp1):
    with pytest.raises(ConfigError, match=r"linear_fc2 \(MaskedRowParallelLinear\): input size per tensor-parallel "
                                          r"rank 130 \(input 130 / TP 1\) is not a multiple of M=4 for 2:4"):
        build_sparse_model(get_config("tiny", ffn_hidden_size=130), 2, 4)
    with pytest.raises(ConfigError, match=r"linear_proj .* input size per tensor-parallel rank 64 .* M=128"):
        build_sparse_model(CFG, 1, 128)


def test_training_without_layer_names_is_refused(tp1):
    from megatron_ext.sparsity.model import MASKED_SLOTS
    from megatron.core.transformer.spec_utils import ModuleSpec

    state = SparsityState()
    model = build_model(CFG, linear_overrides={s: ModuleSpec(module=c, params={"sparsity": state, "name": s})
                                               for s, c in MASKED_SLOTS.items()})
    with pytest.raises(RuntimeError, match="no layer name.*assign_layer_names"):
        forward_logits(model, _tokens()[0])


def test_prior_injection(tp1):
    model = build_sparse_model(CFG, 2, 4)
    before = {n: l.mask_logits.detach().clone() for n, l in masked_linears(model)}
    priors = {n: topn_mask(l.weight.detach().abs(), 2, 4) for n, l in masked_linears(model)}
    apply_prior(model, priors, alpha=0.0)
    assert all(torch.equal(l.mask_logits, before[n]) for n, l in masked_linears(model))

    apply_prior(model, priors, alpha=3.0)
    s = candidates(2, 4)
    for name, layer in masked_linears(model):
        old = before[name]
        overlap = priors[name].float().reshape(*old.shape[:2], 4) @ s.t()
        expected = old + 3.0 * old.std() * (overlap - 1.0)
        torch.testing.assert_close(layer.mask_logits.detach(), expected, rtol=0, atol=1e-7)
    platform.seed_everything(1234)
    strong = build_sparse_model(CFG, 2, 4)
    apply_prior(strong, priors, alpha=100.0)
    assert all(torch.equal(l.hard_mask(), priors[n]) for n, l in masked_linears(strong))
    assert not all(torch.equal(l.hard_mask(), priors[n]) for n, l in masked_linears(build_sparse_model(CFG, 2, 4)))

    layer = masked_linears(model)[0][1]
    with pytest.raises(ValueError, match="prior mask has shape"):
        layer.set_prior(torch.ones(3, 4, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="not an exact 2:4 mask"):
        layer.set_prior(torch.ones_like(layer.weight, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="prior masks lack layer"):
        apply_prior(model, dict(list(priors.items())[1:]), 1.0)


def test_regulariser_reaches_only_the_logits_and_matches_the_reference(tp1):
    model = build_sparse_model(CFG, 2, 4, mask_only=False)
    model.sparsity_state.update(3, 10)
    reg = sparse_weight_norm(model)
    masks = _reference_masks(model)
    expected = sum((l.weight.detach() * masks[l.layer_name]).square().sum() for _, l in masked_linears(model))
    torch.testing.assert_close(reg, expected, rtol=1e-5, atol=0)
    (-0.1 * reg).backward()
    finish_mask_backward(model)
    for _, layer in masked_linears(model):
        assert layer.weight.grad is None
        assert layer.mask_logits.grad is not None and layer.mask_logits.grad.abs().sum() > 0
    assert weight_reg_coefficient(0.1, 0, 10) == pytest.approx(0.1)
    assert weight_reg_coefficient(0.1, 5, 10) == pytest.approx(0.05)
    assert weight_reg_coefficient(0.1, 10, 10) == 0.0

    model.sparsity_state.set_mode("eval")
    hard = sparse_weight_norm(model)
    hm = model_hard_masks(model)
    assert not hard.requires_grad
    torch.testing.assert_close(hard, sum((l.weight.detach() * hm[l.layer_name]).square().sum()
                                         for _, l in masked_linears(model)), rtol=1e-5, atol=0)


def test_extract_hard_masks_from_state_dicts_and_files(tp1, tmp_path):
    model = build_sparse_model(CFG, 2, 4)
    sd = model.state_dict()
    from_model = model_hard_masks(model)
    masks = extract_hard_masks(sd)
    assert masks.keys() == from_model.keys() and len(masks) == 8
    assert all(torch.equal(masks[k], from_model[k]) and check_nm(masks[k], 2, 4, exact=True) for k in masks)
    # hard_mask entries (one-shot masks) where no logits are present
    only_hard = {k: v for k, v in sd.items() if not k.endswith("mask_logits")}
    only_hard.update({k + ".hard_mask": v.to(torch.uint8) for k, v in masks.items()})
    again = extract_hard_masks(only_hard)
    assert all(torch.equal(again[k], masks[k]) for k in masks)
    torch.save({"model": only_hard}, tmp_path / "prior.pt")
    loaded = load_prior_masks(tmp_path / "prior.pt")
    assert all(torch.equal(loaded[k], masks[k]) for k in masks)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_prior_masks(tmp_path / "missing")
    with pytest.raises(ValueError, match="no mask_logits or hard_mask"):
        load_prior_masks({"decoder.final_layernorm.weight": torch.ones(3)})


def test_extract_needs_n_when_two_patterns_fit(tp1):
    model = build_sparse_model(CFG, 1, 4)
    sd = model.state_dict()
    with pytest.raises(ValueError, match="fit both 1:4 and 3:4; pass N"):
        extract_hard_masks(sd)
    masks = extract_hard_masks(sd, N=1)
    assert all(check_nm(m, 1, 4, exact=True) for m in masks.values())
    assert all(torch.equal(masks[n], l.hard_mask()) for n, l in masked_linears(model))


def test_prior_masks_from_a_saved_checkpoint(tp1, tmp_path):
    checkpoint = pytest.importorskip("megatron_ext.checkpoint")
    model = build_sparse_model(CFG, 2, 4)
    sd = checkpoint.model_state_dict(model)
    checkpoint.save_checkpoint(tmp_path / "ckpt", [sd], CFG, iteration=5)
    masks = load_prior_masks(tmp_path / "ckpt")
    assert all(torch.equal(masks[n], l.hard_mask()) for n, l in masked_linears(model))


def test_metrics_count_flips_and_max_probability(tp1):
    model = build_sparse_model(CFG, 2, 4)
    state = model.sparsity_state
    metrics = MaskMetrics()
    first = metrics(model, weight_reg=torch.tensor(2.5))
    total = sum(l.mask_logits.shape[0] * l.mask_logits.shape[1] for _, l in masked_linears(model))
    assert math.isnan(first["mask_flip_fraction"]) and first["mask_groups"] == total
    assert first["weight_reg"] == 2.5 and first["tau"] == state.tau and first["kappa"] == state.kappa
    probs = torch.cat([torch.softmax(state.kappa * l.mask_logits, -1).amax(-1).flatten()
                       for _, l in masked_linears(model)])
    assert first["mask_max_prob"] == pytest.approx(probs.double().mean().item(), rel=1e-9)

    flipped = 0
    with torch.no_grad():
        for i, (_, layer) in enumerate(masked_linears(model)):
            rows = 3 + i  # push a different candidate to the top in `rows` groups of each layer
            choice = layer.mask_logits[:rows, 0].argmax(-1)
            layer.mask_logits[:rows, 0, :] = 0.0
            layer.mask_logits[torch.arange(rows), 0, (choice + 1) % 6] = 1.0
            flipped += rows
    second = metrics(model)
    assert second["mask_flip_fraction"] == pytest.approx(flipped / total, rel=1e-12)
    assert second["weight_reg"] is None
    assert metrics(model)["mask_flip_fraction"] == 0.0


def test_schedules_and_state_validation():
    s = SparsityState(tau_range=(4.0, 0.05), kappa_range=(100.0, 500.0))
    s.update(0, 100)
    assert (s.tau, s.kappa) == (4.0, 100.0)
    s.update(50, 100)
    assert s.tau == pytest.approx(2.025) and s.kappa == pytest.approx(300.0) and s.step == 50
    s.update(150, 100)
    assert (s.tau, s.kappa) == (0.05, 500.0)
    with pytest.raises(ValueError, match="--gumbel-temperature-range"):
        SparsityState(tau_range=(4.0, 0.0))
    with pytest.raises(ValueError, match="--gumbel-scale-range"):
        SparsityState(kappa_range=(1.0,))
    with pytest.raises(ValueError, match="mode must be one of"):
        SparsityState(mode="sample")
    with pytest.raises(ValueError, match="0 < N < M"):
        SparsityState(N=4, M=4)
