"""Training: Megatron-style flags, the loop, optimizer, schedules, checkpoints and logs.

``pretrain(argv)`` is the whole run (``pretrain_maskllm.py`` and
``python -m megatron_ext.train`` call it); the pieces are importable on their own:

* ``arguments``: ``parse_args``, ``validate_parallel``, ``ArgsError``;
* ``schedules``: ``LRSchedule``, ``ParamScheduler`` (megatron-core's semantics);
* ``optimizer``: ``TrainOptimizer`` (fp32 gradient buffer, DP all-reduce, global-norm clip, AdamW);
* ``checkpointing``: collective atomic saves with optimizer / RNG / data position, loading;
* ``data``: the run's datasets and Megatron's pretraining sampler order;
* ``evaluate``, ``reporting``: held-out loss, stdout / file / TensorBoard logs;
* ``loop``: ``Run``, ``pretrain``, ``TrainResult``.
"""
from megatron_ext.training.arguments import ArgsError, parse_args, validate_parallel
from megatron_ext.training.loop import Run, TrainingError, TrainResult, pretrain

__all__ = ["ArgsError", "Run", "TrainResult", "TrainingError", "parse_args", "pretrain", "validate_parallel"]
