"""The regression toy of GradNorm (single-input, ``vector`` inputs): tasks of very different scales.

Chen et al., "GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks",
ICML 2018, §4: T regression tasks ``f_i(x) = sigma_i tanh((B + eps_i) x)``, tanh elementwise, inputs of
dimension 250 and outputs of dimension 100; ``B`` (shared by all tasks) and ``eps_i`` (task-specific) are
fixed matrices with entries drawn i.i.d. from N(0, 10) and N(0, 3.5). The scales ``sigma_i`` make the
task losses differ by orders of magnitude, which is what loss balancing must undo.

Choices the paper leaves open, or that the contract here forces:

- N(0, 10) and N(0, 3.5) are read as variances (the N(mean, variance) convention): standard deviations
  sqrt(10) and sqrt(3.5). The input distribution is not given; ``x ~ N(0, I_250)``. With these scales
  ``(B + eps_i) x`` has standard deviation about sqrt(250 * 13.5) ~ 58, so tanh is mostly saturated and
  targets sit near ``+-sigma_i``, as the paper's construction implies.
- One scalar target per example and task (the batch contract): task ``i``'s target is output coordinate
  ``OUTPUT_INDEX`` (0) of the paper's 100-dimensional ``f_i``. The paper's loss is the mean over the 100
  coordinates of the squared error, each coordinate an identically distributed copy of this one, so the
  per-task loss scale (proportional to ``sigma_i^2``) and the shared (``B``) versus task-specific
  (``eps_i``) structure are kept; what is lost is only the averaging over 100 coordinates.
- No label noise (the paper adds none).

``sigmas`` (default (1, 100)) gives task ``toy_i`` its scale ``sigmas[i]``; ``eps_i`` is keyed by i alone,
so a task's data never depends on which other tasks are requested. Train rows come in blocks keyed by
``(seed, step, block)``. Held-out sets (``base.SPLITS``), fixed for every run seed: test,
``num_eval_examples`` rows from the eval stream; validation, ``num_validation_examples`` rows (0: as
many as test) from the validation stream of the same key (``base.held_out_rng``), fresh draws never
shared with test or train. Model: 250 features; ``model.patch_size = 10`` reads them as 25 tokens of 10.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from mtt_jax import tasks as tasks_lib
from mtt_jax.data import base

INPUT_DIM = 250
OUTPUT_DIM = 100
OUTPUT_INDEX = 0
B_VARIANCE = 10.0
EPS_VARIANCE = 3.5
MAX_TASKS = 10
TASK_NAMES = tuple(f"toy_{i}" for i in range(MAX_TASKS))
_CONSTANTS_KEY = 2018
_EVAL_KEY = 2019


@functools.lru_cache(maxsize=None)
def task_matrix(task: int) -> np.ndarray:
    """``B + eps_task`` as ``f64[OUTPUT_DIM, INPUT_DIM]``; ``B`` is shared, ``eps_task`` is the task's own."""
    shared = np.sqrt(B_VARIANCE) * np.random.default_rng([_CONSTANTS_KEY]).standard_normal(
        (OUTPUT_DIM, INPUT_DIM))
    own = np.sqrt(EPS_VARIANCE) * np.random.default_rng([_CONSTANTS_KEY, 1 + task]).standard_normal(
        (OUTPUT_DIM, INPUT_DIM))
    return shared + own


def targets(x_NxD: np.ndarray, task: int, sigma: float) -> np.ndarray:
    """``sigma * tanh((B + eps_task) x)[OUTPUT_INDEX]`` for each row of ``x``."""
    return sigma * np.tanh(x_NxD.astype(np.float64) @ task_matrix(task)[OUTPUT_INDEX])


def _draw(rng: np.random.Generator, num_rows: int) -> tuple[np.ndarray]:
    return (rng.standard_normal((num_rows, INPUT_DIM)),)


class GradNormToy(base.VectorGenerator):
    """GradNorm's toy regression tasks ``toy_i``, scaled by ``sigmas[i]``."""

    name = "gradnorm_toy"
    layout = "single"
    all_task_names = TASK_NAMES

    def __init__(self, task_names: Sequence[str], seed: int, *,
                 sigmas: Sequence[float] = (1.0, 100.0), num_eval_examples: int = 2000,
                 num_validation_examples: int = 0):
        self.task_names = base.check_task_names(self.name, task_names, self.all_task_names)
        self.seed = base.check_positive("seed", seed, minimum=0)
        self.sigmas = tuple(float(s) for s in np.atleast_1d(sigmas))
        if not self.sigmas or len(self.sigmas) > MAX_TASKS or min(self.sigmas) <= 0:
            raise ValueError(f"sigmas must be 1 to {MAX_TASKS} positive scales, got {sigmas!r}")
        for task in self.task_names:
            if TASK_NAMES.index(task) >= len(self.sigmas):
                raise ValueError(f"task {task!r} has no scale in sigmas={self.sigmas}; valid choices: "
                                 f"{', '.join(TASK_NAMES[:len(self.sigmas)])}")
        self._num_eval_examples = base.check_positive("num_eval_examples", num_eval_examples)
        self.input_spec = base.InputSpec(kind="vector", shape=(INPUT_DIM,))
        self._eval_key = _EVAL_KEY
        self._num_held_out = {"test": self._num_eval_examples, "validation": base.validation_size(
            "num_validation_examples", num_validation_examples, self._num_eval_examples)}

    def sigma(self, task: str) -> float:
        return self.sigmas[TASK_NAMES.index(task)]

    def _rows(self, rng_for_block, rows: slice) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        (x_NxD,) = base.block_rows(rng_for_block, rows, _draw)
        labels = {task: targets(x_NxD, TASK_NAMES.index(task), self.sigma(task)).astype(np.float32)
                  for task in self.task_names}
        return x_NxD.astype(np.float32), labels


# --- The tasks this source serves, in the task registry (`mtt_jax.tasks.get`). ---------------------
for _name in GradNormToy.all_task_names:  # toy_0, toy_1, ...
    tasks_lib.register(tasks_lib.TaskSpec(_name, "regression", 1, GradNormToy.name,
                                          metrics=("mse", "pearson")))
