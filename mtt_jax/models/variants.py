"""MLP multi-task models for the paper tables: Shared-Bottom, one-gate MoE and MMoE.

The three models of Ma et al., "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018, §3-4, with the sizes of their synthetic-data experiments as defaults:

- `SharedBottomMLP` (eq. 1, Caruana 1997): ``y_k = h_k(f(x))``; one shared ReLU layer of 113 units.
- `OneGateMoE` (OMoE, eq. 5): ``f(x) = sum_i g(x)_i f_i(x)`` with one gate ``g(x) = softmax(W_g x)`` shared
  by all tasks; 8 experts, each one ReLU layer of 16 units.
- `MultiGateMoE` (MMoE, eq. 6-8): one gate per task, ``f^k(x) = sum_i g^k(x)_i f_i(x)``,
  ``g^k(x) = softmax(W_gk x)``.

Every task has a tower ``h_k``: ReLU layers of ``tower_units`` (8 in the paper) and a linear read-out
(`heads.TaskHead`, chosen by task kind). With ``tower_units = ()`` the tower is the read-out alone: the
GradNorm toy network (Chen et al. 2018, §4: four shared ReLU layers of 100 units, a task-specific
affine map) is ``SharedBottomMLP(tasks, bottom_units=(100,) * 4, tower_units=())``.

The modules follow `MultiTaskTransformer`'s interface, so the library's train step, weighting methods,
per-task gradients and TAG affinities (`mtt_jax.train_step`, `mtt_jax.task_grads`, `mtt_jax.affinity`)
work on them unchanged: ``__call__(inputs, train) -> ({task: output}, aux)``, ``encode(inputs, train) ->
streams_BxTxH`` (one representation per task and example) and ``decode(streams, train)``. The shared
parameters live under ``trunk`` (one of `task_grads.ENCODER_KEYS`). For the mixtures ``trunk`` holds the
experts *and* the gates, because the gates read the input ``x`` as the experts do: with MMoE, gate k then
counts as a shared parameter whose gradient comes from task k alone, which changes nothing for loss
weighting and is the natural reading of "shared" for gradient methods (MGDA-UB's ``rep_grad`` sees the
per-task mixtures ``f^k(x)``).

`VARIANTS` maps each name to its module class; `register_variant` adds a model under a new name from
outside the package (``mtt_jax.register_model_variant``; docs/extending.md), and `build_variant` builds
it like the built-ins.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtt_jax.models.heads import TaskHead
from mtt_jax.models.partitioning import Dtype, kernel_init, zeros_init
from mtt_jax.tasks import TaskSpec

def _flatten(inputs: jax.Array) -> jax.Array:
    """``[B, ...]`` -> ``[B, F]`` (vector inputs pass through; images are flattened)."""
    return inputs.reshape(inputs.shape[0], -1)


def _dense(units: int, name: str, dtype: Dtype) -> nn.Dense:
    return nn.Dense(units, dtype=dtype, name=name, kernel_init=kernel_init((None, "mlp")),
                    bias_init=zeros_init(("mlp",)))


class MLPBottom(nn.Module):
    """Shared ReLU layers ``[B, F] -> [B, H]``."""
    units: Sequence[int]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxF: jax.Array) -> jax.Array:
        for i, units in enumerate(self.units):
            x_BxF = nn.relu(_dense(units, f"dense_{i}", self.dtype)(x_BxF))
        return x_BxF


class ExpertsAndGates(nn.Module):
    """``num_experts`` one-layer ReLU experts and ``num_gates`` softmax gates (Ma et al. eq. 5, 7-8).

    Returns the gated mixtures ``[B, G, H]`` and the gate values ``[B, G, E]``.
    """
    num_experts: int
    expert_units: int
    num_gates: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxF: jax.Array) -> tuple[jax.Array, jax.Array]:
        features = x_BxF.shape[-1]
        kernel = self.param("experts_kernel", kernel_init((None, None, "mlp")),
                            (self.num_experts, features, self.expert_units))
        bias = self.param("experts_bias", zeros_init((None, "mlp")), (self.num_experts, self.expert_units))
        experts_BxExH = nn.relu(jnp.einsum("bf,efh->beh", x_BxF.astype(self.dtype), kernel.astype(self.dtype))
                                + bias.astype(self.dtype))
        # g(x) = softmax(W_g x): no bias in the paper's gates (eq. 8).
        gate_kernel = self.param("gates_kernel", kernel_init((None, None, None)),
                                 (self.num_gates, features, self.num_experts))
        gates_BxGxE = jax.nn.softmax(
            jnp.einsum("bf,gfe->bge", x_BxF.astype(jnp.float32), gate_kernel.astype(jnp.float32)), axis=-1)
        mixtures_BxGxH = jnp.einsum("bge,beh->bgh", gates_BxGxE.astype(self.dtype), experts_BxExH)
        return mixtures_BxGxH, gates_BxGxE


class Tower(nn.Module):
    """Task tower ``h_k``: ReLU layers of ``units``, then the task's linear read-out."""
    spec: TaskSpec
    units: Sequence[int] = (8,)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxH: jax.Array) -> jax.Array:
        for i, units in enumerate(self.units):
            x_BxH = nn.relu(_dense(units, f"dense_{i}", self.dtype)(x_BxH))
        return TaskHead(self.spec, self.dtype, name="head")(x_BxH)


class _MLPMultiTask(nn.Module):
    """Common decode (towers) and call; subclasses define ``trunk`` and ``encode``."""
    tasks: tuple[TaskSpec, ...]

    def __call__(self, inputs: jax.Array, train: bool = False):
        return self.decode(self.encode(inputs, train), train)

    def _towers(self):
        return {t.name: Tower(t, tuple(self.tower_units), self.dtype, name=f"tower_{t.name}")
                for t in self.tasks}

    def decode(self, streams_BxTxH: jax.Array, train: bool = False) -> tuple[dict[str, jax.Array], dict]:
        del train
        return {t.name: self.towers[t.name](streams_BxTxH[:, i]) for i, t in enumerate(self.tasks)}, {}


class SharedBottomMLP(_MLPMultiTask):
    """Shared-Bottom (Ma et al. 2018 eq. 1): every task's tower reads the same shared layers."""
    bottom_units: Sequence[int] = (113,)
    tower_units: Sequence[int] = (8,)
    dtype: Dtype = jnp.float32

    def setup(self):
        self.trunk = MLPBottom(tuple(self.bottom_units), self.dtype)
        self.towers = self._towers()

    def encode(self, inputs: jax.Array, train: bool = False) -> jax.Array:
        del train
        h_BxH = self.trunk(_flatten(inputs))
        return jnp.broadcast_to(h_BxH[:, None], (h_BxH.shape[0], len(self.tasks), h_BxH.shape[-1]))


class OneGateMoE(_MLPMultiTask):
    """One-gate mixture of experts (OMoE, Ma et al. 2018 eq. 5): one gate shared by all tasks."""
    num_experts: int = 8
    expert_units: int = 16
    tower_units: Sequence[int] = (8,)
    dtype: Dtype = jnp.float32

    def setup(self):
        self.trunk = ExpertsAndGates(self.num_experts, self.expert_units, 1, self.dtype)
        self.towers = self._towers()

    def encode(self, inputs: jax.Array, train: bool = False) -> jax.Array:
        del train
        mixture_Bx1xH, _ = self.trunk(_flatten(inputs))
        return jnp.broadcast_to(mixture_Bx1xH, (mixture_Bx1xH.shape[0], len(self.tasks),
                                                mixture_Bx1xH.shape[-1]))


class MultiGateMoE(_MLPMultiTask):
    """Multi-gate mixture of experts (MMoE, Ma et al. 2018 eq. 6-8): one gate per task."""
    num_experts: int = 8
    expert_units: int = 16
    tower_units: Sequence[int] = (8,)
    dtype: Dtype = jnp.float32

    def setup(self):
        self.trunk = ExpertsAndGates(self.num_experts, self.expert_units, len(self.tasks), self.dtype)
        self.towers = self._towers()

    def encode(self, inputs: jax.Array, train: bool = False) -> jax.Array:
        del train
        mixtures_BxTxH, _ = self.trunk(_flatten(inputs))
        return mixtures_BxTxH

    def gates(self, inputs: jax.Array) -> jax.Array:
        """The gate values ``[B, T, E]`` (which experts each task uses), for diagnostics."""
        return self.trunk(_flatten(inputs))[1]


# name -> a module class with a ``tasks`` field, or a builder ``(tasks=..., **options) -> module``.
VARIANTS: dict[str, Callable[..., nn.Module]] = {
    "shared_bottom": SharedBottomMLP, "omoe": OneGateMoE, "mmoe": MultiGateMoE}
_INTERFACE = ("encode", "decode")  # besides __call__: what per-task gradients and TAG read (task_grads)


def build_variant(name: str, tasks: tuple[TaskSpec, ...], **options) -> nn.Module:
    """``name`` in `VARIANTS`; ``options`` are the module's fields (e.g. ``bottom_units=(113,)``)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model variant {name!r}; choose one of: {', '.join(VARIANTS)}")
    model = VARIANTS[name](tasks=tuple(tasks), **options)
    if not isinstance(VARIANTS[name], type):  # a registered builder: its product is checked here
        _check_module(f"model variant {name!r}: its builder returned {type(model).__name__}, which",
                      type(model))
    return model


def register_variant(name: str, builder: Callable[..., nn.Module], *, replace: bool = False) -> None:
    """Makes ``build_variant(name, tasks, **options)`` build ``builder(tasks=tasks, **options)``.

    ``builder`` is a Flax module class with a ``tasks`` field, or a function ``(tasks, **options) ->
    module``; the module follows `MultiTaskTransformer`'s interface (``__call__(inputs, train) ->
    ({task: output}, aux)``, ``encode`` and ``decode``; shared parameters under ``trunk``), as the
    modules here do. Registering the same object under the same name again does nothing; another
    object under a taken name is refused unless ``replace``.

    Raises:
        ValueError: one line naming what does not fit.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model variant name {name!r} must be a non-empty string")
    if VARIANTS.get(name) is builder:
        return
    if name in VARIANTS and not replace:
        raise ValueError(f"model variant {name!r} is already registered ({VARIANTS[name].__module__}."
                         f"{VARIANTS[name].__qualname__}); choose another name or pass replace=True")
    where = f"model variant {name!r}: {getattr(builder, '__qualname__', repr(builder))}"
    if isinstance(builder, type):
        _check_module(where, builder)
        if "tasks" not in {field.name for field in dataclasses.fields(builder)}:
            raise ValueError(f"{where} has no field tasks (the TaskSpecs it serves)")
    elif not callable(builder):
        raise ValueError(f"{where} is neither a flax module class nor a builder (tasks, **options) -> module")
    else:
        try:
            inspect.signature(builder).bind_partial(tasks=())
        except TypeError:
            raise ValueError(f"{where} takes no keyword argument tasks; its signature must be "
                             "(tasks, **options)") from None
    VARIANTS[name] = builder


def _check_module(where: str, cls: type) -> None:
    if not issubclass(cls, nn.Module):
        raise ValueError(f"{where} is not a flax.linen.Module")
    missing = [method for method in _INTERFACE if not callable(getattr(cls, method, None))]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(m + '()' for m in missing)}; a multi-task model has "
                         "__call__, encode and decode (mtt_jax.models.variants)")


def num_params(params) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nn.unbox(params))))
