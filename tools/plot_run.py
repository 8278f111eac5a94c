#!/usr/bin/env python3
"""A PNG of a training run from its logs: loss, perplexity, accuracy, tokens/s, LR, mask flips.

    python tools/plot_run.py output/checkpoints/my-run -o my-run.png     # a --save directory
    python tools/plot_run.py output/logs/my-run -o my-run.png            # its <log-dir>/<tag>

RUN_DIR is a --save directory (its checkpoints name the run's tag and --log-dir; a
relative --log-dir is taken from the working directory, as the trainer took it), a
run's log directory ``<log-dir>/<tag>``, or a --log-dir holding one run. The run's
``metrics-*.jsonl`` files (one per start of a resumed run) are joined in time order.
Panels: training and validation loss (every evaluated set), perplexity, next-token
accuracy, tokens/s, learning rate and, for MaskLLM runs, the mask flip rate; dashed
lines stand at the iterations where the stages of the run's logged plan start. Needs
matplotlib (pip install matplotlib).
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a --save directory or a run's log directory")
    p.add_argument("-o", "--output", required=True, metavar="FILE.png", help="the PNG to write")
    p.add_argument("--title", default=None, help="figure title (default: the run's name)")
    return p.parse_args(argv)


def plot_run(run_dir: str, output: str, title: str | None = None):
    """Write the PNG of the run at ``run_dir``; returns ``(log directory, records, path)``."""
    from megatron_ext.plotting import pyplot, run_figure, save_png
    from megatron_ext.training.reporting import RunLogsError, find_run_logs, read_metrics

    pyplot()  # a missing matplotlib is said before anything is read
    logs = find_run_logs(run_dir)
    records = read_metrics(logs)
    if not any(r["kind"] == "train" for r in records):
        raise RunLogsError(f"{logs}: the metrics files hold no training records yet")
    last = max(r["iteration"] for r in records)
    fig = run_figure(records, title=title or f"{logs.name} (iteration {last})")
    return logs, records, save_png(fig, output)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_ext.errors import MegatronExtError, report

    try:
        logs, records, path = plot_run(args.run_dir, args.output, args.title)
    except MegatronExtError as e:
        return report(e, "plot_run.py")
    print(f"{path}: {len(records)} records from {logs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
