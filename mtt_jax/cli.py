"""What the command lines (`mtt_jax.main`, `mtt_jax.benchmark`) share: bad input ends in one line on
stderr and exit status 2, before any work (DESIGN §7)."""

from __future__ import annotations

import os
import sys

from absl import app


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def config_file_problem(config_argument: str) -> str | None:
    """The reason ``--config=configs/<name>.py[:variant]`` cannot be loaded, in one line, or None."""
    path = config_argument.split(":", 1)[0]
    if not os.path.isfile(path):
        return f"--config: {path} is not a file (give configs/<name>.py[:variant])"
    return None


def _config_argument(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing (``app.run(main, flags_parser=parse_flags)``), with a missing ``--config`` file
    reported in one line. The config flag defers that error to the config's first use: a
    ``--config.x=y`` override during parsing, or the program's first read, as a traceback."""
    config_argument = _config_argument(argv)
    if config_argument is not None and (problem := config_file_problem(config_argument)):
        fail(problem)
    return app.parse_flags_with_usage(argv)
