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
module of it) fills the task registry that ``mtt_jax.tasks.get`` reads.
"""

from __future__ import annotations

import inspect
from typing import Iterable, Sequence

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


__all__ = ["AVAILABLE_TASKS", "DatasetNotPreparedError", "InputSpec", "SOURCES", "Source", "check_options",
           "make_source", "source_options"]
