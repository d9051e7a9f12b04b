"""TAG lookahead affinity and the grouping search."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtt_jax import affinity, train_step
from tests.test_task_grads import setup


def test_grouping_search_recovers_two_blocks():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 0.01, (4, 4))
    z[np.ix_([0, 2], [0, 2])] += 0.5   # tasks 0 and 2 help each other
    z[np.ix_([1, 3], [1, 3])] += 0.4   # so do 1 and 3
    groups, score = affinity.best_grouping(z, 2)
    assert groups == [[0, 2], [1, 3]]
    assert score == pytest.approx(affinity.grouping_score(z, [[0, 2], [1, 3]]))
    assert len(list(affinity.set_partitions(list(range(4)), 2))) == 7   # Stirling S(4, 2)
    assert len(list(affinity.set_partitions(list(range(5)), 3))) == 25  # S(5, 3)
    assert affinity.grouping_score(z, [[0], [1], [2], [3]]) == 0.0


@pytest.mark.parametrize("layout", ["single", "multi"])
def test_lookahead_affinity_matches_its_definition(layout):
    model, params, batch, tasks, loss_fn = setup(layout)
    lr = 1e-4  # small: the test heads are random, so gradients are large
    z = jax.jit(lambda p: affinity.lookahead_affinity(model, p, batch, tasks, layout, jax.random.key(0),
                                                      loss_fn, lr))(params)
    assert z.shape == (len(tasks), len(tasks))
    assert (np.diag(z) > 0).all()  # a small step on a task's own gradient lowers its loss
    # Row 0 by hand: step on task 0's gradient of the shared encoder only.
    shared = {k: v for k, v in params.items() if k in ("embed", "positions", "task_features", "trunk")}
    rest = {k: v for k, v in params.items() if k not in shared}
    losses = jax.jit(lambda sp: loss_fn(model.apply({"params": {**sp, **rest}}, batch["inputs"])[0], batch))
    g0 = jax.jit(jax.grad(lambda sp: losses(sp)[0]))(shared)
    after = losses(jax.tree.map(lambda p, g: p - lr * g, shared, g0))
    np.testing.assert_allclose(z[0], 1 - after / losses(shared), rtol=1e-3, atol=1e-6)
