"""The train step: one with a non-finite loss or gradient is skipped whole."""

import jax
import numpy as np
import pytest

from configs import seqtasks as seqtasks_config
from mtt_jax import sharding, train

# Methods whose state (or, for uncertainty weighting, whose own parameters) a step updates: the epoch
# means (DWA), the logits and their optimizer (FAMO), the cosine EMA (GradVac), the last weights
# (Nash-MTL), the log-variances (UW), the gradient EMA (DB-MTL).
STATEFUL_METHODS = ("dwa", "famo", "gradvac", "nash_mtl", "uncertainty", "db_mtl")


def tiny_config(name):
    config = seqtasks_config.get_config("tiny")
    config.model.num_layers, config.model.d_model, config.model.mlp_dim = 1, 16, 32
    config.model.task_attention, config.model.task_encoder = "none", False  # a smaller program
    config.tasks = ("majority", "mean_value")  # NaN labels: mean_value is a regression
    config.mesh.num_devices = 1
    config.optimizer.warmup_steps = 0
    config.weighting.name = name
    return config


@pytest.mark.parametrize("name", STATEFUL_METHODS)
def test_a_non_finite_step_changes_nothing_but_its_counters(name):
    """After two good steps, a batch with NaN labels leaves params, optimizer state and weighting state
    bitwise as they were; ``step`` and ``skipped_steps`` count it. The good step after it does change
    the method's state, so the comparison is not vacuous. (Without the step's own guard the NaN batch
    changes DWA's, FAMO's, Nash-MTL's and DB-MTL's state; GradVac leaves its targets alone on a
    non-finite Gram matrix.)"""
    config = tiny_config(name)
    setup = train.build(config)
    step_fn = train.compile_train_step(setup)  # state donated: compare host copies

    def batch(step, nan=False):
        host = setup.train_source.train_batch(step, config.batch_size)
        if nan:
            host["labels"]["mean_value"] = host["labels"]["mean_value"] * np.nan
        return sharding.shard_batch(host, setup.batch_shardings, setup.layout)

    state = setup.create_state()
    with setup.context():
        for step in range(2):  # the heads start at 0: the shared gradients and states move from step 1
            state, _ = step_fn(state, batch(step))
        before = jax.device_get(state)
        state, metrics = step_fn(state, batch(2, nan=True))
        skipped = jax.device_get(state)
        state, _ = step_fn(state, batch(2))
        after_good = jax.device_get(state)

    assert not metrics["finite"]
    assert int(skipped.step) == int(before.step) + 1
    assert int(skipped.skipped_steps) == int(before.skipped_steps) + 1
    np.testing.assert_array_equal(skipped.rng, before.rng)
    for field in ("params", "opt_state", "weighting_state"):
        jax.tree.map(np.testing.assert_array_equal, getattr(skipped, field), getattr(before, field))
    method_state = lambda s: (s.weighting_state if jax.tree.leaves(s.weighting_state)
                              else s.params["weighting"])
    unchanged = jax.tree.map(np.array_equal, method_state(after_good), method_state(before))
    assert not all(jax.tree.leaves(unchanged)), "a good step leaves the method's state as it was"
