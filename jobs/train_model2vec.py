"""Train MODEL2VEC on the zoo's embeddings and performance matrix, and register it.

    python -m jobs.train_model2vec --root ./t2v-data [--probe-id P --method M]

The model lands under ``model2vec/<version>/`` (:mod:`t2v_core.recommend.model_store`) and,
unless ``--no-tracking``, as a new version of the MLflow registered model
``task2vec-recommender`` with alias ``champion``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import numpy as np

from jobs._cli import MetaDatasetOptions, config_reader, opt, run_main
from t2v_core.recommend.meta_dataset import load_meta_dataset
from t2v_core.recommend.model2vec import Model2Vec
from t2v_core.recommend.model_store import save_model
from t2v_core.recommend.selectors import top1_relative_increase
from t2v_core.storage import StorageRoot

log = logging.getLogger("jobs.train_model2vec")


@dataclass(frozen=True, kw_only=True)
class Config(MetaDatasetOptions):
    """The job's options, one field per flag, with those of :class:`MetaDatasetOptions`."""

    seed: int = opt(0)
    max_epochs: int = opt(500)
    alpha: float = opt(0.15, help="weight of the source-complexity term (start value; 0.15 = "
                       "the paper's)")
    learn_alpha: bool = opt(True, flag="--fixed-alpha", help="keep --alpha fixed instead of "
                            "learning it")
    l2: float = opt(1e-3, help="penalty on the mean square log-offset of the expert embeddings "
                    "from their source tasks' (larger: experts stay nearer their source task)")
    gamma: float = opt(1.0, help="sharpness of the per-filter comparison (start value; 1 = the "
                       "paper's d_sym)")
    learn_gamma: bool = opt(True, flag="--fixed-gamma", help="keep --gamma fixed instead of "
                            "learning it")
    register_name: str = opt("task2vec-recommender", help="MLflow registered model name")
    alias: str = opt("champion", help="alias given to the new model version")


@dataclass(frozen=True)
class Model2VecResult:
    """The stored version, its training metrics and, when tracked, the registry version."""

    version: str
    probe_id: str
    method: str
    metrics: dict = field(default_factory=dict)
    registered_version: int | None = None


parse_args = config_reader(Config)


def run(config: Config) -> Model2VecResult:
    """Fit MODEL2VEC on the stored meta-dataset, save it as a new version under the root and,
    with tracking, register it in MLflow. Raises when the root has no usable embeddings or
    matrix (the error says what to run or pass)."""
    root = StorageRoot(config.root)
    data = load_meta_dataset(root, config.probe_id, config.method, mode=config.mode)
    log.info("fitting MODEL2VEC on %d tasks × %d experts (%s/%s)", len(data.task_ids),
             len(data.expert_ids), data.probe_id, data.method)
    model = Model2Vec(alpha=config.alpha, learn_alpha=config.learn_alpha, gamma=config.gamma,
                      learn_gamma=config.learn_gamma, l2=config.l2,
                      max_epochs=config.max_epochs, random_state=config.seed,
                      error_floor=config.error_floor)
    model.fit(data.embeddings, data.errors, data.expert_sources, expert_ids=list(data.expert_ids))
    metrics = {
        "n_tasks": len(data.task_ids),
        "n_experts": len(data.expert_ids),
        "train_relative_increase_pct": 100 * float(
            np.nanmean(top1_relative_increase(data.errors, model.rank(data.embeddings),
                                              error_floor=config.error_floor))),
        "tau": float(model.tau_),
        "gamma": float(model.gamma_),
        "alpha": float(model.alpha_),
    }
    version = save_model(root, model, data, metrics)
    log.info("saved MODEL2VEC version %s (in-sample error increase over oracle %.2f%%)",
             version, metrics["train_relative_increase_pct"])
    registered = _register(config, root, model, data, metrics, version) if config.tracking else None
    return Model2VecResult(version, data.probe_id, data.method, metrics, registered)


def _register(config: Config, root: StorageRoot, model: Model2Vec, data, metrics: dict,
              version: str) -> int:
    from t2v_core.review import tracking
    from t2v_core.review.recommender_model import register_recommender

    params = {"probe_id": data.probe_id, "method": data.method, "mode": config.mode,
              "alpha": config.alpha, "learn_alpha": config.learn_alpha, "l2": config.l2,
              "seed": config.seed, "version": version}
    with tracking.tracked("train_model2vec", params, root=root, tracking_uri=config.tracking_uri):
        tracking.log_metrics(metrics)
        registered = register_recommender(model, name=config.register_name, alias=config.alias)
    log.info("registered %s version %s as @%s", config.register_name, registered, config.alias)
    return registered


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args, run, argv, errors={ValueError: 1, FileNotFoundError: 1})


if __name__ == "__main__":
    sys.exit(main())
