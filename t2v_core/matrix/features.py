"""Feature cache: each expert's features of each task split, computed once, stored, reused.

Training a probe head costs milliseconds; the expert's forward pass over the task's images is
what a matrix cell really costs. Every hyper-parameter trial of a cell, every later run and
every cell re-trained with a new head recipe reads the same features, so they are stored under
the storage root at

    features/expert=<expert_id>/task=<task_id>/<expert hash>-<task hash>-<split>-<recipe>.npz

keyed by both content hashes (new weights or changed images give a new file, never a stale
hit) and by how the images were read (size, per-class cap, sampling seed). Files are written
atomically, so concurrent trials computing the same features at worst do the work twice and
write identical bytes. A file that cannot be read back is recomputed.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import torch

from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import ExpertSpec, TaskSpec

log = logging.getLogger(__name__)

FEATURES_DIR = "features"


@dataclass(frozen=True)
class FeatureKey:
    """Everything the features of one split depend on."""

    expert_id: str
    expert_hash: str
    task_id: str
    task_hash: str
    split: str
    image_size: int
    max_per_class: int | None = None
    seed: int = 0

    @classmethod
    def for_cell(
        cls,
        expert: ExpertSpec,
        task: TaskSpec,
        split: str,
        image_size: int,
        max_per_class: int | None = None,
        seed: int = 0,
    ) -> FeatureKey:
        return cls(expert.expert_id, expert.content_hash, task.task_id, task.content_hash,
                   split, int(image_size), max_per_class, int(seed))

    @property
    def rel(self) -> str:
        recipe = f"s{self.image_size}-m{self.max_per_class or 'all'}-r{self.seed}"
        name = f"{self.expert_hash[:16]}-{self.task_hash[:16]}-{self.split}-{recipe}.npz"
        return (f"{FEATURES_DIR}/expert={quote(self.expert_id, safe='')}"
                f"/task={quote(self.task_id, safe='')}/{name}")


@dataclass
class Features:
    """Features (N×D float32), labels (N int64), and the probe that computed them."""

    features: np.ndarray
    labels: np.ndarray
    probe_id: str = ""

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, features=self.features.astype(np.float32, copy=False),
                 labels=self.labels.astype(np.int64, copy=False), probe_id=np.array(self.probe_id))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Features:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            feats, labels = z["features"], z["labels"]
            probe_id = str(z["probe_id"]) if "probe_id" in z.files else ""
        if feats.ndim != 2 or labels.shape != (feats.shape[0],):
            raise ValueError(f"bad shapes: features {feats.shape}, labels {labels.shape}")
        return cls(feats, labels, probe_id)


class FeatureCache:
    """Reads and writes :class:`Features` under a storage root; counts hits and misses so a
    job can report (and a test can check) how much work the cache saved."""

    def __init__(self, root: StorageRoot | str):
        self.root = root if isinstance(root, StorageRoot) else StorageRoot(root)
        self.hits = 0
        self.misses = 0

    def load(self, key: FeatureKey) -> Features | None:
        try:
            data = self.root.read_bytes(key.rel)
        except FileNotFoundError:
            return None
        try:
            return Features.from_bytes(data)
        except Exception as exc:  # a truncated or foreign file: recompute rather than fail
            log.warning("unreadable cached features %s (%s); recomputing", key.rel, exc)
            return None

    def save(self, key: FeatureKey, features: Features) -> str:
        return self.root.write_bytes_atomic(key.rel, features.to_bytes())

    def get_or_compute(self, key: FeatureKey, compute: Callable[[], Features]) -> Features:
        cached = self.load(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        out = compute()
        self.save(key, out)
        log.debug("cached features %s: %s", key.rel, out.features.shape)
        return out


def compute_features(
    backbone: torch.nn.Module,
    task: TaskSpec,
    split: str,
    image_size: int,
    *,
    max_per_class: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    device: str | torch.device | None = None,
    probe_id: str = "",
) -> Features:
    """Read ``split`` of ``task`` and run the (frozen, eval-mode) backbone over it."""
    from t2v_core.embedding.probes import extract_features
    from t2v_core.zoo.data import load_split

    images, labels = load_split(task, split, image_size, max_per_class, seed)
    device = torch.device(device or "cpu")
    net = backbone.to(device)
    chunks = [
        extract_features(net, images[i : i + batch_size].to(device), batch_size).cpu()
        for i in range(0, len(images), batch_size)
    ]
    feats = torch.cat(chunks).numpy().astype(np.float32, copy=False)
    return Features(feats, labels.numpy(), probe_id)


def cell_features(
    cache: FeatureCache,
    backbone_factory: Callable[[], tuple[torch.nn.Module, str]],
    expert: ExpertSpec,
    task: TaskSpec,
    split: str,
    image_size: int,
    *,
    max_per_class: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> Features:
    """Cached features of one split of one cell. ``backbone_factory`` returns the expert's
    network and probe id, and is called only on a miss (loading weights is not free)."""
    key = FeatureKey.for_cell(expert, task, split, image_size, max_per_class, seed)

    def compute() -> Features:
        backbone, probe_id = backbone_factory()
        return compute_features(backbone, task, split, image_size, max_per_class=max_per_class,
                                seed=seed, device=device, probe_id=probe_id)

    return cache.get_or_compute(key, compute)
