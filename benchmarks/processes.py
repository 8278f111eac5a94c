"""Process helpers the benchmark and study drivers share (no torch: the drivers only launch).

Import after putting ``benchmarks/`` on ``sys.path`` (the drivers beside or below it do).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port free on this host now (for a launch's MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parent_pid(pid: int) -> int | None:
    """``pid``'s parent, from ``/proc`` (None once it has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (torchrun starts its workers in sessions of their own, so a
    process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = parent_pid(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def signal_pids(pids, sig) -> None:
    """Send ``sig`` to each of ``pids`` that still exists."""
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
