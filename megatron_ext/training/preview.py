"""What a run will do, from its flags alone: per-iteration learning rate, sequence length,
global batch, tokens and each plug-in's schedules (``tools/plot_schedule.py``).

The values are the trainer's own: the learning rate is ``schedules.lr_schedule`` at the
step the trainer reaches before iteration ``k`` (samples of the global batch, or one per
iteration for a staged plan) times the stage's ``lr_scale``; the plug-ins answer
``TrainerPlugin.schedules``. Nothing is built or read but the flags (and a
``--curriculum`` file).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

from megatron_ext.training.config import RunConfig
from megatron_ext.training.plugins import TrainerPlugin
from megatron_ext.training.schedules import lr_schedule


def planned_curves(config: RunConfig, plugins: Sequence[TrainerPlugin] = ()) -> Dict[str, Any]:
    """``{"iteration": [1..T], "lr": [...], "seq_length": [...], "global_batch_size": [...],
    "tokens": [...], "stage": [...], "plugins": {name: [...]}, "plan": the plan's record
    (as the trainer logs it: ``plotting.stage_boundaries`` reads it)}``."""
    plan, o = config.plan, config.optim
    unit = 1 if plan.staged else plan.stages[0].global_batch_size
    schedule = lr_schedule(o, unit)
    out: Dict[str, Any] = {k: [] for k in ("iteration", "lr", "seq_length", "global_batch_size", "tokens", "stage")}
    extra: Dict[str, List[float]] = {}
    steps = 0
    for t in range(o.train_iters):
        index = plan.index_at(t)
        stage = plan.stages[index]
        out["iteration"].append(t + 1)
        out["lr"].append(stage.lr_scale * schedule.lr(steps))
        out["seq_length"].append(stage.seq_length)
        out["global_batch_size"].append(stage.global_batch_size)
        out["tokens"].append(plan.tokens_at(t + 1))
        out["stage"].append(index + 1)
        for plugin in plugins:
            for name, value in plugin.schedules(t, o.train_iters).items():
                extra.setdefault(name, []).append(value)
        steps += unit
    out["plugins"] = extra
    out["plan"] = plan.to_record()
    return out


__all__ = ["planned_curves"]
