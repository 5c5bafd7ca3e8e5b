"""Length-grouped batches: every example once, caps respected, little padding, equal shares per rank."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from eardrum.common.batching import padding_waste, plan_batches, shard_batches


@pytest.fixture(scope="module")
def spread():
    """2,000 examples of 10 to 999 tokens and one epoch's order with 100 examples repeated."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 1000, 2000).tolist()
    order = rng.permutation(2000).tolist()
    return lengths, order + order[:100]


def flat(batches: list[list[int]]) -> Counter:
    return Counter(i for b in batches for i in b)


@pytest.mark.parametrize("cap", [{"batch_size": 16}, {"max_tokens": 4000}])
def test_every_entry_of_the_order_is_batched_exactly_once(spread, cap):
    lengths, order = spread
    assert flat(plan_batches(lengths, order, **cap)) == Counter(order)


def test_batch_size_is_respected_and_only_one_batch_is_short(spread):
    lengths, order = spread
    sizes = Counter(len(b) for b in plan_batches(lengths, order, batch_size=16))
    assert sizes == {16: 131, 4: 1}  # 2100 = 131 * 16 + 4


def test_max_tokens_caps_the_padded_size(spread):
    lengths, order = spread
    batches = plan_batches(lengths, order, max_tokens=4000)
    assert max(len(b) * max(lengths[i] for i in b) for b in batches) <= 4000


def test_an_example_longer_than_max_tokens_gets_a_batch_of_its_own():
    batches = plan_batches([5, 5, 100, 5], [0, 1, 2, 3], max_tokens=20)
    assert sorted(sorted(b) for b in batches) == [[0, 1, 3], [2]]


def test_the_plan_depends_only_on_seed_and_epoch(spread):
    lengths, order = spread
    plan = plan_batches(lengths, order, batch_size=16, seed=1, epoch=2)
    assert plan == plan_batches(lengths, order, batch_size=16, seed=1, epoch=2)
    assert plan != plan_batches(lengths, order, batch_size=16, seed=1, epoch=3)


def test_grouping_by_length_pads_far_less_than_random_batches(spread):
    lengths, order = spread
    grouped = padding_waste(plan_batches(lengths, order, batch_size=16), lengths)
    ungrouped = padding_waste(plan_batches(lengths, order, batch_size=16, group_by_length=False), lengths)
    assert ungrouped > 0.4
    assert grouped < 0.05
    assert grouped < ungrouped / 2


def test_without_grouping_the_order_is_cut_as_given():
    assert plan_batches([1, 2, 3, 4], [3, 1, 2, 0], batch_size=3, group_by_length=False) == [[3, 1, 2], [0]]
    assert plan_batches([4, 4, 9, 1], [0, 1, 2, 3], max_tokens=9, group_by_length=False) == [[0, 1], [2], [3]]


def test_bad_arguments_are_refused_with_their_name():
    with pytest.raises(ValueError, match="exactly one of batch_size / max_tokens"):
        plan_batches([1], [0])
    with pytest.raises(ValueError, match="exactly one of batch_size / max_tokens"):
        plan_batches([1], [0], batch_size=1, max_tokens=8)
    with pytest.raises(ValueError, match=r"batch_size: expected a positive integer, got 0"):
        plan_batches([1], [0], batch_size=0)
    with pytest.raises(ValueError, match=r"indices: 1 out of range \[0, 2\), e.g. \[2\]"):
        plan_batches([1, 1], [0, 2], batch_size=1)
    with pytest.raises(ValueError, match="lengths: expected >= 1 token per example, got 0 for example 1"):
        plan_batches([1, 0], [0, 1], batch_size=1)


def test_shards_are_disjoint_equal_and_drop_nothing(spread):
    lengths, order = spread
    batches = plan_batches(lengths, order, max_tokens=4000)
    assert len(batches) % 7 == 4
    shards = [shard_batches(batches, 7, r) for r in range(7)]
    assert {len(s) for s in shards} == {-(-len(batches) // 7)}
    assert flat([b for s in shards for b in s]) == Counter(order)
    assert max(len(b) * max(lengths[i] for i in b) for s in shards for b in s) <= 4000
    assert shard_batches(batches, 1, 0) == batches


def test_shards_take_every_nth_batch_and_split_the_largest_when_uneven():
    batches = [[0, 1, 2, 3], [4], [5, 6]]
    assert [shard_batches(batches, 2, r) for r in range(2)] == [[[0, 1], [4]], [[2, 3], [5, 6]]]
    assert [shard_batches(batches, 3, r) for r in range(3)] == [[[0, 1, 2, 3]], [[4]], [[5, 6]]]


def test_too_few_examples_for_the_ranks_is_an_error():
    with pytest.raises(ValueError, match="3 examples cannot fill 4 batches"):
        shard_batches([[0], [1], [2]], 4, 0)
    with pytest.raises(ValueError, match=r"rank: expected an integer in \[0, 2\), got 2"):
        shard_batches([[0]], 2, 2)


def test_padding_waste_counts_padded_tokens():
    assert padding_waste([[0, 1]], [2, 4]) == 0.25
    assert padding_waste([[0], [1]], [2, 4]) == 0.0
    assert padding_waste([], [2, 4]) == 0.0
