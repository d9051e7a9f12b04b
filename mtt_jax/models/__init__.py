"""Flax linen modules: trunk, task encoder, task attention, heads and the assembled model."""

from mtt_jax.models.multitask import TASK_ATTENTION, MultiTaskTransformer, build_model

__all__ = ["TASK_ATTENTION", "MultiTaskTransformer", "build_model"]
