"""What the command lines (`mtt_jax.main`, `mtt_jax.benchmark`) share: bad input ends in one line on
stderr and exit status 2, before any work; a config file loads from any working directory; the
libraries' INFO logs stay off the console unless asked for; and the multi-host start."""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

# The one --config flag of the command lines (`mtt_jax.main`, `mtt_jax.benchmark`): defined once, so that
# both modules can be imported in one process (the tests do).
CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:variant]).",
                                         lock_config=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


class _OwnInfoOnly(logging.Filter):
    """Passes every warning and error, and the INFO lines of mtt_jax's own modules."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


_OWN_INFO_ONLY = _OwnInfoOnly()


def quiet_library_logs() -> None:
    """The console shows the libraries' warnings and errors but not their INFO lines (orbax's 60-odd
    per checkpoint saved, jax's probing of absent backends), unless ``--verbosity`` (``-v``) is given:
    absl raises an unset verbosity to INFO for every logger. mtt_jax's own INFO lines stay."""
    handler = absl_logging.get_absl_handler()
    if flags.FLAGS["verbosity"].present:
        handler.removeFilter(_OWN_INFO_ONLY)
    else:
        handler.addFilter(_OWN_INFO_ONLY)  # at most once: a handler keeps each filter object once


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def config_file_problem(config_argument: str) -> str | None:
    """The reason ``--config=configs/<name>.py[:variant]`` cannot be loaded, in one line, or None."""
    path = config_argument.split(":", 1)[0]
    if not os.path.isfile(path):
        return f"--config: {path} is not a file (give configs/<name>.py[:variant])"
    return None


def make_config_imports_resolve(config_path: str) -> None:
    """Puts the folder that holds a config file's package on ``sys.path`` (first, where it is absent),
    so that the config's imports of its siblings (``from configs import default``) resolve to the same
    checkout's files from any working directory (``cd /tmp && python -m mtt_jax.main --config
    /path/to/configs/default.py:tiny``). A config file outside a package (no ``__init__.py`` beside it)
    is left as it is: it can import the installed ``mtt_jax``, and its own modules by ``PYTHONPATH``."""
    package = os.path.dirname(os.path.abspath(config_path))
    if os.path.isfile(os.path.join(package, "__init__.py")):
        root = os.path.dirname(package)
        if root not in sys.path:
            sys.path.insert(0, root)


def _config_argument(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing (``app.run(main, flags_parser=parse_flags)``), with every way the command line can
    be wrong reported in one line and exit status 2: a missing ``--config`` file, a config file that
    does not load (a syntax error, no ``get_config``, an exception in it, an unknown variant), a
    ``--config.x=y`` override of a field the config does not have or with a value of the wrong type,
    and any other flag error. The config flag would report most of these as tracebacks or exit 1."""
    config_argument = _config_argument(argv)
    if config_argument is not None:
        if problem := config_file_problem(config_argument):
            fail(problem)
        make_config_imports_resolve(config_argument.split(":", 1)[0])
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # an override of a field the config does not have
        if problem := unknown_field_problem(e, argv):
            fail(problem)
        fail(config_load_problem(e, config_argument))
    except flags.Error as e:  # a value that does not parse (--config.total_steps=abc), a missing flag
        cause = _innermost_cause(e)
        from_config_file = cause is not e and not _first_line(e).startswith("flag --config.")
        fail(config_load_problem(cause, config_argument) if from_config_file else _first_line(e))
    except Exception as e:  # raised while loading the config file itself
        fail(config_load_problem(e, config_argument))


def config_load_problem(error: BaseException, config_argument: str | None) -> str:
    """One line for an error raised while the config file was loaded or its ``get_config`` ran."""
    where = f"--config={config_argument}"
    if isinstance(error, SyntaxError):
        return f"{where}: {error.filename} line {error.lineno}: SyntaxError: {error.msg}"
    if isinstance(error, AttributeError) and "get_config" in str(error):
        return f"{where}: the file defines no get_config(); a config file defines get_config(variant='')"
    return f"{where}: loading the config failed: {type(error).__name__}: {_first_line(error)}"


def _innermost_cause(error: BaseException) -> BaseException:
    """The exception absl's flag error wraps (the config file's own), or ``error`` itself."""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    return error


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def unknown_field_problem(error: Exception, argv: list[str]) -> str | None:
    """One line for ml_collections' error on an override of a missing field (``--config.modl.x=1``:
    ``'modl'`` and its "Did you mean" line), naming the override; None for any other error."""
    while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(...))
        error = error.args[0]
    lines = str(error.args[0] if error.args else "").splitlines()
    if not lines:
        return None
    field = lines[0].strip("'\"")
    overrides = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    named = [o for o in overrides if field in o[len("--config."):].split(".")]
    if not named:
        return None
    hint = f"; {lines[1][0].lower()}{lines[1][1:]}" if len(lines) > 1 and lines[1] else ""
    return f"{named[0]}: the config has no field {field!r}{hint}"


def auto_detected_cluster() -> bool:
    """Environments where jax.distributed.initialize() finds the coordinator by itself."""
    slurm = "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = int(os.environ.get("TPU_WORKER_COUNT", os.environ.get("MEGASCALE_NUM_SLICES", "1"))) > 1
    return slurm or tpu_pod or "TPU_WORKER_HOSTNAMES" in os.environ


def initialize_distributed() -> None:
    """``jax.distributed.initialize`` from ``--coordinator_address --num_processes --process_id``
    (CPU processes then exchange collectives through gloo), or by itself on Cloud TPU and SLURM.

    The runtime's heartbeat timeout is ``MTT_JAX_HEARTBEAT_TIMEOUT_S`` seconds (default 10; jax's own
    default is 100): a process that sent no heartbeat for that long is declared dead by the
    coordination service on process 0, and every other process then aborts (a ``Terminating process
    because the JAX distributed service detected fatal errors`` line and a C++ stack trace). That
    abort cannot be made a Python exception: jax.distributed.initialize takes no missed-heartbeat
    callback, and jaxlib's client does not convert the status it would pass to a Python function (the
    process terminates with std::bad_cast instead). The processes heartbeat from a C++ thread, so a
    long compilation does not miss any; raise the timeout where the network or process 0's host can
    stall for longer (large pods). Inside the training loop a process that stops is noticed at once
    and reported in one line (`mtt_jax.run.multihost.watch_peers`); the heartbeat is what is left for a
    process that hangs without exiting (SIGSTOP: the others abort after 10 s), and for the time
    outside that loop."""
    import jax

    heartbeat = os.environ.get("MTT_JAX_HEARTBEAT_TIMEOUT_S", "10")
    if not heartbeat.isdigit() or int(heartbeat) < 2:
        fail(f"MTT_JAX_HEARTBEAT_TIMEOUT_S={heartbeat!r}: give a whole number of seconds, at least 2")
    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            fail("--coordinator_address, --num_processes and --process_id go together; give all three")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                                   heartbeat_timeout_seconds=int(heartbeat))
    elif auto_detected_cluster():
        jax.distributed.initialize(heartbeat_timeout_seconds=int(heartbeat))
