"""Losses and metrics of the task registry, against values computed by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from mtt_jax import data, tasks as tasks_lib


def test_registry_matches_the_data_sources():
    for source, names in data.AVAILABLE_TASKS.items():
        for name in names:
            assert tasks_lib.get(name).source == source
    with pytest.raises(KeyError, match="registered tasks"):
        tasks_lib.get("no_such_task")


def test_masked_mean_ignores_masked_examples():
    spec = tasks_lib.get("left_digit")
    logits = jnp.asarray([[5.0, 0.0], [0.0, 5.0], [0.0, 5.0]])
    labels = jnp.asarray([0, 1, 0])  # the third example is wrong, with a large loss
    loss_sum, count = tasks_lib.example_losses(spec, logits, labels)
    kept = tasks_lib.masked_mean(loss_sum, count, jnp.asarray([1.0, 1.0, 0.0]))
    expected = -np.log(np.exp(5) / (np.exp(5) + 1))
    np.testing.assert_allclose(kept, expected, rtol=1e-5)
    # Changing the masked example's label or logits changes nothing.
    loss_sum2, _ = tasks_lib.example_losses(spec, logits.at[2].set(100.0), labels.at[2].set(1))
    np.testing.assert_allclose(tasks_lib.masked_mean(loss_sum2, count, jnp.asarray([1.0, 1.0, 0.0])),
                               kept, rtol=1e-6)
    assert float(tasks_lib.masked_mean(loss_sum, count, jnp.zeros(3))) == 0.0


def test_tagging_loss_averages_real_tokens_only():
    spec = tasks_lib.get("repeat_tag")
    logits = jnp.zeros((2, 3, 2)).at[0, 0, 1].set(10.0)
    labels = jnp.asarray([[0, 1, 1], [1, 0, 0]])
    token_mask = jnp.asarray([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss_sum, count = tasks_lib.example_losses(spec, logits, labels, token_mask)
    np.testing.assert_allclose(count, [2.0, 1.0])
    ln2 = np.log(2.0)
    wrong = -np.log(np.exp(0) / (np.exp(0) + np.exp(10)))
    np.testing.assert_allclose(loss_sum, [wrong + ln2, ln2], rtol=1e-5)
    np.testing.assert_allclose(tasks_lib.masked_mean(loss_sum, count, jnp.ones(2)),
                               (wrong + 2 * ln2) / 3, rtol=1e-5)


def test_regression_loss_is_squared_error():
    spec = tasks_lib.get("mean_value")
    loss_sum, count = tasks_lib.example_losses(spec, jnp.asarray([1.0, -2.0]), jnp.asarray([0.5, 1.0]))
    np.testing.assert_allclose(loss_sum, [0.25, 9.0])


def test_metrics_against_hand_computed_values():
    pred = np.array([0, 0, 1, 1, 2, 2])
    label = np.array([0, 1, 1, 1, 2, 0])
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp0 fn1 -> 0.8; class 2: tp1 fp1 fn0 -> 2/3
    assert tasks_lib.macro_f1(pred, label, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert tasks_lib.accuracy(pred, label) == pytest.approx(4 / 6)
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 5.0, 9.0])
    assert tasks_lib.pearson(x, y) == pytest.approx(11 / np.sqrt(5 * 26))  # sums of dx*dy, dx², dy²
    assert tasks_lib.pearson(x, np.ones(4)) == 0.0
    assert tasks_lib.mse(x, y) == pytest.approx((1 + 4 + 4 + 25) / 4)


def test_tagging_metrics_skip_pads_and_baselines():
    spec = tasks_lib.get("repeat_tag")
    pred = np.array([[1, 0, 1], [0, 1, 1]])
    label = np.array([[1, 1, 0], [0, 1, 0]])
    mask = np.array([[1, 1, 0], [1, 1, 0]])
    metrics = tasks_lib.compute_metrics(spec, pred, label, mask)
    assert metrics["token_accuracy"] == pytest.approx(3 / 4)
    assert tasks_lib.trivial_baseline(spec, label, mask)["token_accuracy"] == pytest.approx(3 / 4)
    reg = tasks_lib.trivial_baseline(tasks_lib.get("mean_value"), np.array([1.0, 3.0]))
    assert reg == {"mse": 1.0, "pearson": 0.0}
