"""The training loop, readable top to bottom: Tasks, Mesh, Model, Shard, Checkpoint, Update, Evals, Loop.

    state, final_eval = train_and_evaluate(config, workdir)

The batch of step s is a pure function of (seed, s) and the dropout RNG of step s is folded from the
step, so the loop holds no hidden state beyond ``state``: a run restored from its checkpoint continues
exactly as if it had never stopped. Metrics of step s are read after step s + 1 has been dispatched, so
the host never waits on the device inside the loop.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from mtt_jax import (affinity, checkpoint, config_check, data, flops, memory_check, profile_window, sharding,
                     summary)
from mtt_jax import multihost
from mtt_jax import tasks as tasks_lib
from mtt_jax import lease, train_step as steps, weighting, workdir as workdir_lib
from mtt_jax.data import mixtures
from mtt_jax.models import build_model
from mtt_jax.prefetch import prefetch
from mtt_jax.writers import MetricWriter, Progress, StepTimer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteLossError(RuntimeError):
    """Raised with ``nonfinite = "halt"`` when a step's loss or gradient is not finite."""


@dataclasses.dataclass
class Setup:
    """What a config builds before the first step: data, mesh, model, method, optimizer, shardings.

    ``source`` serves the eval set (and, without a mixture, the train batches); ``train_source`` serves
    the train batches: the source itself, or its flat mixture (``data.mixture.method``).
    """
    tasks: tuple
    source: data.Source
    train_source: Any
    mesh: jax.sharding.Mesh
    rules: tuple
    model: nn.Module
    method: weighting.WeightingMethod
    tx: optax.GradientTransformation
    init: Callable            # rng -> boxed TrainState
    abstract_state: Any       # boxed (logically named) abstract TrainState
    state_shardings: Any
    batch_shardings: Any
    abstract_batch: Any       # the global train batch as ShapeDtypeStructs with batch_shardings
    seed: int = 0

    @property
    def layout(self) -> str:
        """Of the train batches: "single", "multi" or "flat" (eval batches: ``source.layout``)."""
        return self.train_source.layout

    @contextlib.contextmanager
    def context(self):
        """The mesh and logical axis rules, under which the steps must be traced (and the loop runs)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def on_one_device(self) -> "Setup":
        """This setup on this process's first device: the same global shapes, nothing partitioned.
        For programs that are lowered to be read, not run (`mtt_jax.benchmark.counting_lowering`)."""
        mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.local_devices()[:1])
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        batch_shardings = jax.tree.map(lambda _: replicated, self.batch_shardings)
        return dataclasses.replace(
            self, mesh=mesh, state_shardings=sharding.tree_shardings(self.abstract_state, mesh, self.rules),
            batch_shardings=batch_shardings,
            abstract_batch=jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        self.abstract_batch, batch_shardings))

    def create_state(self) -> steps.TrainState:
        """The initial state, created directly sharded (no host copy of the full parameters)."""
        with self.context():
            return jax.jit(lambda rng: nn.unbox(self.init(rng)), out_shardings=self.state_shardings)(
                jax.random.key(self.seed))


def build(config) -> Setup:
    """The `Setup` of a config that passed `config_check.validate`. What only the data source, the
    model's constructors or the batch sizes can tell (a sequence length the source cannot generate, a
    patch size the image does not divide, batches larger than the host's memory) is a one-line
    `config_check.ConfigError` too, found before the workdir is touched."""
    # --- Tasks and data -----------------------------------------------------------------------------
    tasks = tuple(tasks_lib.get(name) for name in config.tasks)
    with _as_config_error(f"data.source={config.data.source!r}: "):
        source = data.make_source(config.data.source, config.tasks, seed=config.seed,
                                  **dict(config.data.get("options", {})))
        train_source = source
        if config.data.get("mixture") and config.data.mixture.method:
            train_source = mixtures.FlatMixture(source, mixtures.rates_for(source, config.data.mixture))
    memory_check.check_host_batches(train_source, config.batch_size, config.eval_batch_size,
                                    config.prefetch)

    # --- Mesh -----------------------------------------------------------------------------------------
    mesh = sharding.make_mesh(config.mesh)
    rules = sharding.logical_rules(config.get("axis_rules"))
    sharding.check_batch_divisible(config.batch_size, mesh)

    # --- Model, optimizer, weighting method -----------------------------------------------------------
    with _as_config_error():
        model = build_model(config, tasks, source.layout, source.input_spec, DTYPES[config.dtype])
    method = weighting.make_method(config.weighting, len(tasks))
    tx = steps.make_optimizer(config.optimizer, config.total_steps)

    # --- Shard: shapes from eval_shape, shardings from logical names ----------------------------------
    sample_batch = source.train_batch(0, config.batch_size)
    init = lambda rng: steps.init_state(rng, model, method, tx, jnp.asarray(sample_batch["inputs"]))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), _as_config_error():  # modules check in setup
        abstract_state = jax.eval_shape(init, jax.random.key(config.seed))
    train_sample = sample_batch if train_source is source else train_source.train_batch(0, config.batch_size)
    state_shardings = sharding.tree_shardings(abstract_state, mesh, rules)
    batch_shardings = sharding.batch_shardings(train_sample, mesh, train_source.layout)
    try:
        sharding.check_divisible(abstract_state, state_shardings)
    except ValueError as e:
        raise config_check.ConfigError(f"mesh {dict(mesh.shape)}: {e}") from None
    return Setup(tasks=tasks, source=source, train_source=train_source, mesh=mesh, rules=rules,
                 model=model, method=method, tx=tx, init=init, abstract_state=abstract_state,
                 state_shardings=state_shardings,
                 batch_shardings=batch_shardings, abstract_batch=_abstract(train_sample, batch_shardings),
                 seed=config.seed)


@contextlib.contextmanager
def _as_config_error(prefix: str = ""):
    """A ValueError raised in the block (a data source's or a module's own check of its options) as a
    one-line `config_check.ConfigError`; a missing dataset keeps its own error and instructions."""
    try:
        yield
    except (config_check.ConfigError, data.DatasetNotPreparedError):
        raise
    except ValueError as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise config_check.ConfigError(f"{prefix}{first_line}") from None


def step_work(setup: Setup, config) -> tuple[flops.FlopCount, int, int]:
    """One train step's model FLOPs (`flops.training_flops`, the global batch), sequences, and tokens
    (0 without token inputs)."""
    spec = setup.source.input_spec
    count = flops.training_flops(config.model, setup.tasks, setup.layout, spec.kind, spec.shape,
                                 config.batch_size)
    sequences = config.batch_size * (len(setup.tasks) if setup.layout == "multi" else 1)
    return count, sequences, sequences * spec.shape[0] if spec.kind == "tokens" else 0


def device_peak_memory_mib() -> float | None:
    """The peak memory in use on this process's first device so far, where the runtime reports it (GPU
    and TPU runtimes do; XLA:CPU does not)."""
    stats = jax.local_devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


def compile_train_step(setup: Setup, grad_accum_steps: int = 1, rep_grad: bool = False,
                       diagnostics_every: int = 0, grad_accum_unroll: int = 1) -> Callable:
    """``(state, batch) -> (state, metrics)``, jitted with explicit shardings and the state donated."""
    replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        steps.bind(steps.train_step, model=setup.model, tasks=setup.tasks, layout=setup.layout,
                   method=setup.method, tx=setup.tx, grad_accum_steps=grad_accum_steps,
                   rep_grad=rep_grad, diagnostics_every=diagnostics_every,
                   grad_accum_unroll=grad_accum_unroll),
        in_shardings=(setup.state_shardings, setup.batch_shardings),
        out_shardings=(setup.state_shardings, replicated), donate_argnums=(0,))


def config_train_step(setup: Setup, config) -> Callable:
    """`compile_train_step` with the config's microbatching, representation gradients and diagnostics."""
    return compile_train_step(setup, config.grad_accum_steps, config.weighting.get("rep_grad", False),
                              config.weighting.get("diagnostics_every", 0),
                              config.get("grad_accum_unroll", 1))


def train_batches(setup: Setup, config, first_step: int, last_step: int):
    """``(step, device batch)`` for the steps in ``[first_step, last_step)``, built ahead on a host
    thread; each process builds only its rows."""
    make_batch = lambda step: sharding.shard_local_batch(
        setup.train_source.train_batch(step, config.batch_size, shard=sharding.process_shard()),
        setup.batch_shardings, setup.layout)
    return prefetch(make_batch, first_step, last_step, config.get("prefetch", 2))


def compile_affinity(setup: Setup, config, schedule) -> Callable:
    """TAG lookahead affinity of the current state on a batch (`mtt_jax.affinity`), jitted."""
    loss_fn = lambda outputs, b: steps.task_losses(setup.tasks, outputs, b, setup.layout)
    fixed_lr = config.affinity.get("lr", 0.0)

    def affinity_fn(state, batch):
        lr = fixed_lr if fixed_lr > 0 else schedule(state.step)
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        return affinity.lookahead_affinity(setup.model, state.params["model"], batch, setup.tasks,
                                           setup.layout, rng, loss_fn, lr)
    return jax.jit(affinity_fn, in_shardings=(setup.state_shardings, setup.batch_shardings))


@dataclasses.dataclass
class Steps:
    """The loop's jitted steps, compiled ahead of time (`compile_steps`)."""
    train: Callable           # (state, batch) -> (state, metrics)
    eval: Callable            # (state, eval batch) -> outputs
    eval_batch_shardings: Any


def compile_steps(setup: Setup, config) -> Steps:
    """The train and eval steps, compiled on abstract arguments with the loop's shardings (jit's cache
    then serves the loop's first calls) and refused in one line if they cannot fit in device memory
    (`memory_check`): found before the workdir is touched, not as an out-of-memory error mid-run."""
    train_step = config_train_step(setup, config)
    first_eval_batch = next(iter(setup.source.eval_batches(config.eval_batch_size)))
    eval_batch_shardings = sharding.batch_shardings(first_eval_batch, setup.mesh, setup.source.layout)
    replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    eval_step = jax.jit(steps.bind(steps.eval_step, model=setup.model, tasks=setup.tasks,
                                   layout=setup.source.layout),
                        in_shardings=(setup.state_shardings, eval_batch_shardings), out_shardings=replicated)
    abstract_state = checkpoint.abstract_like(nn.unbox(setup.abstract_state), setup.state_shardings)
    with setup.context():
        memory_check.check_compiled_step(
            train_step.lower(abstract_state, setup.abstract_batch).compile(), "train step",
            "lower batch_size, or set grad_accum_steps or model.remat, or use more devices")
        memory_check.check_compiled_step(
            eval_step.lower(abstract_state, _abstract(first_eval_batch, eval_batch_shardings)).compile(),
            "eval step", "lower eval_batch_size")
    return Steps(train=train_step, eval=eval_step, eval_batch_shardings=eval_batch_shardings)


def _abstract(host_batch, shardings):
    """The global ``jax.ShapeDtypeStruct``s of a host batch placed with ``shardings``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s),
                        host_batch, shardings)


def train_and_evaluate(config, workdir: str, quiet: bool = False, overwrite: bool = False,
                       preemption: checkpoint.PreemptionFlag | None = None
                       ) -> tuple[steps.TrainState | None, dict]:
    """Trains ``config`` in ``workdir`` (resuming the run there), evaluates, and writes the outputs.

    Everything that can refuse the config (the data source's and the model's checks, the mesh, the
    memory the steps need) runs before the workdir is touched. ``preemption`` is the SIGTERM flag the
    command line installs at its start; a SIGTERM before the first update stops the run there (state
    None), one later saves a checkpoint at the step reached.
    """
    with contextlib.ExitStack() as stack:
        preemption = preemption or stack.enter_context(checkpoint.PreemptionFlag())
        setup = build(config)  # first: a config that cannot be sharded fails before the workdir is touched
        compiled = compile_steps(setup, config)
        if preemption.requested:
            if jax.process_index() == 0 and not quiet:
                print("SIGTERM during start-up: stopped before the first update, nothing to save. Run the "
                      "same command to start.", flush=True)
            return None, {}
        held, error = None, None
        try:  # one run per workdir; every process stops with one line when process 0 cannot take it
            held = stack.enter_context(workdir_lib.lock(workdir, enabled=jax.process_index() == 0))
        except Exception as e:
            error = e
        multihost.agree_on_error(error, "taking the workdir lock")
        with multihost.watch_peers():  # a process that stops mid-run stops the others at once, in one line
            return _train_and_evaluate(setup, config, workdir, quiet, overwrite, compiled, held, preemption)


def _train_and_evaluate(setup: Setup, config, workdir: str, quiet: bool, overwrite: bool, compiled: Steps,
                        held, preemption: checkpoint.PreemptionFlag) -> tuple[steps.TrainState, dict]:
    is_primary = jax.process_index() == 0
    resuming, error = False, None
    try:
        if is_primary or not overwrite:  # with overwrite, process 0 clears the shared workdir
            resuming = workdir_lib.prepare(workdir, config, overwrite)
    except Exception as e:
        error = e
    # Every process has read the workdir before process 0 writes to it, and all stop if one cannot.
    multihost.agree_on_error(error, "preparing the workdir")
    workdir_lib.makedirs(workdir)
    if is_primary:  # first, so that whatever the run writes next is known to be this run's
        workdir_lib.write_config(workdir, config)
        summary.discard(workdir)  # a summary describes a finished run only
    tasks, source, mesh = setup.tasks, setup.source, setup.mesh
    layout = source.layout  # of the eval batches (the train batches may be a flat mixture)
    schedule = steps.learning_rate_schedule(config.optimizer, config.total_steps)

    def learning_rate(step: int) -> float:
        with jax.transfer_guard("allow"):  # a host-side evaluation of the schedule, on purpose
            return float(schedule(step))

    # --- Checkpoint: restore the newest readable one, or create the state directly sharded ----------
    checkpointer = checkpoint.Checkpointer(workdir, config.checkpoint_every, config.keep)
    state = None
    if resuming:
        state = checkpointer.restore_latest(
            checkpoint.abstract_like(nn.unbox(setup.abstract_state), setup.state_shardings))
    if state is None:
        state = setup.create_state()

    # --- Update and eval steps --------------------------------------------------------------------------
    diagnostics_every = config.weighting.get("diagnostics_every", 0)
    train_step, eval_step, eval_batch_shardings = compiled.train, compiled.eval, compiled.eval_batch_shardings
    gradient_method = setup.method.requires != "losses"
    affinity_every = config.affinity.every if config.get("affinity") else 0
    affinity_fn = compile_affinity(setup, config, schedule) if affinity_every else None

    # --- Writers ------------------------------------------------------------------------------------------
    first_step = int(state.step)
    writer = MetricWriter(workdir, enabled=is_primary, resume_after_step=first_step)
    progress = Progress(config.total_steps, first_step, enabled=is_primary and not quiet)
    timer = StepTimer()
    model_flops, sequences, tokens = step_work(setup, config)
    peak_flops = flops.datasheet_bf16_peak(jax.devices()[0].device_kind)  # None on a CPU
    # The records kept from before the checkpoint (read once, by process 0, on a resume): a resumed
    # run's affinity.json averages the same measurements as an uninterrupted one.
    kept = summary.read_metrics(workdir) if is_primary and first_step else []
    affinity_sum, affinity_count = affinity_so_far(kept)
    profile = config.get("profile") or {}
    profiled = profile_window.ProfileWindow(workdir, profile.get("first_step", 0),
                                            profile.get("num_steps", 1), first_step, enabled=is_primary)
    if profiled.missed:
        progress.message(f"profile: updates {profiled.first_step}-{profiled.last_step} not traced: this run "
                         f"resumes after update {first_step}")

    def evaluate(step: int) -> dict:
        metrics = run_eval(eval_step, state, source, tasks, config.eval_batch_size,
                           eval_batch_shardings, layout)
        writer.write(step, "eval", metrics)
        progress.message(f"eval @ {step}: " + "  ".join(
            f"{t.name}/{t.main_metric} {metrics[f'{t.name}/{t.main_metric}']:.4f}" for t in tasks))
        return metrics

    def log_train(step: int, metrics: dict) -> None:
        metrics = jax.device_get(metrics)
        if config.nonfinite == "halt" and not metrics["finite"]:
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {step}; halted without applying it (last good "
                f"checkpoint kept in {checkpointer.directory}; nonfinite='skip' steps over such batches)")
        if skips.add(not metrics["finite"]):
            raise NonFiniteLossError(
                f"{skips.count} of the last {skips.window} updates up to step {step} had a non-finite loss "
                f"or gradient and were skipped, more than nonfinite_skip_limit={skips.limit}; halted (last "
                f"good checkpoint kept in {checkpointer.directory}; lower the learning rate, or raise "
                f"nonfinite_skip_limit)")
        timing = timer.window(step)  # update `step` has just finished
        diagnostics_step = bool(diagnostics_every) and step % diagnostics_every == 0
        logged = not step % config.log_every or step == config.total_steps or diagnostics_step
        if logged or step == first_step + 1:  # a record's rate is of the updates since the record
            timer.mark(step)                  # before; the first update's time is the compile's
        if not logged:
            return
        record = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                  "learning_rate": learning_rate(step - 1),
                  "steps_per_second": progress.steps_per_second(step),
                  "skipped": int(not metrics["finite"])}
        if timing is not None:
            step_seconds, record["input_wait_fraction"] = timing
            record["step_ms"] = 1e3 * step_seconds
            record.update({k: v for k, v in flops.throughput(
                model_flops.training, sequences, tokens, step_seconds, mesh.devices.size,
                peak_flops).items() if v is not None})
        if (memory_mib := device_peak_memory_mib()) is not None:
            record["peak_memory_mib_per_device"] = memory_mib
        for i, t in enumerate(tasks):
            record[f"{t.name}/loss"] = float(metrics["task_losses"][i])
            record[f"weight/{t.name}"] = float(metrics["weights"][i])
        if "task_grad_norms" in metrics and (gradient_method or diagnostics_step):
            for i, t in enumerate(tasks):
                record[f"grad_norm/{t.name}"] = float(metrics["task_grad_norms"][i])
            for key in ("cosine_mean", "cosine_min", "conflict_fraction"):
                record[key] = float(metrics[key])
            if diagnostics_step:
                record["grad_cosine"] = np.round(metrics["grad_cosine"], 4).tolist()
        writer.write(step, "train", record)
        progress.update(step, record["loss"], force_line=True)

    def log_pending() -> None:
        """Logs the step whose metrics are still on the device (read one step late)."""
        nonlocal pending
        if pending is not None:
            log_train(*pending)
            pending = None

    def save_checkpoint(step: int, state, force: bool = False) -> bool:
        """Stores the metrics records written so far first (a bucket workdir uploads them in batches),
        so that every record a resume from this checkpoint keeps exists; whether it saved."""
        if not checkpointer.due(step, force):
            return False
        writer.flush()
        checkpointer.maybe_save(step, state, force=force)
        return True

    skips = SkipWindow(config.nonfinite_skip_window, config.nonfinite_skip_limit)

    def stop(reason: str, step: int, state) -> tuple[steps.TrainState, dict]:
        """Ends the loop at ``step`` on a SIGTERM or a lease about to be lost (after saving a checkpoint
        there), or on a lost lease (writing nothing more: another run may own the workdir now)."""
        if reason == lease.LOST:
            writer.abandon()
        else:
            log_pending()  # this step's record: the resumed run starts after it
            save_checkpoint(step, state, force=True)
        checkpointer.close()
        writer.close()
        profiled.close()
        why = held.reason or "process 0 is losing the workdir's lease"
        if reason == lease.LOST:
            raise workdir_lib.WorkdirError(f"{why}; stopped at step {step} without writing anything more "
                                           f"(what was stored before is kept)")
        if reason == lease.AT_RISK:
            raise workdir_lib.WorkdirError(f"{why}; saved the checkpoint at step {step} and stopped. Run the "
                                           f"same command to resume.")
        progress.message(f"SIGTERM: saved the checkpoint at step {step}; exiting. Run the same command to "
                         f"resume.")
        return state, last_eval

    # --- Loop -----------------------------------------------------------------------------------------------
    pending = None  # (step, metrics) of the previous step, read one step late
    progress.message(f"{f'resuming at step {first_step} of' if first_step else 'training'} "
                     f"{config.total_steps} steps on {mesh.devices.size} device(s), mesh "
                     f"{dict(mesh.shape)}, tasks {', '.join(config.tasks)}")
    last_eval, start, step = {}, time.perf_counter(), first_step
    if first_step and eval_missing(kept, first_step, config):
        # Killed after the checkpoint of an eval step was committed but before its eval was written:
        # the eval is a function of the restored state, so it is run now rather than lost.
        last_eval = evaluate(first_step)
    guard = jax.transfer_guard(config.transfer_guard)
    with setup.context(), guard:
        learning_rate(first_step)  # its eager ops compile now (under the mesh), not in a timed window
        try:
            batches = train_batches(setup, config, first_step, config.total_steps)
            for step, batch in timer.timed(batches):
                if affinity_fn is not None and (step + 1) % affinity_every == 0:
                    affinity_TxT = np.asarray(jax.device_get(affinity_fn(state, batch)))
                    affinity_sum, affinity_count = affinity_sum + affinity_TxT, affinity_count + 1
                    # Stamped like the train record of the same batch (the update it looks ahead of),
                    # so that a resume drops exactly the measurements it will take again; unrounded.
                    writer.write(step + 1, "affinity", {"affinity": affinity_TxT.tolist()})
                    timer.mark(step)
                profiled.before_update(step + 1, state)
                state, metrics = train_step(state, batch)
                if profiled.active:
                    traced = profiled.after_update(
                        step + 1, state, lambda: train_step.lower(state, batch).compile().as_text())
                    if traced:
                        progress.message(traced)
                        timer.mark(step + 1)  # the op table's reading is not an update's time
                log_pending()
                pending = (step + 1, metrics)
                if checkpointer.due(step + 1) or is_eval_step(step + 1, config):
                    log_pending()  # this step's record before its checkpoint and its eval
                saved = save_checkpoint(step + 1, state)
                if is_eval_step(step + 1, config):
                    last_eval = evaluate(step + 1)
                if saved or is_eval_step(step + 1, config):
                    timer.mark(step + 1)  # the record of step + 1 is written: the next window starts
                if reason := stop_requested(preemption, held, step + 1, config.log_every):
                    return stop(reason, step + 1, state)
            log_pending()
        except NonFiniteLossError:
            checkpointer.close()
            writer.close()
            profiled.close()
            raise
    save_checkpoint(config.total_steps, state, force=True)
    checkpointer.close()
    writer.close()
    if not last_eval and is_primary:  # restarted after the run had finished: nothing new to evaluate
        last_eval = next((r for r in reversed(summary.read_metrics(workdir))
                          if r["split"] == "eval" and r["step"] == config.total_steps), {})
    if is_primary and affinity_count:
        summary.write_affinity(workdir, tasks, affinity_sum / affinity_count, affinity_count)
    if is_primary:
        summary.write_summary(workdir, tasks, last_eval, config,
                              wall_seconds=time.perf_counter() - start,
                              skipped_steps=int(state.skipped_steps))
    return state, last_eval


def is_eval_step(step: int, config) -> bool:
    return step % config.eval_every == 0 or step == config.total_steps


def affinity_so_far(records: list[dict]) -> tuple[np.ndarray | float, int]:
    """The sum and number of the TAG affinity measurements among ``metrics.jsonl``'s records (float32,
    in order: the sum an uninterrupted run accumulates)."""
    measured = [np.asarray(r["affinity"], np.float32) for r in records if r["split"] == "affinity"]
    total = 0.0
    for affinity_TxT in measured:
        total = total + affinity_TxT
    return total, len(measured)


def eval_missing(records: list[dict], step: int, config) -> bool:
    """Whether ``step`` is an eval step without an eval record among process 0's ``records`` (the
    other processes have none and take process 0's answer)."""
    if not is_eval_step(step, config):
        return False
    missing = jax.process_index() == 0 and not any(r["split"] == "eval" and r["step"] == step
                                                   for r in records)
    if jax.process_count() > 1:
        missing = bool(multihost_utils.broadcast_one_to_all(np.asarray(missing)))
    return missing


STOP_REASONS = ("", "sigterm", lease.AT_RISK, lease.LOST)  # in order of precedence


def stop_requested(preemption: checkpoint.PreemptionFlag, held, step: int, every: int) -> str:
    """Why the loop must stop after ``step`` ("" if it goes on): a SIGTERM, or the workdir's lease at
    risk or lost (`mtt_jax.lease`; only process 0 holds it). Every process must stop at the same step
    for the same reason: with several, they agree every ``every`` steps on the gravest one."""
    held_state = held.state()
    local = max(STOP_REASONS.index("sigterm") if preemption.requested else 0,
                STOP_REASONS.index(held_state) if held_state in STOP_REASONS else 0)
    if jax.process_count() == 1:
        return STOP_REASONS[local]
    if step % every:
        return ""
    return STOP_REASONS[int(np.max(multihost_utils.process_allgather(np.asarray(local))))]


class SkipWindow:
    """The updates skipped for a non-finite loss among the last ``window`` (``nonfinite='skip'``): more
    than ``limit * window`` of them halt the run, which would otherwise end "successfully" having
    applied almost nothing."""

    def __init__(self, window: int, limit: float):
        self.window, self.limit = window, limit
        self._skipped = collections.deque(maxlen=window)

    @property
    def count(self) -> int:
        return sum(self._skipped)

    def add(self, skipped: bool) -> bool:
        """Records one update; whether the skipped ones now exceed the limit."""
        self._skipped.append(bool(skipped))
        return self.count > self.limit * self.window


def run_eval(eval_step, state, source, tasks, batch_size: int, shardings, layout: str) -> dict:
    """Scores the whole fixed eval set: per-task loss and metrics, and the mean task-attention map."""
    predictions = {t.name: [] for t in tasks}
    labels = {t.name: [] for t in tasks}
    token_masks = {t.name: [] for t in tasks}
    loss_sum, count, attention = 0.0, 0.0, []
    for host_batch in source.eval_batches(batch_size):
        out = jax.device_get(eval_step(state, sharding.shard_batch(host_batch, shardings, layout)))
        loss_sum, count = loss_sum + out["loss_sum"], count + out["count"]
        if "task_attention" in out:
            attention.append(out["task_attention"])
        for i, t in enumerate(tasks):
            keep = host_batch["mask"][t.name] > 0
            predictions[t.name].append(np.asarray(out["predictions"][t.name])[keep])
            labels[t.name].append(host_batch["labels"][t.name][keep])
            if t.kind == "tagging":
                task_inputs = host_batch["inputs"][i] if layout == "multi" else host_batch["inputs"]
                token_masks[t.name].append(task_inputs[keep] != 0)
    metrics = {"loss": float(np.sum(loss_sum / np.maximum(count, 1)))}
    for i, t in enumerate(tasks):
        pred, label = np.concatenate(predictions[t.name]), np.concatenate(labels[t.name])
        mask = np.concatenate(token_masks[t.name]) if t.kind == "tagging" else None
        metrics[f"{t.name}/loss"] = float(loss_sum[i] / max(count[i], 1))
        for name, value in tasks_lib.compute_metrics(t, pred, label, mask).items():
            metrics[f"{t.name}/{name}"] = value
        for name, value in tasks_lib.trivial_baseline(t, label, mask).items():
            metrics[f"{t.name}/baseline_{name}"] = value
    if attention:
        metrics["task_attention"] = np.mean(attention, axis=0).round(4).tolist()
    logging.info("eval: %s", {k: v for k, v in metrics.items() if k != "task_attention"})
    return metrics
