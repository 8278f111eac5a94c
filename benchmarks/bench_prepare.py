#!/usr/bin/env python3
"""Dataset preparation: peak memory and speed of tools/prepare_dataset.py with
``--normalize --dedup exact`` against today's path (tools/preprocess_data.py), side by side.

Corpus (``--corpus``), repeated to the target size, every copy made unique by a head naming it
(so exact deduplication keeps every document and its table holds one entry per document: the
worst case for its memory):

  pydocs (default)  the Python 3.11 documentation reST sources (22 KB a document on average),
                    the head a first line "Copy C of document D.";
  long              the shipped sample's documents (examples/data/*.jsonl, about 2.5 KB),
                    headed the same way;
  short             one-line documents, the sample's lines joined until 100 characters
                    (122 on average, 45 tokens with the head "C.D "): here the costs per
                    document dominate.

Tokenizer: the 32k LLaMA SentencePiece model, Llama2Tokenizer.

  --tokenize-mb N   end to end at N MB: preprocess_data.py, then prepare_dataset.py with
                    --normalize --dedup exact (both as subprocesses; peak RSS of the process
                    tree sampled from /proc), plus the tokenizer's ceiling (sp.encode of the
                    corpus's documents in memory, as benchmarks/bench_preprocess.py defines it:
                    for pydocs the 11 MB docs); --repeats R runs the pair R times, interleaved;
  --clean-mb N      the preparation pass alone at N MB (read, parse, normalize, exact dedup;
                    no tokenizing) against reading and parsing alone.

Prints markdown rows. Examples::

    nice -n 10 python benchmarks/bench_prepare.py --tokenize-mb 1024 --clean-mb 10240 --workers 2
    python benchmarks/bench_prepare.py --corpus short --tokenize-mb 100 --repeats 2
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_preprocess import _tree_rss_kb, ceiling, load_corpus  # noqa: E402


CORPORA = ("pydocs", "long", "short")
SHORT_CHARS = 100


def sample_corpus(kind: str) -> list:
    """The shipped sample's documents (``long``), or its lines joined into documents of about
    ``SHORT_CHARS`` characters (``short``)."""
    texts = [json.loads(line)["text"] for p in sorted((REPO / "examples" / "data").glob("*.jsonl"))
             for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if kind == "long":
        return texts
    docs, current = [], ""
    for line in (x.strip() for t in texts for x in t.splitlines()):
        if line:
            current = f"{current} {line}" if current else line
            if len(current) >= SHORT_CHARS:
                docs.append(current)
                current = ""
    return docs


def write_unique_jsonl(texts: list, path: Path, target_bytes: int, one_line: bool = False) -> tuple:
    """JSON lines of ``texts`` repeated to ``target_bytes``, each copy's documents made unique
    (by a first line naming the copy, or with ``one_line`` a "copy.document " head)."""
    written = docs = copy = 0
    with open(path, "wb", buffering=1 << 22) as f:
        while written < target_bytes:
            for i, t in enumerate(texts):
                head = f"{copy}.{i} " if one_line else f"Copy {copy} of document {i}.\n\n"
                line = (json.dumps({"text": head + t}) + "\n").encode()
                f.write(line)
                written += len(line)
                docs += 1
            copy += 1
    return written, docs


def run(command: list, interval: float = 0.05) -> dict:
    """Run a command, sampling the resident memory of its process tree."""
    start = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid)[0])
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{command[1]} failed ({proc.returncode}):\n{err[-3000:]}")
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"wall": wall, "cpu": cpu, "rss_mb": peak[0] / 1024, "stdout": out, "stderr": err}


def clean_only(path: str, workers: int, prepare: bool) -> None:
    """The preparation pass (or reading and parsing alone), printing one JSON line of counts."""
    from concurrent.futures import ThreadPoolExecutor

    from megatron_ext.data.preprocess import _in_order
    from megatron_ext.data.prepare.clean import Cleaner
    from megatron_ext.data.prepare.dedup import MemoryTable
    from megatron_ext.data.prepare.filters import DocumentFilter
    from megatron_ext.data.prepare.inputs import read_blocks, resolve_inputs

    cleaner = Cleaner("text", "NFC" if prepare else None, DocumentFilter(), False, 50, False)
    table = MemoryTable() if prepare else None
    docs = dropped = 0
    with ThreadPoolExecutor(workers) as ex:
        for block in _in_order(ex, cleaner, read_blocks(resolve_inputs([path]), 1 << 18), 2 * workers + 1):
            docs += len(block.data)
            if table is not None and len(block.data):
                dropped += int((~table.add(block.digests)).sum())
    print(json.dumps({"documents": docs, "duplicates": dropped,
                      "table_bytes": table.nbytes if table is not None else 0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenize-mb", type=int, default=64)
    ap.add_argument("--clean-mb", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--corpus", choices=CORPORA, default="pydocs")
    ap.add_argument("--repeats", type=int, default=1, help="end-to-end pairs (today, prepare), interleaved")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--clean-only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.clean_only:
        clean_only(args.clean_only, args.workers, not args.no_prepare)
        return
    from megatron_ext import assets

    model = str(assets.llama_sentencepiece_model())
    texts = load_corpus(None) if args.corpus == "pydocs" else sample_corpus(args.corpus)
    one_line = args.corpus == "short"
    in_memory = (f"docs {sum(len(t.encode()) for t in texts) / 2**20:.0f} MB in memory" if args.corpus == "pydocs"
                 else f"{args.corpus}: {len(texts):,} docs in memory")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable]
    rows = ["| measurement | input | wall s | CPU s | M tok/s | vs ceiling | vs today | tokens per CPU s vs today | "
            "peak RSS MB | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    seconds, tokens = min(ceiling(model, texts, args.workers) for _ in range(3))  # best of 3
    base_rate = tokens / seconds
    rows.append(f"| ceiling: sp.encode(docs, num_threads={args.workers}) | {in_memory} | {seconds:.2f} | "
                f"- | {base_rate / 1e6:.2f} | 1.00 | - | - | - | - |")
    if args.tokenize_mb:
        path = work / f"{args.corpus}_{args.tokenize_mb}mb.jsonl"
        size, docs = write_unique_jsonl(texts, path, args.tokenize_mb << 20, one_line)
        common = ["--input", str(path), "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", model,
                  "--workers", str(args.workers), "--log-interval", "100000000"]
        label = f"{args.corpus} {size / 2**20:,.0f} MB, {docs:,} docs"
        for _ in range(args.repeats):
            today = run(py + [str(REPO / "tools" / "preprocess_data.py"), *common,
                              "--output-prefix", str(work / "today")])
            line = [x for x in today["stderr"].splitlines() if x.startswith("Done:")][-1]
            t_tokens = int(line.split(" documents, ")[1].split(" tokens")[0])
            ours = run(py + [str(REPO / "tools" / "prepare_dataset.py"), *common,
                             "--output-prefix", str(work / "prep"), "--normalize", "--dedup", "exact"])
            stats = json.loads((work / "prep_stats.json").read_text())
            p_tokens = stats["splits"]["all"]["tokens"]
            t_rate, p_rate = t_tokens / today["wall"], p_tokens / ours["wall"]
            cpu_ratio = (p_tokens / ours["cpu"]) / (t_tokens / today["cpu"])
            rows.append(f"| today: preprocess_data.py | {label} | {today['wall']:.1f} | {today['cpu']:.1f} | "
                        f"{t_rate / 1e6:.2f} | {t_rate / base_rate:.2f} | 1.00 | 1.00 | {today['rss_mb']:.0f} | "
                        f"{t_tokens:,} tokens |")
            rows.append(f"| prepare_dataset.py --normalize --dedup exact | {label} | {ours['wall']:.1f} | "
                        f"{ours['cpu']:.1f} | {p_rate / 1e6:.2f} | {p_rate / base_rate:.2f} | {p_rate / t_rate:.2f} | "
                        f"{cpu_ratio:.2f} | {ours['rss_mb']:.0f} | "
                        f"{p_tokens:,} tokens, {stats['dropped']['exact_duplicate']} duplicates, table "
                        f"{stats['dedup_table']['bytes'] / 2**20:.0f} MB |")
            for f in work.glob("*_document.*"):
                f.unlink()
        path.unlink()
    if args.clean_mb:
        path = work / f"{args.corpus}_{args.clean_mb}mb.jsonl"
        size, docs = write_unique_jsonl(texts, path, args.clean_mb << 20, one_line)
        label = f"{size / 2**20:,.0f} MB, {docs:,} docs"
        me = py + [str(Path(__file__).resolve()), "--workers", str(args.workers), "--clean-only", str(path)]
        for name, extra in (("read + parse only (today's reading)", ["--no-prepare"]),
                            ("preparation pass: read + parse + normalize + exact dedup", [])):
            r = run(me + extra)
            counts = json.loads(r["stdout"].strip().splitlines()[-1])
            rows.append(f"| {name} | {label} | {r['wall']:.1f} | {r['cpu']:.1f} | - | - | - | - | {r['rss_mb']:.0f} | "
                        f"{size / 2**20 / r['wall']:.1f} MB/s, {counts['duplicates']} duplicates, table "
                        f"{counts['table_bytes'] / 2**20:.0f} MB |")
        path.unlink()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
