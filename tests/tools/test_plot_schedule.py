"""tools/plot_schedule.py: the curves it draws are the trainer's own (learning rate with each
stage's scale, sequence length, global batch, tokens, MaskLLM's temperature), and the PNG is
written from a script's flags before any run."""
import importlib.util
from pathlib import Path

import pytest
import yaml

from megatron_ext.train import PLUGINS, parse_args, pretrain
from megatron_ext.training.config import RunConfig
from megatron_ext.training.plugins import build_plugins
from megatron_ext.training.preview import planned_curves

REPO = Path(__file__).resolve().parents[2]
STAGES = [{"iteration": 0, "seq_length": 32, "global_batch_size": 8, "lr_scale": 2.0},
          {"iteration": 3, "seq_length": 64, "global_batch_size": 4, "lr_scale": 0.5}]


def _tool():
    spec = importlib.util.spec_from_file_location("plot_schedule", REPO / "tools" / "plot_schedule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("staged", [False, True])
def test_planned_curves_are_what_the_trainer_does(tmp_path, sample_dir, staged):
    from megatron_ext.data.preprocess import PreprocessConfig, preprocess

    data = preprocess(PreprocessConfig(inputs=[str(sample_dir / "shakespeare_heldout.txt")],
                                       output_prefix=str(tmp_path / "d"), tokenizer_type="Llama2Tokenizer",
                                       tokenizer_model=str(sample_dir / "tokenizer.model"), append_eod=True),
                      log=None).outputs["text"]
    argv = ["--model", "tiny", "--micro-batch-size", "2", "--train-iters", "6", "--lr", "3e-3", "--min-lr", "3e-4",
            "--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--data-path", data, "--split", "98,2,0",
            "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(sample_dir / "tokenizer.model"),
            "--eval-iters", "0", "--log-dir", str(tmp_path / "logs"), "--mask-only", "--N", "2", "--M", "4"]
    if staged:
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(STAGES))
        argv += ["--curriculum", str(tmp_path / "s.yaml")]
    else:
        argv += ["--seq-length", "64", "--global-batch-size", "4"]
    args = parse_args(argv)
    curves = planned_curves(RunConfig.from_args(args, 1), build_plugins(PLUGINS, args))
    history = pretrain(argv).history
    assert curves["iteration"] == [r["iteration"] for r in history]
    assert curves["lr"] == pytest.approx([r["lr"] for r in history], rel=1e-12)
    assert curves["seq_length"] == [r["seq_length"] for r in history]
    assert curves["global_batch_size"] == [r["global_batch_size"] for r in history]
    assert curves["tokens"] == [r["tokens"] for r in history]
    assert curves["plugins"]["Gumbel temperature tau"] == pytest.approx([r["tau"] for r in history])
    from megatron_ext.plotting import stage_boundaries

    # the line at the stage's start: the last iteration of stage 1, the next the first of stage 2
    assert stage_boundaries(curves["plan"]) == ([(3, "stage 2: seq 64, gbs 4, LR x0.5")] if staged else [])
    if staged:
        assert [r["seq_length"] for r in history][2:4] == [32, 64]


def test_the_tool_writes_a_png_from_a_scripts_flags(tmp_path):
    """No --data-path or tokenizer flags: a schedule needs neither (the trainer does)."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "plan.png"
    argv = ["--curriculum", str(REPO / "scripts" / "curriculum" / "smollm2_135m_stages.yaml"), "--train-iters", "3000",
            "--lr", "3e-4", "--lr-warmup-iters", "100", "--lr-decay-style", "cosine", "--micro-batch-size", "auto",
            "--model", "smollm2-135m", "--mask-only", "--N", "2", "--M", "4", "-o", str(out), "--world-size", "4"]
    assert _tool().main(argv) == 0
    assert out.stat().st_size > 20_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_seq_length_and_batch_steps_stand_on_the_stage_lines(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.cbook import STEP_LOOKUP_MAP

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(STAGES))
    args = parse_args(["--model", "tiny", "--micro-batch-size", "2", "--train-iters", "6", "--lr", "3e-3",
                       "--data-path", "unused", "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "unused",
                       "--curriculum", str(tmp_path / "s.yaml")])   # the trainer's parser: data flags required
    fig = _tool().schedule_figure(planned_curves(RunConfig.from_args(args, 1)), "plan")
    for title in ("sequence length", "global batch (samples)"):
        (ax,) = [a for a in fig.axes if a.get_title() == title]
        lines = ax.get_lines()
        dashed = [line.get_xdata()[0] for line in lines if line.get_linestyle() == "--"]
        xs, ys = STEP_LOOKUP_MAP[lines[0].get_drawstyle()](lines[0].get_xdata(), lines[0].get_ydata())
        jumps = [x for x0, x, y0, y in zip(xs, xs[1:], ys, ys[1:]) if x == x0 and y != y0]
        assert jumps == dashed == [3], title


def test_flags_the_trainer_refuses_are_refused(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump([{**STAGES[0], "global_batch_size": 21}]))
    argv = ["--curriculum", str(tmp_path / "s.yaml"), "--train-iters", "10", "--lr", "1e-3", "--micro-batch-size",
            "auto", "-o", str(tmp_path / "p.png"), "--world-size", "2"]
    assert _tool().main(argv) == 2
    assert "--global-batch-size 21 is not divisible by the data-parallel size 2" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()
    assert _tool().main(argv[:-4] + ["--lr", "-1", "-o", str(tmp_path / "p.png")]) == 2   # the trainer's checks
    assert "--lr must be > 0, got -1.0" in capsys.readouterr().err
