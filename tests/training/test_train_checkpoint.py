"""Training checkpoints: what they hold, --keep-last, a crash in the middle of a save,
--no-save-optim, and --finetune for incremental mask learning from a one-shot prior."""
import io
import json

import pytest
import torch

from megatron_ext.checkpoint import TRACKER_FILE, CheckpointError, load_checkpoint, read_checkpoint_info
from megatron_ext.sparsity import extract_hard_masks, model_hard_masks
from megatron_ext.sparsity.nm import check_nm
from megatron_ext.sparsity.oneshot import PruneOptions, prune_checkpoint
from megatron_ext.train import Run, parse_args, pretrain
from megatron_ext.checkpoint import list_iterations


def test_mask_checkpoints_keep_last_and_are_read_by_the_tools(make_argv, tmp_path):
    save = tmp_path / "masks"
    result = pretrain(make_argv(train_iters=3, mask_only=True, save=str(save), save_interval=1, keep_last=2,
                                lr_mult=10, eval_iters=0))
    assert [p.name for p in result.checkpoints] == ["iter_0000001", "iter_0000002", "iter_0000003"]
    assert list_iterations(save) == [2, 3]
    assert (save / TRACKER_FILE).read_text().strip() == "3"
    assert not list(save.glob(".*"))                                   # no temporary leftovers
    info, sds = load_checkpoint(save)                                  # the models' reader
    assert info.iteration == 3 and info.tokenizer_type == "Llama2Tokenizer"
    assert (info.tokenizer_dir / "tokenizer.model").is_file()
    assert info.extra["sparsity"]["N"] == 2 and info.extra["sparsity"]["mask_only"] is True
    assert info.extra["training"]["consumed_train_samples"] == 12
    masks = extract_hard_masks(sds[0])
    assert len(masks) == 4 * info.config.num_layers
    assert all(check_nm(m, 2, 4) for m in masks.values())
    payload = torch.load(info.shard_path(0), weights_only=True)
    assert {"model", "optimizer", "opt_param_scheduler", "rng_state", "train_state", "args"} <= set(payload)
    assert payload["opt_param_scheduler"]["num_steps"] == 12 and payload["args"]["mask_only"] is True
    trained = {k for k in payload["optimizer"]["param_names"]}
    assert trained and all(k.endswith("mask_logits") for k in trained)


def test_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(make_argv, tmp_path, monkeypatch):
    save = tmp_path / "ckpt"
    flags = dict(train_iters=3, save=str(save), save_interval=1, eval_iters=0)
    pretrain(make_argv(exit_interval=1, **flags))
    real_save = torch.save

    def disk_full(obj, f, *a, **kw):
        buf = io.BytesIO()
        real_save(obj, buf, *a, **kw)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])           # half the file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        pretrain(make_argv(load=str(save), **flags))
    monkeypatch.setattr(torch, "save", real_save)
    assert (save / TRACKER_FILE).read_text().strip() == "1"
    assert list_iterations(save) == [1] and not list(save.glob(".iter_*"))
    load_checkpoint(save)
    again = pretrain(make_argv(load=str(save), **flags))
    assert again.start_iteration == 1 and again.iteration == 3 and list_iterations(save) == [1, 2, 3]


def test_checkpoint_without_optimizer_state_needs_no_load_optim(make_argv, tmp_path):
    save = tmp_path / "ckpt"
    pretrain(make_argv(train_iters=2, save=str(save), no_save_optim=True, eval_iters=0))
    payload = torch.load(read_checkpoint_info(save).shard_path(0), weights_only=True)
    assert "optimizer" not in payload
    with pytest.raises(CheckpointError, match="no optimizer state .* pass --no-load-optim"):
        pretrain(make_argv(train_iters=3, load=str(save), eval_iters=0))
    resumed = pretrain(make_argv(train_iters=3, load=str(save), no_load_optim=True, eval_iters=0))
    assert resumed.start_iteration == 2 and [r["iteration"] for r in resumed.history] == [3]
    # the learning rate continues where the run left off (step 2 x global batch 4)
    assert resumed.history[0]["lr"] == pytest.approx(3e-4 + (3e-3 - 3e-4) * 0.5 * (1 + torch.cos(
        torch.tensor(torch.pi * (8 - 4) / (12 - 4))).item()))


def test_finetune_learns_masks_from_a_one_shot_prior_and_continues_incrementally(
        make_argv, tmp_path, tempest_prefix):
    dense = tmp_path / "dense"
    pretrain(make_argv(train_iters=2, save=str(dense), eval_iters=0))
    oneshot = tmp_path / "oneshot"
    prune_checkpoint(dense, oneshot, PruneOptions("magnitude", 2, 4))
    prior = extract_hard_masks(load_checkpoint(oneshot)[1][0])

    # "0" mode: weights from the dense checkpoint, masks from the prior, everything else fresh
    argv = make_argv(train_iters=2, load=str(dense), finetune=True, mask_only=True, prior_mask=str(oneshot),
                     prior_strength=20.0, lr_mult=10, eval_iters=0, save=str(tmp_path / "masks"))
    run = Run(parse_args(argv))
    try:
        assert run.iteration == 0 and run.consumed_train == 0
        learned = {k: v.cpu() for k, v in model_hard_masks(run.model).items()}
        assert sorted(learned) == sorted(prior)
        assert all(torch.equal(learned[k], prior[k]) for k in prior)    # a strong prior decides the argmax
        dense_sd = load_checkpoint(dense)[1][0]
        assert torch.equal(run.model.state_dict()["decoder.layers.0.mlp.linear_fc1.weight"].cpu(),
                           dense_sd["decoder.layers.0.mlp.linear_fc1.weight"])
        first = run.train()
    finally:
        run.close()
    assert first.iteration == 2
    logits = {k: v for k, v in load_checkpoint(tmp_path / "masks")[1][0].items() if k.endswith("mask_logits")}

    # incremental: start from the learned masks on new data with new schedules, iteration 0 again
    argv = make_argv(train_iters=3, load=str(tmp_path / "masks"), finetune=True, mask_only=True,
                     data_path=tempest_prefix, split="100,0,0", gumbel_temperature_range=[1.0, 0.1], lr_mult=5,
                     eval_iters=0)
    run = Run(parse_args(argv))
    try:
        assert run.iteration == 0 and run.plugin("sparsity").state.tau_range == (1.0, 0.1)
        sd = run.model.state_dict()
        assert all(torch.equal(sd[k].cpu(), v) for k, v in logits.items())
        assert run.optimizer.adam.state == {}
    finally:
        run.close()

    # a checkpoint from the tools (no training state) is a starting point even without --finetune;
    # the one-shot checkpoint's hard_mask entries are skipped
    run = Run(parse_args(make_argv(train_iters=1, lr_warmup_iters=0, load=str(oneshot), mask_only=True,
                                   eval_iters=0)))
    run.close()
    assert run.iteration == 0 and run.optimizer.adam.state == {}
    # a mask checkpoint cannot silently become a dense run
    with pytest.raises(CheckpointError, match="has mask logits .* but this model is dense"):
        Run(parse_args(make_argv(train_iters=1, lr_warmup_iters=0, load=str(tmp_path / "masks"), finetune=True,
                                 eval_iters=0)))
    # resuming a dense checkpoint as a mask run needs --finetune / --enable-partial-load
    with pytest.raises(CheckpointError, match="no mask logits .* --enable-partial-load"):
        Run(parse_args(make_argv(train_iters=3, load=str(dense), mask_only=True, eval_iters=0)))
    info = json.loads((tmp_path / "masks" / "iter_0000002" / "checkpoint.json").read_text())
    assert info["sparsity"]["method"] == "maskllm" and info["training"]["iteration"] == 2
