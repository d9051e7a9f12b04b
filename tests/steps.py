"""Shared by the tests that compare train-step variants on one batch, and by those that inject faults."""

import jax
import numpy as np

from mtt_jax import data, sharding, train


def inject_nan(monkeypatch, is_bad_step):
    """Sources made from now on give the seqtasks ``mean_value`` labels NaN in the train batches of the
    steps where ``is_bad_step(step)``: a non-finite loss at exactly those updates."""
    make_source = data.make_source

    def patched(*args, **kwargs):
        source = make_source(*args, **kwargs)
        original = source.train_batch

        def train_batch(step, batch_size, shard=(0, 1)):
            batch = original(step, batch_size, shard=shard)
            if is_bad_step(step):
                batch["labels"]["mean_value"] = batch["labels"]["mean_value"] * np.nan
            return batch
        source.train_batch = train_batch
        return source
    monkeypatch.setattr(data, "make_source", patched)


def compile_step(config, grad_accum_steps: int = 1):
    """``(setup, compiled step, device batch)``: the config's train step compiled ahead of time under its
    mesh and axis rules (as the training loop traces it), with step 0's batch placed on the mesh."""
    setup = train.build(config)
    batch = sharding.shard_batch(setup.train_source.train_batch(0, config.batch_size),
                                 setup.batch_shardings, setup.layout)
    with setup.context():
        compiled = train.compile_train_step(setup, grad_accum_steps).lower(setup.create_state(), batch)
        return setup, compiled.compile(), batch


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
