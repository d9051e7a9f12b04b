"""One registry of loss-weighting methods, selected by ``config.weighting.name`` (DESIGN §5)."""

from __future__ import annotations

from mtt_jax.weighting.base import WeightingMethod
from mtt_jax.weighting.loss_based import EqualWeighting, FixedWeighting, UncertaintyWeighting

METHODS: dict[str, type[WeightingMethod]] = {
    cls.name: cls for cls in (EqualWeighting, FixedWeighting, UncertaintyWeighting)
}


def make_method(weighting_config, num_tasks: int) -> WeightingMethod:
    """Builds the method named ``weighting_config.name`` with its options from the same config."""
    name = weighting_config.name
    if name not in METHODS:
        raise ValueError(f"unknown weighting.name={name!r}; choose one of: {', '.join(sorted(METHODS))}")
    if name == "fixed":
        return FixedWeighting(num_tasks, weighting_config.weights)
    if name == "uncertainty":
        return UncertaintyWeighting(num_tasks, weighting_config.get("init_log_var", -0.5))
    return METHODS[name](num_tasks)


__all__ = ["METHODS", "WeightingMethod", "make_method"]
