"""Retrieval: task-selective retrieval from one token sequence (single-input layout).

A benchmark with a known answer to "when does conditioning the trunk on the task (a task encoder, task
attention) help?". Every example is one sequence; task t asks for one group's content, so what a task
needs is a small, task-specific part of what the sequence holds.

Vocabulary: ``G`` groups (``num_groups``) of ``V`` values (``num_values``); the token of group g and
value v is ``1 + g V + v`` (``vocab_size = 1 + G V``; id 0 is padding and never generated).

Generation of one sequence of length ``L`` (``length``, a multiple of G): every group appears exactly
``n = L / G`` times (so every group is present in every sequence), at positions given by a uniformly
random arrangement of that multiset; every token's value is i.i.d. uniform on ``0..V-1``. No padding.

Tasks ``retrieve_0 ... retrieve_{T-1}`` (``T = num_tasks <= G``): task t's label is the largest value
among group t's n tokens (V classes). Groups T..G-1 are distractors that no task queries.

What it tests: a task-agnostic pooled state must hold the answer of every queried group, T values of V
each (about ``V T`` dimensions, one-hot); a state conditioned on the task needs only its group's (``V``
dimensions). Under a width bottleneck (``model.d_model`` well below ``V T``), task conditioning should
matter; with a wide trunk, both suffice. (At the defaults: V T = 64 against V = 16.)

Known accuracies (`reference_accuracies`): Bayes 1.0 for every task (the label is a function of the
input). The label's distribution is exact: ``P(max = v) = ((v + 1)^n - v^n) / V^n``, so the trivial
(majority-class) predictor always says V - 1 and scores ``1 - ((V - 1) / V)^n``: at the defaults
(G = 8, V = 16, L = 32, n = 4) ``1 - (15/16)^4 = 0.2275``.

Head width: the task registry holds one head width per task, so the tasks are registered with
``MAX_VALUES`` = 16 classes, the largest ``num_values``; with ``num_values < 16`` classes V..15 never
occur (macro-F1 counts only classes that occur in labels or predictions).

Train rows come in blocks keyed by ``(seed, step, block)`` (``base.block_rows``). Held-out sets
(``base.SPLITS``), fixed for every run seed: test, ``num_eval_examples`` rows from the eval stream of
``_EVAL_KEY``; validation, ``num_validation_examples`` rows (0: as many as test) from the validation
stream of the same key (``base.held_out_rng``), fresh draws never shared with test or train (at the
defaults a sequence repeats with probability far below 1e-30).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mtt_jax import tasks as tasks_lib
from mtt_jax.data import base

MAX_GROUPS = 16
MAX_VALUES = 16
TASK_NAMES = tuple(f"retrieve_{t}" for t in range(MAX_GROUPS))
_EVAL_KEY = 2033


def token_group(tokens: np.ndarray, num_values: int) -> np.ndarray:
    """Group ``(t - 1) // V`` of content tokens."""
    return (tokens - 1) // num_values


def token_value(tokens: np.ndarray, num_values: int) -> np.ndarray:
    """Value ``(t - 1) % V`` of content tokens."""
    return (tokens - 1) % num_values


def sample_sequences(rng: np.random.Generator, num_sequences: int, num_groups: int, num_values: int,
                     length: int) -> np.ndarray:
    """Draws ``int32[N, length]`` sequences as the module docstring describes."""
    per_group = length // num_groups
    multiset_NxL = np.tile(np.repeat(np.arange(num_groups), per_group), (num_sequences, 1))
    group_NxL = rng.permuted(multiset_NxL, axis=1)
    value_NxL = rng.integers(0, num_values, size=(num_sequences, length))
    return (1 + group_NxL * num_values + value_NxL).astype(np.int32)


def group_maxima(tokens_NxL: np.ndarray, num_values: int, group: int) -> np.ndarray:
    """``int32[N]``: the largest value among group ``group``'s tokens (-1 where the group is absent)."""
    in_group = token_group(tokens_NxL, num_values) == group
    return np.where(in_group, token_value(tokens_NxL, num_values), -1).max(axis=1).astype(np.int32)


def label_distribution(num_values: int, tokens_per_group: int) -> np.ndarray:
    """``f64[V]``: exact ``P(label = v) = ((v + 1)^n - v^n) / V^n``, the maximum of n i.i.d. uniform
    values on ``0..V-1``."""
    v = np.arange(num_values, dtype=np.float64)
    return ((v + 1) ** tokens_per_group - v ** tokens_per_group) / float(num_values) ** tokens_per_group


def reference_accuracies(num_values: int, tokens_per_group: int) -> dict[str, float]:
    """Every task's ``{"bayes": 1.0, "trivial": majority-class accuracy}``, exact (module docstring)."""
    return {"bayes": 1.0, "trivial": float(label_distribution(num_values, tokens_per_group).max())}


class Retrieval(base.VectorGenerator):
    """Task-selective retrieval: ``retrieve_t`` is the largest value of group t's tokens (the rows are
    token sequences; `base.VectorGenerator`'s block machinery does not care what a row holds)."""

    name = "retrieval"
    layout = "single"
    all_task_names = TASK_NAMES

    def __init__(self, task_names: Sequence[str], seed: int, *, num_tasks: int = 4, num_groups: int = 8,
                 num_values: int = 16, length: int = 32, num_eval_examples: int = 2048,
                 num_validation_examples: int = 0):
        self.task_names = base.check_task_names(self.name, task_names, self.all_task_names)
        self.seed = base.check_positive("seed", seed, minimum=0)
        self.num_groups = base.check_positive("num_groups", num_groups)
        if self.num_groups > MAX_GROUPS:
            raise ValueError(f"num_groups must be at most {MAX_GROUPS}, got {num_groups}")
        self.num_tasks = base.check_positive("num_tasks", num_tasks)
        if self.num_tasks > self.num_groups:
            raise ValueError(f"num_tasks={num_tasks} exceeds num_groups={num_groups}: each task queries "
                             "its own group")
        self.num_values = base.check_positive("num_values", num_values, minimum=2)
        if self.num_values > MAX_VALUES:
            raise ValueError(f"num_values must be at most {MAX_VALUES} (the tasks' head width), "
                             f"got {num_values}")
        self.length = base.check_positive("length", length)
        if self.length % self.num_groups:
            raise ValueError(f"length={length} is not a multiple of num_groups={num_groups}: every group "
                             "appears length / num_groups times")
        for task in self.task_names:
            if TASK_NAMES.index(task) >= self.num_tasks:
                raise ValueError(f"task {task!r} is not served with num_tasks={num_tasks}; valid choices: "
                                 f"{', '.join(TASK_NAMES[:self.num_tasks])}")
        num_test = base.check_positive("num_eval_examples", num_eval_examples)
        self._eval_key = _EVAL_KEY
        self._num_held_out = {"test": num_test, "validation": base.validation_size(
            "num_validation_examples", num_validation_examples, num_test)}
        self.input_spec = base.InputSpec(kind="tokens", shape=(self.length,),
                                         vocab_size=1 + self.num_groups * self.num_values)

    @property
    def tokens_per_group(self) -> int:
        return self.length // self.num_groups

    def reference_accuracies(self) -> dict[str, dict[str, float]]:
        """``{task: {"bayes", "trivial"}}`` of this source's options (`reference_accuracies`)."""
        accuracies = reference_accuracies(self.num_values, self.tokens_per_group)
        return {task: dict(accuracies) for task in self.task_names}

    def _rows(self, rng_for_block, rows: slice) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        draw = lambda rng, count: (sample_sequences(rng, count, self.num_groups, self.num_values,
                                                    self.length),)
        (tokens_NxL,) = base.block_rows(rng_for_block, rows, draw)
        labels = {task: group_maxima(tokens_NxL, self.num_values, TASK_NAMES.index(task))
                  for task in self.task_names}
        return tokens_NxL, labels


# --- The tasks this source serves, in the task registry (`mtt_jax.tasks.get`). ---------------------
for _name in Retrieval.all_task_names:
    tasks_lib.register(tasks_lib.TaskSpec(_name, "classification", MAX_VALUES, Retrieval.name))
