"""Our LLaMA GPTModel on the CPU (one process, TP=1): layout, attention, HF parity, training."""
import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType

from megatron_ext import platform
from megatron_ext.models import ConfigError, build_model, get_config, llama_layer_spec
from megatron_ext.models.attention import SDPAttention
from megatron_ext.models.build import forward_logits, lm_loss, transformer_config
from megatron_ext.models.spec import megatron_local_layer_spec


def _weights(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _expected_shapes(cfg, tp=1):
    h, d, vp = cfg.hidden_size, cfg.head_dim, cfg.padded_vocab_size(tp)
    shapes = {"embedding.word_embeddings.weight": (vp // tp, h), "decoder.final_layernorm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["output_layer.weight"] = (vp // tp, h)
    for i in range(cfg.num_layers):
        p = f"decoder.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attention.linear_qkv.weight": ((cfg.num_attention_heads + 2 * cfg.num_query_groups) // tp * d, h),
            p + "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * d // tp),
            p + "pre_mlp_layernorm.weight": (h,),
            p + "mlp.linear_fc1.weight": (2 * cfg.ffn_hidden_size // tp, h),
            p + "mlp.linear_fc2.weight": (h, cfg.ffn_hidden_size // tp),
        })
    return shapes


@pytest.mark.parametrize("tied", [False, True])
def test_state_dict_follows_the_contract(tp1, tied):
    cfg = get_config("tiny", tie_word_embeddings=tied)
    model = build_model(cfg)
    got = {k: tuple(v.shape) for k, v in _weights(model).items()}
    assert got == _expected_shapes(cfg)
    assert isinstance(model.decoder.layers[0].self_attention.core_attention, SDPAttention)
    assert isinstance(model.decoder.final_layernorm, torch.nn.RMSNorm)
    assert model.decoder.final_layernorm.eps == cfg.norm_epsilon
    assert all(v.dtype == torch.float32 for v in _weights(model).values())


def test_vocab_padding_rows_are_zero(tp1):
    cfg = get_config("tiny")
    assert cfg.padded_vocab_size(1) > cfg.vocab_size
    sd = _weights(build_model(cfg))
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert sd[key][cfg.vocab_size:].abs().sum() == 0
        assert sd[key][: cfg.vocab_size].abs().min(dim=1).values.gt(0).all()


def test_same_seed_same_weights_different_seed_different(tp1):
    cfg = get_config("tiny")
    platform.seed_everything(7)
    a = _weights(build_model(cfg))
    platform.seed_everything(7)
    b = _weights(build_model(cfg))
    platform.seed_everything(8)
    c = _weights(build_model(cfg))
    key = "decoder.layers.1.mlp.linear_fc1.weight"
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[key], c[key])


def _reference_attention(q, k, v, mask):
    """Explicit softmax attention, [b, heads, s, d] with keys repeated per group."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(mask, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("sq,sk,mask_type", [(12, 12, AttnMaskType.causal), (4, 12, AttnMaskType.causal),
                                             (12, 12, AttnMaskType.padding)])
def test_sdpa_attention_matches_explicit_softmax(tp1, sq, sk, mask_type):
    cfg = get_config("tiny", num_attention_heads=4, num_query_groups=2)
    att = SDPAttention(transformer_config(cfg, 1), layer_number=1, attn_mask_type=mask_type)
    b, d = 3, cfg.head_dim
    q, k, v = torch.randn(sq, b, 4, d), torch.randn(sk, b, 2, d), torch.randn(sk, b, 2, d)
    if mask_type == AttnMaskType.causal:
        # query i sits at key position sk - sq + i
        mask = torch.ones(sq, sk, dtype=torch.bool).triu(diagonal=sk - sq + 1)[None, None]
        passed = None
    else:
        mask = torch.zeros(b, 1, sq, sk, dtype=torch.bool)
        mask[0, :, :, -5:] = True  # last five keys of sample 0 are padding
        mask[2, :, :, :3] = True
        passed = mask
    out = att(q, k, v, passed, attn_mask_type=mask_type)
    ref = _reference_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), mask)
    assert out.shape == (sq, b, 4 * d)
    torch.testing.assert_close(out, ref.permute(2, 0, 1, 3).reshape(sq, b, 4 * d), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [2, 4])
def test_sdpa_spec_matches_megatron_local_spec(tp1, groups):
    """Same weights through megatron-core's DotProductAttention: same logits and gradients."""
    cfg = get_config("tiny", num_query_groups=groups)
    ours = build_model(cfg)
    local = build_model(cfg, layer_spec=megatron_local_layer_spec())
    local.load_state_dict(ours.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    mask = platform.causal_attention_mask(48)
    a, b = forward_logits(ours, tokens), forward_logits(local, tokens, attention_mask=mask)
    assert (a - b).norm() / b.norm() < 1e-5
    lm_loss(ours, tokens, tokens).backward()
    lm_loss(local, tokens, tokens, attention_mask=mask).backward()
    go = dict(ours.named_parameters())
    for name, p in local.named_parameters():
        torch.testing.assert_close(go[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _tiny_hf(cfg, rope_scaling=None):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rotary_base, rope_scaling=rope_scaling, rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False, mlp_bias=False)
    torch.manual_seed(99)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF initialises norms to one; make them informative
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers_llama(tp1, tied):
    checkpoint = pytest.importorskip("megatron_ext.checkpoint")
    cfg = get_config("tiny", tie_word_embeddings=tied, rotary_base=50000.0, norm_epsilon=1e-6)
    hf = _tiny_hf(cfg)
    (sd,) = checkpoint.hf_to_mcore(hf.state_dict(), cfg, 1)
    model = build_model(cfg).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = forward_logits(model, tokens, cfg.vocab_size)
        ref = hf(tokens).logits
    assert ours.shape == ref.shape
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-4


# LLaMA-3.1's config.json: its rotary scaling as transformers reads it
LLAMA31_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}


def _rope_scaled_tiny():
    # rotary base 5e5 over head_dim 16: wavelengths 6 ... 6e5 tokens, so the "llama3" scaling keeps
    # frequencies 0-3 (< 2048), ramps frequency 4 (4443) and divides 5-7 (> 8192) by the factor
    return get_config("tiny", rotary_base=500000.0, rope_scaling_factor=8.0, norm_epsilon=1e-6,
                      max_position_embeddings=16384)


def test_rope_scaling_gives_megatron_cores_llama3_frequencies(tp1):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_ext.inference.model import rotary_inv_freq

    cfg = _rope_scaled_tiny()
    plain = build_model(cfg.replace(rope_scaling_factor=None)).rotary_pos_emb.inv_freq
    scaled = build_model(cfg).rotary_pos_emb.inv_freq
    assert torch.equal(scaled, RotaryEmbedding._apply_scaling(None, plain, factor=8.0))
    assert torch.equal(scaled[:4], plain[:4]) and torch.allclose(scaled[5:], plain[5:] / 8)
    assert plain[4] / 8 < scaled[4] < plain[4]
    # the inference model, which turns queries and keys itself, uses the same frequencies
    torch.testing.assert_close(rotary_inv_freq(cfg).float(), scaled, rtol=1e-6, atol=0)
    torch.testing.assert_close(rotary_inv_freq(cfg.replace(rope_scaling_factor=None)).float(), plain,
                               rtol=1e-6, atol=0)


def test_rope_scaling_changes_the_logits_as_transformers_llama3_does(tp1):
    checkpoint = pytest.importorskip("megatron_ext.checkpoint")
    cfg = _rope_scaled_tiny()
    hf = _tiny_hf(cfg, rope_scaling=LLAMA31_ROPE_SCALING)
    with torch.no_grad():  # sharper attention, so that where a token sits matters
        for name, p in hf.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6)
    (sd,) = checkpoint.hf_to_mcore(hf.state_dict(), cfg, 1)
    scaled, plain = build_model(cfg).eval(), build_model(cfg.replace(rope_scaling_factor=None)).eval()
    for model in (scaled, plain):
        model.load_state_dict(sd, strict=False)
    tokens = torch.randint(0, cfg.vocab_size, (2, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, unscaled = forward_logits(scaled, tokens, cfg.vocab_size), forward_logits(plain, tokens, cfg.vocab_size)
        ref = hf(tokens).logits
    assert ((ours - ref).norm() / ref.norm()).item() < 1e-5
    assert ((unscaled - ours).norm() / ref.norm()).item() > 1e-3


def test_linear_overrides_swap_the_four_projections(tp1):
    class Col(ColumnParallelLinear):
        pass

    class Row(RowParallelLinear):
        pass

    cfg = get_config("tiny")
    plain = build_model(cfg)
    swapped = build_model(cfg, linear_overrides={"linear_qkv": Col, "linear_proj": Row,
                                                 "linear_fc1": Col, "linear_fc2": Row})
    for layer in swapped.decoder.layers:
        assert type(layer.self_attention.linear_qkv) is Col and type(layer.mlp.linear_fc1) is Col
        assert type(layer.self_attention.linear_proj) is Row and type(layer.mlp.linear_fc2) is Row
    swapped.load_state_dict(plain.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (1, 16))
    torch.testing.assert_close(forward_logits(swapped, tokens), forward_logits(plain, tokens), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown linear override.*linear_q"):
        llama_layer_spec({"linear_q": Col})


def test_bf16_model_runs(tp1):
    cfg = get_config("tiny")
    model = build_model(cfg, params_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    logits = forward_logits(model, torch.randint(0, cfg.vocab_size, (1, 16)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    with pytest.raises(ConfigError, match="params_dtype"):
        build_model(cfg, params_dtype=torch.float64)


def test_cpu_rng_tracker_forks_an_isolated_stream(tp1):
    platform.seed_everything(5)
    with get_cuda_rng_tracker().fork():
        first = torch.rand(4)
    outside = torch.rand(4)
    platform.seed_everything(5)
    with get_cuda_rng_tracker().fork():
        again = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        continued = torch.rand(4)
    assert torch.equal(first, again) and not torch.equal(first, continued)
    torch.manual_seed(5)
    assert torch.equal(outside, torch.rand(4))  # the default stream did not move inside the fork


def test_init_distributed_is_idempotent_and_checks_tp(tp1):
    assert platform.init_distributed(1) == tp1
    assert (tp1.world_size, tp1.tp_size, tp1.dp_size) == (1, 1, 1)
    with pytest.raises(ValueError, match="tensor-parallel size 2 does not divide the world size 1"):
        platform.init_distributed(2)
    assert platform.causal_attention_mask(3).tolist() == [[[[False, True, True], [False, False, True],
                                                            [False, False, False]]]]


def test_tiny_model_memorises_real_text(tp1, botchan_bpe_model, botchan_txt):
    """Adam steps on a fixed Botchan batch (real SentencePiece ids) drive the loss from uniform to low."""
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(botchan_bpe_model))
    cfg = get_config("tiny")
    assert sp.get_piece_size() <= cfg.vocab_size
    ids = torch.tensor(sp.encode(botchan_txt.read_text(encoding="utf-8")[:20_000]))
    seq, batch = 64, 8
    w = ids[: batch * (seq + 1)].view(batch, seq + 1)
    model = build_model(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = lm_loss(model, w[:, :-1], w[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(cfg.padded_vocab_size(1))) < 0.5  # starts near uniform
    assert losses[-1] < 1.5
    # the per-token loss agrees with a plain cross entropy over the gathered logits
    with torch.no_grad():
        logits = forward_logits(model, w[:, :-1])
        ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        torch.testing.assert_close(lm_loss(model, w[:, :-1], w[:, 1:]), ref, rtol=1e-5, atol=1e-5)


def test_model_is_causal(tp1):
    cfg = get_config("tiny")
    model = build_model(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(3))
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = forward_logits(model, tokens), forward_logits(model, changed)
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])
