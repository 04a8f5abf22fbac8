"""Train the classifier of one (task, expert) cell of the performance matrix.

Two recipes, following the paper where it applies:

* ``probe``: a linear (or one-hidden-layer MLP) head on the expert's frozen features, trained
  full-batch with Adam. Features are computed once per (expert, task) and cached, so a cell
  costs one forward pass of the expert over the task plus a few milliseconds of head training.
  This is the mode used for the whole matrix.
* ``finetune``: the head is first fitted with Adam on frozen features, then the whole network
  is trained with SGD (momentum, step decay). For a chosen subset of cells.

The estimators here take tensors and return typed results; reading tasks, caching features
and writing matrix rows live elsewhere (:mod:`t2v_core.matrix.features`, :mod:`t2v_core.matrix.rows`).

Many small cells would drown in per-call overhead, so :func:`fit_heads` trains many heads as
one batched tensor program: every hyper-parameter configuration of a cell, and several cells
that share an expert (features padded to a common size, padding masked out of the loss).
Adam is element-wise, so heads trained together follow exactly the trajectories they would
follow alone (to float rounding).

A configuration *diverges* when its loss becomes non-finite (NaN or inf) or grows beyond
``explode_factor`` times its initial value; it is frozen from that step on and reported as
failed with the reason. A cell fails only when all its configurations do.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Bumped when a recipe changes meaning, so matrix rows say which code produced them.
RECIPE_VERSION = 1
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


# -- specs and results ---------------------------------------------------------------------
@dataclass(frozen=True)
class HeadConfig:
    """The hyper-parameters searched per cell."""

    lr: float
    weight_decay: float = 0.0

    def to_dict(self) -> dict:
        return {"lr": float(self.lr), "weight_decay": float(self.weight_decay)}


@dataclass(frozen=True)
class SearchSpace:
    """Log-uniform ranges for the searched hyper-parameters (``weight_decay`` low end 0 means
    "include no decay": samples below 10× the low end are rounded to 0)."""

    lr: tuple[float, float] = (1e-3, 1e-1)
    weight_decay: tuple[float, float] = (1e-6, 1e-2)

    def sample(self, n: int, seed: int = 0) -> list[HeadConfig]:
        """``n`` configurations; the first is the log-centre of the box, the rest are seeded
        log-uniform draws, so ``n=1`` gives a sensible default and the list is reproducible."""
        if n < 1:
            raise ValueError(f"need at least one configuration, got {n}")

        def centre(lo: float, hi: float) -> float:
            return math.sqrt(lo * hi)

        out = [HeadConfig(centre(*self.lr), centre(*self.weight_decay))]
        rng = np.random.default_rng([int(seed), 7919])
        for _ in range(n - 1):
            lr = math.exp(rng.uniform(math.log(self.lr[0]), math.log(self.lr[1])))
            wd = math.exp(rng.uniform(math.log(self.weight_decay[0]), math.log(self.weight_decay[1])))
            out.append(HeadConfig(float(f"{lr:.3g}"), float(f"{wd:.3g}")))
        return out


@dataclass(frozen=True)
class ProbeRecipe:
    """Fixed settings of the probe head (not searched)."""

    epochs: int = 300  # full-batch Adam steps
    hidden: int = 0  # 0: linear head; >0: one hidden ReLU layer of this width
    seed: int = 0
    explode_factor: float = 100.0

    def to_dict(self) -> dict:
        return {"mode": "probe", "version": RECIPE_VERSION, **asdict(self)}


@dataclass(frozen=True)
class FinetuneRecipe:
    """Fixed settings of whole-network fine-tuning (not searched)."""

    epochs: int = 10
    batch_size: int = 32
    momentum: float = 0.9
    step_epochs: int = 0  # decay the learning rate every this many epochs; 0: at 1/2 and 3/4
    gamma: float = 0.1
    head_epochs: int = 100  # full-batch Adam steps on frozen features before fine-tuning
    head_lr: float = 0.01
    seed: int = 0
    explode_factor: float = 100.0

    def to_dict(self) -> dict:
        return {"mode": "finetune", "version": RECIPE_VERSION, **asdict(self)}

    def milestones(self) -> list[int]:
        if self.step_epochs > 0:
            return list(range(self.step_epochs, self.epochs, self.step_epochs))
        return sorted({max(1, self.epochs // 2), max(1, (3 * self.epochs) // 4)} - {self.epochs})


@dataclass(frozen=True)
class TrainResult:
    """What training one configuration of one cell gave. Errors are fractions in [0, 1];
    on failure they are None and ``error`` says why."""

    status: str  # "ok" | "failed"
    test_error: float | None
    train_error: float | None
    val_error: float | None
    train_loss: float | None
    val_loss: float | None
    epochs: int
    seconds: float
    n_train: int
    n_val: int
    config: dict = field(default_factory=dict)
    error: str | None = None
    n_test: int = 0  # images behind test_error: how precise it is (0: not measured)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ProbeProblem:
    """One cell's data for the probe head: features (N×D float) and labels (N int64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None


def split_validation(
    labels: torch.Tensor | np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, validation) index arrays: ``fraction`` of each class, rounded down,
    goes to validation, but every class keeps at least one training example. Hyper-parameters
    are chosen on validation, so the reported test error is not selected on the test set."""
    y = np.asarray(labels)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng([int(seed), 104729])
    train, val = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = min(int(len(idx) * fraction), len(idx) - 1)
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def make_problem(
    x_train, y_train, x_test, y_test, n_classes: int, val_fraction: float = 0.2, seed: int = 0
) -> ProbeProblem:
    """A :class:`ProbeProblem` with a stratified validation split carved out of training."""
    x_train, y_train = torch.as_tensor(x_train), torch.as_tensor(y_train).long()
    tr, va = split_validation(y_train, val_fraction, seed)
    tr_t, va_t = torch.from_numpy(tr), torch.from_numpy(va)
    return ProbeProblem(
        x_train=x_train[tr_t],
        y_train=y_train[tr_t],
        x_test=torch.as_tensor(x_test),
        y_test=torch.as_tensor(y_test).long(),
        n_classes=int(n_classes),
        x_val=x_train[va_t] if len(va) else None,
        y_val=y_train[va_t] if len(va) else None,
    )


def select_best(results: Sequence[TrainResult]) -> int | None:
    """Index of the configuration to keep: lowest validation error, then validation loss (or
    training error and loss without a validation split), then the earliest; None if all
    failed."""
    ok = [(i, r) for i, r in enumerate(results) if r.ok]
    if not ok:
        return None

    def key(item):
        i, r = item
        if r.val_error is not None:
            return (r.val_error, r.val_loss, i)
        return (r.train_error, r.train_loss, i)

    return min(ok, key=key)[0]


# -- batched probe heads -------------------------------------------------------------------
def _pad(arrays: Sequence[torch.Tensor], length: int, *trailing: int, dtype=None) -> torch.Tensor:
    out = torch.zeros(len(arrays), length, *trailing, dtype=dtype or arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out


@dataclass
class _Split:
    """A split of every problem, standardised and padded: x (P×N×D), y (P×N), mask (P×N)."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    counts: torch.Tensor  # P, number of real rows

    @classmethod
    def build(cls, xs, ys, means, stds, device) -> _Split:
        n = max(1, max(len(x) for x in xs))
        z = [((x.float() - m) / s) for x, m, s in zip(xs, means, stds, strict=True)]
        x = _pad(z, n, z[0].shape[1]).to(device)
        y = _pad([t.long() for t in ys], n, dtype=torch.long).to(device)
        mask = _pad([torch.ones(len(t)) for t in ys], n).to(device)
        return cls(x, y, mask, torch.tensor([len(t) for t in ys], device=device))


def _init_heads(
    d: int, n_classes: Sequence[int], c_max: int, k: int, recipe: ProbeRecipe, device
) -> list[torch.Tensor]:
    """Initial head parameters (P×K×…). A linear head starts at zero, which makes the fit
    independent of the class order; an MLP head starts from ``nn.Linear``'s default init,
    seeded by the recipe only, so every configuration of a problem starts from the same
    point whether it is trained alone or in a batch."""
    p = len(n_classes)
    if recipe.hidden <= 0:
        return [torch.zeros(p, k, d, c_max, device=device), torch.zeros(p, k, c_max, device=device)]
    h = recipe.hidden
    w1, b1 = torch.zeros(p, d, h), torch.zeros(p, h)
    w2, b2 = torch.zeros(p, h, c_max), torch.zeros(p, c_max)
    for i, c in enumerate(n_classes):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            l1, l2 = nn.Linear(d, h), nn.Linear(h, c)
        w1[i], b1[i] = l1.weight.detach().T, l1.bias.detach()
        w2[i, :, :c], b2[i, :c] = l2.weight.detach().T, l2.bias.detach()
    return [t.unsqueeze(1).repeat(1, k, *[1] * (t.dim() - 1)).to(device) for t in (w1, b1, w2, b2)]


def _logits(params: list[torch.Tensor], x: torch.Tensor, class_mask: torch.Tensor) -> torch.Tensor:
    """P×K×N×C logits of every head on its problem's rows; padded classes get -inf."""
    if len(params) == 2:
        w, b = params
        out = torch.einsum("pnd,pkdc->pknc", x, w) + b[:, :, None, :]
    else:
        w1, b1, w2, b2 = params
        hid = torch.relu(torch.einsum("pnd,pkdh->pknh", x, w1) + b1[:, :, None, :])
        out = torch.einsum("pknh,pkhc->pknc", hid, w2) + b2[:, :, None, :]
    return out.masked_fill(~class_mask[:, None, None, :], float("-inf"))


def _loss_and_error(params, split: _Split, class_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and error rate per head (P×K), over each problem's real rows."""
    logits = _logits(params, split.x, class_mask)
    logp = torch.log_softmax(logits, dim=-1)
    y = split.y[:, None, :, None].expand(-1, logits.shape[1], -1, 1)
    nll = -logp.gather(-1, y).squeeze(-1)  # P×K×N
    m = split.mask[:, None, :]
    denom = split.counts.clamp_min(1)[:, None].float()
    loss = (nll * m).sum(-1) / denom
    wrong = (logits.argmax(-1) != split.y[:, None, :]).float()
    return loss, (wrong * m).sum(-1) / denom


def _batched_adam_step(params, grads, state, lr, wd, active, t: int) -> None:
    """One ``torch.optim.Adam`` step (coupled L2 weight decay), with a learning rate and a
    weight decay per head (K) and frozen heads (P×K ``active`` false) left untouched."""
    b1, b2 = _ADAM_BETAS
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    for p, g, (m, v) in zip(params, grads, state, strict=True):
        shape = (1, -1) + (1,) * (p.dim() - 2)
        g = g + wd.view(shape) * p
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / math.sqrt(bc2)).add_(_ADAM_EPS)
        step = (lr.view(shape) / bc1) * m / denom
        keep = active.view(*active.shape, *(1,) * (p.dim() - 2))
        p.copy_(torch.where(keep, p - step, p))


def fit_heads(
    problems: Sequence[ProbeProblem],
    configs: Sequence[HeadConfig],
    recipe: ProbeRecipe = ProbeRecipe(),
    device: str | torch.device | None = None,
) -> list[list[TrainResult]]:
    """Train one head per (problem, configuration) as a single batched program.

    All problems must have the same feature dimension (they share an expert). Features are
    standardised per problem with its training mean and std. Returns ``results[p][k]``.
    """
    if not problems or not configs:
        raise ValueError("need at least one problem and one configuration")
    dims = {int(p.x_train.shape[1]) for p in problems}
    if len(dims) != 1:
        raise ValueError(f"problems must share a feature dimension, got {sorted(dims)}")
    device = torch.device(device or "cpu")
    start = time.perf_counter()
    n_classes = [p.n_classes for p in problems]
    c_max = max(n_classes)
    class_mask = torch.tensor([[c < n for c in range(c_max)] for n in n_classes], device=device)
    train, val, test = _standardised_splits(problems, dims.pop(), device)
    params = _init_heads(train.x.shape[2], n_classes, c_max, len(configs), recipe, device)
    first_bad, bad_loss = _train_heads(params, train, class_mask, configs, recipe)
    with torch.no_grad():
        tr_loss, tr_err = _loss_and_error(params, train, class_mask)
        va_loss, va_err = _loss_and_error(params, val, class_mask)
        _, te_err = _loss_and_error(params, test, class_mask)
        # A head whose final parameters give a non-finite loss diverged too.
        late = (first_bad < 0) & ~torch.isfinite(tr_loss)
        first_bad = torch.where(late, recipe.epochs, first_bad)
        bad_loss = torch.where(late, tr_loss, bad_loss)
    seconds = (time.perf_counter() - start) / (len(problems) * len(configs))
    final = [t.cpu().numpy() for t in (tr_loss, tr_err, va_loss, va_err, te_err, first_bad, bad_loss)]
    return _head_results(problems, configs, recipe, final, seconds)


def _has_val(problem: ProbeProblem) -> bool:
    return problem.x_val is not None and len(problem.x_val) > 0


def _standardised_splits(problems: Sequence[ProbeProblem], dim: int, device
                         ) -> tuple[_Split, _Split, _Split]:
    """The train, validation and test splits of every problem, standardised with the problem's
    training mean and std; a problem without validation data gets an empty validation split."""
    means = [p.x_train.float().mean(0) for p in problems]
    stds = [p.x_train.float().std(0, unbiased=False).clamp_min(1e-6) for p in problems]
    train = _Split.build([p.x_train for p in problems], [p.y_train for p in problems], means, stds, device)
    has_val = [_has_val(p) for p in problems]
    empty = torch.zeros(0, dim)
    val = _Split.build(
        [p.x_val if v else empty for p, v in zip(problems, has_val, strict=True)],
        [p.y_val if v else torch.zeros(0, dtype=torch.long) for p, v in zip(problems, has_val, strict=True)],
        means, stds, device,
    )
    test = _Split.build([p.x_test for p in problems], [p.y_test for p in problems], means, stds, device)
    return train, val, test


def _train_heads(params: list[torch.Tensor], train: _Split, class_mask: torch.Tensor,
                 configs: Sequence[HeadConfig], recipe: ProbeRecipe
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``recipe.epochs`` full-batch Adam steps of every head in place. A head is frozen from the
    step its loss diverges; returns that step per head (P×K, -1: never) and the loss it had."""
    device = train.x.device
    n_p, n_k = len(train.counts), len(configs)
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    lr = torch.tensor([c.lr for c in configs], dtype=torch.float32, device=device)
    wd = torch.tensor([c.weight_decay for c in configs], dtype=torch.float32, device=device)
    first_bad = torch.full((n_p, n_k), -1, dtype=torch.long, device=device)
    bad_loss = torch.full((n_p, n_k), float("nan"), device=device)
    init_loss = None
    for epoch in range(1, recipe.epochs + 1):
        for p in params:
            p.requires_grad_(True)
        loss, _ = _loss_and_error(params, train, class_mask)
        with torch.no_grad():
            if init_loss is None:
                init_loss = loss.detach().clone()
            bad = ~torch.isfinite(loss) | (loss > recipe.explode_factor * init_loss.clamp_min(1e-3))
            newly = bad & (first_bad < 0)
            first_bad = torch.where(newly, epoch, first_bad)
            bad_loss = torch.where(newly, loss.detach(), bad_loss)
            active = first_bad < 0
        grads = torch.autograd.grad(torch.where(active, loss, 0.0).sum(), params)
        with torch.no_grad():
            for p in params:
                p.requires_grad_(False)
            _batched_adam_step(params, grads, state, lr, wd, active, epoch)
    return first_bad, bad_loss


def _head_results(problems: Sequence[ProbeProblem], configs: Sequence[HeadConfig],
                  recipe: ProbeRecipe, final: list[np.ndarray], seconds: float
                  ) -> list[list[TrainResult]]:
    """``results[p][k]`` from the final P×K metrics (train loss and error, validation loss and
    error, test error, divergence step and loss): failed with the reason where a head diverged."""
    tr_loss, tr_err, va_loss, va_err, te_err, first_bad, bad_loss = final
    results: list[list[TrainResult]] = []
    for i, prob in enumerate(problems):
        row = []
        n_val = len(prob.y_val) if _has_val(prob) else 0
        for k, cfg in enumerate(configs):
            common = dict(seconds=seconds, n_train=len(prob.y_train), n_val=n_val,
                          n_test=len(prob.y_test), config={**cfg.to_dict(), **recipe.to_dict()})
            if first_bad[i, k] >= 0:
                reason = (f"diverged: loss {bad_loss[i, k]:.4g} at step {first_bad[i, k]} "
                          f"(lr={cfg.lr:g}, weight_decay={cfg.weight_decay:g})")
                row.append(TrainResult("failed", None, None, None, None, None,
                                       epochs=int(first_bad[i, k]), error=reason, **common))
                continue
            row.append(TrainResult(
                "ok",
                test_error=float(te_err[i, k]),
                train_error=float(tr_err[i, k]),
                val_error=float(va_err[i, k]) if n_val else None,
                train_loss=float(tr_loss[i, k]),
                val_loss=float(va_loss[i, k]) if n_val else None,
                epochs=recipe.epochs,
                **common,
            ))
        results.append(row)
    return results


def fit_head(
    problem: ProbeProblem,
    config: HeadConfig,
    recipe: ProbeRecipe = ProbeRecipe(),
    device: str | torch.device | None = None,
) -> TrainResult:
    """One head for one cell (the unbatched reference of :func:`fit_heads`)."""
    return fit_heads([problem], [config], recipe, device)[0][0]


# -- whole-network fine-tuning -------------------------------------------------------------
@dataclass(frozen=True)
class ImageProblem:
    """One cell's images (N×3×S×S) and labels for fine-tuning the whole network."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    @classmethod
    def with_validation(
        cls, x_train, y_train, x_test, y_test, n_classes: int, val_fraction: float = 0.2,
        seed: int = 0,
    ) -> ImageProblem:
        tr, va = split_validation(y_train, val_fraction, seed)
        tr_t, va_t = torch.from_numpy(tr), torch.from_numpy(va)
        return cls(x_train[tr_t], y_train[tr_t].long(), x_test, y_test.long(), int(n_classes),
                   x_train[va_t] if len(va) else None, y_train[va_t].long() if len(va) else None)


@dataclass
class FitOutcome:
    """A fine-tuned network (backbone followed by its head) and how training went."""

    model: nn.Sequential | None
    result: TrainResult
    history: list[dict] = field(default_factory=list)


class _Diverged(Exception):
    pass


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device, batch_size: int = 256):
    model.eval()
    loss, wrong = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device))
        t = y[i : i + batch_size].to(device)
        loss += float(F.cross_entropy(logits, t, reduction="sum"))
        wrong += int((logits.argmax(1) != t).sum())
    n = max(1, len(x))
    return loss / n, wrong / n


def _warm_head(features: torch.Tensor, y: torch.Tensor, n_classes: int, recipe: FinetuneRecipe,
               weight_decay: float) -> nn.Linear:
    head = nn.Linear(features.shape[1], n_classes).to(features.device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.Adam(head.parameters(), lr=recipe.head_lr, weight_decay=weight_decay)
    for _ in range(recipe.head_epochs):
        opt.zero_grad()
        loss = F.cross_entropy(head(features), y)
        if not torch.isfinite(loss):
            raise _Diverged(f"diverged: head warm-up loss {float(loss):.4g}")
        loss.backward()
        opt.step()
    return head


def _warm_started(net: nn.Module, problem: ImageProblem, recipe: FinetuneRecipe,
                  weight_decay: float, device) -> nn.Sequential:
    """``net`` followed by a linear head already fitted on its frozen features, so fine-tuning
    starts from a sensible classifier instead of pulling the features towards a random one."""
    x, y = problem.x_train, problem.y_train.long()
    net.eval()
    with torch.no_grad():
        feats = torch.cat([net(x[i : i + 256].to(device)).flatten(1) for i in range(0, len(x), 256)])
    with torch.enable_grad():
        head = _warm_head(feats, y.to(device), problem.n_classes, recipe, weight_decay)
    return nn.Sequential(net, nn.Flatten(1), head)


def _sgd_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               gen: torch.Generator, recipe: FinetuneRecipe, device, epoch: int,
               init_loss: float | None) -> tuple[float, float]:
    """One shuffled pass over the training split; returns the mean training loss and the first
    batch's loss of the whole run (the yardstick for divergence). Raises :class:`_Diverged`
    when a batch loss is non-finite or ``explode_factor`` times that first loss."""
    model.train()
    order = torch.randperm(len(x), generator=gen)
    total, seen = 0.0, 0
    for i in range(0, len(x), recipe.batch_size):
        idx = order[i : i + recipe.batch_size]
        if len(idx) < 2 and seen:  # BatchNorm cannot train on a batch of one
            continue
        xb, yb = x[idx].to(device), y[idx].to(device)
        loss = F.cross_entropy(model(xb), yb)
        value = float(loss.detach())
        init_loss = value if init_loss is None else init_loss
        if not math.isfinite(value) or value > recipe.explode_factor * max(init_loss, 1e-3):
            raise _Diverged(f"diverged: loss {value:.4g} at epoch {epoch}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += value * len(idx)
        seen += len(idx)
    return total / max(1, seen), init_loss


def fit_network(
    backbone: nn.Module,
    problem: ImageProblem,
    config: HeadConfig,
    recipe: FinetuneRecipe = FinetuneRecipe(),
    device: str | torch.device | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitOutcome:
    """Fine-tune a copy of ``backbone`` plus a new linear head on ``problem``'s training split.

    Deterministic given ``recipe.seed`` on a given device and thread count (the batch order
    and the head come from it; on GPU pass ``torch.use_deterministic_algorithms(True)`` for
    bit-identical reruns). ``on_epoch`` receives each epoch's metrics (for progress and
    early-stopping schedulers). The outcome's result has no test error; see
    :func:`finetune_cell`.
    """
    device = torch.device(device or "cpu")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(recipe.seed)
    net = copy.deepcopy(backbone).to(device)
    for p in net.parameters():
        p.requires_grad_(True)
    x, y = problem.x_train, problem.y_train.long()
    has_val = problem.x_val is not None and len(problem.x_val) > 0
    n_val = len(problem.x_val) if has_val else 0
    cfg = {**config.to_dict(), **recipe.to_dict()}
    history: list[dict] = []

    def failed(reason: str, epoch: int) -> FitOutcome:
        res = TrainResult("failed", None, None, None, None, None, epochs=epoch,
                          seconds=time.perf_counter() - start, n_train=len(y), n_val=n_val,
                          config=cfg, error=f"{reason} (lr={config.lr:g}, "
                          f"weight_decay={config.weight_decay:g})")
        return FitOutcome(None, res, history)

    try:
        model = _warm_started(net, problem, recipe, config.weight_decay, device)
    except _Diverged as exc:
        return failed(str(exc), 0)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=recipe.momentum,
                          weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, recipe.milestones(), gamma=recipe.gamma)
    init_loss = None
    for epoch in range(1, recipe.epochs + 1):
        try:
            train_loss, init_loss = _sgd_epoch(model, opt, x, y, gen, recipe, device, epoch, init_loss)
        except _Diverged as exc:
            return failed(str(exc), epoch)
        sched.step()
        metrics = {"epoch": epoch, "train_loss": train_loss}
        if has_val:
            metrics["val_loss"], metrics["val_error"] = _evaluate(model, problem.x_val, problem.y_val, device)
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
    tr_loss, tr_err = _evaluate(model, x, y, device)
    if not math.isfinite(tr_loss):
        return failed(f"diverged: final training loss {tr_loss:.4g}", recipe.epochs)
    va_loss, va_err = (_evaluate(model, problem.x_val, problem.y_val, device) if has_val
                       else (None, None))
    res = TrainResult("ok", None, tr_err, va_err, tr_loss, va_loss, epochs=recipe.epochs,
                      seconds=time.perf_counter() - start, n_train=len(y), n_val=n_val, config=cfg)
    model.eval()
    return FitOutcome(model, res, history)


def finetune_cell(
    backbone: nn.Module,
    problem: ImageProblem,
    config: HeadConfig,
    recipe: FinetuneRecipe = FinetuneRecipe(),
    device: str | torch.device | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> TrainResult:
    """:func:`fit_network`, then the test error of the fine-tuned network."""
    out = fit_network(backbone, problem, config, recipe, device, on_epoch)
    if out.model is None:
        return out.result
    _, test_err = _evaluate(out.model, problem.x_test, problem.y_test, torch.device(device or "cpu"))
    return replace(out.result, test_error=test_err, n_test=len(problem.y_test))
