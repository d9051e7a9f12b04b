"""Train several seeds of one configuration at once: ``jax.vmap`` of the library's train step over seeds.

`train_seeds(config, seeds)` builds what `mtt_jax.train.build` builds (`mtt_jax.builder.build_parts`:
tasks, data sources, model, weighting method, optimizer), then runs
``jax.vmap(mtt_jax.train_step.train_step)`` over a leading seed
axis of the train state, inside a ``lax.scan`` over chunks of steps, so one compiled program trains every
seed and the host dispatches once per chunk. Seed ``s`` gets the initial state of a `train.build` run with
``config.seed = s`` and the train batches of a source built with that seed; the held-out sets are the same
for every seed (the sources' contract). Metrics are `mtt_jax.evaluation`'s (per-task loss and the task's
metrics on a whole held-out set), per seed, scored by the same code as a single run's.

``splits`` picks the held-out sets scored at every eval (`mtt_jax.data.base.SPLITS`): choose on
``"validation"``, report ``"test"`` once. ``SeedRuns.by_split[split][step]`` holds every one;
``final`` and ``evals`` are the test split's (or the only split's), as before there were two.

A ``model`` other than the config's Transformer (`mtt_jax.models.variants`) can be passed in, and a
``sampler`` that draws the train batches on the device (the synthetic toys), a pure function
``(key, step) -> batch`` of one seed's data key.

No mesh: experiments run on one device (CPU or one accelerator), which is what seeds-in-a-vmap is for.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtt_jax import builder, data, evaluation, train_step as steps
from mtt_jax.data.base import SPLITS, check_split
from mtt_jax.run.prefetch import prefetch

Sampler = Callable[[jax.Array, jax.Array], dict]


@dataclasses.dataclass
class SeedRuns:
    """What `train_seeds` returns; every list has one entry per seed."""
    seeds: list[int]
    task_names: list[str]
    final: list[dict]                 # eval metrics after the last step (run_eval's keys), of `split`
    evals: dict[int, list[dict]]      # step -> eval metrics per seed, of `split`
    curve_steps: np.ndarray           # [N] steps at which ``curve_losses`` were recorded
    curve_losses: np.ndarray          # [N, S, T] train task losses (mean over each logging window)
    curve_weights: np.ndarray         # [N, S, T] applied task weights (same windows)
    affinity: np.ndarray | None       # [S, T, T] TAG lookahead affinity averaged over the run, or None
    wall_seconds: float
    num_params: int
    state: Any = None                 # final train state, seed axis first
    # held-out split -> step -> eval metrics per seed, for every split scored (`train_seeds`' splits)
    by_split: dict[str, dict[int, list[dict]]] = dataclasses.field(default_factory=dict)
    split: str = "test"               # the split of ``final`` and ``evals``

    def metric(self, key: str, evals_step: int | None = None, split: str | None = None) -> np.ndarray:
        """``[S]`` values of one eval metric (``"<task>/<metric>"``), final or at ``evals_step``, on
        held-out set ``split`` (None: that of ``final`` and ``evals``)."""
        if split is None:
            rows = self.final if evals_step is None else self.evals[evals_step]
        else:
            if split not in self.by_split:
                raise ValueError(f"split {split!r} was not scored; scored: {', '.join(self.by_split)} "
                                 "(request it with train_seeds(..., splits=...))")
            by_step = self.by_split[split]
            rows = by_step[max(by_step) if evals_step is None else evals_step]
        return np.asarray([r[key] for r in rows], np.float64)


def make_pieces(config, model: nn.Module | None = None):
    """``(tasks, source of seed 0, model, method, tx)`` as `mtt_jax.train.build` makes them."""
    parts = builder.build_parts(config, seed=0, model=model)
    return parts.tasks, parts.source, parts.model, parts.method, parts.tx


def chunk_size(total_steps: int, every: Sequence[int], limit: int = 50) -> int:
    """The largest number of steps per compiled chunk that divides ``total_steps`` and every interval."""
    g = total_steps
    for e in every:
        if e:
            g = math.gcd(g, e)
    return max(d for d in range(1, min(limit, g) + 1) if g % d == 0)


def train_seeds(config, seeds: Sequence[int], *, model: nn.Module | None = None,
                sampler: Sampler | None = None, eval_every: int = 0, log_every: int = 0,
                sampler_args: Any = None, eval_sources: Sequence[data.Source] | None = None,
                affinity_every: int = 0, max_chunk: int = 50, keep_state: bool = False,
                eval_at_start: bool = False, progress: Callable[[str], None] | None = None,
                splits: Sequence[str] = ("test",), learning_rates: Sequence[float] | None = None,
                baselines: bool = False) -> SeedRuns:
    """Trains ``len(seeds)`` runs of ``config`` in one vmapped program; see the module docstring.

    ``eval_every``: also evaluate every that many steps (0: at the end only; ``eval_at_start``: and
    before the first step). Each eval scores every held-out set in ``splits`` (`SeedRuns.by_split`).

    Runs need not share their data: with ``sampler_args`` (a pytree with a leading run axis) the sampler
    is called as ``sampler(key, step, args_of_the_run)``, and ``eval_sources`` (one per run) scores each
    run on its own eval set. Repeated seeds then give paired runs (same initialisation, same draws), e.g.
    one per correlation of the MMoE pairs, all in one compiled program. ``log_every``: window of
    the train-loss curve (0: ``config.log_every``). ``affinity_every``: TAG lookahead affinity
    (`mtt_jax.affinity`) every that many steps, on the batch of that step, averaged over the run.

    ``learning_rates`` (one per run): run r trains at peak learning rate ``learning_rates[r]`` instead
    of ``config.optimizer.learning_rate`` (`scale_by_run_factor`), so a learning-rate sweep over
    several seeds is one program. ``baselines``: every eval also holds each task's input-blind
    predictor (``"<task>/baseline_<metric>"``, `mtt_jax.tasks.trivial_baseline`).
    """
    start = time.perf_counter()
    splits = check_splits(splits)
    seeds = [int(s) for s in seeds]
    total = int(config.total_steps)
    log_every = min(log_every or int(config.log_every), total)
    task_specs, source, model, method, tx = make_pieces(config, model)
    if learning_rates is not None:
        tx = optax.chain(tx, scale_by_run_factor())
    layout = source.layout
    sources = ([data.make_source(config.data.source, config.tasks, seed=s, **dict(config.data.options))
                for s in seeds] if sampler is None else [])
    run_sources = list(eval_sources) if eval_sources is not None else [source] * len(seeds)
    if len(run_sources) != len(seeds):
        raise ValueError(f"eval_sources has {len(run_sources)} entries for {len(seeds)} runs")

    # --- Init: one state per seed, stacked. ----------------------------------------------------------
    sample_inputs = jnp.asarray(source.train_batch(0, int(config.batch_size))["inputs"])
    init = lambda rng: nn.unbox(steps.init_state(rng, model, method, tx, sample_inputs))
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    states = jax.jit(jax.vmap(init))(keys)
    if learning_rates is not None:
        states = states.replace(opt_state=(states.opt_state[0], RunFactorState(
            run_factors(learning_rates, float(config.optimizer.learning_rate), len(seeds)))))
    num_params = int(sum(x.size for x in jax.tree.leaves(states.params["model"])) // len(seeds))
    data_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2**20))(keys) if sampler is not None else None

    # --- Update, evals and affinity, then the loop over chunks of steps. ------------------------------
    programs = SeedPrograms(config, model, task_specs, layout, method, tx, sampler, sampler_args, data_keys,
                            affinity_every)
    chunk = chunk_size(total, [eval_every, log_every, affinity_every], max_chunk)
    score = lambda states: {split: evaluate(programs.eval, states, run_sources, task_specs,
                                            config.eval_batch_size, layout, split, baselines)
                            for split in splits}
    scored = {0: score(states)} if eval_at_start else {}   # step -> split -> metrics per seed
    states, losses_NxSxT, weights_NxSxT, affinity = _train_chunks(
        programs, states, sources, int(config.batch_size), total, chunk, eval_every, affinity_every, score,
        scored, progress)
    scored[total] = score(states)
    by_split = {split: {step: by[split] for step, by in scored.items()} for split in splits}
    split = "test" if "test" in splits else splits[0]

    windows = total // log_every
    window_mean = lambda x: x[:windows * log_every].reshape((windows, log_every) + x.shape[1:]).mean(1)
    return SeedRuns(seeds=seeds, task_names=list(config.tasks), final=by_split[split][total],
                    evals=by_split[split], curve_steps=np.arange(1, windows + 1) * log_every,
                    curve_losses=window_mean(losses_NxSxT), curve_weights=window_mean(weights_NxSxT),
                    affinity=affinity, wall_seconds=time.perf_counter() - start, num_params=num_params,
                    state=states if keep_state else None, by_split=by_split, split=split)


def check_splits(splits: Sequence[str]) -> tuple[str, ...]:
    """``splits`` as a tuple: one or more of `mtt_jax.data.base.SPLITS`, each once (a one-line
    ValueError otherwise)."""
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    if not splits or len(set(splits)) != len(splits):
        raise ValueError(f"splits={splits} must name one or more of {', '.join(SPLITS)}, each once")
    for split in splits:
        check_split(split)
    return splits


class SeedPrograms:
    """The compiled programs of `train_seeds`: a chunk of steps of the vmapped train step under one
    ``lax.scan`` (host batches ``[K, S, ...]``, or with a ``sampler`` the K step numbers, the batches then
    drawn on the device), the vmapped eval step, and TAG's lookahead affinity."""

    def __init__(self, config, model, task_specs, layout, method, tx, sampler, sampler_args, data_keys,
                 affinity_every: int):
        self.sampler, self.sampler_args, self.data_keys = sampler, sampler_args, data_keys
        self.step_fn = jax.vmap(steps.bind(steps.train_step, model=model, tasks=task_specs, layout=layout,
                                           method=method, tx=tx, rep_grad=bool(config.weighting.rep_grad)))
        self.chunk = jax.jit(self._chunk, donate_argnums=0)
        self.eval = jax.jit(jax.vmap(steps.bind(steps.eval_step, model=model, tasks=task_specs,
                                                layout=layout), in_axes=(0, None)))
        schedule = steps.learning_rate_schedule(config.optimizer, int(config.total_steps))
        one_affinity = builder.affinity_step(model, task_specs, layout, schedule, config.affinity.lr)
        self.affinity = jax.jit(jax.vmap(one_affinity)) if affinity_every else None
        self.sampled_batch_fn = jax.jit(self.sampled_batch) if sampler is not None else None

    def sampled_batch(self, step):
        """Every run's batch of ``step``, drawn on the device (``sampler``)."""
        if self.sampler_args is None:
            return jax.vmap(lambda key: self.sampler(key, step))(self.data_keys)
        return jax.vmap(lambda key, args: self.sampler(key, step, args))(self.data_keys, self.sampler_args)

    def _chunk(self, states, batches_or_steps):
        def body(states, batch_or_step):
            batch = batch_or_step if self.sampler is None else self.sampled_batch(batch_or_step)
            states, metrics = self.step_fn(states, batch)
            return states, {"task_losses": metrics["task_losses"], "weights": metrics["weights"]}
        return jax.lax.scan(body, states, batches_or_steps)


def _train_chunks(programs: SeedPrograms, states, sources, batch_size: int, total: int, chunk: int,
                  eval_every: int, affinity_every: int, score, evals: dict, progress):
    """Every chunk of steps (host batches built ahead on a thread): the states, the per-step train
    losses and weights ``[N, S, T]``, and the mean affinity (None without); intermediate evals go into
    ``evals``."""
    num_chunks = total // chunk

    def host_chunk(index: int):
        first = index * chunk
        per_step = [stack([src.train_batch(first + k, batch_size) for src in sources]) for k in range(chunk)]
        return stack(per_step)

    chunks = (prefetch(host_chunk, 0, num_chunks, 2) if programs.sampler is None
              else ((i, None) for i in range(num_chunks)))
    losses, weights_log, affinity_sum, affinity_count = [], [], None, 0
    for index, host_batches in chunks:
        first = index * chunk
        if programs.affinity is not None and first % affinity_every == 0 and first > 0:
            batch = (jax.tree.map(lambda x: x[0], host_batches) if programs.sampler is None  # step `first`'s
                     else programs.sampled_batch_fn(jnp.asarray(first)))
            value = np.asarray(jax.device_get(programs.affinity(states, batch)))
            affinity_sum = value if affinity_sum is None else affinity_sum + value
            affinity_count += 1
        inputs = host_batches if programs.sampler is None else jnp.arange(first, first + chunk)
        states, metrics = programs.chunk(states, inputs)
        metrics = jax.device_get(metrics)
        losses.append(metrics["task_losses"])
        weights_log.append(metrics["weights"])
        done = first + chunk
        if eval_every and done % eval_every == 0 and done != total:
            evals[done] = score(states)
        if progress is not None and (index + 1) % max(1, num_chunks // 4) == 0:
            progress(f"  step {done}/{total}: train loss "
                     f"{np.mean(metrics['task_losses'][-1], axis=0).round(4).tolist()}")
    affinity = None if affinity_sum is None else affinity_sum / affinity_count
    return states, np.concatenate(losses), np.concatenate(weights_log), affinity


class RunFactorState(NamedTuple):
    factor: jax.Array  # f32[]: this run's learning rate over the config's (a vmapped run: one each)


def scale_by_run_factor() -> optax.GradientTransformation:
    """Multiplies the updates by the factor held in the state (1 at init).

    Chained after `mtt_jax.train_step.make_optimizer`'s AdamW, whose update is ``-lr_t * (Adam's
    direction + weight_decay * params)`` with ``lr_t`` the warmup-cosine schedule of the peak rate, a
    factor k on the update is exactly training at peak rate ``k * learning_rate`` (the schedule's shape
    and its end value scale with the peak). Clipping acts on the gradients before, so it is unchanged.
    """
    return optax.GradientTransformation(
        lambda params: RunFactorState(jnp.ones((), jnp.float32)),
        lambda updates, state, params=None: (
            jax.tree.map(lambda u: u * state.factor.astype(u.dtype), updates), state))


def run_factors(learning_rates: Sequence[float], base: float, num_runs: int) -> jax.Array:
    """``f32[R]`` factors ``learning_rates / base``; a one-line ValueError for a wrong count or rate."""
    rates = np.asarray(learning_rates, np.float64)
    if rates.shape != (num_runs,):
        raise ValueError(f"learning_rates has {rates.size} entries for {num_runs} runs")
    if not (np.all(np.isfinite(rates)) and np.all(rates > 0)) or not base > 0:
        raise ValueError(f"learning rates must be finite and > 0, got {rates.tolist()} (base {base})")
    return jnp.asarray(rates / base, jnp.float32)


def stack(trees: list) -> Any:
    """Stacks numpy pytrees on a new leading axis."""
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def evaluate(eval_fn, states, run_sources: Sequence[data.Source], task_specs, batch_size: int,
             layout: str, split: str = "test", baselines: bool = False) -> list[dict]:
    """`mtt_jax.evaluation.score_eval_set` for every run of ``states`` at once: ``[metrics of run r]``,
    run r scored on held-out set ``split`` of ``run_sources[r]`` (runs that share a source are scored in
    one pass)."""
    results: list[dict | None] = [None] * len(run_sources)
    groups: dict[int, list[int]] = {}
    for r, src in enumerate(run_sources):
        groups.setdefault(id(src), []).append(r)
    for members in groups.values():
        scores = evaluation.score_eval_set(lambda batch: eval_fn(states, batch), run_sources[members[0]],
                                           task_specs, batch_size, layout, runs=members, baselines=baselines,
                                           split=split)
        for r, metrics in zip(members, scores):
            results[r] = metrics
    return results


def single_task_config(config, task: str):
    """``config`` for one task alone: no task encoder or task attention (nothing to share with)."""
    single = config.copy_and_resolve_references()
    single.tasks = (task,)
    single.model.task_encoder = False
    single.model.task_attention = "none"
    single.weighting.name = "ew"
    single.weighting.rep_grad = False
    return single
