"""Small dense solvers on T x T Gram matrices, in pure JAX with bounded loops (jit-safe, no host calls).

- `min_norm_two`: the closed-form two-task min-norm point (Sener & Koltun 2018, Alg. 1).
- `min_norm_point`: MGDA's min-norm point for any T by Wolfe's (1976) finite active-set algorithm.
- `minimize_on_simplex`: ``min_{w in simplex} b.w + a sqrt(w^T K w)`` by pairwise (SMO / Mitchell-
  Dem'yanov-Malozemov) steps with an exact closed-form line search (CAGrad's dual).
- `nonneg_qp`: ``min_{x >= 0} x^T Q x / 2 + c.x`` for positive definite ``Q`` by block principal pivoting
  (Judice & Pires 1994) with Murty's single-pivot fallback, which guarantees termination; each pivot is
  one masked T x T solve, and the result is exact up to that solve (UPGrad).
- `project_to_simplex`: the Euclidean projection onto the probability simplex by sorting (Held, Wolfe &
  Crowder 1974; Duchi et al. 2008, Fig. 1) (MoCo).
- `solve_power_equation`: ``w > 0`` with ``(K w)_t = w_t^(-1/alpha)`` (Nash-MTL for alpha = 1, FairGrad),
  by damped Newton steps on the residual of a strictly convex problem (see its docstring).
- `regularize_gram` and `project_to_dual_cone`: the weights of the projection of ``G^T u`` onto the dual
  cone ``{d : G d >= 0}`` of the gradients, ``argmin_{v >= u} v^T K v`` (Quinton & Rey 2024, Prop. 1),
  one `nonneg_qp` (UPGrad, DualProj).
- `pseudo_inverse_psd`: the Moore-Penrose pseudo-inverse of a PSD matrix by its eigendecomposition (ConFIG).

Scale: callers hand in Gram matrices normalised to mean diagonal 1 (`normalize_gram`), so the fixed
tolerances below are relative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TINY = 1e-30


def normalize_gram(gram_TxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(K / s, s)`` with ``s`` the mean squared gradient norm (mean diagonal); ``s = 1`` if K is 0."""
    gram_TxT = jnp.asarray(gram_TxT, jnp.float32)
    scale = jnp.mean(jnp.diagonal(gram_TxT))
    scale = jnp.where(scale > TINY, scale, 1.0)
    return gram_TxT / scale, scale


def project_to_simplex(v_T: jax.Array) -> jax.Array:
    """``argmin_{w in simplex} |w - v|``: ``w = max(v - theta, 0)`` with the threshold ``theta`` from the
    sorted values (Duchi, Shalev-Shwartz, Singer & Chandra, ICML 2008, Fig. 1), exact in T log T.

    The projection ignores a common shift of ``v``, so ``v`` is first shifted to a maximum of 0: with
    large entries (1e9, as a projected step with a large step size gives) ``v_max - (v_max - 1)``
    would round to 0 in f32, leave no entry in the support and make ``theta`` NaN."""
    v_T = jnp.asarray(v_T, jnp.float32)
    v_T = v_T - jnp.max(v_T)
    sorted_T = jnp.sort(v_T)[::-1]
    excess_T = jnp.cumsum(sorted_T) - 1.0
    index_T = jnp.arange(1, v_T.shape[0] + 1, dtype=jnp.float32)
    support = jnp.sum(sorted_T - excess_T / index_T > 0)  # >= 1: the largest value always qualifies
    theta = excess_T[support - 1] / support.astype(jnp.float32)
    return jnp.maximum(v_T - theta, 0.0)


def min_norm_two(gram_2x2: jax.Array) -> jax.Array:
    """``argmin_{a in simplex} |a_1 g_1 + a_2 g_2|``: ``a_1 = clip((g_2 - g_1).g_2 / |g_1 - g_2|^2, 0, 1)``.

    Equal gradients (zero denominator) give ``(1/2, 1/2)``.
    """
    k11, k12, k22 = gram_2x2[0, 0], gram_2x2[0, 1], gram_2x2[1, 1]
    denominator = k11 + k22 - 2.0 * k12
    a1 = jnp.where(denominator > TINY * (k11 + k22 + 1.0),
                   jnp.clip((k22 - k12) / jnp.where(denominator > 0, denominator, 1.0), 0.0, 1.0), 0.5)
    return jnp.stack([a1, 1.0 - a1])


def _pair_line_min(lin, q0, q1, q2, norm_weight, t_max):
    """argmin over t in [0, t_max] of ``lin t + a sqrt(q0 + 2 q1 t + q2 t^2)`` (a = norm_weight >= 0).

    With ``u = q1 + q2 t`` the derivative is ``lin + a sqrt(q2) u / sqrt(u^2 + D)``, ``D = q0 q2 - q1^2``.
    If ``|lin| < a sqrt(q2)`` it vanishes at ``u = r sqrt(D / (q2 - r^2))``, ``r = -lin / a``; otherwise
    the function is monotone with the sign of ``lin``. Clipping to the interval solves the constrained
    one-dimensional convex problem.
    """
    safe_a = jnp.where(norm_weight > 0, norm_weight, 1.0)
    r = -lin / safe_a
    interior = (norm_weight > 0) & (q2 > TINY) & (r * r < q2)
    d = jnp.maximum(q0 * q2 - q1 * q1, 0.0)
    u = jnp.sign(r) * jnp.sqrt(r * r * d / jnp.maximum(q2 - r * r, TINY))
    t_interior = (u - q1) / jnp.where(q2 > TINY, q2, 1.0)
    t_monotone = jnp.where(lin < 0, t_max, 0.0)
    return jnp.clip(jnp.where(interior, t_interior, t_monotone), 0.0, t_max)


def minimize_on_simplex(gram_TxT: jax.Array, linear_T: jax.Array, norm_weight: jax.Array | float, *,
                        max_iters: int = 500, tol: float = 1e-7) -> jax.Array:
    """``argmin_{w in simplex} linear.w + norm_weight sqrt(w^T K w)`` for PSD ``K``.

    Each step moves mass from the support vertex with the largest (sub)gradient to the vertex with the
    smallest, by the exact minimiser along that edge (`_pair_line_min`); it stops when that gradient gap
    is below ``tol`` (the duality gap of the min-norm problem when ``linear = 0``) or after ``max_iters``.
    Starts from the barycentre.
    """
    gram_TxT = jnp.asarray(gram_TxT, jnp.float32)
    linear_T = jnp.asarray(linear_T, jnp.float32)
    norm_weight = jnp.asarray(norm_weight, jnp.float32)
    num_tasks = gram_TxT.shape[0]
    diag_T = jnp.diagonal(gram_TxT)

    def gap_and_pair(w_T):
        kw_T = gram_TxT @ w_T
        q0 = jnp.maximum(w_T @ kw_T, 0.0)
        grad_T = linear_T + norm_weight * kw_T / jnp.maximum(jnp.sqrt(q0), 1e-20)
        i = jnp.argmin(grad_T)
        j = jnp.argmax(jnp.where(w_T > 0, grad_T, -jnp.inf))
        return grad_T[j] - grad_T[i], i, j, kw_T, q0

    def body(carry):
        it, w_T, _ = carry
        gap, i, j, kw_T, q0 = gap_and_pair(w_T)
        q2 = jnp.maximum(diag_T[i] + diag_T[j] - 2.0 * gram_TxT[i, j], 0.0)
        t = _pair_line_min(linear_T[i] - linear_T[j], q0, kw_T[i] - kw_T[j], q2, norm_weight, w_T[j])
        t = jnp.where((i == j) | (gap <= tol), 0.0, t)
        w_T = w_T.at[i].add(t).at[j].add(-t)
        return it + 1, jnp.maximum(w_T, 0.0), gap

    def cond(carry):
        it, _, gap = carry
        return (it < max_iters) & (gap > tol)

    w0_T = jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)
    _, w_T, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), w0_T, jnp.asarray(jnp.inf)))
    return w_T / jnp.sum(w_T)


def min_norm_point(gram_TxT: jax.Array, *, max_iters: int | None = None) -> jax.Array:
    """MGDA's ``argmin_{a in simplex} a^T K a``: closed form for two tasks, Wolfe's algorithm otherwise.

    Wolfe (1976), "Finding the nearest point in a polytope": keep a corral S of affinely independent
    vertices and a point ``a`` in their hull; a major step adds the vertex most opposed to the current
    point ``d = G^T a`` (``argmin_t (K a)_t``) unless ``|d|^2 - min_t (K a)_t <= tol`` (optimal); a minor
    step moves to the affine min-norm point of S (a masked KKT solve), or, if that leaves the simplex,
    as far towards it as stays feasible and drops the vertex that hits zero. Finite in exact arithmetic;
    here at most ``max_iters`` (default ``20 T + 20``) steps. Exact up to the T x T solves, also when K
    is rank deficient (more tasks than independent gradients).
    """
    gram_TxT = jnp.asarray(gram_TxT, jnp.float32)
    num = gram_TxT.shape[0]
    if num == 1:
        return jnp.ones((1,), jnp.float32)
    if num == 2:
        return min_norm_two(gram_TxT)
    max_iters = 20 * num + 20 if max_iters is None else max_iters
    tol = 1e-7 * jnp.max(jnp.diagonal(gram_TxT))
    rhs = jnp.zeros((num + 1,), jnp.float32).at[num].set(1.0)

    def affine_min_norm(corral_T):
        both = corral_T[:, None] & corral_T[None, :]
        kkt = jnp.zeros((num + 1, num + 1), jnp.float32)
        kkt = kkt.at[:num, :num].set(jnp.where(both, gram_TxT, 0.0)
                                     + jnp.diag(jnp.where(corral_T, 0.0, 1.0)))
        kkt = kkt.at[:num, num].set(jnp.where(corral_T, -1.0, 0.0))
        kkt = kkt.at[num, :num].set(jnp.where(corral_T, 1.0, 0.0))
        return jnp.where(corral_T, jnp.linalg.solve(kkt, rhs)[:num], 0.0)

    def major(a_T, corral_T):
        ka_T = gram_TxT @ a_T
        j = jnp.argmin(ka_T)
        optimal = (a_T @ ka_T - ka_T[j] <= tol) | corral_T[j]
        return a_T, corral_T.at[j].set(True), optimal

    def minor(a_T, corral_T):
        y_T = affine_min_norm(corral_T)
        finite = jnp.all(jnp.isfinite(y_T))
        inside = jnp.all(jnp.where(corral_T, y_T > 0, True))
        blocking_T = corral_T & (y_T <= 0)
        ratio_T = jnp.where(blocking_T, a_T / jnp.where(blocking_T, a_T - y_T, 1.0), jnp.inf)
        theta = jnp.clip(jnp.min(ratio_T), 0.0, 1.0)
        stepped_T = a_T + theta * (y_T - a_T)
        drop_T = blocking_T & (jnp.arange(num) == jnp.argmin(ratio_T)) | (corral_T & (stepped_T <= 1e-12))
        a_new = jnp.where(inside, y_T, jnp.where(drop_T, 0.0, jnp.maximum(stepped_T, 0.0)))
        corral_new = jnp.where(inside, corral_T, corral_T & ~drop_T)
        a_new = jnp.where(finite, a_new / jnp.sum(a_new), a_T)
        return a_new, jnp.where(finite, corral_new, corral_T), inside | ~finite, ~finite

    def body(carry):
        it, a_T, corral_T, want_major, _ = carry
        a_maj, corral_maj, optimal = major(a_T, corral_T)
        a_min, corral_min, next_major, failed = minor(a_T, corral_T)
        a_T = jnp.where(want_major, a_maj, a_min)
        corral_T = jnp.where(want_major, corral_maj, corral_min)
        done = jnp.where(want_major, optimal, failed)
        return it + 1, a_T, corral_T, jnp.where(want_major, False, next_major), done

    def cond(carry):
        it, *_, done = carry
        return (it < max_iters) & ~done

    start = jnp.argmin(jnp.diagonal(gram_TxT))
    a0_T = jax.nn.one_hot(start, num, dtype=jnp.float32)
    init = (jnp.zeros((), jnp.int32), a0_T, a0_T > 0, jnp.asarray(True), jnp.asarray(False))
    return jax.lax.while_loop(cond, body, init)[1]


def nonneg_qp(q_TxT: jax.Array, c_T: jax.Array, *, max_iters: int | None = None) -> jax.Array:
    """``argmin_{x >= 0} x^T Q x / 2 + c.x`` for symmetric positive definite ``Q``.

    Block principal pivoting: guess the free set F, solve ``Q_FF x_F = -c_F`` with ``x = 0`` off F, and
    swap every variable that violates ``x_F >= 0`` or ``(Q x + c)_{not F} >= 0``. If the number of
    violations stops falling for three rounds, only the largest-index violator is swapped (Murty's rule,
    finite termination). Returns ``max(x, 0)`` after at most ``max_iters`` (default ``5 T + 10``) rounds.
    """
    q_TxT = jnp.asarray(q_TxT, jnp.float32)
    c_T = jnp.asarray(c_T, jnp.float32)
    num = q_TxT.shape[0]
    max_iters = 5 * num + 10 if max_iters is None else max_iters
    tol_y = 1e-6 * (jnp.max(jnp.abs(c_T)) + TINY)
    tol_x = tol_y / (jnp.max(jnp.diagonal(q_TxT)) + TINY)

    def solve(free_T):
        both = free_T[:, None] & free_T[None, :]
        masked = jnp.where(both, q_TxT, 0.0) + jnp.diag(jnp.where(free_T, 0.0, 1.0))
        x_T = jnp.where(free_T, jnp.linalg.solve(masked, jnp.where(free_T, -c_T, 0.0)), 0.0)
        return x_T, jnp.where(free_T, 0.0, q_TxT @ x_T + c_T)

    def body(carry):
        it, free_T, best, backup, _ = carry
        x_T, y_T = solve(free_T)
        bad_T = (free_T & (x_T < -tol_x)) | (~free_T & (y_T < -tol_y))
        count = jnp.sum(bad_T.astype(jnp.int32))
        improved = count < best
        swap_all = improved | (backup > 0)
        last_bad = num - 1 - jnp.argmax(bad_T[::-1])
        flip_T = jnp.where(swap_all, bad_T, bad_T & (jnp.arange(num) == last_bad))
        backup = jnp.where(improved, 3, jnp.where(swap_all, backup - 1, backup))
        return it + 1, free_T ^ flip_T, jnp.minimum(best, count), backup, count

    def cond(carry):
        it, *_, count = carry
        return (it < max_iters) & (count > 0)

    init = (jnp.zeros((), jnp.int32), jnp.zeros((num,), bool), jnp.asarray(num + 1),
            jnp.asarray(3), jnp.asarray(1))
    _, free_T, *_ = jax.lax.while_loop(cond, body, init)
    return jnp.maximum(solve(free_T)[0], 0.0)


def solve_power_equation(gram_TxT: jax.Array, alpha: float, init_T: jax.Array, *, max_iters: int = 100,
                         tol: float = 1e-6) -> jax.Array:
    """``w > 0`` with ``K w = w^(-1/alpha)`` elementwise, for PSD ``K`` with no nonnegative null vector.

    This is the stationarity condition of the strictly convex ``f(w) = w^T K w / 2 - sum_t phi(w_t)``
    with ``phi' = w^(-1/alpha)`` (``phi = log`` for alpha = 1: Nash-MTL; a power otherwise: FairGrad),
    whose Hessian ``H = K + diag(w^(-1/alpha - 1) / alpha)`` is positive definite, so the solution is
    unique. Newton steps ``-H^-1 r`` are damped by backtracking (all 16 halvings evaluated at once) on
    the residual norm -- a descent direction for it because ``H`` is nonsingular -- and kept inside
    ``w > 0``; the loop stops at relative residual ``tol`` or after ``max_iters``. If ``K`` has a
    nonnegative null vector (e.g. directly opposed gradients) no solution exists: add a ridge first.
    """
    gram_TxT = jnp.asarray(gram_TxT, jnp.float32)
    power = 1.0 / float(alpha)
    halvings = 0.5 ** jnp.arange(16, dtype=jnp.float32)

    def residual(w_T):
        return gram_TxT @ w_T - w_T ** (-power)

    def relative(r_T, w_T):
        return jnp.linalg.norm(r_T) / jnp.linalg.norm(w_T ** (-power))

    def body(carry):
        it, w_T, _ = carry
        r_T = residual(w_T)
        hessian = gram_TxT + jnp.diag(power * w_T ** (-power - 1.0))
        delta_T = -jnp.linalg.solve(hessian, r_T)
        to_boundary = jnp.min(jnp.where(delta_T < 0, -w_T / jnp.where(delta_T < 0, delta_T, -1.0), jnp.inf))
        steps = jnp.minimum(1.0, 0.95 * to_boundary) * halvings
        candidates = w_T[None, :] + steps[:, None] * delta_T[None, :]
        norms = jnp.linalg.norm(jax.vmap(residual)(candidates), axis=1)
        norms = jnp.where(jnp.isfinite(norms), norms, jnp.inf)
        decrease = norms <= (1.0 - 1e-4 * steps) * jnp.linalg.norm(r_T)
        k = jnp.where(jnp.any(decrease), jnp.argmax(decrease), jnp.argmin(norms))
        w_new = jnp.where(norms[k] < jnp.linalg.norm(r_T), candidates[k], w_T)
        return it + 1, w_new, relative(residual(w_new), w_new)

    def cond(carry):
        it, _, rel = carry
        return (it < max_iters) & (rel > tol)

    init_T = jnp.asarray(init_T, jnp.float32)
    carry = (jnp.zeros((), jnp.int32), init_T, relative(residual(init_T), init_T))
    return jax.lax.while_loop(cond, body, carry)[1]


def regularize_gram(gram_TxT: jax.Array, norm_eps: float, reg_eps: float) -> jax.Array:
    """``K / tr(K) + reg_eps I`` (``reg_eps I`` if ``tr(K) < norm_eps``), TorchJD's normalisation before a
    dual-cone projection: the trace makes the regulariser relative, the ridge makes the QP strictly convex."""
    gram_TxT = jnp.asarray(gram_TxT, jnp.float32)
    trace = jnp.trace(gram_TxT)
    normalized = jnp.where(trace >= norm_eps, gram_TxT / jnp.maximum(trace, TINY), 0.0)
    return normalized + reg_eps * jnp.eye(gram_TxT.shape[0], dtype=jnp.float32)


def project_to_dual_cone(gram_TxT: jax.Array, lower_T: jax.Array) -> jax.Array:
    """``v = argmin_{v >= u} v^T K v`` for positive definite ``K`` (``u = lower_T``): ``G^T v`` is the
    projection of ``G^T u`` onto the dual cone ``{d : G d >= 0}`` of the gradients. With ``v = u + x``
    this is ``min_{x >= 0} x^T K x / 2 + (K u).x``, one `nonneg_qp`."""
    lower_T = jnp.asarray(lower_T, jnp.float32)
    return lower_T + nonneg_qp(gram_TxT, gram_TxT @ lower_T)


def pseudo_inverse_psd(matrix_TxT: jax.Array, rcond: float) -> jax.Array:
    """The pseudo-inverse of a symmetric PSD matrix: ``V diag(1 / e) V^T`` over the eigenvalues
    ``e > rcond * max(e)`` (the others, and negative round-off, count as 0)."""
    eigenvalues_T, vectors_TxT = jnp.linalg.eigh(jnp.asarray(matrix_TxT, jnp.float32))
    keep_T = eigenvalues_T > rcond * jnp.maximum(jnp.max(eigenvalues_T), TINY)
    inverse_T = jnp.where(keep_T, 1.0 / jnp.where(keep_T, eigenvalues_T, 1.0), 0.0)
    return (vectors_TxT * inverse_T) @ vectors_TxT.T
