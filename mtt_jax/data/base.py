"""The interface every data source implements, and the few helpers they share.

A source serves host batches as numpy dicts in one of the two layouts (LibMTL's terms,
Lin & Zhang, "LibMTL: A Python Library for Multi-Task Learning", JMLR 2023):

- ``"single"`` (single-input): every example carries a label for every task.
  ``{"inputs": f32[B, ...], "labels": {task: [B, ...]}, "mask": {task: f32[B]}}``
- ``"multi"`` (multi-input): each task has its own examples, stacked on a leading task axis.
  ``{"inputs": [T, b, ...], "labels": {task: [b, ...]}, "mask": {task: f32[b]}}``

Three rules make runs reproducible, resumable and independent of the number of hosts:

- ``train_batch(step, batch_size)`` is a pure function of ``(seed, step, batch_size)``: it seeds a
  fresh generator from those numbers (``train_rng``) and never keeps iterator state.
- ``train_batch(step, batch_size, shard=(index, count))`` returns rows
  ``[index * batch_size // count, (index + 1) * batch_size // count)`` of that global batch (of every
  task's sub-batch in the multi-input layout), equal to slicing ``shard=(0, 1)`` exactly. Sources build
  only the slice where they can: they draw the global list of example indices (cheap) and load or render
  only the slice's examples, or key generators by blocks of rows (``block_rows``).
- ``eval_batches(batch_size, split=...)`` walks one of two fixed held-out sets (``SPLITS``) that do not
  depend on the run seed, so runs with different seeds are scored on the same examples. The last batch
  is filled up by repeating an example, with mask 0 on the filler rows (``padded_index_batches``).
  ``shard`` slices each eval batch the same way.

The two held-out splits, so that choices are made on one and results reported once on the other:

- ``"test"`` (the default): the set every number is reported on; what ``eval_batches(batch_size)``
  always served.
- ``"validation"``: for selecting hyper-parameters, checkpoints and methods; disjoint from test and, by
  default, as large. Generators draw it from a stream of its own (``held_out_rng``: its keys start with
  a word no train or test key starts with); finite datasets use an official labelled split where one is
  not already the test split, and otherwise hold a fixed, seed-independent part of the train split out
  of training (``carve``). Each source's docstring says which.

A TFDS-backed source whose dataset is not on disk raises ``DatasetNotPreparedError`` when it is built,
with one line that gives the command that prepares it.
"""

from __future__ import annotations

import abc
import functools
from typing import Callable, Iterator, Sequence

import numpy as np

from mtt_jax.specs import LAYOUTS, InputSpec, example_axis  # (re-exported: the sources' contract)

# First word of every generator key, so that train, test and validation streams can never share a key.
_TRAIN_STREAM = 0
_EVAL_STREAM = 1         # the test split (named before there were two held-out splits)
_VALIDATION_STREAM = 2

SPLITS = ("validation", "test")  # the held-out splits of every source; "test" is the default

Shard = tuple[int, int]  # (index of this process, number of processes)
FULL: Shard = (0, 1)
BLOCK_ROWS = 32  # rows per generator in ``block_rows``


class DatasetNotPreparedError(ValueError):
    """A dataset the source needs is not on disk; the message is one line with the command to build it."""


class Source(abc.ABC):
    """A named, seeded supplier of train batches and of two fixed held-out sets (``SPLITS``).

    Subclasses set the class attributes ``name``, ``layout`` and ``all_task_names`` (every task the
    source can serve) and, per instance, ``task_names`` (the requested tasks, in order) and
    ``input_spec``. ``aligned_rows`` (multi-input only) is True where row b of every task's sub-batch is
    the same instance, in train and held-out batches alike, so a model may combine a row across tasks
    (``model.task_attention="aligned"``); False (the default) where tasks' rows are unrelated.
    """

    name: str
    layout: str
    all_task_names: tuple[str, ...]
    task_names: tuple[str, ...]
    input_spec: InputSpec
    aligned_rows: bool = False  # row b of every task's sub-batch is the same instance (multi-input)

    @abc.abstractmethod
    def train_batch(self, step: int, batch_size: int, shard: Shard = FULL) -> dict:
        """This process's rows (``shard_rows``) of the global train batch of ``step``; identical for
        identical ``(seed, step, batch_size, shard)``."""

    @abc.abstractmethod
    def eval_batches(self, batch_size: int, shard: Shard = FULL, split: str = "test") -> Iterator[dict]:
        """The fixed held-out set ``split`` (one of ``SPLITS``) in global batches of exactly
        ``batch_size`` rows (last one padded, mask 0), each cut to this process's rows."""

    @abc.abstractmethod
    def num_examples(self, split: str = "test") -> int:
        """Examples per task of held-out set ``split``: the mask-1 rows over all of its ``eval_batches``
        (multi-input: of its largest task)."""

    @property
    def num_eval_examples(self) -> int:
        """``num_examples("test")``."""
        return self.num_examples("test")


def check_choice(what: str, value: object, choices: Sequence[str]) -> None:
    """Raises a one-line ValueError naming ``value`` and the valid ``choices`` if it is not one."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(choices)}")


def check_split(split: str) -> str:
    """Raises a one-line ValueError unless ``split`` is one of ``SPLITS``."""
    check_choice("split", split, SPLITS)
    return split


def check_task_names(source_name: str, task_names: Sequence[str],
                     all_task_names: Sequence[str]) -> tuple[str, ...]:
    """Validates a task selection (non-empty, known, no repeats) and returns it as a tuple; the one
    check of a config's ``tasks`` (`mtt_jax.run.config_check` calls it too)."""
    if isinstance(task_names, str):
        task_names = (task_names,)
    task_names = tuple(task_names)
    choices = ", ".join(all_task_names)
    if not task_names:
        raise ValueError(f"tasks is empty: no tasks requested from data.source={source_name!r}; "
                         f"choose from: {choices}")
    for task in task_names:
        if task not in all_task_names:
            raise ValueError(f"unknown task {task!r} for data.source={source_name!r}; choose from: {choices}")
    if len(set(task_names)) != len(task_names):
        raise ValueError(f"tasks={task_names} lists a task twice; name each task once")
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
    """A generator for the fixed test set: keyed by ``stream`` only, never by the run seed."""
    return np.random.default_rng([_EVAL_STREAM, *stream])


def held_out_rng(split: str, *stream: int) -> np.random.Generator:
    """A generator for the fixed held-out set ``split``, keyed by ``stream`` only: for ``"test"``
    `eval_rng` (the eval set as it always was), for ``"validation"`` a stream whose keys no train or test
    key shares, so the same ``stream`` gives independent draws."""
    first_word = _EVAL_STREAM if check_split(split) == "test" else _VALIDATION_STREAM
    return np.random.default_rng([first_word, *stream])


def validation_size(option: str, value: int, default: int) -> int:
    """The validation split's size from a source option: ``value``, or ``default`` (the test split's
    size) when it is 0; a one-line ValueError unless ``value`` is an integer >= 0."""
    return check_positive(option, value, minimum=0) or default


def carve(num_examples: int, num_held_out: int, *key: int) -> tuple[np.ndarray, np.ndarray]:
    """Holds ``min(num_held_out, num_examples // 2)`` examples of a finite train split out of training:
    ``(held_out int64[n] in a fixed order, kept int64[num_examples - n] sorted)``.

    ``held_out`` is the head of a permutation keyed by ``key`` and the split's size, never by the run
    seed, so every run holds out the same examples, and a smaller validation set is a prefix of a
    larger one. At most half of the split is held out, so a small split keeps its training data.
    """
    check_positive("num_held_out", num_held_out)
    count = min(num_held_out, num_examples // 2)
    if count < 1:
        raise ValueError(f"a train split of {num_examples} examples is too small to hold a validation "
                         "split out of it (it needs at least 2)")
    permutation = np.random.default_rng([_VALIDATION_STREAM, *key, num_examples]).permutation(num_examples)
    return permutation[:count], np.sort(permutation[count:])


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


def shard_rows(batch_size: int, shard: Shard = FULL) -> slice:
    """Rows ``[index * batch_size // count, (index + 1) * batch_size // count)`` of a global batch."""
    check_positive("batch_size", batch_size)
    if (not isinstance(shard, (tuple, list)) or len(shard) != 2
            or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shard)
            or not 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
    index, count = int(shard[0]), int(shard[1])
    return slice(index * batch_size // count, (index + 1) * batch_size // count)


def slice_batch(batch: dict, rows: slice, layout: str) -> dict:
    """Rows ``rows`` of a batch: of ``inputs`` (on their `example_axis`, behind the multi-input task axis),
    labels, masks."""
    def cut(field: str, leaf: np.ndarray) -> np.ndarray:
        return leaf[(slice(None),) * example_axis(field, layout) + (rows,)]
    return {"inputs": cut("inputs", batch["inputs"]),
            "labels": {task: cut("labels", labels) for task, labels in batch["labels"].items()},
            "mask": {task: cut("mask", mask) for task, mask in batch["mask"].items()}}


def block_rows(rng_for_block: Callable[[int], np.random.Generator], rows: slice,
               draw: Callable[[np.random.Generator, int], tuple[np.ndarray, ...]],
               block: int = BLOCK_ROWS) -> tuple[np.ndarray, ...]:
    """Rows ``rows`` of a generated table whose rows come in blocks of ``block``, each block from its own
    generator ``rng_for_block(block_index)``; ``draw(rng, block)`` returns arrays with ``block`` rows.

    Row ``i`` depends only on its block's key, so any slice is built without the rows before it, and a
    batch of ``B`` rows is the first ``B`` rows of any larger batch.
    """
    if rows.stop <= rows.start:
        empty = draw(rng_for_block(0), block)
        return tuple(a[:0] for a in empty)
    first, last = rows.start // block, (rows.stop - 1) // block
    parts = [draw(rng_for_block(b), block) for b in range(first, last + 1)]
    joined = tuple(np.concatenate(arrays) for arrays in zip(*parts))
    offset = first * block
    return tuple(a[rows.start - offset:rows.stop - offset] for a in joined)


def epoch_indices(key: Sequence[int], num_examples: int, positions: np.ndarray) -> np.ndarray:
    """Example indices at stream ``positions``: pass ``e = p // N`` over the data is a fresh permutation
    of ``range(N)`` keyed by ``(*key, e)``, so every example is seen once per pass (epochs without state).
    """
    positions = np.asarray(positions, np.int64)
    out = np.empty(positions.shape, np.int64)
    epochs = positions // num_examples
    for epoch in np.unique(epochs):
        at = epochs == epoch
        permutation = _permutation(tuple(int(k) for k in key), num_examples, int(epoch))
        out[at] = permutation[positions[at] % num_examples]
    return out


@functools.lru_cache(maxsize=64)
def _permutation(key: tuple[int, ...], num_examples: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([_TRAIN_STREAM, *key, epoch]).permutation(num_examples)


def check_labels(where: str, labels: np.ndarray, kind: str, num_classes: int) -> None:
    """Raises a one-line ValueError when labels do not fit a task of ``kind`` with ``num_classes``."""
    if kind == "regression":
        if not np.all(np.isfinite(labels)):
            raise ValueError(f"{where}: regression labels must be finite; found "
                             f"{labels[~np.isfinite(labels)][:3].tolist()}")
        return
    bad = (labels < 0) | (labels >= num_classes) | (labels != np.round(labels))
    if np.any(bad):
        raise ValueError(f"{where}: labels must be integers in [0, {num_classes}) for this {kind} task; "
                         f"found {np.unique(labels[bad])[:5].tolist()} in {int(bad.sum())} examples")


class VectorGenerator(Source):
    """A single-input source of synthetic vectors: subclasses define ``_rows(rng_for_block, rows)`` ->
    ``(inputs, {task: labels})`` drawn block by block (`block_rows`), the key ``_eval_key`` of their
    held-out sets and their sizes ``_num_held_out = {split: rows}``. Held-out set ``split`` has the rows
    of the generators ``held_out_rng(split, _eval_key, block)``, drawn on first use."""

    _eval_key: int
    _num_held_out: dict[str, int]

    def train_batch(self, step: int, batch_size: int, shard: Shard = FULL) -> dict:
        rows = shard_rows(batch_size, shard)
        check_positive("step", step, minimum=0)
        inputs, labels = self._rows(lambda block: train_rng(self.seed, step, block), rows)
        return vector_batch(inputs, labels, np.ones(len(inputs), np.float32))

    def eval_batches(self, batch_size: int, shard: Shard = FULL, split: str = "test") -> Iterator[dict]:
        part = shard_rows(batch_size, shard)
        inputs, labels = self.held_out(split)
        for rows, mask in padded_index_batches(self.num_examples(split), batch_size):
            rows, mask = rows[part], mask[part]
            yield vector_batch(inputs[rows], {t: y[rows] for t, y in labels.items()}, mask)

    def num_examples(self, split: str = "test") -> int:
        return self._num_held_out[check_split(split)]

    def held_out(self, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(inputs, {task: labels})`` of held-out set ``split``, drawn once."""
        cache = self.__dict__.setdefault("_held_out_sets", {})
        if split not in cache:
            cache[split] = self._rows(lambda block: held_out_rng(split, self._eval_key, block),
                                      slice(0, self.num_examples(split)))
        return cache[split]


def multi_input_eval_batches(inputs_TxN: np.ndarray, labels: dict[str, np.ndarray], batch_size: int,
                             shard: Shard = FULL) -> Iterator[dict]:
    """`Source.eval_batches` of a multi-input held-out set: ``inputs_TxN`` (row n of every task, on the
    second axis) and ``{task: labels [N, ...]}``, in padded batches (`padded_index_batches`), each cut to
    this process's rows."""
    part = shard_rows(batch_size, shard)
    for rows, mask in padded_index_batches(inputs_TxN.shape[1], batch_size):
        rows, mask = rows[part], mask[part]
        yield {"inputs": inputs_TxN[:, rows], "labels": {task: y[rows] for task, y in labels.items()},
               "mask": {task: mask.copy() for task in labels}}


def vector_batch(inputs: np.ndarray, labels: dict[str, np.ndarray], mask: np.ndarray) -> dict:
    return {"inputs": inputs, "labels": labels, "mask": {task: mask.copy() for task in labels}}


def epoch_positions(seed: int, num_examples: int, step: int, batch_size: int,
                    shard: Shard = FULL) -> np.ndarray:
    """Example indices behind rows ``shard`` of the batch of ``step``: passes over the data, each a
    permutation keyed by the seed (`epoch_indices`)."""
    rows = shard_rows(batch_size, shard)
    check_positive("step", step, minimum=0)
    positions = step * batch_size + np.arange(rows.start, rows.stop)
    return epoch_indices((seed,), num_examples, positions)
