"""scripts/incremental/smollm2_135m_mask_only_python_docs.sh, checked under DRY_RUN=1: the
SmolLM2 version of the 7B incremental launch (same flags, sizes scaled) starts from the
general run's masks, which are also its prior, and evaluates the general validation set
beside the domain's split at every interval."""
import os
import shlex

import pytest

from launching import REPO, clean_env, run_bash

SCRIPT = REPO / "scripts" / "incremental" / "smollm2_135m_mask_only_python_docs.sh"


def _trainer_args(res):
    assert res.returncode == 0, res.stdout + res.stderr
    words = [shlex.split(w)[0] if w else "" for w in res.stdout.split("torchrun:\n", 1)[1].splitlines()]
    at = next(i for i, w in enumerate(words) if w.endswith("pretrain_maskllm.py"))
    return words[at + 1:]


@pytest.fixture
def mask_checkpoint(tmp_path):
    """A directory the scripts' checks take for a checkpoint (DRY_RUN never reads it)."""
    ckpt = tmp_path / "general_masks"
    ckpt.mkdir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("192")
    return ckpt


def _data_home(tmp_path, plays_prefix):
    home = tmp_path / "data"
    home.mkdir()
    for name in ("python_docs_train_text_document", "general_val_text_document"):
        for ext in (".bin", ".idx"):
            os.symlink(plays_prefix + ext, home / f"{name}{ext}")
    return home


def test_the_domain_run_starts_from_the_general_masks_and_evaluates_both_sets(tmp_path, plays_prefix,
                                                                               mask_checkpoint):
    from megatron_ext.train import parse_args

    home = _data_home(tmp_path, plays_prefix)
    env = clean_env(DRY_RUN=1, DATA_HOME=home, GENERAL_MASK_CKPT=mask_checkpoint, RUN_DIR=tmp_path / "run",
                    MEGATRON_EXT_BACKEND="nccl")
    args = parse_args(_trainer_args(run_bash(SCRIPT, 0, "--eval-iters", "3", env=env)))
    assert args.data_path == f"1.0 {home}/python_docs_train_text_document"
    assert args.eval_data_path == f"{home}/general_val_text_document"
    assert args.load == str(mask_checkpoint) and args.finetune
    assert (args.prior_mask, args.prior_strength) == (None, None)    # the learned logits as they are
    assert (args.model, args.seq_length, args.global_batch_size, args.train_iters, args.lr_warmup_iters) == \
        ("smollm2-135m", 1024, 32, 64, 6)
    assert (args.lr, args.min_lr, args.eval_interval, args.bf16) == (2e-5, 2e-6, 8, True)
    assert args.gumbel_temperature_range == (2.0, 0.05) and args.mask_only and args.weight_reg == 1e-5
    assert args.eval_iters == 3                     # extra arguments reach the trainer, last


def test_the_domain_run_resumes_its_own_checkpoint(tmp_path, plays_prefix, mask_checkpoint):
    from megatron_ext.train import parse_args

    home = _data_home(tmp_path, plays_prefix)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.symlink(mask_checkpoint, run_dir / "ckpt")
    env = clean_env(DRY_RUN=1, DATA_HOME=home, GENERAL_MASK_CKPT=mask_checkpoint, RUN_DIR=run_dir)
    args = parse_args(_trainer_args(run_bash(SCRIPT, 1, env=env)))
    assert args.load == f"{run_dir}/ckpt" and not args.finetune and args.exit_on_missing_checkpoint


def test_missing_inputs_are_named_and_nothing_is_launched(tmp_path):
    env = clean_env(DRY_RUN=1, DATA_HOME=tmp_path / "nodata", GENERAL_MASK_CKPT=tmp_path / "nockpt",
                    RUN_DIR=tmp_path / "run")
    res = run_bash(SCRIPT, 0, env=env)
    assert res.returncode == 1 and "torchrun:" not in res.stdout
    for variable, path in (("DATA_HOME", tmp_path / "nodata"), ("EVAL_DATA_PATH", tmp_path / "nodata"),
                           ("GENERAL_MASK_CKPT", tmp_path / "nockpt")):
        assert any(variable in l and str(path) in l for l in res.stderr.splitlines()), res.stderr
    assert not (tmp_path / "run").exists()


def test_a_prior_strength_reinjects_the_general_masks(tmp_path, plays_prefix, mask_checkpoint):
    from megatron_ext.train import parse_args

    home = _data_home(tmp_path, plays_prefix)
    env = clean_env(DRY_RUN=1, DATA_HOME=home, GENERAL_MASK_CKPT=mask_checkpoint, RUN_DIR=tmp_path / "run",
                    MEGATRON_EXT_BACKEND="nccl", PRIOR_STRENGTH="3")
    args = parse_args(_trainer_args(run_bash(SCRIPT, 0, env=env)))
    assert (args.prior_mask, args.prior_strength) == (str(mask_checkpoint), 3.0)
