"""Scale-out: the same numbers on 1 device and on 8 with any mesh; fsdp memory; gradient
accumulation; bf16."""

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config, seqtasks as seqtasks_config
from mtt_jax import sharding, train
from mtt_jax.train_step import TrainState
from tests.steps import compile_step, first_steps


def seq_config(**mesh):
    config = seqtasks_config.get_config("tiny")
    config.model.num_heads = 4
    config.eval_every, config.log_every = 20, 5
    for key, value in mesh.items():
        config.mesh[key] = value
    return config


def run_metrics(config, workdir):
    _, final = train.train_and_evaluate(config, str(workdir), quiet=True)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        train_losses = [json.loads(l)["loss"] for l in f if '"train"' in l]
    return np.asarray(train_losses), final


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return run_metrics(seq_config(num_devices=1, data=1), tmp_path_factory.mktemp("one"))


@pytest.mark.parametrize("data,fsdp,tensor", [(8, 1, 1), (2, 2, 2)])  # pure data; all three axes at once
def test_eight_devices_match_one_device(one_device, tmp_path, data, fsdp, tensor):
    losses, final = run_metrics(seq_config(data=data, fsdp=fsdp, tensor=tensor), tmp_path)
    ref_losses, ref_final = one_device
    assert len(losses) == 4
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-4)
    for key, value in ref_final.items():
        if isinstance(value, float):
            np.testing.assert_allclose(final[key], value, rtol=1e-3, atol=1e-4, err_msg=key)


def loop_all_reduced_elements(compiled_text):
    """Elements all-reduced inside the while loops (the microbatch scan) of a compiled step."""
    elements = 0
    for body in set(re.findall(r"body=%([\w.\-]+)", compiled_text)):
        region = re.search(r"^%" + re.escape(body) + r" .*?^}", compiled_text, re.M | re.S).group(0)
        for result in re.findall(r"= (\(?[^=]*?) all-reduce(?:-start)?\(", region):
            elements += sum(math.prod(int(d) for d in dims.split(",") if d)
                            for dims in re.findall(r"\[([\d,]*)\]", result))
    return elements


@pytest.mark.parametrize("method", ["gls", "pcgrad", "modo"])
def test_data_parallel_step_splits_the_work_and_reduces_once(method):
    """Multi-input, 4 microbatches, 1 vs 2 data-parallel devices. Each device computes half of the
    batch: the trunk once merged tasks and examples task-major, which GSPMD cannot shard, and each
    device computed most of it. The gradients are all-reduced once per step, not once per microbatch
    (inside the scan only the T per-task losses that loss methods weight by, and their cotangents).
    The step equals the one-device step."""
    results = []
    for data in (1, 2):
        config = seqtasks_config.get_config("tiny")
        config.weighting.name, config.mesh.data, config.mesh.num_devices = method, data, data
        if method == "modo":  # 12 microbatches (4 raised to a multiple of its 3 samples) on 2 shards
            config.batch_size = 24
        setup, compiled, batch = compile_step(config, 4)
        with setup.context():
            state, metrics = compiled(setup.create_state(), batch)
        analysis = compiled.cost_analysis()
        flops = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
        results.append((jax.device_get(state.params), jax.device_get(metrics), flops,
                        loop_all_reduced_elements(compiled.as_text())))
    (params_1, metrics_1, flops_1, _), (params_2, metrics_2, flops_2, in_loop) = results
    print(f"per-device FLOPs, 2 devices / 1 device: {flops_2 / flops_1:.3f}")
    assert flops_2 / flops_1 < 0.55
    assert in_loop <= (2 * len(config.tasks) if method == "gls" else 0)
    # Shards average their own token means (padding differs between them): close, not bit-equal. MoDo's
    # samples are the same rows on 1 and 2 devices, but each sample's token mean is over 1 row per shard
    # instead of 2: 0.5% apart (without the tagging task the two steps are equal to the last digit).
    np.testing.assert_allclose(metrics_2["loss"], metrics_1["loss"], rtol=1e-4)
    np.testing.assert_allclose(metrics_2["grad_norm"], metrics_1["grad_norm"],
                               rtol=1e-2 if method == "modo" else 1e-3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_2, params_1)


def test_token_lookup_is_not_replicated_on_a_three_axis_mesh():
    """With fsdp and tensor > 1 the embedding table is gathered whole along embed before the lookup
    (as FSDP gathers every weight); looking up rows in the embed-sharded table gave embed-sharded rows
    that GSPMD could only make batch-sharded by all-gathering them on every device. Read by shapes:
    the all-gathers' op names changed between JAX versions (0.11 names them after the parameter)."""
    config = seq_config(data=2, fsdp=2, tensor=2)
    setup, compiled, batch = compile_step(config)
    vocab, d_model = setup.abstract_state.params["model"]["embed"]["embedding"]["embedding"].value.shape
    length = batch["inputs"].shape[-1]
    gathered = [(tuple(int(d) for d in dims.split(",")), int(axis)) for dims, axis in re.findall(
        r"= f32\[([\d,]+)\]\S* all-gather\(.*?dimensions=\{(\d+)\}", compiled.as_text())]
    assert ((vocab // config.mesh.fsdp, d_model), 1) in gathered  # the table, gathered along embed
    rows = [shape for shape, _ in gathered if len(shape) >= 3 and shape[-2:] == (length, d_model)]
    assert not rows, rows  # token rows [..., length, d_model] are never gathered


def test_mesh_shape_resolution_and_errors():
    assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="needs 4 devices"):
        sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)


def per_device_bytes(tree):
    leaves = jax.tree.leaves(tree)
    device = leaves[0].addressable_shards[0].device
    return sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device)


def test_fsdp_shards_params_and_optimizer_state():
    config = default_config.get_config()
    config.mesh.data, config.mesh.fsdp = 1, 8
    setup = train.build(config)
    state = setup.create_state()
    tree = (state.params, state.opt_state)
    total = sum(x.nbytes for x in jax.tree.leaves(tree))
    per_device = per_device_bytes(tree)
    print(f"fsdp=8: {per_device} of {total} bytes per device ({per_device / total:.4f})")
    assert per_device <= total / 8 * 1.05
    kernel = state.params["model"]["trunk"]["block_0"]["mlp"]["wi"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_tensor_parallel_shards_mlp_and_heads():
    config = default_config.get_config()
    config.mesh.data, config.mesh.tensor = 4, 2
    setup = train.build(config)
    specs = jax.tree.map(lambda s: s.spec, setup.state_shardings.params["model"]["trunk"]["block_0"])
    P = jax.sharding.PartitionSpec  # the fsdp axis has size 1 in this mesh
    assert specs["mlp"]["wi"]["kernel"] == P("fsdp", "tensor")
    assert specs["mlp"]["wi"]["bias"] == P(("fsdp", "tensor"))
    assert specs["attention"]["query"]["kernel"] == P("fsdp", "tensor", None)
    assert specs["attention"]["out"]["kernel"] == P("tensor", None, "fsdp")


def test_grad_accumulation_equals_one_big_step():
    """grad_accum_steps = 4 with microbatches of 8 == one step on the batch of 32."""
    config = default_config.get_config("tiny")
    config.batch_size = 32
    setup = train.build(config)
    batch = sharding.shard_batch(setup.source.train_batch(3, 32), setup.batch_shardings, "single")
    (params_1, metrics_1), (params_4, metrics_4), (params_4u, _) = first_steps(
        setup, batch, ((1, 1), (4, 1), (4, 2)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params_4u, params_4)
    np.testing.assert_allclose(metrics_4["loss"], metrics_1["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics_4["grad_norm"], metrics_1["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_4, params_1)


@pytest.mark.parametrize("method", ["famo", "dwa", "imtl"])
def test_grad_accumulation_equals_one_big_step_for_methods_that_weigh_by_the_losses(method):
    """FAMO (like GLS and STCH) weighs a task by its loss, DWA keeps epoch means of the losses, IMTL-L
    scales each task's gradient: with 4 microbatches each must still make the update, weights and
    method state of one step on the whole batch (before: the last microbatch's losses and state, and
    IMTL-L's scale applied twice)."""
    config = default_config.get_config("tiny")
    config.batch_size, config.weighting.name = 32, method
    # the learning-rate schedule these tolerances were set for (tiny's before it learned in 40 steps)
    config.total_steps, config.optimizer.learning_rate, config.optimizer.warmup_steps = 20, 2e-3, 100
    setup = train.build(config)
    batch = sharding.shard_batch(setup.source.train_batch(3, 32), setup.batch_shardings, "single")
    steps = {accum: train.compile_train_step(setup, accum) for accum in (1, 4)}
    with setup.context():  # from zero-initialised heads every loss is log(10) and the trunk gets no
        start = setup.create_state()  # gradient: two steps first, so that losses differ by example
        for warm_up in (1, 2):
            start, _ = steps[1](start, sharding.shard_batch(setup.source.train_batch(warm_up, 32),
                                                            setup.batch_shardings, "single"))
    if method == "imtl":  # a trained IMTL-L scale: at s = 0 a double scaling is invisible
        start = start.replace(params={**start.params, "weighting": {"loss_scale": jnp.array([0.7, -0.4])}})
    # Each step starts from its own device copy of the host's (the step donates it). An eager jnp.copy
    # here was where a worker twice aborted (docs/testing.md); it also compiled a copy per leaf shape.
    start = jax.device_get(start)
    results = []
    for accum in (1, 4):
        with setup.context():
            state, metrics = steps[accum](jax.device_put(start, setup.state_shardings), batch)
        results.append(jax.device_get((state.params, state.weighting_state, metrics)))
    (params_1, method_state_1, metrics_1), (params_4, method_state_4, metrics_4) = results
    for key in ("loss", "task_losses", "weights", "grad_norm"):
        np.testing.assert_allclose(metrics_4[key], metrics_1[key], rtol=1e-4, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_4, params_1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 method_state_4, method_state_1)


def test_nonfinite_batch_is_not_applied():
    config = default_config.get_config("tiny")
    setup = train.build(config)
    host = setup.source.train_batch(0, config.batch_size)
    host["inputs"][0, 0, 0] = np.nan
    before = jax.device_get(setup.create_state())
    state, metrics = train.compile_train_step(setup)(setup.create_state(),
                                                     sharding.shard_batch(host, setup.batch_shardings,
                                                                          "single"))
    assert not bool(metrics["finite"])
    assert int(state.skipped_steps) == 1 and int(state.step) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before.params)


def test_bf16_computes_in_bf16_with_f32_params_and_losses():
    config = default_config.get_config("tiny")
    config.dtype = "bfloat16"
    setup = train.build(config)
    state = setup.create_state()
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    batch = setup.source.train_batch(0, config.batch_size)
    forward = lambda p: setup.model.apply({"params": p}, jnp.asarray(batch["inputs"]))
    outputs, _ = jax.jit(forward)(state.params["model"])  # (op by op: seconds of small compiles)
    assert outputs["left_digit"].dtype == jnp.float32  # heads cast back for the loss
    jaxpr = jax.make_jaxpr(forward)(state.params["model"])
    assert "bf16" in str(jaxpr)
    _, metrics = train.compile_train_step(setup)(state, sharding.shard_batch(
        batch, setup.batch_shardings, "single"))
    assert metrics["loss"].dtype == jnp.float32 and bool(metrics["finite"])


@pytest.mark.parametrize("name,field", [("db_mtl", "buffer"), ("excess_mtl", "grad_sq_sum"),
                                        ("moco", "tracked")])
def test_method_state_that_mirrors_params_is_sharded_like_them(name, field):
    """Per-task state shaped [T, *param] (DB-MTL's gradient EMA, ExcessMTL's AdaGrad accumulators, MoCo's
    tracked gradients) shards like the parameter behind its task axis."""
    config = default_config.get_config()
    config.mesh.data, config.mesh.fsdp = 1, 8
    config.weighting.name = name
    setup = train.build(config)
    spec = setup.state_shardings.weighting_state[field]["trunk"]["block_0"]["mlp"]["wi"]["kernel"].spec
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    state = setup.create_state()
    buffer = state.weighting_state[field]["trunk"]["block_0"]["mlp"]["wi"]["kernel"]
    assert buffer.shape[0] == 2 and buffer.addressable_shards[0].data.shape[1] == buffer.shape[1] // 8


def test_grad_accumulation_with_a_gram_method_equals_one_big_step():
    """Per-task gradients are averaged over microbatches before MGDA solves: the same as one batch."""
    config = seqtasks_config.get_config("tiny")
    config.batch_size, config.weighting.name = 8, "mgda"
    config.mesh.num_devices, config.mesh.data = 1, 1
    setup = train.build(config)
    batch = sharding.shard_batch(setup.source.train_batch(3, 8), setup.batch_shardings, "multi")
    (params_1, metrics_1), (params_2, metrics_2) = first_steps(setup, batch, ((1, 1), (2, 1)))
    np.testing.assert_allclose(metrics_2["task_losses"], metrics_1["task_losses"], rtol=1e-5)
    np.testing.assert_allclose(metrics_2["weights"], metrics_1["weights"], rtol=1e-3, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), params_2, params_1)


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_double_sampling_takes_three_strided_samples_of_the_batch(grad_accum_steps):
    """MoDo's weights step on the cross-Gram of samples 1 and 2 (rows 1, 4, 7, ... and 2, 5, 8, ...) and
    are applied to sample 0's per-task gradients (rows 0, 3, 6, ...); with accumulation, sample s is
    part s of every microbatch. The logged Gram is that of the samples' mean gradients (the batch's, up
    to the token counts of a tagging task's means)."""
    from mtt_jax import task_grads, train_step
    from tests.test_weighting_methods import simplex_projection_reference
    config = seqtasks_config.get_config("tiny")
    config.batch_size, config.model.dropout_rate = 12, 0.0
    config.weighting.name, config.weighting.modo.gamma = "modo", 0.5
    config.mesh.num_devices, config.mesh.data = 1, 1
    setup = train.build(config)
    batch = sharding.shard_batch(setup.source.train_batch(3, 12), setup.batch_shardings, "multi")
    state, key = setup.create_state(), jax.random.key(0)
    leaves, tree = jax.tree.flatten(state.params["model"])  # nonzero heads: the shared grads are not 0
    leaves = jax.jit(lambda leaves: [x + 0.05 * jax.random.normal(jax.random.key(i), x.shape, x.dtype)
                                     for i, x in enumerate(leaves)])(leaves)  # one compile, not one per shape
    state = state.replace(params={**state.params, "model": jax.tree.unflatten(tree, leaves)})
    loss_fn = lambda outputs, b: train_step.task_losses(setup.tasks, outputs, b, "multi")
    with setup.context():
        grads, *_, weights_T, _, _, gram_TxT = jax.jit(lambda s, b: train_step._gradient_method_grads(
            s, b, setup.model, setup.tasks, loss_fn, setup.method, key, key, "multi", grad_accum_steps,
            False))(state, batch)
        micro = train_step.microbatches(jax.device_get(batch), "multi", grad_accum_steps)
        grads_of = jax.jit(lambda params, part: task_grads.per_task_gradients(  # one compile for all parts
            setup.model, params, part, setup.tasks, "multi", key, loss_fn).grads_T)
        per_part = [[grads_of(state.params["model"], jax.tree.map(lambda x: x[s], parts))
                     for s in range(3)]  # part s of microbatch i
                    for parts in (train_step.microbatches(jax.tree.map(lambda x: x[i], micro), "multi", 3)
                                  for i in range(grad_accum_steps))]
    # Flattened on the host (as ravel_pytree orders the leaves): eager slices would compile per shape.
    flat_leaves = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(tree))])
    as_matrix = lambda g_T: np.stack([flat_leaves(jax.tree.map(lambda g: g[t], jax.device_get(g_T)))
                                      for t in range(4)])
    flat = [np.mean([as_matrix(parts[s]) for parts in per_part], axis=0, dtype=np.float64) for s in range(3)]
    expected_T = simplex_projection_reference(np.full(4, 0.25) - 0.5 * (flat[1] @ flat[2].T + 0.1 * np.eye(4)) @ np.full(4, 0.25))
    np.testing.assert_allclose(weights_T, expected_T, rtol=1e-4, atol=1e-6)
    assert np.abs(expected_T - 0.25).max() > 1e-2
    shared, _ = task_grads.split_params(grads["model"])
    np.testing.assert_allclose(flat_leaves(shared), expected_T @ flat[0], rtol=1e-4, atol=1e-7)
    mean_TxP = sum(flat) / 3
    np.testing.assert_allclose(gram_TxT, mean_TxP @ mean_TxP.T, rtol=1e-4, atol=1e-9)


def test_scanned_layers_on_a_mesh_shard_like_the_unrolled_blocks_and_step_the_same():
    """``model.scan_layers`` on a 2x2x2 mesh: the stacked kernels keep the unrolled kernels' sharding
    behind a replicated ``layers`` axis, and from the same parameters one microbatched step gives the
    same loss and updated parameters."""
    from tests.test_models import stack_blocks
    config = seq_config(data=2, fsdp=2, tensor=2)
    config.model.num_layers, config.model.dropout_rate = 2, 0.0
    scanned_config = config.copy_and_resolve_references()
    scanned_config.model.scan_layers = True
    (setup, step, batch), (scanned_setup, scanned_step, scanned_batch) = (
        compile_step(c, grad_accum_steps=2) for c in (config, scanned_config))
    P = jax.sharding.PartitionSpec
    specs = jax.tree.map(lambda s: s.spec, scanned_setup.state_shardings.params["model"]["trunk"])
    unrolled_specs = jax.tree.map(lambda s: s.spec, setup.state_shardings.params["model"]["trunk"])
    assert specs["blocks"]["block"]["mlp"]["wi"]["kernel"] == P(None, "fsdp", "tensor")
    for stacked, plain in zip(jax.tree.leaves(specs["blocks"], is_leaf=lambda x: isinstance(x, P)),
                              jax.tree.leaves(unrolled_specs["block_0"], is_leaf=lambda x: isinstance(x, P))):
        assert stacked == P(None, *plain)

    state = setup.create_state()
    params = jax.device_get(state.params)
    params["model"]["trunk"] = stack_blocks(params["model"]["trunk"], 2)
    scanned_state = scanned_setup.create_state().replace(
        params=jax.device_put(params, scanned_setup.state_shardings.params))
    with setup.context():
        new_state, metrics = step(state, batch)
    with scanned_setup.context():
        new_scanned, scanned_metrics = scanned_step(scanned_state, scanned_batch)
    np.testing.assert_allclose(scanned_metrics["loss"], metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(scanned_metrics["grad_norm"], metrics["grad_norm"], rtol=1e-4)
    expected = jax.device_get(new_state.params)
    expected["model"]["trunk"] = stack_blocks(expected["model"]["trunk"], 2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(new_scanned.params), expected)
