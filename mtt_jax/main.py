"""Command line: ``python -m mtt_jax.main --config configs/default.py --workdir DIR [--config.x=y]``.

The config and the workdir are checked before anything is created: a bad config, a workdir that
holds a different run, or one the run could not keep (a file, a bucket that cannot be written) exits
with status 2 and one line saying what is wrong and how to fix it. ``--workdir`` may be a bucket URL
(``gs://bucket/run``; `mtt_jax.workdir`).

On Linux the command first re-executes itself once with its large host allocations on huge pages
(`mtt_jax.huge_pages`; ``MTT_JAX_HUGE_PAGES=0`` opts out).

Multi-host (DESIGN §6, `mtt_jax.cli.initialize_distributed`): on Cloud TPU and under SLURM,
``jax.distributed.initialize()`` finds the coordinator itself; elsewhere pass ``--coordinator_address
--num_processes --process_id``. CPU processes exchange collectives through gloo.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from mtt_jax import cli, huge_pages
from mtt_jax.cli import fail, initialize_distributed, parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, checkpoints.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Discard a different run found in --workdir.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress lines on stdout.")
flags.mark_flags_as_required(["config", "workdir"])
flags.adopt_module_key_flags(cli)  # --coordinator_address --num_processes --process_id in --help


def main(argv) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; overrides look like --config.total_steps=100")
    initialize_distributed()
    import jax

    from mtt_jax import config_check, train, workdir

    config = _CONFIG.value
    try:
        config_check.validate(config, jax.device_count())
        if _OVERWRITE.value:
            workdir.check_location(_WORKDIR.value, urls=True)
        else:
            workdir.prepare(_WORKDIR.value, config)  # refuse a different run (or place) before any work
    except (config_check.ConfigError, workdir.WorkdirError) as e:
        fail(str(e))
    from mtt_jax import data
    try:
        train.train_and_evaluate(config, _WORKDIR.value, quiet=_QUIET.value, overwrite=_OVERWRITE.value)
    except (config_check.ConfigError, workdir.WorkdirError, train.NonFiniteLossError,
            data.DatasetNotPreparedError) as e:
        fail(str(e))


if __name__ == "__main__":
    huge_pages.exec_with_huge_pages()
    app.run(main, flags_parser=parse_flags)
