"""Learning-rate schedule: closed forms at warmup end, mid-decay and the end, and megatron-core's
``OptimizerParamScheduler`` as the oracle over whole runs."""
import math

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ext.train import parse_args
from megatron_ext.training.config import RunConfig
from megatron_ext.training.schedules import LRSchedule, ParamScheduler, ScheduleError, lr_schedule

MAX, MIN, GBS = 3e-4, 3e-5, 8
WARMUP_ITERS, TRAIN_ITERS = 10, 110


def _schedule(style):
    return LRSchedule(max_lr=MAX, min_lr=MIN, warmup_steps=WARMUP_ITERS * GBS, decay_steps=TRAIN_ITERS * GBS,
                      decay_style=style)


@pytest.mark.parametrize("style", ["cosine", "linear"])
def test_closed_forms_at_warmup_end_mid_decay_and_end(style):
    s = _schedule(style)
    warm, decay = WARMUP_ITERS * GBS, TRAIN_ITERS * GBS
    assert s.lr(0) == 0.0
    assert s.lr(warm // 2) == pytest.approx(MAX / 2, rel=1e-12)
    assert s.lr(warm) == pytest.approx(MAX, rel=1e-12)                    # warmup end
    mid = warm + (decay - warm) // 2
    assert s.lr(mid) == pytest.approx((MAX + MIN) / 2, rel=1e-12)         # both styles cross the middle there
    quarter = warm + (decay - warm) // 4
    expected_quarter = (MIN + (MAX - MIN) * 0.75 if style == "linear"
                        else MIN + (MAX - MIN) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s.lr(quarter) == pytest.approx(expected_quarter, rel=1e-12)
    assert s.lr(decay) == pytest.approx(MIN, rel=1e-12)                   # the end
    assert s.lr(decay + GBS) == MIN                                       # held after


def test_constant_and_group_multipliers():
    s = LRSchedule(max_lr=MAX, min_lr=MIN, warmup_steps=0, decay_steps=100, decay_style="constant")
    assert s.lr(0) == s.lr(50) == s.lr(1000) == MAX
    cos = _schedule("cosine")
    assert cos.lr(TRAIN_ITERS * GBS, max_lr=10 * MAX, min_lr=10 * MIN) == pytest.approx(10 * MIN)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_matches_megatron_core_scheduler_step_by_step(style, warmup):
    """Two groups, one with ``--lr-mult`` style overrides and no weight decay, stepped by the
    global batch as Megatron-LM does, past the end of the decay."""
    gbs, iters = 4, 20
    groups = lambda: [{"params": [torch.nn.Parameter(torch.zeros(2))]},  # noqa: E731
                      {"params": [torch.nn.Parameter(torch.zeros(2))], "max_lr": 10 * MAX, "min_lr": 10 * MIN,
                       "wd_mult": 0.0}]
    ref_opt = torch.optim.AdamW(groups(), lr=MAX)
    ref = OptimizerParamScheduler(ref_opt, init_lr=0.0, max_lr=MAX, min_lr=MIN, lr_warmup_steps=warmup * gbs,
                                  lr_decay_steps=iters * gbs, lr_decay_style=style, start_wd=0.1, end_wd=0.1,
                                  wd_incr_steps=iters * gbs, wd_incr_style="constant")
    opt = torch.optim.AdamW(groups(), lr=MAX)
    ours = ParamScheduler(opt, LRSchedule(MAX, MIN, warmup * gbs, iters * gbs, style), 0.1)
    for _ in range(iters + 3):
        for mine, theirs in zip(opt.param_groups, ref_opt.param_groups):
            assert mine["lr"] == theirs["lr"]
            assert mine["weight_decay"] == theirs["weight_decay"]
        ours.step(gbs)
        ref.step(gbs)


def test_state_dict_round_trip_and_mismatch_policies():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=MAX)
    a = ParamScheduler(opt, _schedule("cosine"), 0.0)
    a.step(37)
    state = a.state_dict()
    b = ParamScheduler(opt, _schedule("cosine"), 0.0)
    b.load_state_dict(state)
    assert b.num_steps == 37 and opt.param_groups[0]["lr"] == _schedule("cosine").lr(37)
    other = ParamScheduler(opt, _schedule("linear"), 0.0)
    with pytest.raises(ScheduleError, match="decay_style.*--override-opt_param-scheduler"):
        other.load_state_dict(state)
    other.load_state_dict(state, policy="override")
    assert other.schedule.decay_style == "linear" and other.num_steps == 37
    other.load_state_dict(state, policy="checkpoint")
    assert other.schedule.decay_style == "cosine"


def test_invalid_schedules_are_rejected():
    with pytest.raises(ScheduleError, match="warmup steps"):
        LRSchedule(MAX, MIN, warmup_steps=100, decay_steps=100, decay_style="cosine")
    with pytest.raises(ScheduleError, match="--min-lr"):
        LRSchedule(MAX, 2 * MAX, warmup_steps=0, decay_steps=100, decay_style="cosine")


def test_schedule_lengths_come_from_iterations_times_global_batch(make_argv):
    args = parse_args(make_argv(train_iters=50, lr_warmup_iters=5, global_batch_size=8, lr_decay_iters=40))
    s = lr_schedule(RunConfig.from_args(args, world_size=1).optim)
    assert (s.warmup_steps, s.decay_steps, s.decay_style) == (40, 320, "cosine")
    args = parse_args(make_argv(train_iters=50, lr_warmup_iters=0, lr_warmup_fraction=0.1))
    assert lr_schedule(RunConfig.from_args(args, world_size=1).optim).warmup_steps == pytest.approx(0.1 * 50 * 4)
