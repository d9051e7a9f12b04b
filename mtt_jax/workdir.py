"""The run directory: one run per workdir, resumed by the same command, never silently overwritten.

A workdir that holds ``config.json`` belongs to that run. Starting a different run there (any field
that changes the computation differs) is refused unless ``overwrite`` is given, which clears the old
outputs first. Fields that only change how often things are logged or saved may differ on resume.
"""

from __future__ import annotations

import json
import os
import shutil

# Fields that do not change the computed trajectory; they may differ between a run and its resumption.
RESUMABLE_FIELDS = frozenset({"log_every", "eval_every", "eval_batch_size", "checkpoint_every", "keep",
                              "grad_accum_unroll", "attention_kernel"})
OUTPUTS = ("checkpoints", "tensorboard", "metrics.jsonl", "summary.md", "config.json", "curves.png",
           "task_attention.png")


class WorkdirError(ValueError):
    """The workdir holds another run; the message is one line."""


def run_identity(config_dict: dict) -> dict:
    return {k: v for k, v in config_dict.items() if k not in RESUMABLE_FIELDS}


def config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def prepare(workdir: str, config, overwrite: bool = False) -> bool:
    """Checks (and with ``overwrite`` clears) ``workdir``; returns True if it holds a run to resume."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return False
    if overwrite:
        for name in OUTPUTS:
            target = os.path.join(workdir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            elif os.path.exists(target):
                os.remove(target)
        return False
    with open(path) as f:
        previous = run_identity(json.load(f))
    current = run_identity(config_dict(config))
    if previous != current:
        changed = sorted(k for k in previous.keys() | current.keys() if previous.get(k) != current.get(k))
        raise WorkdirError(f"{workdir} holds a run with a different config (fields: {', '.join(changed)}); "
                           f"use another --workdir or pass --overwrite to discard it")
    return True


def write_config(workdir: str, config) -> None:
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_dict(config), f, indent=2, sort_keys=True)
