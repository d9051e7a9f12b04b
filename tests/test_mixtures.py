"""Mixing rates (seqio's definition, by hand), the systematic flat-batch sampler, and cycling."""

import numpy as np
import pytest

from mtt_jax.data import mixtures

SIZES = (100, 1_000, 10_000)


def test_rate_num_examples_follows_seqio():
    # seqio: r = N * scale; r = min(r, maximum); r = r ** (1 / temperature).
    assert mixtures.rate_num_examples(10_000) == 10_000
    assert mixtures.rate_num_examples(10_000, maximum=5_000) == 5_000
    assert mixtures.rate_num_examples(10_000, temperature=2.0) == pytest.approx(100.0)
    assert mixtures.rate_num_examples(10_000, maximum=2_500, temperature=2.0) == pytest.approx(50.0)
    # The scale is applied before the cap: 10,000 * 0.1 = 1,000 < 5,000, then sqrt.
    assert mixtures.rate_num_examples(10_000, maximum=5_000, temperature=2.0, scale=0.1) == \
        pytest.approx(np.sqrt(1_000))
    with pytest.raises(ValueError, match="temperature"):
        mixtures.rate_num_examples(10, temperature=0.0)


def test_temperature_rates_written_out_by_hand():
    rates = mixtures.mixing_rates(SIZES, "temperature", temperature=2.0, maximum=5_000)
    # sqrt(100) = 10, sqrt(1000) = 31.6227766, sqrt(min(10000, 5000)) = 70.7106781; sum 112.3334547.
    np.testing.assert_allclose(rates, [10 / 112.3334547, 31.6227766 / 112.3334547,
                                       70.7106781 / 112.3334547], rtol=1e-7)
    np.testing.assert_allclose(rates, [0.0890207, 0.2815081, 0.6294712], atol=1e-7)
    # T = 3, no cap: 100^(1/3) = 4.6415888, 1000^(1/3) = 10, 10000^(1/3) = 21.5443469.
    np.testing.assert_allclose(mixtures.mixing_rates(SIZES, "temperature", temperature=3.0),
                               np.array([4.6415888, 10.0, 21.5443469]) / 36.1859357, rtol=1e-7)


def test_proportional_uniform_and_explicit_rates():
    np.testing.assert_allclose(mixtures.mixing_rates(SIZES, "proportional"), [100 / 11_100, 1_000 / 11_100,
                                                                              10_000 / 11_100])
    np.testing.assert_allclose(mixtures.mixing_rates(SIZES, "temperature", temperature=1.0),
                               mixtures.mixing_rates(SIZES, "proportional"))
    np.testing.assert_allclose(mixtures.mixing_rates(SIZES, "uniform"), [1 / 3] * 3)
    np.testing.assert_allclose(mixtures.mixing_rates(SIZES, "explicit", rates=(2, 1, 1)), [0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="one rate per task"):
        mixtures.mixing_rates(SIZES, "explicit", rates=(1, 1))
    with pytest.raises(ValueError, match="non-negative"):
        mixtures.normalize([1.0, -1.0])
    with pytest.raises(ValueError, match="mixing method"):
        mixtures.mixing_rates(SIZES, "square_root")


def test_each_batch_holds_floor_or_ceil_of_its_share_and_a_period_holds_it_exactly():
    rates = mixtures.mixing_rates(SIZES, "temperature", temperature=2.0, maximum=5_000)
    batch_size = 16
    counts = np.array([np.bincount(mixtures.sample_task_ids(rates, step, 3, batch_size), minlength=3)
                       for step in range(mixtures.PERIOD)])
    share = batch_size * rates
    assert np.all(counts >= np.floor(share)) and np.all(counts <= np.ceil(share))
    assert np.all(counts.sum(axis=1) == batch_size)
    total = counts.sum(axis=0)
    np.testing.assert_array_less(np.abs(total - mixtures.PERIOD * share), 1.0 + 1e-9)


def test_zero_rate_tasks_are_never_drawn():
    ids = np.concatenate([mixtures.sample_task_ids([0.0, 1.0, 0.0, 2.0], s, 0, 7) for s in range(200)])
    assert set(np.unique(ids)) == {1, 3}


def test_sampler_is_a_pure_function_of_seed_and_step():
    rates = [0.2, 0.3, 0.5]
    a = mixtures.sample_examples(rates, SIZES, 1234, 5, 32)
    mixtures.sample_examples(rates, SIZES, 7, 5, 32)
    b = mixtures.sample_examples(rates, SIZES, 1234, 5, 32)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    other_seed = mixtures.sample_task_ids(rates, 1234, 6, 32)
    other_step = mixtures.sample_task_ids(rates, 1235, 5, 32)
    assert not np.array_equal(a[0], other_seed) and not np.array_equal(a[0], other_step)


def test_small_tasks_cycle_through_passes_over_their_examples():
    """Task 0 has 3 examples: its draws, in order over steps and rows, come in passes that each hold
    every example once; task 1 (50 examples) likewise; nothing ends the mixture."""
    rates, sizes = [0.25, 0.25, 0.5], (3, 50, 100_000)
    draws = {0: [], 1: []}
    for step in range(60):
        task_id, example = mixtures.sample_examples(rates, sizes, step, 0, 8)
        for t in draws:
            draws[t].extend(example[task_id == t])
    for t, size in ((0, 3), (1, 50)):
        passes = np.asarray(draws[t][:len(draws[t]) // size * size]).reshape(-1, size)
        assert len(passes) >= 2
        for one_pass in passes:
            assert sorted(one_pass) == list(range(size))
    assert not all(np.array_equal(p, np.sort(p)) for p in np.asarray(draws[0][:30]).reshape(-1, 3))


def test_draw_counts_continue_across_steps_and_periods():
    """The count of earlier draws is closed form: check it against counting every step, across a period
    boundary, through the cycling of a task whose size is prime to everything else."""
    rates, sizes, batch_size = [0.3, 0.7], (7, 1_000), 5
    first = mixtures.PERIOD - 3
    seen = []
    for step in range(first, first + 8):
        task_id, example = mixtures.sample_examples(rates, sizes, step, 1, batch_size)
        seen.extend(example[task_id == 0])
    before = sum(int((mixtures.sample_task_ids(rates, s, 1, batch_size) == 0).sum()) for s in range(first))
    position_in_pass = before % 7
    # The draws of task 0 from step `first` on continue its current pass where it stopped.
    remaining = 7 - position_in_pass
    assert len(set(seen[:remaining])) == remaining
    assert sorted(seen[remaining:remaining + 7]) == list(range(7))


def test_shards_join_to_the_global_flat_batch():
    rates = [0.1, 0.6, 0.3]
    for batch_size, count in ((16, 2), (10, 3)):
        task_id, example = mixtures.sample_examples(rates, SIZES, 77, 2, batch_size)
        parts = [mixtures.sample_examples(rates, SIZES, 77, 2, batch_size, (i, count)) for i in range(count)]
        np.testing.assert_array_equal(task_id, np.concatenate([p[0] for p in parts]))
        np.testing.assert_array_equal(example, np.concatenate([p[1] for p in parts]))
