"""MLP variants (Shared-Bottom, OMoE, MMoE) and the task-gated MoE feed-forward: shapes, sizes, learning."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config, mmoe_synthetic as mmoe_config, seqtasks as seqtasks_config
from experiments import toys
from mtt_jax import data, seed_runs, tasks as tasks_lib
from mtt_jax.models import build_model, variants
from mtt_jax.models.moe import TaskMoEFeedForward

MMOE_TASKS = ("mmoe_a1", "mmoe_a2")


def specs(names):
    return tuple(tasks_lib.get(t) for t in names)


def init_params(model, inputs):
    """Jitted: op by op, an init is seconds of small compiles that no cache keeps."""
    return nn.unbox(jax.jit(model.init)({"params": jax.random.key(0)}, inputs)["params"])


@pytest.mark.parametrize("name, expected_params",
                         [("shared_bottom", 13255), ("omoe", 14018), ("mmoe", 14818)])
def test_mlp_variants_have_the_papers_sizes_and_shapes(name, expected_params):
    # Ma et al. (2018): 113 shared units; 8 experts of 16 units; towers of 8 -- about the same size.
    model = variants.build_variant(name, specs(MMOE_TASKS))
    x_BxF = jax.random.normal(jax.random.key(1), (5, 100))
    params = init_params(model, x_BxF)
    assert variants.num_params(params) == expected_params
    outputs, aux = model.apply({"params": params}, x_BxF)
    assert aux == {}
    assert {k: v.shape for k, v in outputs.items()} == {"mmoe_a1": (5,), "mmoe_a2": (5,)}
    streams = model.apply({"params": params}, x_BxF, method=model.encode)
    assert streams.shape == (5, 2, 113 if name == "shared_bottom" else 16)
    assert set(params) == {"trunk", "tower_mmoe_a1", "tower_mmoe_a2"}   # shared parameters under "trunk"


def test_mmoe_gates_are_per_task_distributions_and_omoe_shares_one():
    x_BxF = jax.random.normal(jax.random.key(1), (4, 100))
    mmoe = variants.MultiGateMoE(specs(MMOE_TASKS))
    params = init_params(mmoe, x_BxF)
    gates_BxTxE = mmoe.apply({"params": params}, x_BxF, method=mmoe.gates)
    assert gates_BxTxE.shape == (4, 2, 8)
    np.testing.assert_allclose(gates_BxTxE.sum(-1), 1.0, rtol=1e-5)
    assert not np.allclose(gates_BxTxE[:, 0], gates_BxTxE[:, 1])          # one gate per task
    omoe = variants.OneGateMoE(specs(MMOE_TASKS))
    streams = omoe.apply({"params": init_params(omoe, x_BxF)}, x_BxF, method=omoe.encode)
    np.testing.assert_allclose(streams[:, 0], streams[:, 1])               # one gate for both tasks


def test_variant_reads_images_and_classifies():
    model = variants.SharedBottomMLP(specs(("left_digit", "right_digit")), bottom_units=(32, 32),
                                     tower_units=())
    images = jnp.zeros((3, 12, 12))
    outputs, _ = model.apply({"params": init_params(model, images)}, images)
    assert outputs["left_digit"].shape == (3, 10)


def mmoe_run(model, method="ew", steps_=150, rep_grad=False):
    config = mmoe_config.get_config("tiny")
    config.data.options.num_eval_examples = 256
    config.eval_batch_size = 256
    config.batch_size, config.total_steps, config.log_every = 64, steps_, 50
    config.optimizer.learning_rate, config.optimizer.warmup_steps = 3e-3, 0
    config.weighting.name, config.weighting.rep_grad = method, rep_grad
    source = data.make_source("mmoe_synthetic", config.tasks, seed=0, **dict(config.data.options))
    weights = np.stack([toys.mmoe_weights(source.task_weights)] * 2)
    return seed_runs.train_seeds(config, [0, 1], model=model, sampler=toys.mmoe_sampler(config.tasks, 64),
                              sampler_args=weights, eval_at_start=True)


def test_mmoe_learns_the_synthetic_pair():
    runs = mmoe_run(variants.MultiGateMoE(specs(MMOE_TASKS)))
    for task in MMOE_TASKS:
        before, after = runs.metric(f"{task}/mse", 0), runs.metric(f"{task}/mse")
        # The labels' variance is about 7, most of it the ten fast sines of Ma et al.'s generator that a
        # small MLP fits slowly: in these 150 steps the MSE falls by 23-35% (an input-blind predictor
        # stays at the variance).
        assert np.all(after < 0.85 * before), (task, before, after)


def test_variants_work_with_gradient_methods_on_the_representation():
    # MGDA-UB: per-task gradients of the shared representation (the per-task expert mixtures).
    runs = mmoe_run(variants.MultiGateMoE(specs(MMOE_TASKS)), method="mgda", steps_=20, rep_grad=True)
    weights = runs.curve_weights[-1]
    assert np.all(np.isfinite(runs.curve_losses))
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-4)   # MGDA: a point of the simplex


def test_task_moe_feed_forward_routes_by_task():
    ffn = TaskMoEFeedForward(num_experts=4, mlp_dim=32, num_tasks=3)
    x_BxLxD = jax.random.normal(jax.random.key(0), (2, 5, 8))
    ids = jnp.asarray([[0, 1, 2, -1, -1]] * 2)
    params = nn.unbox(ffn.init(jax.random.key(1), x_BxLxD, ids, False)["params"])
    assert params["wi_kernel"].shape == (4, 8, 8)           # mlp_dim split over the experts
    assert params["gate_task"].shape == (4, 4)              # one row per task + the "shared" row
    y = ffn.apply({"params": params}, x_BxLxD, ids, False)
    assert y.shape == x_BxLxD.shape
    other = ffn.apply({"params": params}, x_BxLxD, jnp.asarray([[1, 2, 0, -1, -1]] * 2), False)
    assert not np.allclose(y[:, :3], other[:, :3])          # the task decides the gate ...
    np.testing.assert_allclose(y[:, 3:], other[:, 3:])      # ... and shared positions are untouched


@pytest.mark.parametrize("config_module", [default_config, seqtasks_config])
def test_transformer_with_task_moe_in_both_layouts(config_module):
    config = config_module.get_config("tiny")
    source = data.make_source(config.data.source, config.tasks, seed=0, **dict(config.data.options))
    inputs = jnp.asarray(source.train_batch(0, 4)["inputs"])
    task_specs = specs(config.tasks)
    dense = build_model(config, task_specs, source.layout, source.input_spec)
    assert dense.ffn == "dense"                              # the default model is unchanged
    dense_block = init_params(dense, inputs)["trunk"]["block_0"]
    assert "mlp" in dense_block and "moe" not in dense_block
    outputs = {}
    for remat in ("none", "full"):
        config.model.ffn, config.model.num_experts, config.model.remat = "task_moe", 2, remat
        model = build_model(config, task_specs, source.layout, source.input_spec)
        params = init_params(model, inputs)
        assert "moe" in params["trunk"]["block_0"] and "mlp" not in params["trunk"]["block_0"]
        outputs[remat], _ = jax.jit(model.apply)({"params": params}, inputs)
    for t in config.tasks:
        np.testing.assert_allclose(outputs["none"][t], outputs["full"][t], rtol=1e-5, atol=1e-6)


def test_every_remat_policy_gives_the_same_gradients():
    config = seqtasks_config.get_config("tiny")
    source = data.make_source(config.data.source, config.tasks, seed=0, **dict(config.data.options))
    inputs = jnp.asarray(source.train_batch(0, 4)["inputs"])
    grads = {}
    for remat in ("none", "full", "dots", "dots_no_batch"):
        config.model.remat = remat
        model = build_model(config, specs(config.tasks), source.layout, source.input_spec)
        params = init_params(model, inputs)
        loss = lambda p: sum(jnp.sum(jnp.sin(out)) for out in jax.tree.leaves(
            model.apply({"params": p}, inputs)[0]))
        grads[remat] = jax.jit(jax.grad(loss))(params)
    for remat, tree in grads.items():
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     grads["none"], tree)


def test_transformer_with_task_moe_learns():
    config = default_config.get_config("tiny")
    config.model.ffn, config.model.num_experts, config.model.patch_size = "task_moe", 2, 4
    config.total_steps, config.batch_size, config.log_every = 150, 64, 30
    config.optimizer.warmup_steps = 10
    runs = seed_runs.train_seeds(config, [0])
    losses = runs.curve_losses.mean(-1)[:, 0]
    assert losses[-1] < 0.75 * losses[0]
    assert runs.metric("left_digit/accuracy")[0] > 0.3       # chance is 0.1
