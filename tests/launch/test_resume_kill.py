"""kill -9 and resume, through the launcher, as after a machine failure.

One uninterrupted run of 8 iterations (a checkpoint after every iteration) is the reference.
A second run of the same job is killed (SIGKILL to every process of it, launcher, torchrun
and worker alike) right after an iteration, resumed with ``1``, killed again while it is
writing a checkpoint, and resumed again to the end:

* after each resume, the iterations continue from the checkpoint the tracker names, and
  every loss is bit-identical to the reference's for the same iteration;
* the kill inside a save is verified, not assumed: the whole run is frozen (SIGSTOP) as
  soon as a checkpoint's temporary directory appears, and killed only when the tracker
  still names the previous checkpoint (otherwise it is let go to the next save). The
  resume then loads that previous checkpoint, and the next save removes the leftover.
"""
import json
import os
import re
import time
from pathlib import Path

import pytest

from launching import TINY_TRAIN, Launch, clean_env, free_port

TRAIN_ITERS = 8
# Big enough that writing a checkpoint (weights and Adam state, ~40 MB) takes a while, small
# enough that an iteration takes well under a second on two cores.
MODEL_ARGS = "--model tiny --num-layers 2 --hidden-size 256 --ffn-hidden-size 1024 --num-attention-heads 4 " \
             "--num-query-groups 2"
TRACKER = "latest_checkpointed_iteration.txt"
TMP_DIR = re.compile(r"^\.iter_(\d{7})\.tmp$")


def _env(tmp_path: Path, save: Path, logs: str, prefix, tokenizer) -> dict:
    return clean_env(NPROC_PER_NODE=1, MEGATRON_EXT_FORCE_CPU=1, MASTER_PORT=free_port(),
                     LOG_DIR=tmp_path / "launcher", DATA_PREFIX=prefix, TOKENIZER_MODEL=tokenizer,
                     SAVE_DIR=save, LOG_DIR_RUN=tmp_path / logs, TRAIN_ITERS=TRAIN_ITERS, SAVE_INTERVAL=1,
                     MODEL_ARGS=MODEL_ARGS)


def _losses(log_dir: Path) -> dict:
    """{iteration: loss} from the run's metrics file (full float precision)."""
    (path,) = (log_dir / "tiny").glob("metrics-*.jsonl")
    return {r["iteration"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"}


def _tracker(save: Path) -> int:
    return int((save / TRACKER).read_text())


def _loaded_iteration(output: str) -> int:
    found = re.findall(r"^> loaded checkpoint from \S+/iter_(\d{7})", output, re.M)
    assert len(found) == 1, output
    return int(found[0])


def _kill_inside_a_save(run: Launch, save: Path, first: int, timeout: float) -> dict:
    """Freeze the run when the temporary directory of a checkpoint of iteration ``first`` or
    later appears; kill it there if the tracker still names an earlier checkpoint, else let
    it go on to the next save. (An earlier killed run may have left the temporary directory
    of the iteration after its last checkpoint: ``first`` skips it.)"""
    deadline = time.monotonic() + timeout
    tried = set()
    while time.monotonic() < deadline:
        if run.proc.poll() is not None:
            raise AssertionError(f"the run ended before a save could be interrupted (tried {sorted(tried)}):\n"
                                 f"{run.output}")
        try:
            names = os.listdir(save)
        except FileNotFoundError:
            names = []
        pending = [int(m.group(1)) for n in names if (m := TMP_DIR.match(n))]
        pending = [it for it in pending if it >= first and it not in tried]
        if not pending:
            time.sleep(0.001)
            continue
        it = pending[0]
        tried.add(it)
        run.freeze()
        tracker = _tracker(save)
        state = {"saving": it, "tracker": tracker, "tmp_exists": (save / f".iter_{it:07d}.tmp").exists(),
                 "final_exists": (save / f"iter_{it:07d}").exists()}
        if tracker < it:
            run.kill()
            return state
        run.thaw()   # too late: that save was complete; wait for the next one
    raise AssertionError(f"no save could be interrupted in {timeout}s (tried {sorted(tried)}):\n{run.output}")


@pytest.mark.slow  # four real launches of the trainer
def test_kill_9_and_resume_follow_the_uninterrupted_run(tmp_path, plays_prefix, sample_tokenizer):
    launches = []

    def launch(resume, save, logs, *extra):
        run = Launch(TINY_TRAIN, resume, _env(tmp_path, save, logs, plays_prefix, sample_tokenizer), *extra)
        launches.append(run)
        return run

    try:
        # the reference: 8 iterations in one go
        whole = launch(0, tmp_path / "whole", "logs_whole", "--keep-last", "2")
        assert whole.wait(timeout=400) == 0, whole.output
        reference = _losses(tmp_path / "logs_whole")
        assert sorted(reference) == list(range(1, TRAIN_ITERS + 1))

        save = tmp_path / "ckpt"
        # 1. kill -9 right after iteration 3 is logged
        first = launch(0, save, "logs_1", "--keep-last", "2")
        first.wait_for(lambda line: line.startswith(" iteration        3/"), timeout=400)
        assert first.kill() != 0
        killed_at = _tracker(save)
        assert 1 <= killed_at < TRAIN_ITERS
        part1 = _losses(tmp_path / "logs_1")
        assert part1 == {i: reference[i] for i in part1}

        # 2. resume with 1, then kill -9 inside a checkpoint save
        second = launch(1, save, "logs_2", "--keep-last", "2")
        state = _kill_inside_a_save(second, save, first=killed_at + 2, timeout=400)
        assert _loaded_iteration(second.output) == killed_at
        previous = _tracker(save)
        assert previous == state["tracker"] and previous < state["saving"], state
        part2 = _losses(tmp_path / "logs_2")
        assert min(part2) == killed_at + 1
        assert part2 == {i: reference[i] for i in part2}

        # 3. resume with 1 again: the previous checkpoint loads, the run ends where the reference did
        third = launch(1, save, "logs_3", "--keep-last", "2")
        assert third.wait(timeout=400) == 0, third.output
        assert _loaded_iteration(third.output) == previous
        part3 = _losses(tmp_path / "logs_3")
        assert sorted(part3) == list(range(previous + 1, TRAIN_ITERS + 1))
        assert part3 == {i: reference[i] for i in part3}      # bit-identical losses
        assert _tracker(save) == TRAIN_ITERS
        assert not [n for n in os.listdir(save) if TMP_DIR.match(n)]   # the leftover was removed
        assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == ["iter_0000007", "iter_0000008"]
    finally:
        for run in launches:
            run.cleanup()
