"""The interface every data source implements, and the few helpers they share.

A source serves host batches as numpy dicts in one of the two layouts of DESIGN.md §3 (LibMTL's terms,
Lin & Zhang, "LibMTL: A Python Library for Multi-Task Learning", JMLR 2023):

- ``"single"`` (single-input): every example carries a label for every task.
  ``{"inputs": f32[B, ...], "labels": {task: [B, ...]}, "mask": {task: f32[B]}}``
- ``"multi"`` (multi-input): each task has its own examples, stacked on a leading task axis.
  ``{"inputs": [T, b, ...], "labels": {task: [b, ...]}, "mask": {task: f32[b]}}``

Two rules make runs reproducible and resumable (DESIGN.md §7):

- ``train_batch(step, batch_size)`` is a pure function of ``(seed, step, batch_size)``: it seeds a
  fresh generator from those numbers (``train_rng``) and never keeps iterator state.
- ``eval_batches(batch_size)`` walks a fixed held-out set that does not depend on the run seed, so runs
  with different seeds are scored on the same examples. The last batch is filled up by repeating an
  example, with mask 0 on the filler rows (``padded_index_batches``).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Iterator, Sequence

import numpy as np

LAYOUTS = ("single", "multi")

# First word of every generator key, so that train and eval streams can never share a key.
_TRAIN_STREAM = 0
_EVAL_STREAM = 1


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """Per-example input: ``kind`` "image" with ``shape`` (H, W) or (H, W, C), "tokens" with ``shape``
    (L,), or "vector" with ``shape`` (F,) (features; the model reads chunks of ``model.patch_size``)."""

    kind: str
    shape: tuple[int, ...]
    vocab_size: int = 0  # tokens only; id 0 is padding


class Source(abc.ABC):
    """A named, seeded supplier of train batches and of one fixed eval set.

    Subclasses set the class attributes ``name``, ``layout`` and ``all_task_names`` (every task the
    source can serve) and, per instance, ``task_names`` (the requested tasks, in order) and
    ``input_spec``.
    """

    name: str
    layout: str
    all_task_names: tuple[str, ...]
    task_names: tuple[str, ...]
    input_spec: InputSpec

    @abc.abstractmethod
    def train_batch(self, step: int, batch_size: int) -> dict:
        """The train batch of ``step``; identical for identical ``(seed, step, batch_size)``."""

    @abc.abstractmethod
    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        """The fixed eval set in batches of exactly ``batch_size`` rows (last one padded, mask 0)."""

    @property
    @abc.abstractmethod
    def num_eval_examples(self) -> int:
        """Eval examples per task: the number of mask-1 rows over all of ``eval_batches``."""


def check_choice(what: str, value: object, choices: Sequence[str]) -> None:
    """Raises a one-line ValueError naming ``value`` and the valid ``choices`` if it is not one."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(choices)}")


def check_task_names(source_name: str, task_names: Sequence[str],
                     all_task_names: Sequence[str]) -> tuple[str, ...]:
    """Validates a task selection (non-empty, known, no repeats) and returns it as a tuple."""
    if isinstance(task_names, str):
        task_names = (task_names,)
    task_names = tuple(task_names)
    if not task_names:
        raise ValueError(f"no tasks requested from source {source_name!r}; "
                         f"valid choices: {', '.join(all_task_names)}")
    for task in task_names:
        check_choice(f"task for source {source_name!r}:", task, all_task_names)
    if len(set(task_names)) != len(task_names):
        raise ValueError(f"task names repeat in {task_names}; name each task once")
    return task_names


def check_positive(what: str, value: int, minimum: int = 1) -> int:
    """Raises a one-line ValueError unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def train_rng(seed: int, step: int, *stream: int) -> np.random.Generator:
    """A fresh generator keyed by ``(seed, step, *stream)``: the train data is a function of them."""
    check_positive("seed", seed, minimum=0)
    check_positive("step", step, minimum=0)
    return np.random.default_rng([_TRAIN_STREAM, seed, step, *stream])


def eval_rng(*stream: int) -> np.random.Generator:
    """A generator for a fixed eval set: keyed by ``stream`` only, never by the run seed."""
    return np.random.default_rng([_EVAL_STREAM, *stream])


def padded_index_batches(num_examples: int,
                         batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(indices int64[batch_size], mask f32[batch_size])`` covering ``range(num_examples)``.

    Every batch has exactly ``batch_size`` rows; rows past the end repeat the last example and get
    mask 0, so ``sum(mask)`` over all batches is ``num_examples``.
    """
    check_positive("batch_size", batch_size)
    for start in range(0, num_examples, batch_size):
        positions = np.arange(start, start + batch_size)
        mask = (positions < num_examples).astype(np.float32)
        yield np.minimum(positions, num_examples - 1), mask
