"""Dataset preparation for large corpora, around the tokenizer and builder of
megatron_ext.data.preprocess: normalization, filters, deduplication, a train/validation
split, shards that can be extended later, and stats. Imports neither torch nor megatron-core.

One module per step: ``inputs`` (files, directories, globs; jsonl/text; gz/zst), ``normalize``,
``filters``, ``dedup`` (the tables), ``split``, ``clean`` (the worker stage), ``shards``,
``stats``, ``config`` (the options, checked together), ``pipeline`` (``prepare``).
"""
from megatron_ext.data.prepare.config import PrepareConfig, PrepareError
from megatron_ext.data.prepare.pipeline import PrepareResult, prepare

__all__ = ["PrepareConfig", "PrepareError", "PrepareResult", "prepare"]
