"""LLaMA model shapes shared by the model, checkpoint and sparsity layers.

``LlamaConfig`` is a plain dataclass (no torch, no megatron-core) so checkpoint
metadata can be read and written without building a model. ``vocab_size`` is the
true tokenizer vocabulary; the embedding and output tables are padded following
Megatron's rule (a multiple of ``make_vocab_size_divisible_by * tp``).

``rope_scaling_factor`` is LLaMA-3.1's scaled rotary embedding (Hugging Face's
``rope_type "llama3"``) as megatron-core's ``GPTModel(rope_scaling=True)`` applies it:
the factor is free, the other parameters are fixed at ``LLAMA3_ROPE_SCALING``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import math
from typing import Any, Mapping, Optional

from megatron_ext.errors import InputError

# The parameters of the "llama3" rotary scaling that megatron-core fixes (the defaults of
# RotaryEmbedding._apply_scaling, which GPTModel does not let us change); only the factor varies.
LLAMA3_ROPE_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# LLaMA-3.1's factor, and Megatron-LM's default for --rope-scaling-factor
LLAMA31_ROPE_SCALING_FACTOR = 8.0

# The linear slots of a layer by layer-spec name, and each one's module path inside the layer
# (state-dict keys ``decoder.layers.<i>.<path>.weight``): the layer spec, checkpoints,
# resharding and the sparsity code take the names from here.
LINEAR_PATHS = {"linear_qkv": "self_attention.linear_qkv", "linear_proj": "self_attention.linear_proj",
                "linear_fc1": "mlp.linear_fc1", "linear_fc2": "mlp.linear_fc2"}
LINEAR_NAMES = tuple(LINEAR_PATHS)


class ConfigError(InputError):
    """An invalid configuration or an impossible tensor-parallel size."""


@dataclass(frozen=True)
class LlamaConfig:
    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    max_position_embeddings: int
    rotary_base: float = 10000.0
    # LLaMA-3.1's rotary scaling ("llama3"): low frequencies divided by this factor, high ones
    # kept, a smooth ramp between (LLAMA3_ROPE_SCALING); None = plain RoPE.
    rope_scaling_factor: Optional[float] = None
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self) -> None:
        positive = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "vocab_size", "max_position_embeddings",
                    "make_vocab_size_divisible_by")
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config {self.name!r}: {field} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config {self.name!r}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"config {self.name!r}: num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.num_query_groups}")
        if not self.rotary_base > 0:
            raise ConfigError(f"config {self.name!r}: rotary_base must be > 0, got {self.rotary_base!r}")
        factor = self.rope_scaling_factor
        if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float))
                                   or not math.isfinite(factor) or factor < 1):
            raise ConfigError(f"config {self.name!r}: rope_scaling_factor must be a number >= 1 "
                              f"(or None for unscaled rotary embeddings), got {factor!r}")
        if not self.norm_epsilon > 0:
            raise ConfigError(f"config {self.name!r}: norm_epsilon must be > 0, got {self.norm_epsilon!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Megatron's padding: round ``vocab_size`` up to a multiple of ``divisible_by * tp``."""
        if tp < 1:
            raise ConfigError(f"tensor-parallel size must be >= 1, got {tp}")
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def validate_tp(self, tp: int) -> None:
        """Raise ``ConfigError`` naming the sizes when ``tp`` cannot shard this model."""
        if not isinstance(tp, int) or tp < 1:
            raise ConfigError(f"tensor-parallel size must be a positive integer, got {tp!r}")
        checks = (("num_attention_heads", self.num_attention_heads),
                  ("num_query_groups", self.num_query_groups),
                  ("ffn_hidden_size", self.ffn_hidden_size))
        for field, value in checks:
            if value % tp:
                raise ConfigError(
                    f"config {self.name!r}: tensor-parallel size {tp} does not divide "
                    f"{field} {value} (num_attention_heads={self.num_attention_heads}, "
                    f"num_query_groups={self.num_query_groups}, ffn_hidden_size={self.ffn_hidden_size})")

    def num_parameters(self) -> int:
        """Parameter count with the true (unpadded) vocabulary."""
        h, d = self.hidden_size, self.head_dim
        qkv = (self.num_attention_heads + 2 * self.num_query_groups) * d * h
        proj = self.num_attention_heads * d * h
        mlp = 3 * self.ffn_hidden_size * h
        layer = qkv + proj + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LlamaConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown LlamaConfig field(s): {', '.join(unknown)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.default is dataclasses.MISSING and f.name not in data)
        if missing:
            raise ConfigError(f"LlamaConfig is missing field(s): {', '.join(missing)}")
        return cls(**dict(data))


_NAMED: dict[str, LlamaConfig] = {
    c.name: c
    for c in (
        LlamaConfig(name="llama2-7b", num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                    num_attention_heads=32, num_query_groups=32, vocab_size=32000,
                    max_position_embeddings=4096, rotary_base=10000.0, norm_epsilon=1e-5),
        LlamaConfig(name="llama2-13b", num_layers=40, hidden_size=5120, ffn_hidden_size=13824,
                    num_attention_heads=40, num_query_groups=40, vocab_size=32000,
                    max_position_embeddings=4096, rotary_base=10000.0, norm_epsilon=1e-5),
        LlamaConfig(name="llama3-8b", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                    num_attention_heads=32, num_query_groups=8, vocab_size=128256,
                    max_position_embeddings=8192, rotary_base=500000.0, norm_epsilon=1e-5),
        # LLaMA-3-8B's shapes; 128k positions through the "llama3" rotary scaling (factor 8).
        LlamaConfig(name="llama3.1-8b", num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                    num_attention_heads=32, num_query_groups=8, vocab_size=128256,
                    max_position_embeddings=131072, rotary_base=500000.0, rope_scaling_factor=LLAMA31_ROPE_SCALING_FACTOR,
                    norm_epsilon=1e-5),
        LlamaConfig(name="smollm2-135m", num_layers=30, hidden_size=576, ffn_hidden_size=1536,
                    num_attention_heads=9, num_query_groups=3, vocab_size=49152,
                    max_position_embeddings=8192, rotary_base=100000.0, norm_epsilon=1e-5,
                    tie_word_embeddings=True),
        # Small enough for CPU tests; the vocabulary fits the 1000-piece SentencePiece models.
        LlamaConfig(name="tiny", num_layers=2, hidden_size=64, ffn_hidden_size=128,
                    num_attention_heads=4, num_query_groups=2, vocab_size=1000,
                    max_position_embeddings=256, rotary_base=10000.0, norm_epsilon=1e-5),
    )
}


def config_names() -> list[str]:
    return sorted(_NAMED)


def get_config(name: str, **overrides: Any) -> LlamaConfig:
    """A named configuration, optionally with fields replaced (e.g. ``num_layers=4``)."""
    try:
        cfg = _NAMED[name]
    except KeyError:
        raise ConfigError(f"unknown model config {name!r}; known: {', '.join(config_names())}") from None
    return cfg.replace(**overrides) if overrides else cfg
