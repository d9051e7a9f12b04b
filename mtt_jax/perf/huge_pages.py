"""Large host allocations on transparent huge pages, for the step time of the CPU backend.

XLA:CPU takes each execution's temporary buffer (220 MiB for ``configs/benchmark.py``) from malloc,
and glibc maps a block that large afresh on every call and unmaps it after: the kernel faults it in
4 KiB at a time, 56,000 minor page faults per step and 5-10% of the two cores' time in the kernel
(``resource.getrusage`` around the steps). glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc 2.35 and
later) advises such mappings to use transparent huge pages, which the kernel's default ``madvise``
mode then grants: 540 faults per step, and the reference config's MFU 2-4 points higher, measured
side by side (docs/performance_cpu.md).

glibc reads its tunables when a process starts, so they are the launcher's to set, as PyTorch's
``torch.backends.xeon.run_cpu`` sets up the allocator before the program: it is opt-in, with
``python -m launch.local --huge_pages ...`` (`this_machine_environment`), or by starting a command with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in its environment. The benchmark reports whether it is on
(`enabled`). ``MTT_JAX_HUGE_PAGES=0`` makes `this_machine_environment` leave the environment as it is.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "MTT_JAX_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_pages_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's mode for transparent huge pages (``always``, ``madvise`` or ``never``), or None
    where the kernel has none."""
    try:
        with open(path) as f:
            selected = re.search(r"\[(\w+)\]", f.read())
    except OSError:
        return None
    return selected.group(1) if selected else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library where it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def environment_with_huge_pages(environ: Mapping[str, str], thp_mode: str | None,
                                glibc: tuple[int, int] | None) -> dict[str, str] | None:
    """``environ`` with `TUNABLE` added to ``GLIBC_TUNABLES``, or None where re-executing would change
    nothing: opted out, the tunable given already, a glibc without it, or a kernel whose mode is not
    ``madvise`` (``always`` gives huge pages without advice, ``never`` refuses them)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (environ.get(OPT_OUT, "1") == "0" or "glibc.malloc.hugetlb=" in tunables or thp_mode != "madvise"
            or glibc is None or glibc < (2, 35)):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def this_machine_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str] | None:
    """`environment_with_huge_pages` for this machine's kernel and C library."""
    return environment_with_huge_pages(environ, transparent_huge_pages_mode(), glibc_version())


def starting_environment() -> Mapping[str, str]:
    """The environment this process was started with (glibc read its tunables from it), which later
    changes to ``os.environ`` do not alter; ``os.environ`` where /proc does not say."""
    try:
        with open("/proc/self/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return os.environ
    return dict(entry.decode(errors="replace").split("=", 1) for entry in entries if b"=" in entry)


def enabled() -> bool:
    """Whether this process's large allocations are advised onto huge pages (for the benchmark's
    report): it started with the tunable, and the kernel grants advised huge pages."""
    tunables = starting_environment().get("GLIBC_TUNABLES", "")
    return TUNABLE in tunables.split(":") and transparent_huge_pages_mode() in ("madvise", "always")
