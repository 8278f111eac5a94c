"""Training data: the GPT datasets of a run and Megatron-LM's pretraining sampler order.

Sample counts follow Megatron-LM when training by iterations:
train ``train_iters * global_batch``; valid ``(train_iters // eval_interval + 1) *
eval_iters * global_batch`` (every evaluation reads the next ``eval_iters`` global
batches, and one more runs after training); test ``eval_iters * global_batch``.

``micro_batches`` is Megatron's ``MegatronPretrainingSampler``: from ``consumed``
on, samples are taken in order, ``micro_batch x DP`` at a time, and data-parallel
rank ``r`` gets the ``r``-th slice of ``micro_batch`` of them (an incomplete last
step is dropped). Every tensor-parallel rank reads the same samples itself.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from megatron_ext.errors import InputError
from megatron_ext.data.blend import build_gpt_datasets, parse_blend
from megatron_ext.data.gpt_dataset import GPTDatasetConfig, PAD_TOKEN_ID_NONE

if TYPE_CHECKING:
    from megatron_ext.training.config import DataConfig


class DataError(InputError):
    """Missing or unusable training data (the message names the flag and the file)."""


@dataclass
class Datasets:
    train: object
    valid: Optional[object]
    test: Optional[object]
    extra_valid: Dict[str, object]   # --eval-data-path sets by name


def eval_sets(eval_data_path: Optional[str]) -> List[Tuple[str, str]]:
    """``(name, blend)`` of each ``--eval-data-path`` set: ``NAME=PREFIX`` entries name one
    set each (one prefix, not a blend); otherwise the whole value is one prefix or blend
    called ``eval_data``."""
    if eval_data_path is None:
        return []
    entries = eval_data_path.split()
    named = ["=" in e for e in entries]
    if not any(named):
        return [("eval_data", eval_data_path)]
    if not all(named):
        raise DataError(f"--eval-data-path {eval_data_path!r}: a named set is one prefix (NAME=PREFIX), not a "
                        "blend; give every set as NAME=PREFIX, or one blend ('W1 PREFIX1 W2 PREFIX2 ...') "
                        "without names")
    sets = []
    for e in entries:
        name, prefix = e.split("=", 1)
        if not name or not prefix:
            raise DataError(f"--eval-data-path {e!r}: expected NAME=PREFIX")
        if _is_number(prefix):
            raise DataError(f"--eval-data-path {e!r}: {prefix} is a blend weight, but a named set is one prefix "
                            "(NAME=PREFIX), not a blend")
        if name in ("valid", "test") or name in {n for n, _ in sets}:
            raise DataError(f"--eval-data-path {e!r}: the name {name!r} is "
                            + ("reserved" if name in ("valid", "test") else "given twice"))
        sets.append((name, prefix))
    return sets


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def sample_counts(train_iters: int, global_batch_size: int, eval_interval: int, eval_iters: int) -> List[int]:
    """Megatron-LM's ``[train, valid, test]`` sample counts."""
    evals = train_iters // eval_interval + 1
    return [train_iters * global_batch_size, evals * eval_iters * global_batch_size, eval_iters * global_batch_size]


def check_data_paths(data_path: str, flag: str, vocab_size: Optional[int] = None) -> None:
    """Every prefix of a blend has its .bin and .idx, passes ``check_dataset``'s consistency
    checks (offset errors), and, given ``vocab_size``, holds no token id the model cannot embed
    (a dataset tokenized with another tokenizer). ``DataError`` naming ``flag`` and the file."""
    from megatron_ext.data.indexed_dataset import check_token_range, verify_dataset

    try:
        prefixes, _ = parse_blend(data_path)
    except ValueError as e:
        raise DataError(str(e).replace("--data-path", flag)) from None
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            if not os.path.isfile(prefix + suffix):
                raise DataError(f"{flag}: {prefix + suffix} does not exist")
        try:
            verify_dataset(prefix)
            if vocab_size is not None:
                check_token_range(prefix, vocab_size)
        except ValueError as e:
            raise DataError(f"{flag}: {e}") from None


def dataset_config(data: "DataConfig", tokenizer) -> GPTDatasetConfig:
    pad = getattr(tokenizer, "pad", None)
    return GPTDatasetConfig(
        sequence_length=data.seq_length,
        eod_token_id=tokenizer.eod,
        random_seed=data.seed,
        pad_token_id=PAD_TOKEN_ID_NONE if pad is None else int(pad),
        reset_position_ids=data.reset_position_ids,
        eod_mask_loss=data.eod_mask_loss,
        create_attention_mask=False,
        data_cache_path=data.data_cache_path,
    )


def build_datasets(data: "DataConfig", counts: List[int], tokenizer) -> Datasets:
    """The run's datasets for ``[train, valid, test]`` sample counts (``sample_counts``);
    ``valid``/``test`` are None for an empty split or no evaluation (zero counts)."""
    config = dataset_config(data, tokenizer)
    evaluate = counts[1] > 0
    if not evaluate:
        counts = [counts[0], 0, 0]
    train, valid, test = build_gpt_datasets(config, data.data_path, data.split, counts)
    if train is None:
        raise DataError(f"--split {data.split!r} leaves no training data")
    extra = {}
    if evaluate:
        for name, blend in eval_sets(data.eval_data_path):
            _, extra[name], _ = build_gpt_datasets(config, blend, "0,1,0", [0, counts[1], 0])
    else:
        valid = test = None
    return Datasets(train, valid, test, extra)


class TokenStreamView:
    """Samples of ``seq_length`` cut from the token stream of ``base``'s samples, from
    position ``start`` on (a curriculum stage's data).

    Each sample of ``base`` (a GPT dataset of length ``L``) contributes its ``L`` positions
    (token, label, loss mask) to one stream, in the dataset's order; view sample ``j``
    holds positions ``start + j * seq_length`` onwards. Labels stay the base sample's own
    (a window that crosses two base samples predicts each token from its own document
    stream). Positions count from 0 in every view sample, unless the base resets them
    at document ends (``--reset-position-ids``), whose ids are kept. A view of the base's
    own length from 0 gives the base's samples.
    """

    def __init__(self, base, seq_length: int, start: int = 0, reset_position_ids: bool = False) -> None:
        self.base = base
        self.seq_length = int(seq_length)
        self.start = int(start)
        self.reset_position_ids = reset_position_ids
        self.base_length = int(base[0]["tokens"].shape[0]) if len(base) else 0
        available = len(base) * self.base_length - self.start
        self._len = max(0, available // self.seq_length)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, j: int) -> Dict[str, np.ndarray]:
        if not 0 <= j < self._len:
            raise IndexError(f"sample {j} of a view of {self._len}")
        lb, p0 = self.base_length, self.start + j * self.seq_length
        p1 = p0 + self.seq_length
        parts: Dict[str, List[np.ndarray]] = {k: [] for k in ("tokens", "labels", "loss_mask", "position_ids")}
        for k in range(p0 // lb, (p1 - 1) // lb + 1):
            sample = self.base[k]
            a, b = max(p0, k * lb) - k * lb, min(p1, (k + 1) * lb) - k * lb
            for key in parts:
                parts[key].append(np.asarray(sample[key])[a:b])
        out = {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in parts.items()}
        if not self.reset_position_ids:
            out["position_ids"] = np.arange(self.seq_length, dtype=out["position_ids"].dtype)
        return out


def positions_needed(samples: int, seq_length: int, base_length: int) -> int:
    """Base samples of ``base_length`` a view needs for ``samples`` of ``seq_length`` from 0."""
    return -(-samples * seq_length // base_length)


def micro_batch_indices(total: int, consumed: int, micro_batch_size: int, dp_size: int,
                        dp_rank: int) -> Iterator[List[int]]:
    """Megatron's pretraining sampler: this data-parallel rank's sample ids, one micro-batch at a time."""
    if consumed >= total:
        return
    step = micro_batch_size * dp_size
    start = dp_rank * micro_batch_size
    for beg in range(consumed, total - step + 1, step):
        yield list(range(beg + start, beg + start + micro_batch_size))


def collate(samples: List[Dict[str, np.ndarray]]) -> Dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in ("tokens", "labels", "loss_mask",
                                                                           "position_ids")}


class BatchStream:
    """Micro-batches of one dataset for this data-parallel rank, from ``consumed`` samples on.

    ``consumed`` counts global samples (all ranks), as Megatron's ``consumed_*_samples``.
    ``micro_batch_size`` x ``dp_size`` samples are read per call, ``micro_batch_size`` of
    them by this rank.
    """

    def __init__(self, dataset, name: str, consumed: int, micro_batch_size: int, dp_size: int, dp_rank: int):
        self.dataset = dataset
        self.name = name
        self.consumed = consumed
        self._indices = micro_batch_indices(len(dataset), consumed, micro_batch_size, dp_size, dp_rank)
        self._step = micro_batch_size * dp_size

    def next(self) -> Dict[str, torch.Tensor]:
        try:
            ids = next(self._indices)
        except StopIteration:
            raise DataError(f"the {self.name} data ran out after {self.consumed} samples "
                            f"({len(self.dataset)} available)") from None
        self.consumed += self._step
        return collate([self.dataset[i] for i in ids])
