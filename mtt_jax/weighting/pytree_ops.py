"""Sums and inner products over the leading task (or sample) axis of gradient pytrees: what the methods
and the train step's per-task gradients (`mtt_jax.task_grads`, which re-exports them) share."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

PyTree = Any


def combine(coeffs_T: jax.Array, grads_T: PyTree) -> PyTree:
    """``sum_t c_t g_t`` over every leaf (leading task axis)."""
    return jax.tree.map(lambda g: jnp.tensordot(coeffs_T.astype(g.dtype), g, axes=1), grads_T)


def sum_leading(x: jax.Array) -> jax.Array:
    """``x.sum(0)``, as adds of the rows ``x[0] + x[1] + ...``: for the short task and sample axes of
    parameter-sized gradients. XLA:CPU (jaxlib 0.10.2) reduces a short leading axis of a large array
    30-90x slower than it adds the rows, e.g. ``[3, 524288]`` 9.2 ms against 0.10 ms and
    ``[8, 128, 512]`` 1.9 ms against 0.11 ms (`docs/performance_cpu.md`, 2026-12-03); GPUs and TPUs
    fuse either form into one loop."""
    return functools.reduce(jnp.add, [x[i] for i in range(x.shape[0])])


def mean_leading(x: jax.Array) -> jax.Array:
    """``x.mean(0)`` through `sum_leading`."""
    return sum_leading(x) / jnp.asarray(x.shape[0], x.dtype)


def gram_matrix(grads_T: PyTree) -> jax.Array:
    """``K = G G^T`` in f32 over every leaf (the T x T inner products of the task gradients)."""
    return cross_gram_matrix(grads_T, grads_T)


def cross_gram_matrix(grads_a_T: PyTree, grads_b_T: PyTree) -> jax.Array:
    """``K = G_a G_b^T`` in f32 over every leaf: one set of task gradients against another (the same
    set gives the Gram matrix)."""
    flat = lambda g: g.reshape(g.shape[0], -1).astype(jnp.float32)
    return sum(flat(a) @ flat(b).T for a, b in zip(jax.tree.leaves(grads_a_T), jax.tree.leaves(grads_b_T)))


def group_gram_matrices(grads_T: PyTree, leaf_group: Sequence[int], num_groups: int) -> jax.Array:
    """``K_b = G_b G_b^T`` in f32 for each group b of the leaves (``leaf_group[i]``: the group of the
    i-th leaf), ``[B, T, T]``: each leaf's ``T x T`` inner products added into its group's slot, the same
    contractions as `gram_matrix` (whose result is the sum over groups)."""
    leaves = jax.tree.leaves(grads_T)
    if len(leaves) != len(leaf_group):
        raise ValueError(f"{len(leaves)} gradient leaves but a grouping of {len(leaf_group)}")
    num_tasks = leaves[0].shape[0]
    grams = [jnp.zeros((num_tasks, num_tasks), jnp.float32) for _ in range(num_groups)]
    for leaf, group in zip(leaves, leaf_group):
        flat_TxP = leaf.reshape(num_tasks, -1).astype(jnp.float32)
        grams[group] = grams[group] + flat_TxP @ flat_TxP.T
    return jnp.stack(grams)


def combine_grouped(coeffs_BxT: jax.Array, grads_T: PyTree, leaf_group: Sequence[int]) -> PyTree:
    """`combine` with each leaf's own group's coefficients: ``d_b = sum_t c_b,t g_t,b``."""
    leaves, treedef = jax.tree.flatten(grads_T)
    if len(leaves) != len(leaf_group):
        raise ValueError(f"{len(leaves)} gradient leaves but a grouping of {len(leaf_group)}")
    combined = [jnp.tensordot(coeffs_BxT[group].astype(g.dtype), g, axes=1)
                for g, group in zip(leaves, leaf_group)]
    return jax.tree.unflatten(treedef, combined)
