"""Will the run fit in memory? Answered before the workdir is touched (bad input fails first, in one line).

Two estimates, each refused with a one-line `config_check.ConfigError` when it cannot fit:

- host: the batches the loop holds at once (`prefetch` + 2 train batches, 2 eval batches), from the
  bytes of a two-row batch of the source, against the memory the kernel says is available;
- device: the train step's compiled memory analysis (arguments + outputs - donated aliases +
  temporaries, per device), as MaxText checks its AOT-compiled step, against the device's limit (GPU and
  TPU runtimes report it; on the CPU the devices share the host's available memory).

The step is compiled on abstract arguments with the shardings the loop uses, so the loop's first call
finds the compiled program in jit's cache instead of compiling it again.
"""

from __future__ import annotations

import jax
import numpy as np

from mtt_jax.run.config_check import ConfigError

_GIB = 2.0**30
_PROBE_ROWS = 2


def host_available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (Linux), else None (no check)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def batch_bytes_per_row(source, layout_rows: int = _PROBE_ROWS) -> float:
    """Host bytes of one row of ``source``'s train batches (inputs, labels, masks; all tasks' sub-batches
    of the multi-input layout), measured on a batch of ``layout_rows`` rows."""
    batch = source.train_batch(0, layout_rows)
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(batch)) / layout_rows


def check_host_batches(train_source, batch_size: int, eval_batch_size: int, prefetch: int,
                       available: int | None = None) -> None:
    """Refuses batch sizes whose batches alone would not fit in the host's available memory."""
    available = host_available_bytes() if available is None else available
    if available is None:
        return
    per_row = batch_bytes_per_row(train_source)
    needed = per_row * (batch_size * (prefetch + 2) + eval_batch_size * 2)
    if needed > available:
        raise ConfigError(
            f"batch_size={batch_size} and eval_batch_size={eval_batch_size} need about {needed / _GIB:.1f} "
            f"GiB of host memory for the batches the loop holds ({per_row:.0f} bytes per row, "
            f"{prefetch} prefetched), but {available / _GIB:.1f} GiB are available; lower them")


def device_memory_limit(device: jax.Device) -> int | None:
    """Bytes a program may use on ``device``: the runtime's limit (GPU, TPU), or on the CPU the host's
    available memory shared by its local devices; None where neither is known."""
    stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu" and (available := host_available_bytes()) is not None:
        return available // jax.local_device_count()
    return None


def compiled_bytes(compiled) -> int | None:
    """Per-device bytes a compiled program holds at its peak: arguments + outputs - donated aliases +
    temporaries (XLA's memory analysis); None where the backend gives no analysis."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)


def check_compiled_step(compiled, what: str, remedy: str, device: jax.Device | None = None) -> None:
    """Refuses a compiled step that needs more memory per device than the device has; ``remedy`` says
    what to change (e.g. "lower batch_size")."""
    device = device or jax.local_devices()[0]
    needed, limit = compiled_bytes(compiled), device_memory_limit(device)
    if needed is None or limit is None or needed <= limit:
        return
    raise ConfigError(
        f"the {what} needs about {_size(needed)} per device (its compiled memory analysis), but "
        f"{device.device_kind} has {_size(limit)} available; {remedy}")


def _size(num_bytes: float) -> str:
    return f"{num_bytes / _GIB:.1f} GiB" if num_bytes >= _GIB else f"{num_bytes / 2**20:.2f} MiB"
