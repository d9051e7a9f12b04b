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

    Warm-up (the first ``warmup_epochs`` epochs): minimise ``sum_t log L_t`` (so ``d = sum_t g_t / L_t``;
    not EW). The nadir ``z_t`` is the mean loss of the last warm-up epoch. Afterwards, with
    ``l_t = log(L_t / z_t)``, minimise ``T mu logsumexp(l / mu)``, so ``d = T sum_t softmax(l/mu)_t g_t/L_t``.
    The logged weights are the applied ones, ``d total / d L_t``. Defaults ``mu=1``, ``warmup_epochs=4``
    (LibMTL; the official STCH_MTL code is a LibMTL fork); ``epoch_steps=100`` is ours. Losses are
    clamped at ``min_loss`` (1e-8) because the method takes their log. Small ``mu`` approaches the hard
    max over tasks and makes ``d`` jumpy.
    """
    name = "stch"

    def __init__(self, num_tasks: int, mu: float = 1.0, warmup_epochs: int = 4, epoch_steps: int = 100,
                 min_loss: float = 1e-8):
        super().__init__(num_tasks)
        validate_range(self.name, "mu", mu, 0.0, low_open=True)
        validate_range(self.name, "warmup_epochs", warmup_epochs, 1)
        validate_range(self.name, "epoch_steps", epoch_steps, 1)
        validate_range(self.name, "min_loss", min_loss, 0.0, low_open=True)
        self.mu, self.warmup_epochs = float(mu), int(warmup_epochs)
        self.epoch_steps, self.min_loss = int(epoch_steps), float(min_loss)

    def init_state(self) -> PyTree:
        return {"epochs": init_epoch_means(self.num_tasks),
                "nadir": jnp.ones((self.num_tasks,), jnp.float32)}

    def combine(self, params, state, losses_T, step, rng=None):
        acc, finished, mean_T = roll_epoch(state["epochs"], step, self.epoch_steps)
        nadir_T = jnp.where(finished & (acc["completed"] == self.warmup_epochs),
                            jnp.maximum(mean_T, self.min_loss), state["nadir"])
        losses_T = clamp_losses(losses_T, self.min_loss)
        log_T = jnp.log(losses_T)
        scaled_T = (log_T - jnp.log(nadir_T)) / self.mu
        stch_total = self.num_tasks * self.mu * jax.nn.logsumexp(scaled_T)
        stch_weights_T = self.num_tasks * jax.nn.softmax(scaled_T) / losses_T
        in_warmup = acc["completed"] < self.warmup_epochs
        total = jnp.where(in_warmup, jnp.sum(log_T), stch_total)
        weights_T = jax.lax.stop_gradient(jnp.where(in_warmup, 1.0 / losses_T, stch_weights_T))
        return total, weights_T, {"epochs": accumulate(acc, losses_T), "nadir": nadir_T}
