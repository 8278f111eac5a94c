#!/usr/bin/env python3
"""Preprocessing throughput and memory: tools/preprocess_data.py against the tokenizer's ceiling.

Corpus: the Python 3.11 documentation reST sources, one document per file, as JSON lines;
tokenizer: the LLaMA 32k SentencePiece model with Llama2Tokenizer.

  (a) ceiling: ``sp.encode(all_texts, num_threads=W)`` on the texts already in memory;
  (b) ``tools/preprocess_data.py --workers W`` run as a subprocess, wall time including
      interpreter start, its ratio to (a), and the peak resident memory summed over all of
      its processes (sampled from /proc) and of its largest process;
  (c) the same run on a larger corpus made by repeating the documents (``--large-mb``),
      to show the memory stays flat as the corpus grows.

Prints markdown table rows. Example::

    python benchmarks/bench_preprocess.py --workers 2 --repeats 3 --large-mb 1024
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TOOL = REPO / "tools" / "preprocess_data.py"


def load_corpus(docs_dir: str | None) -> list[str]:
    if docs_dir:
        files = sorted(Path(docs_dir).rglob("*.rst.txt"))
    else:
        from megatron_ext import assets

        files = assets.python_doc_sources()
    if not files:
        raise SystemExit("no .rst.txt files found")
    return [f.read_text(encoding="utf-8") for f in files]


def write_jsonl(texts: list[str], path: Path, target_bytes: int = 0) -> int:
    """Write the texts as JSON lines, repeating them until ``target_bytes`` (0: once)."""
    lines = [(json.dumps({"text": t}) + "\n").encode("utf-8") for t in texts]
    written = 0
    with open(path, "wb") as f:
        while True:
            for line in lines:
                f.write(line)
                written += len(line)
                if target_bytes and written >= target_bytes:
                    return written
            if not target_bytes:
                return written


def ceiling(model: str, texts: list[str], threads: int) -> tuple[float, int]:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model)
    start = time.perf_counter()
    ids = sp.encode(texts, num_threads=threads)
    seconds = time.perf_counter() - start
    return seconds, sum(len(x) for x in ids) + len(texts)  # + one BOS per document (Llama2)


def _tree_rss_kb(root: int) -> tuple[int, int]:
    """(sum, largest) VmRSS in KiB over ``root`` and all its descendants."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                changed = True
    total = largest = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        kb = int(line.split()[1])
                        total += kb
                        largest = max(largest, kb)
                        break
        except OSError:
            continue
    return total, largest


# Megatron-LM's tools/preprocess_data.py main loop for one partition, reconstructed: a
# multiprocessing.Pool whose workers json.loads and tokenize each line (imap, chunksize 32,
# legacy _Llama2Tokenizer rule), and megatron-core's IndexedDatasetBuilder in the parent.
MEGATRON_BASELINE = r"""
import json, multiprocessing, sys, time
import sentencepiece
from megatron.core.datasets import indexed_dataset

class Encoder:
    def __init__(self, model):
        self.model = model
    def initializer(self):
        Encoder.sp = sentencepiece.SentencePieceProcessor(model_file=self.model)
    def encode(self, json_line):
        text = json.loads(json_line)["text"]
        sentences = text if isinstance(text, list) else [text]
        doc_ids, lens = [], []
        for sentence in sentences:
            ids = [Encoder.sp.bos_id()] + Encoder.sp.encode(sentence)
            if len(ids) > 0:
                doc_ids.extend(ids)
                lens.append(len(ids))
        return {"text": doc_ids}, {"text": lens}, len(json_line)

def main(input_path, prefix, model, workers):
    fin = open(input_path, "r", encoding="utf-8")
    encoder = Encoder(model)
    vocab = sentencepiece.SentencePieceProcessor(model_file=model).vocab_size()
    pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
    docs = pool.imap(encoder.encode, fin, 32)
    builder = indexed_dataset.IndexedDatasetBuilder(
        prefix + "_text_document.bin", dtype=indexed_dataset.DType.optimal_dtype(vocab))
    n = tokens = 0
    for doc, lens, _ in docs:
        builder.add_document(doc["text"], lens["text"])
        n += 1
        tokens += len(doc["text"])
    fin.close()
    builder.finalize(prefix + "_text_document.idx")
    pool.close()
    pool.join()
    print(f"Done: {n} documents, {tokens} tokens", file=sys.stderr)

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
"""


def run_tool(args: list[str], interval: float = 0.02, command: list[str] | None = None) -> dict:
    """Run the tool, sampling the memory of its process tree; returns timings and peaks."""
    start = time.perf_counter()
    proc = subprocess.Popen(command or [sys.executable, str(TOOL), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    peak = {"sum": 0, "largest": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            total, largest = _tree_rss_kb(proc.pid)
            peak["sum"] = max(peak["sum"], total)
            peak["largest"] = max(peak["largest"], largest)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = proc.stderr.read()
    proc.wait()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"preprocess_data.py failed ({proc.returncode}):\n{stderr}")
    summary = [line for line in stderr.splitlines() if line.startswith("Done:")][-1]
    tokens = int(summary.split(" documents, ")[1].split(" tokens")[0])
    return {"wall": wall, "tokens": tokens, "rss_sum_mb": peak["sum"] / 1024,
            "rss_largest_mb": peak["largest"] / 1024, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["thread", "process"], choices=["thread", "process"])
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (best is reported)")
    parser.add_argument("--large-mb", type=float, default=1024,
                        help="size of the repeated-documents corpus in MB (0 skips it)")
    parser.add_argument("--docs-dir", help="directory of *.rst.txt files (default: the python3.11-doc asset)")
    parser.add_argument("--tokenizer-model", help="LLaMA SentencePiece model (default: the asset)")
    parser.add_argument("--workdir", help="where to write the corpora and outputs (default: a temp dir)")
    parser.add_argument("--megatron-baseline", action="store_true",
                        help="also time a reconstruction of Megatron-LM's preprocess loop (needs megatron-core)")
    args = parser.parse_args()

    model = args.tokenizer_model
    if not model:
        from megatron_ext import assets

        model = str(assets.llama_sentencepiece_model())
    texts = load_corpus(args.docs_dir)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-preprocess-"))
    work.mkdir(parents=True, exist_ok=True)
    small = work / "pydocs.jsonl"
    small_bytes = write_jsonl(texts, small)
    text_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(f"corpus: {len(texts)} documents, {text_mb:.1f} MB of text, {small_bytes / 1e6:.1f} MB as JSON lines; "
          f"cpus available: {len(os.sched_getaffinity(0))}", file=sys.stderr)

    # Interleave the repetitions so that a slow spell of the machine hits every measurement alike.
    common = ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", model,
              "--workers", str(args.workers), "--log-interval", "100000"]
    ceilings, runs = [], {backend: [] for backend in args.backends}
    for _ in range(args.repeats):
        ceilings.append(ceiling(model, texts, args.workers))
        for backend in args.backends:
            runs[backend].append(run_tool(["--input", str(small), "--output-prefix", str(work / f"out-{backend}"),
                                           "--worker-backend", backend, *common]))
    best_ceiling, ceiling_tokens = min(ceilings)
    ceiling_rate = ceiling_tokens / best_ceiling
    print("| measurement | corpus | workers | wall s | tokens | M tok/s | vs ceiling | peak RSS sum MB | "
          "largest process MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    corpus_name = f"python docs {small_bytes / 1e6:.1f} MB"
    print(f"| ceiling: sp.encode(all, num_threads={args.workers}) | {corpus_name} | {args.workers} | "
          f"{best_ceiling:.2f} | {ceiling_tokens} | {ceiling_rate / 1e6:.2f} | 1.00 | - | - |", flush=True)

    for backend in args.backends:
        best = min(runs[backend], key=lambda r: r["wall"])
        if best["tokens"] != ceiling_tokens:
            raise SystemExit(f"token count {best['tokens']} differs from the ceiling's {ceiling_tokens}")
        rate = best["tokens"] / best["wall"]
        print(f"| preprocess_data.py --worker-backend {backend} (end to end) | {corpus_name} | {args.workers} | "
              f"{best['wall']:.2f} | {best['tokens']} | {rate / 1e6:.2f} | {rate / ceiling_rate:.2f} | "
              f"{max(r['rss_sum_mb'] for r in runs[backend]):.0f} | "
              f"{max(r['rss_largest_mb'] for r in runs[backend]):.0f} |", flush=True)
    print("ceiling runs (s): " + " ".join(f"{c[0]:.2f}" for c in ceilings) + "; " + "; ".join(
        f"{b} runs (s): " + " ".join(f"{r['wall']:.2f}" for r in runs[b]) for b in args.backends), file=sys.stderr)

    if args.megatron_baseline:
        script = work / "megatron_baseline.py"
        script.write_text(MEGATRON_BASELINE)
        baseline = [run_tool([], command=[sys.executable, str(script), str(small), str(work / "megatron"), model,
                                          str(args.workers)]) for _ in range(min(args.repeats, 2))]
        best = min(baseline, key=lambda r: r["wall"])
        rate = best["tokens"] / best["wall"]
        same = all((work / f"megatron_text_document{e}").read_bytes()
                   == (work / f"out-{args.backends[0]}_text_document{e}").read_bytes() for e in (".bin", ".idx"))
        print(f"| Megatron-LM loop (Pool.imap + megatron-core builder, reconstructed) | {corpus_name} | "
              f"{args.workers} | {best['wall']:.2f} | {best['tokens']} | {rate / 1e6:.2f} | "
              f"{rate / ceiling_rate:.2f} | {max(r['rss_sum_mb'] for r in baseline):.0f} | "
              f"{max(r['rss_largest_mb'] for r in baseline):.0f} |", flush=True)
        print(f"Megatron-LM loop output byte-identical to ours: {same}", file=sys.stderr)

    if args.large_mb > 0:
        large = work / "pydocs-large.jsonl"
        large_bytes = write_jsonl(texts, large, int(args.large_mb * 1e6))
        for backend in args.backends:
            r = run_tool(["--input", str(large), "--output-prefix", str(work / f"large-{backend}"),
                          "--worker-backend", backend, *common])
            rate = r["tokens"] / r["wall"]
            print(f"| preprocess_data.py --worker-backend {backend} (end to end) | python docs repeated "
                  f"{large_bytes / 1e6:.0f} MB | {args.workers} | {r['wall']:.1f} | {r['tokens']} | "
                  f"{rate / 1e6:.2f} | {rate / ceiling_rate:.2f} | {r['rss_sum_mb']:.0f} | "
                  f"{r['rss_largest_mb']:.0f} |", flush=True)
            os.unlink(work / f"large-{backend}_text_document.bin")
        os.unlink(large)
    print(f"(this process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; "
          f"outputs in {work})", file=sys.stderr)


if __name__ == "__main__":
    main()
