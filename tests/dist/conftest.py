"""Distributed tests: launched once as ``torchrun --standalone --nproc_per_node=N -m pytest tests/dist``.

Every process runs every test. ``parallel(tp)`` (re)builds megatron-core's groups for
the tensor-parallel size a test needs; sizes that do not divide the world size are
skipped on every rank alike, so the ranks never disagree about which collectives run.
N=6 allows TP=1, 2 and 3 (TP1xDP6, TP2xDP3, TP3xDP2). Under a plain ``pytest``
(no torchrun) the tests here are skipped.
"""
import os

import pytest
import torch.distributed as dist

from megatron_ext import platform

UNDER_TORCHRUN = "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)
COLLECTIVE_TIMEOUT_S = 180.0  # a rank that fails before a collective must not hang the others for long


def pytest_collection_modifyitems(config, items):
    if UNDER_TORCHRUN:
        return
    skip = pytest.mark.skip(reason="distributed test: run under torchrun (see tests/dist/conftest.py)")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_parallel(tp: int, seed: int = 1234) -> platform.DistInfo:
    """Tensor-parallel groups of size ``tp`` (skip when it does not divide the world), seeded."""
    if world_size() % tp:
        pytest.skip(f"TP={tp} needs a world size divisible by {tp}, have {world_size()}")
    info = platform.init_distributed(tp, timeout_s=COLLECTIVE_TIMEOUT_S)
    platform.seed_everything(seed)
    return info


@pytest.fixture
def parallel():
    """``parallel(tp)`` -> DistInfo; the groups stay until the next call or the end of the session."""
    return setup_parallel


@pytest.fixture(scope="session", autouse=True)
def _teardown_distributed():
    yield
    if dist.is_initialized():
        dist.barrier()
    platform.destroy_distributed()
