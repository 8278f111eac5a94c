"""One-shot N:M pruning of megatron-core LLaMA models: magnitude, Wanda, SparseGPT.

For every masked linear (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2``
of each decoder layer) and every group of ``M`` consecutive weights along the input
dimension, the ``N`` weights with the largest score are kept:

``magnitude``  score ``|W_ij|``.
``wanda``      score ``|W_ij| * ||X_j||_2`` with ``X_j`` the j-th input feature over all
               calibration tokens (Sun et al., 2023).
``sparsegpt``  OBS saliency ``W_ij^2 / [U]_jj^2`` where ``U`` is the upper Cholesky factor
               of ``H^-1``, ``H = X^T X / tokens + damp * I`` (Frantar & Alistarh, 2023).
               Columns are visited in blocks of ``blocksize``; after each column the
               pruning error is spread over the columns not yet visited (OBS update), and
               groups are chosen on the already updated weights. The mask is always the
               one this procedure selects; ``update_weight`` decides whether the pruned
               model keeps the compensated weights or the original ones times the mask.

Calibration is sequential, as in the SparseGPT and Wanda reference code: the inputs of
decoder layer 0 are captured once for every calibration sequence; then, layer by layer,
forward hooks collect the statistics of the layer's four linears on the current inputs,
the four are pruned, and the layer is run again (now pruned) to produce the next
layer's inputs. So layer ``i`` is calibrated on the outputs of the already pruned layers
``< i``. ``sequential=False`` feeds the dense outputs forward instead (one forward pass
per layer, every layer calibrated on the dense model's activations).

Tensor and data parallelism:

* All ranks of a tensor-parallel group run the same calibration sequences; sequences are
  dealt round-robin to the data-parallel groups and the statistics (sums over tokens,
  accumulated in float64 per sequence) are all-reduced over the data-parallel group.
* Column-parallel layers (qkv, fc1) see the full input on every rank: statistics are
  complete locally and rows are pruned independently, exactly as at TP=1.
* Row-parallel layers (proj, fc2) see their own slice of the input features. Wanda's
  ``||X_j||`` of the local features is exactly the local slice of the full one, and
  magnitude needs nothing, so both give the TP=1 masks at any TP.
* SparseGPT couples all input columns of a row through ``H``. With
  ``row_hessian="full"`` (default) it is done exactly: the input slices are all-gathered
  so every rank accumulates its row block of the full ``H`` (``X_local^T X_full``), the
  blocks and the weight columns are all-gathered, each rank runs SparseGPT on ``1/tp``
  of the output rows with the full ``H``, and the rows are all-gathered back; each rank
  keeps its own columns. ``row_hessian="local"`` instead prunes each rank's slice with
  the diagonal block ``H_local = X_local^T X_local`` (no communication, cheaper, but the
  OBS update then ignores the correlation with the other ranks' features: an
  approximation that changes the result with TP).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import RowParallelLinear

from megatron_ext.checkpoint import HARD_MASK_SUFFIX
from megatron_ext.errors import InputError
from megatron_ext import platform
from megatron_ext.models.spec import DEFAULT_LINEARS, LINEAR_PATHS
from megatron_ext.sparsity import nm

METHODS = ("magnitude", "wanda", "sparsegpt")
MASKED_LINEARS = tuple(LINEAR_PATHS.values())   # module paths in a layer
ROW_PARALLEL = tuple(LINEAR_PATHS[s] for s, cls in DEFAULT_LINEARS.items() if cls is RowParallelLinear)


class OneShotError(InputError):
    """Bad input for one-shot pruning (flag, file, shapes); the message names it."""


# --------------------------------------------------------------------------- masks


def check_nm_args(N: int, M: int) -> None:
    """``OneShotError`` unless ``0 < N < M`` are integers."""
    try:
        nm.check_nm_args(N, M)
    except ValueError as e:
        raise OneShotError(f"--N/--M: {e}") from None


def _groups(t: torch.Tensor, M: int, what: str = "weight") -> torch.Tensor:
    if t.dim() != 2:
        raise OneShotError(f"{what}: expected a 2-D [out, in] tensor, got shape {tuple(t.shape)}")
    if t.shape[1] % M:
        raise OneShotError(f"{what}: input dimension {t.shape[1]} is not a multiple of M={M}")
    return nm.group_view(t, M)


def topn_mask(scores: torch.Tensor, N: int, M: int) -> torch.Tensor:
    """Bool mask ``[out, in]`` keeping the ``N`` largest scores of each group of ``M``
    consecutive inputs. Ties go to the lower index (stable sort), so the choice does not
    depend on how the matrix is sharded."""
    check_nm_args(N, M)
    _groups(scores, M, "scores")
    return nm.topn_mask(scores, N, M)


def magnitude_mask(weight: torch.Tensor, N: int, M: int) -> torch.Tensor:
    """Keep the ``N`` largest ``|W|`` of every group of ``M`` along the input dimension."""
    return topn_mask(weight.detach().float().abs(), N, M)


def wanda_mask(weight: torch.Tensor, input_sq_sum: torch.Tensor, N: int, M: int) -> torch.Tensor:
    """Wanda: keep the ``N`` largest ``|W_ij| * ||X_j||_2`` of every group.

    ``input_sq_sum[j]`` is the sum over calibration tokens of ``x_j^2`` (any positive
    scaling of it gives the same mask).
    """
    if input_sq_sum.shape != (weight.shape[1],):
        raise OneShotError(f"input norms have shape {tuple(input_sq_sum.shape)}, expected ({weight.shape[1]},)")
    norms = input_sq_sum.to(torch.float64).clamp_min(0).sqrt()
    return topn_mask(weight.detach().to(torch.float64).abs() * norms[None, :], N, M)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, N: int, M: int, *, blocksize: int = 128,
                    percdamp: float = 0.01, what: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT N:M pruning of one ``[out, in]`` weight with the input Hessian ``[in, in]``.

    Returns ``(mask, updated)``: the bool keep-mask and the OBS-compensated float32
    weight (zero outside the mask). ``H`` may be any positive multiple of ``X^T X``.
    """
    check_nm_args(N, M)
    if blocksize < M or blocksize % M:
        raise OneShotError(f"--blocksize {blocksize} must be a positive multiple of M={M}")
    if not 0 <= percdamp:
        raise OneShotError(f"--percdamp must be >= 0, got {percdamp}")
    rows, cols = weight.shape
    _groups(weight, M, what)
    if hessian.shape != (cols, cols):
        raise OneShotError(f"{what}: Hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = percdamp * torch.diagonal(H).mean()
    H.diagonal().add_(damp)
    try:
        L = torch.linalg.cholesky(H)
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError:
        raise OneShotError(f"{what}: the damped Hessian is not positive definite "
                           f"(raise --percdamp, now {percdamp})") from None
    U = U.to(torch.float32)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        W1 = W[:, b0:b1].clone()
        U1 = U[b0:b1, b0:b1]
        d = torch.diagonal(U1)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        for i in range(b1 - b0):
            if i % M == 0:
                saliency = W1[:, i:i + M] ** 2 / d[i:i + M][None, :] ** 2
                mask[:, b0 + i:b0 + i + M] = topn_mask(saliency, N, M)
            w = W1[:, i]
            q = torch.where(mask[:, b0 + i], w, torch.zeros_like(w))
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Q1[:, i] = q
            Err1[:, i] = err
        W[:, b0:b1] = Q1
        W[:, b1:] -= Err1 @ U[b0:b1, b1:]
    return mask, W


# --------------------------------------------------------------------------- calibration data


def _tokens_from_dataset(prefix: str, num: int, seq_length: int, rng: np.random.Generator) -> np.ndarray:
    from megatron_ext.data.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    lengths = ds.sequence_lengths.astype(np.int64)
    total = int(lengths.sum())
    if total < seq_length:
        raise OneShotError(f"--calib-data {prefix}: {total} tokens, fewer than one window of --seq-length {seq_length}")
    ends = np.cumsum(lengths)
    out = np.empty((num, seq_length), dtype=np.int64)
    # The dataset is read as one stream of its sequences in order; windows start uniformly.
    for k, start in enumerate(rng.integers(0, total - seq_length + 1, size=num)):
        i = int(np.searchsorted(ends, start, side="right"))
        offset = int(start - (ends[i] - lengths[i]))
        filled = 0
        while filled < seq_length:
            take = min(int(lengths[i]) - offset, seq_length - filled)
            out[k, filled:filled + take] = ds.get(i, offset, take)
            filled += take
            i, offset = i + 1, 0
    return out


def _tokens_from_text(path: Path, tokenizer, num: int, seq_length: int, rng: np.random.Generator) -> np.ndarray:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise OneShotError(f"--calib-data {path}: not UTF-8 text ({e})") from None
    if tokenizer is None:
        raise OneShotError(f"--calib-data {path}: a text file needs the checkpoint's tokenizer, and none was found")
    tokens = np.asarray(tokenizer.tokenize(text), dtype=np.int64)
    if len(tokens) < seq_length:
        raise OneShotError(f"--calib-data {path}: {len(tokens)} tokens, fewer than one window of "
                           f"--seq-length {seq_length}")
    starts = rng.integers(0, len(tokens) - seq_length + 1, size=num)
    return np.stack([tokens[s:s + seq_length] for s in starts])


def calibration_windows(source: str | os.PathLike, num_samples: int, seq_length: int, *, seed: int = 0,
                        tokenizer=None, vocab_size: Optional[int] = None) -> np.ndarray:
    """``[num_samples, seq_length]`` int64 token windows at seeded random positions.

    ``source`` is a Megatron ``.bin/.idx`` prefix (read as one stream of its sequences)
    or a UTF-8 text file tokenized whole with ``tokenizer``.
    """
    from megatron_ext.data.indexed_dataset import IndexedDataset

    if num_samples < 1:
        raise OneShotError(f"--hessian-samples must be >= 1, got {num_samples}")
    if seq_length < 1:
        raise OneShotError(f"--seq-length must be >= 1, got {seq_length}")
    src = os.fspath(source)
    prefix = src[:-4] if src.endswith((".bin", ".idx")) else src
    rng = np.random.default_rng(seed)
    if IndexedDataset.exists(prefix):
        windows = _tokens_from_dataset(prefix, num_samples, seq_length, rng)
    elif Path(src).is_file():
        windows = _tokens_from_text(Path(src), tokenizer, num_samples, seq_length, rng)
    else:
        raise OneShotError(f"--calib-data {src}: neither a text file nor a .bin/.idx dataset prefix")
    if vocab_size is not None and windows.size and int(windows.max()) >= vocab_size:
        raise OneShotError(f"--calib-data {src}: token id {int(windows.max())} is outside the model's "
                           f"vocabulary of {vocab_size} (tokenized with another tokenizer?)")
    return windows


# --------------------------------------------------------------------------- statistics


def _tp():
    return platform.tp_size(), platform.tp_rank(), platform.tp_group()


def _dp():
    return platform.dp_size(), platform.dp_rank(), platform.dp_group()


def _all_gather(t: torch.Tensor, group, size: int, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


@dataclass
class InputStats:
    """Sums over calibration tokens of one linear's (local) input features."""
    sq_sum: Optional[torch.Tensor] = None    # [in_local] float64, for Wanda
    hessian: Optional[torch.Tensor] = None   # [in_local, in_cols] float64, sum of x x^T rows
    tokens: int = 0


class _Collector:
    """Forward pre-hook accumulating ``InputStats`` for one linear."""

    def __init__(self, need: str, gather_row_hessian: bool):
        self.need = need  # "norms" | "hessian"
        self.gather = gather_row_hessian
        self.stats = InputStats()

    def __call__(self, module, args, kwargs):
        x = args[0] if args else kwargs["input_"]
        x = x.detach().reshape(-1, x.shape[-1]).float()
        s = self.stats
        s.tokens += x.shape[0]
        if self.need == "norms":
            part = x.double().pow(2).sum(0)
            s.sq_sum = part if s.sq_sum is None else s.sq_sum.add_(part)
            return None
        if self.gather:
            tp, _, group = _tp()
            full = _all_gather(x, group, tp, dim=1)
            part = (x.t() @ full).double()
        else:
            part = (x.t() @ x).double()
        s.hessian = part if s.hessian is None else s.hessian.add_(part)
        return None


def _reduce_dp(stats: InputStats) -> InputStats:
    dp, _, group = _dp()
    tensors = [t for t in (stats.sq_sum, stats.hessian) if t is not None]
    if dp > 1:
        count = torch.tensor([float(stats.tokens)], dtype=torch.float64, device=tensors[0].device)
        dist.all_reduce(count, group=group)
        for t in tensors:
            dist.all_reduce(t, group=group)
        stats.tokens = int(count.item())
    return stats


# --------------------------------------------------------------------------- pruning a model


@dataclass
class PruneOptions:
    method: str
    N: int = 2
    M: int = 4
    update_weight: bool = False
    blocksize: int = 128
    percdamp: float = 0.01
    row_hessian: str = "full"   # "full" | "local" (SparseGPT under TP, row-parallel layers)
    sequential: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise OneShotError(f"--method {self.method!r}: expected one of {', '.join(METHODS)}")
        check_nm_args(self.N, self.M)
        if self.row_hessian not in ("full", "local"):
            raise OneShotError(f"--row-hessian {self.row_hessian!r}: expected 'full' or 'local'")
        if self.update_weight and self.method != "sparsegpt":
            raise OneShotError("--update-weight applies to --method sparsegpt only")
        if self.method == "sparsegpt" and (self.blocksize < self.M or self.blocksize % self.M):
            raise OneShotError(f"--blocksize {self.blocksize} must be a positive multiple of M={self.M}")


def masked_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(state-dict prefix, module)`` of every masked linear, in layer order."""
    out = []
    for i, layer in enumerate(model.decoder.layers):
        for name in MASKED_LINEARS:
            module = layer.get_submodule(name)
            out.append((f"decoder.layers.{i}.{name}", module))
    return out


def _is_row(prefix: str) -> bool:
    return prefix.endswith(ROW_PARALLEL)


@torch.no_grad()
def _prune_linear(prefix: str, module: torch.nn.Module, opts: PruneOptions,
                  stats: Optional[InputStats]) -> torch.Tensor:
    W = module.weight
    N, M = opts.N, opts.M
    if W.shape[1] % M:
        raise OneShotError(f"{prefix}.weight: local input dimension {W.shape[1]} is not a multiple of M={M}")
    if opts.method == "magnitude":
        mask = magnitude_mask(W, N, M)
    elif opts.method == "wanda":
        mask = wanda_mask(W, stats.sq_sum, N, M)
    else:
        tp, tp_rank, group = _tp()
        H = stats.hessian / max(stats.tokens, 1)
        if _is_row(prefix) and tp > 1 and opts.row_hessian == "full":
            H = _all_gather(H, group, tp, dim=0)
            W_full = _all_gather(W.detach().float(), group, tp, dim=1)
            rows = W_full.shape[0]
            if rows % tp:
                raise OneShotError(f"{prefix}: {rows} output rows do not split over TP={tp}")
            mine = W_full.chunk(tp, dim=0)[tp_rank]
            m_rows, w_rows = sparsegpt_prune(mine, H, N, M, blocksize=opts.blocksize, percdamp=opts.percdamp,
                                             what=f"{prefix}.weight")
            cols = W.shape[1]
            local = slice(tp_rank * cols, (tp_rank + 1) * cols)
            mask = _all_gather(m_rows.to(torch.uint8), group, tp, dim=0)[:, local].bool()
            updated = _all_gather(w_rows, group, tp, dim=0)[:, local]
        else:
            mask, updated = sparsegpt_prune(W, H, N, M, blocksize=opts.blocksize, percdamp=opts.percdamp,
                                            what=f"{prefix}.weight")
        if opts.update_weight:
            W.copy_(updated.to(W.dtype) * mask)
            return mask
    W.mul_(mask.to(W.dtype))
    return mask


class _StopForward(Exception):
    pass


@torch.no_grad()
def _capture_layer0_inputs(model: torch.nn.Module, windows: np.ndarray, device) -> list[tuple[torch.Tensor, dict]]:
    """Run the embedding part of the model on each window; return layer 0's inputs."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(module, args, kwargs):
        kw = dict(kwargs)
        hidden = kw.pop("hidden_states") if "hidden_states" in kw else args[0]
        captured.append((hidden.detach().clone(), kw))
        raise _StopForward

    handle = model.decoder.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for row in windows:
            tokens = torch.from_numpy(np.ascontiguousarray(row)).to(device)[None]
            position_ids = torch.arange(tokens.shape[1], device=device)[None]
            try:
                model(tokens, position_ids, None)
            except _StopForward:
                pass
            else:
                raise RuntimeError("decoder layer 0 was not reached while capturing calibration inputs")
    finally:
        handle.remove()
    return captured


def prune_model(model: torch.nn.Module, opts: PruneOptions, windows: Optional[np.ndarray] = None, *,
                log: Optional[Callable[[str], None]] = None) -> dict[str, torch.Tensor]:
    """Prune ``model`` (this rank's shard) in place; return ``{layer prefix: bool mask}``.

    ``windows`` (``[n, seq]`` token ids, the same on every rank) calibrates Wanda and
    SparseGPT; each data-parallel group takes every ``dp``-th window. Needs megatron's
    parallel state. Masks are this rank's ``[out_local, in_local]`` slices.
    """
    from megatron_ext import platform

    opts.validate()
    log = log or (lambda msg: None)
    model.eval()
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        if opts.method == "magnitude":
            for prefix, module in masked_linears(model):
                masks[prefix] = _prune_linear(prefix, module, opts, None).cpu()
            return masks
    if windows is None or len(windows) == 0:
        raise OneShotError(f"--method {opts.method} needs calibration data (--calib-data)")
    dp, dp_rank, _ = _dp()
    tp = _tp()[0]
    mine = windows[dp_rank::dp]
    device = platform.device()
    inputs = _capture_layer0_inputs(model, mine, device)
    need = "norms" if opts.method == "wanda" else "hessian"
    for i, layer in enumerate(model.decoder.layers):
        t0 = time.perf_counter()
        linears = [(f"decoder.layers.{i}.{name}", layer.get_submodule(name)) for name in MASKED_LINEARS]
        collectors = []
        handles = []
        for prefix, module in linears:
            gather = need == "hessian" and _is_row(prefix) and tp > 1 and opts.row_hessian == "full"
            c = _Collector(need, gather)
            collectors.append(c)
            handles.append(module.register_forward_pre_hook(c, with_kwargs=True))
        try:
            with torch.no_grad():
                outputs = [layer(hidden_states=h, **kw)[0] for h, kw in inputs]
        finally:
            for h in handles:
                h.remove()
        for (prefix, module), c in zip(linears, collectors):
            stats = c.stats
            if stats.tokens == 0:  # this data-parallel group got no window: contribute zeros
                stats = _empty_stats(module, need, c.gather, device)
            masks[prefix] = _prune_linear(prefix, module, opts, _reduce_dp(stats)).cpu()
        if opts.sequential:
            with torch.no_grad():
                outputs = [layer(hidden_states=h, **kw)[0] for h, kw in inputs]
        inputs = [(out, kw) for out, (_, kw) in zip(outputs, inputs)]
        log(f"layer {i}: {opts.method} {opts.N}:{opts.M} in {time.perf_counter() - t0:.1f}s")
    return masks


def _empty_stats(module: torch.nn.Module, need: str, gather: bool, device) -> InputStats:
    cols = module.weight.shape[1]
    if need == "norms":
        return InputStats(sq_sum=torch.zeros(cols, dtype=torch.float64, device=device))
    full = cols * _tp()[0] if gather else cols
    return InputStats(hessian=torch.zeros(cols, full, dtype=torch.float64, device=device))


# --------------------------------------------------------------------------- checkpoints


@dataclass
class PruneResult:
    save: Optional[Path]
    masks: dict[str, torch.Tensor]          # this rank's masks
    state_dict: dict[str, torch.Tensor]     # this rank's pruned weights + hard_mask entries
    seconds: float
    info: dict = field(default_factory=dict)


def _gather_rank_state_dicts(sd: dict[str, torch.Tensor]) -> Optional[list[dict[str, torch.Tensor]]]:
    """Every TP rank's state dict on the first rank of the first TP group (None elsewhere).

    Only data-parallel rank 0 takes part; tensors travel one at a time.
    """
    from megatron.core import parallel_state as ps

    tp, tp_rank, group = _tp()
    if tp == 1:
        return [sd] if ps.get_data_parallel_rank() == 0 else None
    if ps.get_data_parallel_rank() != 0:
        return None
    from megatron_ext import platform

    dst = ps.get_tensor_model_parallel_src_rank()
    out: Optional[list[dict[str, torch.Tensor]]] = [{} for _ in range(tp)] if tp_rank == 0 else None
    for key in sorted(sd):
        t = sd[key]
        send = (t.to(torch.uint8) if t.dtype == torch.bool else t).to(platform.device()).contiguous()
        parts = [torch.empty_like(send) for _ in range(tp)] if tp_rank == 0 else None
        dist.gather(send, parts, dst=dst, group=group)
        if out is not None:
            for r in range(tp):
                p = parts[r].cpu()
                out[r][key] = p.bool() if t.dtype == torch.bool else p
    return out


def prune_checkpoint(load: str | os.PathLike, save: Optional[str | os.PathLike], opts: PruneOptions, *,
                     calib_data: Optional[str | os.PathLike] = None, num_samples: int = 128,
                     seq_length: int = 2048, seed: int = 1234, params_dtype: str = "fp32",
                     save_dtype: Optional[str] = None, tokenizer_type: Optional[str] = None,
                     overwrite: bool = False, log: Optional[Callable[[str], None]] = None) -> PruneResult:
    """Load ``load`` (our checkpoint or a Hugging Face directory) at the current TP, prune it
    and save our checkpoint with the pruned weights and ``<layer>.hard_mask`` entries.

    Needs megatron's parallel state (``platform.init_distributed(tp)``); collective over
    all ranks. Sparsity entries already in the source are ignored.
    """

    from megatron_ext.models.build import build_model
    from megatron_ext.checkpoint import (iteration_dir_name, load_into_model, model_state_dict,
                                                save_checkpoint)
    from megatron_ext.checkpoint import parse_dtype, strip_masks
    from megatron_ext.checkpoint.io import build_tokenizer_for, load_for_rank

    t0 = time.perf_counter()
    opts.validate()
    if opts.method != "magnitude" and calib_data is None:
        raise OneShotError(f"--method {opts.method} needs --calib-data")
    if save is not None and Path(save).exists() and not Path(save).is_dir():
        raise OneShotError(f"--save {save}: exists and is not a directory")
    if save is not None and not overwrite and (Path(save) / iteration_dir_name(0)).exists():
        raise OneShotError(f"--save {save}: already holds {iteration_dir_name(0)} (pass --overwrite to replace it)")
    tp, tp_rank, _ = _tp()
    loaded = load_for_rank(load, tp, tp_rank, tokenizer_type)
    cfg = loaded.config
    windows = None
    if opts.method != "magnitude":
        src = os.fspath(calib_data)
        tokenizer = None
        if Path(src).is_file() and not src.endswith((".bin", ".idx")):
            tokenizer = build_tokenizer_for(loaded, os.fspath(load))
        windows = calibration_windows(src, num_samples, seq_length, seed=seed, tokenizer=tokenizer,
                                      vocab_size=cfg.vocab_size)
    model = build_model(cfg, parse_dtype(params_dtype))
    load_into_model(model, strip_masks(loaded.state_dict))
    tok_dir, tok_type = loaded.tokenizer_dir, loaded.tokenizer_type
    del loaded
    masks = prune_model(model, opts, windows, log=log)
    sd = model_state_dict(model)
    for prefix, mask in masks.items():
        sd[prefix + HARD_MASK_SUFFIX] = mask.to(torch.bool)
    info = {"sparsity": {"method": opts.method, "N": opts.N, "M": opts.M, "update_weight": opts.update_weight,
                         "calib_data": os.fspath(calib_data) if windows is not None else None,
                         "hessian_samples": num_samples if windows is not None else 0,
                         "seq_length": seq_length if windows is not None else 0, "seed": seed,
                         "sequential": opts.sequential, "row_hessian": opts.row_hessian,
                         "source": os.fspath(load), "pruned_at_tp": tp}}
    gathered = _gather_rank_state_dicts(sd) if save is not None else None
    if gathered is not None and dist.get_rank() == 0:
        save_checkpoint(save, gathered, cfg, dtype=save_dtype, tokenizer_dir=tok_dir, tokenizer_type=tok_type,
                        extra_info=info, overwrite=overwrite)
    if save is not None and dist.get_world_size() > 1:
        dist.barrier()
    return PruneResult(Path(save) if save is not None else None, masks, sd, time.perf_counter() - t0, info)
