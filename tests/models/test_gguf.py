"""GGUF import of real weights (SmolLM2-135M-Instruct, Q4_1) and what it must reproduce.

The imported Hugging Face directory is checked by transformers (greedy " Rome"), by our
megatron-core model (same greedy answer, logits equal to transformers' in fp32), by a
bit-exact HF -> megatron -> HF round trip, and its tokenizer against transformers' own
GGUF tokenizer conversion and the data layer's HuggingFaceTokenizer.
"""
import json
import struct

import numpy as np
import pytest
import torch
import transformers

from megatron_ext.models import build_model, get_config
from megatron_ext import checkpoint as ckpt
from megatron_ext.models.build import forward_logits
from megatron_ext.checkpoint.gguf import GGUFImportError, import_gguf, read_gguf, unpermute_rotary
from megatron_ext.checkpoint import read_hf_checkpoint

PROMPT = "The capital of Italy is"


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory, smollm2_gguf_path):
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    import_gguf(smollm2_gguf_path, out)
    return out


@pytest.fixture(scope="module")
def smol_hf_model(smol_dir):
    return transformers.LlamaForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smol_tokenizer(smol_dir):
    return transformers.AutoTokenizer.from_pretrained(smol_dir)


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's permutation (HF rotate-half rows -> llama.cpp interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.randn(3 * 64, 10)
    permuted = _llama_cpp_permute(w, 3)
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rotary(permuted, 3), w)
    # head 0's row 1 (first half) comes from permuted row 2 (interleaved pair 1, element 0)
    assert torch.equal(unpermute_rotary(permuted, 3)[1], permuted[2])


def test_config_from_gguf_metadata(smol_dir):
    cfg, _ = read_hf_checkpoint(smol_dir)
    named = get_config("smollm2-135m")
    assert cfg.replace(name=named.name) == named
    hf = json.loads((smol_dir / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["tie_word_embeddings"] is True
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (1, 2)


def test_transformers_greedy_continuation_is_rome(smol_hf_model, smol_tokenizer):
    ids = smol_tokenizer(PROMPT, return_tensors="pt").input_ids
    out = smol_hf_model.generate(ids, max_new_tokens=2, do_sample=False)
    assert smol_tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Rome")


def test_our_model_matches_transformers_and_says_rome(tp1, smol_dir, smol_hf_model, smol_tokenizer):
    cfg, hf_sd = read_hf_checkpoint(smol_dir)
    (sd,) = ckpt.hf_to_mcore(hf_sd, cfg, 1)
    model = build_model(cfg).eval()
    ckpt.load_into_model(model, sd)
    text = PROMPT + " Rome, and the capital of France is Paris. Rivers and mountains shape the land."
    tokens = smol_tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = forward_logits(model, tokens, cfg.vocab_size)
        ref = smol_hf_model(tokens).logits
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, rel
    # greedy decoding with our model
    ids = smol_tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(2):
            nxt = forward_logits(model, ids, cfg.vocab_size)[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert smol_tokenizer.decode(ids[0, -2:]).startswith(" Rome")


def test_smollm2_hf_megatron_hf_round_trip_is_bit_exact(smol_dir, tmp_path):
    cfg, hf_sd = read_hf_checkpoint(smol_dir)
    three = ckpt.hf_to_mcore(hf_sd, cfg, 3)  # 9 heads / 3 groups: TP=3
    assert "output_layer.weight" not in three[0]
    back = ckpt.mcore_to_hf(ckpt.reshard(three, cfg, 1), cfg)
    assert set(back) == set(hf_sd)
    for k in hf_sd:
        assert torch.equal(back[k], hf_sd[k]), k


def test_tokenizer_matches_transformers_gguf_conversion(smol_dir, smollm2_gguf_path, botchan_txt):
    from megatron_ext.data.tokenizers import build_tokenizer

    ours = build_tokenizer("HuggingFaceTokenizer", str(smol_dir))
    assert (ours.bos, ours.eos, ours.vocab_size) == (1, 2, 49152)
    ref = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name)
    text = botchan_txt.read_text(encoding="utf-8")
    body = text[: text.index("End of the Project Gutenberg")] if "End of the Project Gutenberg" in text else text[:200_000]
    ids = ours.tokenize(body)
    assert len(ids) > 50_000
    assert ids == ref(body).input_ids
    assert ours.detokenize(ids) == body
    assert ours.tokenize("<|im_start|>user\nHi<|im_end|>") == ref("<|im_start|>user\nHi<|im_end|>").input_ids
    # llama.cpp's "smollm" pre-tokenizer isolates every digit before GPT-2's regex, so "  2" is
    # "ĠĠ" + "2" (transformers' GGUF conversion ignores that rule and differs exactly here)
    ours_pieces = [ours.tok.id_to_token(i) for i in ours.tokenize("Section  2018.")]
    assert ours_pieces == ["Section", "ĠĠ", "2", "0", "1", "8", "."]
    # the same files through transformers
    assert transformers.AutoTokenizer.from_pretrained(smol_dir)(body).input_ids == ids


def _write_gguf(path, arch: str, tokenizer_model: str = "gpt2"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(["a", "b", "c", "ab"])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_other_architecture_is_rejected_by_name(tmp_path):
    path = tmp_path / "phi.gguf"
    _write_gguf(path, "phi2")
    with pytest.raises(GGUFImportError, match=r"phi\.gguf: GGUF architecture 'phi2' is not supported"):
        read_gguf(path)
    with pytest.raises(GGUFImportError, match="phi.gguf"):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tokenizer_and_bad_files(tmp_path):
    path = tmp_path / "spm.gguf"
    _write_gguf(path, "llama", tokenizer_model="llama")
    with pytest.raises(GGUFImportError, match="embedded tokenizer model 'llama' is not supported"):
        read_gguf(path)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFImportError, match="bad.gguf: not a readable GGUF file"):
        read_gguf(bad)
    with pytest.raises(GGUFImportError, match="missing.gguf: GGUF file not found"):
        read_gguf(tmp_path / "missing.gguf")


def test_corrupt_body_names_the_field_or_tensor(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, "llama")
    data = path.read_bytes()
    key = b"tokenizer.ggml.tokens"
    at = data.index(key) + len(key) + 4 + 4  # after the value type and the item type: the item count
    bad = tmp_path / "badfield.gguf"
    bad.write_bytes(data[:at] + struct.pack("<Q", 10**12) + data[at + 8:])
    with pytest.raises(GGUFImportError, match=r"badfield\.gguf: metadata field 'tokenizer\.ggml\.tokens': array "
                                              r"of 1000000000000 items"):
        read_gguf(bad)
    short = tmp_path / "short.gguf"
    short.write_bytes(data[:-16])
    with pytest.raises(GGUFImportError, match=r"short\.gguf: tensor 'token_embd\.weight' .* runs past the end"):
        read_gguf(short)
