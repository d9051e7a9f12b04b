"""One JSON file per trained run: what every table of RESULTS.md is rebuilt from.

A run is one seed of one arm of an experiment (an arm: a method at a learning rate, a model at a
correlation, ...). Its record holds the arm's name and coordinates, the seed, the git commit of the
code that trained it, the command, the whole config, the final metrics on every split it was scored on,
a short summary of its curves and its share of the wall time. Experiments write the records to
``WORKDIR/runs/<arm>/seed<k>.json``; with ``--archive`` also to
``experiments/results/<experiment>/<size>/``, the committed archive that `experiments.report` reads.

Nothing in a table is typed by hand: `experiments.report` renders each table from the records alone.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from typing import Any, Callable, Iterable, Mapping

from mtt_jax.run import workdir as workdir_lib

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = os.path.join(REPOSITORY, "experiments", "results")


@functools.cache
def code_version(repository: str = REPOSITORY) -> str:
    """The commit of this checkout, with ``+dirty`` when tracked files differ from it; ``unknown``
    outside a git checkout. The archive (``experiments/results/``) is data, not code: an archived rerun
    first clears its own earlier records (`RunWriter`), which must not mark its code as changed."""
    try:
        run = lambda *args: subprocess.run(["git", "-C", repository, *args], capture_output=True,
                                           text=True, check=True).stdout.strip()
        commit = run("rev-parse", "--short=12", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no", "--", ".",
                    f":(exclude){os.path.relpath(ARCHIVE, REPOSITORY)}")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def file_name(arm: str) -> str:
    """A file-system-safe folder name for an arm (``sdmgrad:lam=3`` -> ``sdmgrad_lam=3``)."""
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", arm)


def archive_dir(experiment: str, size: str, root: str = ARCHIVE) -> str:
    return os.path.join(root, experiment, size)


def run_record(experiment: str, size: str, arm: str, coordinates: Mapping[str, Any], seed: int,
               config, metrics: Mapping[str, Mapping[str, float]], command: str,
               wall_seconds: float, curves: Mapping[str, Any] | None = None) -> dict:
    """The record of one run. ``metrics``: split -> flat final metrics (``"<task>/<metric>"``);
    ``coordinates``: what identifies the arm in its table (e.g. ``{"method": "pcgrad", "lr": 1e-3}``)."""
    from experiments import common  # (common imports this module)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return common.to_jsonable({
        "experiment": experiment, "size": size, "arm": arm, "coordinates": dict(coordinates),
        "seed": int(seed), "code_version": code_version(), "command": command,
        "metrics": {split: dict(values) for split, values in metrics.items()},
        "curves": dict(curves or {}), "wall_seconds": round(float(wall_seconds), 2),
        "config": config_dict})


class RunWriter:
    """Writes run records to ``WORKDIR/runs`` and, with ``archive``, to the committed archive.

    A fresh (not resumed) archived experiment first clears its ``experiments/results/<experiment>/
    <size>/`` folder (the previous records are in git), so the archive never mixes two invocations.
    ``owns``: which arm folders (`file_name`) this invocation replaces, for an experiment whose parts
    are run by separate invocations (``task_mechanisms --part``); the other parts' records stay.
    """

    def __init__(self, workdir: str, experiment: str, size: str, archive: bool, resumed: bool,
                 archive_root: str | None = None, owns: Callable[[str], bool] = lambda arm_folder: True):
        self.folders = [workdir_lib.join(workdir, "runs")]
        if archive:  # archive_root None: the module's ARCHIVE when the writer is made
            folder = archive_dir(experiment, size, archive_root or ARCHIVE)
            if not resumed and os.path.isdir(folder):
                for name in sorted(os.listdir(folder)):
                    if owns(name):
                        path = os.path.join(folder, name)
                        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            self.folders.append(folder)

    def write(self, records: Iterable[dict]) -> None:
        for record in records:
            for folder in self.folders:
                path = workdir_lib.join(folder, file_name(record["arm"]), f"seed{record['seed']}.json")
                workdir_lib.write_text(path, json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n")


def load(experiment: str, size: str, root: str = ARCHIVE) -> list[dict]:
    """Every archived record of ``experiment`` at ``size``, sorted by arm then seed ([] if none)."""
    folder = archive_dir(experiment, size, root)
    records = []
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            if name.endswith(".json"):
                with open(os.path.join(dirpath, name)) as f:
                    records.append(json.load(f))
    return sorted(records, key=lambda r: (r["arm"], r["seed"]))


def by_arm(records: Iterable[dict]) -> dict[str, list[dict]]:
    """Records grouped by arm, each group sorted by seed."""
    groups: dict[str, list[dict]] = {}
    for record in sorted(records, key=lambda r: (r["arm"], r["seed"])):
        groups.setdefault(record["arm"], []).append(record)
    return groups


def provenance(records: Iterable[dict]) -> str:
    """One line naming the code versions and commands behind ``records`` (each command's ``--workdir``, a
    path on the machine that ran it, as ``WORKDIR``)."""
    records = list(records)
    versions = sorted({r["code_version"] for r in records})
    commands = sorted({re.sub(r"--workdir[= ]\S+", "--workdir WORKDIR", r["command"]) for r in records})
    return (f"Code version{'s' if len(versions) > 1 else ''}: {', '.join(f'`{v}`' for v in versions)}. "
            f"Command{'s' if len(commands) > 1 else ''}: {'; '.join(f'`{c}`' for c in commands)}. "
            f"{len(records)} archived runs.")
