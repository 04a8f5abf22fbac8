"""Distances between TASK2VEC embeddings, as whole matrices.

Embeddings are non-negative per-filter Fisher values. The symmetric distance compares the
*relative* weight each task puts on a filter (F_a / (F_a + F_b)), which makes it robust to
the very different scales of Fisher values across layers. Every function takes a matrix of
embeddings (one row per task) and returns a matrix, computed in chunks of pairs with torch
so that no Python loop runs over pairs.
"""

from __future__ import annotations

import numpy as np
import torch

_EPS = 1e-12
# Pairs per chunk are bounded by this many float32 elements (~256 MB of temporaries).
_CHUNK_ELEMENTS = 1 << 26


def _as_2d(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
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


def _d_sym_block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d_cos(a/(a+b), b/(a+b)) for every row pair of two blocks (n×d, m×d) -> n×m."""
    s = a[:, None, :] + b[None, :, :] + _EPS
    u = a[:, None, :] / s
    v = 1.0 - u  # = b/(a+b) up to the epsilon
    dot = (u * v).sum(-1)
    nu = (u * u).sum(-1).sqrt()
    nv = (v * v).sum(-1).sqrt()
    return 1.0 - dot / (nu * nv + _EPS)


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
    n, m, d = ta.shape[0], tb.shape[0], ta.shape[1]
    out = torch.empty(n, m, dtype=torch.float32)
    rows = max(1, _CHUNK_ELEMENTS // max(1, m * d))
    cols = m if rows > 1 else max(1, _CHUNK_ELEMENTS // d)
    with torch.no_grad():
        for i in range(0, n, rows):
            for j in range(0, m, cols):
                out[i : i + rows, j : j + cols] = _d_sym_block(
                    ta[i : i + rows], tb[j : j + cols]
                )
    out.clamp_(min=0.0)
    if b is None:
        out.fill_diagonal_(0.0)
    return _squeeze_like(out, a, a if b is None else b)


def trivial_embedding(dim: int, level: float = 1.0) -> np.ndarray:
    """t0: the embedding of the trivial task, whose posterior equals the prior.

    With no information about the task, the variational Fisher of every filter falls back to
    the prior precision, so t0 is flat: the same value on every filter. ``level`` is that
    precision; for point-estimate Fisher embeddings use :func:`trivial_level` to put it at the
    typical Fisher magnitude of the zoo, so that d_sym(·, t0) measures how far a task's
    per-filter profile is from flat rather than its overall scale.
    """
    if dim <= 0 or not level > 0:
        raise ValueError("trivial embedding needs dim > 0 and level > 0")
    return np.full(dim, level, dtype=np.float32)


def trivial_level(embeddings) -> float:
    """Median Fisher value over a set of embeddings: the prior precision to use for t0."""
    level = float(np.median(np.asarray(embeddings, dtype=np.float64)))
    return level if level > 0 else 1.0


def d_asym(a, b=None, t0=None, alpha: float = 0.15) -> np.ndarray | float:
    """Asymmetric score d_asym(a→b) = d_sym(a, b) − α · d_sym(a, t0) of transferring a to b.

    Rows are *source* tasks a_i (e.g. the tasks experts were trained on), columns are target
    tasks b_j. The term α · d_sym(a, t0) rewards sources far from the trivial task, i.e. complex
    tasks, which transfer better (the paper's α≈0.15 for ResNet-34). To rank experts for a task
    t: ``d_asym(expert_sources, t)`` and sort ascending. Not symmetric for α > 0.
    ``t0`` defaults to a flat embedding at :func:`trivial_level` of ``a`` and ``b`` together.
    """
    ta = _as_2d(a)
    tb = ta if b is None else _as_2d(b)
    if t0 is None:
        t0 = trivial_embedding(ta.shape[1], trivial_level(torch.cat([ta, tb]).numpy()))
    base = torch.as_tensor(np.asarray(d_sym(ta.numpy(), None if b is None else tb.numpy())))
    complexity = torch.as_tensor(np.asarray(d_sym(ta.numpy(), np.asarray(t0)[None, :])))
    out = base - alpha * complexity.reshape(-1, 1)
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
