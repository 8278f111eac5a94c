"""Atomic file writes: a file appears whole under its name, or the old one stays.

``atomic_write(path, write)`` calls ``write(f)`` on a binary temporary file created in
the target's directory under a hidden name (``.<name>.<random>.tmp``, created
exclusively by mkstemp, so processes or hosts sharing a file system cannot collide),
gives it the permissions of an ordinary new file (``0o666 & ~umask``, as ``open``
would; mkstemp alone makes it 0600), fsyncs it when ``durable``, and renames it over
the target. A reader sees the old file or the complete new one, never a partial one. On
any error the temporary is removed and the error re-raised, so an existing target is
left as it was; only a process killed mid-write leaves its hidden temporary behind.

Locked temporaries that a later run finds and removes as debris (dataset builders,
staging directories) are another matter: see ``megatron_ext.data.indexed_dataset``.
This module imports nothing heavy: the data layer uses it without torch.
"""
from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable

_PROC_STATUS = "/proc/self/status"
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``).

    Elsewhere the only way is to set it and put it back: that is done under a lock, and
    with 0o077 in between rather than 0, so that a file another thread creates in that
    instant is private for a moment too much rather than writable by everyone.
    """
    try:
        with open(_PROC_STATUS, "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permissions ``open`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, durable: bool = False) -> None:
    """Call ``write(f)`` on a binary temporary file beside ``path``, then rename it over ``path``.

    ``durable``: fsync the file's data before the rename (for files a crash must not
    lose: checkpoint trackers, exported masks). The directory is not fsynced here.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)

    def with_mode(f: BinaryIO) -> None:
        os.fchmod(f.fileno(), new_file_mode())
        write(f)

    try:
        replace_with_temporary(fd, tmp, path, with_mode, durable=durable)
    finally:
        os.close(fd)


def replace_with_temporary(fd: int, tmp: str | os.PathLike, path: str | os.PathLike,
                           write: Callable[[BinaryIO], object], *, durable: bool = False) -> None:
    """The second half of every atomic write: ``write(f)`` through the open temporary file
    ``fd`` (named ``tmp``, beside ``path``), fsync when ``durable``, rename it over ``path``; on
    any error remove ``tmp`` and re-raise. ``fd`` stays open (a caller may hold a lock on it
    until the rename) and is the caller's to close."""
    try:
        with os.fdopen(os.dup(fd), "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> None:
    """Write ``text`` to ``path`` as UTF-8, atomically (see :func:`atomic_write`)."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data), durable=durable)
