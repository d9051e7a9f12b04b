"""MultiDigits: two overlapping handwritten digits per image, one task per digit (single-input layout).

The MultiMNIST construction of Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018 (§6.1): two digits are drawn, one is placed at the top left and the other shifted towards
the bottom right, and the two are overlaid with an elementwise max. The tasks are to classify the left
(top-left) digit and the right (bottom-right) digit. Here the digits are scikit-learn's bundled 8x8
digits (``sklearn.datasets.load_digits``, UCI optical recognition of handwritten digits, 1797 images,
pixel values 0..16 scaled to [0, 1]), so the benchmark runs offline in seconds.

Layout: canvas 12x12; the left digit's top-left corner at (0, 0), the right digit's at (4, 4), so the
two overlap on a 4x4 block. ``jitter`` moves each digit independently by a uniform integer in
``[-jitter, jitter]`` per axis, clipped so the digit stays on the canvas.

Split: the 1797 images are split once, stratified by class, 80% train / 20% held out, with a fixed
generator that does not depend on the run seed. Train pairs use train images only. The held-out sets
(``base.SPLITS``) use held-out images only and are the same for every run: test, the ``num_eval_pairs``
pairs of the eval stream; validation, ``num_validation_pairs`` pairs (0: as many as test) of the
validation stream of the same key (``base.held_out_rng``), leaving out any pair whose two images (left,
right) are a test pair's, so no validation input is a test input. The two share digit images, not pairs:
the held-out images are the only ones no train pair shows, and taking validation's from the train images
would change every train batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import numpy as np

from mtt_jax import tasks as tasks_lib
from mtt_jax.data import base

DIGIT_SIZE = 8
CANVAS_SIZE = 12
LEFT_ORIGIN = (0, 0)
RIGHT_ORIGIN = (4, 4)
MAX_OFFSET = CANVAS_SIZE - DIGIT_SIZE  # largest row/column of a digit's top-left corner
EVAL_FRACTION = 0.2
_SPLIT_KEY = 2018  # fixed: the split never depends on the run seed
_EVAL_PAIRS_KEY = 2019


@functools.lru_cache(maxsize=1)
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 sklearn digits as ``(images f32[N, 8, 8] in [0, 1], labels int32[N])``. scikit-learn is
    imported here, not with the module: it takes ~1.8 s, which every run of another source (and every
    command that stops on a bad config) would pay."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    return images, digits.target.astype(np.int32)


@functools.lru_cache(maxsize=1)
def split_indices() -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)`` sorted image indices: a fixed 80/20 split, stratified by class."""
    _, labels = digit_images()
    rng = np.random.default_rng(_SPLIT_KEY)
    train, held_out = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        num_held_out = int(round(EVAL_FRACTION * len(members)))
        held_out.append(members[:num_held_out])
        train.append(members[num_held_out:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held_out))


@dataclasses.dataclass(frozen=True)
class Pairs:
    """Which images make each example and where they sit: int64 ``[B]`` indices, ``[B, 2]`` corners."""

    left_index: np.ndarray
    right_index: np.ndarray
    left_corner: np.ndarray   # (row, column) of the left digit's top-left pixel
    right_corner: np.ndarray


def draw_pairs(rng: np.random.Generator, pool: np.ndarray, num_pairs: int, jitter: int) -> Pairs:
    """Draws ``num_pairs`` (left, right) image pairs from ``pool`` (with replacement) and their corners."""
    chosen = pool[rng.integers(0, len(pool), size=(num_pairs, 2))]
    shifts = rng.integers(-jitter, jitter + 1, size=(2, num_pairs, 2))
    left_corner = np.clip(np.asarray(LEFT_ORIGIN) + shifts[0], 0, MAX_OFFSET)
    right_corner = np.clip(np.asarray(RIGHT_ORIGIN) + shifts[1], 0, MAX_OFFSET)
    return Pairs(chosen[:, 0], chosen[:, 1], left_corner, right_corner)


def compose(pairs: Pairs) -> np.ndarray:
    """Renders the pairs: ``f32[B, 12, 12]``, the left digit, then the right one overlaid by max."""
    images, _ = digit_images()
    num_pairs = len(pairs.left_index)
    canvas_BxHxW = np.zeros((num_pairs, CANVAS_SIZE, CANVAS_SIZE), np.float32)
    example = np.arange(num_pairs)[:, None, None]
    span = np.arange(DIGIT_SIZE)
    for index, corner in ((pairs.left_index, pairs.left_corner),
                          (pairs.right_index, pairs.right_corner)):
        rows = (corner[:, 0, None] + span)[:, :, None]  # [B, 8, 1]
        cols = (corner[:, 1, None] + span)[:, None, :]  # [B, 1, 8]
        canvas_BxHxW[example, rows, cols] = np.maximum(canvas_BxHxW[example, rows, cols], images[index])
    return canvas_BxHxW


def _take(pairs: Pairs, rows) -> Pairs:
    return Pairs(*(getattr(pairs, field.name)[rows] for field in dataclasses.fields(Pairs)))


class MultiDigits(base.Source):
    """Sener & Koltun's MultiMNIST on sklearn's 8x8 digits; tasks ``left_digit``, ``right_digit``."""

    name = "multidigits"
    layout = "single"
    all_task_names = ("left_digit", "right_digit")

    def __init__(self, task_names: Sequence[str], seed: int, *, jitter: int = 0,
                 num_eval_pairs: int = 2000, num_validation_pairs: int = 0):
        self.task_names = base.check_task_names(self.name, task_names, self.all_task_names)
        self.seed = base.check_positive("seed", seed, minimum=0)
        self.jitter = base.check_positive("jitter", jitter, minimum=0)
        num_test = base.check_positive("num_eval_pairs", num_eval_pairs)
        self._num_held_out = {"test": num_test, "validation": base.validation_size(
            "num_validation_pairs", num_validation_pairs, num_test)}
        self.input_spec = base.InputSpec(kind="image", shape=(CANVAS_SIZE, CANVAS_SIZE))
        self.train_image_indices, self.eval_image_indices = split_indices()
        self.eval_pairs = draw_pairs(base.eval_rng(_EVAL_PAIRS_KEY, self.jitter),
                                     self.eval_image_indices, num_test, self.jitter)
        self._held_out_sets = {"test": (self.eval_pairs, compose(self.eval_pairs))}

    def num_examples(self, split: str = "test") -> int:
        return self._num_held_out[base.check_split(split)]

    def held_out(self, split: str) -> tuple[Pairs, np.ndarray]:
        """``(pairs, rendered inputs f32[N, 12, 12])`` of held-out set ``split`` (validation: drawn on
        first use, see the module docstring)."""
        if base.check_split(split) not in self._held_out_sets:
            pairs = self._validation_pairs(self.num_examples(split))
            self._held_out_sets[split] = (pairs, compose(pairs))
        return self._held_out_sets[split]

    def _validation_pairs(self, num_pairs: int) -> Pairs:
        """``num_pairs`` pairs of held-out images from the validation stream, none of them a test pair's
        (left, right) images; draws in rounds until enough are left."""
        rng = base.held_out_rng("validation", _EVAL_PAIRS_KEY, self.jitter)
        num_images = len(digit_images()[1])
        test_codes = np.unique(self.eval_pairs.left_index * num_images + self.eval_pairs.right_index)
        if len(test_codes) == len(self.eval_image_indices) ** 2:
            raise ValueError(f"num_eval_pairs={len(self.eval_pairs.left_index)} test pairs use every pair "
                             "of held-out images; none is left for validation (lower num_eval_pairs)")
        kept, count = [], 0
        while count < num_pairs:
            pairs = draw_pairs(rng, self.eval_image_indices, num_pairs, self.jitter)
            fresh = ~np.isin(pairs.left_index * num_images + pairs.right_index, test_codes)
            kept.append(_take(pairs, fresh))
            count += int(fresh.sum())
        joined = Pairs(*(np.concatenate([getattr(p, field.name) for p in kept])
                         for field in dataclasses.fields(Pairs)))
        return _take(joined, slice(0, num_pairs))

    def train_pairs(self, step: int, batch_size: int, shard: base.Shard = base.FULL) -> Pairs:
        """The pairs behind ``train_batch(step, batch_size, shard)``: the global batch's pairs are drawn
        (a few integers each) and cut to the shard's rows, so only those rows are rendered."""
        rows = base.shard_rows(batch_size, shard)
        rng = base.train_rng(self.seed, step)
        return _take(draw_pairs(rng, self.train_image_indices, batch_size, self.jitter), rows)

    def train_batch(self, step: int, batch_size: int, shard: base.Shard = base.FULL) -> dict:
        pairs = self.train_pairs(step, batch_size, shard)
        return self._batch(compose(pairs), pairs, np.ones(len(pairs.left_index), np.float32))

    def eval_batches(self, batch_size: int, shard: base.Shard = base.FULL,
                     split: str = "test") -> Iterator[dict]:
        part = base.shard_rows(batch_size, shard)
        pairs, inputs = self.held_out(split)
        for rows, mask in base.padded_index_batches(self.num_examples(split), batch_size):
            rows, mask = rows[part], mask[part]
            yield self._batch(inputs[rows], _take(pairs, rows), mask)

    def _batch(self, inputs_BxHxW: np.ndarray, pairs: Pairs, mask_B: np.ndarray) -> dict:
        _, digit_labels = digit_images()
        labels = {"left_digit": digit_labels[pairs.left_index],
                  "right_digit": digit_labels[pairs.right_index]}
        return {"inputs": inputs_BxHxW,
                "labels": {task: labels[task] for task in self.task_names},
                "mask": {task: mask_B.copy() for task in self.task_names}}


# --- The tasks this source serves, in the task registry (`mtt_jax.tasks.get`). ---------------------
for _name in MultiDigits.all_task_names:
    tasks_lib.register(tasks_lib.TaskSpec(_name, "classification", 10, MultiDigits.name))
