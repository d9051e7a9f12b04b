"""The training loop, readable top to bottom: Build, Lock, Workdir, Checkpoint, Outputs, Loop, Finish.

    state, final_eval = train_and_evaluate(config, workdir)

This module is the training library's entry point: `mtt_jax.main`, the experiments and the tests use
it, and it re-exports what the loop is made of (`mtt_jax.builder`: the run's setup and compiled steps;
`mtt_jax.evaluation`: scoring the eval set; `mtt_jax.train_records`: the train records).

The batch of step s is a pure function of (seed, s) and the dropout RNG of step s is folded from the
step, so the loop holds no hidden state beyond ``state``: a run restored from its checkpoint continues
exactly as if it had never stopped. Metrics of step s are read after step s + 1 has been dispatched, so
the host never waits on the device inside the loop.
"""

from __future__ import annotations

import contextlib
import time

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from mtt_jax.perf import flops, profile_window
from mtt_jax.run import checkpoint, lease, multihost, summary
from mtt_jax import task_grads, train_step as steps
from mtt_jax.run import workdir as workdir_lib
from mtt_jax.builder import (DTYPES, Parts, Setup, Steps, build, build_parts, compile_affinity,  # noqa: F401
                             compile_steps, compile_train_step, config_train_step, device_peak_memory_mib,
                             step_work, train_batches)
from mtt_jax.evaluation import run_eval
from mtt_jax.train_records import NonFiniteLossError, SkipWindow, Throughput, TrainLog  # noqa: F401
from mtt_jax.run.writers import MetricWriter, Progress, StepTimer

STOP_REASONS = ("", "sigterm", lease.AT_RISK, lease.LOST)  # in order of precedence


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
        _on_process_zero(lambda: workdir_lib.check_free(workdir), "checking the workdir lock")
        # --- Build: first, so that a config that cannot run fails before the workdir is touched ---------
        setup = build(config)
        compiled = compile_steps(setup, config)
        if preemption.requested:
            if jax.process_index() == 0 and not quiet:
                print("SIGTERM during start-up: stopped before the first update, nothing to save. Run the "
                      "same command to start.", flush=True)
            return None, {}
        # --- Lock: one run per workdir; every process stops with one line if process 0 cannot take it --
        held = _on_process_zero(lambda: stack.enter_context(
            workdir_lib.lock(workdir, enabled=jax.process_index() == 0)), "taking the workdir lock",
            every_process=True)
        with multihost.watch_peers():  # a process that stops mid-run stops the others at once, in one line
            return _run(setup, compiled, config, workdir, quiet, overwrite, held, preemption)


def _block_names(setup: Setup) -> tuple[str, ...]:
    """The names of the groups of per-block aggregation (``weighting.blocks``), or () without it."""
    shared_shapes, _ = task_grads.split_params(nn.unbox(setup.abstract_state.params["model"]))
    grouping = setup.method.block_grouping(shared_shapes)
    return grouping.names if grouping is not None else ()


def _on_process_zero(action, where: str, every_process: bool = False):
    """``action()`` on process 0 (on every process with ``every_process``), its error raised on all
    (`multihost.agree_on_error`); returns its result, None where it did not run."""
    result, error = None, None
    if every_process or jax.process_index() == 0:
        try:
            result = action()
        except Exception as e:
            error = e
    multihost.agree_on_error(error, where)
    return result


def _run(setup: Setup, compiled: Steps, config, workdir: str, quiet: bool, overwrite: bool, held,
         preemption: checkpoint.PreemptionFlag) -> tuple[steps.TrainState, dict]:
    is_primary = jax.process_index() == 0
    # --- Workdir: checked (or cleared) on every process before process 0 writes to it ------------------
    resuming = _prepare_workdir(workdir, config, overwrite)
    # --- Checkpoint: restore the newest readable one, or create the state directly sharded ------------
    checkpointer = checkpoint.Checkpointer(workdir, config.checkpoint_every, config.keep)
    state = checkpointer.restore_latest(checkpoint.abstract_like(
        nn.unbox(setup.abstract_state), setup.state_shardings)) if resuming else None
    state = setup.create_state() if state is None else state
    first_step = int(state.step)
    # The records kept from before the checkpoint (read once, by process 0, on a resume): a resumed
    # run's affinity.json averages the same measurements as an uninterrupted one.
    kept = summary.read_metrics(workdir) if is_primary and first_step else []
    start = time.perf_counter()
    # --- Outputs: closed however the loop ends (a lost lease abandons the bucket's uploads first) -------
    with contextlib.ExitStack() as stack:
        run = RunOutputs(setup, compiled, config, workdir, quiet, held, checkpointer, first_step, kept, stack)
        state, last_eval, stopped = _loop(run, setup, compiled, config, state, kept, preemption)
        if stopped:
            return state, last_eval
        run.save(config.total_steps, state, force=True)
        if last_eval:
            run.writer.write_run_summary(summary.hparams(config), last_eval,
                                         summary.per_task_table(setup.tasks, last_eval), config.total_steps)
    # --- Finish: the summary of a finished run --------------------------------------------------------------
    if is_primary:
        if not last_eval:  # restarted after the run had finished: nothing new to evaluate
            last_eval = next((r for r in reversed(summary.read_metrics(workdir))
                              if r["split"] == "eval" and r["step"] == config.total_steps), {})
        run.affinity.write(workdir)
        summary.write_summary(workdir, setup.tasks, last_eval, config, wall_seconds=time.perf_counter() - start,
                              skipped_steps=int(state.skipped_steps))
    return state, last_eval


def _loop(run: "RunOutputs", setup: Setup, compiled: Steps, config, state, kept: list[dict],
          preemption: checkpoint.PreemptionFlag) -> tuple[steps.TrainState, dict, bool]:
    """Updates from the restored step to the last; ``(state, last eval, whether it stopped early)``."""
    first_step, last_eval = int(state.step), {}
    run.announce(first_step)
    if first_step and eval_missing(kept, first_step, config):
        # Killed after the checkpoint of an eval step was committed but before its eval was written:
        # the eval is a function of the restored state, so it is run now rather than lost.
        last_eval = run.evaluate(first_step, state)
    with setup.context(), jax.transfer_guard(config.transfer_guard):
        run.learning_rate(first_step)  # its eager ops compile now (under the mesh), not in a timed window
        for step, batch in run.timer.timed(train_batches(setup, config, first_step, config.total_steps)):
            run.affinity.maybe_measure(step, state, batch)
            run.profiled.before_update(step + 1, state)
            state, metrics = compiled.train(state, batch)
            run.after_update(step + 1, state, batch)
            run.log.push(step + 1, metrics)
            eval_step = is_eval_step(step + 1, config)
            if run.checkpointer.due(step + 1) or eval_step:
                run.log.flush()  # this step's record before its checkpoint and its eval
            saved = run.save(step + 1, state)
            if eval_step:
                last_eval = run.evaluate(step + 1, state)
            if saved or eval_step:
                run.timer.mark(step + 1)  # the record of step + 1 is written: the next window starts
            if reason := stop_requested(preemption, run.held, step + 1, config.log_every):
                run.stop(reason, step + 1, state)
                return state, last_eval, True
        run.log.flush()
    return state, last_eval, False


class RunOutputs:
    """What the loop writes and how: metrics and TensorBoard (`MetricWriter`), checkpoints, the profile
    window, the progress line, the train records (`TrainLog`) and TAG affinity (`AffinityProbe`); each
    closed by ``stack`` however the loop ends."""

    def __init__(self, setup: Setup, compiled: Steps, config, workdir: str, quiet: bool, held,
                 checkpointer: checkpoint.Checkpointer, first_step: int, kept: list[dict],
                 stack: contextlib.ExitStack):
        is_primary = jax.process_index() == 0
        self.setup, self.compiled, self.config, self.held = setup, compiled, config, held
        self.checkpointer = checkpointer
        self.writer = stack.enter_context(contextlib.closing(
            MetricWriter(workdir, enabled=is_primary, resume_after_step=first_step)))
        stack.callback(checkpointer.close)
        self.profiled = stack.enter_context(contextlib.closing(profile_window.ProfileWindow(
            workdir, config.profile.first_step, config.profile.num_steps, first_step, enabled=is_primary)))
        self.progress = Progress(config.total_steps, first_step, enabled=is_primary and not quiet)
        self.timer = StepTimer()
        self.schedule = steps.learning_rate_schedule(config.optimizer, config.total_steps)
        self.log = TrainLog(config, config.tasks, self.writer, self.progress, self.timer, first_step,
                            self.learning_rate, _throughput(setup, config),
                            setup.method.requires not in ("losses", "lookahead"),  # per-task gradients
                            device_peak_memory_mib, f"last good checkpoint kept in {checkpointer.directory}",
                            _block_names(setup))
        self.affinity = AffinityProbe(setup, config, self.schedule, self.writer, self.timer, kept)

    def learning_rate(self, step: int) -> float:
        with jax.transfer_guard("allow"):  # a host-side evaluation of the schedule, on purpose
            return float(self.schedule(step))

    def announce(self, first_step: int) -> None:
        config, mesh, profiled = self.config, self.setup.mesh, self.profiled
        if profiled.missed:
            self.progress.message(f"profile: updates {profiled.first_step}-{profiled.last_step} not traced: "
                                  f"this run resumes after update {first_step}")
        self.progress.message(f"{f'resuming at step {first_step} of' if first_step else 'training'} "
                              f"{config.total_steps} steps on {mesh.devices.size} device(s), mesh "
                              f"{dict(mesh.shape)}, tasks {', '.join(config.tasks)}")

    def after_update(self, step: int, state, batch) -> None:
        """Closes the profile window after its last update, with the op table of the compiled step."""
        train = self.compiled.train
        if self.profiled.active and (traced := self.profiled.after_update(
                step, state, lambda: train.lower(state, batch).compile().as_text())):
            self.progress.message(traced)
            self.timer.mark(step)  # the op table's reading is not an update's time

    def evaluate(self, step: int, state) -> dict:
        setup = self.setup
        metrics = run_eval(self.compiled.eval, state, setup.source, setup.tasks, self.config.eval_batch_size,
                           self.compiled.eval_batch_shardings, setup.source.layout,
                           split=self.config.data.get("eval_split", "test"))
        self.writer.write(step, "eval", metrics)
        self.progress.message(f"eval @ {step}: " + "  ".join(
            f"{t.name}/{t.main_metric} {metrics[f'{t.name}/{t.main_metric}']:.4f}" for t in setup.tasks))
        return metrics

    def save(self, step: int, state, force: bool = False) -> bool:
        """Stores the records written so far first (a bucket workdir uploads them in batches), so that
        every record a resume from this checkpoint keeps exists; whether it saved."""
        if not self.checkpointer.due(step, force):
            return False
        self.writer.flush()
        self.checkpointer.maybe_save(step, state, force=force)
        return True

    def stop(self, reason: str, step: int, state) -> None:
        """Ends the run at ``step``: on a SIGTERM or a lease at risk after saving a checkpoint there; on a
        lost lease writing nothing more (another run may own the workdir now)."""
        if reason == lease.LOST:
            self.writer.abandon()
        else:
            self.log.flush()  # this step's record: the resumed run starts after it
            self.save(step, state, force=True)
        why = (self.held.reason if self.held is not None else "") or "process 0 is losing the workdir's lease"
        if reason == lease.LOST:
            raise workdir_lib.WorkdirError(f"{why}; stopped at step {step} without writing anything more "
                                           f"(what was stored before is kept)")
        if reason == lease.AT_RISK:
            raise workdir_lib.WorkdirError(f"{why}; saved the checkpoint at step {step} and stopped. Run the "
                                           f"same command to resume.")
        self.progress.message(f"SIGTERM: saved the checkpoint at step {step}; exiting. Run the same command "
                              f"to resume.")


def _prepare_workdir(workdir: str, config, overwrite: bool) -> bool:
    """Checks (with ``overwrite``, process 0 clears) the workdir on every process, all stopping with
    one line if one cannot; writes ``config.json`` first, so that whatever the run writes next is known
    to be its run's. Whether there is a run to resume."""
    is_primary, resuming, error = jax.process_index() == 0, False, None
    try:
        if is_primary or not overwrite:
            resuming = workdir_lib.prepare(workdir, config, overwrite)
    except Exception as e:
        error = e
    multihost.agree_on_error(error, "preparing the workdir")
    workdir_lib.makedirs(workdir)
    if is_primary:
        workdir_lib.write_config(workdir, config)
        summary.discard(workdir)  # a summary describes a finished run only
    return resuming


def _throughput(setup: Setup, config) -> Throughput:
    model_flops, sequences, tokens = step_work(setup, config)
    return Throughput(model_flops.training, sequences, tokens, setup.mesh.devices.size,
                      flops.datasheet_bf16_peak(jax.devices()[0].device_kind))  # no peak on a CPU


class AffinityProbe:
    """TAG's lookahead affinity every ``affinity.every`` updates, on the batch of the update it looks
    ahead of; averaged over the run (the measurements kept from before a resume included) into
    ``affinity.json``."""

    def __init__(self, setup: Setup, config, schedule, writer: MetricWriter, timer: StepTimer,
                 kept: list[dict]):
        self.every = config.affinity.every
        self.fn = compile_affinity(setup, config, schedule) if self.every else None
        self.tasks, self.writer, self.timer = setup.tasks, writer, timer
        self.sum, self.count = affinity_so_far(kept)

    def maybe_measure(self, step: int, state, batch) -> None:
        if self.fn is None or (step + 1) % self.every:
            return
        affinity_TxT = np.asarray(jax.device_get(self.fn(state, batch)))
        self.sum, self.count = self.sum + affinity_TxT, self.count + 1
        # Stamped like the train record of the same batch (the update it looks ahead of), so that a
        # resume drops exactly the measurements it will take again; unrounded.
        self.writer.write(step + 1, "affinity", {"affinity": affinity_TxT.tolist()})
        self.timer.mark(step)

    def write(self, workdir: str) -> None:
        if self.count:
            summary.write_affinity(workdir, self.tasks, self.sum / self.count, self.count)


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


def stop_requested(preemption: checkpoint.PreemptionFlag, held, step: int, every: int) -> str:
    """Why the loop must stop after ``step`` ("" if it goes on): a SIGTERM, or the workdir's lease at
    risk or lost (`mtt_jax.run.lease`; only process 0 holds it). Every process must stop at the same step
    for the same reason: with several, they agree every ``every`` steps on the gravest one."""
    held_state = held.state() if held is not None else lease.HELD
    local = max(STOP_REASONS.index("sigterm") if preemption.requested else 0,
                STOP_REASONS.index(held_state) if held_state in STOP_REASONS else 0)
    if jax.process_count() == 1:
        return STOP_REASONS[local]
    if step % every:
        return ""
    return STOP_REASONS[int(np.max(multihost_utils.process_allgather(np.asarray(local))))]
