"""Batch layout, packing properties, epoch iteration and the sharded, resumable grain pipeline."""

import numpy as np
import pytest

from jaxswift.data.packing import (BATCH_DTYPES, efficiency, first_fit_decreasing, iterate_batches, pack_rows,
                                   pad_rows)
from jaxswift.data.pipeline import StepPlan, lengths_of, make_grain_loader, shard_rows
from jaxswift.data.templates import EncodedChat
from jaxswift.errors import DataError

LENGTH = 32


def make_examples(n: int, seed: int = 0, max_len: int = LENGTH) -> list[EncodedChat]:
    """Mixed lengths, distinct tokens per example (so segments can be traced), a trained-on tail."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = int(rng.integers(2, max_len + 1))
        ids = (1000 * (i + 1) + np.arange(t)).astype(np.int32)
        out.append(EncodedChat(ids, np.arange(t) >= t // 2))
    return out


def segments(batch) -> list[tuple[int, ...]]:
    """Every non-padding segment's tokens, in row order."""
    out = []
    for r in range(batch["tokens"].shape[0]):
        for s in np.unique(batch["segment_ids"][r][batch["segment_ids"][r] > 0]):
            out.append(tuple(batch["tokens"][r][batch["segment_ids"][r] == s].tolist()))
    return out


def expected_weight_total(examples) -> float:
    return float(sum(e.loss_mask[1:].sum() for e in examples))


def test_pad_rows_layout_and_shift():
    ex = EncodedChat(np.array([5, 6, 7, 8], np.int32), np.array([0, 0, 1, 1], bool))
    b = pad_rows([ex], 6)
    assert {k: v.dtype for k, v in b.items()} == BATCH_DTYPES
    assert b["tokens"].tolist() == [[5, 6, 7, 8, 0, 0]]
    assert b["targets"].tolist() == [[6, 7, 8, 0, 0, 0]]
    assert b["loss_weights"].tolist() == [[0, 1, 1, 0, 0, 0]]  # weight where the target is a masked token
    assert b["segment_ids"].tolist() == [[1, 1, 1, 1, 0, 0]]
    assert b["positions"].tolist() == [[0, 1, 2, 3, 0, 0]]


def test_too_long_examples_raise():
    ex = make_examples(1, max_len=LENGTH)[0]
    with pytest.raises(DataError, match="do not fit"):
        pad_rows([ex], len(ex) - 1)
    with pytest.raises(DataError, match="do not fit"):
        pack_rows([ex], len(ex) - 1)


def test_first_fit_decreasing_is_the_textbook_result():
    assert first_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    assert first_fit_decreasing([], 8) == []
    assert first_fit_decreasing([8], 8) == [[0]]


def test_packing_properties():
    examples = make_examples(40)
    packed, eff = pack_rows(examples, LENGTH)
    seg, pos, tok, tgt, w = (packed[k] for k in ("segment_ids", "positions", "tokens", "targets", "loss_weights"))
    assert sorted(segments(packed)) == sorted(tuple(e.input_ids.tolist()) for e in examples)  # each exactly once
    for r in range(seg.shape[0]):
        used = seg[r] > 0
        assert used[: used.sum()].all()  # padding only at the row's tail
        ids = seg[r][used]
        assert ids[0] == 1 and (np.diff(ids) >= 0).all() and set(np.diff(ids)) <= {0, 1}
        for s in np.unique(ids):
            assert pos[r][seg[r] == s].tolist() == list(range((seg[r] == s).sum()))  # positions restart
    same_segment = np.concatenate([seg[:, :-1] == seg[:, 1:], np.zeros((seg.shape[0], 1), bool)], axis=1)
    weighted = w > 0
    assert (same_segment | ~weighted).all()  # no weight across a segment boundary
    assert (tgt[:, :-1][weighted[:, :-1]] == tok[:, 1:][weighted[:, :-1]]).all()
    assert w.sum() == expected_weight_total(examples) == pad_rows(examples, LENGTH)["loss_weights"].sum()
    assert eff == efficiency(packed) > efficiency(pad_rows(examples, LENGTH))
    assert packed["tokens"].shape[0] < len(examples)


def test_pack_rows_is_deterministic():
    examples = make_examples(30, seed=3)
    a, b = pack_rows(examples, LENGTH)[0], pack_rows(examples, LENGTH)[0]
    assert all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("packing", [False, True])
def test_iterate_batches_covers_the_epoch_and_pads_the_last_batch(packing):
    examples = make_examples(23)
    batches = list(iterate_batches(examples, batch_size=4, length=LENGTH, packing=packing, seed=0, epoch=0))
    assert all(b["tokens"].shape == (4, LENGTH) for b in batches)
    assert sorted(s for b in batches for s in segments(b)) == sorted(tuple(e.input_ids.tolist()) for e in examples)
    assert sum(b["loss_weights"].sum() for b in batches) == expected_weight_total(examples)
    last = batches[-1]
    empty = last["segment_ids"].max(axis=1) == 0
    assert (last["loss_weights"][empty] == 0).all()
    if not packing:
        assert len(batches) == 6 and empty.sum() == 1  # 23 = 5 * 4 + 3: one empty row, not dropped


def test_epochs_are_shuffled_differently_and_reproducibly():
    examples = make_examples(16)
    def order(seed, epoch):
        return [s for b in iterate_batches(examples, batch_size=4, length=LENGTH, packing=False, seed=seed,
                                           epoch=epoch) for s in segments(b)]
    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)


# ---------------------------------------------------------------- grain pipeline

def loader(examples, *, rows_per_step=3, packing=True, num_epochs=2, shard=(0, 1), **kw):
    plan = StepPlan(lengths_of(examples), rows_per_step=rows_per_step, length=LENGTH, packing=packing, seed=7)
    rows = shard_rows(rows_per_step, *shard)
    return make_grain_loader(examples, plan, num_steps=num_epochs * plan.steps_per_epoch, rows=rows, **kw)


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(all((x[k] == y[k]).all() for k in x) for x, y in zip(a, b))


def test_single_shard_yields_the_batches_of_iterate_batches():
    examples = make_examples(25)
    got = [{k: v[0] for k, v in b.items()} for b in loader(examples, num_epochs=1)]  # one microbatch: [1, B, T]
    want = list(iterate_batches(examples, batch_size=3, length=LENGTH, packing=True, seed=7, epoch=0))
    assert same_batches(got, want)


@pytest.mark.parametrize("packing", [False, True])
def test_two_shards_cover_the_data_once_per_epoch_in_lockstep(packing):
    examples = make_examples(25)
    shards = [[{k: v[0] for k, v in b.items()} for b in loader(examples, rows_per_step=4, packing=packing,
                                                                num_epochs=1, shard=(i, 2))] for i in (0, 1)]
    assert len(shards[0]) == len(shards[1])  # processes step together
    seen = sorted(s for shard in shards for b in shard for s in segments(b))
    assert seen == sorted(tuple(e.input_ids.tolist()) for e in examples)


def test_microbatches_split_each_step_and_shards_split_each_microbatch():
    examples = make_examples(25)
    plan = StepPlan(lengths_of(examples), rows_per_step=8, length=LENGTH, packing=False, seed=7, micro_batches=2)
    whole = plan.batch_at(examples, 1)
    halves = [plan.batch_at(examples, 1, shard_rows(4, i, 2)) for i in (0, 1)]
    assert whole["tokens"].shape[:2] == (2, 4) and halves[0]["tokens"].shape[:2] == (2, 2)
    for k in whole:
        assert (np.concatenate([h[k] for h in halves], axis=1) == whole[k]).all()
    rows = plan.rows_at(1)
    assert segments({k: v[1] for k, v in whole.items()})[0] == tuple(examples[rows[4][0]].input_ids.tolist())


def test_restoring_grain_state_mid_epoch_continues_exactly():
    examples = make_examples(25)
    uninterrupted = list(loader(examples))
    it = iter(loader(examples))
    head = [next(it) for _ in range(4)]
    state = it.get_state()
    resumed = iter(loader(examples))
    resumed.set_state(state)
    assert same_batches(head + list(resumed), uninterrupted)
    assert same_batches(list(loader(examples, start_step=4)), uninterrupted[4:])  # the step-counter route
