"""Flat mixture batches: the data, the model's flat form, the mixture objective, a run.

One training run is shared by the tests that need it; the step programs compile once each.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import seqtasks as seqtasks_config
from mtt_jax import data, sharding, tasks as tasks_lib, train, train_step as steps
from mtt_jax.run import config_check
from mtt_jax.data import mixtures
from mtt_jax.data.base import InputSpec
from mtt_jax.models.multitask import MultiTaskTransformer
from tests.steps import first_steps

TASKS = ("majority", "mean_value", "repeat_tag")


def mixture_config(**overrides):
    config = seqtasks_config.get_config("mixture")
    config.tasks = TASKS
    config.total_steps, config.batch_size, config.eval_every, config.log_every = 150, 24, 150, 25
    config.optimizer.warmup_steps = 10
    config.data.options.length, config.data.options.num_eval_examples = 12, 128
    config.eval_batch_size = 64
    config.model.num_layers, config.model.d_model, config.model.mlp_dim = 1, 32, 64
    for key, value in overrides.items():
        config.data.mixture[key] = value
    return config


# --- Data -------------------------------------------------------------------------------------------------

def test_seqtasks_flat_batch_rows_carry_their_task():
    source = data.make_source("seqtasks", TASKS, seed=3, length=10)
    rates = np.array([0.5, 0.25, 0.25])
    for step in range(4):
        batch = mixtures.FlatMixture(source, rates).train_batch(step, 16)
        task_id = batch["task_id"]
        assert batch["inputs"].shape == (16, 10) and task_id.dtype == np.int32
        np.testing.assert_array_equal(np.bincount(task_id, minlength=3), [8, 4, 4])  # systematic
        own = data.seqtasks.label_sequences(batch["inputs"])
        for t, task in enumerate(TASKS):
            rows = task_id == t
            np.testing.assert_array_equal(batch["mask"][task], rows.astype(np.float32))
            np.testing.assert_array_equal(batch["labels"][task][rows], own[task][rows])
            assert not np.any(batch["labels"][task][~rows])  # other tasks' rows: zeros
    # A pure function of (seed, step); process shards join to the global batch.
    whole = source.flat_batch(7, 12, rates)
    parts = [source.flat_batch(7, 12, rates, (i, 3)) for i in range(3)]
    for leaf, *pieces in zip(jax.tree.leaves(whole), *map(jax.tree.leaves, parts)):
        np.testing.assert_array_equal(leaf, np.concatenate(pieces))
    assert not np.array_equal(whole["inputs"], source.flat_batch(8, 12, rates)["inputs"])


def test_rates_come_from_the_mixture_config():
    source = data.make_source("seqtasks", TASKS, seed=0)
    config = mixture_config(method="explicit", rates=(2.0, 1.0, 1.0))
    np.testing.assert_allclose(mixtures.rates_for(source, config.data.mixture), [0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match="generates its data"):
        mixtures.rates_for(source, mixture_config(method="proportional").data.mixture)
    with pytest.raises(ValueError, match="cannot serve flat mixture batches"):
        mixtures.FlatMixture(data.make_source("multidigits", ("left_digit",), seed=0), [1.0])


@pytest.mark.parametrize("overrides, message", [
    (dict(method="proportional"), "needs the tasks' train sizes"),
    (dict(method="explicit", rates=(1.0, 2.0)), "one non-negative rate per task (3)"),
    (dict(method="explicit", rates=(1.0, -1.0, 1.0)), "one non-negative rate per task (3)"),
    (dict(method="sometimes"), "data.mixture.method='sometimes' is not valid"),
])
def test_bad_mixture_configs_fail_in_one_line(overrides, message):
    with pytest.raises(config_check.ConfigError) as error:
        config_check.validate(mixture_config(**overrides), 1)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_flat_batches_need_a_loss_based_method_and_a_flat_source():
    config = mixture_config()
    config.weighting.name = "pcgrad"
    with pytest.raises(config_check.ConfigError, match="needs per-task gradients"):
        config_check.validate(config, 1)
    config = mixture_config()
    config.weighting.diagnostics_every = 10
    with pytest.raises(config_check.ConfigError, match="diagnostics_every=0"):
        config_check.validate(config, 1)
    config = mixture_config()
    config.data.source, config.tasks = "multidigits", ("left_digit", "right_digit")
    config.data.options = {}
    with pytest.raises(config_check.ConfigError, match="sources that can: glue, seqtasks"):
        config_check.validate(config, 1)
    config_check.validate(mixture_config(), 1)  # the variant itself is valid


# --- Model and losses -------------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(), dict(film=True), dict(ffn="task_moe", task_attention="none")])
def test_a_flat_row_gets_what_the_multi_input_forward_gives_its_example(options):
    tasks = tuple(tasks_lib.get(name) for name in TASKS)
    model = MultiTaskTransformer(tasks=tasks, layout="multi", input_spec=InputSpec("tokens", (8,), 32),
                                 num_layers=1, d_model=16, num_heads=2, mlp_dim=32, **options)
    tokens_TxBxL = jax.random.randint(jax.random.key(0), (3, 4, 8), 0, 32)
    noise = lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape, x.dtype)
    # Jitted: op by op, the init and the two forwards cost seconds of small compiles, never cached.
    params = jax.jit(lambda tokens: jax.tree.map(noise, model.init(jax.random.key(1), tokens)["params"]))(
        tokens_TxBxL)  # heads start at zero: the noise makes every output informative
    apply = jax.jit(model.apply)
    multi, _ = apply({"params": params}, tokens_TxBxL)
    task_id, example = jnp.array([2, 0, 1, 0, 2, 1]), jnp.array([1, 3, 0, 2, 3, 3])
    flat, aux = apply({"params": params}, tokens_TxBxL[task_id, example], task_id=task_id)
    for t, task in enumerate(tasks):
        for row in np.flatnonzero(np.asarray(task_id) == t):
            np.testing.assert_allclose(flat[task.name][row], multi[task.name][example[row]], atol=1e-5)
    if model.task_attention == "cross":
        mass = np.asarray(aux["task_attention"])
        np.testing.assert_allclose(mass.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.diag(mass), 0.0, atol=1e-6)  # a task never attends to itself


def test_flat_task_losses_sum_to_the_mean_example_loss():
    tasks = tuple(tasks_lib.get(name) for name in ("majority", "mean_value"))
    rng = np.random.default_rng(0)
    task_id = np.array([0, 1, 1, 0, 0, 1, 0, 0])
    outputs = {"majority": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
               "mean_value": jnp.asarray(rng.normal(size=8), jnp.float32)}
    labels = {"majority": rng.integers(0, 4, 8).astype(np.int32),
              "mean_value": rng.normal(size=8).astype(np.float32)}
    batch = {"inputs": jnp.ones((8, 5), jnp.int32), "task_id": task_id, "labels": labels,
             "mask": {t.name: (task_id == i).astype(np.float32) for i, t in enumerate(tasks)}}
    losses = np.asarray(steps.task_losses(tasks, outputs, batch, "flat"))
    log_p = jax.nn.log_softmax(outputs["majority"])
    per_row = np.where(task_id == 0, -np.asarray(log_p)[np.arange(8), labels["majority"]],
                       (np.asarray(outputs["mean_value"]) - labels["mean_value"]) ** 2)
    np.testing.assert_allclose(losses.sum(), per_row.mean(), rtol=1e-5)
    np.testing.assert_allclose(losses[1], per_row[task_id == 1].sum() / 8, rtol=1e-5)


# --- Training ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    config = mixture_config(method="explicit", rates=(2.0, 1.0, 1.0))
    workdir = str(tmp_path_factory.mktemp("flat"))
    state, final = train.train_and_evaluate(config, workdir, quiet=True)
    return config, state, final


def test_a_flat_mixture_run_learns_every_task(flat_run):
    _, state, final = flat_run
    assert final["majority/accuracy"] > final["majority/baseline_accuracy"] + 0.15
    # Below each task's loss at the start (zero-initialised heads): ln 4, the label variance 1, ln 2.
    assert final["majority/loss"] < 0.8 * np.log(4)
    assert final["mean_value/loss"] < 0.6
    assert final["repeat_tag/loss"] < 0.8 * np.log(2)
    mass = np.asarray(final["task_attention"])
    assert mass.shape == (3, 3)
    np.testing.assert_allclose(mass.sum(-1), 1.0, atol=1e-3)
    assert int(state.skipped_steps) == 0


def test_flat_microbatches_give_the_one_batch_update():
    """3 microbatches of 8 rows (one per device) == one step on the 24 rows: the losses are shares of
    the whole batch, so the microbatches' average is the batch's. (Without the tagging task: its loss
    is a mean over tokens, and a ratio of sums does not split over microbatches in any layout.)"""
    config = mixture_config(method="uniform")
    config.tasks = ("majority", "mean_value")
    setup = train.build(config)
    batch = sharding.shard_batch(setup.train_source.train_batch(5, 24), setup.batch_shardings, "flat")
    (params_1, metrics_1), (params_3, metrics_3) = first_steps(setup, batch, ((1, 1), (3, 1)))
    for key in ("loss", "task_losses", "grad_norm"):
        np.testing.assert_allclose(metrics_3[key], metrics_1[key], rtol=1e-4, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_3, params_1)
