"""``prepare``: read -> clean (workers) -> deduplicate and split (main thread, in input
order) -> tokenize (workers, megatron_ext.data.preprocess's ChunkEncoder) -> write (native
builder, in shards) -> publish -> stats.

Both worker stages share one thread pool; at most ``2 * workers + 1`` blocks wait in each
stage, so memory is the deduplication table plus a few blocks, whatever the corpus size.
With no preparation option the run is ``preprocess`` itself, byte for byte.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np

from megatron_ext.data.indexed_dataset import dtype_for_vocab
from megatron_ext.data.preprocess import (
    Chunk,
    ChunkEncoder,
    PreprocessResult,
    _check_config,
    _in_order,
    check_output_location,
    preprocess,
)
from megatron_ext.data.prepare.clean import Cleaner
from megatron_ext.data.prepare.config import PrepareConfig, PrepareError
from megatron_ext.data.prepare.dedup import BloomTable, DiskTable, MemoryTable, digests_array
from megatron_ext.data.prepare.inputs import read_blocks, resolve_inputs
from megatron_ext.data.prepare.shards import Shard, SplitWriter, Staging, blend_string
from megatron_ext.data.prepare.split import SmallestValues, split_values
from megatron_ext.data.prepare.stats import Progress, merge_runs, run_record, stats_path, summary, write_json_atomic
from megatron_ext.data.tokenizers import build_tokenizer

_MAX_BAD_MESSAGES = 20


@dataclass
class PrepareResult:
    stats: Optional[dict] = None  # what is in <prefix>_stats.json
    blends: dict = field(default_factory=dict)  # split -> "--data-path" blend string
    summary: str = ""
    preprocess: Optional[PreprocessResult] = None  # set when no preparation option was given


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _table_file(prefix: str, kind: str) -> str:
    return f"{prefix}_dedup_{kind}" + (".sqlite" if kind == "disk" else ".npy")


def _previous_stats(config: PrepareConfig, header: dict) -> Optional[dict]:
    """The stats of the runs --append extends, checked against this run's options."""
    import json

    path = stats_path(config.preprocess.output_prefix)
    if not config.append:
        if config.tokens_per_shard and os.path.exists(path):
            raise PrepareError(f"--output-prefix {config.preprocess.output_prefix}: {path} exists; add --append to "
                               f"write new shards after its last one, or remove the old outputs")
        return None
    if not os.path.exists(path):
        raise PrepareError(f"--append: {path} does not exist (run once without --append first)")
    with open(path, encoding="utf-8") as f:
        previous = json.load(f)
    for name in ("options", "tokenizer"):
        for k, v in header[name].items():
            if previous.get(name, {}).get(k) != v:
                flag = "--" + k.replace("_", "-")
                raise PrepareError(f"--append: {flag} is {v!r} but {path} was prepared with {previous[name].get(k)!r}")
    return previous


def _open_table(config: PrepareConfig, staging: Staging, previous: Optional[dict]):
    if config.dedup is None:
        return None
    prefix = config.preprocess.output_prefix
    saved = _table_file(prefix, config.dedup_table)
    resume = previous is not None and os.path.exists(saved)
    if config.dedup_table == "memory":
        return MemoryTable.load(saved) if resume else MemoryTable()
    if config.dedup_table == "bloom":
        if resume:
            return BloomTable.load(saved, config.dedup_expected_items, config.dedup_false_positive_rate,
                                   previous["dedup_table"]["entries"])
        return BloomTable(config.dedup_expected_items, config.dedup_false_positive_rate)
    directory = config.dedup_dir or staging.path
    work = os.path.join(directory, f".{os.path.basename(prefix)}-dedup-{os.getpid()}.sqlite")
    if resume:
        shutil.copyfile(saved, work)  # a failed run leaves the saved table as it was
    return DiskTable(work)


def _keep_table(table, config: PrepareConfig) -> None:
    """Save the table beside sharded outputs, so --append deduplicates against earlier runs."""
    if table is None:
        return
    if table.kind == "disk":
        table.close()
        if config.tokens_per_shard:
            os.replace(table.path, _table_file(config.preprocess.output_prefix, "disk"))
        else:
            os.unlink(table.path)
    elif config.tokens_per_shard:
        table.save(_table_file(config.preprocess.output_prefix, table.kind))


def _drop_repeated_paragraphs(table, block, keep: np.ndarray, datas: list, counts: Counter) -> None:
    docs = np.flatnonzero(keep)
    found = [dg for d in docs for _, dg in block.paragraph_digests[d]]
    if not found:
        return
    fresh = table.add(digests_array(found))
    pos = 0
    for d in docs:
        hashed = block.paragraph_digests[d]
        flags = fresh[pos:pos + len(hashed)]
        pos += len(hashed)
        if flags.all():
            continue
        repeated = {i for (i, _), f in zip(hashed, flags) if not f}
        counts["paragraphs_removed"] += len(repeated)
        parts = [p for i, p in enumerate(block.paragraphs[d]) if i not in repeated]
        if parts:
            datas[d] = "\n\n".join(parts).encode("utf-8")
        else:
            keep[d] = False
            counts["dropped_all_paragraphs_duplicate"] += 1


def _val_threshold(executor, cleaner: Cleaner, files, config: PrepareConfig) -> float:
    """--val-docs N: a first pass finding the N-th smallest split value of the kept documents."""
    smallest = SmallestValues(config.val_docs)
    blocks = read_blocks(files, config.preprocess.chunk_bytes, config.text_docs_per)
    for block in _in_order(executor, cleaner, blocks, 2 * config.preprocess.workers + 1):
        smallest.add(split_values(block.digests, config.seed))
    return smallest.threshold()


def prepare(config: PrepareConfig, log: Optional[Callable[[str], None]] = _stderr) -> PrepareResult:
    """Run a preparation (see the module docstring); returns the stats and the blend strings."""
    log = log or (lambda message: None)
    p = config.preprocess
    files = resolve_inputs(p.inputs)
    if not config.preparing:
        return PrepareResult(preprocess=preprocess(replace(p, inputs=[f.path for f in files]), log))
    start = time.perf_counter()
    config.check()
    _check_config(p)
    key = p.json_keys[0]
    tokenizer = build_tokenizer(p.tokenizer_type, p.tokenizer_model, legacy=p.legacy_tokenizer)
    check_output_location(p.output_prefix, [key])
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    encoder = ChunkEncoder(tokenizer, [key], p.append_eod, False, dtype)
    header = {"tokenizer": {"tokenizer_type": p.tokenizer_type, "tokenizer_model": os.path.abspath(p.tokenizer_model),
                            "vocab_size": tokenizer.vocab_size, "legacy_tokenizer": p.legacy_tokenizer},
              "options": config.options()}
    previous = _previous_stats(config, header)
    splits = ["train", "val"] if config.has_val else [None]
    cleaner = Cleaner(key, config.unicode_form if config.normalize else None, config.document_filter,
                      config.dedup == "paragraph", config.min_paragraph_chars, p.skip_bad_lines)
    counts: Counter = Counter()
    staging = Staging(p.output_prefix)
    writers: dict = {}
    table = executor = None
    try:
        table = _open_table(config, staging, previous)
        for s in splits:
            done = len(previous["splits"].get(s or "all", {}).get("shards", [])) if previous else 0
            writers[s] = SplitWriter(p.output_prefix, key, s, dtype, staging, config.tokens_per_shard, done)
        executor = ThreadPoolExecutor(max_workers=p.workers, thread_name_prefix="prepare")
        threshold = _val_threshold(executor, cleaner, files, config) if config.val_docs else None
        progress = Progress(sum(f.size for f in files))
        shown_bad = 0

        def tokenize_jobs():
            nonlocal shown_bad
            blocks = read_blocks(files, p.chunk_bytes, config.text_docs_per)
            for block in _in_order(executor, cleaner, blocks, 2 * p.workers + 1):
                counts.update(block.counts)
                for message in block.bad_messages:
                    if shown_bad < _MAX_BAD_MESSAGES:
                        log(f"skipped bad line {message}")
                    shown_bad += 1
                keep = np.ones(len(block.data), bool)
                datas = list(block.data)
                if table is not None and len(datas):
                    keep = table.add(block.digests)
                    counts["dropped_exact_duplicate"] += int((~keep).sum())
                    if config.dedup == "paragraph":
                        _drop_repeated_paragraphs(table, block, keep, datas, counts)
                if config.has_val:
                    values = split_values(block.digests, config.seed)
                    val = values <= threshold if threshold is not None else values < config.val_fraction
                    sides = {"train": keep & ~val, "val": keep & val}
                else:
                    sides = {None: keep}
                for s, mask in sides.items():
                    texts = [(block.wheres[d], datas[d]) for d in np.flatnonzero(mask)]
                    if texts:
                        yield s, Chunk("", 1, 0, texts=texts)
                progress.update(sum(w.documents for w in writers.values()),
                                sum(w.tokens for w in writers.values()), block.bytes_done)

        def tokenize(job):
            return job[0], encoder(job[1])

        for s, encoded in _in_order(executor, tokenize, tokenize_jobs(), 2 * p.workers + 1):
            writers[s].add(encoded, key)
        progress.done()
        executor.shutdown(wait=True)
        executor = None
        shards = {s: w.close() for s, w in writers.items()}
        writers = {}
        staging.publish([sh.prefix for group in shards.values() for sh in group])
        counts["bytes_in"] = sum(f.size for f in files)
        run = run_record(counts, {s or "all": group for s, group in shards.items()}, [f.path for f in files],
                         time.perf_counter() - start)
        if table is not None:
            header["dedup_table"] = table.stats()
            _keep_table(table, config)
            table = None
        stats = merge_runs(previous, run, header)
        write_json_atomic(stats_path(p.output_prefix), stats)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        for w in writers.values():
            w.discard()
        if table is not None and table.kind == "disk":
            table.close()
            if os.path.exists(table.path):
                os.unlink(table.path)
        staging.remove()
    blends = {name: blend_string([Shard(**sh) for sh in s["shards"]]) for name, s in stats["splits"].items()}
    text = summary(stats, run, blends)
    log(text)
    return PrepareResult(stats=stats, blends=blends, summary=text)
