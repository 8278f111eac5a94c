"""``prepare``: read -> clean (workers) -> deduplicate and split (main thread, in input
order) -> tokenize (workers, megatron_ext.data.preprocess's ChunkEncoder) -> write (native
builder, in shards) -> publish -> stats.

Both worker stages share one thread pool; at most ``2 * workers + 1`` blocks wait in each
stage, so memory is the deduplication table plus a few blocks, whatever the corpus size.
With no preparation option the run is ``preprocess`` itself, byte for byte.

Before any work: the options, every final output name (a directory in the way) and
``--dedup-dir`` are checked, and the temporaries of killed runs of the same prefix are
removed (staging directory, working dedup table; a live run's are locked and kept). At the
end, nothing is published for an empty result (``--allow-empty`` writes it), an empty
requested split, or an overfilled Bloom filter. Publishing: datasets (``.bin`` first,
``.idx`` last), then this run's dedup table under a new name, then the stats, which are the
commit point: they name the table the next ``--append`` loads, so a kill at any moment
leaves the previous stats and table consistent; the previous table is removed last.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import compress
from typing import Callable, Optional

import numpy as np

from megatron_ext.data.indexed_dataset import WorkDirectory, dtype_for_vocab, remove_stale_temporaries
from megatron_ext.data.preprocess import (
    Chunk,
    ChunkEncoder,
    EmptyInputError,
    PreprocessResult,
    _check_config,
    _in_order,
    check_output_location,
    output_prefix_for_key,
    preprocess,
)
from megatron_ext.data.prepare.clean import Cleaner
from megatron_ext.data.prepare.config import PrepareConfig, PrepareError
from megatron_ext.data.prepare.dedup import BloomTable, DiskTable, MemoryTable, digests_array
from megatron_ext.data.prepare.inputs import read_blocks, resolve_inputs
from megatron_ext.data.prepare.shards import (
    DATASET_SUFFIXES,
    Shard,
    SplitWriter,
    Staging,
    blend_string,
    dataset_prefix,
    shard_pattern,
)
from megatron_ext.data.prepare.split import SmallestValues, split_values
from megatron_ext.data.prepare.stats import (
    Progress,
    merge_runs,
    resolve_prefix,
    run_record,
    stats_path,
    summary,
    upgrade,
)
from megatron_ext.data.tokenizers import build_tokenizer
from megatron_ext.files import atomic_write_text

_MAX_BAD_MESSAGES = 20


@dataclass
class PrepareResult:
    stats: Optional[dict] = None  # what is in <prefix>_stats.json
    blends: dict = field(default_factory=dict)  # split (json key without preparation) -> "--data-path" blend
    datasets: dict = field(default_factory=dict)  # split -> dataset prefixes (paths from here), all runs
    summary: str = ""
    preprocess: Optional[PreprocessResult] = None  # set when no preparation option was given


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _table_file(prefix: str, kind: str, run: Optional[int] = None) -> str:
    """The saved dedup table after ``run`` runs (None: the name of stats version 1)."""
    return f"{prefix}_dedup_{kind}" + ("" if run is None else f"_{run:05d}") + (".sqlite" if kind == "disk" else ".npy")


def _saved_table(config: PrepareConfig, previous: Optional[dict]) -> Optional[str]:
    """The table file the stats of earlier runs name (the one --append loads)."""
    table = (previous or {}).get("dedup_table")
    if not table:
        return None
    prefix = config.preprocess.output_prefix
    name = table.get("file")
    return resolve_prefix(prefix, name) if name else _table_file(prefix, table["table"])


def _previous_stats(config: PrepareConfig, header: dict) -> Optional[dict]:
    """The stats of the runs --append extends, checked against this run's options."""
    path = stats_path(config.preprocess.output_prefix)
    if os.path.isdir(path):
        raise PrepareError(f"--output-prefix {config.preprocess.output_prefix}: output {path} is a directory")
    if not config.append:
        if config.tokens_per_shard and os.path.exists(path):
            raise PrepareError(f"--output-prefix {config.preprocess.output_prefix}: {path} exists; add --append to "
                               f"write new shards after its last one, or remove the old outputs")
        return None
    if not os.path.exists(path):
        raise PrepareError(f"--append: {path} does not exist (run once without --append first)")
    try:
        with open(path, encoding="utf-8") as f:
            previous = upgrade(json.load(f))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PrepareError(f"--append: {path} is not readable stats ({e})") from None
    for name in ("options", "tokenizer"):
        for k, v in header[name].items():
            if previous.get(name, {}).get(k) != v:
                flag = "--" + k.replace("_", "-")
                raise PrepareError(f"--append: {flag} is {v!r} but {path} was prepared with {previous[name].get(k)!r}")
    saved = _saved_table(config, previous)
    if config.dedup and saved and not os.path.isfile(saved):
        raise PrepareError(f"--append: {saved}, the deduplication table of the earlier runs named in {path}, "
                           f"is missing")
    return previous


def _remove_stale(config: PrepareConfig, key: str, log: Callable[[str], None]) -> None:
    """Temporaries of killed runs of this prefix: staging directory, working dedup table, .tmp- files."""
    prefix = config.preprocess.output_prefix
    prefixes = [prefix, output_prefix_for_key(prefix, key)]
    if config.dedup_dir is not None:
        prefixes.append(os.path.join(config.dedup_dir, os.path.basename(prefix)))
    for p in prefixes:
        for path in remove_stale_temporaries(p):
            log(f"removed {path}, a temporary left by an interrupted run")


def _check_locations(config: PrepareConfig, key: str, splits: list, runs: int) -> None:
    """Fail before any work when a final output name is taken by a directory or --dedup-dir is unusable."""
    prefix = config.preprocess.output_prefix
    directory = os.path.dirname(os.path.abspath(prefix))
    finals = [stats_path(prefix)]
    if config.dedup and config.tokens_per_shard:
        finals.append(_table_file(prefix, config.dedup_table, runs))
    if config.tokens_per_shard:
        pattern = shard_pattern(prefix, key)
        finals += [os.path.join(directory, n) for n in os.listdir(directory) if pattern.fullmatch(n)]
    else:
        finals += [dataset_prefix(prefix, key, s, None) + suffix for s in splits for suffix in DATASET_SUFFIXES]
    for path in finals:
        if os.path.isdir(path):
            raise PrepareError(f"--output-prefix {prefix}: output {path} is a directory")
    d = config.dedup_dir
    if d is not None:
        if not os.path.isdir(d):
            raise PrepareError(f"--dedup-dir {d}: " + ("not a directory" if os.path.exists(d) else "does not exist"))
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=d)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise PrepareError(f"--dedup-dir {d}: cannot write there: {e.strerror}") from None


def _open_table(config: PrepareConfig, work_dir: str, previous: Optional[dict]):
    if config.dedup is None:
        return None
    saved = _saved_table(config, previous)
    if config.dedup_table == "memory":
        return MemoryTable.load(saved) if saved else MemoryTable()
    if config.dedup_table == "bloom":
        if saved:
            return BloomTable.load(saved, config.dedup_expected_items, config.dedup_false_positive_rate,
                                   previous["dedup_table"]["entries"])
        return BloomTable(config.dedup_expected_items, config.dedup_false_positive_rate)
    work = os.path.join(work_dir, "dedup.sqlite")
    if saved:
        shutil.copyfile(saved, work)  # a failed run leaves the saved table as it was
    return DiskTable(work)


def _check_capacity(table, config: PrepareConfig) -> None:
    if table.kind == "bloom" and table.overfilled:
        raise PrepareError(
            f"--dedup-expected-items {table.expected_items:,}: the Bloom filter already holds {table.count:,} "
            f"entries (documents{' and paragraphs' if config.dedup == 'paragraph' else ''}), more than it was "
            f"sized for, and past that it drops unique text as duplicate far more often than "
            f"--dedup-false-positive-rate {table.false_positive_rate:g}; nothing written. Give a larger "
            f"--dedup-expected-items (with --append: prepare again from the start), or --dedup-table memory or disk")


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


def _split_flag(config: PrepareConfig) -> str:
    return f"--val-docs {config.val_docs}" if config.val_docs is not None else f"--val-fraction {config.val_fraction}"


def _val_threshold(executor, cleaner: Cleaner, files, config: PrepareConfig) -> float:
    """--val-docs N: a first pass finding the N-th smallest split value of the kept documents."""
    smallest = SmallestValues(config.val_docs)
    blocks = read_blocks(files, config.preprocess.chunk_bytes, config.text_docs_per)
    for block in _in_order(executor, cleaner, blocks, 2 * config.preprocess.workers + 1):
        smallest.add(split_values(block.digests, config.seed))
    found = smallest.values.size
    if 0 < found < config.val_docs and not config.preprocess.allow_empty:
        raise PrepareError(f"{_split_flag(config)}: the input has only {found:,} distinct documents after filtering, "
                           f"so all would be validation and the training split would be empty; nothing written. "
                           f"Give a smaller --val-docs (--allow-empty writes it anyway)")
    return smallest.threshold()


def _check_not_empty(config: PrepareConfig, files, run: dict, stats: dict) -> None:
    """Refuse (before publishing) a run without tokens, and a requested split left empty."""
    if config.preprocess.allow_empty:
        return
    if sum(s["tokens"] for s in run["splits"].values()) == 0:
        names = [f.path for f in files]
        shown = " ".join(names[:3]) + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")
        dropped = ", ".join(f"{k} {v:,}" for k, v in run["dropped"].items() if v)
        raise EmptyInputError(
            f"--input {shown}: no tokens in {run['documents_in']:,} documents"
            + (f" (dropped: {dropped})" if dropped else "")
            + f" ({run['blank_lines']:,} blank lines, {run['bad_lines']:,} bad lines skipped); nothing written "
              f"(--allow-empty writes the empty dataset)")
    if not config.has_val:
        return
    kept = stats["kept"]
    if stats["splits"]["train"]["documents"] == 0:
        raise PrepareError(f"{_split_flag(config)}: the training split would be empty (all {kept:,} kept documents "
                           f"fall in validation); nothing written. Hold out fewer documents "
                           f"(--allow-empty writes it anyway)")
    if stats["splits"]["val"]["documents"] == 0:
        raise PrepareError(f"{_split_flag(config)}: the validation split would be empty (none of the {kept:,} kept "
                           f"documents falls in it); nothing written. Hold out more, e.g. with --val-docs N "
                           f"(--allow-empty writes it anyway)")


def _blends(config: PrepareConfig, stats: dict) -> tuple[dict, dict]:
    """(split -> blend string, split -> dataset prefixes), prefixes as paths from here."""
    prefix = config.preprocess.output_prefix
    datasets, blends = {}, {}
    for name, split in stats["splits"].items():
        shards = [Shard(resolve_prefix(prefix, sh["prefix"]), sh["documents"], sh["tokens"]) for sh in split["shards"]]
        datasets[name] = [sh.prefix for sh in shards]
        blends[name] = blend_string(shards)
    return blends, datasets


def prepare(config: PrepareConfig, log: Optional[Callable[[str], None]] = _stderr) -> PrepareResult:
    """Run a preparation (see the module docstring); returns the stats and the blend strings."""
    log = log or (lambda message: None)
    p = config.preprocess
    files = resolve_inputs(p.inputs)
    if not config.preparing:
        done = preprocess(replace(p, inputs=[f.path for f in files]), log)
        return PrepareResult(preprocess=done, blends=dict(done.outputs))  # a one-dataset blend is its prefix
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
    runs = len(previous["runs"]) + 1 if previous else 1
    _remove_stale(config, key, log)
    _check_locations(config, key, splits, runs)
    cleaner = Cleaner(key, config.unicode_form if config.normalize else None, config.document_filter,
                      config.dedup == "paragraph", config.min_paragraph_chars, p.skip_bad_lines)
    counts: Counter = Counter()
    staging = Staging(p.output_prefix)
    dedup_work = None
    writers: dict = {}
    table = executor = None
    try:
        if config.dedup_dir is not None:  # the disk table's working file, locked like the staging directory
            dedup_work = WorkDirectory(os.path.join(config.dedup_dir, os.path.basename(p.output_prefix)), "dedup")
        table = _open_table(config, (dedup_work or staging).path, previous)
        duplicate = "dropped_probable_duplicate" if config.dedup_table == "bloom" else "dropped_exact_duplicate"
        for s in splits:
            done = len(previous["splits"].get(s or "all", {}).get("shards", [])) if previous else 0
            writers[s] = SplitWriter(p.output_prefix, key, s, dtype, staging, config.tokens_per_shard, done)
        executor = ThreadPoolExecutor(max_workers=p.workers, thread_name_prefix="prepare")
        threshold = _val_threshold(executor, cleaner, files, config) if config.val_docs else None
        progress = Progress(sum(f.size for f in files))
        shown_bad = 0
        next_log = config.log_interval

        def tokenize_jobs():
            nonlocal shown_bad, next_log
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
                    counts[duplicate] += int((~keep).sum())
                    if config.dedup == "paragraph":
                        _drop_repeated_paragraphs(table, block, keep, datas, counts)
                    _check_capacity(table, config)
                if config.has_val:
                    values = split_values(block.digests, config.seed)
                    val = values <= threshold if threshold is not None else values < config.val_fraction
                    sides = {"train": keep & ~val, "val": keep & val}
                else:
                    sides = {None: keep}
                for s, mask in sides.items():
                    texts = list(compress(zip(block.wheres, datas), mask.tolist()))
                    if texts:
                        yield s, Chunk("", 1, 0, texts=texts)
                documents = sum(w.documents for w in writers.values())
                tokens = sum(w.tokens for w in writers.values())
                progress.update(documents, tokens, block.bytes_done)
                if next_log is not None and counts["documents_in"] >= next_log:
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    log(f"Processed {counts['documents_in']:,} documents, wrote {documents:,} documents, "
                        f"{tokens:,} tokens ({counts['documents_in'] / elapsed:,.0f} docs/s, "
                        f"{block.bytes_done / elapsed / 2**20:.2f} MB/s).")
                    next_log = (counts["documents_in"] // config.log_interval + 1) * config.log_interval

        def tokenize(job):
            return job[0], encoder(job[1])

        for s, encoded in _in_order(executor, tokenize, tokenize_jobs(), 2 * p.workers + 1):
            writers[s].add(encoded, key)
        progress.done()
        executor.shutdown(wait=True)
        executor = None
        shards = {s: w.close() for s, w in writers.items()}
        writers = {}
        counts["bytes_in"] = sum(f.size for f in files)
        run = run_record(counts, {s or "all": group for s, group in shards.items()}, [f.path for f in files],
                         time.perf_counter() - start)
        new_table = None
        if table is not None:
            header["dedup_table"] = table.stats()
            if config.tokens_per_shard:  # kept for --append, under a name no earlier stats use
                new_table = _table_file(p.output_prefix, table.kind, runs)
                header["dedup_table"]["file"] = os.path.basename(new_table)
        stats = merge_runs(previous, run, header)
        _check_not_empty(config, files, run, stats)

        # Publish. Everything is staged first; the stats, moved last, commit the run.
        if new_table is not None:
            if table.kind == "disk":
                table.close()
                shutil.move(table.path, staging.file_for(new_table))  # a copy when --dedup-dir is elsewhere
            else:
                table.save(staging.file_for(new_table))
        final_stats = stats_path(p.output_prefix)
        atomic_write_text(staging.file_for(final_stats), json.dumps(stats, indent=1) + "\n")
        staging.publish([sh.prefix for group in shards.values() for sh in group])
        if new_table is not None:
            staging.publish_file(new_table)
        staging.publish_file(final_stats)
        old_table = _saved_table(config, previous)
        if old_table is not None and old_table != new_table and os.path.exists(old_table):
            os.unlink(old_table)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        for w in writers.values():
            w.discard()
        if table is not None and table.kind == "disk":
            table.close()
        if dedup_work is not None:
            dedup_work.close()
        staging.remove()
    blends, datasets = _blends(config, stats)
    text = summary(stats, run)
    log(text)
    return PrepareResult(stats=stats, blends=blends, datasets=datasets, summary=text)
