"""Train MODEL2VEC on the zoo's embeddings and performance matrix, and register it.

    python -m jobs.train_model2vec --root ./t2v-data [--probe-id P --method M]

The model lands under ``model2vec/<version>/`` in the storage root (``model.pt`` and
``metadata.json``; ``model2vec/LATEST`` names the newest) and, unless ``--no-tracking``, as a
new version of the MLflow registered model ``task2vec-recommender`` with alias ``champion``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from jobs._cli import (
    add_common_args,
    add_embedding_args,
    add_error_floor_arg,
    run_stamp,
    setup_logging,
)
from t2v_core.recommend.meta_dataset import MetaDataset, load_meta_dataset
from t2v_core.recommend.model2vec import Model2Vec
from t2v_core.recommend.selectors import top1_relative_increase
from t2v_core.storage import StorageRoot

log = logging.getLogger("jobs.train_model2vec")
LATEST = "model2vec/LATEST"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train_model2vec",
                                description=__doc__.split("\n\n")[0])
    add_common_args(p)
    add_embedding_args(p)
    add_error_floor_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=500)
    p.add_argument("--alpha", type=float, default=0.15,
                   help="weight of the source-complexity term (start value; 0.15 = the paper's)")
    p.add_argument("--fixed-alpha", dest="learn_alpha", action="store_false",
                   help="keep --alpha fixed instead of learning it")
    p.add_argument("--l2", type=float, default=1e-3,
                   help="penalty on the mean square log-offset of the expert embeddings from "
                        "their source tasks' (larger: experts stay nearer their source task)")
    p.add_argument("--gamma", type=float, default=1.0,
                   help="sharpness of the per-filter comparison (start value; 1 = the paper's d_sym)")
    p.add_argument("--fixed-gamma", dest="learn_gamma", action="store_false",
                   help="keep --gamma fixed instead of learning it")
    p.add_argument("--register-name", default="task2vec-recommender",
                   help="MLflow registered model name")
    p.add_argument("--alias", default="champion", help="alias given to the new model version")
    return p.parse_args(argv)


def _version(data: MetaDataset) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(data.embeddings).tobytes())
    digest.update(np.nan_to_num(data.errors, nan=-1.0).tobytes())
    digest.update("\n".join(data.task_ids + data.expert_ids).encode())
    stamp = run_stamp()
    return f"{stamp}-{digest.hexdigest()[:8]}"


def save_model(root: StorageRoot, model: Model2Vec, data: MetaDataset, metrics: dict) -> str:
    """Write model + metadata under a new version and point LATEST at it; returns the version."""
    version = _version(data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        model.save(path)
        root.write_bytes_atomic(f"model2vec/{version}/model.pt", path.read_bytes())
    meta = {"version": version, "probe_id": data.probe_id, "method": data.method,
            "task_ids": list(data.task_ids), "expert_ids": list(data.expert_ids),
            "metrics": metrics}
    root.write_bytes_atomic(f"model2vec/{version}/metadata.json", json.dumps(meta, indent=2).encode())
    root.write_bytes_atomic(LATEST, version.encode())
    return version


def load_model(root: StorageRoot | str, version: str | None = None) -> tuple[Model2Vec, dict]:
    """The stored model of ``version`` (default: LATEST) and its metadata."""
    root = root if isinstance(root, StorageRoot) else StorageRoot(root)
    if version is None:
        if not root.exists(LATEST):
            raise FileNotFoundError(f"no trained MODEL2VEC under {root!r}: run jobs.train_model2vec")
        version = root.read_bytes(LATEST).decode().strip()
    meta = json.loads(root.read_bytes(f"model2vec/{version}/metadata.json"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        path.write_bytes(root.read_bytes(f"model2vec/{version}/model.pt"))
        return Model2Vec.load(path), meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    root = StorageRoot(args.root)
    data = load_meta_dataset(root, args.probe_id, args.method, mode=args.mode)
    log.info("fitting MODEL2VEC on %d tasks × %d experts (%s/%s)", len(data.task_ids),
             len(data.expert_ids), data.probe_id, data.method)
    model = Model2Vec(alpha=args.alpha, learn_alpha=args.learn_alpha, gamma=args.gamma,
                      learn_gamma=args.learn_gamma, l2=args.l2, max_epochs=args.max_epochs,
                      random_state=args.seed)
    model.fit(data.embeddings, data.errors, data.expert_sources, expert_ids=list(data.expert_ids))
    metrics = {
        "n_tasks": len(data.task_ids),
        "n_experts": len(data.expert_ids),
        "train_relative_increase_pct": 100 * float(
            np.nanmean(top1_relative_increase(data.errors, model.rank(data.embeddings),
                                              error_floor=args.error_floor))),
        "tau": float(model.tau_),
        "gamma": float(model.gamma_),
        "alpha": float(model.alpha_),
    }
    version = save_model(root, model, data, metrics)
    log.info("saved MODEL2VEC version %s (in-sample error increase over oracle %.2f%%)",
             version, metrics["train_relative_increase_pct"])
    if args.tracking:
        from t2v_core.review import tracking
        from t2v_core.review.recommender_model import register_recommender

        tracking.configure(root, tracking_uri=args.tracking_uri)
        params = {"probe_id": data.probe_id, "method": data.method, "mode": args.mode,
                  "alpha": args.alpha, "learn_alpha": args.learn_alpha, "l2": args.l2,
                  "seed": args.seed, "version": version}
        with tracking.stage_run("train_model2vec", params):
            tracking.log_metrics(metrics)
            registered = register_recommender(model, name=args.register_name, alias=args.alias)
        log.info("registered %s version %s as @%s", args.register_name, registered, args.alias)
    return 0


if __name__ == "__main__":
    sys.exit(main())
