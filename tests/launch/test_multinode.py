"""Multi-node launch for real: two run_maskllm_native.sh processes on this machine, node
ranks 0 and 1 of NNODES=2 with one process each, rendezvous at MASTER_ADDR:MASTER_PORT and
train the tiny LLaMA as one data-parallel job over gloo.

That they form one job, and not two single-process runs, shows in what only a world of
two can do: rank 0 reports TP=1 DP=2 with one micro-batch of 2 per global batch of 4 (the
other two samples of every global batch are node 1's), node 1 prints nothing of its own
(only the first process logs), and both launchers finish with status 0 on the same
checkpoint.
"""
import json
import re

import pytest

from launching import TINY_TRAIN, Launch, clean_env, free_port


@pytest.mark.slow  # two real launches of the trainer, together
def test_two_launchers_form_one_job_and_train(tmp_path, plays_prefix, sample_tokenizer):
    port = free_port()
    save = tmp_path / "ckpt"
    runs = []
    try:
        for node_rank in (0, 1):
            env = clean_env(NNODES=2, NODE_RANK=node_rank, NPROC_PER_NODE=1, MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=port, MEGATRON_EXT_FORCE_CPU=1, LOG_DIR=tmp_path / f"launcher{node_rank}",
                            DATA_PREFIX=plays_prefix, TOKENIZER_MODEL=sample_tokenizer, SAVE_DIR=save,
                            LOG_DIR_RUN=tmp_path / "logs", TRAIN_ITERS=4, SAVE_INTERVAL=4,
                            MICRO_BATCH_SIZE=2, GLOBAL_BATCH_SIZE=4)
            runs.append(Launch(TINY_TRAIN, 0, env))
        status = [run.wait(timeout=400) for run in runs]
        out0, out1 = runs[0].output, runs[1].output
        assert status == [0, 0], f"node 0:\n{out0}\nnode 1:\n{out1}"
    finally:
        for run in runs:
            run.cleanup()

    for node_rank, out in enumerate((out0, out1)):
        assert f"processes  2 node(s) x 1 per node (node rank {node_rank}, master 127.0.0.1:{port})" in out
    assert "> 2 process(es): TP=1 DP=2, 1 micro-batch(es) of 2 per global batch of 4" in out0
    iterations = re.findall(r"^ iteration +(\d+)/ +4 \| consumed samples: +(\d+) \|", out0, re.M)
    assert iterations == [("1", "4"), ("2", "8"), ("3", "12"), ("4", "16")]
    assert "iteration" not in out1 and "> 2 process(es)" not in out1
    assert "> saved checkpoint at iteration 4" in out0
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    info = json.loads((save / "iter_0000004" / "checkpoint.json").read_text())
    assert info["training"]["consumed_train_samples"] == 16
    (metrics,) = (tmp_path / "logs" / "tiny").glob("metrics-*.jsonl")
    losses = [r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if r["kind"] == "train"]
    assert len(losses) == 4 and all(0 < l < 10 for l in losses)
