"""--data-path / --split parsing and blends against megatron-core 0.16.1's BlendedDataset."""
from __future__ import annotations

import numpy as np
import pytest

from megatron_ext.data.blend import (
    BlendedDataset,
    build_gpt_datasets,
    parse_blend,
    parse_split,
    samples_per_dataset,
    split_matrix,
)
from megatron_ext.data.gpt_dataset import DatasetError, GPTDataset, Split
from test_gpt_dataset import (
    assert_same_samples,
    line_documents,
    megatron_build,
    megatron_tokenizer,
    our_config,
    write_corpus,
)


# -- parsing ------------------------------------------------------------------------------

def test_parse_blend():
    assert parse_blend("0.05 c4_00000 0.05 c4_00001") == (["c4_00000", "c4_00001"], [0.05, 0.05])
    assert parse_blend("data/my_corpus_text_document") == (["data/my_corpus_text_document"], [1.0])
    assert parse_blend(["3", "a", "1e-1", "b"]) == (["a", "b"], [3.0, 0.1])
    assert parse_blend("  2 a\n  1 b ") == (["a", "b"], [2.0, 1.0])


@pytest.mark.parametrize("bad, message", [
    ("0.5 a 0.5", r"--data-path has 3 entries"),
    ("a b", r"--data-path: 'a' \(entry 1\) is not a number"),
    ("0.5 a x b", r"--data-path: 'x' \(entry 3\) is not a number"),
    ("0 a 1 b", r"--data-path: weight '0' \(entry 1, for 'a'\) must be a positive"),
    ("1 a -2 b", r"weight '-2' \(entry 3, for 'b'\)"),
    ("nan a 1 b", r"weight 'nan'"),
    ("", r"--data-path is empty"),
])
def test_parse_blend_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_blend(bad)


def test_parse_split():
    assert parse_split("98,2,0") == pytest.approx([0.98, 0.02, 0.0])
    assert parse_split("98/2/0") == parse_split("98,2,0")
    assert parse_split("1") == [1.0, 0.0, 0.0]
    assert parse_split("949,50,1") == pytest.approx([0.949, 0.05, 0.001])
    assert split_matrix(parse_split("98,2,0")) == [(0.0, 0.98), (0.98, 1.0), None]


@pytest.mark.parametrize("bad, message", [
    ("0,0,0", "must sum to a positive"),
    ("1,2,3,4", "expected up to 3 numbers"),
    ("98,,2", "expected up to 3 numbers"),
    ("98,x,2", "'x' is not a number"),
    ("98,-2,4", "'-2' must be a non-negative"),
])
def test_parse_split_errors(bad, message):
    with pytest.raises(ValueError, match=f"--split '{bad}'.*{message}"):
        parse_split(bad)


def test_samples_per_dataset_margin():
    # ceil(ceil(size * weight) * 1.005), as megatron-core sizes the mid-level datasets
    assert samples_per_dataset([0.3, 0.7], [1000, 10, 0], 0.005) == [[302, 4, 0], [704, 8, 0]]
    assert samples_per_dataset([0.3, 0.7], [1000, 10, 0]) == [[300, 3, 0], [700, 7, 0]]


# -- blends against megatron-core ---------------------------------------------------------

@pytest.fixture(scope="module")
def corpora(tmp_path_factory, botchan_bpe_model, botchan_txt, shakespeare_files):
    root = tmp_path_factory.mktemp("blend_corpus")
    botchan = line_documents(botchan_txt.read_text(encoding="utf-8"), seed=0)
    prefixes = {"botchan": str(root / "botchan"), "botchan_half": str(root / "botchan_half"),
                "shakespeare": str(root / "shakespeare")}
    write_corpus(prefixes["botchan"], botchan, botchan_bpe_model)
    write_corpus(prefixes["botchan_half"], botchan[: len(botchan) // 2], botchan_bpe_model)
    plays = "\n".join(f.read_text(encoding="utf-8", errors="replace") for f in shakespeare_files[:3])
    write_corpus(prefixes["shakespeare"], line_documents(plays, seed=3), botchan_bpe_model)
    return prefixes


@pytest.fixture(scope="module")
def tokenizer(botchan_bpe_model):
    return megatron_tokenizer(botchan_bpe_model)


@pytest.mark.parametrize("case", [
    # (names, weights, split, sizes, seq, seed)
    (("botchan", "shakespeare"), (0.3, 0.7), "90,5,5", [700, 60, 30], 64, 1234),
    (("botchan", "botchan_half", "shakespeare"), (2, 1, 1), "98,2,0", [1500, 100, 0], 128, 5),
    (("shakespeare", "botchan_half"), (0.9, 0.1), "80,20,0", [3000, 600, 0], 32, 77),
    (("botchan",), (1.0,), "90,10,0", [300, 40, 0], 64, 3),  # one weighted prefix: still a blend
])
def test_blend_matches_megatron(corpora, tokenizer, case):
    names, weights, split, sizes, seq, seed = case
    prefixes = [corpora[n] for n in names]
    data_path = " ".join(f"{w} {p}" for w, p in zip(weights, prefixes))
    ours = build_gpt_datasets(our_config(tokenizer, seq, seed), data_path, split, sizes)
    theirs = megatron_build(tokenizer, (prefixes, [float(w) for w in weights]), split, sizes, seq, seed)
    for i, (t, o) in enumerate(zip(theirs, ours)):
        if t is not None:
            assert isinstance(o, BlendedDataset) and len(o) == sizes[i] and o.size == sizes[i]
            np.testing.assert_array_equal(o.dataset_index, t.dataset_index)
            np.testing.assert_array_equal(o.dataset_sample_index, t.dataset_sample_index)
        assert_same_samples(t, o)


def test_unweighted_blend_matches_megatron(corpora, tokenizer):
    """(prefixes, None): weights are the datasets' one-epoch lengths; a size caps the blend,
    None draws every sample once (exhaustive indices)."""
    prefixes = [corpora["botchan_half"], corpora["shakespeare"]]
    for sizes in ([400, None, None], [None, None, None]):
        ours = build_gpt_datasets(our_config(tokenizer, 128, 9), (prefixes, None), "90,10,0", sizes)
        theirs = megatron_build(tokenizer, (prefixes, None), "90,10,0", sizes, 128, 9)
        for t, o in zip(theirs, ours):
            assert_same_samples(t, o)
        assert len(ours[1]) == sum(len(d) for d in ours[1].datasets)


def test_blend_cache(corpora, tokenizer, tmp_path):
    data_path = f"0.4 {corpora['botchan']} 0.6 {corpora['shakespeare']}"
    cache = str(tmp_path / "cache")
    plain = build_gpt_datasets(our_config(tokenizer, 64, 1), data_path, "90,10,0", [600, 40, 0])
    first = build_gpt_datasets(our_config(tokenizer, 64, 1, data_cache_path=cache), data_path, "90,10,0", [600, 40, 0])
    second = build_gpt_datasets(our_config(tokenizer, 64, 1, data_cache_path=cache), data_path, "90,10,0", [600, 40, 0])
    assert not first[0].cache_hit and second[0].cache_hit
    assert all(d.cache_hit for d in second[0].datasets)
    for a, b in zip(second[:2], plain[:2]):
        np.testing.assert_array_equal(a.dataset_index, b.dataset_index)
        np.testing.assert_array_equal(a.dataset_sample_index, b.dataset_sample_index)
        for i in (0, len(a) // 2, len(a) - 1):
            np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])
    reweighted = build_gpt_datasets(our_config(tokenizer, 64, 1, data_cache_path=cache),
                                    f"0.5 {corpora['botchan']} 0.5 {corpora['shakespeare']}",
                                    "90,10,0", [600, 40, 0])
    assert not reweighted[0].cache_hit and reweighted[0].cache_key != second[0].cache_key


def test_oversampled_dataset_is_named(corpora, tokenizer):
    from megatron_ext.data.indexed_dataset import IndexedDataset

    config = our_config(tokenizer, 64, 1)
    small_ds = IndexedDataset(corpora["botchan_half"])
    small = GPTDataset(small_ds, np.arange(len(small_ds), dtype=np.int32), 10, Split.train, config)
    big_ds = IndexedDataset(corpora["shakespeare"])
    big = GPTDataset(big_ds, np.arange(len(big_ds), dtype=np.int32), 1000, Split.train, config)
    with pytest.raises(DatasetError, match=rf"botchan_half: the train blend requests \d+ samples from it "
                                           rf"but it has only {len(small)}"):
        BlendedDataset([small, big], [0.5, 0.5], 2 * len(small) + 200, config)


def test_missing_prefix_is_named(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data-path: .*nowhere\.idx does not exist"):
        build_gpt_datasets(our_config(tokenizer, 64, 1), f"1 {tmp_path}/nowhere", "1,0,0", [10, 0, 0])


def test_weighted_blend_needs_sizes(corpora, tokenizer):
    with pytest.raises(ValueError, match="needs a number of samples for every split"):
        build_gpt_datasets(our_config(tokenizer, 64, 1), f"1 {corpora['botchan']} 1 {corpora['shakespeare']}",
                           "1,0,0", [10, None, None])
