"""SeqTasks: synthetic token-sequence tasks of known relatedness (multi-input layout).

A controlled testbed in the spirit of the synthetic tasks used to study when tasks help each other
(Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts",
KDD 2018, tune relatedness synthetically; Standley et al., "Which Tasks Should Be Learned Together in
Multi-task Learning?", ICML 2020, measure it). Each task has its own independently drawn examples, as
in GLUE-style multi-input MTL, so a task's data stream is the same whichever tasks it is trained with.

Vocabulary: ``VOCAB_SIZE`` = 32 ids; 0 is padding, 1..31 are content. Content token ``t`` has group
``(t - 1) % 4`` and value ``(t - 1) // 4``. Sequences use values 0..6 only (tokens 1..28): 31 content
ids hold 7 full rows of 4 groups, and drawing values from the same range in every group makes the value
of a token independent of its group. Ids 29..31 are valid but never generated.

Generation of one sequence: length uniform in ``[L // 2, L]``, padding at the end; a dominant group is
drawn uniformly; each position takes the dominant group with probability 0.4 and each other group with
probability 0.2, and a value uniform in 0..6. Labels are computed from the tokens actually drawn.

Held-out sets (``base.SPLITS``), the same for every run seed: test, ``num_eval_examples`` sequences per
task from the eval stream keyed by ``(_EVAL_KEY, length, task)``; validation, ``num_validation_examples``
(0: as many as test) from the validation stream of the same key (``base.held_out_rng``), so fresh draws
that share no generator with test or train (at very short lengths a sequence can recur by chance, as it
can between train and test).

Tasks, and what each one tests (the first four, then four added later; a task's position in
``TASK_NAMES`` keys its example stream, so new tasks are appended and earlier streams never change):

- ``majority`` (4 classes): the most frequent group, ties to the lowest group. Tests counting.
- ``majority_parity`` (2 classes): ``majority % 2``. A function of ``majority``, so the closely related
  pair: a trunk that counts groups serves both.
- ``mean_value`` (regression): the mean value over non-pad tokens, standardized with exact constants of
  the generative distribution (``mean_value_moments``). Tests averaging; values are independent of
  groups, so it is unrelated to the majority tasks.
- ``repeat_tag`` (tagging, 2 classes): per position, 1 if the same token id appeared earlier in the
  sequence, else 0 (0 at pads). Tests content-based attention (matching a token against all earlier
  ones); unrelated to the other original tasks (``distinct_count``, added later, is its sum).
- ``first_group`` (4 classes): the group of the token at position 0. Tests position information (the
  only task that needs an absolute position). Weakly related to ``majority``: the first token takes
  the dominant group with probability 0.4 and the majority is usually the dominant group, so the two
  agree well above the 1/4 of chance, but no count is needed.
- ``max_value`` (7 classes): the largest value among non-pad tokens. A value-based pooling task, hence
  related to ``mean_value`` (both read values and ignore groups) and unrelated to the group tasks.
  Heavily imbalanced by construction: with n >= L // 2 uniform values the maximum is 6 unless all n
  values are below 6 (probability (6/7)^n, under 0.09 at n = 16), so classes 0..3 are essentially
  never seen; judge it by macro-F1 against its trivial baseline, not by accuracy.
- ``distinct_count`` (regression): the number of distinct token ids among non-pad tokens, standardized
  with exact constants of the generative distribution (``distinct_count_moments``; at the default
  length 32: mean 15.643828, std 2.574220). Closely related to ``repeat_tag``: the count equals the
  number of non-pad positions whose tag is 0, so it is that tagging summed (it also grows with the
  sequence length).
- ``last_group_tag`` (tagging, 4 classes): per position, the group of the previous token (0 at position
  0 and at pads; pads only follow content, so the previous token of a non-pad position is a real
  token). A local, content-based tagging task: attend one step back and read the group. Shares the
  "read a token's group" skill with the majority tasks and ``first_group`` and the relative-position
  skill with ``first_group``; unrelated to the value tasks and to ``repeat_tag``.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import numpy as np

from mtt_jax import tasks as tasks_lib
from mtt_jax.data import base, mixtures

VOCAB_SIZE = 32
PAD_ID = 0
NUM_GROUPS = 4
NUM_VALUES = (VOCAB_SIZE - 1) // NUM_GROUPS  # 7: values 0..6 exist in every group
DOMINANT_GROUP_PROBABILITY = 0.4
TASK_NAMES = ("majority", "majority_parity", "mean_value", "repeat_tag",  # order is fixed: it keys
              "first_group", "max_value", "distinct_count", "last_group_tag")  # each task's stream
_FLAT_KEY = 1000  # the train stream of flat mixture batches (task streams are keyed 0..7)
_EVAL_KEY = 2024  # fixed: the held-out sets never depend on the run seed


def token_group(tokens: np.ndarray) -> np.ndarray:
    """Group ``(t - 1) % 4`` of content tokens (meaningless at pads)."""
    return (tokens - 1) % NUM_GROUPS


def token_value(tokens: np.ndarray) -> np.ndarray:
    """Value ``(t - 1) // 4`` of content tokens (meaningless at pads)."""
    return (tokens - 1) // NUM_GROUPS


def sample_sequences(rng: np.random.Generator, num_sequences: int, length: int) -> np.ndarray:
    """Draws ``int32[N, length]`` token sequences as described in the module docstring."""
    lengths_N = rng.integers(length // 2, length + 1, size=num_sequences)
    dominant_N = rng.integers(0, NUM_GROUPS, size=num_sequences)
    shape = (num_sequences, length)
    takes_dominant = rng.random(shape) < DOMINANT_GROUP_PROBABILITY
    other_group = (dominant_N[:, None] + rng.integers(1, NUM_GROUPS, size=shape)) % NUM_GROUPS
    group_NxL = np.where(takes_dominant, dominant_N[:, None], other_group)
    value_NxL = rng.integers(0, NUM_VALUES, size=shape)
    tokens_NxL = 1 + group_NxL + NUM_GROUPS * value_NxL
    is_content = np.arange(length)[None, :] < lengths_N[:, None]
    return np.where(is_content, tokens_NxL, PAD_ID).astype(np.int32)


@functools.lru_cache(maxsize=None)
def mean_value_moments(length: int) -> tuple[float, float]:
    """Exact mean and standard deviation of the raw ``mean_value`` target for max length ``length``.

    Values are i.i.d. uniform on 0..K-1 (K = ``NUM_VALUES``) independently of groups and of the length
    n, so the mean of n values has expectation (K - 1) / 2 and variance ((K^2 - 1) / 12) * E[1 / n],
    with n uniform on ``[length // 2, length]``.
    """
    value_mean = (NUM_VALUES - 1) / 2
    value_variance = (NUM_VALUES**2 - 1) / 12
    mean_inverse_length = float(np.mean(1.0 / np.arange(length // 2, length + 1)))
    return value_mean, float(np.sqrt(value_variance * mean_inverse_length))


@functools.lru_cache(maxsize=None)
def distinct_count_moments(length: int) -> tuple[float, float]:
    """Exact mean and standard deviation of the raw ``distinct_count`` target for max length ``length``.

    Given the dominant group, positions are i.i.d. over the ``G * K`` generated ids (G = ``NUM_GROUPS``,
    K = ``NUM_VALUES``): the K ids of the dominant group each with probability p_d = 0.4 / K, the others
    each with p_o = 0.6 / ((G - 1) K). The distribution does not depend on which group dominates. With
    ``I_t`` the indicator that id t occurs among the n positions, and D = sum_t I_t,

        E[D | n]   = sum_t (1 - (1 - p_t)^n),
        E[D^2 | n] = E[D | n] + sum_{t != s} (1 - (1 - p_t)^n - (1 - p_s)^n + (1 - p_t - p_s)^n),

    and both are averaged over n uniform on ``[length // 2, length]``. Resulting constants: length 32
    -> mean 15.643828, std 2.574220; length 8 -> mean 5.402741, std 1.319103.
    """
    other_probability = (1 - DOMINANT_GROUP_PROBABILITY) / (NUM_GROUPS - 1)
    group_probabilities = [DOMINANT_GROUP_PROBABILITY] + [other_probability] * (NUM_GROUPS - 1)
    p_T = np.repeat(np.asarray(group_probabilities) / NUM_VALUES, NUM_VALUES)  # one entry per id
    n_M = np.arange(length // 2, length + 1, dtype=np.float64)[:, None]
    absent_MxT = (1 - p_T[None, :]) ** n_M                                       # P(id t absent | n)
    first_moment_M = (1 - absent_MxT).sum(axis=1)
    both_absent_MxTxT = (1 - p_T[:, None] - p_T[None, :])[None] ** n_M[:, :, None]
    both_present_MxTxT = 1 - absent_MxT[:, :, None] - absent_MxT[:, None, :] + both_absent_MxTxT
    off_diagonal = ~np.eye(len(p_T), dtype=bool)
    second_moment_M = first_moment_M + both_present_MxTxT[:, off_diagonal].sum(axis=1)
    mean = float(first_moment_M.mean())
    return mean, float(np.sqrt(second_moment_M.mean() - mean**2))


def label_sequences(tokens_NxL: np.ndarray) -> dict[str, np.ndarray]:
    """Labels of every task for the given sequences (max length taken from the array's width)."""
    is_content = tokens_NxL != PAD_ID
    group_onehot = (token_group(tokens_NxL)[..., None] == np.arange(NUM_GROUPS)) & is_content[..., None]
    majority = np.argmax(group_onehot.sum(axis=1), axis=1).astype(np.int32)  # argmax: lowest on ties

    value_mean, value_std = mean_value_moments(tokens_NxL.shape[1])
    raw_mean = (token_value(tokens_NxL) * is_content).sum(axis=1) / is_content.sum(axis=1)
    mean_value = ((raw_mean - value_mean) / value_std).astype(np.float32)

    same_token = tokens_NxL[:, :, None] == tokens_NxL[:, None, :]  # [N, position, earlier position]
    is_earlier = np.tri(tokens_NxL.shape[1], k=-1, dtype=bool)
    repeat_tag = ((same_token & is_earlier).any(axis=2) & is_content).astype(np.int32)

    first_group = token_group(tokens_NxL[:, 0]).astype(np.int32)  # position 0 is never a pad

    max_value = np.where(is_content, token_value(tokens_NxL), -1).max(axis=1).astype(np.int32)

    count_mean, count_std = distinct_count_moments(tokens_NxL.shape[1])
    id_present = (tokens_NxL[..., None] == np.arange(1, VOCAB_SIZE)).any(axis=1)  # [N, content id]
    distinct_count = ((id_present.sum(axis=1) - count_mean) / count_std).astype(np.float32)

    last_group_tag = np.zeros_like(tokens_NxL, dtype=np.int32)
    last_group_tag[:, 1:] = np.where(is_content[:, 1:], token_group(tokens_NxL[:, :-1]), 0)

    return {"majority": majority,
            "majority_parity": majority % 2,
            "mean_value": mean_value,
            "repeat_tag": repeat_tag,
            "first_group": first_group,
            "max_value": max_value,
            "distinct_count": distinct_count,
            "last_group_tag": last_group_tag}

class SeqTasks(base.Source):
    """Eight token-sequence tasks (counting, its parity, averaging, repeat detection, first group, max
    value, distinct count, previous-token group); multi-input."""

    name = "seqtasks"
    layout = "multi"
    all_task_names = TASK_NAMES

    def __init__(self, task_names: Sequence[str], seed: int, *, length: int = 32,
                 num_eval_examples: int = 1024, num_validation_examples: int = 0):
        self.task_names = base.check_task_names(self.name, task_names, self.all_task_names)
        self.seed = base.check_positive("seed", seed, minimum=0)
        self.length = base.check_positive("length", length, minimum=2)
        num_test = base.check_positive("num_eval_examples", num_eval_examples)
        self._num_held_out = {"test": num_test, "validation": base.validation_size(
            "num_validation_examples", num_validation_examples, num_test)}
        self.input_spec = base.InputSpec(kind="tokens", shape=(self.length,), vocab_size=VOCAB_SIZE)
        self._held_out_sets: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}

    def num_examples(self, split: str = "test") -> int:
        return self._num_held_out[base.check_split(split)]

    def held_out(self, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(inputs [T, N, L], {task: labels [N, ...]})`` of held-out set ``split``, drawn once: each
        task's sequences from ``base.held_out_rng(split, _EVAL_KEY, length, task key)``."""
        if split not in self._held_out_sets:
            self._held_out_sets[split] = self._examples(
                lambda task_key: base.held_out_rng(split, _EVAL_KEY, self.length, task_key),
                self.num_examples(split))
        return self._held_out_sets[split]

    def train_batch(self, step: int, batch_size: int, shard: base.Shard = base.FULL) -> dict:
        rows = base.shard_rows(batch_size, shard)
        inputs_TxBxL, labels = self._examples(
            lambda task_key: base.train_rng(self.seed, step, task_key), batch_size, rows)
        return {"inputs": inputs_TxBxL, "labels": labels,
                "mask": {task: np.ones(rows.stop - rows.start, np.float32) for task in self.task_names}}

    def flat_batch(self, step: int, batch_size: int, rates: Sequence[float],
                   shard: base.Shard = base.FULL) -> dict:
        """A flat mixture batch (format in `mixtures`): row tasks drawn with ``rates``
        (``mixtures.sample_task_ids``), sequences from the step's flat stream (the data are generated,
        so there are no sizes to cycle through)."""
        rows = base.shard_rows(batch_size, shard)
        task_id = mixtures.sample_task_ids(rates, step, self.seed, batch_size, shard)
        tokens_NxL = sample_sequences(base.train_rng(self.seed, step, _FLAT_KEY), batch_size,
                                      self.length)[rows]
        labels = label_sequences(tokens_NxL)
        return mixtures.flat_rows(task_id, self.task_names,
                                  lambda t, at: (tokens_NxL[at], labels[self.task_names[t]][at]),
                                  (self.length,), np.int32)

    def eval_batches(self, batch_size: int, shard: base.Shard = base.FULL,
                     split: str = "test") -> Iterator[dict]:
        return base.multi_input_eval_batches(*self.held_out(split), batch_size, shard)

    def _examples(self, rng_for_task, num_examples: int,
                  rows: slice | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Independent examples per requested task, each from the generator of its fixed task key.

        The key is the task's position in ``TASK_NAMES``, not in the request, so a task sees the same
        examples whichever other tasks are requested with it. The tokens of all ``num_examples`` are
        drawn (cheap) and only ``rows`` of them are kept and labelled.
        """
        rows = slice(0, num_examples) if rows is None else rows
        inputs, labels = [], {}
        for task in self.task_names:
            tokens_NxL = sample_sequences(rng_for_task(TASK_NAMES.index(task)), num_examples,
                                          self.length)[rows]
            inputs.append(tokens_NxL)
            labels[task] = label_sequences(tokens_NxL)[task]
        return np.stack(inputs), labels


# --- The tasks this source serves, in the task registry (`mtt_jax.tasks.get`). ---------------------
_KINDS = {"majority": ("classification", 4), "majority_parity": ("classification", 2),
          "mean_value": ("regression", 1), "repeat_tag": ("tagging", 2),
          "first_group": ("classification", 4), "max_value": ("classification", 7),
          "distinct_count": ("regression", 1), "last_group_tag": ("tagging", 4)}
for _name in SeqTasks.all_task_names:
    tasks_lib.register(tasks_lib.TaskSpec(_name, *_KINDS[_name], SeqTasks.name))
