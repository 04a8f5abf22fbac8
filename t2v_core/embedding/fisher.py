"""TASK2VEC: the diagonal Fisher information of a probe, one value per filter.

The embedding of a task is, for every conv filter o of the probe (and optionally every BN
channel), the mean over the filter's weights of the diagonal Fisher

    F = E_x E_{y~p(y|x)} [∇_w log p(y|x) ∇_w log p(y|x)ᵀ].

Because only the per-filter *sum* of the diagonal is needed, the engine never materialises
per-sample gradients: hooks capture each conv layer's input a_n and output gradient δ_n of one
ordinary backward pass, and ‖g_n[o]‖² follows from them in closed form (see DESIGN.md,
"Fast per-filter Fisher"). Per-sample gradients are squared; the square of the batch-mean
gradient (a different quantity, F/B) is never used.

Estimators (``method``):
  * ``expected``   – exact sum over classes, weighted by p(y|x); C backward passes per batch.
  * ``montecarlo`` – y sampled from p(y|x); one backward pass per sample drawn.
  * ``empirical``  – the true labels; differs from the Fisher where the model is uncertain.
  * ``variational`` – the robust Fisher: the largest per-filter weight noise that keeps the
    loss low, embedding = 1/σ² ≈ λ + (N/β) F̄ (local reparameterisation). Slower; opt-in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from t2v_core.embedding.probes import Probe, extract_features

log = logging.getLogger(__name__)

METHODS = ("expected", "montecarlo", "empirical", "variational")
FLOOR = 1e-10  # value given to filters whose gradient is exactly zero (e.g. dead ReLUs)
# λ of the variational Fisher's prior N(0, λ⁻¹I): the embedding of the trivial task, t0
PRIOR_PRECISION = 1.0


class FisherError(ValueError):
    """The Fisher of a task could not be computed (bad labels, non-finite values)."""


@dataclass(frozen=True)
class Embedding:
    """A task embedding and what is needed to compare it with others."""

    vector: np.ndarray
    filter_names: tuple[str, ...]
    method: str
    probe_id: str
    n_samples: int
    task_id: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.vector.shape[0])


# --------------------------------------------------------------------------- task head


def fit_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    *,
    seed: int = 0,
    epochs: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
) -> nn.Linear:
    """Fit a class-balanced linear softmax head on frozen features (full batch, Adam).

    Starting from zero weights makes the fit equivariant to relabelling the classes, so the
    embedding does not depend on which class got which index. Features are standardised
    inside the head (folded into its weights) so one learning rate suits every probe.
    """
    torch.manual_seed(seed)
    x = features.detach().float()
    y = labels.long()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    counts = torch.bincount(y, minlength=n_classes).float()
    class_weight = torch.where(counts > 0, len(y) / (n_classes * counts.clamp_min(1)), 0.0)
    w = torch.zeros(n_classes, x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(n_classes, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, y, weight=class_weight)
        loss = loss + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        opt.step()
    head = nn.Linear(x.shape[1], n_classes).to(x.device)
    with torch.no_grad():
        head.weight.copy_(w / std)
        head.bias.copy_(b - (w / std) @ mean)
    head.requires_grad_(False)
    return head


# --------------------------------------------------------------------------- hook engine


def _conv_sq_norms(module: nn.Conv2d, a: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-filter ‖∂ℓ_n/∂W[o]‖² (+ bias) from layer input a and output grad δ."""
    if module.padding_mode != "zeros":
        raise NotImplementedError(f"padding_mode={module.padding_mode!r} is not supported")
    n, g = a.shape[0], module.groups
    c_out = module.out_channels
    cols = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
    p = cols.shape[-1]
    cols = cols.reshape(n, g, -1, p)  # N × g × (C_in/g·k²) × P
    grads = delta.reshape(n, g, c_out // g, p)  # N × g × (C_out/g) × P
    if c_out // g <= p:
        # direct: per-sample weight gradient G Aᵀ, cost C_out·C_in·k²·P
        gw = torch.einsum("ngop,ngip->ngoi", grads, cols)
        sq = gw.pow(2).sum(-1)
    else:
        # "ghost norm": Σ_pq G_p G_q (AᵀA)_pq, cost P²·C_in·k², cheaper when P < C_out
        gram = torch.einsum("ngip,ngiq->ngpq", cols, cols)
        sq = (torch.einsum("ngop,ngpq->ngoq", grads, gram) * grads).sum(-1)
    sq = sq.reshape(n, c_out)
    if module.bias is not None:
        sq = sq + grads.sum(-1).reshape(n, c_out).pow(2)
    return sq


def _conv_filter_size(module: nn.Conv2d) -> int:
    k = int(np.prod(module.kernel_size))
    return module.in_channels // module.groups * k + (module.bias is not None)


def _bn_sq_norms(module: nn.BatchNorm2d, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel (g_γ² + g_β²)/2 of an eval-mode BatchNorm."""
    shape = (1, -1, 1, 1)
    xhat = (x - module.running_mean.view(shape)) / torch.sqrt(
        module.running_var.view(shape) + module.eps
    )
    g_gamma = (delta * xhat).sum((2, 3))
    g_beta = delta.sum((2, 3))
    return 0.5 * (g_gamma.pow(2) + g_beta.pow(2))


def fisher_filters(backbone: nn.Module, include_bn: bool = False) -> list[tuple[str, nn.Module]]:
    """The layers whose filters make up the embedding, in a stable (module) order."""
    layers = []
    for name, m in backbone.named_modules():
        if isinstance(m, nn.Conv2d):
            layers.append((name, m))
        elif include_bn and isinstance(m, nn.BatchNorm2d) and m.affine:
            layers.append((name, m))
    if not layers:
        raise FisherError("the probe has no Conv2d layers to embed")
    return layers


def filter_names(backbone: nn.Module, include_bn: bool = False) -> tuple[str, ...]:
    names = []
    for name, m in fisher_filters(backbone, include_bn):
        kind = "bn" if isinstance(m, nn.BatchNorm2d) else "conv"
        names.extend(f"{name}:{kind}:{i}" for i in range(_n_filters(m)))
    return tuple(names)


class _Capture:
    """Forward hooks saving layer inputs and tensor hooks accumulating weighted per-filter sums."""

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self.layers = layers
        self.inputs: dict[int, torch.Tensor] = {}
        self.sums: list[torch.Tensor | float] = [0.0] * len(layers)  # on the model's device
        self.sample_weight: torch.Tensor | None = None
        self.handles = [m.register_forward_hook(self._forward_hook(i)) for i, (_, m) in enumerate(layers)]

    def _forward_hook(self, index: int):
        def hook(module, inputs, output):
            if not output.requires_grad:
                return
            self.inputs[index] = inputs[0].detach()
            output.register_hook(self._backward_hook(index, module))

        return hook

    def _backward_hook(self, index: int, module: nn.Module):
        def hook(delta: torch.Tensor) -> None:
            a = self.inputs[index]
            if isinstance(module, nn.Conv2d):
                sq = _conv_sq_norms(module, a, delta)
            else:
                sq = _bn_sq_norms(module, a, delta)
            w = self.sample_weight
            self.sums[index] = self.sums[index] + (sq if w is None else sq * w[:, None]).sum(0).double()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def per_filter(self, n_samples: int) -> np.ndarray:
        return _per_filter_mean(self.layers, self.sums, n_samples)


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Run the body with ``modules`` in eval mode (BatchNorm on running statistics, so samples
    do not interact) and give each back the train/eval mode it had, whatever happens."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


def _n_filters(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.num_features


def _per_filter_mean(layers: list[tuple[str, nn.Module]], sums: list, n_samples: int) -> np.ndarray:
    """Mean over samples and over each filter's weights of the summed squared gradients."""
    out = []
    for (_, m), s in zip(layers, sums, strict=True):
        size = _conv_filter_size(m) if isinstance(m, nn.Conv2d) else 1
        if not isinstance(s, torch.Tensor):  # the layer never saw a gradient
            s = torch.zeros(_n_filters(m))
        out.append((s / (n_samples * size)).cpu().numpy())
    return np.concatenate(out)


def _label_passes(method: str, probs: torch.Tensor, labels: torch.Tensor, mc_samples: int,
                  generator: torch.Generator):
    """Yield (one-hot targets, per-sample weights) for each backward pass of an estimator."""
    n, c = probs.shape
    if method == "expected":
        for k in range(c):
            yield torch.full((n,), k, dtype=torch.long, device=probs.device), probs[:, k]
    elif method == "montecarlo":
        for _ in range(mc_samples):
            # sampled on the CPU generator so that a seed gives the same labels on any device
            y = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1)
            yield y.to(probs.device), torch.full((n,), 1.0 / mc_samples, device=probs.device)
    elif method == "empirical":
        yield labels, None
    else:
        raise ValueError(f"unknown Fisher method {method!r}; choose from {METHODS}")


def per_filter_fisher(
    backbone: nn.Module,
    head: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    method: str = "montecarlo",
    include_bn: bool = False,
    batch_size: int = 64,
    mc_samples: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Per-filter diagonal Fisher at the cost of one backward pass per label drawn.

    BatchNorm runs in eval mode so that samples do not interact and the per-sample gradients
    are exactly those of each sample's own log-likelihood.
    """
    if method == "empirical" and labels is None:
        raise ValueError("the empirical Fisher needs the true labels")
    layers = fisher_filters(backbone, include_bn)
    generator = torch.Generator().manual_seed(seed)
    n = len(images)
    with eval_mode(backbone, head):
        capture = _Capture(layers)
        try:
            for start in tqdm(range(0, n, batch_size), disable=not progress, desc=f"fisher[{method}]",
                              unit="batch"):
                x = images[start : start + batch_size].detach().clone().requires_grad_(True)
                y = None if labels is None else labels[start : start + batch_size]
                logits = head(backbone(x))
                # float64: for a confident prediction 1 − p_y is tiny and float32 would cancel it away
                probs = torch.softmax(logits.detach().double(), dim=1)
                passes = list(_label_passes(method, probs, y, mc_samples, generator))
                for i, (targets, weight) in enumerate(passes):
                    # ∂ log p(y|x) / ∂ logits = e_y − p; seeding backward with it gives per-sample grads
                    seed_grad = (F.one_hot(targets, probs.shape[1]).double() - probs).to(logits.dtype)
                    capture.sample_weight = None if weight is None else weight.to(logits.dtype)
                    logits.backward(seed_grad, retain_graph=i < len(passes) - 1)
                capture.inputs.clear()
        finally:
            capture.remove()
    return capture.per_filter(n)


def per_filter_fisher_naive(
    backbone: nn.Module,
    head: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    method: str = "expected",
    include_bn: bool = False,
    mc_samples: int = 1,
    seed: int = 0,
) -> np.ndarray:
    """Reference implementation: one sample, one label, one backward pass at a time.

    Slow by design; it computes parameter gradients with autograd and squares them, so it
    shares no code path with :func:`per_filter_fisher` and serves as its oracle.
    """
    layers = fisher_filters(backbone, include_bn)
    params = []
    for _, m in layers:
        params.extend([m.weight] + ([m.bias] if m.bias is not None else []))
    flags = [p.requires_grad for p in params]
    generator = torch.Generator().manual_seed(seed)
    sums = [torch.zeros(_n_filters(m), dtype=torch.float64) for _, m in layers]
    with eval_mode(backbone, head):
        try:
            for p in params:
                p.requires_grad_(True)
            for i in range(len(images)):
                x = images[i : i + 1]
                y = None if labels is None else labels[i : i + 1]
                logits = head(backbone(x)).double()
                probs = torch.softmax(logits.detach(), dim=1)
                for targets, weight in _label_passes(method, probs, y, mc_samples, generator):
                    logp = torch.log_softmax(logits, dim=1)[0, targets[0]]
                    grads = torch.autograd.grad(logp, params, retain_graph=True)
                    w = 1.0 if weight is None else float(weight[0])
                    k = 0
                    for j, (_, m) in enumerate(layers):
                        per = grads[k].pow(2).flatten(1).sum(1) if isinstance(m, nn.Conv2d) \
                            else 0.5 * grads[k].pow(2)
                        k += 1
                        if m.bias is not None:
                            per = per + (grads[k].pow(2) if isinstance(m, nn.Conv2d) else 0.5 * grads[k].pow(2))
                            k += 1
                        sums[j] += w * per.double()
        finally:
            for p, f in zip(params, flags, strict=True):
                p.requires_grad_(f)
    return _per_filter_mean(layers, sums, len(images))


# --------------------------------------------------------------------------- variational


def variational_fisher(
    backbone: nn.Module,
    head: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 0.3,
    beta: float = 1e-2,
    prior_precision: float = PRIOR_PRECISION,
    seed: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Robust Fisher: per-filter precision 1/σ² of the widest weight noise the task tolerates.

    Minimises, over one log-variance per conv filter,

        E_{w~N(ŵ,Σ)}[CE] + (β/N) · KL(N(ŵ,Σ) ‖ N(ŵ, λ⁻¹I)),

    CE the mean cross-entropy over the task's N images (``images``) and λ ``prior_precision``:
    β times the variational free energy of the whole task, divided by N. The expectation is
    estimated by local reparameterisation (the noisy conv output is Gaussian with variance
    conv(a², σ²), so one sample per activation suffices). Where the loss is locally quadratic,
    E[CE] ≈ CE(ŵ) + ½ Σ_o s_o σ_o² F̄_o (s_o weights of filter o, F̄_o their mean Fisher per
    image), and the optimum is

        1/σ_o² = λ + (N/β) · F̄_o,

    the precision of a Gaussian posterior after N images (with a temperature β): the prior's
    pull weakens as the task grows, and a task that tolerates any noise gets λ, the trivial
    embedding t0. Away from a quadratic loss it ranks filters like the Fisher but is smoothed.
    """
    layers = [(name, m) for name, m in fisher_filters(backbone) if isinstance(m, nn.Conv2d)]
    torch.manual_seed(seed)
    init = float(np.log(1e-3 / prior_precision))
    device = next(backbone.parameters()).device
    log_var = [torch.full((m.out_channels,), init, device=device, requires_grad=True)
               for _, m in layers]
    sizes = torch.tensor([_conv_filter_size(m) for _, m in layers], dtype=torch.float32)

    def noisy(index: int, module: nn.Conv2d):
        def hook(mod, inputs, output):
            var_w = log_var[index].exp().view(-1, 1, 1, 1).expand_as(module.weight)
            var_out = F.conv2d(inputs[0].pow(2), var_w, None, module.stride, module.padding,
                               module.dilation, module.groups)
            return output + var_out.clamp_min(1e-16).sqrt() * torch.randn_like(output)

        return hook

    handles = [m.register_forward_hook(noisy(i, m)) for i, (_, m) in enumerate(layers)]
    opt = torch.optim.Adam(log_var, lr=lr)
    # decaying the step size averages out the noise of the one-sample objective
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / steps)
    gen = torch.Generator().manual_seed(seed)
    with eval_mode(backbone, head):
        try:
            for _ in tqdm(range(steps), disable=not progress, desc="fisher[variational]"):
                idx = torch.randint(0, len(images), (min(batch_size, len(images)),), generator=gen)
                idx = idx.to(images.device)
                opt.zero_grad()
                nll = F.cross_entropy(head(backbone(images[idx])), labels[idx])
                kl = sum(
                    0.5 * size * (lv.exp() * prior_precision - 1.0 - lv - np.log(prior_precision)).sum()
                    for lv, size in zip(log_var, sizes, strict=True)
                )
                (nll + beta * kl / len(images)).backward()
                opt.step()
                sched.step()
        finally:
            for h in handles:
                h.remove()
    return torch.cat([(-lv.detach()).exp() for lv in log_var]).double().cpu().numpy()


# --------------------------------------------------------------------------- label-free


def domain_embedding(features: torch.Tensor, full: bool = False) -> np.ndarray:
    """1/N Σ φφᵀ of the probe's features: what the task's inputs look like, ignoring labels.

    The diagonal by default; ``full=True`` returns the D×D matrix (only sensible for small φ).
    """
    phi = features.detach().double().flatten(1)
    if full:
        return (phi.T @ phi / len(phi)).cpu().numpy()
    return phi.pow(2).mean(0).cpu().numpy()


# --------------------------------------------------------------------------- public call


def _check_finite(vector: np.ndarray, task: str) -> np.ndarray:
    bad = ~np.isfinite(vector)
    if bad.any():
        raise FisherError(f"task {task}: Fisher has {int(bad.sum())} non-finite values "
                          f"(first at filter index {int(np.argmax(bad))}); check the data and weights")
    return np.maximum(vector, FLOOR).astype(np.float32)


def task2vec(
    probe: Probe,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    n_classes: int | None = None,
    method: str = "montecarlo",
    include_bn: bool = False,
    max_samples: int | None = None,
    batch_size: int = 64,
    mc_samples: int = 1,
    seed: int = 0,
    task_id: str | None = None,
    features: torch.Tensor | None = None,
    progress: bool = False,
    **variational_options,
) -> Embedding:
    """Embed one task: fit its head on the probe's features, then take the per-filter Fisher.

    ``images`` is an N×… float tensor already transformed for the probe (N×3×H×W for image
    probes), ``labels`` N class indices. ``features`` may pass the probe's cached features of the same images.
    """
    name = task_id or "<unnamed>"
    if method not in METHODS:
        raise ValueError(f"unknown Fisher method {method!r}; choose from {METHODS}")
    labels = torch.as_tensor(labels).long()
    if len(images) != len(labels):
        raise FisherError(f"task {name}: expected N inputs and N labels, got "
                          f"{tuple(images.shape)} and {tuple(labels.shape)}")
    if len(labels) == 0:
        raise FisherError(f"task {name}: no samples")
    present = torch.unique(labels)
    if len(present) < 2:
        raise FisherError(f"task {name}: needs at least two classes, found {len(present)}")
    n_classes = n_classes or int(labels.max()) + 1
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise FisherError(f"task {name}: labels must lie in [0, {n_classes})")
    if max_samples is not None and len(labels) > max_samples:
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:max_samples]
        keep = keep.sort().values.to(labels.device)
        images, labels = images[keep], labels[keep]
        features = None if features is None else features[keep]
    if features is None:
        features = extract_features(probe.backbone, images, batch_size=max(batch_size, 128))
    if not torch.isfinite(features).all():
        raise FisherError(f"task {name}: the probe's features are not finite; "
                          "check the images (NaN/inf pixels) and the probe weights")
    head = fit_head(features, labels, n_classes, seed=seed)
    log.info("task %s: %d samples, %d classes, method=%s", name, len(labels), n_classes, method)
    if method == "variational":
        if include_bn:
            raise ValueError("the variational estimator covers conv filters only")
        vector = variational_fisher(probe.backbone, head, images, labels, seed=seed,
                                    progress=progress, batch_size=batch_size, **variational_options)
    else:
        vector = per_filter_fisher(probe.backbone, head, images, labels, method=method,
                                   include_bn=include_bn, batch_size=batch_size,
                                   mc_samples=mc_samples, seed=seed, progress=progress)
    vector = _check_finite(vector, name)
    return Embedding(
        vector=vector,
        filter_names=filter_names(probe.backbone, include_bn),
        method=method,
        probe_id=probe.probe_id,
        n_samples=len(labels),
        task_id=task_id,
        meta={"n_classes": n_classes, "include_bn": include_bn, "seed": seed},
    )
