"""Masked Column/Row parallel linears: megatron-core's layers with learnable N:M masks.

Each layer keeps megatron-core's ``weight`` and adds ``mask_logits``
``[out_local, in_local // M, C]`` (fp32): for every group of ``M`` consecutive
weights along the input dimension, one logit per candidate N:M mask. The forward
hands megatron-core's linear the effective weight ``weight * mask``:

* ``SparsityState.mode == "train"`` and the module in training mode: a
  Gumbel-softmax sample (``gumbel.masked_weight``, noise keyed by the global group
  index so any tensor-parallel split draws the same masks);
* ``"eval"`` or a module in ``eval()``: the argmax hard N:M mask;
* ``"dense"``: the weight unchanged.

Training draws one sample per step and runs the mask backward once per step. Every
micro-batch of a step draws the same noise (it is keyed by ``SparsityState.step``), so:

* forward: the first forward of the step builds ``weight * mask`` without autograd
  (``gumbel.sample_pass``: one Triton pass on the GPU) and caches it on the layer; each
  micro-batch gets a fresh autograd output aliasing the cache;
* backward: each micro-batch's ``dL/d(weight * mask)`` (megatron-core's weight-gradient
  GEMM output) is added into a per-layer fp32 sum, and the regulariser's coefficient into a
  scalar; nothing else runs per micro-batch, as for a dense layer's gradient accumulation;
* once per step, ``finish_mask_backward()`` (``model.finish_mask_backward(model)`` for all
  layers) runs ``gumbel.backward_pass`` on those sums (one Triton pass: the logits' gradient
  into their ``main_grad`` or ``.grad``, the weight's when it trains) and frees the step's
  tensors. The backward is linear in ``dL/d(weight * mask)`` and the coefficient for a
  fixed draw, so this is the per-micro-batch gradient summed, up to fp32 rounding.

Gradients are complete only after ``finish_mask_backward``: the trainer calls it after the
step's last backward (the regulariser's included) and before the gradient reduction and
clipping. As a safety net it also runs before any ``torch.optim`` step, when the layer
leaves training mode (``module.eval()``), on ``clear_mask_cache()``, and before a new
draw replaces the cached one, so no accumulated gradient is lost or left stale.

The cache is keyed by the step, tau, kappa, hard, the logits and the weight (storage and
version) and the count of optimizer steps taken in the process (a fused optimizer does not
bump version counters), so an optimizer step or any in-place change of the logits or the
weight rebuilds it (finishing a pending backward first; a logit or weight changed in place
while a backward is pending is an error, as autograd's own version check would be).

Memory per masked weight, from the step's first forward to ``finish_mask_backward``: the
cached masked weight in the weight's dtype (2 bytes in bf16; megatron-core's linear saves
this very tensor for its backward, so activations hold no other copy) and the fp32 sum of
``dL/d(weight * mask)`` (4 bytes; with a single micro-batch per step the micro-batch's own
gradient is kept instead, 2 bytes in bf16). Both are freed by ``finish_mask_backward``, so
the optimizer step runs without them. The backward keeps nothing else: noise and softmax
are recomputed from the counter-based hash.

Implementation: one production path per device (``gumbel.use_kernels``: the Triton kernels
on the platform's GPU, the same arithmetic as PyTorch ops elsewhere). ``mask_impl`` exists
for comparisons only: ``"kernel"`` / ``"torch"`` force one implementation of the two passes,
``"reference"`` is the plain autograd oracle (``gumbel.gumbel_soft_mask`` per micro-batch,
gradients complete after each backward).

When neither the weight nor the logits need a gradient, megatron-core's
frozen-weight path runs (no weight-gradient GEMM). When only the logits train
(mask-only), the one weight-shaped GEMM left, ``dL/d(weight * mask)``, is what the
mask gradient is made of; ``weight.grad`` is never formed.

Groups stay whole on every tensor-parallel shard: Column layers keep the whole
input dimension, Row layers split it, so ``in / TP`` must be a multiple of ``M``.
"""
from __future__ import annotations

import weakref
import zlib
from typing import List, Optional, Tuple

import torch
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                  set_tensor_model_parallel_attributes)
from megatron.core.utils import get_pg_rank, get_pg_size
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from megatron_ext.models.config import ConfigError
from megatron_ext.sparsity import gumbel
from megatron_ext.sparsity.nm import candidates, check_nm, masks_from_choice
from megatron_ext.sparsity.state import SparsityState


def layer_id_for(name: str) -> int:
    """The noise / init stream id of the masked linear named ``name`` (its state-dict prefix)."""
    return zlib.crc32(name.encode("utf-8"))


def _strided_rows(out_local: int, stride: int, rank: int, world: int) -> torch.Tensor:
    """Global rows of a column-parallel shard: megatron splits ``out`` into ``stride * world``
    chunks and rank ``r`` holds chunks ``r, r + world, ...`` (fc1: [gate_r; up_r])."""
    chunk = out_local // stride
    local = torch.arange(out_local, dtype=torch.int64)
    return ((local // chunk) * world + rank) * chunk + local % chunk


class _OptimizerSteps:
    """Count of ``torch.optim`` optimizer steps in this process: part of the cache key, since
    fused optimizers update parameters without bumping their version counters. Before any
    optimizer step, the mask backwards still pending are finished (a training loop that
    never calls ``finish_mask_backward`` still steps on complete gradients)."""

    count = 0
    _hooks = None

    @classmethod
    def current(cls) -> int:
        if cls._hooks is None:
            cls._hooks = (register_optimizer_step_pre_hook(cls._finish_pending),
                          register_optimizer_step_post_hook(cls._count))
        return cls.count

    @classmethod
    def _count(cls, *_args) -> None:
        cls.count += 1

    @staticmethod
    def _finish_pending(*_args) -> None:
        if _PENDING:
            finish_layers(list(_PENDING))


# layers holding gradients accumulated for a draw whose mask backward has not run yet
_PENDING: "weakref.WeakSet[_MaskedLinearMixin]" = weakref.WeakSet()


class _StepSample:
    """One layer's draw for one step: the masked weight (no autograd), its squared norm, and
    what the step's backwards accumulated for it until ``finish_mask_backward``."""

    __slots__ = ("key", "draw", "masked", "sq_norm", "grad_sum", "owns_sum", "reg_sum", "need_weight",
                 "need_logits", "finished")

    def __init__(self, key: tuple, draw: gumbel.Draw, masked: torch.Tensor, sq_norm: torch.Tensor) -> None:
        self.key, self.draw, self.masked, self.sq_norm = key, draw, masked, sq_norm
        self.grad_sum: Optional[torch.Tensor] = None   # sum over micro-batches of dL/d(weight * mask)
        self.owns_sum = False                          # grad_sum is our fp32 tensor (not autograd's)
        self.reg_sum: Optional[torch.Tensor] = None    # sum of the regulariser's coefficients (fp32 scalar)
        self.need_weight = self.need_logits = False
        self.finished = False

    def pending(self) -> bool:
        return self.grad_sum is not None or self.reg_sum is not None

    def add(self, grad: Optional[torch.Tensor], reg: Optional[torch.Tensor]) -> None:
        if grad is not None:
            if self.grad_sum is None:
                self.grad_sum = grad  # one micro-batch: its own gradient, no copy
            else:
                if not self.owns_sum:
                    self.grad_sum = self.grad_sum.to(torch.float32, copy=True)
                    self.owns_sum = True
                self.grad_sum.add_(grad)
        if reg is not None:
            reg = reg.detach().reshape(()).to(torch.float32)
            self.reg_sum = reg if self.reg_sum is None else self.reg_sum + reg


class _StepMaskedWeight(torch.autograd.Function):
    """A micro-batch's view of the step's masked weight; its backward only accumulates."""

    @staticmethod
    def forward(ctx, weight, logits, masked, layer, entry):
        ctx.layer, ctx.entry = layer, entry
        return masked.view_as(masked)  # a fresh output aliasing the cache

    @staticmethod
    def backward(ctx, grad_out):
        ctx.layer._accumulate(ctx.entry, grad_out, None, *ctx.needs_input_grad[:2])
        return None, None, None, None, None


class _StepSqNorm(torch.autograd.Function):
    """The regulariser's ``sum ||W * M~||^2`` of the step's draw; its backward only accumulates."""

    @staticmethod
    def forward(ctx, logits, value, layer, entry):
        ctx.layer, ctx.entry = layer, entry
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.layer._accumulate(ctx.entry, None, grad, False, True)
        return None, None, None, None


def finish_layers(layers) -> None:
    """Run the pending mask backward of ``layers`` and free their step's tensors; gradients
    that go through autograd (``.grad`` and its hooks) are delivered in one engine call."""
    params, grads = [], []
    for layer in layers:
        for p, g in layer._finish():
            params.append(p)
            grads.append(g)
        layer._release()
    if params:
        with torch.enable_grad():
            torch.autograd.backward(params, grads)


class _LateEntry:
    """A layer finishing one given draw (a backward that arrived after its step was finished)."""

    def __init__(self, layer, entry) -> None:
        self.layer, self.entry = layer, entry

    def _finish(self):
        return self.layer._finish(self.entry)

    def _release(self) -> None:
        pass


MASK_IMPLS = (None, "kernel", "torch", "reference")


def _check_state(sparsity, name: str) -> None:
    if not isinstance(sparsity, SparsityState):
        raise TypeError(f"{name}: sparsity must be a SparsityState, got {type(sparsity).__name__}")


class _MaskedLinearMixin:
    """What the two masked linears share; ``_setup_mask`` runs after megatron's constructor."""

    def _setup_mask(self, sparsity: SparsityState, name: str, in_local: int, in_global: int,
                    rows: torch.Tensor, col_offset: int, partition_dim: int, stride: int) -> None:
        if self.config.gradient_accumulation_fusion:
            raise ConfigError(f"{name}: masked linears need gradient_accumulation_fusion=False "
                              "(the fused wgrad writes into weight.main_grad, not the masked weight)")
        N, M = sparsity.N, sparsity.M
        tp = in_global // in_local
        if in_local % M:
            raise ConfigError(
                f"{name} ({type(self).__name__}): input size per tensor-parallel rank {in_local} "
                f"(input {in_global} / TP {tp}) is not a multiple of M={M} for {N}:{M} sparsity")
        self.sparsity = sparsity
        self.name = name
        self.N, self.M = N, M
        self.layer_name: Optional[str] = None
        self.layer_id: Optional[int] = None
        # None: the device's production path (gumbel.use_kernels). For comparisons only:
        # "kernel" / "torch" force one implementation, "reference" the plain autograd oracle
        self.mask_impl: Optional[str] = None
        self._mask_cache: Optional[_StepSample] = None
        self._noise_cache: tuple = (None, 0)   # ((seed, step, layer id), its noise key): hashed once a step
        device = self.weight.device
        cands = candidates(N, M, device=device)
        groups = in_local // M
        self.register_buffer("candidates", cands, persistent=False)
        self.register_buffer("_group_rows", rows.to(device), persistent=False)
        self.register_buffer("_group_cols", col_offset + torch.arange(groups, dtype=torch.int64, device=device),
                             persistent=False)
        self.groups_per_row = in_global // M
        self.mask_logits = torch.nn.Parameter(
            torch.zeros(self.weight.shape[0], groups, cands.shape[0], dtype=torch.float32, device=device))
        set_tensor_model_parallel_attributes(self.mask_logits, True, partition_dim, stride)
        setattr(self.mask_logits, "allreduce", True)

    # ------------------------------------------------------------------ identity and init
    def set_layer_name(self, name: str) -> None:
        """Name the layer (its state-dict prefix): keys its noise and initial logits."""
        self.layer_name = name
        self.layer_id = layer_id_for(name)

    def group_index(self) -> gumbel.GroupIndex:
        return gumbel.GroupIndex(self._group_rows, self._group_cols, self.groups_per_row)

    def _require_id(self) -> int:
        if self.layer_id is None:
            raise RuntimeError(f"{self.name}: masked linear has no layer name; build the model with "
                               "build_sparse_model or call megatron_ext.sparsity.assign_layer_names(model)")
        return self.layer_id

    @torch.no_grad()
    def reset_mask_logits(self) -> None:
        """Logits ~ N(0, init_std), a function of (seed, layer name, global group, candidate)."""
        self.clear_mask_cache()
        key = gumbel.init_key(self.sparsity.seed, self._require_id())
        values = gumbel.normal_logits(key, self.group_index(), self.mask_logits.shape[:-1],
                                      self.mask_logits.shape[-1], self.sparsity.init_std, self.mask_logits.device)
        self.mask_logits.data = values.to(self.mask_logits.device)

    # ------------------------------------------------------------------ masks
    @torch.no_grad()
    def choice(self) -> torch.Tensor:
        """Argmax candidate per group ``[out_local, in_local // M]``."""
        return self.mask_logits.argmax(dim=-1)

    @torch.no_grad()
    def hard_mask(self) -> torch.Tensor:
        """The eval mask: bool ``[out_local, in_local]``, exactly N kept per group."""
        return masks_from_choice(self.choice(), self.candidates)

    def _sampling(self) -> bool:
        return self.sparsity.mode == "train" and self.training

    def _noise_key(self) -> int:
        ident = (self.sparsity.seed, self.sparsity.step, self._require_id())
        if self._noise_cache[0] != ident:  # every forward asks (the step cache key): hash once per step
            self._noise_cache = (ident, gumbel.noise_key(*ident))
        return self._noise_cache[1]

    def _kernel(self) -> bool:
        impl = self.mask_impl
        if impl not in MASK_IMPLS:
            raise ValueError(f"{self.layer_name or self.name}: mask_impl must be one of {MASK_IMPLS}, got {impl!r}")
        if impl is None:
            return gumbel.use_kernels(self.weight, self.mask_logits, self.group_index())
        return impl == "kernel"

    def _draw(self) -> tuple:
        """This step's draw as ``(candidates, tau, kappa, noise key, group index, hard, kernel)``:
        the arguments of ``gumbel.masked_weight`` after the weight and the logits."""
        s = self.sparsity
        return self.candidates, s.tau, s.kappa, self._noise_key(), self.group_index(), s.hard, self._kernel()

    def _cache_key(self, w: torch.Tensor, lg: torch.Tensor) -> tuple:
        """What the step's draw depends on (the noise key is a function of seed, step and layer
        id). Asked by every micro-batch's forward: attribute reads only, no calls of our own. The
        last four entries are what ``_finish`` checks for an in-place change."""
        s = self.sparsity
        return (s.step, s.seed, self.layer_id, s.tau, s.kappa, s.hard, _OptimizerSteps.count, self.mask_impl,
                w.dtype, w.data_ptr(), w._version, lg.data_ptr(), lg._version)

    def _step_sample(self, w: torch.Tensor, lg: torch.Tensor) -> _StepSample:
        """This step's ``weight * mask`` and its squared norm, built on first use (no autograd);
        ``w`` and ``lg`` are this layer's weight and logits."""
        key = self._cache_key(w, lg)
        entry = self._mask_cache
        if entry is None or entry.key != key:
            _OptimizerSteps.current()  # counting optimizer steps from the first draw on
            self.clear_mask_cache()  # finishes a pending backward of the previous draw and frees it
            draw = gumbel.Draw(*self._draw())
            masked, sq = gumbel.sample_pass(w.detach(), lg.detach(), draw, True)
            entry = self._mask_cache = _StepSample(key, draw, masked, sq)
        return entry

    # ------------------------------------------------------------------ the step's mask backward
    def _accumulate(self, entry: _StepSample, grad, reg, need_weight: bool, need_logits: bool) -> None:
        late = entry.finished  # a backward after the step was finished: run it at once
        joined = entry.pending()  # already in _PENDING since this draw's first backward
        entry.finished = False
        entry.add(grad, reg)
        entry.need_weight |= bool(need_weight)
        entry.need_logits |= bool(need_logits)
        if late:
            finish_layers([_LateEntry(self, entry)])
        elif not joined:
            _PENDING.add(self)

    def _finish(self, entry: Optional[_StepSample] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Run the mask backward of ``entry`` (default: the cached draw) on what was accumulated;
        the logits' gradient goes into their ``main_grad`` when they carry one. Returns the
        ``(parameter, gradient)`` pairs left for autograd to deliver (``finish_layers``)."""
        if entry is None:
            _PENDING.discard(self)
            entry = self._mask_cache
        if entry is None or entry.finished:
            return []
        entry.finished = True
        if not entry.pending():
            return []
        w, lg = self.weight, self.mask_logits
        if (w.data_ptr(), w._version, lg.data_ptr(), lg._version) != entry.key[-4:]:
            raise RuntimeError(f"{self.layer_name or self.name}: weight or mask logits changed in place while the "
                               "step's mask backward was pending; call finish_mask_backward(model) after the "
                               "step's last backward, before changing them")
        grad, reg, need_logits = entry.grad_sum, entry.reg_sum, entry.need_logits
        need_weight = entry.need_weight and grad is not None
        entry.grad_sum = entry.reg_sum = None
        entry.owns_sum = entry.need_weight = entry.need_logits = False
        out = []
        if need_logits:
            buffer = gumbel.grad_buffer(lg)
            grad_weight, grad_logits = gumbel.backward_pass(grad, w.detach(), lg.detach(), entry.draw, need_weight,
                                                            reg=reg, buffer=buffer)
            if buffer is None:
                out.append((lg, grad_logits.to(lg.dtype)))
        elif need_weight:
            grad_weight = grad * gumbel.mask_of(w.detach(), lg.detach(), entry.draw)
        if need_weight:
            out.append((w, grad_weight.to(w.dtype)))
        return out

    def finish_mask_backward(self) -> None:
        """Complete this layer's gradients for the step (see the module docstring) and free
        the step's tensors; ``megatron_ext.sparsity.finish_mask_backward(model)`` does all layers."""
        finish_layers([self])

    def clear_mask_cache(self) -> None:
        """Finish a pending mask backward, then free the cached masked weight of the current
        step (rebuilt on the next forward)."""
        if self._mask_cache is not None:
            finish_layers([self])

    def _release(self) -> None:
        self._mask_cache = None

    def train(self, mode: bool = True):
        if not mode:
            self.clear_mask_cache()
        return super().train(mode)

    # ------------------------------------------------------------------ forward
    def effective_weight(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight megatron-core's linear multiplies by, for the current mode."""
        own = self.weight
        weight = own if weight is None else weight
        if not (self.training and self.sparsity.mode == "train"):  # not self._sampling()
            self.clear_mask_cache()
            if self.sparsity.mode == "dense":
                return weight
            return weight * self.hard_mask().to(weight.dtype)
        if self.mask_impl == "reference":
            return weight * self._reference_mask().reshape(weight.shape).to(weight.dtype)
        logits = self.mask_logits
        if weight is not own:  # not this layer's weight: no step cache, one backward per call
            return gumbel.masked_weight(weight, logits, *self._draw())
        entry = self._step_sample(own, logits)
        return _StepMaskedWeight.apply(own, logits, entry.masked, self, entry)

    def _reference_mask(self) -> torch.Tensor:
        s = self.sparsity
        return gumbel.gumbel_soft_mask(self.mask_logits, self.candidates, s.tau, s.kappa, self._noise_key(),
                                       self.group_index(), s.hard)

    def _forward_impl(self, input, weight, *args, **kwargs):
        return super()._forward_impl(input, self.effective_weight(weight), *args, **kwargs)

    def masked_sq_norm(self) -> torch.Tensor:
        """This shard's ``sum ||W * M~||^2`` (W a constant) with the mask of the current step."""
        if self.sparsity.mode == "dense":
            raise RuntimeError("the sparse weight regulariser needs masks (sparsity mode is 'dense')")
        if self._sampling():
            if self.mask_impl == "reference":
                mask = self._reference_mask().reshape(self.weight.shape)
                return (self.weight.detach().to(mask.dtype) * mask).square().sum()
            entry = self._step_sample(self.weight, self.mask_logits)
            return _StepSqNorm.apply(self.mask_logits, entry.sq_norm, self, entry)
        with torch.no_grad():
            return (self.weight.float() * self.hard_mask()).square().sum()

    # ------------------------------------------------------------------ prior
    @torch.no_grad()
    def set_prior(self, prior_mask: torch.Tensor, alpha: float) -> None:
        """MaskLLM prior: ``logits_c += alpha * std(logits) * (overlap(S_c, prior) - N / 2)``.

        ``prior_mask`` is this shard's bool N:M mask ``[out_local, in_local]``; ``std`` is
        over the whole layer (all tensor-parallel shards: a collective on the TP group,
        every rank must call it). ``alpha = 0`` leaves the logits untouched.
        """
        expected = tuple(self.weight.shape)
        if tuple(prior_mask.shape) != expected:
            raise ValueError(f"{self.layer_name or self.name}: prior mask has shape {tuple(prior_mask.shape)}, "
                             f"expected {expected}")
        if not check_nm(prior_mask, self.N, self.M, exact=True):
            raise ValueError(f"{self.layer_name or self.name}: prior mask is not an exact "
                             f"{self.N}:{self.M} mask")
        if alpha == 0:
            return
        self.clear_mask_cache()
        logits = self.mask_logits
        prior = prior_mask.to(device=logits.device, dtype=torch.float32).reshape(*logits.shape[:-1], self.M)
        overlap = prior @ self.candidates.t()  # [O, G, C]
        std = self._global_std(logits)
        logits.add_(alpha * std * (overlap - self.N / 2))

    def _global_std(self, t: torch.Tensor) -> torch.Tensor:
        stats = torch.stack([torch.tensor(float(t.numel()), dtype=torch.float64, device=t.device),
                             t.double().sum(), t.double().square().sum()])
        if get_pg_size(self.tp_group) > 1:
            torch.distributed.all_reduce(stats, group=self.tp_group)
        n, s, sq = stats.unbind()
        var = (sq - s * s / n) / (n - 1)
        return var.clamp_min(0).sqrt().to(t.dtype)

    def extra_repr(self) -> str:
        return f"{self.N}:{self.M} sparsity, groups={tuple(self.mask_logits.shape[:2])}"


class MaskedColumnParallelLinear(_MaskedLinearMixin, ColumnParallelLinear):
    """``ColumnParallelLinear`` with N:M mask logits (qkv, fc1). Extra arguments: the shared
    ``SparsityState`` and ``name`` (the slot, used in messages)."""

    def __init__(self, input_size: int, output_size: int, *, sparsity: SparsityState,
                 name: str = "column_linear", **kwargs):
        _check_state(sparsity, name)
        if kwargs.get("skip_weight_param_allocation"):
            raise ConfigError(f"{name}: masked linears own their weight (skip_weight_param_allocation unsupported)")
        super().__init__(input_size, output_size, **kwargs)
        tp, rank = get_pg_size(self.tp_group), get_pg_rank(self.tp_group)
        stride = int(kwargs.get("stride", 1))
        rows = _strided_rows(self.output_size_per_partition, stride, rank, tp)
        self._setup_mask(sparsity, name, in_local=self.input_size, in_global=self.input_size,
                         rows=rows, col_offset=0, partition_dim=0, stride=stride)

    def __repr__(self):
        return f"{super().__repr__()[:-1]}, {self.extra_repr()})"


class MaskedRowParallelLinear(_MaskedLinearMixin, RowParallelLinear):
    """``RowParallelLinear`` with N:M mask logits (proj, fc2); groups split with the input."""

    def __init__(self, input_size: int, output_size: int, *, sparsity: SparsityState,
                 name: str = "row_linear", **kwargs):
        _check_state(sparsity, name)
        stride = int(kwargs.get("stride", 1))
        if stride != 1:
            raise ConfigError(f"{name}: masked row-parallel linears support stride 1 only, got {stride}")
        super().__init__(input_size, output_size, **kwargs)
        rank = get_pg_rank(self.tp_group)
        in_local = self.input_size_per_partition
        if in_local % sparsity.M == 0:
            col_offset = rank * (in_local // sparsity.M)
        else:
            col_offset = 0  # _setup_mask raises with the sizes
        self._setup_mask(sparsity, name, in_local=in_local, in_global=self.input_size,
                         rows=torch.arange(self.output_size, dtype=torch.int64), col_offset=col_offset,
                         partition_dim=1, stride=1)

    def __repr__(self):
        return f"{super().__repr__()[:-1]}, {self.extra_repr()})"
