"""Perplexity under torchrun (gloo): TP=2 and TP=3, with data parallelism, equal TP=1.

Rank 0 writes one small LLaMA (random weights, the real 32k LLaMA SentencePiece
tokenizer) as our checkpoint at TP=1 and at TP=2; every rank then evaluates the same
real text at each TP size the world allows, loading a checkpoint saved at another TP
(resharded in memory) as well as one saved at the same TP. Assertions come after the
last collective so a failing rank cannot leave the others waiting.
"""
import math
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_ext import checkpoint as ckpt
from megatron_ext.models.config import LlamaConfig
from megatron_ext.checkpoint import hf_tensor_shapes
from megatron_ext.evaluation import evaluate

SEQ = 64


def _write_checkpoints(root: Path, tokenizer_model: Path, text_src: Path) -> None:
    # 6 heads / 6 groups / ffn 192: TP 1, 2 and 3 all divide the model
    cfg = LlamaConfig(name="tiny-mha", num_layers=2, hidden_size=96, ffn_hidden_size=192, num_attention_heads=6,
                      num_query_groups=6, vocab_size=32000, max_position_embeddings=256)
    gen = torch.Generator().manual_seed(0)
    sd = {k: (torch.rand(shape, generator=gen) + 0.5 if len(shape) == 1 else
              torch.randn(shape, generator=gen) * 0.2)
          for k, shape in hf_tensor_shapes(cfg).items()}  # random weights under Hugging Face names
    tok = root / "tok"
    tok.mkdir()
    (tok / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    for tp in (1, 2):
        ckpt.save_checkpoint(root / f"tp{tp}", ckpt.hf_to_mcore(sd, cfg, tp), cfg, tokenizer_dir=tok)
    text = text_src.read_text(encoding="utf-8")
    (root / "text.txt").write_text(text[: text.index("\n", 5000) + 1], encoding="utf-8")


def _shared_dir(llama_sp_model, botchan_txt) -> Path:
    """Rank 0 writes the inputs; every rank learns the directory (or rank 0's error)."""
    msg = [None]
    if dist.get_rank() == 0:
        try:
            root = Path(tempfile.mkdtemp(prefix="eval-ppl-tp-"))
            _write_checkpoints(root, llama_sp_model, botchan_txt)
            msg = [str(root)]
        except Exception as e:  # tell the other ranks instead of leaving them in the broadcast
            msg = [f"error: {e!r}"]
    dist.broadcast_object_list(msg, src=0)
    assert not msg[0].startswith("error:"), msg[0]
    return Path(msg[0])


def test_perplexity_does_not_depend_on_tp_or_dp(parallel, llama_sp_model, botchan_txt):
    parallel(1)
    world = dist.get_world_size()
    root = _shared_dir(llama_sp_model, botchan_txt)
    text = root / "text.txt"
    results = {}
    for tp in (1, 2, 3):
        if world % tp:
            continue
        info = parallel(tp)
        for saved in (1, 2):
            results[(tp, saved)] = (evaluate(root / f"tp{saved}", seq_length=SEQ, text_file=text,
                                             micro_batch_size=2), info.dp_size)
    dist.barrier()
    if dist.get_rank() == 0:
        import shutil
        shutil.rmtree(root, ignore_errors=True)

    ref, _ = results[(1, 1)]
    assert ref.windows >= 20 and ref.tokens == ref.windows * (SEQ - 1)
    assert math.isfinite(ref.ppl) and ref.ppl > 1
    assert len({tp for tp, _ in results}) >= 2  # the world allows TP=1 and at least one more
    for (tp, saved), (res, dp) in results.items():
        assert res.tokens == ref.tokens and res.windows == ref.windows
        # every window was evaluated by some data-parallel rank and reduced to all
        assert all(v > 0 for v in res.window_nll)
        assert abs(res.ppl / ref.ppl - 1) < 1e-5, (tp, saved, dp)
        for a, b in zip(res.window_nll, ref.window_nll):
            assert abs(a - b) <= 1e-5 * abs(b), (tp, saved, a, b)
