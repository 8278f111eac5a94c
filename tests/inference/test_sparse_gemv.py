"""The Triton 2:4 decode kernel (run on CPU tensors by Triton's interpreter) against the dense
product, reading the buffer ``cusparselt_layout`` writes (the benchmark checks on the GPU that
cuSPARSELt writes the same bytes), and ``SparseLinear`` running it where the table picks it.

The interpreter must be chosen before triton is first imported (megatron-core imports it):
when this module is the first to load triton, ``TRITON_INTERPRET=1`` is set here and the
kernel tests run in this process; otherwise ``test_kernel_tests_in_a_child_process`` runs
them in a fresh interpreter process.
"""
import os
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton and the kernel are defined: they run on the CPU

import pytest  # noqa: E402
import torch  # noqa: E402
from interpreted import run_under_interpreter  # noqa: E402

from megatron_ext.inference import SparseLinear, sparse_gemv  # noqa: E402
from megatron_ext.inference import sparse as sparse_mod  # noqa: E402
from megatron_ext.inference.sparse import (Choice, KernelTable, cusparselt_dense, cusparselt_layout,  # noqa: E402
                                           magnitude_2of4_mask)

HERE = sparse_gemv.available() and sparse_gemv.interpreted()
needs_interpreter = pytest.mark.skipif(
    not HERE, reason="triton is not installed" if not sparse_gemv.available() else
    "triton was imported before TRITON_INTERPRET=1: test_kernel_tests_in_a_child_process runs this")


@pytest.mark.skipif(not sparse_gemv.available() or HERE,
                    reason="triton is not installed" if not sparse_gemv.available() else "the kernel tests run here")
def test_kernel_tests_in_a_child_process():
    out = run_under_interpreter(__file__, "not child_process")
    assert "skipped" not in out


def _weight(o, i, seed=0):
    w = torch.randn(o, i, generator=torch.Generator().manual_seed(seed))
    return (w * magnitude_2of4_mask(w)).to(torch.bfloat16)


@needs_interpreter
@pytest.mark.parametrize("out_f,in_f,tokens", [(64, 32, 1), (128, 96, 5), (192, 160, 16)])
def test_kernel_equals_the_dense_product_for_every_tile_configuration(out_f, in_f, tokens):
    w = _weight(out_f, in_f, seed=tokens)
    w[3, :4] = 0                                      # an empty group and one with a single kept value
    w[7, 4:8] = torch.tensor([0.0, 0.0, 0.0, 1.5])
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    buf = cusparselt_layout(w)
    ref = (x.float() @ w.float().t()).to(torch.bfloat16)          # fp32 sums rounded once, as the kernel does
    configs = range(len(sparse_gemv.CONFIGS)) if tokens == 1 else (0, 3)
    for k in configs:
        y = sparse_gemv.sparse_gemv(buf, x, out_f, in_f, k)
        assert y.shape == (tokens, out_f) and y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2, msg=f"config {k}")
    x_strided = torch.randn(tokens, 2 * in_f).to(torch.bfloat16)[:, ::2]    # a non-contiguous input
    torch.testing.assert_close(sparse_gemv.sparse_gemv(buf, x_strided, out_f, in_f).float(),
                               (x_strided.float() @ w.float().t()), rtol=1e-2, atol=1e-2)


@needs_interpreter
def test_kernel_refuses_what_it_cannot_multiply():
    buf = cusparselt_layout(_weight(64, 32))
    with pytest.raises(ValueError, match="at most"):
        sparse_gemv.sparse_gemv(buf, torch.zeros(sparse_gemv.MAX_TOKENS + 1, 32, dtype=torch.bfloat16), 64, 32)
    with pytest.raises(ValueError, match="out % 64"):
        sparse_gemv.sparse_gemv(buf, torch.zeros(1, 32, dtype=torch.bfloat16), 32, 32)


@needs_interpreter
def test_sparse_linear_runs_the_decode_kernel_where_the_table_picks_it(monkeypatch):
    """cuSPARSELt stood in for by its layout in plain torch (compress) and a matmul on the
    decompressed weight (its GEMM); the Triton kernel is the real one, interpreted."""
    calls = []

    def sparse_mm(a, b, transpose_result=False, alg_id=0, **_):
        calls.append(("sparse", b.shape[1]))
        y = cusparselt_dense(a, 128, 64) @ b
        return y.t().contiguous() if transpose_result else y

    real_gemv = sparse_mod.gemv

    def logged_gemv(*args):
        calls.append(("gemv", args[1].shape[0]))
        return real_gemv(*args)

    monkeypatch.setattr(sparse_mod, "sparse_kernels_available", lambda device=None: True)
    monkeypatch.setattr(sparse_mod, "gemv", logged_gemv)
    monkeypatch.setattr(torch, "_cslt_compress", cusparselt_layout)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", sparse_mm)
    t = KernelTable("test")
    t.set(128, 64, 1, Choice("gemv", 0, 0.02, 0.03, 0.01, 6))
    t.set(128, 64, 4096, Choice("sparse", 2, 1.0, 0.7))
    w = _weight(128, 64)
    layer = SparseLinear(w, t)
    assert layer.weight is None and layer.weight_bytes() == w.numel() * 2 * 9 // 16    # no dense copy needed
    for tokens in (1, 3, 4096):
        x = torch.randn(1, tokens, 64).to(torch.bfloat16)
        torch.testing.assert_close(layer(x).float(), (x.float() @ w.float().t()), rtol=1e-2, atol=2e-2)
    assert calls == [("gemv", 1), ("gemv", 3), ("sparse", 4096)]
