"""MaskLLM as a trainer plug-in: learnable N:M masks through the generic trainer's hooks.

``--mask-only`` (masks only, weights frozen) or ``--N/--M`` (weights and masks) turn it
on. What it does at each hook (``megatron_ext.training.plugins``):

* ``build_model``: the run's model (its model factory's) with masked
  ``linear_qkv/proj/fc1/fc2`` (layer-spec overrides) sharing one ``SparsityState``;
  mask-only freezes everything else;
* ``after_load``: on a fresh run, ``--prior-mask`` logits (``--prior-strength``);
* ``param_groups``: the mask logits at ``lr x --lr-mult``, no weight decay;
* ``begin_step``: the Gumbel temperature and scale schedules move to the step, and the
  step keys the noise (every micro-batch and replica draws the same masks);
* ``extra_loss``: ``- lambda (1 - t/T) sum ||W * M~||^2`` (``--weight-reg``);
* ``after_backward``: the step's mask backward is finished and its caches freed;
* ``log_fields``: tau, kappa, regulariser, fraction of mask choices flipped, max probability;
* ``checkpoint_info``: a ``sparsity`` section in ``checkpoint.json``.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_ext.checkpoint import CheckpointError
from megatron_ext.models.config import LlamaConfig
from megatron_ext.training.arguments import ArgsError
from megatron_ext.training.plugins import LogField, ModelFactory, TrainerPlugin

# Flags that mean nothing without sparsity (named in the error when given alone).
SPARSITY_ONLY = (("hard", "--hard"), ("gumbel_temperature_range", "--gumbel-temperature-range"),
                 ("gumbel_scale_range", "--gumbel-scale-range"), ("prior_strength", "--prior-strength"),
                 ("prior_mask", "--prior-mask"), ("weight_reg", "--weight-reg"), ("lr_mult", "--lr-mult"))
DEFAULT_TAU = (4.0, 0.05)
DEFAULT_KAPPA = (1e2, 5e2)


def _number(name: str):
    def convert(text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}: {text!r} is not a number") from None
    return convert


@dataclass(frozen=True)
class MaskLLMConfig:
    N: int = 2
    M: int = 4
    mask_only: bool = True
    hard: bool = False                                   # straight-through one-hot samples
    tau_range: Tuple[float, float] = DEFAULT_TAU         # --gumbel-temperature-range
    kappa_range: Tuple[float, float] = DEFAULT_KAPPA     # --gumbel-scale-range
    prior_mask: Optional[str] = None
    prior_strength: Optional[float] = None
    weight_reg: float = 0.0
    lr_mult: float = 1.0
    seed: int = 1234                                     # keys the Gumbel noise and the initial logits


class MaskLLM(TrainerPlugin):
    name = "sparsity"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("learnable N:M sparsity (MaskLLM)")
        g.add_argument("--mask-only", action="store_true", help="train the mask logits only (weights frozen)")
        g.add_argument("--N", "--sparsity-n", dest="N", type=int, help="kept weights per group (default 2)")
        g.add_argument("--M", "--sparsity-m", dest="M", type=int, help="group size (default 4)")
        g.add_argument("--hard", action="store_true", help="straight-through one-hot mask samples")
        g.add_argument("--gumbel-temperature-range", nargs=2, type=_number("--gumbel-temperature-range"),
                       metavar=("START", "END"),
                       help=f"linear over the run (default {DEFAULT_TAU[0]} {DEFAULT_TAU[1]})")
        g.add_argument("--gumbel-scale-range", nargs=2, type=_number("--gumbel-scale-range"),
                       metavar=("START", "END"), help=f"logit scale kappa (default {DEFAULT_KAPPA[0]:g} "
                                                      f"{DEFAULT_KAPPA[1]:g})")
        g.add_argument("--prior-strength", type=float, help="needs --prior-mask")
        g.add_argument("--prior-mask", help="checkpoint (or .pt state dict) with hard_mask or mask_logits entries")
        g.add_argument("--weight-reg", type=float, help="sparse weight regulariser lambda")
        g.add_argument("--lr-mult", type=float, help="learning-rate multiplier of the mask logits")

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Fill the defaults when sparsity is on (``args.sparse``), refuse its flags when it is off."""
        args.sparse = bool(args.mask_only or args.N is not None or args.M is not None)
        if not args.sparse:
            given = [flag for name, flag in SPARSITY_ONLY if getattr(args, name) not in (None, False)]
            if given:
                raise ArgsError(f"{given[0]} applies to learnable sparsity: add --mask-only (masks only) or "
                                "--N/--M (weights and masks)")
            return
        for name, flag in (("N", "--N"), ("M", "--M"), ("lr_mult", "--lr-mult")):
            value = getattr(args, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ArgsError(f"{flag} must be > 0, got {value}")
        for name, flag in (("prior_strength", "--prior-strength"), ("weight_reg", "--weight-reg")):
            value = getattr(args, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ArgsError(f"{flag} must be >= 0, got {value}")
        args.N = 2 if args.N is None else args.N
        args.M = 4 if args.M is None else args.M
        if args.N >= args.M:
            raise ArgsError(f"--N {args.N} must be smaller than --M {args.M}")
        args.gumbel_temperature_range = tuple(args.gumbel_temperature_range or DEFAULT_TAU)
        args.gumbel_scale_range = tuple(args.gumbel_scale_range or DEFAULT_KAPPA)
        for flag, pair in (("--gumbel-temperature-range", args.gumbel_temperature_range),
                           ("--gumbel-scale-range", args.gumbel_scale_range)):
            if not all(v > 0 and math.isfinite(v) for v in pair):
                raise ArgsError(f"{flag} values must be finite and > 0, got {pair[0]} {pair[1]}")
        if args.prior_strength is not None and args.prior_mask is None:
            raise ArgsError("--prior-strength needs --prior-mask PATH (a one-shot checkpoint with hard_mask entries)")
        if args.prior_mask is not None and args.prior_strength is None:
            raise ArgsError("--prior-mask needs --prior-strength (e.g. 3.0)")
        if args.prior_mask is not None and not os.path.exists(args.prior_mask):
            raise ArgsError(f"--prior-mask {args.prior_mask}: no such checkpoint or file")
        args.weight_reg = args.weight_reg or 0.0
        args.lr_mult = 1.0 if args.lr_mult is None else args.lr_mult

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Optional["MaskLLM"]:
        if not getattr(args, "sparse", False):
            return None
        return cls(MaskLLMConfig(N=args.N, M=args.M, mask_only=args.mask_only, hard=args.hard,
                                 tau_range=tuple(args.gumbel_temperature_range),
                                 kappa_range=tuple(args.gumbel_scale_range), prior_mask=args.prior_mask,
                                 prior_strength=args.prior_strength, weight_reg=args.weight_reg,
                                 lr_mult=args.lr_mult, seed=args.seed))

    def __init__(self, config: MaskLLMConfig) -> None:
        from megatron_ext.sparsity.model import MaskMetrics

        self._config = config
        self.state = None
        self.metrics = MaskMetrics()
        self._last_reg: Optional[torch.Tensor] = None

    @property
    def config(self) -> MaskLLMConfig:
        return self._config

    def describe(self) -> str:
        c = self._config
        return f"{c.N}:{c.M} learnable sparsity{' (mask only)' if c.mask_only else ''}"

    # ------------------------------------------------------------------ the model
    def check_model(self, cfg: LlamaConfig, tp: int) -> None:
        M = self._config.M
        checks = (("hidden size", cfg.hidden_size),
                  ("attention width / TP", cfg.num_attention_heads * cfg.head_dim // tp),
                  ("ffn hidden size / TP", cfg.ffn_hidden_size // tp))
        for what, size in checks:
            if size % M:
                raise ArgsError(f"--M {M}: the model's {what} = {size} is not a multiple of M "
                                f"(masked linears group M inputs; TP={tp})")

    def build_model(self, cfg: LlamaConfig, params_dtype: torch.dtype, init_method_std: float,
                    build: ModelFactory) -> torch.nn.Module:
        from megatron_ext.sparsity.model import build_sparse_model
        from megatron_ext.sparsity.state import SparsityState

        c = self._config
        self.state = SparsityState(N=c.N, M=c.M, seed=c.seed, tau_range=c.tau_range, kappa_range=c.kappa_range,
                                   hard=c.hard)
        return build_sparse_model(cfg, c.N, c.M, params_dtype, mask_only=c.mask_only, state=self.state,
                                  init_method_std=init_method_std, build=build)

    def after_load(self, model: torch.nn.Module, iteration: int, log) -> None:
        c = self._config
        if c.prior_mask is None:
            return
        if iteration > 0:
            log.print(f"> resuming at iteration {iteration}: --prior-mask not applied again")
            return
        from megatron_ext.sparsity.masks import apply_prior, load_prior_masks

        try:
            n = apply_prior(model, load_prior_masks(c.prior_mask, c.N, c.M), c.prior_strength)
        except (ValueError, FileNotFoundError, CheckpointError) as e:
            raise ArgsError(f"--prior-mask {c.prior_mask}: {e}") from None
        log.print(f"> prior masks of {n} layers injected with strength {c.prior_strength}")

    def param_groups(self, model: torch.nn.Module, lr: float, min_lr: float) -> List[Dict[str, Any]]:
        from megatron_ext.checkpoint import LOGITS_SUFFIX

        mult = self._config.lr_mult
        logits = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(LOGITS_SUFFIX)]
        return [{"name": "mask_logits", "params": logits, "wd_mult": 0.0, "max_lr": lr * mult,
                 "min_lr": min_lr * mult, "main_grad": True}] if logits else []

    # ------------------------------------------------------------------ one step
    def begin_step(self, model: torch.nn.Module, iteration: int, train_iters: int) -> None:
        self.state.update(iteration, train_iters)

    def extra_loss(self, model: torch.nn.Module, iteration: int, train_iters: int) -> Optional[torch.Tensor]:
        lam = self._config.weight_reg
        self._last_reg = None
        if lam <= 0:
            return None
        from megatron_ext.sparsity.model import sparse_weight_norm
        from megatron_ext.sparsity.state import weight_reg_coefficient

        reg = sparse_weight_norm(model)
        self._last_reg = reg.detach()
        coeff = weight_reg_coefficient(lam, iteration, train_iters)
        return -coeff * reg if coeff > 0 else None

    def after_backward(self, model: torch.nn.Module) -> None:
        from megatron_ext.sparsity.model import finish_mask_backward

        finish_mask_backward(model)

    def step_record(self) -> Dict[str, Any]:
        return {"tau": self.state.tau, "kappa": self.state.kappa}

    def schedules(self, iteration: int, train_iters: int) -> Dict[str, float]:
        from megatron_ext.sparsity.state import linear_schedule

        c = self._config
        return {"Gumbel temperature tau": linear_schedule(*c.tau_range, iteration, train_iters),
                "logit scale kappa": linear_schedule(*c.kappa_range, iteration, train_iters)}

    def log_fields(self, model: torch.nn.Module) -> Sequence[LogField]:
        m = self.metrics(model, weight_reg=None if self._last_reg is None else self._last_reg.item())
        flips = m["mask_flip_fraction"]
        if flips is not None and math.isnan(flips):
            flips = None  # the first log of a run: no earlier masks to compare with
        return [("tau", m["tau"], ".4f", "tau"), ("kappa", m["kappa"], ".1f", "kappa"),
                ("weight reg", m["weight_reg"], ".6E", "weight_reg"),
                ("mask flips", flips, ".6f", "mask_flip_fraction"),
                ("mask max prob", m["mask_max_prob"], ".4f", "mask_max_prob")]

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_info(self, iteration: int) -> Dict[str, Any]:
        c = self._config
        return {"method": "maskllm", "N": c.N, "M": c.M, "mask_only": c.mask_only, "hard": c.hard,
                "trained_iterations": iteration}
