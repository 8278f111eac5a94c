"""Inference of exported 2:4 models (megatron_ext.inference) on a CPU.

The sparse kernels need a CUDA GPU (benchmarks/bench_sparse_infer_gpu.py checks them there);
here: the 2:4 layout in plain torch, the measured-table selection, the CPU fallback to dense
masked weights, the model against transformers, and loading a directory made by the repo's
own export (one-shot magnitude pruning of the tiny model, ``export_sparse --format hf``)
with ``tools/generate.py`` on it.
"""
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

from megatron_ext.inference import (KernelTable, SparseFormatError, SparseLinear, check_2of4, greedy_generate,
                                    load_sparse_model, model_from_state_dict, pack_2of4, unpack_2of4)
from megatron_ext.inference.sparse import Choice, magnitude_2of4_mask, packed_bytes, read_table, write_table
from megatron_ext.models import get_config

REPO = Path(__file__).resolve().parents[2]
CFG = get_config("tiny", num_query_groups=2)


def _two_of_four(o, i, seed=0):
    w = torch.randn(o, i, generator=torch.Generator().manual_seed(seed))
    return w * magnitude_2of4_mask(w)


# --------------------------------------------------------------------------- layout


def test_pack_unpack_round_trips_including_groups_with_fewer_than_two_nonzeros():
    w = _two_of_four(48, 64)
    w[0, :4] = 0                       # an empty group
    w[1, 4:8] = torch.tensor([0.0, 0.0, 0.0, 3.0])   # one non-zero, at the last position
    values, meta = pack_2of4(w)
    assert values.shape == (48, 32) and meta.shape == (48, 8) and meta.dtype == torch.uint8
    assert torch.equal(unpack_2of4(values, meta), w)
    assert packed_bytes(w.to(torch.bfloat16)) == values.numel() * 2 + meta.numel()
    assert packed_bytes(w.to(torch.bfloat16)) / (w.numel() * 2) == 0.5625


def test_pack_keeps_values_in_input_order_with_their_positions():
    w = torch.tensor([[0.0, 5.0, 0.0, -2.0, 7.0, 1.0, 0.0, 0.0]])
    values, meta = pack_2of4(w)
    assert values.tolist() == [[5.0, -2.0, 7.0, 1.0]]
    assert meta.tolist() == [[(1 | 3 << 2) | ((0 | 1 << 2) << 4)]]


def test_cusparselt_layout_places_each_groups_entry_where_the_library_does():
    """The positions below were read off ``torch._cslt_compress`` on an H100 (cuSPARSELt 0.8) by
    compressing matrices whose groups' patterns spell out their own index bit by bit; the
    benchmark checks the whole buffer byte for byte against the library on the GPU."""
    from megatron_ext.inference.sparse import cusparselt_dense, cusparselt_layout, meta_nibble_index

    out_f, in_f = 128, 64                       # 2 row tiles x 2 column tiles of 64 rows x 8 groups
    observed = {(0, 0): 0, (8, 0): 1, (0, 4): 2, (8, 4): 3, (0, 1): 4, (1, 0): 16, (16, 0): 128,
                (0, 8): 512, (64, 0): 1024, (15, 7): 127}
    for (r, g), e in observed.items():
        assert int(meta_nibble_index(torch.tensor(r), torch.tensor(g), in_f)) == e
    rows, groups = torch.arange(out_f)[:, None], torch.arange(in_f // 4)[None, :]
    assert meta_nibble_index(rows, groups, in_f).unique().numel() == out_f * in_f // 4   # a permutation
    w = _two_of_four(out_f, in_f).to(torch.bfloat16)
    w[5, 8:12] = torch.tensor([0.0, 0.0, 0.0, 2.0])                                       # fewer than 2 kept
    buf = cusparselt_layout(w)
    assert buf.dtype == torch.bfloat16 and buf.numel() * 2 == w.numel() * 2 * 9 // 16
    values, _ = pack_2of4(w)
    assert torch.equal(buf[: w.numel() // 2], values.reshape(-1))                          # values first, row-major
    entry = int(meta_nibble_index(torch.tensor(9), torch.tensor(5), in_f))                 # group 5 of row 9
    byte = int(buf.view(torch.uint8)[w.numel() + entry // 2])
    nib = (byte >> (4 * (entry % 2))) & 0xF
    kept = (w[9, 20:24] != 0).nonzero().flatten().tolist()
    assert nib == (kept[0] | kept[1] << 2)
    assert torch.equal(cusparselt_dense(buf, out_f, in_f), w)
    with pytest.raises(SparseFormatError, match="out % 64"):
        cusparselt_layout(w[:32])


def test_a_dense_weight_is_refused_naming_row_and_group():
    w = _two_of_four(8, 16)
    w[3, 8:12] = 1.0
    with pytest.raises(SparseFormatError, match=r"w: row 3, inputs 8-11 keep 4 non-zeros"):
        check_2of4(w, "w")
    with pytest.raises(SparseFormatError):
        SparseLinear(w, name="w")


# --------------------------------------------------------------------------- kernel choice


def _table():
    t = KernelTable("test")
    t.set(64, 32, 1, Choice("dense", 0, 0.01, 0.02))
    t.set(64, 32, 16, Choice("dense", 0, 0.02, 0.03))
    t.set(64, 32, 4096, Choice("sparse", 3, 1.0, 0.7))
    return t


def test_table_picks_the_nearest_measured_token_count_on_a_log_scale():
    t = _table()
    assert t.choose(64, 32, 1).kernel == "dense"
    assert t.choose(64, 32, 200).kernel == "dense"       # log-nearer to 16 than to 4096
    assert t.choose(64, 32, 300).kernel == "sparse"
    assert t.choose(64, 32, 4090).alg_id == 3               # the same padded size as the search's
    c = t.choose(64, 32, 8192)
    assert (c.kernel, c.alg_id) == ("sparse", 0)            # another size: cuSPARSELt's default algorithm
    assert t.choose(128, 32, 4096).kernel == "dense"     # a shape never measured
    assert t.kernels_for(64, 32) == {"dense", "sparse"}


def test_table_round_trips_through_its_cache_file_per_key(tmp_path):
    path = tmp_path / "table.json"
    write_table(path, _table())
    other = KernelTable("other GPU")
    other.set(8, 8, 8, Choice("sparse", 1, 2.0, 1.0))
    write_table(path, other)
    back = read_table(path, "test")
    assert back.to_json() == _table().to_json()
    assert read_table(path, "other GPU").choose(8, 8, 8).alg_id == 1
    assert read_table(path, "missing").entries == {}
    path.write_text("not json")
    assert read_table(path, "test").entries == {}
    assert "| 64x32 | 4096 | 1.0000 | 0.7000 (3) | 1.43x | n/a |  | sparse | 1.43x |" in _table().rows()
    gemv = _table()
    gemv.set(64, 32, 1, Choice("gemv", 0, 0.01, 0.02, 0.005, 6))
    write_table(path, gemv)
    assert read_table(path, "test").to_json() == gemv.to_json()
    assert "| 64x32 | 1 | 0.0100 | 0.0200 (0) | 0.50x | 0.0050 (6) | 2.00x | gemv | 2.00x |" in gemv.rows()


def test_table_offers_the_decode_kernel_only_up_to_its_token_limit():
    from megatron_ext.inference.sparse import GEMV_MAX_TOKENS

    t = KernelTable("test")
    t.set(64, 32, 16, Choice("gemv", 5, 0.02, 0.03, 0.01, 2))
    t.set(64, 32, 4096, Choice("dense", 0, 1.0, 1.2))
    c = t.choose(64, 32, 12)
    assert (c.kernel, c.gemv_config) == ("gemv", 2)
    t.set(64, 32, 16 * GEMV_MAX_TOKENS, Choice("gemv", 5, 0.02, 0.03, 0.01, 2))   # measured beyond the limit
    assert t.choose(64, 32, 16 * GEMV_MAX_TOKENS).kernel == "sparse"
    # without a dense copy: the faster compressed kernel where dense had won
    assert t.choose(64, 32, 4096).best_compressed().kernel == "sparse"
    assert Choice("dense", 0, 0.01, 0.03, 0.02, 4).best_compressed().kernel == "gemv"
    assert Choice("dense", 0, 0.01, 0.03).best_compressed().kernel == "sparse"     # gemv never measured


def test_sparse_linear_on_cpu_keeps_the_dense_masked_weight():
    w = _two_of_four(64, 32)
    layer = SparseLinear(w, _table())
    assert layer.compressed is None and layer.weight is w
    x = torch.randn(5, 32)
    torch.testing.assert_close(layer(x), x @ w.t())
    assert layer.choice(4096).kernel == "dense"


@pytest.fixture
def stand_in_kernels(monkeypatch):
    """cuSPARSELt's calls replaced by plain matmuls that log each call, so the choice and
    the layouts around the kernel run on a CPU."""
    import megatron_ext.inference.sparse as sparse

    calls = []

    def sparse_mm(a, b, bias=None, alpha=None, out_dtype=None, transpose_result=False, alg_id=0, **_):
        assert b.shape[1] % sparse.DENSE_ROW_MULTIPLE == 0, "dense operand rows not padded"
        calls.append(("sparse", b.shape[1], alg_id))
        y = a @ b
        return y.t().contiguous() if transpose_result else y

    monkeypatch.setattr(sparse, "sparse_kernels_available", lambda device=None: True)
    monkeypatch.setattr(torch, "_cslt_compress", lambda w: w.clone())
    monkeypatch.setattr(torch, "_cslt_sparse_mm", sparse_mm)
    return calls


def test_sparse_linear_runs_the_kernel_the_table_picks_per_token_count(stand_in_kernels):
    w = _two_of_four(64, 32)
    layer = SparseLinear(w, _table())
    assert layer.compressed is not None and layer.weight is not None     # both kernels are picked somewhere
    for tokens in (1, 3, 4096, 5000):
        x = torch.randn(tokens, 32)
        torch.testing.assert_close(layer(x.reshape(1, tokens, 32)), (x @ w.t()).reshape(1, tokens, 64))
    assert stand_in_kernels == [("sparse", 4096, 3), ("sparse", 5000, 0)]
    stand_in_kernels.clear()
    small = SparseLinear(w, _table(), keep_dense=False)                 # the memory bound: compressed only
    assert small.weight is None and small.weight_bytes() == w.numel() * w.element_size()
    torch.testing.assert_close(small(torch.ones(3, 32)), torch.ones(3, 32) @ w.t())
    assert stand_in_kernels == [("sparse", 8, 0)]                         # 3 rows padded to 8


# --------------------------------------------------------------------------- the model


def _hf_state_dict(cfg, seed=0):
    from megatron_ext.checkpoint import hf_tensor_shapes

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in hf_tensor_shapes(cfg).items():
        t = torch.randn(shape, generator=gen) * (0.02 if len(shape) == 2 else 0.1) + (1.0 if len(shape) == 1 else 0)
        sd[k] = t * magnitude_2of4_mask(t) if k.endswith("proj.weight") else t
    return sd


@pytest.mark.parametrize("cfg", [CFG, CFG.replace(rotary_base=500000.0, rope_scaling_factor=8.0)],
                         ids=["rope", "llama3-scaled-rope"])
def test_model_matches_transformers_in_prefill_and_token_by_token_decode(cfg):
    transformers = pytest.importorskip("transformers")
    from megatron_ext.checkpoint import to_hf_config

    sd = _hf_state_dict(cfg)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**to_hf_config(cfg), attn_implementation="sdpa"))
    hf.load_state_dict(sd)
    model = model_from_state_dict(cfg, sd, dtype=torch.float32, device="cpu")
    assert model.notes and "running the dense masked weights" in model.notes[0]
    ids = torch.randint(0, cfg.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        cache = model.new_cache(1, 16)
        torch.testing.assert_close(model(ids, cache, torch.arange(12), prefill=True), ref, atol=1e-5, rtol=1e-4)
        cache = model.new_cache(1, 16)
        steps = [model(ids[:, :6], cache, torch.arange(6), prefill=True)]
        steps += [model(ids[:, i:i + 1], cache, torch.tensor([i])) for i in range(6, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), ref, atol=1e-5, rtol=1e-4)
    expected = hf.generate(ids, max_new_tokens=6, do_sample=False)[0, 12:].tolist()
    assert greedy_generate(model, ids[0].tolist(), 6).tokens == expected


# --------------------------------------------------------------------------- an exported directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, sample_dir):
    """The tiny model, magnitude-pruned 2:4 and exported to a Hugging Face directory by the repo's tools."""
    from megatron_ext import platform
    from megatron_ext.checkpoint import model_state_dict, save_checkpoint
    from megatron_ext.models import build_model
    from megatron_ext.sparsity.export import export_sparse
    from megatron_ext.sparsity.oneshot import PruneOptions, prune_checkpoint

    import sentencepiece

    root = tmp_path_factory.mktemp("infer")
    tok = root / "tok"
    tok.mkdir()
    shutil.copyfile(sample_dir / "tokenizer.model", tok / "tokenizer.model")
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(tok / "tokenizer.model")).vocab_size()
    cfg = get_config("tiny", vocab_size=vocab)
    platform.init_distributed(1)
    platform.seed_everything(3)
    save_checkpoint(root / "dense", [model_state_dict(build_model(cfg))], cfg, tokenizer_dir=tok)
    prune_checkpoint(root / "dense", root / "pruned", PruneOptions("magnitude", 2, 4))
    export_sparse(root / "pruned", root / "hf", "hf")
    return root / "hf"


def test_loading_an_export_gives_the_dense_models_logits(exported):
    sparse = load_sparse_model(exported, dtype=torch.float32, device="cpu")
    dense = load_sparse_model(exported, sparse=False, dtype=torch.float32, device="cpu")
    assert all(isinstance(m, SparseLinear) for m in sparse.linears())
    assert len(sparse.linears()) == 4 * sparse.cfg.num_layers
    ids = torch.randint(0, sparse.cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = sparse(ids, sparse.new_cache(1, 10), torch.arange(10), prefill=True)
        b = dense(ids, dense.new_cache(1, 10), torch.arange(10), prefill=True)
    assert torch.equal(a, b)


def test_loading_refuses_a_directory_whose_weights_are_not_2of4(exported, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.mlp.down_proj.weight"][0, :4] = 1.0
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(SparseFormatError, match=r"model\.layers\.1\.down: row 0, inputs 0-3"):
        load_sparse_model(bad, device="cpu")


def test_generate_tool_prints_both_continuations_and_their_speed(exported, capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("tool_generate", REPO / "tools" / "generate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--load", str(exported), "--prompt", "To be, or not", "--max-new-tokens", "5",
                      "--kernel-table", str(tmp_path / "t.json"), "--compressed-only"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("[sparse] To be, or not") and lines[2].startswith("[dense] To be, or not")
    assert "tokens/s" in lines[1] and "tokens/s" in lines[3]
    assert "sparse vs dense:" in lines[-1] and "tokens agree" in lines[-1]
    assert "running the dense masked weights" in err
    assert tool.main(["--load", str(tmp_path / "missing")]) == 1
    assert "error:" in capsys.readouterr().err


def test_the_package_needs_neither_megatron_core_nor_transformers():
    import subprocess
    import sys

    code = ("import sys; sys.modules['megatron'] = None; sys.modules['transformers'] = None; "
            "import megatron_ext.inference, importlib; importlib.import_module('megatron_ext.inference.load')")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
