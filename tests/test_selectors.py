"""Selectors: the shared contract, and what each one ranks by."""

from __future__ import annotations

import numpy as np
import pytest

from t2v_core.embedding.distance import complexity, d_asym, d_sym
from t2v_core.embedding.synthetic_zoo import synthetic_zoo
from t2v_core.recommend.meta_dataset import place_generic_experts
from t2v_core.recommend.selectors import (
    AsymTask2VecSelector,
    BruteForceSelector,
    ChanceSelector,
    FamilyBestSelector,
    GenericSelector,
    LEEPSelector,
    LogMESelector,
    MeanErrorPrior,
    Model2VecSelector,
    NCESelector,
    OracleSelector,
    Selector,
    Task2VecSelector,
    TwoStageSelector,
    rank_by_score,
    top1_relative_increase,
)


@pytest.fixture(scope="module")
def zoo():
    return synthetic_zoo(
        n_clusters=3,
        tasks_per_cluster=6,
        experts_per_cluster=2,
        dim=32,
        source_noise=0.3,
        missing_fraction=0.15,
        n_samples=30,
        random_state=3,
    )


def all_selectors() -> dict[str, Selector]:
    return {
        "chance": ChanceSelector(random_state=1),
        "generic": GenericSelector(),
        "prior": MeanErrorPrior(),
        "prior_rank": MeanErrorPrior(statistic="rank"),
        "prior_relative": MeanErrorPrior(statistic="relative"),
        "task2vec": Task2VecSelector(),
        "asym": AsymTask2VecSelector(),
        "model2vec": Model2VecSelector(max_epochs=60, patience=10),
        "oracle": OracleSelector(),
        "logme": LogMESelector(),
        "leep": LEEPSelector(),
        "nce": NCESelector(),
        "two_stage": TwoStageSelector(Task2VecSelector(), LogMESelector(), top=3),
    }


def split(zoo, n_test: int = 5):
    n = zoo.task_embeddings.shape[0]
    test = np.arange(n) % (n // n_test) == 0
    return np.flatnonzero(~test), np.flatnonzero(test)


def ctx(zoo, idx) -> dict:
    return {k: [v[i] for i in idx] for k, v in zoo.context.items()}


@pytest.mark.parametrize("name", list(all_selectors()))
def test_rows_are_permutations(zoo, name: str) -> None:
    train, test = split(zoo)
    selector = all_selectors()[name].fit(
        zoo.task_embeddings[train],
        zoo.errors[train],
        zoo.expert_source_embeddings,
        zoo.expert_ids,
        **ctx(zoo, train),
    )
    kwargs = ctx(zoo, test)
    if selector.requires_target_errors:
        kwargs["target_errors"] = zoo.errors[test]
    ranks = selector.rank(zoo.task_embeddings[test], **kwargs)
    n_experts = len(zoo.expert_ids)
    assert ranks.shape == (test.size, n_experts)
    assert np.issubdtype(ranks.dtype, np.integer)
    assert (np.sort(ranks, axis=1) == np.arange(n_experts)).all()
    np.testing.assert_array_equal(
        selector.predict(zoo.task_embeddings[test], **kwargs), ranks[:, 0]
    )


def fit(selector: Selector, zoo, errors=None) -> Selector:
    return selector.fit(
        zoo.task_embeddings,
        zoo.errors if errors is None else errors,
        zoo.expert_source_embeddings,
        zoo.expert_ids,
    )


def test_chance_depends_only_on_seed_and_task(zoo) -> None:
    chance = fit(ChanceSelector(random_state=5), zoo)
    tasks = zoo.task_embeddings
    together = chance.rank(tasks)
    alone = np.concatenate([chance.rank(t) for t in tasks])
    np.testing.assert_array_equal(together, alone)
    assert len({tuple(r) for r in together}) > 1  # different tasks, different draws
    other = fit(ChanceSelector(random_state=6), zoo).rank(tasks)
    assert not np.array_equal(together, other)


def test_generic_first_then_mean_error(zoo) -> None:
    generic = fit(GenericSelector(), zoo)
    ranks = generic.rank(zoo.task_embeddings[:4])
    g = zoo.generic_index
    assert (ranks[:, 0] == g).all()
    means = np.nanmean(zoo.errors, axis=0)
    rest = [i for i in np.argsort(means, kind="stable") if i != g]
    np.testing.assert_array_equal(ranks[0, 1:], rest)
    by_id = fit(GenericSelector(generic=zoo.expert_ids[0]), zoo)
    assert by_id.rank(zoo.task_embeddings[:1])[0, 0] == 0
    with pytest.raises(ValueError):
        GenericSelector().fit(
            zoo.task_embeddings, zoo.errors[:, :-1], zoo.expert_source_embeddings[:-1]
        )  # no expert lacks a source


def test_mean_error_prior(zoo) -> None:
    errors = np.array([[0.1, 0.5, np.nan], [0.3, 0.2, 0.9], [0.2, 0.4, 0.1]])
    emb = zoo.task_embeddings[:3]
    sources = zoo.expert_source_embeddings[:3]
    prior = MeanErrorPrior().fit(emb, errors, sources)
    # Means ignoring missing cells: 0.2, 0.367, 0.5.
    np.testing.assert_array_equal(prior.rank(emb), [[0, 1, 2]] * 3)
    by_rank = MeanErrorPrior(statistic="rank").fit(emb, errors, sources)
    # Per-task ranks: [0,1,-], [1,0,2], [1,2,0] -> means 0.67, 1.0, 1.0.
    np.testing.assert_array_equal(by_rank.rank(emb)[0], [0, 1, 2])
    with pytest.raises(ValueError):
        MeanErrorPrior(statistic="median").fit(emb, errors, sources)


def test_task2vec_nearest_source(zoo) -> None:
    t2v = fit(Task2VecSelector(), zoo)
    tasks = zoo.task_embeddings
    ranks = t2v.rank(tasks)
    sources = t2v.sources_
    expected = np.argsort(d_sym(sources, tasks).T, axis=1, kind="stable")
    np.testing.assert_array_equal(ranks, expected)
    missing = np.array([e is None for e in zoo.expert_source_embeddings])
    filled = np.stack([tasks.mean(0) if e is None else e for e in zoo.expert_source_embeddings])
    placed, _ = place_generic_experts(tasks, zoo.errors, filled, missing)
    np.testing.assert_allclose(sources, placed)


def _generic_wins_one_family(tasks_per_cluster: int = 10):
    """A zoo whose generic expert is clearly the best on family0 and clearly not elsewhere."""
    zoo = synthetic_zoo(n_clusters=3, tasks_per_cluster=tasks_per_cluster, experts_per_cluster=2,
                        dim=32, generic_gap=0.8, random_state=5)
    errors = zoo.errors.copy()
    fam0 = np.array([f == "family0" for f in zoo.families])
    specialists = np.delete(errors, zoo.generic_index, axis=1)
    errors[fam0, zoo.generic_index] = 0.5 * np.nanmin(specialists[fam0], axis=1)
    return zoo, errors, fam0


def test_generic_expert_sits_where_it_wins() -> None:
    """Fitted on some tasks of each family, the generic expert's place is learnt where it
    wins (family0), so held-out family0 tasks mostly get it first (a family0 specialist's
    source can still be nearer to one) and the others never do; at the mean training task it
    would be first nowhere. Asym Task2Vec places it with its own distance: there too, at the
    centre of the tasks it wins."""
    zoo, errors, fam0 = _generic_wins_one_family()
    train = np.arange(len(zoo.families)) % 2 == 0
    g = zoo.generic_index
    fitted = Task2VecSelector().fit(zoo.task_embeddings[train], errors[train],
                                    zoo.expert_source_embeddings, zoo.expert_ids)
    picks = fitted.predict(zoo.task_embeddings[~train])
    assert (picks[fam0[~train]] == g).mean() >= 0.8
    assert (picks[~fam0[~train]] != g).all()
    at_mean = fit(Task2VecSelector(), zoo, errors)
    at_mean.sources_[g] = zoo.task_embeddings[train].mean(axis=0)
    assert (at_mean.predict(zoo.task_embeddings[~train])[fam0[~train]] != g).all()
    asym = AsymTask2VecSelector().fit(zoo.task_embeddings[train], errors[train],
                                      zoo.expert_source_embeddings, zoo.expert_ids)
    centre = zoo.task_embeddings[train & fam0].mean(axis=0)
    np.testing.assert_allclose(asym.sources_[g], centre)
    assert (asym.predict(zoo.task_embeddings[train & fam0]) == g).all()


def test_generic_place_keeps_the_mean_without_evidence(zoo) -> None:
    """A generic expert that is never close to best gains nothing from moving: ties keep the
    mean training task."""
    errors = zoo.errors.copy()
    errors[:, zoo.generic_index] = 0.99
    fitted = fit(Task2VecSelector(), zoo, errors)
    np.testing.assert_allclose(fitted.sources_[zoo.generic_index], zoo.task_embeddings.mean(0))


def test_asym_alpha_from_training_tasks(zoo) -> None:
    asym = fit(AsymTask2VecSelector(), zoo)
    assert asym.alpha_ in asym.alpha_losses_
    assert asym.alpha_losses_[asym.alpha_] == min(asym.alpha_losses_.values())
    ranks = asym.rank(zoo.task_embeddings)
    expected = d_asym(asym.sources_, zoo.task_embeddings, t0=asym.t0_, alpha=asym.alpha_).T
    np.testing.assert_array_equal(ranks, np.argsort(expected, axis=1, kind="stable"))
    zero = fit(AsymTask2VecSelector(alphas=(0.0,)), zoo)
    np.testing.assert_array_equal(
        zero.rank(zoo.task_embeddings), fit(Task2VecSelector(), zoo).rank(zoo.task_embeddings)
    )


def test_asym_alpha_follows_the_matrix() -> None:
    """A flat source A is nearer every task than a complex source B. If the matrix says B
    transfers better, the fitted α must be large enough to rank B first everywhere; if it
    says A, α must stay below the smallest value that would flip any task."""
    rng = np.random.default_rng(0)
    simple = np.exp(rng.normal(scale=0.2, size=16))
    complex_ = np.exp(rng.normal(loc=1.0, scale=1.0, size=16))
    sources = [simple, complex_]
    tasks = np.exp(rng.normal(scale=0.5, size=(12, 16)))
    grid = np.round(np.linspace(0.0, 3.0, 61), 2)
    b_better = np.tile([0.5, 0.3], (12, 1))
    asym = AsymTask2VecSelector(alphas=grid).fit(tasks, b_better, sources)
    c = complexity(np.stack(sources), asym.t0_)
    d = d_sym(np.stack(sources), tasks).T
    flip = (d[:, 1] - d[:, 0]) / (c[1] - c[0])  # α above which B outranks A on each task
    assert (d[:, 0] < d[:, 1]).all() and c[1] > c[0] and 0 < flip.min() and flip.max() < 3
    assert asym.alpha_ >= flip.max()
    assert (asym.predict(tasks) == 1).all()
    a_better = b_better[:, ::-1]
    asym = AsymTask2VecSelector(alphas=grid).fit(tasks, a_better, sources)
    assert asym.alpha_ < flip.min()
    assert (asym.predict(tasks) == 0).all()


def test_asym_alpha_is_positive_where_complex_sources_transfer_better() -> None:
    """Each family has a simple expert (a faint source, Fisher 10× below the family's) whose
    source profile is the nearer one, and a complex expert (10× above) that is better on every
    task: α = 0 picks the simple one, so α fitted on training tasks must be > 0, and it must
    carry over to held-out tasks."""
    rng = np.random.default_rng(1)
    centres = np.exp(rng.normal(0.0, 1.5, size=(3, 48)))
    tasks = np.concatenate([c * np.exp(rng.normal(0.0, 0.3, size=(8, 48))) for c in centres])
    family = np.repeat(np.arange(3), 8)
    simple = [0.1 * c * np.exp(rng.normal(0.0, 0.1, size=48)) for c in centres]
    rich = [10.0 * c * np.exp(rng.normal(0.0, 0.6, size=48)) for c in centres]
    sources = simple + rich  # expert k simple, expert 3 + k complex, of family k
    errors = np.full((24, 6), 0.6)
    errors[np.arange(24), family] = 0.3
    errors[np.arange(24), 3 + family] = 0.2
    train = np.arange(24) % 2 == 0
    asym = AsymTask2VecSelector().fit(tasks[train], errors[train], sources)
    assert (Task2VecSelector().fit(tasks[train], errors[train], sources).predict(tasks)
            == family).mean() > 0.5  # without the complexity term the simple expert wins
    assert asym.alpha_ > 0
    assert asym.alpha_losses_[asym.alpha_] < asym.alpha_losses_[0.0]
    assert (asym.predict(tasks[~train]) == 3 + family[~train]).all()


def test_fits_take_the_error_floor_they_are_given(zoo) -> None:
    """α is chosen by the mean relative increase with the selector's own floor, the one the
    evaluation passes (and MeanErrorPrior's relative statistic uses it too)."""
    for floor in (1e-3, 0.05):
        asym = fit(AsymTask2VecSelector(error_floor=floor), zoo)
        ranks = rank_by_score(d_asym(asym.sources_, zoo.task_embeddings, t0=asym.t0_,
                                     alpha=asym.alpha_).T, higher_is_better=False)
        assert asym.alpha_losses_[asym.alpha_] == pytest.approx(
            np.nanmean(top1_relative_increase(zoo.errors, ranks, floor)))
    errors = np.array([[0.0, 0.01], [0.2, 0.1]])
    emb, sources = np.ones((2, 3)), [np.ones(3), np.ones(3)]
    loose = MeanErrorPrior(statistic="relative", error_floor=0.1).fit(emb, errors, sources)
    tight = MeanErrorPrior(statistic="relative", error_floor=1e-3).fit(emb, errors, sources)
    np.testing.assert_allclose(loose.mean_, [0.5, 0.05])  # (0 + 0.1/0.1)/2, (0.01/0.1 + 0)/2
    np.testing.assert_allclose(tight.mean_, [0.5, 5.0])


def test_oracle_reads_only_target_errors(zoo) -> None:
    oracle = fit(OracleSelector(), zoo)
    with pytest.raises(ValueError):
        oracle.rank(zoo.task_embeddings[:2])
    ranks = oracle.rank(zoo.task_embeddings[:2], target_errors=zoo.errors[:2])
    for r, row in zip(ranks, zoo.errors[:2], strict=True):
        observed = row[r][np.isfinite(row[r])]
        assert (np.diff(observed) >= 0).all() and np.isnan(row[r][observed.size :]).all()
    assert (
        top1_relative_increase(
            zoo.errors, oracle.rank(zoo.task_embeddings, target_errors=zoo.errors)
        ).max()
        == 0.0
    )


def test_brute_force_ranks_by_validation_errors_only(zoo) -> None:
    brute = fit(BruteForceSelector(), zoo)
    tasks = zoo.task_embeddings[:4]
    with pytest.raises(ValueError, match="val_errors"):
        brute.rank(tasks)
    # A perfect validation split makes brute force the oracle.
    exact = np.nan_to_num(zoo.errors[:4], nan=0.99)
    oracle = fit(OracleSelector(), zoo).rank(tasks, target_errors=exact)
    assert (brute.rank(tasks, val_errors=exact) == oracle).all()
    # A noisy one is followed, not the test errors: reversed validation errors reverse the pick.
    flipped = 1.0 - exact
    ranks = brute.rank(tasks, val_errors=flipped, target_errors=exact)
    assert (ranks[:, 0] == np.argmax(exact, axis=1)).all()
    assert sorted(ranks[0].tolist()) == list(range(len(zoo.expert_ids)))
    missing = exact.copy()
    missing[:, 0] = np.nan
    assert (brute.rank(tasks, val_errors=missing)[:, -1] == 0).all()


def per_expert_context(quality: list[float], n: int = 60, seed: int = 0) -> dict:
    """One task; each expert's features and source head carry signal in proportion to quality."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    means = rng.normal(size=(3, 6))
    feats, probs = [], []
    for q in quality:
        feats.append(3 * q * means[y] + rng.normal(size=(n, 6)))
        logits = 5 * q * np.eye(4)[y] + rng.normal(size=(n, 4))
        p = np.exp(logits)
        probs.append(p / p.sum(axis=1, keepdims=True))
    return {"labels": [y], "features": [feats], "source_probs": [probs]}


@pytest.mark.parametrize("cls", [LogMESelector, LEEPSelector, NCESelector])
def test_transferability_selectors_rank_informative_experts_first(cls) -> None:
    quality = [0.0, 1.0, 0.3]
    context = per_expert_context(quality)
    emb = np.ones((1, 4))
    selector = cls().fit(emb, np.full((1, 3), 0.5), [np.ones(4)] * 3)
    ranks = selector.rank(emb, **context)
    np.testing.assert_array_equal(ranks[0], [1, 2, 0])
    # An expert that was not run on the task ranks last.
    context["features"][0][1] = None
    context["source_probs"][0][1] = None
    assert selector.rank(emb, **context)[0, -1] == 1
    with pytest.raises(ValueError):
        selector.rank(emb)


def test_nce_uses_source_labels_when_given() -> None:
    context = per_expert_context([0.0, 1.0, 0.3])
    labels = [[p.argmax(axis=1) for p in context["source_probs"][0]]]
    emb = np.ones((1, 4))
    nce = NCESelector().fit(emb, np.full((1, 3), 0.5), [np.ones(4)] * 3)
    np.testing.assert_array_equal(
        nce.rank(emb, labels=context["labels"], source_labels=labels), nce.rank(emb, **context)
    )


def test_two_stage_reorders_only_the_head(zoo) -> None:
    first = fit(Task2VecSelector(), zoo)
    two = fit(TwoStageSelector(Task2VecSelector(), LogMESelector(), top=3), zoo)
    context = zoo.context
    base = first.rank(zoo.task_embeddings)
    ranks = two.rank(zoo.task_embeddings, **context)
    np.testing.assert_array_equal(ranks[:, 3:], base[:, 3:])
    np.testing.assert_array_equal(np.sort(ranks[:, :3], axis=1), np.sort(base[:, :3], axis=1))
    logme = fit(LogMESelector(), zoo).rank(zoo.task_embeddings, **context)
    for r, full in zip(ranks, logme, strict=True):
        assert list(r[:3]) == [i for i in full if i in set(r[:3])]


def test_rank_by_score_puts_nan_last() -> None:
    np.testing.assert_array_equal(
        rank_by_score(np.array([[0.2, np.nan, 0.9, 0.2]]), higher_is_better=True), [[2, 0, 3, 1]]
    )
    np.testing.assert_array_equal(
        rank_by_score(np.array([[0.2, np.nan, 0.9, 0.2]]), higher_is_better=False), [[0, 3, 2, 1]]
    )


def test_family_best_ranks_by_the_familys_mean_relative_increase() -> None:
    """Worked by hand: family a's tasks are solved best by expert 1, family b's by expert 2;
    a family it never saw gets the order of the mean over all training tasks."""
    errors = np.array([[0.3, 0.1, 0.2], [0.4, 0.2, 0.3], [0.2, 0.3, 0.1], [0.5, 0.4, 0.2]])
    embeddings, sources = np.ones((4, 3)), np.ones((3, 3))
    selector = FamilyBestSelector(error_floor=0.02).fit(
        embeddings, errors, sources, families=["a", "a", "b", "b"])
    ranks = selector.rank(np.ones((3, 3)), families=["a", "b", "c"])
    # mean relative increases — a: (1.5, 0, 0.75); b: (1.25, 1.5, 0); all: (1.375, 0.75, 0.375)
    np.testing.assert_array_equal(ranks, [[1, 2, 0], [2, 0, 1], [2, 1, 0]])
    with pytest.raises(ValueError, match="families"):
        selector.rank(np.ones((1, 3)))
    with pytest.raises(ValueError, match="families"):
        FamilyBestSelector().fit(embeddings, errors, sources, families=["a"])


def test_selectors_learn_through_the_fit_hook(zoo) -> None:
    """``fit`` is the base class's alone: it checks the data, keeps the zoo's shape, then
    hands float64 arrays and the context to ``_fit``, the one method a selector overrides."""
    import inspect

    from t2v_core.recommend import selectors as module

    concrete = [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                if issubclass(cls, Selector) and cls is not Selector]
    assert len(concrete) >= 12
    assert [cls.__name__ for cls in concrete if "fit" in vars(cls)] == []

    class Recorder(Selector):
        def _fit(self, tasks, errors, expert_source_embeddings, **context):
            self.seen = (tasks, errors, expert_source_embeddings, context, self.n_experts_)

        def rank(self, task_embeddings, **context):
            return np.tile(np.arange(self.n_experts_), (self._n_tasks(task_embeddings), 1))

    recorder = Recorder()
    tasks = zoo.task_embeddings[:4].astype(np.float32)
    assert recorder.fit(tasks, zoo.errors[:4].tolist(), zoo.expert_source_embeddings,
                        zoo.expert_ids, families=["a"] * 4) is recorder
    seen_tasks, seen_errors, sources, context, n_experts = recorder.seen
    assert seen_tasks.dtype == np.float64 and seen_errors.dtype == np.float64
    np.testing.assert_array_equal(seen_errors, zoo.errors[:4])
    assert sources is zoo.expert_source_embeddings and context == {"families": ["a"] * 4}
    assert n_experts == len(zoo.expert_ids) and recorder.expert_ids_ == zoo.expert_ids
    unchecked = Recorder()
    with pytest.raises(ValueError, match="columns"):  # checked before the hook runs
        unchecked.fit(tasks, zoo.errors[:4, :-1], zoo.expert_source_embeddings)
    assert not hasattr(unchecked, "seen")
