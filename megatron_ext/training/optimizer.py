"""AdamW over fp32 main parameters, with one flat fp32 gradient buffer.

What Megatron-LM's DDP + mixed-precision optimizer do, for tensor x data parallelism:

* Every trainable parameter gets a slice of one flat fp32 buffer. A hook runs when
  autograd has accumulated a parameter's gradient: it adds it into the slice (fp32
  accumulation over micro-batches, whatever the parameter's dtype) and frees it.
  Mask logits also get the slice as ``main_grad``: their backward adds into it directly.
  Frozen parameters (the weights under ``--mask-only``) get neither a slice nor
  optimizer state.
* ``reduce_gradients`` averages the buffer over the data-parallel group, bucket by
  bucket (scaled by 1/DP, then summed).
* ``clip_gradients`` takes the global L2 norm: each parameter is counted once per
  tensor-parallel group (a parameter copied on every TP rank, like a norm weight,
  only on TP rank 0), squares summed over the model-parallel group. The buffer is
  scaled by ``max_norm / (norm + 1e-6)`` when that is below 1.
* The optimizer is ``torch.optim.AdamW`` over fp32 main parameters: the parameter
  itself when it is fp32 (mask logits, fp32 training), an fp32 copy for bf16 ones,
  copied back into the model after each step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence

import torch
import torch.distributed as dist
from megatron_ext.errors import MegatronExtError

DEFAULT_BUCKET_NUMEL = 40_000_000


class OptimizerStateError(MegatronExtError, ValueError):
    """Optimizer state that does not fit the model (the message names the checkpoint)."""

    exit_code = 1


@dataclass
class _Entry:
    name: str
    param: torch.nn.Parameter
    main: torch.nn.Parameter
    grad: torch.Tensor        # view of the flat buffer
    counts_in_norm: bool


def _counts_in_norm(p: torch.nn.Parameter, tp_rank: int) -> bool:
    if getattr(p, "shared", False):
        return False
    return bool(getattr(p, "tensor_model_parallel", False)) or tp_rank == 0


def param_groups(model: torch.nn.Module, claimed: Sequence[Mapping[str, Any]] = ()) -> List[Dict[str, Any]]:
    """Megatron's groups over the trainable parameters: ``claimed`` groups first (a plug-in's,
    with their own ``max_lr`` / ``min_lr`` / ``wd_mult``), then the other matrices with weight
    decay ("weights") and vectors (norms) without ("no_decay"). Frozen parameters are left out."""
    taken = {id(p) for g in claimed for p in g["params"]}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in taken:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [dict(g) for g in claimed if g["params"]]
    groups += [{"name": name, "params": params, "wd_mult": wd}
               for name, params, wd in (("weights", decay, 1.0), ("no_decay", no_decay, 0.0)) if params]
    return groups


class TrainOptimizer:
    """See the module docstring. ``groups``: dicts with ``params`` and optional ``name``,
    ``max_lr``, ``min_lr``, ``wd_mult`` (read by ``schedules.ParamScheduler``)."""

    def __init__(self, model: torch.nn.Module, groups: Sequence[Mapping[str, Any]], *, lr: float,
                 betas=(0.9, 0.999), eps: float = 1e-8, fused: bool = False,
                 dp_group=None, model_parallel_group=None, tp_rank: int = 0,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL) -> None:
        names = {id(p): n for n, p in model.named_parameters()}
        params = [p for g in groups for p in g["params"]]
        if not params:
            raise ValueError("nothing to train: no parameter requires a gradient")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter appears in two optimizer groups")
        device = params[0].device
        total = sum(p.numel() for p in params)
        self.grad_buffer = torch.zeros(total, dtype=torch.float32, device=device)
        self.dp_group = dp_group
        self.model_parallel_group = model_parallel_group
        self.entries: List[_Entry] = []
        self._hooks = []
        torch_groups = []
        offset = 0
        for g in groups:
            mains = []
            for p in g["params"]:
                view = self.grad_buffer[offset:offset + p.numel()].view(p.shape)
                offset += p.numel()
                if p.dtype == torch.float32:
                    main = p
                else:
                    main = torch.nn.Parameter(p.detach().float().clone(), requires_grad=False)
                    main.grad = view
                self.entries.append(_Entry(names.get(id(p), f"param{len(self.entries)}"), p, main, view,
                                           _counts_in_norm(p, tp_rank)))
                self._hooks.append(p.register_post_accumulate_grad_hook(self._accumulate_into(view)))
                if g.get("main_grad"):
                    # a layer that accumulates this gradient itself adds straight into the
                    # buffer (megatron's main_grad convention): no per-micro-batch gradient
                    # tensor, no AccumulateGrad pass
                    p.main_grad = view
                mains.append(main)
            torch_group = {k: v for k, v in g.items() if k not in ("params", "main_grad")}
            torch_group["params"] = mains
            torch_groups.append(torch_group)
        self.buckets = self._make_buckets(bucket_numel)
        self.adam = torch.optim.AdamW(torch_groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0,
                                      fused=bool(fused) or None)

    # ------------------------------------------------------------------ gradients
    @staticmethod
    def _accumulate_into(view: torch.Tensor):
        def hook(param: torch.Tensor) -> None:
            if param.grad is not None:  # None: the gradient went into main_grad already
                view.add_(param.grad)
            param.grad = None
        return hook

    def _make_buckets(self, bucket_numel: int) -> List[torch.Tensor]:
        buckets, start, end = [], 0, 0
        for e in self.entries:
            end += e.param.numel()
            if end - start >= bucket_numel:
                buckets.append(self.grad_buffer[start:end])
                start = end
        if end > start:
            buckets.append(self.grad_buffer[start:end])
        return buckets

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.adam.param_groups

    def zero_grad(self) -> None:
        self.grad_buffer.zero_()
        for e in self.entries:
            e.param.grad = None

    def reduce_gradients(self) -> None:
        """Average the gradients over the data-parallel group (no-op for one replica)."""
        if self.dp_group is None:
            return
        size = dist.get_world_size(self.dp_group)
        if size == 1:
            return
        self.grad_buffer.mul_(1.0 / size)
        for bucket in self.buckets:
            dist.all_reduce(bucket, group=self.dp_group)

    def _model_parallel_sum(self, value: torch.Tensor) -> torch.Tensor:
        group = self.model_parallel_group
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(value, group=group)
        return value

    def grad_norm(self) -> float:
        """Global L2 norm of the (reduced) gradients."""
        grads = [e.grad for e in self.entries if e.counts_in_norm]
        if grads:
            sq = torch.stack([n.float() for n in torch._foreach_norm(grads)]).square().sum()
        else:
            sq = torch.zeros((), dtype=torch.float32, device=self.grad_buffer.device)
        return math.sqrt(float(self._model_parallel_sum(sq.reshape(1)).item()))

    def clip_gradients(self, max_norm: float) -> float:
        """Clip to ``max_norm`` (0: no clipping); returns the norm before clipping."""
        norm = self.grad_norm()
        if max_norm > 0 and math.isfinite(norm):
            coeff = max_norm / (norm + 1.0e-6)
            if coeff < 1.0:
                self.grad_buffer.mul_(coeff)
        return norm

    def count_zeros(self) -> int:
        """Gradient entries that are exactly zero (each parameter counted once per TP group)."""
        zeros = torch.zeros(1, dtype=torch.float64, device=self.grad_buffer.device)
        for e in self.entries:
            if e.counts_in_norm:
                zeros += (e.grad == 0).sum()
        return int(self._model_parallel_sum(zeros).item())

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def step(self) -> None:
        for e in self.entries:
            if e.main is e.param:
                e.param.grad = e.grad
        self.adam.step()
        for e in self.entries:
            if e.main is e.param:
                e.param.grad = None
            else:
                e.param.copy_(e.main)

    def close(self) -> None:
        """Remove the gradient hooks from the model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {
            "param_names": [e.name for e in self.entries],
            "adam": self.adam.state_dict(),
            "main_params": {i: e.main.detach().clone() for i, e in enumerate(self.entries) if e.main is not e.param},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any], where: str = "checkpoint") -> None:
        try:
            names, adam, mains = state["param_names"], state["adam"], state["main_params"]
        except (KeyError, TypeError):
            raise OptimizerStateError(f"{where}: optimizer state lacks param_names/adam/main_params") from None
        mine = [e.name for e in self.entries]
        if list(names) != mine:
            extra = sorted(set(names) - set(mine))
            missing = sorted(set(mine) - set(names))
            detail = (f"the checkpoint trains {extra[0]!r} which this run freezes" if extra else
                      f"this run trains {missing[0]!r} which the checkpoint did not" if missing else
                      "the parameter order differs")
            raise OptimizerStateError(f"{where}: optimizer state does not fit this run ({detail}); "
                                      "pass --no-load-optim to start the optimizer afresh")
        try:
            self.adam.load_state_dict(adam)
        except (ValueError, KeyError) as e:
            raise OptimizerStateError(f"{where}: cannot load the optimizer state ({e})") from None
        for i, e in enumerate(self.entries):
            if e.main is e.param:
                continue
            saved = mains.get(i) if isinstance(mains, Mapping) else None
            if saved is None or tuple(saved.shape) != tuple(e.main.shape):
                raise OptimizerStateError(f"{where}: fp32 main copy of {e.name!r} missing or mis-shaped")
            e.main.copy_(saved)
            e.param.copy_(e.main)
