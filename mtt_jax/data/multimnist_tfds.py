"""MultiMNIST from TFDS ``mnist`` (single-input): tasks ``mnist_left`` and ``mnist_right``.

The construction of Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
§6.1 (and their released loader): every MNIST image of a split is paired with one other image of the
same split drawn at random; on a 36x36 canvas the first digit goes to the top left (rows and columns
0..27) and the second to the bottom right (6..33), the two overlapping by their elementwise maximum; the
canvas is then resized to 28x28 by nearest neighbour. The tasks classify the top-left (left) and the
bottom-right (right) digit. ``image_size=36`` keeps the canvas without resizing.

Held-out sets (``base.SPLITS``), the same for every run seed; ``max_eval_examples`` keeps the first that
many of each:

- test: the pairs of MNIST's test split (the eval set as it always was).
- validation: MNIST has no validation split, so ``num_validation_examples`` train images (0: as many as
  the test split has, 10,000; at most half of the train split) are held out of training (``base.carve``:
  a fixed permutation, never the run seed), the usual 50,000 / 10,000 split of MNIST's train images.
  Each is the left digit of one validation pair, its partner another held-out image.

The pairing is part of the dataset: drawn once with a fixed key (never the run seed), within each set
of images (test, validation, the train images left), so every image of a set is the left digit of
exactly one pair, every partner comes from the same set, and every run sees the same pairs. Train
order: passes over the train pairs, each a fresh permutation keyed by the run seed
(``base.epoch_indices``); example ``i`` of step ``s`` is position ``s * B + i``.

Cache: MNIST's images and labels per split in ``<data_dir>/mtt_jax_cache/mnist/`` (the composition is
a few array operations per batch and is not cached).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from mtt_jax import tasks as tasks_lib
from mtt_jax.data import base, tfds_io

DIGIT_SIZE = 28
CANVAS_SIZE = 36
RIGHT_OFFSET = 6  # the right digit's top-left corner on the canvas
IMAGE_SIZES = (28, 36)
TASK_NAMES = ("mnist_left", "mnist_right")
_PAIRING_KEY = 2018
_VALIDATION_KEY = 2019  # keys the train images held out as the validation split
_CACHE_FORMAT = 1


def nearest_rows(source_size: int, target_size: int) -> np.ndarray:
    """Source row of each target row in nearest-neighbour resizing (pixel centres aligned)."""
    return np.minimum(((np.arange(target_size) + 0.5) * source_size / target_size).astype(np.int64),
                      source_size - 1)


def compose(left_NxHxW: np.ndarray, right_NxHxW: np.ndarray, image_size: int = 28) -> np.ndarray:
    """``f32[N, image_size, image_size]`` in [0, 1]: the two digits overlaid on the 36x36 canvas."""
    n = len(left_NxHxW)
    canvas = np.zeros((n, CANVAS_SIZE, CANVAS_SIZE), np.uint8)
    canvas[:, :DIGIT_SIZE, :DIGIT_SIZE] = left_NxHxW
    end = RIGHT_OFFSET + DIGIT_SIZE
    canvas[:, RIGHT_OFFSET:end, RIGHT_OFFSET:end] = np.maximum(
        canvas[:, RIGHT_OFFSET:end, RIGHT_OFFSET:end], right_NxHxW)
    if image_size != CANVAS_SIZE:
        rows = nearest_rows(CANVAS_SIZE, image_size)
        canvas = canvas[:, rows][:, :, rows]
    return canvas.astype(np.float32) / 255.0


def partners(num_images: int, split: str) -> np.ndarray:
    """The fixed partner (right digit) of every image (left digit) of a split."""
    return np.random.default_rng([_PAIRING_KEY, *split.encode()]).integers(0, num_images, size=num_images)


class MultiMnist(base.Source):
    """Sener & Koltun's MultiMNIST from TFDS ``mnist``."""

    name = "multimnist"
    layout = "single"
    all_task_names = TASK_NAMES

    def __init__(self, task_names: Sequence[str], seed: int, *, data_dir: str = "", image_size: int = 28,
                 max_eval_examples: int = 0, num_validation_examples: int = 0):
        self.task_names = base.check_task_names(self.name, task_names, self.all_task_names)
        self.seed = base.check_positive("seed", seed, minimum=0)
        base.check_choice("image_size", image_size, IMAGE_SIZES)
        self.image_size = image_size
        self.max_eval_examples = base.check_positive("max_eval_examples", max_eval_examples, minimum=0)
        base.check_positive("num_validation_examples", num_validation_examples, minimum=0)
        self.data_dir = tfds_io.resolve_data_dir(data_dir)
        self.input_spec = base.InputSpec(kind="image", shape=(image_size, image_size))
        self.train_images, self.train_labels = self._load("train")  # the whole split, validation included
        self.eval_images, self.eval_labels = self._load("test")
        self.eval_partners = partners(len(self.eval_labels), "test")
        self.validation_indices, self.train_pool = base.carve(
            len(self.train_labels), num_validation_examples or len(self.eval_labels), _VALIDATION_KEY)
        # Partner of each train-split image, drawn within its own set (train pool or validation).
        self.train_partners = np.zeros(len(self.train_labels), np.int64)
        for members, split in ((self.train_pool, "train"), (self.validation_indices, "validation")):
            self.train_partners[members] = members[partners(len(members), split)]
        sizes = {"test": len(self.eval_labels), "validation": len(self.validation_indices)}
        self._num_held_out = {split: min(n, self.max_eval_examples or n) for split, n in sizes.items()}

    def num_examples(self, split: str = "test") -> int:
        return self._num_held_out[base.check_split(split)]

    def train_indices(self, step: int, batch_size: int, shard: base.Shard = base.FULL) -> np.ndarray:
        """The pairs (train-split indices of their left image, never a validation image's) behind rows
        ``shard`` of the batch of ``step``."""
        return self.train_pool[base.epoch_positions(self.seed, len(self.train_pool), step, batch_size,
                                                    shard)]

    def train_batch(self, step: int, batch_size: int, shard: base.Shard = base.FULL) -> dict:
        index = self.train_indices(step, batch_size, shard)
        return self._batch(self.train_images, self.train_labels, self.train_partners, index,
                           np.ones(len(index), np.float32))

    def eval_batches(self, batch_size: int, shard: base.Shard = base.FULL,
                     split: str = "test") -> Iterator[dict]:
        part = base.shard_rows(batch_size, shard)
        for rows, mask in base.padded_index_batches(self.num_examples(split), batch_size):
            if split == "test":
                yield self._batch(self.eval_images, self.eval_labels, self.eval_partners, rows[part],
                                  mask[part])
            else:
                yield self._batch(self.train_images, self.train_labels, self.train_partners,
                                  self.validation_indices[rows[part]], mask[part])

    def _batch(self, images, labels, partner, index, mask) -> dict:
        right = partner[index]
        all_labels = {"mnist_left": labels[index], "mnist_right": labels[right]}
        return {"inputs": compose(images[index], images[right], self.image_size),
                "labels": {task: all_labels[task] for task in self.task_names},
                "mask": {task: mask.copy() for task in self.task_names}}

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        path = tfds_io.cache_path(self.data_dir, "mnist", f"v{_CACHE_FORMAT}", f"{split}.npz")
        arrays = tfds_io.cached_arrays(path, lambda: _read(split, self.data_dir))
        images, labels = arrays["images"], arrays["labels"]
        if images.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE):
            raise ValueError(f"mnist split {split}: images must be {DIGIT_SIZE}x{DIGIT_SIZE}, got "
                             f"{images.shape[1:]}")
        base.check_labels(f"mnist split {split}", labels, "classification", 10)
        return images, labels.astype(np.int32)


def _read(split: str, data_dir: str) -> dict[str, np.ndarray]:
    convert = lambda ex: (np.asarray(ex["image"], np.uint8).reshape(DIGIT_SIZE, DIGIT_SIZE),
                          int(np.asarray(ex["label"])))
    num_examples, examples = tfds_io.read_split("mnist", split, data_dir, convert)
    images = np.zeros((num_examples, DIGIT_SIZE, DIGIT_SIZE), np.uint8)
    labels = np.zeros(num_examples, np.int64)
    for i, (image, label) in enumerate(examples):
        images[i], labels[i] = image, label
    return {"images": images, "labels": labels}


# --- The tasks this source serves, in the task registry (`mtt_jax.tasks.get`). ---------------------
for _name in MultiMnist.all_task_names:
    tasks_lib.register(tasks_lib.TaskSpec(_name, "classification", 10, MultiMnist.name))
