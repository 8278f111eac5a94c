"""Command-line arguments of the trainer, under Megatron-LM's flag names.

A Megatron-LM / MaskLLM launch script ports by copy: the flags it uses are either
implemented, or accepted because they describe what our models always are (LLaMA:
RMSNorm, SwiGLU, rotary embeddings, no biases) or a kernel choice with no effect
here. Anything else fails at start, naming the flag.

``parse_args(argv)`` does the syntax and every check that needs no process group;
``validate_parallel(args, world_size)`` adds the data-parallel size and the checks
that depend on it. Both raise ``ArgsError`` (a ``ValueError``) naming the flag.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional, Sequence

from megatron_ext.data.tokenizers import TOKENIZER_TYPES

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


class ArgsError(ValueError):
    """A bad or conflicting command-line flag (the message names it)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises ``ArgsError`` instead of exiting, so callers and tests see the message."""

    def error(self, message):  # noqa: D401 - argparse API
        raise ArgsError(message)


def _pair(name: str):
    def convert(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a number") from None
    return convert


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pretrain_maskllm.py", allow_abbrev=False,
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
                   help="a second held-out set (prefix or blend), evaluated beside the validation split")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="tokenizer model file or directory (default: the one in --load)")
    g.add_argument("--legacy-tokenizer", action="store_true")
    g.add_argument("--seq-length", type=int, required=False)
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on end-of-document tokens")
    g.add_argument("--reset-position-ids", action="store_true", help="positions restart after each EOD")
    g.add_argument("--num-workers", type=int, default=0, help="accepted; samples are read in the trainer process")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int)
    g.add_argument("--global-batch-size", type=int, help="default: micro batch x data-parallel size")
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
    g.add_argument("--min-lr", type=float, default=0.0)
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
    g.add_argument("--tensorboard-dir")
    g.add_argument("--tag", help="run name: logs go to <log-dir>/<tag>/")
    g.add_argument("--exp-name", help="Megatron-LM's name for --tag")
    g.add_argument("--log-dir", default=DEFAULT_LOG_DIR, help=f"default {DEFAULT_LOG_DIR}")

    g = p.add_argument_group("learnable N:M sparsity (MaskLLM)")
    g.add_argument("--mask-only", action="store_true", help="train the mask logits only (weights frozen)")
    g.add_argument("--N", "--sparsity-n", dest="N", type=int, help="kept weights per group (default 2)")
    g.add_argument("--M", "--sparsity-m", dest="M", type=int, help="group size (default 4)")
    g.add_argument("--hard", action="store_true", help="straight-through one-hot mask samples")
    g.add_argument("--gumbel-temperature-range", nargs=2, type=_pair("--gumbel-temperature-range"),
                   metavar=("START", "END"))
    g.add_argument("--gumbel-scale-range", nargs=2, type=_pair("--gumbel-scale-range"), metavar=("START", "END"))
    g.add_argument("--prior-strength", type=float, help="needs --prior-mask")
    g.add_argument("--prior-mask", help="checkpoint (or .pt state dict) with hard_mask or mask_logits entries")
    g.add_argument("--weight-reg", type=float, help="sparse weight regulariser lambda")
    g.add_argument("--lr-mult", type=float, help="learning-rate multiplier of the mask logits")

    g = p.add_argument_group("accepted for compatibility (no effect)")
    for flag in NO_EFFECT_FLAGS:
        g.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    return p


SPARSITY_ONLY = (("hard", "--hard"), ("gumbel_temperature_range", "--gumbel-temperature-range"),
                 ("gumbel_scale_range", "--gumbel-scale-range"), ("prior_strength", "--prior-strength"),
                 ("prior_mask", "--prior-mask"), ("weight_reg", "--weight-reg"), ("lr_mult", "--lr-mult"))
ARCH_FIELDS = (("num_layers", "--num-layers"), ("hidden_size", "--hidden-size"),
               ("ffn_hidden_size", "--ffn-hidden-size"), ("num_attention_heads", "--num-attention-heads"),
               ("num_query_groups", "--num-query-groups"), ("max_position_embeddings", "--max-position-embeddings"),
               ("rotary_base", "--rotary-base"), ("norm_epsilon", "--norm-epsilon"),
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


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the flags (everything but what needs the world size)."""
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Static checks and derived fields (``sparse``, ``tag``); raises ``ArgsError`` naming the flag."""
    for name, flag in (("train_iters", "--train-iters"), ("micro_batch_size", "--micro-batch-size"),
                       ("seq_length", "--seq-length"), ("lr", "--lr"), ("data_path", "--data-path")):
        _require(getattr(args, name) is not None, f"{flag} is required")
    for name, flag in (("train_iters", "--train-iters"), ("micro_batch_size", "--micro-batch-size"),
                       ("global_batch_size", "--global-batch-size"), ("seq_length", "--seq-length"),
                       ("tensor_model_parallel_size", "--tensor-model-parallel-size"),
                       ("lr", "--lr"), ("eval_interval", "--eval-interval"), ("log_interval", "--log-interval"),
                       ("save_interval", "--save-interval"), ("keep_last", "--keep-last"),
                       ("exit_interval", "--exit-interval"), ("lr_decay_iters", "--lr-decay-iters"),
                       ("adam_eps", "--adam-eps"), ("N", "--N"), ("M", "--M"), ("lr_mult", "--lr-mult")):
        _positive(args, name, flag)
    for name, flag in (("min_lr", "--min-lr"), ("lr_warmup_iters", "--lr-warmup-iters"),
                       ("lr_warmup_init", "--lr-warmup-init"), ("weight_decay", "--weight-decay"),
                       ("clip_grad", "--clip-grad"), ("eval_iters", "--eval-iters"), ("seed", "--seed"),
                       ("prior_strength", "--prior-strength"), ("weight_reg", "--weight-reg"),
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
    _require(args.min_lr <= args.lr, f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
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
    args.data_path = " ".join(args.data_path)
    if args.eval_data_path is not None:
        args.eval_data_path = " ".join(args.eval_data_path)
    _require(args.tokenizer_type is not None or args.load is not None,
             "--tokenizer-type is required (or --load a checkpoint that carries its tokenizer)")
    _require(args.tokenizer_model is not None or args.load is not None,
             "--tokenizer-model is required (or --load a checkpoint that carries its tokenizer)")
    if args.eval_data_path is not None:
        _require(args.eval_iters > 0, "--eval-data-path needs --eval-iters > 0")

    # checkpoints
    if args.save_interval is not None:
        _require(args.save is not None, "--save-interval needs --save")
    if args.keep_last is not None:
        _require(args.save is not None, "--keep-last needs --save")
    _require(not args.finetune or args.load is not None, "--finetune needs --load")

    # sparsity
    args.sparse = bool(args.mask_only or args.N is not None or args.M is not None)
    if not args.sparse:
        given = [flag for name, flag in SPARSITY_ONLY if getattr(args, name) not in (None, False)]
        _require(not given, f"{given[0] if given else ''} applies to learnable sparsity: add --mask-only "
                            "(masks only) or --N/--M (weights and masks)")
    else:
        args.N = 2 if args.N is None else args.N
        args.M = 4 if args.M is None else args.M
        _require(args.N < args.M, f"--N {args.N} must be smaller than --M {args.M}")
        args.gumbel_temperature_range = tuple(args.gumbel_temperature_range or (4.0, 0.05))
        args.gumbel_scale_range = tuple(args.gumbel_scale_range or (1e2, 5e2))
        for flag, pair in (("--gumbel-temperature-range", args.gumbel_temperature_range),
                           ("--gumbel-scale-range", args.gumbel_scale_range)):
            _require(all(v > 0 and math.isfinite(v) for v in pair), f"{flag} values must be finite and > 0, "
                                                                    f"got {pair[0]} {pair[1]}")
        _require(args.prior_strength is None or args.prior_mask is not None,
                 "--prior-strength needs --prior-mask PATH (a one-shot checkpoint with hard_mask entries)")
        _require(args.prior_mask is None or args.prior_strength is not None,
                 "--prior-mask needs --prior-strength (e.g. 3.0)")
        args.weight_reg = args.weight_reg or 0.0
        args.lr_mult = 1.0 if args.lr_mult is None else args.lr_mult

    # logging
    if args.tag is not None and args.exp_name is not None:
        _require(args.tag == args.exp_name, f"--tag {args.tag!r} and --exp-name {args.exp_name!r} disagree")
    args.tag = args.tag or args.exp_name or (os.path.basename(os.path.normpath(args.save)) if args.save else "run")
    _require(os.sep not in args.tag and args.tag not in ("", ".", ".."),
             f"--tag {args.tag!r} must be a plain name (it names a directory under --log-dir)")


def validate_parallel(args: argparse.Namespace, world_size: int) -> None:
    """Data-parallel size, global batch and micro-batch counts for ``world_size`` processes."""
    tp = args.tensor_model_parallel_size
    _require(world_size % tp == 0,
             f"--tensor-model-parallel-size {tp} does not divide the number of processes {world_size}")
    dp = world_size // tp
    args.world_size = world_size
    args.data_parallel_size = dp
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    per_step = args.micro_batch_size * dp
    _require(args.global_batch_size % per_step == 0,
             f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
             f"{args.micro_batch_size} x data-parallel size {dp} (= {per_step})")
    args.num_microbatches = args.global_batch_size // per_step
