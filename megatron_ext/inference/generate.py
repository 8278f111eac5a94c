"""Greedy generation over ``LlamaForInference``: one prefill, then one token per step.

On a CUDA device the decode step is captured once in a CUDA graph (``DecodeGraph``) and
replayed for every new token, so a step costs its kernels and not Python's launches.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megatron_ext.inference.model import KVCache, LlamaForInference
from megatron_ext.inference.sparse import capture_graph


class DecodeGraph:
    """One decode step (``batch`` sequences, one token each) captured in a CUDA graph; each
    call copies the new ids and position into static buffers and replays it."""

    def __init__(self, model: LlamaForInference, cache: KVCache, batch: int = 1):
        dev = model.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        # warm-up and capture write position 0's slot: keep it, so a graph can be made over a filled cache
        saved = cache.k[:, :, :, :1].clone(), cache.v[:, :, :, :1].clone()
        with torch.no_grad():
            self.graph, self.logits = capture_graph(lambda: model(self.ids, cache, self.pos), device=dev)
        cache.k[:, :, :, :1].copy_(saved[0])
        cache.v[:, :, :, :1].copy_(saved[1])

    def __call__(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        self.ids.copy_(ids)
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits


@dataclass
class Generation:
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)   # the new tokens
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first (each one decode step) per second of decoding."""
        steps = max(len(self.tokens) - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy_generate(model: LlamaForInference, prompt: Sequence[int], max_new_tokens: int, *,
                    eos_id: Optional[int] = None, graphs: Optional[bool] = None,
                    cache_len: Optional[int] = None) -> Generation:
    """Greedy continuation of ``prompt`` (token ids, batch 1): ``max_new_tokens`` new tokens,
    fewer if ``eos_id`` comes. ``graphs`` (default: on a CUDA device) replays the decode step
    from a CUDA graph. Times the prefill (prompt in, first token out) and the decode steps."""
    dev = model.device
    graphs = dev.type == "cuda" if graphs is None else graphs
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("greedy_generate: empty prompt")
    length = cache_len or len(prompt) + max_new_tokens
    if length < len(prompt) + max_new_tokens:
        raise ValueError(f"cache_len {length} < prompt {len(prompt)} + {max_new_tokens} new tokens")
    cache = model.new_cache(1, length)
    step = DecodeGraph(model, cache) if graphs and max_new_tokens > 1 else None
    out = Generation(prompt)
    _sync(dev)
    t0 = time.perf_counter()
    ids = torch.tensor([prompt], dtype=torch.long, device=dev)
    logits = model(ids, cache, torch.arange(len(prompt), device=dev), prefill=True, last_only=True)
    nxt = logits[:, -1].argmax(-1, keepdim=True)
    out.tokens.append(int(nxt))
    _sync(dev)
    t1 = time.perf_counter()
    out.prefill_s = t1 - t0
    pos = len(prompt)
    while len(out.tokens) < max_new_tokens and (eos_id is None or out.tokens[-1] != eos_id):
        if step is not None:
            logits = step(nxt, pos)
        else:
            logits = model(nxt, cache, torch.tensor([pos], device=dev))
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.tokens.append(int(nxt))   # the host reads each token: the loop stays honest about latency
        pos += 1
    _sync(dev)
    out.decode_s = time.perf_counter() - t1
    return out
