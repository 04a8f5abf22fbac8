"""Champion gating against a real MLflow registry (sqlite): the alias moves to a candidate only
when its number on the evaluation is not worse than the champion's, and the registry records
both numbers and why."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from t2v_core.embedding.synthetic_zoo import synthetic_zoo
from t2v_core.recommend.meta_dataset import MetaDataset
from t2v_core.recommend.model2vec import Model2Vec
from t2v_core.review import tracking
from t2v_core.review.champion import (
    DECISION_TAG,
    KEY_TAG,
    REASON_TAG,
    SCORE_TAG,
    Evaluation,
    data_digest,
    gate,
    recipe_of,
)
from t2v_core.review.recommender_model import register_recommender

NAME = "gate-test-recommender"
EVALUATION = Evaluation(folds=3, seed=0)


@pytest.fixture(scope="module")
def data() -> MetaDataset:
    zoo = synthetic_zoo(n_clusters=3, tasks_per_cluster=4, experts_per_cluster=1, dim=12,
                        random_state=5)
    sources = np.stack([np.full(12, np.nan) if s is None else s
                        for s in zoo.expert_source_embeddings])
    return MetaDataset("p-1", "montecarlo", tuple(f"t{i:02d}" for i in range(len(zoo.families))),
                       tuple(zoo.families), zoo.task_embeddings, zoo.errors,
                       tuple(zoo.expert_ids), sources)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A sqlite registry of its own, the tracking URI restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv(tracking.PARENT_RUN_ENV, raising=False)
        tracking.configure(tmp_path_factory.mktemp("registry"))
        yield MlflowClient()
    while mlflow.active_run() is not None:
        mlflow.end_run()


def _register(data: MetaDataset, **recipe) -> int:
    model = Model2Vec(max_epochs=15, **recipe).fit(
        data.embeddings, data.errors, data.expert_sources, expert_ids=list(data.expert_ids))
    return register_recommender(model, name=NAME, alias=None)


def _holder(client: MlflowClient) -> int:
    return int(client.get_registered_model(NAME).aliases["champion"])


def test_key_names_the_data_and_the_evaluation(data):
    assert EVALUATION.key(data) == Evaluation(folds=3, seed=0).key(data)
    assert EVALUATION.key(data) != Evaluation(folds=3, seed=1).key(data)
    assert EVALUATION.key(data) != EVALUATION.key(data.subset(data.task_ids[:-1]))
    assert data_digest(data) != data_digest(data.subset(data.task_ids[1:]))


def test_gate_promotes_ties_and_keeps_a_better_champion(registry, data):
    client = registry
    first = _register(data)
    opening = gate(data, first, EVALUATION, name=NAME)
    assert opening.promoted and opening.champion_version is None
    assert _holder(client) == first
    recipe = recipe_of(Model2Vec(max_epochs=15))
    expected = EVALUATION.score(data, recipe)
    assert opening.candidate_score == pytest.approx(expected)
    tags = client.get_model_version(NAME, str(first)).tags
    assert tags[KEY_TAG] == EVALUATION.key(data) and float(tags[SCORE_TAG]) == expected
    assert tags[DECISION_TAG] == "promoted" and "no version holds @champion" in tags[REASON_TAG]

    # New data: the champion's stored number is of another evaluation, so its recipe is
    # scored again on this one; the same recipe ties, and a tie is not worse.
    fewer = data.subset(data.task_ids[1:])
    second = _register(fewer)
    tie = gate(fewer, second, EVALUATION, name=NAME)
    assert tie.promoted and tie.champion_version == first
    assert tie.champion_score == tie.candidate_score == pytest.approx(
        EVALUATION.score(fewer, recipe))
    assert _holder(client) == second

    # A champion whose stored number on this very evaluation beats any candidate keeps it.
    client.set_model_version_tag(NAME, str(second), SCORE_TAG, "-1.0")
    third = _register(fewer)
    kept = gate(fewer, third, EVALUATION, name=NAME)
    assert not kept.promoted and kept.champion_score == -1.0
    assert _holder(client) == second
    tags = client.get_model_version(NAME, str(third)).tags
    assert tags[DECISION_TAG] == "kept champion"
    assert f"{kept.candidate_score:+.2f}%" in tags[REASON_TAG] and "-1.00%" in tags[REASON_TAG]
    assert f"@champion stays on v{second}" in tags[REASON_TAG]
    # ... unless the tolerance allows the difference.
    assert gate(fewer, third, EVALUATION, name=NAME, tolerance=1000.0).promoted
    assert _holder(client) == third


def test_a_champion_of_another_recipe_is_scored_on_the_same_folds(registry, data):
    client = registry
    champion = _register(data, l2=10.0, alpha=0.0, learn_alpha=False)
    client.set_registered_model_alias(NAME, "champion", str(champion))
    candidate = _register(data)
    decision = gate(data, candidate, EVALUATION, name=NAME)
    theirs = EVALUATION.score(data, recipe_of(Model2Vec(max_epochs=15, l2=10.0, alpha=0.0,
                                                        learn_alpha=False)))
    ours = EVALUATION.score(data, recipe_of(Model2Vec(max_epochs=15)))
    assert decision.champion_score == pytest.approx(theirs)
    assert decision.candidate_score == pytest.approx(ours)
    assert theirs != ours
    assert decision.promoted == (ours <= theirs)
    assert _holder(client) == (candidate if ours <= theirs else champion)
