"""Synthetic regression task pairs of controlled relatedness (single-input, ``vector`` inputs).

The generator of Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018, §3.2, for several pairs of tasks:

1. orthonormal vectors ``u1, u2`` in R^d;
2. ``w1 = c u1`` and ``w2 = c (p u1 + sqrt(1 - p^2) u2)`` (Eq. 2), so ``cos(w1, w2) = p``, the pair's
   "task correlation";
3. ``x ~ N(0, I_d)``;
4. ``y_k = w_k^T x + sum_{i=1..m} sin(alpha_i w_k^T x + beta_i) + eps_k`` (Eqs. 3-4), the same
   ``alpha_i, beta_i`` for both tasks.

Where each constant comes from. "Paper" is Ma et al. 2018; "reference" is the reference generator in
google-research/google-research, file ``learning_parameter_allocation/synthetic_data.py`` (Maziarz et
al.'s implementation of this procedure, generalized to several pairs), whose comment notes that the paper
gives no alpha/beta values.

==================  ===========================  ==============================================
constant            value                        source
==================  ===========================  ==============================================
d (``INPUT_DIM``)   100                          paper §5.1 ("The input dimension is 100")
x                   N(0, 1) per element          paper §3.2 step 3 (the reference agrees)
u1, u2              orthonormal                  paper §3.2 step 1
w1, w2              Eq. 2                        paper §3.2 step 2 (the reference agrees)
c (``SCALE``)       1.0                          reference (``c=1.0``); the paper names c only
m (``NUM_SINES``)   10                           reference (``m=10``); not in the paper
alpha (``ALPHAS``)  1, 2, ..., 10                reference (``alphas = 1..m``); paper: "given
                                                 parameters", no values
beta (``BETAS``)    0, 1, 4, ..., 81 (i^2)       reference (``betas = i^2, i = 0..m-1``); idem
noise std           0.01                         reference (``noise_std=0.01``, a standard
(``NOISE_STD``)                                  deviation); the paper writes N(0, 0.01)
==================  ===========================  ==============================================

Where ours still differs:

- Noise: the paper's "N(0, 0.01)" does not say whether 0.01 is the variance (std 0.1) or the standard
  deviation; we read it as the reference does (std 0.01). Either is small next to the labels' std
  (about 2.65).
- Basis: the reference takes the first rows of a fresh Haar-random orthogonal matrix per data set, and
  the paper regenerates the data for every run (§3.3 step 3, §5.1); here ``u`` are the first
  ``2 * MAX_PAIRS`` columns of the Q of one fixed Gaussian matrix (key ``_CONSTANTS_KEY``), the same for
  every seed. Since x is isotropic, ``(u1^T x, u2^T x) ~ N(0, I_2)`` for any orthonormal pair: the
  labels' joint distribution is the same; only which input directions carry it is fixed.
- Range of p: the paper allows -1 <= p <= 1 (step 2), the reference only [0, 1]; here [-1, 1].
- Size: the train stream is unbounded (seeded blocks, below); the paper gives no data set size.

Because of the sines the labels' Pearson correlation is well below p (the paper, §3.2 and Figure 2:
equal to p only in the linear case, still positive and rising with p here): with these constants about
0.46 at p = 0.9 and 0.22 at p = 0.5 (``tests/test_data_generators.py`` pins the measured values). An
earlier version drew alpha, beta from N(0, 1) (as the generator in LongmaoTeamTf/deep_recommenders, file
``deep_recommenders/models/multi_task_learning/mixture_of_experts.py``, does, with c = 0.3 and m = 5);
its mostly slow sines (|alpha| < 2) kept the labels nearly as correlated as p (0.85 at p = 0.9).

Several pairs (``num_pairs``, tasks ``mmoe_a1, mmoe_a2, mmoe_b1, ...``) use disjoint orthonormal vectors,
as in the reference, so tasks of different pairs have cosine 0 and a pair's data never depends on which
other pairs are requested. ``correlation`` is one p for every pair, or one per pair. Labels are not
standardized (the paper trains on them as they are).

Train rows come in blocks of ``base.BLOCK_ROWS``, each from a generator keyed by ``(seed, step,
block)``, so any process builds only its rows. Held-out sets (``base.SPLITS``), fixed for every run
seed: test, ``num_eval_examples`` rows from the eval stream; validation, ``num_validation_examples``
rows (0: as many as test) from the validation stream of the same key (``base.held_out_rng``), so its
inputs are fresh draws, never test's or train's. Model: 100 features; ``model.patch_size = 10`` reads
them as 10 tokens of 10.
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
ALPHAS = tuple(float(i) for i in range(1, NUM_SINES + 1))      # 1, 2, ..., 10
BETAS = tuple(float(i**2) for i in range(NUM_SINES))          # 0, 1, 4, ..., 81
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
    return q.T, np.asarray(ALPHAS), np.asarray(BETAS)


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


def label_moments(correlation: float) -> tuple[float, float, float]:
    """``(mean, std, Pearson correlation)`` of a pair's labels, exactly, for task correlation ``p``.

    ``z_k = w_k^T x`` are standard normals (|w_k| = c = 1) with correlation p, so every term of Eqs. 3-4
    has a closed form: ``E sin(a z + b) = sin(b) e^{-a^2/2}``, ``E z1 sin(a z2 + b) = p a cos(b) e^{-a^2/2}``
    (Stein's lemma) and ``E cos(a z1 -/+ a' z2 + b) = cos(b) e^{-(a^2 + a'^2 -/+ 2 a a' p) / 2}``.
    """
    if SCALE != 1.0:
        raise NotImplementedError("label_moments assumes unit weight vectors (SCALE = 1)")
    alphas, betas = np.asarray(ALPHAS), np.asarray(BETAS)
    a_i, a_j, b_i, b_j = alphas[:, None], alphas[None, :], betas[:, None], betas[None, :]
    mean = float(np.sum(np.sin(betas) * np.exp(-alphas**2 / 2)))

    def covariance(p: float) -> float:
        linear_sine = 2 * p * np.sum(alphas * np.cos(betas) * np.exp(-alphas**2 / 2))
        sine_sine = 0.5 * np.sum(np.cos(b_i - b_j) * np.exp(-(a_i**2 + a_j**2 - 2 * a_i * a_j * p) / 2)
                                 - np.cos(b_i + b_j) * np.exp(-(a_i**2 + a_j**2 + 2 * a_i * a_j * p) / 2))
        return float(p + linear_sine + sine_sine - mean**2)

    variance = covariance(1.0) + NOISE_STD**2
    return mean, float(np.sqrt(variance)), covariance(correlation) / variance


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
                 num_eval_examples: int = 2000, num_validation_examples: int = 0):
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
        self._eval_key = _EVAL_KEY
        self._num_held_out = {"test": self._num_eval_examples, "validation": base.validation_size(
            "num_validation_examples", num_validation_examples, self._num_eval_examples)}

    def _rows(self, rng_for_block, rows: slice) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        x_NxD, noise_NxT = base.block_rows(rng_for_block, rows, _draw)
        labels = {task: labels_of(x_NxD, self.task_weights[task], noise_NxT[:, TASK_NAMES.index(task)])
                  .astype(np.float32) for task in self.task_names}
        return x_NxD.astype(np.float32), labels


# --- The tasks this source serves, in the task registry (`mtt_jax.tasks.get`). ---------------------
for _name in MmoeSynthetic.all_task_names:  # mmoe_a1, mmoe_a2, mmoe_b1, ...
    tasks_lib.register(tasks_lib.TaskSpec(_name, "regression", 1, MmoeSynthetic.name,
                                          metrics=("mse", "pearson")))
