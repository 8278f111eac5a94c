"""Forward passes of the trainer: per-token losses and held-out evaluation."""
from __future__ import annotations

import math
from typing import Dict

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
    """(sum of the per-token losses over ``loss_mask``, number of such tokens)."""
    per_token = token_losses(model, batch)
    mask = batch["loss_mask"].to(per_token.device, torch.float32)
    return (per_token * mask).sum(), mask.sum()


@torch.no_grad()
def evaluate(model: torch.nn.Module, stream, eval_iters: int, num_microbatches: int, dp_group=None) -> Dict[str, float]:
    """Token-weighted mean loss over ``eval_iters`` global batches of ``stream`` (this rank's
    share of each), reduced over the data-parallel group. The model runs in eval mode: masked
    linears use their hard (argmax) N:M masks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=platform.device())
    try:
        for _ in range(eval_iters):
            for _ in range(num_microbatches):
                loss_sum, count = masked_loss_sums(model, stream.next())
                totals[0] += loss_sum.double()
                totals[1] += count.double()
    finally:
        model.train(was_training)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(totals, group=dp_group)
    loss = float(totals[0] / totals[1].clamp_min(1.0))
    return {"loss": loss, "ppl": math.exp(min(20.0, loss)), "tokens": int(totals[1].item())}
