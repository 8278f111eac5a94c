"""Every launch, data, evaluation and export script under scripts/, run with DRY_RUN=1 as a
user runs it (bash, a fresh environment, every input it names present): it passes its own
checks and prints the one command it would launch, and that command line is what the tool
behind it accepts (the trainer's, prune_oneshot's, eval_ppl's parser) with the recipe's
values: the LLaMA-3-8B and LLaMA-3.1-8B sets (128k vocabulary, 8 query groups, the
tokenizer.json of their Hugging Face directories) beside the LLaMA-2-7B one, the SmolLM2-135M
curriculum examples, and MICRO_BATCH_SIZE=auto wherever a script trains."""
from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data.indexed_dataset import IndexedDatasetBuilder, data_file_path, index_file_path

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
CURRICULUM = SCRIPTS / "curriculum" / "smollm2_135m_stages.yaml"
# The scripts this file runs (the others are run by a test file that names them).
RUN_HERE = ("curriculum/smollm2_135m_dense.sh", "curriculum/smollm2_135m_mask_only.sh",
            "learnable_sparsity/llama2_7b_mask_only_tp4_c4.sh", "learnable_sparsity/llama3_8b_mask_only_tp8_c4.sh",
            "learnable_sparsity/llama3.1_8b_mask_only_tp8_c4.sh", "learnable_sparsity/smollm2_135m_mask_only.sh",
            "incremental/llama2_7b_mask_only_wikitext103_tp4.sh", "incremental/llama3_8b_mask_only_wikitext103_tp8.sh",
            "incremental/llama3.1_8b_mask_only_wikitext103_tp8.sh", "oneshot/run_llama2_7b_prune_tp4.sh",
            "oneshot/run_llama3_8b_prune_tp8.sh", "oneshot/run_llama3.1_8b_prune_tp8.sh",
            "ppl/evaluate_llama2_wikitext2.sh", "ppl/evaluate_llama3_wikitext2.sh",
            "ppl/evaluate_llama3.1_wikitext2.sh", "tools/export_hf.sh", "data/prepare_c4_llama2.sh",
            "data/prepare_c4_llama3.sh", "data/prepare_c4_llama3.1.sh", "data/prepare_wikitext103_llama2.sh",
            "data/prepare_wikitext103_llama3.sh", "data/prepare_wikitext103_llama3.1.sh",
            "data/prepare_smollm2_study_corpora.sh")
# Set by torchrun or an outer launcher; a script under test must not inherit them.
_INHERITED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
              "TORCHELASTIC_RUN_ID", "NNODES", "NODE_RANK", "NPROC_PER_NODE", "DISTRIBUTED_ARGS", "RESUME",
              "MEGATRON_EXT_ROOT", "LOG_DIR", "OMP_NUM_THREADS", "MEGATRON_EXT_BACKEND", "MICRO_BATCH_SIZE", "TP")


def dry_run(script: str, *args, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in _INHERITED}
    full.update({k: str(v) for k, v in env.items()}, DRY_RUN="1")
    return subprocess.run(["bash", str(SCRIPTS / script), *map(str, args)], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=120)


def commands(res: subprocess.CompletedProcess) -> list[tuple[str, list[str]]]:
    """The commands a dry run printed: ("torchrun" | "python", words), in order."""
    assert res.returncode == 0, res.stdout + res.stderr
    out, current = [], None
    for line in res.stdout.splitlines():
        if line in ("torchrun:", "python:"):
            current = (line[:-1], [])
            out.append(current)
        elif current is not None:
            words = shlex.split(line)
            current[1].append(words[0] if words else "")
    assert out, f"nothing would be launched:\n{res.stdout}"
    return out


def after(words: list[str], program: str) -> list[str]:
    """The arguments following the word that ends with ``program``."""
    at = next(i for i, w in enumerate(words) if w.endswith(program))
    return words[at + 1:]


def trainer_args(argv: list[str]):
    from megatron_ext.train import parse_args

    return parse_args(argv)


def tool_args(name: str, argv: list[str]):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args(argv)


# --------------------------------------------------------------------------- inputs


def dataset(prefix: Path) -> str:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    b = IndexedDatasetBuilder(data_file_path(prefix), np.uint16)
    for k in range(4):
        b.add_document(np.arange(k, k + 50), [50])
    b.finalize(index_file_path(prefix))
    return str(prefix)


def checkpoint(path: Path) -> str:
    """What the scripts' checks recognise as one of our checkpoints."""
    path.mkdir(parents=True)
    (path / "latest_checkpointed_iteration.txt").write_text("0\n")
    return str(path)


def hf_dir(path: Path) -> str:
    """A Hugging Face directory as far as the scripts look: config.json and tokenizer.json."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}\n")
    (path / "tokenizer.json").write_text("{}\n")
    return str(path)


# --------------------------------------------------------------------------- every script is here


def test_every_script_has_a_dry_run_test():
    """Each script under scripts/ is run by a test: this file or one named after it."""
    others = "".join(p.read_text() for p in (REPO / "tests").rglob("test_*.py") if p != Path(__file__))
    missing = [str(p.relative_to(SCRIPTS)) for p in sorted(SCRIPTS.rglob("*.sh")) if p.name != "lib.sh"
               and str(p.relative_to(SCRIPTS)) not in RUN_HERE and p.name not in others]
    assert not missing, f"scripts without a test: {missing}"


# --------------------------------------------------------------------------- curriculum (SmolLM2-135M)


def test_the_curriculum_is_the_nine_stage_plan_scaled_to_smollm2():
    from megatron_ext.models import get_config

    plan = pytest.importorskip("megatron_ext.training.plan")
    stages = plan.curriculum_stages(str(CURRICULUM))
    assert len(stages) == 9 and stages[0].start == 0
    assert [s.seq_length for s in stages] == [64, 128, 256, 512, 768, 1024, 1536, 2048, 2048]
    assert [s.lr_scale for s in stages] == [11.3, 7.0, 3.5, 1.5, 1.0, 0.7, 0.5, 0.4, 0.3]
    assert all(s.global_batch_size % 4 == 0 for s in stages)            # 1, 2 or 4 data-parallel ranks
    assert all(15_000 <= s.tokens_per_iteration <= 19_000 for s in stages)
    assert max(s.seq_length for s in stages) <= get_config("smollm2-135m").max_position_embeddings
    assert stages[-1].start < 3000                                      # the scripts' TRAIN_ITERS


def _curriculum_inputs(tmp_path):
    return dict(DATA_PATH=dataset(tmp_path / "data" / "docs_text_document"),
                SMOLLM2_CKPT=checkpoint(tmp_path / "smollm2"), PRIOR_CKPT=checkpoint(tmp_path / "prior"),
                RUN_DIR=tmp_path / "run")


def _curriculum_checked(args, tmp_path, tag):
    if getattr(args, "curriculum", None) is None:
        pytest.skip("the trainer has no --curriculum yet")
    assert args.model == "smollm2-135m" and args.tag == tag
    assert args.curriculum == "scripts/curriculum/smollm2_135m_stages.yaml" and args.global_batch_size is None
    assert args.seq_length == 2048                                      # the longest stage
    assert args.micro_batch_size == "auto" and args.memory_target_fraction == 0.9
    assert (args.eval_seq_length, args.save_best, args.early_stop_patience, args.early_stop_min_delta) == \
        (2048, True, 10, 0.001)
    assert (args.train_iters, args.lr, args.lr_decay_style) == (3000, 5e-5, "cosine")
    assert args.load == str(tmp_path / "smollm2") and args.finetune and args.save == f"{tmp_path}/run/ckpt"


def test_curriculum_dense_script_launches_continued_pretraining(tmp_path):
    ((kind, words),) = commands(dry_run("curriculum/smollm2_135m_dense.sh", 0, **_curriculum_inputs(tmp_path)))
    assert kind == "torchrun"
    args = trainer_args(after(words, "pretrain_maskllm.py"))
    _curriculum_checked(args, tmp_path, "smollm2-135m-dense-curriculum")
    assert not args.mask_only and args.prior_mask is None


def test_curriculum_mask_only_script_launches_maskllm(tmp_path):
    ((_, words),) = commands(dry_run("curriculum/smollm2_135m_mask_only.sh", 0, **_curriculum_inputs(tmp_path)))
    args = trainer_args(after(words, "pretrain_maskllm.py"))
    _curriculum_checked(args, tmp_path, "smollm2-135m-mask-only-curriculum")
    assert (args.mask_only, args.N, args.M, args.lr_mult, args.weight_reg) == (True, 2, 4, 10.0, 1e-5)
    assert (args.prior_mask, args.prior_strength) == (str(tmp_path / "prior"), 3.0)


def test_curriculum_scripts_take_a_fixed_micro_batch_and_no_early_stop(tmp_path):
    env = dict(_curriculum_inputs(tmp_path), MICRO_BATCH_SIZE=2, EARLY_STOP_PATIENCE="", TP=3,
               MEGATRON_EXT_BACKEND="nccl")
    ((_, words),) = commands(dry_run("curriculum/smollm2_135m_dense.sh", 0, **env))
    argv = after(words, "pretrain_maskllm.py")
    assert "--early-stop-patience" not in argv and "--bf16" in argv
    args = trainer_args(argv)
    assert args.micro_batch_size == 2 and args.tensor_model_parallel_size == 3


def test_curriculum_scripts_resume_their_own_run(tmp_path):
    env = _curriculum_inputs(tmp_path)
    checkpoint(tmp_path / "run" / "ckpt")
    ((_, words),) = commands(dry_run("curriculum/smollm2_135m_mask_only.sh", 1, **env))
    argv = after(words, "pretrain_maskllm.py")
    assert argv[argv.index("--load") + 1] == f"{tmp_path}/run/ckpt" and "--finetune" not in argv
    res = dry_run("curriculum/smollm2_135m_mask_only.sh", 0, **env)      # a fresh start does not overwrite it
    assert res.returncode == 1 and "already holds a checkpoint" in res.stderr and "torchrun:" not in res.stdout


def test_curriculum_scripts_name_a_missing_curriculum(tmp_path):
    env = _curriculum_inputs(tmp_path)
    for script in ("curriculum/smollm2_135m_dense.sh", "curriculum/smollm2_135m_mask_only.sh"):
        res = dry_run(script, 0, **env, CURRICULUM=tmp_path / "stages.yaml")
        assert res.returncode == 1 and "torchrun:" not in res.stdout
        assert f"CURRICULUM: file not found: {tmp_path / 'stages.yaml'}" in res.stderr


# --------------------------------------------------------------------------- LLaMA-3-8B and LLaMA-3.1-8B

# The two sets differ in the model, its Hugging Face directory (and the variable naming it)
# and the names of their data, tags and checkpoints.
LLAMA3 = {
    "llama3": dict(model="llama3-8b", hf_var="LLAMA3_HF", hf="assets/checkpoints/llama3_8b_hf",
                   c4="learnable_sparsity/llama3_8b_mask_only_tp8_c4.sh",
                   incremental="incremental/llama3_8b_mask_only_wikitext103_tp8.sh"),
    "llama3.1": dict(model="llama3.1-8b", hf_var="LLAMA31_HF", hf="assets/checkpoints/llama3.1_8b_hf",
                     c4="learnable_sparsity/llama3.1_8b_mask_only_tp8_c4.sh",
                     incremental="incremental/llama3.1_8b_mask_only_wikitext103_tp8.sh"),
}


def _c4(tmp_path, name):
    home = tmp_path / name
    for i in range(20):
        dataset(home / f"c4_{i:05d}_text_document")
    return home


@pytest.mark.parametrize("llama", LLAMA3)
@pytest.mark.parametrize("micro_batch", ["1", "auto"])
def test_llama3_c4_script_launches_the_maskllm_recipe(tmp_path, micro_batch, llama):
    s = LLAMA3[llama]
    home = _c4(tmp_path, f"c4_{llama}")
    hf = hf_dir(tmp_path / f"{llama}_8b_hf")
    env = {"C4_HOME": home, s["hf_var"]: hf, "DENSE_CKPT": checkpoint(tmp_path / "dense"),
           "PRIOR_CKPT": checkpoint(tmp_path / "prior"), "RUN_DIR": tmp_path / "run", "MICRO_BATCH_SIZE": micro_batch}
    ((_, words),) = commands(dry_run(s["c4"], 0, **env))
    args = trainer_args(after(words, "pretrain_maskllm.py"))
    assert (args.model, args.tensor_model_parallel_size, args.seq_length, args.bf16) == (s["model"], 8, 4096, True)
    assert args.tag == f"{s['model']}-tp8-mask-only-c4"
    assert (args.tokenizer_type, args.tokenizer_model) == ("HuggingFaceTokenizer", hf)
    assert args.micro_batch_size == (micro_batch if micro_batch == "auto" else 1)   # default: auto
    assert (args.global_batch_size, args.train_iters, args.lr, args.min_lr) == (256, 2000, 5e-5, 5e-6)
    assert args.data_path.split() == sum((["0.05", f"{home}/c4_{i:05d}_text_document"] for i in range(20)), [])
    assert (args.mask_only, args.N, args.M, args.prior_strength, args.lr_mult) == (True, 2, 4, 3.0, 10.0)
    assert args.gumbel_temperature_range == (4.0, 0.05) and args.gumbel_scale_range == (100.0, 500.0)
    assert args.load == str(tmp_path / "dense") and args.finetune and args.prior_mask == str(tmp_path / "prior")


@pytest.mark.parametrize("name,rope_scaling,positions", [("llama3-8b", None, 8192), ("llama3.1-8b", 8.0, 131072)])
def test_llama3_models_are_gqa_with_the_128k_vocabulary_and_tp8_shards_them(name, rope_scaling, positions):
    from megatron_ext.models import get_config

    cfg = get_config(name)
    assert (cfg.vocab_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.rotary_base) == \
        (128256, 32, 8, 500000.0)
    assert (cfg.rope_scaling_factor, cfg.max_position_embeddings) == (rope_scaling, positions)
    cfg.validate_tp(8)


@pytest.mark.parametrize("llama", LLAMA3)
def test_llama3_c4_script_names_the_missing_tokenizer(tmp_path, llama):
    s = LLAMA3[llama]
    env = {"C4_HOME": _c4(tmp_path, "c4"), s["hf_var"]: tmp_path / "hf", "DENSE_CKPT": checkpoint(tmp_path / "dense"),
           "PRIOR_CKPT": checkpoint(tmp_path / "prior"), "RUN_DIR": tmp_path / "run"}
    res = dry_run(s["c4"], 0, **env)
    assert res.returncode == 1 and f"{s['hf_var']}: tokenizer not found: {tmp_path / 'hf'}" in res.stderr
    assert f"error: {Path(s['c4']).name}: 1 check(s) failed" in res.stderr     # the script the user ran
    # by default, the model's own Hugging Face directory
    res = dry_run(s["c4"], 0, **{k: v for k, v in env.items() if k != s["hf_var"]})
    assert res.returncode == 1 and f"{s['hf_var']}: tokenizer not found: {s['hf']}" in res.stderr


@pytest.mark.parametrize("llama", LLAMA3)
@pytest.mark.parametrize("micro_batch", ["1", "auto"])
def test_llama3_incremental_script_launches_from_the_c4_masks(tmp_path, micro_batch, llama):
    s = LLAMA3[llama]
    home = tmp_path / "wiki"
    dataset(home / f"wiki_train_{llama}_text_document")
    hf = hf_dir(tmp_path / f"{llama}_8b_hf")
    c4 = checkpoint(tmp_path / "c4run" / "ckpt")
    env = {"WIKI_HOME": home, s["hf_var"]: hf, "C4_MASK_CKPT": c4, "RUN_DIR": tmp_path / "run",
           "MICRO_BATCH_SIZE": micro_batch}
    ((_, words),) = commands(dry_run(s["incremental"], 0, **env))
    args = trainer_args(after(words, "pretrain_maskllm.py"))
    assert (args.model, args.tensor_model_parallel_size, args.seq_length) == (s["model"], 8, 2048)
    assert (args.tokenizer_type, args.tokenizer_model) == ("HuggingFaceTokenizer", hf)
    assert args.data_path == f"1.0 {home}/wiki_train_{llama}_text_document"
    assert args.micro_batch_size == (micro_batch if micro_batch == "auto" else 1)   # default: auto
    assert args.load == c4 and args.finetune and args.prior_mask is None   # the learned logits as they are
    assert args.gumbel_temperature_range == (2.0, 0.05)
    assert args.tag == f"{s['model']}-tp8-mask-only-wikitext103-c4format"
    ((_, words),) = commands(dry_run(s["incremental"], 0,
                                     **{**env, "PRIOR_STRENGTH": "3", "RUN_DIR": tmp_path / "run3"}))
    args = trainer_args(after(words, "pretrain_maskllm.py"))
    assert (args.prior_mask, args.prior_strength) == (c4, 3.0)


@pytest.mark.parametrize("script,tp", [("oneshot/run_llama2_7b_prune_tp4.sh", 4),
                                       ("oneshot/run_llama3_8b_prune_tp8.sh", 8),
                                       ("oneshot/run_llama3.1_8b_prune_tp8.sh", 8)])
def test_oneshot_scripts_launch_sparsegpt(tmp_path, script, tp):
    calib = dataset(tmp_path / "calib_text_document")
    dense = hf_dir(tmp_path / "hf") if "llama3" in script else checkpoint(tmp_path / "dense")
    ((kind, words),) = commands(dry_run(script, "hessian", DENSE_CKPT=dense, CALIB_DATA=calib,
                                        OUTPUT_ROOT=tmp_path / "out"))
    assert kind == "torchrun" and "--nproc_per_node" in words
    assert words[words.index("--nproc_per_node") + 1] == str(tp)
    args = tool_args("prune_oneshot", after(words, "prune_oneshot.py"))
    assert (args.method, args.N, args.M, args.update_weight) == ("sparsegpt", 2, 4, True)
    assert (args.load, args.calib_data, args.tensor_model_parallel_size) == (dense, calib, tp)
    assert args.save == f"{tmp_path}/out/hessian_2_4" and args.seq_length == 4096 and args.dtype == "bf16"


@pytest.mark.parametrize("script", ["oneshot/run_llama2_7b_prune_tp4.sh", "oneshot/run_llama3_8b_prune_tp8.sh",
                                    "oneshot/run_llama3.1_8b_prune_tp8.sh"])
def test_oneshot_scripts_report_missing_inputs_before_launching(tmp_path, script):
    res = dry_run(script, "wanda", DENSE_CKPT=tmp_path / "dense", CALIB_DATA=tmp_path / "calib",
                  OUTPUT_ROOT=tmp_path / "out")
    assert res.returncode == 1 and "torchrun:" not in res.stdout
    assert f"DENSE_CKPT: checkpoint directory not found: {tmp_path / 'dense'}" in res.stderr
    assert f"CALIB_DATA: dataset {tmp_path / 'calib'} is missing" in res.stderr


@pytest.mark.parametrize("script", ["ppl/evaluate_llama2_wikitext2.sh", "ppl/evaluate_llama3_wikitext2.sh",
                                    "ppl/evaluate_llama3.1_wikitext2.sh"])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_ppl_scripts_launch_eval_ppl(tmp_path, script, mode):
    ckpt = checkpoint(tmp_path / "ckpt")
    (tmp_path / "wiki.test.raw").write_text(" = Title = \n text \n")
    ((kind, words),) = commands(dry_run(script, ckpt, "llama3-8b", 8, mode, WIKITEXT2_TEST=tmp_path / "wiki.test.raw"))
    assert kind == "torchrun" and words[:3] == ["--standalone", "--nproc_per_node", "8"]
    args = tool_args("eval_ppl", after(words, "eval_ppl.py"))
    assert (args.load, args.text_file, args.seq_length) == (ckpt, str(tmp_path / "wiki.test.raw"), 4096)
    assert (args.tensor_model_parallel_size, args.dtype, args.sparse) == (8, "bf16", mode == "sparse")


def test_export_script_exports_checks_and_packs(tmp_path):
    ckpt = checkpoint(tmp_path / "mask")
    cmds = commands(dry_run("tools/export_hf.sh", ckpt, tmp_path / "hf", "bf16", PACKED=1))
    assert [(kind, Path(words[0]).name) for kind, words in cmds] == \
        [("python", "export_sparse.py"), ("python", "check_sparsity.py"), ("python", "export_sparse.py")]
    assert cmds[0][1][1:] == ["--load", ckpt, "--save", str(tmp_path / "hf"), "--format", "hf", "--dtype", "bf16",
                              "--N", "2", "--M", "4", "--overwrite"]
    assert cmds[1][1][1:] == [str(tmp_path / "hf"), "--N", "2", "--M", "4", "--quiet"]
    assert cmds[2][1][cmds[2][1].index("--format") + 1] == "masks"
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("llama,tokenizer_type", [("llama2", "Llama2Tokenizer"), ("llama3", "HuggingFaceTokenizer"),
                                                  ("llama3.1", "HuggingFaceTokenizer")])
def test_c4_data_scripts_tokenize_every_shard_with_their_tokenizer(tmp_path, llama, tokenizer_type):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(3):
        (raw / f"c4-train.{i:05d}-of-01024.json").write_text('{"text": "x"}\n')
    tok = hf_dir(tmp_path / "hf") if llama != "llama2" else str(REPO / "examples" / "data" / "tokenizer.model")
    cmds = commands(dry_run(f"data/prepare_c4_{llama}.sh", C4_RAW=raw, C4_HOME=tmp_path / "out", NUM_SHARDS=3,
                            TOKENIZER_MODEL=tok))
    assert [Path(w[0]).name for _, w in cmds] == ["preprocess_data.py"] * 3 + ["check_dataset.py"]
    for i, (_, words) in enumerate(cmds[:3]):
        assert words[words.index("--input") + 1] == str(raw / f"c4-train.{i:05d}-of-01024.json")
        assert words[words.index("--output-prefix") + 1] == f"{tmp_path}/out/c4_{i:05d}"
        assert words[words.index("--tokenizer-type") + 1] == tokenizer_type
        assert words[words.index("--tokenizer-model") + 1] == tok and "--append-eod" in words
    assert cmds[3][1][1:] == [f"{tmp_path}/out/c4_{i:05d}_text_document" for i in range(3)]


@pytest.mark.parametrize("llama", LLAMA3)
def test_llama3_data_scripts_default_to_the_hf_directory(tmp_path, llama):
    for script, env in ((f"data/prepare_c4_{llama}.sh", dict(C4_RAW=tmp_path, NUM_SHARDS=1)),
                        (f"data/prepare_wikitext103_{llama}.sh", dict(WIKI_RAW=tmp_path))):
        res = dry_run(script, C4_HOME=tmp_path / "out", WIKI_HOME=tmp_path / "out", **env)
        assert res.returncode == 1 and not (tmp_path / "out").exists()
        assert f"TOKENIZER_MODEL: tokenizer not found: {LLAMA3[llama]['hf']}" in res.stderr


@pytest.mark.parametrize("llama,tokenizer_type", [("llama2", "Llama2Tokenizer"), ("llama3", "HuggingFaceTokenizer"),
                                                  ("llama3.1", "HuggingFaceTokenizer")])
def test_wikitext_data_scripts_split_articles_then_tokenize(tmp_path, llama, tokenizer_type):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "wiki.train.raw").write_text(" = A = \n a \n")
    tok = hf_dir(tmp_path / "hf") if llama != "llama2" else str(REPO / "examples" / "data" / "tokenizer.model")
    cmds = commands(dry_run(f"data/prepare_wikitext103_{llama}.sh", WIKI_RAW=raw, WIKI_HOME=tmp_path / "out",
                            TOKENIZER_MODEL=tok))
    assert [w[0] for _, w in cmds][0] == "-"                              # the article splitter, on stdin
    assert cmds[0][1][1:] == [str(raw / "wiki.train.raw"), f"{tmp_path}/out/wiki_train.jsonl"]
    words = cmds[1][1]
    assert Path(words[0]).name == "preprocess_data.py"
    assert words[words.index("--output-prefix") + 1] == f"{tmp_path}/out/wiki_train_{llama}"
    assert words[words.index("--tokenizer-type") + 1] == tokenizer_type
    assert cmds[2][1][1:] == [f"{tmp_path}/out/wiki_train_{llama}_text_document"]


# --------------------------------------------------------------------------- LLaMA-2-7B and SmolLM2 training scripts


def test_llama2_scripts_take_an_auto_micro_batch(tmp_path):
    home = _c4(tmp_path, "c4")
    tok = str(REPO / "examples" / "data" / "tokenizer.model")
    env = dict(C4_HOME=home, TOKENIZER_MODEL=tok, DENSE_CKPT=checkpoint(tmp_path / "dense"),
               PRIOR_CKPT=checkpoint(tmp_path / "prior"), RUN_DIR=tmp_path / "run", MICRO_BATCH_SIZE="auto")
    ((_, words),) = commands(dry_run("learnable_sparsity/llama2_7b_mask_only_tp4_c4.sh", 0, **env))
    args = trainer_args(after(words, "pretrain_maskllm.py"))
    assert args.micro_batch_size == "auto" and args.global_batch_size == 256 and args.model == "llama2-7b"

    dataset(tmp_path / "wiki" / "wiki_train_llama2_text_document")
    env = dict(WIKI_HOME=tmp_path / "wiki", TOKENIZER_MODEL=tok, C4_MASK_CKPT=str(tmp_path / "prior"),
               RUN_DIR=tmp_path / "run2", MICRO_BATCH_SIZE="auto")
    ((_, words),) = commands(dry_run("incremental/llama2_7b_mask_only_wikitext103_tp4.sh", 0, **env))
    args = trainer_args(after(words, "pretrain_maskllm.py"))
    assert args.micro_batch_size == "auto" and args.global_batch_size == 64


def test_smollm2_mask_only_script_takes_auto_micro_batch_and_lr_scaling(tmp_path):
    env = dict(DATA_PATH=dataset(tmp_path / "docs_text_document"), SMOLLM2_CKPT=checkpoint(tmp_path / "smollm2"),
               PRIOR_CKPT=checkpoint(tmp_path / "prior"), RUN_DIR=tmp_path / "run", MICRO_BATCH_SIZE="auto",
               MEMORY_TARGET_FRACTION=0.8, LR_SCALING="sqrt", LR_BASE_BATCH_SIZE=8)
    ((_, words),) = commands(dry_run("learnable_sparsity/smollm2_135m_mask_only.sh", 0, **env))
    args = trainer_args(after(words, "pretrain_maskllm.py"))
    if getattr(args, "lr_scaling", None) is None:
        pytest.skip("the trainer has no --lr-scaling yet")
    assert (args.micro_batch_size, args.memory_target_fraction, args.global_batch_size) == ("auto", 0.8, 32)
    assert (args.lr_scaling, args.lr_base_batch_size, args.lr) == ("sqrt", 8, 5e-5)
    # without LR_SCALING no scaling flag is passed
    env.pop("LR_SCALING")
    ((_, words),) = commands(dry_run("learnable_sparsity/smollm2_135m_mask_only.sh", 0, **env))
    assert "--lr-scaling" not in words and "--lr-base-batch-size" not in words


def test_the_study_corpora_script_prepares_both_corpora_with_smollm2s_tokenizer(tmp_path):
    """scripts/data/prepare_smollm2_study_corpora.sh: the corpus builder, then three
    prepare_dataset runs (normalized, paragraph-deduplicated general corpus with 1% held out;
    the Python docs' training and held-out parts) on the tokenizer of the SmolLM2 checkpoint."""
    ckpt = Path(checkpoint(tmp_path / "smollm2"))
    (ckpt / "iter_0000000" / "tokenizer").mkdir(parents=True)
    (ckpt / "iter_0000000" / "tokenizer" / "tokenizer.json").write_text("{}\n")
    out, raw = tmp_path / "out", tmp_path / "raw"
    cmds = commands(dry_run("data/prepare_smollm2_study_corpora.sh", SMOLLM2_CKPT=ckpt, OUT=out, RAW=raw,
                            CACHE=tmp_path / "cache", WORKERS=2))
    assert [c[1][0] for c in cmds] == ["scripts/data/smollm2_study_corpora.py"] + ["tools/prepare_dataset.py"] * 3
    general = cmds[1][1]
    assert general[general.index("--output-prefix") + 1] == f"{out}/general"
    assert {"--normalize", "--append-eod"} <= set(general)
    assert general[general.index("--dedup") + 1] == "paragraph" and general[general.index("--val-fraction") + 1] == "0.01"
    assert general[general.index("--tokenizer-model") + 1] == f"{ckpt}/iter_0000000/tokenizer"
    assert [c[1][c[1].index("--output-prefix") + 1] for c in cmds[2:]] == [f"{out}/python_docs_train",
                                                                          f"{out}/python_docs_heldout"]
    assert not out.exists() and not (tmp_path / "cache").exists()   # a dry run writes nothing


# --------------------------------------------------------------------------- PLOT_SCHEDULE


def test_plot_schedule_draws_the_scripts_own_run_before_training(tmp_path, monkeypatch):
    """PLOT_SCHEDULE=FILE.png: before the launch, tools/plot_schedule.py on the same trainer
    flags and world size (2 nodes x 2 processes); that command, run as printed, draws the PNG
    (no data or tokenizer read)."""
    png = tmp_path / "plan.png"
    env = dict(_curriculum_inputs(tmp_path), PLOT_SCHEDULE=png, NNODES=2, NPROC_PER_NODE=2)
    (plot_kind, plot), (kind, launch) = commands(dry_run("curriculum/smollm2_135m_mask_only.sh", 0, **env))
    assert (plot_kind, kind) == ("python", "torchrun")
    assert plot[0] == "./tools/plot_schedule.py"
    assert plot[1:-4] == after(launch, "pretrain_maskllm.py")
    assert plot[-4:] == ["--world-size", "4", "-o", str(png)]
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("tool_plot_schedule", REPO / "tools" / "plot_schedule.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.chdir(REPO)
    assert tool.main(plot[1:]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_schedule_is_refused_before_a_launch_the_tool_refuses(tmp_path):
    """Not a dry run: 3 processes, which the stages' global batches (256, ...) do not divide.
    The tool runs, refuses with the trainer's error, and nothing is launched. Without
    PLOT_SCHEDULE nothing is drawn."""
    env = dict(_curriculum_inputs(tmp_path), NPROC_PER_NODE=3)
    full = {k: v for k, v in os.environ.items() if k not in _INHERITED and k != "DRY_RUN"}
    full.update({k: str(v) for k, v in env.items()}, PLOT_SCHEDULE=str(tmp_path / "p.png"), PYTHON=sys.executable)
    res = subprocess.run(["bash", str(SCRIPTS / "curriculum/smollm2_135m_dense.sh"), "0"], cwd=REPO, env=full,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "is not divisible by the data-parallel size 3" in res.stderr
    assert "PLOT_SCHEDULE=" in res.stderr and "nothing was launched" in res.stderr
    assert [k for k, _ in commands(dry_run("curriculum/smollm2_135m_dense.sh", 0, **env))] == ["torchrun"]
