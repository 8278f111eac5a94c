"""Everything that depends on the hardware: device, process groups, random state.

Two platforms are supported:

* CUDA GPUs: NCCL process groups, megatron-core's own CUDA RNG tracker.
* CPU (tests, the quickstart): gloo process groups and the small shims below.

megatron-core assumes CUDA in a few places that our models reach even with
``use_cpu_initialization=True``. On a machine without CUDA, ``init_distributed``
installs two shims (idempotent, no-ops when CUDA is present):

1. ``torch.cuda.current_device`` returns ``"cpu"``, so buffers megatron-core creates
   with ``device=torch.cuda.current_device()`` (rotary frequencies, the global
   memory buffer of the local attention) land on the CPU.
2. ``seed_everything`` installs an RNG tracker that forks the CPU generator where
   megatron-core's tracker would fork CUDA generators (dropout in tensor-parallel
   regions, GPU-style weight initialisation).

megatron-core's local attention builds its default causal mask on ``"cuda"``;
``causal_attention_mask`` gives the explicit mask to pass instead. Our own
attention (``megatron_ext.models.attention``) needs no mask.

No other module of the code base looks at the device type: they ask this one.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

_ORIGINAL_CURRENT_DEVICE = torch.cuda.current_device


def has_cuda() -> bool:
    """Whether to compute on CUDA; ``MEGATRON_EXT_FORCE_CPU=1`` keeps a GPU machine on the CPU."""
    if os.environ.get("MEGATRON_EXT_FORCE_CPU", "0") == "1":
        return False
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on."""
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_backend() -> str:
    return "nccl" if has_cuda() else "gloo"


def use_cpu_initialization() -> bool:
    """Whether models initialise their weights on the CPU (always, without CUDA)."""
    return not has_cuda()


def synchronize() -> None:
    """Wait for queued device work (for timing)."""
    if has_cuda():
        torch.cuda.synchronize()


def install_cpu_shims() -> None:
    """Point ``torch.cuda.current_device`` at the CPU when there is no CUDA (idempotent)."""
    if has_cuda():
        return
    if torch.cuda.current_device is not _cpu_current_device:
        torch.cuda.current_device = _cpu_current_device


def _cpu_current_device() -> str:
    return "cpu"


def remove_cpu_shims() -> None:
    torch.cuda.current_device = _ORIGINAL_CURRENT_DEVICE


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp_size: int = 1, backend: str | None = None, timeout_s: float = 600.0) -> DistInfo:
    """Start torch.distributed and megatron-core's tensor/data-parallel groups.

    Under ``torchrun`` the rank and world size come from the environment; a plain
    process becomes a world of one. Calling it again with another ``tp_size``
    rebuilds only megatron's groups; with the same size it does nothing.
    """
    from megatron.core import parallel_state

    install_cpu_shims()
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        else:
            rank, world = 0, 1
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if has_cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend or default_backend(), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if not isinstance(tp_size, int) or tp_size < 1 or world % tp_size:
        raise ValueError(f"tensor-parallel size {tp_size} does not divide the world size {world}")
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() == tp_size:
            return dist_info()
        _destroy_model_parallel_groups()
    # No duplicate gloo groups: nothing here uses them, and on CPU each costs threads per peer.
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp_size, create_gloo_process_groups=False)
    return dist_info()


def dist_info() -> DistInfo:
    from megatron.core import parallel_state as ps

    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    tp_size=ps.get_tensor_model_parallel_world_size(),
                    tp_rank=ps.get_tensor_model_parallel_rank(),
                    dp_size=ps.get_data_parallel_world_size(),
                    dp_rank=ps.get_data_parallel_rank())


def destroy_distributed() -> None:
    """Tear down megatron's groups and the default process group (safe to repeat)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        _destroy_model_parallel_groups()
    if dist.is_initialized():
        dist.destroy_process_group()


def _destroy_model_parallel_groups() -> None:
    """megatron's ``destroy_model_parallel`` and the process groups it made.

    megatron-core only forgets its groups; torch.distributed keeps them (with their
    threads and sockets) until destroyed, so a process that switches tensor-parallel
    sizes would pile them up. Every group except the default one is megatron's: this
    package creates none of its own.
    """
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    c10d = dist.distributed_c10d
    for group in list(c10d._world.pg_map):
        if group is not c10d.GroupMember.WORLD and group is not c10d._get_default_group():
            dist.destroy_process_group(group)


def causal_attention_mask(seq_len: int) -> torch.Tensor:
    """Megatron's mask convention: bool ``[1, 1, s, s]``, True where attention is blocked."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device()), diagonal=1)[None, None]


def _cpu_tracker_class():
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
        """megatron-core's RNG tracker with named CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise ValueError(f"RNG seed {seed} already exists")
            if name in self.states_:
                raise ValueError(f"RNG state {name!r} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise ValueError(f"RNG state {name!r} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    return CpuRNGStatesTracker


def seed_everything(seed: int) -> None:
    """Seed Python, numpy, torch and megatron-core's named tensor-parallel RNG states.

    The named states follow ``model_parallel_cuda_manual_seed``: data-parallel state
    ``seed``, tensor-parallel state ``seed + 2718 + tp_rank``. Weights built with
    ``use_cpu_initialization=True`` come from the default generator alone, so they
    are the same for every tensor-parallel size. Call after ``init_distributed``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mp_random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tp_rank = ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    if has_cuda():
        mp_random.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0,
                                                  force_reset_rng=True)
        return
    install_cpu_shims()
    tracker = _cpu_tracker_class()()
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)


def device_rng_state():
    """The accelerator's default generator state (None on the CPU, where torch's own
    generator already covers it)."""
    return torch.cuda.get_rng_state() if has_cuda() else None


def set_device_rng_state(state) -> None:
    if state is not None and has_cuda():
        torch.cuda.set_rng_state(state)


def memory_stats() -> dict:
    """This process's memory for the log: the GPU's allocator when there is one, else peak RSS."""
    mb = 1024.0 * 1024.0
    if has_cuda():
        return {"mem_allocated_mb": torch.cuda.memory_allocated() / mb,
                "mem_max_allocated_mb": torch.cuda.max_memory_allocated() / mb,
                "mem_reserved_mb": torch.cuda.memory_reserved() / mb}
    import resource

    return {"mem_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def memory_capacity_bytes() -> int:
    """What a step may use at most: the GPU's memory, or the machine's on the CPU."""
    if has_cuda():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


class PeakMemory:
    """The peak memory of what runs inside ``with PeakMemory() as peak:`` (``peak.bytes``).

    On a GPU: the caching allocator's peak of allocated bytes. On the CPU, where no
    allocator counts: the bytes of every live tensor when the block starts (parameters,
    gradient buffers, optimizer state: ``live`` given by the caller) plus the tensors kept
    for backward during the block (activations, one count per storage) -- an estimate
    of the same peak that does not depend on the process's other memory."""

    def __init__(self, live_bytes: int = 0) -> None:
        self.live_bytes = int(live_bytes)
        self.bytes = 0
        self._saved: dict = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            self._saved[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def __enter__(self) -> "PeakMemory":
        if has_cuda():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if has_cuda():
            torch.cuda.synchronize()
            self.bytes = int(torch.cuda.max_memory_allocated())
        else:
            self._hooks.__exit__(*exc)
            self.bytes = self.live_bytes + sum(self._saved.values())


def max_over_ranks(value: float) -> float:
    """Collective: the largest ``value`` of all ranks."""
    if world_size() == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory."""
    return isinstance(error, torch.OutOfMemoryError)


def release_cached_memory() -> None:
    if has_cuda():
        torch.cuda.empty_cache()


def fused_optimizer_available() -> bool:
    """Whether torch's fused AdamW applies (parameters on CUDA)."""
    return has_cuda()


def triton_available() -> bool:
    """Whether the fused Triton kernels apply: CUDA in use and triton importable
    (``MEGATRON_EXT_FORCE_CPU=1`` turns them off with the GPU)."""
    return has_cuda() and _triton_importable()


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- process-group questions
# The one place that asks torch.distributed and megatron's parallel state where this
# process stands. Each works in a plain process (a world of one) too.


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_rank0() -> bool:
    return rank() == 0


def _reduce_flag(value: bool, op) -> bool:
    if world_size() == 1:
        return value
    flag = torch.tensor([1 if value else 0], dtype=torch.int32, device=device())
    dist.all_reduce(flag, op=op)
    return bool(flag.item())


def all_agree(ok: bool) -> bool:
    """Collective: True on every rank when ``ok`` is True on every rank."""
    return _reduce_flag(ok, dist.ReduceOp.MIN)


def any_rank(flag: bool) -> bool:
    """Collective: True on every rank when ``flag`` is True on some rank."""
    return _reduce_flag(flag, dist.ReduceOp.MAX)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _parallel_state():
    from megatron.core import parallel_state

    return parallel_state if parallel_state.model_parallel_is_initialized() else None


def tp_size() -> int:
    ps = _parallel_state()
    return ps.get_tensor_model_parallel_world_size() if ps else 1


def tp_rank() -> int:
    ps = _parallel_state()
    return ps.get_tensor_model_parallel_rank() if ps else 0


def dp_size() -> int:
    ps = _parallel_state()
    return ps.get_data_parallel_world_size() if ps else 1


def dp_rank() -> int:
    ps = _parallel_state()
    return ps.get_data_parallel_rank() if ps else 0


def tp_group():
    """megatron's tensor-parallel group (None outside a parallel setup)."""
    ps = _parallel_state()
    return ps.get_tensor_model_parallel_group() if ps else None


def dp_group():
    ps = _parallel_state()
    return ps.get_data_parallel_group() if ps else None


def mp_group():
    """The model-parallel group (TP here: pipeline parallelism is 1)."""
    ps = _parallel_state()
    return ps.get_model_parallel_group() if ps else None
