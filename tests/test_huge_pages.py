"""Host allocations on huge pages, opted into by the launcher (`mtt_jax.perf.huge_pages`)."""

import os
import subprocess
import sys

import pytest

from mtt_jax.perf import huge_pages

GRANTED = huge_pages.this_machine_environment({}) is not None


@pytest.mark.parametrize("environ, thp_mode, glibc, tunables", [
    ({}, "madvise", (2, 36), "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", (2, 35),
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", (2, 36), None),  # the user's choice
    ({"MTT_JAX_HUGE_PAGES": "0"}, "madvise", (2, 36), None),
    ({}, "always", (2, 36), None),
    ({}, "never", (2, 36), None),
    ({}, None, (2, 36), None),
    ({}, "madvise", (2, 31), None),
    ({}, "madvise", None, None),
])
def test_the_tunable_is_added_only_where_it_changes_something(environ, thp_mode, glibc, tunables):
    result = huge_pages.environment_with_huge_pages({"PATH": "/bin", **environ}, thp_mode, glibc)
    if tunables is None:
        assert result is None
    else:
        assert result == {"PATH": "/bin", **environ, "GLIBC_TUNABLES": tunables}


def test_the_kernel_mode_is_the_bracketed_word(tmp_path):
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    assert huge_pages.transparent_huge_pages_mode(str(tmp_path / "enabled")) == "madvise"
    assert huge_pages.transparent_huge_pages_mode(str(tmp_path / "missing")) is None


def run(code: str, **environ) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", huge_pages.OPT_OUT)}
    result = subprocess.run([sys.executable, "-c", code, "an argument"], env={**env, **environ},
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


ENABLED = "from mtt_jax.perf import huge_pages; print(huge_pages.enabled())"


def test_huge_pages_are_the_launchers_to_opt_into():
    """A command started plainly keeps glibc's defaults (no re-execution); one started with the
    tunable, as ``python -m launch.local --huge_pages`` starts its children, runs on huge pages."""
    assert run(ENABLED) == "False\n"
    assert run(ENABLED, GLIBC_TUNABLES=huge_pages.TUNABLE) == f"{GRANTED}\n"
    from launch import local
    args, main_args = local._parse(["--huge_pages", "--", "--config", "configs/default.py:tiny"])
    assert args.huge_pages and main_args == ["--config", "configs/default.py:tiny"]
    assert not local._parse([])[0].huge_pages


FAULTS = ("import ctypes, resource\n"  # glibc's malloc, as XLA uses it (numpy advises huge pages itself)
          "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
          "counts = []\n"
          "for _ in range(4):\n"
          "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
          "    block = libc.malloc(64 << 20); ctypes.memset(block, 1, 64 << 20)\n"
          "    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before); libc.free(block)\n"
          "print(min(counts))")


@pytest.mark.skipif(not GRANTED, reason="the kernel grants no advised huge pages or glibc lacks the tunable")
def test_the_tunable_takes_a_large_allocation_from_thousands_of_page_faults_to_a_few():
    """64 MiB from malloc, written, freed, four times: 16,384 faults each time in 4 KiB pages."""
    plain = int(run(FAULTS))
    huge = int(run(FAULTS, GLIBC_TUNABLES=huge_pages.TUNABLE))
    assert plain >= 16_000 and huge <= plain // 10, (plain, huge)  # 544 here: the unaligned ends
