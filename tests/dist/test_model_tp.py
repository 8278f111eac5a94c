"""Tensor and data parallelism (gloo, CPU): TP=2 and TP=3 reproduce TP=1.

Every rank first builds the TP=1 model from a seed (no communication), then the
TP=k model of its rank, loaded with the TP=1 weights split for TP=k
(``checkpoint.split_tp``). Assertions come after the last collective of each test
so a failing rank cannot leave the others waiting.
"""
import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_ext import platform
from megatron_ext.models import ConfigError, build_model, get_config
from megatron_ext.models.build import forward_logits, lm_loss
from megatron_ext.checkpoint import split_tp

CASES = {
    # tiny: 4 heads / 2 query groups, vocab 1000 padded to 1024 for TP 1 and 2
    "tiny-tp2": (get_config("tiny"), 2),
    # SmolLM2-135M's layer shapes (h 576, 9 heads / 3 groups, ffn 1536, tied) with two layers;
    # vocab 1100 is padded to 1152 for both TP 1 and 3
    "smollm2-shaped-tp3": (get_config("smollm2-135m", num_layers=2, vocab_size=1100), 3),
}
SEED = 4321
BATCH, SEQ, LR = 6, 16, 1.0


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _tp1_reference(parallel, cfg):
    parallel(1, seed=SEED)
    return build_model(cfg)


def _tokens(cfg):
    return torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("case", list(CASES))
def test_initial_weights_do_not_depend_on_tp(parallel, case):
    """Same seed, CPU initialisation: each TP=k shard is the TP=1 weight split for TP=k."""
    cfg, tp = CASES[case]
    assert cfg.padded_vocab_size(1) == cfg.padded_vocab_size(tp)  # else the draws differ in length
    full = _weights(_tp1_reference(parallel, cfg))
    info = parallel(tp, seed=SEED)
    shard = _weights(build_model(cfg))
    expected = split_tp(full, cfg, tp)[info.tp_rank]
    assert shard.keys() == expected.keys()
    mismatched = [k for k in shard if not torch.equal(shard[k], expected[k])]
    assert not mismatched


@pytest.mark.parametrize("case", list(CASES))
def test_tp_and_dp_reproduce_tp1_logits_and_one_training_step(parallel, case):
    cfg, tp = CASES[case]
    data = _tokens(cfg)
    tokens, labels = data[:, :-1], data[:, 1:]

    ref = _tp1_reference(parallel, cfg)
    full = _weights(ref)
    with torch.no_grad():
        ref_logits = forward_logits(ref, tokens[:2], cfg.vocab_size)
    ref_loss0 = lm_loss(ref, tokens, labels)
    ref_loss0.backward()
    torch.optim.SGD(ref.parameters(), lr=LR).step()
    with torch.no_grad():
        ref_loss1 = lm_loss(ref, tokens, labels).item()

    info = parallel(tp)
    assert (info.tp_size, info.dp_size) == (tp, info.world_size // tp)
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(split_tp(full, cfg, tp)[info.tp_rank], strict=False)
    with torch.no_grad():
        logits = forward_logits(model, tokens[:2], cfg.vocab_size)
    # data parallel: each DP rank takes its slice of the batch, gradients are averaged
    per = BATCH // info.dp_size
    rows = slice(info.dp_rank * per, (info.dp_rank + 1) * per)
    lm_loss(model, tokens[rows], labels[rows]).backward()
    dp_group = parallel_state.get_data_parallel_group()
    for p in model.parameters():
        dist.all_reduce(p.grad, group=dp_group)
        p.grad /= info.dp_size
    torch.optim.SGD(model.parameters(), lr=LR).step()
    with torch.no_grad():
        loss1 = lm_loss(model, tokens, labels).item()

    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    assert logits.shape == ref_logits.shape == (2, SEQ, cfg.vocab_size)
    assert ((logits - ref_logits).norm() / ref_logits.norm()).item() < 1e-5
    assert ref_loss0.item() - ref_loss1 > 1e-3  # the step changed the model
    assert abs(loss1 - ref_loss1) < 1e-5 * ref_loss1


def test_tp_that_does_not_divide_heads_or_groups_is_refused(parallel):
    world = parallel(1).world_size
    errors = {}
    if world % 2 == 0:
        parallel(2)
        with pytest.raises(ConfigError) as e:
            build_model(get_config("smollm2-135m", num_layers=1))
        errors[2] = str(e.value)
    if world % 3 == 0:
        parallel(3)
        with pytest.raises(ConfigError) as e:
            build_model(get_config("tiny", hidden_size=96, num_attention_heads=6, num_query_groups=2))
        errors[3] = str(e.value)
    if not errors:
        pytest.skip("needs a world size divisible by 2 or 3")
    if 2 in errors:
        assert "tensor-parallel size 2 does not divide num_attention_heads 9" in errors[2]
    if 3 in errors:
        assert "tensor-parallel size 3 does not divide num_query_groups 2" in errors[3]


def test_tp_that_does_not_divide_the_world_is_refused(parallel):
    info = parallel(1)
    bad = next(t for t in range(2, info.world_size + 2) if info.world_size % t)
    with pytest.raises(ValueError, match=f"tensor-parallel size {bad} does not divide the world size {info.world_size}"):
        platform.init_distributed(bad)
    assert platform.dist_info() == info  # the previous groups are still in place
