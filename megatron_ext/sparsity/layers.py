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

Training builds the sampled ``weight * mask`` once per step: every micro-batch of a step
draws the same noise (it is keyed by ``SparsityState.step``), so the first forward of
the step computes it without autograd (one Triton pass on the GPU) and caches it on the
layer; each micro-batch then gets a fresh autograd output aliasing the cache, whose
backward runs the mask backward (one Triton pass) and adds into the logits' gradient.
The cache is keyed by the step, tau, kappa, hard, the logits and the weight (storage
and version) and the count of optimizer steps taken in the process (a fused optimizer
does not bump version counters), so an optimizer step or any in-place change of the
logits or the weight rebuilds it.

Memory: the cache is one tensor per layer, the masked weight in the weight's dtype
(2 bytes per weight in bf16), plus one fp32 scalar (the regulariser's
``sum ||W * M~||^2`` of the draw). The backward keeps nothing else: megatron-core's
linear saves the masked weight it multiplied by, which is the cache itself (the
per-micro-batch path saved one such tensor per micro-batch in flight), and the mask
backward needs only the weight and the logits, which are parameters. The cache lives
from the first forward of a step until the next step's first forward and is freed
when the layer leaves training mode (``module.eval()``) or sparsity leaves ``"train"``
mode; ``clear_mask_cache()`` frees it at any time (a trainer may call it after a step's
last backward, so the optimizer step runs without it). Knobs for comparisons:
``step_cache = False`` (a sample per micro-batch), ``fused_kernel = False`` (PyTorch ops
on the GPU too), ``lean = False`` (the plain reference).

When neither the weight nor the logits need a gradient, megatron-core's
frozen-weight path runs (no weight-gradient GEMM). When only the logits train
(mask-only), the one weight-shaped GEMM left, ``dL/d(weight * mask)``, is what the
mask gradient is made of; ``weight.grad`` is never formed.

Groups stay whole on every tensor-parallel shard: Column layers keep the whole
input dimension, Row layers split it, so ``in / TP`` must be a multiple of ``M``.
"""
from __future__ import annotations

import zlib
from typing import NamedTuple, Optional

import torch
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                  set_tensor_model_parallel_attributes)
from megatron.core.utils import get_pg_rank, get_pg_size
from torch.optim.optimizer import register_optimizer_step_post_hook

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
    fused optimizers update parameters without bumping their version counters."""

    count = 0
    _hook = None

    @classmethod
    def current(cls) -> int:
        if cls._hook is None:
            cls._hook = register_optimizer_step_post_hook(cls._count)
        return cls.count

    @classmethod
    def _count(cls, *_args) -> None:
        cls.count += 1


class _StepSample(NamedTuple):
    key: tuple
    masked: torch.Tensor     # weight * mask of the draw, no autograd
    sq_norm: torch.Tensor    # fp32 sum((weight * mask)^2) of the draw


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
        # True: the autograd functions that keep only weight and logits for the backward;
        # False: the plain reference (keeps noise, softmax and mask), for comparisons
        self.lean = True
        # the Gumbel noise through one compiled kernel: None = on the platform's GPU
        self.fused_noise: Optional[bool] = None
        # the fused Triton mask kernels: None = on the platform's GPU where triton is
        # importable; False = PyTorch ops (for comparisons); True = always
        self.fused_kernel: Optional[bool] = None
        # build the lean masked weight once per step and share it between micro-batches
        self.step_cache = True
        self._mask_cache: Optional[_StepSample] = None
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
        return gumbel.noise_key(self.sparsity.seed, self.sparsity.step, self._require_id())

    def _draw(self):
        s = self.sparsity
        return (self.candidates, s.tau, s.kappa, self._noise_key(), self.group_index(), s.hard, self.fused_noise,
                self.fused_kernel)

    def clear_mask_cache(self) -> None:
        """Free the cached masked weight of the current step (rebuilt on the next forward)."""
        self._mask_cache = None

    def train(self, mode: bool = True):
        if not mode:
            self.clear_mask_cache()
        return super().train(mode)

    def _cache_key(self) -> tuple:
        s, w, lg = self.sparsity, self.weight, self.mask_logits
        return (s.step, s.tau, s.kappa, s.hard, self._noise_key(), _OptimizerSteps.current(),
                lg.data_ptr(), lg._version, w.data_ptr(), w._version, w.dtype, self.fused_noise, self.fused_kernel)

    def _step_sample(self) -> _StepSample:
        """This step's ``weight * mask`` and its squared norm, built on first use (no autograd)."""
        key = self._cache_key()
        entry = self._mask_cache
        if entry is None or entry.key != key:
            self._mask_cache = None  # free the previous step's before building
            masked, sq = gumbel.sample_masked_weight(self.weight.detach(), self.mask_logits.detach(),
                                                     *self._draw())
            entry = self._mask_cache = _StepSample(key, masked, sq)
        return entry

    def _cached(self, weight: torch.Tensor) -> bool:
        return self.lean and self.step_cache and weight is self.weight

    def effective_weight(self, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The weight megatron-core's linear multiplies by, for the current mode."""
        weight = self.weight if weight is None else weight
        if not self._sampling():
            self.clear_mask_cache()
            if self.sparsity.mode == "dense":
                return weight
            return weight * self.hard_mask().to(weight.dtype)
        if not self.lean:
            s = self.sparsity
            mask = gumbel.gumbel_soft_mask(self.mask_logits, self.candidates, s.tau, s.kappa, self._noise_key(),
                                           self.group_index(), s.hard, self.fused_noise)
            return weight * mask.reshape(weight.shape).to(weight.dtype)
        sample = self._step_sample().masked if self._cached(weight) else None
        return gumbel.masked_weight(weight, self.mask_logits, *self._draw(), sample=sample)

    def _forward_impl(self, input, weight, *args, **kwargs):
        return super()._forward_impl(input, self.effective_weight(weight), *args, **kwargs)

    def masked_sq_norm(self) -> torch.Tensor:
        """This shard's ``sum ||W * M~||^2`` (W a constant) with the mask of the current step."""
        if self.sparsity.mode == "dense":
            raise RuntimeError("the sparse weight regulariser needs masks (sparsity mode is 'dense')")
        if self._sampling():
            value = self._step_sample().sq_norm if self._cached(self.weight) else None
            return gumbel.masked_weight_sq_norm(self.weight.detach(), self.mask_logits, *self._draw(), value=value)
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
        logits = self.mask_logits
        prior = prior_mask.to(device=logits.device, dtype=torch.float32).reshape(*logits.shape[:-1], self.M)
        overlap = prior @ self.candidates.t()  # [O, G, C]
        std = self._global_std(logits)
        logits.add_(alpha * std * (overlap - self.N / 2))
        self.clear_mask_cache()

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
