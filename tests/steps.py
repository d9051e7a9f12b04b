"""Shared by the tests that compare train-step variants on one batch."""

import jax

from mtt_jax import train


def first_steps(setup: train.Setup, batch, variants) -> list[tuple[dict, dict]]:
    """``(params, metrics)`` on the host after one step from the initial state, for each
    ``(grad_accum_steps, grad_accum_unroll)`` in ``variants``."""
    results = []
    for accum, unroll in variants:
        step_fn = train.compile_train_step(setup, accum, grad_accum_unroll=unroll)
        with setup.context():
            state, metrics = step_fn(setup.create_state(), batch)
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    return results
