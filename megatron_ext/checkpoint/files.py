"""Atomic directories: what every checkpoint writer here is built from.

A directory is filled under a temporary sibling name and renamed into place, with
the permissions of ordinary new files and directories; a single file is written
with ``megatron_ext.files.atomic_write``. A reader therefore sees a complete file or
directory, or the old one.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from megatron_ext.checkpoint.layout import CheckpointError
from megatron_ext.files import current_umask

# Files that make up a tokenizer; whichever exist are copied along with a checkpoint.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")


def owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when it is contiguous and is its whole storage, else a compact copy.

    Conversion results may be views of their inputs (cheap in memory); before saving,
    views must be compacted: torch.save of a view writes its whole base storage, and
    safetensors refuses tensors that share memory.
    """
    t = t.detach()
    if t.is_contiguous() and t.storage_offset() == 0 and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def prepare_output_dir(out_dir: Path, overwrite: bool) -> Path:
    """Check ``out_dir`` may be (re)written; return a fresh temporary sibling to fill."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir}: directory exists and is not empty (pass overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir.parent, os.W_OK):
        raise CheckpointError(f"{out_dir.parent}: directory is not writable")
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def publish_permissions(tmp: Path) -> None:
    """Give a finished temporary tree the permissions of ordinary new files (mkdtemp uses 0700)."""
    mask = current_umask()
    for root, dirs, files in os.walk(tmp):
        os.chmod(root, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


def commit_output_dir(tmp: Path, out_dir: Path) -> None:
    """Rename the filled temporary directory into place (replacing an old one)."""
    publish_permissions(tmp)
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / "d")
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)



def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_torch_file(path: Path, payload) -> None:
    """``torch.save`` into ``path`` (inside a temporary directory), flushed and fsynced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())


def tokenizer_files(src_dir: str | os.PathLike) -> list[Path]:
    """The tokenizer files present in ``src_dir`` (possibly none)."""
    d = Path(src_dir)
    return [d / f for f in TOKENIZER_FILES if (d / f).is_file()]


def copy_tokenizer(src_dir: str | os.PathLike | None, dst_dir: Path) -> list[str]:
    """Copy the tokenizer files of ``src_dir`` into ``dst_dir``; return their names."""
    if src_dir is None:
        return []
    names = []
    for f in tokenizer_files(src_dir):
        shutil.copyfile(f, dst_dir / f.name)
        names.append(f.name)
    return names
