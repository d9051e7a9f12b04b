"""The on-device MMoE sampler (`experiments.toys.mmoe_sampler`) draws from the host source's distribution:
Ma et al. 2018 §3.2 with `mtt_jax.data.mmoe_synthetic`'s constants."""

import jax
import numpy as np
import pytest

from experiments import toys
from mtt_jax import data
from mtt_jax.data import mmoe_synthetic

TASKS = ("mmoe_a1", "mmoe_a2")
ROWS = 50_000


def clean_labels(x_NxD: np.ndarray, w_D: np.ndarray) -> np.ndarray:
    """Eqs. 3-4 without the noise, in float64, from the module's constants."""
    z_N = x_NxD.astype(np.float64) @ w_D
    return z_N + np.sin(np.outer(z_N, mmoe_synthetic.ALPHAS) + mmoe_synthetic.BETAS).sum(1)


def device_batch(p: float) -> tuple[dict, dict]:
    source = data.make_source("mmoe_synthetic", TASKS, seed=0, correlation=p)
    sample = jax.jit(toys.mmoe_sampler(TASKS, ROWS))
    batch = jax.device_get(sample(jax.random.key(7), 3, toys.mmoe_weights(source.task_weights)))
    return batch, source.task_weights


@pytest.mark.parametrize("p", [1.0, 0.9, 0.5])
def test_device_sampler_matches_the_exact_moments(p):
    """Mean, std and the pair's Pearson correlation of the sampler's labels are the exact ones
    (`mmoe_synthetic.label_moments`), as the host source's are (tests/test_data_generators.py)."""
    batch, _ = device_batch(p)
    y1, y2 = (np.asarray(batch["labels"][t], np.float64) for t in TASKS)
    mean, std, correlation = mmoe_synthetic.label_moments(p)
    assert (mean, std) == pytest.approx((0.1056, 2.6565), abs=1e-4)
    for y in (y1, y2):
        assert y.mean() == pytest.approx(mean, abs=0.04)    # ~3 standard errors (2.66 / sqrt(50k))
        assert y.std() == pytest.approx(std, abs=0.03)
    assert np.corrcoef(y1, y2)[0, 1] == pytest.approx(correlation, abs=0.012)
    host = data.make_source("mmoe_synthetic", TASKS, seed=0, correlation=p).train_batch(0, ROWS)["labels"]
    assert np.corrcoef(host[TASKS[0]], host[TASKS[1]])[0, 1] == pytest.approx(correlation, abs=0.012)


def test_device_sampler_uses_the_source_constants_and_noise():
    """The sampler's labels minus Eqs. 3-4 recomputed from its inputs (float64, the source's alpha,
    beta and weights) are the N(0, 0.01^2) noise alone: same constants, same formula, and a projection
    precise enough that the sines (alpha up to 10) do not amplify its rounding into the labels."""
    batch, weights = device_batch(0.9)
    x = np.asarray(batch["inputs"])
    assert x.shape == (ROWS, mmoe_synthetic.INPUT_DIM)
    assert abs(x.mean()) < 0.005 and x.std() == pytest.approx(1.0, abs=0.005)
    for task in TASKS:
        residual = np.asarray(batch["labels"][task], np.float64) - clean_labels(x, weights[task])
        assert abs(residual.mean()) < 5e-4
        assert residual.std() == pytest.approx(mmoe_synthetic.NOISE_STD, rel=0.05)
