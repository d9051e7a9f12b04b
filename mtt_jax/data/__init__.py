"""Data sources by name: ``make_source("multidigits", ["left_digit", "right_digit"], seed=0)``.

Every source follows the contract of ``mtt_jax.data.base`` (the two batch layouts, train batches
that are pure functions of ``(seed, step)`` and can be cut into per-process slices).

Offline, embedded (no download):

- ``multidigits``: MultiMNIST on scikit-learn's 8x8 digits (single-input, image); ``overlap="heavy"``:
  half of each digit covered by the other, plus pixel noise;
- ``seqtasks``: synthetic token tasks of known relatedness (multi-input, tokens);
- ``mmoe_synthetic``: Ma et al. (2018)'s regression pairs with controlled correlation (single-input,
  vector);
- ``gradnorm_toy``: Chen et al. (2018)'s regression tasks of different scales (single-input, vector);
- ``retrieval``: task-selective retrieval, task t reads one group of a token sequence (single-input,
  tokens; a benchmark for task conditioning under a width bottleneck);
- ``multiview``: tasks with aligned noisy views of one latent class, one view pure noise (multi-input,
  tokens, ``aligned_rows``; ``shuffle_rows=True`` is its negative control).

From TensorFlow Datasets (prepared under ``data.options.data_dir``; preprocessed arrays cached there):

- ``glue``: the nine GLUE tasks (multi-input, tokens);
- ``multimnist``: Sener & Koltun's MultiMNIST from ``mnist`` (single-input, image);
- ``celeba``: 40 CelebA attributes from ``celeb_a`` (single-input, RGB image).

``mixtures`` holds mixing rates and the flat-batch sampler; ``tokenizer`` the text tokenizers.

Each source module registers the tasks it serves in `mtt_jax.tasks`, so importing this package (any
module of it) fills the task registry that ``mtt_jax.tasks.get`` reads. A source from outside the package
is added with `register_source` (``mtt_jax.register_source``; docs/extending.md), with its tasks.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Iterable, Sequence

from mtt_jax import tasks as tasks_lib
from mtt_jax.data.base import DatasetNotPreparedError, InputSpec, Source, check_choice
from mtt_jax.data.celeba import CelebA
from mtt_jax.data.glue import Glue
from mtt_jax.data.gradnorm_toy import GradNormToy
from mtt_jax.data.mmoe_synthetic import MmoeSynthetic
from mtt_jax.data.multidigits import MultiDigits
from mtt_jax.data.multimnist_tfds import MultiMnist
from mtt_jax.data.multiview import MultiView
from mtt_jax.data.retrieval import Retrieval
from mtt_jax.data.seqtasks import SeqTasks
from mtt_jax.specs import LAYOUTS

SOURCES: dict[str, type] = {source.name: source for source in (
    MultiDigits, SeqTasks, MmoeSynthetic, GradNormToy, Glue, MultiMnist, CelebA, Retrieval, MultiView)}
AVAILABLE_TASKS: dict[str, tuple[str, ...]] = {
    name: source.all_task_names for name, source in SOURCES.items()}


def source_options(name: str) -> tuple[str, ...]:
    """The keyword options that source ``name`` accepts, with their defaults in its constructor."""
    check_choice("data source", name, tuple(SOURCES))
    parameters = inspect.signature(SOURCES[name].__init__).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def check_options(name: str, options: Iterable[str]) -> None:
    """A one-line ValueError naming the first of ``options`` that source ``name`` does not accept."""
    valid_options = source_options(name)
    for option in options:
        check_choice(f"option for data source {name!r}:", option, valid_options)


def make_source(name: str, task_names: Sequence[str], seed: int, **options) -> Source:
    """Builds source ``name`` serving ``task_names`` (in that order) for run seed ``seed``.

    Raises:
        ValueError: one line naming the bad source, task or option and the valid choices.
        DatasetNotPreparedError: (a ValueError) one line with the command that prepares the dataset.
    """
    check_options(name, options)
    return SOURCES[name](task_names, seed, **options)


def register_source(name: str, source: type[Source], tasks: Sequence[tasks_lib.TaskSpec] = (), *,
                    replace: bool = False) -> None:
    """Makes ``config.data.source = name`` build ``source(task_names, seed, **config.data.options)``, and
    registers the tasks it serves (`mtt_jax.tasks.get`).

    ``source`` follows the `mtt_jax.data.base.Source` contract: class attributes ``name`` (= ``name``),
    ``layout`` and ``all_task_names``, the three batch methods, and a constructor
    ``(task_names, seed, *, option=default, ...)`` whose options are keyword-only with defaults (what
    ``data.options`` may set). ``tasks`` holds a `TaskSpec` for each of ``all_task_names`` (its ``source``
    left empty or ``name``), unless the task is already registered for this source. Registering the same
    class under the same name again does nothing; another class under a taken name is refused unless
    ``replace``. A task name another source serves is always refused.

    Raises:
        ValueError: one line naming what does not fit.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"data source name {name!r} must be a non-empty string")
    if SOURCES.get(name) is source:
        return
    if name in SOURCES and not replace:
        raise ValueError(f"data source {name!r} is already registered ({SOURCES[name].__module__}."
                         f"{SOURCES[name].__qualname__}); choose another name or pass replace=True")
    _check_source_class(name, source)
    specs = _source_task_specs(name, source, tasks)
    for spec in specs:
        tasks_lib.register(spec)
    SOURCES[name] = source
    AVAILABLE_TASKS[name] = tuple(source.all_task_names)


def _check_source_class(name: str, source) -> None:
    where = f"data source {name!r}: {getattr(source, '__qualname__', repr(source))}"
    if not isinstance(source, type) or not issubclass(source, Source):
        raise ValueError(f"{where} is not a subclass of mtt_jax.data.base.Source")
    if getattr(source, "name", None) != name:
        raise ValueError(f"{where} has name = {getattr(source, 'name', None)!r}; set the class attribute "
                         f"name = {name!r}")
    if inspect.isabstract(source):
        raise ValueError(f"{where} leaves abstract methods unimplemented: "
                         f"{', '.join(sorted(source.__abstractmethods__))}")
    if getattr(source, "layout", None) not in LAYOUTS:
        raise ValueError(f"{where} has layout = {getattr(source, 'layout', None)!r}; choose one of: "
                         f"{', '.join(LAYOUTS)}")
    task_names = getattr(source, "all_task_names", None)
    if (not isinstance(task_names, (tuple, list)) or not task_names or len(set(task_names)) != len(task_names)
            or not all(isinstance(t, str) and t for t in task_names)):
        raise ValueError(f"{where} has all_task_names = {task_names!r}; give a tuple of distinct task names")
    if source.aligned_rows and source.layout != "multi":
        raise ValueError(f"{where} declares aligned_rows, which only the multi-input layout has")
    parameters = list(inspect.signature(source).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    options_ok = all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in parameters[2:])
    if len(parameters) < 2 or any(p.kind not in positional for p in parameters[:2]) or not options_ok:
        raise ValueError(f"{where} has the constructor {inspect.signature(source)}; it must be "
                         "(task_names, seed, *, option=default, ...): options keyword-only, with defaults")


def _source_task_specs(name: str, source, tasks) -> list[tasks_lib.TaskSpec]:
    """The `TaskSpec` of each task in ``tasks``, with its ``source`` set, after checking that together
    with the tasks already registered for this source they cover ``source.all_task_names``."""
    registered = tasks_lib.registered()
    specs = {}
    for spec in tasks:
        if not isinstance(spec, tasks_lib.TaskSpec):
            raise ValueError(f"data source {name!r}: tasks holds {spec!r}; give mtt_jax.tasks.TaskSpec "
                             "objects")
        if spec.name not in source.all_task_names or spec.name in specs:
            raise ValueError(f"data source {name!r}: task {spec.name!r} is not in all_task_names "
                             f"{tuple(source.all_task_names)}, or is given twice")
        if spec.source not in ("", name):
            raise ValueError(f"data source {name!r}: task {spec.name!r} says source={spec.source!r}; leave "
                             f"it empty or set it to {name!r}")
        specs[spec.name] = dataclasses.replace(spec, source=name)
    for task in source.all_task_names:
        owner = registered[task].source if task in registered else None
        if owner not in (None, name):
            raise ValueError(f"data source {name!r}: task {task!r} is already served by data source "
                             f"{owner!r}; give your task another name")
        if task not in specs and owner is None:
            raise ValueError(f"data source {name!r}: task {task!r} has no TaskSpec; pass one in tasks "
                             "(name, kind, num_classes, metrics)")
    return list(specs.values())


__all__ = ["AVAILABLE_TASKS", "DatasetNotPreparedError", "InputSpec", "SOURCES", "Source", "check_options",
           "make_source", "register_source", "source_options"]
