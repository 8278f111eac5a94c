"""TrainOptimizer on the tiny LLaMA (TP=1, one process): gradient norm and clipping against
torch's, the AdamW update against torch's AdamW, fp32 accumulation of bf16 gradients, no state
for frozen weights, and the state round trip."""
import numpy as np
import pytest
import torch

from megatron_ext import platform
from megatron_ext.data.indexed_dataset import IndexedDataset
from megatron_ext.models import build_model, get_config
from megatron_ext.sparsity import build_sparse_model
from megatron_ext.sparsity.plugin import MaskLLM, MaskLLMConfig
from megatron_ext.training.optimizer import OptimizerStateError, TrainOptimizer, param_groups
from megatron_ext.training.schedules import LRSchedule, ParamScheduler

CFG = get_config("tiny", vocab_size=2000)


@pytest.fixture
def tp1():
    info = platform.init_distributed(1)
    platform.seed_everything(7)
    return info


@pytest.fixture(scope="module")
def batches(shakespeare_prefix):
    """Two micro-batches of real text: [2, 33] token windows."""
    ds = IndexedDataset(shakespeare_prefix)
    tokens = np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(4)])[: 4 * 33]
    t = torch.from_numpy(tokens.reshape(4, 33))
    return [(t[i:i + 2, :-1], t[i:i + 2, 1:]) for i in (0, 2)]


def _twins(dtype=torch.float32):
    """Two models with the same initial weights (the CPU initialisation follows the seed)."""
    platform.seed_everything(7)
    a = build_model(CFG, dtype)
    platform.seed_everything(7)
    b = build_model(CFG, dtype)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    return a, b


def _loss(model, tokens, labels):
    tokens, labels = tokens.to(platform.device()), labels.to(platform.device())
    pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return model(tokens, pos, None, labels=labels).float().mean()


def _groups(model, lr_mult=1.0):
    """The trainer's groups with the MaskLLM plug-in's claim on the mask logits."""
    plugin = MaskLLM(MaskLLMConfig(lr_mult=lr_mult))
    return param_groups(model, plugin.param_groups(model, lr=1e-2, min_lr=1e-3))


def _optimizer(model, **kw):
    groups = _groups(model, kw.pop("lr_mult", 1.0))
    return TrainOptimizer(model, groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kw), groups


def test_gradients_norm_clip_and_adamw_step_match_torch(tp1, batches):
    model, ref = _twins()
    opt, _ = _optimizer(model)
    ref_groups = _groups(ref)
    ref_adam = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in ref_groups], lr=1e-2,
                                 betas=(0.9, 0.95), eps=1e-8)
    for optimizer in (opt, ref_adam):
        ParamScheduler(optimizer, LRSchedule(1e-2, 1e-3, 0, 100, "cosine"), weight_decay=0.1)

    opt.zero_grad()
    for tokens, labels in batches:
        (_loss(model, tokens, labels) / 2).backward()
        (_loss(ref, tokens, labels) / 2).backward()
    assert all(p.grad is None for p in model.parameters())        # moved into the fp32 buffer
    for e in opt.entries:
        ref_p = dict(ref.named_parameters())[e.name]
        torch.testing.assert_close(e.grad, ref_p.grad, rtol=0, atol=1e-7)
    ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), max_norm=0.05)
    norm = opt.clip_gradients(0.05)
    assert norm == pytest.approx(float(ref_norm), rel=1e-5)
    assert norm > 0.05                                              # so clipping really happened
    for e in opt.entries:
        torch.testing.assert_close(e.grad, dict(ref.named_parameters())[e.name].grad, rtol=1e-5, atol=1e-8)
    opt.step()
    ref_adam.step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, dict(ref.named_parameters())[name], rtol=1e-5, atol=1e-7)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


def test_bf16_gradients_accumulate_in_fp32_main_copies(tp1, batches):
    model, ref = _twins(torch.bfloat16)
    opt, _ = _optimizer(model)
    assert all(e.main.dtype == torch.float32 and e.main is not e.param for e in opt.entries)
    expected = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in ref.named_parameters()}
    opt.zero_grad()
    for tokens, labels in batches:
        _loss(model, tokens, labels).backward()
        _loss(ref, tokens, labels).backward()
        for n, p in ref.named_parameters():
            expected[n] += p.grad.float()
            p.grad = None
    for e in opt.entries:
        assert torch.equal(e.grad, expected[e.name])                # summed in fp32, not in bf16
    before = {e.name: e.main.detach().clone() for e in opt.entries}
    opt.step()
    for e in opt.entries:
        assert not torch.equal(e.main, before[e.name])
        assert torch.equal(e.param, e.main.to(torch.bfloat16))     # model gets the rounded fp32 master


def test_mask_only_trains_logits_only_and_state_round_trips(tp1, batches):
    model = build_sparse_model(CFG, 2, 4, mask_only=True)
    opt, groups = _optimizer(model, lr_mult=10.0)
    assert [g["name"] for g in groups] == ["mask_logits"]
    assert groups[0]["max_lr"] == pytest.approx(0.1) and groups[0]["min_lr"] == pytest.approx(0.01)
    assert all(e.name.endswith("mask_logits") for e in opt.entries) and len(opt.entries) == 4 * CFG.num_layers
    assert opt.grad_buffer.numel() == sum(p.numel() for n, p in model.named_parameters() if n.endswith("mask_logits"))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("mask_logits")}
    for step in range(2):
        model.sparsity_state.update(step, 10)
        opt.zero_grad()
        _loss(model, *batches[0]).backward()
        opt.step()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    state = opt.state_dict()
    assert len(state["adam"]["state"]) == len(opt.entries) and state["main_params"] == {}

    other = build_sparse_model(CFG, 2, 4, mask_only=True)
    other.load_state_dict(model.state_dict())
    opt2, _ = _optimizer(other, lr_mult=10.0)
    opt2.load_state_dict(state)
    for (a, b) in zip(opt.adam.state.values(), opt2.adam.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])

    dense = build_model(CFG)
    opt3, _ = _optimizer(dense)
    with pytest.raises(OptimizerStateError, match="--no-load-optim"):
        opt3.load_state_dict(state, where="ckpt")
    for o in (opt, opt2, opt3):
        o.close()
