"""Forward passes of the trainer: per-token losses and held-out evaluation."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_ext import platform


def token_losses(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token cross entropy ``[b, s]`` (fp32) of ``batch["labels"]`` (vocabulary-parallel)."""
    device = platform.device()
    tokens = batch["tokens"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True)
    return model(tokens, position_ids, None, labels=labels).float()


def masked_loss_sums(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the per-token losses over ``loss_mask``, number of such tokens). The mask goes
    to the device as the inputs do, without waiting: a blocking copy here would hold the host
    until the GPU finished the forward, before it could queue the backward."""
    mask = batch["loss_mask"].to(platform.device(), non_blocking=True)
    per_token = token_losses(model, batch)
    mask = mask.to(torch.float32)
    return (per_token * mask).sum(), mask.sum()


class _LogitsTap:
    """Keeps the output layer's logits (``[s, b, V/tp]``) of the last forward pass, so one
    pass gives the training loss (the model's own, unchanged) and the next-token arg-max."""

    def __init__(self, model: torch.nn.Module) -> None:
        layer = getattr(model, "output_layer", None)
        if layer is None:
            raise TypeError(f"{type(model).__name__} has no output_layer: accuracy needs the logits")
        self.logits: Optional[torch.Tensor] = None
        self._handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.logits = output[0] if isinstance(output, tuple) else output

    def close(self) -> None:
        self._handle.remove()


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream, eval_iters: int, num_microbatches: int, vocab_size: int,
             dp_group=None) -> Dict[str, float]:
    """Loss, perplexity and next-token (top-1) accuracy over ``eval_iters`` global batches
    of ``stream`` (this rank's share of each), token-weighted over ``loss_mask`` and reduced
    over the data-parallel group. The model runs in eval mode: masked linears use their
    hard (argmax) N:M masks. ``vocab_size``: the true vocabulary (Megatron's padding rows are
    never predicted)."""
    from megatron_ext.models.perplexity import vocab_parallel_top1

    was_training = model.training
    model.eval()
    tap = _LogitsTap(model)
    # loss sum, correct predictions, tokens
    totals = torch.zeros(3, dtype=torch.float64, device=platform.device())
    try:
        for _ in range(eval_iters):
            for _ in range(num_microbatches):
                batch = stream.next()
                per_token = token_losses(model, batch)
                mask = batch["loss_mask"].to(per_token.device, torch.float32)
                logits = tap.logits.transpose(0, 1)  # [b, s, V/tp]
                predicted = vocab_parallel_top1(logits, vocab_size)
                labels = batch["labels"].to(per_token.device)
                totals[0] += (per_token * mask).sum().double()
                totals[1] += ((predicted == labels).float() * mask).sum().double()
                totals[2] += mask.sum().double()
                tap.logits = None
    finally:
        tap.close()
        model.train(was_training)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(totals, group=dp_group)
    count = totals[2].clamp_min(1.0)
    loss = float(totals[0] / count)
    return {"loss": loss, "ppl": math.exp(min(20.0, loss)), "accuracy": float(totals[1] / count),
            "tokens": int(totals[2].item())}


__all__: List[str] = ["evaluate", "masked_loss_sums", "token_losses"]
