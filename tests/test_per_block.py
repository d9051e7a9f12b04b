"""Per-block aggregation (``weighting.blocks``): each group's coefficients are the method on that group's
Gram matrix, computed by hand from the Jacobian of a tiny model; one group is today's path exactly; the
config refusals; a resumed run keeps the per-group state."""

import functools
import json
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default as default_config
from mtt_jax import data, task_grads, tasks as tasks_lib, train, train_step  # noqa: F401 (data: tasks)
from mtt_jax import weighting
from mtt_jax.models import MultiTaskTransformer
from mtt_jax.run import config_check, workdir
from mtt_jax.specs import InputSpec
from mtt_jax.weighting import per_block, pytree_ops

PER_LAYER = (r"trunk/(block_\d+)/.*",)


def method_of(name, blocks=(), num_tasks=2, **options):
    config = ml_collections.ConfigDict({"name": name, "blocks": blocks, name: options})
    return weighting.make_method(config, num_tasks)


# --- Grouping of the leaves, Grams and combination by hand ---------------------------------------------

TREE = {"embed": {"embedding": 0}, "trunk": {"block_0": {"mlp": 1, "ln": 2}, "block_1": {"mlp": 3},
                                             "ln_final": {"scale": 4}}}


def test_leaves_go_to_the_first_matching_pattern_and_captures_name_the_groups():
    grouping = per_block.group_leaves(TREE, ("embed/.*", r"trunk/(block_\d+)/.*"))
    # leaves in tree order: embed/embedding, trunk/block_0/ln, trunk/block_0/mlp, trunk/block_1/mlp,
    # trunk/ln_final/scale
    assert grouping.names == ("embed/.*", "block_0", "block_1", "other")
    assert grouping.leaf_group == (0, 1, 1, 2, 3)
    assert per_block.group_leaves(TREE, (".*",)).leaf_group == (0,) * 5


@pytest.mark.parametrize("patterns, message", [
    (("trunk/block_9/.*",), "pattern 'trunk/block_9/.*' matches no shared parameter"),
    (("trunk/(block",), "is not a regular expression"),
    ((".*", "embed/.*"), "pattern 'embed/.*' matches no shared parameter"),  # shadowed by the first
])
def test_a_pattern_that_groups_nothing_is_refused_in_one_line(patterns, message):
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        per_block.group_leaves(TREE, patterns)
    assert "\n" not in str(error.value)


def test_group_grams_and_grouped_combination_by_hand():
    rng = np.random.default_rng(0)
    g_a, g_b, g_c = rng.normal(size=(3, 4)), rng.normal(size=(3, 2, 2)), rng.normal(size=(3, 5))
    grads_T = {"a": jnp.asarray(g_a), "b": jnp.asarray(g_b), "c": jnp.asarray(g_c)}
    leaf_group = (1, 0, 1)  # a and c in group 1, b in group 0
    gram_BxTxT = np.asarray(pytree_ops.group_gram_matrices(grads_T, leaf_group, 2))
    flat_b = g_b.reshape(3, -1)
    np.testing.assert_allclose(gram_BxTxT[0], flat_b @ flat_b.T, rtol=1e-5)
    np.testing.assert_allclose(gram_BxTxT[1], g_a @ g_a.T + g_c @ g_c.T, rtol=1e-5)
    np.testing.assert_allclose(gram_BxTxT.sum(0), pytree_ops.gram_matrix(grads_T), rtol=1e-5)
    coeffs_BxT = jnp.asarray([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    combined = pytree_ops.combine_grouped(coeffs_BxT, grads_T, leaf_group)
    np.testing.assert_allclose(combined["a"], -g_a[0] + 0.5 * g_a[1], rtol=1e-5)
    np.testing.assert_allclose(combined["b"], g_b[0] + 2 * g_b[1] + 3 * g_b[2], rtol=1e-5)
    np.testing.assert_allclose(combined["c"], -g_c[0] + 0.5 * g_c[1], rtol=1e-5)


# --- The step on a tiny model: per-group coefficients against the Jacobian ------------------------------

@functools.cache
def tiny_model(layout):
    """A two-block model (single-input: the two digit tasks; multi-input: four sequence tasks), its
    parameters with random heads (so that every task's gradient reaches the trunk), a batch and the loss."""
    key = jax.random.key(0)
    if layout == "single":
        tasks = (tasks_lib.get("left_digit"), tasks_lib.get("right_digit"))
        spec, inputs = InputSpec("image", (12, 12)), jax.random.uniform(key, (4, 12, 12))
        labels = {"left_digit": jnp.array([1, 2, 3, 4]), "right_digit": jnp.array([5, 6, 7, 8])}
        mask = {t.name: jnp.ones(4) for t in tasks}
    else:
        tasks = tuple(tasks_lib.get(n) for n in ("majority", "majority_parity", "mean_value", "repeat_tag"))
        spec = InputSpec("tokens", (8,), vocab_size=32)
        inputs = jax.random.randint(key, (4, 3, 8), 1, 32).at[:, :, 6:].set(0)
        labels = {"majority": jnp.array([0, 1, 2]), "majority_parity": jnp.array([0, 1, 1]),
                  "mean_value": jnp.array([0.5, -1.0, 0.2]), "repeat_tag": jax.random.randint(key, (3, 8), 0, 2)}
        mask = {t.name: jnp.ones(3) for t in tasks}
    model = MultiTaskTransformer(tasks=tasks, layout=layout, input_spec=spec, num_layers=2, d_model=16,
                                 num_heads=2, mlp_dim=32)
    params = nn.unbox(jax.jit(model.init)(key, inputs)["params"])
    for i, name in enumerate(k for k in sorted(params) if k.startswith("head_")):
        kernel = params[name]["dense"]["kernel"]
        params[name]["dense"]["kernel"] = jax.random.normal(jax.random.key(i + 1), kernel.shape)
    batch = {"inputs": inputs, "labels": labels, "mask": mask}
    loss_fn = lambda outputs, b: train_step.task_losses(tasks, outputs, b, layout)
    return model, params, batch, tasks, loss_fn


def step_gradients(layout, method):
    """``method_gradients`` of one step from the tiny model's parameters (state of step 0)."""
    model, params, batch, tasks, loss_fn = tiny_model(layout)
    shared, _ = task_grads.split_params(params)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), shared)
    state = train_step.TrainState(
        step=jnp.zeros((), jnp.int32), params={"model": params, "weighting": method.init_params()},
        opt_state=(), weighting_state=method.init_state_for(shapes),
        rng=jax.random.key_data(jax.random.key(3)), skipped_steps=jnp.zeros((), jnp.int32))

    @jax.jit
    def run(state):
        ctx = train_step.StepContext(model=model, tasks=tasks, layout=layout, method=method, loss_fn=loss_fn,
                                     dropout_rng=jax.random.key(1), method_rng=jax.random.key(2))
        r = train_step.method_gradients(ctx, state, batch)
        return r.grads["model"], r.weights_T, r.block_weights_BxT, r.weighting_state, r.gram_TxT
    return run(state)


@functools.cache
def hand_jacobian():
    """The single-input model's per-task gradients ``{path: [T, *shape]}`` (float64), by jacrev."""
    model, params, batch, tasks, loss_fn = tiny_model("single")
    shared, task_side = task_grads.split_params(params)

    def losses(shared_params):
        outputs, _ = model.apply({"params": {**shared_params, **task_side}}, batch["inputs"])
        return loss_fn(outputs, batch)
    jacobian = jax.jit(jax.jacrev(losses))(shared)
    return {per_block.leaf_path(path): np.asarray(leaf, np.float64)
            for path, leaf in jax.tree_util.tree_leaves_with_path(jacobian)}


def hand_group(path):
    for block in ("block_0", "block_1"):
        if path.startswith(f"trunk/{block}/"):
            return block
    return "other"


def hand_grams():
    """``{group: K_b}`` summed by hand over the Jacobian's leaves."""
    grams = {}
    for path, g in hand_jacobian().items():
        flat = g.reshape(g.shape[0], -1)
        grams[hand_group(path)] = grams.get(hand_group(path), 0.0) + flat @ flat.T
    return grams


def pcgrad_two_tasks(K):
    """PCGrad for T = 2 (Yu et al. 2020, Alg. 1): each gradient loses its component along the other if
    they conflict, ``d = (1 - m / K_11) g_1 + (1 - m / K_22) g_2`` with ``m = min(K_12, 0)``."""
    m = min(K[0, 1], 0.0)
    return np.array([1 - m / K[0, 0], 1 - m / K[1, 1]])


def mgda_two_tasks(K):
    """MGDA for T = 2 (Sener & Koltun 2018, Alg. 1): ``a_1 = clip((K_22 - K_12) / |g_1 - g_2|^2, 0, 1)``."""
    a = np.clip((K[1, 1] - K[0, 1]) / (K[0, 0] + K[1, 1] - 2 * K[0, 1]), 0.0, 1.0)
    return np.array([a, 1 - a])


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "upgrad"])
def test_each_group_gets_the_method_of_its_own_gram_by_hand(name):
    method = method_of(name, PER_LAYER)
    grads, weights_T, block_weights_BxT, _, gram_TxT = step_gradients("single", method)
    grouping = method.block_grouping(task_grads.split_params(tiny_model("single")[1])[0])
    assert grouping.names == ("block_0", "block_1", "other")
    grams, coeffs_by_group = hand_grams(), {}
    for b, group in enumerate(grouping.names):
        K = grams[group]
        if name == "pcgrad":
            expected = pcgrad_two_tasks(K)
        elif name == "mgda":
            expected = mgda_two_tasks(K)
        else:  # the ungrouped method on the group's Gram matrix
            expected = np.asarray(method.inner.gram_weights({}, jnp.asarray(K, jnp.float32), jnp.ones(2),
                                                            jnp.int32(0))[0])
        np.testing.assert_allclose(block_weights_BxT[b], expected, rtol=2e-4, atol=1e-6)
        coeffs_by_group[group] = np.asarray(block_weights_BxT[b], np.float64)
    np.testing.assert_allclose(weights_T, np.mean(list(coeffs_by_group.values()), axis=0), rtol=1e-6)
    np.testing.assert_allclose(gram_TxT, sum(grams.values()), rtol=2e-4)  # diagnostics: the whole Gram
    # every leaf's update is its own group's combination of the task gradients
    updates = {per_block.leaf_path(p): np.asarray(leaf)
               for p, leaf in jax.tree_util.tree_leaves_with_path(grads) if p[0].key in task_grads.ENCODER_KEYS}
    scale = max(np.abs(g).max() for g in hand_jacobian().values())
    for path, g in hand_jacobian().items():
        expected = np.tensordot(coeffs_by_group[hand_group(path)], g, axes=1)
        np.testing.assert_allclose(updates[path], expected, rtol=2e-4, atol=1e-5 * scale, err_msg=path)
    if name == "upgrad":  # no conflict within any group, hence none overall (Quinton & Rey 2024, Prop. 3)
        for group, K in grams.items():
            assert np.all(K @ coeffs_by_group[group] >= -1e-6 * np.trace(K))


def test_the_groups_of_the_tiny_model_conflict_differently():
    """The case above is not trivial: the blocks' Grams give different coefficients."""
    _, _, block_weights_BxT, _, _ = step_gradients("single", method_of("mgda", PER_LAYER))
    assert np.ptp(np.asarray(block_weights_BxT)[:, 0]) > 0.05, block_weights_BxT


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])  # stochastic (T = 4) and stateful
def test_one_group_is_the_whole_encoder_path_exactly(name):
    grouped = method_of(name, (".*",), num_tasks=4)
    plain = method_of(name, num_tasks=4)
    grads_1, weights_1, block_weights, state_1, gram_1 = step_gradients("multi", grouped)
    grads_0, weights_0, none, state_0, gram_0 = step_gradients("multi", plain)
    assert none is None and block_weights.shape == (1, 4)
    for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_0)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(weights_1, weights_0)
    np.testing.assert_array_equal(gram_1, gram_0)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[0], b), state_1, state_0)
    assert not np.allclose(weights_0, weights_0[0])  # the method did something


def test_sampled_gram_methods_group_their_cross_grams():
    """MoDo per block: one group equals the ungrouped step; with per-layer groups the coefficient rows
    differ (each group's own MoDo weights, from its cross-Gram)."""
    config = lambda blocks: ml_collections.ConfigDict({"name": "modo", "blocks": blocks,
                                                       "modo": {"gamma": 1.0, "rho": 0.0}})
    one = weighting.make_method(config((".*",)), 4)
    plain = weighting.make_method(config(()), 4)
    per_layer = weighting.make_method(config(PER_LAYER), 4)
    grads_1, weights_1, _, _, gram_1 = step_gradients("multi", one)
    grads_0, weights_0, _, _, gram_0 = step_gradients("multi", plain)
    np.testing.assert_allclose(weights_1, weights_0, rtol=1e-6)
    np.testing.assert_allclose(gram_1, gram_0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    _, _, block_weights_BxT, state, _ = step_gradients("multi", per_layer)
    assert block_weights_BxT.shape == (3, 4) and state["weights"].shape == (3, 4)
    assert np.ptp(np.asarray(block_weights_BxT), axis=0).max() > 1e-4


# --- Config refusals ------------------------------------------------------------------------------------

def tiny_config(name, blocks=PER_LAYER, **weighting_fields):
    config = default_config.get_config("tiny")
    config.weighting.name, config.weighting.blocks = name, blocks
    for field, value in weighting_fields.items():
        config.weighting[field] = value
    return config


@pytest.mark.parametrize("name, fields, message", [
    ("ew", {}, "weighting.blocks needs a method computed from the Gram matrix; 'ew' requires 'losses'"),
    ("db_mtl", {}, "'db_mtl' requires 'grads'"),
    ("upgrad", {"rep_grad": True}, "weighting.blocks groups the shared parameters, and weighting.rep_grad"),
])
def test_config_check_refuses_what_cannot_be_grouped_in_one_line(name, fields, message):
    with pytest.raises(config_check.ConfigError, match=re.escape(message)) as error:
        config_check.validate(tiny_config(name, **fields), num_devices=1)
    assert "\n" not in str(error.value)


def test_a_pattern_matching_no_parameter_is_refused_before_any_work(tmp_path):
    config = tiny_config("upgrad", blocks=("trunk/blocks_0/.*",))
    config_check.validate(config, num_devices=1)  # the paths are known once the model is built
    with pytest.raises(config_check.ConfigError, match="'trunk/blocks_0/.*' matches no shared parameter"):
        train.train_and_evaluate(config, str(tmp_path), quiet=True)
    assert not (tmp_path / "config.json").exists()


def test_a_run_logs_each_groups_weights_beside_their_mean(tmp_path):
    """metrics.jsonl: ``weight/<task>`` is the groups' mean, ``weight/<group>/<task>`` each group's own."""
    config = tiny_config("upgrad")
    config.total_steps, config.eval_every, config.log_every = 2, 2, 1
    train.train_and_evaluate(config, str(tmp_path), quiet=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("split") == "train"][-1]
    groups = sorted({k.split("/")[1] for k in last if k.startswith("weight/") and k.count("/") == 2})
    assert groups == ["block_0", "other"]  # the tiny model: one block, and the embeddings
    for task in config.tasks:
        own = [last[f"weight/{group}/{task}"] for group in groups]
        assert np.isfinite(own).all()
        np.testing.assert_allclose(np.mean(own), last[f"weight/{task}"], rtol=1e-5)


# --- Checkpoints -----------------------------------------------------------------------------------------

def test_a_resumed_run_keeps_the_per_group_state(tmp_path):
    """GradVac's cosine EMA, one per group, is checkpointed: a run that loses its last checkpoint and
    resumes from the one before ends in the state of the uninterrupted run."""
    config = tiny_config("gradvac")
    config.model.num_layers = 2
    config.total_steps, config.checkpoint_every, config.eval_every, config.log_every = 4, 2, 4, 1
    whole, _ = train.train_and_evaluate(config, str(tmp_path / "whole"), quiet=True)
    ema = np.asarray(whole.weighting_state["target_cos"])
    assert ema.shape == (3, 2, 2) and np.ptp(ema[:, 0, 1]) > 0  # the groups' EMAs differ
    train.train_and_evaluate(config, str(tmp_path / "cut"), quiet=True)
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "4")
    resumed, _ = train.train_and_evaluate(config, str(tmp_path / "cut"), quiet=True)
    np.testing.assert_allclose(resumed.weighting_state["target_cos"], ema, rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(whole.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("split") == "train"] == [1, 2, 3, 4]


def test_a_run_from_before_blocks_resumes_at_the_whole_encoder_only(tmp_path):
    config = default_config.get_config("tiny")
    old = workdir.config_dict(config)
    del old["weighting"]["blocks"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert workdir.prepare(str(tmp_path), config)
    config.weighting.blocks = PER_LAYER
    with pytest.raises(workdir.WorkdirError, match=r"different config \(fields: weighting\)"):
        workdir.prepare(str(tmp_path), config)


GROUPABLE = sorted(n for n, c in weighting.METHODS.items() if c.requires in ("gram", "sampled_gram"))


@pytest.mark.parametrize("name", GROUPABLE)
def test_every_gram_and_double_sampling_method_runs_per_block(name):
    """Each groupable method vmaps over the groups: finite coefficients, one row per group, its state
    with a leading group axis, and the logged weights the rows' mean."""
    method = method_of(name, PER_LAYER, num_tasks=4)
    _, weights_T, block_weights_BxT, state, _ = step_gradients("multi", method)
    assert block_weights_BxT.shape == (3, 4) and np.isfinite(np.asarray(block_weights_BxT)).all()
    np.testing.assert_allclose(weights_T, np.asarray(block_weights_BxT).mean(0), rtol=1e-6, atol=1e-7)
    plain = method.inner.init_state_for(task_grads.split_params(tiny_model("multi")[1])[0])
    jax.tree.map(lambda grouped, one: np.testing.assert_equal(grouped.shape, (3,) + np.shape(one)), state,
                 plain)
