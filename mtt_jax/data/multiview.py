"""Multiview: aligned multi-view evidence about one latent class (multi-input layout, aligned rows).

A benchmark with a known answer to "when does attending across tasks help?": every task sees its own
noisy view of the same instance, and one task's view carries no information at all, so it can succeed
only by reading the other tasks' views of the same row.

Generative process of one instance (row b of every task's sub-batch): a latent class ``c`` uniform on
``0..K-1`` (``K = NUM_CLASSES = 4``). Task t's view is ``L`` tokens (``view_length``), each drawn
independently: with probability ``q_t`` (``reveal[t]``) it reveals the class (token ``1 + c``),
otherwise it is a noise token uniform on ``1..K`` (so a noise token can also read ``1 + c``). Per token,
``P(token 1 + j | c) = q_t [j = c] + (1 - q_t) / K``. Vocabulary ``1 + K`` (id 0 is padding, never
generated); no padding.

Tasks (f_t, classes, default ``q_t``; order fixed: it keys the views):

- ``view_class``: ``c`` (4 classes), q = 0.15;
- ``view_parity``: ``c mod 2`` (2 classes), q = 0.15;
- ``view_high``: ``c // 2``, i.e. whether c >= 2 (2 classes), q = 0.15;
- ``view_blind``: ``c`` (4 classes), q = 0: its own view is pure noise, independent of its label, so
  it can beat chance only through the other tasks' views of the same row.

Every view of every task is drawn whichever tasks are requested, so a task's data never depends on the
request. ``aligned_rows`` is True: row b of every task's sub-batch is the same instance (train and
held-out batches alike), which ``model.task_attention="aligned"`` may use.

``shuffle_rows=True``, the negative control (``aligned_rows`` False): the same draws, but within every
block of ``base.BLOCK_ROWS`` rows, task t reads the instance ``t`` steps further along a random cycle
through the block's rows (a permutation drawn after the data). So each task's rows are those of the
aligned source moved to other rows (for a batch of whole blocks, exactly the same examples per task)
and no row shows two tasks the same instance: cross-task evidence is gone, each task's own data stays.

Known accuracies, exact (`bayes_accuracy`, `reference_accuracies`): the posterior over c given any set
of views is a product of per-token likelihoods (`posterior`), a function of each view's token counts;
the Bayes accuracy ``sum over statistics of max_y P(y, statistic)`` is summed over all count vectors of
the views, pooled over views of equal ``q`` (their counts add up to a multinomial); views of q = 0 carry
nothing. That sum is refused above ``MAX_EXACT_STATES`` joint statistics (three views of distinct q at
L = 16 would need 969^3); the defaults need 20,825. At the defaults (L = 16):

===========  =======  ===============  ===============================
task         trivial  Bayes, own view  Bayes, all four views (aligned)
===========  =======  ===============  ===============================
view_class   0.25     0.6017           0.8192
view_parity  0.5      0.7390           0.8812
view_high    0.5      0.7390           0.8812
view_blind   0.25     0.25             0.8192
===========  =======  ===============  ===============================

With ``shuffle_rows=True`` the other rows are independent instances, so every task's Bayes accuracy
is its own view's.

Train rows come in blocks keyed by ``(seed, step, block)`` (``base.block_rows``). Held-out sets
(``base.SPLITS``), fixed for every run seed: test, ``num_eval_examples`` rows per task from the eval
stream of ``_EVAL_KEY``; validation, ``num_validation_examples`` (0: as many as test) from the
validation stream of the same key (``base.held_out_rng``), fresh draws never shared with test or train.
A row's four views together repeat by chance with probability far below 1e-30; one task's 16 tokens
alone can (about 0.3% that any of the default sets' 2048 x 2048 validation-test pairs share a view).
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, Sequence

import numpy as np

from mtt_jax import tasks as tasks_lib
from mtt_jax.data import base

NUM_CLASSES = 4
VOCAB_SIZE = 1 + NUM_CLASSES
TASK_NAMES = ("view_class", "view_parity", "view_high", "view_blind")  # order is fixed: it keys the views
DEFAULT_REVEAL = (0.15, 0.15, 0.15, 0.0)
LABEL_FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "view_class": lambda c: c, "view_parity": lambda c: c % 2, "view_high": lambda c: c // 2,
    "view_blind": lambda c: c}
TASK_CLASSES = {"view_class": NUM_CLASSES, "view_parity": 2, "view_high": 2, "view_blind": NUM_CLASSES}
MAX_EXACT_STATES = 4_000_000  # joint count statistics `bayes_accuracy` enumerates at most
_EVAL_KEY = 2034


def draw_instances(rng: np.random.Generator, num_rows: int, view_length: int, reveal: Sequence[float],
                   shuffle_rows: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(class int64[N, T], tokens int32[N, T, L])`` of every task in ``TASK_NAMES`` order: column t is
    what task t's row shows. Aligned, every column holds the same instance; with ``shuffle_rows`` task t
    reads row ``cycle[(position + t) % N]`` of a random cycle through the N rows (module docstring)."""
    class_N = rng.integers(0, NUM_CLASSES, size=num_rows)
    views = []
    for q in reveal:
        reveals_NxL = rng.random((num_rows, view_length)) < q
        noise_NxL = rng.integers(0, NUM_CLASSES, size=(num_rows, view_length))
        views.append(1 + np.where(reveals_NxL, class_N[:, None], noise_NxL))
    tokens_NxTxL = np.stack(views, axis=1).astype(np.int32)
    if not shuffle_rows:
        return np.repeat(class_N[:, None], len(reveal), axis=1), tokens_NxTxL
    cycle = rng.permutation(num_rows)
    position = np.argsort(cycle)  # position[row]: where the row sits on the cycle
    read_NxT = cycle[(position[:, None] + np.arange(len(reveal))) % num_rows]
    return class_N[read_NxT], tokens_NxTxL[read_NxT, np.arange(len(reveal))]


def posterior(tokens_VxNxL: np.ndarray, reveal: Sequence[float]) -> np.ndarray:
    """``f64[N, K]``: the exact posterior over the class given V views of each row (uniform prior), the
    product of per-token likelihoods ``q [token = 1 + c] + (1 - q) / K``; ``reveal[v]`` is view v's q."""
    num_rows = tokens_VxNxL.shape[1]
    log_posterior_NxK = np.zeros((num_rows, NUM_CLASSES))
    for tokens_NxL, q in zip(tokens_VxNxL, reveal):
        counts_NxK = (tokens_NxL[..., None] == 1 + np.arange(NUM_CLASSES)).sum(axis=1)
        hit, miss = q + (1 - q) / NUM_CLASSES, (1 - q) / NUM_CLASSES
        log_posterior_NxK += counts_NxK * (np.log(hit) - np.log(miss))  # the rest is the same for all c
    log_posterior_NxK -= log_posterior_NxK.max(axis=1, keepdims=True)
    posterior_NxK = np.exp(log_posterior_NxK)
    return posterior_NxK / posterior_NxK.sum(axis=1, keepdims=True)


def bayes_predictions(task: str, posterior_NxK: np.ndarray) -> np.ndarray:
    """``int64[N]``: the label ``y`` of task ``task`` that maximizes ``sum_{c: f(c) = y} P(c | views)``
    (ties to the lowest label; any tie-break scores the same in expectation)."""
    classes = LABEL_FUNCTIONS[task](np.arange(NUM_CLASSES))
    label_posterior = np.stack([posterior_NxK[:, classes == y].sum(axis=1)
                                for y in range(TASK_CLASSES[task])], axis=1)
    return label_posterior.argmax(axis=1)


def _compositions(total: int, parts: int) -> np.ndarray:
    """``int64[S, parts]``: every vector of ``parts`` non-negative integers summing to ``total``."""
    bars = np.asarray(list(itertools.combinations(range(total + parts - 1), parts - 1)), np.int64)
    bars = bars.reshape(-1, parts - 1)
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), total + parts - 1)],
                           axis=1)
    return np.diff(edges, axis=1) - 1


def _log_likelihoods(num_tokens: int, q: float) -> np.ndarray:
    """``f64[S, K]``: log P(count vector s | class c) of ``num_tokens`` tokens of reveal probability q,
    over every count vector s (multinomial)."""
    counts_SxK = _compositions(num_tokens, NUM_CLASSES)
    log_factorial = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, num_tokens + 1)))])
    log_coefficient_S = log_factorial[num_tokens] - log_factorial[counts_SxK].sum(axis=1)
    hit, miss = q + (1 - q) / NUM_CLASSES, (1 - q) / NUM_CLASSES
    return (log_coefficient_S[:, None] + counts_SxK * np.log(hit)
            + (num_tokens - counts_SxK) * np.log(miss))


def bayes_accuracy(task: str, reveal: Sequence[float], view_length: int, views: Sequence[str]) -> float:
    """Exact Bayes accuracy of ``task`` from the views of ``views`` (task names) of one aligned row.

    The views' token counts are sufficient; views of equal q pool into one multinomial of their tokens,
    and views of q = 0 carry nothing. The sum ``sum_s max_y sum_{c: f(c) = y} P(c) P(s | c)`` runs over
    every joint count statistic s (at most ``MAX_EXACT_STATES``, else a one-line ValueError).
    """
    pools: dict[float, int] = {}
    for view in views:
        q = float(reveal[TASK_NAMES.index(view)])
        if q > 0:
            pools[q] = pools.get(q, 0) + view_length
    num_states = 1
    for num_tokens in pools.values():
        num_states *= len(_compositions(num_tokens, NUM_CLASSES))
    if num_states > MAX_EXACT_STATES:
        raise ValueError(f"the exact Bayes accuracy of {task!r} from views {tuple(views)} sums over "
                         f"{num_states} count statistics (more than {MAX_EXACT_STATES}); pool views of "
                         "equal reveal or shorten view_length")
    log_joint_SxK = np.zeros((1, NUM_CLASSES))
    for q, num_tokens in pools.items():
        log_likelihood = _log_likelihoods(num_tokens, q)
        log_joint_SxK = (log_joint_SxK[:, None, :] + log_likelihood[None, :, :]).reshape(-1, NUM_CLASSES)
    joint_SxK = np.exp(log_joint_SxK) / NUM_CLASSES  # uniform prior
    classes = LABEL_FUNCTIONS[task](np.arange(NUM_CLASSES))
    by_label = np.stack([joint_SxK[:, classes == y].sum(axis=1) for y in range(TASK_CLASSES[task])])
    return float(by_label.max(axis=0).sum())


def trivial_accuracy(task: str) -> float:
    """The majority-class accuracy of ``task`` (exact: the class is uniform)."""
    classes = LABEL_FUNCTIONS[task](np.arange(NUM_CLASSES))
    return float(np.bincount(classes, minlength=TASK_CLASSES[task]).max() / NUM_CLASSES)


def reference_accuracies(reveal: Sequence[float] = DEFAULT_REVEAL,
                         view_length: int = 16) -> dict[str, dict[str, float]]:
    """``{task: {"trivial", "own", "all"}}``: majority-class accuracy and the exact Bayes accuracies from
    the task's own view and from all ``TASK_NAMES`` views of the same aligned row."""
    return {task: {"trivial": trivial_accuracy(task),
                   "own": bayes_accuracy(task, reveal, view_length, (task,)),
                   "all": bayes_accuracy(task, reveal, view_length, TASK_NAMES)} for task in TASK_NAMES}


class MultiView(base.Source):
    """Four tasks of one latent class, each with its own noisy view; rows aligned across tasks unless
    ``shuffle_rows``; multi-input."""

    name = "multiview"
    layout = "multi"
    all_task_names = TASK_NAMES
    aligned_rows = True

    def __init__(self, task_names: Sequence[str], seed: int, *, view_length: int = 16,
                 reveal: Sequence[float] = DEFAULT_REVEAL, shuffle_rows: bool = False,
                 num_eval_examples: int = 2048, num_validation_examples: int = 0):
        self.task_names = base.check_task_names(self.name, task_names, self.all_task_names)
        self.seed = base.check_positive("seed", seed, minimum=0)
        self.view_length = base.check_positive("view_length", view_length)
        self.reveal = tuple(float(q) for q in np.atleast_1d(reveal))
        if len(self.reveal) != len(TASK_NAMES) or not all(0 <= q < 1 for q in self.reveal):
            raise ValueError(f"reveal must be {len(TASK_NAMES)} probabilities in [0, 1), one per task of "
                             f"{', '.join(TASK_NAMES)}; got {reveal!r}")
        if not isinstance(shuffle_rows, (bool, np.bool_)):
            raise ValueError(f"shuffle_rows must be True or False, got {shuffle_rows!r}")
        self.shuffle_rows = bool(shuffle_rows)
        self.aligned_rows = not self.shuffle_rows
        num_test = base.check_positive("num_eval_examples", num_eval_examples)
        self._num_held_out = {"test": num_test, "validation": base.validation_size(
            "num_validation_examples", num_validation_examples, num_test)}
        self.input_spec = base.InputSpec(kind="tokens", shape=(self.view_length,), vocab_size=VOCAB_SIZE)
        self._held_out_sets: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}

    def reference_accuracies(self) -> dict[str, dict[str, float]]:
        """``{task: {"trivial", "own", "all"}}`` of this source (`reference_accuracies`); with
        ``shuffle_rows`` the other tasks' rows are other instances, so "all" is the own view's."""
        exact = reference_accuracies(self.reveal, self.view_length)
        if self.shuffle_rows:
            exact = {task: {**values, "all": values["own"]} for task, values in exact.items()}
        return {task: exact[task] for task in self.task_names}

    def bayes_rule_accuracies(self, split: str = "test") -> dict[str, dict[str, float]]:
        """``{task: {"own", "all"}}``: the accuracy of the Bayes rule (`bayes_predictions` of the exact
        `posterior`) on held-out set ``split``, from the task's own view and from the views of every
        requested task in the row (with ``shuffle_rows``, "all" is the own view's: the other rows are
        other instances).

        `reference_accuracies` are expectations over rows; a held-out set is one fixed draw shared by
        every run seed, so a model's accuracy on it is compared with the Bayes rule's on the same rows.
        """
        tokens_TxNxL, labels = self.held_out(split)
        reveal = [self.reveal[TASK_NAMES.index(task)] for task in self.task_names]
        all_views = None if self.shuffle_rows else posterior(tokens_TxNxL, reveal)
        accuracies = {}
        for t, task in enumerate(self.task_names):
            own = posterior(tokens_TxNxL[t:t + 1], reveal[t:t + 1])
            score = lambda posterior_NxK: float(np.mean(bayes_predictions(task, posterior_NxK) == labels[task]))
            accuracies[task] = {"own": score(own), "all": score(own if all_views is None else all_views)}
        return accuracies

    def num_examples(self, split: str = "test") -> int:
        return self._num_held_out[base.check_split(split)]

    def held_out(self, split: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(inputs int32[T, N, L], {task: labels [N]})`` of held-out set ``split``, drawn once from
        ``base.held_out_rng(split, _EVAL_KEY, block)``."""
        if base.check_split(split) not in self._held_out_sets:
            self._held_out_sets[split] = self._rows(
                lambda block: base.held_out_rng(split, _EVAL_KEY, block), slice(0, self.num_examples(split)))
        return self._held_out_sets[split]

    def train_batch(self, step: int, batch_size: int, shard: base.Shard = base.FULL) -> dict:
        rows = base.shard_rows(batch_size, shard)
        base.check_positive("step", step, minimum=0)
        inputs_TxBxL, labels = self._rows(lambda block: base.train_rng(self.seed, step, block), rows)
        return {"inputs": inputs_TxBxL, "labels": labels,
                "mask": {task: np.ones(rows.stop - rows.start, np.float32) for task in self.task_names}}

    def eval_batches(self, batch_size: int, shard: base.Shard = base.FULL,
                     split: str = "test") -> Iterator[dict]:
        return base.multi_input_eval_batches(*self.held_out(split), batch_size, shard)

    def _rows(self, rng_for_block, rows: slice) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Rows ``rows`` of every requested task: ``(tokens int32[T, n, L], {task: labels int32[n]})``."""
        draw = lambda rng, count: draw_instances(rng, count, self.view_length, self.reveal, self.shuffle_rows)
        class_NxT, tokens_NxTxL = base.block_rows(rng_for_block, rows, draw)
        columns = [TASK_NAMES.index(task) for task in self.task_names]
        labels = {task: LABEL_FUNCTIONS[task](class_NxT[:, t]).astype(np.int32)
                  for task, t in zip(self.task_names, columns)}
        return np.ascontiguousarray(tokens_NxTxL[:, columns].transpose(1, 0, 2)), labels


# --- The tasks this source serves, in the task registry (`mtt_jax.tasks.get`). ---------------------
for _name in MultiView.all_task_names:
    tasks_lib.register(tasks_lib.TaskSpec(_name, "classification", TASK_CLASSES[_name], MultiView.name))
