"""MODEL2VEC: embed every expert in task space and recommend experts by asymmetric distance.

Each expert i gets an embedding m_i = F_i + b_i, where F_i is the TASK2VEC embedding of the
task it was trained on and b_i is learned from the task × expert performance matrix.

Choices made here (the paper leaves them open):

* **Non-negativity.** d_sym needs non-negative vectors and only looks at per-filter ratios
  m/(m+t) = sigmoid(log m − log t), so the expert embedding is learned in log space:
  m_i = (F_i + ε) · exp(δ_i), i.e. b_i = (F_i + ε)(exp(δ_i) − 1), with δ_i initialised at 0
  (so training starts exactly at TASK2VEC's F_i, up to the floor ε = ``floor`` × the zoo's
  median Fisher value) and an L2 penalty ``l2`` on δ pulling m_i back to its source task.
  Adam steps in log space are relative changes, which matches the scale-free distance.
  (A filter with F_i = 0 therefore starts at ε: against a task that is also 0 there, d_sym
  counts it as all-expert rather than the library's ½ for an exact 0/0.)
* **Experts without a source task** (the generic ImageNet expert; a None or NaN row) start
  at the mean of the training task embeddings (``missing_source="mean"``, the default; its
  offsets then learn where it belongs), where the training tasks say it wins (``"learned"``:
  the candidate place, among the mean training task, the mean of the tasks it wins and every
  training task, whose initial d_asym ranking scores best on the training tasks; see
  :func:`~t2v_core.recommend.meta_dataset.place_generic_experts`), or at the trivial
  embedding t0 (``"t0"``). On the 32 px demo zoo (5 folds, novel tasks) starting at the
  learnt place cost MODEL2VEC 8 points of relative increase (+34% against +26%) while
  raising its weighted τ (0.39 against 0.35), so the mean stays the default.
* **Model.** p(i | t) = softmax_i(−d_asym(m_i → t) / τ), with
  d_asym(m → t) = d_sym(m, t) − α · complexity(m, t0), complexity the mean share
  m / (m + t0) over filters (:func:`~t2v_core.embedding.distance.complexity`, which rises
  with the expert's Fisher scale), and t0 flat at ``t0_level`` (the prior precision of
  variational embeddings; by default the training tasks' median Fisher value). τ (in log
  space) and α (from the paper's 0.15) are learned by default; ``learn_alpha=False`` keeps α
  fixed.
* **Sharpness.** d_sym compares two embeddings filter by filter through u = m/(m+t) =
  sigmoid(log m − log t); on noisy Fisher estimates that spread over orders of magnitude most
  u saturate at 0 or 1, and small filters count as much as large ones. The model compares
  m^γ and t^γ instead, i.e. u = sigmoid(γ (log m − log t)), with γ learned (in log space,
  from 1 = the paper's distance) together with τ; ``learn_gamma=False`` keeps γ fixed at
  ``gamma``. One scalar, so it cannot overfit the way per-filter offsets can.
* **Targets.** For task t, soft targets are softmax_i(−r_ti / ``target_temperature``) over the
  experts with an observed error, where r_ti = (err_ti − min_j err_tj) / max(min_j err_tj,
  ``error_floor``, by default the evaluation's) is the relative error increase over the
  task's best expert — the quantity the evaluation reports, with the same floor. Missing cells are masked out of both the target and the softmax;
  tasks with fewer than two observed cells carry no ranking information and are skipped.
* **Training.** Cross-entropy, Adam (full batch unless ``batch_size`` is set; each batch is
  processed in memory-bounded blocks of tasks with accumulated gradients), early stopping on
  the validation loss of a held-out ``val_fraction`` of the training tasks (the best state is
  kept). Two phases: the learnable scalars (τ, γ, α) alone first, then the offsets with
  them, starting from the scalars' best state. All randomness (the split, minibatch order)
  comes from ``random_state``, so a fit
  is deterministic on a given device. τ starts at the median spread of the initial
  distances across experts unless ``tau`` is given. ``device`` (e.g. "cuda") moves the
  tasks × experts × filters computation to an accelerator.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator

from t2v_core.embedding.distance import trivial_embedding, trivial_level
from t2v_core.recommend.meta_dataset import place_generic_experts
from t2v_core.recommend.metrics import DEFAULT_ERROR_FLOOR, relative_increase
from t2v_core.storage import atomic_write_bytes, read_uri_bytes

__all__ = ["FitMemo", "Model2Vec", "resolve_expert_sources", "torch_complexity", "torch_d_asym",
           "torch_d_sym"]

log = logging.getLogger(__name__)

_FORMAT = "t2v-model2vec"
# 2: the complexity term is the mean share m / (m + t0), no longer d_sym(m, t0)
_VERSION = 2
# Float elements of one (tasks × experts × dim) temporary; bounds memory per step.
_PAIR_ELEMENTS = 1 << 23
# Bounds of m^γ and t^γ in float32: their sum and ratio stay finite.
_LARGE, _SMALL = 1e30, 1e-30
# The learnt γ stays in [e^-3, e^2]: Fisher values spanning 1e-10..1e4 raised to a larger
# power overflow float32, and one huge Adam step would otherwise turn every loss into NaN.
_LOG_GAMMA = (-3.0, 2.0)
# Epochs for the global scalars before the offsets train (Adam moves them 4·lr per step).
_SCALAR_EPOCHS = 100


def torch_d_sym(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differentiable d_sym for all row pairs of a (n×d) and b (m×d) -> n×m.

    The same convention as :func:`t2v_core.embedding.distance.d_sym` (so the trained model ranks exactly
    as the library distance would): u = a/(a+b), with u = 1/2 on a filter where both are 0,
    v = 1 − u, and distance 0 when a norm vanishes. Written with broadcasting so autograd
    sees one graph; divisions and square roots are guarded so gradients stay finite.
    """
    s = a[:, None, :] + b[None, :, :]
    positive = s > 0
    u = torch.where(positive, a[:, None, :] / torch.where(positive, s, torch.ones_like(s)), 0.5)
    v = 1.0 - u
    uv = (u * v).sum(-1)
    prod = (u * u).sum(-1) * (v * v).sum(-1)
    nonzero = prod > 0
    cos = uv / torch.where(nonzero, prod, torch.ones_like(prod)).sqrt()
    return torch.where(nonzero, 1.0 - cos, torch.zeros_like(cos)).clamp_min(0.0)


def torch_complexity(sources: torch.Tensor, t0: torch.Tensor) -> torch.Tensor:
    """Differentiable :func:`~t2v_core.embedding.distance.complexity`: the mean over filters of
    s / (s + t0), per row of ``sources`` (t0 > 0) -> E. Written as sigmoid(log s − log t0),
    which stays finite (with finite gradients) where s under- or overflows."""
    log_s = torch.log(sources.clamp_min(torch.finfo(sources.dtype).tiny))
    return torch.sigmoid(log_s - torch.log(t0).reshape(1, -1)).mean(-1)


def torch_d_asym(
    sources: torch.Tensor, targets: torch.Tensor, t0: torch.Tensor, alpha: torch.Tensor | float
) -> torch.Tensor:
    """Differentiable d_asym(source_i → target_j) = d_sym(s_i, t_j) − α complexity(s_i, t0)
    -> E×n."""
    return torch_d_sym(sources, targets) - alpha * torch_complexity(sources, t0)[:, None]


def sharpen(x: torch.Tensor, gamma: torch.Tensor | float) -> torch.Tensor:
    """x^γ for non-negative x, with 0 -> 0 and a finite gradient in γ where x = 0."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)) ** gamma, 0.0)


def resolve_expert_sources(
    expert_source_embeddings, task_embeddings, *, missing: str = "mean"
) -> tuple[np.ndarray, np.ndarray]:
    """Source embeddings as an E×d float array, with rows of experts that have no source task filled.

    ``expert_source_embeddings`` is an E×d array (a NaN row = no source) or a sequence whose
    items are vectors or None. Missing rows become the mean of ``task_embeddings``
    (``missing="mean"``) or the trivial embedding at their median level (``"t0"``).
    Returns (sources, missing_mask).
    """
    tasks = np.asarray(task_embeddings, dtype=np.float64)
    if tasks.ndim != 2 or tasks.shape[0] == 0:
        raise ValueError(f"task_embeddings must be a non-empty T×d matrix, got {tasks.shape}")
    dim = tasks.shape[1]
    rows = list(expert_source_embeddings)
    if not rows:
        raise ValueError("need at least one expert")
    out = np.empty((len(rows), dim), dtype=np.float64)
    mask = np.zeros(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        vec = None if row is None else np.asarray(row, dtype=np.float64).reshape(-1)
        if vec is None or vec.size == 0 or np.isnan(vec).all():
            mask[i] = True
            continue
        if vec.shape[0] != dim:
            raise ValueError(
                f"expert {i}: source embedding has dim {vec.shape[0]}, tasks have {dim}"
            )
        if not np.isfinite(vec).all() or (vec < 0).any():
            raise ValueError(f"expert {i}: source embedding must be finite and non-negative")
        out[i] = vec
    if mask.any():
        if missing == "mean":
            fill = tasks.mean(axis=0)
        elif missing == "t0":
            fill = trivial_embedding(dim, trivial_level(tasks)).astype(np.float64)
        else:
            raise ValueError(f"missing must be 'mean' or 't0', got {missing!r}")
        out[mask] = fill
    return out, mask


def soft_targets(
    errors: np.ndarray, temperature: float, error_floor: float
) -> tuple[np.ndarray, np.ndarray]:
    """Soft target distribution per task from its matrix row; (targets, observed mask).

    Lower error gets more mass: softmax(−relative increase over the row's best / temperature)
    over the observed cells; missing cells get 0.
    """
    err = np.asarray(errors, dtype=np.float64)
    observed = np.isfinite(err)
    best = np.where(observed, err, np.inf).min(axis=1, keepdims=True)
    best = np.where(np.isfinite(best), best, 0.0)
    rel = relative_increase(err, best, error_floor)
    logits = np.where(observed, -rel / temperature, -np.inf)
    logits = logits - np.where(observed.any(1, keepdims=True), logits.max(1, keepdims=True), 0.0)
    weights = np.where(observed, np.exp(logits), 0.0)
    total = weights.sum(axis=1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0), observed


def _to_plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so ids and params load with weights_only=True."""
    return value.item() if isinstance(value, np.generic) else value


class Model2Vec(BaseEstimator):
    """MODEL2VEC expert recommender (sklearn-style; see the module docstring for the model).

    ``fit`` learns the expert embeddings from task embeddings and a task × expert error
    matrix; ``scores`` / ``rank`` / ``predict`` work on embeddings of new tasks.
    """

    def __init__(
        self,
        *,
        tau: float | None = None,
        learn_tau: bool = True,
        alpha: float = 0.15,
        learn_alpha: bool = True,
        gamma: float = 1.0,
        learn_gamma: bool = True,
        target_temperature: float = 0.1,
        error_floor: float = DEFAULT_ERROR_FLOOR,
        lr: float = 0.05,
        l2: float = 1e-3,
        max_epochs: int = 500,
        patience: int = 30,
        val_fraction: float = 0.2,
        batch_size: int | None = None,
        missing_source: str = "mean",
        t0_level: float | None = None,
        floor: float = 1e-6,
        random_state: int = 0,
        device: str | None = None,
    ) -> None:
        self.tau = tau
        self.learn_tau = learn_tau
        self.alpha = alpha
        self.learn_alpha = learn_alpha
        self.gamma = gamma
        self.learn_gamma = learn_gamma
        self.target_temperature = target_temperature
        self.error_floor = error_floor
        self.lr = lr
        self.l2 = l2
        self.max_epochs = max_epochs
        self.patience = patience
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.missing_source = missing_source
        self.t0_level = t0_level
        self.floor = floor
        self.random_state = random_state
        self.device = device

    # ---------------------------------------------------------------- fitting

    def fit(
        self,
        task_embeddings,
        errors,
        expert_source_embeddings,
        *,
        expert_ids: Sequence[Any] | None = None,
    ) -> Model2Vec:
        """Learn m_i from T training tasks (T×d), their errors (T×E, NaN = missing) and E sources."""
        tasks = np.asarray(task_embeddings, dtype=np.float64)
        err = np.asarray(errors, dtype=np.float64)
        if tasks.ndim != 2 or err.ndim != 2 or err.shape[0] != tasks.shape[0]:
            raise ValueError(f"need T×d embeddings and T×E errors, got {tasks.shape}, {err.shape}")
        if not np.isfinite(tasks).all() or (tasks < 0).any():
            raise ValueError("task embeddings must be finite and non-negative")
        learned = self.missing_source == "learned"
        sources, missing = resolve_expert_sources(
            expert_source_embeddings, tasks, missing="mean" if learned else self.missing_source
        )
        level = trivial_level(tasks) if self.t0_level is None else float(self.t0_level)
        t0 = trivial_embedding(tasks.shape[1], level)
        n_experts = sources.shape[0]
        if err.shape[1] != n_experts:
            raise ValueError(f"errors have {err.shape[1]} columns for {n_experts} experts")
        ids = list(range(n_experts)) if expert_ids is None else [_to_plain(x) for x in expert_ids]
        if len(ids) != n_experts:
            raise ValueError(f"{len(ids)} expert_ids for {n_experts} experts")

        targets, observed = soft_targets(err, self.target_temperature, self.error_floor)
        usable = np.flatnonzero(observed.sum(axis=1) >= 2)
        if usable.size == 0:
            raise ValueError("no training task has two or more observed errors")

        if learned:
            sources, _ = place_generic_experts(tasks, err, sources, missing, alpha=self.alpha,
                                               t0=t0, error_floor=self.error_floor)
        self.t0_ = torch.as_tensor(t0, dtype=torch.float32)
        self.sources_ = torch.as_tensor(sources, dtype=torch.float32)
        self.missing_source_ = missing
        self.expert_ids_ = ids
        self._init_log_m = torch.log(self.sources_ + self.floor * level)

        train_idx, val_idx = self._split(usable)
        t_all = torch.as_tensor(tasks, dtype=torch.float32)
        q_all = torch.as_tensor(targets, dtype=torch.float32)
        obs_all = torch.as_tensor(observed)
        self._train(t_all, q_all, obs_all, train_idx, val_idx)
        return self

    def _split(self, usable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Held-out tasks for early stopping; none when too few tasks to spare any."""
        rng = np.random.default_rng(self.random_state)
        order = rng.permutation(usable)
        n_val = int(round(self.val_fraction * order.size))
        if order.size < 5 or n_val < 1:
            return np.sort(order), np.empty(0, dtype=np.int64)
        return np.sort(order[n_val:]), np.sort(order[:n_val])

    def _device(self) -> torch.device:
        return torch.device(self.device or "cpu")

    def _chunk_rows(self, n_experts: int, dim: int) -> int:
        """Tasks per block so that one tasks × experts × dim temporary stays bounded."""
        return max(1, _PAIR_ELEMENTS // max(1, n_experts * dim))

    def _distances(
        self,
        m: torch.Tensor,
        tasks: torch.Tensor,
        alpha: torch.Tensor | float,
        gamma: torch.Tensor | float,
    ) -> torch.Tensor:
        """d_asym(m_i^γ → t^γ) for one block of tasks -> n×E (differentiable)."""
        t0 = self.t0_.to(m.device)
        # bounded, so that a huge step in γ cannot turn a ratio into inf/inf
        return torch_d_asym((m**gamma).clamp_max(_LARGE), sharpen(tasks, gamma).clamp_max(_LARGE),
                            (t0**gamma).clamp(_SMALL, _LARGE), alpha).T

    def _distance_matrix(
        self, m: torch.Tensor, tasks: torch.Tensor, alpha: float, gamma: float
    ) -> torch.Tensor:
        """d_asym(m_i → t) for any number of tasks, block by block, without gradients -> n×E."""
        rows = self._chunk_rows(*m.shape)
        with torch.no_grad():
            return torch.cat([
                self._distances(m, block.to(m.device), alpha, gamma).cpu()
                for block in tasks.split(rows)
            ])

    def _initial_tau(self, tasks: torch.Tensor) -> float:
        """τ that gives the initial logits about unit spread across experts."""
        if self.tau is not None:
            return float(self.tau)
        m = torch.exp(self._init_log_m).to(self._device())
        d = self._distance_matrix(m, tasks, float(self.alpha), float(self.gamma))
        spread = float(d.std(dim=1).median()) if d.shape[1] > 1 else 0.0
        return spread if spread > 1e-6 else 0.1

    def _loss(
        self,
        params: dict[str, torch.Tensor],
        tasks: torch.Tensor,
        q: torch.Tensor,
        observed: torch.Tensor,
    ) -> torch.Tensor:
        """Summed soft-target cross-entropy over a block of tasks (missing cells masked)."""
        m = torch.exp(params["init_log_m"] + params["delta"])
        alpha = params["alpha"] if "alpha" in params else float(self.alpha)
        gamma = torch.exp(params["log_gamma"].clamp(*_LOG_GAMMA))
        logits = -self._distances(m, tasks, alpha, gamma) / torch.exp(params["log_tau"])
        logits = logits.masked_fill(~observed, -1e9)
        # x − logsumexp(x), not log_softmax: the latter's threaded kernel stalls on a busy CPU.
        logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        return -(torch.where(observed, q * logp, torch.zeros_like(logp))).sum()

    def _train(
        self,
        t_all: torch.Tensor,
        q_all: torch.Tensor,
        obs_all: torch.Tensor,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
    ) -> None:
        """Adam on the soft-target cross-entropy; keeps the state with the best validation loss.

        A minibatch (``batch_size`` tasks, default all) is processed in memory-bounded blocks
        whose gradients are accumulated, so the optimisation does not depend on memory limits.
        """
        device = self._device()
        data = (t_all.to(device), q_all.to(device), obs_all.to(device))
        tr = torch.as_tensor(train_idx, dtype=torch.long)
        va = torch.as_tensor(val_idx, dtype=torch.long)
        params = self._initial_params(self._initial_tau(data[0][tr.to(device)]), device)
        gen = torch.Generator().manual_seed(int(self.random_state))
        batch = max(1, min(self.batch_size or tr.numel(), tr.numel()))
        epochs = self._shuffled_minibatches(tr, batch, gen)
        self.history_: list[dict[str, float]] = []
        best = (math.inf, 0, self._snapshot(params))
        for phase in self._phases(params):
            best = self._run_phase(phase, best, params, data, epochs, va)
        self._keep_best(best, tr.numel(), va.numel())

    def _initial_params(self, tau0: float, device: torch.device) -> dict[str, torch.Tensor]:
        """The model's tensors at the start of training: offsets δ = 0 (m_i = F_i + ε), τ = τ0,
        γ = ``gamma`` and, when it is learnt, α = ``alpha``; ``init_log_m`` is fixed."""
        params = {
            "init_log_m": self._init_log_m.to(device),
            "delta": torch.zeros_like(self._init_log_m, device=device, requires_grad=True),
            "log_tau": torch.tensor(math.log(tau0), device=device, requires_grad=True),
            "log_gamma": torch.tensor(math.log(self.gamma), device=device, requires_grad=True),
        }
        if self.learn_alpha:
            params["alpha"] = torch.tensor(float(self.alpha), device=device, requires_grad=True)
        return params

    def _trainable(self, params: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The tensors Adam may move: the offsets and whichever scalars are learnt."""
        trainable = [params["delta"]]
        if self.learn_tau:
            trainable.append(params["log_tau"])
        if self.learn_gamma:
            trainable.append(params["log_gamma"])
        if "alpha" in params:
            trainable.append(params["alpha"])
        return trainable

    def _phases(self, params: dict[str, torch.Tensor]) -> list[tuple]:
        """(name, tensors, lr, min_delta, max_epochs) of each training phase, in order.

        The global scalars (τ, γ, α) first: a handful of numbers cannot overfit the training
        tasks, whereas the per-filter offsets start to overfit within a few epochs and early
        stopping would then freeze the scalars wherever they happened to be. The scalars take
        larger steps, for at most _SCALAR_EPOCHS epochs, and stop once the loss gains less
        than 1e-4 per ``patience`` epochs; the offsets then start from the scalars' best
        state and keep it unless they improve on its validation loss.
        """
        trainable = self._trainable(params)
        scalars = [t for t in trainable if t is not params["delta"]]
        epochs = int(self.max_epochs)
        phases = [("offsets", trainable, self.lr, 1e-7, epochs)]
        if scalars:
            phases.insert(0, ("scalars", scalars, 4 * self.lr, 1e-4, min(epochs, _SCALAR_EPOCHS)))
        return phases

    @staticmethod
    def _shuffled_minibatches(train: torch.Tensor, batch: int, gen: torch.Generator):
        """Each epoch's minibatches of training tasks, shuffled by ``gen`` when the epoch starts."""
        while True:
            yield train[torch.randperm(train.numel(), generator=gen)].split(batch)

    @staticmethod
    def _snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A detached CPU copy of the learnt tensors, to return to the best state later."""
        return {k: v.detach().cpu().clone() for k, v in params.items() if k != "init_log_m"}

    def _run_phase(self, phase: tuple, best: tuple, params: dict[str, torch.Tensor],
                   data: tuple[torch.Tensor, ...], epochs, val: torch.Tensor) -> tuple:
        """Adam on the phase's tensors until the validation loss stops improving on ``best``
        (loss, epoch, state); returns the best state, which the parameters are left at."""
        name, group, lr, min_delta, max_epochs = phase
        opt = torch.optim.Adam(group, lr=lr)
        with_offsets = any(t is params["delta"] for t in group)
        first_epoch = len(self.history_)
        best = (best[0], first_epoch, best[2])
        for epoch in range(first_epoch, first_epoch + max_epochs):
            train_loss = self._train_epoch(opt, params, data, next(epochs), with_offsets)
            monitor = (self._block_losses(params, data, val, False, 1.0) / val.numel()
                       if val.numel() else train_loss)
            self.history_.append({"epoch": epoch, "phase": name, "train_loss": train_loss,
                                  "val_loss": monitor})
            if monitor < best[0] - min_delta:
                best = (monitor, epoch, self._snapshot(params))
            elif epoch - best[1] >= self.patience:
                break
        with torch.no_grad():  # continue from the best state, not the last
            for key, value in best[2].items():
                params[key].copy_(value.to(self._device()))
        return best

    def _train_epoch(self, opt: torch.optim.Optimizer, params: dict[str, torch.Tensor],
                     data: tuple[torch.Tensor, ...], minibatches, with_offsets: bool) -> float:
        """One Adam step per minibatch, with the L2 pull of the offsets towards their source
        tasks while the offsets train; returns the epoch's mean training loss."""
        trainable = self._trainable(params)
        running, seen = 0.0, 0
        for minibatch in minibatches:
            for t in trainable:
                t.grad = None
            running += self._block_losses(params, data, minibatch, True, 1.0 / minibatch.numel())
            if with_offsets:
                (self.l2 * params["delta"].pow(2).mean()).backward()
            opt.step()
            seen += minibatch.numel()
        return running / seen

    def _block_losses(self, params: dict[str, torch.Tensor], data: tuple[torch.Tensor, ...],
                      idx: torch.Tensor, grad: bool, scale: float) -> float:
        """Summed loss over the tasks ``idx``, in blocks that bound memory; with ``grad`` each
        block's gradient, times ``scale``, accumulates into the parameters."""
        device = self._device()
        tasks, targets, observed = data
        total = 0.0
        for block in idx.split(self._chunk_rows(*self.sources_.shape)):
            b = block.to(device)
            with torch.set_grad_enabled(grad):
                loss = self._loss(params, tasks[b], targets[b], observed[b])
            if grad:
                (loss * scale).backward()
            total += loss.item()
        return total

    def _keep_best(self, best: tuple, n_train: int, n_val: int) -> None:
        """Store the best (loss, epoch, state) as the fitted model."""
        _, self.best_epoch_, state = best
        log.info(
            "model2vec fit: %d train / %d val tasks, %d experts, best epoch %d (loss %.4f)",
            n_train,
            n_val,
            self.sources_.shape[0],
            self.best_epoch_,
            best[0],
        )
        self.log_m_ = self._init_log_m + state["delta"]
        self.tau_ = float(torch.exp(state["log_tau"]))
        self.alpha_ = float(state["alpha"]) if "alpha" in state else float(self.alpha)
        self.gamma_ = (float(torch.exp(state["log_gamma"].clamp(*_LOG_GAMMA))) if self.learn_gamma
                       else float(self.gamma))

    # ---------------------------------------------------------------- inference

    def _check_fitted(self) -> None:
        if not hasattr(self, "log_m_"):
            raise RuntimeError("Model2Vec is not fitted: call fit() or load() first")

    @property
    def expert_embeddings_(self) -> np.ndarray:
        """The learned m_i (E×d), non-negative; usable with t2v_core.embedding.distance directly."""
        self._check_fitted()
        return torch.exp(self.log_m_).numpy().astype(np.float64)

    @property
    def offsets_(self) -> np.ndarray:
        """The learned b_i = m_i − F_i (E×d)."""
        return self.expert_embeddings_ - self.sources_.numpy().astype(np.float64)

    def distances(self, task_embeddings) -> np.ndarray:
        """d_asym(m_i → t) for every new task t and expert i (n×E); lower = better expert."""
        self._check_fitted()
        tasks = torch.as_tensor(np.atleast_2d(np.asarray(task_embeddings)), dtype=torch.float32)
        if tasks.shape[1] != self.log_m_.shape[1]:
            raise ValueError(f"tasks have dim {tasks.shape[1]}, model has {self.log_m_.shape[1]}")
        if not torch.isfinite(tasks).all() or (tasks < 0).any():
            raise ValueError("task embeddings must be finite and non-negative")
        m = torch.exp(self.log_m_).to(self._device())
        return self._distance_matrix(m, tasks, self.alpha_, self.gamma_).numpy().astype(np.float64)

    def scores(self, task_embeddings) -> np.ndarray:
        """p(expert i | task t) for every new task (n×E, rows sum to 1)."""
        logits = -self.distances(task_embeddings) / self.tau_
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        return weights / weights.sum(axis=1, keepdims=True)

    def rank(self, task_embeddings) -> np.ndarray:
        """Expert indices best-first for every new task (n×E ints); ties keep index order."""
        return np.argsort(self.distances(task_embeddings), axis=1, kind="stable")

    def predict(self, task_embeddings) -> np.ndarray:
        """Index of the recommended expert for every new task (n,)."""
        return self.rank(task_embeddings)[:, 0]

    # ---------------------------------------------------------------- persistence

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted model to one file, a local path or URI (a dict of tensors and plain
        lists, via torch.save)."""
        self._check_fitted()
        state = {
            "format": _FORMAT,
            "version": _VERSION,
            "params": {k: _to_plain(v) for k, v in self.get_params().items()},
            "log_m": self.log_m_.clone(),
            "sources": self.sources_.clone(),
            "missing_source": [bool(x) for x in self.missing_source_],
            "t0": self.t0_.clone(),
            "tau": self.tau_,
            "alpha": self.alpha_,
            "gamma": self.gamma_,
            "expert_ids": list(self.expert_ids_),
            "best_epoch": int(self.best_epoch_),
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(path, buf.getvalue())  # readers never see a half-written model

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | None = None) -> Model2Vec:
        """Read a model written by :meth:`save` from a local path or URI (weights_only: no code
        runs on load).

        ``device`` overrides where inference runs (a model trained on a GPU loads on a CPU).
        """
        state = torch.load(io.BytesIO(read_uri_bytes(path)), weights_only=True, map_location="cpu")
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a Model2Vec file")
        if state.get("version") == 1:
            raise ValueError(f"{path} was written before the complexity term changed (version 1); "
                             "retrain it with jobs.train_model2vec")
        if state.get("version") != _VERSION:
            raise ValueError(f"unsupported Model2Vec file version {state.get('version')}")
        params = dict(state["params"])
        if device is not None:
            params["device"] = device
        model = cls(**params)
        model.log_m_ = state["log_m"]
        model.sources_ = state["sources"]
        model.missing_source_ = np.asarray(state["missing_source"], dtype=bool)
        model.t0_ = state["t0"]
        model.tau_ = float(state["tau"])
        model.alpha_ = float(state["alpha"])
        model.gamma_ = float(state.get("gamma", 1.0))  # files from before γ: the plain distance
        model.expert_ids_ = list(state["expert_ids"])
        model.best_epoch_ = int(state["best_epoch"])
        model._init_log_m = torch.log(model.sources_ + model.floor * float(model.t0_[0]))
        return model


class FitMemo:
    """MODEL2VEC fits keyed by their parameters and training data, shared by deep copies:
    Table 1's Model2Vec row and the default recommender's rows, which fit the same model on
    the same fold, fit it once."""

    def __init__(self) -> None:
        self._fits: dict[str, Model2Vec] = {}

    def __deepcopy__(self, memo: dict) -> FitMemo:
        return self

    def fit(self, params: dict[str, Any], tasks: np.ndarray, errors: np.ndarray, sources,
            expert_ids: Sequence[Any]) -> Model2Vec:
        digest = hashlib.sha256(repr(sorted(params.items())).encode())
        for part in (tasks, errors, np.asarray(
                [np.full(tasks.shape[1], np.nan) if s is None else s for s in sources], float)):
            digest.update(np.ascontiguousarray(part, dtype=np.float64).tobytes())
        key = digest.hexdigest()
        if key not in self._fits:
            self._fits[key] = Model2Vec(**params).fit(tasks, errors, sources,
                                                      expert_ids=expert_ids)
        return self._fits[key]
