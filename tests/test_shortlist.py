"""The default recommender: MODEL2VEC's shortlist re-ranked by the shortlisted experts' scores,
the fusions learned on training tasks only, and what it costs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from t2v_core.embedding.synthetic_zoo import synthetic_zoo
from t2v_core.recommend.cost import cost_markdown, cost_points
from t2v_core.recommend.fusion import ListwiseFusion, zscore
from t2v_core.recommend.protocol import evaluate_selectors
from t2v_core.recommend.selectors import (
    BruteForceSelector,
    LEEPSelector,
    LogMESelector,
    Model2VecSelector,
    OracleSelector,
    RidgeLOOSelector,
)
from t2v_core.recommend.shortlist import (
    ShortlistRecommender,
    all_transfer_scores,
    expert_forward_passes,
    screen_context,
    screen_subset,
    screen_value,
)
from t2v_core.recommend.transferability import leep, logme, ridge_loo

EPOCHS = {"max_epochs": 40, "patience": 10}


@pytest.fixture(scope="module")
def zoo():
    return synthetic_zoo(n_clusters=3, tasks_per_cluster=8, experts_per_cluster=2, dim=24,
                         source_noise=0.3, random_state=5)


def scores_context(values: np.ndarray, name: str = "ridge") -> dict:
    """A context whose precomputed transfer score of task t, expert e is values[t, e]."""
    return {"transfer_scores": [{name: row.astype(np.float64)} for row in values]}


def fitted(zoo, scores: np.ndarray, **kwargs) -> ShortlistRecommender:
    params = {"k": 3, **EPOCHS, **kwargs}
    return ShortlistRecommender(**params).fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings, zoo.expert_ids,
        **scores_context(scores))


class Recording(list):
    """A per-expert sequence that remembers which experts' outputs were read."""

    def __init__(self, items):
        super().__init__(items)
        self.read: set[int] = set()

    def __getitem__(self, i):
        self.read.add(int(i))
        return super().__getitem__(i)


def test_rerank_fixes_a_wrong_first_choice_inside_the_shortlist_only(zoo):
    """The score says the first stage's second expert is best, and the expert it ranks last is
    better still: the second moves to first, and the last stays exactly where it was, since it
    was never run."""
    n_experts = len(zoo.expert_ids)
    rec = fitted(zoo, -zoo.errors)
    assert rec.fusion_.coef_["ridge"] > 0
    rec.fusion_ = ListwiseFusion.fixed({"ridge": 1.0})
    task = zoo.task_embeddings[:1]
    order = np.argsort(-rec.first_stage(task)[0], kind="stable")
    scores = np.zeros(n_experts)
    scores[order[1]], scores[order[-1]] = 5.0, 9.0
    ranking = rec.rank(task, **scores_context(scores[None, :]))[0]
    assert ranking[0] == order[1] and ranking[1] == order[0]
    np.testing.assert_array_equal(ranking[3:], order[3:])
    assert ranking[-1] == order[-1]
    # a re-ranking that weighs nothing leaves the first stage's order
    rec.fusion_ = ListwiseFusion.fixed({"ridge": 0.0})
    np.testing.assert_array_equal(rec.rank(task, **scores_context(scores[None, :]))[0], order)


def test_only_the_shortlisted_experts_are_run_and_counted(zoo):
    rng = np.random.default_rng(0)
    n_experts = len(zoo.expert_ids)
    labels = np.arange(30) % 3
    features = [rng.normal(size=(30, 4)) + labels[:, None] * (e % 3) for e in range(n_experts)]
    train = {"features": [features] * len(zoo.errors), "labels": [labels] * len(zoo.errors)}
    rec = ShortlistRecommender(k=2, **EPOCHS).fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings, zoo.expert_ids, **train)
    outputs = Recording(features)
    rec.rank(zoo.task_embeddings[:1], features=[outputs], labels=[labels])
    assert outputs.read == set(rec.shortlist(zoo.task_embeddings[:1])[0].tolist())
    assert len(outputs.read) == 2 and rec.ledger.tasks == 1 and rec.ledger.passes == 2
    # adaptive: a shortlist that must hold only a sliver of p(expert | task) is one expert
    sure = ShortlistRecommender(k=5, mass=1e-9, **EPOCHS).fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings, zoo.expert_ids, **train)
    assert [h.size for h in sure.shortlist(zoo.task_embeddings)] == [1] * len(zoo.errors)
    generic = ShortlistRecommender(k=1, include_generic=True, **EPOCHS).fit(zoo.task_embeddings, zoo.errors,
                                                 zoo.expert_source_embeddings, zoo.expert_ids,
                                                 **train)
    generic_index = zoo.expert_ids.index(next(
        e for e, s in zip(zoo.expert_ids, zoo.expert_source_embeddings, strict=True) if s is None))
    for head in generic.shortlist(zoo.task_embeddings):
        assert generic_index in head and head.size in (1, 2)


def test_fusion_weights_are_learned_on_training_tasks_only(zoo):
    """A score that tracks the training tasks' errors earns a positive weight; one that runs
    against them a negative one. Held-out tasks whose score lies cannot change the learned
    fusion, so there the recommender follows the lie: nothing was tuned to them."""
    n = len(zoo.errors)
    train, test = np.arange(n) % 4 != 0, np.arange(n) % 4 == 0
    honest = fitted_on(zoo, train, -zoo.errors)
    assert honest.fusion_.coef_["ridge"] > abs(honest.fusion_.coef_["prior"])
    liar = fitted_on(zoo, train, zoo.errors)
    assert liar.fusion_.coef_["ridge"] < 0
    lie = scores_context(zoo.errors[test])  # high score = high error on the held-out tasks
    picks = honest.rank(zoo.task_embeddings[test], **lie)[:, 0]
    heads = honest.shortlist(zoo.task_embeddings[test])
    worst_in_head = [h[np.argmax(zoo.errors[test][j, h])] for j, h in enumerate(heads)]
    assert np.mean(picks == np.asarray(worst_in_head)) >= 0.5
    refit = fitted_on(zoo, train, -zoo.errors)
    assert refit.fusion_.coef_ == honest.fusion_.coef_  # deterministic; the lie was never seen


def fitted_on(zoo, rows: np.ndarray, scores: np.ndarray) -> ShortlistRecommender:
    return ShortlistRecommender(k=3, **EPOCHS).fit(
        zoo.task_embeddings[rows], zoo.errors[rows], zoo.expert_source_embeddings,
        zoo.expert_ids, **scores_context(scores[rows]))


def test_the_evaluation_counts_the_passes_its_fitted_copies_spent(zoo):
    n_tasks, n_experts = zoo.errors.shape
    context = scores_context(-zoo.errors)
    selectors = {
        "k3": ShortlistRecommender(k=3, **EPOCHS),
        "Model2Vec": Model2VecSelector(**EPOCHS),
        "Oracle": OracleSelector(),
    }
    result = evaluate_selectors(selectors, zoo.task_embeddings, zoo.errors,
                                zoo.expert_source_embeddings, zoo.expert_ids, zoo.families,
                                folds=3, repeats=2, context=context)
    assert selectors["k3"].ledger.tasks == 2 * n_tasks
    assert expert_forward_passes(selectors["k3"], n_experts) == 3.0
    assert expert_forward_passes(selectors["Model2Vec"], n_experts) == 0.0
    assert expert_forward_passes(LogMESelector(), n_experts) == n_experts
    assert expert_forward_passes(LEEPSelector(), n_experts) == n_experts
    assert math.isinf(expert_forward_passes(BruteForceSelector(), n_experts))
    assert math.isnan(expert_forward_passes(selectors["Oracle"], n_experts))
    points = {p.name: p for p in cost_points(result, selectors)}
    assert points["k3"].passes == 3.0 and points["Oracle"].relative_increase_pct == 0.0
    table = cost_markdown(list(points.values()), n_experts)
    assert "| k3 | 3 |" in table and "| Model2Vec | 0 |" in table
    # re-ranked by a perfect score, the shortlist's pick beats MODEL2VEC's on average
    ri = {n: np.asarray(r.relative_increase_pct) for n, r in result.reports.items()}
    assert ri["k3"].mean() <= ri["Model2Vec"].mean() + 1e-9


def test_transfer_scores_computed_once_match_the_selectors():
    rng = np.random.default_rng(1)
    labels = np.arange(40) % 2
    feats = [rng.normal(size=(40, 5)) + q * labels[:, None] for q in (0.0, 2.0, 0.5)]
    probs = [np.full((40, 3), 1 / 3) for _ in range(3)]
    scores = all_transfer_scores({"features": [feats], "source_probs": [probs],
                                  "labels": [labels]})
    assert np.argmax(scores[0]["logme"]) == 1
    assert np.allclose(scores[0]["leep"], scores[0]["leep"][0])  # uninformative heads tie
    emb, sources = np.ones((1, 4)), [np.ones(4)] * 3
    logme = LogMESelector().fit(emb, np.full((1, 3), 0.5), sources)
    np.testing.assert_array_equal(logme.rank(emb, transfer_scores=scores),
                                  logme.rank(emb, features=[feats], labels=[labels]))
    reversed_scores = [{"logme": -scores[0]["logme"]}]  # the kept scores are what it ranks by
    assert logme.rank(emb, transfer_scores=reversed_scores)[0, -1] == 1
    assert np.argmax(scores[0]["ridge"]) == 1
    ridge = RidgeLOOSelector().fit(emb, np.full((1, 3), 0.5), sources)
    np.testing.assert_array_equal(ridge.rank(emb, transfer_scores=scores),
                                  ridge.rank(emb, features=[feats], labels=[labels]))


def test_the_screen_brings_a_winner_model2vec_missed_onto_the_shortlist(zoo):
    """The first stage ranks expert x last without a screen; the screen says x is best, and
    the full score agrees: with the screen, x is shortlisted and ranked first, and the pass
    ledger counts the screen."""
    n_experts = len(zoo.expert_ids)
    screens = list(-zoo.errors)  # a screen that tracks the errors
    train = {**scores_context(-zoo.errors), "screen_scores": screens}
    rec = ShortlistRecommender(k=2, **EPOCHS).fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings, zoo.expert_ids, **train)
    assert rec.first_fusion_.coef_["screen"] > abs(rec.first_fusion_.coef_["prior"])
    task = zoo.task_embeddings[:1]
    order = np.argsort(-rec.first_stage(task)[0], kind="stable")
    missed = order[-1]
    screen = np.zeros(n_experts)
    screen[missed] = 1.0
    full = np.zeros(n_experts)
    full[missed] = 2.0
    plain = rec.rank(task, **scores_context(full[None, :]))[0]  # no screen: missed stays out
    assert set(plain[:2]) == set(order[:2]) and plain[-1] == missed
    ranked = rec.rank(task, **scores_context(full[None, :]), screen_scores=[screen],
                      screen_passes=[0.75])[0]
    assert ranked[0] == missed
    assert rec.ledger.tasks == 2 and rec.ledger.passes == pytest.approx(2 + 2 + 0.75)


def test_the_screen_reads_a_few_images_per_class_and_says_what_it_cost():
    labels = np.repeat([0, 1, 2], [10, 6, 2])
    idx = screen_subset(labels, 3, seed=0)
    assert np.bincount(labels[idx]).tolist() == [3, 3, 2]
    np.testing.assert_array_equal(idx, screen_subset(labels, 3, seed=0))
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.ones(4), size=labels.size) for _ in range(5)] + [None]
    feats = [rng.normal(size=(labels.size, 3)) + q * labels[:, None] for q in range(6)]
    context = {"source_probs": [probs], "features": [feats], "labels": [labels]}
    screen = screen_context(context, per_class=3)
    assert screen["screen_passes"] == [pytest.approx(6 * 8 / 18)]
    by_leep = zscore([leep(p[idx], labels[idx]) for p in probs[:5]])
    by_logme = zscore([logme(f[idx], labels[idx]) for f in feats])
    np.testing.assert_allclose(screen["screen_scores"][0][:5], (by_leep + by_logme[:5]) / 2)
    assert screen["screen_scores"][0][-1] == pytest.approx(by_logme[-1])  # no head: LogME alone
    leep_only = screen_context({"source_probs": [probs], "labels": [labels]}, per_class=3)
    np.testing.assert_allclose(leep_only["screen_scores"][0][:5], by_leep)
    assert np.isnan(leep_only["screen_scores"][0][-1])
    assert screen_context({"labels": [labels]}) == {}


def test_the_screen_reads_the_scores_it_names(monkeypatch):
    """The screen's value is built from :data:`SCREEN_SCORES` and nothing else: naming ridge
    LOO alone makes it ridge LOO's z-scores on the screened images."""
    import t2v_core.recommend.shortlist as shortlist

    labels = np.repeat([0, 1], 9)
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(labels.size, 3)) + q * labels[:, None] for q in range(4)]
    monkeypatch.setattr(shortlist, "SCREEN_SCORES", ("ridge",))
    screen = screen_context({"features": [feats], "labels": [labels]}, per_class=4)
    idx = screen_subset(labels, 4)
    expected = zscore([ridge_loo(f[idx], labels[idx]) for f in feats])
    np.testing.assert_allclose(screen["screen_scores"][0], expected)
    with pytest.raises(ValueError, match="at least one score"):
        screen_value({"leep": None})


def test_the_rerank_weighs_the_score_that_tracks_the_training_tasks(zoo):
    """Ridge LOO tracks the training tasks' errors and LEEP runs against them: it earns the
    positive weight; swap them and LEEP does. The weights come from z-scores, so multiplying
    a score by a constant on every task changes nothing."""
    def fitted_with(ridge_sign: float, scale: float = 1.0) -> ShortlistRecommender:
        cached = [{"ridge": -ridge_sign * scale * row, "leep": ridge_sign * row}
                  for row in zoo.errors]
        return ShortlistRecommender(k=3, **EPOCHS).fit(
            zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings, zoo.expert_ids,
            transfer_scores=cached)

    coef = fitted_with(1.0).fusion_.coef_
    assert coef["ridge"] > 0 > coef["leep"]
    swapped = fitted_with(-1.0).fusion_.coef_
    assert swapped["leep"] > 0 > swapped["ridge"]
    scaled = fitted_with(1.0, scale=1e3).fusion_.coef_
    assert scaled == pytest.approx(coef)
