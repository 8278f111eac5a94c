"""What a preparation run did: the stats JSON written beside the outputs
(``<prefix>_stats.json``), its one-screen summary, and the progress line.

The counts add up: ``documents_in = kept + sum(dropped)``, where ``kept`` is the documents
written to all splits and ``dropped`` holds one count per filter and per deduplication
reason. Bad lines and blank lines are not documents and are counted apart. With
``--append`` each run is recorded under ``runs`` and the totals are summed.

Dataset prefixes (``splits.*.shards[].prefix``) and the deduplication table
(``dedup_table.file``) are file names relative to the stats file's directory, where the
outputs are, so runs started from different working directories agree;
:func:`resolve_prefix` turns one into a path for ``--data-path``. Input files are absolute.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from typing import Optional, TextIO

from megatron_ext.data.prepare.filters import REASONS

DROP_REASONS = REASONS + ("exact_duplicate", "probable_duplicate", "all_paragraphs_duplicate")
STATS_VERSION = 2  # 1: prefixes as given on the command line (relative to that run's working directory)


def stats_path(output_prefix: str) -> str:
    return f"{output_prefix}_stats.json"


def resolve_prefix(output_prefix: str, name: str) -> str:
    """A dataset named in the stats, as a path from here (beside ``output_prefix``)."""
    return os.path.join(os.path.dirname(output_prefix), name)


def upgrade(stats: dict) -> dict:
    """Stats of an earlier version in this version's shape (in place)."""
    if stats.get("version", 1) < 2:
        for run in stats.get("runs", []) + [stats]:
            for split in run.get("splits", {}).values():
                for shard in split.get("shards", []):
                    shard["prefix"] = os.path.basename(shard["prefix"])
        table = stats.get("dedup_table") or {}
        if table.get("table") == "bloom":
            stats.setdefault("options", {}).update(dedup_expected_items=table.get("expected_items"),
                                                   dedup_false_positive_rate=table.get("false_positive_rate"))
        stats["version"] = STATS_VERSION
    return stats


def run_record(counts: Counter, splits: dict, files: list, seconds: float) -> dict:
    """One run's counts in the stats' shape; ``splits`` maps split name -> list of Shard."""
    dropped = {r: int(counts.get("dropped_" + r, 0)) for r in DROP_REASONS}
    out_splits = {name: {"documents": sum(s.documents for s in shards), "tokens": sum(s.tokens for s in shards),
                         "shards": [{**vars(s), "prefix": os.path.basename(s.prefix)} for s in shards]}
                  for name, shards in splits.items()}
    return {
        "input_files": [os.path.abspath(f) for f in files],
        "documents_in": int(counts["documents_in"]),
        "characters_in": int(counts["characters_in"]),
        "bytes_in": int(counts["bytes_in"]),
        "bad_lines": int(counts["bad_lines"]),
        "blank_lines": int(counts["blank_lines"]),
        "dropped": dropped,
        "paragraphs_removed": int(counts["paragraphs_removed"]),
        "kept": sum(s["documents"] for s in out_splits.values()),
        "splits": out_splits,
        "seconds": round(seconds, 3),
    }


def merge_runs(previous: Optional[dict], run: dict, header: dict) -> dict:
    """The stats after this run: header (tokenizer, options, dedup table) + totals + runs."""
    runs = (previous or {}).get("runs", []) + [run]
    total = {k: sum(r[k] for r in runs) for k in ("documents_in", "characters_in", "bytes_in", "bad_lines",
                                                   "blank_lines", "paragraphs_removed", "kept", "seconds")}
    total["dropped"] = {r: sum(x["dropped"].get(r, 0) for x in runs) for r in DROP_REASONS}
    total["input_files"] = [f for x in runs for f in x["input_files"]]
    splits: dict = {}
    for x in runs:
        for name, s in x["splits"].items():
            t = splits.setdefault(name, {"documents": 0, "tokens": 0, "shards": []})
            t["documents"] += s["documents"]
            t["tokens"] += s["tokens"]
            t["shards"] += s["shards"]
    total["splits"] = splits
    return {"version": STATS_VERSION, **header, **total, "runs": runs}


def summary(stats: dict, run: dict) -> str:
    """The one-screen summary of this run (and the totals when appending)."""
    mb = run["bytes_in"] / 1e6
    lines = [f"Prepared {len(run['input_files'])} files, {mb:,.1f} MB, {run['documents_in']:,} documents, "
             f"{run['characters_in']:,} characters in {run['seconds']:.1f} s"]
    dropped = {k: v for k, v in run["dropped"].items() if v}
    lines.append("  dropped: " + (", ".join(f"{k} {v:,}" for k, v in dropped.items()) if dropped else "none")
                 + (f"; paragraphs removed {run['paragraphs_removed']:,}" if run["paragraphs_removed"] else ""))
    if run["bad_lines"] or run["blank_lines"]:
        lines.append(f"  bad lines skipped {run['bad_lines']:,}, blank lines {run['blank_lines']:,}")
    for name, s in run["splits"].items():
        lines.append(f"  {name}: {s['documents']:,} documents, {s['tokens']:,} tokens in {len(s['shards'])} "
                     f"dataset(s)")
    if len(stats["runs"]) > 1:
        lines.append(f"  all {len(stats['runs'])} runs: " + ", ".join(
            f"{name} {s['documents']:,} documents / {s['tokens']:,} tokens / {len(s['shards'])} shards"
            for name, s in stats["splits"].items()))
    table = stats.get("dedup_table")
    if table:
        lines.append("  dedup table: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in table.items()))
    return "\n".join(lines)


class Progress:
    """``documents, tokens, MB/s, ETA`` rewritten in place, only when the stream is a terminal."""

    def __init__(self, total_bytes: int, stream: TextIO = sys.stderr, interval: float = 0.5) -> None:
        self.enabled = stream.isatty()
        self.total, self.stream, self.interval = total_bytes, stream, interval
        self.start = self.last = time.perf_counter()
        self.shown = False

    def update(self, documents: int, tokens: int, bytes_done: int) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = bytes_done / elapsed
        eta = ""
        if self.total and 0 < bytes_done <= self.total:
            eta = f", ETA {int((self.total - bytes_done) / max(rate, 1e-9))} s"
        self.stream.write(f"\r{documents:,} documents, {tokens:,} tokens, {rate / 2**20:.1f} MB/s{eta}   ")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
