"""Auto-Lambda: the lookahead gradient of the task weights in closed form on a linear model, against finite
differences, the Adam step of the weights, and the train step's first update against second-order
autodiff through an explicit virtual step."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default as default_config
from mtt_jax import affinity, sharding, train, train_step, weighting
from mtt_jax.run import config_check


# --- The lookahead gradient on a linear model -----------------------------------------------------------

def linear_problem(seed=0, num_tasks=3, size=5, rows=7):
    rng = np.random.default_rng(seed)
    theta = rng.normal(size=size)
    train_batch = {"x": rng.normal(size=(rows, size)), "y": rng.normal(size=(rows, num_tasks))}
    val_batch = {"x": rng.normal(size=(rows + 2, size)), "y": rng.normal(size=(rows + 2, num_tasks))}
    return theta, train_batch, val_batch


def linear_losses(theta, batch):
    """``L_t = 1/2 mean_n (x_n . theta - y_nt)^2``: T regression tasks sharing one linear model."""
    residual_NxT = (batch["x"] @ theta)[:, None] - batch["y"]
    return 0.5 * jnp.mean(residual_NxT ** 2, axis=0)


def closed_form(theta, train_batch, val_batch, weights_T, lr):
    """``-lr G d`` with ``g_t = X^T (X theta - y_t) / n``, ``theta' = theta - lr sum_t w_t g_t`` and
    ``d = sum_t X_v^T (X_v theta' - y_v,t) / n_v``, in float64."""
    x, y = train_batch["x"], train_batch["y"]
    g_TxP = ((x @ theta)[:, None] - y).T @ x / len(x)
    stepped = theta - lr * weights_T @ g_TxP
    xv, yv = val_batch["x"], val_batch["y"]
    d_P = (((xv @ stepped)[:, None] - yv).T @ xv / len(xv)).sum(0)
    return -lr * g_TxP @ d_P


def val_loss_after_step(theta, train_batch, val_batch, weights_T, lr):
    x, y = train_batch["x"], train_batch["y"]
    g_TxP = ((x @ theta)[:, None] - y).T @ x / len(x)
    stepped = theta - lr * weights_T @ g_TxP
    residual = (val_batch["x"] @ stepped)[:, None] - val_batch["y"]
    return 0.5 * np.mean(residual ** 2, axis=0).sum()


@pytest.mark.parametrize("lr", [0.05, 0.5])
def test_the_lookahead_gradient_is_the_closed_form_and_the_finite_difference(lr):
    theta, train_batch, val_batch = linear_problem()
    weights_T = np.array([0.1, 0.7, 1.3])
    as_f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
    ours = np.asarray(jax.jit(affinity.lookahead_weight_gradient, static_argnums=(0,))(
        linear_losses, as_f32(theta), as_f32(train_batch), as_f32(val_batch), jnp.asarray(weights_T), lr))
    expected = closed_form(theta, train_batch, val_batch, weights_T, lr)
    np.testing.assert_allclose(ours, expected, rtol=2e-5, atol=1e-7)
    eps = 1e-6  # the derivative the authors' finite differences approximate, in float64
    numeric = [(val_loss_after_step(theta, train_batch, val_batch, weights_T + eps * e, lr)
                - val_loss_after_step(theta, train_batch, val_batch, weights_T - eps * e, lr)) / (2 * eps)
               for e in np.eye(3)]
    np.testing.assert_allclose(expected, numeric, rtol=1e-6, atol=1e-9)
    assert np.ptp(expected) > 0.01 * np.abs(expected).max()  # the tasks get different gradients


def test_the_validation_weights_select_the_primary_tasks():
    theta, train_batch, val_batch = linear_problem(seed=1)
    weights_T = jnp.ones(3)
    only_first = affinity.lookahead_weight_gradient(linear_losses, jnp.asarray(theta, jnp.float32),
                                                    train_batch, val_batch, weights_T, 0.1,
                                                    val_weights_T=jnp.array([1.0, 0.0, 0.0]))
    x, y = train_batch["x"], train_batch["y"]
    g_TxP = ((x @ theta)[:, None] - y).T @ x / len(x)
    stepped = theta - 0.1 * g_TxP.sum(0)
    xv, yv = val_batch["x"], val_batch["y"]
    d_P = xv.T @ (xv @ stepped - yv[:, 0]) / len(xv)
    np.testing.assert_allclose(only_first, -0.1 * g_TxP @ d_P, rtol=2e-5, atol=1e-7)


# --- The method ------------------------------------------------------------------------------------------

def make(**options):
    return weighting.make_method(ml_collections.ConfigDict({"name": "auto_lambda", "auto_lambda": options}), 3)


def test_registered_with_the_authors_defaults_and_a_config_block():
    assert weighting.DEFAULT_OPTIONS["auto_lambda"] == {"init": 0.1, "lr": 1e-4, "lookahead_lr": 0.1}
    assert default_config.get_config("tiny").weighting.auto_lambda.lookahead_lr == 0.1
    method = make()
    assert method.requires == "lookahead" and method.gradient_samples == 2
    with pytest.raises(ValueError, match=re.escape("weighting.auto_lambda.lr=0.0 must be in (0.0, inf]")):
        make(lr=0.0)


def test_the_weights_take_adam_steps_and_weigh_the_losses():
    method = make(lr=0.01)
    state = method.init_state()
    np.testing.assert_allclose(method.lookahead_weights(state), [0.1, 0.1, 0.1], rtol=1e-7)
    state = jax.jit(method.lookahead_gradient)(state, jnp.array([2.0, -0.5, 0.0]))
    # Adam's first step is lr * sign(g) (bias-corrected m / sqrt(v) = g / |g|); g = 0 does not move
    np.testing.assert_allclose(state["weights"], [0.09, 0.11, 0.1], rtol=1e-5)
    state = jax.jit(method.lookahead_gradient)(state, jnp.array([2.0, 0.5, 0.0]))
    # the second step by hand: Adam's bias-corrected moments of the two gradients (b1 0.9, b2 0.999)
    m = lambda g1, g2: (0.9 * 0.1 * g1 + 0.1 * g2) / (1 - 0.9 ** 2)
    v = lambda g1, g2: (0.999 * 0.001 * g1 ** 2 + 0.001 * g2 ** 2) / (1 - 0.999 ** 2)
    expected = [0.09 - 0.01 * m(2.0, 2.0) / (np.sqrt(v(2.0, 2.0)) + 1e-8),
                0.11 - 0.01 * m(-0.5, 0.5) / (np.sqrt(v(-0.5, 0.5)) + 1e-8), 0.1]
    np.testing.assert_allclose(state["weights"], expected, rtol=1e-5)
    total, weights_T, _ = method.combine({}, state, jnp.array([1.0, 2.0, 3.0]), jnp.int32(0))
    np.testing.assert_allclose(total, np.dot(expected, [1.0, 2.0, 3.0]), rtol=1e-5)
    np.testing.assert_allclose(weights_T, expected, rtol=1e-5)


# --- The train step ---------------------------------------------------------------------------------------

def tiny_config(**fields):
    config = default_config.get_config("tiny")
    config.weighting.name = "auto_lambda"
    config.weighting.auto_lambda.lr = 0.01
    for field, value in fields.items():
        config[field] = value
    return config


def test_the_first_step_moves_the_weights_by_the_bilevel_gradient():
    """The weights after step 1 are ``0.1 - lr sign(dL_val/d lambda)``, with the derivative taken here by
    reverse-mode autodiff through an explicit virtual step (a second-order pass) on the batch's halves."""
    config = tiny_config()
    setup = train.build(config)
    host_batch = setup.train_source.train_batch(0, config.batch_size)
    batch = sharding.shard_batch(host_batch, setup.batch_shardings, setup.layout)
    state = setup.create_state()
    dropout_rng, _ = train_step._step_keys(state)
    params = jax.device_get(state.params["model"])  # the step donates the state
    with setup.context():
        new_state, metrics = train.compile_train_step(setup)(state, batch)

    halves = train_step.microbatches(jax.tree.map(jnp.asarray, host_batch), setup.layout, 2)
    train_half, val_half = (jax.tree.map(lambda x: x[i], halves) for i in (0, 1))

    def losses(params, part):
        outputs, _ = train_step.apply_model(setup.model, params, part, True, {"dropout": dropout_rng})
        return train_step.task_losses(setup.tasks, outputs, part, setup.layout)

    def val_after_virtual_step(weights_T):
        grads = jax.grad(lambda p: jnp.dot(weights_T, losses(p, train_half)))(params)
        stepped = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return losses(stepped, val_half).sum()
    with setup.context():
        bilevel_T = jax.jit(jax.grad(val_after_virtual_step))(jnp.full(2, 0.1))
    assert np.all(np.abs(bilevel_T) > 1e-7), bilevel_T
    expected = 0.1 - 0.01 * np.sign(np.asarray(bilevel_T))
    np.testing.assert_allclose(new_state.weighting_state["weights"], expected, rtol=1e-4)
    np.testing.assert_allclose(metrics["weights"], expected, rtol=1e-4)  # the update used the new weights
    np.testing.assert_allclose(metrics["loss"], np.dot(expected, metrics["task_losses"]), rtol=1e-5)


def test_config_check_refuses_microbatches_and_odd_batches_in_one_line():
    with pytest.raises(config_check.ConfigError, match="takes its lookahead on the whole batch"):
        config_check.validate(tiny_config(grad_accum_steps=2), num_devices=1)
    with pytest.raises(config_check.ConfigError, match="batch_size=7 is not divisible by 2"):
        config_check.validate(tiny_config(batch_size=7), num_devices=1)
