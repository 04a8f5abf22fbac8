"""Experts: copies of a probe fine-tuned on one task each.

MODEL2VEC needs a library of feature extractors that are good on different parts of the zoo.
An expert is made by training a copy of the (pretrained) probe, with a fresh linear head, on
its source task, then dropping the head: what is kept is the feature extractor, saved as a
plain state dict that :func:`t2v_core.probes.build_probe` loads like any other weights.

Training is deterministic given the recipe's seed (on the same machine and thread count):
initialisation, batch order and augmentation all draw from seeded generators. That is what
lets a job skip an expert whose inputs have not changed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from t2v_core.fisher import fit_head
from t2v_core.probes import Probe, extract_features, weights_digest

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class Recipe:
    """How an expert is trained. ``train_last`` trains only the last k blocks (see
    :func:`blocks`); None trains the whole network."""

    epochs: int = 6
    batch_size: int = 32
    lr: float = 5e-4  # 1e-3 diverged on some glyph tasks (Adam, whole network, batch 32)
    optimizer: str = "adam"
    weight_decay: float = 1e-4
    train_last: int | None = None
    image_size: int = 32
    max_per_class: int | None = None
    shift: int = 2  # random translation in pixels, a label-preserving augmentation
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("epochs and batch_size must be ≥ 1 and lr > 0")
        if self.train_last is not None and self.train_last < 1:
            raise ValueError("train_last must be ≥ 1 (or None for the whole network)")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class FinetuneResult:
    backbone: nn.Module
    train_error: float
    losses: list[float]
    seconds: float


def blocks(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The network's units that own parameters, in definition (= forward) order.

    Containers (``Sequential``, ``ModuleList``) are opened up, so a ResNet gives its stem
    conv, BN and each residual block, and an EfficientNet its stem and each MBConv block.
    """
    out: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, nn.Sequential | nn.ModuleList):
                visit(f"{full}.", child)
            elif any(True for _ in child.parameters()):
                out.append((full, child))

    visit("", backbone)
    return out


def expert_content_hash(arch: str, base_digest: str, task_hash: str | None, recipe: Recipe | None
                        ) -> str:
    """What an expert is made from: architecture, base weights, source task data and recipe.
    The same inputs give the same hash and, training being deterministic, the same weights."""
    payload = json.dumps(
        {"arch": arch, "base": base_digest, "task": task_hash,
         "recipe": None if recipe is None else asdict(recipe)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _shift(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    if pixels <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * pixels + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w]
                        for i, (dy, dx) in enumerate(offsets.tolist())])


def finetune(
    probe: Probe,
    images: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    recipe: Recipe = Recipe(),
    *,
    progress: bool = False,
    name: str = "expert",
) -> FinetuneResult:
    """Train a copy of ``probe``'s backbone with a new linear head on (images, labels).

    The probe itself is not modified. BatchNorm layers keep the probe's running statistics
    (eval mode) while their affine parameters train: with a few hundred images and small
    batches, re-estimated statistics would be noisy, and pretrained BN momenta are too slow
    to follow them, so train- and eval-mode features would disagree. Returns the trained backbone in eval
    mode with gradients off, ready for :func:`t2v_core.probes.save_weights`.
    """
    started = time.perf_counter()
    labels = torch.as_tensor(labels).long()
    if len(images) != len(labels) or len(labels) == 0:
        raise ValueError(f"{name}: need as many labels as images, got {len(images)} and {len(labels)}")
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    backbone = copy.deepcopy(probe.backbone)
    units = blocks(backbone)
    trained = units if recipe.train_last is None else units[-recipe.train_last :]
    trained_ids = {id(m) for _, m in trained}
    for p in backbone.parameters():
        p.requires_grad_(False)
    for _, m in trained:
        for p in m.parameters():
            p.requires_grad_(True)
    head = nn.Linear(probe.feature_dim, n_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    if recipe.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * -(-len(labels) // recipe.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    def set_modes() -> None:
        backbone.eval()
        for _, m in units:
            if id(m) in trained_ids:
                m.train()
                for sub in m.modules():
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        sub.eval()

    losses: list[float] = []
    bar = tqdm(range(recipe.epochs), disable=not progress, desc=f"finetune {name}", unit="epoch")
    for _ in bar:
        set_modes()
        order = torch.randperm(len(labels), generator=gen)
        total = 0.0
        for start in range(0, len(order), recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            x = _shift(images[idx], recipe.shift, gen)
            loss = F.cross_entropy(head(backbone(x)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(labels))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        feats = extract_features(backbone, images)
        train_error = float((head(feats).argmax(1) != labels).float().mean())
    seconds = time.perf_counter() - started
    log.info("%s: %d images, %d epochs, final loss %.3f, train error %.3f, %.1fs", name,
             len(labels), recipe.epochs, losses[-1] if losses else float("nan"), train_error,
             seconds)
    return FinetuneResult(backbone, train_error, losses, seconds)


def linear_probe_error(
    backbone: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    n_classes: int,
    *,
    seed: int = 0,
) -> float:
    """Test error of a linear head fitted on the frozen features: how good an expert's
    features are for a task, without training the expert any further."""
    f_train = extract_features(backbone, train[0])
    f_test = extract_features(backbone, test[0])
    head = fit_head(f_train, train[1], n_classes, seed=seed)
    with torch.no_grad():
        return float((head(f_test).argmax(1) != test[1]).float().mean())


def state_digest(backbone: nn.Module) -> str:
    """Digest of the backbone's weights as they will be saved."""
    return weights_digest(backbone.state_dict())
