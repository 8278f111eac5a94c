"""Mask-only training: frozen weights stay bit-identical, hold no optimizer state, and the
backward forms no weight gradient for them (no weight-gradient GEMM for frozen dense layers)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megatron_ext.models import get_config
from megatron_ext.models.build import lm_loss
from megatron_ext.sparsity import (build_sparse_model, finish_mask_backward, freeze_for_mask_only, mask_param_groups,
                                   masked_linears)

CFG = get_config("tiny")
SEQ, BATCH = 48, 4


@pytest.fixture(scope="module")
def botchan_batch(botchan_bpe_model, botchan_txt):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(botchan_bpe_model))
    ids = torch.tensor(sp.encode(botchan_txt.read_text(encoding="utf-8")[:10_000]))
    w = ids[: BATCH * (SEQ + 1)].view(BATCH, SEQ + 1)
    return w[:, :-1], w[:, 1:]


def test_mask_only_steps_change_only_the_logits(tp1, botchan_batch):
    tokens, labels = botchan_batch
    model = build_sparse_model(CFG, 2, 4, mask_only=True)
    state = model.sparsity_state
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("mask_logits")}
    logits0 = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("mask_logits")}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)

    groups = mask_param_groups(model, lr=1e-3, lr_mult=20.0, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["mask_logits"]
    assert groups[0]["lr"] == pytest.approx(2e-2) and groups[0]["weight_decay"] == 0.0
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1)
    losses = []
    for step in range(6):
        state.update(0, 100)  # one noise draw for every step: a fixed objective, so the loss must fall
        loss = lm_loss(model, tokens, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(lm_loss(model, tokens, labels).item())

    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) and params[n].grad is None for n, v in frozen.items())
    state_ids = {id(p) for p in opt.state}
    assert state_ids == {id(params[n]) for n in logits0}  # optimizer state for the logits only
    assert all(not torch.equal(params[n], v) for n, v in logits0.items())
    assert losses[-1] < losses[0] - 0.02


def test_param_groups_without_mask_only(tp1):
    model = build_sparse_model(CFG, 2, 4, mask_only=False)
    groups = {g["name"]: g for g in mask_param_groups(model, lr=1e-3, lr_mult=10.0, weight_decay=0.1)}
    assert set(groups) == {"mask_logits", "weights", "no_decay"}
    assert groups["mask_logits"]["lr"] == pytest.approx(1e-2) and groups["mask_logits"]["weight_decay"] == 0.0
    assert groups["weights"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in groups["no_decay"]["params"])
    covered = sum(len(g["params"]) for g in groups.values())
    assert covered == sum(1 for _ in model.parameters())
    with pytest.raises(ValueError, match="--lr-mult must be > 0"):
        mask_param_groups(model, lr=1e-3, lr_mult=0.0)
    freeze_for_mask_only(model)
    assert [g["name"] for g in mask_param_groups(model, lr=1e-3)] == ["mask_logits"]


class _GemmShapes(TorchDispatchMode):
    """Output shapes of the matrix products autograd runs (observation only)."""

    GEMMS = {"aten::mm", "aten::addmm", "aten::bmm"}

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._schema.name in self.GEMMS:
            self.shapes.append(tuple(out.shape))
        return out


def _backward_gemms(model, tokens, labels):
    loss = lm_loss(model, tokens, labels)
    with _GemmShapes() as mode:
        loss.backward()
    finish_mask_backward(model)  # the step's mask backward (no weight-shaped product)
    return mode.shapes


def test_frozen_weights_get_no_weight_gradient_gemm(tp1, botchan_batch):
    """megatron-core's frozen-weight path: with weight.requires_grad False no product of the
    weight's shape runs in the backward. The masked linears still form dL/d(W * mask), the
    product their logits' gradient is made of, but never weight.grad."""
    tokens, labels = botchan_batch
    model = build_sparse_model(CFG, 2, 4, mask_only=False)
    out_shape = tuple(model.output_layer.weight.shape)
    masked_shapes = {tuple(l.weight.shape) for _, l in masked_linears(model)}
    assert out_shape not in masked_shapes and BATCH * SEQ not in out_shape

    full = _backward_gemms(model, tokens, labels)
    assert out_shape in full  # trainable output layer: its wgrad GEMM runs (the check can fail)
    assert all(p.grad is not None for p in model.parameters())

    model.zero_grad(set_to_none=True)
    freeze_for_mask_only(model)
    masked = _backward_gemms(model, tokens, labels)
    assert out_shape not in masked
    weight_shaped = [s for s in masked if s in masked_shapes]
    assert len(weight_shaped) == len(masked_linears(model))  # one dL/dW_eff per masked linear
    for name, p in model.named_parameters():
        assert (p.grad is not None) == name.endswith("mask_logits"), name

    # logits frozen too (e.g. evaluation with gradients for something else): no weight-shaped product at all
    model.zero_grad(set_to_none=True)
    for _, layer in masked_linears(model):
        layer.mask_logits.requires_grad_(False)
    model.embedding.word_embeddings.weight.requires_grad_(True)
    none = _backward_gemms(model, tokens, labels)
    assert not [s for s in none if s in masked_shapes or s == out_shape]
