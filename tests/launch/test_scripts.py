"""The launcher and the bash scripts, run as a user runs them.

* run_maskllm_native.sh: a bad resume flag and a missing script are refused before
  anything starts; a run prints the environment summary, writes the log and returns the
  script's status.
* Every launch / data / export script checks what it names before it launches: with the
  variables pointing at missing paths it exits 1 at once, each message naming the path
  and the variable to set, and creates nothing.
* The data scripts turn real local inputs (C4-style JSON-lines shards, a WikiText-style
  raw file) into the same .bin/.idx bytes as tools/preprocess_data.py; the export script
  turns a learned mask checkpoint into a Hugging Face directory that is 2:4 sparse.
"""
import gzip
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data.indexed_dataset import IndexedDataset
from megatron_ext.data.preprocess import PreprocessConfig, preprocess
from megatron_ext.data.tokenizers import build_tokenizer

from launching import LAUNCHER, REPO, TINY_TRAIN, clean_env, run_bash

C4_SCRIPT = REPO / "scripts" / "learnable_sparsity" / "llama2_7b_mask_only_tp4_c4.sh"
WIKI_SCRIPT = REPO / "scripts" / "incremental" / "llama2_7b_mask_only_wikitext103_tp4.sh"
SMOLLM2_SCRIPT = REPO / "scripts" / "learnable_sparsity" / "smollm2_135m_mask_only.sh"
PREP_C4 = REPO / "scripts" / "data" / "prepare_c4_llama2.sh"
PREP_WIKI = REPO / "scripts" / "data" / "prepare_wikitext103_llama2.sh"
EXPORT = REPO / "scripts" / "tools" / "export_hf.sh"
QUICKSTART = REPO / "examples" / "quickstart.sh"


def _errors(stderr: str):
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def _assert_names(stderr: str, variable: str, path) -> None:
    """One error line names both the variable and the path."""
    lines = [l for l in _errors(stderr) if variable in l and str(path) in l]
    assert lines, f"no error naming {variable} and {path} in:\n{stderr}"


# --------------------------------------------------------------------------- the launcher


def test_launcher_refuses_a_bad_resume_flag():
    res = run_bash(LAUNCHER, TINY_TRAIN, "2")
    assert res.returncode == 2
    assert "error: the resume flag must be 0 (start) or 1 (resume), got '2'" in res.stderr
    assert "usage: bash run_maskllm_native.sh <script> [0|1]" in res.stderr
    assert "megatron_ext" not in res.stdout   # nothing started: no environment summary


def test_launcher_refuses_a_missing_script(tmp_path):
    missing = tmp_path / "no_such_script.sh"
    res = run_bash(LAUNCHER, missing, "0")
    assert res.returncode == 2
    assert f"error: script not found: {missing}" in res.stderr
    assert run_bash(LAUNCHER).returncode == 2   # no script at all: usage


def test_launcher_prints_the_environment_and_returns_the_script_status(tmp_path):
    """A real launch whose script stops at its checks: the summary comes first, the script
    gets the resume flag, its output lands in the log, and its status is the launcher's."""
    log_dir = tmp_path / "logs"
    env = clean_env(LOG_DIR=log_dir, NPROC_PER_NODE=2, MASTER_PORT=29999, DATA_PREFIX=tmp_path / "nodata",
                    TOKENIZER_MODEL=REPO / "examples" / "data" / "tokenizer.model", SAVE_DIR=tmp_path / "ckpt")
    res = run_bash(LAUNCHER, TINY_TRAIN, "1", env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    summary = res.stdout.split("==============================================")[0]
    assert f"script     {TINY_TRAIN}  (resume=1)" in summary
    assert re.search(r"versions   python 3\.\d+\.\d+  torch \S+  megatron-core 0\.16\.1", summary), summary
    assert re.search(r"devices    (CPU, gloo|\d+ CUDA GPU\(s\), NCCL)", summary)
    assert "processes  1 node(s) x 2 per node (node rank 0, master 127.0.0.1:29999)" in summary
    assert re.search(r"threads    OMP_NUM_THREADS=\d+ of \d+ cores", summary)
    # the script ran with resume=1: its checks name the missing dataset and the missing checkpoint
    (log,) = log_dir.glob("*-node0.log")
    text = log.read_text()
    assert f"DATA_PREFIX: dataset {tmp_path / 'nodata'} is missing" in text
    assert f"SAVE_DIR: checkpoint directory not found: {tmp_path / 'ckpt'}" in text
    assert "2 check(s) failed; nothing was launched" in text
    assert f"error: {TINY_TRAIN} exited with status 1 (log: {log})" in res.stderr


# --------------------------------------------------------------------------- early checks


def _missing_env(tmp_path, **paths):
    return clean_env(**{k: tmp_path / v for k, v in paths.items()})


def test_c4_script_names_every_missing_input(tmp_path):
    env = _missing_env(tmp_path, C4_HOME="c4", TOKENIZER_MODEL="tok/tokenizer.model", PRIOR_CKPT="prior",
                       DENSE_CKPT="dense", RUN_DIR="run")
    t0 = time.monotonic()
    res = run_bash(C4_SCRIPT, "0", env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    assert time.monotonic() - t0 < 30          # checks only: no Python, no torchrun
    _assert_names(res.stderr, "C4_HOME", tmp_path / "c4" / "c4_00000_text_document")
    assert "20 of 20 datasets of the blend are missing" in res.stderr
    _assert_names(res.stderr, "TOKENIZER_MODEL", tmp_path / "tok" / "tokenizer.model")
    _assert_names(res.stderr, "PRIOR_CKPT", tmp_path / "prior")
    _assert_names(res.stderr, "DENSE_CKPT", tmp_path / "dense")
    assert "4 check(s) failed; nothing was launched" in res.stderr
    assert not (tmp_path / "run").exists()


def test_c4_script_names_the_one_missing_shard_and_the_run_to_resume(tmp_path, plays_prefix, sample_tokenizer):
    """19 of the 20 shards present (the real sample dataset under each name): the message names
    the missing one; resuming (1) needs the run's own checkpoint."""
    c4 = tmp_path / "c4"
    c4.mkdir()
    for i in range(20):
        if i == 7:
            continue
        for ext in (".bin", ".idx"):
            os.symlink(plays_prefix + ext, c4 / f"c4_{i:05d}_text_document{ext}")
    os.remove(c4 / "c4_00003_text_document.idx")   # one shard half there
    env = clean_env(C4_HOME=c4, TOKENIZER_MODEL=sample_tokenizer, PRIOR_CKPT=tmp_path / "prior",
                    RUN_DIR=tmp_path / "run")
    res = run_bash(C4_SCRIPT, "1", env=env)
    assert res.returncode == 1
    assert "C4_HOME: 2 of 20 datasets of the blend are missing; first: dataset " \
           f"{c4 / 'c4_00003_text_document'} is missing {c4 / 'c4_00003_text_document.idx'}" in res.stderr
    assert "TOKENIZER_MODEL" not in res.stderr
    _assert_names(res.stderr, "SAVE_DIR", tmp_path / "run" / "ckpt")
    assert "DENSE_CKPT" not in res.stderr       # resuming does not start from the dense checkpoint
    assert "3 check(s) failed" in res.stderr    # C4_HOME, PRIOR_CKPT, SAVE_DIR


def test_incremental_script_names_every_missing_input(tmp_path):
    env = _missing_env(tmp_path, WIKI_HOME="wiki", TOKENIZER_MODEL="tokenizer.model", C4_MASK_CKPT="c4run/ckpt",
                       RUN_DIR="run")
    res = run_bash(WIKI_SCRIPT, "0", env=env)
    assert res.returncode == 1
    _assert_names(res.stderr, "WIKI_HOME", tmp_path / "wiki" / "wiki_train_llama2_text_document")
    _assert_names(res.stderr, "TOKENIZER_MODEL", tmp_path / "tokenizer.model")
    _assert_names(res.stderr, "C4_MASK_CKPT", tmp_path / "c4run" / "ckpt")
    assert not (tmp_path / "run").exists()


def test_smollm2_script_names_every_missing_input(tmp_path):
    env = _missing_env(tmp_path, DATA_PATH="docs_text_document", EVAL_DATA_PATH="botchan_text_document",
                       SMOLLM2_CKPT="smollm2", PRIOR_CKPT="prior", RUN_DIR="run")
    res = run_bash(SMOLLM2_SCRIPT, "0", env=env)
    assert res.returncode == 1
    _assert_names(res.stderr, "DATA_PATH", tmp_path / "docs_text_document")
    _assert_names(res.stderr, "EVAL_DATA_PATH", tmp_path / "botchan_text_document")
    _assert_names(res.stderr, "SMOLLM2_CKPT", tmp_path / "smollm2")
    _assert_names(res.stderr, "PRIOR_CKPT", tmp_path / "prior")
    assert "4 check(s) failed" in res.stderr and not (tmp_path / "run").exists()


def test_a_directory_without_a_checkpoint_is_not_a_checkpoint(tmp_path, sample_tokenizer):
    (tmp_path / "c4run" / "ckpt").mkdir(parents=True)
    env = clean_env(WIKI_HOME=tmp_path, TOKENIZER_MODEL=sample_tokenizer.parent, C4_MASK_CKPT=tmp_path / "c4run" / "ckpt",
                    RUN_DIR=tmp_path / "run")
    res = run_bash(WIKI_SCRIPT, "0", env=env)
    assert res.returncode == 1
    assert f"C4_MASK_CKPT: {tmp_path / 'c4run' / 'ckpt'} is not a checkpoint" in res.stderr
    assert "TOKENIZER_MODEL" not in res.stderr   # a directory holding tokenizer.model is a tokenizer


@pytest.mark.parametrize("script", [C4_SCRIPT, WIKI_SCRIPT, SMOLLM2_SCRIPT, QUICKSTART, TINY_TRAIN],
                         ids=lambda p: p.stem)
@pytest.mark.parametrize("flag", ["", "2", "resume"])
def test_training_scripts_need_a_resume_flag(script, flag):
    res = run_bash(script, *([flag] if flag else []))
    assert res.returncode == 2
    assert ("missing the resume flag" if not flag else f"must be 0 (start) or 1 (resume), got '{flag}'") in res.stderr


def test_data_scripts_name_missing_inputs(tmp_path):
    res = run_bash(PREP_C4, env=_missing_env(tmp_path, C4_RAW="raw", C4_HOME="out", TOKENIZER_MODEL="t.model"))
    assert res.returncode == 1
    _assert_names(res.stderr, "C4_RAW", tmp_path / "raw" / "c4-train.00000-of-01024.json")
    _assert_names(res.stderr, "C4_RAW", tmp_path / "raw" / "c4-train.00019-of-01024.json.gz")
    _assert_names(res.stderr, "TOKENIZER_MODEL", tmp_path / "t.model")
    assert "21 check(s) failed" in res.stderr
    assert not (tmp_path / "out").exists()

    res = run_bash(PREP_WIKI, env=_missing_env(tmp_path, WIKI_RAW="raw", WIKI_HOME="out", TOKENIZER_MODEL="t.model"))
    assert res.returncode == 1
    _assert_names(res.stderr, "WIKI_RAW", tmp_path / "raw" / "wiki.train.raw")
    _assert_names(res.stderr, "TOKENIZER_MODEL", tmp_path / "t.model")
    assert not (tmp_path / "out").exists()

    res = run_bash(EXPORT, tmp_path / "nockpt", tmp_path / "hf")
    assert res.returncode == 1
    _assert_names(res.stderr, "<mask_ckpt>", tmp_path / "nockpt")
    assert not (tmp_path / "hf").exists()
    assert run_bash(EXPORT, tmp_path / "only_one_arg").returncode == 2


# --------------------------------------------------------------------------- the data scripts on real inputs


def _plays(sample_dir):
    return [json.loads(l) for l in (sample_dir / "shakespeare_train.jsonl").read_text().splitlines()]


def _dataset_tokens(prefix):
    ds = IndexedDataset(str(prefix))
    return [np.asarray(ds[i]).tolist() for i in range(len(ds))]


def test_prepare_c4_tokenizes_local_shards_like_preprocess_data(tmp_path, sample_dir, sample_tokenizer):
    """Two C4-layout shards (plain and gzipped JSON lines, real text): the script's outputs are
    the bytes tools/preprocess_data.py writes for the same file; shard numbers name the outputs."""
    docs = _plays(sample_dir)
    raw = tmp_path / "c4" / "en"
    raw.mkdir(parents=True)
    lines = [json.dumps({"text": d["text"], "timestamp": "2019-04-25T12:57:54Z", "url": d["source"]}) for d in docs]
    (raw / "c4-train.00004-of-01024.json").write_text("\n".join(lines[:150]) + "\n")
    with gzip.open(raw / "c4-train.00005-of-01024.json.gz", "wt") as f:
        f.write("\n".join(lines[150:]) + "\n")
    out = tmp_path / "tok"
    env = clean_env(C4_RAW=raw, C4_HOME=out, TOKENIZER_MODEL=sample_tokenizer, FIRST_SHARD=4, NUM_SHARDS=2,
                    WORKERS=2)
    res = run_bash(PREP_C4, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"| {out}/c4_00004_text_document | uint16 | 150 |" in res.stdout   # check_dataset's table
    ref = preprocess(PreprocessConfig(inputs=[str(raw / "c4-train.00005-of-01024.json.gz")],
                                      output_prefix=str(tmp_path / "ref"), tokenizer_type="Llama2Tokenizer",
                                      tokenizer_model=str(sample_tokenizer), append_eod=True), log=None)
    for ext in (".bin", ".idx"):
        assert (out / f"c4_00005_text_document{ext}").read_bytes() == Path(ref.outputs["text"] + ext).read_bytes()
    tok = build_tokenizer("Llama2Tokenizer", sample_tokenizer)
    first = _dataset_tokens(out / "c4_00004_text_document")[0]
    assert first[0] == tok.bos and first[-1] == tok.eod       # Llama2Tokenizer's BOS, --append-eod
    assert tok.detokenize(first[1:-1]) == docs[0]["text"]
    # a second run keeps finished shards
    again = run_bash(PREP_C4, env=env)
    assert again.returncode == 0 and again.stdout.count("skip ") == 2


def test_prepare_wikitext_makes_one_document_per_article(tmp_path, sample_dir, sample_tokenizer):
    """A WikiText-layout raw file (" = Title = " per article, " = = Section = = " inside) of real
    text: one document per article, section headings kept inside their article."""
    by_play = {}
    for d in _plays(sample_dir):
        by_play.setdefault(d["source"], []).append(d["text"])
    plays = sorted(by_play)[:3]
    raw_lines = [" \n"]
    for play in plays:
        raw_lines += [f" = {play.replace('_', ' ').title()} = \n", " \n"]
        for k, part in enumerate(by_play[play][:4]):
            raw_lines += [f" = = Part {k + 1} = = \n", " \n"] + [f" {l} \n" for l in part.splitlines() if l.strip()]
            raw_lines.append(" \n")
    raw = tmp_path / "wikitext-103-raw"
    raw.mkdir()
    (raw / "wiki.train.raw").write_text("".join(raw_lines), encoding="utf-8")
    out = tmp_path / "wiki"
    res = run_bash(PREP_WIKI, env=clean_env(WIKI_RAW=raw, WIKI_HOME=out, TOKENIZER_MODEL=sample_tokenizer, WORKERS=2))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "3 articles" in res.stdout
    articles = [json.loads(l)["text"] for l in (out / "wiki_train.jsonl").read_text().splitlines()]
    assert [a.splitlines()[0].strip() for a in articles] == [f"= {p.replace('_', ' ').title()} =" for p in plays]
    assert all(a.count("= = Part") == 4 for a in articles)
    tok = build_tokenizer("Llama2Tokenizer", sample_tokenizer)
    docs = _dataset_tokens(out / "wiki_train_llama2_text_document")
    assert len(docs) == 3
    assert [tok.detokenize(d[1:-1]) for d in docs] == articles


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def mask_checkpoint(tmp_path_factory, plays_prefix, sample_tokenizer):
    """A real MaskLLM checkpoint: two mask-only iterations of the tiny LLaMA (one process)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("mask")
    argv = ["--model", "tiny", "--seq-length", "64", "--micro-batch-size", "2", "--train-iters", "2", "--lr", "1e-2",
            "--data-path", plays_prefix, "--split", "98,2,0", "--tokenizer-type", "Llama2Tokenizer",
            "--tokenizer-model", str(sample_tokenizer), "--eval-iters", "0", "--log-dir", str(out / "logs"),
            "--mask-only", "--save", str(out / "ckpt")]
    res = subprocess.run([sys.executable, str(REPO / "pretrain_maskllm.py"), *argv], cwd=out, env=clean_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return out / "ckpt"


def test_export_script_writes_a_checked_sparse_hf_model(mask_checkpoint, tmp_path):
    hf = tmp_path / "hf"
    res = run_bash(EXPORT, mask_checkpoint, hf, "fp32", env=clean_env(PACKED=1), timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK: every masked layer is 2:4 sparse" in res.stdout
    assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors"))
    assert (tmp_path / "hf.masks" / "masks.npz").is_file()
    assert "bits per parameter" in res.stdout
    # an existing output is not replaced unless asked
    again = run_bash(EXPORT, mask_checkpoint, hf)
    assert again.returncode == 1 and f"<hf_out> {hf} already exists" in again.stderr


# --------------------------------------------------------------------------- the launch lines


def _launch_line(res):
    """The torchrun words a script printed under DRY_RUN=1: (torchrun args, trainer args)."""
    import shlex

    assert res.returncode == 0, res.stdout + res.stderr
    words = [shlex.split(w)[0] if w else "" for w in res.stdout.split("torchrun:\n", 1)[1].splitlines()]
    at = next(i for i, w in enumerate(words) if w.endswith("pretrain_maskllm.py"))
    return words[:at], words[at + 1:]


def _real_inputs(tmp_path, plays_prefix, names):
    home = tmp_path / "data"
    home.mkdir()
    for name in names:
        for ext in (".bin", ".idx"):
            os.symlink(plays_prefix + ext, home / f"{name}{ext}")
    return home


@pytest.mark.parametrize("resume", [0, 1])
def test_c4_script_launches_the_maskllm_recipe(tmp_path, plays_prefix, sample_tokenizer, mask_checkpoint, resume):
    """With every input present, the one torchrun line carries the MaskLLM LLaMA-2 7B recipe,
    and the trainer's own parser accepts it; 0 starts from the dense checkpoint with
    --finetune, 1 resumes the run's checkpoint."""
    from megatron_ext.train import parse_args

    home = _real_inputs(tmp_path, plays_prefix, [f"c4_{i:05d}_text_document" for i in range(20)])
    run_dir = tmp_path / "run"
    if resume:
        run_dir.mkdir()
        os.symlink(mask_checkpoint, run_dir / "ckpt")
    env = clean_env(DRY_RUN=1, C4_HOME=home, TOKENIZER_MODEL=sample_tokenizer, PRIOR_CKPT=mask_checkpoint,
                    DENSE_CKPT=mask_checkpoint, RUN_DIR=run_dir,
                    DISTRIBUTED_ARGS="--nnodes 2 --node_rank 1 --nproc_per_node 8 --master_addr 10.0.0.1 "
                                     "--master_port 6000")
    dist, argv = _launch_line(run_bash(C4_SCRIPT, resume, "--eval-iters", "3", env=env))
    assert dist == ["--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "8", "--master_addr", "10.0.0.1",
                    "--master_port", "6000"]
    args = parse_args(argv)
    assert args.data_path.split() == sum((["0.05", f"{home}/c4_{i:05d}_text_document"] for i in range(20)), [])
    assert (args.model, args.tensor_model_parallel_size, args.seq_length, args.bf16) == ("llama2-7b", 4, 4096, True)
    assert (args.micro_batch_size, args.global_batch_size, args.train_iters) == ("auto", 256, 2000)
    assert args.memory_target_fraction == 0.9
    assert (args.lr, args.min_lr, args.lr_decay_style, args.lr_warmup_iters) == (5e-5, 5e-6, "cosine", 0)
    assert (args.weight_decay, args.adam_beta2, args.adam_eps, args.clip_grad) == (0.1, 0.95, 1e-5, 1.0)
    assert (args.mask_only, args.N, args.M, args.lr_mult, args.weight_reg) == (True, 2, 4, 10.0, 1e-5)
    assert args.gumbel_temperature_range == (4.0, 0.05) and args.gumbel_scale_range == (100.0, 500.0)
    assert (args.prior_mask, args.prior_strength) == (str(mask_checkpoint), 3.0)
    assert args.save == f"{run_dir}/ckpt" and args.tag == "llama2-7b-tp4-mask-only-c4"
    assert args.eval_iters == 3                     # extra arguments reach the trainer, last
    if resume:
        assert args.load == f"{run_dir}/ckpt" and not args.finetune and args.exit_on_missing_checkpoint
    else:
        assert args.load == str(mask_checkpoint) and args.finetune


@pytest.mark.parametrize("resume", [0, 1])
def test_incremental_script_launches_from_the_c4_masks(tmp_path, plays_prefix, sample_tokenizer, mask_checkpoint,
                                                       resume):
    from megatron_ext.train import parse_args

    home = _real_inputs(tmp_path, plays_prefix, ["wiki_train_llama2_text_document"])
    run_dir = tmp_path / "run"
    if resume:
        run_dir.mkdir()
        os.symlink(mask_checkpoint, run_dir / "ckpt")
    env = clean_env(DRY_RUN=1, WIKI_HOME=home, TOKENIZER_MODEL=sample_tokenizer, C4_MASK_CKPT=mask_checkpoint,
                    RUN_DIR=run_dir)
    _, argv = _launch_line(run_bash(WIKI_SCRIPT, resume, env=env))
    args = parse_args(argv)
    assert args.data_path == f"1.0 {home}/wiki_train_llama2_text_document"
    assert (args.seq_length, args.train_iters, args.lr_warmup_iters, args.global_batch_size) == (2048, 800, 80, 64)
    assert args.tensor_model_parallel_size == 4 and args.tag == "llama2-7b-tp4-mask-only-wikitext103-c4format"
    assert args.gumbel_temperature_range == (2.0, 0.05) and args.gumbel_scale_range == (100.0, 500.0)
    assert args.weight_reg == 1e-5 and args.mask_only
    if resume:
        assert args.load == f"{run_dir}/ckpt" and not args.finetune
    else:
        assert args.load == str(mask_checkpoint) and args.finetune


def test_a_fresh_start_refuses_to_overwrite_a_run(tmp_path, plays_prefix, sample_tokenizer, mask_checkpoint):
    home = _real_inputs(tmp_path, plays_prefix, ["wiki_train_llama2_text_document"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    os.symlink(mask_checkpoint, run_dir / "ckpt")
    env = clean_env(DRY_RUN=1, WIKI_HOME=home, TOKENIZER_MODEL=sample_tokenizer, C4_MASK_CKPT=mask_checkpoint,
                    RUN_DIR=run_dir)
    res = run_bash(WIKI_SCRIPT, 0, env=env)
    assert res.returncode == 1 and "torchrun:" not in res.stdout
    assert f"SAVE_DIR: {run_dir}/ckpt already holds a checkpoint (iteration 2): pass 1 to resume it" in res.stderr


def test_smollm2_script_launches_mask_learning_from_its_checkpoint(tmp_path, plays_prefix, mask_checkpoint):
    from megatron_ext.train import parse_args

    home = _real_inputs(tmp_path, plays_prefix, ["docs_text_document"])
    env = clean_env(DRY_RUN=1, DATA_PATH=f"0.7 {home}/docs_text_document 0.3 {home}/docs_text_document",
                    SMOLLM2_CKPT=mask_checkpoint, PRIOR_CKPT=mask_checkpoint, RUN_DIR=tmp_path / "run", TP=3,
                    TRAIN_ITERS=40, MEGATRON_EXT_BACKEND="gloo")
    _, argv = _launch_line(run_bash(SMOLLM2_SCRIPT, 0, env=env))
    args = parse_args(argv)
    assert (args.model, args.tensor_model_parallel_size, args.train_iters, args.bf16) == ("smollm2-135m", 3, 40, False)
    assert args.data_path == f"0.7 {home}/docs_text_document 0.3 {home}/docs_text_document"
    assert args.load == str(mask_checkpoint) and args.finetune and args.tokenizer_model is None
    assert (args.mask_only, args.lr, args.lr_mult, args.prior_strength) == (True, 5e-5, 10.0, 3.0)
