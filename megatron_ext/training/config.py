"""One run configuration: typed, frozen sections built once from the Megatron flags.

``RunConfig.from_args(args, world_size, plugins)`` reads the parsed flags (see
``arguments``), computes the derived values (data-parallel size, micro-batches per
step, the tag) in one place and checks what needs the world size. Each component
receives its section: the data layer ``DataConfig``, the optimizer and schedule
``OptimConfig``, the checkpointing ``CheckpointConfig``, the logger ``LoggingConfig``.
Plug-ins build their own sections from the same flags (``plugins[name]``).

Fields keep Megatron-LM's flag names (``--lr-decay-style`` -> ``lr_decay_style``), so a
field is found from the flag and the flag's help is its documentation.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional, Tuple

from megatron_ext.training.arguments import ArgsError
from megatron_ext.training.plan import TrainingPlan, build_plan


def _take(cls, args: argparse.Namespace, **derived):
    values = {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in derived}
    return cls(**values, **derived)


@dataclass(frozen=True)
class ModelConfig:
    """What the model is: a named config, the checkpoint's, or the architecture flags."""
    model: Optional[str]                      # --model
    num_layers: Optional[int]
    hidden_size: Optional[int]
    ffn_hidden_size: Optional[int]
    num_attention_heads: Optional[int]
    group_query_attention: bool
    num_query_groups: Optional[int]
    kv_channels: Optional[int]
    max_position_embeddings: Optional[int]
    rotary_base: Optional[float]
    use_rope_scaling: bool                    # LLaMA-3.1's rotary scaling (rope_scaling_factor, LLAMA31_ROPE_SCALING_FACTOR by default)
    rope_scaling_factor: Optional[float]
    norm_epsilon: Optional[float]
    make_vocab_size_divisible_by: Optional[int]
    untie_embeddings_and_output_weights: bool
    init_method_std: float
    normalization: Optional[str]
    position_embedding_type: Optional[str]
    use_rotary_position_embeddings: bool
    swiglu: bool
    disable_bias_linear: bool
    bf16: bool                                # params in bf16 (else fp32)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int
    distributed_backend: Optional[str]
    world_size: int = 1
    data_parallel_size: int = 1               # derived: world / TP


@dataclass(frozen=True)
class DataConfig:
    data_path: str                            # a blend string ("w prefix ...") or one prefix
    split: str
    data_cache_path: Optional[str]
    eval_data_path: Optional[str]
    tokenizer_type: Optional[str]             # None: the checkpoint's (resolved at start)
    tokenizer_model: Optional[str]
    legacy_tokenizer: bool
    seq_length: int
    eod_mask_loss: bool
    reset_position_ids: bool
    seed: int


@dataclass(frozen=True)
class OptimConfig:
    """Batch, iterations, AdamW and the learning-rate schedule. The batch fields are the first
    stage's (``RunConfig.plan`` has every stage's); ``lr``/``min_lr`` are after ``--lr-scaling``."""
    micro_batch_size: Optional[int]           # None: --micro-batch-size auto
    global_batch_size: int
    train_iters: int
    lr: float
    min_lr: float
    lr_decay_style: str
    lr_decay_iters: Optional[int]
    lr_warmup_iters: int
    lr_warmup_fraction: Optional[float]
    lr_warmup_init: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    clip_grad: float
    use_checkpoint_opt_param_scheduler: bool
    override_opt_param_scheduler: bool
    seed: int
    lr_scaling: Optional[str]
    lr_base_batch_size: Optional[int]
    memory_target_fraction: float
    memory_budget_gib: Optional[float]
    num_microbatches: int = 1                 # derived: global / (micro x DP); 0 until chosen (auto)
    lr_scale_factor: float = 1.0              # derived: what --lr-scaling multiplied --lr and --min-lr by


@dataclass(frozen=True)
class CheckpointConfig:
    load: Optional[str]
    save: Optional[str]
    save_interval: Optional[int]
    keep_last: Optional[int]
    no_save_optim: bool
    no_save_rng: bool
    no_load_optim: bool
    no_load_rng: bool
    finetune: bool
    enable_partial_load: bool
    exit_on_missing_checkpoint: bool
    save_best: bool


@dataclass(frozen=True)
class LoggingConfig:
    """Console, files, TensorBoard, evaluation cadence and stopping."""
    log_interval: int
    eval_interval: int
    eval_iters: int
    tensorboard_dir: Optional[str]
    tag: str
    log_dir: str
    log_num_zeros_in_grad: bool
    exit_interval: Optional[int]
    exit_signal_handler: bool
    eval_seq_length: Optional[int]
    early_stop_patience: Optional[int]
    early_stop_min_delta: float
    wandb_project: Optional[str]
    wandb_exp_name: Optional[str]
    wandb_save_dir: Optional[str]


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    parallel: ParallelConfig
    data: DataConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    plan: TrainingPlan
    plugins: Mapping[str, Any] = field(default_factory=dict)  # each active plug-in's own section
    flags: Tuple[Tuple[str, Any], ...] = ()                     # every flag as given, for checkpoint args

    @classmethod
    def from_args(cls, args: argparse.Namespace, world_size: int = 1,
                  plugin_sections: Optional[Mapping[str, Any]] = None) -> "RunConfig":
        """Build and check (what needs ``world_size``) the sections; ``args`` is not changed."""
        tp = args.tensor_model_parallel_size
        if world_size % tp:
            raise ArgsError(f"--tensor-model-parallel-size {tp} does not divide the number of processes {world_size}")
        dp = world_size // tp
        plan = build_plan(args, dp)
        first = plan.stages[0]
        gbs, mbs = first.global_batch_size, first.micro_batch_size
        lr, min_lr, factor = args.lr, args.min_lr, 1.0
        if args.lr_scaling is not None:
            ratio = gbs / args.lr_base_batch_size
            factor = ratio if args.lr_scaling == "linear" else math.sqrt(ratio)
            lr = args.lr * factor
            min_lr = 0.1 * lr if min_lr is None else min_lr * factor
        flags = tuple(sorted((k, list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                             if v is None or isinstance(v, (bool, int, float, str, list, tuple))))
        return cls(
            model=_take(ModelConfig, args),
            parallel=_take(ParallelConfig, args, world_size=world_size, data_parallel_size=dp),
            data=_take(DataConfig, args),
            optim=_take(OptimConfig, args, micro_batch_size=mbs, global_batch_size=gbs,
                        num_microbatches=first.num_microbatches(dp) if mbs is not None else 0,
                        lr=lr, min_lr=0.0 if min_lr is None else min_lr, lr_scale_factor=factor),
            checkpoint=_take(CheckpointConfig, args),
            logging=_take(LoggingConfig, args),
            plan=plan,
            plugins=dict(plugin_sections or {}),
            flags=flags,
        )

    def run_args(self) -> Dict[str, Any]:
        """Every flag (with derived values) as plain values: saved in checkpoints as Megatron's ``args``."""
        out = dict(self.flags)
        out.update(world_size=self.parallel.world_size, data_parallel_size=self.parallel.data_parallel_size,
                   global_batch_size=self.optim.global_batch_size, num_microbatches=self.optim.num_microbatches,
                   lr=self.optim.lr, min_lr=self.optim.min_lr)
        return out
