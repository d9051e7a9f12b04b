"""CR-MOGM: any method whose update is a weight vector over tasks, with those weights smoothed over steps.

A wrapper method, ``weighting.name = "cr_mogm"``, names its inner method in ``weighting.cr_mogm.inner``;
the inner method's options come from its own block (``weighting.<inner>``), so one config can switch the
smoothing on and off without moving options (`mtt_jax.weighting.make_method` builds the inner first). A
named wrapper rather than a global ``weighting.smoothing`` field: it is a method of the paper with its own
option (``alpha``) and state, it goes through the registry, config check, zoo and benchmark like any
method, and the runs without it keep their config and checkpoints unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from mtt_jax.weighting.base import PyTree, WeightingMethod, validate_range


class CRMOGM(WeightingMethod):
    """CR-MOGM (Zhou, Zhang, Jiang, Zhong, Gu & Zhu, "On the Convergence of Stochastic Multi-Objective
    Gradient Manipulation and Beyond", NeurIPS 2022): the composite weights of a gradient-manipulation
    method, exponentially averaged over steps, ``lambda_k = alpha lambda_{k-1} + (1 - alpha) lambda_hat_k``
    with ``lambda_hat_k`` the inner method's weights at step k and ``lambda_0 = lambda_hat_1`` (the first
    update is the inner method's); ``d = sum_t lambda_k,t g_t``. The paper's fix for the non-convergence
    of stochastic MGDA / PCGrad / CAGrad, whose weights are functions of one mini-batch's gradients.

    ``inner`` (default ``mgda``, the paper's main instance) is any method whose update is a weight vector
    over tasks: a Gram method (its coefficients), a double-sampling one (the coefficients applied to the
    third sample), or a loss method (its applied weights ``d total / d L_t``; the total handed to the step
    is the inner total plus ``sum_t sg(lambda_t - lambda_hat_t) L_t``, so the model's gradient is
    ``sum_t lambda_t grad L_t`` and a learned method's own parameters, UW's ``s``, keep their gradient).
    Methods that combine per-task gradients elementwise (``requires = "grads"``: GradDrop, DB-MTL,
    ExcessMTL, MoCo) are refused. ``alpha`` in [0, 1]: 0 is the inner method, 1 keeps the first weights.
    The state holds the inner method's state, ``lambda_{k-1}`` and the number of smoothed updates (a
    skipped, non-finite step leaves them as they were). Scale: the inner method's.

    Defaults: ``inner = "mgda"``, ``alpha = 0.9`` (TorchJD's ``CRMOGMWeighting``). The paper's analysis
    (its Corollary 1, as TorchJD's documentation summarises it) lets ``alpha_k`` grow towards 1 as the
    learning rate decays; we keep it constant, as TorchJD does. No official code was found; TorchJD
    (SimplexLab/TorchJD ``aggregation/_cr_mogm.py``) is the reference for ``lambda_0 = lambda_hat_1``
    (an earlier TorchJD version started from ``1/T`` with ``alpha = 0.1``), and LibMOON's synthetic
    experiments use an adaptive ``alpha`` instead.
    """
    name = "cr_mogm"
    requires = "gram"  # of the default inner method; an instance takes its inner method's
    wraps_method = True  # make_method builds its ``inner`` option from the inner method's own block

    def __init__(self, num_tasks: int, inner: str | WeightingMethod = "mgda", alpha: float = 0.9):
        super().__init__(num_tasks)
        validate_range(self.name, "alpha", alpha, 0.0, 1.0)
        if isinstance(inner, str):  # built with its defaults; make_method hands in the configured one
            inner = build_inner(None, num_tasks, inner)
        check_inner(inner, num_tasks)
        self.inner, self.alpha = inner, float(alpha)
        self.requires = inner.requires
        self.needs_losses_after_step = inner.needs_losses_after_step
        self.combine_is_linear = inner.combine_is_linear  # the smoothed weights ignore the loss values too

    def init_params(self) -> PyTree:
        return self.inner.init_params()

    def init_state(self) -> PyTree:
        return self._state(self.inner.init_state())

    def init_state_for(self, shared_shapes: PyTree) -> PyTree:
        return self._state(self.inner.init_state_for(shared_shapes))

    def _state(self, inner_state: PyTree) -> PyTree:
        return {"inner": inner_state, "weights": jnp.zeros((self.num_tasks,), jnp.float32),
                "updates": jnp.zeros((), jnp.int32)}

    def _smooth(self, state: PyTree, fresh_T: jax.Array, inner_state: PyTree) -> tuple[jax.Array, PyTree]:
        fresh_T = jnp.asarray(fresh_T, jnp.float32)
        previous_T = jnp.where(state["updates"] > 0, state["weights"], fresh_T)
        smoothed_T = self.alpha * previous_T + (1.0 - self.alpha) * fresh_T
        return smoothed_T, {"inner": inner_state, "weights": jax.lax.stop_gradient(smoothed_T),
                            "updates": state["updates"] + 1}

    def transform_losses(self, params, losses_T):
        return self.inner.transform_losses(params, losses_T)

    def combine(self, params, state, losses_T, step, rng=None):
        total, fresh_T, inner_state = self.inner.combine(params, state["inner"], losses_T, step, rng)
        smoothed_T, state = self._smooth(state, fresh_T, inner_state)
        shift_T = jax.lax.stop_gradient(smoothed_T - fresh_T)
        return total + jnp.sum(shift_T * losses_T.astype(jnp.float32)), smoothed_T, state

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        fresh_T, inner_state = self.inner.gram_weights(state["inner"], gram_TxT, losses_T, step, rng)
        return self._smooth(state, fresh_T, inner_state)

    def after_step(self, state, losses_before_T, losses_after_T):
        return {**state, "inner": self.inner.after_step(state["inner"], losses_before_T, losses_after_T)}


def check_inner(inner: WeightingMethod, num_tasks: int) -> None:
    """A one-line ValueError unless ``inner`` can be smoothed: a method for ``num_tasks`` tasks whose
    update is a weight vector over tasks, and no CR-MOGM itself."""
    where = f"weighting.cr_mogm.inner={inner.name!r}"
    if isinstance(inner, CRMOGM):
        raise ValueError(f"{where}: a smoothing of a smoothing; name the method to smooth")
    if inner.requires not in ("losses", "gram", "sampled_gram"):
        raise ValueError(f"{where} combines per-task gradients elementwise (requires {inner.requires!r}), "
                         "not by a weight vector over tasks; choose a loss, Gram or double-sampling method")
    if inner.num_tasks != num_tasks:
        raise ValueError(f"{where} was built for {inner.num_tasks} tasks, not {num_tasks}")


def build_inner(weighting_config, num_tasks: int, inner: str) -> WeightingMethod:
    """The method named ``inner`` with its options from ``weighting_config.<inner>`` (its defaults when
    ``weighting_config`` is None). Raises ValueError (one line) for a name that is no method."""
    from mtt_jax import weighting  # the registry imports this module
    wrapper = lambda n: getattr(weighting.METHODS[n], "wraps_method", False)
    if inner in weighting.METHODS and wrapper(inner):
        raise ValueError(f"weighting.cr_mogm.inner={inner!r}: a smoothing of a smoothing; name the method "
                         "to smooth")
    if inner not in weighting.METHODS:
        raise ValueError(f"weighting.cr_mogm.inner={inner!r} is not valid; choose one of: "
                         f"{', '.join(sorted(n for n in weighting.METHODS if not wrapper(n)))}")
    if weighting_config is None:
        weighting_config = ml_collections.ConfigDict({"name": inner})
    return weighting.make_method(weighting_config, num_tasks, name=inner)
