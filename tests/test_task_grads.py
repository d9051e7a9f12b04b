"""Per-task gradients from one backward pass equal the naive Jacobian, in both layouts."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtt_jax import data, tasks as tasks_lib, task_grads, train_step  # noqa: F401 (data: registers the tasks)
from mtt_jax.specs import InputSpec
from mtt_jax.models import MultiTaskTransformer

DIGITS = (tasks_lib.get("left_digit"), tasks_lib.get("right_digit"))
SEQ = tuple(tasks_lib.get(n) for n in ("majority", "majority_parity", "mean_value", "repeat_tag"))


@functools.cache  # shared by the tests of a layout; none of them changes what it returns
def setup(layout):
    key = jax.random.key(0)
    if layout == "single":
        tasks, spec = DIGITS, InputSpec("image", (12, 12))
        inputs = jax.random.uniform(key, (4, 12, 12))
        labels = {"left_digit": jnp.array([1, 2, 3, 4]), "right_digit": jnp.array([5, 6, 7, 8])}
        mask = {t.name: jnp.ones(4) for t in tasks}
    else:
        tasks, spec = SEQ, InputSpec("tokens", (8,), vocab_size=32)
        inputs = jax.random.randint(key, (4, 3, 8), 1, 32).at[:, :, 6:].set(0)
        labels = {"majority": jnp.array([0, 1, 2]), "majority_parity": jnp.array([0, 1, 1]),
                  "mean_value": jnp.array([0.5, -1.0, 0.2]),
                  "repeat_tag": jax.random.randint(key, (3, 8), 0, 2)}
        mask = {t.name: jnp.ones(3) for t in tasks}
    model = MultiTaskTransformer(tasks=tasks, layout=layout, input_spec=spec, num_layers=1, d_model=16,
                                 num_heads=2, mlp_dim=32)
    params = nn.unbox(jax.jit(model.init)(key, inputs)["params"])  # op by op: seconds of small compiles
    # Non-zero heads, so that every task's gradient reaches the trunk.
    for name in [k for k in params if k.startswith("head_")]:
        params[name]["dense"]["kernel"] = jax.random.normal(key, params[name]["dense"]["kernel"].shape)
    batch = {"inputs": inputs, "labels": labels, "mask": mask}
    loss_fn = lambda outputs, b: train_step.task_losses(tasks, outputs, b, layout)
    return model, params, batch, tasks, loss_fn


@pytest.mark.parametrize("layout", ["single", "multi"])
def test_per_task_gradients_equal_the_jacobian(layout):
    model, params, batch, tasks, loss_fn = setup(layout)
    coeffs = jnp.arange(1.0, len(tasks) + 1)

    @jax.jit
    def ours(params):
        r = task_grads.per_task_gradients(model, params, batch, tasks, layout, jax.random.key(1), loss_fn)
        return r.losses_T, r.grads_T, r.task_side_grads, r.apply(coeffs)
    losses_T, grads_T, task_side_grads, combined = ours(params)
    shared, task_side = task_grads.split_params(params)

    def losses_of(shared_params, task_params=task_side):
        outputs, _ = model.apply({"params": {**shared_params, **task_params}}, batch["inputs"])
        return loss_fn(outputs, batch)
    jacobian = jax.jit(jax.jacrev(losses_of))(shared)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), grads_T, jacobian)
    np.testing.assert_allclose(losses_T, jax.jit(losses_of)(shared), rtol=1e-6)
    # The decoder gets the ordinary gradient of the summed loss.
    expected = jax.jit(jax.grad(lambda tp: losses_of(shared, tp).sum()))(task_side)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                 task_side_grads, expected)
    # apply(c) is sum_t c_t g_t.
    expected = jax.tree.map(lambda g: jnp.tensordot(coeffs, g, axes=1), jacobian)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), combined, expected)


@pytest.mark.parametrize("layout", ["single", "multi"])
def test_rep_grad_apply_matches_weighted_loss_gradient(layout):
    model, params, batch, tasks, loss_fn = setup(layout)
    coeffs = jnp.linspace(0.5, 2.0, len(tasks))
    ours = jax.jit(lambda p: task_grads.per_task_gradients(
        model, p, batch, tasks, layout, jax.random.key(1), loss_fn, rep_grad=True).apply(coeffs))
    shared, task_side = task_grads.split_params(params)
    expected = jax.jit(jax.grad(lambda sp: jnp.dot(coeffs, loss_fn(
        model.apply({"params": {**sp, **task_side}}, batch["inputs"])[0], batch))))(shared)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                 ours(params), expected)


def test_conflict_diagnostics_on_known_gradients():
    grads = {"w": jnp.asarray([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])}
    gram = task_grads.gram_matrix(grads)
    np.testing.assert_allclose(gram, [[1, 0, -1], [0, 4, 0], [-1, 0, 1]])
    d = task_grads.conflict_diagnostics(gram)
    np.testing.assert_allclose(d["task_grad_norms"], [1, 2, 1])
    assert float(d["cosine_min"]) == pytest.approx(-1.0)
    assert float(d["cosine_mean"]) == pytest.approx(-1 / 3)
    assert float(d["conflict_fraction"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("shape, dtype", [((3, 8, 5), jnp.float32), ((1, 4), jnp.float32),
                                          ((8, 2, 3, 4), jnp.bfloat16)])
def test_sum_and_mean_over_the_leading_axis_as_adds_of_rows(shape, dtype):
    """`task_grads.sum_leading` / `mean_leading` (the rows added, a workaround for XLA:CPU's slow
    reduction of a short leading axis) equal ``sum(0)`` / ``mean(0)``, in the input's dtype, jitted."""
    x = jax.random.normal(jax.random.key(0), shape).astype(dtype)
    summed, mean = jax.jit(task_grads.sum_leading)(x), jax.jit(task_grads.mean_leading)(x)
    assert summed.dtype == mean.dtype == dtype and summed.shape == mean.shape == shape[1:]
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.float32(summed), np.float32(x).sum(0), **tolerance)
    np.testing.assert_allclose(np.float32(mean), np.float32(x).mean(0), **tolerance)
