"""A generic trainer on megatron-core: Megatron-style flags, the loop, and its components.

It knows no sparsity: methods attach as plug-ins (``plugins.TrainerPlugin``), which the
entry point hands over (``megatron_ext.train`` wires MaskLLM). The pieces:

* ``arguments``: the flags (``parse_args(argv, plugins)``), ``ArgsError``;
* ``config``: ``RunConfig``, the frozen sections every component receives;
* ``plugins``: the plug-in interface;
* ``setup``: checkpoint to resume, tokenizer, model configuration;
* ``data``: the run's datasets and Megatron's pretraining sampler order;
* ``optimizer``: ``TrainOptimizer`` (fp32 gradient buffer, DP all-reduce, global-norm clip, AdamW);
* ``schedules``: ``LRSchedule``, ``ParamScheduler`` (megatron-core's semantics);
* ``evaluate``, ``reporting``: held-out loss, stdout / file / TensorBoard logs;
* ``loop``: ``Run``, ``pretrain``, ``TrainResult``.

Checkpoints (the training state included) are ``megatron_ext.checkpoint``'s.
"""
from megatron_ext.training.arguments import ArgsError, parse_args
from megatron_ext.training.config import RunConfig
from megatron_ext.training.loop import Run, TrainingError, TrainResult, pretrain
from megatron_ext.training.plugins import TrainerPlugin

__all__ = ["ArgsError", "Run", "RunConfig", "TrainResult", "TrainerPlugin", "TrainingError", "parse_args", "pretrain"]
