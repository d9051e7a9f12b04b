"""Loss-based weighting driven by per-epoch mean losses: DWA and STCH.

An "epoch" is ``epoch_steps`` consecutive updates (``step // epoch_steps``); the step counter, not the
data pipeline, defines it, so a resumed run sees the same epochs. The running mean of the current epoch
lives in the state; when a call arrives in a later epoch, the finished epoch's mean is recorded first.
A step whose update is skipped (non-finite loss) leaves the state untouched, so its losses are not
counted and a roll-over it would have done happens on the next call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtt_jax.weighting.base import PyTree, WeightingMethod, clamp_losses, validate_range


def init_epoch_means(num_tasks: int) -> dict:
    return {"epoch": jnp.zeros((), jnp.int32),           # the epoch the running sum belongs to
            "loss_sum": jnp.zeros((num_tasks,), jnp.float32),
            "count": jnp.zeros((), jnp.float32),
            "completed": jnp.zeros((), jnp.int32),       # finished epochs recorded so far
            "means": jnp.ones((2, num_tasks), jnp.float32)}  # [mean of epoch e-1, of epoch e-2]


def roll_epoch(acc: dict, step: jax.Array, epoch_steps: int) -> tuple[dict, jax.Array, jax.Array]:
    """Closes the running epoch if ``step`` lies in a later one: returns ``(acc, finished, its_mean)``."""
    epoch = jnp.asarray(step, jnp.int32) // epoch_steps
    finished = (epoch > acc["epoch"]) & (acc["count"] > 0)
    mean_T = acc["loss_sum"] / jnp.maximum(acc["count"], 1.0)
    new_epoch = epoch > acc["epoch"]
    acc = {"epoch": jnp.maximum(epoch, acc["epoch"]),
           "loss_sum": jnp.where(new_epoch, 0.0, acc["loss_sum"]),
           "count": jnp.where(new_epoch, 0.0, acc["count"]),
           "completed": acc["completed"] + finished.astype(jnp.int32),
           "means": jnp.where(finished, jnp.stack([mean_T, acc["means"][0]]), acc["means"])}
    return acc, finished, mean_T


def accumulate(acc: dict, losses_T: jax.Array) -> dict:
    return {**acc, "loss_sum": acc["loss_sum"] + jax.lax.stop_gradient(losses_T.astype(jnp.float32)),
            "count": acc["count"] + 1.0}


class DynamicWeightAverage(WeightingMethod):
    """DWA (Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019, eq. 7).

    ``r_t = Lbar_t(e-1) / Lbar_t(e-2)`` from epoch-mean losses and ``w = T softmax(r / temperature)``;
    the first two epochs are EW. Weights sum to T: sum scale. Defaults: ``temperature=2`` (paper =
    LibMTL); ``epoch_steps=100`` updates per epoch is ours -- set it to the real epoch length. Using
    per-step losses instead of epoch means would be a different, much noisier method.
    """
    name = "dwa"
    combine_is_linear = True  # the weights come from earlier epochs' means

    def __init__(self, num_tasks: int, temperature: float = 2.0, epoch_steps: int = 100):
        super().__init__(num_tasks)
        validate_range(self.name, "temperature", temperature, 0.0, low_open=True)
        validate_range(self.name, "epoch_steps", epoch_steps, 1)
        self.temperature, self.epoch_steps = float(temperature), int(epoch_steps)

    def init_state(self) -> PyTree:
        return init_epoch_means(self.num_tasks)

    def combine(self, params, state, losses_T, step, rng=None):
        state, _, _ = roll_epoch(state, step, self.epoch_steps)
        ratio_T = state["means"][0] / jnp.maximum(state["means"][1], 1e-12)
        dwa_T = self.num_tasks * jax.nn.softmax(ratio_T / self.temperature)
        weights_T = jnp.where(state["completed"] >= 2, dwa_T, jnp.ones_like(dwa_T))
        return self.weighted_sum(weights_T, losses_T), weights_T, accumulate(state, losses_T)


class SmoothTchebycheff(WeightingMethod):
    """STCH (Lin et al., "Smooth Tchebycheff Scalarization for Multi-Objective Optimization", ICML 2024,
    eq. 7, with LibMTL's multi-task recipe: log losses, nadir point from a warm-up).

    Schedule, with epochs numbered from 0 and ``W = warmup_epochs`` (LibMTL ``STCH_warmup_epoch``):

    * epochs ``0 .. W`` (``W + 1`` epochs, epoch ``W`` included) warm up: minimise ``sum_t log L_t``
      (so ``d = sum_t g_t / L_t``; not EW);
    * the nadir ``z_t`` is the mean of ``L_t`` over the updates of epoch ``W`` (the last warm-up epoch);
    * from epoch ``W + 1`` on, with ``l_t = log(L_t / z_t)``, minimise ``T mu logsumexp(l / mu)``, so
      ``d = T sum_t softmax(l/mu)_t g_t/L_t``.

    This is the schedule of LibMTL's ``STCH.backward`` (and of the STCH authors' STCH_MTL code, a LibMTL
    fork): ``epoch < W`` and ``epoch == W`` both take the log-loss step, epoch ``W`` also sums the detached
    losses and counts its batches, and the first step of a later epoch sets the nadir to that sum over the
    count. Defaults ``mu=1``, ``warmup_epochs=4`` (LibMTL's defaults), so epochs 0-4 warm up and STCH
    starts at epoch 5. The logged weights are the applied ones, ``d total / d L_t``.

    Where ours differs: an "epoch" is ``epoch_steps`` updates (default 100, ours; set it to the real
    epoch length), not a pass over the data loader, and epochs are counted among those with at least one
    applied update (a skipped step is not counted), so the nadir is never the mean of zero updates.
    Losses (and the nadir) are clamped at ``min_loss`` (1e-8) before the log, where LibMTL adds 1e-20.
    LibMTL's STCH loss drops the constant ``max_t l_t`` it subtracts inside the logsumexp; that changes
    the loss value, not the gradient. Small ``mu`` approaches the hard max over tasks and makes ``d``
    jumpy.
    """
    name = "stch"

    def __init__(self, num_tasks: int, mu: float = 1.0, warmup_epochs: int = 4, epoch_steps: int = 100,
                 min_loss: float = 1e-8):
        super().__init__(num_tasks)
        validate_range(self.name, "mu", mu, 0.0, low_open=True)
        validate_range(self.name, "warmup_epochs", warmup_epochs, 0)
        validate_range(self.name, "epoch_steps", epoch_steps, 1)
        validate_range(self.name, "min_loss", min_loss, 0.0, low_open=True)
        self.mu, self.warmup_epochs = float(mu), int(warmup_epochs)
        self.epoch_steps, self.min_loss = int(epoch_steps), float(min_loss)

    def init_state(self) -> PyTree:
        return {"epochs": init_epoch_means(self.num_tasks),
                "nadir": jnp.ones((self.num_tasks,), jnp.float32)}

    def combine(self, params, state, losses_T, step, rng=None):
        acc, finished, mean_T = roll_epoch(state["epochs"], step, self.epoch_steps)
        # ``completed`` counts finished epochs: it reaches W + 1 as epoch W (the last warm-up epoch) closes.
        nadir_T = jnp.where(finished & (acc["completed"] == self.warmup_epochs + 1),
                            jnp.maximum(mean_T, self.min_loss), state["nadir"])
        losses_T = clamp_losses(losses_T, self.min_loss)
        log_T = jnp.log(losses_T)
        scaled_T = (log_T - jnp.log(nadir_T)) / self.mu
        stch_total = self.num_tasks * self.mu * jax.nn.logsumexp(scaled_T)
        stch_weights_T = self.num_tasks * jax.nn.softmax(scaled_T) / losses_T
        in_warmup = acc["completed"] <= self.warmup_epochs  # epochs 0 .. W
        total = jnp.where(in_warmup, jnp.sum(log_T), stch_total)
        weights_T = jax.lax.stop_gradient(jnp.where(in_warmup, 1.0 / losses_T, stch_weights_T))
        return total, weights_T, {"epochs": accumulate(acc, losses_T), "nadir": nadir_T}
