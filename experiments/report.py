"""Rebuilds ``experiments/RESULTS.md`` from the archived runs (`experiments.archive`).

    python -m experiments.report            # writes experiments/RESULTS.md
    python -m experiments.report --check    # exit 1 if RESULTS.md is not what the archive gives

``experiments/RESULTS.template.md`` holds the prose (the predictions written before each run, the
protocol, what was cut) and one marker line per table, ``{{ <experiment>/<size> }}``. Each marker is
replaced by the experiment module's ``report(records)`` over the archived records of that experiment
and size (``experiments/results/<experiment>/<size>/``): tables, verdicts and every number come from
the records, with the code version and command that made them. A marker with no archived runs says so
and gives the command that makes them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from experiments import archive

TEMPLATE = os.path.join(archive.REPOSITORY, "experiments", "RESULTS.template.md")
RESULTS = os.path.join(archive.REPOSITORY, "experiments", "RESULTS.md")
MARKER = re.compile(r"^\{\{ *(\w+)/(\w+) *\}\}$", re.MULTILINE)
SIZE_FLAGS = {"full": "", "quick": " --quick", "tiny": " --tiny"}


def markers(template: str) -> list[tuple[str, str]]:
    """The ``(experiment, size)`` of every table marker in ``template``."""
    return MARKER.findall(template)


def render_table(experiment: str, size: str, root: str = archive.ARCHIVE) -> str:
    """The markdown an experiment's ``report`` makes of its archived runs at ``size``."""
    records = archive.load(experiment, size, root)
    if not records:
        return (f"*No archived runs of `{experiment}` at size `{size}` yet. They are made by "
                f"`python -m experiments.{experiment} --workdir DIR{SIZE_FLAGS[size]} --archive`.*")
    module = importlib.import_module(f"experiments.{experiment}")
    return module.report(records).rstrip("\n")


def render(template: str, root: str = archive.ARCHIVE) -> str:
    """``template`` with every marker replaced by its table."""
    return MARKER.sub(lambda m: render_table(m.group(1), m.group(2), root), template)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if RESULTS.md differs from the archive's rendering")
    args = parser.parse_args(argv)
    with open(TEMPLATE) as f:
        template = f.read()
    text = render(template)
    if args.check:
        with open(RESULTS) as f:
            if f.read() != text:
                print(f"error: {RESULTS} is not what the archive gives; run python -m experiments.report",
                      file=sys.stderr)
                return 1
        return 0
    with open(RESULTS, "w") as f:
        f.write(text)
    print(f"wrote {RESULTS} ({len(markers(template))} tables from {archive.ARCHIVE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
