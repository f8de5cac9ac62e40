"""The on-disk token cache: identical examples, bounded memory, index splits."""

import numpy as np

from jaxswift.data.cache import Subset, cache_sft_dataset, example_lengths, split_indices, write_token_cache
from jaxswift.data.formats import build_sft_examples, split_train_val
from jaxswift.data.templates import EncodedChat


def test_cache_holds_exactly_the_examples(smol_tokenizer, tmp_path):
    common = dict(max_length=128, truncation_strategy="delete", loss_scale="default", system=None, seed=3)
    in_memory, stats = build_sft_examples(["builtin:self_identity#150"], smol_tokenizer, **common)
    cache, cached_stats = cache_sft_dataset(["builtin:self_identity#150"], smol_tokenizer, tmp_path, **common)
    assert len(cache) == len(in_memory) == stats.examples
    assert cached_stats == stats
    for a, b in zip(in_memory, cache):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)
    np.testing.assert_array_equal(example_lengths(cache), [len(e) for e in in_memory])


def test_cache_streams_in_chunks(tmp_path, monkeypatch):
    import jaxswift.data.cache as cache_module

    monkeypatch.setattr(cache_module, "_FLUSH_TOKENS", 7)  # force many flushes
    rng = np.random.default_rng(0)
    examples = [EncodedChat(rng.integers(0, 100, n).astype(np.int32), rng.random(n) < 0.5) for n in (3, 9, 1, 20, 5)]
    cache = write_token_cache(iter(examples), tmp_path)
    assert [len(e) for e in cache] == [3, 9, 1, 20, 5]
    for a, b in zip(examples, cache):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.loss_mask, b.loss_mask)


def test_index_split_matches_the_list_split():
    examples = [EncodedChat(np.arange(n, dtype=np.int32), np.ones(n, bool)) for n in range(1, 41)]
    train, val = split_train_val(examples, 0.2, seed=5)
    train_idx, val_idx = split_indices(len(examples), 0.2, seed=5)
    assert [len(e) for e in Subset(examples, train_idx)] == [len(e) for e in train]
    assert [len(e) for e in Subset(examples, val_idx)] == [len(e) for e in val]
