"""CelebA attributes from TFDS ``celeb_a`` (single-input): 40 binary tasks, one per attribute.

Liu et al., "Deep Learning Face Attributes in the Wild", ICCV 2015; used as a 40-task benchmark by
Sener & Koltun (NeurIPS 2018, §6.2), whose loader resizes the whole aligned 178x218 image to 64x64. So
does this source: the whole image, bilinear with antialiasing (PIL), to ``image_size`` x
``image_size`` (default 64) RGB in [0, 1]. Task ``celeba_<attribute in lower case>`` (e.g.
``celeba_smiling``) is 1 where the attribute is present. Splits: train (162,770 images), validation
(19,867, the default eval set) and test (19,962).

Held-out sets (``base.SPLITS``), the same for every run seed; ``max_eval_examples`` keeps the first that
many of each:

- test: CelebA's split ``eval_split`` (the eval set as it always was: ``validation`` by default).
- validation: with ``eval_split="test"``, CelebA's official validation split (its first
  ``num_validation_examples`` if that is not 0). With the default ``eval_split="validation"`` the
  official validation split is already the test split, so ``num_validation_examples`` train images
  (0: as many as the test split has; at most half of the train split) are held out of training
  (``base.carve``: a fixed permutation, never the run seed).

Train order: passes over the train images (the train split less any held out for validation), each a
fresh permutation keyed by the run seed (``base.epoch_indices``).

Cache: the resized images as one uint8 ``.npy`` per split and size (train at 64x64: 2.0 GB), read as a
memory map so a batch reads only its rows, and the attributes as an ``.npz``, in
``<data_dir>/mtt_jax_cache/celeb_a/``. The first run decodes and resizes every image once (threads).
"""

from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from mtt_jax import tasks as tasks_lib
from mtt_jax.data import base, tfds_io

ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)
TASK_NAMES = tuple(f"celeba_{attribute.lower()}" for attribute in ATTRIBUTES)
SPLITS = ("train", "validation", "test")
_CACHE_FORMAT = 1
_VALIDATION_KEY = 2019  # keys the train images held out as the validation split


def resize(image_HxWx3: np.ndarray, size: int) -> np.ndarray:
    """The whole image to ``uint8[size, size, 3]``, bilinear with antialiasing."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    return np.asarray(Image.fromarray(np.asarray(image_HxWx3, np.uint8)).resize(
        (size, size), Image.Resampling.BILINEAR))


class CelebA(base.Source):
    """CelebA's 40 binary attributes as tasks ``celeba_<attribute>``."""

    name = "celeba"
    layout = "single"
    all_task_names = TASK_NAMES

    def __init__(self, task_names: Sequence[str], seed: int, *, data_dir: str = "", image_size: int = 64,
                 eval_split: str = "validation", max_eval_examples: int = 0,
                 num_validation_examples: int = 0):
        self.task_names = base.check_task_names(self.name, task_names, self.all_task_names)
        self.seed = base.check_positive("seed", seed, minimum=0)
        self.image_size = base.check_positive("image_size", image_size, minimum=8)
        base.check_choice("eval_split", eval_split, SPLITS[1:])
        self.eval_split = eval_split
        self.max_eval_examples = base.check_positive("max_eval_examples", max_eval_examples, minimum=0)
        self.num_validation_examples = base.check_positive("num_validation_examples",
                                                           num_validation_examples, minimum=0)
        self.data_dir = tfds_io.resolve_data_dir(data_dir)
        self.input_spec = base.InputSpec(kind="image", shape=(image_size, image_size, 3))
        self.train_images, self.train_attributes = self._load("train")  # the whole split
        self.eval_images, self.eval_attributes = self._load(eval_split)
        if eval_split == "validation":  # validation held out of the train split (module docstring)
            self.validation_indices, self.train_pool = base.carve(
                len(self.train_attributes), num_validation_examples or len(self.eval_attributes),
                _VALIDATION_KEY)
        else:  # validation: CelebA's own, read on first use
            self.validation_indices, self.train_pool = None, np.arange(len(self.train_attributes))
        self._official_validation = None
        self._columns = [TASK_NAMES.index(task) for task in self.task_names]

    def num_examples(self, split: str = "test") -> int:
        count = len(self.held_out(split)[2])
        return min(count, self.max_eval_examples or count)

    def held_out(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(images, attributes, index)``: held-out set ``split`` is ``images[index]`` (all of it; the
        batches keep the first ``num_examples(split)``)."""
        if base.check_split(split) == "test":
            return self.eval_images, self.eval_attributes, np.arange(len(self.eval_attributes))
        if self.validation_indices is not None:
            return self.train_images, self.train_attributes, self.validation_indices
        if self._official_validation is None:
            images, attributes = self._load("validation")
            count = min(self.num_validation_examples or len(attributes), len(attributes))
            self._official_validation = (images, attributes, np.arange(count))
        return self._official_validation

    def train_indices(self, step: int, batch_size: int, shard: base.Shard = base.FULL) -> np.ndarray:
        """Train images behind rows ``shard`` of the batch of ``step`` (never a validation image)."""
        return self.train_pool[base.epoch_positions(self.seed, len(self.train_pool), step, batch_size,
                                                    shard)]

    def train_batch(self, step: int, batch_size: int, shard: base.Shard = base.FULL) -> dict:
        index = self.train_indices(step, batch_size, shard)
        return self._batch(self.train_images, self.train_attributes, index, np.ones(len(index), np.float32))

    def eval_batches(self, batch_size: int, shard: base.Shard = base.FULL,
                     split: str = "test") -> Iterator[dict]:
        part = base.shard_rows(batch_size, shard)
        images, attributes, index = self.held_out(split)
        for rows, mask in base.padded_index_batches(self.num_examples(split), batch_size):
            yield self._batch(images, attributes, index[rows[part]], mask[part])

    def _batch(self, images, attributes, index, mask) -> dict:
        order = np.argsort(index, kind="stable")  # read the memory map in file order
        rows = np.empty((len(index), *images.shape[1:]), np.uint8)
        rows[order] = images[index[order]]
        return {"inputs": rows.astype(np.float32) / 255.0,
                "labels": {task: attributes[index, c].astype(np.int32)
                           for task, c in zip(self.task_names, self._columns)},
                "mask": {task: mask.copy() for task in self.task_names}}

    def _load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images uint8[N, S, S, 3] memory map, attributes uint8[N, 40])`` of a split."""
        folder = tfds_io.cache_path(self.data_dir, "celeb_a", f"v{_CACHE_FORMAT}")
        images_path = os.path.join(folder, f"{split}-{self.image_size}.npy")
        attributes_path = os.path.join(folder, f"{split}-attributes.npz")
        if not (os.path.exists(images_path) and os.path.exists(attributes_path)):
            self._build(split, images_path, attributes_path)
        with np.load(attributes_path) as saved:
            attributes = saved["attributes"]
        base.check_labels(f"celeb_a split {split}", attributes, "classification", 2)
        return np.load(images_path, mmap_mode="r"), attributes

    def _build(self, split: str, images_path: str, attributes_path: str) -> None:
        size = self.image_size
        convert = lambda ex: (resize(ex["image"], size),
                              np.array([bool(ex["attributes"][a]) for a in ATTRIBUTES], np.uint8))
        num_examples, examples = tfds_io.read_split("celeb_a", split, self.data_dir, convert,
                                                    num_threads=min(8, os.cpu_count() or 1))
        attributes = np.zeros((num_examples, len(ATTRIBUTES)), np.uint8)

        def fill(images: np.ndarray) -> None:
            for i, (image, row) in enumerate(examples):
                images[i], attributes[i] = image, row

        if os.path.exists(images_path):
            os.remove(images_path)
        tfds_io.cached_memmap(images_path, (num_examples, size, size, 3), np.uint8, fill)
        if os.path.exists(attributes_path):
            os.remove(attributes_path)
        tfds_io.cached_arrays(attributes_path, lambda: {"attributes": attributes})


# --- The tasks this source serves, in the task registry (`mtt_jax.tasks.get`). ---------------------
for _name in CelebA.all_task_names:  # 40 binary attributes, e.g. celeba_smiling
    tasks_lib.register(tasks_lib.TaskSpec(_name, "classification", 2, CelebA.name,
                                          metrics=("accuracy", "f1")))
