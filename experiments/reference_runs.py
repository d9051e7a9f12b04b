"""The shipped configs run as the README runs them: the numbers of README.md and docs/reference_runs.md.

    python -m experiments.reference_runs --workdir /tmp/exp/reference --archive
    python -m experiments.reference_runs --workdir /tmp/exp/reference --quick   # the README's run only

Each run is the command ``python -m mtt_jax.main --config <cfg> --workdir WORKDIR/main/<arm>/seed<k>
[--config.seed=k] [--config.dtype=bfloat16]``, started as a subprocess of this one with this process's
environment: the same code path, the same XLA flags and the same start-up as the README's command (at
``--quick`` and full size the XLA flag that ``--compile fast`` would set is not passed on; ``--tiny``
passes it). Its wall time is that of the whole command, start-up and compilation included, on the
machine that ran it (the record names its CPU and its load average at the start: a loaded machine
makes it longer, not the metrics different).

Arms (one archive record per run, `experiments.archive`):

- full: ``configs/default.py`` in float32, seeds 0-4; the same with ``--config.dtype=bfloat16``, seeds
  0-4; ``configs/seqtasks.py``, seed 0;
- ``--quick``: ``configs/default.py``, seed 0, float32: the README's command;
- ``--tiny``: ``configs/default.py:tiny``, seed 0 (seconds of training, for the tests).

A record holds the run's final eval metrics (``metrics["eval"]``: every task's metrics on the config's
held-out split, the last ``eval @ <total_steps>`` of its ``metrics.jsonl``), its eval history, its
config (the workdir's ``config.json``), the ``mtt_jax.main`` command, the wall time of the command and
the training wall time of its ``summary.md``.

What it reports (`report`, from the records alone): the seed-0 float32 default run (its ``eval @``
line as the command prints it, and per task the eval metrics with the trivial baseline); bf16 against
f32 over the seeds of both arms (mean and 95% Student-t interval, and the paired difference bf16 - f32
per seed, with its interval: seed s is the same initialisation and the same batches in both); the
seqtasks run; the wall time of every run.

Resumable: a rerun of the same command after an interruption skips the finished runs
(``WORKDIR/results.partial.json``) and starts an unfinished one afresh (``--overwrite``), so that its
wall time is that of one whole command.

Cost. full: 11 runs of 1500 steps. The archived run took 89 minutes on a 2-core machine shared with
other jobs (load average 4-8): 6-12 minutes per command, bf16 slower than f32; on an idle 2-core
machine a default run takes about 2-3 minutes (older, unarchived runs), the whole about 30 minutes.
``--quick``: one run, 2-12 minutes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import numpy as np

from experiments import archive, common, stats
from mtt_jax.run import summary
from mtt_jax.run import workdir as workdir_lib

NAME = "reference_runs"
FULL_COST = ("11 runs of 1500 steps (10 of configs/default.py, one of configs/seqtasks.py), each a "
             "separate python -m mtt_jax.main command: 89 minutes measured on 2 CPU cores shared with "
             "other jobs, about 30 on an idle machine.")
# arm -> (config, the command's overrides besides the seed, what the tables call it)
ARMS = {
    "default_f32": ("configs/default.py", (), "configs/default.py, float32"),
    "default_bf16": ("configs/default.py", ("--config.dtype=bfloat16",), "configs/default.py, bfloat16"),
    "seqtasks": ("configs/seqtasks.py", (), "configs/seqtasks.py, float32"),
}
TINY_CONFIG = "configs/default.py:tiny"
REFERENCE, LOWER = "default_f32", "default_bf16"


def plan(size: str, num_seeds: int | None = None) -> list[tuple[str, int]]:
    """The (arm, seed) runs of ``size``, in the order they run (``num_seeds``: the default arms' seeds)."""
    if size == "full":
        seeds = range(num_seeds or 5)
        return ([(REFERENCE, s) for s in seeds] + [(LOWER, s) for s in seeds] + [("seqtasks", 0)])
    return [(REFERENCE, s) for s in range(num_seeds or 1)]


def config_argument(size: str, arm: str) -> str:
    return TINY_CONFIG if size == "tiny" else ARMS[arm][0]


def main_command(size: str, arm: str, seed: int, workdir: str) -> list[str]:
    """The ``python -m mtt_jax.main`` command of one run (seed 0 without ``--config.seed``: the README's)."""
    overrides = list(ARMS[arm][1]) + ([f"--config.seed={seed}"] if seed else [])
    return ["python", "-m", "mtt_jax.main", "--config", config_argument(size, arm), "--workdir", workdir,
            *overrides]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


ENVIRONMENT_KEYS = ("XLA_FLAGS", "GLIBC_TUNABLES", "MTT_JAX_HUGE_PAGES", "JAX_PLATFORMS")


def train(size: str, arm: str, seed: int, workdir: str, environment: dict, log: common.Log) -> dict:
    """Runs one ``mtt_jax.main`` command into ``workdir/main/<arm>/seed<k>``; what its record needs (its
    command with ``workdir`` written ``WORKDIR``)."""
    run_dir = workdir_lib.join(workdir, "main", arm, f"seed{seed}")
    command = main_command(size, arm, seed, run_dir)
    started = workdir_lib.exists(workdir_lib.join(run_dir, "config.json"))
    # An attempt interrupted earlier is discarded (mtt_jax.main clears only a run of its own), so that
    # the wall time is one whole command's; the run itself is the same.
    argv = [sys.executable, *command[1:]] + (["--overwrite"] if started else [])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    log(f"{arm} seed {seed}: {' '.join(command)}{' (an interrupted attempt discarded)' if started else ''}")
    start = time.perf_counter()
    with subprocess.Popen(argv, cwd=archive.REPOSITORY, env=environment, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as child:
        for line in child.stdout:  # the command's console, on this one's stderr
            sys.stderr.write(line)
            sys.stderr.flush()
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} exited with status {child.returncode}")
    records = summary.read_metrics(run_dir)
    config = json.loads(workdir_lib.read_text(workdir_lib.join(run_dir, "config.json")))
    total = int(config["total_steps"])
    evals = [r for r in records if r["split"] == "eval"]
    final = next(r for r in reversed(evals) if r["step"] == total)
    text = workdir_lib.read_text(workdir_lib.join(run_dir, "summary.md"))
    found = re.search(r"training wall time: ([0-9.]+) s", text)
    training = float(found.group(1)) if found else None
    from mtt_jax import data  # noqa: F401  (the sources register their tasks)
    from mtt_jax import tasks as tasks_lib
    specs = [tasks_lib.get(t) for t in config["tasks"]]
    log(f"{arm} seed {seed}: " + eval_line({"metrics": {"eval": final}, "curves": {
        "main_metric": {t.name: t.main_metric for t in specs}, "final_step": total}})
        + f" ({wall:.0f} s)")
    return {
        "config": config, "wall_seconds": wall,
        "metrics": {"eval": common.scalar_metrics({k: v for k, v in final.items() if k not in ("step", "split")})},
        "curves": {
            "main_command": " ".join(main_command(size, arm, seed, f"WORKDIR/main/{arm}/seed{seed}")),
            "final_step": total,
            "main_metric": {t.name: t.main_metric for t in specs},
            "metric_names": {t.name: list(t.metric_names) for t in specs},
            "kinds": {t.name: t.kind for t in specs},
            "eval_steps": [r["step"] for r in evals],
            "eval_main_metric": {t.name: [r[f"{t.name}/{t.main_metric}"] for r in evals] for t in specs},
            "training_wall_seconds": training,
            "steps_per_second": total / training if training else None,
            "cpu": cpu_name(), "cores": os.cpu_count(), "load_average_at_start": round(load, 2),
            "environment": {k: environment[k] for k in ENVIRONMENT_KEYS if k in environment}}}


def run(args, environment: dict) -> dict:
    log = common.Log()
    runs = plan(args.size, args.seeds or None)
    partial = common.PartialResults(args.workdir, {"size": args.size, "runs": runs})
    done = partial.load()
    writer = archive.RunWriter(args.workdir, NAME, args.size, args.archive, resumed=bool(done))
    command, records = common.command_line(), []
    for arm, seed in runs:
        key = f"{arm}/seed{seed}"
        if key not in done:
            found = train(args.size, arm, seed, args.workdir, environment, log)
            config, coordinates = found.pop("config"), {
                "config": config_argument(args.size, arm), "dtype": "bfloat16" if arm == LOWER else "float32"}
            done[key] = archive.run_record(NAME, args.size, arm, coordinates, seed, config, found["metrics"],
                                           command, found["wall_seconds"], found["curves"])
            writer.write([done[key]])
            partial.save(done)
        else:
            log(f"{arm} seed {seed}: done in an earlier attempt")
        records.append(done[key])
    outcome = common.write_archived_outputs(
        args, NAME, records, summarize, report, plot, log,
        header="The shipped configs, each run as its own `python -m mtt_jax.main` command.")
    partial.discard()
    return outcome


# --- tables, from the records alone ------------------------------------------------------------------

def tasks_of(record: dict) -> list[str]:
    return list(record["curves"]["main_metric"])


def eval_line(record: dict) -> str:
    """The run's last ``eval @`` line, as `mtt_jax.main` prints it."""
    metrics, curves = record["metrics"]["eval"], record["curves"]
    return f"eval @ {curves['final_step']}: " + "  ".join(
        f"{t}/{m} {metrics[f'{t}/{m}']:.4f}" for t, m in curves["main_metric"].items())


def task_rows(record: dict) -> tuple[list[str], list[list[str]]]:
    """One row per task: its eval metrics and the trivial baseline of its main metric (``.4f``): the
    README's table of the default run."""
    metrics, curves = record["metrics"]["eval"], record["curves"]
    names = curves["metric_names"][tasks_of(record)[0]]
    main = curves["main_metric"][tasks_of(record)[0]]
    headers = ["task"] + [f"eval {name}" for name in names] + [f"trivial baseline ({main})"]
    rows = [[t] + [f"{metrics[f'{t}/{name}']:.4f}" for name in names]
            + [f"{metrics['{}/baseline_{}'.format(t, curves['main_metric'][t])]:.4f}"] for t in tasks_of(record)]
    return headers, rows


def seed0_table(record: dict) -> str:
    """The markdown table the README shows for the seed-0 float32 default run."""
    return common.markdown_table(*task_rows(record))


def metric_rows(record: dict) -> list[list[str]]:
    """Every task's every metric with its trivial baseline (the run's ``summary.md`` table)."""
    metrics, curves = record["metrics"]["eval"], record["curves"]
    rows = []
    for t in tasks_of(record):
        for name in curves["metric_names"][t]:
            baseline = metrics.get(f"{t}/baseline_{name}")
            rows.append([t, curves["kinds"][t], name, f"{metrics[f'{t}/{name}']:.4f}",
                         "" if baseline is None else f"{baseline:.4f}"])
    return rows


def summarize(records: list[dict]) -> dict:
    """Per arm: the seeds, every task metric per seed, the wall times."""
    arms = {}
    for arm, runs in in_order(records).items():
        keys = [k for k in runs[0]["metrics"]["eval"] if "/" in k and "/baseline_" not in k]
        arms[arm] = {"seeds": [r["seed"] for r in runs],
                     "metrics": {k: [r["metrics"]["eval"][k] for r in runs] for k in keys},
                     "wall_seconds": [r["wall_seconds"] for r in runs],
                     "training_wall_seconds": [r["curves"].get("training_wall_seconds") for r in runs]}
    return {"arms": arms}


def seeds_table(records: list[dict]) -> str:
    """bf16 against f32: per task and metric the mean over seeds with its interval, and the paired
    difference bf16 - f32 in points."""
    groups = archive.by_arm(records)
    f32, bf16 = groups[REFERENCE], groups[LOWER]
    if [r["seed"] for r in f32] != [r["seed"] for r in bf16]:
        raise ValueError("the float32 and bfloat16 arms need the same seeds")
    headers = ["task", "metric", f"float32 ({len(f32)} seeds)", f"bfloat16 ({len(bf16)} seeds)",
               "bf16 - f32, paired (points)"]
    rows = []
    for t in tasks_of(f32[0]):
        for name in f32[0]["curves"]["metric_names"][t]:
            a = [r["metrics"]["eval"][f"{t}/{name}"] for r in f32]
            b = [r["metrics"]["eval"][f"{t}/{name}"] for r in bf16]
            rows.append([t, name, stats.interval(a).format(4), stats.interval(b).format(4),
                         common.paired_cell(b, a, 2, 100.0)])
    per_seed_headers = ["seed"] + [f"{arm} {t}/{m}" for arm in ("f32", "bf16")
                                   for t, m in f32[0]["curves"]["main_metric"].items()] + [
        f"bf16 - f32 {t} (points)" for t in tasks_of(f32[0])]
    per_seed = []
    for a, b in zip(f32, bf16):
        main = a["curves"]["main_metric"]
        values = lambda r: [r["metrics"]["eval"][f"{t}/{m}"] for t, m in main.items()]
        per_seed.append([a["seed"]] + [f"{v:.4f}" for v in values(a) + values(b)]
                        + [f"{100 * (y - x):+.2f}" for x, y in zip(values(a), values(b))])
    return (common.markdown_table(headers, rows) + "\n" + common.markdown_table(per_seed_headers, per_seed))


def in_order(records: list[dict]) -> dict[str, list[dict]]:
    """The records by arm (`ARMS`' order), each arm's by seed."""
    groups = archive.by_arm(records)
    return {arm: groups[arm] for arm in sorted(groups, key=lambda a: list(ARMS).index(a) if a in ARMS else len(ARMS))}


def wall_table(records: list[dict]) -> str:
    rows = []
    for arm, runs in in_order(records).items():
        for r in runs:
            c = r["curves"]
            training, rate = c.get("training_wall_seconds"), c.get("steps_per_second")
            rows.append([arm, r["seed"], f"{r['wall_seconds']:.0f}", "" if training is None else f"{training:.0f}",
                         "" if rate is None else f"{rate:.1f}", f"{c['load_average_at_start']:.1f}"])
    headers = ["arm", "seed", "whole command (s)", "training (s)", "steps/s (training)",
               "load average at start"]
    return common.markdown_table(headers, rows)


def readable(record: dict) -> str:
    """The run's ``mtt_jax.main`` command with its workdir as ``DIR``."""
    return re.sub(r"--workdir \S+", "--workdir DIR", record["curves"]["main_command"])


def report(records: list[dict]) -> str:
    groups = archive.by_arm(records)
    out = []
    if REFERENCE in groups:
        first = groups[REFERENCE][0]
        out += [f"**`{readable(first)}`** "
                f"(seed {first['seed']}, float32), its last eval line and its eval metrics on the held-out "
                f"split ({first['config']['data'].get('eval_split', 'test')}):\n",
                "```\n" + eval_line(first) + "\n```\n", seed0_table(first)]
    if REFERENCE in groups and LOWER in groups:
        out += ["**bfloat16 against float32** (`--config.dtype=bfloat16`), seeds "
                f"{', '.join(str(r['seed']) for r in groups[REFERENCE])} (`--config.seed=S`): mean ± 95% "
                "t-interval over seeds; paired: seed s is the same initialisation and the same batches "
                "in both; ▲/▼: the paired interval excludes 0.\n", seeds_table(records)]
    if "seqtasks" in groups:
        r = groups["seqtasks"][0]
        out += [f"**`{readable(r)}`** (seed {r['seed']}), "
                "eval metrics and the trivial (input-blind) baseline:\n",
                "```\n" + eval_line(r) + "\n```\n",
                common.markdown_table(["task", "kind", "metric", "eval", "trivial baseline"], metric_rows(r))]
    machines = sorted({f"{r['curves']['cpu']} ({r['curves']['cores']} cores)" for r in records})
    out += [f"**Wall time** of each command (start-up and compilation included) and of its training loop "
            f"(`summary.md`), on {'; '.join(machines)}; the load average says how busy the machine was:\n",
            wall_table(records), archive.provenance(records)]
    return "\n".join(out) + "\n"


def plot(s: dict, workdir: str) -> None:
    """``wall_time.png``: each run's wall time, whole command and training loop."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
    labels, whole, training = [], [], []
    for arm, a in s["arms"].items():
        for seed, w, t in zip(a["seeds"], a["wall_seconds"], a["training_wall_seconds"]):
            labels.append(f"{arm} s{seed}")
            whole.append(w)
            training.append(t or 0.0)
    x = np.arange(len(labels))
    ax.bar(x - 0.2, whole, 0.4, label="whole command")
    ax.bar(x + 0.2, training, 0.4, label="training loop")
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set(ylabel="seconds", title="wall time per run")
    ax.legend()
    common.save_figure(fig, workdir, "wall_time.png")


def main(argv=None) -> None:
    environment = dict(os.environ)  # before parse_args sets --compile's XLA flag in this process
    args = common.parse_args(__doc__, FULL_COST, argv)
    if args.size == "tiny" or args.compile == "fast":
        environment = dict(os.environ)
    common.run_locked(lambda a: run(a, environment), args)


if __name__ == "__main__":
    main(sys.argv[1:])
