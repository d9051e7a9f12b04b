"""Command line: ``python -m mtt_jax.main --config configs/default.py --workdir DIR [--config.x=y]``.

The config and the workdir are checked before anything is created: a bad config, a workdir that
holds a different run, or one the run could not keep (a file, a bucket that cannot be written) exits
with status 2 and one line saying what is wrong and how to fix it. ``--workdir`` may be a bucket URL
(``gs://bucket/run``; `mtt_jax.run.workdir`). A config file is found by its path from any working
directory, its sibling configs with it (`mtt_jax.run.cli.make_config_imports_resolve`).

The console shows the run's progress, warnings and errors; the libraries' INFO lines (orbax's, for
every checkpoint) only with ``--verbosity=0`` (`mtt_jax.run.cli.quiet_library_logs`).

On the CPU, large host allocations go on huge pages when the launcher asks for it
(``python -m launch.local --huge_pages``; `mtt_jax.perf.huge_pages`).

Multi-host (`mtt_jax.run.cli.initialize_distributed`): on Cloud TPU and under SLURM,
``jax.distributed.initialize()`` finds the coordinator itself; elsewhere pass ``--coordinator_address
--num_processes --process_id``. CPU processes exchange collectives through gloo.
"""

from __future__ import annotations

import contextlib
import errno

from absl import app, flags

from mtt_jax.run import cli
from mtt_jax.run.cli import fail, initialize_distributed, parse_flags

_CONFIG = cli.CONFIG
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, checkpoints.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Discard a different run found in --workdir.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress lines on stdout.")
flags.mark_flags_as_required(["config", "workdir"])
flags.adopt_module_key_flags(cli)  # --coordinator_address --num_processes --process_id in --help


def main(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; overrides look like --config.total_steps=100")
    cli.quiet_library_logs()
    from mtt_jax.run import checkpoint

    # SIGTERM from the first moment: during start-up it stops the run before its first update (exit 0,
    # as a SIGTERM later does after saving), instead of killing it with status 143.
    with checkpoint.PreemptionFlag() as preemption, failures_in_one_line():
        initialize_distributed()
        import jax

        from mtt_jax import train
        from mtt_jax.run import config_check, workdir

        config = _CONFIG.value
        config_check.validate(config, jax.device_count())
        if _OVERWRITE.value:
            workdir.check_overwrite(_WORKDIR.value)  # only a run of ours is ever cleared
        else:
            workdir.prepare(_WORKDIR.value, config)  # refuse a different run (or place) before any work
        train.train_and_evaluate(config, _WORKDIR.value, quiet=_QUIET.value, overwrite=_OVERWRITE.value,
                                 preemption=preemption)


@contextlib.contextmanager
def failures_in_one_line():
    """The errors a user can cause or meet (a bad config or workdir, a missing dataset, a run halted on
    non-finite losses, checkpoints on unreachable storage, another process of the job stopping, a full
    disk) end the command with one line on stderr and exit status 2; anything else is a bug and keeps
    its traceback."""
    from mtt_jax import data, train
    from mtt_jax.run import checkpoint, config_check, multihost, workdir
    try:
        yield
    except (config_check.ConfigError, workdir.WorkdirError, train.NonFiniteLossError,
            data.DatasetNotPreparedError, checkpoint.CheckpointStorageError, multihost.JobStopped) as e:
        fail(str(e))
    except OSError as e:
        if (message := disk_full_message(e)) is None:
            raise
        fail(message)


def disk_full_message(error: BaseException) -> str | None:
    """One line for a write that failed on a full disk (``ENOSPC``, also when wrapped by orbax or
    tensorstore), or None for any other error."""
    while error is not None:
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left" in str(error):
            where = f" writing {error.filename}" if getattr(error, "filename", None) else ""
            return (f"no space left on the device{where}; the run stopped, and its checkpoints and records "
                    f"up to the last checkpoint are kept: free space and run the same command to resume")
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
