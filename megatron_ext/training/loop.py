"""The generic training loop: dense (pre)training and fine-tuning, and any plug-in's method.

``pretrain(argv, plugins)`` sets up (process groups, run configuration, tokenizer, model,
checkpoint, optimizer, data) and trains from the checkpoint's iteration to
``--train-iters``. One iteration:

1. each plug-in's ``begin_step`` (MaskLLM: the Gumbel schedules move to ``t = iteration``);
2. ``num_microbatches`` forward/backward passes, each loss (token mean) divided by their
   number; gradients accumulate in one fp32 buffer;
3. each plug-in's ``extra_loss`` (its backward runs once), then ``after_backward``;
4. gradients averaged over data parallelism, clipped by global norm, AdamW step, and the
   learning-rate schedule advances by one global batch.

Every ``--log-interval`` a line is printed and logged, every ``--eval-interval`` the
validation split (and ``--eval-data-path``) is evaluated, every ``--save-interval`` a
checkpoint is saved; ``--exit-interval`` / SIGTERM (``--exit-signal-handler``) stop
after saving.

``--load``: a checkpoint this trainer wrote is resumed (weights, plug-in tensors such as
mask logits, optimizer, schedule, random state, data position; ``--no-load-optim``
starts AdamW afresh with the learning rate where the run was, ``--no-load-rng`` keeps
the seeded state). With ``--finetune``, or for a checkpoint from the tools (converted,
pruned: no training state), only the tensors are taken and iteration, optimizer,
schedule and data start at zero; missing mask logits then start from their
initialisation. A directory without a checkpoint starts from scratch (unless
``--finetune`` or ``--exit-on-missing-checkpoint``).
"""
from __future__ import annotations

import math
import signal
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_ext import platform
from megatron_ext.checkpoint import CheckpointError, CheckpointInfo, load_rank_state_dict, read_shard
from megatron_ext.checkpoint.train_state import load_model_weights, save_training_checkpoint, set_rng_state
from megatron_ext.errors import RunError
from megatron_ext.models.config import LlamaConfig
from megatron_ext.training.arguments import ArgsError, parse_args
from megatron_ext.training.config import RunConfig
from megatron_ext.training.data import BatchStream, DataError, build_datasets, check_data_paths, sample_counts
from megatron_ext.training.evaluate import evaluate, masked_loss_sums
from megatron_ext.training.optimizer import TrainOptimizer, param_groups
from megatron_ext.training.plugins import TrainerPlugin, build_plugins
from megatron_ext.training.reporting import RunLogger
from megatron_ext.training.schedules import ParamScheduler, lr_schedule
from megatron_ext.training.setup import (find_load_checkpoint, probe_output_dirs, resolve_model_config,
                                         resolve_tokenizer)

# builds the model of a run: (config, params dtype, init std) -> this rank's GPTModel
ModelFactory = Callable[[LlamaConfig, torch.dtype, float], torch.nn.Module]


class TrainingError(RunError):
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
        return platform.any_rank(self.received)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class Run:
    """Everything a training run holds; ``pretrain`` builds one and calls ``train``.

    ``args``: the flags parsed with the same ``plugins`` (``parse_args(argv, plugins)``);
    ``plugins``: plug-in classes (``TrainerPlugin``), active when their flags ask;
    ``model_factory``: builds the model instead of the plug-ins and the default (a
    benchmark's proxy model, for instance).
    """

    def __init__(self, args: Namespace, plugins: Sequence[type] = (),
                 model_factory: Optional[ModelFactory] = None) -> None:
        dinfo = platform.init_distributed(args.tensor_model_parallel_size, backend=args.distributed_backend)
        self.plugins: List[TrainerPlugin] = build_plugins(plugins, args)
        self.config = RunConfig.from_args(args, dinfo.world_size, {p.name: p.config for p in self.plugins})
        platform.seed_everything(self.config.optim.seed)
        self.dinfo = dinfo
        self.dp_group = platform.dp_group()
        self.mp_group = platform.mp_group()
        self.model_factory = model_factory

        c = self.config
        probe_output_dirs(c)
        ckpt = find_load_checkpoint(c.checkpoint)
        self.tokenizer, self.tokenizer_type = resolve_tokenizer(c.data, ckpt)
        self.cfg = resolve_model_config(c.model, self.tokenizer, ckpt, seq_length=c.data.seq_length,
                                        tp=c.parallel.tensor_model_parallel_size, plugins=self.plugins)
        check_data_paths(c.data.data_path, "--data-path", self.cfg.vocab_size)
        if c.data.eval_data_path is not None:
            check_data_paths(c.data.eval_data_path, "--eval-data-path", self.cfg.vocab_size)

        lg = c.logging
        self.log = RunLogger(lg.log_dir, lg.tag, enabled=platform.is_rank0(), tensorboard_dir=lg.tensorboard_dir)
        try:
            self._setup(ckpt)
        except BaseException:
            self.close()
            raise

    def _setup(self, ckpt: Optional[CheckpointInfo]) -> None:
        c, log, d = self.config, self.log, self.dinfo
        o = c.optim
        log.print(f"> {d.world_size} process(es): TP={d.tp_size} DP={d.dp_size}, {o.num_microbatches} micro-batch(es) "
                  f"of {o.micro_batch_size} per global batch of {o.global_batch_size}")
        log.print(f"> model {self.cfg.name}: {self.cfg.num_parameters():,} parameters, "
                  f"{'bf16' if c.model.bf16 else 'fp32'}, "
                  + (", ".join(p.describe() for p in self.plugins) or "dense"))
        self.model = self._build_model()
        self.model.train()
        # A checkpoint the trainer wrote is resumed; --finetune, or a checkpoint from the
        # tools (converted, pruned: no training state), gives weights only.
        resume = ckpt is not None and not c.checkpoint.finetune and isinstance(ckpt.extra.get("training"), dict)
        payload = self._load_weights(ckpt, resume) if ckpt is not None else None
        train_state = dict(ckpt.extra["training"]) if resume else {}
        self.iteration = int(train_state.get("iteration", 0))
        if ckpt is None and c.checkpoint.load is not None:
            log.print(f"> no checkpoint in {c.checkpoint.load}: starting from scratch")
        for plugin in self.plugins:
            plugin.after_load(self.model, self.iteration, log)
            if resume and plugin.name in ckpt.extra:
                plugin.load_checkpoint_info(ckpt.extra[plugin.name])
        self._build_optimizer()
        if resume:
            self._restore_optimizer(ckpt, payload, train_state)
        self.consumed_train = int(train_state.get("consumed_train_samples", 0))
        if self.consumed_train != self.iteration * o.global_batch_size:
            raise ArgsError(f"--global-batch-size {o.global_batch_size}: the checkpoint consumed "
                            f"{self.consumed_train} samples in {self.iteration} iterations (a different global batch)")
        self._build_data(train_state)
        # random state last: everything above may draw from it
        if resume and payload is not None and not c.checkpoint.no_load_rng and payload.get("rng_state"):
            set_rng_state(payload["rng_state"][0], str(ckpt.shard_path(d.tp_rank)))
        self.start_iteration = self.iteration
        self.history: List[Dict[str, Any]] = []
        self.evals: List[Dict[str, Any]] = []
        self.checkpoints: List[Path] = []

    def plugin(self, name: str) -> Optional[TrainerPlugin]:
        """The active plug-in called ``name`` (None when its flags did not turn it on)."""
        return next((p for p in self.plugins if p.name == name), None)

    def _build_model(self) -> torch.nn.Module:
        dtype = torch.bfloat16 if self.config.model.bf16 else torch.float32
        std = self.config.model.init_method_std
        if self.model_factory is not None:
            return self.model_factory(self.cfg, dtype, std)
        for plugin in self.plugins:
            model = plugin.build_model(self.cfg, dtype, std)
            if model is not None:
                return model
        from megatron_ext.models.build import build_model

        return build_model(self.cfg, dtype, init_method_std=std)

    def _load_weights(self, ckpt: CheckpointInfo, resume: bool) -> Optional[Dict[str, Any]]:
        """Weights (and plug-in tensors) of this rank; returns the rank's whole file when read."""
        ck, d = self.config.checkpoint, self.dinfo
        same_tp = ckpt.tensor_parallel_size == d.tp_size
        if resume and not same_tp and not ck.no_load_optim:
            raise ArgsError(f"--load {ck.load}: saved at TP={ckpt.tensor_parallel_size}, this run has "
                            f"TP={d.tp_size}; the optimizer state cannot be resharded (pass --no-load-optim "
                            "or --finetune)")
        payload = None
        if same_tp:
            payload = read_shard(ckpt, d.tp_rank)
            weights = payload["model"]
        else:
            _, weights = load_rank_state_dict(ckpt.iter_dir, d.tp_size, d.tp_rank)
        notes = load_model_weights(self.model, weights,
                                   allow_missing_logits=ck.finetune or ck.enable_partial_load or not resume,
                                   where=str(ckpt.iter_dir))
        self.log.print(f"> loaded {'checkpoint' if resume else 'weights'} from {ckpt.iter_dir}"
                       + (f" (skipped {len(notes['skipped'])} hard_mask entries)" if notes["skipped"] else "")
                       + (f" ({len(notes['fresh'])} mask logits start fresh)" if notes["fresh"] else ""))
        return payload

    def _build_optimizer(self) -> None:
        """AdamW and the schedule, after the weights are loaded (fp32 main copies start from them)."""
        o = self.config.optim
        claimed = [g for p in self.plugins for g in p.param_groups(self.model, o.lr, o.min_lr)]
        groups = param_groups(self.model, claimed)
        self.optimizer = TrainOptimizer(self.model, groups, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                                        eps=o.adam_eps, fused=platform.fused_optimizer_available(),
                                        dp_group=self.dp_group, model_parallel_group=self.mp_group,
                                        tp_rank=self.dinfo.tp_rank)
        self.scheduler = ParamScheduler(self.optimizer, lr_schedule(o), o.weight_decay)
        trainable = sum(e.param.numel() for e in self.optimizer.entries)
        counts = ", ".join(f"{g['name']}: {len(g['params'])} tensors" for g in self.optimizer.param_groups)
        self.log.print(f"> trainable parameters on this rank: {trainable:,} ({counts})")

    def _restore_optimizer(self, ckpt: CheckpointInfo, payload: Optional[Dict[str, Any]],
                           train_state: Dict[str, Any]) -> None:
        ck, o = self.config.checkpoint, self.config.optim
        where = str(ckpt.shard_path(self.dinfo.tp_rank))
        if ck.no_load_optim:
            # a fresh optimizer; the learning rate continues where the run left off
            self.scheduler.step(int(train_state.get("consumed_train_samples", 0)))
            return
        if "optimizer" not in payload:
            raise CheckpointError(f"{where}: no optimizer state (saved with --no-save-optim); pass "
                                  "--no-load-optim or --finetune")
        self.optimizer.load_state_dict(payload["optimizer"], where)
        policy = ("override" if o.override_opt_param_scheduler else
                  "checkpoint" if o.use_checkpoint_opt_param_scheduler else "check")
        if "opt_param_scheduler" in payload:
            self.scheduler.load_state_dict(payload["opt_param_scheduler"], policy, where)

    def _build_data(self, train_state: Dict[str, Any]) -> None:
        """Datasets (rank 0 first, so a shared index cache is written once) and this rank's streams."""
        c, d, log = self.config, self.dinfo, self.log
        o, lg = c.optim, c.logging
        counts = sample_counts(o.train_iters, o.global_batch_size, lg.eval_interval, lg.eval_iters)
        if platform.world_size() > 1 and c.data.data_cache_path is not None:
            datasets = build_datasets(c.data, counts, self.tokenizer) if platform.is_rank0() else None
            platform.barrier()
            if not platform.is_rank0():
                datasets = build_datasets(c.data, counts, self.tokenizer)
        else:
            datasets = build_datasets(c.data, counts, self.tokenizer)
        self.datasets = datasets
        mbs, dp, dpr = o.micro_batch_size, d.dp_size, d.dp_rank
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
        o = self.config.optim
        t = self.iteration  # completed iterations
        for plugin in self.plugins:
            plugin.begin_step(self.model, t, o.train_iters)
        self.optimizer.zero_grad()
        loss_sum = torch.zeros((), dtype=torch.float32, device=platform.device())
        for _ in range(o.num_microbatches):
            batch = self.train_stream.next()
            total, count = masked_loss_sums(self.model, batch)
            loss = total / count.clamp_min(1.0)
            (loss / o.num_microbatches).backward()
            loss_sum += loss.detach()
        for plugin in self.plugins:
            extra = plugin.extra_loss(self.model, t, o.train_iters)
            if extra is not None:
                extra.backward()
        for plugin in self.plugins:
            plugin.after_backward(self.model)
        self.optimizer.reduce_gradients()
        loss_avg = (loss_sum / o.num_microbatches).reshape(1)
        if self.dinfo.dp_size > 1:
            dist.all_reduce(loss_avg, group=self.dp_group)
            loss_avg /= self.dinfo.dp_size
        lr = self.scheduler.lr
        grad_norm = self.optimizer.clip_gradients(o.clip_grad)
        loss_value = float(loss_avg.item())
        if not math.isfinite(loss_value) or not math.isfinite(grad_norm):
            raise TrainingError(f"iteration {t + 1}: loss {loss_value} / grad norm {grad_norm} is not finite "
                                "(lower --lr, or check the data)")
        zeros = self.optimizer.count_zeros() if self.config.logging.log_num_zeros_in_grad else None
        self.optimizer.step()
        self.scheduler.step(o.global_batch_size)
        self.iteration += 1
        self.consumed_train += o.global_batch_size
        record = {"iteration": self.iteration, "loss": loss_value, "lr": lr, "grad_norm": grad_norm}
        if zeros is not None:
            record["num_zeros"] = zeros
        for plugin in self.plugins:
            record.update(plugin.step_record())
        return record

    # ------------------------------------------------------------------ evaluation, checkpoints
    def _evaluate(self, stream) -> Dict[str, float]:
        o = self.config.optim
        return evaluate(self.model, stream, self.config.logging.eval_iters, o.num_microbatches, self.dp_group)

    def run_evaluation(self, label: str) -> None:
        for name, stream in (("valid", self.valid_stream), ("eval_data", self.extra_stream)):
            if stream is None:
                continue
            result = self._evaluate(stream)
            self.evals.append({"iteration": self.iteration, "set": name, "when": label, **result})
            self.log.metrics(f"eval/{name}", self.iteration, {"loss": result["loss"], "ppl": result["ppl"]},
                             self.consumed_train)
            self.log.print(f" {name} loss at {label}: {result['loss']:.6E} | {name} PPL: {result['ppl']:.6E} |")

    def run_test(self) -> None:
        if self.datasets.test is None:
            return
        stream = BatchStream(self.datasets.test, "test", 0, self.config.optim.micro_batch_size, self.dinfo.dp_size,
                             self.dinfo.dp_rank)
        result = self._evaluate(stream)
        self.evals.append({"iteration": self.iteration, "set": "test", "when": "the end of training", **result})
        self.log.metrics("eval/test", self.iteration, {"loss": result["loss"], "ppl": result["ppl"]})
        self.log.print(f" test loss at the end of training: {result['loss']:.6E} | test PPL: {result['ppl']:.6E} |")

    def save(self) -> Path:
        ck = self.config.checkpoint
        t0 = time.perf_counter()
        train_state = {"iteration": self.iteration, "consumed_train_samples": self.consumed_train,
                       "consumed_valid_samples": self.valid_stream.consumed if self.valid_stream else 0,
                       "consumed_extra_valid_samples": self.extra_stream.consumed if self.extra_stream else 0}
        info_extra: Dict[str, Any] = {"training": {**train_state, "tag": self.config.logging.tag}}
        for plugin in self.plugins:
            section = plugin.checkpoint_info(self.iteration)
            if section:
                info_extra[plugin.name] = section
        path = save_training_checkpoint(
            ck.save, self.iteration, self.cfg, self.model, scheduler=self.scheduler,
            optimizer=None if ck.no_save_optim else self.optimizer, save_rng=not ck.no_save_rng,
            train_state=train_state, run_args=self.config.run_args(), info_extra=info_extra,
            tokenizer_source=self.tokenizer.path, tokenizer_type=self.tokenizer_type, keep_last=ck.keep_last)
        self.checkpoints.append(path)
        self.log.print(f"> saved checkpoint at iteration {self.iteration} to {path} "
                       f"({time.perf_counter() - t0:.2f} s)")
        return path

    # ------------------------------------------------------------------ logging
    def _log_interval(self, records: List[Dict[str, Any]], seconds: float) -> None:
        o = self.config.optim
        n = len(records)
        last = records[-1]
        per_iter = seconds / n
        loss = sum(r["loss"] for r in records) / n
        tokens_per_s = o.global_batch_size * self.config.data.seq_length / per_iter
        fields = [("consumed samples", self.consumed_train, "d"),
                  ("elapsed time per iteration (ms)", per_iter * 1000.0, ".1f"),
                  ("tokens/s", tokens_per_s, ".0f"),
                  ("learning rate", last["lr"], ".6E"),
                  ("global batch size", o.global_batch_size, "d"),
                  ("lm loss", loss, ".6E"),
                  ("grad norm", last["grad_norm"], ".3f"),
                  ("num zeros", last.get("num_zeros"), "d")]
        metrics = {"loss": loss, "lr": last["lr"], "grad_norm": last["grad_norm"], "ms_per_iter": per_iter * 1000.0,
                   "tokens_per_s": tokens_per_s}
        for plugin in self.plugins:
            for label, value, fmt, key in plugin.log_fields(self.model):
                fields.append((label, value, fmt))
                if key is not None and value is not None:
                    metrics[key] = value
        if "num_zeros" in last:
            metrics["num_zeros"] = last["num_zeros"]
        mem = platform.memory_stats()
        fields += [(k.replace("_", " "), v, ".1f") for k, v in mem.items()]
        metrics.update(mem)
        self.log.metrics("train", self.iteration, metrics, self.consumed_train)
        self.log.print(self.log.iteration_line(self.iteration, o.train_iters, fields))

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        o, lg, ck = self.config.optim, self.config.logging, self.config.checkpoint
        stop = _StopFlag(lg.exit_signal_handler)
        reason = "train_iters"
        saved_at = None
        try:
            window: List[Dict[str, Any]] = []
            platform.synchronize()
            t_window = time.perf_counter()
            while self.iteration < o.train_iters:
                record = self.train_step()
                self.history.append(record)
                window.append(record)
                if self.iteration % lg.log_interval == 0 or self.iteration == o.train_iters:
                    platform.synchronize()
                    now = time.perf_counter()
                    self._log_interval(window, now - t_window)
                    window = []
                if lg.eval_iters > 0 and self.iteration % lg.eval_interval == 0:
                    self.run_evaluation(f"iteration {self.iteration}")
                if ck.save is not None and ck.save_interval and self.iteration % ck.save_interval == 0:
                    self.save()
                    saved_at = self.iteration
                if lg.exit_signal_handler and stop.agreed():
                    reason = "signal"
                elif lg.exit_interval and self.iteration % lg.exit_interval == 0:
                    reason = "exit_interval"
                if reason != "train_iters":
                    if ck.save is not None and saved_at != self.iteration:
                        self.save()
                    self.log.print(f"> stopping at iteration {self.iteration} ({reason.replace('_', ' ')})")
                    break
                if not window:
                    platform.synchronize()
                    t_window = time.perf_counter()
            else:
                if ck.save is not None and self.iteration > 0 and saved_at != self.iteration \
                        and self.iteration > self.start_iteration:
                    self.save()
                if lg.eval_iters > 0:
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


def pretrain(argv: Sequence[str] | Namespace | None = None, plugins: Sequence[type] = (),
             model_factory: Optional[ModelFactory] = None) -> TrainResult:
    """Parse (unless given a parsed ``Namespace``), set up and train; see the module docstring."""
    args = argv if isinstance(argv, Namespace) else parse_args(argv, plugins)
    run = Run(args, plugins, model_factory)
    try:
        return run.train()
    finally:
        run.close()


__all__ = ["DataError", "ModelFactory", "Run", "TrainResult", "TrainingError", "pretrain"]
