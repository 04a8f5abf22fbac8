"""Transferability scores: how well one expert's outputs on a task predict the task's labels.

These are the per-expert baselines a task-embedding recommender is compared against. Unlike
TASK2VEC/MODEL2VEC, each needs a forward pass of *every* expert over the target task, so
their cost grows with the size of the zoo. Higher is better for all three.

* :func:`logme` — You et al., "LogME: Practical Assessment of Pre-trained Models for
  Transfer Learning", ICML 2021. Needs the expert's penultimate features.
* :func:`leep` — Nguyen et al., "LEEP: A New Measure to Evaluate Transferability of
  Learned Representations", ICML 2020. Needs the expert's source-head probabilities.
* :func:`nce` — Tran et al., "Transferability and Hardness of Supervised Classification
  Tasks", ICCV 2019. Needs the expert's hard source-head predictions.
* :func:`ridge_loo` — the leave-one-out error of a ridge-regression probe on the expert's
  penultimate features (Allen's PRESS), exact in closed form from one SVD. Where LogME scores
  the linear model by its evidence, this scores it by how well it predicts held-out images.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["leep", "logme", "nce", "ridge_loo"]

_PRECISION_MIN, _PRECISION_MAX = 1e-15, 1e15
# Ridge penalties tried by :func:`ridge_loo`, as multiples of the mean squared singular value of
# the centred features, so that the score does not depend on the features' scale.
RIDGE_GRID = np.logspace(-4, 2, 13)


def _check_labels(labels, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels as a 1-d array of length n, plus the integer code of each sample."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    if n == 0:
        raise ValueError("need at least one sample")
    _, codes = np.unique(labels, return_inverse=True)
    return labels, codes.reshape(-1)


def _check_features(features) -> np.ndarray:
    """Features as a finite N×D float64 array."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be N×D, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf")
    return f


def logme(features, labels, *, max_iter: int = 1000, tol: float = 1e-10) -> float:
    """LogME: mean per-sample log evidence of a Bayesian linear model on the features.

    For each class k the one-hot column y_k is regressed on the features F (N×D) with the
    model y = F w + ε, w ~ N(0, α⁻¹ I), ε ~ N(0, β⁻¹ I). The evidence

        log p(y|F, α, β) = N/2 log β + D/2 log α − N/2 log 2π
                           − β/2 ‖F m − y‖² − α/2 ‖m‖² − 1/2 log |A|,
        A = α I + β FᵀF,  m = β A⁻¹ Fᵀ y,

    is maximised over (α, β) by MacKay's fixed point γ = Σ_i βσ_i²/(α + βσ_i²),
    α ← γ / ‖m‖², β ← (N − γ) / ‖F m − y‖², starting from α = β = 1. One SVD of F, shared by
    all classes, makes every iteration O(min(N, D)). The score is the evidence divided by N,
    averaged over the classes. No intercept is fitted: centre the features first if wanted.
    """
    f = _check_features(features)
    n, d = f.shape
    _, codes = _check_labels(labels, n)

    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma2 = s**2  # eigenvalues of FᵀF; the other d − r are zero
    r = sigma2.shape[0]
    evidences = []
    for k in range(int(codes.max()) + 1):
        y = (codes == k).astype(np.float64)
        z = u.T @ y  # y in the singular basis; ‖y‖² − ‖z‖² is outside F's column space
        out_of_span = max(float(y @ y - z @ z), 0.0)
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            shrink = alpha + beta * sigma2
            gamma = float(np.sum(beta * sigma2 / shrink))
            m2 = float(np.sum((beta * s * z / shrink) ** 2))  # ‖m‖²
            res2 = float(np.sum((alpha * z / shrink) ** 2)) + out_of_span  # ‖F m − y‖²
            # Clipped so that an interpolating fit (N ≤ D, ‖F m − y‖ → 0) stops at a finite β.
            new_alpha = min(max(gamma / max(m2, 1e-300), _PRECISION_MIN), _PRECISION_MAX)
            new_beta = min(max((n - gamma) / max(res2, 1e-300), _PRECISION_MIN), _PRECISION_MAX)
            done = abs(new_alpha - alpha) <= tol * alpha and abs(new_beta - beta) <= tol * beta
            alpha, beta = new_alpha, new_beta
            if done:
                break
        shrink = alpha + beta * sigma2
        m2 = float(np.sum((beta * s * z / shrink) ** 2))
        res2 = float(np.sum((alpha * z / shrink) ** 2)) + out_of_span
        log_det_a = float(np.sum(np.log(shrink))) + (d - r) * np.log(alpha)
        evidence = 0.5 * (
            n * np.log(beta)
            + d * np.log(alpha)
            - n * np.log(2 * np.pi)
            - beta * res2
            - alpha * m2
            - log_det_a
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def leep(source_probs, labels) -> float:
    """LEEP: log expected empirical prediction of the source head re-used as a classifier.

    With θ(x_i) the expert's softmax over its Z source classes, the empirical joint of target
    label y and source label z is P̂(y, z) = 1/N Σ_{i: y_i = y} θ(x_i)_z; the "expected
    empirical predictor" classifies x by Σ_z P̂(y|z) θ(x)_z. LEEP is its mean log-likelihood
    on the task: 1/N Σ_i log Σ_z P̂(y_i|z) θ(x_i)_z (≤ 0; 0 is a perfect deterministic map).
    """
    theta = np.asarray(source_probs, dtype=np.float64)
    if theta.ndim != 2:
        raise ValueError(f"source_probs must be N×Z, got shape {theta.shape}")
    if (theta < 0).any() or not np.isfinite(theta).all():
        raise ValueError("source_probs must be finite and non-negative")
    n = theta.shape[0]
    _, codes = _check_labels(labels, n)
    onehot = np.eye(int(codes.max()) + 1)[codes]  # N×Y
    joint = onehot.T @ theta / n  # Y×Z
    marginal_z = joint.sum(axis=0, keepdims=True)
    cond = np.divide(joint, marginal_z, out=np.zeros_like(joint), where=marginal_z > 0)  # P̂(y|z)
    predicted = theta @ cond.T  # N×Y
    likelihood = predicted[np.arange(n), codes]
    return float(np.mean(np.log(np.maximum(likelihood, 1e-300))))


def nce(source_labels, target_labels) -> float:
    """NCE: negative conditional entropy −H(Y|Z) of target labels given source labels.

    Z are the expert's hard predictions on the task's samples, Y the task's labels. With the
    empirical joint P̂(y, z), NCE = Σ_{y,z} P̂(y, z) log P̂(y|z). It is 0 when Z determines Y
    and −H(Y) when they are independent.
    """
    z_raw = np.asarray(source_labels)
    n = z_raw.shape[0] if z_raw.ndim == 1 else -1
    if n <= 0:
        raise ValueError("source_labels must be a non-empty 1-d array")
    _, y = _check_labels(target_labels, n)
    _, z = _check_labels(z_raw, n)
    joint = np.zeros((int(y.max()) + 1, int(z.max()) + 1))
    np.add.at(joint, (y, z), 1.0 / n)
    marginal_z = joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    cond = np.divide(joint, marginal_z, out=np.ones_like(joint), where=nz)
    return float(np.sum(joint[nz] * np.log(cond[nz])))


def ridge_loo(features, labels, *, grid=RIDGE_GRID) -> float:
    """−PRESS / N: the leave-one-out squared error of a ridge-regression probe (higher is better).

    The one-hot labels Y (N×C) are regressed on the features F (N×D) with an unpenalised
    intercept and the penalty λ‖W‖². With the centred features F_c = U S Vᵀ the hat matrix is
    H = 11ᵀ/N + U diag(s²/(s² + λ)) Uᵀ, so every sample's leave-one-out prediction needs no
    refit (Allen, 1974):

        ŷ_(−i) = (ŷ_i − h_ii y_i) / (1 − h_ii),      PRESS(λ) = Σ_i ‖y_i − ŷ_(−i)‖².

    λ is the minimiser of PRESS over ``grid`` × mean(s²). One SVD serves every λ and class;
    each λ costs O(N·r·C), r = rank(F_c). A task with one class scores 0 for every expert.
    """
    f = _check_features(features)
    n = f.shape[0]
    _, codes = _check_labels(labels, n)
    y = np.eye(int(codes.max()) + 1)[codes]
    y = y - y.mean(axis=0)  # the intercept; a shift of y leaves the residuals unchanged
    u, s, _ = np.linalg.svd(f - f.mean(axis=0), full_matrices=False)
    keep = s > s.max(initial=0.0) * 1e-12
    u, sigma2 = u[:, keep], s[keep] ** 2  # constant features keep none: the intercept alone
    z, u2 = u.T @ y, u**2  # shared by every λ
    best = math.inf
    for lam in np.asarray(grid, dtype=np.float64) * (sigma2.mean() if sigma2.size else 0.0):
        shrink = sigma2 / (sigma2 + lam)
        leverage = u2 @ shrink + 1.0 / n
        residual = (y - u @ (shrink[:, None] * z)) / np.maximum(1.0 - leverage, 1e-12)[:, None]
        best = min(best, float((residual**2).sum()))
    return -best / n
