"""benchmarks/bench_mask_host.py: what a masked linear adds to each micro-batch's Python, the
host work that bounds a micro-batch-1 step of the TP4 rank proxy. A change that puts more Python
on the per-micro-batch path (beyond the one autograd Function and the step cache lookup) fails here."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# today 37 calls (megatron-core's dense linear: about 150); the bound leaves room for torch's own changes
MAX_EXTRA_CALLS = 45


def test_a_masked_linear_adds_a_bounded_number_of_python_calls_per_micro_batch(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_mask_host.py"), "--micro-batches", "8",
                           "--repeats", "2", "--out", str(tmp_path / "table.md")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (tmp_path / "table.md").read_text()
    dense = float(re.search(r"\| ColumnParallelLinear \(dense, weight trains\) \| ([\d.]+) \|", table).group(1))
    extra = float(re.search(r"\| masked - dense \| ([+-][\d.]+) \|", table).group(1))
    assert dense > 50                       # the count sees megatron-core's own Python
    assert 0 < extra <= MAX_EXTRA_CALLS, table
    assert "`C:_StepMaskedWeight.apply` | +1 |" in table   # one autograd Function per micro-batch, no more
