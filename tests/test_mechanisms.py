"""Task attention and the task encoder in their literal forms, beside today's: aligned task attention
(task i's stream queries the other tasks' streams of the same row), the additive task encoder of the
single-input layout (one conditioned trunk pass per task) and per-task attention-pool read-outs. Each
against a hand computation, the config check's refusals, and a few training steps."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config, multiview as multiview_config, seqtasks as seqtasks_config
from mtt_jax import data, tasks as tasks_lib, task_grads, train_step as steps, weighting  # noqa: F401
from mtt_jax.models import MultiTaskTransformer
from mtt_jax.models.task_attention import AlignedTaskAttention
from mtt_jax.run import config_check
from mtt_jax.specs import InputSpec

SEQ3 = tuple(tasks_lib.get(n) for n in ("majority", "majority_parity", "mean_value"))
TOKENS = InputSpec("tokens", (8,), vocab_size=16)


def jit_init(module, *args):
    return jax.jit(module.init)(jax.random.key(0), *args)


def jit_apply(module, variables, *args, method=None):
    return jax.jit(functools.partial(module.apply, method=method))(variables, *args)


def randomized(params, seed=1):
    """Every parameter drawn at random (heads, biases and LayerNorms start at 0 or 1, which would hide
    terms of a hand computation)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def small_model(tasks, layout, spec, **kwargs):
    return MultiTaskTransformer(tasks=tasks, layout=layout, input_spec=spec, num_layers=1, d_model=16,
                                num_heads=2, mlp_dim=32, **kwargs)


def seq_tokens(batch=3, seed=0):
    x = jax.random.randint(jax.random.key(seed), (len(SEQ3), batch, 8), 1, 16)
    return x.at[:, :, 6:].set(0).at[1, 0, 4:].set(0)  # padding at the end, more in one row


# --- Aligned task attention ---------------------------------------------------------------------------

def _layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def aligned_by_hand(p, x_TxBxLxD, mask_TxBxL, include_self, pool):
    """numpy softmax attention of one head over the other tasks' keys of the same row."""
    num_tasks, batch, length, _ = x_TxBxLxD.shape
    h = _layer_norm(x_TxBxLxD, p["ln"]["scale"], p["ln"]["bias"])
    dense = lambda y, name: y @ p[name]["kernel"][:, 0] + p[name]["bias"][0]  # one head: [D, 1, K]
    if pool == "positions":
        keys, key_mask = h, mask_TxBxL
    else:
        weights = mask_TxBxL[..., None].astype(float)
        keys = ((h * weights).sum(2) / np.maximum(weights.sum(2), 1))[:, :, None]
        key_mask = mask_TxBxL.any(-1)[:, :, None]
    q, k, v = dense(h, "query"), dense(keys, "key"), dense(keys, "value")
    out = np.zeros_like(x_TxBxLxD)
    mass, count = np.zeros((num_tasks, num_tasks)), np.zeros(num_tasks)
    for t in range(num_tasks):
        for b in range(batch):
            for l in range(length):
                slots = [(s, m) for s in range(num_tasks) for m in range(keys.shape[2])
                         if (include_self or s != t) and key_mask[s, b, m]]
                logits = np.array([q[t, b, l] @ k[s, b, m] for s, m in slots]) / np.sqrt(q.shape[-1])
                w = np.exp(logits - logits.max())
                w /= w.sum()
                attended = sum(wi * v[s, b, m] for wi, (s, m) in zip(w, slots))
                out[t, b, l] = attended @ p["out"]["kernel"][0] + p["out"]["bias"]
                if mask_TxBxL[t, b, l]:
                    count[t] += 1
                    for wi, (s, _) in zip(w, slots):
                        mass[t, s] += wi
    return x_TxBxLxD + out, mass / count[:, None]


@pytest.mark.parametrize("include_self,pool", [(False, "positions"), (True, "positions"),
                                               (False, "pooled"), (True, "pooled")])
def test_aligned_task_attention_equals_a_hand_computation(include_self, pool):
    """T=3 tasks, B=2 rows, L=4 positions, one head; padding differs by task and row."""
    x = jax.random.normal(jax.random.key(0), (3, 2, 4, 8))
    mask = np.ones((3, 2, 4), bool)
    mask[0, 0, 3] = mask[1, 1, 2:] = mask[2, 0, 1:] = False
    module = AlignedTaskAttention(num_heads=1, include_self=include_self, pool=pool)
    params = randomized(nn.unbox(jax.jit(lambda x, m: module.init(jax.random.key(0), x, m, False))(
        x, mask)["params"]))
    out, mass = jax.jit(lambda p, x, m: module.apply({"params": p}, x, m, False))(params, x, mask)
    expected, expected_mass = aligned_by_hand(jax.tree.map(np.asarray, params), np.asarray(x, np.float64),
                                              mask, include_self, pool)
    real = mask[..., None]  # padded query positions are computed too, but never read
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, expected, 0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mass, expected_mass, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mass.sum(-1), 1.0, atol=1e-5)
    assert (np.diag(mass) > 0).all() == include_self and (np.diag(mass) == 0).all() != include_self


def _outputs_after_perturbing(task_attention, j=2, b=1, **kwargs):
    model = small_model(SEQ3, "multi", TOKENS, task_attention=task_attention, **kwargs)
    x = seq_tokens()
    variables = {"params": randomized(nn.unbox(jit_init(model, x)["params"]))}
    base, aux = jit_apply(model, variables, x)
    moved, _ = jit_apply(model, variables, x.at[j, b, :5].set(jnp.arange(11, 16)))
    change = {t.name: np.abs(np.asarray(moved[t.name]) - np.asarray(base[t.name])).reshape(3, -1).max(-1)
              for t in SEQ3}
    return change, aux


@pytest.mark.parametrize("pool", ["positions", "pooled"])
def test_aligned_task_attention_reads_the_other_tasks_same_row_only(pool):
    change, aux = _outputs_after_perturbing("aligned", task_attention_pool=pool)
    for name in ("majority", "majority_parity"):        # tasks 0 and 1 listen to task 2's row 1
        assert change[name][1] > 1e-4, change
        np.testing.assert_array_equal(change[name][[0, 2]], 0.0)  # and to no other row
    assert aux["task_attention"].shape == (3, 3)
    np.testing.assert_allclose(np.diag(aux["task_attention"]), 0.0)   # task_attention_self=False


def test_without_task_attention_a_task_does_not_hear_the_others():
    change, aux = _outputs_after_perturbing("none")
    for name in ("majority", "majority_parity"):
        np.testing.assert_array_equal(change[name], 0.0)
    assert change["mean_value"][1] > 1e-4 and "task_attention" not in aux


def test_aligned_per_task_gradients_are_each_tasks_own_gradient():
    """The per-task gradients that Gram methods see (`task_grads`, T backward passes through the
    per-task copies when the decoder mixes the streams) equal each task's loss differentiated alone."""
    model = small_model(SEQ3, "multi", TOKENS, task_attention="aligned", task_attention_self=True)
    batch = aligned_batch(seq_tokens(batch=4))
    params = randomized(nn.unbox(jit_init(model, batch["inputs"])["params"]))
    loss_fn = lambda outputs, b: steps.task_losses(SEQ3, outputs, b, "multi")

    @jax.jit
    def both(params):
        result = task_grads.per_task_gradients(model, params, batch, SEQ3, "multi", jax.random.key(0),
                                               loss_fn)
        shared, task_side = task_grads.split_params(params)

        def loss_t(shared, t):
            outputs, _ = model.apply({"params": {**shared, **task_side}}, batch["inputs"])
            return loss_fn(outputs, batch)[t]
        direct = [jax.grad(loss_t)(shared, t) for t in range(len(SEQ3))]
        return result.grads_T, jax.tree.map(lambda *g: jnp.stack(g), *direct)
    grads_T, direct_T = both(params)
    for a, b in zip(jax.tree.leaves(grads_T), jax.tree.leaves(direct_T)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert model.decode_mixes_tasks and not small_model(SEQ3, "multi", TOKENS).decode_mixes_tasks


def aligned_batch(tokens_TxBxL, seed=0):
    """A hand-made aligned batch: row b of every task is one instance, and every task's label of row b
    is a function of all its tasks' tokens (so a task gains from hearing the others)."""
    x = np.asarray(tokens_TxBxL)
    total = (x % 4).sum((0, 2))                          # [B], over every task's tokens of the row
    labels = {"majority": total % 4, "majority_parity": total % 2,
              "mean_value": (total / x.shape[2]).astype(np.float32)}
    batch_size = x.shape[1]
    return {"inputs": jnp.asarray(x), "labels": {k: jnp.asarray(v) for k, v in labels.items()},
            "mask": {t.name: jnp.ones((batch_size,), jnp.float32) for t in SEQ3}}


def short_training_losses(model, tasks, layout, batches, weighting_name="ew", lr=3e-3):
    """The loss of each step of a few train steps (AdamW, jitted once) on ``batches``."""
    config = default_config.get_config("tiny")
    config.optimizer.learning_rate, config.optimizer.warmup_steps = lr, 1
    config.weighting.name = weighting_name
    method = weighting.make_method(config.weighting, len(tasks))
    tx = steps.make_optimizer(config.optimizer, len(batches))
    state = jax.jit(lambda rng: nn.unbox(steps.init_state(rng, model, method, tx, batches[0]["inputs"])))(
        jax.random.key(0))
    step = jax.jit(steps.bind(steps.train_step, model=model, tasks=tasks, layout=layout, method=method,
                              tx=tx))
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return np.asarray(losses), metrics


@pytest.mark.parametrize("weighting_name", ["ew", "mgda"])
def test_aligned_task_attention_trains_on_an_aligned_batch(weighting_name):
    """A few steps on hand-made aligned batches, with a loss-based and a Gram (per-task gradient)
    method: finite losses that fall, and the T x T map in the step's metrics."""
    model = small_model(SEQ3, "multi", TOKENS, task_attention="aligned")
    batches = [aligned_batch(jax.random.randint(jax.random.key(s % 4), (3, 16, 8), 1, 16)) for s in range(24)]
    losses, metrics = short_training_losses(model, SEQ3, "multi", batches, weighting_name)
    assert np.isfinite(losses).all()
    assert losses[-4:].mean() < 0.8 * losses[:4].mean(), losses
    assert metrics["task_attention"].shape == (3, 3)


# --- The additive task encoder of the single-input layout ---------------------------------------------

DIGITS = (tasks_lib.get("left_digit"), tasks_lib.get("right_digit"))
IMAGE = InputSpec("image", (8, 8))


def images(batch=3, seed=0):
    return jax.random.uniform(jax.random.key(seed), (batch, 8, 8))


def test_additive_task_encoder_is_one_conditioned_trunk_pass_per_task():
    """Stream t = the mean output of the trunk on the embedded image plus task t's features, computed
    here with the trunk, embedding and task encoder applied alone on the model's parameters."""
    from mtt_jax.models.task_encoder import TaskEncoder
    from mtt_jax.models.trunk import PatchEmbed, PositionalEncoding, Trunk
    model = small_model(DIGITS, "single", IMAGE, task_encoder="add", task_attention="none",
                        positional="learned")
    x = images()
    params = randomized(nn.unbox(jit_init(model, x)["params"]))
    assert set(params) == {"embed", "positions", "task_features", "trunk", "head_left_digit",
                           "head_right_digit"}
    streams = jit_apply(model, {"params": params}, x, method=model.encode)
    outputs, _ = jit_apply(model, {"params": params}, x)

    @jax.jit
    def by_hand(params, x):
        embedded = PatchEmbed(2, 16).apply({"params": params["embed"]}, x)
        embedded = PositionalEncoding("learned", 512).apply({"params": params["positions"]}, embedded)
        features = TaskEncoder(2, 16).apply({"params": params["task_features"]})
        trunk = Trunk(num_layers=1, num_heads=2, mlp_dim=32)
        return jnp.stack([trunk.apply({"params": params["trunk"]}, embedded + features[t], None, False
                                      ).mean(1) for t in range(2)], axis=1)
    expected = by_hand(params, x)
    assert streams.shape == (3, 2, 16)
    np.testing.assert_allclose(streams, expected, rtol=1e-5, atol=1e-5)
    for t, task in enumerate(DIGITS):
        head = params[f"head_{task.name}"]["dense"]
        np.testing.assert_allclose(outputs[task.name], expected[:, t] @ head["kernel"] + head["bias"],
                                   rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(streams[:, 0] - streams[:, 1]).max()) > 1e-3   # conditioned: the passes differ


@pytest.mark.parametrize("init_std", [0.02, 1.0])
def test_task_encoder_init_std_is_the_initial_features_scale(init_std):
    """``model.task_encoder_init_std`` reaches the task encoder through the config: the initial task
    features' standard deviation is the value asked for (256 features per task, so within 20%)."""
    from mtt_jax.models import build_model
    config = default_config.get_config("tiny")
    config.model.task_encoder, config.model.d_model = "add", 256
    config.model.task_encoder_init_std = init_std
    model = build_model(config, DIGITS, "single", IMAGE)
    params = nn.unbox(jit_init(model, images())["params"])
    kernel = np.asarray(params["task_features"]["dense"]["kernel"])
    assert kernel.shape == (2, 256)
    assert kernel.std() == pytest.approx(init_std, rel=0.2)


def test_task_encoder_true_is_each_layouts_own_form():
    """multi-input: "add" and True are the same model; single-input: "tokens" and True, "none" and
    False."""
    def outputs(layout, tasks, spec, inputs, **kwargs):
        model = small_model(tasks, layout, spec, **kwargs)
        params = randomized(nn.unbox(jit_init(model, inputs)["params"]))
        return jit_apply(model, {"params": params}, inputs)[0]
    for layout, tasks, spec, inputs, pairs in [
            ("multi", SEQ3, TOKENS, seq_tokens(), [(True, "add"), (False, "none")]),
            ("single", DIGITS, IMAGE, images(), [(True, "tokens"), (False, "none")])]:
        for flag, name in pairs:
            a = outputs(layout, tasks, spec, inputs, task_encoder=flag)
            b = outputs(layout, tasks, spec, inputs, task_encoder=name)
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_task_encoder_field_takes_a_bool_or_a_name_also_in_a_copy():
    config = default_config.get_config("tiny")
    config.model.task_encoder = "add"
    config.update_from_flattened_dict({"model.task_encoder": "tokens"})
    copy = config.copy_and_resolve_references()
    copy.model.task_encoder = False            # as seed_runs.single_task_config does
    assert (config.model.task_encoder, copy.model.task_encoder) == ("tokens", False)


def test_the_flops_formula_counts_one_trunk_pass_per_task():
    config = default_config.get_config("tiny")
    config.model.task_encoder = "add"
    counted, model = xla_and_formula_flops(config)
    assert counted == pytest.approx(model, rel=0.01)   # the patch embedding has no input gradient
    tokens = default_config.get_config("tiny")
    _, model_tokens = xla_and_formula_flops(tokens)
    assert model > 1.8 * model_tokens                   # 2 passes of 16 patches vs one of 2 + 16


def fixed_batch_losses(source_name, tasks, model_kwargs, steps_=12, batch_size=16, weighting_name="ew"):
    """The losses of a few train steps on one fixed batch of ``source_name`` (the model must fit it)."""
    source = data.make_source(source_name, tuple(t.name for t in tasks), seed=0)
    batch = jax.tree.map(jnp.asarray, source.train_batch(0, batch_size))
    model = MultiTaskTransformer(tasks=tasks, layout=source.layout, input_spec=source.input_spec,
                                 num_layers=1, d_model=32, num_heads=2, mlp_dim=64, positional="learned",
                                 **model_kwargs)
    return short_training_losses(model, tasks, source.layout, [batch] * steps_, weighting_name)


@pytest.mark.parametrize("weighting_name", ["ew", "mgda"])
def test_additive_task_encoder_trains_on_multidigits(weighting_name):
    """With a loss-based and a Gram method (per-task gradients through the T passes)."""
    losses, metrics = fixed_batch_losses("multidigits", DIGITS, dict(task_encoder="add"),
                                         weighting_name=weighting_name)
    assert np.isfinite(losses).all() and losses[-1] < 0.95 * losses[0], losses
    assert metrics["task_attention"].shape == (2, 2)   # cross-task attention between the T passes


# --- Per-task attention-pool read-outs -----------------------------------------------------------------

def pool_apply(x, mask, query_TxHxK, task):
    from mtt_jax.models.heads import TaskAttentionPool
    pool = TaskAttentionPool(num_tasks=query_TxHxK.shape[0], num_heads=query_TxHxK.shape[1])
    return jax.jit(lambda x, m, q: pool.apply({"params": {"query": q}}, x, m, task))(x, mask, query_TxHxK)


def test_attention_pool_is_a_softmax_weighted_mean_of_the_real_positions():
    """Per head (channels h K .. (h + 1) K): weights softmax(q_t . x_l / sqrt(K)) over the unmasked
    positions, by hand in numpy."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 5, 8)))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    query = np.asarray(jax.random.normal(jax.random.key(1), (3, 2, 4)))
    pooled = pool_apply(x, mask, query, 1)
    for b in range(2):
        for h in range(2):
            x_h = x[b, mask[b], 4 * h:4 * (h + 1)]
            logits = x_h @ query[1, h] / 2.0
            w = np.exp(logits - logits.max())
            np.testing.assert_allclose(pooled[b, 4 * h:4 * (h + 1)], w @ x_h / w.sum(), rtol=1e-5, atol=1e-6)


def test_attention_pool_of_identical_positions_is_that_position_and_masked_positions_get_no_weight():
    query = np.asarray(jax.random.normal(jax.random.key(1), (2, 2, 4)))
    position = jax.random.normal(jax.random.key(0), (2, 1, 8))
    same = jnp.broadcast_to(position, (2, 6, 8))
    mask = jnp.ones((2, 6), bool).at[0, 4:].set(False)
    np.testing.assert_allclose(pool_apply(same, mask, query, 0), position[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pool_apply(same, None, query, 1), position[:, 0], rtol=1e-5, atol=1e-6)
    padded = same.at[0, 4:].set(100.0)   # masked positions: any values, no weight
    np.testing.assert_allclose(pool_apply(padded, mask, query, 0), position[:, 0], rtol=1e-5, atol=1e-6)


def test_each_task_pools_with_its_own_query_and_zero_queries_are_the_mean():
    x = jax.random.normal(jax.random.key(0), (2, 6, 8))
    mask = jnp.ones((2, 6), bool).at[1, 3:].set(False)
    query = jax.random.normal(jax.random.key(1), (3, 2, 4))
    pooled = [np.asarray(pool_apply(x, mask, query, t)) for t in range(3)]
    assert min(np.abs(pooled[i] - pooled[j]).max() for i in range(3) for j in range(i)) > 1e-2
    from mtt_jax.models.heads import masked_mean_pool
    np.testing.assert_allclose(pool_apply(x, mask, jnp.zeros_like(query), 2), masked_mean_pool(x, mask),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout,task_encoder", [("single", False), ("single", True), ("single", "add"),
                                                 ("multi", True), ("multi", False)])
def test_attention_pool_models_start_as_the_mean_readout_and_learn_per_task_queries(layout, task_encoder):
    """Queries at 0 (their initial value) give the model with the "mean" read-out of the positions;
    random queries give each task its own vector."""
    tasks, spec, inputs = ((DIGITS, IMAGE, images()) if layout == "single" else (SEQ3, TOKENS, seq_tokens()))
    pooled = small_model(tasks, layout, spec, task_encoder=task_encoder, readout="attention_pool")
    params = randomized(nn.unbox(jit_init(pooled, inputs)["params"]))
    assert params["readout_pool"]["query"].shape == (len(tasks), 2, 8)
    zero = {**params, "readout_pool": {"query": jnp.zeros((len(tasks), 2, 8))}}
    streams = jit_apply(pooled, {"params": zero}, inputs, method=pooled.encode)
    outputs, _ = jit_apply(pooled, {"params": zero}, inputs)
    if layout == "multi":
        mean = small_model(tasks, layout, spec, task_encoder=task_encoder)
        expected, _ = jit_apply(mean, {"params": {k: v for k, v in params.items() if k != "readout_pool"}},
                                inputs)
    else:   # single-input: the mean over the input's positions (of each task's pass)
        positions = streams.mean(-2)
        positions = positions if positions.ndim == 3 else jnp.broadcast_to(
            positions[:, None], (positions.shape[0], len(tasks), positions.shape[-1]))
        expected, _ = jit_apply(pooled, {"params": params}, positions, method=_decode_with_mean)
    for t in tasks:
        np.testing.assert_allclose(outputs[t.name], expected[t.name], rtol=1e-4, atol=1e-5)
    learned, _ = jit_apply(pooled, {"params": params}, inputs)
    assert max(float(jnp.abs(learned[t.name] - outputs[t.name]).max()) for t in tasks) > 1e-3


def _decode_with_mean(module, streams_BxTxD):
    """single-input decode of ready-pooled streams (task attention and heads, no read-out)."""
    streams_BxTxD, _ = module.cross_task(streams_BxTxD, False)
    return {t.name: module.heads[t.name](streams_BxTxD[:, i]) for i, t in enumerate(module.tasks)}, {}


def test_attention_pool_trains_on_multidigits_with_a_plain_shared_trunk():
    """The control: no task encoder and no task attention, only the per-task read-out is per task."""
    losses, _ = fixed_batch_losses("multidigits", DIGITS, dict(task_encoder=False, task_attention="none",
                                                                readout="attention_pool"))
    assert np.isfinite(losses).all() and losses[-1] < 0.95 * losses[0], losses


def test_attention_pool_trains_on_seqtasks_multi_input():
    tasks = tuple(tasks_lib.get(n) for n in ("majority", "majority_parity", "mean_value", "repeat_tag"))
    losses, _ = fixed_batch_losses("seqtasks", tasks, dict(readout="attention_pool"), batch_size=8)
    assert np.isfinite(losses).all() and losses[-1] < 0.95 * losses[0], losses


@pytest.mark.parametrize("spec", ["default", "seqtasks"])
def test_the_flops_formula_counts_the_attention_pools(spec):
    """The whole step, and the pools' part exactly: what the step costs over the "mean" read-out's."""
    config = (default_config if spec == "default" else seqtasks_config).get_config("tiny")
    mean_counted, mean_model = xla_and_formula_flops(config)
    config.model.readout = "attention_pool"
    counted, model = xla_and_formula_flops(config)
    assert counted == pytest.approx(model, rel=0.01 if spec == "default" else 1e-3)
    assert counted - mean_counted == pytest.approx(model - mean_model, rel=1e-6) and model > mean_model


def test_aligned_task_attention_trains_on_multiview():
    """The source whose rows are aligned across tasks: the config check accepts it, and a few steps on
    one batch fit it."""
    config = multiview_config.get_config("tiny")
    config.model.task_attention = "aligned"
    config_check.validate(config, num_devices=8)
    views = tuple(tasks_lib.get(n) for n in config.tasks)
    losses, metrics = fixed_batch_losses("multiview", views, dict(task_attention="aligned"))
    assert np.isfinite(losses).all() and losses[-1] < 0.95 * losses[0], losses
    assert metrics["task_attention"].shape == (4, 4)


def test_aligned_task_attention_builds_on_the_shuffled_negative_control():
    """multiview's shuffled rows (instance aligned_rows False) are the control the aligned model is run
    on; what the check and the builder read is the source class's declaration."""
    from mtt_jax import builder
    config = multiview_config.get_config("shuffled")
    config.model.task_attention = "aligned"
    config_check.validate(config, num_devices=8)
    parts = builder.build_parts(config)
    assert not parts.source.aligned_rows and parts.model.task_attention == "aligned"


@pytest.mark.parametrize("layout", ["single", "multi"])
def test_new_parameters_carry_logical_axis_names_and_shard_on_an_fsdp_tensor_mesh(layout):
    """The read-out pools and aligned task attention name their axes (heads, kv, embed) like every other
    kernel, so the fsdp x tensor rules place them (`builder.build` checks that the mesh divides them)."""
    from mtt_jax import builder
    if layout == "single":
        config = default_config.get_config("tiny")
        config.model.task_encoder = "add"
    else:
        config = multiview_config.get_config("tiny")
        config.model.task_attention = "aligned"
        config.model.vocab_size = 8   # embedding rows that fsdp x tensor divides
    config.model.readout = "attention_pool"
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    setup = builder.build(config)
    params = setup.abstract_state.params["model"]
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) for x in leaves)
    assert params["readout_pool"]["query"].names == (None, "heads", "kv")
    shardings = setup.state_shardings.params["model"]
    assert shardings["readout_pool"]["query"].spec == jax.sharding.PartitionSpec(None, "tensor", None)
    if layout == "multi":
        assert shardings["cross_task"]["key"]["kernel"].spec == jax.sharding.PartitionSpec("fsdp", "tensor",
                                                                                           None)


# --- The config check's one-line refusals --------------------------------------------------------------

def refusal(config) -> str:
    with pytest.raises(config_check.ConfigError) as error:
        config_check.validate(config, num_devices=8)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_task_encoder_init_std_refuses_a_negative_scale():
    config = default_config.get_config("tiny")
    config.model.task_encoder_init_std = -0.5
    assert "model.task_encoder_init_std=-0.5 must be in [0.0, inf]" in refusal(config)


def test_aligned_task_attention_refusals():
    single = default_config.get_config("tiny")
    single.model.task_attention = "aligned"
    assert "multi-input layout" in refusal(single)
    seq = seqtasks_config.get_config("tiny")
    seq.model.task_attention = "aligned"
    assert "does not declare aligned_rows" in refusal(seq)
    seq.model.task_attention, seq.model.task_attention_pool = "cross", "mean"
    assert "task_attention_pool='mean'" in refusal(seq)


def test_aligned_task_attention_refuses_flat_mixture_batches():
    """Even a source with aligned rows: the rows of a flat batch are independent examples."""
    views = multiview_config.get_config("tiny")
    views.model.task_attention = "aligned"
    config_check.validate(views, num_devices=8)   # aligned rows: accepted
    views.data.mixture.method = "uniform"
    views.weighting.diagnostics_every = 0
    assert "flat mixture batch's rows are not aligned" in refusal(views)


# --- FLOPs: the formula against XLA's count of the traced step -----------------------------------------

def xla_and_formula_flops(config) -> tuple[float, float]:
    """The matmul FLOPs of the config's lowered train step (`benchmark.step_matmul_flops`, lowered on
    abstract state: nothing runs) and `flops.training_flops`."""
    from mtt_jax import benchmark, train
    from mtt_jax.perf import flops
    setup = train.build(config)
    batch = setup.train_source.train_batch(0, config.batch_size)
    counted = benchmark.step_matmul_flops(config, setup, nn.unbox(setup.abstract_state), batch)
    spec = setup.source.input_spec
    model = flops.training_flops(config.model, setup.tasks, setup.layout, spec.kind, spec.shape,
                                 config.batch_size)
    return sum(counted.values()), model.training


@pytest.mark.parametrize("pool", ["positions", "pooled"])
def test_the_flops_formula_counts_aligned_task_attention(pool):
    config = multiview_config.get_config("tiny")
    config.model.task_attention, config.model.task_attention_pool = "aligned", pool
    counted, model = xla_and_formula_flops(config)
    assert counted == pytest.approx(model, rel=1e-3)


def test_task_encoder_refusals():
    seq = seqtasks_config.get_config("tiny")
    seq.model.task_encoder = "tokens"
    assert "use 'add' (or True)" in refusal(seq)
    digits = default_config.get_config("tiny")
    digits.model.task_encoder = "sum"
    assert "model.task_encoder='sum'; choose True, False or one of tokens, add, none" in refusal(digits)
    digits.model.task_encoder, digits.model.film = "none", True
    assert "set model.task_encoder=True" in refusal(digits)


def test_readout_refusal():
    digits = default_config.get_config("tiny")
    digits.model.readout = "max"
    assert "model.readout='max'; choose one of mean, attention_pool" in refusal(digits)
