"""One registry of multi-task weighting methods, selected by ``config.weighting.name``.

A method's options come from the sub-config named after it, e.g. ``config.weighting.cagrad.c = 0.4``
builds ``CAGrad(num_tasks, c=0.4)``; `DEFAULT_OPTIONS` lists every method's options and defaults. Two
older top-level fields still work: ``weighting.weights`` (fixed) and ``weighting.init_log_var``
(uncertainty); the sub-config wins where both are set. Method families: `loss_based`, `epoch_based`,
`famo` (losses); `gradnorm`, `multi_objective`, `projection`, `closed_form`, `bargaining`, `dual_cone`,
`conflict_free` (Gram matrix); `double_sampling` (cross-Gram of two samples); `elementwise`, `tracking`
(per-task gradients); `smoothing` (``cr_mogm``: another method's task weights, averaged over steps);
`bilevel` (``auto_lambda``: weights trained on a validation loss one virtual step ahead).
``weighting.blocks`` applies a Gram method per group of the shared parameters (`per_block`). Scale
conventions differ across methods (sum vs mean, clipped); see each class docstring.

`register_method` adds a method under a new name from outside the package (``mtt_jax.register_method``;
docs/extending.md): `METHODS` and `DEFAULT_OPTIONS` gain it, so `make_method` and the config check build
it like the built-ins.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from mtt_jax.weighting.bargaining import FairGrad, NashMTL
from mtt_jax.weighting.base import WeightingMethod
from mtt_jax.weighting.bilevel import AutoLambda
from mtt_jax.weighting.closed_form import IMTL, AlignedMTL
from mtt_jax.weighting.conflict_free import ConFIG
from mtt_jax.weighting.double_sampling import MoDo, SDMGrad
from mtt_jax.weighting.dual_cone import DualProj
from mtt_jax.weighting.elementwise import DBMTL, GradDrop
from mtt_jax.weighting.epoch_based import DynamicWeightAverage, SmoothTchebycheff
from mtt_jax.weighting.famo import FAMO
from mtt_jax.weighting.gradnorm import GradNorm
from mtt_jax.weighting.loss_based import (EqualWeighting, FixedWeighting, GeometricLossWeighting,
                                          RandomLossWeighting, UncertaintyWeighting)
from mtt_jax.weighting.multi_objective import MGDA, UPGrad, CAGrad
from mtt_jax.weighting.per_block import PerBlock
from mtt_jax.weighting.projection import GradVac, PCGrad
from mtt_jax.weighting.smoothing import CRMOGM, build_inner
from mtt_jax.weighting.tracking import ExcessMTL, MoCo

METHODS: dict[str, type[WeightingMethod]] = {cls.name: cls for cls in (
    EqualWeighting, FixedWeighting, UncertaintyWeighting, DynamicWeightAverage, RandomLossWeighting,
    GeometricLossWeighting, FAMO, SmoothTchebycheff,
    GradNorm, MGDA, PCGrad, GradVac, IMTL, CAGrad, NashMTL, AlignedMTL, UPGrad, FairGrad,
    MoDo, SDMGrad, GradDrop, DBMTL, ExcessMTL, MoCo, DualProj, ConFIG, CRMOGM, AutoLambda)}


def _constructor_defaults(cls: type[WeightingMethod]) -> dict[str, Any]:
    parameters = list(inspect.signature(cls.__init__).parameters.values())[2:]  # self, num_tasks
    return {p.name: p.default for p in parameters}


DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    name: _constructor_defaults(cls) for name, cls in METHODS.items()}

_TOP_LEVEL_OPTIONS = {"fixed": ("weights",), "uncertainty": ("init_log_var",)}

# What each value of ``WeightingMethod.requires`` makes the step call (`mtt_jax.weighting.base`).
REQUIRED_HOOKS = {"losses": "combine", "gram": "gram_weights", "sampled_gram": "gram_weights",
                  "grads": "aggregate", "lookahead": "lookahead_gradient"}
# config.weighting's own fields (configs/default.py): no method's options block may take their names.
_WEIGHTING_FIELDS = frozenset({"name", "weights", "init_log_var", "rep_grad", "diagnostics_every", "blocks"})
ADDED_METHODS: set[str] = set()  # the names `register_method` gave (their config blocks: mtt_jax.registry)


def register_method(name: str, method: type[WeightingMethod] | Callable[..., WeightingMethod], *,
                    default_options: Mapping[str, Any] | None = None, replace: bool = False) -> None:
    """Makes ``config.weighting.name = name`` build ``method(num_tasks, **options)``.

    ``method`` is a `WeightingMethod` subclass whose ``name`` is ``name``, or a factory
    ``(num_tasks, **options) -> WeightingMethod`` (its product is checked when `make_method` first
    builds it). ``default_options``: the options and their defaults, which become the config's
    ``weighting.<name>`` block; by default the keyword parameters after ``num_tasks`` of the
    constructor (or factory), each of which needs a default. Registering the same object under the same
    name again does nothing; another object under a taken name is refused unless ``replace``.

    Raises:
        ValueError: one line, for a taken or unusable name, or a method that does not implement what
            its ``requires`` asks for.
    """
    if (not isinstance(name, str) or not name.isidentifier() or name in _WEIGHTING_FIELDS
            or hasattr(dict, name)):
        raise ValueError(f"weighting method name {name!r} cannot name a config.weighting.<name> block; use "
                         "a Python identifier that is none of config.weighting's own fields (name, weights, "
                         "...) and no dict method (items, get, ...)")
    if METHODS.get(name) is method:
        return
    if name in METHODS and not replace:
        raise ValueError(f"weighting method {name!r} is already registered ({_qualified(METHODS[name])}); "
                         "choose another name or pass replace=True")
    if isinstance(method, type):
        check_method_class(method, name)
    elif not callable(method):
        raise ValueError(f"weighting method {name!r}: {method!r} is neither a WeightingMethod subclass "
                         "nor a factory (num_tasks, **options) -> WeightingMethod")
    options = _checked_options(name, method, default_options)
    METHODS[name] = method
    DEFAULT_OPTIONS[name] = options
    ADDED_METHODS.add(name)


def check_method_class(cls: type, name: str | None = None) -> None:
    """A one-line ValueError unless ``cls`` is a concrete `WeightingMethod` (named ``name``, if given)
    that implements the hook its ``requires`` asks for."""
    where = f"weighting method {name or getattr(cls, 'name', '')!r}: {_qualified(cls)}"
    if not issubclass(cls, WeightingMethod):
        raise ValueError(f"{where} is not a subclass of mtt_jax.weighting.WeightingMethod")
    if name is not None and cls.name != name:
        raise ValueError(f"{where} has name = {cls.name!r}; set the class attribute name = {name!r}")
    if inspect.isabstract(cls):
        raise ValueError(f"{where} leaves abstract methods unimplemented: "
                         f"{', '.join(sorted(cls.__abstractmethods__))}")
    if cls.requires not in REQUIRED_HOOKS:
        raise ValueError(f"{where} has requires = {cls.requires!r}; choose one of: "
                         f"{', '.join(REQUIRED_HOOKS)}")
    hook = REQUIRED_HOOKS[cls.requires]
    if getattr(cls, hook) is getattr(WeightingMethod, hook):
        raise ValueError(f"{where} has requires = {cls.requires!r} but does not implement {hook}()")


def _checked_options(name: str, method: Callable, default_options: Mapping[str, Any] | None) -> dict:
    """The options of a method being registered: given, or read off its signature; each one it accepts."""
    signature = inspect.signature(method)  # of a class: its constructor's, without self
    parameters = list(signature.parameters.values())[1:]  # after num_tasks
    if default_options is None:
        keywords = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        missing = [p.name for p in keywords if p.default is p.empty]
        if missing:
            raise ValueError(f"weighting method {name!r}: option(s) {', '.join(missing)} have no default; "
                             "give them one, or pass default_options")
        default_options = {p.name: p.default for p in keywords}
    default_options = dict(default_options)
    for option, value in default_options.items():
        if not isinstance(option, str) or not option.isidentifier() or not _config_value(value):
            raise ValueError(f"weighting method {name!r}: option {option!r}={value!r} cannot be a config "
                             "field; options are identifiers with bool, int, float, str or tuple values")
    try:
        signature.bind(1, **default_options)
    except TypeError as e:
        raise ValueError(f"weighting method {name!r}: default_options do not fit the signature of "
                         f"{_qualified(method)}: {e}") from None
    return default_options


def _config_value(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_config_value(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _qualified(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def method_options(weighting_config, name: str) -> dict[str, Any]:
    """The keyword options for method ``name``: its sub-config, plus the older top-level fields."""
    sub_config = weighting_config.get(name, None) or {}
    options = dict(sub_config.to_dict() if hasattr(sub_config, "to_dict") else sub_config)
    for key in _TOP_LEVEL_OPTIONS.get(name, ()):
        if key in weighting_config and key not in options:
            options[key] = weighting_config[key]
    return options


def make_method(weighting_config, num_tasks: int, name: str | None = None) -> WeightingMethod:
    """Builds the method named ``name`` (default ``weighting_config.name``) with its options from the same
    config; a wrapper's inner method (``cr_mogm``'s ``inner``) is built the same way, from its own block.
    The config's method (``name`` None) is applied per group of the shared parameters when
    ``weighting.blocks`` is set (`per_block.PerBlock`)."""
    if name is None:
        method = make_method(weighting_config, num_tasks, weighting_config.name)
        blocks = tuple(weighting_config.get("blocks", None) or ())
        return PerBlock(method, blocks) if blocks else method
    if name not in METHODS:
        raise ValueError(f"weighting.name={name!r} is not valid; choose one of: {', '.join(sorted(METHODS))}")
    wrapper = getattr(METHODS[name], "wraps_method", False)  # its inner method checks weighting.weights
    ignored = [key for method, keys in _TOP_LEVEL_OPTIONS.items() if method != name and not wrapper
               for key in keys if key == "weights" and weighting_config.get(key)]  # init_log_var: always set
    if ignored:
        raise ValueError(f"weighting.weights={tuple(weighting_config.weights)} is used only by "
                         f"weighting.name='fixed'; {name!r} would ignore it: remove it or use 'fixed'")
    options = method_options(weighting_config, name)
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS[name]))
    if unknown:
        valid = ", ".join(DEFAULT_OPTIONS[name]) or "none"
        raise ValueError(f"unknown option(s) {', '.join(f'weighting.{name}.{k}' for k in unknown)}; "
                         f"valid options for {name!r}: {valid}")
    if wrapper and isinstance(options.get("inner", ""), str):
        options["inner"] = build_inner(weighting_config, num_tasks,
                                       options.get("inner", DEFAULT_OPTIONS[name]["inner"]))
    method = METHODS[name](num_tasks, **options)
    if not isinstance(METHODS[name], type):  # a registered factory: its product is checked here
        if not isinstance(method, WeightingMethod):
            raise ValueError(f"weighting method {name!r}: its factory returned {type(method).__name__}, "
                             "not a WeightingMethod")
        check_method_class(type(method))
    return method


__all__ = ["ADDED_METHODS", "DEFAULT_OPTIONS", "METHODS", "WeightingMethod", "check_method_class",
           "make_method", "method_options", "register_method"]
