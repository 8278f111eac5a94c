"""tools/evaluate.py: one checkpoint, several sets (a text file and a .bin/.idx prefix), one
command. The checkpoint of a short run of the tiny LLaMA on the shipped sample (TP=1); the
sets are parts of the held-out play. The numbers equal tools/eval_ppl.py's for each set, the
accuracy equals an arg-max computed directly on the TP=1 model, TP=2 under torchrun (gloo)
equals TP=1, and bad --eval values fail with exit code 2 before the model loads."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ext import platform

REPO = Path(__file__).resolve().parents[2]
SEQ = 64
PPL_LINE = re.compile(r"^PPL (\d+\.\d+) tokens (\d+)$")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(capsys, name: str, *argv):
    rc = _tool(name).main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, sample_dir, dense_run, tokenize_files):
    """The short dense run's checkpoint (TP=1; the 2,000-piece sample vocabulary leaves padded
    rows in the logits), the first part of The Tempest as text and its second part as .bin/.idx."""
    root = tmp_path_factory.mktemp("evaluate-tool")
    text = (sample_dir / "shakespeare_heldout.txt").read_text(encoding="utf-8")
    first = text.index("\n", 6000) + 1
    second = text.index("\n", first + 8000) + 1
    (root / "part1.txt").write_text(text[:first], encoding="utf-8")
    (root / "part2.txt").write_text(text[first:second], encoding="utf-8")
    prefix = tokenize_files([root / "part2.txt"], root / "part2", sample_dir / "tokenizer.model")
    return {"ckpt": dense_run["save"], "text": root / "part1.txt", "prefix": prefix, "root": root}


def _evals(inputs):
    return ["--eval", f"play={inputs['text']}", "--eval", f"tokens={inputs['prefix']}"]


def test_table_and_json_for_a_text_file_and_a_dataset_prefix(inputs, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    rc, out, err = _run(capsys, "evaluate", "--load", inputs["ckpt"], *_evals(inputs), "--seq-length", SEQ,
                        "--micro-batch-size", 3, "--output", out_json)
    assert rc == 0, err
    report = json.loads(out_json.read_text())
    assert [(r["name"], r["kind"]) for r in report["sets"]] == [("play", "text"), ("tokens", "dataset")]
    assert report["seq_length"] == SEQ and report["tensor_model_parallel_size"] == 1 and report["sparse"] is False
    lines = out.strip().splitlines()
    header = lines.index(next(line for line in lines if line.split()[:2] == ["set", "perplexity"]))
    assert lines[header].split() == ["set", "perplexity", "accuracy", "tokens"]
    for row, line in zip(report["sets"], lines[header + 1:]):
        assert row["windows"] >= 10 and row["tokens"] == row["windows"] * (SEQ - 1)
        assert 1 < row["ppl"] < 2000 and 0.01 < row["accuracy"] < 1  # it learnt something
        assert line.split() == [row["name"], f"{row['ppl']:.4f}", f"{row['accuracy']:.4f}", str(row["tokens"])]
    assert len(lines) == header + 3
    assert report["sets"][0]["ppl"] != report["sets"][1]["ppl"]
    assert not [p for p in tmp_path.iterdir() if p.name != "eval.json"]  # the atomic write leaves nothing else


def test_numbers_equal_eval_ppl_for_each_set(inputs, tmp_path, capsys):
    out_json = tmp_path / "eval.json"
    rc, _, err = _run(capsys, "evaluate", "--load", inputs["ckpt"], *_evals(inputs), "--seq-length", SEQ,
                      "--output", out_json)
    assert rc == 0, err
    sets = {r["name"]: r for r in json.loads(out_json.read_text())["sets"]}
    for name, flag, path in (("play", "--text-file", inputs["text"]), ("tokens", "--data-path", inputs["prefix"])):
        rc, out, err = _run(capsys, "eval_ppl", "--load", inputs["ckpt"], flag, path, "--seq-length", SEQ)
        assert rc == 0, err
        ppl, tokens = PPL_LINE.match(out.strip().splitlines()[-1]).groups()
        assert int(tokens) == sets[name]["tokens"]
        assert ppl == f"{sets[name]['ppl']:.6f}"


def test_accuracy_equals_a_direct_argmax_on_the_tp1_model(inputs):
    from megatron_ext.evaluation import evaluate_set, load_model
    from megatron_ext.models.perplexity import make_windows, text_tokens

    platform.init_distributed(1)
    try:
        loaded = load_model(inputs["ckpt"])
        result = evaluate_set(loaded, seq_length=SEQ, text_file=inputs["text"], micro_batch_size=4)
        windows = torch.from_numpy(make_windows(text_tokens(inputs["text"], loaded.tokenizer()), SEQ))
        vocab = loaded.config.vocab_size
        correct = 0
        with torch.no_grad():
            for w in windows:
                logits = loaded.model(w[None], torch.arange(SEQ)[None], None)[0, :-1].float()
                assert logits.shape[-1] > vocab  # Megatron's padding rows exist and must never win
                correct += int((logits[:, :vocab].argmax(dim=-1) == w[1:]).sum())
    finally:
        platform.destroy_distributed()
    assert result.tokens == len(windows) * (SEQ - 1) and result.correct == correct
    assert result.accuracy == correct / result.tokens and correct > 0


def test_tensor_parallel_2_under_torchrun_equals_tp1(inputs, tmp_path, capsys):
    common = ["--load", inputs["ckpt"], *_evals(inputs), "--seq-length", SEQ, "--micro-batch-size", 2]
    rc, _, err = _run(capsys, "evaluate", *common, "--output", tmp_path / "tp1.json")
    assert rc == 0, err
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tools" / "evaluate.py"), *map(str, common),
                           "--tensor-model-parallel-size", "2", "--output", str(tmp_path / "tp2.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("perplexity") == 1  # only the first process prints the table
    tp1 = json.loads((tmp_path / "tp1.json").read_text())["sets"]
    tp2_report = json.loads((tmp_path / "tp2.json").read_text())
    assert tp2_report["tensor_model_parallel_size"] == 2
    for a, b in zip(tp1, tp2_report["sets"]):
        assert (a["name"], a["tokens"], a["windows"]) == (b["name"], b["tokens"], b["windows"])
        assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-5)
        # an arg-max may flip only on a near tie of two logits summed in another order
        assert abs(b["accuracy"] - a["accuracy"]) * a["tokens"] <= 1


@pytest.mark.parametrize("evals, message", [
    (["play"], "--eval 'play': expected NAME=PATH"),
    (["=x.txt"], "--eval '=x.txt': expected NAME=PATH"),
    (["a={text}", "a={prefix}"], "the name 'a' is given twice"),
    (["a={root}/none.txt"], "none.txt: no such text file, nor a"),
    (["a={root}/nothing"], "nothing.bin/.idx dataset"),
])
def test_bad_eval_values_fail_with_exit_code_2_before_the_model_loads(inputs, tmp_path, capsys, evals, message):
    argv = []
    for spec in evals:
        argv += ["--eval", spec.format(**{k: str(v) for k, v in inputs.items()})]
    # a checkpoint that does not exist: the error must come from the --eval check first
    rc, out, err = _run(capsys, "evaluate", "--load", tmp_path / "no-checkpoint", *argv, "--seq-length", SEQ)
    assert rc == 2 and message in err and "checkpoint not found" not in err, err


def test_output_in_a_missing_directory_fails_with_exit_code_2(inputs, tmp_path, capsys):
    rc, _, err = _run(capsys, "evaluate", "--load", tmp_path / "no-checkpoint", *_evals(inputs), "--seq-length", SEQ,
                      "--output", tmp_path / "missing" / "eval.json")
    assert rc == 2 and "--output" in err and "does not exist" in err
