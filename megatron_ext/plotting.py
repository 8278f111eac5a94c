"""Pictures of runs and schedules (``tools/plot_run.py``, ``tools/plot_schedule.py``).

matplotlib is optional: ``pyplot()`` imports it on first use with the Agg backend (no
display needed) and raises ``MatplotlibMissing`` (exit status 2, with the pip command)
when it is not installed. Figures are grids of panels sharing the iteration axis; a PNG
is written atomically (``megatron_ext.files``), so a reader never sees half a file.
Everything here takes plain records (dicts, lists) and imports nothing from the trainer.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from megatron_ext.errors import InputError
from megatron_ext.files import atomic_write

PANEL_SIZE = (6.4, 3.0)  # inches per panel
DPI = 110


class MatplotlibMissing(InputError):
    """matplotlib is not installed (the message says how to install it)."""


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend."""
    try:
        import matplotlib
    except ImportError:
        raise MatplotlibMissing("plotting needs matplotlib, which is not installed: pip install matplotlib "
                                "(or pip install 'megatron_ext[plot]')") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def panel_grid(n: int, columns: int = 2, title: Optional[str] = None):
    """A figure of ``n`` panels in rows of ``columns`` sharing the x axis; returns
    ``(figure, axes)`` with exactly ``n`` axes (unused cells removed)."""
    plt = pyplot()
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    fig, grid = plt.subplots(rows, columns, figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows),
                             sharex=True, squeeze=False)
    cells = [ax for row in grid for ax in row]
    for ax in cells[n:]:
        fig.delaxes(ax)
    axes = cells[:n]
    for i, ax in enumerate(axes):
        ax.grid(True, alpha=0.3)
        # the last panel of each column carries the x tick labels
        if i + columns >= n:
            ax.xaxis.set_tick_params(labelbottom=True)
    if title:
        fig.suptitle(title)
    return fig, axes


def mark_boundaries(axes: Sequence[Any], boundaries: Iterable[Tuple[float, str]], label_axis: Any = None) -> None:
    """Dashed vertical lines at ``(x, label)`` on every panel; labels on ``label_axis``."""
    for x, label in boundaries:
        for ax in axes:
            ax.axvline(x, color="0.45", linestyle="--", linewidth=0.8, zorder=0)
        if label_axis is not None and label:
            label_axis.annotate(label, xy=(x, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -2),
                                textcoords="offset points", fontsize=7, color="0.3", va="top", rotation=90)


def save_png(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` as PNG through a temporary file in the same directory."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"-o {path}: directory {path.parent} does not exist")
    try:
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    finally:
        pyplot().close(fig)
    return path


# --------------------------------------------------------------------------- a run's metrics


def _series(records: Sequence[Dict[str, Any]], key: str) -> Tuple[List[int], List[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["iteration"])
            ys.append(float(v))
    return xs, ys


def _moving_average(ys: List[float], window: int) -> List[float]:
    """Mean over a window centred on each point (shorter at the ends): no lag behind the data."""
    prefix = [0.0]
    for y in ys:
        prefix.append(prefix[-1] + y)
    half = window // 2
    out = []
    for i in range(len(ys)):
        lo, hi = max(0, i - half), min(len(ys), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def stage_boundaries(plan: Optional[Mapping[str, Any]]) -> List[Tuple[float, str]]:
    """``(iteration, label)`` of each stage after the first that the run reaches, from a plan
    record (``{"stages": [{"start", "seq_length", "global_batch_size", "lr_scale"}, ...],
    "train_iters"}``: the trainer's ``plan`` metrics record, ``preview.planned_curves``'s
    ``plan``). The line stands at the stage's ``start``, the iteration after which it trains
    (``iteration: 2000`` of a curriculum: the line at 2000, iteration 2001 the first of the stage)."""
    if not plan:
        return []
    end = plan.get("train_iters")
    out = []
    for i, s in enumerate(plan.get("stages") or ()):
        if 0 < s["start"] and (end is None or s["start"] < end):
            out.append((s["start"], f"stage {i + 1}: seq {s['seq_length']}, gbs {s['global_batch_size']}, "
                                    f"LR x{s.get('lr_scale', 1.0):g}"))
    return out


def step_series(ax, xs: Sequence[float], ys: Sequence[float], **kwargs) -> None:
    """A per-iteration value that holds for a whole iteration: the point at iteration ``k``
    covers ``(k - 1, k]``, so a change at a stage's start steps on its boundary line."""
    ax.plot(xs, ys, drawstyle="steps-pre", **kwargs)


def run_figure(records: Sequence[Dict[str, Any]], title: Optional[str] = None):
    """The panels of a run's metrics records (``RunLogger.metrics``'s JSON lines): training
    and validation loss, perplexity, accuracy, tokens/s, learning rate and, for MaskLLM
    runs, the mask flip rate; panels whose values are absent from the logs are left out.
    Dashed lines mark the stages of the run's last logged plan (``kind: plan``; logs
    written before the trainer logged its plan have none). Returns the figure."""
    train = [r for r in records if r.get("kind") == "train"]
    evals: Dict[str, List[Dict[str, Any]]] = {}
    for r in records:
        kind = str(r.get("kind", ""))
        if kind.startswith("eval/"):
            evals.setdefault(kind[len("eval/"):], []).append(r)
    sets = sorted(evals, key=lambda s: (s != "valid", s))  # the validation split first

    def has(rows, key):
        return bool(_series(rows, key)[0])

    panels = ["loss", "ppl"]
    if any(has(rows, "accuracy") for rows in evals.values()):
        panels.append("accuracy")
    if has(train, "tokens_per_s"):
        panels.append("tokens_per_s")
    if has(train, "lr"):
        panels.append("lr")
    if has(train, "mask_flip_fraction"):
        panels.append("mask_flip_fraction")
    fig, axes = panel_grid(len(panels), title=title)
    by_name = dict(zip(panels, axes))

    ax = by_name["loss"]
    xs, ys = _series(train, "loss")
    if xs:
        smooth = len(ys) > 50
        ax.plot(xs, ys, color="C0", linewidth=0.8, alpha=0.35 if smooth else 1.0,
                label="train" if not smooth else "train (raw)")
        if smooth:
            ax.plot(xs, _moving_average(ys, max(5, len(ys) // 50)), color="C0", linewidth=1.4, label="train (mean)")
    for i, name in enumerate(sets):
        ex, ey = _series(evals[name], "loss")
        if ex:
            ax.plot(ex, ey, marker="o", markersize=3.5, linewidth=1.2, color=f"C{i + 1}", label=name)
    ax.set_title("loss (nats per token)")
    ax.legend(fontsize=8)

    ax = by_name["ppl"]
    for i, name in enumerate(sets):
        ex, ey = _series(evals[name], "ppl")
        if ex:
            ax.plot(ex, ey, marker="o", markersize=3.5, linewidth=1.2, color=f"C{i + 1}", label=name)
    if not sets and xs:
        ax.plot(xs, [math.exp(min(y, 50.0)) for y in ys], color="C0", linewidth=0.8, label="train exp(loss)")
    plotted = [y for line in ax.get_lines() for y in line.get_ydata()]
    if plotted and max(plotted) > 3 * min(plotted):  # a log axis only where it spans a range
        ax.set_yscale("log")
    ax.set_title("perplexity" + ("" if sets else " (no evaluation logged)"))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)

    if "accuracy" in by_name:
        ax = by_name["accuracy"]
        for i, name in enumerate(sets):
            ex, ey = _series(evals[name], "accuracy")
            if ex:
                ax.plot(ex, ey, marker="o", markersize=3.5, linewidth=1.2, color=f"C{i + 1}", label=name)
        ax.set_title("next-token accuracy (top-1)")
        ax.legend(fontsize=8)

    if "tokens_per_s" in by_name:
        ax = by_name["tokens_per_s"]
        tx, ty = _series(train, "tokens_per_s")
        ax.plot(tx, ty, color="C0", linewidth=0.9)
        ax.set_ylim(bottom=0)
        ax.set_title("throughput (tokens/s)")

    if "lr" in by_name:
        ax = by_name["lr"]
        lx, ly = _series(train, "lr")
        ax.plot(lx, ly, color="C0", linewidth=1.2)
        ax.set_title("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    if "mask_flip_fraction" in by_name:
        ax = by_name["mask_flip_fraction"]
        fx, fy = _series(train, "mask_flip_fraction")
        ax.plot(fx, fy, color="C3", linewidth=1.0, label="flipped mask fraction")
        ax.set_title("mask flip rate (fraction of N:M groups changed since the last log)")
        ax.set_ylim(bottom=0)
        px, py = _series(train, "mask_max_prob")
        if px:
            twin = ax.twinx()
            twin.plot(px, py, color="C4", linewidth=1.0, linestyle=":", label="mean max probability")
            twin.set_ylim(0, 1.02)
            lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
            ax.legend(lines, [h.get_label() for h in lines], fontsize=8)

    for ax in axes[-2:]:
        ax.set_xlabel("iteration")
    plans = [r["plan"] for r in records if r.get("kind") == "plan" and isinstance(r.get("plan"), dict)]
    mark_boundaries(axes, stage_boundaries(plans[-1] if plans else None), label_axis=axes[0])
    return fig
