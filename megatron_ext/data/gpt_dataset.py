"""GPT samples from a .bin/.idx dataset, in megatron-core 0.16.1's order.

:class:`GPTDataset` exposes one split (a contiguous range of sequences) of an
:class:`~megatron_ext.data.indexed_dataset.IndexedDataset` as fixed-length samples.
Its three indices are built exactly as megatron-core's ``GPTDataset`` builds them,
so sample ``i`` here is sample ``i`` there for the same configuration:

* document index: the split's sequence ids repeated once per epoch and shuffled with
  ``numpy.random.RandomState(random_seed)``; when the last epoch contributes fewer
  than 80% of an epoch's samples it is shuffled separately ("separate final epoch");
* sample index: where each sample starts, from the native helper
  (``megatron_ext._native.build_sample_idx``, identical to megatron-core's);
* shuffle index: a permutation of the samples, drawn from the same random state.

Samples are dictionaries of numpy arrays (``tokens``, ``labels``, ``loss_mask``,
``position_ids``, optionally ``attention_mask``), or torch tensors with
``return_torch=True``. Importing this module needs neither torch nor megatron-core.
"""
from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from megatron_ext.errors import InputError
from megatron_ext.data.index_cache import FORMAT_VERSION, IndexCache, cache_key, lengths_digest

logger = logging.getLogger(__name__)

# A pad id that collides with a special token is replaced by one that never occurs.
PAD_TOKEN_ID_NONE = -1
# The last epoch is shuffled on its own when it supplies fewer than this share of an epoch.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


class Split(enum.Enum):
    train = 0
    valid = 1
    test = 2


class DatasetError(InputError):
    """A dataset that cannot supply what was asked of it (the message names the prefix)."""


@dataclass(frozen=True)
class GPTDatasetConfig:
    """What shapes the samples; the field names follow megatron-core's ``GPTDatasetConfig``.

    ``eod_token_id`` / ``pad_token_id`` are the tokenizer's ``eod`` and ``pad``; a pad id
    equal to the eod id (or in ``special_token_ids``) is replaced by -1, as megatron-core
    does, unless ``allow_ambiguous_pad_tokens``. ``data_cache_path`` enables the index
    cache (:mod:`megatron_ext.data.index_cache`); ``None`` builds indices in memory.
    """

    sequence_length: int
    eod_token_id: int
    random_seed: int = 1234
    pad_token_id: int = PAD_TOKEN_ID_NONE
    special_token_ids: Tuple[int, ...] = ()
    allow_ambiguous_pad_tokens: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    create_attention_mask: bool = False
    add_extra_token_to_sequence: bool = True
    drop_last_partial_validation_sequence: bool = True
    mid_level_dataset_surplus: float = 0.005
    data_cache_path: Optional[str] = None
    verify_cache: bool = True
    return_torch: bool = False

    def __post_init__(self) -> None:
        if int(self.sequence_length) < 2:
            raise ValueError(f"sequence_length (--seq-length) must be >= 2, got {self.sequence_length}")
        if self.mid_level_dataset_surplus < 0:
            raise ValueError(f"mid_level_dataset_surplus must be >= 0, got {self.mid_level_dataset_surplus}")

    @property
    def effective_pad_token_id(self) -> int:
        special = set(self.special_token_ids) | {self.eod_token_id}
        if self.pad_token_id in special and not self.allow_ambiguous_pad_tokens:
            return PAD_TOKEN_ID_NONE
        return self.pad_token_id

    @property
    def extra_tokens(self) -> int:
        return 1 if self.add_extra_token_to_sequence else 0

    def index_cache(self) -> IndexCache:
        return IndexCache(self.data_cache_path, verify=self.verify_cache)


def dataset_identity(indexed_dataset) -> dict:
    """The part of a cache key that identifies the .idx content (see index_cache)."""
    return {
        "path": os.path.abspath(indexed_dataset.path_prefix),
        "sequences": int(len(indexed_dataset)),
        "lengths_sha1": lengths_digest(indexed_dataset.sequence_lengths),
    }


class GPTDataset:
    """Samples of one split of a dataset.

    Args:
        indexed_dataset: the low-level dataset (``sequence_lengths``, ``get``, ``path_prefix``).
        indices: the split's sequence ids (a contiguous ``int32`` range, as megatron-core uses).
        num_samples: samples to provide at least (epochs repeat as needed); ``None`` for
            exactly one epoch.
        split: which split this is (only ``valid`` may keep a partial last sample).
        config: the sample configuration.
        identity: :func:`dataset_identity` of ``indexed_dataset`` when already computed.
    """

    def __init__(self, indexed_dataset, indices: np.ndarray, num_samples: Optional[int],
                 split: Split, config: GPTDatasetConfig, identity: Optional[dict] = None) -> None:
        self.dataset = indexed_dataset
        self.path_prefix = indexed_dataset.path_prefix
        self.indices = np.asarray(indices, dtype=np.int32)
        self.num_samples = None if num_samples is None else int(num_samples)
        self.split = split
        self.config = config
        self._pad = config.effective_pad_token_id
        if self.num_samples is not None and self.num_samples < 0:
            raise DatasetError(f"{self.path_prefix}: cannot draw {self.num_samples} samples")
        self.drop_last_partial_sequence = (
            config.drop_last_partial_validation_sequence if split == Split.valid else True)
        (self.tokens_per_epoch, self.num_epochs, self.separate_final_epoch,
         self._samples_before_final) = self._plan()
        cache = config.index_cache()
        self.cache_hit = False
        self.cache_key = None
        if cache.enabled:
            self.description = self._description(identity or dataset_identity(indexed_dataset))
            self.cache_key = cache_key(self.description)
            names = ("document_index", "sample_index", "shuffle_index")
            arrays, self.cache_hit = cache.load_or_build(self.cache_key, f"GPTDataset-{split.name}",
                                                         self.description, names, self._build_indices)
            self.document_index = arrays["document_index"]
            self.sample_index = arrays["sample_index"]
            self.shuffle_index = arrays["shuffle_index"]
        else:
            self.document_index, self.sample_index, self.shuffle_index = self._build_indices()

    # -- indices ---------------------------------------------------------------------

    def _description(self, identity: dict) -> dict:
        first, last = (int(self.indices[0]), int(self.indices[-1]) + 1) if len(self.indices) else (0, 0)
        return {
            "format_version": FORMAT_VERSION,
            "class": "GPTDataset",
            "dataset": identity,
            "split": self.split.name,
            "sequence_range": [first, last],
            "num_sequences": int(len(self.indices)),
            "sequences_sha1": lengths_digest(self.indices),
            "num_samples": self.num_samples,
            "sequence_length": int(self.config.sequence_length),
            "random_seed": int(self.config.random_seed),
            "add_extra_token_to_sequence": bool(self.config.add_extra_token_to_sequence),
            "drop_last_partial_sequence": bool(self.drop_last_partial_sequence),
            "shuffle": "numpy.random.RandomState",
        }

    def _plan(self) -> Tuple[int, int, bool, int]:
        """(tokens per epoch, epochs, separate final epoch?, samples before the final epoch)."""
        seq, extra = int(self.config.sequence_length), self.config.extra_tokens
        tokens_per_epoch = int(np.sum(self.dataset.sequence_lengths[self.indices], dtype=np.int64))
        first = int(self.indices[0]) if len(self.indices) else 0
        where = (f"{self.path_prefix} ({self.split.name} split, sequences [{first}, "
                 f"{first + len(self.indices)}))")
        wanted = "one epoch" if self.num_samples is None else f"{self.num_samples} samples"
        if tokens_per_epoch == 0:
            raise DatasetError(
                f"{where}: the split is empty ({len(self.indices)} sequences, 0 tokens); "
                f"it cannot supply {wanted}")
        if tokens_per_epoch < 2:
            raise DatasetError(f"{where}: 1 token cannot form a sequence; asked for {wanted}")
        if self.num_samples is None:
            if (tokens_per_epoch - extra) // seq == 0 and self.drop_last_partial_sequence:
                raise DatasetError(
                    f"{where}: {tokens_per_epoch} tokens cannot form one sample of {seq + extra} "
                    f"tokens; asked for {wanted}")
            return tokens_per_epoch, 1, False, 0
        # megatron-core adds epochs until they hold num_samples * seq + extra tokens.
        requested = self.num_samples * seq + extra
        num_epochs = max(1, -(-requested // tokens_per_epoch))
        if num_epochs == 1:
            return tokens_per_epoch, 1, False, 0
        samples_before_final = ((num_epochs - 1) * tokens_per_epoch - extra) // seq
        samples_from_final = self.num_samples - samples_before_final
        samples_per_epoch = (tokens_per_epoch - extra) // seq
        assert 0 <= samples_from_final <= samples_per_epoch + 1
        separate = samples_from_final < int(SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch)
        return tokens_per_epoch, num_epochs, separate, samples_before_final

    def _build_indices(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        from megatron_ext import _native

        seq, extra = int(self.config.sequence_length), self.config.extra_tokens
        tokens_per_epoch, num_epochs = self.tokens_per_epoch, self.num_epochs
        random_state = np.random.RandomState(self.config.random_seed)
        document_index = _build_document_index(self.indices, num_epochs, random_state,
                                               self.separate_final_epoch)
        lengths = self.dataset.sequence_lengths
        if len(document_index) * 2 > len(lengths):
            lengths = np.array(lengths)  # dense access: read the mapped lengths once
        sample_index = _native.build_sample_idx(
            lengths, document_index, seq, num_epochs, tokens_per_epoch,
            self.drop_last_partial_sequence, extra)
        total = sample_index.shape[0] - 1
        first = self._samples_before_final if self.separate_final_epoch else total
        shuffle_index = _build_shuffle_index(first, total, random_state)
        logger.info("%s %s split: built %d samples over %d epoch(s)%s", self.path_prefix,
                    self.split.name, total, num_epochs,
                    " (separate final epoch)" if self.separate_final_epoch else "")
        return document_index, sample_index, shuffle_index

    # -- samples ---------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.sample_index.shape[0]) - 1

    def get_text(self, idx: int) -> Tuple[np.ndarray, np.ndarray]:
        """Raw tokens (``sequence_length + extra``, int64, pad-filled) and document ids of sample ``idx``."""
        n = len(self)
        if not 0 <= idx < n:
            raise IndexError(f"{self.path_prefix}: sample {idx} out of range for {n} samples")
        extra = self.config.extra_tokens
        i = int(self.shuffle_index[idx])
        beg, beg_offset = (int(v) for v in self.sample_index[i])
        end, end_offset = (int(v) for v in self.sample_index[i + 1])
        doc_ids, parts = [], []
        if beg == end:
            doc_ids.append(int(self.document_index[beg]))
            parts.append(self.dataset.get(doc_ids[-1], offset=beg_offset,
                                          length=end_offset - beg_offset + extra))
        else:
            for k in range(beg, end + 1):
                doc_ids.append(int(self.document_index[k]))
                offset = beg_offset if k == beg else 0
                length = end_offset + extra if k == end else None
                parts.append(self.dataset.get(doc_ids[-1], offset=offset, length=length))
        want = self.config.sequence_length + extra
        text = np.empty(want, dtype=np.int64)
        filled = 0
        for part in parts:
            text[filled:filled + len(part)] = part
            filled += len(part)
        text[filled:] = self._pad
        return text, np.array(doc_ids, dtype=np.int64)

    def __getitem__(self, idx: Optional[int]) -> Dict[str, np.ndarray]:
        """Sample ``idx``; ``None`` is a padding sample (sample 0 with the loss masked out)."""
        text, _ = self.get_text(0 if idx is None else int(idx))
        sample = _make_sample(text, self.config, self._pad)
        if idx is None:
            sample["loss_mask"][:] = 0.0
        return _to_torch(sample) if self.config.return_torch else sample

    def __repr__(self) -> str:
        return (f"GPTDataset({self.path_prefix!r}, split={self.split.name}, samples={len(self)}, "
                f"sequences={len(self.indices)})")


def _build_document_index(documents: np.ndarray, num_epochs: int,
                          random_state: np.random.RandomState, separate_final_epoch: bool) -> np.ndarray:
    if not separate_final_epoch or num_epochs == 1:
        document_index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
        random_state.shuffle(document_index)
        return document_index
    first = _build_document_index(documents, num_epochs - 1, random_state, False)
    last = _build_document_index(documents, 1, random_state, False)
    return np.concatenate((first, last))


def _build_shuffle_index(num_samples: int, total_size: int,
                         random_state: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    random_state.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    random_state.shuffle(last)
    return np.concatenate((first, last))


def _make_sample(text: np.ndarray, config: GPTDatasetConfig, pad: int) -> Dict[str, np.ndarray]:
    if config.add_extra_token_to_sequence:
        tokens, labels = text[:-1].copy(), text[1:].copy()
    else:
        tokens = text
        labels = np.roll(text, -1)
        labels[-1] = pad
    n = tokens.shape[0]
    eod = config.eod_token_id
    loss_mask = np.ones(n, dtype=np.float32)
    if config.eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    position_ids = np.arange(n, dtype=np.int64)
    if config.reset_position_ids or (config.reset_attention_mask and config.create_attention_mask):
        # A document restarts after every EOD: its first token is the one after the EOD.
        starts = np.zeros(n, dtype=np.int64)
        after_eod = np.flatnonzero(tokens[:-1] == eod) + 1
        starts[after_eod] = after_eod
        np.maximum.accumulate(starts, out=starts)
        if config.reset_position_ids:
            position_ids -= starts
    sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
    if config.create_attention_mask:
        rows = np.arange(n)
        visible = rows[None, :] <= rows[:, None]
        if config.reset_attention_mask:
            visible &= rows[None, :] >= starts[:, None]
        sample["attention_mask"] = ~visible[None]  # True where attention is masked out
    loss_mask[labels == pad] = 0.0
    tokens[tokens == pad] = 0
    labels[labels == pad] = 0
    return sample


def _to_torch(sample: Dict[str, np.ndarray]):
    import torch

    return {k: torch.from_numpy(v) for k, v in sample.items()}
