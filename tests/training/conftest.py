"""Fixtures of the trainer tests: the shipped Shakespeare sample tokenized once per session,
and a builder of Megatron-style command lines for a small run of the tiny model."""
from pathlib import Path

import pytest

from megatron_ext.data.preprocess import PreprocessConfig, preprocess


def _tokenize(inputs, prefix: Path, tokenizer_model: Path) -> str:
    result = preprocess(PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=str(prefix),
                                         tokenizer_type="Llama2Tokenizer", tokenizer_model=str(tokenizer_model),
                                         append_eod=True), log=None)
    return result.outputs["text"]


@pytest.fixture(scope="session")
def sample_tokenizer(sample_dir) -> Path:
    return sample_dir / "tokenizer.model"


@pytest.fixture(scope="session")
def shakespeare_prefix(tmp_path_factory, sample_dir, sample_tokenizer) -> str:
    """Eight plays (examples/data/shakespeare_train.jsonl) as a .bin/.idx dataset."""
    out = tmp_path_factory.mktemp("shakespeare")
    return _tokenize([sample_dir / "shakespeare_train.jsonl"], out / "train", sample_tokenizer)


@pytest.fixture(scope="session")
def tempest_prefix(tmp_path_factory, sample_dir, sample_tokenizer) -> str:
    """The held-out play (examples/data/shakespeare_heldout.txt) as a .bin/.idx dataset."""
    out = tmp_path_factory.mktemp("tempest")
    return _tokenize([sample_dir / "shakespeare_heldout.txt"], out / "heldout", sample_tokenizer)


@pytest.fixture
def make_argv(shakespeare_prefix, sample_tokenizer, tmp_path):
    """``make_argv(train_iters, **flags)``: a tiny-model run on the sample (seq 64, global batch 4
    in two micro-batches); ``flag_name=value`` adds ``--flag-name value`` (True: the bare
    flag, None: removes a default)."""

    def build(train_iters: int = 4, **flags):
        base = {
            "model": "tiny", "seq_length": 64, "micro_batch_size": 2, "global_batch_size": 4,
            "train_iters": train_iters, "lr": 3e-3, "min_lr": 3e-4, "lr_decay_style": "cosine",
            "lr_warmup_iters": 1, "weight_decay": 0.01, "clip_grad": 1.0, "data_path": shakespeare_prefix,
            "split": "98,2,0", "tokenizer_type": "Llama2Tokenizer", "tokenizer_model": str(sample_tokenizer),
            "log_interval": 1, "eval_interval": 1000, "eval_iters": 1, "log_dir": str(tmp_path / "logs"),
            "seed": 1234,
        }
        base.update(flags)
        argv = []
        for name, value in base.items():
            if value is None or value is False:
                continue
            argv.append("--" + name.replace("_", "-"))
            if value is not True:
                argv += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        return argv

    return build


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny models run fastest on one thread; two threads on a busy machine mostly wait."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
