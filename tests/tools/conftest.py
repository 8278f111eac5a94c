"""Fixtures of the tool tests: a short real training run of the tiny model on the shipped
sample (a checkpoint with its tokenizer, and the run's logs), made once per session."""
from pathlib import Path

import pytest

from megatron_ext.data.preprocess import PreprocessConfig, preprocess


def tokenize(inputs, prefix: Path, tokenizer_model: Path) -> str:
    result = preprocess(PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=str(prefix),
                                         tokenizer_type="Llama2Tokenizer", tokenizer_model=str(tokenizer_model),
                                         append_eod=True), log=None)
    return result.outputs["text"]


def run_argv(data_path: str, tokenizer_model: Path, train_iters: int, **flags) -> list:
    """A tiny-model run on the sample: seq 64, global batch 4 in two micro-batches;
    ``flag_name=value`` adds ``--flag-name value`` (True: the bare flag)."""
    base = {"model": "tiny", "seq_length": 64, "micro_batch_size": 2, "global_batch_size": 4,
            "train_iters": train_iters, "lr": 3e-3, "min_lr": 3e-4, "lr_decay_style": "cosine",
            "lr_warmup_iters": 2, "weight_decay": 0.01, "clip_grad": 1.0, "data_path": data_path,
            "split": "98,2,0", "tokenizer_type": "Llama2Tokenizer", "tokenizer_model": str(tokenizer_model),
            "log_interval": 1, "eval_iters": 1, "seed": 1234}
    base.update(flags)
    argv = []
    for name, value in base.items():
        argv.append("--" + name.replace("_", "-"))
        if value is not True:
            argv.append(str(value))
    return argv


@pytest.fixture(scope="session")
def tokenize_files():
    """``tokenize_files(inputs, prefix, tokenizer_model)`` -> the .bin/.idx prefix written."""
    return tokenize


@pytest.fixture(scope="session")
def sample_prefixes(tmp_path_factory, sample_dir) -> dict:
    """The eight training plays and the held-out play as .bin/.idx prefixes."""
    out = tmp_path_factory.mktemp("sample-data")
    tok = sample_dir / "tokenizer.model"
    return {"train": tokenize([sample_dir / "shakespeare_train.jsonl"], out / "train", tok),
            "heldout": tokenize([sample_dir / "shakespeare_heldout.txt"], out / "heldout", tok)}


@pytest.fixture(scope="session")
def tiny_argv(sample_dir, sample_prefixes):
    """``tiny_argv(train_iters, **flags)``: the command line of a tiny run on the training plays."""
    return lambda train_iters, **flags: run_argv(sample_prefixes["train"], sample_dir / "tokenizer.model",
                                                 train_iters, **flags)


def pretrain_one_thread(argv):
    """``megatron_ext.train.pretrain`` with one intra-op thread (tiny models run fastest so)."""
    import torch

    from megatron_ext.train import pretrain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def run_tiny():
    return pretrain_one_thread


@pytest.fixture(scope="session")
def dense_run(tmp_path_factory, tiny_argv, sample_prefixes) -> dict:
    """30 dense iterations (validation and the held-out play every 10), saved at 15 and 30."""
    root = tmp_path_factory.mktemp("dense-run")
    result = pretrain_one_thread(tiny_argv(30, eval_interval=10, save_interval=15, save=root / "save",
                                           log_dir=root / "logs", eval_data_path=sample_prefixes["heldout"],
                                           tag="dense"))
    return {"save": root / "save", "log_dir": root / "logs", "run_dir": result.log_dir, "result": result}
