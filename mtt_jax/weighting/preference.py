"""Preference vectors over tasks: the option ``weighting.<method>.preference`` of the Gram methods whose
authors define one (UPGrad and DualProj in TorchJD, ConFIG's weight model in its official code).

The empty tuple (the default) keeps the method's own uniform weighting; otherwise the preference is T
non-negative finite numbers, not all zero, used as given (not renormalised), as TorchJD does.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import jax.numpy as jnp


def check_preference(method: str, preference: Sequence[float], num_tasks: int) -> tuple[float, ...] | None:
    """``None`` for ``()`` (uniform), else the preference as floats. Raises ValueError (one line) unless it
    has ``num_tasks`` entries, all finite and ``>= 0``, not all zero."""
    values = tuple(preference)
    if not values:
        return None
    numbers_ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                     for v in values)
    if len(values) != num_tasks or not numbers_ok or min(values) < 0 or max(values) == 0:
        raise ValueError(f"weighting.{method}.preference={values!r} must be {num_tasks} finite numbers "
                         f">= 0, not all zero, one per task (or () for uniform weights)")
    return tuple(float(v) for v in values)


def preference_or(preference: tuple[float, ...] | None, uniform: float, num_tasks: int):
    """The preference as a ``[T]`` f32 array, or ``uniform`` for every task when there is none."""
    if preference is None:
        return jnp.full((num_tasks,), uniform, jnp.float32)
    return jnp.asarray(preference, jnp.float32)
