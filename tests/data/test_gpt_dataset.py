"""GPTDataset against megatron-core 0.16.1's GPTDataset, and the index cache.

The corpus is the botchan novel tokenized with its own SentencePiece model, cut into
documents of 1 to 120 lines, written with megatron-core's IndexedDatasetBuilder and
read back by our IndexedDataset. megatron-core's BlendedMegatronDatasetBuilder builds
the reference datasets from the same files and config; every sample is compared.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest

from megatron_ext.data.blend import build_gpt_datasets
from megatron_ext.data.gpt_dataset import DatasetError, GPTDatasetConfig

SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


# -- corpus and reference builder (shared with test_blend.py) -----------------------------

def line_documents(text: str, seed: int) -> list:
    """Cut a text into documents of a random number of lines (1 to 120)."""
    lines = [line for line in text.split("\n") if line.strip()]
    rng = np.random.default_rng(seed)
    docs, i = [], 0
    while i < len(lines):
        k = int(rng.choice([1, 2, 3, 5, 8, 40, 120]))
        docs.append("\n".join(lines[i:i + k]))
        i += k
    return docs


def write_corpus(prefix: str, docs: list, model_path) -> None:
    """Tokenize with SentencePiece (EOS closes every document) and write with megatron-core."""
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for ids in sp.encode(docs):
        ids = ids + [sp.eos_id()]
        builder.add_document(np.array(ids, dtype=np.int64), [len(ids)])
    builder.finalize(prefix + ".idx")


def megatron_tokenizer(model_path):
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(str(model_path), metadata_path={"library": "sentencepiece"})


class PadOverride:
    """megatron-core's tokenizer with another pad id (its attributes otherwise)."""

    def __init__(self, base, pad: int) -> None:
        self._base, self.pad = base, pad

    def __getattr__(self, name):
        return getattr(self._base, name)

    @property
    def unique_identifiers(self):
        ids = dict(self._base.unique_identifiers)
        ids["pad"] = self.pad
        return ids


def megatron_build(tokenizer, blend, split, sizes, seq, seed, **options):
    """megatron-core's datasets; its default per-prefix cache is cleared first (its key
    leaves out options such as add_extra_token_to_sequence)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig as MegatronConfig

    for prefix in blend[0]:
        shutil.rmtree(os.path.join(prefix, "cache"), ignore_errors=True)
    flags = {k: options.pop(k, False) for k in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss",
                                                 "create_attention_mask")}
    config = MegatronConfig(random_seed=seed, sequence_length=seq, blend=blend, split=split,
                            tokenizer=tokenizer, path_to_cache=None, **flags, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()


def _forget_cached_masks(dataset):
    """megatron-core caches the loss mask of the first sample it serves and, on that first
    call, zeroes pad positions in the cached tensor itself, so later samples inherit the
    first one's pad positions. We compute every sample's mask afresh; clearing megatron's
    cache flag before each access compares against its per-sample result."""
    for d in getattr(dataset, "datasets", [dataset]):
        d.masks_and_position_ids_are_cached = False


def assert_same_samples(theirs, ours, attention=False):
    assert (theirs is None) == (ours is None)
    if theirs is None:
        return
    assert len(ours) == len(theirs)
    for i in range(len(theirs)):
        _forget_cached_masks(theirs)
        a, b = theirs[i], ours[i]
        for key in SAMPLE_KEYS + (("attention_mask",) if attention else ()):
            np.testing.assert_array_equal(b[key], a[key].numpy(), err_msg=f"sample {i} {key}")
            assert b[key].dtype == a[key].numpy().dtype, key
        if "dataset_id" in a:
            assert b["dataset_id"] == int(a["dataset_id"])


def our_config(tokenizer, seq, seed, **kw):
    return GPTDatasetConfig(sequence_length=seq, random_seed=seed, eod_token_id=tokenizer.eod,
                            pad_token_id=tokenizer.pad, **kw)


# -- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory, botchan_bpe_model, botchan_txt):
    root = tmp_path_factory.mktemp("gpt_corpus")
    prefix = str(root / "botchan")
    write_corpus(prefix, line_documents(botchan_txt.read_text(encoding="utf-8"), seed=0), botchan_bpe_model)
    return prefix


@pytest.fixture(scope="module")
def tokenizer(botchan_bpe_model):
    return megatron_tokenizer(botchan_bpe_model)


def _train_tokens(prefix, split_ratio):
    from megatron_ext.data.indexed_dataset import IndexedDataset

    lengths = IndexedDataset(prefix).sequence_lengths
    end = int(round(split_ratio * float(len(lengths))))
    return int(lengths[:end].sum())


# -- sample order and content -------------------------------------------------------------

@pytest.mark.parametrize("seq", [64, 257])
@pytest.mark.parametrize("plan", ["one_epoch", "separate_final_epoch", "joint_final_epoch"])
def test_single_dataset_matches_megatron(corpus, tokenizer, seq, plan):
    per_epoch = (_train_tokens(corpus, 0.8) - 1) // seq
    train = {"one_epoch": per_epoch // 2,
             "separate_final_epoch": 2 * per_epoch + per_epoch // 10,
             "joint_final_epoch": 2 * per_epoch + (9 * per_epoch) // 10}[plan]
    sizes = [train, 3 * per_epoch // 10, 17]  # valid spans several epochs of its 10%
    seed = 1234 if seq == 64 else 7
    ours = build_gpt_datasets(our_config(tokenizer, seq, seed), corpus, "80,10,10", sizes)
    theirs = megatron_build(tokenizer, ([corpus], None), "80,10,10", sizes, seq, seed)
    assert ours[0].separate_final_epoch == (plan == "separate_final_epoch")
    assert ours[0].num_epochs == (1 if plan == "one_epoch" else 3)
    assert ours[1].num_epochs > 1
    for t, o in zip(theirs, ours):
        assert_same_samples(t, o)


def test_split_without_test_and_98_2_0(corpus, tokenizer):
    ours = build_gpt_datasets(our_config(tokenizer, 128, 99), corpus, "98/2/0", [500, 40, 0])
    theirs = megatron_build(tokenizer, ([corpus], None), "98,2,0", [500, 40, 0], 128, 99)
    assert ours[2] is None and theirs[2] is None
    for t, o in zip(theirs, ours):
        assert_same_samples(t, o)


def test_options_match_megatron(corpus, tokenizer):
    """No extra token, partial last validation sample kept (padded), EOD loss masking,
    position ids and attention mask reset at EOD."""
    options = dict(add_extra_token_to_sequence=False, drop_last_partial_validation_sequence=False,
                   eod_mask_loss=True, reset_position_ids=True, reset_attention_mask=True)
    ours = build_gpt_datasets(our_config(tokenizer, 96, 5, create_attention_mask=True, **options),
                              corpus, "70,20,10", [60, 300, 10])
    theirs = megatron_build(tokenizer, ([corpus], None), "70,20,10", [60, 300, 10], 96, 5,
                            create_attention_mask=True, **options)
    assert ours[1].num_epochs == 2
    for t, o in zip(theirs, ours):
        assert_same_samples(t, o, attention=True)
    # The partial last validation sample is padded: its tail is 0 with no loss.
    last = [ours[1][i] for i in range(len(ours[1]))]
    assert any(s["loss_mask"][-1] == 0 and s["tokens"][-1] == 0 for s in last)
    # The padding sample (idx None) is sample 0 with no loss, as in megatron-core.
    pad_sample = ours[0][None]
    assert not pad_sample["loss_mask"].any()
    np.testing.assert_array_equal(pad_sample["tokens"], theirs[0][None]["tokens"].numpy())


@pytest.mark.parametrize("pad", ["eod", "frequent_token"])
def test_pad_token_matches_megatron(corpus, tokenizer, pad):
    """A pad id equal to EOD is dropped (-1); a pad id that is a real token masks it."""
    from megatron_ext.data.indexed_dataset import IndexedDataset

    tokens = np.asarray(IndexedDataset(corpus).document(0), dtype=np.int64)
    pad_id = tokenizer.eod if pad == "eod" else int(np.bincount(tokens).argmax())
    wrapped = PadOverride(tokenizer, pad_id)
    ours = build_gpt_datasets(our_config(wrapped, 64, 3), corpus, "90,10,0", [200, 20, 0])
    theirs = megatron_build(wrapped, ([corpus], None), "90,10,0", [200, 20, 0], 64, 3)
    for t, o in zip(theirs, ours):
        assert_same_samples(t, o)
    masked = sum(int((ours[0][i]["loss_mask"] == 0).sum()) for i in range(len(ours[0])))
    assert (masked == 0) == (pad == "eod")


def test_torch_tensors(corpus, tokenizer):
    torch = pytest.importorskip("torch")
    ours = build_gpt_datasets(our_config(tokenizer, 64, 3, return_torch=True), corpus, "90,10,0", [50, 5, 0])
    theirs = megatron_build(tokenizer, ([corpus], None), "90,10,0", [50, 5, 0], 64, 3)
    sample = ours[0][3]
    assert all(isinstance(sample[k], torch.Tensor) for k in SAMPLE_KEYS)
    for k in SAMPLE_KEYS:
        assert torch.equal(sample[k], theirs[0][3][k])


# -- errors -------------------------------------------------------------------------------

def test_empty_split_is_an_error(corpus, tokenizer):
    from megatron_ext.data.indexed_dataset import IndexedDataset

    n = len(IndexedDataset(corpus))
    tiny = 0.4 / n * 100  # a valid share that rounds to zero sequences
    with pytest.raises(DatasetError, match=r"botchan \(valid split.*empty.*cannot supply 10 samples"):
        build_gpt_datasets(our_config(tokenizer, 64, 1), corpus, f"{100 - tiny},{tiny},0", [10, 10, 0])


def test_one_epoch_shorter_than_a_sample_is_an_error(corpus, tokenizer):
    total = _train_tokens(corpus, 1.0)
    with pytest.raises(DatasetError, match=f"{total} tokens cannot form one sample"):
        build_gpt_datasets(our_config(tokenizer, total + 5, 1), corpus, "1,0,0", [None, None, None])


def test_small_dataset_loops_epochs_like_megatron(corpus, tokenizer):
    """Far more samples than one epoch holds: epochs repeat (no error), as in megatron-core."""
    ours = build_gpt_datasets(our_config(tokenizer, 512, 11), corpus, "99,1,0", [40, 300, 0])
    theirs = megatron_build(tokenizer, ([corpus], None), "99,1,0", [40, 300, 0], 512, 11)
    assert ours[1].num_epochs > 5
    assert_same_samples(theirs[1], ours[1])


# -- index cache --------------------------------------------------------------------------

def _signature(datasets):
    return [None if d is None else (d.document_index.tobytes(), d.sample_index.tobytes(),
                                    d.shuffle_index.tobytes()) for d in datasets]


def _cache_files(cache_dir: Path):
    return sorted(p.name for p in cache_dir.iterdir())


def test_cache_hit_returns_identical_samples_without_rebuilding(corpus, tokenizer, tmp_path):
    cache = tmp_path / "cache"
    plain = build_gpt_datasets(our_config(tokenizer, 64, 42), corpus, "90,10,0", [700, 50, 0])
    first = build_gpt_datasets(our_config(tokenizer, 64, 42, data_cache_path=str(cache)),
                               corpus, "90,10,0", [700, 50, 0])
    assert not first[0].cache_hit and not first[1].cache_hit
    files = _cache_files(cache)
    assert len(files) == 8 and sum(f.endswith("description.json") for f in files) == 2
    mtimes = {f: (cache / f).stat().st_mtime_ns for f in files}
    second = build_gpt_datasets(our_config(tokenizer, 64, 42, data_cache_path=str(cache)),
                                corpus, "90,10,0", [700, 50, 0])
    assert second[0].cache_hit and second[1].cache_hit
    assert {f: (cache / f).stat().st_mtime_ns for f in _cache_files(cache)} == mtimes
    assert _signature(second) == _signature(plain)
    for i in (0, 5, len(plain[0]) - 1):
        for k in SAMPLE_KEYS:
            np.testing.assert_array_equal(second[0][i][k], plain[0][i][k])


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_cache_files_have_the_mode_of_new_files_and_no_temporary_stays(corpus, tokenizer, tmp_path, umask, mask):
    """Under umask 022 other users of a shared cache directory can read its entries."""
    umask(mask)
    cache = tmp_path / "cache"
    build_gpt_datasets(our_config(tokenizer, 64, 42, data_cache_path=str(cache)), corpus, "90,10,0", [300, 30, 0])
    files = _cache_files(cache)
    assert len(files) == 8 and not [f for f in files if f.startswith(".") or f.endswith(".tmp")]
    assert {f: stat.S_IMODE((cache / f).stat().st_mode) for f in files} == {f: 0o666 & ~mask for f in files}


def test_cache_key_covers_extra_token_and_drop_last(corpus, tokenizer, tmp_path):
    cache = str(tmp_path / "cache")
    base = build_gpt_datasets(our_config(tokenizer, 64, 1, data_cache_path=cache), corpus, "90,10,0", [300, 30, 0])
    no_extra = build_gpt_datasets(our_config(tokenizer, 64, 1, data_cache_path=cache,
                                             add_extra_token_to_sequence=False), corpus, "90,10,0", [300, 30, 0])
    keep_last = build_gpt_datasets(our_config(tokenizer, 64, 1, data_cache_path=cache,
                                              drop_last_partial_validation_sequence=False),
                                   corpus, "90,10,0", [300, 30, 0])
    assert not no_extra[0].cache_hit and no_extra[0].cache_key != base[0].cache_key
    assert no_extra[1].cache_key != base[1].cache_key
    # drop_last applies to the validation split only.
    assert keep_last[0].cache_hit and keep_last[0].cache_key == base[0].cache_key
    assert not keep_last[1].cache_hit and keep_last[1].cache_key != base[1].cache_key
    # What each entry holds is what an in-memory build of its own config gives.
    fresh = build_gpt_datasets(our_config(tokenizer, 64, 1, add_extra_token_to_sequence=False),
                               corpus, "90,10,0", [300, 30, 0])
    assert _signature(no_extra) == _signature(fresh)


def test_cache_key_follows_dataset_content(tmp_path, tokenizer, botchan_bpe_model, botchan_txt):
    """Rewriting the .bin/.idx at the same path invalidates the entry (megatron's key would not)."""
    prefix = str(tmp_path / "data")
    cache = str(tmp_path / "cache")
    text = botchan_txt.read_text(encoding="utf-8")
    write_corpus(prefix, line_documents(text, seed=1), botchan_bpe_model)
    a = build_gpt_datasets(our_config(tokenizer, 64, 1, data_cache_path=cache), prefix, "1,0,0", [100, 0, 0])
    write_corpus(prefix, line_documents(text, seed=2), botchan_bpe_model)
    b = build_gpt_datasets(our_config(tokenizer, 64, 1, data_cache_path=cache), prefix, "1,0,0", [100, 0, 0])
    assert a[0].cache_key != b[0].cache_key and not b[0].cache_hit
    fresh = build_gpt_datasets(our_config(tokenizer, 64, 1), prefix, "1,0,0", [100, 0, 0])
    assert _signature(b) == _signature(fresh)


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "no_description", "bad_json", "wrong_shape"])
def test_damaged_cache_entry_is_rebuilt(corpus, tokenizer, tmp_path, damage):
    cache = tmp_path / "cache"
    config = our_config(tokenizer, 64, 8, data_cache_path=str(cache))
    good = build_gpt_datasets(config, corpus, "1,0,0", [400, 0, 0])
    sample_file = next(cache.glob("*-sample_index.npy"))
    description = next(cache.glob("*-description.json"))
    raw = sample_file.read_bytes()
    if damage == "truncate":
        sample_file.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip_bytes":
        middle = len(raw) // 2
        sample_file.write_bytes(raw[:middle] + bytes(b ^ 0xFF for b in raw[middle:middle + 8]) + raw[middle + 8:])
    elif damage == "no_description":
        description.unlink()
    elif damage == "bad_json":
        description.write_text("{ not json")
    else:
        np.save(sample_file, np.zeros((3, 2), dtype=np.int32))
    again = build_gpt_datasets(config, corpus, "1,0,0", [400, 0, 0])
    assert not again[0].cache_hit
    assert _signature(again) == _signature(good)
    third = build_gpt_datasets(config, corpus, "1,0,0", [400, 0, 0])  # repaired on disk
    assert third[0].cache_hit and _signature(third) == _signature(good)


def _build_in_child(args):
    corpus, cache, eod, pad, barrier = args
    barrier.wait()  # start together
    config = GPTDatasetConfig(sequence_length=64, random_seed=77, eod_token_id=eod, pad_token_id=pad,
                              data_cache_path=cache)
    datasets = build_gpt_datasets(config, corpus, "90,10,0", [3000, 200, 0])
    import hashlib

    return [hashlib.sha256(b"".join(part)).hexdigest() for part in _signature(datasets) if part]


def test_concurrent_builders_share_a_cache(corpus, tokenizer, tmp_path):
    cache = str(tmp_path / "cache")
    ctx = mp.get_context("spawn")
    procs = 4
    with ctx.Manager() as manager:
        barrier = manager.Barrier(procs)
        with ctx.Pool(procs) as pool:
            results = pool.map(_build_in_child,
                               [(corpus, cache, tokenizer.eod, tokenizer.pad, barrier)] * procs)
    assert all(r == results[0] for r in results)
    files = os.listdir(cache)
    assert not [f for f in files if f.startswith(".") or f.endswith(".tmp")]
    assert len(files) == 8
    reference = build_gpt_datasets(our_config(tokenizer, 64, 77), corpus, "90,10,0", [3000, 200, 0])
    import hashlib

    assert results[0] == [hashlib.sha256(b"".join(p)).hexdigest() for p in _signature(reference) if p]
    cached = build_gpt_datasets(our_config(tokenizer, 64, 77, data_cache_path=cache),
                                corpus, "90,10,0", [3000, 200, 0])
    assert cached[0].cache_hit and cached[1].cache_hit
