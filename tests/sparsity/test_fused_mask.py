"""Fused Triton Gumbel-mask kernels (run on CPU tensors by Triton's interpreter) against the
PyTorch paths, and the layers' once-per-step draw and mask backward against the plain
reference path (a sample and a backward per micro-batch): same values, same gradients,
rebuilt when the logits change, freed outside training.

The interpreter must be chosen before triton is first imported (megatron-core imports it):
when this module is the first to load triton, ``TRITON_INTERPRET=1`` is set here and the
kernel tests run in this process; otherwise ``test_kernel_tests_in_a_child_process`` runs
them in a fresh interpreter process.
"""
import os
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton and the kernels are defined: they run on the CPU

import math  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from interpreted import REPO, run_under_interpreter  # noqa: E402

from megatron_ext import platform  # noqa: E402
from megatron_ext.models import get_config  # noqa: E402
from megatron_ext.models.build import lm_loss  # noqa: E402
from megatron_ext.sparsity import (build_sparse_model, finish_mask_backward, fused_mask, gumbel,  # noqa: E402
                                   masked_linears, sparse_weight_norm)
from megatron_ext.sparsity import layers as layers_module  # noqa: E402
from megatron_ext.sparsity.layers import _strided_rows  # noqa: E402
from megatron_ext.sparsity.nm import candidates, check_nm  # noqa: E402


def _interpreter_here() -> bool:
    """Whether the kernels and triton's own library were built for the interpreter."""
    if not fused_mask.available():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return fused_mask.interpreted() and isinstance(tl.sum, InterpretedFunction)


KERNELS_HERE = _interpreter_here()
needs_interpreter = pytest.mark.skipif(
    not KERNELS_HERE, reason="triton is not installed" if not fused_mask.available() else
    "triton was imported before TRITON_INTERPRET=1: test_kernel_tests_in_a_child_process runs this")

# the layer test runs wherever the kernels can run on the layer's device: the interpreter, or
# compiled on a GPU (TRITON_INTERPRET=0 pytest ... on a GPU machine)
KERNELS_ON_DEVICE = KERNELS_HERE or (fused_mask.available() and platform.has_cuda() and not fused_mask.interpreted())

CFG = get_config("tiny")
TAU, KAPPA = 0.7, 3.0


# ---------------------------------------------------------------------- kernels


@pytest.mark.skipif(not fused_mask.available() or KERNELS_HERE,
                    reason="triton is not installed" if not fused_mask.available() else "the kernel tests run here")
def test_kernel_tests_in_a_child_process():
    out = run_under_interpreter(__file__, "test_kernel_")
    assert " skipped" in out  # the kernel tests ran, this one skipped there


def _case(n, m, rows=12, groups=23, wdtype=torch.float32, ldtype=torch.float32, seed=0):
    """Weight, logits, candidates and the group index of a column-parallel fc1 shard: TP rank 1
    of 2 with stride 2 (rows [gate_1; up_1], not contiguous), and group columns offset as a
    row-parallel shard's (rank 1 of 2)."""
    gen = torch.Generator().manual_seed(seed)
    c = math.comb(m, n)
    weight = torch.randn(rows, groups * m, generator=gen).to(wdtype)
    logits = (torch.randn(rows, groups, c, generator=gen) * 0.5).to(ldtype)
    index = gumbel.GroupIndex(_strided_rows(rows, 2, 1, 2), groups + torch.arange(groups), 2 * groups)
    return weight, logits, candidates(n, m), index


def _kernel_forward(weight, logits, cands, index, key, hard, **kw):
    return fused_mask.forward(weight, logits, cands, index.rows, index.cols, index.groups_per_row, key, TAU, KAPPA,
                              hard, **kw)


def _kernel_backward(grad, weight, logits, cands, index, key, hard, **kw):
    return fused_mask.backward(grad, weight, logits, cands, index.rows, index.cols, index.groups_per_row, key, TAU,
                               KAPPA, hard, **kw)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


_COMPILE_FOR_H100 = r"""
import triton
from triton.backends.compiler import GPUTarget
from megatron_ext.sparsity import fused_mask as fm

def build(kernel, types, consts, warps):
    names = kernel.arg_names
    sig = dict(zip(names, types + ["constexpr"] * (len(names) - len(types))))
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types) if t.startswith("*")}
    compiled = triton.compile(triton.compiler.ASTSource(kernel, sig, consts, aligned),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    assert compiled.asm["cubin"]

_, k, warps = fm._launch(8, 1024, 6, 4, None, None)
for hard in (False, True):
    build(fm._forward_kernel, ["*bf16", "*fp32", "*fp32", "*i64", "*i64", "*bf16", "*fp32", "i32", "i32", "u32",
                               "fp32", "fp32"], dict(k, HARD=hard, WITH_SQ=True, FAST_LOG=hard), warps)
for grad, reg, acc, gw in ((True, False, True, False), (True, True, False, True), (False, True, True, False)):
    build(fm._backward_kernel, ["*bf16", "*bf16", "*fp32", "*fp32", "*i64", "*i64", "*fp32", "*bf16", "*fp32",
                                "i32", "i32", "u32", "fp32", "fp32", "fp32"],
          dict(k, CP=8, HARD=False, HAS_GRAD=grad, HAS_REG=reg, ACCUMULATE=acc, WITH_GW=gw, FAST_LOG=False), warps)
print("compiled")
"""


@pytest.mark.skipif(not fused_mask.available(), reason="triton is not installed")
def test_kernels_compile_for_an_h100_without_one():
    """The kernels as the GPU compiles them (not the interpreter's Python): Triton to PTX to an
    sm_90a cubin with the ptxas bundled with triton, on a machine without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], cwd=REPO,
                          env=env, capture_output=True, text=True)
    if "ASTSource" in done.stderr and "AttributeError" in done.stderr:
        pytest.skip("this triton has no triton.compiler.ASTSource")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-4000:]


@needs_interpreter
def test_kernel_noise_is_the_gumbel_hash_bit_for_bit():
    _, _, _, index = _case(2, 4)
    eps = torch.finfo(torch.float32).eps
    for key in (gumbel.noise_key(1, 2, 3), 0xF0000001, 1):  # a key above 2**31 and one Triton would specialise
        bits = fused_mask.noise(key, index.rows, index.cols, index.groups_per_row, 6, bits=True)
        assert torch.equal(bits, gumbel.hash_bits(key, index.flat(), 6))
        got = fused_mask.noise(key, index.rows, index.cols, index.groups_per_row, 6)
        ref = gumbel.gumbel_noise(key, index, index.shape, 6)
        # the double logarithm in fp32: within an ulp of max(1, |g|) of torch's
        assert bool(((got - ref).abs() <= 2 * eps * (1 + ref.abs())).all())
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


@needs_interpreter
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_kernel_forward_equals_masked_weight_and_the_reference(n, m, hard, wdtype):
    weight, logits, cands, index = _case(n, m, *((4, 5) if m == 8 else (12, 23)), wdtype=wdtype)
    key = gumbel.noise_key(5, 11, 2)
    out, sq = _kernel_forward(weight, logits, cands, index, key, hard, with_sq_norm=True)
    lean = gumbel.masked_weight(weight, logits, cands, TAU, KAPPA, key, index, hard, kernel=False)
    mask = gumbel.gumbel_soft_mask(logits, cands, TAU, KAPPA, key, index, hard).reshape(weight.shape)
    ref = weight * mask.to(wdtype)
    assert out.dtype == wdtype and out.shape == weight.shape
    if hard:  # one-hot samples: the same candidates, exactly
        assert torch.equal(out, ref) and torch.equal(out, lean)
        assert check_nm(out, n, m)
    elif wdtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(out, lean, rtol=1e-5, atol=2e-6)
    else:  # the mask rounded to bf16 as in masked_weight: an ulp where fp32 rounding differs
        torch.testing.assert_close(out, ref)
        assert (out != ref).float().mean() < 0.01
    ref_sq = (weight.float() * mask).square().sum()
    torch.testing.assert_close(sq, ref_sq, rtol=1e-5, atol=0)


@needs_interpreter
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("n,m,wdtype", [(2, 4, torch.float32), (2, 4, torch.bfloat16), (4, 8, torch.float32),
                                        (1, 4, torch.bfloat16)])
def test_kernel_backward_matches_the_autograd_gradients(n, m, wdtype, hard):
    weight, logits, cands, index = _case(n, m, *((4, 5) if m == 8 else (12, 23)), wdtype=wdtype, seed=3)
    key = gumbel.noise_key(2, 7, 9)
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(4)).to(wdtype)
    gl, gw = _kernel_backward(upstream, weight, logits, cands, index, key, hard, want_grad_weight=True)

    w, lg = weight.clone().requires_grad_(), logits.clone().requires_grad_()
    lean_gw, lean_gl = torch.autograd.grad(
        gumbel.masked_weight(w, lg, cands, TAU, KAPPA, key, index, hard, kernel=False), (w, lg), upstream)
    mask = gumbel.gumbel_soft_mask(lg, cands, TAU, KAPPA, key, index, hard).reshape(weight.shape)
    ref_gw, ref_gl = torch.autograd.grad(w * mask.to(wdtype), (w, lg), upstream)

    assert gl.dtype == torch.float32 and gw.dtype == wdtype and ref_gl.abs().sum() > 0
    # the lean path does the same fp32 math: agreement to fp32 rounding
    assert (gl - lean_gl).abs().max() <= 1e-5 * lean_gl.abs().max()
    # the reference's autograd forms dL/dmask in the weight's dtype: bf16 tolerance there
    assert _rel(gl, ref_gl) < (1e-5 if wdtype == torch.float32 else 2e-2)
    torch.testing.assert_close(gw, lean_gw)
    torch.testing.assert_close(gw, ref_gw)


@needs_interpreter
def test_kernel_backward_adds_into_a_buffer_and_the_regulariser():
    # 150 groups a row: two programs per row, the second one partly masked
    weight, logits, cands, index = _case(2, 4, rows=4, groups=150, wdtype=torch.bfloat16, seed=8)
    key = gumbel.noise_key(3, 1, 4)
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    fresh, none = _kernel_backward(upstream, weight, logits, cands, index, key, False)
    assert none is None
    buffer = torch.randn(logits.shape, generator=torch.Generator().manual_seed(10))
    before = buffer.clone()
    out, _ = _kernel_backward(upstream, weight, logits, cands, index, key, False, grad_logits=buffer)
    assert out is buffer
    torch.testing.assert_close(buffer, before + fresh, rtol=0, atol=0)

    # reg * d/dlogits sum((W * mask)^2), alone and with the data gradient, against autograd
    reg = torch.tensor(0.3)
    lg = logits.clone().requires_grad_()
    (ref_reg,) = torch.autograd.grad(
        reg * gumbel.masked_weight_sq_norm(weight, lg, cands, TAU, KAPPA, key, index, kernel=False), lg)
    only_reg, _ = _kernel_backward(None, weight, logits, cands, index, key, False, reg=reg)
    assert _rel(only_reg, ref_reg) < 1e-5
    both, _ = _kernel_backward(upstream, weight, logits, cands, index, key, False, reg=reg)
    assert _rel(both, fresh + ref_reg) < 1e-5
    with pytest.raises(ValueError, match="fp32"):
        _kernel_backward(upstream, weight, logits, cands, index, key, False, grad_logits=buffer.double())


@needs_interpreter
def test_kernel_path_of_masked_weight_equals_the_pytorch_path():
    """gumbel.masked_weight / masked_weight_sq_norm with kernel=True: values and gradients of
    both inputs; an int group offset; bf16 logits; logits carrying a main_grad buffer."""
    for offset, ldtype in ((None, torch.float32), (17, torch.float32), (None, torch.bfloat16)):
        weight, logits, cands, index = _case(2, 4, rows=4, groups=9, ldtype=ldtype, seed=12)
        offset = index if offset is None else offset
        key = gumbel.noise_key(1, 3, 5)
        upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(13))
        grads = {}
        for kernel in (False, True):
            w, lg = weight.clone().requires_grad_(), logits.clone().requires_grad_()
            out = gumbel.masked_weight(w, lg, cands, TAU, KAPPA, key, offset, kernel=kernel)
            sq = gumbel.masked_weight_sq_norm(w, lg, cands, TAU, KAPPA, key, offset, kernel=kernel)
            grads[kernel] = (out.detach(), sq.detach()) + torch.autograd.grad((out * upstream).sum() + 0.1 * sq,
                                                                              (w, lg))
        for a, b in zip(grads[True], grads[False]):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    frozen = {}  # logits without a gradient: the weight's alone
    for kernel in (False, True):
        w = weight.clone().requires_grad_()
        (frozen[kernel],) = torch.autograd.grad(
            gumbel.masked_weight(w, logits, cands, TAU, KAPPA, key, index, kernel=kernel), w, upstream)
    torch.testing.assert_close(frozen[True], frozen[False], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not supported"):  # kernel=True takes the kernels (no float64 there)
        gumbel.masked_weight(weight.double(), logits.double(), cands, TAU, KAPPA, key, index, kernel=True)

    lg = logits.float().requires_grad_()
    lg.main_grad = torch.ones(lg.shape)
    out = gumbel.masked_weight(weight, lg, cands, TAU, KAPPA, key, index, kernel=True)
    out.backward(upstream)
    assert lg.grad is None  # added into main_grad instead
    plain = logits.float().requires_grad_()
    gumbel.masked_weight(weight, plain, cands, TAU, KAPPA, key, index, kernel=False).backward(upstream)
    torch.testing.assert_close(lg.main_grad, 1 + plain.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- once-per-step masked weight


def _batches(count, batch=2, seq=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    data = [torch.randint(0, CFG.vocab_size, (batch, seq + 1), generator=gen) for _ in range(count)]
    return [(d[:, :-1], d[:, 1:]) for d in data]


def _twins(mask_only=True, dtype=torch.float32, hard=False, cfg=CFG):
    """Two sparse models with the same tensors: the first on the production path with the
    PyTorch ops (one draw and one mask backward per step), the second on the plain reference
    (a sample and autograd through every op for every micro-batch)."""
    models = []
    for impl in ("torch", "reference"):
        platform.seed_everything(3)
        model = build_sparse_model(cfg, 2, 4, dtype, mask_only=mask_only, hard=hard)
        for _, layer in masked_linears(model):
            layer.mask_impl = impl
        model.sparsity_state.update(3, 10)
        models.append(model)
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
    return models


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mask_only,hard", [(True, False), (True, True), (False, False)])
def test_one_mask_backward_per_step_gives_the_gradients_of_the_per_micro_batch_reference(tp1, mask_only, hard):
    cached, plain = _twins(mask_only=mask_only, hard=hard)
    batches = _batches(3)
    for model in (cached, plain):
        losses = [lm_loss(model, *b) for b in batches]
        for loss in losses:  # all forwards first: the backward of each micro-batch sees the same cache
            (loss / len(batches)).backward()
        model.losses = [x.item() for x in losses]
        reg = sparse_weight_norm(model)
        (-0.01 * reg).backward()
        model.reg = reg.item()
    for _, layer in masked_linears(cached):  # the step's draw, kept until the step is finished
        entry = layer._mask_cache
        assert entry is not None and entry.key == layer._cache_key(layer.weight, layer.mask_logits) and entry.pending()
    finish_mask_backward(cached)
    finish_mask_backward(plain)
    assert cached.losses == plain.losses and cached.reg == plain.reg
    a, b = _grads(cached), _grads(plain)
    assert a.keys() == b.keys() and any(n.endswith("mask_logits") for n in a)
    assert any(not n.endswith("mask_logits") for n in a) == (not mask_only)  # weights get gradients too
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
    assert all(layer._mask_cache is None for _, layer in masked_linears(cached))  # freed by the finish
    assert all(layer._mask_cache is None for _, layer in masked_linears(plain))


def test_the_mask_backward_runs_once_per_step_on_the_summed_gradient(tp1, monkeypatch):
    """Three micro-batches and the regulariser: no mask backward during the backwards, one per
    layer in finish_mask_backward, then nothing of the step is left on the layers."""
    cached, _ = _twins()
    calls = []
    real = gumbel.backward_pass
    monkeypatch.setattr(gumbel, "backward_pass", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    for tokens, labels in _batches(3):
        (lm_loss(cached, tokens, labels) / 3).backward()
    (-0.01 * sparse_weight_norm(cached)).backward()
    layers = [layer for _, layer in masked_linears(cached)]
    assert calls == [] and all(layer.mask_logits.grad is None for layer in layers)
    sums = [layer._mask_cache.grad_sum for layer in layers]
    assert all(g.dtype == torch.float32 and g.shape == layer.weight.shape for g, layer in zip(sums, layers))
    finish_mask_backward(cached)
    assert len(calls) == len(layers) and all(g is s for g, s in zip(calls, sums))  # the fp32 sums, once each
    assert all(layer.mask_logits.grad is not None and layer._mask_cache is None for layer in layers)
    finish_mask_backward(cached)  # nothing pending: a no-op
    assert len(calls) == len(layers)


def test_eval_with_a_pending_backward_completes_the_gradients_and_keeps_nothing(tp1):
    cached, plain = _twins()
    tokens, labels = _batches(1)[0]
    for model in (cached, plain):
        lm_loss(model, tokens, labels).backward()
        model.eval()  # the cached model finishes its step here
        with torch.no_grad():
            lm_loss(model, tokens, labels)
    layers = [layer for _, layer in masked_linears(cached)]
    assert all(layer._mask_cache is None and layer not in layers_module._PENDING for layer in layers)
    for (_, a), (_, b) in zip(masked_linears(cached), masked_linears(plain)):
        torch.testing.assert_close(a.mask_logits.grad, b.mask_logits.grad, rtol=1e-6, atol=1e-7)


def test_changing_the_logits_while_a_backward_is_pending_is_refused(tp1):
    cached, _ = _twins()
    lm_loss(cached, *_batches(1)[0]).backward()
    layer = masked_linears(cached)[0][1]
    with torch.no_grad():
        layer.mask_logits.add_(1.0)
    with pytest.raises(RuntimeError, match="changed in place while the step's mask backward was pending"):
        finish_mask_backward(cached)


def test_each_micro_batch_gets_a_fresh_output_aliasing_the_cache(tp1):
    cached, _ = _twins()
    layer = masked_linears(cached)[0][1]
    first, second = layer.effective_weight(), layer.effective_weight()
    cache = layer._mask_cache.masked
    assert first is not second and first.requires_grad and first.grad_fn is not None
    assert first.untyped_storage().data_ptr() == cache.untyped_storage().data_ptr()
    assert second.untyped_storage().data_ptr() == cache.untyped_storage().data_ptr()
    with pytest.raises(RuntimeError):
        first.mul_(2)  # the cache is shared: in-place changes of an output are refused
    (first.sum() + second.sum()).backward()
    layer.finish_mask_backward()
    (ref,) = torch.autograd.grad(2 * gumbel.masked_weight(layer.weight, layer.mask_logits, *layer._draw()).sum(),
                                 layer.mask_logits)
    torch.testing.assert_close(layer.mask_logits.grad, ref, rtol=1e-6, atol=1e-8)


def test_cache_follows_optimizer_steps_in_place_changes_and_the_step(tp1):
    cached, _ = _twins()
    layer = masked_linears(cached)[0][1]
    state = cached.sparsity_state

    def fresh():
        with torch.no_grad():
            return gumbel.masked_weight(layer.weight, layer.mask_logits, *layer._draw())

    loss = lm_loss(cached, *_batches(1)[0])
    built = layer._mask_cache.masked
    loss.backward()
    opt = torch.optim.AdamW([layer.mask_logits], lr=0.5, fused=True)
    version = layer.mask_logits._version
    opt.step()
    assert layer.mask_logits._version == version  # the fused optimizer does not bump it ...
    out = layer.effective_weight()
    assert layer._mask_cache.masked is not built and torch.equal(out, fresh())  # ... the cache is rebuilt anyway
    assert not torch.equal(out, built)

    built = layer._mask_cache.masked
    with torch.no_grad():
        layer.mask_logits.mul_(-1.0)
    assert torch.equal(layer.effective_weight(), fresh()) and layer._mask_cache.masked is not built
    built = layer._mask_cache.masked
    state.update(4, 10)  # another step: another draw
    assert torch.equal(layer.effective_weight(), fresh()) and layer._mask_cache.masked is not built
    built = layer._mask_cache.masked
    layer.effective_weight()
    assert layer._mask_cache.masked is built  # nothing changed: reused


def test_cache_is_freed_outside_training(tp1):
    cached, _ = _twins()
    tokens, labels = _batches(1)[0]
    lm_loss(cached, tokens, labels)
    layers = [layer for _, layer in masked_linears(cached)]
    assert all(layer._mask_cache is not None for layer in layers)
    cached.eval()
    assert all(layer._mask_cache is None for layer in layers)
    cached.train()
    lm_loss(cached, tokens, labels)
    cached.sparsity_state.set_mode("eval")  # argmax masks: the sample is dropped at the next forward
    with torch.no_grad():
        lm_loss(cached, tokens, labels)
    assert all(layer._mask_cache is None for layer in layers)


def test_recompute_of_a_layer_uses_the_same_sample(tp1):
    cached, plain = _twins()
    for _, layer in masked_linears(plain):  # the same path, without the recompute
        layer.mask_impl = "torch"
    x = torch.randn(16, 2, CFG.hidden_size, generator=torch.Generator().manual_seed(5)).to(platform.device())
    got = {}
    for model, recompute in ((cached, True), (plain, False)):
        layer = model.decoder.layers[0].mlp.linear_fc1

        def run(inp):
            return layer(inp)[0]

        out = torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False) if recompute else run(x)
        out.square().sum().backward()
        finish_mask_backward(model)
        got[recompute] = (out.detach(), layer.mask_logits.grad)
    torch.testing.assert_close(got[True], got[False], rtol=1e-6, atol=1e-8)


def test_trainer_optimizer_with_cache_follows_the_per_micro_batch_run(tp1):
    """Three steps of two micro-batches with the trainer's optimizer (fused AdamW: no version
    bumps) and the regulariser: the run with one draw and one mask backward per step gets
    each step's gradients and ends on the same logits as the per-micro-batch reference.

    AdamW's eps is 1e-3 here, not 1e-8: with 1e-8 the update of a logit whose gradient is
    ~1e-9 is about lr * sign(gradient), so fp32 rounding differences between the two paths
    (~1e-10 absolute) would move it by up to lr and the comparison would measure rounding."""
    from megatron_ext.sparsity.plugin import MaskLLM, MaskLLMConfig
    from megatron_ext.training.optimizer import TrainOptimizer, param_groups

    cached, plain = _twins()
    initial = [layer.mask_logits.detach().clone() for _, layer in masked_linears(cached)]
    batches = _batches(6, seed=1)
    step_grads = {}
    for model in (cached, plain):
        groups = param_groups(model, MaskLLM(MaskLLMConfig()).param_groups(model, 0.05, 0.0))
        opt = TrainOptimizer(model, groups, lr=0.05, eps=1e-3, fused=True)
        for step in range(3):
            model.sparsity_state.update(step, 3)  # also moves tau and kappa
            opt.zero_grad()
            for tokens, labels in batches[2 * step:2 * step + 2]:
                (lm_loss(model, tokens, labels) / 2).backward()
            (-1e-3 * sparse_weight_norm(model)).backward()
            finish_mask_backward(model)  # the trainer's call, before reduction, clipping and the step
            step_grads.setdefault(id(model), []).append(opt.grad_buffer.clone())
            opt.step()
        opt.close()
    for a, b in zip(step_grads[id(cached)], step_grads[id(plain)]):
        assert _rel(a, b) < 1e-5
    for (name, a), b in zip(cached.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for (_, layer), before in zip(masked_linears(cached), initial):
        assert not torch.equal(layer.mask_logits, before)


@pytest.mark.skipif(not KERNELS_ON_DEVICE, reason="no interpreter here and no GPU")
def test_kernel_path_in_a_layer_with_the_cache_matches_the_pytorch_path(tp1):
    """A row-parallel masked linear of the model (fc2) on the kernels, with the step cache:
    two micro-batches and the regulariser give the PyTorch path's outputs and gradients."""
    layers = [model.decoder.layers[0].mlp.linear_fc2 for model in _twins(cfg=get_config("tiny", num_layers=1))]
    layers[0].mask_impl, layers[1].mask_impl = "kernel", "torch"
    gen = torch.Generator().manual_seed(6)
    dev = layers[0].weight.device
    inputs = [torch.randn(8, 2, CFG.ffn_hidden_size, generator=gen).to(dev) for _ in range(2)]
    upstream = [torch.randn(8, 2, CFG.hidden_size, generator=gen).to(dev) for _ in range(2)]
    outs = {}
    for layer in layers:
        outs[layer.mask_impl] = [layer(x)[0] for x in inputs]  # both forwards share one sample
        for out, up in zip(outs[layer.mask_impl], upstream):
            out.backward(up)
        (-0.01 * layer.masked_sq_norm()).backward()
        assert layer._mask_cache is not None and layer._mask_cache.pending()
        layer.finish_mask_backward()
    for a, b in zip(outs["kernel"], outs["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert _rel(layers[0].mask_logits.grad, layers[1].mask_logits.grad) < 1e-5
