"""Writing a split's documents: one dataset, or numbered shards of about ``--tokens-per-shard``
tokens each (a shard ends at the first document boundary past the limit), each a valid
Megatron dataset on its own.

Names: ``<prefix>[_<split>][_<NNNNN>]_<key>_document``. Every shard is built by the native
builder and finalized into a staging directory beside the outputs; only when the whole run
has succeeded are the files moved to their final names (``.bin`` first, ``.idx`` last), so
nothing half-written ever sits under a final name, and a failed ``--append`` leaves the old
shards and stats as they were.

The staging directory is a locked work directory, ``.<prefix>-staging.tmp-<random>``
(:class:`~megatron_ext.data.indexed_dataset.WorkDirectory`): when a run is killed, the next
run of the same prefix (or ``tools/check_dataset.py`` on one of its datasets) removes it,
and never removes one whose run is alive.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from megatron_ext.data.indexed_dataset import (
    MANIFEST_SUFFIX,
    IndexedDatasetBuilder,
    WorkDirectory,
    data_file_path,
    index_file_path,
)
from megatron_ext.data.preprocess import output_prefix_for_key


@dataclass
class Shard:
    prefix: str  # final dataset prefix, as given on --data-path
    documents: int
    tokens: int


def dataset_prefix(output_prefix: str, key: str, split: Optional[str], shard: Optional[int]) -> str:
    stem = output_prefix + (f"_{split}" if split else "") + ("" if shard is None else f"_{shard:05d}")
    return output_prefix_for_key(stem, key)


DATASET_SUFFIXES = (".bin", ".idx", MANIFEST_SUFFIX)


def shard_pattern(output_prefix: str, key: str) -> "re.Pattern":
    """Matches the file names of this output prefix's shards; groups: split (or None), number."""
    stem = re.escape(os.path.basename(output_prefix))
    suffixes = "|".join(re.escape(s) for s in DATASET_SUFFIXES)
    return re.compile(rf"{stem}(?:_(train|val))?_(\d{{5,}})_{re.escape(key)}_document(?:{suffixes})")


def blend_string(shards: list) -> str:
    """``"w0 prefix0 w1 prefix1 ..."`` weighted by tokens, for ``--data-path``."""
    return " ".join(f"{s.tokens} {s.prefix}" for s in shards if s.tokens > 0)


class Staging:
    """A hidden, locked directory beside the outputs where finished files wait for the end of the run."""

    def __init__(self, output_prefix: str) -> None:
        self.directory = os.path.dirname(os.path.abspath(output_prefix))
        self.work = WorkDirectory(output_prefix, "staging")
        self.path = self.work.path

    def file_for(self, final_path: str) -> str:
        return os.path.join(self.path, os.path.basename(final_path))

    def publish(self, prefixes: list) -> None:
        """Move each dataset's files (with any sidecar the builder wrote) to the final names, .idx last."""
        for prefix in prefixes:
            base = os.path.basename(prefix)
            names = [n for n in os.listdir(self.path) if n.startswith(base + ".")]
            names.sort(key=lambda n: (n.endswith(".idx"), not n.endswith(".bin"), n))
            for name in names:
                os.replace(os.path.join(self.path, name), os.path.join(self.directory, name))

    def publish_file(self, final_path: str) -> None:
        """Move one file (written at :meth:`file_for`) to its final name."""
        os.replace(self.file_for(final_path), final_path)

    def remove(self) -> None:
        self.work.close()


class SplitWriter:
    """Receives a split's tokenized documents in order and cuts them into shards."""

    def __init__(self, output_prefix: str, key: str, split: Optional[str], dtype, staging: Staging,
                 tokens_per_shard: Optional[int], first_shard: int = 0) -> None:
        self.output_prefix, self.key, self.split, self.dtype = output_prefix, key, split, dtype
        self.staging = staging
        self.tokens_per_shard = tokens_per_shard
        self.next_shard = first_shard
        self.shards: list = []
        self.builder = None
        self.prefix = None

    def _open(self) -> None:
        shard = self.next_shard if self.tokens_per_shard else None
        self.prefix = dataset_prefix(self.output_prefix, self.key, self.split, shard)
        self.builder = IndexedDatasetBuilder(self.staging.file_for(data_file_path(self.prefix)), self.dtype)
        self.next_shard += 1

    def _close(self) -> None:
        b = self.builder
        b.finalize(self.staging.file_for(index_file_path(self.prefix)))
        self.shards.append(Shard(self.prefix, b.document_count, b.token_count))
        self.builder = None

    def add(self, encoded, key: str) -> None:
        """Write an :class:`~megatron_ext.data.preprocess.EncodedChunk`'s documents."""
        e = encoded.keys[key]
        tokens, lens = e.tokens, e.seq_lens
        to, so = e.tok_offsets.tolist(), e.seq_offsets.tolist()  # Python ints slice faster than numpy's
        for d in range(encoded.documents):
            if self.builder is None:
                self._open()
            self.builder.add_document(tokens[to[d]:to[d + 1]], lens[so[d]:so[d + 1]])
            if self.tokens_per_shard and self.builder.token_count >= self.tokens_per_shard:
                self._close()

    def close(self) -> list:
        """Finish the last dataset; an unsharded split is written even when empty."""
        if self.builder is None and not self.tokens_per_shard and not self.shards:
            self._open()
        if self.builder is not None:
            self._close()
        return self.shards

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.shards) + (self.builder.document_count if self.builder else 0)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards) + (self.builder.token_count if self.builder else 0)

    def discard(self) -> None:
        if self.builder is not None:
            self.builder.discard()
            self.builder = None
