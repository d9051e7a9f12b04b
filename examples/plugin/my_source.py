"""A data source from outside the library, with the two tasks it serves: ``noisy_sums``.

Single-input, ``vector`` inputs: ``x ~ N(0, I_F)`` with ``F = num_features`` (default 8), and per example

- ``sum_sign`` (classification, 2 classes): whether ``sum_i x_i + noise * e > 0``;
- ``half_sum`` (regression): ``sum_{i < F/2} x_i + noise * e'``;

with ``e, e' ~ N(0, 1)``. The tasks share half of their signal, so they help each other a little. It
builds on `mtt_jax.data.base.VectorGenerator`, which keeps the source contract (train batches a pure
function of ``(seed, step)``, drawn in row blocks so any process's slice is built alone; fixed held-out
sets, independent of the run seed). Importing this module registers the source and its tasks.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

import mtt_jax
from mtt_jax.data import base

_EVAL_KEY = 4242  # keys the held-out sets: fixed for every run seed


class NoisySums(base.VectorGenerator):
    """``sum_sign`` and ``half_sum`` of Gaussian feature vectors; see the module docstring."""

    name = "noisy_sums"
    layout = "single"
    all_task_names = ("sum_sign", "half_sum")

    def __init__(self, task_names: Sequence[str], seed: int, *, num_features: int = 8, noise: float = 0.5,
                 num_eval_examples: int = 512):
        self.task_names = base.check_task_names(self.name, task_names, self.all_task_names)
        self.seed = base.check_positive("seed", seed, minimum=0)
        self.num_features = base.check_positive("num_features", num_features, minimum=2)
        if not noise >= 0:
            raise ValueError(f"noise={noise!r} must be >= 0")
        self.noise = float(noise)
        self.input_spec = base.InputSpec(kind="vector", shape=(self.num_features,))
        self._eval_key = _EVAL_KEY
        n = base.check_positive("num_eval_examples", num_eval_examples)
        self._num_held_out = {"test": n, "validation": n}

    def _draw(self, rng: np.random.Generator, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.standard_normal((num_rows, self.num_features)), rng.standard_normal((num_rows, 2))

    def _rows(self, rng_for_block, rows: slice) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        x_NxF, e_Nx2 = base.block_rows(rng_for_block, rows, self._draw)
        labels = {"sum_sign": (x_NxF.sum(1) + self.noise * e_Nx2[:, 0] > 0).astype(np.int32),
                  "half_sum": (x_NxF[:, :self.num_features // 2].sum(1)
                               + self.noise * e_Nx2[:, 1]).astype(np.float32)}
        return x_NxF.astype(np.float32), {task: labels[task] for task in self.task_names}


mtt_jax.register_source("noisy_sums", NoisySums, tasks=[
    mtt_jax.TaskSpec("sum_sign", "classification", num_classes=2),
    mtt_jax.TaskSpec("half_sum", "regression", metrics=("mse", "pearson")),
])
