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

from megatron_ext import platform
from megatron_ext.errors import InputError


class PerplexityError(InputError):
    """Bad input for a perplexity run (text, checkpoint, flags); the message says which."""


@dataclass
class PerplexityResult:
    ppl: float
    accuracy: float      # next-token top-1 accuracy: correct / tokens
    tokens: int          # predicted tokens: windows * (seq_length - 1)
    correct: int         # predicted tokens whose arg-max is the next token
    nll_sum: float       # sum of the per-token negative log-likelihoods (nats)
    windows: int
    window_nll: list[float]  # per-window NLL sums, in window order

    @property
    def loss(self) -> float:
        """Mean NLL per predicted token (nats)."""
        return self.nll_sum / self.tokens

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
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits = next_token_logits(model, tokens, vocab_size)
    return vocab_parallel_cross_entropy(logits, tokens[:, 1:].contiguous())


def next_token_logits(model: torch.nn.Module, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """This rank's vocabulary shard of the logits predicting ``tokens[:, 1:]``: ``[b, s-1, V/tp]``
    float32, contiguous, Megatron's padding rows at -inf."""
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, position_ids, None)  # [b, s, V/tp]
    return padded_vocab_mask(logits[:, :-1].float(), vocab_size).contiguous()


def padded_vocab_mask(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``logits`` (this rank's vocabulary shard, last dim) with Megatron's padding rows
    (ids >= ``vocab_size``) at -inf."""
    shard = logits.shape[-1]
    start = platform.tp_rank() * shard
    if start + shard <= vocab_size:
        return logits
    pad = torch.arange(start, start + shard, device=logits.device) >= vocab_size
    return logits.masked_fill(pad, float("-inf"))


def vocab_parallel_top1(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The global arg-max token id ``[...]`` of vocabulary-parallel ``logits`` ``[..., V/tp]``
    (padding rows excluded; ties go to the smallest id, as ``argmax`` on the whole row)."""
    import torch.distributed as dist

    logits = padded_vocab_mask(logits.float(), vocab_size)
    value, index = logits.max(dim=-1)
    if platform.tp_size() == 1:
        return index
    group = platform.tp_group()
    index = index + platform.tp_rank() * logits.shape[-1]
    best = value.clone()
    dist.all_reduce(best, op=dist.ReduceOp.MAX, group=group)
    candidate = torch.where(value == best, index, torch.full_like(index, torch.iinfo(index.dtype).max))
    dist.all_reduce(candidate, op=dist.ReduceOp.MIN, group=group)
    return candidate


@torch.no_grad()
def evaluate_windows(model: torch.nn.Module, windows: np.ndarray, vocab_size: int, micro_batch_size: int = 1,
                     device: torch.device | str = "cpu") -> PerplexityResult:
    """Perplexity and next-token top-1 accuracy of ``windows`` ([n, s] token ids) under
    ``model`` (this TP rank's shard).

    Windows are dealt round-robin to the data-parallel ranks; every rank of a TP
    group computes the same windows. Returns the all-reduced result on every rank.
    """
    import torch.distributed as dist
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    if micro_batch_size < 1:
        raise PerplexityError(f"--micro-batch-size must be >= 1, got {micro_batch_size}")
    if windows.size and (windows.min() < 0 or windows.max() >= vocab_size):
        bad = int(windows.min()) if windows.min() < 0 else int(windows.max())
        raise PerplexityError(f"token id {bad} is outside the model's vocabulary of {vocab_size} "
                              "(tokenizer and checkpoint do not match)")
    dp_rank, dp_size = platform.dp_rank(), platform.dp_size()
    n, s = windows.shape
    mine = list(range(dp_rank, n, dp_size))
    per_window = torch.zeros(2, n, dtype=torch.float64)  # NLL sum, correct predictions
    model.eval()
    for i in range(0, len(mine), micro_batch_size):
        idx = mine[i:i + micro_batch_size]
        batch = torch.from_numpy(windows[idx]).to(device)
        targets = batch[:, 1:].contiguous()
        logits = next_token_logits(model, batch, vocab_size)
        # the arg-max first: the cross entropy may work in place on the logits
        correct = (vocab_parallel_top1(logits, vocab_size) == targets).sum(dim=1)
        nll = vocab_parallel_cross_entropy(logits, targets)
        per_window[0, idx] = nll.double().sum(dim=1).cpu()
        per_window[1, idx] = correct.double().cpu()
    if dp_size > 1:  # NCCL reduces device tensors only
        reduced = per_window.to(device)
        dist.all_reduce(reduced, group=platform.dp_group())
        per_window = reduced.cpu()
    total = float(per_window[0].sum())
    correct_total = int(per_window[1].sum())
    count = n * (s - 1)
    return PerplexityResult(ppl=math.exp(total / count), accuracy=correct_total / count, tokens=count,
                            correct=correct_total, nll_sum=total, windows=n, window_nll=per_window[0].tolist())


# --------------------------------------------------------------------------- checkpoints
