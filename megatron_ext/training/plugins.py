"""How a method attaches to the generic trainer: the ``TrainerPlugin`` interface.

The trainer knows no sparsity, quantization or adapter method. The entry point
hands it plug-in *classes*; each may add its own flags, and ``from_args`` returns an
instance (with its frozen settings) when its flags ask for it, or None. The loop
then calls the hooks below at fixed points; every hook has a no-op default, so a
plug-in overrides only what it needs. Order within a step::

    begin_step -> [forward/backward per micro-batch] -> extra_loss (backward) -> after_backward
    -> gradient reduction, clipping, optimizer step -> step_record

In the spirit of torchtitan's model converters: ``build_model`` changes how the model
is built (megatron-core layer-spec overrides handed to the run's model factory, so the
method's layers go into whatever model the run builds), ``param_groups`` claims parameters
for the optimizer with their own learning-rate multipliers, and ``checkpoint_info``
/ ``load_checkpoint_info`` carry its state through checkpoints. The MaskLLM plug-in
(``megatron_ext.sparsity.plugin``) is the worked example.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_ext.models.config import LlamaConfig
from megatron_ext.training.arguments import ArgsError

# (console label, value, format, metric name or None): one field of the iteration line
LogField = Tuple[str, Any, str, Optional[str]]

# builds the model of a run, called as ``megatron_ext.models.build.build_model`` is:
# ``factory(cfg, params_dtype, init_method_std=std, linear_overrides=None or {slot: ModuleSpec})``
# -> this rank's GPTModel. ``Run(model_factory=...)`` replaces the default (``build_model``).
ModelFactory = Callable[..., torch.nn.Module]


class TrainerPlugin:
    """Base class: every hook is a no-op. Subclass it and override what the method needs."""

    name = "plugin"          # its section in checkpoint.json and in RunConfig.plugins

    # ------------------------------------------------------------------ flags and settings
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add the plug-in's flag group."""

    @classmethod
    def check_args(cls, args: argparse.Namespace) -> None:
        """Check the plug-in's flags (raise ``ArgsError`` naming the flag) and fill their defaults."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Optional["TrainerPlugin"]:
        """An instance when the flags turn the method on, else None."""
        return None

    @property
    def config(self) -> Any:
        """The plug-in's frozen settings (``RunConfig.plugins[name]``)."""
        return None

    def describe(self) -> str:
        """A few words for the start-up line (``"2:4 learnable sparsity (mask only)"``)."""
        return self.name

    # ------------------------------------------------------------------ the model
    def check_model(self, cfg: LlamaConfig, tp: int) -> None:
        """Refuse a model / TP this method cannot handle (raise ``ArgsError``)."""

    def build_model(self, cfg: LlamaConfig, params_dtype: torch.dtype, init_method_std: float,
                    build: ModelFactory) -> torch.nn.Module:
        """The run's model, built by ``build`` (the run's model factory): override to hand it
        layer-spec overrides (``build(cfg, params_dtype, init_method_std=..., linear_overrides=
        {...})``) and to adjust what it returns. Overriding this hook is what makes a plug-in
        one that builds the model; at most one active plug-in may."""
        return build(cfg, params_dtype, init_method_std=init_method_std)

    @classmethod
    def builds_model(cls) -> bool:
        """Whether the plug-in overrides ``build_model``."""
        return cls.build_model is not TrainerPlugin.build_model

    def after_load(self, model: torch.nn.Module, iteration: int, log) -> None:
        """After the checkpoint's weights are in (``iteration`` 0: a fresh run)."""

    def param_groups(self, model: torch.nn.Module, lr: float, min_lr: float) -> List[Dict[str, Any]]:
        """Optimizer groups for parameters this plug-in owns (``params``, ``name``, ``max_lr``,
        ``min_lr``, ``wd_mult``); the rest get the trainer's default groups."""
        return []

    # ------------------------------------------------------------------ one step
    def begin_step(self, model: torch.nn.Module, iteration: int, train_iters: int) -> None:
        """Before the step's first forward (``iteration``: steps completed so far)."""

    def extra_loss(self, model: torch.nn.Module, iteration: int, train_iters: int) -> Optional[torch.Tensor]:
        """A term added to the step's loss after the micro-batches (its backward runs once)."""
        return None

    def after_backward(self, model: torch.nn.Module) -> None:
        """After the step's last backward, before gradient reduction and clipping."""

    def step_record(self) -> Dict[str, Any]:
        """Values to keep in the step's history record."""
        return {}

    def log_fields(self, model: torch.nn.Module) -> Sequence[LogField]:
        """Fields of the iteration line (and metrics) at each ``--log-interval``."""
        return ()

    def schedules(self, iteration: int, train_iters: int) -> Dict[str, float]:
        """Values the plug-in schedules for iteration ``iteration + 1`` (after ``iteration``
        completed), by name: drawn by ``tools/plot_schedule.py`` before a run."""
        return {}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_info(self, iteration: int) -> Dict[str, Any]:
        """The plug-in's section of ``checkpoint.json`` (empty: none)."""
        return {}

    def load_checkpoint_info(self, info: Mapping[str, Any]) -> None:
        """What a resumed run reads back from its section."""


def build_plugins(classes: Sequence[type], args: argparse.Namespace) -> List[TrainerPlugin]:
    """The active plug-ins for the parsed flags; refuses two that both build the model
    (their layer specs would not compose)."""
    plugins = []
    for cls in classes:
        plugin = cls.from_args(args)
        if plugin is not None:
            plugins.append(plugin)
    builders = [p for p in plugins if p.builds_model()]
    if len(builders) > 1:
        names = " and ".join(f"{p.name} ({p.describe()})" for p in builders)
        raise ArgsError(f"plug-ins {names} both build the model (TrainerPlugin.build_model); the flags "
                        "turned both on, and only one may build it")
    return plugins
