"""tools/plot_run.py: a PNG of a real run's logs (the tiny model on the shipped sample),
found from the --save directory or from the log directory; resumed runs' metrics files
joined in time order; older logs without the newer keys still plot; without matplotlib
the tool says how to install it (exit code 2)."""
import importlib.util
import json
import re
import stat
import sys
from pathlib import Path

import pytest

from megatron_ext.training.reporting import RunLogsError, find_run_logs, read_metrics

REPO = Path(__file__).resolve().parents[2]
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
needs_matplotlib = pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib is not installed")


def _tool():
    spec = importlib.util.spec_from_file_location("tool_plot_run", REPO / "tools" / "plot_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(capsys, *argv):
    rc = _tool().main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _png_size(path: Path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), len(data)


def _image_pixels(path: Path):
    import matplotlib.image

    return matplotlib.image.imread(str(path))


@needs_matplotlib
def test_plot_of_a_real_run_from_its_save_directory(dense_run, tmp_path, capsys):
    out = tmp_path / "run.png"
    rc, stdout, err = _run(capsys, dense_run["save"], "-o", out)
    assert rc == 0, err
    assert str(dense_run["run_dir"]) in stdout
    width, height, size = _png_size(out)
    assert width >= 1000 and height >= 600 and size > 40_000
    pixels = _image_pixels(out)[..., :3]
    assert pixels.std() > 0.05  # curves, labels and axes, not a blank canvas
    # the same picture from the log directory, and from the --log-dir holding the one run
    for source in (dense_run["run_dir"], dense_run["log_dir"]):
        again = tmp_path / f"{Path(source).name}.png"
        rc, _, err = _run(capsys, source, "-o", again)
        assert rc == 0, err
        assert _png_size(again)[:2] == (width, height)


def test_save_directory_leads_to_the_run_logs_and_its_records(dense_run):
    assert find_run_logs(dense_run["save"]) == dense_run["run_dir"]
    records = read_metrics(dense_run["run_dir"])
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == list(range(1, 31))
    kinds = {r["kind"] for r in records}
    assert {"eval/valid", "eval/eval_data"} <= kinds


@needs_matplotlib
def test_mask_only_run_adds_the_mask_flip_panel(tmp_path, tiny_argv, run_tiny, dense_run, capsys, monkeypatch):
    """A mask-only run saved with a relative --log-dir (the default's form): found from the
    working directory the trainer ran in."""
    monkeypatch.chdir(tmp_path)
    run_tiny(tiny_argv(12, mask_only=True, weight_reg=1e-4, lr_mult=10, lr=1e-2, eval_interval=6,
                       save_interval=12, save=tmp_path / "save", log_dir="logs", tag="masks"))
    rc, _, err = _run(capsys, tmp_path / "save", "-o", tmp_path / "masks.png")
    assert rc == 0, err
    assert _png_size(tmp_path / "masks.png")[2] > 40_000
    from megatron_ext.plotting import run_figure

    masks = read_metrics(tmp_path / "logs" / "masks")
    assert any(r.get("mask_flip_fraction", 0) > 0 for r in masks)
    titles = {name: [ax.get_title() for ax in run_figure(records).axes]
              for name, records in (("masks", masks), ("dense", read_metrics(dense_run["run_dir"])))}
    assert any(t.startswith("mask flip rate") for t in titles["masks"])
    assert not any(t.startswith("mask flip rate") for t in titles["dense"])
    assert titles["dense"][:2] == ["loss (nats per token)", "perplexity"]


def _write(path: Path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_resumed_run_keeps_one_curve(tmp_path):
    """First start: iterations 1-8 then killed (a cut last line); resumed from the checkpoint
    at 5: its records replace 6-8, and the evaluation at 5 stays."""
    run = tmp_path / "run"
    run.mkdir()
    first = [{"kind": "train", "iteration": i, "loss": 10.0 - i} for i in range(1, 9)]
    first.insert(5, {"kind": "eval/valid", "iteration": 5, "loss": 5.5, "ppl": 245.0})
    _write(run / "metrics-20250101-100000.jsonl", first)
    with open(run / "metrics-20250101-100000.jsonl", "a") as f:
        f.write('{"kind": "train", "itera')
    second = [{"kind": "train", "iteration": i, "loss": 1.0 - i / 100} for i in range(6, 11)]
    _write(run / "metrics-20250101-110000.jsonl", second)
    _write(run / "metrics-20250101-110000.2.jsonl", [{"kind": "eval/valid", "iteration": 10, "loss": 0.5}])
    records = read_metrics(run)
    train = [(r["iteration"], r["loss"]) for r in records if r["kind"] == "train"]
    assert train == [(i, 10.0 - i) for i in range(1, 6)] + [(i, 1.0 - i / 100) for i in range(6, 11)]
    assert [(r["iteration"], r["loss"]) for r in records if r["kind"] == "eval/valid"] == [(5, 5.5), (10, 0.5)]


@needs_matplotlib
def test_stages_and_new_keys_plot_and_old_logs_without_them_too(tmp_path, capsys):
    from megatron_ext.plotting import stage_boundaries

    plan = {"source": "--curriculum stages.yaml", "train_iters": 60,
            "stages": [{"start": 20 * k, "seq_length": 64 * 2 ** k, "global_batch_size": 16 // 2 ** k,
                        "lr_scale": 1.0, "micro_batch_size": 2} for k in range(3)]}
    staged = [{"kind": "plan", "iteration": 0, "plan": plan}]
    for i in range(1, 61):
        stage = 0 if i <= 20 else 1 if i <= 40 else 2
        staged.append({"kind": "train", "iteration": i, "loss": 8 - i / 10, "lr": 1e-3 * min(1, i / 5),
                       "tokens_per_s": 5000 + 10 * i, "stage": stage, "seq_length": 64 * 2 ** stage,
                       "global_batch_size": 16 // 2 ** stage, "lr_scale": 1.0, "tokens": 1024 * i,
                       "tau": 4 - i / 20, "kappa": 1.0 + i, "mask_flip_fraction": 0.1 / i, "mask_max_prob": 0.5})
        if i % 10 == 0:
            for name, shift in (("valid", 0.0), ("c4", 0.4)):
                loss = 7 - i / 12 + shift
                staged.append({"kind": f"eval/{name}", "iteration": i, "loss": loss, "ppl": 2.718 ** loss,
                               "accuracy": i / 200 - shift / 10, "gap": 0.1})
    assert stage_boundaries(plan) == [(20, "stage 2: seq 128, gbs 8, LR x1"), (40, "stage 3: seq 256, gbs 4, LR x1")]
    old = [{"kind": "train", "iteration": i, "loss": 8 - i / 10} for i in range(1, 11)]
    for name, records in (("staged", staged), ("old", old)):
        run = tmp_path / name
        run.mkdir()
        _write(run / "metrics-20250101-100000.jsonl", records)
        rc, _, err = _run(capsys, run, "-o", tmp_path / f"{name}.png")
        assert rc == 0, err
        assert _png_size(tmp_path / f"{name}.png")[2] > 10_000
    # six panels against two: the staged picture is taller
    assert _png_size(tmp_path / "staged.png")[1] > _png_size(tmp_path / "old.png")[1]


def _dashed_xs(ax) -> list:
    """The x of each vertical dashed line (``mark_boundaries``) on a panel."""
    return sorted(line.get_xdata()[0] for line in ax.get_lines()
                  if line.get_linestyle() == "--" and len(set(line.get_xdata())) == 1)


@needs_matplotlib
def test_stage_lines_stand_at_the_plans_iterations_whatever_the_log_interval(tmp_path, tiny_argv, run_tiny, capsys):
    """Stages from iterations 3 and 6, logged every 4 iterations (records at 4 and 8 only):
    the lines stand at 3 and 6, read from the plan the run logged, not from the records."""
    import yaml

    from megatron_ext.plotting import run_figure

    stages = [{"iteration": 0, "seq_length": 32, "global_batch_size": 4, "lr_scale": 1.0},
              {"iteration": 3, "seq_length": 64, "global_batch_size": 4, "lr_scale": 0.5},
              {"iteration": 6, "seq_length": 48, "global_batch_size": 4, "lr_scale": 0.25}]
    (tmp_path / "stages.yaml").write_text(yaml.safe_dump(stages))
    argv = tiny_argv(8, curriculum=tmp_path / "stages.yaml", log_interval=4, eval_interval=100, eval_iters=0,
                     log_dir=tmp_path / "logs", tag="staged")
    for flag in ("--seq-length", "--global-batch-size"):   # the stages set them
        i = argv.index(flag)
        del argv[i:i + 2]
    result = run_tiny(argv)
    # the trainer's own stages: iteration 4 is the first of stage 2, 7 the first of stage 3
    assert [r["stage"] for r in result.history] == [1, 1, 1, 2, 2, 2, 3, 3]
    records = read_metrics(result.log_dir)
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [4, 8]
    (plan,) = [r for r in records if r["kind"] == "plan"]
    assert plan["iteration"] == 0 and [s["start"] for s in plan["plan"]["stages"]] == [0, 3, 6]
    fig = run_figure(records)
    assert all(_dashed_xs(ax) == [3, 6] for ax in fig.axes if ax.get_title())
    rc, _, err = _run(capsys, result.log_dir, "-o", tmp_path / "staged.png")
    assert rc == 0, err


@needs_matplotlib
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_png_has_the_mode_of_new_files_and_no_temporary_stays(tmp_path, umask, mask):
    from megatron_ext.plotting import panel_grid, save_png

    umask(mask)
    fig, (ax,) = panel_grid(1)
    ax.plot([0, 1, 2], [3, 1, 2])
    out = save_png(fig, tmp_path / "p.png")
    assert _png_size(out)[2] > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask


def test_missing_matplotlib_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc, _, err = _run(capsys, tmp_path, "-o", tmp_path / "x.png")
    assert rc == 2 and "pip install matplotlib" in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("layout, message", [
    ("missing", "no such directory"),
    ("empty", "no metrics-*.jsonl here"),
    ("two-runs", "holds the logs of 2 runs (a, b)"),
])
def test_a_directory_without_one_run_is_refused(tmp_path, layout, message):
    path = tmp_path / "d"
    if layout != "missing":
        path.mkdir()
    if layout == "two-runs":
        for tag in ("a", "b"):
            (path / tag).mkdir()
            _write(path / tag / "metrics-20250101-100000.jsonl", [{"kind": "train", "iteration": 1, "loss": 1.0}])
    with pytest.raises(RunLogsError, match=re.escape(message)):
        find_run_logs(path)
