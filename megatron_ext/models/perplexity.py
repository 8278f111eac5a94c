"""WikiText-2-style perplexity of a LLaMA checkpoint, at any tensor-parallel size.

The whole text is tokenized as one document (the tokenizer that comes with the
checkpoint, so ``Llama2Tokenizer`` prepends one BOS), cut into non-overlapping
windows of ``seq_length`` tokens (a shorter tail is dropped), and every window
predicts its tokens 2..seq_length from the ones before. PPL = exp(mean NLL) over all
predicted tokens. Logits stay split over the vocabulary: the cross entropy is
megatron-core's vocabulary-parallel one, with the padding rows of the vocabulary
(Megatron's padding) excluded from the softmax. Windows are spread over the
data-parallel ranks and the sums reduced, so the result does not depend on TP or DP.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import torch

from megatron_ext.errors import InputError


class PerplexityError(InputError):
    """Bad input for a perplexity run (text, checkpoint, flags); the message says which."""


@dataclass
class PerplexityResult:
    ppl: float
    tokens: int          # predicted tokens: windows * (seq_length - 1)
    nll_sum: float       # sum of the per-token negative log-likelihoods (nats)
    windows: int
    window_nll: list[float]  # per-window NLL sums, in window order (this process's share filled)

    def line(self) -> str:
        return f"PPL {self.ppl:.6f} tokens {self.tokens}"


# --------------------------------------------------------------------------- tokens


def text_tokens(text_file: str | os.PathLike, tokenizer) -> np.ndarray:
    """The whole file tokenized as one document."""
    path = Path(text_file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PerplexityError(f"{path}: text file not found") from None
    except UnicodeDecodeError as e:
        raise PerplexityError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise PerplexityError(f"{path}: text file is empty")
    return np.asarray(tokenizer.tokenize(text), dtype=np.int64)


def dataset_tokens(prefix: str | os.PathLike) -> np.ndarray:
    """Every sequence of a Megatron ``.bin/.idx`` dataset, concatenated in order."""
    from megatron_ext.data.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    if len(ds) == 0:
        raise PerplexityError(f"{prefix}: dataset has no sequences")
    return np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])


def make_windows(tokens: np.ndarray, seq_length: int) -> np.ndarray:
    """Non-overlapping windows ``[n, seq_length]``; a tail shorter than a window is dropped."""
    if seq_length < 2:
        raise PerplexityError(f"--seq-length must be >= 2, got {seq_length}")
    n = len(tokens) // seq_length
    if n == 0:
        raise PerplexityError(f"the text has {len(tokens)} tokens, fewer than one window of --seq-length {seq_length}")
    return np.ascontiguousarray(tokens[: n * seq_length].reshape(n, seq_length))


# --------------------------------------------------------------------------- model


def token_nll(model: torch.nn.Module, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-token NLL ``[b, s-1]`` (float32) of ``tokens[:, 1:]`` given the preceding tokens.

    The model returns this rank's vocabulary shard of the logits; entries past the
    true ``vocab_size`` are set to -inf before the vocabulary-parallel cross entropy.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, position_ids, None)  # [b, s, V/tp]
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    logits = logits[:, :-1].float()
    if start + shard > vocab_size:
        pad = torch.arange(start, start + shard, device=logits.device) >= vocab_size
        logits = logits.masked_fill(pad, float("-inf"))
    return vocab_parallel_cross_entropy(logits.contiguous(), tokens[:, 1:].contiguous())


@torch.no_grad()
def evaluate_windows(model: torch.nn.Module, windows: np.ndarray, vocab_size: int, micro_batch_size: int = 1,
                     device: torch.device | str = "cpu") -> PerplexityResult:
    """Perplexity of ``windows`` ([n, s] token ids) under ``model`` (this TP rank's shard).

    Windows are dealt round-robin to the data-parallel ranks; every rank of a TP
    group computes the same windows. Returns the all-reduced result on every rank.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    if micro_batch_size < 1:
        raise PerplexityError(f"--micro-batch-size must be >= 1, got {micro_batch_size}")
    if windows.size and (windows.min() < 0 or windows.max() >= vocab_size):
        bad = int(windows.min()) if windows.min() < 0 else int(windows.max())
        raise PerplexityError(f"token id {bad} is outside the model's vocabulary of {vocab_size} "
                              "(tokenizer and checkpoint do not match)")
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    n, s = windows.shape
    mine = list(range(dp_rank, n, dp_size))
    per_window = torch.zeros(n, dtype=torch.float64)
    model.eval()
    for i in range(0, len(mine), micro_batch_size):
        idx = mine[i:i + micro_batch_size]
        batch = torch.from_numpy(windows[idx]).to(device)
        nll = token_nll(model, batch, vocab_size)
        per_window[idx] = nll.double().sum(dim=1).cpu()
    if dp_size > 1:  # NCCL reduces device tensors only
        reduced = per_window.to(device)
        dist.all_reduce(reduced, group=parallel_state.get_data_parallel_group())
        per_window = reduced.cpu()
    total = float(per_window.sum())
    count = n * (s - 1)
    return PerplexityResult(ppl=math.exp(total / count), tokens=count, nll_sum=total, windows=n,
                            window_nll=per_window.tolist())


# --------------------------------------------------------------------------- checkpoints
