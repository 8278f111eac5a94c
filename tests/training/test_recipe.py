"""The training recipe on the tiny LLaMA and the shipped sample (one process): curriculum stages
(data continued at each new length, micro-batches and LR per stage, resume mid-stage bit-exact),
Megatron's batch ramp, validation accuracy and the train/validation gap, early stopping and the
best checkpoint, ``--micro-batch-size auto`` under a memory budget, LR scaling with batch size."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_ext.checkpoint import find_checkpoint
from megatron_ext.train import Run, parse_args, pretrain
from megatron_ext.training.arguments import ArgsError
from megatron_ext.training.config import RunConfig
from megatron_ext.training.microbatch import MicroBatchError, MicroBatchSearch, divisors
from megatron_ext.training.plan import Stage, parse_tokens, step_batch_stages

STAGES = [
    {"iteration": 0, "seq_length": 32, "global_batch_size": 8, "lr_scale": 2.0},
    {"iteration": 2, "seq_length": 64, "global_batch_size": 4, "lr_scale": 1.0},
    {"iteration": 4, "seq_length": 48, "global_batch_size": 6, "lr_scale": 0.5},
]


def _curriculum(tmp_path: Path, stages=STAGES, name="stages.yaml") -> str:
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(stages))
    return str(path)


def _staged(make_argv, tmp_path, **flags):
    """A run of the three stages above: seq length from the stages, global batch from the stages."""
    return make_argv(curriculum=_curriculum(tmp_path), seq_length=None, global_batch_size=None, **flags)


# --------------------------------------------------------------------------- curriculum


MASK_ONLY = {"mask_only": True, "N": 2, "M": 4, "lr_mult": 10, "weight_reg": 1e-4}


@pytest.mark.parametrize("mask_only", [False, True], ids=["dense", "mask-only"])
def test_curriculum_runs_its_stages_and_resumes_mid_stage_bit_exact(make_argv, tmp_path, mask_only):
    flags = dict(train_iters=6, micro_batch_size=2, eval_interval=2, eval_iters=1, save_interval=3,
                 lr_decay_style="constant", lr_warmup_iters=0, **(MASK_ONLY if mask_only else {}))
    whole = pretrain(_staged(make_argv, tmp_path, save=str(tmp_path / "whole"), **flags))
    h = whole.history
    assert [r["seq_length"] for r in h] == [32, 32, 64, 64, 48, 48]
    assert [r["global_batch_size"] for r in h] == [8, 8, 4, 4, 6, 6]
    assert [r["stage"] for r in h] == [1, 1, 2, 2, 3, 3]
    # the LR is the schedule's (constant 3e-3) times the stage's scale
    assert [r["lr"] for r in h] == pytest.approx([6e-3, 6e-3, 3e-3, 3e-3, 1.5e-3, 1.5e-3])
    if mask_only:   # the Gumbel temperature follows the run's iterations across stages
        assert [r["tau"] for r in h] == pytest.approx([4.0 - 3.95 * t / 6 for t in range(6)])
    assert [r["tokens"] for r in h] == [256, 512, 768, 1024, 1312, 1600]
    assert whole.consumed_train_samples == 2 * 8 + 2 * 4 + 2 * 6
    # validation at the stage's length, on the same tokens each time; the end of training does
    # not evaluate again what iteration 6 just evaluated
    assert [(e["set"], e["iteration"], e["seq_length"]) for e in whole.evals] == [
        ("valid", 2, 32), ("valid", 4, 64), ("valid", 6, 48)]
    assert all(e["tokens"] >= 6 * 48 - 48 for e in whole.evals)       # one global batch of the last stage

    # stopped mid-stage 2 (iteration 3) and resumed: the same curve, every field
    first = pretrain(_staged(make_argv, tmp_path, save=str(tmp_path / "split"), exit_interval=3, **flags))
    assert first.iteration == 3 and first.history == h[:3]
    info = find_checkpoint(tmp_path / "split")
    training = info.extra["training"]
    assert training["stage"] == 2 and training["tokens_seen"] == 768
    assert [s["seq_length"] for s in training["plan"]["stages"]] == [32, 64, 48]
    second = pretrain(_staged(make_argv, tmp_path, save=str(tmp_path / "split"), load=str(tmp_path / "split"),
                              **flags))
    assert second.history == h[3:]
    key = lambda e: (e["set"], e["iteration"], e["loss"], e["accuracy"], e["gap"])  # noqa: E731
    assert [key(e) for e in first.evals + second.evals] == [key(e) for e in whole.evals]

    # a changed stage that was already trained is refused on resume, naming the file
    changed = [dict(s) for s in STAGES]
    changed[1]["lr_scale"] = 0.9
    argv = make_argv(curriculum=_curriculum(tmp_path, changed, "changed.yaml"), seq_length=None,
                     global_batch_size=None, load=str(tmp_path / "split"), **{**flags, "save_interval": None})
    with pytest.raises(ArgsError, match="stages trained up to iteration 6 differ"):
        pretrain(argv)


def test_the_eval_seq_length_series_has_every_evaluation_on_the_same_tokens(make_argv, tmp_path):
    """``--eval-seq-length 64`` gives ``valid@64`` at every evaluation, in the stage at that
    length too (one pass serving both series there), always on the same tokens."""
    result = pretrain(_staged(make_argv, tmp_path, train_iters=6, micro_batch_size=2, eval_interval=2,
                              eval_iters=1, eval_seq_length=64, lr_decay_style="constant", lr_warmup_iters=0))
    fixed = [e for e in result.evals if e["set"] == "valid@64"]
    assert [e["iteration"] for e in fixed] == [2, 4, 6]
    assert len({e["tokens"] for e in fixed}) == 1 and fixed[0]["tokens"] >= 6 * 48 - 48
    at4 = {e["set"]: e for e in result.evals if e["iteration"] == 4}
    assert set(at4) == {"valid", "valid@64"} and at4["valid"]["loss"] == at4["valid@64"]["loss"]
    assert [e["iteration"] for e in result.evals if e["set"] == "valid"] == [2, 4, 6]


def test_a_new_stage_continues_through_the_data(make_argv, tmp_path):
    """Stage 2's first sample starts where stage 1 stopped in the token stream, and a stage at the
    base length from the start of the data reads the dataset's own samples."""
    run = Run(parse_args(_staged(make_argv, tmp_path, train_iters=6, eval_iters=0)))
    try:
        base = run.datasets.train
        assert len(base[0]["tokens"]) == 64
        run.train_step()
        first_stage = run.train_stream.dataset
        np.testing.assert_array_equal(first_stage[0]["tokens"], base[0]["tokens"][:32])
        np.testing.assert_array_equal(first_stage[1]["tokens"], base[0]["tokens"][32:])
        np.testing.assert_array_equal(first_stage[1]["labels"], base[0]["labels"][32:])
        run.train_step()
        run.train_step()   # the first iteration of stage 2
        view = run.train_stream.dataset
        # 2 iterations x 8 samples x 32 tokens = 512 positions = base samples 0-7 consumed
        assert view.start == 512
        np.testing.assert_array_equal(view[0]["tokens"], base[8]["tokens"])
        np.testing.assert_array_equal(view[0]["labels"], base[8]["labels"])
        assert run.train_stream.consumed == 4
    finally:
        run.close()


def test_curriculum_file_errors_name_the_file_and_the_stage(make_argv, tmp_path):
    cases = [
        ([{"iteration": 0, "seq_length": 32, "global_batch_size": 8}], "stage 1: missing lr_scale"),
        ([{**STAGES[0]}, {**STAGES[1], "iteration": 0}], "stage 2: iteration 0 must be larger"),
        ([{**STAGES[0], "iteration": 5}], "stage 1: the first stage must start at iteration 0"),
        ([{**STAGES[0], "seq_length": 0}], "stage 1: seq_length must be an integer > 0"),
        ([{**STAGES[0], "lr_scale": -1}], "stage 1: lr_scale must be a number > 0"),
        ({"iteration": 0}, "expected a non-empty list of stages"),
    ]
    for i, (stages, message) in enumerate(cases):
        path = _curriculum(tmp_path, stages, f"bad{i}.yaml")
        with pytest.raises(ArgsError, match=message) as err:
            parse_args(make_argv(curriculum=path, seq_length=None, global_batch_size=None))
        assert path in str(err.value)
    with pytest.raises(ArgsError, match="leave the flag out"):
        parse_args(make_argv(curriculum=_curriculum(tmp_path), seq_length=None))
    with pytest.raises(ArgsError, match="shorter than the longest stage"):
        parse_args(make_argv(curriculum=_curriculum(tmp_path), seq_length=48, global_batch_size=None))


def test_a_global_batch_that_cannot_split_is_refused_before_the_run(make_argv, tmp_path):
    stages = [dict(STAGES[0]), {**STAGES[1], "global_batch_size": 21}]
    argv = make_argv(curriculum=_curriculum(tmp_path, stages), seq_length=None, global_batch_size=None)
    args = parse_args(argv)
    with pytest.raises(ArgsError, match=r"stage 2 \(from iteration 2\).*--global-batch-size 21 is not divisible by "
                                        r"--micro-batch-size 2 x data-parallel size 1"):
        RunConfig.from_args(args, world_size=1)
    auto = parse_args(argv[:argv.index("--micro-batch-size")] + ["--micro-batch-size", "auto"]
                      + argv[argv.index("--micro-batch-size") + 2:])
    RunConfig.from_args(auto, world_size=1)          # 21 = 21 x 1, 7 x 3, ...: auto can split it
    with pytest.raises(ArgsError, match="--global-batch-size 21 is not divisible by the data-parallel size 2"):
        RunConfig.from_args(auto, world_size=2)


def test_step_batch_size_schedule_is_a_curriculum_of_batches(make_argv):
    assert parse_tokens("250B", "f") == 250 * 10 ** 9 and parse_tokens("1.5M", "f") == 1_500_000
    assert parse_tokens("7", "f") == 7 and parse_tokens("2k", "f") == 2000
    with pytest.raises(ArgsError, match="not a token count"):
        parse_tokens("lots", "--step-batch-size-schedule")
    # Megatron's example: 768 until 250B tokens at seq 4096, then 1536
    stages = step_batch_stages("0:768 250B:1536", 4096)
    assert stages == [Stage(0, 4096, 768), Stage(math.ceil(250e9 / (768 * 4096)), 4096, 1536)]
    # on the sample: 4 x 64 tokens per iteration, 1000 tokens -> the batch doubles from iteration 4
    result = pretrain(make_argv(train_iters=6, global_batch_size=None, step_batch_size_schedule="0:4 1K:8",
                                eval_iters=0))
    assert [r["global_batch_size"] for r in result.history] == [4, 4, 4, 4, 8, 8]
    assert [r["seq_length"] for r in result.history] == [64] * 6
    for bad, message in (("4 1K:8", "not TOKENS:GLOBAL_BATCH"), ("1K:4", "the first threshold must be 0"),
                         ("0:4 1K:8 1K:16", "thresholds must increase")):
        with pytest.raises(ArgsError, match=message):
            RunConfig.from_args(parse_args(make_argv(global_batch_size=None, step_batch_size_schedule=bad)))


# --------------------------------------------------------------------------- validation


def test_evaluation_reports_accuracy_and_the_gap(make_argv, tempest_prefix, tmp_path):
    result = pretrain(make_argv(train_iters=8, eval_interval=4, eval_iters=2, eval_seq_length=32, lr=1e-2,
                                eval_data_path=[f"tempest={tempest_prefix}"], tag="acc"))
    sets = [(e["set"], e["iteration"]) for e in result.evals]
    assert sets[:4] == [("valid", 4), ("valid@32", 4), ("tempest", 4), ("tempest@32", 4)]
    for e in result.evals:
        assert 0.0 <= e["accuracy"] <= 1.0 and e["ppl"] == pytest.approx(math.exp(e["loss"]))
    at8 = {e["set"]: e for e in result.evals if e["when"] == "iteration 8"}
    assert at8["valid"]["accuracy"] > 0.02          # an untrained model: ~1/2000; it learns frequent tokens
    train = [r["loss"] for r in result.history if r["iteration"] > 4]
    assert at8["valid"]["gap"] == pytest.approx(at8["valid"]["loss"] - sum(train) / 4)
    # the fixed-length pass reads the same tokens every time
    assert at8["valid@32"]["tokens"] == [e for e in result.evals if e["set"] == "valid@32"][0]["tokens"]
    (metrics,) = result.log_dir.glob("metrics-*.jsonl")
    kinds = {json.loads(line)["kind"] for line in metrics.read_text().splitlines()}
    assert {"eval/valid", "eval/valid@32", "eval/tempest", "eval/tempest@32", "train"} <= kinds


def test_accuracy_is_the_share_of_arg_max_hits(make_argv):
    """The trainer's evaluation against a direct computation on the model's logits."""
    from megatron_ext.training.data import BatchStream
    from megatron_ext.training.evaluate import evaluate

    run = Run(parse_args(make_argv(train_iters=2, eval_iters=1)))
    try:
        ds = run.datasets.valid
        got = evaluate(run.model, BatchStream(ds, "valid", 0, 2, 1, 0), 2, 1, run.cfg.vocab_size)
        hits = count = 0
        nll = 0.0
        run.model.eval()
        with torch.no_grad():
            for i in range(4):
                s = ds[i]
                tokens = torch.from_numpy(s["tokens"])[None]
                logits = run.model(tokens, torch.from_numpy(s["position_ids"])[None], None)[0]
                labels = torch.from_numpy(s["labels"])
                # the arg-max over the real vocabulary; the loss is the training loss (Megatron's:
                # the softmax spans the padded rows too)
                hits += int((logits[:, :run.cfg.vocab_size].argmax(-1) == labels).sum())
                nll += float(torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
                count += len(labels)
        assert got["tokens"] == count
        assert got["accuracy"] == pytest.approx(hits / count)
        assert got["loss"] == pytest.approx(nll / count, rel=1e-4)
    finally:
        run.close()


# --------------------------------------------------------------------------- early stopping, best checkpoint


def test_early_stop_ends_the_run_with_a_checkpoint_and_survives_resume(make_argv, tmp_path):
    """An LR too small to move the loss: no evaluation improves by 0.01, so the run stops after
    ``patience`` evaluations, saves, and a resumed run keeps counting."""
    save = tmp_path / "ckpt"
    flags = dict(train_iters=20, lr=1e-9, min_lr=0.0, eval_interval=1, eval_iters=1, eval_seq_length=64,
                 early_stop_patience=2, early_stop_min_delta=0.01, save=str(save), save_best=True)
    result = pretrain(make_argv(**flags))
    assert result.stop_reason == "early_stop" and result.iteration == 3
    (log,) = result.log_dir.glob("train-*.log")
    assert "(early stop: 2 evaluations without the validation loss falling below" in log.read_text()
    assert find_checkpoint(save).iteration == 3
    monitored = [e["loss"] for e in result.evals if e["set"] == "valid@64"]
    best_iteration = 1 + int(np.argmin(monitored))
    assert result.best == {"loss": min(monitored), "iteration": best_iteration}
    best = find_checkpoint(save / "best")
    assert best.iteration == best_iteration
    assert best.extra["training"]["early_stop"]["best"]["loss"] == min(monitored)
    # resumed with more patience left at the same count: stops one evaluation later
    resumed = pretrain(make_argv(**{**flags, "early_stop_patience": 3}, load=str(save)))
    assert resumed.start_iteration == 3 and resumed.stop_reason == "early_stop" and resumed.iteration == 4


def test_save_best_follows_the_lowest_validation_loss(make_argv, tmp_path):
    save = tmp_path / "ckpt"
    result = pretrain(make_argv(train_iters=6, lr_decay_iters=8, eval_interval=2, eval_iters=1, eval_seq_length=64,
                                save=str(save), save_best=True, save_interval=100))
    monitored = {e["iteration"]: e["loss"] for e in result.evals if e["set"] == "valid@64"}
    best_iteration = min(monitored, key=monitored.get)
    assert find_checkpoint(save / "best").iteration == best_iteration == result.best["iteration"]
    assert sorted(p.name for p in (save / "best").iterdir() if p.name.startswith("iter_")) == \
        [f"iter_{best_iteration:07d}"]
    # the best checkpoint is a checkpoint like any other: training resumes from it
    again = pretrain(make_argv(train_iters=best_iteration + 1, lr_decay_iters=8, load=str(save / "best"),
                               eval_iters=0))
    assert again.start_iteration == best_iteration and again.iteration == best_iteration + 1


# --------------------------------------------------------------------------- auto micro-batch


def test_micro_batch_search_takes_the_largest_divisor_under_the_budget():
    seen = []

    def probe(seq, micro):
        seen.append(micro)
        return 1000 + 100 * micro * seq // 64

    search = MicroBatchSearch(probe, budget=1000 + 100 * 6)
    assert search.choose(64, 21) == 3 and divisors(21) == [1, 3, 7, 21]
    assert seen == [1, 3]                      # the line through 1 and 3 rules out 7 and 21 unprobed
    assert MicroBatchSearch(probe, budget=10 ** 9).choose(64, 12) == 12
    with pytest.raises(MicroBatchError, match="a micro-batch of 1 at sequence length 64 peaks at"):
        MicroBatchSearch(probe, budget=500).choose(64, 4)


def test_auto_micro_batch_respects_the_budget_and_keeps_the_loss_curve(make_argv):
    flags = dict(train_iters=3, global_batch_size=4, eval_iters=0)
    run = Run(parse_args(make_argv(micro_batch_size="auto", memory_budget_gib=64, **flags)))
    try:
        assert run.plan.stages[0].micro_batch_size == 4       # a large budget: the whole global batch
        probes = run.micro_batch_probes
        auto_history = run.train().history
    finally:
        run.close()
    p1, p2 = probes[(64, 1)], probes[(64, 2)]
    assert 0 < p1 < p2, probes                             # activations grow with the micro-batch
    tight = (p1 + p2) / 2 / 2 ** 30
    run = Run(parse_args(make_argv(micro_batch_size="auto", memory_budget_gib=tight, **flags)))
    try:
        assert run.plan.stages[0].micro_batch_size == 1
    finally:
        run.close()
    for mb in (1, 2):
        history = pretrain(make_argv(micro_batch_size=mb, **flags)).history
        for a, b in zip(history, auto_history):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["lr"] == b["lr"]


def test_auto_micro_batch_is_chosen_per_stage_and_kept_on_resume(make_argv, tmp_path):
    save = tmp_path / "ckpt"
    argv = _staged(make_argv, tmp_path, train_iters=6, micro_batch_size="auto", memory_budget_gib=64, eval_iters=0,
                   save=str(save), save_interval=3)
    first = pretrain(argv + ["--exit-interval", "3"])
    assert [s.micro_batch_size for s in first.plan.stages] == [8, 4, 6]
    saved = find_checkpoint(save).extra["training"]["plan"]["stages"]
    assert [s["micro_batch_size"] for s in saved] == [8, 4, 6]
    second = pretrain(argv + ["--load", str(save)])
    assert [s.micro_batch_size for s in second.plan.stages] == [8, 4, 6] and second.iteration == 6


def test_auto_micro_batch_probes_a_stage_first_reached_on_resume(make_argv, tmp_path):
    """A run that stops before stage 3 leaves its micro-batch open; resumed with more
    iterations, stage 3 is probed and the stages already chosen keep their choice."""
    save = tmp_path / "ckpt"
    flags = dict(micro_batch_size="auto", memory_budget_gib=64, eval_iters=0, save=str(save), save_interval=3,
                 lr_decay_iters=6)
    first = pretrain(_staged(make_argv, tmp_path, train_iters=3, **flags))
    assert [s.micro_batch_size for s in first.plan.stages] == [8, 4, None]
    saved = find_checkpoint(save).extra["training"]["plan"]["stages"]
    assert [s["micro_batch_size"] for s in saved] == [8, 4, None]
    second = pretrain(_staged(make_argv, tmp_path, train_iters=6, load=str(save), **flags))
    assert [s.micro_batch_size for s in second.plan.stages] == [8, 4, 6] and second.iteration == 6
    assert [r["global_batch_size"] for r in second.history] == [4, 6, 6]


# --------------------------------------------------------------------------- LR scaling


def test_lr_scaling_with_batch_size(make_argv):
    def optim(**flags):
        return RunConfig.from_args(parse_args(make_argv(**flags))).optim

    o = optim(global_batch_size=16, lr=1e-3, min_lr=None, lr_scaling="linear", lr_base_batch_size=4)
    assert o.lr == pytest.approx(4e-3) and o.min_lr == pytest.approx(4e-4) and o.lr_scale_factor == 4
    o = optim(global_batch_size=16, lr=1e-3, min_lr=2e-4, lr_scaling="sqrt", lr_base_batch_size=4)
    assert o.lr == pytest.approx(2e-3) and o.min_lr == pytest.approx(4e-4)
    assert optim(lr=1e-3, min_lr=None).min_lr == 0.0       # Megatron's default without scaling
    with pytest.raises(ArgsError, match="--lr-scaling linear needs --lr-base-batch-size"):
        optim(lr_scaling="linear")
    with pytest.raises(ArgsError, match="--lr-base-batch-size needs --lr-scaling"):
        optim(lr_base_batch_size=4)
    result = pretrain(make_argv(train_iters=2, global_batch_size=8, lr=1e-3, min_lr=None, lr_scaling="sqrt",
                                lr_base_batch_size=2, lr_warmup_iters=1, lr_decay_style="cosine", eval_iters=0))
    assert result.history[1]["lr"] == pytest.approx(2e-3)     # peak after one warmup iteration: 1e-3 x sqrt(4)
