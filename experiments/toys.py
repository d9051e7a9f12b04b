"""On-device samplers for the synthetic regression sources, so that many seeds train in one program.

The train batches of `mtt_jax.data.mmoe_synthetic` and `mtt_jax.data.gradnorm_toy` are numpy functions
of ``(seed, step)``; with 30 seeds x 10^4 steps the host would spend more time drawing data than the
device spends training. These samplers draw from the *same distributions*, with the same fixed task
constants (the sources' ``constants``, ``pair_weights`` and ``task_matrix``), with ``jax.random`` inside
the compiled step. They are not the sources' exact streams (different generators); the eval sets are the
sources' own fixed ones.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtt_jax.data import gradnorm_toy, mmoe_synthetic


def _batch(x_BxD: jax.Array, labels: dict[str, jax.Array]) -> dict:
    ones = jnp.ones((x_BxD.shape[0],), jnp.float32)
    return {"inputs": x_BxD, "labels": labels, "mask": {task: ones for task in labels}}


def mmoe_weights(task_weights: dict[str, np.ndarray]) -> np.ndarray:
    """``f32[D, T]``: the tasks' weight vectors (``source.task_weights``) as the sampler's argument."""
    return np.stack([task_weights[t] for t in task_weights], axis=1).astype(np.float32)


def mmoe_sampler(task_names: Sequence[str], batch_size: int):
    """Ma et al. (2018) §3.2 steps 3-4: ``x ~ N(0, I_100)``,
    ``y = w^T x + sum_i sin(alpha_i w^T x + beta_i) + N(0, 0.01^2)``, with the source's constants
    (``mmoe_synthetic.constants()``: alpha_i = i, beta_i = (i - 1)^2, i = 1..10; ``NOISE_STD``).

    Returns ``sample(key, step, weights_DxT)``; the weight vectors are an argument (`mmoe_weights`), so
    runs at different correlations share one compiled program.
    """
    _, alphas, betas = mmoe_synthetic.constants()
    alphas, betas = jnp.asarray(alphas, jnp.float32), jnp.asarray(betas, jnp.float32)
    names = list(task_names)

    def sample(key: jax.Array, step: jax.Array, weights_DxT: jax.Array) -> dict:
        x_key, noise_key = jax.random.split(jax.random.fold_in(key, step))
        x_BxD = jax.random.normal(x_key, (batch_size, mmoe_synthetic.INPUT_DIM), jnp.float32)
        # Full f32: a TF32 or bf16 product's rounding, times alpha up to 10 in the sines, would exceed the
        # labels' noise (std 0.01).
        projection_BxT = jnp.matmul(x_BxD, weights_DxT, precision=jax.lax.Precision.HIGHEST)
        sines_BxT = jnp.sin(alphas * projection_BxT[..., None] + betas).sum(-1)
        noise_BxT = mmoe_synthetic.NOISE_STD * jax.random.normal(noise_key, projection_BxT.shape)
        y_BxT = projection_BxT + sines_BxT + noise_BxT
        return _batch(x_BxD, {t: y_BxT[:, i] for i, t in enumerate(names)})
    return sample


def gradnorm_sampler(task_names: Sequence[str], sigmas: dict[str, float], batch_size: int):
    """Chen et al. (2018) §4: ``x ~ N(0, I_250)``, ``y_i = sigma_i tanh((B + eps_i) x)[0]``."""
    rows_DxT = jnp.asarray(np.stack([gradnorm_toy.task_matrix(gradnorm_toy.TASK_NAMES.index(t))
                                     [gradnorm_toy.OUTPUT_INDEX] for t in task_names], axis=1), jnp.float32)
    sigmas_T = jnp.asarray([sigmas[t] for t in task_names], jnp.float32)

    def sample(key: jax.Array, step: jax.Array) -> dict:
        x_BxD = jax.random.normal(jax.random.fold_in(key, step), (batch_size, gradnorm_toy.INPUT_DIM),
                                  jnp.float32)
        y_BxT = sigmas_T * jnp.tanh(x_BxD @ rows_DxT)
        return _batch(x_BxD, {t: y_BxT[:, i] for i, t in enumerate(task_names)})
    return sample
