"""N:M candidates and checks; counter-based Gumbel noise; Gumbel-softmax masks and their gradients."""
import itertools
import math

import pytest
import torch

from megatron_ext.sparsity import gumbel
from megatron_ext.sparsity.nm import (candidates, check_nm, group_view, infer_n, masks_from_choice, num_candidates,
                                      topn_mask)

PATTERNS = [(1, 2), (1, 4), (2, 4), (3, 4), (2, 8), (4, 8)]


@pytest.mark.parametrize("n,m", PATTERNS)
def test_candidates_are_every_nm_vector_in_combinations_order(n, m):
    s = candidates(n, m)
    assert s.dtype == torch.float32 and s.shape == (math.comb(m, n), m) == (num_candidates(n, m), m)
    rows = [tuple(int(i) for i in torch.nonzero(r).flatten()) for r in s]
    assert rows == list(itertools.combinations(range(m), n))  # order and completeness
    assert set(s.unique().tolist()) == {0.0, 1.0}


def test_candidate_counts_and_the_2_4_set():
    assert [num_candidates(2, 4), num_candidates(1, 4), num_candidates(4, 8)] == [6, 4, 70]
    assert candidates(2, 4).tolist() == [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1],
                                         [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]


@pytest.mark.parametrize("n,m", [(0, 4), (4, 4), (5, 4), (2, 2.0)])
def test_invalid_patterns_are_refused(n, m):
    with pytest.raises(ValueError, match="N:M"):
        candidates(n, m)


def test_check_nm_and_group_view():
    w = torch.tensor([[0.5, 0.0, -1.0, 0.0, 0.0, 0.0, 2.0, 3.0]])
    assert group_view(w, 4).shape == (1, 2, 4)
    assert check_nm(w, 2, 4) and check_nm(w, 2, 4, exact=True)
    w[0, 1] = 7.0
    assert not check_nm(w, 2, 4) and check_nm(w, 3, 4)
    assert check_nm(torch.zeros(3, 8), 2, 4) and not check_nm(torch.zeros(3, 8), 2, 4, exact=True)
    with pytest.raises(ValueError, match="input dimension 6 is not a multiple of the group size M=4"):
        check_nm(torch.ones(2, 6), 2, 4)


def test_topn_mask_keeps_the_largest_of_each_group():
    scores = torch.tensor([[1.0, 5.0, 3.0, 2.0, 0.0, 0.0, 9.0, 0.0]])
    assert topn_mask(scores, 2, 4).tolist() == [[False, True, True, False, True, False, True, False]]
    r = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    assert check_nm(topn_mask(r.abs(), 2, 4), 2, 4, exact=True)


def test_infer_n_needs_a_unique_pattern():
    assert infer_n(6, 4) == 2 and infer_n(70, 8) == 4
    with pytest.raises(ValueError, match="fit both 1:4 and 3:4"):
        infer_n(4, 4)


# ---------------------------------------------------------------------- counter-based noise


def test_mix32_is_a_bijection_on_a_sample_and_matches_for_ints_and_tensors():
    xs = torch.arange(0, 1 << 18, dtype=torch.int64) * 16381 + 17
    hashed = gumbel.mix32(xs)
    assert hashed.unique().numel() == xs.numel()
    assert int(hashed.max()) <= gumbel.MASK32 and int(hashed.min()) >= 0
    assert [gumbel.mix32(int(x)) for x in xs[:50]] == hashed[:50].tolist()


def test_noise_keys_separate_seed_step_and_layer():
    keys = {gumbel.noise_key(s, t, layer) for s in range(3) for t in range(50) for layer in range(20)}
    assert len(keys) == 3 * 50 * 20
    assert gumbel.noise_key(1, 2, 3) == gumbel.noise_key(1, 2, 3) != gumbel.init_key(1, 3)
    with pytest.raises(ValueError, match="step must be an integer"):
        gumbel.noise_key(1, -1, 3)


def test_gumbel_noise_has_gumbel_moments_and_independent_slots():
    g = gumbel.gumbel_noise(gumbel.noise_key(0, 0, 0), 0, (200_000,), 6, dtype=torch.float64)
    euler = 0.5772156649
    assert abs(g.mean().item() - euler) < 0.01
    assert abs(g.var().item() - math.pi ** 2 / 6) < 0.02
    # CDF exp(-exp(-x)) at a few points
    for x in (-1.0, 0.0, 1.0, 3.0):
        assert abs((g <= x).double().mean().item() - math.exp(-math.exp(-x))) < 0.005
    corr = torch.corrcoef(torch.stack([g[:, 0], g[:, 1], g[:, 5]]))  # candidates of one group
    assert corr.sub(torch.eye(3, dtype=corr.dtype)).abs().max() < 0.01
    neighbours = torch.corrcoef(torch.stack([g[:-1, 0], g[1:, 0]]))[0, 1]
    assert abs(neighbours.item()) < 0.01


def test_noise_of_a_shard_is_the_slice_of_the_full_noise():
    """Column shards (rows split, fc1's strided rows) and row shards (groups split) draw the TP=1 noise."""
    key = gumbel.noise_key(7, 3, 11)
    rows, gpr, c = 24, 10, 6
    full = gumbel.gumbel_noise(key, gumbel.GroupIndex(torch.arange(rows), torch.arange(gpr), gpr), (rows, gpr), c)
    assert torch.equal(full, gumbel.gumbel_noise(key, 0, (rows, gpr), c))  # int offset: row-major numbering
    for r in range(2):  # row-parallel TP=2: every row, half of the group columns
        cols = torch.arange(r * gpr // 2, (r + 1) * gpr // 2)
        got = gumbel.gumbel_noise(key, gumbel.GroupIndex(torch.arange(rows), cols, gpr), (rows, gpr // 2), c)
        assert torch.equal(got, full[:, cols])
    for tp in (2, 3):  # column-parallel: a block of rows
        for r in range(tp):
            sub = torch.arange(r * rows // tp, (r + 1) * rows // tp)
            got = gumbel.gumbel_noise(key, gumbel.GroupIndex(sub, torch.arange(gpr), gpr), (rows // tp, gpr), c)
            assert torch.equal(got, full[sub])
    # fc1 (stride 2) at TP=2, rank 1: [gate rows 6..11; up rows 18..23]
    from megatron_ext.sparsity.layers import _strided_rows
    strided = _strided_rows(12, 2, 1, 2)
    assert strided.tolist() == list(range(6, 12)) + list(range(18, 24))
    got = gumbel.gumbel_noise(key, gumbel.GroupIndex(strided, torch.arange(gpr), gpr), (12, gpr), c)
    assert torch.equal(got, full[strided])


def test_init_logits_are_normal_with_the_requested_std():
    v = gumbel.normal_logits(gumbel.init_key(5, 9), 0, (50_000,), 6, std=0.01)
    assert v.dtype == torch.float32
    assert abs(v.mean().item()) < 2e-4 and abs(v.std().item() - 0.01) < 2e-4
    assert abs(((v.abs() < 0.01).double().mean() - 0.6827).item()) < 0.005


# ---------------------------------------------------------------------- Gumbel-softmax masks


def _setup(n, m, groups=(5, 7), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = math.comb(m, n)
    logits = (torch.randn(*groups, c, generator=gen, dtype=dtype) * 0.5).requires_grad_()
    return logits, candidates(n, m, dtype=dtype)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8)])
def test_soft_mask_is_a_convex_mix_of_candidates_and_hard_is_nm(n, m, hard):
    logits, s = _setup(n, m, dtype=torch.float32)
    mask = gumbel.gumbel_soft_mask(logits, s, tau=0.7, kappa=3.0, seed=gumbel.noise_key(1, 0, 0), offset=0, hard=hard)
    assert mask.shape == (5, 7, m)
    torch.testing.assert_close(mask.sum(-1), torch.full((5, 7), float(n)), rtol=0, atol=1e-5)
    assert bool(((mask >= 0) & (mask <= 1 + 1e-6)).all())
    if hard:
        assert set(mask.unique().tolist()) == {0.0, 1.0} and check_nm(mask.reshape(5, -1), n, m, exact=True)


@pytest.mark.parametrize("n,m,groups", [(2, 4, (2, 3)), (1, 4, (2, 3)), (2, 8, (1, 2))])
def test_soft_mask_gradient_matches_finite_differences(n, m, groups):
    logits, s = _setup(n, m, groups=groups)
    key = gumbel.noise_key(3, 1, 2)
    weights = torch.randn(*groups, m, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def f(lg):
        return (gumbel.gumbel_soft_mask(lg, s, tau=0.9, kappa=2.0, seed=key, offset=5) * weights).sum()

    def g(lg):
        return (gumbel.gumbel_soft_mask_recompute(lg, s, 0.9, 2.0, key, 5) * weights).sum()

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(g, (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("hard", [False, True])
def test_recomputing_the_noise_gives_the_reference_values_and_grads(hard):
    logits, s = _setup(2, 4, groups=(16, 8))  # float64: the two backward formulas agree to rounding
    key, offset = gumbel.noise_key(9, 4, 1), gumbel.GroupIndex(torch.arange(16) * 2, torch.arange(8) + 8, 16)
    upstream = torch.randn(16, 8, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = gumbel.gumbel_soft_mask(logits, s, 0.5, 10.0, key, offset, hard)
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), logits)
    fn = gumbel.GumbelSoftMask.apply(logits, s, 0.5, 10.0, key, offset, hard)
    (fn_grad,) = torch.autograd.grad((fn * upstream).sum(), logits)
    assert torch.equal(fn, ref)
    torch.testing.assert_close(fn_grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert ref_grad.abs().sum() > 0


def _saved_storages(fn):
    """Data pointers of the tensors autograd saves for the backward while ``fn`` runs."""
    ptrs = []

    def pack(t):
        ptrs.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return ptrs


def test_the_autograd_functions_keep_only_the_logits_and_weight():
    logits, s = _setup(2, 4, groups=(16, 8))
    weight = torch.randn(16, 32, dtype=torch.float64, requires_grad=True)
    key = gumbel.noise_key(1, 1, 1)
    owned = {logits.untyped_storage().data_ptr(), weight.untyped_storage().data_ptr(),
             s.untyped_storage().data_ptr()}
    fn = _saved_storages(lambda: gumbel.GumbelSoftMask.apply(logits, s, 0.5, 10.0, key, 0, False))
    mw = _saved_storages(lambda: gumbel.masked_weight(weight, logits, s, 0.5, 10.0, key, 0, True))
    sq = _saved_storages(lambda: gumbel.masked_weight_sq_norm(weight, logits, s, 0.5, 10.0, key, 0))
    ref = _saved_storages(lambda: weight * gumbel.gumbel_soft_mask(logits, s, 0.5, 10.0, key, 0).reshape(16, 32))
    assert fn and set(fn) <= owned and set(mw) <= owned and set(sq) <= owned
    assert not set(ref) <= owned  # the plain reference keeps its softmax output and mask


@pytest.mark.parametrize("hard", [False, True])
def test_masked_weight_and_sq_norm_match_the_reference(hard):
    logits, s = _setup(2, 4, groups=(12, 6), seed=4)
    weight = torch.randn(12, 24, generator=torch.Generator().manual_seed(5), dtype=torch.float64).requires_grad_()
    key, offset = gumbel.noise_key(1, 2, 3), 100
    upstream = torch.randn(12, 24, generator=torch.Generator().manual_seed(6), dtype=torch.float64)

    ref_mask = gumbel.gumbel_soft_mask(logits, s, 0.8, 5.0, key, offset, hard).reshape(12, 24)
    ref = weight * ref_mask
    ref_gw, ref_gl = torch.autograd.grad((ref * upstream).sum(), (weight, logits))
    out = gumbel.masked_weight(weight, logits, s, 0.8, 5.0, key, offset, hard)
    gw, gl = torch.autograd.grad((out * upstream).sum(), (weight, logits))
    assert torch.equal(out, ref)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gl, ref_gl, rtol=1e-10, atol=1e-12)
    if hard:  # straight-through: forward one-hot, backward through the soft sample
        soft = gumbel.gumbel_soft_mask(logits, s, 0.8, 5.0, key, offset, False).reshape(12, 24)
        assert not torch.equal(soft, ref_mask.detach())
        (soft_gl,) = torch.autograd.grad(((weight.detach() * soft) * upstream).sum(), logits)
        torch.testing.assert_close(gl, soft_gl, rtol=1e-10, atol=1e-12)

    ref_mask = gumbel.gumbel_soft_mask(logits, s, 0.8, 5.0, key, offset, hard).reshape(12, 24)
    ref_sq = (weight.detach() * ref_mask).square().sum()
    (ref_sq_gl,) = torch.autograd.grad(ref_sq, logits)
    sq = gumbel.masked_weight_sq_norm(weight, logits, s, 0.8, 5.0, key, offset, hard)
    torch.testing.assert_close(sq, ref_sq, rtol=1e-12, atol=0)
    sq.backward()
    torch.testing.assert_close(logits.grad, ref_sq_gl, rtol=1e-10, atol=1e-12)
    assert weight.grad is None  # the regulariser never reaches the weight


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (1, 8)])
def test_argmax_mask_is_always_nm(n, m):
    s = candidates(n, m)
    for seed in range(3):
        logits = torch.randn(33, 9, s.shape[0], generator=torch.Generator().manual_seed(seed))
        mask = masks_from_choice(logits.argmax(-1), s)
        assert mask.dtype == torch.bool and mask.shape == (33, 9 * m)
        assert check_nm(mask, n, m, exact=True)


def test_hard_samples_follow_softmax_of_scaled_logits():
    """Gumbel-max: over many groups with the same logits, candidate c is drawn with
    probability softmax(kappa * logits)_c (noise differs by global group index)."""
    kappa, groups = 2.0, 60_000
    base = torch.tensor([0.3, -0.2, 0.0, 0.5, -0.6, 0.1])
    logits = base.expand(groups, 6).contiguous()
    mask = gumbel.gumbel_soft_mask(logits, candidates(2, 4), tau=0.05, kappa=kappa,
                                   seed=gumbel.noise_key(2, 7, 1), offset=0, hard=True)
    picks = (mask @ candidates(2, 4).t() == 2).float().argmax(-1)  # the candidate equal to each mask
    freq = torch.bincount(picks, minlength=6).double() / groups
    expected = torch.softmax(kappa * base.double(), dim=0)
    assert (freq - expected).abs().max() < 0.01
