"""Parameter initialisers that carry logical axis names, and the compute-dtype alias, shared by every
module of the model (`mtt_jax.models.layers` maps the names onto the mesh through `mtt_jax.sharding`'s
rules)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

Dtype = Any


def kernel_init(names: tuple[str | None, ...], init=nn.initializers.xavier_uniform()):
    return nn.with_logical_partitioning(init, names)


def zeros_init(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)
