"""Fixtures of the launch tests: the shipped sample tokenized once per session."""
from pathlib import Path

import pytest

from megatron_ext.data.preprocess import PreprocessConfig, preprocess


@pytest.fixture(scope="session")
def sample_tokenizer(sample_dir) -> Path:
    return sample_dir / "tokenizer.model"


@pytest.fixture(scope="session")
def plays_prefix(tmp_path_factory, sample_dir, sample_tokenizer) -> str:
    """The shipped plays (examples/data/shakespeare_train.jsonl) as a .bin/.idx dataset."""
    out = tmp_path_factory.mktemp("plays")
    result = preprocess(PreprocessConfig(inputs=[str(sample_dir / "shakespeare_train.jsonl")],
                                         output_prefix=str(out / "plays"), tokenizer_type="Llama2Tokenizer",
                                         tokenizer_model=str(sample_tokenizer), append_eod=True), log=None)
    return result.outputs["text"]
