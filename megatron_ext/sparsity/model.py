"""Sparse LLaMA models: building, mask-only training setup, regulariser, metrics."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from megatron_ext.checkpoint import LOGITS_SUFFIX
from megatron_ext.models.build import build_model
from megatron_ext.models.config import LlamaConfig
from megatron_ext.models.spec import DEFAULT_LINEARS
from megatron_ext.sparsity.layers import (MaskedColumnParallelLinear, MaskedRowParallelLinear, _MaskedLinearMixin,
                                          finish_layers)
from megatron_ext.sparsity.state import SparsityState

# every linear slot of the layer spec, masked the way it is split (column- or row-parallel)
_MASKED = {ColumnParallelLinear: MaskedColumnParallelLinear, RowParallelLinear: MaskedRowParallelLinear}
MASKED_SLOTS = {slot: _MASKED[cls] for slot, cls in DEFAULT_LINEARS.items()}


def masked_linears(model: torch.nn.Module) -> List[Tuple[str, _MaskedLinearMixin]]:
    """``(module name, layer)`` for every masked linear, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _MaskedLinearMixin)]


def finish_mask_backward(model: torch.nn.Module) -> None:
    """Complete the step's mask gradients and free the step's per-layer tensors.

    Call once per training step, after the last micro-batch's backward and the
    regulariser's, before the data-parallel gradient reduction, clipping and the optimizer
    step. The masked linears accumulate ``dL/d(weight * mask)`` over the step's micro-batches
    (the draw is the same for all of them); this runs the mask backward once on the sum
    (one Triton pass per layer on the GPU): every ``mask_logits`` gradient (into its
    ``main_grad`` where it carries one, else ``.grad``) and, when the weights train, every
    ``weight.grad`` is then complete. It frees the cached masked weights and the sums, so the
    optimizer step runs without them (the next forward draws again). A no-op when nothing
    is pending (dense or evaluation modes, no backward since the last call).
    """
    finish_layers([layer for _, layer in masked_linears(model)])


def _canonical_name(name: str, layer_numbers: Dict[str, int]) -> str:
    """State-dict prefix with the global decoder-layer index and without wrapper prefixes."""
    parent = max((p for p in layer_numbers if name.startswith(p + ".")), key=len, default=None)
    if parent is not None:
        container = parent.rsplit(".", 1)[0]
        name = f"{container}.{layer_numbers[parent] - 1}{name[len(parent):]}"
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def assign_layer_names(model: torch.nn.Module) -> List[str]:
    """Name every masked linear by its state-dict prefix (global layer index): the key of
    its noise and initial logits. Returns the names."""
    layer_numbers = {n: m.layer_number for n, m in model.named_modules() if isinstance(m, TransformerLayer)}
    names, ids = [], {}
    for name, layer in masked_linears(model):
        canonical = _canonical_name(name, layer_numbers)
        layer.set_layer_name(canonical)
        if layer.layer_id in ids:
            raise RuntimeError(f"masked linears {ids[layer.layer_id]!r} and {canonical!r} hash to the same id")
        ids[layer.layer_id] = canonical
        names.append(canonical)
    return names


def sparsity_state(model: torch.nn.Module) -> SparsityState:
    """The ``SparsityState`` the masked linears of ``model`` share."""
    layers = masked_linears(model)
    if not layers:
        raise ValueError("model has no masked linears")
    state = layers[0][1].sparsity
    if any(layer.sparsity is not state for _, layer in layers):
        raise RuntimeError("masked linears of one model hold different SparsityState objects")
    return state


def build_sparse_model(cfg: LlamaConfig, N: int = 2, M: int = 4, params_dtype: torch.dtype = torch.float32,
                       mask_only: bool = True, *, state: Optional[SparsityState] = None, seed: int = 1234,
                       hard: bool = False, build: Callable[..., torch.nn.Module] = build_model,
                       **build_kwargs: Any):
    """Our LLaMA ``GPTModel`` with masked ``linear_qkv/linear_proj/linear_fc1/linear_fc2``.

    Embeddings and the output layer stay dense. The mask logits are fp32 whatever
    ``params_dtype`` and start ~ N(0, state.init_std) as a function of (seed, layer
    name, global group), so every tensor-parallel size starts from the same logits.
    ``state`` defaults to ``SparsityState(N, M, seed=seed, hard=hard)``; it is shared
    by the layers and reachable as ``model.sparsity_state``. ``mask_only`` freezes
    everything but the logits (``freeze_for_mask_only``). ``build`` makes the model from
    the masked linears' ``linear_overrides`` (``megatron_ext.models.build.build_model``, or a
    trainer's model factory called the same way); other keyword arguments go to it.
    """
    if state is None:
        state = SparsityState(N=N, M=M, seed=seed, hard=hard)
    elif (state.N, state.M) != (N, M):
        raise ValueError(f"state is {state.N}:{state.M} sparsity, build_sparse_model asked for {N}:{M}")
    if "linear_overrides" in build_kwargs or "layer_spec" in build_kwargs:
        raise ValueError("build_sparse_model sets the linear layers itself (no linear_overrides / layer_spec)")
    overrides = {slot: ModuleSpec(module=cls, params={"sparsity": state, "name": slot})
                 for slot, cls in MASKED_SLOTS.items()}
    model = build(cfg, params_dtype, linear_overrides=overrides, **build_kwargs)
    assign_layer_names(model)
    for _, layer in masked_linears(model):
        if layer.sparsity is not state:
            raise RuntimeError("a masked linear was built with a copy of the sparsity state")
        layer.reset_mask_logits()  # fp32 again: build_model casts every parameter to params_dtype
    model.sparsity_state = state
    if mask_only:
        freeze_for_mask_only(model)
    return model


def freeze_for_mask_only(model: torch.nn.Module) -> int:
    """``requires_grad=False`` on every parameter but the mask logits (weights, norms,
    embeddings, output layer). Returns the number of trainable logit tensors."""
    trainable = 0
    for name, p in model.named_parameters():
        is_logits = name.endswith(LOGITS_SUFFIX)
        p.requires_grad_(is_logits)
        if p.grad is not None and not is_logits:
            p.grad = None
        trainable += is_logits
    if not trainable:
        raise ValueError("mask-only training: the model has no mask_logits")
    return trainable


def mask_param_groups(model: torch.nn.Module, lr: float, lr_mult: float = 1.0,
                      weight_decay: float = 0.0) -> List[Dict[str, Any]]:
    """Optimizer parameter groups over the parameters that require a gradient.

    Mask logits: ``lr * lr_mult``, no weight decay. Other trainable parameters (none
    under mask-only): ``lr`` with ``weight_decay`` for matrices, none for vectors
    (norms, biases). Frozen parameters are left out, so the optimizer keeps no state
    for them.
    """
    if not lr > 0 or not lr_mult > 0:
        raise ValueError(f"learning rate and --lr-mult must be > 0, got lr={lr}, lr_mult={lr_mult}")
    logits, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(LOGITS_SUFFIX):
            logits.append(p)
        elif p.dim() >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"name": "mask_logits", "params": logits, "lr": lr * lr_mult, "weight_decay": 0.0},
              {"name": "weights", "params": decay, "lr": lr, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def sparse_weight_norm(model: torch.nn.Module) -> torch.Tensor:
    """This rank's ``sum ||W * M~||^2`` over the masked linears, with the masks of the
    current step (the same draw as the forward: the noise is keyed by the step).

    The gradient reaches the logits only. Each tensor-parallel rank holds its
    shards' part; the gradient of the part is that of the total for its own logits.
    The trainer subtracts ``weight_reg_coefficient(lambda, t, T) * value`` from the loss.
    """
    layers = masked_linears(model)
    if not layers:
        raise ValueError("model has no masked linears")
    return torch.stack([layer.masked_sq_norm().float() for _, layer in layers]).sum()


def _model_parallel_group():
    if torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_model_parallel_group()
        if torch.distributed.get_world_size(group) > 1:
            return group
    return None


class MaskMetrics:
    """Mask statistics for logging; keeps each layer's previous argmax to count flips.

    Calling it returns ``tau``, ``kappa``, ``weight_reg`` (the given local value summed
    over the model-parallel ranks, or None), ``mask_flip_fraction`` (groups whose
    argmax changed since the previous call / all groups; NaN on the first call),
    ``mask_max_prob`` (mean over all groups of max softmax(kappa * logits)) and
    ``mask_groups``. Counts and sums are all-reduced over the model-parallel group
    (tensor-parallel shards hold different groups; data-parallel replicas hold the
    same ones, so they are not added again). Every model-parallel rank must call it.
    """

    def __init__(self) -> None:
        self._previous: Dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, weight_reg: Optional[Any] = None) -> Dict[str, Any]:
        state = sparsity_state(model)
        layers = masked_linears(model)
        device = layers[0][1].mask_logits.device
        changed = torch.zeros((), dtype=torch.float64, device=device)
        groups = torch.zeros((), dtype=torch.float64, device=device)
        max_prob = torch.zeros((), dtype=torch.float64, device=device)
        first = False
        for name, layer in layers:
            key = layer.layer_name or name
            choice = layer.choice()
            probs = torch.softmax(state.kappa * layer.mask_logits.float(), dim=-1)
            max_prob += probs.amax(dim=-1).double().sum()
            groups += choice.numel()
            prev = self._previous.get(key)
            if prev is None or prev.shape != choice.shape:
                first = True
            else:
                changed += (prev != choice).sum()
            small = torch.int16 if layer.mask_logits.shape[-1] <= 32767 else torch.int32
            self._previous[key] = choice.to(small)
        reg = torch.as_tensor(0.0 if weight_reg is None else float(weight_reg), dtype=torch.float64,
                              device=device)
        stats = torch.stack([changed, groups, max_prob, reg, torch.tensor(float(first), dtype=torch.float64,
                                                                           device=device)])
        group = _model_parallel_group()
        if group is not None:
            torch.distributed.all_reduce(stats, group=group)
        changed, groups, max_prob, reg, first_any = stats.tolist()
        return {
            "tau": state.tau,
            "kappa": state.kappa,
            "weight_reg": None if weight_reg is None else reg,
            "mask_flip_fraction": math.nan if first_any else changed / groups,
            "mask_max_prob": max_prob / groups,
            "mask_groups": int(groups),
        }

