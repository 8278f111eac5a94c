"""Blends of GPT datasets: ``--data-path`` / ``--split`` parsing, the blended dataset and
the builder for train/valid/test, all in megatron-core 0.16.1's order.

:func:`build_gpt_datasets` is our ``BlendedMegatronDatasetBuilder(GPTDataset, sizes,
...).build()`` for a ``blend`` + ``split`` configuration:

* a single prefix without a weight: one :class:`GPTDataset` per split with exactly the
  requested number of samples;
* weighted prefixes (``"w1 p1 w2 p2 ..."``, or one weighted prefix): weights are
  normalised; each prefix gets a :class:`GPTDataset` per split sized
  ``ceil(ceil(size * weight) * (1 + mid_level_dataset_surplus))`` and a
  :class:`BlendedDataset` of ``sum(ceil(size * weight))`` samples draws from them with
  the greedy blending indices (``megatron_ext._native.build_blending_indices``).
"""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from megatron_ext.data.gpt_dataset import (
    FORMAT_VERSION,
    DatasetError,
    GPTDataset,
    GPTDatasetConfig,
    Split,
    dataset_identity,
)
from megatron_ext.data.index_cache import cache_key

Blend = Tuple[List[str], Optional[List[float]]]


# -- parsing ------------------------------------------------------------------------------

def _split_blend(data_path: Union[str, Sequence[str]]) -> List[str]:
    tokens = data_path.split() if isinstance(data_path, str) else [str(t) for t in data_path]
    if not tokens:
        raise ValueError("--data-path is empty: give a prefix or 'weight prefix' pairs")
    return tokens


def _parse_blend_spec(data_path: Union[str, Sequence[str]]) -> Blend:
    """(prefixes, weights); weights is None for a single prefix given without a weight."""
    tokens = _split_blend(data_path)
    if len(tokens) == 1:
        return [tokens[0]], None
    if len(tokens) % 2:
        raise ValueError(
            f"--data-path has {len(tokens)} entries; expected one prefix or 'weight prefix' pairs "
            f"(an even count): {' '.join(tokens)!r}")
    prefixes, weights = [], []
    for i in range(0, len(tokens), 2):
        raw, prefix = tokens[i], tokens[i + 1]
        try:
            weight = float(raw)
        except ValueError:
            raise ValueError(
                f"--data-path: {raw!r} (entry {i + 1}) is not a number; expected 'weight prefix' "
                f"pairs") from None
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(
                f"--data-path: weight {raw!r} (entry {i + 1}, for {prefix!r}) must be a positive "
                f"number")
        prefixes.append(prefix)
        weights.append(weight)
    return prefixes, weights


def parse_blend(data_path: Union[str, Sequence[str]]) -> Tuple[List[str], List[float]]:
    """``"0.05 c4_00000 0.05 c4_00001"`` -> (prefixes, weights); a single bare prefix has weight 1.

    Raises ValueError naming ``--data-path`` and the bad entry on an odd count or a
    weight that is not a positive number.
    """
    prefixes, weights = _parse_blend_spec(data_path)
    return prefixes, ([1.0] if weights is None else weights)


def parse_split(split: str) -> List[float]:
    """``"98,2,0"`` or ``"98/2/0"`` -> normalised [train, valid, test] ratios.

    One to three non-negative numbers; missing ones are 0 (as megatron-core pads them).
    Raises ValueError naming ``--split`` otherwise.
    """
    parts = [p.strip() for p in re.split(r"[,/]", str(split))]
    if not 1 <= len(parts) <= len(Split) or any(p == "" for p in parts):
        raise ValueError(
            f"--split {split!r}: expected up to {len(Split)} numbers separated by ',' or '/', "
            f"e.g. '98,2,0'")
    values = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            raise ValueError(f"--split {split!r}: {p!r} is not a number") from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"--split {split!r}: {p!r} must be a non-negative number")
        values.append(v)
    values += [0.0] * (len(Split) - len(values))
    if not sum(values) > 0:
        raise ValueError(f"--split {split!r}: the parts must sum to a positive number")
    return normalize(values)


def normalize(weights: Sequence[float]) -> List[float]:
    """Weights divided by their sum, in float64 (megatron-core's ``normalize``)."""
    w = np.array(weights, dtype=np.float64)
    return (w / np.sum(w)).tolist()


def split_matrix(ratios: Sequence[float]) -> List[Optional[Tuple[float, float]]]:
    """[0.98, 0.02, 0.0] -> [(0, 0.98), (0.98, 1.0), None]: each split's share of the sequences."""
    bounds = [0.0]
    for r in ratios:
        bounds.append(bounds[-1] + r)
    return [(lo, hi) if hi > lo else None for lo, hi in zip(bounds[:-1], bounds[1:])]


def samples_per_dataset(weights: Sequence[float], sizes: Sequence[int],
                        surplus: float = 0.0) -> List[List[int]]:
    """Samples to request per dataset per split: ``ceil(ceil(size * weight) * (1 + surplus))``."""
    if not np.isclose(sum(weights), 1.0):
        raise ValueError(f"blend weights must be normalised, they sum to {sum(weights)}")
    return [[int(math.ceil(math.ceil(size * weight) * (1 + surplus))) for size in sizes]
            for weight in weights]


# -- blended dataset ----------------------------------------------------------------------

class BlendedDataset:
    """Samples drawn from several datasets of one split in proportion to their weights.

    ``size``: number of samples (weights are normalised); ``None`` draws exactly
    ``weights[i]`` (integer) samples from dataset ``i``. Items are the datasets' samples
    with a ``dataset_id`` entry added.
    """

    def __init__(self, datasets: Sequence[GPTDataset], weights: Sequence[float],
                 size: Optional[int], config: GPTDatasetConfig) -> None:
        if not datasets or len(datasets) != len(weights):
            raise ValueError("a blend needs as many weights as datasets (at least one)")
        if len(datasets) >= 32767:
            raise ValueError(f"a blend takes at most 32766 datasets, got {len(datasets)}")
        if any(not w > 0 for w in weights):
            raise ValueError(f"blend weights must be positive, got {list(weights)}")
        self.datasets = list(datasets)
        self.split = self.datasets[0].split
        self.size = size
        self.config = config
        self.weights = normalize(weights) if size is not None else [int(w) for w in weights]
        cache = config.index_cache()
        self.cache_hit = False
        self.cache_key = None
        names = ("dataset_index", "dataset_sample_index")
        if cache.enabled:
            self.description = {
                "format_version": FORMAT_VERSION,
                "class": "BlendedDataset",
                "split": self.split.name,
                "datasets": [d.cache_key for d in self.datasets],
                "weights": self.weights,
                "size": size,
            }
            self.cache_key = cache_key(self.description)
            arrays, self.cache_hit = cache.load_or_build(self.cache_key, f"BlendedDataset-{self.split.name}",
                                                         self.description, names, self._build_indices)
            self.dataset_index = arrays["dataset_index"]
            self.dataset_sample_index = arrays["dataset_sample_index"]
        else:
            self.dataset_index, self.dataset_sample_index = self._build_indices()

    def _build_indices(self) -> Tuple[np.ndarray, np.ndarray]:
        from megatron_ext import _native

        n = len(self.datasets)
        if self.size is not None:
            dataset_index = np.zeros(self.size, dtype=np.int16)
            dataset_sample_index = np.zeros(self.size, dtype=np.int64)
            _native.build_blending_indices(dataset_index, dataset_sample_index,
                                           np.array(self.weights, dtype=np.float64), n, self.size)
        else:
            total = int(sum(self.weights))
            dataset_index = np.zeros(total, dtype=np.int16)
            dataset_sample_index = np.zeros(total, dtype=np.int64)
            _native.build_exhaustive_blending_indices(
                dataset_index, dataset_sample_index, np.array(self.weights, dtype=np.int64), n)
        ids, counts = np.unique(dataset_index, return_counts=True)
        for i, count in zip(ids.tolist(), counts.tolist()):
            available = len(self.datasets[i])
            if available < count:
                raise DatasetError(
                    f"{self.datasets[i].path_prefix}: the {self.split.name} blend requests "
                    f"{count} samples from it but it has only {available}; raise "
                    f"mid_level_dataset_surplus (now {self.config.mid_level_dataset_surplus})")
        return dataset_index, dataset_sample_index

    def __len__(self) -> int:
        return int(self.dataset_index.shape[0])

    def __getitem__(self, idx: int) -> Dict:
        n = len(self)
        if not 0 <= idx < n:
            raise IndexError(f"blend sample {idx} out of range for {n} samples")
        d = int(self.dataset_index[idx])
        sample = self.datasets[d][int(self.dataset_sample_index[idx])]
        return {"dataset_id": d, **sample}

    def __repr__(self) -> str:
        return f"BlendedDataset(split={self.split.name}, samples={len(self)}, datasets={len(self.datasets)})"


# -- builder ------------------------------------------------------------------------------

def _open_dataset(prefix: str):
    from megatron_ext.data.indexed_dataset import IndexedDataset

    for suffix in (".idx", ".bin"):
        if not os.path.exists(prefix + suffix):
            raise FileNotFoundError(f"--data-path: {prefix + suffix} does not exist")
    return IndexedDataset(prefix)


def _split_datasets(prefix: str, ratios_matrix, sizes: Sequence[Optional[int]],
                    config: GPTDatasetConfig) -> List[Optional[GPTDataset]]:
    indexed = _open_dataset(prefix)
    identity = dataset_identity(indexed) if config.data_cache_path is not None else None
    n = len(indexed)
    out: List[Optional[GPTDataset]] = []
    for split in Split:
        bounds = ratios_matrix[split.value]
        if bounds is None or sizes[split.value] == 0:   # no share, or nothing asked of it
            out.append(None)
            continue
        beg = int(round(bounds[0] * float(n)))
        end = int(round(bounds[1] * float(n)))
        indices = np.arange(beg, end, dtype=np.int32)
        out.append(GPTDataset(indexed, indices, sizes[split.value], split, config, identity))
    return out


def build_gpt_datasets(config: GPTDatasetConfig, data_path: Union[str, Sequence[str], Blend],
                       split: str, sizes: Sequence[Optional[int]]) -> List[Optional[object]]:
    """Train, valid and test datasets, as megatron-core builds them; ``None`` for a split
    with no share in ``split`` or with 0 samples requested (it is not built, so a split that
    would be empty is only an error when samples are asked of it).

    Args:
        config: the sample configuration (sequence length, seed, cache, ...).
        data_path: ``--data-path`` as one string or its words, or a ``(prefixes, weights)``
            blend (``weights`` None: weigh the prefixes by their one-epoch sizes).
        split: ``--split``, e.g. ``"98,2,0"``.
        sizes: samples per split, e.g. ``[train_iters * global_batch_size, eval_iters *
            global_batch_size * (train_iters // eval_interval + 1), eval_iters *
            global_batch_size]``; ``None`` for one epoch (unweighted blends only); 0 skips the split.
    """
    if len(sizes) != len(Split):
        raise ValueError(f"sizes needs {len(Split)} entries (train, valid, test), got {len(sizes)}")
    if isinstance(data_path, tuple) and len(data_path) == 2 and isinstance(data_path[0], list):
        prefixes, weights = list(data_path[0]), data_path[1]
        if weights is not None and len(weights) != len(prefixes):
            raise ValueError("--data-path: prefixes and weights must be equal in number")
    else:
        prefixes, weights = _parse_blend_spec(data_path)
    matrix = split_matrix(parse_split(split))

    if len(prefixes) == 1 and weights is None:
        return _split_datasets(prefixes[0], matrix, sizes, config)

    if weights is not None:
        weights = normalize(weights)
        if any(s is None for s in sizes):
            raise ValueError("a weighted --data-path needs a number of samples for every split")
        targets = samples_per_dataset(weights, sizes)
        buffers = samples_per_dataset(weights, sizes, surplus=config.mid_level_dataset_surplus)
    else:
        buffers = [[0 if size == 0 else None for size in sizes] for _ in prefixes]
    per_prefix = [_split_datasets(p, matrix, b, config) for p, b in zip(prefixes, buffers)]

    blended: List[Optional[object]] = [None] * len(Split)
    for split_ in Split:
        i = split_.value
        if matrix[i] is None or sizes[i] == 0:
            continue
        datasets = [per_prefix[k][i] for k in range(len(prefixes))]
        if weights is not None:
            size = sum(targets[k][i] for k in range(len(prefixes)))
            blended[i] = BlendedDataset(datasets, weights, size, config)
        else:
            lengths = [len(d) for d in datasets]
            size = None if sizes[i] is None else min(sizes[i], sum(lengths))
            blended[i] = BlendedDataset(datasets, lengths, size, config)
    return blended
