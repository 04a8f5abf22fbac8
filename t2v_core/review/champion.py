"""Champion gating: a newly trained recommender takes the registry alias (``@champion``) only
when it is not worse than the version holding it, measured on the same evaluation.

A trained MODEL2VEC cannot be scored fairly on the tasks it was trained on, and a candidate
trained on a refreshed zoo was trained on all of them. What two models can be compared on,
on the same data, is their recipe: the hyper-parameters each model file stores
(:meth:`Model2Vec.get_params`). Each recipe is refitted on held-out folds of the current
meta-dataset, the same folds and seed for both, and scored by the mean relative error increase
of its top-1 expert over the oracle on all tasks (the "Mixed" Model2Vec number of Table 1, in
percent; lower is better).

Every version the gate sees is tagged with its number and the evaluation it was measured on
(``t2v.eval.key``, ``t2v.eval.score``). A champion measured on this very evaluation keeps its
stored number; otherwise its recipe is scored now (once per distinct recipe: a candidate with
the champion's recipe ties with it). The decision and both numbers are written on the
candidate's version (``t2v.champion.decision``, ``t2v.champion.reason``), so the registry says
why each version holds the alias or does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from t2v_core.recommend.meta_dataset import MetaDataset
from t2v_core.recommend.metrics import DEFAULT_ERROR_FLOOR
from t2v_core.recommend.model2vec import Model2Vec
from t2v_core.recommend.model_store import model_version
from t2v_core.recommend.protocol import MIXED, evaluate_selectors
from t2v_core.recommend.selectors import Model2VecSelector
from t2v_core.review.recommender_model import DEFAULT_ALIAS, DEFAULT_NAME, load_recommender

__all__ = ["DECISION_TAG", "KEY_TAG", "REASON_TAG", "SCORE_TAG", "Decision", "Evaluation",
           "data_digest", "gate", "promote", "recipe_of"]

log = logging.getLogger(__name__)

KEY_TAG = "t2v.eval.key"
SCORE_TAG = "t2v.eval.score"
DECISION_TAG = "t2v.champion.decision"
REASON_TAG = "t2v.champion.reason"
_SELECTOR = "Model2Vec"


def data_digest(data: MetaDataset) -> str:
    """The hash of a meta-dataset's embeddings, errors and ids (the one in the stored model's
    version name): equal digests, the same data."""
    return model_version(data).rsplit("-", 1)[1]


def recipe_of(model: Model2Vec) -> dict:
    """The hyper-parameters ``model`` was trained with (where it runs left out)."""
    return {k: v for k, v in model.get_params().items() if k != "device"}


@dataclass(frozen=True)
class Evaluation:
    """How recommenders are compared: held-out folds over tasks ('loo' or a number), the seed
    of the fold assignment, repeats of it, and the oracle error floor of the metric."""

    folds: str | int = 5
    seed: int = 0
    repeats: int = 1
    error_floor: float = DEFAULT_ERROR_FLOOR

    @classmethod
    def of(cls, data: MetaDataset, folds: str | int, **settings) -> Evaluation:
        """The evaluation with ``folds`` on ``data``: K folds, at most one per task."""
        return cls(folds="loo" if folds == "loo" else min(int(folds), len(data.task_ids)),
                   **settings)

    def key(self, data: MetaDataset) -> str:
        """Names this evaluation of ``data``: numbers with the same key are comparable."""
        spec = {**asdict(self), "folds": str(self.folds), "data": data_digest(data),
                "metric": f"{_SELECTOR}/{MIXED}/relative_increase_pct"}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def score(self, data: MetaDataset, recipe: dict) -> float:
        """The recipe's mean relative error increase over the oracle (%, all tasks), refitted
        on the held-out folds of ``data``."""
        selector = Model2VecSelector(**{"error_floor": self.error_floor, **recipe})
        result = evaluate_selectors(
            {_SELECTOR: selector}, data.embeddings, data.errors,
            data.expert_sources, list(data.expert_ids), list(data.families), folds=self.folds,
            random_state=self.seed, error_floor=self.error_floor, repeats=self.repeats)
        return float(result.reports[_SELECTOR].by_meta_task[MIXED].relative_increase_pct)

    def describe(self, data: MetaDataset) -> str:
        return (f"{len(data.task_ids)} tasks × {len(data.expert_ids)} experts, folds={self.folds},"
                f" seed={self.seed}, repeats={self.repeats}")


@dataclass(frozen=True)
class Decision:
    """Whether the candidate took the alias, both numbers (None: no champion) and why."""

    promoted: bool
    candidate_version: int
    candidate_score: float
    champion_version: int | None
    champion_score: float | None
    reason: str


class _Scorer:
    """Numbers of registered versions on one evaluation of one meta-dataset."""

    def __init__(self, name: str, data: MetaDataset, evaluation: Evaluation):
        self.name, self.data, self.evaluation = name, data, evaluation
        self.key = evaluation.key(data)
        self._by_recipe: dict[str, float] = {}

    def __call__(self, version: ModelVersion) -> float:
        tags = version.tags or {}
        if tags.get(KEY_TAG) == self.key and SCORE_TAG in tags:
            return float(tags[SCORE_TAG])
        uri = f"models:/{self.name}/{version.version}"
        recipe = recipe_of(load_recommender(uri).unwrap_python_model().model)
        known = json.dumps(recipe, sort_keys=True, default=str)
        if known not in self._by_recipe:
            self._by_recipe[known] = self.evaluation.score(self.data, recipe)
        return self._by_recipe[known]


def promote(data: MetaDataset, candidate_version: int, evaluation: Evaluation) -> Decision:
    """:func:`gate` in a "promote" stage run that records the decision and both numbers."""
    from t2v_core.review import tracking

    with tracking.stage_run("promote", asdict(evaluation)):
        decision = gate(data, candidate_version, evaluation)
        tracking.log_metrics({"promoted": int(decision.promoted),
                              "candidate_score": decision.candidate_score,
                              "champion_score": decision.champion_score})
    return decision


def _champion(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    version = client.get_registered_model(name).aliases.get(alias)
    return None if version is None else client.get_model_version(name, str(version))


def gate(data: MetaDataset, candidate_version: int, evaluation: Evaluation, *,
         name: str = DEFAULT_NAME, alias: str = DEFAULT_ALIAS, tolerance: float = 0.0,
         client: MlflowClient | None = None) -> Decision:
    """Score the registered ``candidate_version`` and the version holding ``alias`` on
    ``evaluation`` of ``data``; move the alias to the candidate unless its number is worse
    than the champion's by more than ``tolerance`` points. Tags the candidate with its
    number, the decision and the reason (both numbers)."""
    client = client or MlflowClient()
    score = _Scorer(name, data, evaluation)
    candidate = client.get_model_version(name, str(candidate_version))
    champion = _champion(client, name, alias)
    cand = score(candidate)
    client.set_model_version_tag(name, str(candidate_version), KEY_TAG, score.key)
    client.set_model_version_tag(name, str(candidate_version), SCORE_TAG, repr(cand))
    where = evaluation.describe(data)
    if champion is None:
        decision = Decision(True, candidate_version, cand, None, None,
                            f"no version holds @{alias} yet; candidate v{candidate_version} "
                            f"scores {cand:+.2f}% ({where})")
    else:
        champ, held = score(champion), int(champion.version)
        promoted = cand <= champ + tolerance
        verdict = "not worse than" if promoted else "worse than"
        outcome = f"@{alias} moves to v{candidate_version}" if promoted \
            else f"@{alias} stays on v{held}"
        decision = Decision(promoted, candidate_version, cand, held, champ,
                            f"candidate v{candidate_version} scores {cand:+.2f}%, {verdict} "
                            f"champion v{held}'s {champ:+.2f}% (tolerance {tolerance:g} points; "
                            f"{where}): {outcome}")
    if decision.promoted:
        client.set_registered_model_alias(name, alias, str(candidate_version))
    client.set_model_version_tag(name, str(candidate_version), DECISION_TAG,
                                 "promoted" if decision.promoted else "kept champion")
    client.set_model_version_tag(name, str(candidate_version), REASON_TAG, decision.reason)
    (log.info if decision.promoted else log.warning)("%s", decision.reason)
    return decision
