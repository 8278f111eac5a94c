"""The training loop: dense (pre)training, fine-tuning and MaskLLM mask learning.

``pretrain(args)`` sets up (process groups, tokenizer, model, checkpoint, optimizer,
data) and trains from the checkpoint's iteration to ``--train-iters``. One iteration:

1. the sparsity schedules move to step ``t = iteration - 1`` (tau, kappa, the noise key);
2. ``num_microbatches`` forward/backward passes, each loss (token mean) divided by
   their number; gradients accumulate in fp32;
3. with ``--weight-reg``: ``- lambda (1 - t / T) sum ||W * M~||^2`` is added (its
   gradient reaches the mask logits only);
4. gradients averaged over data parallelism, clipped by global norm, AdamW step, and
   the learning-rate schedule advances by one global batch.

Every ``--log-interval`` a line is printed and logged, every ``--eval-interval`` the
validation split (and ``--eval-data-path``) is evaluated, every ``--save-interval``
a checkpoint is saved; ``--exit-interval`` / SIGTERM (``--exit-signal-handler``)
stop after saving.

``--load``: a checkpoint this trainer wrote is resumed (weights, mask logits, optimizer,
schedule, random state, data position; ``--no-load-optim`` starts AdamW afresh with the
learning rate where the run was, ``--no-load-rng`` keeps the seeded state). With
``--finetune``, or for a checkpoint from the tools (converted, pruned: no training
state), only weights and mask logits are taken and iteration, optimizer, schedule and
data start at zero; missing mask logits then start from their initialisation (and
``--prior-mask``). A directory without a checkpoint starts from scratch (unless
``--finetune`` or ``--exit-on-missing-checkpoint``).
"""
from __future__ import annotations

import math
import os
import signal
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_ext import platform
from megatron_ext.data.tokenizers import build_tokenizer
from megatron_ext.models.checkpoint import CheckpointError, CheckpointInfo
from megatron_ext.models.config import ConfigError, LlamaConfig, get_config
from megatron_ext.training import checkpointing
from megatron_ext.training.arguments import ARCH_FIELDS, ArgsError, parse_args, validate_parallel
from megatron_ext.training.data import BatchStream, DataError, build_datasets, check_data_paths
from megatron_ext.training.evaluate import evaluate, masked_loss_sums
from megatron_ext.training.optimizer import TrainOptimizer, param_groups
from megatron_ext.training.reporting import RunLogger
from megatron_ext.training.schedules import ParamScheduler, schedule_from_args


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss or gradient, ...)."""


@dataclass
class TrainResult:
    iteration: int                       # last completed iteration
    start_iteration: int                 # iteration the run started from (0, or the checkpoint's)
    history: List[Dict[str, Any]]        # one record per iteration trained by this run
    evals: List[Dict[str, Any]]          # one record per evaluation
    checkpoints: List[Path]
    consumed_train_samples: int
    stop_reason: str                     # "train_iters", "exit_interval" or "signal"
    log_dir: Optional[Path] = None


# --------------------------------------------------------------------------- setup helpers


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _find_load_checkpoint(args: Namespace) -> Optional[CheckpointInfo]:
    path = Path(args.load)
    same_as_save = args.save is not None and path.resolve() == Path(args.save).resolve()
    if not path.exists() and not same_as_save:
        raise ArgsError(f"--load {args.load}: no such checkpoint directory")
    info = checkpointing.find_checkpoint(path)
    if info is None:
        if args.finetune:
            raise ArgsError(f"--load {args.load}: no checkpoint found (--finetune needs one)")
        if args.exit_on_missing_checkpoint:
            raise ArgsError(f"--load {args.load}: no checkpoint found (--exit-on-missing-checkpoint)")
    return info


def _build_tokenizer(args: Namespace, ckpt: Optional[CheckpointInfo]):
    model_path, tok_type = args.tokenizer_model, args.tokenizer_type
    if model_path is None:
        if ckpt is None or ckpt.tokenizer_dir is None:
            raise ArgsError("--tokenizer-model is required (the checkpoint given to --load carries no tokenizer)")
        model_path = ckpt.tokenizer_dir
    if tok_type is None:
        if ckpt is None or ckpt.tokenizer_type is None:
            raise ArgsError("--tokenizer-type is required (the checkpoint given to --load records none)")
        tok_type = ckpt.tokenizer_type
    args.tokenizer_type = tok_type
    try:
        tok = build_tokenizer(tok_type, model_path, legacy=args.legacy_tokenizer)
    except ValueError as e:
        raise ArgsError(f"--tokenizer-model: {e}") from None
    if tok.eod is None:
        raise ArgsError(f"--tokenizer-model {model_path}: the tokenizer has no end-of-document token")
    return tok


def _ffn_for_swiglu(hidden: int) -> int:
    """Megatron-LM's default SwiGLU width: 2/3 of 4h, rounded down to a multiple of 64."""
    return int((4 * hidden * 2 / 3) / 64) * 64


def resolve_model_config(args: Namespace, tokenizer, ckpt: Optional[CheckpointInfo]) -> LlamaConfig:
    """The model: ``--model`` (with flag overrides), else the checkpoint's, else Megatron's
    architecture flags. Checked against the checkpoint, the tokenizer, TP and N:M."""
    overrides = {name: getattr(args, name) for name, _ in ARCH_FIELDS if getattr(args, name) is not None}
    if args.group_query_attention and args.num_query_groups is None:
        overrides["num_query_groups"] = 1
    if args.untie_embeddings_and_output_weights:
        overrides["tie_word_embeddings"] = False
    try:
        if args.model is not None:
            cfg = get_config(args.model, **overrides)
        elif ckpt is not None:
            cfg = ckpt.config.replace(**overrides) if overrides else ckpt.config
        else:
            for name, flag in (("num_layers", "--num-layers"), ("hidden_size", "--hidden-size"),
                               ("num_attention_heads", "--num-attention-heads")):
                if name not in overrides:
                    raise ArgsError(f"{flag} is required without --model or a checkpoint to --load")
            missing = [flag for flag, ok in (("--swiglu", args.swiglu), ("--disable-bias-linear", args.disable_bias_linear),
                                             ("--normalization RMSNorm", args.normalization == "RMSNorm"),
                                             ("--position-embedding-type rope or --use-rotary-position-embeddings",
                                              args.position_embedding_type == "rope"
                                              or args.use_rotary_position_embeddings)) if not ok]
            if missing:
                raise ArgsError(f"building a model from Megatron flags: add {missing[0]} (our models are LLaMA: "
                                "SwiGLU, no biases, RMSNorm, rotary embeddings), or use --model")
            fields = dict(name="custom", vocab_size=tokenizer.vocab_size,
                          max_position_embeddings=args.seq_length,
                          num_query_groups=overrides.get("num_attention_heads"),
                          ffn_hidden_size=_ffn_for_swiglu(overrides["hidden_size"]),
                          tie_word_embeddings=not args.untie_embeddings_and_output_weights)
            fields.update(overrides)
            cfg = LlamaConfig(**fields)
    except ConfigError as e:
        raise ArgsError(f"--model: {e}") from None
    if ckpt is not None:
        # the vocabulary comes from the checkpoint (the tokenizer is checked against it below);
        # the padding multiple only shapes storage, resharding handles it
        mine, theirs = cfg.to_dict(), ckpt.config.to_dict()
        for name in mine:
            if name in ("name", "vocab_size", "make_vocab_size_divisible_by"):
                continue
            if mine[name] != theirs[name]:
                flag = next((f for n, f in ARCH_FIELDS if n == name), "--model")
                raise ArgsError(f"{flag}: {name} {mine[name]!r} differs from the checkpoint's {theirs[name]!r} "
                                f"({ckpt.iter_dir})")
        cfg = ckpt.config
    elif cfg.vocab_size != tokenizer.vocab_size:
        cfg = cfg.replace(vocab_size=tokenizer.vocab_size)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ArgsError(f"--tokenizer-model: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                        f"vocabulary of {cfg.vocab_size}")
    if args.kv_channels is not None and args.kv_channels != cfg.head_dim:
        raise ArgsError(f"--kv-channels {args.kv_channels}: must equal hidden size / heads = {cfg.head_dim}")
    if args.seq_length > cfg.max_position_embeddings:
        raise ArgsError(f"--seq-length {args.seq_length} exceeds the model's max position embeddings "
                        f"{cfg.max_position_embeddings} (--max-position-embeddings)")
    tp = args.tensor_model_parallel_size
    try:
        cfg.validate_tp(tp)
    except ConfigError as e:
        raise ArgsError(f"--tensor-model-parallel-size: {e}") from None
    if args.sparse:
        checks = (("hidden size", cfg.hidden_size), ("attention width / TP", cfg.num_attention_heads * cfg.head_dim // tp),
                  ("ffn hidden size / TP", cfg.ffn_hidden_size // tp))
        for what, size in checks:
            if size % args.M:
                raise ArgsError(f"--M {args.M}: the model's {what} = {size} is not a multiple of M "
                                f"(masked linears group M inputs; TP={tp})")
    return cfg


def _build_model(args: Namespace, cfg: LlamaConfig):
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if not args.sparse:
        from megatron_ext.models.build import build_model

        return build_model(cfg, dtype, init_method_std=args.init_method_std), None
    from megatron_ext.sparsity import SparsityState, build_sparse_model

    state = SparsityState(N=args.N, M=args.M, seed=args.seed, tau_range=args.gumbel_temperature_range,
                          kappa_range=args.gumbel_scale_range, hard=args.hard)
    model = build_sparse_model(cfg, args.N, args.M, dtype, mask_only=args.mask_only, state=state,
                               init_method_std=args.init_method_std)
    return model, state


def _run_args(args: Namespace) -> Dict[str, Any]:
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, tuple):
            v = list(v)
        if v is None or isinstance(v, (bool, int, float, str, list)):
            out[k] = v
    return out


_memory_stats = platform.memory_stats


class _StopFlag:
    """SIGTERM -> stop after the current iteration (``--exit-signal-handler``)."""

    def __init__(self, enabled: bool) -> None:
        self.received = False
        self._previous = None
        if enabled:
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = True

    def agreed(self) -> bool:
        """Whether any rank got the signal (collective when distributed)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.received
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32, device=platform.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# --------------------------------------------------------------------------- the run


class Run:
    """Everything a training run holds; ``pretrain`` builds one and calls ``train``."""

    def __init__(self, args: Namespace) -> None:
        from megatron.core import parallel_state as ps

        self.args = args
        dinfo = platform.init_distributed(args.tensor_model_parallel_size, backend=args.distributed_backend)
        validate_parallel(args, dinfo.world_size)
        platform.seed_everything(args.seed)
        self.dinfo = dinfo
        self.dp_group = ps.get_data_parallel_group()
        self.mp_group = ps.get_model_parallel_group()

        ckpt = _find_load_checkpoint(args) if args.load is not None else None
        self.tokenizer = _build_tokenizer(args, ckpt)
        self.cfg = resolve_model_config(args, self.tokenizer, ckpt)
        check_data_paths(args.data_path, "--data-path")
        if args.eval_data_path is not None:
            check_data_paths(args.eval_data_path, "--eval-data-path")
        if args.prior_mask is not None and not os.path.exists(args.prior_mask):
            raise ArgsError(f"--prior-mask {args.prior_mask}: no such checkpoint or file")

        self.log = RunLogger(args.log_dir, args.tag, enabled=_is_rank0(), tensorboard_dir=args.tensorboard_dir)
        try:
            self._setup(ckpt)
        except BaseException:
            self.close()
            raise

    def _setup(self, ckpt: Optional[CheckpointInfo]) -> None:
        args, log, d = self.args, self.log, self.dinfo
        log.print(f"> {d.world_size} process(es): TP={d.tp_size} DP={d.dp_size}, {args.num_microbatches} micro-batch(es) "
                  f"of {args.micro_batch_size} per global batch of {args.global_batch_size}")
        log.print(f"> model {self.cfg.name}: {self.cfg.num_parameters():,} parameters, "
                  f"{'bf16' if args.bf16 else 'fp32'}, "
                  + (f"{args.N}:{args.M} learnable sparsity{' (mask only)' if args.mask_only else ''}"
                     if args.sparse else "dense"))
        self.model, self.sparsity = _build_model(args, self.cfg)
        self.model.train()
        # A checkpoint the trainer wrote is resumed; --finetune, or a checkpoint from the
        # tools (converted, pruned: no training state), gives weights only.
        resume = ckpt is not None and not args.finetune and isinstance(ckpt.extra.get("training"), dict)
        payload = self._load_weights(ckpt, resume) if ckpt is not None else None
        train_state = dict(ckpt.extra["training"]) if resume else {}
        self.iteration = int(train_state.get("iteration", 0))
        if ckpt is None and args.load is not None:
            log.print(f"> no checkpoint in {args.load}: starting from scratch")
        self._apply_prior()
        self._build_optimizer()
        if resume:
            self._restore_optimizer(ckpt, payload, train_state)
        self.consumed_train = int(train_state.get("consumed_train_samples", 0))
        if self.consumed_train != self.iteration * args.global_batch_size:
            raise ArgsError(f"--global-batch-size {args.global_batch_size}: the checkpoint consumed "
                            f"{self.consumed_train} samples in {self.iteration} iterations (a different global batch)")
        self._build_data(train_state)
        # random state last: everything above may draw from it
        if resume and payload is not None and not args.no_load_rng and payload.get("rng_state"):
            checkpointing.set_rng_state(payload["rng_state"][0], str(ckpt.shard_path(d.tp_rank)))
        if self.sparsity is not None:
            from megatron_ext.sparsity import MaskMetrics

            self.mask_metrics = MaskMetrics()
        self.start_iteration = self.iteration
        self.history: List[Dict[str, Any]] = []
        self.evals: List[Dict[str, Any]] = []
        self.checkpoints: List[Path] = []
        self._last_reg: Optional[torch.Tensor] = None

    def _load_weights(self, ckpt: CheckpointInfo, resume: bool) -> Optional[Dict[str, Any]]:
        """Weights (and mask logits) of this rank; returns the rank's whole file when read."""
        args, d = self.args, self.dinfo
        same_tp = ckpt.tensor_parallel_size == d.tp_size
        if resume and not same_tp and not args.no_load_optim:
            raise ArgsError(f"--load {args.load}: saved at TP={ckpt.tensor_parallel_size}, this run has "
                            f"TP={d.tp_size}; the optimizer state cannot be resharded (pass --no-load-optim "
                            "or --finetune)")
        payload = None
        if same_tp:
            payload = checkpointing.read_rank_file(ckpt, d.tp_rank)
            weights = payload["model"]
        else:
            weights = checkpointing.model_weights_for_rank(ckpt, d.tp_size, d.tp_rank)
        notes = checkpointing.load_model_weights(
            self.model, weights, allow_missing_logits=args.finetune or args.enable_partial_load or not resume,
            where=str(ckpt.iter_dir))
        self.log.print(f"> loaded {'checkpoint' if resume else 'weights'} from {ckpt.iter_dir}"
                       + (f" (skipped {len(notes['skipped'])} hard_mask entries)" if notes["skipped"] else "")
                       + (f" ({len(notes['fresh'])} mask logits start fresh)" if notes["fresh"] else ""))
        return payload

    def _apply_prior(self) -> None:
        args = self.args
        if args.prior_mask is None:
            return
        if self.iteration > 0:
            self.log.print(f"> resuming at iteration {self.iteration}: --prior-mask not applied again")
            return
        from megatron_ext.sparsity import apply_prior, load_prior_masks

        try:
            masks = load_prior_masks(args.prior_mask, args.N, args.M)
            n = apply_prior(self.model, masks, args.prior_strength)
        except (ValueError, FileNotFoundError, CheckpointError) as e:
            raise ArgsError(f"--prior-mask {args.prior_mask}: {e}") from None
        self.log.print(f"> prior masks of {n} layers injected with strength {args.prior_strength}")

    def _build_optimizer(self) -> None:
        """AdamW and the schedule, after the weights are loaded (fp32 main copies start from them)."""
        args = self.args
        groups = param_groups(self.model, args.lr, args.min_lr, args.lr_mult if args.sparse else 1.0)
        self.optimizer = TrainOptimizer(self.model, groups, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                        eps=args.adam_eps, fused=platform.fused_optimizer_available(), dp_group=self.dp_group,
                                        model_parallel_group=self.mp_group, tp_rank=self.dinfo.tp_rank)
        self.scheduler = ParamScheduler(self.optimizer, schedule_from_args(args), args.weight_decay)
        trainable = sum(e.param.numel() for e in self.optimizer.entries)
        counts = ", ".join(f"{g['name']}: {len(g['params'])} tensors" for g in self.optimizer.param_groups)
        self.log.print(f"> trainable parameters on this rank: {trainable:,} ({counts})")

    def _restore_optimizer(self, ckpt: CheckpointInfo, payload: Optional[Dict[str, Any]],
                           train_state: Dict[str, Any]) -> None:
        args = self.args
        where = str(ckpt.shard_path(self.dinfo.tp_rank))
        if args.no_load_optim:
            # a fresh optimizer; the learning rate continues where the run left off
            self.scheduler.step(int(train_state.get("consumed_train_samples", 0)))
            return
        if "optimizer" not in payload:
            raise CheckpointError(f"{where}: no optimizer state (saved with --no-save-optim); pass "
                                  "--no-load-optim or --finetune")
        self.optimizer.load_state_dict(payload["optimizer"], where)
        policy = ("override" if args.override_opt_param_scheduler else
                  "checkpoint" if args.use_checkpoint_opt_param_scheduler else "check")
        if "opt_param_scheduler" in payload:
            self.scheduler.load_state_dict(payload["opt_param_scheduler"], policy, where)

    def _build_data(self, train_state: Dict[str, Any]) -> None:
        """Datasets (rank 0 first, so a shared index cache is written once) and this rank's streams."""
        args, d, log = self.args, self.dinfo, self.log
        if dist.is_initialized() and dist.get_world_size() > 1 and args.data_cache_path is not None:
            datasets = build_datasets(args, self.tokenizer) if _is_rank0() else None
            dist.barrier()
            if not _is_rank0():
                datasets = build_datasets(args, self.tokenizer)
        else:
            datasets = build_datasets(args, self.tokenizer)
        self.datasets = datasets
        mbs, dp, dpr = args.micro_batch_size, d.dp_size, d.dp_rank
        self.train_stream = BatchStream(datasets.train, "training", self.consumed_train, mbs, dp, dpr)
        self.valid_stream = (BatchStream(datasets.valid, "validation", int(train_state.get("consumed_valid_samples", 0)),
                                         mbs, dp, dpr) if datasets.valid is not None else None)
        self.extra_stream = (BatchStream(datasets.extra_valid, "--eval-data-path",
                                         int(train_state.get("consumed_extra_valid_samples", 0)), mbs, dp, dpr)
                             if datasets.extra_valid is not None else None)
        log.print(f"> data: {len(datasets.train)} training samples"
                  + (f", {len(datasets.valid)} validation" if datasets.valid is not None else "")
                  + (f", {len(datasets.extra_valid)} from --eval-data-path" if datasets.extra_valid is not None else "")
                  + (f"; resuming at iteration {self.iteration} ({self.consumed_train} samples consumed)"
                     if self.iteration else ""))

    # ------------------------------------------------------------------ one iteration
    def train_step(self) -> Dict[str, Any]:
        args = self.args
        t = self.iteration  # completed iterations
        if self.sparsity is not None:
            self.sparsity.update(t, args.train_iters)
        self.optimizer.zero_grad()
        loss_sum = torch.zeros((), dtype=torch.float32, device=platform.device())
        for _ in range(args.num_microbatches):
            batch = self.train_stream.next()
            total, count = masked_loss_sums(self.model, batch)
            loss = total / count.clamp_min(1.0)
            (loss / args.num_microbatches).backward()
            loss_sum += loss.detach()
        reg_value = None
        if self.sparsity is not None and args.weight_reg > 0:
            from megatron_ext.sparsity import sparse_weight_norm, weight_reg_coefficient

            coeff = weight_reg_coefficient(args.weight_reg, t, args.train_iters)
            reg = sparse_weight_norm(self.model)
            if coeff > 0:
                (-coeff * reg).backward()
            reg_value = reg.detach()
        if self.sparsity is not None:
            from megatron_ext.sparsity.model import masked_linears

            for _, layer in masked_linears(self.model):
                layer.clear_mask_cache()  # the step's masked weights are not needed past the backward
        self.optimizer.reduce_gradients()
        loss_avg = (loss_sum / args.num_microbatches).reshape(1)
        if self.dinfo.dp_size > 1:
            dist.all_reduce(loss_avg, group=self.dp_group)
            loss_avg /= self.dinfo.dp_size
        lr = self.scheduler.lr
        grad_norm = self.optimizer.clip_gradients(args.clip_grad)
        loss_value = float(loss_avg.item())
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            raise TrainingError(f"iteration {t + 1}: loss {loss_value} / grad norm {grad_norm} is not finite "
                                "(lower --lr, or check the data)")
        zeros = self.optimizer.count_zeros() if args.log_num_zeros_in_grad else None
        self.optimizer.step()
        self.scheduler.step(args.global_batch_size)
        self.iteration += 1
        self.consumed_train += args.global_batch_size
        self._last_reg = reg_value
        record = {"iteration": self.iteration, "loss": loss_value, "lr": lr, "grad_norm": grad_norm}
        if zeros is not None:
            record["num_zeros"] = zeros
        if self.sparsity is not None:
            record["tau"] = self.sparsity.tau
            record["kappa"] = self.sparsity.kappa
        return record

    # ------------------------------------------------------------------ evaluation, checkpoints
    def run_evaluation(self, label: str) -> None:
        args = self.args
        for name, stream in (("valid", self.valid_stream), ("eval_data", self.extra_stream)):
            if stream is None:
                continue
            result = evaluate(self.model, stream, args.eval_iters, args.num_microbatches, self.dp_group)
            record = {"iteration": self.iteration, "set": name, "when": label, **result}
            self.evals.append(record)
            self.log.metrics(f"eval/{name}", self.iteration, {"loss": result["loss"], "ppl": result["ppl"]},
                             self.consumed_train)
            self.log.print(f" {name} loss at {label}: {result['loss']:.6E} | {name} PPL: {result['ppl']:.6E} |")

    def run_test(self) -> None:
        if self.datasets.test is None:
            return
        stream = BatchStream(self.datasets.test, "test", 0, self.args.micro_batch_size, self.dinfo.dp_size,
                             self.dinfo.dp_rank)
        result = evaluate(self.model, stream, self.args.eval_iters, self.args.num_microbatches, self.dp_group)
        self.evals.append({"iteration": self.iteration, "set": "test", "when": "the end of training", **result})
        self.log.metrics("eval/test", self.iteration, {"loss": result["loss"], "ppl": result["ppl"]})
        self.log.print(f" test loss at the end of training: {result['loss']:.6E} | test PPL: {result['ppl']:.6E} |")

    def save(self) -> Path:
        args, d = self.args, self.dinfo
        t0 = time.perf_counter()
        train_state = {"iteration": self.iteration, "consumed_train_samples": self.consumed_train,
                       "consumed_valid_samples": self.valid_stream.consumed if self.valid_stream else 0,
                       "consumed_extra_valid_samples": self.extra_stream.consumed if self.extra_stream else 0}
        info_extra: Dict[str, Any] = {"training": {**train_state, "tag": args.tag}}
        if self.sparsity is not None:
            info_extra["sparsity"] = {"method": "maskllm", "N": args.N, "M": args.M, "mask_only": args.mask_only,
                                      "hard": args.hard, "trained_iterations": self.iteration}
        path = checkpointing.save_training_checkpoint(
            args.save, self.iteration, self.cfg, self.model, tp_rank=d.tp_rank, tp_size=d.tp_size, dp_rank=d.dp_rank,
            scheduler=self.scheduler, optimizer=None if args.no_save_optim else self.optimizer,
            save_rng=not args.no_save_rng,
            train_state=train_state,
            run_args=_run_args(args), info_extra=info_extra, tokenizer=self.tokenizer,
            tokenizer_type=args.tokenizer_type, keep_last=args.keep_last)
        self.checkpoints.append(path)
        self.log.print(f"> saved checkpoint at iteration {self.iteration} to {path} "
                       f"({time.perf_counter() - t0:.2f} s)")
        return path

    # ------------------------------------------------------------------ logging
    def _log_interval(self, records: List[Dict[str, Any]], seconds: float) -> None:
        args = self.args
        n = len(records)
        last = records[-1]
        per_iter = seconds / n
        loss = sum(r["loss"] for r in records) / n
        tokens_per_s = args.global_batch_size * args.seq_length / per_iter
        fields = [("consumed samples", self.consumed_train, "d"),
                  ("elapsed time per iteration (ms)", per_iter * 1000.0, ".1f"),
                  ("tokens/s", tokens_per_s, ".0f"),
                  ("learning rate", last["lr"], ".6E"),
                  ("global batch size", args.global_batch_size, "d"),
                  ("lm loss", loss, ".6E"),
                  ("grad norm", last["grad_norm"], ".3f"),
                  ("num zeros", last.get("num_zeros"), "d")]
        metrics = {"loss": loss, "lr": last["lr"], "grad_norm": last["grad_norm"], "ms_per_iter": per_iter * 1000.0,
                   "tokens_per_s": tokens_per_s}
        if self.sparsity is not None:
            m = self.mask_metrics(self.model, weight_reg=None if self._last_reg is None else self._last_reg.item())
            fields += [("tau", m["tau"], ".4f"), ("kappa", m["kappa"], ".1f"),
                       ("weight reg", m["weight_reg"], ".6E"), ("mask flips", m["mask_flip_fraction"], ".6f"),
                       ("mask max prob", m["mask_max_prob"], ".4f")]
            metrics.update({"tau": m["tau"], "kappa": m["kappa"], "mask_flip_fraction": m["mask_flip_fraction"],
                            "mask_max_prob": m["mask_max_prob"]})
            if m["weight_reg"] is not None:
                metrics["weight_reg"] = m["weight_reg"]
        if "num_zeros" in last:
            metrics["num_zeros"] = last["num_zeros"]
        mem = _memory_stats()
        fields += [(k.replace("_", " "), v, ".1f") for k, v in mem.items()]
        metrics.update(mem)
        self.log.metrics("train", self.iteration, metrics, self.consumed_train)
        self.log.print(self.log.iteration_line(self.iteration, args.train_iters, fields))

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        args = self.args
        stop = _StopFlag(args.exit_signal_handler)
        reason = "train_iters"
        saved_at = None
        try:
            window: List[Dict[str, Any]] = []
            platform.synchronize()
            t_window = time.perf_counter()
            while self.iteration < args.train_iters:
                record = self.train_step()
                self.history.append(record)
                window.append(record)
                if self.iteration % args.log_interval == 0 or self.iteration == args.train_iters:
                    platform.synchronize()
                    now = time.perf_counter()
                    self._log_interval(window, now - t_window)
                    window = []
                if args.eval_iters > 0 and self.iteration % args.eval_interval == 0:
                    self.run_evaluation(f"iteration {self.iteration}")
                if args.save is not None and args.save_interval and self.iteration % args.save_interval == 0:
                    self.save()
                    saved_at = self.iteration
                if args.exit_signal_handler and stop.agreed():
                    reason = "signal"
                elif args.exit_interval and self.iteration % args.exit_interval == 0:
                    reason = "exit_interval"
                if reason != "train_iters":
                    if args.save is not None and saved_at != self.iteration:
                        self.save()
                    self.log.print(f"> stopping at iteration {self.iteration} ({reason.replace('_', ' ')})")
                    break
                if not window:
                    platform.synchronize()
                    t_window = time.perf_counter()
            else:
                if args.save is not None and self.iteration > 0 and saved_at != self.iteration \
                        and self.iteration > self.start_iteration:
                    self.save()
                if args.eval_iters > 0:
                    self.run_evaluation("the end of training")
                    self.run_test()
        finally:
            stop.restore()
        return TrainResult(iteration=self.iteration, start_iteration=self.start_iteration, history=self.history,
                           evals=self.evals, checkpoints=self.checkpoints, consumed_train_samples=self.consumed_train,
                           stop_reason=reason, log_dir=self.log.run_dir)

    def close(self) -> None:
        opt = getattr(self, "optimizer", None)
        if opt is not None:
            opt.close()
        self.log.close()


def pretrain(argv: Sequence[str] | Namespace | None = None) -> TrainResult:
    """Parse (unless given a parsed ``Namespace``), set up and train; see the module docstring."""
    args = argv if isinstance(argv, Namespace) else parse_args(argv)
    run = Run(args)
    try:
        return run.train()
    finally:
        run.close()


__all__ = ["TrainResult", "TrainingError", "Run", "pretrain", "resolve_model_config", "DataError"]
