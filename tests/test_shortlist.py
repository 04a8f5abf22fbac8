"""The default recommender: MODEL2VEC's shortlist re-ranked by the shortlisted experts' scores,
the fusion learned on training tasks only, and what it costs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from t2v_core.embedding.synthetic_zoo import synthetic_zoo
from t2v_core.recommend.cost import cost_markdown, cost_points
from t2v_core.recommend.protocol import evaluate_selectors
from t2v_core.recommend.selectors import (
    BruteForceSelector,
    LEEPSelector,
    LogMESelector,
    Model2VecSelector,
    OracleSelector,
)
from t2v_core.recommend.shortlist import (
    Fusion,
    ShortlistRecommender,
    all_transfer_scores,
    expert_forward_passes,
    screen_context,
    screen_subset,
)
from t2v_core.recommend.transferability import leep

EPOCHS = {"max_epochs": 40, "patience": 10}


@pytest.fixture(scope="module")
def zoo():
    return synthetic_zoo(n_clusters=3, tasks_per_cluster=8, experts_per_cluster=2, dim=24,
                         source_noise=0.3, random_state=5)


def scores_context(values: np.ndarray, name: str = "logme") -> dict:
    """A context whose precomputed transfer score of task t, expert e is values[t, e]."""
    return {"transfer_scores": [{name: row.astype(np.float64)} for row in values]}


def fitted(zoo, scores: np.ndarray, **kwargs) -> ShortlistRecommender:
    params = {"k": 3, "inner_folds": 3, "score_sets": [("logme",)], **EPOCHS, **kwargs}
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
    """The score says MODEL2VEC's second expert is best, and the expert MODEL2VEC ranks last
    is better still; with the score alone deciding (w = inf), the second moves to first and
    the last stays exactly where MODEL2VEC put it."""
    n_experts = len(zoo.expert_ids)
    rec = fitted(zoo, -zoo.errors, weights=(math.inf,))
    task = zoo.task_embeddings[:1]
    order = np.argsort(-rec.log_p(task)[0], kind="stable")
    scores = np.zeros(n_experts)
    scores[order[1]], scores[order[-1]] = 5.0, 9.0
    ranking = rec.rank(task, **scores_context(scores[None, :]))[0]
    assert ranking[0] == order[1] and ranking[1] == order[0]
    np.testing.assert_array_equal(ranking[3:], order[3:])
    assert ranking[-1] == order[-1]
    # the plain MODEL2VEC ranking is what a zero weight leaves
    rec.fusion_ = Fusion(("logme",), 0.0, rec.fusion_.scale_p, rec.fusion_.scale_s, 0.0)
    np.testing.assert_array_equal(rec.rank(task, **scores_context(scores[None, :]))[0], order)


def test_only_the_shortlisted_experts_are_run_and_counted(zoo):
    rng = np.random.default_rng(0)
    n_experts = len(zoo.expert_ids)
    labels = np.arange(30) % 3
    features = [rng.normal(size=(30, 4)) + labels[:, None] * (e % 3) for e in range(n_experts)]
    train = {"features": [features] * len(zoo.errors), "labels": [labels] * len(zoo.errors)}
    rec = ShortlistRecommender(k=2, score_sets=[("logme",)], **EPOCHS).fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings, zoo.expert_ids, **train)
    outputs = Recording(features)
    rec.rank(zoo.task_embeddings[:1], features=[outputs], labels=[labels])
    assert outputs.read == set(rec.shortlist(zoo.task_embeddings[:1])[0].tolist())
    assert len(outputs.read) == 2 and rec.ledger.tasks == 1 and rec.ledger.passes == 2
    # adaptive: a shortlist that must hold only a sliver of p(expert | task) is one expert
    sure = ShortlistRecommender(k=5, mass=1e-9, score_sets=[("logme",)], **EPOCHS).fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings, zoo.expert_ids, **train)
    assert [h.size for h in sure.shortlist(zoo.task_embeddings)] == [1] * len(zoo.errors)
    generic = ShortlistRecommender(k=1, include_generic=True, score_sets=[("logme",)],
                                   **EPOCHS).fit(zoo.task_embeddings, zoo.errors,
                                                 zoo.expert_source_embeddings, zoo.expert_ids,
                                                 **train)
    generic_index = zoo.expert_ids.index(next(
        e for e, s in zip(zoo.expert_ids, zoo.expert_source_embeddings, strict=True) if s is None))
    for head in generic.shortlist(zoo.task_embeddings):
        assert generic_index in head and head.size in (1, 2)


def test_fusion_weight_is_chosen_on_training_tasks_only(zoo):
    """A score that tracks the training tasks' errors earns weight; one that runs against
    them earns none. Held-out tasks whose score lies cannot change the learned fusion, so
    there the recommender follows the lie: nothing was tuned to them."""
    n = len(zoo.errors)
    train, test = np.arange(n) % 4 != 0, np.arange(n) % 4 == 0
    honest = fitted_on(zoo, train, -zoo.errors)
    assert honest.fusion_.weight > 0
    liar = fitted_on(zoo, train, zoo.errors)
    assert liar.fusion_.weight == 0.0
    lie = scores_context(zoo.errors[test])  # high score = high error on the held-out tasks
    picks = honest.rank(zoo.task_embeddings[test], **lie)[:, 0]
    heads = honest.shortlist(zoo.task_embeddings[test])
    worst_in_head = [h[np.argmax(zoo.errors[test][j, h])] for j, h in enumerate(heads)]
    if math.isinf(honest.fusion_.weight):
        np.testing.assert_array_equal(picks, worst_in_head)
    refit = fitted_on(zoo, train, -zoo.errors)
    assert refit.fusion_ == honest.fusion_  # deterministic, and the lie was never seen


def fitted_on(zoo, rows: np.ndarray, scores: np.ndarray) -> ShortlistRecommender:
    return ShortlistRecommender(k=3, score_sets=[("logme",)], inner_folds=3, **EPOCHS).fit(
        zoo.task_embeddings[rows], zoo.errors[rows], zoo.expert_source_embeddings,
        zoo.expert_ids, **scores_context(scores[rows]))


def test_the_evaluation_counts_the_passes_its_fitted_copies_spent(zoo):
    n_tasks, n_experts = zoo.errors.shape
    context = scores_context(-zoo.errors)
    selectors = {
        "k3": ShortlistRecommender(k=3, score_sets=[("logme",)], **EPOCHS),
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
    # the re-ranking by a perfect score cannot lose to MODEL2VEC alone on any task
    ri = {n: np.asarray(r.relative_increase_pct) for n, r in result.reports.items()}
    assert (ri["k3"] <= ri["Model2Vec"] + 1e-9).all()


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


def test_the_screen_brings_a_winner_model2vec_missed_onto_the_shortlist(zoo):
    """MODEL2VEC ranks expert x last; the screen says x is best, and the full score agrees:
    with the screen, x is shortlisted and ranked first, and the pass ledger counts the screen."""
    n_experts = len(zoo.expert_ids)
    screens = list(-zoo.errors)  # a screen that tracks the errors, for the scale
    train = {**scores_context(-zoo.errors), "screen_scores": screens}
    rec = ShortlistRecommender(k=2, screen_weight=math.inf, score_sets=[("logme",)],
                               **EPOCHS).fit(zoo.task_embeddings, zoo.errors,
                                             zoo.expert_source_embeddings, zoo.expert_ids,
                                             **train)
    task = zoo.task_embeddings[:1]
    order = np.argsort(-rec.log_p(task)[0], kind="stable")
    missed = order[-1]
    screen = np.zeros(n_experts)
    screen[missed] = 1.0
    full = np.zeros(n_experts)
    full[missed] = 2.0
    plain = rec.rank(task, **scores_context(full[None, :]))[0]  # no screen: MODEL2VEC's head
    assert set(plain[:2]) == set(order[:2]) and plain[-1] == missed
    ranked = rec.rank(task, **scores_context(full[None, :]), screen_scores=[screen],
                      screen_passes=[0.75])[0]
    assert ranked[0] == missed and ranked[1] == order[0]
    assert rec.ledger.tasks == 2 and rec.ledger.passes == pytest.approx(2 + 2 + 0.75)


def test_the_screen_reads_a_few_images_per_class_and_says_what_it_cost():
    labels = np.repeat([0, 1, 2], [10, 6, 2])
    idx = screen_subset(labels, 3, seed=0)
    assert np.bincount(labels[idx]).tolist() == [3, 3, 2]
    np.testing.assert_array_equal(idx, screen_subset(labels, 3, seed=0))
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.ones(4), size=labels.size) for _ in range(5)] + [None]
    screen = screen_context({"source_probs": [probs], "labels": [labels]}, per_class=3)
    assert screen["screen_passes"] == [pytest.approx(6 * 8 / 18)]
    assert screen["screen_scores"][0][0] == pytest.approx(leep(probs[0][idx], labels[idx]))
    assert np.isnan(screen["screen_scores"][0][-1])
    assert screen_context({"labels": [labels]}) == {}


def test_the_rerank_score_is_the_one_that_picks_best_on_the_training_tasks(zoo):
    """LogME tracks the training tasks' errors and LEEP runs against them: LogME re-ranks;
    swap them and LEEP does. MODEL2VEC is fitted once (no inner folds)."""
    def fitted_with(logme_sign: float) -> ShortlistRecommender:
        cached = [{"logme": -logme_sign * row, "leep": logme_sign * row} for row in zoo.errors]
        return ShortlistRecommender(k=3, **EPOCHS).fit(
            zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings, zoo.expert_ids,
            transfer_scores=cached)

    assert fitted_with(1.0).fusion_.scores == ("logme",)
    assert fitted_with(-1.0).fusion_.scores == ("leep",)
    assert fitted_with(1.0).fusion_.inner_loss_pct == 0.0  # the errors themselves pick the best
