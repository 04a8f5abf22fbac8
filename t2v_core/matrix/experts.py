"""Experts: copies of a probe fine-tuned on one task each.

MODEL2VEC needs a library of feature extractors that are good on different parts of the zoo.
An expert is made by training a copy of the (pretrained) probe, with a fresh linear head, on
its source task. The feature extractor is saved as a plain state dict that
:func:`t2v_core.embedding.probes.build_probe` loads like any other weights; the head (the expert's
*source head*) is saved beside it (:func:`head_uri`), because LEEP and NCE score an expert
by what its source classifier predicts on a new task.

Training is deterministic given the recipe's seed (on the same machine and thread count):
initialisation, batch order and augmentation all draw from seeded generators. That is what
lets a job skip an expert whose inputs have not changed.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from t2v_core.embedding.fisher import fit_head
from t2v_core.embedding.probes import (
    _HEAD_PREFIXES,
    Probe,
    WeightsError,
    extract_features,
    load_state_dict,
    weights_digest,
)
from t2v_core.storage import read_uri_bytes

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
    head: nn.Linear  # the source head: logits = head(backbone(x))
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


def _trainable_copy(probe: Probe, recipe: Recipe) -> tuple[nn.Module, list[nn.Module]]:
    """A copy of the probe's backbone with gradients on only in the blocks the recipe trains
    (all of them, or the last ``train_last``); returns the copy and those blocks."""
    backbone = copy.deepcopy(probe.backbone)
    units = blocks(backbone)
    trained = units if recipe.train_last is None else units[-recipe.train_last :]
    for p in backbone.parameters():
        p.requires_grad_(False)
    for _, m in trained:
        for p in m.parameters():
            p.requires_grad_(True)
    return backbone, [m for _, m in trained]


def _optimizer(params: list[torch.Tensor], recipe: Recipe, n_images: int
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The recipe's optimizer, with a cosine learning rate decaying to 0 over all its steps."""
    if recipe.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=recipe.lr, momentum=0.9, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * -(-n_images // recipe.batch_size)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)


def _set_train_modes(backbone: nn.Module, trained: list[nn.Module]) -> None:
    """Train mode only in the trained blocks, and there BatchNorm keeps the probe's running
    statistics (eval mode) while its affine parameters train."""
    backbone.eval()
    for m in trained:
        m.train()
        for sub in m.modules():
            if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                sub.eval()


def _train_epoch(backbone: nn.Module, head: nn.Linear, images: torch.Tensor,
                 labels: torch.Tensor, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, recipe: Recipe,
                 gen: torch.Generator) -> float:
    """One shuffled pass over the shifted images, a step per batch; returns the mean loss."""
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
    return total / len(labels)


def _freeze_and_score(backbone: nn.Module, head: nn.Linear, images: torch.Tensor,
                      labels: torch.Tensor) -> float:
    """Put the trained expert in eval mode with gradients off; returns its training error."""
    backbone.eval()
    head.eval()
    for p in [*backbone.parameters(), *head.parameters()]:
        p.requires_grad_(False)
    with torch.no_grad():
        feats = extract_features(backbone, images)
        return float((head(feats).argmax(1) != labels).float().mean())


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
    to follow them, so train- and eval-mode features would disagree. Returns the trained backbone
    and head in eval mode with gradients off, ready for :func:`t2v_core.embedding.probes.save_weights`
    and :class:`SourceHead`.
    """
    started = time.perf_counter()
    labels = torch.as_tensor(labels).long()
    if len(images) != len(labels) or len(labels) == 0:
        raise ValueError(f"{name}: need as many labels as images, got {len(images)} and {len(labels)}")
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    backbone, trained = _trainable_copy(probe, recipe)
    head = nn.Linear(probe.feature_dim, n_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    opt, sched = _optimizer(params, recipe, len(labels))
    losses: list[float] = []
    bar = tqdm(range(recipe.epochs), disable=not progress, desc=f"finetune {name}", unit="epoch")
    for _ in bar:
        _set_train_modes(backbone, trained)
        losses.append(_train_epoch(backbone, head, images, labels, opt, sched, recipe, gen))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    train_error = _freeze_and_score(backbone, head, images, labels)
    seconds = time.perf_counter() - started
    log.info("%s: %d images, %d epochs, final loss %.3f, train error %.3f, %.1fs", name,
             len(labels), recipe.epochs, losses[-1] if losses else float("nan"), train_error,
             seconds)
    return FinetuneResult(backbone, head, train_error, losses, seconds)


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


# -- source heads ------------------------------------------------------------------------
HEAD_SUFFIX = ".head.pt"


@dataclass
class SourceHead:
    """An expert's source-task classifier, the linear layer on top of its backbone's output:
    ``logits = features @ weight.T + bias``. ``classes`` names the Z outputs when known."""

    weight: torch.Tensor  # Z×D
    bias: torch.Tensor  # Z
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.weight = self.weight.detach().cpu().float()
        self.bias = self.bias.detach().cpu().float()
        self.classes = tuple(str(c) for c in self.classes)
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise WeightsError(f"a head needs Z×D weight and Z bias, got "
                               f"{tuple(self.weight.shape)} and {tuple(self.bias.shape)}")
        if self.classes and len(self.classes) != self.n_classes:
            raise WeightsError(f"{len(self.classes)} class names for {self.n_classes} outputs")

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.weight.shape[1])

    @classmethod
    def from_linear(cls, head: nn.Linear, classes: tuple[str, ...] = ()) -> SourceHead:
        return cls(head.weight, head.bias, classes)

    def logits(self, features) -> np.ndarray:
        """Source-class logits (N×Z, float64) of backbone features (N×D)."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.feature_dim:
            raise ValueError(f"head takes N×{self.feature_dim} features, got {f.shape}")
        return f @ self.weight.double().numpy().T + self.bias.double().numpy()

    def probabilities(self, features) -> np.ndarray:
        """Softmax over the source classes (N×Z, float64): θ(x) in LEEP."""
        z = self.logits(features)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def to_bytes(self) -> bytes:
        """A weights-only checkpoint; its ``state_dict`` loads into ``nn.Linear`` as it is."""
        buf = io.BytesIO()
        torch.save({"state_dict": {"weight": self.weight, "bias": self.bias},
                    "classes": list(self.classes)}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "head") -> SourceHead:
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            state = obj["state_dict"]
            return cls(state["weight"], state["bias"], tuple(obj.get("classes") or ()))
        except WeightsError:
            raise
        except Exception as exc:  # torch raises several types for bad or unsafe pickles
            raise WeightsError(f"{source} is not a loadable source head: {exc}") from exc


def head_uri(weights_uri: str) -> str:
    """Where an expert's source head lives: beside its weights, ``<name>.head.pt``."""
    stem = weights_uri[: -len(".pt")] if weights_uri.endswith(".pt") else weights_uri
    return stem + HEAD_SUFFIX


def load_head(weights_uri: str) -> SourceHead | None:
    """The source head of the expert whose weights are at ``weights_uri``; None when it has
    none (an expert registered from outside, or trained before heads were kept)."""
    uri = head_uri(weights_uri)
    try:
        data = read_uri_bytes(uri)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise WeightsError(f"cannot read source head {uri}: {exc}") from exc
    return SourceHead.from_bytes(data, uri)


def checkpoint_head(state_dict: Mapping[str, torch.Tensor], feature_dim: int
                    ) -> SourceHead | None:
    """The classifier a checkpoint carries beside its feature extractor (e.g. ImageNet's).

    It is the part :func:`t2v_core.embedding.probes.apply_weights` leaves out; it counts as a source
    head only when it is one linear layer on the backbone's output (Z×feature_dim weight).
    """
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    weights = [k for k, v in state.items()
               if k.startswith(_HEAD_PREFIXES) and k.endswith("weight") and v.ndim == 2]
    if len(weights) != 1:
        return None
    key = weights[0]
    weight, bias = state[key], state.get(key[: -len("weight")] + "bias")
    if weight.shape[1] != feature_dim or bias is None:
        return None
    return SourceHead(weight, bias)


def base_head(weights_uri: str | None, feature_dim: int) -> SourceHead | None:
    """The source head of a probe's base weights (the generic expert's), if the file has one."""
    if weights_uri is None:
        return None
    return checkpoint_head(load_state_dict(weights_uri), feature_dim)
