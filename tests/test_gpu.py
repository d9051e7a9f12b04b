"""Checks that need a GPU; skipped elsewhere (CI has none), so they are not part of what CI proves.

    JAX_PLATFORMS=cuda python -m pytest -q -n 0 tests/test_gpu.py

They check cuDNN's fused attention (``attention_kernel="cudnn"``, what ``"auto"`` picks on a GPU for
bf16 inputs) against the einsum kernel in values and gradients, with padded keys, and that a bf16 train
step of the benchmark's model calls it in every layer and agrees with XLA's attention. `launch/gpu_check.sh`
runs them before the GPU benchmark.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtt_jax.models import layers

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

# cuDNN accumulates in f32 but rounds the probabilities to bf16 in another order than the einsums.
BF16_TOLERANCE = dict(atol=2e-2, rtol=2e-2)


def qkv_and_key_mask(batch=4, length=128, heads=12, head_dim=64):
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (batch, length, heads, head_dim), jnp.bfloat16) for key in keys)
    lengths = jnp.array([length, length // 2, 7, length - 2])[:batch]
    return q, k, v, (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.int32)


def attention_and_gradients(kernel, q, k, v, mask):
    def loss(q, k, v):  # a fixed random projection of the outputs, so that every output position counts
        out = layers.dot_product_attention(q, k, v, mask, kernel=kernel).astype(jnp.float32)
        return jnp.sum(out * jax.random.normal(jax.random.key(1), out.shape))
    out = jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, mask, kernel=kernel))(q, k, v)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def test_auto_picks_cudnn_for_bf16_on_this_gpu():
    q, k, _, _ = qkv_and_key_mask()
    assert layers.select_attention_kernel("auto", q, k, jax.default_backend()) == "cudnn"
    assert layers.select_attention_kernel("auto", q.astype(jnp.float32), k, "gpu") == "xla"


def test_cudnn_attention_matches_einsums_in_values_and_gradients_with_padded_keys():
    q, k, v, mask = qkv_and_key_mask()
    fused, fused_grads = attention_and_gradients("cudnn", q, k, v, mask)
    reference, reference_grads = attention_and_gradients("einsum", q, k, v, mask)
    as_f32 = lambda x: np.asarray(x, np.float32)
    np.testing.assert_allclose(as_f32(fused), as_f32(reference), **BF16_TOLERANCE)
    for name, got, want in zip("qkv", fused_grads, reference_grads):
        scale = np.abs(as_f32(want)).max()  # gradients: relative to their largest entry
        np.testing.assert_allclose(as_f32(got) / scale, as_f32(want) / scale, err_msg=name, **BF16_TOLERANCE)
    # Padded keys get no gradient, and changing them changes nothing.
    padded = np.asarray(mask) == 0
    assert np.all(as_f32(fused_grads[1])[padded] == 0) and np.all(as_f32(fused_grads[2])[padded] == 0)
    v_changed = jnp.where(mask[:, :, None, None] == 0, 100.0, v.astype(jnp.float32)).astype(jnp.bfloat16)
    again, _ = attention_and_gradients("cudnn", q, k, v_changed, mask)
    np.testing.assert_array_equal(as_f32(again), as_f32(fused))


@pytest.fixture(scope="module")
def bf16_benchmark_steps():
    """The benchmark model, 2 layers, in bf16, compiled with auto (cuDNN here) and with XLA's attention."""
    from configs.benchmark import get_config
    from mtt_jax import benchmark
    steps = {}
    for kernel in ("auto", "xla"):
        config = get_config()
        config.dtype, config.attention_kernel = "bfloat16", kernel
        config.grad_accum_steps, config.grad_accum_unroll = 1, 1
        config.model.num_layers = 2
        config.optimizer.warmup_steps = 1  # so that three steps lower the loss visibly
        steps[kernel] = benchmark.Variant(config)  # compiles and runs 3 warm-up steps
    return steps


def test_the_bf16_train_step_calls_cudnn_in_every_layer(bf16_benchmark_steps):
    assert bf16_benchmark_steps["auto"].cudnn_attention_calls == {"forward": 2, "backward": 2}
    assert bf16_benchmark_steps["xla"].cudnn_attention_calls == {"forward": 0, "backward": 0}


def test_cudnn_and_xla_attention_train_alike(bf16_benchmark_steps):
    """Same initial state and batch: the losses of the next steps agree to bf16 precision."""
    losses = {}
    for kernel, variant in bf16_benchmark_steps.items():
        state = variant.setup.create_state()
        losses[kernel] = []
        for _ in range(3):
            state, metrics = variant.compiled(state, variant.batch)
            losses[kernel].append(float(metrics["loss"]))
    assert all(np.isfinite(losses["auto"])) and losses["auto"][2] < losses["auto"][0]
    np.testing.assert_allclose(losses["auto"], losses["xla"], rtol=2e-2)
