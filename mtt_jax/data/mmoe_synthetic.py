"""Synthetic regression task pairs of controlled relatedness (single-input, ``vector`` inputs).

The generator of Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018, §4.1, for several pairs of tasks:

1. orthonormal vectors ``u1, u2`` in R^d (d = ``INPUT_DIM`` = 100);
2. ``w1 = c u1`` and ``w2 = c (p u1 + sqrt(1 - p^2) u2)``, so ``cos(w1, w2) = p``, the pair's
   correlation score (c = ``SCALE`` = 1);
3. ``x ~ N(0, I_d)``;
4. ``y_k = w_k^T x + sum_{i=1..m} sin(alpha_i w_k^T x + beta_i) + eps_k``, m = ``NUM_SINES`` = 10,
   ``eps_k ~ N(0, 0.01^2)`` (noise standard deviation ``NOISE_STD`` = 0.01).

The paper does not publish ``alpha_i, beta_i`` ("given parameters"); here they are drawn once from
N(0, 1) with a fixed key and shared by every task, as both tasks of a pair share them in the paper.
Because of the sines the labels' Pearson correlation is not exactly p, but it falls as p falls (the
property the paper's experiments rest on; ``tests/test_data_generators.py`` logs the measured values).

Several pairs (``num_pairs``, tasks ``mmoe_a1, mmoe_a2, mmoe_b1, ...``) use disjoint orthonormal vectors:
the first ``2 * MAX_PAIRS`` columns of one fixed random orthogonal matrix, so tasks of different pairs
have cosine 0 and a pair's data never depends on which other pairs are requested. ``correlation`` is one
p for every pair, or one per pair. Labels are not standardized (the paper trains on them as they are).

Train rows come in blocks of ``base.BLOCK_ROWS``, each from a generator keyed by ``(seed, step,
block)``, so any process builds only its rows. Eval: ``num_eval_examples`` fixed rows. Model: 100
features; ``model.patch_size = 10`` reads them as 10 tokens of 10.
"""

from __future__ import annotations

import functools
import string
from typing import Sequence

import numpy as np

from mtt_jax import tasks as tasks_lib
from mtt_jax.data import base

INPUT_DIM = 100
SCALE = 1.0
NUM_SINES = 10
NOISE_STD = 0.01
MAX_PAIRS = 8
TASK_NAMES = tuple(f"mmoe_{string.ascii_lowercase[pair]}{k}" for pair in range(MAX_PAIRS) for k in (1, 2))
_CONSTANTS_KEY = 2018  # fixed: the tasks themselves never depend on the run seed
_EVAL_KEY = 2019


@functools.lru_cache(maxsize=1)
def constants() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(basis f64[2 * MAX_PAIRS, d] orthonormal rows, alphas f64[m], betas f64[m])``."""
    rng = np.random.default_rng(_CONSTANTS_KEY)
    q, _ = np.linalg.qr(rng.standard_normal((INPUT_DIM, 2 * MAX_PAIRS)))
    return q.T, rng.standard_normal(NUM_SINES), rng.standard_normal(NUM_SINES)


def pair_weights(pair: int, correlation: float) -> tuple[np.ndarray, np.ndarray]:
    """``(w1, w2)`` of pair ``pair`` with correlation score ``correlation`` (step 2 of the generator)."""
    basis, _, _ = constants()
    u1, u2 = basis[2 * pair], basis[2 * pair + 1]
    return SCALE * u1, SCALE * (correlation * u1 + np.sqrt(1 - correlation**2) * u2)


def labels_of(x_NxD: np.ndarray, weights: np.ndarray, noise_N: np.ndarray) -> np.ndarray:
    """Step 4: ``w^T x + sum_i sin(alpha_i w^T x + beta_i) + noise``."""
    _, alphas, betas = constants()
    projection_N = x_NxD.astype(np.float64) @ weights
    sines_N = np.sin(alphas[None, :] * projection_N[:, None] + betas[None, :]).sum(axis=1)
    return projection_N + sines_N + noise_N


def _draw(rng: np.random.Generator, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """One block: inputs ``[n, d]`` and the noise of every possible task ``[n, 2 * MAX_PAIRS]``."""
    return rng.standard_normal((num_rows, INPUT_DIM)), NOISE_STD * rng.standard_normal(
        (num_rows, len(TASK_NAMES)))


class MmoeSynthetic(base.VectorGenerator):
    """Ma et al.'s synthetic regression pairs; tasks ``mmoe_<pair letter><1|2>``."""

    name = "mmoe_synthetic"
    layout = "single"
    all_task_names = TASK_NAMES

    def __init__(self, task_names: Sequence[str], seed: int, *,
                 correlation: float | Sequence[float] = 0.9, num_pairs: int = 1,
                 num_eval_examples: int = 2000):
        self.task_names = base.check_task_names(self.name, task_names, self.all_task_names)
        self.seed = base.check_positive("seed", seed, minimum=0)
        self.num_pairs = base.check_positive("num_pairs", num_pairs)
        if self.num_pairs > MAX_PAIRS:
            raise ValueError(f"num_pairs={num_pairs} exceeds the {MAX_PAIRS} pairs this generator has")
        available = TASK_NAMES[:2 * self.num_pairs]
        for task in self.task_names:
            if task not in available:
                raise ValueError(f"task {task!r} is not in the first num_pairs={num_pairs} pairs; "
                                 f"valid choices: {', '.join(available)} (or raise num_pairs)")
        correlations = np.atleast_1d(np.asarray(correlation, np.float64))
        if len(correlations) == 1:
            correlations = np.repeat(correlations, self.num_pairs)
        if len(correlations) != self.num_pairs or np.any(np.abs(correlations) > 1):
            raise ValueError(f"correlation must be one value in [-1, 1] or one per pair "
                             f"({self.num_pairs}), got {correlation!r}")
        self.correlations = tuple(float(p) for p in correlations)
        self._num_eval_examples = base.check_positive("num_eval_examples", num_eval_examples)
        self.input_spec = base.InputSpec(kind="vector", shape=(INPUT_DIM,))
        self.task_weights = {}
        for pair, p in enumerate(self.correlations):
            w1, w2 = pair_weights(pair, p)
            self.task_weights[TASK_NAMES[2 * pair]], self.task_weights[TASK_NAMES[2 * pair + 1]] = w1, w2
        self._eval = self._rows(lambda block: base.eval_rng(_EVAL_KEY, block),
                                slice(0, self._num_eval_examples))


    def _rows(self, rng_for_block, rows: slice) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        x_NxD, noise_NxT = base.block_rows(rng_for_block, rows, _draw)
        labels = {task: labels_of(x_NxD, self.task_weights[task], noise_NxT[:, TASK_NAMES.index(task)])
                  .astype(np.float32) for task in self.task_names}
        return x_NxD.astype(np.float32), labels


# --- The tasks this source serves, in the task registry (`mtt_jax.tasks.get`). ---------------------
for _name in MmoeSynthetic.all_task_names:  # mmoe_a1, mmoe_a2, mmoe_b1, ...
    tasks_lib.register(tasks_lib.TaskSpec(_name, "regression", 1, MmoeSynthetic.name,
                                          metrics=("mse", "pearson")))
