"""MultiDigits: two overlapping handwritten digits per image, one task per digit (single-input layout).

The MultiMNIST construction of Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization",
NeurIPS 2018 (§6.1): two digits are drawn, one is placed at the top left and the other shifted towards
the bottom right, and the two are overlaid with an elementwise max. The tasks are to classify the left
(top-left) digit and the right (bottom-right) digit. Here the digits are scikit-learn's bundled 8x8
digits (``sklearn.datasets.load_digits``, UCI optical recognition of handwritten digits, 1797 images,
pixel values 0..16 scaled to [0, 1]), so the benchmark runs offline in seconds.

Layout (``overlap="standard"``, the default): canvas 12x12; the left digit's top-left corner at (0, 0),
the right digit's at (4, 4), so the two overlap on a 4x4 block. ``jitter`` moves each digit
independently by a uniform integer in ``[-jitter, jitter]`` per axis, clipped so the digit stays on the
canvas.

``overlap="heavy"``: the same canvas with the corners at (1, 1) and (3, 3), so the two 8x8 digits share
a 6x6 block, 36/64 = 56% of each digit's square (the standard layout: 16/64 = 25%): about half of each
digit is covered by the other. Measured on 4000 train pairs, 70% of each digit's ink (pixel mass) lies
under the other digit's square (standard: 26%) and 38% of its inked pixels are inked by the other digit
too (standard: 9%). Then i.i.d. Gaussian pixel noise of standard deviation ``HEAVY_NOISE_STD`` = 0.1 is
added to every canvas pixel (not clipped, so values lie in about [-0.4, 1.4]). The two labels stay
independent (the two images are drawn independently). The noise is drawn in blocks of rows
(``base.block_rows``) from the train stream ``(seed, step, _NOISE_KEY, block)`` and, for the held-out
sets, from ``base.held_out_rng(split, _NOISE_KEY, jitter, block)``; the pairs are drawn exactly as in
the standard layout (the same images and jitter draws for the same keys). The standard layout's batches
are byte-identical to what they were before this option existed.

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
HEAVY_NOISE_STD = 0.1
_SPLIT_KEY = 2018  # fixed: the split never depends on the run seed
_EVAL_PAIRS_KEY = 2019
_NOISE_KEY = 2020  # the pixel noise of overlap="heavy"


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where the two digits sit (top-left corners before jitter) and the pixel noise added after."""

    left_origin: tuple[int, int]
    right_origin: tuple[int, int]
    noise_std: float


GEOMETRIES = {"standard": Geometry(LEFT_ORIGIN, RIGHT_ORIGIN, 0.0),
              "heavy": Geometry((1, 1), (3, 3), HEAVY_NOISE_STD)}
OVERLAPS = tuple(GEOMETRIES)


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


def draw_pairs(rng: np.random.Generator, pool: np.ndarray, num_pairs: int, jitter: int,
               geometry: Geometry = GEOMETRIES["standard"]) -> Pairs:
    """Draws ``num_pairs`` (left, right) image pairs from ``pool`` (with replacement) and their corners
    (``geometry``'s origins, jittered; the draws do not depend on the geometry)."""
    chosen = pool[rng.integers(0, len(pool), size=(num_pairs, 2))]
    shifts = rng.integers(-jitter, jitter + 1, size=(2, num_pairs, 2))
    left_corner = np.clip(np.asarray(geometry.left_origin) + shifts[0], 0, MAX_OFFSET)
    right_corner = np.clip(np.asarray(geometry.right_origin) + shifts[1], 0, MAX_OFFSET)
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


def pixel_noise(rng_for_block, rows: slice, std: float) -> np.ndarray:
    """Rows ``rows`` of i.i.d. N(0, std^2) canvas noise ``f32[B, 12, 12]``, drawn block by block."""
    draw = lambda rng, count: (rng.standard_normal((count, CANVAS_SIZE, CANVAS_SIZE)),)
    (noise_BxHxW,) = base.block_rows(rng_for_block, rows, draw)
    return (std * noise_BxHxW).astype(np.float32)


def _take(pairs: Pairs, rows) -> Pairs:
    return Pairs(*(getattr(pairs, field.name)[rows] for field in dataclasses.fields(Pairs)))


class MultiDigits(base.Source):
    """Sener & Koltun's MultiMNIST on sklearn's 8x8 digits; tasks ``left_digit``, ``right_digit``;
    ``overlap`` one of ``OVERLAPS`` (module docstring)."""

    name = "multidigits"
    layout = "single"
    all_task_names = ("left_digit", "right_digit")

    def __init__(self, task_names: Sequence[str], seed: int, *, jitter: int = 0,
                 num_eval_pairs: int = 2000, num_validation_pairs: int = 0, overlap: str = "standard"):
        self.task_names = base.check_task_names(self.name, task_names, self.all_task_names)
        self.seed = base.check_positive("seed", seed, minimum=0)
        self.jitter = base.check_positive("jitter", jitter, minimum=0)
        base.check_choice("overlap", overlap, OVERLAPS)
        self.overlap, self.geometry = overlap, GEOMETRIES[overlap]
        num_test = base.check_positive("num_eval_pairs", num_eval_pairs)
        self._num_held_out = {"test": num_test, "validation": base.validation_size(
            "num_validation_pairs", num_validation_pairs, num_test)}
        self.input_spec = base.InputSpec(kind="image", shape=(CANVAS_SIZE, CANVAS_SIZE))
        self.train_image_indices, self.eval_image_indices = split_indices()
        self.eval_pairs = draw_pairs(base.eval_rng(_EVAL_PAIRS_KEY, self.jitter),
                                     self.eval_image_indices, num_test, self.jitter, self.geometry)
        self._held_out_sets = {"test": (self.eval_pairs, self._render_held_out("test", self.eval_pairs))}

    def num_examples(self, split: str = "test") -> int:
        return self._num_held_out[base.check_split(split)]

    def held_out(self, split: str) -> tuple[Pairs, np.ndarray]:
        """``(pairs, rendered inputs f32[N, 12, 12])`` of held-out set ``split`` (validation: drawn on
        first use, see the module docstring)."""
        if base.check_split(split) not in self._held_out_sets:
            pairs = self._validation_pairs(self.num_examples(split))
            self._held_out_sets[split] = (pairs, self._render_held_out(split, pairs))
        return self._held_out_sets[split]

    def render(self, pairs: Pairs, noise_rng_for_block, rows: slice) -> np.ndarray:
        """The canvases of ``pairs`` (rows ``rows`` of a table), plus the geometry's pixel noise drawn
        from ``noise_rng_for_block`` (``base.block_rows``; not called when the geometry has none)."""
        canvas_BxHxW = compose(pairs)
        if not self.geometry.noise_std:
            return canvas_BxHxW
        return canvas_BxHxW + pixel_noise(noise_rng_for_block, rows, self.geometry.noise_std)

    def _render_held_out(self, split: str, pairs: Pairs) -> np.ndarray:
        return self.render(pairs, lambda block: base.held_out_rng(split, _NOISE_KEY, self.jitter, block),
                           slice(0, len(pairs.left_index)))

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
            pairs = draw_pairs(rng, self.eval_image_indices, num_pairs, self.jitter, self.geometry)
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
        pairs = draw_pairs(rng, self.train_image_indices, batch_size, self.jitter, self.geometry)
        return _take(pairs, rows)

    def train_batch(self, step: int, batch_size: int, shard: base.Shard = base.FULL) -> dict:
        pairs = self.train_pairs(step, batch_size, shard)
        inputs = self.render(pairs, lambda block: base.train_rng(self.seed, step, _NOISE_KEY, block),
                             base.shard_rows(batch_size, shard))
        return self._batch(inputs, pairs, np.ones(len(pairs.left_index), np.float32))

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
