"""Task mixtures for flat batches: mixing rates, and which task and example fills each row.

Rates (normalized to sum to 1 by ``mixing_rates``):

- ``proportional``: the number of train examples ``N_t`` (examples-proportional mixing, Raffel et al.,
  "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer", JMLR 2020, §3.5.2).
- ``temperature``: seqio's ``mixing_rate_num_examples(task, maximum, scale, temperature)``, exactly:
  ``r = N * scale``, then ``r = min(r, maximum)`` when a maximum is given, then ``r = r ** (1 / T)``
  (the cap is applied after the scale and before the temperature, as in seqio's source).
  ``temperature=1`` without a maximum is ``proportional``; T -> infinity tends to ``uniform``.
- ``uniform``: equal rates.
- ``explicit``: the given rates.

Sampling (``sample_task_ids``): each step's batch is filled by systematic sampling: row
``i`` of step ``s`` takes the task whose interval of the cumulative rates holds ``(i + u_s) / B``. So a
task gets ``floor(B r_t)`` or ``ceil(B r_t)`` rows in every batch, never a lucky or unlucky streak.
The offsets ``u_s`` run through the stratified grid ``(j + 1/2) / P`` (P = ``PERIOD`` steps) in an
order shuffled per period by ``(seed, period)``, so over every P steps each task gets its share
``P B r_t`` to within one example. Rows are then shuffled within the step by ``(seed, step)``.

Cycling (``sample_examples``): the example of a row is the task's ``c``-th draw, where ``c`` counts the
task's draws in all earlier steps plus earlier rows of this step; ``c`` runs through passes over the
task's ``N_t`` examples (``base.epoch_indices``: pass ``c // N_t`` is a fresh permutation), so a small
task repeats its data instead of ending the mixture. Because every step's per-task counts are a
function of ``u_s`` alone, ``c`` is computed in closed form from one period's table: the whole thing is
a pure function of ``(seed, step)``, whatever the number of processes.

Training on mixtures (``data.mixture.method`` in a config): `FlatMixture` serves a multi-input source's
train batches as flat batches (layout ``"flat"``): ``inputs [B, ...]``, ``task_id int32[B]`` (index into
the source's ``task_names``), ``labels {task: [B, ...]}`` (zeros on other tasks' rows) and ``mask {task:
f32[B]}`` (1 on the task's rows). The source implements ``flat_batch(step, batch_size, rates, shard)``
and, for ``proportional`` and ``temperature``, ``num_train_examples``. Eval stays multi-input: a
`FlatMixture` serves its source's held-out sets (either split, ``base.SPLITS``) as the source does.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Sequence

import numpy as np

from mtt_jax.data import base

METHODS = ("proportional", "temperature", "uniform", "explicit")
PERIOD = 1024          # steps over which the systematic offsets cover their grid once
_MIXTURE_STREAM = 7    # keys the mixture's generators apart from the sources' own streams


def rate_num_examples(num_examples: int, maximum: float | None = None, temperature: float = 1.0,
                      scale: float = 1.0) -> float:
    """seqio's ``mixing_rate_num_examples``: ``min(N * scale, maximum) ** (1 / temperature)``."""
    if not temperature > 0:
        raise ValueError(f"data.mixture.temperature={temperature} must be > 0")
    rate = float(num_examples) * scale
    if maximum:
        rate = min(rate, float(maximum))
    if temperature != 1.0:
        rate = rate ** (1.0 / temperature)
    return rate


def mixing_rates(num_examples: Sequence[int], method: str = "proportional", *, temperature: float = 1.0,
                 maximum: float | None = None, scale: float = 1.0,
                 rates: Sequence[float] | None = None) -> np.ndarray:
    """``f64[T]`` normalized mixing rates of tasks with ``num_examples`` train examples each; the one
    check of a config's temperature and explicit rates (`mtt_jax.run.config_check` calls it with sizes 1)."""
    base.check_choice("mixing method", method, METHODS)
    num_examples = np.asarray(num_examples, np.float64)
    if method == "proportional":
        raw = num_examples.copy()
    elif method == "temperature":
        raw = np.array([rate_num_examples(n, maximum, temperature, scale) for n in num_examples])
    elif method == "uniform":
        raw = np.ones(len(num_examples))
    else:
        if rates is None or len(rates) != len(num_examples):
            given = tuple(rates) if rates is not None else ()
            raise ValueError(f"explicit mixing needs one rate per task: data.mixture.rates={given} must give "
                             f"one non-negative rate per task ({len(num_examples)}), not all 0")
        raw = np.asarray(rates, np.float64)
    return normalize(raw)


def normalize(rates: Sequence[float]) -> np.ndarray:
    rates = np.asarray(rates, np.float64)
    if rates.ndim != 1 or not len(rates) or np.any(rates < 0) or not np.all(np.isfinite(rates)) \
            or rates.sum() <= 0:
        raise ValueError(f"mixing rates {rates.tolist()} must be finite and not all 0: give one "
                         f"non-negative rate per task ({len(rates)})")
    return rates / rates.sum()


def _offset_grid() -> np.ndarray:
    return (np.arange(PERIOD) + 0.5) / PERIOD


def _tasks_at_offset(rates: np.ndarray, offsets: np.ndarray, batch_size: int) -> np.ndarray:
    """``int32[len(offsets), B]``: the task of row i for each offset u (in row order, before shuffling)."""
    points = (np.arange(batch_size)[None, :] + offsets[:, None]) / batch_size
    tasks = np.searchsorted(np.cumsum(rates), points, side="right")
    # A point past the last cumulative rate (float rounding) belongs to the last task with a rate.
    return np.minimum(tasks, np.flatnonzero(rates > 0)[-1]).astype(np.int32)


@functools.lru_cache(maxsize=16)
def _period_table(rates: tuple[float, ...], batch_size: int) -> np.ndarray:
    """``int64[P, T]``: rows of each task in a step whose offset is grid point j."""
    tasks = _tasks_at_offset(np.asarray(rates), _offset_grid(), batch_size)
    return np.stack([(tasks == t).sum(axis=1) for t in range(len(rates))], axis=1)


def _grid_order(seed: int, period: int) -> np.ndarray:
    return np.random.default_rng([_MIXTURE_STREAM, seed, period]).permutation(PERIOD)


def _step_tasks(rates: np.ndarray, step: int, seed: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(task_id int32[B] in row order, draws of each task before this step int64[T])``."""
    base.check_positive("seed", seed, minimum=0)
    base.check_positive("step", step, minimum=0)
    base.check_positive("batch_size", batch_size)
    table = _period_table(tuple(float(r) for r in rates), batch_size)
    period, offset = divmod(step, PERIOD)
    order = _grid_order(seed, period)
    earlier = period * table.sum(axis=0) + table[order[:offset]].sum(axis=0)
    tasks = _tasks_at_offset(rates, _offset_grid()[order[offset:offset + 1]], batch_size)[0]
    shuffle = np.random.default_rng([_MIXTURE_STREAM, seed, step, 1]).permutation(batch_size)
    return tasks[shuffle], earlier


def sample_task_ids(rates: Sequence[float], step: int, seed: int, batch_size: int,
                    shard: base.Shard = base.FULL) -> np.ndarray:
    """``int32[rows]``: the task of each of this process's rows of the flat batch of ``step``."""
    task_id, _ = _step_tasks(normalize(rates), step, seed, batch_size)
    return task_id[base.shard_rows(batch_size, shard)]


def sample_examples(rates: Sequence[float], num_examples: Sequence[int], step: int, seed: int,
                    batch_size: int, shard: base.Shard = base.FULL) -> tuple[np.ndarray, np.ndarray]:
    """``(task_id int32[rows], example int64[rows])`` of this process's rows of step ``step``.

    A row's example is its task's draw number (draws in earlier steps, plus earlier rows of this step)
    mapped through passes over the task's examples, so small tasks cycle (module docstring).
    """
    rates = normalize(rates)
    if len(num_examples) != len(rates):
        raise ValueError(f"{len(rates)} rates for {len(num_examples)} tasks; give one rate per task")
    task_id, earlier = _step_tasks(rates, step, seed, batch_size)
    rows = base.shard_rows(batch_size, shard)
    example = np.zeros(rows.stop - rows.start, np.int64)
    for t in np.unique(task_id[rows]):
        at = np.flatnonzero(task_id == t)            # rows of task t in this step, in row order
        draw = earlier[t] + np.arange(len(at))
        keep = (at >= rows.start) & (at < rows.stop)
        example[at[keep] - rows.start] = base.epoch_indices(
            (_MIXTURE_STREAM, seed, int(t)), int(num_examples[t]), draw[keep])
    return task_id[rows], example


def needs_sizes(method: str) -> bool:
    return method in ("proportional", "temperature")


def can_mix(source) -> bool:
    """Whether a source (class or instance) serves flat mixture batches: multi-input with ``flat_batch``."""
    return source.layout == "multi" and hasattr(source, "flat_batch")


def has_sizes(source) -> bool:
    """Whether a source (class or instance) knows its tasks' train sizes (``num_train_examples``)."""
    return hasattr(source, "num_train_examples")


def rates_for(source, mixture_config) -> np.ndarray:
    """Normalized rates of ``source``'s tasks from a config's ``data.mixture`` (method, temperature,
    maximum (0: no cap), rates)."""
    method = mixture_config.method
    if needs_sizes(method):
        if not has_sizes(source):
            raise ValueError(f"data.mixture.method={method!r} needs the tasks' train sizes, and source "
                             f"{source.name!r} has none (it generates its data); use uniform or explicit")
        sizes = [source.num_train_examples[task] for task in source.task_names]
    else:
        sizes = [1] * len(source.task_names)
    return mixing_rates(sizes, method, temperature=float(mixture_config.temperature),
                        maximum=float(mixture_config.maximum) or None,
                        rates=tuple(mixture_config.rates) or None)


def flat_rows(task_id: np.ndarray, task_names: Sequence[str],
              example_of: Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]],
              input_shape: tuple[int, ...], input_dtype) -> dict:
    """Assembles a flat batch: ``example_of(t, rows)`` returns ``(inputs, labels)`` of task t for the
    given rows (positions in the batch) of task t."""
    inputs = np.zeros((len(task_id),) + tuple(input_shape), input_dtype)
    labels, mask = {}, {}
    for t, task in enumerate(task_names):
        rows = np.flatnonzero(task_id == t)
        task_inputs, task_labels = example_of(t, rows)
        inputs[rows] = task_inputs
        labels[task] = np.zeros((len(task_id),) + task_labels.shape[1:], task_labels.dtype)
        labels[task][rows] = task_labels
        mask[task] = (task_id == t).astype(np.float32)
    return {"inputs": inputs, "task_id": task_id.astype(np.int32), "labels": labels, "mask": mask}


class FlatMixture:
    """A multi-input source's train batches as flat mixtures with fixed ``rates`` (layout "flat")."""

    layout = "flat"

    def __init__(self, source, rates: Sequence[float]):
        if not can_mix(source):
            raise ValueError(f"data source {source.name!r} cannot serve flat mixture batches (they need a "
                             "multi-input source with flat_batch: glue, seqtasks)")
        self.source, self.rates = source, normalize(rates)
        self.name, self.task_names, self.input_spec = source.name, source.task_names, source.input_spec

    def train_batch(self, step: int, batch_size: int, shard: base.Shard = base.FULL) -> dict:
        return self.source.flat_batch(step, batch_size, self.rates, shard)

    def eval_batches(self, batch_size: int, shard: base.Shard = base.FULL,
                     split: str = "test") -> Iterator[dict]:
        """The source's held-out set ``split``, in its own (multi-input) layout."""
        return self.source.eval_batches(batch_size, shard, split=split)

    def num_examples(self, split: str = "test") -> int:
        return self.source.num_examples(split)

    @property
    def num_eval_examples(self) -> int:
        return self.source.num_eval_examples
