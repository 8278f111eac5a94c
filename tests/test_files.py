"""megatron_ext.files: a file appears whole under its name, with the mode of an ordinary new
file (0o666 less the umask), or the old one stays; no temporary is left behind either way."""
import os
import stat
import threading

import pytest

from megatron_ext import files
from megatron_ext.files import atomic_write, atomic_write_text, current_umask, new_file_mode


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_file_has_the_mode_of_a_new_file_under_the_umask(tmp_path, umask, mask):
    umask(mask)
    target = tmp_path / "out.bin"
    atomic_write(target, lambda f: f.write(b"abc"))
    assert target.read_bytes() == b"abc"
    assert mode(target) == 0o666 & ~mask == new_file_mode()
    with open(tmp_path / "plain", "wb"):  # what open() itself gives
        pass
    assert mode(target) == mode(tmp_path / "plain")


def test_replacing_a_file_gives_the_new_mode_and_content_and_leaves_no_temporary(tmp_path, umask):
    umask(0o077)
    target = tmp_path / "out.txt"
    target.write_text("old")
    os.chmod(target, 0o444)
    atomic_write_text(target, "new ✓\n", durable=True)
    assert target.read_text(encoding="utf-8") == "new ✓\n"
    assert mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_leaves_the_old_target_and_no_temporary(tmp_path, error):
    target = tmp_path / "out.json"
    target.write_text("old")
    seen = []

    def write(f):
        f.write(b"half a fi")
        seen.extend(p.name for p in tmp_path.iterdir() if p != target)
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, write, durable=True)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    (name,) = seen  # the temporary while it was written: hidden, named after the target
    assert name.startswith(".out.json.") and name.endswith(".tmp")


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        atomic_write(tmp_path / "new.npy", lambda f: (_ for _ in ()).throw(ValueError("bad array")))
    assert list(tmp_path.iterdir()) == []


def test_durable_fsyncs_the_data_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append((tmp_path / "t").read_bytes()), real_fsync(fd)))
    atomic_write(tmp_path / "t", lambda f: f.write(b"x"))
    assert synced == []
    atomic_write(tmp_path / "t", lambda f: f.write(b"y"), durable=True)
    assert synced == [b"x"]  # fsynced while the old file still stood under the name (before the rename)
    assert (tmp_path / "t").read_bytes() == b"y"


def test_umask_is_read_without_changing_it_with_or_without_proc(umask, monkeypatch):
    umask(0o027)
    assert current_umask() == 0o027
    monkeypatch.setattr(files, "_PROC_STATUS", "/nonexistent/status")  # the set-and-restore fallback
    assert current_umask() == 0o027
    assert os.umask(0o027) == 0o027  # left as it was


def test_threads_reading_the_umask_see_it_and_leave_it(umask, monkeypatch):
    umask(0o027)
    monkeypatch.setattr(files, "_PROC_STATUS", "/nonexistent/status")
    seen = []
    threads = [threading.Thread(target=lambda: seen.extend(current_umask() for _ in range(200))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(seen) == {0o027} and len(seen) == 1600
    assert os.umask(0o027) == 0o027
