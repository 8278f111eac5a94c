"""Every GPU benchmark's ``--tiny`` CPU check runs to the end, so a change to the trainer or
the libraries the benchmarks drive does not leave them broken until the next GPU session.
(The fused mask kernels' benchmark is left to tests/sparsity, which runs its kernels.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# benchmark -> what its CPU check prints when it got to the end
CHECKS = {
    "bench_model_gpu.py": "|",
    "bench_sparse_gpu.py": "|",
    "bench_sparse_infer_gpu.py": "the CPU checks above passed",
    "bench_train.py": "2:4 mask-only --hard (trainer)",
    "bench_train_gpu.py": "|",
}


@pytest.mark.parametrize("script", sorted(CHECKS))
def test_cpu_check_runs(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}  # its own group
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--tiny"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert CHECKS[script] in done.stdout, done.stdout[-3000:]
