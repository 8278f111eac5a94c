"""benchmarks/bench_multi_gpu.py --tiny: the multi-GPU items on the CPU (gloo, the tiny model, TP2
for TP4), run as the GPU session will run them, with their results read back from the files.

* kill and resume (item 3): one rank SIGKILLed after a checkpoint, the run resumed with ``1``, its
  losses equal the uninterrupted run's; DP2 against DP1 with twice the accumulation (item 5): the
  same loss, gradient norm and gradients. The same comparisons flag a loss off by 1e-3 and one
  gradient tensor off by 1%.
* an item the machine cannot hold is reported "not run: needs N", in the JSON and the table.
* (slow) throughput with the proxy's prediction (item 1), resharding TP2 -> TP1 x DP2 (item 4)
  and two launchers as two nodes (item 6).
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "benchmarks" / "bench_multi_gpu.py"


def _driver_module():
    spec = importlib.util.spec_from_file_location("bench_multi_gpu", DRIVER)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_multi_gpu", module)   # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(out: Path, *args, timeout=600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, str(DRIVER), "--tiny", "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return done


def _item(out: Path, n: int) -> dict:
    return json.loads((out / f"item{n}.json").read_text())


def test_kill_resume_and_dp_gradients_pass_and_their_checks_catch_a_mismatch(tmp_path):
    out = tmp_path / "out"
    done = _run(out, "--items", "3,5")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    kill = _item(out, 3)
    assert kill["status"] == "passed", kill
    reference = {int(k): v for k, v in kill["reference"].items()}
    resumed = {int(k): v for k, v in kill["resumed"].items()}
    assert sorted(reference) == list(range(1, 9))
    # killed once iteration 3 was logged: the checkpoint of iteration 2 was written, perhaps the next ones
    start = kill["resumed_from"]
    assert kill["killed_rank"] == 1 and start in (2, 4, 6) and sorted(resumed) == list(range(start + 1, 9))
    assert all(resumed[i] == reference[i] for i in resumed)     # bit-identical on the CPU

    grads = _item(out, 5)
    assert grads["status"] == "passed", grads
    assert [r["status"] for r in grads["rows"]] == ["passed", "passed"]

    table = (out / "table.md").read_text()
    assert table.count("| passed |") == 3 and "| 3 |" in table and "| 5 |" in table
    assert "run_maskllm_native.sh benchmarks/multi_gpu_train.sh 1" in table and "CPU, " in table

    # the same comparisons, given a mismatch
    m = _driver_module()
    assert m.losses_match_to_decimals(resumed, reference) == []
    off = dict(resumed)
    off[8] += 1e-3
    assert m.losses_match_to_decimals(off, reference) == [f"iteration 8: {off[8]:.6f} vs {reference[8]:.6f}"]
    assert m.losses_match_to_decimals({9: 1.0}, reference) == ["iteration 9: not in the reference"]

    files = {int(k): v for k, v in grads["gradient_files"].items()}
    for case in ("dense", "mask-only"):
        dp1, dp2 = m.load_grads(files[1], case), m.load_grads(files[2], case)
        assert sorted(dp1) == sorted(dp2) == [0, 1]
        assert m.compare_gradients(dp2, dp1, 1e-5, 1e-6)[0] == []
        name = sorted(dp2[1]["grads"])[-1]
        dp2[1]["grads"][name]["sample"] = dp2[1]["grads"][name]["sample"] * 1.01
        bad, _ = m.compare_gradients(dp2, dp1, 1e-5, 1e-6)
        assert len(bad) == 1 and bad[0].startswith(f"TP rank 1 {name}: relative error 1.0") , bad
        dp2[0]["loss"] += 1e-3
        assert any(b.startswith("TP rank 0 loss:") for b in m.compare_gradients(dp2, dp1, 1e-5, 1e-6)[0])


def test_items_the_machine_cannot_hold_are_reported_not_run(tmp_path):
    out = tmp_path / "out"
    done = _run(out, "--items", "5,6", "--gpus", "4", timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for n in (5, 6):
        assert _item(out, n)["status"] == "not run: needs 4 processes"
    table = (out / "table.md").read_text()
    assert table.count("| not run: needs 4 processes |") == 2
    assert not list((out / "work").glob("item*"))             # nothing was launched


@pytest.mark.slow  # about two minutes on two cores: seven launches
def test_throughput_reshard_and_two_nodes(tmp_path):
    out = tmp_path / "out"
    done = _run(out, "--items", "1,4,6", timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    rows = _item(out, 1)["rows"]
    assert [r["config"] for r in rows] == [f"TP2 x DP{dp}, seq 32, global batch 8, {case}"
                                           for dp in (1, 2) for case in ("dense", "mask-only")]
    for r in rows:
        assert r["status"] == "measured" and "tokens/s/GPU" in r["measured"] and "tokens/s/GPU" in r["prediction"]
        assert "bench_train_gpu.py --tp 2" in r["command"] and "proxy: " in r["command"]

    reshard = _item(out, 4)
    assert reshard["status"] == "passed" and reshard["mismatches"] == []
    assert sorted(map(int, reshard["resumed"])) == list(range(3, 9))
    assert "TP2 -> TP1 x DP2" in reshard["rows"][0]["config"]

    nodes = _item(out, 6)
    assert nodes["status"] == "passed", nodes
    assert "NNODES=2 NODE_RANK=0" in nodes["rows"][0]["command"] and "NODE_RANK=1" in nodes["rows"][0]["command"]
