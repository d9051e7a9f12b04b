"""Command line: ``python -m mtt_jax.main --config configs/default.py --workdir DIR [--config.x=y]``.

The config is checked before anything is created; a bad one exits with status 2 and one line saying
what is wrong and what the valid choices are.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, checkpoints.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress lines on stdout.")
flags.mark_flags_as_required(["config", "workdir"])


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; overrides look like --config.total_steps=100")
    import jax

    from mtt_jax import config_check, train

    config = _CONFIG.value
    try:
        config_check.validate(config, jax.device_count())
    except config_check.ConfigError as e:
        fail(str(e))
    try:
        train.train_and_evaluate(config, _WORKDIR.value, quiet=_QUIET.value)
    except train.NonFiniteLossError as e:
        fail(str(e))


if __name__ == "__main__":
    app.run(main)
