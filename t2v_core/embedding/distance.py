"""Distances between TASK2VEC embeddings, as whole matrices.

Embeddings are non-negative per-filter Fisher values. The symmetric distance compares the
*relative* weight each task puts on a filter (F_a / (F_a + F_b)), which makes it robust to
the very different scales of Fisher values across layers. Every function takes a matrix of
embeddings (one row per task) and returns a matrix; no Python loop runs over pairs (d_sym is a
compiled, fused kernel, the cosines are matrix products).
"""

from __future__ import annotations

import numba
import numpy as np
import torch

_EPS = 1e-12


def _as_2d(x) -> torch.Tensor:
    # a private copy: inputs are often read-only Arrow-backed arrays, and it is cheap next
    # to any pairwise computation
    t = torch.from_numpy(np.array(x, dtype=np.float32))
    if t.ndim == 1:
        t = t[None, :]
    if t.ndim != 2:
        raise ValueError(f"embeddings must be a vector or a matrix, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("embeddings contain NaN or inf")
    return t


def _squeeze_like(out: torch.Tensor, a, b) -> np.ndarray | float:
    out_np = out.numpy().astype(np.float64)
    if np.ndim(a) == 1 and np.ndim(b) == 1:
        return float(out_np[0, 0])
    if np.ndim(a) == 1:
        return out_np[0]
    if np.ndim(b) == 1:
        return out_np[:, 0]
    return out_np


@numba.njit(parallel=True, fastmath=True, cache=True)
def _d_sym_kernel(a, b, out, symmetric):  # pragma: no cover - compiled
    """Fused pair loop: only Σu and Σu² are needed, since v = 1 − u.

    With u = a/(a+b): ⟨u,v⟩ = Σu − Σu², ‖u‖² = Σu², ‖v‖² = d − 2Σu + Σu². One pass over the
    filters per pair, nothing allocated; rows are interleaved from both ends so that the two
    halves of a triangular (symmetric) matrix give every thread the same work.
    """
    n, d = a.shape
    m = b.shape[0]
    for t in numba.prange(n):
        i = t // 2 if t % 2 == 0 else n - 1 - t // 2
        start = i + 1 if symmetric else 0
        for j in range(start, m):
            s1 = 0.0
            s2 = 0.0
            for k in range(d):
                total = a[i, k] + b[j, k]
                u = a[i, k] / total if total > 0 else 0.5
                s1 += u
                s2 += u * u
            uv = s1 - s2
            vv = d - 2.0 * s1 + s2
            denom = np.sqrt(s2 * vv)
            value = 1.0 - uv / denom if denom > 0 else 0.0
            value = max(value, 0.0)
            out[i, j] = value
            if symmetric:
                out[j, i] = value


def d_sym(a, b=None) -> np.ndarray | float:
    """Symmetric TASK2VEC distance d_cos(F_a/(F_a+F_b), F_b/(F_a+F_b)).

    ``a``: (n, d) or (d,); ``b``: (m, d) or (d,), default ``a``. Returns (n, m), or a scalar
    for two vectors. Symmetric and zero on the diagonal.
    """
    ta = _as_2d(a)
    tb = ta if b is None else _as_2d(b)
    if ta.shape[1] != tb.shape[1]:
        raise ValueError(f"dimension mismatch: {ta.shape[1]} vs {tb.shape[1]}")
    if (ta < 0).any() or (tb < 0).any():
        raise ValueError("d_sym needs non-negative embeddings (Fisher values)")
    out = np.zeros((ta.shape[0], tb.shape[0]), dtype=np.float64)
    _d_sym_kernel(np.ascontiguousarray(ta.numpy()), np.ascontiguousarray(tb.numpy()), out, b is None)
    return _squeeze_like(torch.from_numpy(out), a, a if b is None else b)


def trivial_embedding(dim: int, level: float = 1.0) -> np.ndarray:
    """A flat embedding: ``level`` on every filter.

    For the ``variational`` Fisher this is t0, the embedding of the trivial task: with no
    information about the task every filter's precision falls back to the prior precision
    ``level``. For point-estimate Fisher embeddings use :func:`trivial_level` of the training
    tasks as the level (see :func:`complexity`).
    """
    if dim <= 0 or not level > 0:
        raise ValueError("trivial embedding needs dim > 0 and level > 0")
    return np.full(dim, level, dtype=np.float32)


def trivial_level(embeddings) -> float:
    """Median Fisher value over a set of embeddings: the level of t0 for point-estimate Fisher
    embeddings, which have no prior precision to fall back to."""
    level = float(np.median(np.asarray(embeddings, dtype=np.float64)))
    return level if level > 0 else 1.0


def complexity(a, t0) -> np.ndarray | float:
    """How far each embedding ``a`` stands above the trivial task ``t0``: the mean over filters
    of its share F / (F + t0) (d_sym's own per-filter ratio, taken against t0).

    It rises strictly when a task's Fisher is scaled up uniformly, whatever the spread of its
    values across filters; 0 for a task with no Fisher information, ½ for one at t0.
    d_sym(F, t0), and the shifted d_sym(F + t0, t0), compare only the *shape* of the two
    profiles, so on embeddings spanning many orders of magnitude they rise and then fall as
    the task's Fisher is scaled up, and cannot tell a rich task from a poor one.
    ``a``: (n, d) or (d,); ``t0``: (d,). Returns (n,), or a scalar for one vector.
    """
    ta = _as_2d(a).double()
    t = torch.as_tensor(np.asarray(t0, dtype=np.float64)).reshape(-1)
    if t.shape[0] != ta.shape[1]:
        raise ValueError(f"dimension mismatch: {ta.shape[1]} vs t0 of {t.shape[0]}")
    if (ta < 0).any() or not (t > 0).all():
        raise ValueError("complexity needs non-negative embeddings and a positive t0")
    share = (ta / (ta + t)).mean(dim=1).numpy()
    return float(share[0]) if np.ndim(a) == 1 else share


def d_asym(a, b=None, t0=None, alpha: float = 0.15) -> np.ndarray | float:
    """Asymmetric score d_asym(a→b) = d_sym(a, b) − α · complexity(a, t0) of transferring a to b.

    Rows are *source* tasks a_i (e.g. the tasks experts were trained on), columns are target
    tasks b_j. The term α · :func:`complexity` rewards sources that carry more Fisher
    information than the trivial task t0, i.e. complex tasks, which transfer better (the
    paper's α≈0.15 for ResNet-34). To rank experts for a task t: ``d_asym(expert_sources, t)``
    and sort ascending. Not symmetric for α > 0. ``t0`` defaults to a flat embedding at
    :func:`trivial_level` of ``a`` and ``b`` together.
    """
    ta = _as_2d(a)
    tb = ta if b is None else _as_2d(b)
    if t0 is None:
        t0 = trivial_embedding(ta.shape[1], trivial_level(torch.cat([ta, tb]).numpy()))
    base = torch.as_tensor(np.asarray(d_sym(ta.numpy(), None if b is None else tb.numpy())))
    bonus = torch.as_tensor(np.atleast_1d(complexity(ta.numpy(), t0)))
    out = base - alpha * bonus.reshape(-1, 1)
    return _squeeze_like(out, a, a if b is None else b)


def _cosine_matrix(ta: torch.Tensor, tb: torch.Tensor, same: bool) -> torch.Tensor:
    na = ta / (ta.norm(dim=1, keepdim=True) + _EPS)
    nb = tb / (tb.norm(dim=1, keepdim=True) + _EPS)
    out = (1.0 - na @ nb.T).clamp_(min=0.0)
    if same:
        out.fill_diagonal_(0.0)
    return out


def cosine(a, b=None) -> np.ndarray | float:
    """Plain cosine distance 1 − ⟨a, b⟩ / (‖a‖‖b‖), as a matrix product."""
    ta = _as_2d(a)
    tb = ta if b is None else _as_2d(b)
    return _squeeze_like(_cosine_matrix(ta, tb, b is None), a, a if b is None else b)


def normalized_cosine(a, b=None) -> np.ndarray | float:
    """Cosine distance after dividing each filter by its mean over the set of embeddings.

    A cheap stand-in for d_sym when the pairwise ratio is too costly: it removes the shared
    per-filter scale (deep layers have much larger Fisher values) with one normalisation for
    the whole set instead of one per pair.
    """
    ta = _as_2d(a)
    tb = ta if b is None else _as_2d(b)
    scale = torch.cat([ta, tb]).mean(0) + _EPS
    out = _cosine_matrix(ta / scale, tb / scale, b is None)
    return _squeeze_like(out, a, a if b is None else b)
