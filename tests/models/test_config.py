"""LlamaConfig: named shapes, Megatron vocabulary padding, TP validation, serialisation."""
import json

import pytest

from megatron_ext.models.config import ConfigError, LlamaConfig, config_names, get_config


def test_named_configs_have_published_parameter_counts():
    # Parameter counts published for the original checkpoints.
    assert get_config("llama2-7b").num_parameters() == 6_738_415_616
    assert get_config("llama2-13b").num_parameters() == 13_015_864_320
    assert get_config("llama3-8b").num_parameters() == 8_030_261_248
    assert get_config("llama3.1-8b").num_parameters() == 8_030_261_248
    assert round(get_config("smollm2-135m").num_parameters() / 1e6, 1) == 134.5


def test_named_config_shapes():
    s = get_config("smollm2-135m")
    assert (s.num_layers, s.hidden_size, s.num_attention_heads, s.num_query_groups, s.ffn_hidden_size) == (30, 576, 9, 3, 1536)
    assert (s.vocab_size, s.rotary_base, s.tie_word_embeddings, s.norm_epsilon, s.head_dim) == (49152, 1e5, True, 1e-5, 64)
    l3 = get_config("llama3-8b")
    assert (l3.vocab_size, l3.rotary_base, l3.num_query_groups, l3.head_dim) == (128256, 500000.0, 8, 128)
    assert l3.rope_scaling_factor is None and l3.max_position_embeddings == 8192
    l31 = get_config("llama3.1-8b")
    assert l31.replace(name="llama3-8b", rope_scaling_factor=None, max_position_embeddings=8192) == l3
    assert (l31.rope_scaling_factor, l31.max_position_embeddings) == (8.0, 131072)
    tiny = get_config("tiny")
    assert tiny.vocab_size >= 1000 and not tiny.tie_word_embeddings and tiny.rope_scaling_factor is None
    assert set(config_names()) >= {"llama2-7b", "llama2-13b", "llama3-8b", "llama3.1-8b", "smollm2-135m", "tiny"}


def test_padded_vocab_follows_megatron_rule():
    l2 = get_config("llama2-7b")
    assert l2.padded_vocab_size(1) == 32000            # already a multiple of 128
    assert l2.padded_vocab_size(2) == 32000            # multiple of 256
    assert l2.padded_vocab_size(3) == 32256            # next multiple of 384
    assert l2.padded_vocab_size(4) == 32256            # next multiple of 512
    assert l2.padded_vocab_size(8) == 32768            # next multiple of 1024
    tiny = get_config("tiny", vocab_size=1000)
    assert [tiny.padded_vocab_size(tp) for tp in (1, 2, 3)] == [1024, 1024, 1152]
    assert get_config("tiny", make_vocab_size_divisible_by=1).padded_vocab_size(1) == get_config("tiny").vocab_size
    with pytest.raises(ConfigError):
        l2.padded_vocab_size(0)


@pytest.mark.parametrize("name,tp", [("llama2-7b", 8), ("llama3-8b", 8), ("llama3.1-8b", 8), ("smollm2-135m", 3),
                                     ("tiny", 2)])
def test_validate_tp_accepts_divisors(name, tp):
    get_config(name).validate_tp(tp)


def test_validate_tp_names_the_sizes():
    with pytest.raises(ConfigError, match=r"tensor-parallel size 2 does not divide num_attention_heads 9"):
        get_config("smollm2-135m").validate_tp(2)
    # heads divisible by 4 but query groups (2) are not
    cfg = get_config("tiny", hidden_size=128, num_attention_heads=8, num_query_groups=2)
    with pytest.raises(ConfigError, match=r"tensor-parallel size 4 does not divide num_query_groups 2"):
        cfg.validate_tp(4)
    with pytest.raises(ConfigError, match="positive integer"):
        cfg.validate_tp(0)


def test_invalid_shapes_are_rejected():
    with pytest.raises(ConfigError, match="hidden_size 100 is not divisible by num_attention_heads 3"):
        get_config("tiny", hidden_size=100, num_attention_heads=3, num_query_groups=1)
    with pytest.raises(ConfigError, match="num_attention_heads 4 is not divisible by num_query_groups 3"):
        get_config("tiny", num_query_groups=3)
    with pytest.raises(ConfigError, match="num_layers must be a positive integer"):
        get_config("tiny", num_layers=0)
    with pytest.raises(ConfigError, match="unknown model config 'llama9'"):
        get_config("llama9")
    for factor in (0.5, 0, True, float("nan"), float("inf"), "8"):
        with pytest.raises(ConfigError, match=r"rope_scaling_factor must be a number >= 1 \(or None"):
            get_config("tiny", rope_scaling_factor=factor)


def test_dict_round_trip_through_json():
    for name in config_names():
        cfg = get_config(name)
        assert LlamaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    d = get_config("tiny").to_dict()
    with pytest.raises(ConfigError, match="unknown LlamaConfig field"):
        LlamaConfig.from_dict({**d, "bogus": 1})
    # a checkpoint written before the field existed: plain RoPE
    assert LlamaConfig.from_dict({k: v for k, v in d.items() if k != "rope_scaling_factor"}) == get_config("tiny")
    del d["hidden_size"]
    with pytest.raises(ConfigError, match="missing field.*hidden_size"):
        LlamaConfig.from_dict(d)
