"""Data sources by name: ``make_source("multidigits", ["left_digit", "right_digit"], seed=0)``.

Every source follows the contract of ``mtt_jax.data.base`` (batch layouts of DESIGN.md §3). The offline
sources need no downloads: ``multidigits`` (MultiMNIST on sklearn's digits, single-input) and
``seqtasks`` (synthetic token tasks of known relatedness, multi-input).
"""

from __future__ import annotations

import inspect
from typing import Sequence

from mtt_jax.data.base import InputSpec, Source, check_choice
from mtt_jax.data.multidigits import MultiDigits
from mtt_jax.data.seqtasks import SeqTasks

SOURCES: dict[str, type] = {source.name: source for source in (MultiDigits, SeqTasks)}
AVAILABLE_TASKS: dict[str, tuple[str, ...]] = {
    name: source.all_task_names for name, source in SOURCES.items()}


def source_options(name: str) -> tuple[str, ...]:
    """The keyword options that source ``name`` accepts, with their defaults in its constructor."""
    check_choice("data source", name, tuple(SOURCES))
    parameters = inspect.signature(SOURCES[name].__init__).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def make_source(name: str, task_names: Sequence[str], seed: int, **options) -> Source:
    """Builds source ``name`` serving ``task_names`` (in that order) for run seed ``seed``.

    Raises:
        ValueError: one line naming the bad source, task or option and the valid choices.
    """
    valid_options = source_options(name)
    for option in options:
        check_choice(f"option for data source {name!r}:", option, valid_options)
    return SOURCES[name](task_names, seed, **options)


__all__ = ["AVAILABLE_TASKS", "InputSpec", "SOURCES", "Source", "make_source", "source_options"]
