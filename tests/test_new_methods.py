"""DualProj, ConFIG, CR-MOGM and the preference vectors on hand-checkable cases: gradient rows built in
numpy, ``K = G G^T`` handed to the method, the direction ``d = G^T c`` compared with a hand computation
or an independent float64 solver (scipy in parameter space, the ConFIG formula on the gradients)."""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import optimize

from configs import default as default_config
from mtt_jax import weighting
from mtt_jax.run import workdir

SQRT2 = np.sqrt(2.0)


def make(name, num_tasks, blocks=None, **options):
    """``name`` with ``options`` in its block, plus other methods' blocks (a wrapper's inner)."""
    config = ml_collections.ConfigDict({"name": name, name: options, **(blocks or {})})
    return weighting.make_method(config, num_tasks)


@functools.cache
def jitted(name, num_tasks, options=(), blocks=()):
    method = make(name, num_tasks, {k: dict(v) for k, v in blocks}, **dict(options))
    return method, jax.jit(method.gram_weights)


def direction(name, g_TxP, state=None, losses=None, **options):
    """``(d, coeffs, new_state)`` of a Gram method on the rows of ``g_TxP``."""
    g_TxP = np.asarray(g_TxP, np.float64)
    method, fn = jitted(name, len(g_TxP), tuple(sorted(options.items())))
    state = method.init_state() if state is None else state
    losses = np.ones(len(g_TxP)) if losses is None else losses
    coeffs, state = fn(state, jnp.asarray(g_TxP @ g_TxP.T, jnp.float32), jnp.asarray(losses, jnp.float32),
                       jnp.int32(0), jax.random.key(0))
    coeffs = np.asarray(coeffs, np.float64)
    return coeffs @ g_TxP, coeffs, state


# --- Registry, config blocks, preference checks ---------------------------------------------------------

def test_new_methods_are_registered_with_config_blocks():
    assert weighting.DEFAULT_OPTIONS["dualproj"] == {"norm_eps": 1e-4, "reg_eps": 1e-4, "preference": ()}
    assert weighting.DEFAULT_OPTIONS["conflictfree"] == {"preference": ()}
    assert weighting.DEFAULT_OPTIONS["cr_mogm"] == {"inner": "mgda", "alpha": 0.9}
    assert weighting.DEFAULT_OPTIONS["upgrad"]["preference"] == ()
    config = default_config.get_config("tiny")  # the blocks come from DEFAULT_OPTIONS
    assert config.weighting.cr_mogm.inner == "mgda" and config.weighting.dualproj.preference == ()
    config.weighting.name, config.weighting.cr_mogm.inner = "cr_mogm", "cagrad"
    config.weighting.cagrad.c = 0.2
    method = weighting.make_method(config.weighting, 2)
    assert method.inner.name == "cagrad" and method.inner.c == 0.2 and method.requires == "gram"


@pytest.mark.parametrize("preference", [(1.0,), (1.0, -0.5), (0.0, 0.0), (1.0, float("nan")), (True, 1.0)])
@pytest.mark.parametrize("name", ["upgrad", "dualproj", "conflictfree"])
def test_a_preference_is_t_non_negative_numbers_not_all_zero(name, preference):
    with pytest.raises(ValueError, match=rf"^weighting.{name}.preference=.* must be 2 finite numbers >= 0, "
                                         r"not all zero, one per task \(or \(\) for uniform weights\)$"):
        make(name, 2, preference=preference)


# --- DualProj -------------------------------------------------------------------------------------------

def test_dualproj_is_the_mean_when_the_mean_conflicts_with_no_task():
    g_TxP = np.abs(np.random.default_rng(0).normal(size=(3, 5)))   # all inner products > 0
    np.testing.assert_allclose(direction("dualproj", g_TxP)[1], 1 / 3, rtol=1e-6)


def test_dualproj_projects_a_conflicting_mean_by_hand():
    # g1 = (1, 0), g2 = (-2, 1): the mean (-1/2, 1/2) has g1 . mean < 0. The dual cone is
    # {d1 >= 0, d2 >= 2 d1}; the nearest point is (0, 1/2) = 1 g1 + 1/2 g2, so w = (1, 1/2).
    g_TxP = np.array([[1.0, 0.0], [-2.0, 1.0]])
    d, w, _ = direction("dualproj", g_TxP)
    np.testing.assert_allclose(w, [1.0, 0.5], atol=1e-3)
    np.testing.assert_allclose(d, [0.0, 0.5], atol=1e-3)


def scipy_dual_projection(g_TxP, u_T):
    """``argmin_{G d >= 0} |d - G^T u|^2`` in parameter space, float64 SLSQP."""
    target = g_TxP.T @ u_T
    result = optimize.minimize(lambda d: np.sum((d - target) ** 2), target, jac=lambda d: 2 * (d - target),
                               constraints=[{"type": "ineq", "fun": lambda d: g_TxP @ d, "jac": lambda d: g_TxP}],
                               method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
    assert result.success
    return result.x


@pytest.mark.parametrize("preference", [(), (0.2, 0.5, 0.3)])
def test_dualproj_matches_a_scipy_projection_and_conflicts_with_no_task(preference):
    g_TxP = np.random.default_rng(4).normal(size=(3, 6)) * np.array([[1.0], [3.0], [0.5]])
    u_T = np.full(3, 1 / 3) if not preference else np.asarray(preference)
    assert np.min(g_TxP @ (g_TxP.T @ u_T)) < 0                        # the (weighted) mean conflicts
    d, w, _ = direction("dualproj", g_TxP, preference=preference)
    expected = scipy_dual_projection(g_TxP, u_T)
    np.testing.assert_allclose(d, expected, atol=2e-3 * np.linalg.norm(expected))
    assert np.all(w >= u_T - 1e-6)
    # g_t . d >= 0, up to the ridge: reg_eps tr(K) w_t
    assert np.all(g_TxP @ d >= -1e-4 * np.trace(g_TxP @ g_TxP.T) * w * 1.01)


# --- ConFIG ---------------------------------------------------------------------------------------------

def official_config(g_TxP, weights_T):
    """The official update in float64: ``x = pinv(U) w`` on the unit rows, ``d = (sum_t g_t . x_hat) x_hat``."""
    norms = np.linalg.norm(g_TxP, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        units = np.nan_to_num(g_TxP / norms, nan=0.0)
    x = np.linalg.pinv(units) @ weights_T
    unit_x = x / np.linalg.norm(x)
    return np.sum(g_TxP @ unit_x) * unit_x


def test_conflictfree_two_tasks_by_hand():
    # u1 = (1, 0), u2 = (-1, 1)/sqrt2: u . x = 1 for both gives x = (1, 1 + sqrt2), |x|^2 = 4 + 2 sqrt2;
    # length = (g1 + g2) . x / |x| = (1 + sqrt2) / |x|, so d = x / (2 sqrt2) and d . u_t = 1 / (2 sqrt2).
    g_TxP = np.array([[1.0, 0.0], [-1.0, 1.0]])
    d, c, _ = direction("conflictfree", g_TxP)
    np.testing.assert_allclose(d, np.array([1.0, 1.0 + SQRT2]) / (2 * SQRT2), rtol=1e-5)
    unit_projections = g_TxP @ d / np.linalg.norm(g_TxP, axis=1)
    np.testing.assert_allclose(unit_projections, 1 / (2 * SQRT2), rtol=1e-5)  # equal angles, > 0


@pytest.mark.parametrize("case", ["random", "zero_task", "preference"])
def test_conflictfree_matches_the_official_formula_on_the_gradients(case):
    g_TxP = np.random.default_rng(7).normal(size=(3, 6)) * np.array([[1.0], [4.0], [0.3]])
    options, target = {}, np.ones(3)
    if case == "zero_task":
        g_TxP[1] = 0.0
    if case == "preference":
        options, target = {"preference": (1.0, 2.0, 0.5)}, np.array([1.0, 2.0, 0.5])
    d, c, _ = direction("conflictfree", g_TxP, **options)
    np.testing.assert_allclose(d, official_config(g_TxP, target), rtol=2e-4, atol=1e-5)
    live = np.linalg.norm(g_TxP, axis=1) > 0
    unit_projections = g_TxP[live] @ d / np.linalg.norm(g_TxP[live], axis=1)
    np.testing.assert_allclose(unit_projections / target[live], unit_projections[0] / target[live][0],
                               rtol=1e-4)                            # angles as the target sets them
    assert np.all(unit_projections > 0) and (case != "zero_task" or c[1] == 0.0)


def test_conflictfree_opposed_gradients_give_no_update():
    g = np.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(direction("conflictfree", np.stack([g, -3.0 * g]))[0], 0.0, atol=1e-5)


# --- UPGrad's preference --------------------------------------------------------------------------------

def test_upgrad_preference_one_zero_is_the_projection_of_g1_by_hand():
    # g1 = (1, 0), g2 = (-1, 1) conflict (g1 . g2 = -1). Projecting g1 onto g1 . d >= 0, g2 . d >= 0
    # only needs the second half-space: d = g1 - (g1 . g2 / |g2|^2) g2 = (1/2, 1/2) = g1 + g2 / 2.
    g_TxP = np.array([[1.0, 0.0], [-1.0, 1.0]])
    d, w, _ = direction("upgrad", g_TxP, preference=(1.0, 0.0))
    np.testing.assert_allclose(d, [0.5, 0.5], atol=1e-3)
    np.testing.assert_allclose(w, [1.0, 0.5], atol=1e-3)
    assert np.all(g_TxP @ d >= -1e-4 * np.trace(g_TxP @ g_TxP.T) * w * 1.01)  # up to the ridge


def test_upgrad_uniform_preference_is_the_default():
    g_TxP = np.random.default_rng(3).normal(size=(3, 5))
    np.testing.assert_allclose(direction("upgrad", g_TxP, preference=(1 / 3,) * 3)[1],
                               direction("upgrad", g_TxP)[1], rtol=1e-6)


# --- CR-MOGM --------------------------------------------------------------------------------------------

GRAMS = [g @ g.T for g in (np.random.default_rng(s).normal(size=(3, 5)) * [[1.0], [2.0], [0.5]]
                           for s in range(3))]


def bare_weights(name, gram):
    method, fn = jitted(name, 3)
    return np.asarray(fn(method.init_state(), jnp.asarray(gram, jnp.float32), jnp.ones(3), jnp.int32(0),
                         jax.random.key(0))[0])


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_cr_mogm_follows_the_ema_recursion_over_three_jitted_steps(alpha):
    method, fn = jitted("cr_mogm", 3, (("alpha", alpha),))
    state, applied = method.init_state(), []
    for k, gram in enumerate(GRAMS):
        weights, state = fn(state, jnp.asarray(gram, jnp.float32), jnp.ones(3), jnp.int32(k), jax.random.key(0))
        applied.append(np.asarray(weights))
    fresh = [bare_weights("mgda", gram) for gram in GRAMS]
    expected = [fresh[0]]                           # lambda_0 = lambda_hat_1: the first update is MGDA's
    for f in fresh[1:]:
        expected.append(alpha * expected[-1] + (1 - alpha) * f)
    np.testing.assert_allclose(applied, expected, rtol=1e-5, atol=1e-7)
    assert int(state["updates"]) == 3
    if alpha == 0.0:
        np.testing.assert_allclose(applied, fresh, rtol=1e-6)
    else:
        assert np.abs(np.asarray(applied) - np.asarray(fresh)).max() > 1e-2


def test_cr_mogm_refuses_what_is_not_a_weight_vector_in_one_line():
    for inner, message in (("graddrop", r"combines per-task gradients elementwise \(requires 'grads'\)"),
                           ("cr_mogm", "a smoothing of a smoothing"), ("nope", "is not valid; choose one of")):
        with pytest.raises(ValueError, match=rf"^weighting.cr_mogm.inner='{inner}'.*{message}"):
            make("cr_mogm", 3, inner=inner)
    with pytest.raises(ValueError, match=r"^weighting.cr_mogm.alpha=1.5 must be in \[0.0, 1.0\]$"):
        make("cr_mogm", 3, alpha=1.5)


@pytest.mark.parametrize("inner", ["gls", "uncertainty", "famo"])
def test_cr_mogm_of_a_loss_method_applies_the_smoothed_weights(inner):
    """``d total / d L`` is the smoothed weight vector; the inner method's own parameters keep their
    gradient, and its after-step update (FAMO) still runs on its state."""
    method = make("cr_mogm", 3, inner=inner, alpha=0.5)
    bare = make(inner, 3)
    assert method.requires == "losses" and method.combine_is_linear == bare.combine_is_linear
    params, state, rng = method.init_params(), method.init_state(), jax.random.key(0)
    combine = jax.jit(method.combine)
    first, second = jnp.asarray([0.5, 1.0, 2.0]), jnp.asarray([2.0, 0.3, 1.0])
    _, w1, state = combine(params, state, first, jnp.int32(0), rng)
    if method.needs_losses_after_step:
        state = jax.jit(method.after_step)(state, first, 0.8 * first)
    grad_losses = jax.grad(lambda l: combine(params, state, l, jnp.int32(1), rng)[0])(second)
    _, w2, new_state = combine(params, state, second, jnp.int32(1), rng)
    _, fresh2, _ = bare.combine(params, state["inner"], second, jnp.int32(1), rng)
    np.testing.assert_allclose(w2, 0.5 * np.asarray(w1) + 0.5 * np.asarray(fresh2), rtol=1e-5)
    np.testing.assert_allclose(grad_losses, w2, rtol=1e-5)
    if params:  # UW's log-variances: the same gradient as without the smoothing
        np.testing.assert_allclose(
            jax.grad(lambda p: combine(p, state, second, jnp.int32(1), rng)[0])(params)["log_var"],
            jax.grad(lambda p: bare.combine(p, state["inner"], second, jnp.int32(1), rng)[0])(params)["log_var"],
            rtol=1e-6)


@pytest.mark.parametrize("inner", ["modo", "imtl"])
def test_cr_mogm_of_a_sampled_gram_or_parametrized_gram_method(inner):
    method = make("cr_mogm", 3, inner=inner, alpha=0.0)
    bare = make(inner, 3)
    assert method.requires == bare.requires and method.gradient_samples == bare.gradient_samples
    params = method.init_params()
    losses = jnp.asarray([0.5, 1.0, 2.0])
    np.testing.assert_allclose(method.transform_losses(params, losses), bare.transform_losses(params, losses))
    gram = jnp.asarray(GRAMS[0], jnp.float32)
    smoothed, _ = jax.jit(method.gram_weights)(method.init_state(), gram, losses, jnp.int32(0), jax.random.key(0))
    fresh, _ = jax.jit(bare.gram_weights)(bare.init_state(), gram, losses, jnp.int32(0), jax.random.key(0))
    np.testing.assert_allclose(smoothed, fresh, rtol=1e-6)


# --- Runs written before these methods ------------------------------------------------------------------

def test_a_run_written_before_the_new_method_blocks_resumes(tmp_path):
    config = default_config.get_config("tiny")
    old = workdir.config_dict(config)
    for name in ("dualproj", "conflictfree", "cr_mogm"):
        del old["weighting"][name]
    del old["weighting"]["upgrad"]["preference"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert workdir.prepare(str(tmp_path), config)
    config.weighting.upgrad.preference = (1.0, 0.0)
    with pytest.raises(workdir.WorkdirError, match=r"different config \(fields: weighting\)"):
        workdir.prepare(str(tmp_path), config)
