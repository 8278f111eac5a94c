"""Running a test module's Triton kernel tests in a fresh process under Triton's interpreter.

The interpreter must be chosen before triton is first imported (megatron-core imports it), so
a test module that was not the first to load triton runs its kernel tests again in a child
process with ``TRITON_INTERPRET=1``.
"""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_under_interpreter(test_file: str, select: str) -> str:
    """Run the tests of ``test_file`` matching ``-k select`` in a child pytest with the
    interpreter on; assert that it passed and ran tests; return its output."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore",
           str(Path(test_file).resolve()), "-k", select]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}  # the child's own group
    env["TRITON_INTERPRET"] = "1"
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout, done.stdout[-3000:]
    return done.stdout
