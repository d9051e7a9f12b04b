"""Every weighting method trains under jit with fsdp sharding on 8 devices, without diverging."""

import jax
import numpy as np
import pytest

from configs import default as default_config, seqtasks as seqtasks_config
from mtt_jax import sharding, train, weighting

STEPS = 12


def run_steps(config, steps=STEPS):
    setup = train.build(config)
    step_fn = train.compile_train_step(setup, config.grad_accum_steps, config.weighting.rep_grad,
                                       diagnostics_every=4)
    state, history = setup.create_state(), []
    for step in range(steps):
        batch = sharding.shard_batch(setup.source.train_batch(step, config.batch_size),
                                     setup.batch_shardings, setup.layout)
        state, metrics = step_fn(state, batch)
        history.append(jax.device_get(metrics))
    return setup, state, history


def tiny_seq_config(name):
    config = seqtasks_config.get_config("tiny")
    config.model.num_layers, config.model.d_model, config.model.mlp_dim = 1, 16, 32
    config.mesh.data, config.mesh.fsdp = 1, 8
    config.weighting.name = name
    config.optimizer.warmup_steps = 2
    if name in ("dwa", "stch"):  # several (short) epochs inside the run
        config.weighting[name].epoch_steps = 3
    if weighting.METHODS[name].requires == "sampled_gram":  # 3 samples of the 8 shards' rows
        config.batch_size = 24
    return config


@pytest.mark.parametrize("name", sorted(weighting.METHODS))
def test_method_trains_sharded_without_diverging(name):
    setup, state, history = run_steps(tiny_seq_config(name))
    assert setup.state_shardings.params["model"]["trunk"]["block_0"]["mlp"]["wi"]["kernel"].spec[0] == "fsdp"
    losses = np.array([h["task_losses"] for h in history])
    assert np.isfinite(losses).all() and all(h["finite"] for h in history)
    assert int(state.skipped_steps) == 0
    assert losses[-3:].sum(1).mean() < 1.5 * losses[:3].sum(1).mean()  # not diverging
    assert np.isfinite(np.array([h["weights"] for h in history])).all()
    # Diagnostics: every step for gradient methods, every 4th for loss-based ones.
    last = history[-1 if setup.method.requires not in ("losses", "lookahead") else 11]
    assert last["grad_cosine"].shape == (4, 4)
    np.testing.assert_allclose(np.diag(last["grad_cosine"]), 1.0, atol=1e-4)
    assert 0.0 <= float(last["conflict_fraction"]) <= 1.0
    if name == "famo":  # its logits and their Adam state live in the train state (checkpointed with it)
        assert not np.allclose(jax.device_get(state.weighting_state["logits"]),
                               setup.method.init_state()["logits"])


@pytest.mark.parametrize("rep_grad", [False, True])
def test_mgda_single_input_with_and_without_representation_gradients(rep_grad):
    config = default_config.get_config("tiny")
    config.weighting.name, config.weighting.rep_grad = "mgda", rep_grad
    config.optimizer.warmup_steps = 2
    setup, state, history = run_steps(config, steps=6)
    weights = np.array([h["weights"] for h in history])
    np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-5)  # MGDA's weights lie on the simplex
    assert (weights >= -1e-6).all()
    assert all(h["finite"] for h in history)
    # The shared encoder is updated through the combined (representation) gradient.
    moved = jax.device_get(state.params["model"]["trunk"]["block_0"]["mlp"]["wi"]["kernel"])
    initial = jax.device_get(setup.create_state().params["model"]["trunk"]["block_0"]["mlp"]["wi"]["kernel"])
    assert np.abs(moved - initial).max() > 1e-4


@pytest.mark.parametrize("name", sorted(n for n, c in weighting.METHODS.items() if c.state_mirrors_params))
def test_representation_gradients_are_refused_for_state_shaped_like_the_parameters(name):
    from mtt_jax.run import config_check
    config = default_config.get_config("tiny")
    config.weighting.name, config.weighting.rep_grad = name, True
    with pytest.raises(config_check.ConfigError, match=rf"^weighting.rep_grad=True does not work with "
                                                       rf"'{name}': its state is shaped like the shared"):
        config_check.validate(config, 1)


@pytest.mark.parametrize("name", sorted(n for n, c in weighting.METHODS.items() if c.requires == "sampled_gram"))
def test_double_sampling_needs_rows_for_three_samples_and_no_representation_gradients(name):
    from mtt_jax.run import config_check
    config = default_config.get_config("tiny")
    config.weighting.name, config.batch_size, config.grad_accum_steps = name, 16, 2
    with pytest.raises(config_check.ConfigError, match=(
            rf"^batch_size=16 is not divisible by 6 \(data x fsdp = 1 shards of mesh \(1, 1, 1\), times "
            rf"grad_accum_steps=2 microbatches of {name}'s 3 gradient samples for the train batch\)")):
        config_check.validate(config, 1)
    config.batch_size = 18
    config_check.validate(config, 1)
    config.grad_accum_steps, config.weighting.rep_grad = 1, True
    with pytest.raises(config_check.ConfigError, match=rf"^weighting.rep_grad=True does not work with "
                                                       rf"'{name}': it takes the gradients of 3 samples"):
        config_check.validate(config, 1)
