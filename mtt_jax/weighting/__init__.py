"""One registry of multi-task weighting methods, selected by ``config.weighting.name``.

A method's options come from the sub-config named after it, e.g. ``config.weighting.cagrad.c = 0.4``
builds ``CAGrad(num_tasks, c=0.4)``; `DEFAULT_OPTIONS` lists every method's options and defaults. Two
older top-level fields still work: ``weighting.weights`` (fixed) and ``weighting.init_log_var``
(uncertainty); the sub-config wins where both are set. Method families: `loss_based`, `epoch_based`,
`famo` (losses); `gradnorm`, `multi_objective`, `projection`, `closed_form`, `bargaining` (Gram matrix);
`double_sampling` (cross-Gram of two samples); `elementwise`, `tracking` (per-task gradients). Scale
conventions differ across methods (sum vs mean, clipped); see each class docstring.
"""

from __future__ import annotations

import inspect
from typing import Any

from mtt_jax.weighting.bargaining import FairGrad, NashMTL
from mtt_jax.weighting.base import WeightingMethod
from mtt_jax.weighting.closed_form import IMTL, AlignedMTL
from mtt_jax.weighting.double_sampling import MoDo, SDMGrad
from mtt_jax.weighting.elementwise import DBMTL, GradDrop
from mtt_jax.weighting.epoch_based import DynamicWeightAverage, SmoothTchebycheff
from mtt_jax.weighting.famo import FAMO
from mtt_jax.weighting.gradnorm import GradNorm
from mtt_jax.weighting.loss_based import (EqualWeighting, FixedWeighting, GeometricLossWeighting,
                                          RandomLossWeighting, UncertaintyWeighting)
from mtt_jax.weighting.multi_objective import MGDA, UPGrad, CAGrad
from mtt_jax.weighting.projection import GradVac, PCGrad
from mtt_jax.weighting.tracking import ExcessMTL, MoCo

METHODS: dict[str, type[WeightingMethod]] = {cls.name: cls for cls in (
    EqualWeighting, FixedWeighting, UncertaintyWeighting, DynamicWeightAverage, RandomLossWeighting,
    GeometricLossWeighting, FAMO, SmoothTchebycheff,
    GradNorm, MGDA, PCGrad, GradVac, IMTL, CAGrad, NashMTL, AlignedMTL, UPGrad, FairGrad,
    MoDo, SDMGrad, GradDrop, DBMTL, ExcessMTL, MoCo)}


def _constructor_defaults(cls: type[WeightingMethod]) -> dict[str, Any]:
    parameters = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, num_tasks
    return {p.name: p.default for p in parameters}


DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    name: _constructor_defaults(cls) for name, cls in METHODS.items()}

_TOP_LEVEL_OPTIONS = {"fixed": ("weights",), "uncertainty": ("init_log_var",)}


def method_options(weighting_config, name: str) -> dict[str, Any]:
    """The keyword options for method ``name``: its sub-config, plus the older top-level fields."""
    sub_config = weighting_config.get(name, None) or {}
    options = dict(sub_config.to_dict() if hasattr(sub_config, "to_dict") else sub_config)
    for key in _TOP_LEVEL_OPTIONS.get(name, ()):
        if key in weighting_config and key not in options:
            options[key] = weighting_config[key]
    return options


def make_method(weighting_config, num_tasks: int) -> WeightingMethod:
    """Builds the method named ``weighting_config.name`` with its options from the same config."""
    name = weighting_config.name
    if name not in METHODS:
        raise ValueError(f"weighting.name={name!r} is not valid; choose one of: {', '.join(sorted(METHODS))}")
    ignored = [key for method, keys in _TOP_LEVEL_OPTIONS.items() if method != name for key in keys
               if key == "weights" and weighting_config.get(key)]  # init_log_var always has a value
    if ignored:
        raise ValueError(f"weighting.weights={tuple(weighting_config.weights)} is used only by "
                         f"weighting.name='fixed'; {name!r} would ignore it: remove it or use 'fixed'")
    options = method_options(weighting_config, name)
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS[name]))
    if unknown:
        valid = ", ".join(DEFAULT_OPTIONS[name]) or "none"
        raise ValueError(f"unknown option(s) {', '.join(f'weighting.{name}.{k}' for k in unknown)}; "
                         f"valid options for {name!r}: {valid}")
    return METHODS[name](num_tasks, **options)


__all__ = ["DEFAULT_OPTIONS", "METHODS", "WeightingMethod", "make_method", "method_options"]
