"""The extension API: weighting methods, data sources (with their tasks) and model variants added by name
from your own module, and the config's ``plugins``, the modules a run imports first.

    import mtt_jax

    mtt_jax.register_method("loss_proportional", LossProportional)
    mtt_jax.register_source("noisy_sums", NoisySums,
                            tasks=[mtt_jax.TaskSpec("sum_sign", "classification", num_classes=2)])
    mtt_jax.register_model_variant("wide_bottom", WideBottom)

Each refuses a taken name in one line (unless ``replace=True``; the same object again is a no-op) and
checks the object's interface before storing it (`mtt_jax.weighting.register_method`,
`mtt_jax.data.register_source`, `mtt_jax.models.variants.register_variant`). A registered name then works
wherever a built-in does, because those read the same registries: ``config.weighting.name`` (built by
`mtt_jax.weighting.make_method`), ``config.data.source`` and ``config.tasks`` (`mtt_jax.data.make_source`,
`mtt_jax.tasks.get`), `mtt_jax.models.variants.build_variant` (a model for `mtt_jax.seed_runs.train_seeds`),
the config check, ``python -m mtt_jax.main`` and ``python -m mtt_jax.benchmark --methods``.

``config.plugins`` (a tuple of module names) is imported in order by `load_plugins`, which the config
check (`mtt_jax.run.config_check.validate`) and the builder (`mtt_jax.builder.build_parts`) call before
they read any name; a module that fails to import stops the run with one line naming it. The modules are
part of the run's identity (a workdir's run resumes only with the same ``plugins``). A method registered
with options gets its ``config.weighting.<name>`` block of defaults there, as `configs/default.py` gives
every built-in one; call `load_plugins` in your config's ``get_config`` to have the block early enough
for ``--config.weighting.<name>.<option>=...`` overrides (examples/plugin/config.py). How-to:
docs/extending.md.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Sequence

import ml_collections

from mtt_jax import weighting
from mtt_jax.data import register_source
from mtt_jax.models.variants import register_variant as register_model_variant
from mtt_jax.weighting import register_method


def load_plugins(config) -> tuple[str, ...]:
    """Imports ``config.plugins`` in order (a config without the field has none), then adds to
    ``config.weighting`` the block of default options of each registered method that lacks one.
    Importing a module twice does nothing, so this may run more than once. Returns the module names.

    Raises:
        ValueError: one line naming the module that failed to import, or a malformed ``plugins``.
    """
    plugins = config.get("plugins", ())
    import_plugins(plugins)
    _add_option_blocks(config)
    return tuple(plugins)


def import_plugins(names: Sequence[str]) -> None:
    """``importlib.import_module`` of each name, in order; any failure as one line that names it."""
    if isinstance(names, str) or not isinstance(names, (tuple, list)) or not all(
            isinstance(name, str) and name for name in names):
        raise ValueError(f"plugins={names!r} must be a tuple of module names, e.g. ('my_package.my_module',)")
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # whatever the module raises: the run stops in one line that names it
            message = (str(e).strip().splitlines() or [""])[0]
            hint = ""
            if isinstance(e, ModuleNotFoundError) and e.name and (name + ".").startswith(e.name + "."):
                hint = " (install its package, or put the folder that holds it on PYTHONPATH)"
            raise ValueError(f"plugins: importing {name!r} failed: {type(e).__name__}: {message}"
                             f"{hint}") from e


def _add_option_blocks(config) -> None:
    """``config.weighting.<name>``: the defaults of each method `register_method` added that has options
    and no block yet (the built-ins' blocks come from configs/default.py)."""
    missing = {name: weighting.DEFAULT_OPTIONS[name] for name in sorted(weighting.ADDED_METHODS)
               if weighting.DEFAULT_OPTIONS[name] and name not in config.weighting}
    if not missing:
        return
    unlocked = config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext()
    with unlocked:
        for name, options in missing.items():
            config.weighting[name] = ml_collections.ConfigDict(options)


__all__ = ["import_plugins", "load_plugins", "register_method", "register_model_variant", "register_source"]
