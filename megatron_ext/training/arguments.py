"""Command-line arguments of the trainer, under Megatron-LM's flag names.

A Megatron-LM / MaskLLM launch script ports by copy: the flags it uses are either
implemented, or accepted because they describe what our models always are (LLaMA:
RMSNorm, SwiGLU, rotary embeddings, no biases) or a kernel choice with no effect
here. Anything else fails at start, naming the flag.

``parse_args(argv, plugins)`` does the syntax and every check that needs no process
group, for the trainer's flags and each plug-in's group; ``config.RunConfig.from_args``
adds the data-parallel size and the checks that depend on it. Both raise ``ArgsError``
(an ``InputError``) naming the flag.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional, Sequence

from megatron_ext.errors import InputError
from megatron_ext.data.tokenizers import TOKENIZER_TYPES
from megatron_ext.models.config import LLAMA31_ROPE_SCALING_FACTOR

# Flags a Megatron-LM script may carry that select kernels or runtime details we do not
# have (or always use); accepted so such scripts run unchanged, and ignored.
NO_EFFECT_FLAGS = (
    "--no-masked-softmax-fusion", "--no-rope-fusion", "--use-flash-attn", "--no-gradient-accumulation-fusion",
    "--no-async-tensor-model-parallel-allreduce", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
    "--no-bias-gelu-fusion", "--use-mcore-models", "--log-diff-mask", "--no-load-rng-tracker-states",
    "--use-distributed-optimizer", "--overlap-grad-reduce", "--log-throughput", "--log-timers-to-tensorboard",
    "--log-validation-ppl-to-tensorboard", "--log-memory-to-tensorboard",
)
# Architecture flags: LLaMA is what we build; the flag may state it, not change it.
ARCH_SWITCHES = ("--swiglu", "--disable-bias-linear", "--use-rotary-position-embeddings", "--no-position-embedding")

DEFAULT_LOG_DIR = os.path.join("output", "logs")


class ArgsError(InputError):
    """A bad or conflicting command-line flag (the message names it)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises ``ArgsError`` instead of exiting, so callers and tests see the message."""

    def error(self, message):  # noqa: D401 - argparse API
        raise ArgsError(message)


def micro_batch_size_arg(text: str):
    """``--micro-batch-size``: a positive integer, or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def build_parser(plugins: Sequence[type] = (), prog: str = "pretrain_maskllm.py") -> argparse.ArgumentParser:
    """The trainer's flags, then each plug-in's group."""
    p = _Parser(prog=prog, allow_abbrev=False,
                description="Train LLaMA models on megatron-core: dense (pre)training, fine-tuning and "
                            "MaskLLM learnable N:M sparsity, with Megatron-LM's flag names.")

    g = p.add_argument_group("model")
    g.add_argument("--model", help="named configuration (tiny, smollm2-135m, llama2-7b, ...); the flags below "
                                   "override its fields. Without it the checkpoint given to --load, or the "
                                   "Megatron architecture flags, define the model.")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int)
    g.add_argument("--kv-channels", type=int, help="must equal hidden size / heads")
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--rotary-base", type=float)
    g.add_argument("--use-rope-scaling", action="store_true",
                   help="LLaMA-3.1's scaled rotary embedding (rope_type llama3; the llama3.1-8b model has it)")
    g.add_argument("--rope-scaling-factor", type=float, default=None,
                   help=f"its factor (default {LLAMA31_ROPE_SCALING_FACTOR}, LLaMA-3.1's); needs --use-rope-scaling")
    g.add_argument("--norm-epsilon", type=float)
    g.add_argument("--make-vocab-size-divisible-by", type=int)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--normalization", choices=["RMSNorm"], help="LLaMA: RMSNorm only")
    g.add_argument("--position-embedding-type", choices=["rope"], help="LLaMA: rope only")
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    for flag in ARCH_SWITCHES:
        g.add_argument(flag, action="store_true", help="LLaMA architecture (always on)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="1 only")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"],
                   help="default: NCCL on GPUs, gloo on the CPU")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="a prefix, or 'weight prefix' pairs (a blend)")
    g.add_argument("--split", default="969, 30, 1", help="train, valid, test shares (default '969, 30, 1')")
    g.add_argument("--data-cache-path", help="directory for the sample index cache")
    g.add_argument("--eval-data-path", nargs="+",
                   help="held-out sets evaluated beside the validation split at every evaluation: NAME=PREFIX "
                        "entries name one set each (e.g. domain=PATH general=PATH; reported and logged as "
                        "NAME), or one unnamed prefix or blend ('W1 PREFIX1 W2 PREFIX2 ...') is the set "
                        "eval_data. A named set is one prefix, not a blend")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="tokenizer model file or directory (default: the one in --load)")
    g.add_argument("--legacy-tokenizer", action="store_true")
    g.add_argument("--seq-length", type=int, required=False)
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on end-of-document tokens")
    g.add_argument("--reset-position-ids", action="store_true", help="positions restart after each EOD")
    g.add_argument("--num-workers", type=int, default=0, help="accepted; samples are read in the trainer process")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=micro_batch_size_arg,
                   help="samples per forward pass on each data-parallel rank, or 'auto': the largest that fits "
                        "(probed on the real model at the longest sequence of each stage; the global batch is "
                        "kept by gradient accumulation)")
    g.add_argument("--global-batch-size", type=int, help="default: micro batch x data-parallel size")
    g.add_argument("--memory-target-fraction", type=float, default=0.9,
                   help="--micro-batch-size auto: the share of the device's memory a step may use (default 0.9)")
    g.add_argument("--memory-budget-gib", type=float,
                   help="--micro-batch-size auto on a CPU: the memory a step may use (default: the machine's "
                        "memory x --memory-target-fraction)")
    g.add_argument("--curriculum", metavar="FILE",
                   help="YAML list of stages (iteration, seq_length, global_batch_size, lr_scale) run in order; "
                        "sets the sequence length, global batch and LR scale per stage")
    g.add_argument("--step-batch-size-schedule", metavar="SCHEDULE",
                   help="Megatron-LM's batch ramp: \"0:768 250B:1536\" (global batch from a number of training "
                        "tokens on; K, M, B, T suffixes)")
    g.add_argument("--train-iters", type=int)
    g.add_argument("--exit-interval", type=int, help="stop (after saving) when the iteration is a multiple")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM, finish the iteration, save and stop")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true", help="not supported (use --bf16)")

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer", choices=["adam"], default="adam", help="AdamW (decoupled weight decay)")
    g.add_argument("--lr", type=float)
    g.add_argument("--min-lr", type=float,
                   help="the LR at the end of the decay (default 0; with --lr-scaling, 10%% of the peak)")
    g.add_argument("--lr-scaling", choices=["linear", "sqrt"],
                   help="scale --lr and --min-lr given for --lr-base-batch-size to the run's global batch "
                        "(linear: x GBS/B; sqrt: x sqrt(GBS/B))")
    g.add_argument("--lr-base-batch-size", type=int, help="the global batch --lr is given for (--lr-scaling)")
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default="linear")
    g.add_argument("--lr-decay-iters", type=int, help="default: --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="on resume, take the LR schedule from the checkpoint")
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true",
                   help="on resume, take the LR schedule from these flags")
    g.add_argument("--log-num-zeros-in-grad", action="store_true")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--load", help="checkpoint directory to resume from (or to start from with --finetune)")
    g.add_argument("--save", help="checkpoint directory to save to")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--keep-last", type=int, help="keep only the newest N checkpoints in --save")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="load weights (and mask logits) only: iteration, optimizer, schedule and data restart")
    g.add_argument("--enable-partial-load", action="store_true",
                   help="allow a checkpoint without mask logits (they start fresh)")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true")
    g.add_argument("--ckpt-format", choices=["torch"], default="torch")

    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-seq-length", type=int,
                   help="also evaluate at this fixed sequence length (comparable across curriculum stages)")
    g.add_argument("--early-stop-patience", type=int,
                   help="stop (after saving) when this many evaluations in a row do not lower the validation "
                        "loss by --early-stop-min-delta")
    g.add_argument("--early-stop-min-delta", type=float, default=0.0,
                   help="the smallest drop of the validation loss that counts as an improvement (default 0)")
    g.add_argument("--save-best", action="store_true",
                   help="keep <save>/best: the checkpoint of the lowest validation loss (a checkpoint directory "
                        "of its own, loadable with --load)")
    g.add_argument("--wandb-project", help="log metrics to this Weights & Biases project (needs wandb)")
    g.add_argument("--wandb-exp-name", help="the Weights & Biases run name (default: --tag)")
    g.add_argument("--wandb-save-dir", help="where Weights & Biases writes its files (default: <log-dir>/wandb)")
    g.add_argument("--tensorboard-dir")
    g.add_argument("--tag", help="run name: logs go to <log-dir>/<tag>/")
    g.add_argument("--exp-name", help="Megatron-LM's name for --tag")
    g.add_argument("--log-dir", default=DEFAULT_LOG_DIR, help=f"default {DEFAULT_LOG_DIR}")

    for plugin in plugins:
        plugin.add_arguments(p)

    g = p.add_argument_group("accepted for compatibility (no effect)")
    for flag in NO_EFFECT_FLAGS:
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    return p


ARCH_FIELDS = (("num_layers", "--num-layers"), ("hidden_size", "--hidden-size"),
               ("ffn_hidden_size", "--ffn-hidden-size"), ("num_attention_heads", "--num-attention-heads"),
               ("num_query_groups", "--num-query-groups"), ("max_position_embeddings", "--max-position-embeddings"),
               ("rotary_base", "--rotary-base"), ("rope_scaling_factor", "--rope-scaling-factor"),
               ("norm_epsilon", "--norm-epsilon"),
               ("make_vocab_size_divisible_by", "--make-vocab-size-divisible-by"))


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ArgsError(message)


def _positive(args, name: str, flag: str, allow_zero: bool = False) -> None:
    value = getattr(args, name)
    if value is None:
        return
    ok = value >= 0 if allow_zero else value > 0
    _require(ok and (not isinstance(value, float) or math.isfinite(value)),
             f"{flag} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def parse_args(argv: Optional[Sequence[str]] = None, plugins: Sequence[type] = (),
               needs_data: bool = True) -> argparse.Namespace:
    """Parse and check the flags (everything but what needs the world size): the trainer's,
    then each plug-in's. ``RunConfig.from_args`` turns the result into the run's sections.
    ``needs_data=False`` (``tools/plot_schedule.py``, which reads no data): ``--data-path``
    and the tokenizer flags may be left out."""
    args = build_parser(plugins).parse_args(argv)
    check_args(args, needs_data)
    for plugin in plugins:
        plugin.check_args(args)
    return args


def check_args(args: argparse.Namespace, needs_data: bool = True) -> None:
    """Static checks and derived fields (``sparse``, ``tag``); raises ``ArgsError`` naming the
    flag. ``needs_data=False``: ``--data-path`` and the tokenizer are not required."""
    _require(not (args.curriculum and args.step_batch_size_schedule),
             "--curriculum and --step-batch-size-schedule are mutually exclusive")
    if args.curriculum is not None:
        from megatron_ext.training.plan import curriculum_stages

        stages = curriculum_stages(args.curriculum)
        _require(args.global_batch_size is None,
                 f"--global-batch-size {args.global_batch_size}: the stages of --curriculum {args.curriculum} set "
                 "the global batch; leave the flag out")
        longest = max(s.seq_length for s in stages)
        if args.seq_length is None:
            args.seq_length = longest
        _require(args.seq_length >= longest,
                 f"--seq-length {args.seq_length} is shorter than the longest stage of --curriculum "
                 f"{args.curriculum} ({longest})")
    if args.step_batch_size_schedule is not None:
        _require(args.global_batch_size is None,
                 f"--global-batch-size {args.global_batch_size}: --step-batch-size-schedule sets the global batch; "
                 "leave the flag out")
    required = [("train_iters", "--train-iters"), ("micro_batch_size", "--micro-batch-size"),
                ("seq_length", "--seq-length"), ("lr", "--lr")]
    if needs_data:
        required.append(("data_path", "--data-path"))
    for name, flag in required:
        _require(getattr(args, name) is not None, f"{flag} is required")
    if args.micro_batch_size != "auto":
        _positive(args, "micro_batch_size", "--micro-batch-size")
    _require(0.0 < args.memory_target_fraction <= 1.0,
             f"--memory-target-fraction must be in (0, 1], got {args.memory_target_fraction}")
    for name, flag in (("train_iters", "--train-iters"),
                       ("global_batch_size", "--global-batch-size"), ("seq_length", "--seq-length"),
                       ("tensor_model_parallel_size", "--tensor-model-parallel-size"),
                       ("lr", "--lr"), ("eval_interval", "--eval-interval"), ("log_interval", "--log-interval"),
                       ("save_interval", "--save-interval"), ("keep_last", "--keep-last"),
                       ("exit_interval", "--exit-interval"), ("lr_decay_iters", "--lr-decay-iters"),
                       ("adam_eps", "--adam-eps"), ("eval_seq_length", "--eval-seq-length"),
                       ("early_stop_patience", "--early-stop-patience"), ("lr_base_batch_size", "--lr-base-batch-size"),
                       ("memory_budget_gib", "--memory-budget-gib")):
        _positive(args, name, flag)
    for name, flag in (("min_lr", "--min-lr"), ("lr_warmup_iters", "--lr-warmup-iters"),
                       ("lr_warmup_init", "--lr-warmup-init"), ("weight_decay", "--weight-decay"),
                       ("clip_grad", "--clip-grad"), ("eval_iters", "--eval-iters"), ("seed", "--seed"),
                       ("early_stop_min_delta", "--early-stop-min-delta"),
                       ("init_method_std", "--init-method-std"), ("num_workers", "--num-workers")):
        _positive(args, name, flag, allow_zero=True)
    for name, flag in (("adam_beta1", "--adam-beta1"), ("adam_beta2", "--adam-beta2")):
        _require(0.0 <= getattr(args, name) < 1.0, f"{flag} must be in [0, 1), got {getattr(args, name)}")
    _require(args.pipeline_model_parallel_size == 1,
             f"--pipeline-model-parallel-size {args.pipeline_model_parallel_size}: only 1 is supported "
             "(tensor and data parallelism are)")
    _require(not args.fp16, "--fp16 is not supported (no loss scaling): use --bf16")
    _require(args.attention_dropout == 0.0 and args.hidden_dropout == 0.0,
             f"--attention-dropout {args.attention_dropout} / --hidden-dropout {args.hidden_dropout}: "
             "our LLaMA models have no dropout (use 0.0)")
    _require(args.rotary_percent == 1.0, f"--rotary-percent {args.rotary_percent}: only 1.0 (LLaMA) is supported")
    _require(args.rope_scaling_factor is None or args.use_rope_scaling,
             f"--rope-scaling-factor {args.rope_scaling_factor} needs --use-rope-scaling")
    if args.lr_scaling is not None:
        _require(args.lr_base_batch_size is not None, f"--lr-scaling {args.lr_scaling} needs --lr-base-batch-size")
        _require(args.curriculum is None and args.step_batch_size_schedule is None,
                 f"--lr-scaling with {'--curriculum' if args.curriculum else '--step-batch-size-schedule'}: the "
                 "stages set the learning rate per batch (lr_scale); use one of them")
    else:
        _require(args.lr_base_batch_size is None, "--lr-base-batch-size needs --lr-scaling")
    _require(args.min_lr is None or args.min_lr <= args.lr, f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    _require(args.lr_warmup_init <= args.lr, f"--lr-warmup-init {args.lr_warmup_init} is larger than --lr {args.lr}")
    if args.lr_warmup_fraction is not None:
        _require(args.lr_warmup_iters == 0, "--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive")
        _require(0.0 <= args.lr_warmup_fraction < 1.0,
                 f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
    decay_iters = args.lr_decay_iters or args.train_iters
    _require(args.lr_warmup_iters < decay_iters,
             f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than the decay iterations {decay_iters} "
             "(--lr-decay-iters, default --train-iters)")
    _require(not (args.use_checkpoint_opt_param_scheduler and args.override_opt_param_scheduler),
             "--use-checkpoint-opt_param-scheduler and --override-opt_param-scheduler are mutually exclusive")

    # data
    from megatron_ext.data.blend import parse_split

    try:
        parse_split(args.split)
    except ValueError as e:
        raise ArgsError(str(e)) from None
    if args.data_path is not None:
        args.data_path = " ".join(args.data_path)
    if args.eval_data_path is not None:
        from megatron_ext.training.data import DataError, eval_sets

        args.eval_data_path = " ".join(args.eval_data_path)
        try:
            eval_sets(args.eval_data_path)
        except DataError as e:
            raise ArgsError(str(e)) from None
    if needs_data:
        _require(args.tokenizer_type is not None or args.load is not None,
                 "--tokenizer-type is required (or --load a checkpoint that carries its tokenizer)")
        _require(args.tokenizer_model is not None or args.load is not None,
                 "--tokenizer-model is required (or --load a checkpoint that carries its tokenizer)")
    if args.eval_data_path is not None:
        _require(args.eval_iters > 0, "--eval-data-path needs --eval-iters > 0")
    for name, flag in (("early_stop_patience", "--early-stop-patience"), ("save_best", "--save-best"),
                       ("eval_seq_length", "--eval-seq-length")):
        if getattr(args, name):
            _require(args.eval_iters > 0, f"{flag} needs evaluations (--eval-iters > 0)")
    if args.save_best:
        _require(args.save is not None, "--save-best needs --save")

    # checkpoints
    if args.save_interval is not None:
        _require(args.save is not None, "--save-interval needs --save")
    if args.keep_last is not None:
        _require(args.save is not None, "--keep-last needs --save")
    _require(not args.finetune or args.load is not None, "--finetune needs --load")

    # logging
    if args.tag is not None and args.exp_name is not None:
        _require(args.tag == args.exp_name, f"--tag {args.tag!r} and --exp-name {args.exp_name!r} disagree")
    args.tag = args.tag or args.exp_name or (os.path.basename(os.path.normpath(args.save)) if args.save else "run")
    _require(os.sep not in args.tag and args.tag not in ("", ".", ".."),
             f"--tag {args.tag!r} must be a plain name (it names a directory under --log-dir)")
