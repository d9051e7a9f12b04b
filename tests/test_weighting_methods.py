"""The weighting zoo on hand-checkable cases: per-task gradient matrices G (T x P) built in numpy,
``K = G G^T`` handed to the method, and ``d = G^T c`` compared with the paper's formula or a float64
reference. Every (method, T, options) is jitted once and reused."""

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mtt_jax import weighting
from mtt_jax.weighting import projection, solvers

GRAM_METHODS = sorted(n for n, c in weighting.METHODS.items() if c.requires == "gram")
SAMPLED_METHODS = sorted(n for n, c in weighting.METHODS.items() if c.requires == "sampled_gram")
GRADS_METHODS = sorted(n for n, c in weighting.METHODS.items() if c.requires == "grads")


def make(name, num_tasks=3, **options):
    config = ml_collections.ConfigDict({"name": name, name: options})
    return weighting.make_method(config, num_tasks)


@functools.cache
def compiled(name, num_tasks, options=()):
    """``(method, jitted entry point)`` for ``requires``; cached so each variant compiles once."""
    method = make(name, num_tasks, **dict(options))
    entry = {"losses": method.combine, "gram": method.gram_weights, "sampled_gram": method.gram_weights,
             "grads": method.aggregate, "lookahead": method.combine}
    return method, jax.jit(entry[method.requires])


def gram_direction(name, g_TxP, losses=None, step=0, seed=0, state=None, **options):
    """``(d, coeffs, new_state)`` of a Gram method on the gradient rows of ``g_TxP``."""
    g_TxP = np.asarray(g_TxP, np.float64)
    num = g_TxP.shape[0]
    method, fn = compiled(name, num, tuple(sorted(options.items())))
    state = method.init_state() if state is None else state
    losses = np.ones(num) if losses is None else losses
    coeffs, state = fn(state, jnp.asarray(g_TxP @ g_TxP.T, jnp.float32), jnp.asarray(losses, jnp.float32),
                       jnp.int32(step), jax.random.key(seed))
    coeffs = np.asarray(coeffs, np.float64)
    return coeffs @ g_TxP, coeffs, state


def as_tree(g_TxP):
    """Per-task gradients as a two-leaf pytree with a leading task axis (P = 6)."""
    g_TxP = jnp.asarray(g_TxP, jnp.float32)
    return {"kernel": g_TxP[:, :4].reshape(-1, 2, 2), "bias": g_TxP[:, 4:]}


def flat(tree):
    return np.concatenate([np.asarray(tree["kernel"]).reshape(-1), np.asarray(tree["bias"]).reshape(-1)])


def grads_direction(name, g_TxP, losses=None, step=0, seed=0, state=None, **options):
    num = g_TxP.shape[0]
    method, fn = compiled(name, num, tuple(sorted(options.items())))
    if state is None:
        state = method.init_state_for(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                                                   as_tree(g_TxP)))
    losses = np.ones(num) if losses is None else losses
    d, w, state = fn(state, as_tree(g_TxP), jnp.asarray(losses, jnp.float32), jnp.int32(step),
                     jax.random.key(seed))
    return flat(d), np.asarray(w), state


def random_gradients(seed, num=3, dim=6, scales=(1.0, 3.0, 0.5)):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(num, dim)) * np.asarray(scales[:num])[:, None]


def unit(v):
    return v / np.linalg.norm(v)


# --- Registry -------------------------------------------------------------------------------------------

def test_registry_names_options_and_errors():
    assert sorted(weighting.METHODS) == sorted([
        "ew", "fixed", "uncertainty", "dwa", "rlw", "gls", "famo", "stch", "mgda", "pcgrad", "gradvac",
        "imtl", "cagrad", "nash_mtl", "aligned_mtl", "upgrad", "fairgrad", "gradnorm", "graddrop",
        "db_mtl", "excess_mtl", "moco", "modo", "sdmgrad", "dualproj", "conflictfree", "cr_mogm",
        "auto_lambda"])
    assert weighting.DEFAULT_OPTIONS["cagrad"]["c"] == 0.5
    assert weighting.DEFAULT_OPTIONS["gradvac"]["beta"] == 0.5
    assert weighting.DEFAULT_OPTIONS["dwa"] == {"temperature": 2.0, "epoch_steps": 100}
    assert make("cagrad", c=0.4).c == 0.4
    with pytest.raises(ValueError, match=r"^unknown option\(s\) weighting.cagrad.alpha; valid options "
                                         r"for 'cagrad': c, rescale, max_iters$"):
        make("cagrad", alpha=1.0)
    with pytest.raises(ValueError, match="choose one of: aligned_mtl, auto_lambda, cagrad"):
        make("nope")
    with pytest.raises(ValueError, match="normalization='l1'; choose one of: none, l2, loss, loss"):
        make("mgda", normalization="l1")
    with pytest.raises(ValueError, match=r"^weighting.cagrad.c=-1.0 must be in \[0.0, inf\]$"):
        make("cagrad", c=-1.0)
    with pytest.raises(ValueError, match=r"^weighting.famo.w_lr=nan must be in \(0.0, inf\]$"):
        make("famo", w_lr=float("nan"))
    # The sub-config wins over the older top-level field; the top-level one still works.
    config = ml_collections.ConfigDict({"name": "uncertainty", "init_log_var": 0.0,
                                        "uncertainty": {"init_log_var": 1.0}})
    assert weighting.make_method(config, 2).init_log_var == 1.0
    config = ml_collections.ConfigDict({"name": "fixed", "weights": (1.0, 2.0)})
    assert weighting.make_method(config, 2).weights == (1.0, 2.0)


@pytest.mark.parametrize("name", sorted(weighting.METHODS))
def test_every_method_jits_with_three_tasks(name):
    method, fn = compiled(name, 3)
    g_TxP = random_gradients(0)
    losses, rng, step = jnp.asarray([0.7, 1.3, 2.1]), jax.random.key(1), jnp.int32(5)
    if method.requires in ("losses", "lookahead"):  # a lookahead method weighs like a loss method
        params, state = method.init_params(), method.init_state()
        total, weights, state = fn(params, state, losses, step, rng)
        grad = jax.grad(lambda l: fn(params, method.init_state(), l, step, rng)[0])(losses)
        outputs = [total, weights, grad, state]
        if method.needs_losses_after_step:
            outputs.append(jax.jit(method.after_step)(state, losses, 0.9 * losses))
    elif method.requires in ("gram", "sampled_gram"):
        d, coeffs, state = gram_direction(name, g_TxP, losses, step=5, seed=1)
        outputs = [d, coeffs, state]
    else:
        d, weights, state = grads_direction(name, g_TxP, losses, step=5, seed=1)
        outputs = [d, weights, state]
    leaves = jax.tree.leaves(outputs)
    assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    assert np.asarray(outputs[1]).shape == (3,)


# --- Identical, orthogonal and directly opposed gradients -----------------------------------------------

IDENTICAL_SCALE = {  # d = factor * g for T = 3 identical gradients g with |g| = 2 and losses 1
    "mgda": 1.0, "imtl": 1.0, "upgrad": 1.0, "cagrad": 1.5 / 1.25,          # mean-like; CAGrad (1+c)/(1+c^2)
    "pcgrad": 3.0, "gradvac": 3.0, "aligned_mtl": 3.0, "gradnorm": 3.0,     # sums
    "graddrop": 3.0, "db_mtl": 0.3,                                         # DB-MTL: 0.1 x at step 1
    "excess_mtl": 3.0,                                                      # EW at its first update
    "moco": 0.25,                            # y = beta_1 L g / |g| = g / 4, weights stay on 1/T
    "nash_mtl": 0.5,                                                        # clipped to |d| = 1
    "fairgrad": np.sqrt(3.0) / 2.0,                                         # |d|^2 = T without clipping
    "modo": 1.0, "sdmgrad": 1.0,                          # the weights stay on 1/T (noise-free cross-Gram)
    "dualproj": 1.0, "cr_mogm": 1.0,                      # the mean is in the cone; CR-MOGM of MGDA
    "conflictfree": 3.0,                                  # ConFIG: the sum of the projections
}


@pytest.mark.parametrize("name", GRAM_METHODS + SAMPLED_METHODS + GRADS_METHODS)
def test_identical_gradients_give_a_multiple_of_g(name):
    g = unit(np.arange(1.0, 7.0)) * 2.0
    g_TxP = np.tile(g, (3, 1))
    run = grads_direction if name in GRADS_METHODS else gram_direction
    d = run(name, g_TxP)[0]
    np.testing.assert_allclose(d, IDENTICAL_SCALE[name] * g, rtol=2e-5, atol=2e-5)


ORTHO_NORMS = np.array([1.0, 2.0, 4.0])
ORTHO_EXPECTED_COEFFS = {
    "mgda": ORTHO_NORMS ** -2 / np.sum(ORTHO_NORMS ** -2),        # min-norm: a_t ~ 1 / |g_t|^2
    "imtl": ORTHO_NORMS ** -1 / np.sum(ORTHO_NORMS ** -1),        # equal projections: a_t ~ 1 / |g_t|
    "nash_mtl": ORTHO_NORMS ** -1 / np.sqrt(3.0),                 # a_t = 1 / |g_t|, then |d| = sqrt(3) -> 1
    "fairgrad": ORTHO_NORMS ** -1,                                # alpha = 1: K w = 1 / w
    "aligned_mtl": ORTHO_NORMS.min() / ORTHO_NORMS,               # every direction rescaled to min norm
    "upgrad": np.full(3, 1 / 3), "pcgrad": np.ones(3), "gradvac": np.ones(3), "gradnorm": np.ones(3),
}


@pytest.mark.parametrize("name", sorted(ORTHO_EXPECTED_COEFFS))
def test_orthogonal_gradients(name):
    g_TxP = np.eye(3, 5) * ORTHO_NORMS[:, None]
    _, coeffs, _ = gram_direction(name, g_TxP)
    np.testing.assert_allclose(coeffs, ORTHO_EXPECTED_COEFFS[name], rtol=1e-5, atol=1e-7)


def test_directly_opposed_gradients():
    g = unit(np.array([1.0, -2.0, 0.5, 3.0, 0.0, 1.0]))
    g_TxP = np.stack([g, -2.0 * g])
    d, a, _ = gram_direction("mgda", g_TxP)
    np.testing.assert_allclose(a, [2 / 3, 1 / 3], atol=1e-6)
    np.testing.assert_allclose(d, 0.0, atol=1e-6)
    d, a, _ = gram_direction("imtl", g_TxP)  # d . u_1 = d . u_2 = -d . u_1 forces d = 0
    np.testing.assert_allclose(a, [2 / 3, 1 / 3], atol=1e-5)
    for name in ("pcgrad", "gradvac"):  # both project onto each other's normal: nothing is left
        np.testing.assert_allclose(gram_direction(name, g_TxP)[0], 0.0, atol=1e-6)
    # CAGrad, c = 0.5: g0 = -g/2, w = (1, 0), lambda = c|g0|/|g_w| = 1/4, d = (g0 + g/4) / 1.25.
    np.testing.assert_allclose(gram_direction("cagrad", g_TxP)[0], -0.2 * g, atol=1e-6)
    # Aligned-MTL: rank 1, B = v v^T with v ~ (1, -2): a = (-1/5, 2/5) and d = -g.
    np.testing.assert_allclose(gram_direction("aligned_mtl", g_TxP)[1], [-0.2, 0.4], atol=1e-6)
    np.testing.assert_allclose(gram_direction("upgrad", g_TxP)[0], 0.0, atol=1e-3)
    for name in ("nash_mtl", "fairgrad"):  # no solution exists; the ridge keeps the answer finite
        d, a, _ = gram_direction(name, g_TxP)
        assert np.all(np.isfinite(a)) and np.all(a > 0)
    assert np.linalg.norm(gram_direction("nash_mtl", g_TxP)[0]) <= 1.0 + 1e-5
    # GradDrop keeps, per coordinate, exactly one task's component.
    d, _, _ = grads_direction("graddrop", g_TxP, seed=3)
    assert np.all(np.isclose(d, g, atol=1e-7) | np.isclose(d, -2 * g, atol=1e-7))


# --- MGDA -----------------------------------------------------------------------------------------------

def reference_min_norm(k_TxT):
    """Exact float64 min-norm point: best feasible KKT solution over all supports."""
    num, best = len(k_TxT), None
    for size in range(1, num + 1):
        for support in itertools.combinations(range(num), size):
            s = list(support)
            kkt = np.block([[k_TxT[np.ix_(s, s)], -np.ones((size, 1))],
                            [np.ones((1, size)), np.zeros((1, 1))]])
            a_s = np.linalg.lstsq(kkt, np.r_[np.zeros(size), 1.0], rcond=None)[0][:size]
            if np.all(a_s >= -1e-12):
                a = np.zeros(num)
                a[s] = np.maximum(a_s, 0) / np.maximum(a_s, 0).sum()
                if best is None or a @ k_TxT @ a < best @ k_TxT @ best - 1e-15:
                    best = a
    return best


def test_mgda_two_task_closed_form():
    for seed in range(5):
        g_TxP = random_gradients(seed, num=2, scales=(1.0, 0.2 + seed))
        g1, g2 = g_TxP
        a1 = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0.0, 1.0)
        _, a, _ = gram_direction("mgda", g_TxP)
        np.testing.assert_allclose(a, [a1, 1 - a1], atol=1e-6)


@pytest.mark.parametrize("seed", range(4))
def test_mgda_matches_exact_min_norm_point(seed):
    g_TxP = random_gradients(seed, num=4, dim=3 + seed, scales=(1.0, 10.0, 0.3, 2.0))  # seed 0: rank 3 < T
    d, a, _ = gram_direction("mgda", g_TxP)
    expected = reference_min_norm(g_TxP @ g_TxP.T) @ g_TxP
    assert np.all(a >= 0) and abs(a.sum() - 1) < 1e-6
    np.testing.assert_allclose(d, expected, atol=1e-5 * np.abs(g_TxP).max())
    assert np.all(g_TxP @ d >= d @ d - 1e-5 * np.abs(g_TxP).max() ** 2)  # common descent: g_t.d >= |d|^2


def test_mgda_normalizations_combine_normalized_gradients():
    g_TxP, losses = random_gradients(1, num=3), np.array([0.5, 2.0, 1.0])
    norms = np.linalg.norm(g_TxP, axis=1)
    for option, n in (("l2", norms), ("loss", losses), ("loss+", losses * norms)):
        normalized = g_TxP / n[:, None]
        _, coeffs, _ = gram_direction("mgda", g_TxP, losses=losses, normalization=option)
        np.testing.assert_allclose(coeffs * n, reference_min_norm(normalized @ normalized.T), atol=1e-5)


# --- PCGrad and GradVac ---------------------------------------------------------------------------------

def test_pcgrad_two_task_projection_by_hand():
    g_TxP = np.array([[1.0, 0.0], [-1.0, 1.0]])
    # p1 = g1 - (g1.g2 / |g2|^2) g2 = (1/2, 1/2); p2 = g2 - (g2.g1 / |g1|^2) g1 = (0, 1).
    d, coeffs, _ = gram_direction("pcgrad", g_TxP)
    np.testing.assert_allclose(d, [0.5, 1.5], atol=1e-6)
    np.testing.assert_allclose(coeffs, [2.0, 1.5], atol=1e-6)


def reference_surgery(g_TxP, orders, targets=None, beta=0.5):
    """Plain-vector PCGrad (targets None) or GradVac, visiting in the given orders."""
    g_TxP = np.asarray(g_TxP, np.float64)
    targets = None if targets is None else np.array(targets, np.float64)
    d = np.zeros(g_TxP.shape[1])
    for i, order in enumerate(orders):
        p = g_TxP[i].copy()
        for j in order:
            if j == i:
                continue
            gj = g_TxP[j]
            if targets is None:
                if p @ gj < 0:
                    p = p - (p @ gj) / (gj @ gj) * gj
                continue
            cos, t = p @ gj / np.linalg.norm(p) / np.linalg.norm(gj), targets[i, j]
            if cos < t:
                p = p + np.linalg.norm(p) * (t * np.sqrt(1 - cos ** 2) - cos * np.sqrt(1 - t ** 2)) / (
                    np.linalg.norm(gj) * np.sqrt(1 - t ** 2)) * gj
            targets[i, j] = (1 - beta) * t + beta * cos
        d += p
    return d, targets


def test_pcgrad_and_gradvac_match_vector_surgery_in_the_same_order():
    g_TxP = random_gradients(7, num=4, scales=(1.0, 2.0, 0.5, 1.5)) + np.array([[0.3, -2, 0, 0, 1, 0]])
    orders = np.asarray(projection.visiting_orders(make("pcgrad", 4), jax.random.key(11)))
    d, _, _ = gram_direction("pcgrad", g_TxP, seed=11)
    np.testing.assert_allclose(d, reference_surgery(g_TxP, orders)[0], atol=1e-5)
    # GradVac's first step (targets 0) is PCGrad without self-projection; targets become beta * cos.
    d1, _, state = gram_direction("gradvac", g_TxP, seed=11)
    np.testing.assert_allclose(d1, reference_surgery(g_TxP, orders)[0], atol=1e-5)
    _, targets = reference_surgery(g_TxP, orders, np.zeros((4, 4)))
    np.testing.assert_allclose(state["target_cos"], targets, atol=1e-6)
    # The second step uses those targets (and a new order).
    orders2 = np.asarray(projection.visiting_orders(make("gradvac", 4), jax.random.key(12)))
    d2, _, _ = gram_direction("gradvac", 0.5 * g_TxP[::-1], seed=12, state=state)
    np.testing.assert_allclose(d2, reference_surgery(0.5 * g_TxP[::-1], orders2, targets)[0], atol=1e-5)


def test_pcgrad_order_is_random_for_three_tasks():
    g_TxP = np.array([[1.0, 0.0, 0.0], [-0.8, 1.0, 0.2], [-0.5, -1.0, 1.0]])
    directions = {tuple(np.round(gram_direction("pcgrad", g_TxP, seed=s)[0], 5)) for s in range(12)}
    assert len(directions) > 1


# --- IMTL, Nash-MTL, FairGrad, Aligned-MTL --------------------------------------------------------------

def test_imtl_matches_the_paper_closed_form_and_equal_projections():
    g_TxP = random_gradients(3, num=3)
    u_TxP = g_TxP / np.linalg.norm(g_TxP, axis=1, keepdims=True)
    dmat, umat = g_TxP[0] - g_TxP[1:], u_TxP[0] - u_TxP[1:]
    a_rest = g_TxP[0] @ umat.T @ np.linalg.inv(dmat @ umat.T)  # eq. 8
    d, a, _ = gram_direction("imtl", g_TxP)
    np.testing.assert_allclose(a, np.r_[1 - a_rest.sum(), a_rest], rtol=1e-4, atol=1e-6)
    assert abs(a.sum() - 1.0) < 1e-5
    projections = u_TxP @ d
    np.testing.assert_allclose(projections, projections[0], rtol=1e-5)


def test_imtl_direction_is_invariant_to_rescaling_one_task():
    g_TxP = random_gradients(4, num=3)
    scaled = g_TxP * np.array([[1.0], [7.0], [1.0]])
    d, d_scaled = gram_direction("imtl", g_TxP)[0], gram_direction("imtl", scaled)[0]
    np.testing.assert_allclose(unit(d_scaled), unit(d), atol=1e-5)
    assert not np.allclose(np.linalg.norm(d_scaled), np.linalg.norm(d), rtol=1e-2)  # only the length moves


def test_imtl_loss_balance_transforms_losses():
    method = make("imtl", 3)
    params = {"loss_scale": jnp.asarray([0.0, 1.0, -1.0])}
    losses = jnp.asarray([2.0, 0.5, 3.0])
    np.testing.assert_allclose(method.transform_losses(params, losses),
                               np.exp([0.0, 1.0, -1.0]) * [2.0, 0.5, 3.0] - [0.0, 1.0, -1.0], rtol=1e-6)
    assert make("imtl", 3, loss_balance=False).init_params() == {}


def test_imtl_leaves_a_zero_gradient_task_out_of_the_solve():
    # An absent task (empty mask: gradient exactly 0) used to take all the weight and make d = 0.
    g_TxP = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
    d, a, _ = gram_direction("imtl", g_TxP)
    d_live, a_live, _ = gram_direction("imtl", g_TxP[:2])
    np.testing.assert_allclose(a_live, [2 / 3, 1 / 3], rtol=1e-5)
    np.testing.assert_allclose(a, [2 / 3, 1 / 3, 0.0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(d, [2 / 3, 2 / 3, 0.0], rtol=1e-5, atol=1e-7)
    assert a[2] == 0.0
    # The dead task's position does not matter, and the remaining tasks match IMTL on them alone.
    g_TxP = random_gradients(6, num=4, scales=(1.0, 3.0, 0.5, 2.0))
    g_TxP[1] = 0.0
    d, a, _ = gram_direction("imtl", g_TxP)
    d_live, a_live, _ = gram_direction("imtl", g_TxP[[0, 2, 3]])
    np.testing.assert_allclose(a, np.insert(a_live, 1, 0.0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(d, d_live, rtol=1e-4, atol=1e-6)


def test_imtl_all_zero_gradients_give_a_zero_update():
    d, a, _ = gram_direction("imtl", np.zeros((3, 4)))
    assert np.all(np.isfinite(a)) and np.all(a == 0.0) and np.all(d == 0.0)


def test_imtl_loss_balance_ignores_an_absent_task():
    # exp(s) * 0 - s would push an absent task's s up by the main optimizer on every step it is absent.
    method = make("imtl", 3)
    params = {"loss_scale": jnp.asarray([0.5, 1.0, -1.0])}
    losses = jnp.asarray([2.0, 0.0, 3.0])
    transform = lambda p, l: method.transform_losses(p, l).sum()
    np.testing.assert_allclose(method.transform_losses(params, losses),
                               [np.exp(0.5) * 2.0 - 0.5, 0.0, np.exp(-1.0) * 3.0 + 1.0], rtol=1e-6)
    scale_grad = jax.grad(transform)(params, losses)["loss_scale"]
    np.testing.assert_allclose(scale_grad, [np.exp(0.5) * 2.0 - 1.0, 0.0, np.exp(-1.0) * 3.0 - 1.0],
                               rtol=1e-6)
    loss_grad = jax.grad(transform, argnums=1)(params, losses)
    np.testing.assert_allclose(loss_grad, [np.exp(0.5), 0.0, np.exp(-1.0)], rtol=1e-6)


def test_nash_mtl_bargaining_solution_invariance_and_clipping():
    g_TxP = random_gradients(5, num=3)
    kmat = g_TxP @ g_TxP.T
    _, alpha, state = gram_direction("nash_mtl", g_TxP, max_norm=0.0)  # no clipping
    np.testing.assert_allclose(alpha * (kmat @ alpha), 1.0, atol=1e-4)
    np.testing.assert_allclose(state["alpha"], alpha, rtol=1e-6)
    # Rescaling one task's gradient by k divides its alpha by k: d is unchanged (paper's invariance).
    scaled = g_TxP * np.array([[1.0], [1.0], [10.0]])
    d, _, _ = gram_direction("nash_mtl", g_TxP)
    d_scaled, _, _ = gram_direction("nash_mtl", scaled)
    np.testing.assert_allclose(d_scaled, d, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(d), 1.0, atol=1e-5)  # |d|^2 = T > 1, clipped to max_norm


def test_nash_mtl_matches_the_official_solvers_weights_on_the_raw_gram():
    """The official solver gets K / |K|_F but also |K|_F inside its constraints, so it applies the
    solution of K a = 1 / a (raw Gram). Reference: the official NashMTL problem solved with cvxpy/ECOS
    on this K (|K|_F = 46.98), a = [0.25655075, 0.19620288, 0.12395801]; the normalised-Gram solution
    would be sqrt(46.98) = 6.85 times larger."""
    g_TxP = np.array([[3.0, 0.0, 1.0], [1.0, 4.0, 0.0], [0.0, 2.0, 6.0]])  # K = [[10,3,6],[3,17,8],[6,8,40]]
    official = np.array([0.25655075, 0.19620288, 0.12395801])
    _, alpha, _ = gram_direction("nash_mtl", g_TxP, max_norm=0.0)
    np.testing.assert_allclose(alpha, official, rtol=1e-5)
    # Clipped as torch's clip_grad_norm_: |d| = sqrt(a^T K a) = sqrt(3) -> max_norm 1.
    d, clipped, _ = gram_direction("nash_mtl", g_TxP)
    np.testing.assert_allclose(clipped, official / (np.sqrt(3.0) + 1e-6), rtol=1e-5)
    assert np.linalg.norm(d) == pytest.approx(1.0, abs=1e-5)


def test_nash_mtl_reuses_alpha_between_updates():
    g_TxP = random_gradients(6, num=3)
    _, alpha, state = gram_direction("nash_mtl", g_TxP, max_norm=0.0, update_weights_every=2)
    _, reused, _ = gram_direction("nash_mtl", 3.0 * g_TxP, step=1, state=state, max_norm=0.0,
                                  update_weights_every=2)
    np.testing.assert_allclose(reused, alpha, rtol=1e-6)
    _, fresh, _ = gram_direction("nash_mtl", 3.0 * g_TxP, step=2, state=state, max_norm=0.0,
                                 update_weights_every=2)
    np.testing.assert_allclose(fresh, alpha / 3.0, rtol=1e-4)


@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5])
def test_fairgrad_solves_its_fixed_point(alpha):
    g_TxP = random_gradients(8, num=3)
    kmat = g_TxP @ g_TxP.T
    _, w, _ = gram_direction("fairgrad", g_TxP, alpha=alpha)
    assert np.all(w > 0)
    np.testing.assert_allclose(kmat @ w, w ** (-1.0 / alpha), rtol=1e-4)
    if alpha == 1.0:  # the Nash-MTL fixed point
        np.testing.assert_allclose(w, gram_direction("nash_mtl", g_TxP, max_norm=0.0)[1], rtol=1e-4)


def test_aligned_mtl_equalizes_singular_values():
    g_TxP = random_gradients(9, num=3)
    kmat = g_TxP @ g_TxP.T
    eigvals, eigvecs = np.linalg.eigh(kmat)
    aligner = np.sqrt(eigvals.min()) * eigvecs @ np.diag(eigvals ** -0.5) @ eigvecs.T
    d, a, _ = gram_direction("aligned_mtl", g_TxP)
    np.testing.assert_allclose(np.linalg.svd(aligner @ g_TxP, compute_uv=False), np.sqrt(eigvals.min()),
                               rtol=1e-6)
    np.testing.assert_allclose(a, aligner.sum(axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(d, (aligner @ g_TxP).sum(axis=0), rtol=1e-4, atol=1e-5)


# --- CAGrad and UPGrad ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_cagrad_solves_its_dual_and_c0_is_the_mean(seed):
    g_TxP = random_gradients(seed, num=3) + np.array([[0.0] * 5 + [2.0], [0.0] * 6, [-1.0] + [0.0] * 5])
    _, coeffs0, _ = gram_direction("cagrad", g_TxP, c=0.0)
    np.testing.assert_allclose(coeffs0, 1 / 3)
    c = 0.5
    d, coeffs, _ = gram_direction("cagrad", g_TxP)
    g0 = g_TxP.mean(axis=0)
    # Certificate: with d' = d (1 + c^2), |d' - g0| = c |g0| and the worst-task improvement
    # min_t g_t . d' equals the dual value F(w) = g_w . g0 + c |g0| |g_w| (zero duality gap).
    primal = d * (1 + c ** 2)
    np.testing.assert_allclose(np.linalg.norm(primal - g0), c * np.linalg.norm(g0), rtol=1e-5)
    w = (coeffs * (1 + c ** 2) - 1 / 3)
    w = w / w.sum()
    g_w = w @ g_TxP
    dual = g_w @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(g_w)
    assert abs(dual - np.min(g_TxP @ primal)) < 1e-5 * g0 @ g0
    _, coeffs_r0, _ = gram_direction("cagrad", g_TxP, rescale=0)
    np.testing.assert_allclose(coeffs_r0, coeffs * (1 + c ** 2), rtol=1e-5)


def reference_upgrad(k_TxT, reg=1e-4):
    """min v^T K_hat v s.t. v >= e_i / T for each i, by enumerating active sets (float64)."""
    num = len(k_TxT)
    k_hat = k_TxT / np.trace(k_TxT) + reg * np.eye(num)
    total = np.zeros(num)
    for i in range(num):
        lower = np.eye(num)[i] / num
        for size in range(num + 1):
            for free in itertools.combinations(range(num), size):
                x = np.zeros(num)
                f = list(free)
                if f:
                    x[f] = np.linalg.solve(k_hat[np.ix_(f, f)], -(k_hat @ lower)[f])
                y = k_hat @ (x + lower)
                if np.all(x >= -1e-12) and np.all(np.delete(y, f) >= -1e-12):
                    break
            else:
                continue
            break
        total += x + lower
    return total


def test_upgrad_weights_are_at_least_the_mean_and_match_reference():
    no_conflict = np.abs(random_gradients(2, num=3))
    np.testing.assert_allclose(gram_direction("upgrad", no_conflict)[1], 1 / 3, rtol=1e-6)
    g_TxP = random_gradients(10, num=4, scales=(1.0, 2.0, 0.5, 1.0))
    d, w, _ = gram_direction("upgrad", g_TxP)
    assert np.all(w >= 1 / 4 - 1e-7)
    np.testing.assert_allclose(w, reference_upgrad(g_TxP @ g_TxP.T), rtol=1e-3)
    assert np.all(g_TxP @ d >= -1e-4 * np.linalg.norm(d) * np.linalg.norm(g_TxP, axis=1))  # no conflict


# --- GradNorm, DB-MTL, GradDrop -------------------------------------------------------------------------

def test_gradnorm_records_initial_losses_and_balances_norms():
    g_TxP = np.eye(3, 4) * np.array([[1.0], [4.0], [1.0]])  # task 1's gradient is 4x larger
    losses = np.array([1.0, 2.0, 3.0])
    _, w, state = gram_direction("gradnorm", g_TxP, losses=losses)
    np.testing.assert_allclose(w, 1.0)
    np.testing.assert_allclose(state["initial_losses"], losses)
    for step in range(1, 40):
        _, w, state = gram_direction("gradnorm", g_TxP, losses=losses, step=step, state=state)
    np.testing.assert_allclose(w.sum(), 3.0, rtol=1e-6)
    assert w[1] < 0.6 and w[0] > 1.1 and w[2] > 1.1  # equal progress: weights move to equalise w_t |g_t|
    np.testing.assert_allclose(state["initial_losses"], losses)


def test_db_mtl_first_steps_are_small_and_buffers_share_the_max_norm():
    g_TxP = random_gradients(12, num=3)
    losses = np.array([0.5, 2.0, 1.0])
    d1, scale1, state = grads_direction("db_mtl", g_TxP, losses=losses)
    log_grads = g_TxP / losses[:, None]
    norms = np.linalg.norm(log_grads, axis=1)
    expected = (norms.max() / norms) @ log_grads
    np.testing.assert_allclose(d1, 0.1 * expected, rtol=1e-5)
    np.testing.assert_allclose(scale1, norms.max() / norms, rtol=1e-5)
    d2, _, _ = grads_direction("db_mtl", g_TxP, losses=losses, step=1, state=state)
    np.testing.assert_allclose(d2, 0.19 * expected, rtol=1e-5)
    with pytest.raises(ValueError, match="init_state_for"):
        make("db_mtl").init_state()


def test_graddrop_keeps_consistent_signs_and_leak_one_is_the_sum():
    g_TxP = np.array([[1.0, -2.0, 0.5, 3.0, -1.0, 2.0], [2.0, -1.0, 0.5, 1.0, -3.0, 1.0]])
    d, kept, _ = grads_direction("graddrop", g_TxP)  # no sign conflict: purity is 0 or 1
    np.testing.assert_allclose(d, g_TxP.sum(axis=0), rtol=1e-6)
    np.testing.assert_allclose(kept, 1.0)
    conflict = g_TxP * np.array([[1.0], [-1.0]])
    np.testing.assert_allclose(grads_direction("graddrop", conflict, leak=1.0)[0], conflict.sum(axis=0),
                               rtol=1e-6)
    draws = {tuple(grads_direction("graddrop", conflict, seed=s)[0]) for s in range(6)}
    assert len(draws) > 1


# --- ExcessMTL and MoCo ---------------------------------------------------------------------------------

def excess_mtl_reference(steps_g, eta=1e-2, eps=1e-7, baseline_kind="max"):
    """ExcessMTL's weights and directions over a sequence of per-task gradient matrices, in float64."""
    grad_sq_sum, weights, baseline, out = 0.0, np.ones(len(steps_g[0])), None, []
    for g_TxP in steps_g:
        grad_sq_sum = grad_sq_sum + g_TxP ** 2
        excess = np.sum(g_TxP ** 2 / np.sqrt(grad_sq_sum + eps), axis=1)
        if baseline is None:
            baseline = excess
        else:
            baseline = np.maximum(baseline, excess) if baseline_kind == "max" else baseline
            weights = weights * np.exp(eta * excess / baseline)
            weights = weights / weights.sum() * len(weights)
        out.append((weights @ g_TxP, weights))
    return out


@pytest.mark.parametrize("baseline", ["max", "first"])
def test_excess_mtl_is_ew_first_then_steps_on_normalised_excess_risks(baseline):
    steps_g = [random_gradients(s, num=3) for s in (20, 21, 22)]
    steps_g[2] = steps_g[2] * 3.0  # above the first step's excess risks: the two baselines part
    references = excess_mtl_reference(steps_g, eta=0.5, baseline_kind=baseline)
    state = None
    for step, (g_TxP, (d_ref, w_ref)) in enumerate(zip(steps_g, references)):
        d, w, state = grads_direction("excess_mtl", g_TxP, step=step + 4, state=state, robust_step_size=0.5,
                                      baseline=baseline)
        np.testing.assert_allclose(w, w_ref, rtol=1e-5)
        np.testing.assert_allclose(d, d_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["weights"].sum(), 3.0, rtol=1e-6)
    assert not np.allclose(w, 1.0)  # the weights moved
    with pytest.raises(ValueError, match="init_state_for"):
        make("excess_mtl").init_state()


def test_excess_mtl_takes_each_baseline_at_the_first_nonzero_gradient():
    """Zero-initialised heads give the shared parameters no gradient at step 0: the baselines are taken
    at the first step with a gradient, and the weights then move (a zero baseline would freeze them)."""
    steps_g = [np.zeros((3, 6))] + [random_gradients(s, num=3) for s in (50, 51)]
    state = None
    for step, g_TxP in enumerate(steps_g):
        _, w, state = grads_direction("excess_mtl", g_TxP, step=step, state=state, robust_step_size=0.5,
                                      baseline="first")
        if step < 2:
            np.testing.assert_allclose(w, 1.0)
    expected = excess_mtl_reference(steps_g[1:], eta=0.5, baseline_kind="first")[-1][1]
    np.testing.assert_allclose(w, expected, rtol=1e-5)
    assert np.all(np.asarray(state["baseline"]) > 0) and not np.allclose(w, 1.0)


def test_excess_mtl_max_baseline_bounds_the_step_where_gradients_start_tiny():
    """Zero-initialised heads: the first shared gradients are ~1e-5 of the later ones. The first-step
    baseline sends every later ratio to ~1e5 and one task takes all the weight at once; the running
    maximum keeps each ratio at most 1, so 20 steps of eta = 0.01 move a log-weight by at most 0.2."""
    rng = np.random.default_rng(7)
    steps_g = [random_gradients(40) * 1e-5] + [rng.normal(size=(3, 6)) * np.array([[1.0], [2.0], [4.0]])
                                               for _ in range(20)]
    final = {}
    for baseline in ("first", "max"):
        state = None
        for step, g_TxP in enumerate(steps_g):
            _, final[baseline], state = grads_direction("excess_mtl", g_TxP, step=step, state=state,
                                                        baseline=baseline)
    assert final["first"].max() > 2.9  # collapsed onto one task (the weights sum to 3)
    log_w = np.log(final["max"])
    assert log_w.max() - log_w.min() <= 0.01 * 20 + 1e-6
    np.testing.assert_allclose(final["max"], excess_mtl_reference(steps_g)[-1][1], rtol=1e-4)


def test_excess_mtl_weights_ignore_each_task_s_gradient_scale():
    """e_t scales with |g_t| and so does its baseline e^0_t: rescaling one task's gradients at every
    step leaves the weights as they were (the paper's normalisation by the first excess risk)."""
    steps_g = [random_gradients(s, num=3) for s in (30, 31, 32)]
    scaled_g = [g * np.array([[1.0], [10.0], [0.1]]) for g in steps_g]
    weights = {}
    for key, run in (("plain", steps_g), ("scaled", scaled_g)):
        state = None
        for step, g_TxP in enumerate(run):
            _, weights[key], state = grads_direction("excess_mtl", g_TxP, step=step, state=state,
                                                     robust_step_size=0.5)
    np.testing.assert_allclose(weights["scaled"], weights["plain"], rtol=1e-4)


def simplex_projection_reference(v):
    """The Euclidean projection onto the simplex by bisection on the threshold (float64)."""
    low, high = v.min() - 1.0, v.max()
    for _ in range(200):
        theta = (low + high) / 2
        low, high = (theta, high) if np.maximum(v - theta, 0).sum() > 1 else (low, theta)
    return np.maximum(v - (low + high) / 2, 0)


@pytest.mark.parametrize("v", [[0.2, 0.3, 0.5], [0.5, 0.5, 0.5], [2.0, 0.0, 0.0], [-1.0, 0.3, 0.1, 0.4],
                               [3.0, -2.0, 2.9, 0.0, -0.5], [1e9, 1e9, 0.0], [-3e9, 2e9, 2e9 + 256]])
def test_project_to_simplex_matches_the_bisection_reference(v):
    w = np.asarray(jax.jit(solvers.project_to_simplex)(jnp.asarray(v)))
    np.testing.assert_allclose(w, simplex_projection_reference(np.asarray(v, np.float64)), atol=1e-6)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("simplex_step,gamma", [("projection", 10.0), ("softmax", 0.1)])
def test_moco_tracks_rescaled_gradients_and_steps_its_weights(simplex_step, gamma):
    """Three updates against a float64 replay of Alg. 1; gamma 10 makes the projection clip a weight."""
    losses = np.array([0.5, 2.0, 1.0])
    tracked, weights, state, smallest = np.zeros((3, 6)), np.full(3, 1 / 3), None, 1.0
    for step, seed in enumerate((40, 41, 42)):
        g_TxP = random_gradients(seed, num=3)
        k = step + 1.0
        h = g_TxP / (np.linalg.norm(g_TxP, axis=1, keepdims=True) + 1e-8) * losses[:, None]
        tracked = tracked - 0.5 / np.sqrt(k) * (tracked - h)
        moved = weights - gamma / np.sqrt(k) * (tracked @ tracked.T) @ weights
        weights = (simplex_projection_reference(moved) if simplex_step == "projection"
                   else np.exp(moved) / np.exp(moved).sum())
        d, w, state = grads_direction("moco", g_TxP, losses=losses, step=step, state=state,
                                      simplex_step=simplex_step, gamma=gamma)
        np.testing.assert_allclose(w, weights, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d, weights @ tracked, rtol=1e-5, atol=1e-6)
        smallest = min(smallest, weights.min())
    assert (smallest == 0.0) == (simplex_step == "projection")  # only the projection reaches the boundary
    with pytest.raises(ValueError, match="init_state_for"):
        make("moco").init_state()


# --- MoDo and SDMGrad: weights from the cross-Gram of two samples -----------------------------------------

def sampled_direction(name, samples, state=None, **options):
    """``(d, coeffs, new_state)`` of a double-sampling method on three samples' gradient matrices: the
    cross-Gram ``G_1 G_2^T`` goes in, the coefficients apply to ``G_0``."""
    g0_TxP, g1_TxP, g2_TxP = (np.asarray(g, np.float64) for g in samples)
    method, fn = compiled(name, len(g0_TxP), tuple(sorted(options.items())))
    state = method.init_state() if state is None else state
    coeffs, state = fn(state, jnp.asarray(g1_TxP @ g2_TxP.T, jnp.float32), jnp.ones(len(g0_TxP)),
                       jnp.int32(0), jax.random.key(0))
    coeffs = np.asarray(coeffs, np.float64)
    return coeffs @ g0_TxP, coeffs, state


def three_samples(seed):
    """Three noisy samples of the same three task gradients: their cross-Gram is not symmetric, and a
    diagonal entry may be negative."""
    rng = np.random.default_rng(seed)
    return [random_gradients(seed) + rng.normal(size=(3, 6)) for _ in range(3)]


def test_modo_steps_its_weights_on_the_cross_gram():
    """Three updates against a float64 replay of MoDo's Alg. 1; gamma 0.2 makes the projection clip."""
    weights, state, smallest = np.full(3, 1 / 3), None, 1.0
    for seed in (70, 71, 72):
        samples = three_samples(seed)
        cross = samples[1] @ samples[2].T
        weights = simplex_projection_reference(weights - 0.2 * (cross + 0.1 * np.eye(3)) @ weights)
        d, coeffs, state = sampled_direction("modo", samples, state=state, gamma=0.2)
        np.testing.assert_allclose(coeffs, weights, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d, weights @ samples[0], rtol=1e-5, atol=1e-6)
        smallest = min(smallest, weights.min())
    assert smallest == 0.0
    _, coeffs, _ = sampled_direction("modo", three_samples(73), gamma=0.0)
    np.testing.assert_allclose(coeffs, 1 / 3)  # gamma 0: the mean gradient of sample 0


def sdmgrad_reference(weights, cross, lam=0.3, steps=20, lr=5.0, momentum=0.5):
    """SDMGrad's inner loop in float64: heavy-ball projected steps on the normalised cross-Gram."""
    scale = np.mean(np.sqrt(np.maximum(np.diag(cross), 0.0)))
    cross = cross / (scale ** 2 + 1e-8)
    velocity = np.zeros_like(weights)
    for _ in range(steps):
        velocity = momentum * velocity + cross @ weights + lam * cross.mean(axis=1)
        weights = simplex_projection_reference(weights - lr * velocity)
    return weights, (weights + lam / len(weights)) / (1 + lam)


@pytest.mark.parametrize("lam", [0.3, 0.0])
def test_sdmgrad_matches_its_inner_loop_and_moves_toward_the_mean(lam):
    weights, state = np.full(3, 1 / 3), None
    for seed in (80, 81):
        samples = three_samples(seed)
        weights, expected = sdmgrad_reference(weights, samples[1] @ samples[2].T, lam=lam)
        d, coeffs, state = sampled_direction("sdmgrad", samples, state=state, lam=lam)
        np.testing.assert_allclose(coeffs, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(d, expected @ samples[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(state["weights"], weights, rtol=1e-4, atol=1e-5)
    assert not np.allclose(weights, 1 / 3)
    assert coeffs.min() >= lam / 3 / (1 + lam) - 1e-7  # every task keeps the mean's share
    # Rescaling every gradient leaves the weights alone (the cross-Gram is normalised); a huge lam
    # gives the mean gradient.
    samples = three_samples(82)
    _, plain, _ = sampled_direction("sdmgrad", samples, lam=lam)
    _, scaled, _ = sampled_direction("sdmgrad", [10.0 * g for g in samples], lam=lam)
    np.testing.assert_allclose(scaled, plain, rtol=1e-4, atol=1e-6)
    _, mean_like, _ = sampled_direction("sdmgrad", samples, lam=1e6)
    np.testing.assert_allclose(mean_like, 1 / 3, atol=1e-5)


# --- Loss-based methods ---------------------------------------------------------------------------------

def run_combine(name, losses, step=0, seed=0, state=None, params=None, **options):
    method, fn = compiled(name, len(losses), tuple(sorted(options.items())))
    state = method.init_state() if state is None else state
    params = method.init_params() if params is None else params
    total, weights, state = fn(params, state, jnp.asarray(losses, jnp.float32), jnp.int32(step),
                               jax.random.key(seed))
    return float(total), np.asarray(weights), state


def test_dwa_is_ew_for_two_epochs_then_uses_epoch_mean_ratios():
    state, epoch_losses = None, {0: [1.0, 2.0, 3.0], 1: [0.5, 2.0, 1.5], 2: [0.4, 1.0, 1.0]}
    for step in range(15):  # epoch_steps = 5
        epoch = step // 5
        losses = np.asarray(epoch_losses[epoch]) * (1.0 + 0.1 * (step % 5 % 2))  # 1, 1.1, 1, 1.1, 1
        _, w, state = run_combine("dwa", losses, step=step, state=state, epoch_steps=5)
        if epoch < 2:
            np.testing.assert_allclose(w, 1.0)
    ratio = np.asarray(epoch_losses[1]) / np.asarray(epoch_losses[0])  # the 1.04 mean factor cancels
    expected = 3 * np.exp(ratio / 2) / np.exp(ratio / 2).sum()
    np.testing.assert_allclose(w, expected, rtol=1e-5)


def test_rlw_weights_are_a_softmax_of_a_normal_draw():
    _, w0, _ = run_combine("rlw", [1.0, 2.0, 3.0], seed=0)
    _, w1, _ = run_combine("rlw", [1.0, 2.0, 3.0], seed=1)
    np.testing.assert_allclose(w0.sum(), 1.0, rtol=1e-6)
    assert not np.allclose(w0, w1)
    np.testing.assert_allclose(w0, jax.nn.softmax(jax.random.normal(jax.random.key(0), (3,))), rtol=1e-6)


def test_gls_total_is_the_geometric_mean_and_weights_are_its_gradient():
    losses = np.array([0.5, 2.0, 4.0])
    total, w, _ = run_combine("gls", losses)
    gm = np.prod(losses) ** (1 / 3)
    assert total == pytest.approx(gm, rel=1e-6)
    np.testing.assert_allclose(w, gm / (3 * losses), rtol=1e-6)
    method = make("gls")
    grad = jax.grad(lambda l: method.combine({}, {}, l, 0)[0])(jnp.asarray(losses, jnp.float32))
    np.testing.assert_allclose(grad, w, rtol=1e-5)


def test_famo_weights_and_logit_update_direction():
    method = make("famo")
    losses = np.array([1.0, 2.0, 4.0])
    _, w, state = run_combine("famo", losses)
    np.testing.assert_allclose(w, (1 / losses) / np.sum(1 / losses), rtol=1e-6)  # z uniform at start
    # Task 0's loss halved, task 1's did not move, task 2's fell by 10%: task 1 gains, task 0 loses.
    after = jax.jit(method.after_step)
    state = after(state, jnp.asarray(losses), jnp.asarray(losses * np.array([0.5, 1.0, 0.9])))
    logits = np.asarray(state["logits"])  # Adam's first step has size w_lr in every coordinate
    assert logits[0] < 0 < logits[2] <= logits[1]
    _, w2, _ = run_combine("famo", losses, state=state)
    assert w2[1] / w2[0] > w[1] / w[0]
    np.testing.assert_allclose(w2.sum(), 1.0, rtol=1e-6)


def test_gls_leaves_a_zero_loss_task_out():
    # An absent task (loss exactly 0) used to drag the geometric mean to ~1e-4 and every weight with it.
    total, w, _ = run_combine("gls", [0.5, 0.0, 4.0])
    total_present, w_present, _ = run_combine("gls", [0.5, 4.0])
    assert total == pytest.approx(np.sqrt(0.5 * 4.0), rel=1e-6)
    assert total == pytest.approx(total_present, rel=1e-6)
    np.testing.assert_allclose(w, [w_present[0], 0.0, w_present[1]], rtol=1e-6)
    method = make("gls")
    grad = jax.grad(lambda l: method.combine({}, {}, l, 0)[0])(jnp.asarray([0.5, 0.0, 4.0]))
    np.testing.assert_allclose(grad, w, rtol=1e-5)
    total, w, _ = run_combine("gls", [0.0, 0.0, 0.0])
    assert total == 0.0 and np.all(w == 0.0)
    grad = jax.grad(lambda l: method.combine({}, {}, l, 0)[0])(jnp.zeros(3))
    assert np.all(np.isfinite(grad)) and np.all(grad == 0.0)


def test_famo_leaves_a_zero_loss_task_out_of_weights_and_logit_updates():
    # Task 1 is absent on every step; tasks 0 and 2 must evolve as FAMO on those two tasks alone.
    method, method_present = make("famo"), make("famo", 2)
    after, after_present = jax.jit(method.after_step), jax.jit(method_present.after_step)
    state, state_present = method.init_state(), method_present.init_state()
    losses = np.array([1.0, 0.0, 4.0])
    for factors in ([0.5, 1.0, 0.9], [0.9, 1.0, 0.6], [0.8, 1.0, 0.95]):
        _, w, _ = run_combine("famo", losses, state=state)
        _, w_present, _ = run_combine("famo", losses[[0, 2]], state=state_present)
        np.testing.assert_allclose(w, [w_present[0], 0.0, w_present[1]], rtol=1e-6)
        np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
        after_losses = losses * np.array(factors)
        state = after(state, jnp.asarray(losses), jnp.asarray(after_losses))
        state_present = after_present(state_present, jnp.asarray(losses[[0, 2]]),
                                      jnp.asarray(after_losses[[0, 2]]))
        losses = np.where(losses > 0, after_losses, 0.0)
        np.testing.assert_allclose(np.asarray(state["logits"])[[0, 2]], state_present["logits"], rtol=1e-5)
        assert state["logits"][1] == 0.0  # an absent task's logit does not move (nor decay)
        for leaf in jax.tree.leaves(state["opt_state"]):
            if leaf.shape == (3,):
                assert leaf[1] == 0.0  # nor do its Adam moments
    assert not np.allclose(state["logits"], 0.0)


def test_famo_with_every_task_absent_gives_zeros_and_keeps_its_state():
    method = make("famo")
    state = jax.jit(method.after_step)(method.init_state(), jnp.asarray([1.0, 2.0, 4.0]),
                                       jnp.asarray([0.5, 2.0, 3.6]))
    total, w, _ = run_combine("famo", [0.0, 0.0, 0.0], state=state)
    assert total == 0.0 and np.all(w == 0.0)
    grad = jax.grad(lambda l: method.combine({}, state, l, 0)[0])(jnp.zeros(3))
    assert np.all(np.isfinite(grad)) and np.all(grad == 0.0)
    new_state = jax.jit(method.after_step)(state, jnp.zeros(3), jnp.zeros(3))
    np.testing.assert_array_equal(new_state["logits"], state["logits"])
    for new, old in zip(jax.tree.leaves(new_state["opt_state"]), jax.tree.leaves(state["opt_state"])):
        assert np.all(np.isfinite(new))
        if new.shape == (3,):
            np.testing.assert_array_equal(new, old)


def test_stch_warms_up_through_epoch_warmup_epochs_then_uses_its_mean_as_the_nadir():
    """LibMTL's schedule with W = warmup_epochs = 1 and 2 updates per epoch: epochs 0 and 1 (steps 0-3)
    take the log-loss step, the nadir is epoch 1's mean loss, STCH starts at epoch 2 (step 4)."""
    losses_by_step = [[1.0, 2.0], [1.0, 2.0],   # epoch 0: warm-up
                      [2.0, 1.0], [4.0, 3.0],   # epoch 1 = W: warm-up; its mean [3, 2] is the nadir
                      [3.0, 4.0], [6.0, 2.0]]   # epoch 2: STCH
    state, results = None, []
    for step, losses in enumerate(losses_by_step):
        total, w, state = run_combine("stch", losses, step=step, state=state, epoch_steps=2, warmup_epochs=1)
        results.append((total, w, np.asarray(state["nadir"])))
    for step in range(4):  # warm-up: total = sum_t log L_t, weights 1/L_t, nadir not yet set
        total, w, nadir = results[step]
        assert total == pytest.approx(np.sum(np.log(losses_by_step[step])), rel=1e-6)
        np.testing.assert_allclose(w, 1 / np.asarray(losses_by_step[step]), rtol=1e-6)
        np.testing.assert_array_equal(nadir, [1.0, 1.0])
    np.testing.assert_allclose(results[3][1], [0.25, 1 / 3], rtol=1e-6)  # epoch 1 still warms up
    # Step 4, losses [3, 4], nadir [3, 2]: l = [0, log 2], softmax = [1/3, 2/3],
    # weights = 2 softmax / L = [2/9, 1/3], total = 2 log(1 + 2) = 2 log 3.
    total, w, nadir = results[4]
    np.testing.assert_allclose(nadir, [3.0, 2.0], rtol=1e-6)
    assert total == pytest.approx(2 * np.log(3.0), rel=1e-6)
    np.testing.assert_allclose(w, [2 / 9, 1 / 3], rtol=1e-6)
    # Step 5, losses [6, 2]: l = [log 2, 0], softmax = [2/3, 1/3], weights = [2/9, 1/3], same nadir.
    total, w, nadir = results[5]
    np.testing.assert_allclose(nadir, [3.0, 2.0], rtol=1e-6)
    assert total == pytest.approx(2 * np.log(3.0), rel=1e-6)
    np.testing.assert_allclose(w, [2 / 9, 1 / 3], rtol=1e-6)
    # The logged weights are the applied ones, d total / d L_t.
    method, _ = compiled("stch", 2, (("epoch_steps", 2), ("warmup_epochs", 1)))
    total_of = lambda l: method.combine({}, state, l, jnp.int32(5))[0]
    grad = jax.jit(jax.grad(total_of))(jnp.asarray([6.0, 2.0]))
    np.testing.assert_allclose(grad, [2 / 9, 1 / 3], rtol=1e-6)


@pytest.mark.parametrize("warmup_epochs", [0, 4])
def test_stch_last_warmup_epoch_is_warmup_epochs(warmup_epochs):
    """One update per epoch: steps 0..W warm up (W = 4 is the default, LibMTL's STCH_warmup_epoch),
    the nadir is step W's losses and step W + 1 is the first STCH step."""
    if warmup_epochs == 4:
        assert make("stch").warmup_epochs == 4
    state, base = None, np.array([1.0, 2.0, 4.0])
    for step in range(warmup_epochs + 1):
        losses = base * (step + 1)
        total, w, state = run_combine("stch", losses, step=step, state=state, epoch_steps=1,
                                      warmup_epochs=warmup_epochs)
        np.testing.assert_allclose(w, 1 / losses, rtol=1e-6)
        assert total == pytest.approx(np.sum(np.log(losses)), rel=1e-6)
    nadir = base * (warmup_epochs + 1)  # step W's losses
    losses = nadir * np.array([1.0, 2.0, 4.0])  # l = log [1, 2, 4], softmax = [1, 2, 4] / 7
    total, w, state = run_combine("stch", losses, step=warmup_epochs + 1, state=state, epoch_steps=1,
                                  warmup_epochs=warmup_epochs)
    np.testing.assert_allclose(state["nadir"], nadir, rtol=1e-6)
    assert total == pytest.approx(3 * np.log(7.0), rel=1e-6)
    np.testing.assert_allclose(w, 3 / 7 / nadir, rtol=1e-6)  # 3 softmax_t / L_t; warm-up would be 1/L_t


@pytest.mark.parametrize("name", sorted(n for n, cls in weighting.METHODS.items() if cls.requires == "losses"))
def test_combine_is_linear_exactly_when_the_weights_ignore_the_loss_values(name):
    """Gradient accumulation takes a linear method's weights at any losses and linearises the others at
    the batch's mean losses (`mtt_jax.train_step`): the flag must say which is which."""
    method = make(name, 3)
    params, state = method.init_params(), method.init_state()
    weights_at = lambda losses_T: jax.grad(lambda l: method.combine(params, state, l, jnp.int32(0),
                                                                    jax.random.key(0))[0])(losses_T)
    same = np.allclose(weights_at(jnp.array([0.3, 1.0, 2.5])), weights_at(jnp.array([2.0, 0.1, 0.7])))
    assert same == method.combine_is_linear
