"""A listwise fusion of per-expert signals, learned on the training tasks.

Transfer scores live on scales that differ between scores, zoos and image sizes (LogME is an
evidence per sample, LEEP a log-likelihood), and which of them is worth trusting changes with
the setting: on the demo zoo LogME is far ahead of LEEP at 64 px, while at 32 px the two trade
places between expert seeds. Choosing one score on the training tasks flips between folds when
they are close; a learned weighting of all of them does not. Each signal is z-scored across one task's experts (so one weight carries across
tasks) and the weights are fitted with ListNet (Cao et al., 2007):

    p_w(e | t) = softmax_e(x_te · w)                      x_te: task t, expert e, d signals
    q(e | t)   = softmax_e(−r_te / temperature)           r_te: relative increase of e over t's best
    w          = argmin_w  mean_t KL(q(·|t) ‖ p_w(·|t)) + l2 · ‖w‖²

so an expert close to the task's best error gets most of the target's mass, and w is the
weighting under which the signals' softmax best matches it. Experts with a missing signal or
error on a task are left out of that task's softmax.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize

from t2v_core.recommend.metrics import DEFAULT_ERROR_FLOOR, relative_increase

__all__ = ["ListwiseFusion", "mean_error_prior", "zscore"]


def zscore(values) -> np.ndarray:
    """``values`` (E,) standardised across its finite entries (NaN stays NaN; a constant row
    is all zeros), so that one weight per signal means the same on every task."""
    row = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(row)
    out = np.full(row.shape, np.nan)
    if finite.any():
        kept = row[finite]
        spread = kept.std()
        out[finite] = (kept - kept.mean()) / spread if spread > 0 else 0.0
    return out


def mean_error_prior(errors: np.ndarray, error_floor: float = DEFAULT_ERROR_FLOOR,
                     exclude: int | None = None) -> np.ndarray:
    """Each expert's −log mean error over the tasks of ``errors`` (T×E; NaN = not measured),
    without task ``exclude``: the static prior that never looks at the task, as a signal
    (higher = better). A training task's own row is excluded when its prior is a feature."""
    rows = errors if exclude is None else np.delete(errors, exclude, axis=0)
    with np.errstate(invalid="ignore"):
        mean = np.nanmean(rows, axis=0) if rows.size else np.full(errors.shape[1], np.nan)
    return -np.log(np.maximum(mean, error_floor))


class ListwiseFusion:
    """One weight per signal, learned listwise on training tasks (module docstring).

    ``fit(rows, errors)``: ``rows[t]`` maps each signal name to its (E,) values on task t;
    ``decision(row, E)``: the fused value of each expert (higher = better; NaN where a used
    signal is missing). Signals absent from every training task are dropped; ``coef_`` maps
    the kept signals to their weights.
    """

    def __init__(self, signals: Sequence[str], *, temperature: float = 0.1, l2: float = 0.01,
                 error_floor: float = DEFAULT_ERROR_FLOOR) -> None:
        self.signals = tuple(signals)
        self.temperature = temperature
        self.l2 = l2
        self.error_floor = error_floor

    @classmethod
    def fixed(cls, coef: Mapping[str, float]) -> ListwiseFusion:
        """A fusion with given weights, for ranking where no training tasks are at hand."""
        fusion = cls(tuple(coef))
        fusion.coef_ = {name: float(w) for name, w in coef.items()}
        return fusion

    def fit(self, rows: Sequence[Mapping[str, np.ndarray]], errors: np.ndarray
            ) -> ListwiseFusion:
        names = [n for n in self.signals
                 if any(np.isfinite(np.asarray(r.get(n, np.nan), float)).any() for r in rows)]
        if not names:
            raise ValueError(f"no training task has any of the signals {self.signals}")
        lists = [self._list(row, err, names) for row, err in zip(rows, errors, strict=True)]
        lists = [(x, q) for x, q in lists if len(q) > 1]
        if not lists:
            raise ValueError("no training task has two experts with every signal and an error")
        w = minimize(self._loss, np.ones(len(names)), args=(lists,), jac=True,
                     method="L-BFGS-B").x
        self.coef_ = dict(zip(names, (float(v) for v in w), strict=True))
        return self

    def _list(self, row: Mapping[str, np.ndarray], err: np.ndarray, names: list[str]
              ) -> tuple[np.ndarray, np.ndarray]:
        """One task's signals (n×d) and target distribution over its usable experts."""
        x = np.stack([zscore(row.get(n, np.full(err.shape, np.nan))) for n in names], axis=1)
        keep = np.isfinite(x).all(axis=1) & np.isfinite(err)
        if keep.sum() < 2:
            return x[keep], np.zeros(int(keep.sum()))
        r = relative_increase(err[keep], err[keep].min(), self.error_floor)
        logits = -np.asarray(r, float) / self.temperature
        q = np.exp(logits - logits.max())
        return x[keep], q / q.sum()

    def _loss(self, w: np.ndarray, lists: list[tuple[np.ndarray, np.ndarray]]
              ) -> tuple[float, np.ndarray]:
        total, grad = 0.0, np.zeros_like(w)
        for x, q in lists:
            s = x @ w
            s = s - s.max()
            log_p = s - np.log(np.exp(s).sum())
            total -= float(q @ log_p)
            grad -= x.T @ (q - np.exp(log_p))
        n = len(lists)
        return total / n + self.l2 * float(w @ w), grad / n + 2 * self.l2 * w

    def decision(self, row: Mapping[str, np.ndarray], n_experts: int) -> np.ndarray:
        """The fused value of every expert of one task. A signal the row lacks adds nothing
        (a task ranked without a screen); a NaN inside a signal makes that expert's value NaN
        (an expert that was not run)."""
        out = np.zeros(n_experts)
        for name, w in self.coef_.items():
            if name in row:
                out = out + w * zscore(row[name])
        return out

    def __repr__(self) -> str:
        coef = getattr(self, "coef_", None)
        shown = "unfitted" if coef is None else ", ".join(f"{k}={v:.2f}" for k, v in coef.items())
        return f"ListwiseFusion({shown})"
