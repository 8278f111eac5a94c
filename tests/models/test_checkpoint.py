"""Checkpoints: HF <-> megatron-core conversion, TP resharding, our on-disk format, bad input.

Everything here is pure tensor work on small real transformers models (random weights,
saved by transformers itself), no process group. The SmolLM2 round trip and logits are
in test_gguf.py, next to the GGUF import that produces the real weights.
"""
import json
import os
import re

import pytest
import torch
import transformers

from megatron_ext import checkpoint as ckpt
from megatron_ext.checkpoint import CheckpointError
from megatron_ext.models.config import LlamaConfig
from megatron_ext.checkpoint import from_hf_config, read_hf_checkpoint, save_hf_checkpoint, to_hf_config
from megatron_ext.checkpoint.hf import read_hf_config

# vocab 1100: Megatron pads to 1152 at TP=1 and 1536 at TP=4, so resharding re-pads.
# 8 heads / 4 groups / ffn 128: TP 1, 2 and 4 divide everything.
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=1100, max_position_embeddings=128, rms_norm_eps=1e-6)


def _hf_model(tied: bool, seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    hf_cfg = transformers.LlamaConfig(**{**SMALL, **overrides}, rope_theta=20000.0, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # HF initialises norms to one: make them distinct
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def hf_dir(request, tmp_path):
    """A real Hugging Face directory written by transformers' own save_pretrained."""
    model = _hf_model(request.param)
    out = tmp_path / "hf"
    model.save_pretrained(out)
    return out, model


def _weights(model):
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def _assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- config


def test_hf_config_round_trip():
    model = _hf_model(tied=True)
    cfg = from_hf_config(model.config.to_dict(), name="small")
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (2, 64, 128)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.vocab_size) == (8, 4, 1100)
    assert cfg.rotary_base == 20000.0 and cfg.norm_epsilon == 1e-6 and cfg.tie_word_embeddings
    again = from_hf_config(to_hf_config(cfg), name="small")
    assert again == cfg
    # transformers itself reads our config.json to the same model shape
    reread = transformers.LlamaConfig.from_dict(to_hf_config(cfg))
    assert reread.num_key_value_heads == 4 and reread.rope_parameters["rope_theta"] == 20000.0


@pytest.mark.parametrize("field,value,match", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling.rope_type 'yarn'"),
    ("hidden_act", "gelu", "hidden_act 'gelu'"),
    ("attention_bias", True, "attention_bias"),
    ("model_type", "mistral", "model_type 'mistral'"),
    ("head_dim", 32, "head_dim 32"),
])
def test_hf_config_rejects_what_we_cannot_represent(field, value, match):
    d = to_hf_config(LlamaConfig(name="x", num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                                 num_query_groups=2, vocab_size=100, max_position_embeddings=64))
    d[field] = value
    with pytest.raises(CheckpointError, match=match):
        from_hf_config(d)


# LLaMA-3.1-8B's config.json as published (written by transformers 4.43)
LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}
LLAMA31_8B = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
              "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
              "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
              "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
              "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": LLAMA31_SCALING,
              "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256}


def test_llama31_config_reads_as_the_named_model_and_writes_its_rope_scaling_back():
    from megatron_ext.models import get_config

    cfg = from_hf_config(LLAMA31_8B, name="llama3.1-8b")
    assert cfg == get_config("llama3.1-8b")
    out = to_hf_config(cfg)
    assert out["rope_scaling"] == LLAMA31_SCALING and out["rope_theta"] == 500000.0
    assert out["rope_parameters"] == {**LLAMA31_SCALING, "rope_theta": 500000.0}   # transformers 5.x
    assert from_hf_config(out, name="llama3.1-8b") == cfg
    # unscaled models keep writing no rope_scaling
    assert "rope_scaling" not in to_hf_config(get_config("llama3-8b"))


def test_llama3_rope_scaling_round_trips_through_a_transformers_directory(tmp_path):
    """transformers' save (rope_parameters) -> our reader -> TP=2 -> our HF writer -> transformers."""
    model = _hf_model(tied=False, rope_scaling=dict(LLAMA31_SCALING), max_position_embeddings=16384)
    model.save_pretrained(tmp_path / "src")
    cfg, sd = read_hf_checkpoint(tmp_path / "src")
    assert cfg.rope_scaling_factor == 8.0 and cfg.rotary_base == 20000.0
    save_hf_checkpoint(tmp_path / "back", cfg, ckpt.mcore_to_hf(ckpt.hf_to_mcore(sd, cfg, 2), cfg))
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert written["rope_scaling"] == LLAMA31_SCALING
    assert read_hf_config(tmp_path / "back", name=cfg.name) == cfg
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    assert back.config.rope_parameters == {**LLAMA31_SCALING, "rope_theta": 20000.0}
    assert torch.equal(back.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    _assert_same(_weights(back), _weights(model))


@pytest.mark.parametrize("field,value,match", [
    ("rope_scaling", {**LLAMA31_SCALING, "rope_type": "linear"}, "rope_scaling.rope_type 'linear' is not supported"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope_scaling.rope_type 'dynamic' is not supported"),
    ("rope_scaling", {**LLAMA31_SCALING, "low_freq_factor": 2.0},
     "rope_scaling.low_freq_factor 2.0 is not supported: megatron-core's 'llama3' rotary scaling fixes it at 1"),
    ("rope_scaling", {**LLAMA31_SCALING, "high_freq_factor": 8.0},
     "rope_scaling.high_freq_factor 8.0 is not supported"),
    ("rope_scaling", {**LLAMA31_SCALING, "original_max_position_embeddings": 4096},
     "rope_scaling.original_max_position_embeddings 4096 is not supported: .* fixes it at 8192"),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "rope_scaling.low_freq_factor None is not supported"),
    ("rope_scaling", {**LLAMA31_SCALING, "factor": 0.5}, r"rope_scaling.factor 0.5 is not supported \(a number >= 1\)"),
    ("rope_scaling", {k: v for k, v in LLAMA31_SCALING.items() if k != "factor"}, "rope_scaling.factor None"),
    ("rope_parameters", {**LLAMA31_SCALING, "factor": 32.0, "rope_theta": 500000.0},
     "rope_parameters.factor 32.0 and rope_scaling.factor 8.0 differ"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0}, "rope_parameters.rope_type 'yarn'"),
])
def test_hf_config_refuses_a_rope_scaling_megatron_core_cannot_apply(tmp_path, field, value, match):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA31_8B, field: value}))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(tmp_path / 'config.json'))}: {match}"):
        read_hf_config(tmp_path)


# --------------------------------------------------------------------------- conversion


def test_hf_megatron_hf_round_trip_is_bit_exact(hf_dir, tmp_path):
    """transformers save -> our reader -> TP=2 megatron checkpoint on disk -> HF dir -> transformers."""
    src, model = hf_dir
    cfg, hf_sd = read_hf_checkpoint(src)
    _assert_same(hf_sd, _weights(model))
    ranks = ckpt.hf_to_mcore(hf_sd, cfg, 2)
    ckpt.save_checkpoint(tmp_path / "mc", ranks, cfg)
    info, loaded = ckpt.load_checkpoint(tmp_path / "mc")
    assert info.tensor_parallel_size == 2 and info.config == cfg and info.dtype == "fp32"
    for a, b in zip(ranks, loaded):
        _assert_same(a, b)
    save_hf_checkpoint(tmp_path / "back", cfg, ckpt.mcore_to_hf(loaded, cfg))
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32)
    _assert_same(_weights(back), _weights(model))
    assert back.config.rope_parameters["rope_theta"] == 20000.0
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings


def test_grouped_qkv_and_gated_fc1_layout():
    """The contract's layouts, checked row by row against the HF projections."""
    model = _hf_model(tied=False)
    sd = model.state_dict()
    cfg = from_hf_config(model.config.to_dict())
    d, tp = cfg.head_dim, 2
    ranks = ckpt.hf_to_mcore(sd, cfg, tp)
    q = sd["model.layers.1.self_attn.q_proj.weight"].view(8, d, -1)
    k = sd["model.layers.1.self_attn.k_proj.weight"].view(4, d, -1)
    v = sd["model.layers.1.self_attn.v_proj.weight"].view(4, d, -1)
    for r, rank in enumerate(ranks):
        qkv = rank["decoder.layers.1.self_attention.linear_qkv.weight"].view(2, 4, d, -1)  # 2 groups x (2q+k+v)
        for local_g in range(2):
            g = r * 2 + local_g
            assert torch.equal(qkv[local_g, 0], q[2 * g]) and torch.equal(qkv[local_g, 1], q[2 * g + 1])
            assert torch.equal(qkv[local_g, 2], k[g]) and torch.equal(qkv[local_g, 3], v[g])
        fc1 = rank["decoder.layers.1.mlp.linear_fc1.weight"]
        half = cfg.ffn_hidden_size // tp
        assert torch.equal(fc1[:half], sd["model.layers.1.mlp.gate_proj.weight"][r * half:(r + 1) * half])
        assert torch.equal(fc1[half:], sd["model.layers.1.mlp.up_proj.weight"][r * half:(r + 1) * half])
        proj = rank["decoder.layers.1.self_attention.linear_proj.weight"]
        assert torch.equal(proj, sd["model.layers.1.self_attn.o_proj.weight"][:, r * 4 * d:(r + 1) * 4 * d])
        emb = rank["embedding.word_embeddings.weight"]
        rows = cfg.padded_vocab_size(tp) // tp
        assert emb.shape[0] == rows
        full = torch.cat([sd["model.embed_tokens.weight"],
                          torch.zeros(cfg.padded_vocab_size(tp) - cfg.vocab_size, cfg.hidden_size)])
        assert torch.equal(emb, full[r * rows:(r + 1) * rows])


def test_reshard_4_1_4_is_bit_exact_and_repads(tmp_path):
    model = _hf_model(tied=False)
    cfg = from_hf_config(model.config.to_dict())
    four = ckpt.hf_to_mcore(model.state_dict(), cfg, 4)
    one = ckpt.reshard(four, cfg, 1)
    assert one[0]["output_layer.weight"].shape[0] == cfg.padded_vocab_size(1) == 1152
    again = ckpt.reshard(one, cfg, 4)
    assert again[0]["output_layer.weight"].shape[0] * 4 == cfg.padded_vocab_size(4) == 1536
    for a, b in zip(four, again):
        _assert_same(a, b)
    _assert_same(ckpt.mcore_to_hf(again, cfg), model.state_dict())
    two = ckpt.reshard(four, cfg, 2)
    _assert_same(ckpt.mcore_to_hf(two, cfg), model.state_dict())
    # resharded tensors are views of one merged table; saved shards hold only their own rows
    it_dir = ckpt.save_checkpoint(tmp_path / "mc", again, cfg)
    for r in range(4):
        nbytes = sum(t.numel() * t.element_size() for t in again[r].values())
        assert (it_dir / f"mp_rank_{r:02d}" / "model_optim_rng.pt").stat().st_size < 1.1 * nbytes + 50_000


def test_bf16_checkpoint_keeps_bf16(tmp_path):
    model = _hf_model(tied=True)
    cfg = from_hf_config(model.config.to_dict())
    ranks = ckpt.hf_to_mcore(model.state_dict(), cfg, 1)
    ckpt.save_checkpoint(tmp_path / "mc", ranks, cfg, dtype="bf16")
    info, loaded = ckpt.load_checkpoint(tmp_path / "mc")
    assert info.dtype == "bf16"
    assert all(t.dtype == torch.bfloat16 for t in loaded[0].values())
    assert torch.equal(loaded[0]["decoder.final_layernorm.weight"],
                       model.state_dict()["model.norm.weight"].to(torch.bfloat16))
    save_hf_checkpoint(tmp_path / "hf16", cfg, ckpt.mcore_to_hf(loaded, cfg), dtype="fp16")
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "float16"
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf16")
    assert back.model.norm.weight.dtype == torch.float16


def test_reads_sharded_safetensors_and_pytorch_bin(tmp_path):
    model = _hf_model(tied=False)
    cfg = from_hf_config(model.config.to_dict())
    save_hf_checkpoint(tmp_path / "sharded", cfg, model.state_dict(), max_shard_bytes=200_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    _, sd = read_hf_checkpoint(tmp_path / "sharded")
    _assert_same(sd, model.state_dict())
    reread = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "sharded")
    _assert_same(reread.state_dict(), model.state_dict())
    # the older pickle format (a plain state dict), read with weights_only=True
    (tmp_path / "bin").mkdir()
    model.config.to_json_file(tmp_path / "bin" / "config.json")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _, sd = read_hf_checkpoint(tmp_path / "bin")
    _assert_same(sd, model.state_dict())


def test_tokenizer_travels_with_the_checkpoint(tmp_path, llama_sp_model):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.model").write_bytes(llama_sp_model.read_bytes())
    model = _hf_model(tied=False, vocab_size=32000)
    cfg = from_hf_config(model.config.to_dict())
    it_dir = ckpt.save_checkpoint(tmp_path / "mc", ckpt.hf_to_mcore(model.state_dict(), cfg, 1), cfg,
                                  iteration=7, tokenizer_dir=tok_dir)
    assert it_dir.name == "iter_0000007"
    assert (tmp_path / "mc" / "latest_checkpointed_iteration.txt").read_text().strip() == "7"
    info = ckpt.read_checkpoint_info(tmp_path / "mc")
    assert info.tokenizer_type == "Llama2Tokenizer" and info.iteration == 7
    assert (info.tokenizer_dir / "tokenizer.model").read_bytes() == llama_sp_model.read_bytes()
    payload = torch.load(it_dir / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
    assert payload["iteration"] == 7 and payload["config"] == cfg.to_dict()
    assert payload["args"]["padded_vocab_size"] == 32000 and payload["args"]["num_query_groups"] == 4
    # HF export of it carries the tokenizer and its bos/eos ids
    save_hf_checkpoint(tmp_path / "hf", cfg, ckpt.mcore_to_hf(ckpt.load_checkpoint(tmp_path / "mc")[1], cfg),
                       tokenizer_dir=info.tokenizer_dir)
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"]) == (1, 2)
    assert (tmp_path / "hf" / "tokenizer.model").is_file()


# --------------------------------------------------------------------------- bad input


def test_tp_that_does_not_divide_heads_or_groups():
    model = _hf_model(tied=False)
    cfg = from_hf_config(model.config.to_dict())
    with pytest.raises(CheckpointError, match=r"tensor-parallel size 3 does not divide num_attention_heads 8"):
        ckpt.hf_to_mcore(model.state_dict(), cfg, 3)
    with pytest.raises(CheckpointError, match=r"tensor-parallel size 8 does not divide num_query_groups 4"):
        ckpt.reshard(ckpt.hf_to_mcore(model.state_dict(), cfg, 1), cfg, 8)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    model = _hf_model(tied=False)
    cfg = from_hf_config(model.config.to_dict())
    sd = dict(model.state_dict())
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(100, 64\), "
                                              r"expected \(128, 64\)"):
        ckpt.hf_to_mcore(sd, cfg, 1)
    # a checkpoint whose config.json disagrees with its tensors
    ckpt.save_checkpoint(tmp_path / "mc", ckpt.hf_to_mcore(model.state_dict(), cfg, 1), cfg)
    info_path = tmp_path / "mc" / "iter_0000000" / "checkpoint.json"
    info = json.loads(info_path.read_text())
    info["config"]["ffn_hidden_size"] = 256
    info_path.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="config differs"):
        ckpt.load_checkpoint(tmp_path / "mc")
    wrong = cfg.replace(ffn_hidden_size=256)
    with pytest.raises(CheckpointError, match=r"'decoder.layers.0.mlp.linear_fc1.weight' has shape \(256, 64\), "
                                              r"expected \(512, 64\)"):
        ckpt.validate_rank_state_dicts(ckpt.hf_to_mcore(model.state_dict(), cfg, 1), wrong)


def test_missing_shard_and_wrong_tp_count(tmp_path):
    model = _hf_model(tied=True)
    cfg = from_hf_config(model.config.to_dict())
    it_dir = ckpt.save_checkpoint(tmp_path / "mc", ckpt.hf_to_mcore(model.state_dict(), cfg, 2), cfg)
    shard = it_dir / "mp_rank_01" / "model_optim_rng.pt"
    extra = it_dir / "mp_rank_02"
    extra.mkdir()
    with pytest.raises(CheckpointError, match=r"3 TP shards on disk but checkpoint.json says TP=2.*mp_rank_02"):
        ckpt.load_checkpoint(tmp_path / "mc")
    extra.rmdir()
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard {shard}"):
        ckpt.load_checkpoint(tmp_path / "mc")
    with pytest.raises(CheckpointError, match=f"missing shard {shard}"):
        ckpt.load_rank_state_dict(tmp_path / "mc", tp=2, rank=1)
    (tmp_path / "mc" / "latest_checkpointed_iteration.txt").write_text("garbage")
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt: expected an iteration number"):
        ckpt.load_checkpoint(tmp_path / "mc")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        ckpt.load_checkpoint(tmp_path)


def test_load_rank_state_dict_reshards_on_the_fly(tmp_path):
    model = _hf_model(tied=False)
    cfg = from_hf_config(model.config.to_dict())
    four = ckpt.hf_to_mcore(model.state_dict(), cfg, 4)
    ckpt.save_checkpoint(tmp_path / "mc", four, cfg)
    _, direct = ckpt.load_rank_state_dict(tmp_path / "mc", tp=4, rank=3)
    _assert_same(direct, four[3])
    two = ckpt.hf_to_mcore(model.state_dict(), cfg, 2)
    _, resharded = ckpt.load_rank_state_dict(tmp_path / "mc", tp=2, rank=1)
    _assert_same(resharded, two[1])


def test_tied_config_with_different_lm_head_is_rejected():
    model = _hf_model(tied=False)
    cfg = from_hf_config(model.config.to_dict()).replace(tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens.weight"):
        ckpt.hf_to_mcore(model.state_dict(), cfg, 1)


def test_saving_is_atomic(tmp_path, monkeypatch):
    model = _hf_model(tied=True)
    cfg = from_hf_config(model.config.to_dict())
    ranks = ckpt.hf_to_mcore(model.state_dict(), cfg, 2)
    ckpt.save_checkpoint(tmp_path / "mc", ranks, cfg, iteration=1)
    with pytest.raises(CheckpointError, match="iter_0000001: iteration already saved"):
        ckpt.save_checkpoint(tmp_path / "mc", ranks, cfg, iteration=1)

    calls = []
    real_save = torch.save

    def failing_save(obj, f):  # the disk fills up while the second shard is written
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save_checkpoint(tmp_path / "mc", ranks, cfg, iteration=2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "mc")) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
    assert (tmp_path / "mc" / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert ckpt.load_checkpoint(tmp_path / "mc")[0].iteration == 1
    with pytest.raises(CheckpointError, match="directory exists and is not empty"):
        save_hf_checkpoint(tmp_path / "mc", cfg, ckpt.mcore_to_hf(ranks, cfg))


def test_unknown_tensor_has_no_layout():
    model = _hf_model(tied=True)
    cfg = from_hf_config(model.config.to_dict())
    ranks = ckpt.hf_to_mcore(model.state_dict(), cfg, 2)
    ranks[0]["decoder.layers.0.self_attention.rotary.freqs"] = torch.zeros(3)
    ranks[1]["decoder.layers.0.self_attention.rotary.freqs"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="no tensor-parallel layout known for module"):
        ckpt.reshard(ranks, cfg, 1)


# --------------------------------------------------------------------------- convert tool


def _tool(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_convert_tool_hf_megatron_megatron_hf(tmp_path, capsys):
    convert = _tool("convert_checkpoint")
    model = _hf_model(tied=False)
    model.save_pretrained(tmp_path / "src")
    assert convert.main(["--source-format", "hf", "--target-format", "megatron", "--load", str(tmp_path / "src"),
                         "--save", str(tmp_path / "tp2"), "--target-tp", "2"]) == 0
    assert ckpt.read_checkpoint_info(tmp_path / "tp2").tensor_parallel_size == 2
    assert convert.main(["--source-format", "megatron", "--target-format", "megatron", "--load",
                         str(tmp_path / "tp2"), "--save", str(tmp_path / "tp4"), "--target-tp", "4",
                         "--dtype", "bf16"]) == 0
    info, ranks = ckpt.load_checkpoint(tmp_path / "tp4")
    assert (info.tensor_parallel_size, info.dtype, len(ranks)) == (4, "bf16", 4)
    assert convert.main(["--source-format", "megatron", "--target-format", "hf", "--load", str(tmp_path / "tp2"),
                         "--save", str(tmp_path / "back")]) == 0
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back")
    _assert_same(back.state_dict(), model.state_dict())
    # errors: a message naming the problem, exit code 1, nothing written
    assert convert.main(["--source-format", "hf", "--target-format", "megatron", "--load", str(tmp_path / "src"),
                         "--save", str(tmp_path / "tp3"), "--target-tp", "3"]) == 1
    assert "tensor-parallel size 3 does not divide num_attention_heads 8" in capsys.readouterr().err
    assert not (tmp_path / "tp3" / "iter_0000000").exists()
    assert convert.main(["--source-format", "hf", "--target-format", "hf", "--load", str(tmp_path / "nowhere"),
                         "--save", str(tmp_path / "x")]) == 1
    assert "nowhere" in capsys.readouterr().err
