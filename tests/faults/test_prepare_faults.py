"""tools/prepare_dataset.py under kills and bad output locations: a killed run's work areas
are removed by the next run (and by tools/check_dataset.py), never a live run's; the stats
commit a run, so a kill between any two steps of the finish leaves the next --append right;
an output name taken by a directory, or an unusable --dedup-dir, fails before any work."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from megatron_ext.data.indexed_dataset import IndexedDataset, find_temporaries
from megatron_ext.data.prepare import PrepareConfig, PrepareError, prepare
from megatron_ext.data.preprocess import PreprocessConfig

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "prepare_dataset.py"


@pytest.fixture(scope="module")
def plays(sample_dir):
    return [json.loads(line) for line in (sample_dir / "shakespeare_train.jsonl").read_text().splitlines()]


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def config(sample_dir, inputs, prefix, **prep):
    pre = PreprocessConfig(inputs=inputs, output_prefix=str(prefix), tokenizer_type="Llama2Tokenizer",
                           tokenizer_model=str(sample_dir / "tokenizer.model"), append_eod=True, workers=2)
    return PrepareConfig(pre, **prep)


def documents(prefix):
    ds = IndexedDataset(prefix)
    return [tuple(ds.document(k).tolist()) for k in range(ds.document_count)]


def load_tool(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def hidden(directory):
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith("."))


def test_kill_9_mid_run_leaves_work_areas_that_the_next_run_removes(sample_dir, plays, tmp_path):
    out, dedup_dir = tmp_path / "out", tmp_path / "dedup"
    out.mkdir()
    dedup_dir.mkdir()
    a = write_jsonl(tmp_path / "a.jsonl", plays[:40])
    big = write_jsonl(tmp_path / "big.jsonl", [{"text": f"[copy {k}] {p['text']}"} for k in range(6) for p in plays])
    b = write_jsonl(tmp_path / "b.jsonl", plays[40:80] + [plays[3]])  # plays[3]: kept by the first run
    opts = dict(dedup="exact", dedup_table="disk", dedup_dir=str(dedup_dir), tokens_per_shard=20_000)
    first = prepare(config(sample_dir, [a], out / "c", **opts), log=None)
    committed = sorted(p.name for p in out.iterdir())

    cmd = [sys.executable, str(TOOL), "--input", big, "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
           str(sample_dir / "tokenizer.model"), "--append-eod", "--workers", "2", "--output-prefix", str(out / "c"),
           "--dedup", "exact", "--dedup-table", "disk", "--dedup-dir", str(dedup_dir), "--tokens-per-shard", "20000",
           "--append"]
    child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 30
        staged = []
        while time.time() < deadline and child.poll() is None:
            staged = [p for d in out.glob(".c-staging.tmp-*") for p in d.glob("*.idx")]
            if len(staged) >= 2:  # finished shards wait there
                break
            time.sleep(0.01)
        assert len(staged) >= 2 and child.poll() is None, "the run ended before it could be killed"
        stale, live = find_temporaries(out / "c")
        assert stale == [] and [Path(p).name for p in live] == hidden(out)  # a live run's: kept
        assert "c_stats.json" in committed and (out / "c_stats.json").read_bytes()
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert [n.split(".tmp-")[0] for n in hidden(out)] == [".c-staging"]
    assert [n.split(".tmp-")[0] for n in hidden(dedup_dir)] == [".c-dedup"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == committed  # nothing published

    # tools/check_dataset.py on one of the datasets removes the staging directory ...
    rc = load_tool(REPO / "tools" / "check_dataset.py").main([first.datasets["all"][0]])
    assert rc == 0 and hidden(out) == []
    # ... and the next run the working table in --dedup-dir; its output is as if nothing had happened.
    logged = []
    second = prepare(config(sample_dir, [b], out / "c", append=True, **opts), log=logged.append)
    assert any("removed" in m and ".c-dedup.tmp-" in m for m in logged)
    assert hidden(out) == [] and hidden(dedup_dir) == []
    reference = prepare(config(sample_dir, [a, b], tmp_path / "ref", **opts), log=None)
    assert second.stats["dropped"]["exact_duplicate"] == 1 and len(second.stats["runs"]) == 2
    joined = [d for prefix in second.datasets["all"] for d in documents(prefix)]
    assert joined == [d for prefix in reference.datasets["all"] for d in documents(prefix)]


def test_kill_after_the_table_is_published_but_before_the_stats_loses_nothing(sample_dir, plays, tmp_path):
    """The finish publishes datasets, then a new table file, then the stats. A kill before the
    stats leaves the old stats naming the old table: the next --append must not treat the
    killed run's documents as already seen."""
    a = write_jsonl(tmp_path / "a.jsonl", plays[:100])
    b = write_jsonl(tmp_path / "b.jsonl", plays[100:200])
    opts = dict(dedup="exact", tokens_per_shard=50_000)
    done, killed = tmp_path / "done", tmp_path / "killed"
    done.mkdir()
    killed.mkdir()
    prepare(config(sample_dir, [a], killed / "c", **opts), log=None)
    for p in killed.iterdir():
        shutil.copy(p, done / p.name)
    full = prepare(config(sample_dir, [b], done / "c", append=True, **opts), log=None)
    # the killed run got as far as the stats: everything but them is in place
    for p in done.iterdir():
        if p.name != "c_stats.json":
            shutil.copy(p, killed / p.name)
    assert json.loads((killed / "c_stats.json").read_text())["dedup_table"]["file"] == "c_dedup_memory_00001.npy"
    again = prepare(config(sample_dir, [b], killed / "c", append=True, **opts), log=None)
    assert again.stats["kept"] == full.stats["kept"] == 200
    assert again.stats["dropped"]["exact_duplicate"] == 0
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in done.iterdir())
    assert not (killed / "c_dedup_memory_00001.npy").exists()  # the replaced table is removed after the commit


def test_dedup_dir_on_another_file_system(sample_dir, plays, tmp_path):
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system")
    dedup_dir = tempfile.mkdtemp(dir="/dev/shm")
    try:
        a = write_jsonl(tmp_path / "a.jsonl", plays[:30] + [plays[0]])
        opts = dict(dedup="exact", dedup_table="disk", dedup_dir=dedup_dir, tokens_per_shard=50_000)
        res = prepare(config(sample_dir, [a], tmp_path / "c", **opts), log=None)
        assert res.stats["dropped"]["exact_duplicate"] == 1 and os.listdir(dedup_dir) == []
        assert (tmp_path / "c_dedup_disk_00001.sqlite").is_file()
        b = write_jsonl(tmp_path / "b.jsonl", [plays[1], plays[31]])
        res = prepare(config(sample_dir, [b], tmp_path / "c", append=True, **opts), log=None)
        assert res.stats["runs"][1]["dropped"]["exact_duplicate"] == 1 and res.stats["kept"] == 31
    finally:
        shutil.rmtree(dedup_dir)


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("in_the_way", ["c_00002_text_document.idx", "c_stats.json", "c_dedup_memory_00001.npy"])
def test_a_directory_in_the_way_of_an_output_fails_before_any_work(sample_dir, tmp_path, in_the_way):
    (tmp_path / in_the_way).mkdir()
    res = run_tool("--input", sample_dir / "shakespeare_train.jsonl", "--tokenizer-type", "Llama2Tokenizer",
                   "--tokenizer-model", sample_dir / "tokenizer.model", "--output-prefix", tmp_path / "c",
                   "--dedup", "exact", "--tokens-per-shard", "40000")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert f"{tmp_path / in_the_way} is a directory" in res.stderr and "Traceback" not in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == [in_the_way]


def test_unsharded_split_output_in_the_way_and_bad_dedup_dir(sample_dir, plays, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", plays[:20])
    (tmp_path / "c_val_text_document.bin").mkdir()
    with pytest.raises(PrepareError, match=r"c_val_text_document\.bin is a directory"):
        prepare(config(sample_dir, [a], tmp_path / "c", val_fraction=0.2), log=None)
    with pytest.raises(PrepareError, match=r"--dedup-dir .*/nowhere: does not exist"):
        prepare(config(sample_dir, [a], tmp_path / "d", dedup="exact", dedup_table="disk",
                       dedup_dir=str(tmp_path / "nowhere")), log=None)
    with pytest.raises(PrepareError, match=r"--dedup-dir .*a\.jsonl: not a directory"):
        prepare(config(sample_dir, [a], tmp_path / "d", dedup="exact", dedup_table="disk", dedup_dir=a), log=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "c_val_text_document.bin"]
