"""Perplexity and next-token accuracy of a checkpoint on text files or tokenized datasets
(``tools/eval_ppl.py``, ``tools/evaluate.py``).

The math is ``megatron_ext.models.perplexity``'s; this module reads the checkpoint
(ours at any TP, or a Hugging Face directory) and builds the dense model once
(``load_model``; for ``--sparse`` the masks are applied through a function the caller
passes, the sparsity layer's ``bake_masks``), then scores one set at a time
(``evaluate_set``). ``evaluate`` does both for a single set. ``run_tool`` is what the two
tools share around the work: the process group, error reporting, tear-down.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from megatron_ext import platform
from megatron_ext.checkpoint import (CONFIG_NAME, has_masks, load_for_rank, load_into_model, parse_dtype,
                                     read_checkpoint_info, strip_masks)
from megatron_ext.checkpoint.io import build_tokenizer_for
from megatron_ext.models.config import LlamaConfig
from megatron_ext.models.perplexity import (PerplexityError, PerplexityResult, dataset_tokens, evaluate_windows,
                                            make_windows, text_tokens)

__all__ = ["EvalModel", "PerplexityError", "PerplexityResult", "check_eval_source", "evaluate", "evaluate_set",
           "load_model", "run_tool"]

MaskFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class EvalModel:
    """A checkpoint loaded for evaluation: this TP rank's model and what scoring needs."""
    path: Path
    model: torch.nn.Module
    config: LlamaConfig
    tokenizer_type: str | None
    tokenizer_dir: Path | None
    _tokenizer: object = None

    def tokenizer(self):
        """The tokenizer that comes with the checkpoint (built on first use: a tokenized
        dataset needs none)."""
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer_for(self, str(self.path))
        return self._tokenizer


def check_eval_source(text_file: str | os.PathLike | None = None,
                      data_path: str | os.PathLike | None = None) -> None:
    """Cheap checks of one set before any weight is read: exactly one source, and its files exist."""
    if (text_file is None) == (data_path is None):
        raise PerplexityError("give exactly one of --text-file and --data-path")
    if text_file is not None and not Path(text_file).is_file():
        raise PerplexityError(f"{text_file}: text file not found")
    if data_path is not None:
        missing = [f"{data_path}{ext}" for ext in (".bin", ".idx") if not Path(f"{data_path}{ext}").is_file()]
        if missing:
            raise PerplexityError(f"{data_path}: tokenized dataset not found (missing {', '.join(missing)})")


def load_model(load: str | os.PathLike, *, params_dtype: str | torch.dtype = "fp32", sparse: bool = False,
               tokenizer_type: str | None = None, apply_masks: MaskFn | None = None) -> EvalModel:
    """Read the checkpoint ``load`` (resharded to the current TP size) and build its model.

    Needs megatron's parallel state (``platform.init_distributed(tp)``). A dense model
    ignores any mask tensors; ``sparse=True`` needs a checkpoint with masks and
    ``apply_masks``, which maps this rank's state dict to dense weights with the hard
    masks applied (the sparsity layer's, passed in by the caller: this layer does not
    import it).
    """
    from megatron_ext.models.build import build_model

    path = Path(load)
    if not path.exists():
        raise PerplexityError(f"{path}: checkpoint not found")
    if not (path / CONFIG_NAME).is_file():
        read_checkpoint_info(path)  # validates the layout, names what is wrong
    loaded = load_for_rank(path, platform.tp_size(), platform.tp_rank(), tokenizer_type)
    if sparse:
        if not has_masks(loaded.state_dict):
            raise PerplexityError(f"{path}: checkpoint has no masks "
                                  "(--sparse needs a checkpoint saved with sparsity masks)")
        if apply_masks is None:
            raise PerplexityError("sparse evaluation needs a function applying the hard masks")
        state_dict = strip_masks(apply_masks(loaded.state_dict))
    else:
        state_dict = strip_masks(loaded.state_dict)
    cfg = loaded.config
    # every parameter is overwritten by the checkpoint: skip the random initialisation
    model = build_model(cfg, parse_dtype(params_dtype), config_overrides={"perform_initialization": False})
    load_into_model(model, state_dict)
    result = EvalModel(path=path, model=model, config=cfg, tokenizer_type=loaded.tokenizer_type,
                       tokenizer_dir=loaded.tokenizer_dir)
    del loaded, state_dict
    return result


def evaluate_set(model: EvalModel, *, seq_length: int, text_file: str | os.PathLike | None = None,
                 data_path: str | os.PathLike | None = None, micro_batch_size: int = 1,
                 max_windows: int | None = None) -> PerplexityResult:
    """Perplexity and accuracy of a loaded model on one text file or tokenized dataset.
    Every rank returns the same result."""
    check_eval_source(text_file, data_path)
    cfg = model.config
    if seq_length > cfg.max_position_embeddings:
        raise PerplexityError(f"--seq-length {seq_length} exceeds the model's max position embeddings "
                              f"{cfg.max_position_embeddings} ({model.path})")
    if text_file is not None:
        tokens = text_tokens(text_file, model.tokenizer())
    else:
        from megatron_ext.data.indexed_dataset import check_token_range, verify_dataset

        try:
            verify_dataset(data_path)
            check_token_range(data_path, cfg.vocab_size)
        except ValueError as e:
            raise PerplexityError(f"--data-path: {e}") from None
        tokens = dataset_tokens(data_path)
    windows = make_windows(tokens, seq_length)
    if max_windows is not None:
        windows = windows[:max_windows]
    return evaluate_windows(model.model, windows, cfg.vocab_size, micro_batch_size, platform.device())


def evaluate(load: str | os.PathLike, *, seq_length: int, text_file: str | os.PathLike | None = None,
             data_path: str | os.PathLike | None = None, micro_batch_size: int = 1, sparse: bool = False,
             params_dtype: str | torch.dtype = "fp32", tokenizer_type: str | None = None,
             max_windows: int | None = None, apply_masks: MaskFn | None = None) -> PerplexityResult:
    """Perplexity of the checkpoint ``load`` on one text file or tokenized dataset
    (``load_model`` then ``evaluate_set``; see there)."""
    check_eval_source(text_file, data_path)
    model = load_model(load, params_dtype=params_dtype, sparse=sparse, tokenizer_type=tokenizer_type,
                       apply_masks=apply_masks)
    return evaluate_set(model, seq_length=seq_length, text_file=text_file, data_path=data_path,
                        micro_batch_size=micro_batch_size, max_windows=max_windows)


def run_tool(tp_size: int, work: Callable[[platform.DistInfo], None]) -> int:
    """An evaluation tool's exit status: ``work(info)`` in a process group at TP ``tp_size``
    (a size that does not divide the world: exit 2), a failure the user can cause reported as
    one ``error: ...`` line (the error's own status: 2 for bad input, 1 for a failing run; 1
    for an OS error), the group torn down whatever happens."""
    from megatron_ext.errors import MegatronExtError

    try:
        info = platform.init_distributed(tp_size)
    except ValueError as e:
        print(f"error: --tensor-model-parallel-size: {e}", file=sys.stderr)
        return 2
    try:
        work(info)
        return 0
    except MegatronExtError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        platform.destroy_distributed()
