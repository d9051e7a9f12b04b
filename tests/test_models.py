"""The model keeps its two promises: task features differ per task, and task attention is the only
path between task streams."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtt_jax import data, tasks as tasks_lib  # noqa: F401 (importing the sources registers their tasks)
from mtt_jax.specs import InputSpec
from mtt_jax.models import MultiTaskTransformer
from mtt_jax.models.task_encoder import TaskEncoder
from mtt_jax.models.task_attention import SingleInputTaskAttention

DIGITS = (tasks_lib.get("left_digit"), tasks_lib.get("right_digit"))
SEQ = tuple(tasks_lib.get(n) for n in ("majority", "majority_parity", "mean_value", "repeat_tag"))
IMAGE = InputSpec("image", (12, 12))
TOKENS = InputSpec("tokens", (16,), vocab_size=32)


def small_model(tasks, layout, spec, **kwargs):
    return MultiTaskTransformer(tasks=tasks, layout=layout, input_spec=spec, num_layers=1, d_model=32,
                                num_heads=4, mlp_dim=64, **kwargs)


def init_with_random_heads(model, inputs):
    """Heads start at zero (so the initial loss is ln C); give them random kernels to see dependence."""
    params = nn.unbox(jit_init(model, inputs)["params"])
    for name in [k for k in params if k.startswith("head_")]:
        kernel = params[name]["dense"]["kernel"]
        params[name]["dense"]["kernel"] = jax.random.normal(jax.random.key(3), kernel.shape)
    return {"params": params}


def images(batch=4, seed=0):
    return jax.random.uniform(jax.random.key(seed), (batch, 12, 12))


def tokens(batch=3, seed=0):
    x = jax.random.randint(jax.random.key(seed), (len(SEQ), batch, 16), 1, 32)
    return x.at[:, :, 12:].set(0)  # padding at the end


# Models are initialised and applied jitted: op by op, each takes seconds of small compiles that the
# persistent compilation cache does not keep.
def jit_init(module, *args):
    return jax.jit(module.init)(jax.random.key(0), *args)


def jit_apply(module, variables, *args, method=None):
    """``module.apply(variables, *args, method=method)``; ``args`` are arrays (they are traced)."""
    return jax.jit(functools.partial(module.apply, method=method))(variables, *args)


def test_heads_start_at_zero_so_the_initial_loss_is_log_num_classes():
    model = small_model(DIGITS, "single", IMAGE)
    outputs, _ = jit_apply(model, jit_init(model, images()), images())
    np.testing.assert_allclose(outputs["left_digit"], 0.0)


def test_task_encoder_gives_each_task_different_features():
    encoder = TaskEncoder(num_tasks=4, d_model=16)
    features = encoder.apply(encoder.init(jax.random.key(0)))
    assert features.shape == (4, 16)
    distances = jnp.linalg.norm(features[:, None] - features[None], axis=-1)
    off_diagonal = distances[~jnp.eye(4, dtype=bool)]
    assert float(off_diagonal.min()) > 1e-3


@pytest.mark.parametrize("layout,tasks,spec,inputs", [
    ("single", DIGITS, IMAGE, images()), ("multi", SEQ, TOKENS, tokens())])
def test_output_shapes_per_task_kind(layout, tasks, spec, inputs):
    model = small_model(tasks, layout, spec)
    variables = jit_init(model, inputs)
    outputs, aux = jit_apply(model, variables, inputs)
    b = inputs.shape[0] if layout == "single" else inputs.shape[1]
    expected = {"classification": lambda t: (b, t.num_classes), "regression": lambda t: (b,),
                "tagging": lambda t: (b, 16, t.num_classes)}
    for t in tasks:
        assert outputs[t.name].shape == expected[t.kind](t)
        assert outputs[t.name].dtype == jnp.float32
    mass = aux["task_attention"]
    assert mass.shape == (len(tasks), len(tasks))
    np.testing.assert_allclose(mass.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.diag(mass), 0.0, atol=1e-6)  # keys/values from the OTHER tasks


def _decode_after_perturbing_stream(model, variables, streams, j):
    noise = jax.random.normal(jax.random.key(7), streams[:, j].shape)  # not a constant: LN removes it
    perturbed = streams.at[:, j].add(noise)
    base, _ = jit_apply(model, variables, streams, method=model.decode)
    moved, _ = jit_apply(model, variables, perturbed, method=model.decode)
    return base, moved


@pytest.mark.parametrize("task_attention,should_change", [("cross", True), ("none", False)])
def test_single_input_only_task_attention_connects_streams(task_attention, should_change):
    model = small_model(DIGITS, "single", IMAGE, task_attention=task_attention)
    variables = init_with_random_heads(model, images())
    streams = jit_apply(model, variables, images(), method=model.encode)
    assert streams.shape == (4, 2, 32)
    base, moved = _decode_after_perturbing_stream(model, variables, streams, j=1)
    change_i = float(jnp.abs(moved["left_digit"] - base["left_digit"]).max())
    assert (change_i > 1e-4) == should_change, change_i
    assert float(jnp.abs(moved["right_digit"] - base["right_digit"]).max()) > 1e-4  # its own stream


@pytest.mark.parametrize("task_attention,should_change", [("cross", True), ("none", False)])
def test_multi_input_task_attention_reads_other_tasks_memory(task_attention, should_change):
    model = small_model(SEQ, "multi", TOKENS, task_attention=task_attention)
    x = tokens()
    variables = init_with_random_heads(model, x)
    base, _ = jit_apply(model, variables, x)
    if task_attention == "cross":   # perturb task 3's (repeat_tag's) memory tokens
        params = variables["params"]
        memory = params["cross_task"]["memory"]
        params["cross_task"]["memory"] = memory.at[3].add(jax.random.normal(jax.random.key(7),
                                                                            memory[3].shape))
        moved, _ = jit_apply(model, {"params": params}, x)
    else:                           # no cross-task path: perturb task 3's inputs instead
        moved, _ = jit_apply(model, variables, x.at[3, :, :12].set(7))
    change = max(float(jnp.abs(moved[n] - base[n]).max()) for n in ("majority", "mean_value"))
    assert (change > 1e-4) == should_change, change


def test_multi_input_predictions_do_not_depend_on_other_examples():
    """Task attention reads learned memory, never other examples: batch composition is irrelevant."""
    model = small_model(SEQ, "multi", TOKENS)
    x = tokens(batch=3)
    variables = init_with_random_heads(model, x)
    full, _ = jit_apply(model, variables, x)
    alone, _ = jit_apply(model, variables, x[:, :1])
    for t in SEQ:
        np.testing.assert_allclose(full[t.name][:1], alone[t.name], atol=1e-5)


def test_padding_does_not_change_predictions():
    model = small_model(SEQ, "multi", TOKENS)
    x = tokens(batch=2)
    variables = init_with_random_heads(model, x)
    base, _ = jit_apply(model, variables, x)
    longer_pad = jnp.concatenate([x, jnp.zeros_like(x)], axis=-1)  # same content, 16 more pads
    model32 = small_model(SEQ, "multi", InputSpec("tokens", (32,), vocab_size=32))
    padded, _ = jit_apply(model32, variables, longer_pad)
    for t in SEQ:
        if t.kind != "tagging":
            np.testing.assert_allclose(base[t.name], padded[t.name], atol=1e-4)


def test_single_input_attention_mass_rows_with_self():
    attention = SingleInputTaskAttention(num_heads=2, include_self=True)
    streams = jax.random.normal(jax.random.key(1), (5, 3, 8))
    variables = attention.init(jax.random.key(0), streams, False)
    out, mass = attention.apply(variables, streams, False)
    assert out.shape == streams.shape
    np.testing.assert_allclose(mass.sum(-1), 1.0, atol=1e-5)
    assert float(np.diag(mass).min()) > 0.0


def test_every_kernel_has_logical_axis_names():
    model = small_model(SEQ, "multi", TOKENS, positional="learned")
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens())["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    unnamed = [x for x in leaves if not isinstance(x, nn.Partitioned)]
    assert not unnamed
    names = {n for x in leaves for n in x.names if n}
    assert {"embed", "mlp", "heads", "kv", "vocab"} <= names


def test_film_modulates_each_position_by_its_task_and_leaves_no_task_positions_alone():
    """TaskFiLM against a hand computation: LN(x) (1 + gamma_t) + beta_t, gamma/beta = z_t W + b."""
    from mtt_jax.models.layers import TaskFiLM
    film = TaskFiLM()
    normed = jax.random.normal(jax.random.key(0), (2, 3, 4))
    ids = jnp.array([[0, 1, -1], [1, 1, 0]])
    features = jax.random.normal(jax.random.key(1), (2, 5))
    variables = film.init(jax.random.key(0), normed, ids, features)
    np.testing.assert_array_equal(film.apply(variables, normed, ids, features), normed)  # starts at LN
    kernel = jax.random.normal(jax.random.key(2), (5, 2, 4))
    bias = jax.random.normal(jax.random.key(3), (2, 4))
    out = film.apply({"params": {"kernel": kernel, "bias": bias}}, normed, ids, features)
    for b in range(2):
        for l in range(3):
            t = int(ids[b, l])
            if t < 0:
                expected = normed[b, l]
            else:
                gamma, beta = features[t] @ kernel[:, 0] + bias[0], features[t] @ kernel[:, 1] + bias[1]
                expected = normed[b, l] * (1 + gamma) + beta
            np.testing.assert_allclose(out[b, l], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout,tasks,spec,inputs", [
    ("single", DIGITS, IMAGE, images()), ("multi", SEQ, TOKENS, tokens())])
def test_film_model_starts_as_the_plain_model_and_encode_task_matches(layout, tasks, spec, inputs):
    film_model = small_model(tasks, layout, spec, film=True)
    plain = small_model(tasks, layout, spec)
    params = nn.unbox(jit_init(film_model, inputs)["params"])
    blocks = params["trunk"]["block_0"]
    assert {"film_attention", "film_mlp"} <= set(blocks)
    plain_params = jax.tree.map(lambda x: x, params)
    for name in ("film_attention", "film_mlp"):
        del plain_params["trunk"]["block_0"][name]
    heads = {k: {"dense": {"kernel": jax.random.normal(jax.random.key(5), v["dense"]["kernel"].shape),
                           "bias": v["dense"]["bias"]}} for k, v in params.items() if k.startswith("head_")}
    params.update(heads), plain_params.update(heads)
    for a, b in zip(jax.tree.leaves(jit_apply(film_model, {"params": params}, inputs)[0]),
                    jax.tree.leaves(jit_apply(plain, {"params": plain_params}, inputs)[0])):
        np.testing.assert_allclose(a, b, atol=1e-6)
    if layout == "multi":  # with FiLM on, the per-task encoder used for per-task gradients agrees
        film_params = jax.tree.map(lambda x: x, params)
        for name in ("film_attention", "film_mlp"):
            leaf = film_params["trunk"]["block_0"][name]
            leaf["kernel"] = jax.random.normal(jax.random.key(7), leaf["kernel"].shape)
        streams, _ = jit_apply(film_model, {"params": film_params}, inputs, method="encode")
        for i in range(len(tasks)):
            one = jit_apply(film_model, {"params": film_params}, inputs[i], i, method="encode_task")
            np.testing.assert_allclose(one, streams[i], atol=1e-5)
        other = jit_apply(film_model, {"params": film_params}, inputs[0], 1, method="encode_task")
        assert float(jnp.abs(other - streams[0]).max()) > 1e-3  # the same tokens as another task


def test_film_without_the_task_encoder_is_a_config_error():
    from configs import default as default_config
    from mtt_jax.run import config_check
    config = default_config.get_config("tiny")
    config.model.film, config.model.task_encoder = True, False
    with pytest.raises(config_check.ConfigError, match="model.film=True .* set model.task_encoder=True"):
        config_check.validate(config, num_devices=8)


def test_every_attention_kernel_off_gpu_matches_jax_dot_product_attention_values_and_gradients():
    from mtt_jax.models.layers import dot_product_attention
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 6, 3, 8)) for i in range(3))
    key_mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=key_mask[:, None, None, :] > 0)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    for kernel in ("einsum", "auto", "xla"):
        ours = lambda q, k, v: dot_product_attention(q, k, v, key_mask, kernel)
        np.testing.assert_allclose(ours(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-6)
        for ours_grad, reference_grad in zip(jax.grad(loss(ours), (0, 1, 2))(q, k, v),
                                             jax.grad(loss(reference), (0, 1, 2))(q, k, v)):
            np.testing.assert_allclose(ours_grad, reference_grad, rtol=1e-4, atol=1e-6)
        # Masked keys get no weight: changing their values leaves the output unchanged.
        v_changed = v.at[0, 4:].set(100.0)
        np.testing.assert_allclose(ours(q, k, v_changed), ours(q, k, v), atol=1e-6)


def test_bf16_einsum_attention_differentiates_in_bf16_and_matches_f32():
    """The logits' f32 cotangent is rounded to bf16 before attention's backward matmuls, so they run
    in bf16 (autodiff would upcast them to f32); the gradients still match f32 to bf16 precision."""
    from mtt_jax.perf import flops
    from mtt_jax.models.layers import dot_product_attention
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 16, 2, 8)) for i in range(3))
    key_mask = jnp.array([[1] * 12 + [0] * 4, [1] * 16])
    loss = lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(q, k, v, key_mask, "einsum")
                                           .astype(jnp.float32)))
    grad = jax.jit(jax.grad(loss, (0, 1, 2)))
    bf16 = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    hlo = grad.lower(*bf16).compiler_ir("hlo").as_hlo_text()
    assert set(flops.hlo_matmul_flops(hlo)) == {"bf16 x bf16"}
    for low, reference in zip(grad(*bf16), grad(q, k, v)):
        assert low.dtype == jnp.bfloat16
        np.testing.assert_allclose(low.astype(jnp.float32), reference, rtol=0.02, atol=0.015)
    assert float(jnp.abs(grad(*bf16)[1][0, 12:]).max()) == 0.0  # masked keys get no gradient


def test_the_attention_kernel_is_cudnn_on_gpus_where_it_takes_the_inputs_and_einsums_elsewhere():
    from mtt_jax.models.layers import select_attention_kernel as select
    qk = lambda dtype=jnp.bfloat16, length=128, head_dim=64: 2 * (jnp.zeros((2, length, 4, head_dim), dtype),)
    assert select("auto", *qk(), "gpu") == "cudnn"
    assert select("auto", *qk(jnp.float16, head_dim=128), "gpu") == "cudnn"
    assert select("auto", *qk(jnp.float32), "gpu") == "xla"  # cuDNN: fp16 / bf16 only
    assert select("auto", *qk(head_dim=12), "gpu") == "xla"  # not a multiple of 8
    assert select("auto", *qk(head_dim=136), "gpu") == "xla"  # above 128
    assert select("auto", *qk(length=127), "gpu") == "xla"  # odd length
    assert select("auto", *qk(), "cpu") == select("auto", *qk(), "tpu") == "einsum"
    assert select("xla", *qk(), "gpu") == "xla"  # a request is kept


def test_cudnn_gets_a_mask_with_one_row_per_query():
    from mtt_jax.models.layers import attention_mask
    key_mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    # cuDNN refuses a mask broadcast over queries (jax-ml/jax#28974): it gets one row per query.
    full = attention_mask(key_mask, "cudnn", query_length=6)
    assert full.shape == (2, 1, 6, 6) and full.dtype == jnp.bool_
    np.testing.assert_array_equal(full, jnp.broadcast_to(attention_mask(key_mask, "xla", 6), (2, 1, 6, 6)))
    assert attention_mask(None, "cudnn", 6) is None


def test_the_models_attention_kernel_reaches_every_block():
    from configs import default as default_config
    from mtt_jax.models.multitask import build_model
    config = default_config.get_config("tiny")
    config.attention_kernel = "xla"
    assert build_model(config, SEQ, "multi", TOKENS).attention_kernel == "xla"
    einsum = small_model(SEQ, "multi", TOKENS, attention_kernel="einsum")
    xla = small_model(SEQ, "multi", TOKENS, attention_kernel="xla")
    inputs = tokens()
    params = nn.unbox(jit_init(einsum, inputs)["params"])
    for a, b in zip(jax.tree.leaves(jit_apply(einsum, {"params": params}, inputs)[0]),
                    jax.tree.leaves(jit_apply(xla, {"params": params}, inputs)[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # the kernel is really passed down: one the layer does not know fails in every block's attention
    with pytest.raises(ValueError, match="Unsupported implementation option"):
        small_model(SEQ, "multi", TOKENS, attention_kernel="nope").apply({"params": params}, inputs)


CUDNN_ATTENTION = ("__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward")


def test_a_bf16_model_with_the_cudnn_kernel_lowers_for_cuda_to_fused_attention(cudnn_probes_stubbed):
    """No GPU here, so the model's gradient is lowered for CUDA with JAX's cuDNN version and compute
    capability probes stubbed: every check ``jax.nn.dot_product_attention`` makes of the inputs and
    the mask runs, and the HLO must hold cuDNN's fused forward and backward (the mask as a bias)."""
    model = small_model(SEQ, "multi", TOKENS, attention_kernel="cudnn", dtype=jnp.bfloat16)
    inputs = tokens()
    params = nn.unbox(jit_init(model.clone(attention_kernel="einsum"), inputs)["params"])
    outputs = lambda p: jax.tree.leaves(model.apply({"params": p}, inputs)[0])
    loss = lambda p: sum(jnp.sum(o.astype(jnp.float32)) for o in outputs(p))
    checks = [jax.export.DisabledSafetyCheck.custom_call(target) for target in CUDNN_ATTENTION]
    exported = jax.export.export(jax.jit(jax.grad(loss)), platforms=["cuda"], disabled_checks=checks)
    hlo = exported(params).mlir_module()
    for target in CUDNN_ATTENTION:
        assert f"custom_call @{target}(" in hlo
    from mtt_jax.benchmark import cudnn_attention_calls  # the benchmark's column reads the same text
    assert cudnn_attention_calls(hlo) == {"forward": 1, "backward": 1}  # one layer
    assert "tensor<12x1x16x16xbf16>" in hlo  # 4 tasks x 3 examples, the key mask over 16 queries
    # What the full mask avoids: a mask broadcast over queries is refused (jax-ml/jax#28974).
    q = jnp.zeros((2, 16, 4, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="Bias must have same seq length"):
        jax.nn.dot_product_attention(q, q, q, mask=jnp.ones((2, 1, 1, 16), bool), implementation="cudnn")


def test_the_matmul_count_reads_cudnn_attention_as_the_einsums_it_replaces(cudnn_probes_stubbed):
    """`flops.hlo_matmul_flops` of the bf16 model's gradient lowered for CUDA with cuDNN's fused
    attention (custom calls, not dots) equals that of the einsum kernel's, all in bf16 x bf16."""
    from mtt_jax.perf import flops
    inputs = tokens()
    counts = {}
    for kernel, platform in (("cudnn", "cuda"), ("einsum", "cpu")):
        model = small_model(SEQ, "multi", TOKENS, attention_kernel=kernel, dtype=jnp.bfloat16)
        params = nn.unbox(jit_init(model.clone(attention_kernel="einsum"), inputs)["params"])
        loss = lambda p: sum(jnp.sum(o.astype(jnp.float32))
                             for o in jax.tree.leaves(model.apply({"params": p}, inputs)[0]))
        lowered = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=(platform,))
        hlo = lowered.compiler_ir("hlo").as_hlo_text()
        assert ("__cudnn$fmha" in hlo) == (kernel == "cudnn")
        counts[kernel] = flops.hlo_matmul_flops(hlo)
    assert set(counts["cudnn"]) == {"bf16 x bf16"}
    assert counts["cudnn"]["bf16 x bf16"] == pytest.approx(counts["einsum"]["bf16 x bf16"], rel=1e-9)


def test_attention_kernel_cudnn_off_gpu_is_a_one_line_config_error():
    from configs import default as default_config
    from mtt_jax.run import config_check
    config = default_config.get_config("tiny")
    config.attention_kernel = "cudnn"
    with pytest.raises(config_check.ConfigError, match="attention_kernel='cudnn' needs a GPU.*cpu"):
        config_check.validate(config, num_devices=8)
    config.attention_kernel = "flash"
    with pytest.raises(config_check.ConfigError, match="attention_kernel='flash' is not valid"):
        config_check.validate(config, num_devices=8)


def test_dense_matmul_and_its_gradients_equal_the_plain_matmul():
    from mtt_jax.models.layers import matmul
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 16))
    kernel = jax.random.normal(jax.random.PRNGKey(1), (16, 192))  # split into 3 blocks of 64 on CPU
    plain = lambda x, w: jnp.einsum("...d,df->...f", x, w)
    loss = lambda f: lambda x, w: jnp.sum(jnp.tanh(f(x, w)) ** 2)
    np.testing.assert_allclose(matmul(x, kernel), plain(x, kernel), rtol=1e-5, atol=1e-5)
    for ours, reference in zip(jax.grad(loss(matmul), (0, 1))(x, kernel),
                               jax.grad(loss(plain), (0, 1))(x, kernel)):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def stack_blocks(trunk_params, num_layers):
    """Unrolled ``block_{i}`` parameters stacked as ``scan_layers`` keeps them (``blocks/block``)."""
    trunk = dict(trunk_params)
    blocks = [trunk.pop(f"block_{i}") for i in range(num_layers)]
    trunk["blocks"] = {"block": jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)}
    return trunk


def test_scanned_blocks_compute_what_the_unrolled_blocks_compute():
    """``scan_layers``: the same outputs and gradients from the same (stacked) parameters, with remat
    inside the scan and the task inputs that FiLM and the task-gated MoE read passed to every layer."""
    inputs = tokens()
    unrolled = small_model(SEQ, "multi", TOKENS, film=True, ffn="task_moe", num_experts=2,
                           remat="full").clone(num_layers=2)
    scanned = unrolled.clone(scan_layers=True)
    params = init_with_random_heads(unrolled, inputs)["params"]
    stacked = {**params, "trunk": stack_blocks(params["trunk"], 2)}
    abstract = jax.eval_shape(scanned.init, jax.random.key(0), inputs)["params"]
    shapes = jax.tree.map(jnp.shape, nn.unbox(abstract))
    assert jax.tree.map(jnp.shape, stacked) == shapes
    assert shapes["trunk"]["blocks"]["block"]["attention"]["query"]["kernel"] == (2, 32, 4, 8)

    def loss(model, p):
        return sum(jnp.sum(jnp.square(o)) for o in jax.tree.leaves(model.apply({"params": p}, inputs)[0]))
    value, grads = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p)))(params)
    scanned_value, scanned_grads = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(stacked)
    np.testing.assert_allclose(scanned_value, value, rtol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))  # rounding noise is relative to it
    for a, b in zip(jax.tree.leaves(scanned_grads), jax.tree.leaves({**grads, "trunk": stack_blocks(
            grads["trunk"], 2)})):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_an_image_of_more_than_512_patches_gets_a_position_for_every_patch(positional):
    """64 x 64 in 2 x 2 patches: 1024 patches, twice the 512 rows a table sized by the image's height
    had. Token models keep their 512-row learned table, the shape in existing checkpoints."""
    from mtt_jax.models.layers import sinusoidal_positions
    model = MultiTaskTransformer(tasks=DIGITS, layout="single", input_spec=InputSpec("image", (64, 64, 3)),
                                 num_layers=1, d_model=8, num_heads=2, mlp_dim=16, patch_size=2,
                                 positional=positional)
    inputs = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
    variables = init_with_random_heads(model, inputs)
    outputs, _ = jit_apply(model, variables, inputs)
    for t in DIGITS:
        assert outputs[t.name].shape == (2, t.num_classes)
        assert np.isfinite(outputs[t.name]).all()
    positions = jit_apply(model, variables, jnp.zeros((1, 1024, 8)), method=lambda m, x: m.positions(x))[0]
    table = (sinusoidal_positions(1024, 8) if positional == "sinusoidal"
             else variables["params"]["positions"]["table"])
    assert table.shape == (1024, 8)
    np.testing.assert_array_equal(positions, table)
    tokens_model = small_model(SEQ, "multi", TOKENS, positional="learned")
    shapes = jax.eval_shape(tokens_model.init, jax.random.key(0), tokens())["params"]
    assert nn.unbox(shapes)["positions"]["table"].shape == (512, 32)


def test_the_positional_table_covers_patches_chunks_and_tokens():
    from mtt_jax.models.multitask import num_positions
    assert num_positions(InputSpec("image", (64, 32, 3)), 4) == 16 * 8
    assert num_positions(InputSpec("image", (12, 12)), 2) == 36
    assert num_positions(InputSpec("vector", (2000,)), 2) == 1000
    assert num_positions(TOKENS, 2) == 16


def _dot_output_dtypes(jaxpr, size: int) -> list:
    """Output dtypes of the ``dot_general``s with ``size`` elements in ``jaxpr`` and the jaxprs it calls
    (the logits' matmul sits inside `attention_logits`'s custom VJP)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.size == size:
            found.append(eqn.outvars[0].aval.dtype)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    found += _dot_output_dtypes(sub, size)
    return found


def _task_attention_case(layout: str, dtype):
    """A task-attention module, its inputs and the element count of its logits (no other matmul in
    the module has as many)."""
    from mtt_jax.models.task_attention import MultiInputTaskAttention
    if layout == "single":  # logits [B=5, H=2, T=3, S=3]
        streams = jax.random.normal(jax.random.key(1), (5, 3, 16))
        return SingleInputTaskAttention(num_heads=2, dtype=dtype), (streams, False), 5 * 2 * 3 * 3
    x = jax.random.normal(jax.random.key(1), (3, 2, 5, 16))  # logits [T=3, B=2, L=5, H=2, S=3, M=4]
    mask = jnp.ones((3, 2, 5), bool).at[:, 1, 3:].set(False)
    return (MultiInputTaskAttention(num_heads=2, memory_tokens=4, dtype=dtype), (x, mask, False),
            3 * 2 * 5 * 2 * 3 * 4)


@pytest.mark.parametrize("layout", ["single", "multi"])
def test_bf16_task_attention_computes_its_logits_as_the_trunk_does(layout):
    """As `attention_logits`: the logits come out of the bf16 matmul in f32 (not rounded to bf16
    before the softmax), the backward matmuls run in bf16, and values and gradients match f32."""
    from mtt_jax.perf import flops
    module, args, logits_size = _task_attention_case(layout, jnp.bfloat16)
    f32_module = module.clone(dtype=jnp.float32)
    params = nn.unbox(f32_module.init(jax.random.key(0), *args)["params"])
    low_args = (args[0].astype(jnp.bfloat16),) + args[1:]
    jaxpr = jax.make_jaxpr(lambda p, x: module.apply({"params": p}, x, *args[1:]))(params, low_args[0])
    assert _dot_output_dtypes(jaxpr.jaxpr, logits_size) == [jnp.float32]

    def loss(m, p, x):
        out, mass = m.apply({"params": p}, x, *args[1:])
        return jnp.sum(jnp.sin(out.astype(jnp.float32))) + jnp.sum(mass * jnp.arange(mass.size).reshape(
            mass.shape))
    grad = jax.jit(jax.grad(lambda p, x: loss(module, p, x), (0, 1)))
    hlo = grad.lower(params, low_args[0]).compiler_ir("hlo").as_hlo_text()
    assert set(flops.hlo_matmul_flops(hlo)) == {"bf16 x bf16"}
    low = grad(params, low_args[0])
    reference = jax.jit(jax.grad(lambda p, x: loss(f32_module, p, x), (0, 1)))(params, args[0])
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(reference))  # bf16 noise is relative to it
    for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a.astype(jnp.float32), b, rtol=0.05, atol=0.02 * scale)
