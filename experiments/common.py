"""What every experiment shares: the command line, seeds statistics, tables, plots and the JSON record.

Every experiment is ``python -m experiments.<name> --workdir DIR [--quick]`` and writes ``DIR/table.md``,
``DIR/results.json`` and PNG plots (``DIR`` may be a bucket URL, ``gs://BUCKET/PATH``:
`mtt_jax.run.workdir`). Sizes:

- full (default): the paper's protocol as far as this codebase and a CPU allow; its cost is in each
  module's docstring and ``--help``;
- ``--quick``: the same sweep, shorter and with fewer seeds, in at most 10 minutes on 2 CPU cores;
- ``--tiny`` (hidden): seconds, for the tests; its numbers mean nothing.

``--seeds N`` overrides the number of seeds. Every run writes its record (`experiments.archive`), and each
experiment's ``report(records)`` renders its table from the records: a mean over seeds with its 95%
Student-t interval (`experiments.stats`).

XLA's CPU backend spends most of a short run compiling. ``--compile fast`` (the default for ``--quick``
and ``--tiny``) sets ``--xla_backend_optimization_level=1`` (0 with ``--tiny``), which roughly halves
compile time for a slightly slower step; ``--compile optimized`` (the default for full runs) keeps XLA's
default. The flag
only takes effect before JAX's backend starts, i.e. from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from experiments import archive, stats
from mtt_jax.run import summary
from mtt_jax.run import workdir as workdir_lib

SIZES = ("tiny", "quick", "full")


def parse_args(description: str, full_cost: str, argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The shared flags; ``args.size`` is one of `SIZES`."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog=f"Cost of the full run: {full_cost} --quick: at most 10 minutes on 2 CPU cores.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="output directory (table.md, results.json, *.png)")
    parser.add_argument("--quick", action="store_true",
                        help="shorter runs, fewer seeds (<= 10 min on 2 cores)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seeds", type=int, default=0, help="number of seeds (default: per size)")
    parser.add_argument("--archive", action="store_true",
                        help="also write each run's record to experiments/results/<experiment>/<size>/, "
                             "the committed archive that python -m experiments.report builds RESULTS.md from")
    parser.add_argument("--compile", choices=("auto", "fast", "optimized"), default="auto",
                        help="XLA CPU optimization: fast compiles (default with --quick) or fast steps")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.size = "tiny" if args.tiny else "quick" if args.quick else "full"
    if args.seeds < 0:
        parser.error("--seeds must be >= 1")
    try:
        workdir_lib.check_location(args.workdir, urls=True)  # before hours of work, not at the table
    except workdir_lib.WorkdirError as e:
        parser.error(str(e))
    configure_compilation(args.compile if args.compile != "auto" else
                          ("optimized" if args.size == "full" else "fast"), level=0 if args.tiny else 1)
    return args


def run_locked(run: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> dict:
    """``run(args)`` holding ``args.workdir``'s lock (`mtt_jax.run.workdir.lock`): a second copy of the
    command in the same workdir (launched twice, or requeued while the first still runs) stops with one
    line and exit status 2 before any work, instead of writing its partial results among the first's."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(workdir_lib.lock(args.workdir))
        except workdir_lib.WorkdirError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        return run(args)


def configure_compilation(mode: str, level: int = 1) -> None:
    """Sets the XLA CPU optimization level for this process (before JAX's backend starts)."""
    if mode != "fast":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + f" --xla_backend_optimization_level={level}").strip()


def pick(size: str, tiny, quick, full):
    return {"tiny": tiny, "quick": quick, "full": full}[size]


def num_seeds(args: argparse.Namespace, tiny: int, quick: int, full: int) -> int:
    return args.seeds or pick(args.size, tiny, quick, full)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def command_line() -> str:
    return "python -m " + " ".join([sys.modules["__main__"].__spec__.name if getattr(
        sys.modules["__main__"], "__spec__", None) else sys.argv[0]] + sys.argv[1:])


class Log:
    """Timestamped progress lines on stderr."""

    def __init__(self, quiet: bool = False):
        self.start = time.perf_counter()
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:7.1f}s] {message}", file=sys.stderr, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def write_outputs(workdir: str, name: str, args: argparse.Namespace, table: str, results: dict,
                  log: Log, header: str = "", spread: str = "mean ± std over seeds") -> None:
    """Writes ``table.md`` (with the command, size and wall time) and ``results.json``."""
    workdir_lib.makedirs(workdir)
    record = {"experiment": name, "size": args.size, "command": command_line(),
              "wall_seconds": round(log.elapsed, 1), **results}
    workdir_lib.write_json(workdir_lib.join(workdir, "results.json"), to_jsonable(record), indent=1)
    write_table(workdir, name, header, record, table, spread)
    log(f"wrote {workdir}/table.md and results.json ({log.elapsed:.0f} s)")


def write_archived_outputs(args: argparse.Namespace, name: str, records: list[dict], summarize: Callable,
                           report: Callable, plot: Callable, log: Log, header: str = "",
                           spread: str = "mean ± 95% t-interval over seeds", **results) -> dict:
    """The end of an experiment: ``summarize(records)``, its plots (``plot(summary, workdir)``), and
    ``table.md`` (``report(records)``) with ``results.json`` (the summary and ``results``); the summary."""
    summary = summarize(records)
    plot(summary, args.workdir)
    write_outputs(args.workdir, name, args, report(records), {"summary": summary, **results}, log,
                  header=" ".join(filter(None, [header, f"Archived runs: {args.workdir}/runs."])),
                  spread=spread)
    return summary


def write_table(workdir: str, name: str, header: str, record: dict, table: str,
                spread: str = "mean ± std over seeds") -> None:
    """``table.md``: the header, the command, size and wall time of ``record`` (a results.json), the table."""
    command = (f"Command: `{record['command']}` (size: {record['size']}; wall time "
               f"{record['wall_seconds']:.0f} s). Cells: {spread}.")
    workdir_lib.write_text(workdir_lib.join(workdir, "table.md"),
                           f"# {name}\n\n{header}\n\n{command}\n\n{table}")


class PartialResults:
    """``workdir/results.partial.json``: what a long sweep has finished so far, so that a rerun of the
    same command (same ``identity``: size, seeds, ...) after an interruption skips the finished parts.

    Written atomically after each part; removed once the complete ``results.json`` is written.
    """

    def __init__(self, workdir: str, identity: dict):
        self.path = workdir_lib.join(workdir, "results.partial.json")
        self.identity = to_jsonable(identity)

    def load(self) -> dict:
        """The finished parts of an earlier run with the same identity, else ``{}``."""
        if not workdir_lib.exists(self.path):
            return {}
        saved = json.loads(workdir_lib.read_text(self.path))
        return saved.get("results", {}) if saved.get("identity") == self.identity else {}

    def save(self, results: dict) -> None:
        workdir_lib.write_json(self.path, to_jsonable({"identity": self.identity, "results": results}))

    def discard(self) -> None:
        workdir_lib.remove(self.path)


def train_arms(args, experiment: str, identity: dict, arms: Sequence[tuple[str, Callable[[], list[dict]]]],
               log: Log, owns: Callable[[str], bool] = lambda arm_folder: True
               ) -> tuple[list[dict], PartialResults]:
    """Trains each ``(label, train)`` arm that an earlier attempt of the same command (same ``identity``)
    did not finish, writing its run records (`archive.RunWriter`) and ``results.partial.json`` as each
    arm ends, so that an interrupted sweep resumes arm by arm. Returns every arm's records and the partial
    file, to discard once the complete results are written."""
    partial = PartialResults(args.workdir, identity)
    done = partial.load().get("arms", {})
    writer = archive.RunWriter(args.workdir, experiment, args.size, args.archive, resumed=bool(done), owns=owns)
    if done:
        log(f"resuming from {partial.path}: {len(done)} arms finished")
    for label, train in arms:
        if label in done:
            continue
        records = train()
        writer.write(records)
        done[label] = records
        partial.save({"arms": done})
        log(f"{label}: {len(records)} runs, {sum(r['wall_seconds'] for r in records):.0f} s")
    return [r for records in done.values() for r in records], partial


def to_jsonable(value):
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, workdir: str, filename: str) -> str:
    path = workdir_lib.join(workdir, filename)
    summary.save_png(fig, path, dpi=110, bbox_inches="tight")
    return path


def plot_matrix(ax, matrix: np.ndarray, labels: Sequence[str], title: str, cmap: str = "viridis",
                fmt_str: str = "{:.2f}", symmetric: bool = False) -> None:
    """A T x T heat map with the values written in the cells (rows: from, columns: to)."""
    matrix = np.asarray(matrix, np.float64)
    kwargs = {}
    if symmetric:
        bound = float(np.nanmax(np.abs(matrix))) or 1.0
        kwargs = {"vmin": -bound, "vmax": bound}
    image = ax.imshow(matrix, cmap=cmap, **kwargs)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, fmt_str.format(matrix[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if image.norm(matrix[i, j]) < 0.5 else "black")
    ax.set_title(title)
    ax.figure.colorbar(image, ax=ax, fraction=0.046)


def constant_adam(c, learning_rate: float) -> None:
    """Plain Adam at a constant rate, as the toy papers train: no warmup, decay, clipping or weight
    decay, b2 = 0.999."""
    c.optimizer.learning_rate = learning_rate
    c.optimizer.warmup_steps = 0
    c.optimizer.end_learning_rate_factor = 1.0
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 1e9
    c.optimizer.b2 = 0.999


def small_vector_transformer(c, size: str) -> None:
    """The one-layer Transformer that reads the MMoE toy's 100 features in chunks of 10."""
    c.model.d_model, c.model.num_layers, c.model.num_heads = pick(size, 16, 32, 32), 1, 4
    c.model.mlp_dim = 4 * c.model.d_model
    c.model.patch_size = 10


# --- Run records (`experiments.archive`) ----------------------------------------------------------

CURVE_POINTS = 20  # what a run record keeps of a curve: enough points to draw it


def thin(length: int, points: int = CURVE_POINTS) -> list[int]:
    """At most ``points`` indices into a curve of ``length`` values, evenly spread, first and last kept."""
    if length <= points:
        return list(range(length))
    return sorted(set(np.linspace(0, length - 1, points).round().astype(int).tolist()))


def scalar_metrics(metrics: dict) -> dict:
    """The numbers of an eval's metrics, without its maps (e.g. ``task_attention``, a T x T list)."""
    return {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}


def final_metrics(runs, r: int, splits: Sequence[str]) -> dict:
    """Run ``r``'s final metrics on every split of a `mtt_jax.seed_runs.SeedRuns`: a record's metrics."""
    return {split: scalar_metrics(runs.by_split[split][max(runs.by_split[split])][r]) for split in splits}


def train_curves(runs, r: int) -> dict:
    """Run ``r``'s train curves of a `mtt_jax.seed_runs.SeedRuns`, thinned (`thin`): the steps, the
    train task losses ``[N, T]`` and the applied task weights ``[N, T]`` (means over logging windows)."""
    keep = thin(len(runs.curve_steps))
    return {"train_steps": runs.curve_steps[keep], "train_task_losses": runs.curve_losses[keep, r],
            "task_weights": runs.curve_weights[keep, r]}


def paired_cell(values: Sequence[float], reference: Sequence[float], digits: int = 3,
                scale: float = 1.0) -> str:
    """The paired differences ``values - reference`` (same seeds) as ``mean ± 95% half-width``, with
    ▲ (above 0) or ▼ (below) when the interval excludes 0."""
    found = stats.paired_difference(values, reference)
    mark = "" if not found.excludes_zero() else " ▲" if found.mean > 0 else " ▼"
    return found.format(digits, scale) + mark


def interval_band(values_SxN) -> tuple[np.ndarray, np.ndarray]:
    """A curve's mean over seeds at each of its N points and the 95% t half-width (0 for one seed):
    what a plot draws as a line and a band."""
    intervals = [stats.interval(column) for column in np.asarray(values_SxN, np.float64).T]
    return (np.asarray([i.mean for i in intervals]),
            np.asarray([0.0 if i.n < 2 else i.half_width for i in intervals]))
