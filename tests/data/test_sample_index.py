"""megatron_ext._native sample/blending index helpers against megatron-core's helpers_cpp.

Every case builds the same inputs for both and compares the outputs element-wise.
"""
from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import os
import threading

import numpy as np
import pytest

from megatron_ext import _native

INT32_MAX = np.iinfo(np.int32).max


@pytest.fixture(scope="module")
def oracle():
    """megatron-core's compiled helpers, loaded without importing megatron.core."""
    spec = importlib.util.find_spec("megatron")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("megatron-core is not installed")
    root = list(spec.submodule_search_locations)[0]
    hits = glob.glob(os.path.join(root, "core", "datasets", "helpers_cpp*.so"))
    if not hits:
        pytest.skip("megatron-core's helpers_cpp is not built")
    loader = importlib.machinery.ExtensionFileLoader("helpers_cpp", hits[0])
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("helpers_cpp", loader))
    loader.exec_module(module)
    return module


def _corpus(rng, num_docs, max_len, epochs, zero_frac=0.0):
    sizes = rng.integers(1, max_len + 1, num_docs).astype(np.int32)
    if zero_frac:
        sizes[rng.random(num_docs) < zero_frac] = 0
    if sizes.sum() < 2:
        sizes[0] = 2
    document_index = np.concatenate(
        [rng.permutation(num_docs).astype(np.int32) for _ in range(epochs)])
    return sizes, document_index, int(sizes.sum(dtype=np.int64))


# --------------------------------------------------------------------------- sample index

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("extra", [1, 0])
def test_sample_idx_matches_megatron(oracle, seed, drop_last, extra):
    rng = np.random.default_rng(seed)
    for _ in range(8):
        num_docs = int(rng.integers(1, 400))
        max_len = int(rng.choice([3, 40, 700, 5000]))
        epochs = int(rng.integers(1, 5))
        seq = int(rng.choice([2, 3, 17, 128, 1024]))
        sizes, docs, tpe = _corpus(rng, num_docs, max_len, epochs, zero_frac=rng.choice([0, 0.2]))
        args = (sizes, docs, seq, epochs, tpe, drop_last, extra)
        want32 = oracle.build_sample_idx_int32(*args)
        want64 = oracle.build_sample_idx_int64(*args)
        got = _native.build_sample_idx(*args)
        assert got.dtype == np.int32 and got.shape == want32.shape
        np.testing.assert_array_equal(got, want32)
        got64 = _native.build_sample_idx_int64(*args)
        assert got64.dtype == np.int64
        np.testing.assert_array_equal(got64, want64)
        for threads in (1, 3):
            np.testing.assert_array_equal(
                _native.build_sample_idx_int32(*args, num_threads=threads), want32)


def test_sample_idx_int64_document_indices_and_keywords(oracle):
    rng = np.random.default_rng(11)
    sizes, docs, tpe = _corpus(rng, 3000, 300, 3)
    want = oracle.build_sample_idx_int32(sizes, docs, 64, 3, tpe, True, 1)
    got = _native.build_sample_idx(sizes=sizes.astype(np.int64), document_indices=docs.astype(np.int64),
                                   seq_length=64, num_epochs=3, tokens_per_epoch=tpe)
    np.testing.assert_array_equal(got, want)
    # Any integer dtype is accepted (copied), e.g. uint16 sizes.
    got = _native.build_sample_idx(sizes.astype(np.uint16), docs, 64, 3, tpe)
    np.testing.assert_array_equal(got, want)


def test_sample_idx_threads_on_large_input(oracle):
    """The two-pass threaded merge on an input big enough for several chunks."""
    rng = np.random.default_rng(5)
    sizes, docs, tpe = _corpus(rng, 400_000, 2000, 2, zero_frac=0.05)
    for extra, drop in ((1, True), (0, False)):
        want = oracle.build_sample_idx_int32(sizes, docs, 4096, 2, tpe, drop, extra)
        for threads in (2, 7):
            got = _native.build_sample_idx(sizes, docs, 4096, 2, tpe, drop, extra,
                                           num_threads=threads)
            np.testing.assert_array_equal(got, want)


def test_sample_idx_tokens_per_epoch_smaller_than_documents(oracle):
    """Megatron stops after num_samples however many documents remain."""
    rng = np.random.default_rng(3)
    sizes, docs, tpe = _corpus(rng, 500, 100, 2)
    for tokens in (tpe // 3, tpe - 1):
        args = (sizes, docs, 50, 2, tokens, False, 1)
        np.testing.assert_array_equal(_native.build_sample_idx(*args),
                                      oracle.build_sample_idx_int32(*args))


def test_sample_idx_single_precision_ceiling(oracle):
    """drop_last=False: megatron rounds the ceiling in float32; 2**30 + 1 tokens over
    2**20 gives 1024 samples there, not the exact 1025."""
    sizes = np.array([2**30 + 2], dtype=np.int32)
    docs = np.array([0], dtype=np.int32)
    args = (sizes, docs, 2**20, 1, 2**30 + 2, False, 1)
    want = oracle.build_sample_idx_int32(*args)
    got = _native.build_sample_idx(*args)
    assert got.shape == want.shape == (1025, 2)
    np.testing.assert_array_equal(got, want)


def _megatron_walk(sizes, docs, seq, epochs, tpe, drop_last, extra):
    """megatron-core's sample-index loop in plain Python (int64 everywhere), for inputs
    the compiled helper cannot take (sizes beyond int32)."""
    tokens = epochs * tpe - extra
    n = tokens // seq if drop_last else int(np.ceil(np.float32(tokens) / np.float32(seq)))
    out = [[0, 0]]
    i, offset = 0, 0
    while len(out) <= n:
        remaining = seq + extra
        while remaining != 0:
            length = int(sizes[docs[i]]) - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - extra
                remaining = 0
            else:
                if i == len(docs) - 1:
                    offset = int(sizes[docs[i]]) - extra
                    break
                i += 1
                offset = 0
        out.append([i, offset])
    return np.array(out, dtype=np.int64)


def test_sample_idx_int64_chosen_for_huge_documents():
    sizes = np.array([5, 3_000_000_000, 7, 2_500_000_000], dtype=np.int64)
    docs = np.array([1, 0, 3, 2, 0], dtype=np.int64)
    tpe = int(sizes[docs].sum())
    seq = 700_000_000
    got = _native.build_sample_idx(sizes, docs, seq, 1, tpe)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, _megatron_walk(sizes, docs, seq, 1, tpe, True, 1))
    with pytest.raises(OverflowError, match="int32"):
        _native.build_sample_idx_int32(sizes, docs, seq, 1, tpe)


def test_sample_idx_bad_input_is_reported():
    sizes = np.array([10, 20, 30], dtype=np.int32)
    docs = np.array([0, 1, 2], dtype=np.int32)
    with pytest.raises(IndexError, match=r"document_indices\[1\] = 7"):
        _native.build_sample_idx(sizes, np.array([0, 7, 2], np.int32), 4, 1, 60)
    with pytest.raises(ValueError, match=r"sizes\[2\] = -3"):
        _native.build_sample_idx(np.array([10, 20, -3], np.int32), docs, 4, 1, 60)
    with pytest.raises(ValueError, match="document_indices is empty"):
        _native.build_sample_idx(sizes, np.array([], np.int32), 4, 1, 60)
    with pytest.raises(ValueError, match="seq_length must be > 1"):
        _native.build_sample_idx(sizes, docs, 1, 1, 60)
    with pytest.raises(ValueError, match="num_epochs"):
        _native.build_sample_idx(sizes, docs, 4, 0, 60)
    with pytest.raises(ValueError, match="tokens_per_epoch"):
        _native.build_sample_idx(sizes, docs, 4, 1, 1)
    with pytest.raises(ValueError, match="add_extra_token"):
        _native.build_sample_idx(sizes, docs, 4, 1, 60, True, 2)
    with pytest.raises(TypeError, match="sizes must have an integer dtype"):
        _native.build_sample_idx(sizes.astype(np.float32), docs, 4, 1, 60)
    with pytest.raises(ValueError, match="document_indices must be 1-D"):
        _native.build_sample_idx(sizes, docs.reshape(1, 3), 4, 1, 60)


# --------------------------------------------------------------------------- blending

def _blend(fn, weights, n, size, **kw):
    index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    fn(index, sample_index, weights, n, size, False, **kw)
    return index, sample_index


def _isas():
    available = []
    for isa in ("scalar", "avx2", "avx512"):
        try:
            _blend(_native.build_blending_indices, [1.0], 1, 1, isa=isa)
            available.append(isa)
        except ValueError:
            pass
    return available


@pytest.mark.parametrize("isa", _isas())
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 9, 20, 32, 33, 100])
def test_blending_matches_megatron(oracle, isa, n):
    rng = np.random.default_rng(100 + n)
    cases = [
        rng.random(n) + 0.01,                 # normalised below
        rng.random(n) ** 6 + 1e-4,            # skewed
        np.ones(n),                           # all tied
    ]
    for k, raw in enumerate(cases):
        weights = (raw / raw.sum()).tolist()
        size = int(rng.integers(40_000, 120_000)) if k == 0 else 30_011
        want = _blend(oracle.build_blending_indices, weights, n, size)
        for threads in (1, 3):
            got = _blend(_native.build_blending_indices, weights, n, size,
                         num_threads=threads, isa=isa)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


def test_blending_keeps_double_rounding(oracle):
    """Weights 0.1/0.2/0.7: at sample 10 all three double error terms round to exactly 0,
    so megatron picks dataset 0; the exact values of these doubles would pick dataset 1."""
    weights = [0.1, 0.2, 0.7]
    want = _blend(oracle.build_blending_indices, weights, 3, 100)
    got = _blend(_native.build_blending_indices, weights, 3, 100)
    assert want[0][10] == 0 and got[0][10] == 0
    np.testing.assert_array_equal(got[0], want[0])


def test_blending_unnormalised_and_zero_weights(oracle):
    """Megatron's helper takes any finite weights; so do we, with the same result."""
    for weights in ([3.0, 1.0, 0.5], [0.0, 2.0, 0.0, 1.0], [5.0, 5.0], [1e-9, 1.0], [2.0, -1.0, 1.0]):
        n = len(weights)
        want = _blend(oracle.build_blending_indices, weights, n, 50_000)
        for threads in (1, 4):
            got = _blend(_native.build_blending_indices, weights, n, 50_000, num_threads=threads)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


def test_blending_many_threads_long_run(oracle):
    """Speculative chunks over several threads on a blend of realistic length."""
    rng = np.random.default_rng(9)
    weights = rng.random(20) + 0.05
    weights = (weights / weights.sum()).tolist()
    want = _blend(oracle.build_blending_indices, weights, 20, 2_000_000)
    got = _blend(_native.build_blending_indices, weights, 20, 2_000_000, num_threads=5)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_blending_verbose_reports_ratios(capfd):
    _native.build_blending_indices(
        np.zeros(1000, np.int16), np.zeros(1000, np.int64), [0.25, 0.75], 2, 1000, True)
    out = capfd.readouterr().out
    assert "building indices for blended datasets" in out
    assert "dataset 1, input: 0.75, achieved: 0.75" in out


def test_blending_releases_the_gil():
    """Python keeps running in another thread while the helper works."""
    size, n = 3_000_000, 64
    weights = np.full(n, 1.0 / n)
    ticks = [0]
    done = threading.Event()

    def ticker():
        while not done.is_set():
            ticks[0] += 1

    t = threading.Thread(target=ticker)
    t.start()
    try:
        before = ticks[0]
        _blend(_native.build_blending_indices, weights, n, size, num_threads=1, isa="scalar")
        during = ticks[0] - before
    finally:
        done.set()
        t.join()
    assert during > 1000


def test_blending_bad_input_is_reported():
    idx16, idx64 = np.zeros(10, np.int16), np.zeros(10, np.int64)
    with pytest.raises(TypeError, match="dataset_index must be a numpy int16"):
        _native.build_blending_indices(np.zeros(10, np.int32), idx64, [1.0], 1, 10)
    with pytest.raises(TypeError, match="dataset_sample_index must be a numpy int64"):
        _native.build_blending_indices(idx16, np.zeros(10, np.int32), [1.0], 1, 10)
    with pytest.raises(ValueError, match="fewer than the 11"):
        _native.build_blending_indices(idx16, idx64, [1.0], 1, 11)
    with pytest.raises(ValueError, match=r"weights\[1\] is not finite"):
        _native.build_blending_indices(idx16, idx64, [1.0, float("nan")], 2, 10)
    with pytest.raises(ValueError, match="weights has 1 entries"):
        _native.build_blending_indices(idx16, idx64, [1.0], 2, 10)
    with pytest.raises(ValueError, match="num_datasets"):
        _native.build_blending_indices(idx16, idx64, [1.0], 0, 10)
    with pytest.raises(ValueError, match="isa must be"):
        _native.build_blending_indices(idx16, idx64, [1.0], 1, 10, isa="neon")


@pytest.mark.parametrize("seed", range(4))
def test_exhaustive_blending_matches_megatron(oracle, seed):
    rng = np.random.default_rng(seed)
    for n in (1, 2, 7, 40):
        sizes = rng.integers(1, 3000, n).astype(np.int64)
        if seed == 3:
            sizes[:] = 500  # ties everywhere
        total = int(sizes.sum())
        want = (np.zeros(total, np.int16), np.zeros(total, np.int64))
        oracle.build_exhaustive_blending_indices(want[0], want[1], sizes, n)
        got = (np.zeros(total, np.int16), np.zeros(total, np.int64))
        _native.build_exhaustive_blending_indices(got[0], got[1], sizes.tolist(), n)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        assert np.array_equal(np.bincount(got[0], minlength=n), sizes)


def test_exhaustive_blending_rejects_empty_dataset():
    with pytest.raises(ValueError, match=r"sizes\[1\] = 0 must be positive"):
        _native.build_exhaustive_blending_indices(
            np.zeros(5, np.int16), np.zeros(5, np.int64), [5, 0], 2)
