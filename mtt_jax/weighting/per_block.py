"""Per-block aggregation: a Gram method run once per group of the shared parameters.

``weighting.blocks`` is an ordered tuple of regular expressions over a shared parameter's path
(``trunk/block_0/mlp/wi/kernel``: its dict keys joined by ``/``). A leaf goes to the first pattern that
matches the whole path (``re.fullmatch``); a pattern with a capturing group makes one group per distinct
captured text (``trunk/(block_\\d+)/.*``: one group per Transformer block, named ``block_0``, ...), one
without makes one group named by the pattern; the leaves no pattern matches form one last group,
``other``. With groups ``b = 1..B`` the method sees ``K_b = G_b G_b^T`` (``G_b``: the task gradients
restricted to group b), returns ``c_b`` and group b's update is ``d_b = sum_t c_b,t g_t,b`` (TorchJD's
aggregation per parameter group; GradVac, Wang et al. ICLR 2021 §4, compares such granularities).

`PerBlock` wraps the configured method (`mtt_jax.weighting.make_method` builds it when ``blocks`` is
set): the grouping is static, read off the parameter paths at trace time, and the method's state gets a
leading ``B`` axis (one GradVac cosine EMA, one CR-MOGM average per group). The train step
(`mtt_jax.train_step`) asks `WeightingMethod.block_grouping` for the groups and hands the ``[B, T, T]``
Gram matrices to `PerBlock.grouped_gram_weights`, which ``vmap``-s the method over them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import jax
import jax.numpy as jnp

from mtt_jax.weighting.base import PyTree, WeightingMethod

OTHER_GROUP = "other"  # the group of the leaves that no pattern matches


@dataclasses.dataclass(frozen=True)
class BlockGrouping:
    """A static partition of a pytree's leaves: ``leaf_group[i]`` is the group index of the i-th leaf in
    ``jax.tree.leaves`` order, ``names[b]`` the name of group b."""
    leaf_group: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def num_groups(self) -> int:
        return len(self.names)


def leaf_path(path: Sequence) -> str:
    """A leaf's dict keys joined by ``/`` (attribute keys, such as a partitioned box's ``value``, and
    sequence indices are not part of a parameter's name)."""
    return "/".join(str(key.key) for key in path if isinstance(key, jax.tree_util.DictKey))


def compile_patterns(patterns: Sequence[str]) -> tuple[re.Pattern, ...]:
    """The patterns compiled; a ValueError (one line) names one that is no regular expression."""
    compiled = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"weighting.blocks: {pattern!r} is not a pattern; give regular expressions over "
                             "shared-parameter paths such as 'trunk/(block_\\d+)/.*'")
        try:
            compiled.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(f"weighting.blocks: {pattern!r} is not a regular expression ({e})") from None
    return tuple(compiled)


def group_leaves(tree: PyTree, patterns: Sequence[str]) -> BlockGrouping:
    """The grouping of ``tree``'s leaves by ``patterns`` (module docstring). Raises ValueError (one line)
    for a pattern that matches no leaf: a typo would otherwise merge its leaves into ``other``."""
    compiled = compile_patterns(patterns)
    paths = [leaf_path(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]
    keys = [_group_key(compiled, path) for path in paths]
    unused = [p.pattern for i, p in enumerate(compiled) if not any(k[0] == i for k in keys)]
    if unused:
        shown = ", ".join(paths[:4]) + (", ..." if len(paths) > 4 else "")
        raise ValueError(f"weighting.blocks pattern {unused[0]!r} matches no shared parameter (their paths: "
                         f"{shown}); fix or remove it")
    order = sorted(set(keys), key=lambda k: (k[0], keys.index(k)))  # pattern order, then first leaf
    index = {key: b for b, key in enumerate(order)}
    return BlockGrouping(leaf_group=tuple(index[k] for k in keys), names=tuple(k[1] for k in order))


def _group_key(compiled: Sequence[re.Pattern], path: str) -> tuple[int, str]:
    """``(pattern index, group name)`` of one path; ``(len(compiled), "other")`` if none matches."""
    for i, pattern in enumerate(compiled):
        match = pattern.fullmatch(path)
        if match:
            return i, (match.group(1) if pattern.groups else pattern.pattern)
    return len(compiled), OTHER_GROUP


class PerBlock(WeightingMethod):
    """A Gram (or double-sampling) method applied per group of the shared parameters.

    ``d_b = sum_t c_b,t g_t,b`` with ``c_b = method(K_b)`` for every group b (module docstring). What
    survives grouping: guarantees stated per group add up over groups, since ``g_t . d = sum_b
    g_t,b . d_b``; MGDA's ``g_t . d >= |d|^2`` and the no-conflict ``g_t . d >= 0`` of UPGrad, DualProj
    and PCGrad (for T = 2) hold overall. Norm statements do not: Nash-MTL's clip ``|d_b| <= 1`` allows
    ``|d| <= sqrt(B)``, IMTL's equal projections and Aligned-MTL's condition number hold per group only.
    The scale is the method's, per group. One group is the method itself (same coefficients), but its
    state then carries a leading axis of size 1: a run's checkpoints depend on ``weighting.blocks``.
    """
    def __init__(self, inner: WeightingMethod, patterns: Sequence[str]):
        super().__init__(inner.num_tasks)
        if inner.requires not in ("gram", "sampled_gram"):
            raise ValueError(f"weighting.blocks needs a method computed from the Gram matrix; "
                             f"{inner.name!r} requires {inner.requires!r} (per-block aggregation of it "
                             "would be another method): set weighting.blocks=()")
        if isinstance(inner, PerBlock):
            raise ValueError("weighting.blocks: the method is already grouped")
        if not tuple(patterns):
            raise ValueError("weighting.blocks is empty: build the method itself")
        compile_patterns(patterns)
        self.inner, self.patterns = inner, tuple(patterns)
        self.name, self.requires = inner.name, inner.requires

    def block_grouping(self, shared_tree: PyTree) -> BlockGrouping:
        return group_leaves(shared_tree, self.patterns)

    def init_params(self) -> PyTree:
        return self.inner.init_params()  # loss transforms (IMTL-L's s) are shared by the groups

    def init_state(self) -> PyTree:
        raise ValueError("weighting.blocks: the state has one row per group of the shared parameters; "
                         "build it with init_state_for(shared_shapes)")

    def init_state_for(self, shared_shapes: PyTree) -> PyTree:
        num_groups = self.block_grouping(shared_shapes).num_groups
        inner_state = self.inner.init_state_for(shared_shapes)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_groups,) + jnp.shape(x)), inner_state)

    def transform_losses(self, params, losses_T):
        return self.inner.transform_losses(params, losses_T)

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        raise ValueError("a per-block method takes one Gram matrix per group: call grouped_gram_weights")

    def grouped_gram_weights(self, state: PyTree, gram_BxTxT: jax.Array, losses_T: jax.Array,
                             step: jax.Array, rng: jax.Array | None = None) -> tuple[jax.Array, PyTree]:
        """``(coeffs_BxT, new_state)``: the method on each group's Gram matrix, with its own state row
        and (for stochastic methods) its own key."""
        num_groups = gram_BxTxT.shape[0]
        one_group = lambda s, k, key: self.inner.gram_weights(s, k, losses_T, step, key)
        if rng is None:
            return jax.vmap(lambda s, k: one_group(s, k, None))(state, gram_BxTxT)
        # one group keeps the step's key, so that it draws what the ungrouped method draws
        keys = rng[None] if num_groups == 1 else jax.random.split(rng, num_groups)
        return jax.vmap(one_group)(state, gram_BxTxT, keys)
