"""mtt_jax: multi-task learning with Transformers in JAX and Flax (README.md).

The extension API (`mtt_jax.registry`, docs/extending.md) is reachable from the package itself and is
imported on first use, so that ``import mtt_jax`` stays cheap (it imports neither JAX nor the sources):

- ``register_method(name, cls_or_factory, *, default_options=None, replace=False)``
- ``register_source(name, cls, tasks=(), *, replace=False)``
- ``register_model_variant(name, builder, *, replace=False)``
- ``load_plugins(config)``: imports ``config.plugins`` (the config check does it too)
- ``TaskSpec``, ``WeightingMethod``, ``Source``: the interfaces that registered objects implement
"""

import importlib

_LAZY = {
    "register_method": "mtt_jax.registry",
    "register_source": "mtt_jax.registry",
    "register_model_variant": "mtt_jax.registry",
    "load_plugins": "mtt_jax.registry",
    "TaskSpec": "mtt_jax.tasks",
    "WeightingMethod": "mtt_jax.weighting.base",
    "Source": "mtt_jax.data.base",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mtt_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
