"""2:4 sparse linears for inference: the weight layout, the kernels, and a measured choice per shape.

This is the one module of the inference package that knows about the device.

* ``SparseLinear`` holds one 2:4 weight ``[out, in]`` and computes ``y = x W^T`` with
  cuSPARSELt's sparse tensor-core GEMM, or with the dense GEMM where that is faster. The
  sparse form is compressed once at load (``torch._cslt_compress``: kept values + 2-bit
  metadata, 0.5625x the bytes of the dense bf16 weight) and multiplied as
  ``C^T = (W_c x^T)^T`` with the fused transpose (``transpose_result=True``), so the
  result comes out ``[tokens, out]`` row-major and no later op copies it.
* ``KernelTable`` says, per (weight shape, token count), which kernel runs and with which
  cuSPARSELt algorithm. It is measured on the GPU (``measure_table``: each candidate timed
  from a CUDA graph of repeated calls, so host overhead does not decide), cached in a JSON
  file keyed by GPU, torch and cuSPARSELt versions, and read by every ``SparseLinear``.
  A token count between measured ones uses the nearest measured count on a log scale.
* On a machine without a CUDA GPU and cuSPARSELt the sparse kernels do not exist:
  ``SparseLinear`` keeps the dense masked weight and ``sparse_kernels_note()`` says so.
* ``pack_2of4`` / ``unpack_2of4``: the compressed layout in plain torch (values + the
  two kept positions of each group of 4 in 4 bits), the portable form of what cuSPARSELt
  stores and the reference the CPU tests check.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_ext.errors import InputError

N, M = 2, 4
# cuSPARSELt's smallest dense operand for 16-bit types: the token rows are padded to a multiple of this.
DENSE_ROW_MULTIPLE = 8
# Token counts the kernel table measures. Decode batches of 2-8 are measured too: the Triton
# kernel that wins at 1 row loses to dense by 4 (0.75-0.81x on an H100), and a count between
# two measured ones takes the nearer on a log scale (4 would tie between 1 and 16 and take 1).
DEFAULT_TOKEN_COUNTS = (1, 2, 4, 8, 16, 128, 512, 4096)
GEMV_MAX_TOKENS = 16            # the Triton decode kernel is offered up to this many token rows
KERNELS = ("dense", "sparse", "gemv")
TABLE_VERSION = 3


class SparseFormatError(InputError):
    """A weight that should be 2:4 is not (the message names it and the first bad group)."""


# --------------------------------------------------------------------------- the 2:4 layout in plain torch


def check_2of4(weight: torch.Tensor, name: str = "weight") -> None:
    """Raise ``SparseFormatError`` unless every group of 4 consecutive inputs keeps at most 2."""
    if weight.dim() != 2 or weight.shape[1] % M:
        raise SparseFormatError(f"{name}: shape {tuple(weight.shape)} is not [out, in] with in a multiple of {M}")
    counts = (weight.reshape(weight.shape[0], -1, M) != 0).sum(-1)
    bad = (counts > N).nonzero()
    if bad.numel():
        row, g = int(bad[0, 0]), int(bad[0, 1])
        raise SparseFormatError(f"{name}: row {row}, inputs {g * M}-{g * M + M - 1} keep {int(counts[row, g])} "
                                f"non-zeros, more than {N} of {M} ({bad.shape[0]} such groups): not a 2:4 weight")


def pack_2of4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2:4 ``weight [out, in]`` -> (``values [out, in/2]``, ``meta [out, in/8]`` uint8).

    Each group of 4 inputs keeps 2 values, in input order, and their positions ``i0 < i1``
    (2 bits each, ``i0 | i1 << 2``); two groups share a byte (the even group in the low 4 bits).
    A group with fewer than 2 non-zeros stores zeros at free positions, as cuSPARSELt does.
    """
    check_2of4(weight)
    out_f, in_f = weight.shape
    if in_f % (2 * M):
        raise SparseFormatError(f"pack_2of4: in={in_f} is not a multiple of {2 * M}")
    groups = weight.reshape(out_f, in_f // M, M)
    nonzero = groups != 0
    # Rank positions: non-zeros first, then zeros, each in input order; keep the first two, sorted.
    order = torch.arange(M, device=weight.device).expand_as(nonzero)
    key = torch.where(nonzero, order, order + M)
    pos = key.topk(N, dim=-1, largest=False).values % M
    pos = pos.sort(-1).values
    values = groups.gather(-1, pos).reshape(out_f, in_f // 2)
    nibble = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)          # [out, in/4]
    meta = nibble[:, 0::2] | (nibble[:, 1::2] << 4)
    return values.contiguous(), meta.contiguous()


def unpack_2of4(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_2of4``: the dense ``[out, in]`` weight."""
    out_f, half = values.shape
    nibble = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(out_f, half // N).long()
    pos = torch.stack([nibble & 3, nibble >> 2], dim=-1)                  # [out, in/4, 2]
    dense = torch.zeros(out_f, half // N, M, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos, values.reshape(out_f, half // N, N))
    return dense.reshape(out_f, half * 2)


# cuSPARSELt's compressed buffer (bf16/fp16, as measured on its 0.8 release): the kept values
# [out, in/2] row-major, then the 4-bit entries of pack_2of4 in tiles of 64 rows x 8 groups
# (meta_nibble_index). Other shapes are padded by cuSPARSELt and not described here.
META_ROW_TILE, META_COL_TILE = 64, 32


def layout_supported(out_f: int, in_f: int) -> bool:
    """Whether ``cusparselt_layout`` / ``meta_nibble_index`` describe this weight shape."""
    return out_f % META_ROW_TILE == 0 and in_f % META_COL_TILE == 0


def meta_nibble_index(rows: torch.Tensor, groups: torch.Tensor, in_f: int) -> torch.Tensor:
    """Where the 4-bit entry of group ``groups`` (inputs ``4g..4g+3``) of row ``rows`` sits
    among the metadata's entries (entry ``e``: byte ``e // 2``, the low 4 bits when even).
    Tiles of 64 rows x 8 groups, row-tile major; in a tile four 16-row sub-tiles of 128
    entries; in a sub-tile 16-entry runs per ``row % 8``, ordered by ``group % 4``, then
    ``group % 8 >= 4``, then ``row % 16 >= 8``."""
    kg = in_f // M
    return (((rows // 64) * (kg // 8) + groups // 8) * 512 + ((rows % 64) // 16) * 128 + (rows % 8) * 16
            + (groups % 4) * 4 + ((groups % 8) // 4) * 2 + (rows % 16) // 8)


def _nibble_positions(out_f: int, in_f: int, device) -> torch.Tensor:
    """``[out, in / 4]``: where each group's metadata nibble sits in cuSPARSELt's buffer."""
    rows = torch.arange(out_f, device=device)[:, None]
    groups = torch.arange(in_f // M, device=device)[None, :]
    return meta_nibble_index(rows, groups, in_f)


def cusparselt_layout(weight: torch.Tensor) -> torch.Tensor:
    """The buffer ``torch._cslt_compress(weight)`` returns, in plain torch (1-D, ``weight``'s
    dtype, 16-bit only): what the Triton decode kernel reads, and the CPU tests' stand-in."""
    if weight.element_size() != 2 or not layout_supported(*weight.shape):
        raise SparseFormatError(f"cusparselt_layout: a 16-bit [out, in] weight with out % {META_ROW_TILE} == 0 "
                                f"and in % {META_COL_TILE} == 0, not {weight.dtype} {tuple(weight.shape)}")
    values, meta = pack_2of4(weight)
    out_f, in_f = weight.shape
    nibble = torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(out_f, in_f // M)
    entries = torch.empty(out_f * in_f // M, dtype=torch.uint8, device=weight.device)
    entries[_nibble_positions(out_f, in_f, weight.device).reshape(-1)] = nibble.reshape(-1)
    meta_bytes = entries[0::2] | (entries[1::2] << 4)
    return torch.cat([values.reshape(-1).view(torch.uint8), meta_bytes]).view(weight.dtype)


def cusparselt_dense(compressed: torch.Tensor, out_f: int, in_f: int) -> torch.Tensor:
    """Inverse of ``cusparselt_layout``: the dense ``[out, in]`` weight."""
    flat = compressed.reshape(-1)
    half = out_f * in_f // 2
    entries_bytes = flat.view(torch.uint8)[2 * half:]
    entries = torch.stack([entries_bytes & 0xF, entries_bytes >> 4], dim=-1).reshape(-1)
    nibble = entries[_nibble_positions(out_f, in_f, flat.device)]           # [out, in/4]
    meta = nibble[:, 0::2] | (nibble[:, 1::2] << 4)
    return unpack_2of4(flat[:half].reshape(out_f, in_f // 2), meta)


def packed_bytes(weight: torch.Tensor) -> int:
    """Bytes of the 2:4 compressed form of ``weight``: half the values plus 2 bits per kept value."""
    return weight.numel() // 2 * weight.element_size() + weight.numel() // 8


# --------------------------------------------------------------------------- availability


def sparse_kernels_available(device: Optional[torch.device] = None) -> bool:
    """cuSPARSELt's 2:4 GEMM: a CUDA GPU of compute capability 8.0 or newer and a torch built with it."""
    if not torch.cuda.is_available() or not torch.backends.cusparselt.is_available():
        return False
    if device is not None and torch.device(device).type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def sparse_kernels_note(device: Optional[torch.device] = None) -> Optional[str]:
    """Why the sparse kernels are not used here, or None where they are."""
    if sparse_kernels_available(device):
        return None
    where = "this machine has no CUDA GPU" if not torch.cuda.is_available() else (
        "this torch build has no cuSPARSELt" if not torch.backends.cusparselt.is_available()
        else "the device is not a CUDA GPU of compute capability 8.0 or newer")
    return (f"2:4 sparse kernels unavailable ({where}): running the dense masked weights "
            "(same results, no speed-up, no memory saving)")


# --------------------------------------------------------------------------- the measured choice


@dataclass
class Choice:
    kernel: str                 # "dense" | "sparse" (cuSPARSELt) | "gemv" (the Triton decode kernel)
    alg_id: int = 0             # cuSPARSELt algorithm (sparse)
    dense_ms: float = math.nan
    sparse_ms: float = math.nan
    gemv_ms: float = math.nan   # the best configuration's; nan where not measured
    gemv_config: int = 0        # index into sparse_gemv.CONFIGS (gemv)

    def runnable(self, measured_tokens: int, tokens: int) -> "Choice":
        """This choice (measured at ``measured_tokens``) as it applies at ``tokens``: the Triton
        kernel only up to ``GEMV_MAX_TOKENS`` rows (cuSPARSELt above), and a searched cuSPARSELt
        algorithm only at the padded size it was found for (its default, 0, elsewhere)."""
        if self.kernel == "gemv" and tokens > GEMV_MAX_TOKENS:
            return replace(self, kernel="sparse", alg_id=0)
        if self.kernel == "sparse" and self.alg_id and _padded(measured_tokens) != _padded(tokens):
            return replace(self, alg_id=0)
        return self

    def best_compressed(self) -> "Choice":
        """The faster kernel of those reading the compressed weight (for a layer without a dense copy)."""
        if self.kernel != "dense":
            return self
        faster = "gemv" if self.gemv_ms == self.gemv_ms and not self.gemv_ms > self.sparse_ms else "sparse"
        return replace(self, kernel=faster)


@dataclass
class KernelTable:
    """Which kernel runs each (out, in, tokens); see the module doc."""
    key: str = ""
    entries: dict = field(default_factory=dict)      # "out,in,tokens" -> Choice

    @staticmethod
    def _k(out_f: int, in_f: int, tokens: int) -> str:
        return f"{out_f},{in_f},{tokens}"

    def set(self, out_f: int, in_f: int, tokens: int, choice: Choice) -> None:
        self.entries[self._k(out_f, in_f, tokens)] = choice

    def token_counts(self, out_f: int, in_f: int) -> list[int]:
        prefix = f"{out_f},{in_f},"
        return sorted(int(k[len(prefix):]) for k in self.entries if k.startswith(prefix))

    def nearest(self, out_f: int, in_f: int, tokens: int) -> Optional[int]:
        """The measured token count nearest ``tokens`` on a log scale (None: shape never measured)."""
        counts = self.token_counts(out_f, in_f)
        if not counts:
            return None
        return min(counts, key=lambda c: (abs(math.log(c) - math.log(max(tokens, 1))), c))

    def choose(self, out_f: int, in_f: int, tokens: int, compressed_only: bool = False) -> Choice:
        """The measured choice for this shape at the nearest measured token count; dense where
        the shape was never measured. A searched algorithm belongs to the problem size it was
        found for: at another padded size the choice carries cuSPARSELt's default (0).
        ``compressed_only``: the faster kernel reading the compressed weight where dense won."""
        best = self.nearest(out_f, in_f, tokens)
        if best is None:
            return Choice("dense")
        c = self.entries[self._k(out_f, in_f, best)]
        return (c.best_compressed() if compressed_only else c).runnable(best, tokens)

    def kernels_for(self, out_f: int, in_f: int) -> set[str]:
        counts = self.token_counts(out_f, in_f)
        return {self.entries[self._k(out_f, in_f, c)].kernel for c in counts} or {"dense"}

    def to_json(self) -> dict:
        def plain(c: Choice) -> dict:      # JSON has no NaN: a kernel not measured is null
            return {f: (None if isinstance(v, float) and v != v else v) for f, v in vars(c).items()}

        return {"version": TABLE_VERSION, "key": self.key, "entries": {k: plain(v) for k, v in self.entries.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "KernelTable":
        if data.get("version") != TABLE_VERSION:
            raise ValueError(f"kernel table version {data.get('version')!r}, expected {TABLE_VERSION}")
        def choice(v: dict) -> Choice:
            return Choice(**{f: (math.nan if x is None else x) for f, x in v.items()})

        return cls(data.get("key", ""), {k: choice(v) for k, v in data["entries"].items()})

    def rows(self) -> list[str]:
        """A Markdown table of the choices."""
        out = ["| W [out, in] | tokens | dense ms | cuSPARSELt ms (alg) | speed-up | Triton gemv ms (config) "
               "| speed-up | runs | best compressed speed-up |",
               "|---|---|---|---|---|---|---|---|---|"]

        def ratio(ms):
            return f"{c.dense_ms / ms:.2f}x" if ms == ms and ms > 0 else ""

        for k in sorted(self.entries, key=lambda s: tuple(int(x) for x in s.split(","))):
            o, i, t = k.split(",")
            c = self.entries[k]
            gemv = f"{c.gemv_ms:.4f} ({c.gemv_config})" if c.gemv_ms == c.gemv_ms else "n/a"
            best = c.best_compressed()
            best_ms = best.gemv_ms if best.kernel == "gemv" else best.sparse_ms
            out.append(f"| {o}x{i} | {t} | {c.dense_ms:.4f} | {c.sparse_ms:.4f} ({c.alg_id}) | {ratio(c.sparse_ms)} "
                       f"| {gemv} | {ratio(c.gemv_ms)} | {c.kernel} | {ratio(best_ms)} |")
        return out


def table_key(device: Optional[torch.device] = None) -> str:
    """What a cached table is valid for: the GPU, torch, CUDA and cuSPARSELt versions."""
    if not torch.cuda.is_available():
        return f"cpu torch {torch.__version__}"
    return (f"{torch.cuda.get_device_name(device)} torch {torch.__version__} cuda {torch.version.cuda} "
            f"cusparselt {torch.backends.cusparselt.version()}")


def default_cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "megatron_ext" / "sparse_kernel_table.json"


def read_table(path: Optional[os.PathLike], key: str) -> KernelTable:
    """The cached table for ``key`` (an empty one if the file is missing, unreadable or for another key)."""
    if path is None:
        return KernelTable(key)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        table = KernelTable.from_json(data.get(key, {"version": TABLE_VERSION, "entries": {}}))
    except (OSError, ValueError, TypeError, KeyError):
        return KernelTable(key)
    table.key = key
    return table


def write_table(path: os.PathLike, table: KernelTable) -> None:
    """Store ``table`` under its key, keeping other keys' tables (atomic replace)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    data[table.key] = table.to_json()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def capture_graph(fn, repeat: int = 1, device: Optional[torch.device] = None) -> tuple:
    """``fn()`` run twice on a side stream (warm-up: lazy initialisation, allocations, kernel
    compilation), then ``repeat`` calls of it captured in one CUDA graph: (the graph, what the
    last captured call returned). Replaying the graph reruns the calls on the same buffers."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            out = fn()
    return graph, out


def streamed_copies(t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` and clones of it spanning at least twice the GPU's L2 cache: timing calls that
    cycle through them reads each weight from memory, as a model's forward does, not from the
    L2 cache where one weight called again and again would sit."""
    l2 = getattr(torch.cuda.get_device_properties(t.device), "L2_cache_size", 0) or 64 * 2**20
    nbytes = t.numel() * t.element_size()
    return [t] + [t.clone() for _ in range(max(1, math.ceil(2 * l2 / nbytes)) - 1)]


def _graph_ms(fn, reps: int = 10, replays: int = 5, args: Optional[Sequence] = None) -> float:
    """GPU milliseconds per call of ``fn()`` (or of ``fn(a)`` cycling through ``args``, at
    least ``reps`` calls): the calls captured in one CUDA graph, the median of ``replays``
    timed replays (host overhead excluded, as in graphed inference). Where capture fails,
    back-to-back eager calls are timed instead."""
    calls = [fn] * reps if args is None else [
        (lambda a=a: fn(a)) for a in (list(args) * reps)[:max(reps, len(args))]]
    def all_calls():
        for call in calls:
            call()
    try:
        graph, _ = capture_graph(all_calls)
        run = graph.replay
    except RuntimeError:
        torch.cuda.synchronize()
        graph = None
        run = all_calls
    run()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    del graph
    return sorted(times)[len(times) // 2]


def gemv_available(device: Optional[torch.device] = None) -> bool:
    """The Triton decode kernel: the sparse kernels' GPU and triton compiled for it."""
    if not sparse_kernels_available(device):
        return False
    from megatron_ext.inference import sparse_gemv
    return sparse_gemv.available() and not sparse_gemv.interpreted()


def gemv(compressed: torch.Tensor, x: torch.Tensor, out_f: int, in_f: int, config: int) -> torch.Tensor:
    from megatron_ext.inference.sparse_gemv import sparse_gemv
    return sparse_gemv(compressed, x, out_f, in_f, config)


def time_gemv_configs(compressed: Sequence[torch.Tensor], x: torch.Tensor, out_f: int, in_f: int) -> list[float]:
    """GPU milliseconds of the Triton decode kernel per tile configuration, cycling through
    the ``compressed`` copies of one weight (``inf`` for a configuration that does not compile
    or launch on this GPU, e.g. too much shared memory)."""
    from megatron_ext.inference.sparse_gemv import CONFIGS

    times = []
    for i in range(len(CONFIGS)):
        try:
            times.append(_graph_ms(lambda wc: gemv(wc, x, out_f, in_f, i), args=compressed))  # noqa: B023
        except Exception:  # noqa: BLE001 - triton's out-of-resources and compile errors have no common base
            torch.cuda.synchronize()
            times.append(math.inf)
    return times


def _fastest(kernels: dict[str, float], margin: float) -> str:
    """Dense unless a compressed kernel beats it by ``margin``; among those, the fastest."""
    fast = min((ms, k) for k, ms in kernels.items() if k != "dense" and ms == ms)
    return fast[1] if kernels["dense"] > fast[0] * margin else "dense"


@torch.no_grad()
def measure_shape(out_f: int, in_f: int, token_counts: Sequence[int], dtype: torch.dtype = torch.bfloat16,
                  device: Optional[torch.device] = None, margin: float = 1.0, log=None) -> dict[int, Choice]:
    """Time the dense GEMM, cuSPARSELt (its best algorithm, searched once per token count) and,
    up to ``GEMV_MAX_TOKENS`` rows, the Triton decode kernel (each of its tile configurations)
    for one shape on random 2:4 data at each of ``token_counts``, each kernel reading its
    weight from memory (``streamed_copies``), as a forward through many layers does. The
    Triton kernel is offered only where the buffer cuSPARSELt wrote equals
    ``cusparselt_layout``'s byte for byte (the layout it reads). A compressed kernel is chosen
    when ``dense_ms > its_ms * margin``. The weight, its copies and the layout check are made
    once for all token counts."""
    device = device or torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(out_f * 31 + in_f)
    w = torch.randn(out_f, in_f, device=device, dtype=dtype, generator=gen)
    w = w * magnitude_2of4_mask(w)
    wds = streamed_copies(w)
    wc = torch._cslt_compress(w)
    wcs = streamed_copies(wc)
    offer_gemv = (any(t <= GEMV_MAX_TOKENS for t in token_counts) and layout_supported(out_f, in_f)
                  and w.element_size() == 2 and gemv_available(device))
    if offer_gemv and not torch.equal(wc.reshape(-1).view(torch.uint8), cusparselt_layout(w).view(torch.uint8)):
        offer_gemv = False
        if log:
            log(f"kernel table: W {out_f}x{in_f}: cuSPARSELt's buffer is not the layout the Triton kernel reads; "
                "not offering it")
    choices = {}
    for tokens in token_counts:
        x = torch.randn(tokens, in_f, device=device, dtype=dtype, generator=gen)
        dense_ms = _graph_ms(lambda wk: F.linear(x, wk), args=wds)  # noqa: B023 - called at once
        xp = pad_rows(x)
        alg = int(torch._cslt_sparse_mm_search(wc, xp.t(), transpose_result=True))
        sparse_ms = _graph_ms(lambda c: torch._cslt_sparse_mm(c, xp.t(), transpose_result=True, alg_id=alg),  # noqa: B023
                              args=wcs)
        gemv_ms, config = math.nan, 0
        if offer_gemv and tokens <= GEMV_MAX_TOKENS:
            times = time_gemv_configs(wcs, x, out_f, in_f)
            config = min(range(len(times)), key=times.__getitem__)
            gemv_ms = times[config] if times[config] < math.inf else math.nan
        kernel = _fastest({"dense": dense_ms, "sparse": sparse_ms, "gemv": gemv_ms}, margin)
        choices[tokens] = Choice(kernel, alg, dense_ms, sparse_ms, gemv_ms, config)
    return choices


def measure_table(shapes: Iterable[tuple[int, int]], token_counts: Sequence[int] = DEFAULT_TOKEN_COUNTS,
                  dtype: torch.dtype = torch.bfloat16, cache: Optional[os.PathLike] = None,
                  device: Optional[torch.device] = None, log=None) -> KernelTable:
    """The table for ``shapes`` x ``token_counts``: what ``cache`` holds for this GPU and
    versions, plus measurements of whatever it lacks (written back to ``cache``)."""
    key = table_key(device) + f" {str(dtype).replace('torch.', '')}"
    table = read_table(cache, key)
    missing = {}  # shape -> its token counts not in the table
    for o, i in dict.fromkeys(shapes):
        counts = [t for t in token_counts if KernelTable._k(o, i, t) not in table.entries]
        if counts:
            missing[(o, i)] = counts
    for (o, i), counts in missing.items():
        for t, choice in measure_shape(o, i, counts, dtype, device, log=log).items():
            table.set(o, i, t, choice)
            if log:
                log(f"kernel table: W {o}x{i}, {t} tokens: dense {choice.dense_ms:.4f} ms, sparse "
                    f"{choice.sparse_ms:.4f} ms (alg {choice.alg_id}), Triton gemv {choice.gemv_ms:.4f} ms "
                    f"(config {choice.gemv_config}) -> {choice.kernel}")
    if missing and cache is not None:
        try:
            write_table(cache, table)
        except OSError as e:
            if log:
                log(f"kernel table: not cached ({e})")
    return table


def magnitude_2of4_mask(w: torch.Tensor) -> torch.Tensor:
    """The 2:4 mask keeping the 2 largest magnitudes of every group of 4 inputs."""
    groups = w.reshape(w.shape[0], -1, M)
    idx = groups.abs().topk(N, dim=-1).indices
    return torch.zeros_like(groups).scatter_(-1, idx, 1).reshape(w.shape)


def _padded(tokens: int) -> int:
    return -(-max(tokens, 1) // DENSE_ROW_MULTIPLE) * DENSE_ROW_MULTIPLE


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [tokens, in]`` with zero rows appended up to a multiple of ``DENSE_ROW_MULTIPLE``."""
    extra = (-x.shape[0]) % DENSE_ROW_MULTIPLE
    return F.pad(x, (0, 0, 0, extra)) if extra else x


# --------------------------------------------------------------------------- the layer


class SparseLinear(torch.nn.Module):
    """``y = x W^T`` for a 2:4 ``W [out, in]`` (no bias), through the kernel the table picks.

    Holds the cuSPARSELt-compressed weight where the table ever picks a kernel that reads it
    (cuSPARSELt's or the Triton decode kernel) for this shape, and the dense weight only where
    it ever picks dense (``keep_dense=False`` drops the dense copy and runs the faster
    compressed kernel at every token count instead, for the memory bound).
    """

    def __init__(self, weight: torch.Tensor, table: Optional[KernelTable] = None, *, name: str = "weight",
                 keep_dense: bool = True, check: bool = True):
        super().__init__()
        if check:
            check_2of4(weight, name)
        self.out_features, self.in_features = weight.shape
        self.name = name
        self.table = table
        use_sparse = table is not None and sparse_kernels_available(weight.device)
        kernels = table.kernels_for(self.out_features, self.in_features) if use_sparse else {"dense"}
        reads_compressed = bool(kernels & {"sparse", "gemv"})
        if reads_compressed and not keep_dense:
            kernels = kernels - {"dense"}
        self.compressed = torch._cslt_compress(weight.contiguous()) if reads_compressed else None
        self.weight = weight if "dense" in kernels else None

    def choice(self, tokens: int) -> Choice:
        if self.compressed is None:
            return Choice("dense")
        return self.table.choose(self.out_features, self.in_features, tokens, compressed_only=self.weight is None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        tokens = x2.shape[0]
        c = self.choice(tokens)
        if c.kernel == "dense":
            y = F.linear(x2, self.weight)
        elif c.kernel == "gemv":
            y = gemv(self.compressed, x2, self.out_features, self.in_features, c.gemv_config)
        else:
            y = torch._cslt_sparse_mm(self.compressed, pad_rows(x2).t(), transpose_result=True, alg_id=c.alg_id)
            if y.shape[0] != tokens:
                y = y[:tokens]
        return y.reshape(*lead, self.out_features)

    def weight_bytes(self) -> int:
        """Bytes this layer holds on its device (compressed and/or dense weight)."""
        return sum(t.numel() * t.element_size() for t in (self.compressed, self.weight) if t is not None)

    def dense_weight(self) -> torch.Tensor:
        """The dense 2:4 weight (decompressed with an identity GEMM where only the sparse form is kept)."""
        if self.weight is not None:
            return self.weight
        eye = torch.eye(self.in_features, dtype=self.compressed.dtype, device=self.compressed.device)
        return torch._cslt_sparse_mm(self.compressed, eye)

    def extra_repr(self) -> str:
        kinds = [k for k, t in (("compressed", self.compressed), ("dense", self.weight)) if t is not None]
        return f"in={self.in_features}, out={self.out_features}, holds={'+'.join(kinds)}"
