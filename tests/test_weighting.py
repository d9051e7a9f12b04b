"""Loss weighting: fixed weights and Kendall et al.'s uncertainty weighting, formula and optimum."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mtt_jax import weighting


def make(name, num_tasks=3, **options):
    return weighting.make_method(ml_collections.ConfigDict({"name": name, **options}), num_tasks)


def test_fixed_and_ew_weights():
    losses = jnp.asarray([1.0, 2.0, 4.0])
    total, w, _ = make("fixed", weights=(0.5, 1.0, 0.25)).combine({}, {}, losses, 0)
    assert float(total) == pytest.approx(0.5 + 2.0 + 1.0)
    np.testing.assert_allclose(w, [0.5, 1.0, 0.25])
    total, w, _ = make("ew").combine({}, {}, losses, 0)
    assert float(total) == pytest.approx(7.0)
    np.testing.assert_allclose(make("fixed", weights=()).combine({}, {}, losses, 0)[1], 1.0)
    with pytest.raises(ValueError, match="2 entries for 3 tasks"):
        make("fixed", weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="choose one of"):
        make("nope")


def test_uncertainty_matches_its_formula():
    method = make("uncertainty", init_log_var=-0.5)
    params = {"log_var": jnp.asarray([-0.5, 0.0, 1.0])}
    losses = jnp.asarray([1.0, 2.0, 4.0])
    total, w, _ = method.combine(params, {}, losses, 0)
    s = np.array([-0.5, 0.0, 1.0])
    expected = np.sum(0.5 * np.exp(-s) * np.array([1.0, 2.0, 4.0]) + 0.5 * s)
    assert float(total) == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(w, 0.5 * np.exp(-s), rtol=1e-6)
    np.testing.assert_allclose(method.init_params()["log_var"], -0.5)
    default = make("uncertainty")  # starts at LibMTL's s = -0.5: weight 0.5 * exp(0.5) = 0.824
    np.testing.assert_allclose(default.combine(default.init_params(), {}, losses, 0)[1], 0.824, atol=1e-3)


def test_uncertainty_optimum_is_exp_s_equals_loss():
    """For fixed losses, minimising over s gives exp(s_t) = L_t (d/ds = -L e^-s/2 + 1/2 = 0)."""
    method = make("uncertainty")
    losses = jnp.asarray([0.3, 1.0, 5.0])
    objective = lambda p: method.combine(p, {}, losses, 0)[0]
    tx = optax.adam(0.05)

    def adam_step(_, carry):
        params, opt_state = carry
        updates, opt_state = tx.update(jax.grad(objective)(params), opt_state)
        return optax.apply_updates(params, updates), opt_state
    params = method.init_params()  # 2000 steps in one jitted loop (op by op: 30 s)
    params, _ = jax.jit(lambda p: jax.lax.fori_loop(0, 2000, adam_step, (p, tx.init(p))))(params)
    np.testing.assert_allclose(np.exp(params["log_var"]), losses, rtol=1e-3)
    # ... where the gradient in s vanishes and the weight is 1 / (2 L_t).
    _, w, _ = method.combine(params, {}, losses, 0)
    np.testing.assert_allclose(w, 0.5 / np.asarray(losses), rtol=1e-3)


def test_weights_receive_no_gradient_through_the_logged_weights():
    """Fixed weights are constants: the gradient of the total w.r.t. the losses is the weights."""
    method = make("fixed", weights=(2.0, 3.0, 0.0))
    grad = jax.grad(lambda l: method.combine({}, {}, l, 0)[0])(jnp.ones(3))
    np.testing.assert_allclose(grad, [2.0, 3.0, 0.0])
