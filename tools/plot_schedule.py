#!/usr/bin/env python3
"""A PNG of what a run will do, from the trainer's own flags, before it starts.

    python tools/plot_schedule.py [trainer flags] -o schedule.png
    python tools/plot_schedule.py --curriculum scripts/curriculum/smollm2_135m_stages.yaml \\
        --train-iters 3000 --lr 3e-4 --lr-warmup-iters 100 --lr-decay-style cosine ... -o plan.png
    PLOT_SCHEDULE=plan.png bash run_maskllm_native.sh scripts/curriculum/smollm2_135m_mask_only.sh 0

A launch script's whole trainer command line is accepted as it is; nothing is read but the
flags (and a ``--curriculum`` file), so ``--data-path`` and the tokenizer flags may be left
out. The scripts draw their run's schedule before training when ``PLOT_SCHEDULE=FILE.png``
is set (``scripts/lib.sh``).

Panels: the learning rate over iterations (warmup, decay, each stage's scale), the
sequence length and global batch of each iteration (``--curriculum`` or
``--step-batch-size-schedule``), tokens seen, and the plug-ins' schedules (MaskLLM's
Gumbel temperature and logit scale). The values are the trainer's: flags it would refuse
are refused here too. ``--world-size`` (default: the tensor-parallel size) sets the
data-parallel size the global batches must divide by. Needs matplotlib.
"""
from __future__ import annotations

import argparse
import sys


def split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This tool's own flags (-o, --world-size, --title) and the trainer's."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-o", "--output", metavar="FILE.png")
    p.add_argument("--world-size", type=int)
    p.add_argument("--title")
    p.add_argument("-h", "--help", action="store_true")
    return p.parse_known_args(argv)


def schedule_figure(curves, title: str):
    from megatron_ext.plotting import mark_boundaries, panel_grid, stage_boundaries, step_series

    names = ["lr", "seq_length", "global_batch_size", "tokens", *curves["plugins"]]
    fig, axes = panel_grid(len(names), title=title)
    x = curves["iteration"]
    titles = {"lr": "learning rate (schedule x stage scale)", "seq_length": "sequence length",
              "global_batch_size": "global batch (samples)", "tokens": "tokens seen"}
    for i, (name, ax) in enumerate(zip(names, axes)):
        ys = curves[name] if name in titles else curves["plugins"][name]
        step = name in ("seq_length", "global_batch_size")
        if step:
            step_series(ax, x, ys, color=f"C{i}", linewidth=1.3)
        else:
            ax.plot(x, ys, color=f"C{i}", linewidth=1.3)
        ax.set_title(titles.get(name, name))
        positive = [y for y in ys if y > 0]
        if name == "lr" and positive and max(positive) > 30 * min(positive):
            ax.set_yscale("log")   # a curriculum's scales span decades
            ax.set_title(titles[name] + ", log scale")
        elif name in ("lr", "tokens"):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if step or name == "tokens":
            ax.set_ylim(bottom=0)
        ax.set_xlabel("iteration")
    mark_boundaries(axes, stage_boundaries(curves["plan"]), label_axis=axes[0])
    return fig


def main(argv: list[str] | None = None) -> int:
    own, trainer_argv = split_argv(list(sys.argv[1:] if argv is None else argv))
    from megatron_ext.errors import InputError, MegatronExtError, report
    from megatron_ext.train import PLUGINS, build_parser
    from megatron_ext.training import parse_args

    if own.help:
        print(__doc__)
        build_parser().print_help()
        return 0
    try:
        if not own.output:
            raise InputError("-o FILE.png is required")
        from megatron_ext.plotting import pyplot, save_png
        from megatron_ext.training.config import RunConfig
        from megatron_ext.training.plugins import build_plugins
        from megatron_ext.training.preview import planned_curves

        args = parse_args(trainer_argv, PLUGINS, needs_data=False)
        world = own.world_size or args.tensor_model_parallel_size
        config = RunConfig.from_args(args, world)
        plugins = build_plugins(PLUGINS, args)
        curves = planned_curves(config, plugins)
        pyplot()  # the flags are checked first: a refused plan is said with or without matplotlib
        what = ", ".join(p.describe() for p in plugins) or "dense"
        title = own.title or (f"{config.plan.source}: {len(config.plan.stages)} stage(s), "
                              f"{config.optim.train_iters} iterations, {what}")
        path = save_png(schedule_figure(curves, title), own.output)
    except MegatronExtError as e:
        return report(e, "plot_schedule.py")
    print(f"{path}: {len(curves['iteration'])} iterations, {curves['tokens'][-1]:,} tokens, "
          f"peak LR {max(curves['lr']):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
