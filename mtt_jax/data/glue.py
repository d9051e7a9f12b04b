"""GLUE (Wang et al., "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language
Understanding", ICLR 2019) from TFDS ``glue/<task>``; multi-input layout.

Tasks (TFDS config, text fields, labels, GLUE's reported metrics; ``mtt_jax.tasks`` registers them):

======  ==========================  ===========  ===============================
task    text fields                 labels       metrics (first = main)
======  ==========================  ===========  ===============================
cola    sentence                    2 classes    Matthews correlation, accuracy
sst2    sentence                    2 classes    accuracy
mrpc    sentence1, sentence2        2 classes    F1 (class 1), accuracy
qqp     question1, question2        2 classes    F1 (class 1), accuracy
stsb    sentence1, sentence2        0..5 score   Pearson, Spearman, MSE
mnli    premise, hypothesis         3 classes    accuracy
qnli    question, sentence          2 classes    accuracy
rte     sentence1, sentence2        2 classes    accuracy
wnli    sentence1, sentence2        2 classes    accuracy
======  ==========================  ===========  ===============================

Text: ``[CLS] a [SEP] b [SEP]`` (``mtt_jax.data.tokenizer``), byte-level by default, truncated
longest-first to ``max_length`` and padded with 0. ``tokenizer="wordpiece"`` with ``wordpiece_vocab`` (a
BERT checkpoint's folder, ``vocab.txt`` or ``tokenizer.json``) emits that checkpoint's ids, its ``[CLS]``
and ``[SEP]`` included; the input spec names the ``[SEP]`` id, from which a model with token-type
embeddings reads each pair's segments (`mtt_jax.models.trunk.token_type_ids`).

STS-B targets are standardized with the mean and standard deviation of the labels of the whole train
split, the validation examples included (so the test labels are what they were before there was a
validation split, and its squared
error starts near 1, like the other tasks' cross-entropies, under equal weights); Pearson and Spearman
are unchanged by that affine map, and MSE is reported in standardized units (multiply by
``label_moments["stsb"][1] ** 2`` for squared points).

Held-out sets (``base.SPLITS``), the same for every run seed; tasks with fewer examples are padded with
mask 0 up to the largest, and ``max_eval_examples`` keeps the first that many of each:

- test: the labelled validation split (MNLI: ``validation_matched``, or ``validation_mismatched`` with
  ``mnli_eval="mismatched"``), GLUE's own test labels being hidden. This is the eval set as it always was.
- validation: since GLUE's labelled validation split is already the test split, each task holds
  ``num_validation_examples`` of its train examples (0: as many as its test split has; at most half of
  its train split) out of training (``base.carve``: a permutation keyed by the task, never the run seed).
  The train stream and the flat mixture batches never serve them, and ``num_train_examples`` counts
  the train examples left.

Train: each task's examples come in passes over its train examples (the train split less the validation
ones), each pass a fresh permutation keyed by ``(seed, task)`` (``base.epoch_indices``): example ``i``
of step ``s`` is position ``s * b + i`` of that stream, so the sub-batch of every task is a pure function
of ``(seed, step)`` and smaller tasks simply start new passes sooner.

Cache: token ids and labels per task, split, tokenizer and ``max_length`` in
``<data_dir>/mtt_jax_cache/glue/``.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from mtt_jax import tasks as tasks_lib
from mtt_jax.data import base, mixtures, tfds_io
from mtt_jax.data.tokenizer import encode_texts, make_tokenizer

_CACHE_FORMAT = 1  # bump when the cached arrays change meaning
_VALIDATION_KEY = 2019  # keys the validation examples held out of each task's train split


@dataclasses.dataclass(frozen=True)
class GlueTask:
    config: str                   # TFDS config: glue/<config>
    text_keys: tuple[str, ...]    # one field, or a pair
    num_classes: int              # 0: regression
    label_range: tuple[float, float] = (-np.inf, np.inf)


GLUE_TASKS = {
    "cola": GlueTask("cola", ("sentence",), 2),
    "sst2": GlueTask("sst2", ("sentence",), 2),
    "mrpc": GlueTask("mrpc", ("sentence1", "sentence2"), 2),
    "qqp": GlueTask("qqp", ("question1", "question2"), 2),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), 0, label_range=(0.0, 5.0)),
    "mnli": GlueTask("mnli", ("premise", "hypothesis"), 3),
    "qnli": GlueTask("qnli", ("question", "sentence"), 2),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), 2),
    "wnli": GlueTask("wnli", ("sentence1", "sentence2"), 2),
}
TASK_NAMES = tuple(GLUE_TASKS)  # order is fixed: a task's position keys its train stream
MNLI_EVAL = ("matched", "mismatched")


def eval_split(task: str, mnli_eval: str = "matched") -> str:
    return f"validation_{mnli_eval}" if task == "mnli" else "validation"


class Glue(base.Source):
    """The nine GLUE tasks; multi-input, ``tokens`` inputs of length ``max_length``."""

    name = "glue"
    layout = "multi"
    all_task_names = TASK_NAMES

    def __init__(self, task_names: Sequence[str], seed: int, *, data_dir: str = "", max_length: int = 128,
                 tokenizer: str = "bytes", sentencepiece_model: str = "", wordpiece_vocab: str = "",
                 mnli_eval: str = "matched", max_eval_examples: int = 0, num_validation_examples: int = 0):
        self.task_names = base.check_task_names(self.name, task_names, self.all_task_names)
        self.seed = base.check_positive("seed", seed, minimum=0)
        self.max_length = base.check_positive("max_length", max_length, minimum=4)
        base.check_choice("mnli_eval", mnli_eval, MNLI_EVAL)
        self.max_eval_examples = base.check_positive("max_eval_examples", max_eval_examples, minimum=0)
        base.check_positive("num_validation_examples", num_validation_examples, minimum=0)
        self.tokenizer = make_tokenizer(tokenizer, sentencepiece_model, wordpiece_vocab)
        self.data_dir = tfds_io.resolve_data_dir(data_dir)
        self.input_spec = base.InputSpec(kind="tokens", shape=(self.max_length,),
                                         vocab_size=self.tokenizer.vocab_size,
                                         separator_id=self.tokenizer.sep_id)
        self.train = {task: self._load(task, "train") for task in self.task_names}  # the whole split
        self.eval = {task: self._load(task, eval_split(task, mnli_eval)) for task in self.task_names}
        self.label_moments = {}
        if "stsb" in self.task_names:  # standardize STS-B with train moments (module docstring)
            raw = self.train["stsb"][1]
            self.label_moments["stsb"] = (float(raw.mean()), float(raw.std()) or 1.0)
            mean, std = self.label_moments["stsb"]
            self.train["stsb"] = (self.train["stsb"][0], ((raw - mean) / std).astype(np.float32))
            tokens, labels = self.eval["stsb"]
            self.eval["stsb"] = (tokens, ((labels - mean) / std).astype(np.float32))
        self.validation_indices, self.train_pool = {}, {}  # indices into the task's train split
        for task in self.task_names:
            try:
                held, kept = base.carve(len(self.train[task][1]),
                                        num_validation_examples or len(self.eval[task][1]),
                                        _VALIDATION_KEY, TASK_NAMES.index(task))
            except ValueError as e:
                raise ValueError(f"glue/{GLUE_TASKS[task].config}: {e}") from None
            self.validation_indices[task], self.train_pool[task] = held, kept
        self.validation = {task: tuple(a[self.validation_indices[task]] for a in self.train[task])
                           for task in self.task_names}
        if self.max_eval_examples:
            cap = lambda arrays: tuple(a[:self.max_eval_examples] for a in arrays)
            self.eval = {task: cap(arrays) for task, arrays in self.eval.items()}
            self.validation = {task: cap(arrays) for task, arrays in self.validation.items()}

    @property
    def num_train_examples(self) -> dict[str, int]:
        """Train examples per task that the train stream serves (validation ones excluded)."""
        return {task: len(pool) for task, pool in self.train_pool.items()}

    def held_out(self, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{task: (token ids [N, max_length], labels [N])}`` of held-out set ``split``."""
        return {"test": self.eval, "validation": self.validation}[base.check_split(split)]

    def num_examples(self, split: str = "test") -> int:
        """The largest task's size: every task's rows are padded (mask 0) up to it."""
        return max(self.split_sizes(split).values())

    def split_sizes(self, split: str = "test") -> dict[str, int]:
        return {task: len(labels) for task, (_, labels) in self.held_out(split).items()}

    @property
    def eval_sizes(self) -> dict[str, int]:
        return self.split_sizes("test")

    def train_indices(self, task: str, step: int, batch_size: int,
                      shard: base.Shard = base.FULL) -> np.ndarray:
        """Train-split indices of ``task``'s examples behind rows ``shard`` of the sub-batch of ``step``
        (never a validation example's)."""
        rows = base.shard_rows(batch_size, shard)
        base.check_positive("step", step, minimum=0)
        positions = step * batch_size + np.arange(rows.start, rows.stop)
        pool = self.train_pool[task]
        return pool[base.epoch_indices((self.seed, TASK_NAMES.index(task)), len(pool), positions)]

    def train_batch(self, step: int, batch_size: int, shard: base.Shard = base.FULL) -> dict:
        inputs, labels = [], {}
        for task in self.task_names:
            index = self.train_indices(task, step, batch_size, shard)
            tokens, task_labels = self.train[task]
            inputs.append(tokens[index].astype(np.int32))
            labels[task] = task_labels[index]
        rows = len(index)
        return {"inputs": np.stack(inputs), "labels": labels,
                "mask": {task: np.ones(rows, np.float32) for task in self.task_names}}

    def eval_batches(self, batch_size: int, shard: base.Shard = base.FULL,
                     split: str = "test") -> Iterator[dict]:
        part = base.shard_rows(batch_size, shard)
        held_out = self.held_out(split)
        for start in range(0, self.num_examples(split), batch_size):
            positions = np.arange(start, start + batch_size)[part]
            inputs, labels, mask = [], {}, {}
            for task in self.task_names:
                tokens, task_labels = held_out[task]
                rows = np.minimum(positions, len(task_labels) - 1)
                inputs.append(tokens[rows].astype(np.int32))
                labels[task] = task_labels[rows]
                mask[task] = (positions < len(task_labels)).astype(np.float32)
            yield {"inputs": np.stack(inputs), "labels": labels, "mask": mask}

    def flat_batch(self, step: int, batch_size: int, rates: Sequence[float],
                   shard: base.Shard = base.FULL) -> dict:
        """A flat mixture batch (format in `mixtures`): rows drawn with ``rates``
        (``mixtures.mixing_rates``), a task's examples cycling through passes over its train examples
        (``mixtures.sample_examples``; never a validation example)."""
        sizes = [len(self.train_pool[task]) for task in self.task_names]
        task_id, example = mixtures.sample_examples(rates, sizes, step, self.seed, batch_size, shard)

        def example_of(t, rows):
            task = self.task_names[t]
            tokens, labels = self.train[task]
            index = self.train_pool[task][example[rows]]
            return tokens[index], labels[index]
        return mixtures.flat_rows(task_id, self.task_names, example_of, (self.max_length,), np.int32)

    def _load(self, task: str, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(token ids [N, max_length], labels [N])`` of one split, from the cache or from TFDS."""
        spec = GLUE_TASKS[task]
        path = tfds_io.cache_path(
            self.data_dir, "glue", f"{spec.config}-v{_CACHE_FORMAT}",
            f"{split}-{self.tokenizer.cache_key}-L{self.max_length}.npz")
        arrays = tfds_io.cached_arrays(path, lambda: self._read(task, split))
        tokens, labels = arrays["tokens"], arrays["labels"]
        where = f"glue/{spec.config} split {split} (task {task!r})"
        if spec.num_classes:
            base.check_labels(where, labels, "classification", spec.num_classes)
            return tokens, labels.astype(np.int32)
        base.check_labels(where, labels, "regression", 1)
        low, high = spec.label_range
        if labels.size and (labels.min() < low or labels.max() > high):
            raise ValueError(f"{where}: regression labels must lie in [{low}, {high}]; found "
                             f"[{labels.min():.3f}, {labels.max():.3f}]")
        return tokens, labels.astype(np.float32)

    def _read(self, task: str, split: str) -> dict[str, np.ndarray]:
        spec = GLUE_TASKS[task]
        keys = spec.text_keys
        convert = lambda ex: (tuple(tfds_io.text(ex[k]) for k in keys), np.asarray(ex["label"]).item())
        _, examples = tfds_io.read_split(f"glue/{spec.config}", split, self.data_dir, convert)
        examples = list(examples)
        first = [texts[0] for texts, _ in examples]
        second = [texts[1] for texts, _ in examples] if len(keys) == 2 else None
        tokens = encode_texts(self.tokenizer, first, second, self.max_length)
        dtype = np.uint16 if self.tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        labels = np.asarray([label for _, label in examples],
                            np.float32 if not spec.num_classes else np.int64)
        return {"tokens": tokens.astype(dtype), "labels": labels}


# --- The tasks this source serves, in the task registry (`mtt_jax.tasks.get`). ---------------------
# With the metrics GLUE reports (the first is the main metric).
_METRICS = {"cola": ("matthews_corr", "accuracy"), "mrpc": ("f1", "accuracy"), "qqp": ("f1", "accuracy"),
            "stsb": ("pearson", "spearman", "mse")}
for _name, _task in GLUE_TASKS.items():
    tasks_lib.register(tasks_lib.TaskSpec(
        _name, "classification" if _task.num_classes else "regression", _task.num_classes or 1, Glue.name,
        metrics=_METRICS.get(_name, ("accuracy",))))
