"""Meta-task evaluation: metrics, the cross-validation protocol and its leakage guard,
diagnostics and reports."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from t2v_core.embedding.synthetic_zoo import synthetic_zoo
from t2v_core.recommend.diagnostics import family_recovery, norm_vs_difficulty
from t2v_core.recommend.metrics import (
    bootstrap_mean_ci,
    expected_chance,
    relative_increase,
    task_metrics,
)
from t2v_core.recommend.protocol import (
    EvaluationResult,
    check_ranking,
    data_efficiency,
    evaluate_selectors,
    task_splits,
)
from t2v_core.recommend.report import data_efficiency_markdown, to_json, to_markdown
from t2v_core.recommend.selectors import (
    AsymTask2VecSelector,
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
)

log = logging.getLogger(__name__)
M2V = {"max_epochs": 150, "patience": 20}


def selectors(with_transferability: bool = False) -> dict[str, Selector]:
    out: dict[str, Selector] = {
        "oracle": OracleSelector(),
        "chance": ChanceSelector(),
        "generic": GenericSelector(),
        "mean_error_prior": MeanErrorPrior(),
        "task2vec": Task2VecSelector(),
        "asym_task2vec": AsymTask2VecSelector(),
        "model2vec": Model2VecSelector(**M2V),
    }
    if with_transferability:
        out |= {"logme": LogMESelector(), "leep": LEEPSelector(), "nce": NCESelector()}
    return out


@pytest.fixture(scope="module")
def zoo():
    return synthetic_zoo(
        n_clusters=4,
        tasks_per_cluster=10,
        experts_per_cluster=2,
        dim=64,
        source_noise=0.3,
        missing_fraction=0.1,
        random_state=0,
    )


@pytest.fixture(scope="module")
def result(zoo) -> EvaluationResult:
    return evaluate_selectors(
        selectors(),
        zoo.task_embeddings,
        zoo.errors,
        zoo.expert_source_embeddings,
        zoo.expert_ids,
        zoo.families,
        folds=5,
    )


def mixed(result: EvaluationResult, name: str) -> float:
    return result.reports[name].by_meta_task["Mixed"].relative_increase_pct


def test_synthetic_zoo_recommendation(result) -> None:
    log.info("\n%s", to_markdown(result))
    for meta, scores in result.reports["oracle"].by_meta_task.items():
        assert scores.relative_increase_pct == 0.0, meta
        assert scores.top1_hit_rate == 1.0
        assert all(v == 0.0 for v in scores.regret_at_k_pct.values())
    chance, generic = mixed(result, "chance"), mixed(result, "generic")
    assert mixed(result, "model2vec") < 0.5 * chance
    assert mixed(result, "model2vec") < 0.5 * generic
    assert mixed(result, "model2vec") < mixed(result, "mean_error_prior")
    assert mixed(result, "asym_task2vec") < 0.5 * chance
    m2v = result.reports["model2vec"].by_meta_task["Mixed"]
    assert m2v.top1_hit_rate > result.reports["chance"].by_meta_task["Mixed"].top1_hit_rate
    assert m2v.weighted_tau > result.reports["mean_error_prior"].by_meta_task["Mixed"].weighted_tau
    # The sampled chance selector sits near the exact chance level.
    assert chance == pytest.approx(result.expected_chance_pct["Mixed"], rel=0.5)
    assert set(result.meta_tasks) == {"family0", "family1", "family2", "family3", "Mixed"}


def test_each_ranking_is_the_selectors_own_for_its_fold(result, zoo) -> None:
    """Refit every selector on each fold's training tasks by hand: the evaluator must store
    exactly the rankings that selector gives the fold's held-out tasks, in their rows."""
    folds = task_splits(len(zoo.families), 5, random_state=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(zoo.families)))
    by_hand = {name: np.full((len(zoo.families), len(zoo.expert_ids)), -1)
               for name in result.reports}
    for test in folds:
        train = np.setdiff1d(np.arange(len(zoo.families)), test)
        for name, selector in selectors().items():
            selector.fit(zoo.task_embeddings[train], zoo.errors[train],
                         zoo.expert_source_embeddings, zoo.expert_ids)
            extra = {"target_errors": zoo.errors[test]} if selector.requires_target_errors else {}
            by_hand[name][test] = selector.rank(zoo.task_embeddings[test], **extra)
    for name, report in result.reports.items():
        np.testing.assert_array_equal(report.rankings, by_hand[name], err_msg=name)


def test_poisoned_held_out_row_changes_no_pick() -> None:
    """Leave-one-task-out: overwrite task j's matrix row with noise. Every selector's ranking
    of task j itself must be unchanged (only the oracle may read that row)."""
    zoo = synthetic_zoo(
        n_clusters=3,
        tasks_per_cluster=4,
        experts_per_cluster=2,
        dim=32,
        n_samples=20,
        random_state=4,
    )
    args = (zoo.expert_source_embeddings, zoo.expert_ids, zoo.families)
    sel = selectors(with_transferability=True)
    clean = evaluate_selectors(
        sel, zoo.task_embeddings, zoo.errors, *args, folds="loo", context=zoo.context
    )
    j = 5
    poisoned = zoo.errors.copy()
    poisoned[j] = np.random.default_rng(0).uniform(0, 1, size=poisoned.shape[1])
    assert np.argmin(poisoned[j]) != np.argmin(zoo.errors[j])  # the oracle's pick does move
    dirty = evaluate_selectors(
        sel, zoo.task_embeddings, poisoned, *args, folds="loo", context=zoo.context
    )
    for name in sel:
        same = clean.reports[name].rankings[j] == dirty.reports[name].rankings[j]
        assert same == (name != "oracle"), name


class Spy(Selector):
    """Records what the evaluator hands it."""

    name = "spy"
    seen: list[tuple[np.ndarray, dict]] = []

    def _fit(self, tasks, errors, expert_source_embeddings, **context):
        self.train_errors = errors

    def rank(self, task_embeddings, **context):
        Spy.seen.append((self.train_errors, context))
        return np.tile(np.arange(self.n_experts_), (len(task_embeddings), 1))


def test_fit_sees_only_training_rows(zoo) -> None:
    Spy.seen = []
    errors = zoo.errors.copy()
    errors[np.isnan(errors)] = 0.5
    n_tasks = errors.shape[0]
    context = {"labels": [np.array([t]) for t in range(n_tasks)]}
    evaluate_selectors(
        {"spy": Spy()},
        zoo.task_embeddings,
        errors,
        zoo.expert_source_embeddings,
        folds=4,
        context=context,
    )
    assert len(Spy.seen) == 4
    for train_errors, ctx in Spy.seen:
        assert "target_errors" not in ctx
        held_out = [int(lab[0]) for lab in ctx["labels"]]
        assert train_errors.shape[0] == n_tasks - len(held_out)
        for t in held_out:  # no held-out row appears among the training rows
            assert not (train_errors == errors[t]).all(axis=1).any()


def test_evaluator_rejects_bad_rankings_and_context(zoo) -> None:
    class Broken(Spy):
        def rank(self, task_embeddings, **context):
            return np.zeros((len(task_embeddings), self.n_experts_), dtype=int)

    class Short(Spy):
        def rank(self, task_embeddings, **context):
            return super().rank(task_embeddings)[:, :-1]

    args = (zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings)
    with pytest.raises(ValueError, match="selector 'broken' .* not permutations of experts"):
        evaluate_selectors({"spy": Spy(), "broken": Broken()}, *args, folds=2)
    with pytest.raises(ValueError, match=r"selector 'short' returned shape \(\d+, 8\)"):
        evaluate_selectors({"short": Short()}, *args, folds=2)
    with pytest.raises(ValueError, match="target_errors"):
        evaluate_selectors(
            {"spy": Spy()}, *args, folds=2, context={"target_errors": list(zoo.errors)}
        )
    with pytest.raises(ValueError):
        evaluate_selectors({"spy": Spy()}, *args, folds=1)


def test_task_metrics_by_hand() -> None:
    row = np.array([0.20, 0.10, np.nan, 0.40, 0.25])
    m = task_metrics(row, [2, 0, 3, 1, 4], ks=(1, 3))
    # Expert 2 is missing, so the first scored pick is expert 0: (0.2 − 0.1) / 0.1.
    assert m["relative_increase_pct"] == pytest.approx(100.0)
    assert m["hit"] is False
    assert m["regret_at_k_pct"] == {1: pytest.approx(100.0), 3: pytest.approx(0.0)}
    perfect = task_metrics(row, [1, 0, 4, 3, 2])
    assert perfect["hit"] and perfect["kendall_tau"] == pytest.approx(1.0)
    assert perfect["weighted_tau"] == pytest.approx(1.0)
    reverse = task_metrics(row, [3, 4, 0, 1, 2])
    assert reverse["kendall_tau"] == pytest.approx(-1.0)
    assert task_metrics(np.full(3, np.nan), [0, 1, 2]) is None
    floor = task_metrics(np.array([0.0, 0.01]), [1, 0], error_floor=1e-3)
    assert floor["relative_increase_pct"] == pytest.approx(1000.0)
    ties = task_metrics(np.array([0.1, 0.1]), [1, 0])
    assert ties["hit"] and math.isnan(ties["kendall_tau"])


def test_meta_tasks_and_missing_rows(zoo) -> None:
    errors = zoo.errors.copy()
    errors[0] = np.nan  # a task without any observed error is not scored
    res = evaluate_selectors(
        {"prior": MeanErrorPrior(), "oracle": OracleSelector()},
        zoo.task_embeddings,
        errors,
        zoo.expert_source_embeddings,
        zoo.expert_ids,
        zoo.families,
        folds=3,
        meta_tasks={"fam01": ["family0", "family1"]},
    )
    assert list(res.meta_tasks) == ["fam01", "Mixed"]
    assert res.reports["prior"].by_meta_task["fam01"].n_tasks == 19
    assert res.reports["prior"].by_meta_task["Mixed"].n_tasks == 39
    assert math.isnan(res.reports["prior"].relative_increase_pct[0])


def test_norm_vs_difficulty() -> None:
    rng = np.random.default_rng(0)
    emb = np.exp(rng.normal(size=(20, 8)))
    norms = np.linalg.norm(emb, axis=1)
    errors = np.stack([0.01 * norms, 0.02 * norms + 0.1], axis=1)  # best = column 0
    anti = norm_vs_difficulty(emb, 1.0 / errors)  # best = column 1, falling with the norm
    errors[3, 1] = np.nan
    res = norm_vs_difficulty(emb, errors)
    assert res.spearman == pytest.approx(1.0)
    assert res.n_tasks == 20
    assert anti.spearman == pytest.approx(-1.0)
    json.loads(to_json(res))


def test_family_recovery(zoo) -> None:
    rec = family_recovery(zoo.task_embeddings, zoo.families)
    assert rec.accuracy == 1.0 and set(rec.per_family) == set(zoo.families)
    assert rec.chance_accuracy == pytest.approx(4 * 10 * 9 / (40 * 39))
    assert family_recovery(zoo.task_embeddings, zoo.families, distance="d_asym").accuracy > 0.9
    shuffled = np.random.default_rng(0).permutation(zoo.families)
    assert family_recovery(zoo.task_embeddings, shuffled).accuracy < 0.6
    with pytest.raises(ValueError):
        family_recovery(zoo.task_embeddings, zoo.families, distance="l2")


def test_reports(result) -> None:
    text = to_markdown(result)
    for number in (
        "+59.52%",
        "+30.18%",
        "+42.54%",
        "+9.97%",
        "+6.81%",
        "+112.49%",
        "+75.73%",
        "+40.30%",
        "+29.23%",
        "+27.81%",
    ):
        assert number in text
    model_row = next(line for line in text.splitlines() if line.startswith("| model2vec |"))
    assert model_row.rstrip(" |").endswith("+27.81%")
    assert "weighted τ" in text and "expected chance" in text
    assert "+59.52%" not in to_markdown(result, paper=False)
    data = json.loads(to_json(result))
    assert data["reports"]["oracle"]["by_meta_task"]["Mixed"]["relative_increase_pct"] == 0.0
    assert len(data["reports"]["model2vec"]["rankings"]) == 40
    low, high = data["reports"]["model2vec"]["by_meta_task"]["Mixed"]["relative_increase_ci95_pct"]
    mixed = result.reports["model2vec"].by_meta_task["Mixed"]
    assert low <= mixed.relative_increase_pct <= high
    assert f"{_fmt_pct(low)} … {_fmt_pct(high)}" in text


def _fmt_pct(value: float) -> str:
    return f"+{value:.2f}%"


def test_bootstrap_interval_of_a_mean() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(20.0, 10.0, size=400)
    low, high = bootstrap_mean_ci(values)
    # the normal-theory interval: mean ± 1.96 s/√n
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)
    assert low == pytest.approx(values.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.15 * half)
    assert bootstrap_mean_ci(values) == (low, high)  # deterministic
    # a quarter of the tasks: an interval about twice as wide
    q_low, q_high = bootstrap_mean_ci(values[:100])
    assert 1.6 < (q_high - q_low) / (high - low) < 2.5
    # NaN tasks (no observed error) are dropped; constant values give a point
    assert bootstrap_mean_ci([5.0, 5.0, math.nan]) == (5.0, 5.0)
    assert all(math.isnan(v) for v in bootstrap_mean_ci([math.nan]))


def test_data_efficiency(zoo) -> None:
    small = synthetic_zoo(
        n_clusters=4,
        tasks_per_cluster=10,
        experts_per_cluster=2,
        dim=64,
        source_noise=0.3,
        noise=0.2,
        random_state=0,
    )
    zoos = {100: (small.task_embeddings, small.errors), 1000: (zoo.task_embeddings, zoo.errors)}
    results = data_efficiency(
        {"task2vec": Task2VecSelector(), "prior": MeanErrorPrior()},
        zoos,
        zoo.expert_source_embeddings,
        zoo.expert_ids,
        zoo.families,
        folds=4,
    )
    assert list(results) == [100, 1000]
    table = data_efficiency_markdown(results)
    assert "| selector | 100 | 1000 |" in table and "| task2vec |" in table


def test_data_efficiency_scores_each_size_with_its_own_context() -> None:
    # the same tasks and matrix at two sizes; the transferability inputs have 8 or 60 images
    few, many = (synthetic_zoo(n_clusters=3, tasks_per_cluster=4, experts_per_cluster=2, dim=16,
                               n_samples=n, random_state=0) for n in (8, 60))
    np.testing.assert_array_equal(few.errors, many.errors)
    zoos = {8: (few.task_embeddings, few.errors), 60: (many.task_embeddings, many.errors)}
    contexts = {8: few.context, 60: many.context}
    chosen = {"logme": LogMESelector(), "leep": LEEPSelector(), "oracle": OracleSelector()}
    args = (zoos, few.expert_source_embeddings, few.expert_ids, few.families)
    results = data_efficiency(chosen, *args, contexts=contexts, folds=3)

    def rankings(result: EvaluationResult) -> dict[str, list[list[int]]]:
        return {name: rep.rankings for name, rep in result.reports.items()}

    for size, zoo in ((8, few), (60, many)):
        alone = evaluate_selectors(chosen, zoo.task_embeddings, zoo.errors,
                                   zoo.expert_source_embeddings, zoo.expert_ids, zoo.families,
                                   folds=3, context=contexts[size])
        assert rankings(results[size]) == rankings(alone)
    assert rankings(results[8]) != rankings(results[60])  # so the check above can tell them apart

    # one context for every size, as before
    shared = data_efficiency(chosen, *args, context=many.context, folds=3)
    assert rankings(shared[8]) == rankings(shared[60]) == rankings(results[60])
    with pytest.raises(ValueError, match="not both"):
        data_efficiency(chosen, *args, contexts=contexts, context=many.context)
    with pytest.raises(ValueError, match=r"no context for size\(s\) \[60\]"):
        data_efficiency(chosen, *args, contexts={8: few.context})


def _cheap_selectors() -> dict[str, Selector]:
    """Selectors fitted on the training tasks (so the fold assignment matters), and cheap."""
    return {"prior": MeanErrorPrior(), "asym": AsymTask2VecSelector(),
            "chance": ChanceSelector(), "oracle": OracleSelector()}


def _evaluate(zoo, **kwargs) -> EvaluationResult:
    return evaluate_selectors(_cheap_selectors(), zoo.task_embeddings, zoo.errors,
                              zoo.expert_source_embeddings, zoo.expert_ids, zoo.families,
                              folds=4, **kwargs)


def test_one_repeat_is_the_single_split(zoo) -> None:
    plain, once = _evaluate(zoo), _evaluate(zoo, repeats=1)
    assert to_json(plain) == to_json(once) and once.repeats == 1
    assert "repeats" not in to_markdown(once).splitlines()[0]
    # the per-task metrics are those of the one split's rankings
    rep = once.reports["prior"]
    per_task = [task_metrics(zoo.errors[t], r) for t, r in enumerate(rep.rankings)]
    np.testing.assert_allclose(rep.relative_increase_pct,
                               [m["relative_increase_pct"] for m in per_task])
    assert rep.by_meta_task["Mixed"].top1_hit_rate == np.mean([m["hit"] for m in per_task])


def test_repeats_average_each_task_over_fold_assignments(zoo) -> None:
    singles = [_evaluate(zoo, random_state=seed) for seed in (0, 1, 2)]
    repeated = _evaluate(zoo, repeats=3)
    assert repeated.repeats == 3 and json.loads(to_json(repeated))["repeats"] == 3
    assert "folds=4, 3 repeats" in to_markdown(repeated).splitlines()[0]
    increases = {name: np.array([s.reports[name].relative_increase_pct for s in singles])
                 for name in repeated.reports}
    assert np.ptp(increases["prior"], axis=0).max() > 0  # the fold assignment moves a task
    for name, rep in repeated.reports.items():
        np.testing.assert_allclose(rep.relative_increase_pct, increases[name].mean(axis=0))
        assert rep.rankings == singles[0].reports[name].rankings  # the first repeat's

        per_run = [[task_metrics(zoo.errors[t], r) for t, r in enumerate(s.reports[name].rankings)]
                   for s in singles]
        hit_rate = np.mean([np.mean([run[t]["hit"] for run in per_run])
                            for t in range(len(zoo.families))])
        tau = np.array([[run[t]["kendall_tau"] for run in per_run]
                        for t in range(len(zoo.families))])
        with np.errstate(invalid="ignore"):
            tau_per_task = np.nanmean(tau, axis=1)  # all-NaN tasks have no order to recover
        mixed_scores = rep.by_meta_task["Mixed"]
        assert mixed_scores.top1_hit_rate == pytest.approx(hit_rate)
        assert mixed_scores.kendall_tau == pytest.approx(np.nanmean(tau_per_task))
        assert mixed_scores.relative_increase_ci95_pct == bootstrap_mean_ci(
            rep.relative_increase_pct)
    # data_efficiency passes repeats through to every size
    at_sizes = data_efficiency(_cheap_selectors(), {"all": (zoo.task_embeddings, zoo.errors)},
                               zoo.expert_source_embeddings, zoo.expert_ids, zoo.families,
                               folds=4, repeats=3)
    assert to_json(at_sizes["all"]) == to_json(repeated)


def test_repeats_need_a_random_split(zoo) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        _evaluate(zoo, repeats=0)
    with pytest.raises(ValueError, match="leave-one-task-out"):
        evaluate_selectors({"prior": MeanErrorPrior()}, zoo.task_embeddings, zoo.errors,
                           zoo.expert_source_embeddings, folds="loo", repeats=2)


def test_family_best_is_exact_when_each_family_has_one_best_expert() -> None:
    """Held out by folds, the family-best reference finds a family's shared favourite from
    the family's other tasks (zero increase), while the task-level spread is left to chance."""
    rng = np.random.default_rng(0)
    families = [f"f{t % 3}" for t in range(12)]
    errors = rng.uniform(0.4, 0.6, size=(12, 4))
    for t, fam in enumerate(families):
        errors[t, int(fam[1])] = rng.uniform(0.1, 0.2)
    result = evaluate_selectors(
        {"Family best": FamilyBestSelector(), "Chance": ChanceSelector()},
        rng.uniform(size=(12, 5)), errors, [None] * 4, families=families, folds=4,
        context={"families": families},
    )
    mixed = result.table()
    assert mixed["Family best"]["Mixed"] == 0.0
    assert result.reports["Family best"].by_meta_task["Mixed"].top1_hit_rate == 1.0
    assert mixed["Chance"]["Mixed"] > 50.0


def test_relative_increase_by_hand() -> None:
    assert relative_increase(0.3, 0.2, 0.02) == pytest.approx(0.5)
    assert relative_increase(0.3, 0.2, 0.02, percent=True) == pytest.approx(50.0)
    # a best error under the floor divides by the floor
    assert relative_increase(0.05, 0.0, 0.02) == pytest.approx(2.5)
    assert relative_increase(0.05, 0.01, 0.02) == pytest.approx(2.0)
    # rows against their own best, broadcast
    errors = np.array([[0.1, 0.2, 0.4], [0.5, 0.25, 0.3]])
    np.testing.assert_allclose(
        relative_increase(errors, errors.min(axis=1, keepdims=True), 0.02),
        [[0.0, 1.0, 3.0], [1.0, 0.0, 0.2]])


def test_expected_chance_is_the_mean_over_experts_and_tasks() -> None:
    errors = np.array([[0.1, 0.2, 0.4], [0.5, 0.25, np.nan], [np.nan] * 3])
    # task 0: (0 + 100 + 300) / 3; task 1: (100 + 0) / 2; task 2 has no observed error
    assert expected_chance(errors, [0, 1, 2], 0.02) == pytest.approx((400 / 3 + 50) / 2)
    assert expected_chance(errors, [1], 0.02) == pytest.approx(50.0)
    assert math.isnan(expected_chance(errors, [2], 0.02))


def test_check_ranking_names_the_selector() -> None:
    good = check_ranking("s", [[2, 0, 1], [0, 1, 2]], 2, 3)
    assert good.dtype == np.int64 and good.tolist() == [[2, 0, 1], [0, 1, 2]]
    with pytest.raises(ValueError, match="selector 'dup' .* not permutations"):
        check_ranking("dup", [[0, 0, 1]], 1, 3)
    with pytest.raises(ValueError, match="selector 'out' .* not permutations"):
        check_ranking("out", [[0, 1, 3]], 1, 3)
    with pytest.raises(ValueError, match=r"selector 'rows' returned shape \(1, 3\), expected"):
        check_ranking("rows", [[0, 1, 2]], 2, 3)


def test_task_splits_partition_the_tasks() -> None:
    assert [s.tolist() for s in task_splits(3, "loo", 0)] == [[0], [1], [2]]
    folds = task_splits(10, 3, random_state=4)
    assert sorted(len(f) for f in folds) == [3, 3, 4]
    assert sorted(np.concatenate(folds).tolist()) == list(range(10))
    assert [f.tolist() for f in task_splits(10, 3, 4)] == [f.tolist() for f in folds]
    assert [f.tolist() for f in task_splits(10, 3, 5)] != [f.tolist() for f in folds]
    for bad in (1, 11):
        with pytest.raises(ValueError, match="folds must be"):
            task_splits(10, bad, 0)


def test_the_jobs_config_mirrors_its_flags(tmp_path) -> None:
    from jobs import evaluate as job

    assert job.parse_args([]) == job.Config()  # same defaults
    given = job.parse_args(["--folds", "5", "--repeats", "3", "--no-plots", "--image-size",
                            "32", "--model2vec-epochs", "9", "--no-tracking"])
    assert given == job.Config(folds=5, repeats=3, plots=False, image_size=32,
                               model2vec_epochs=9, tracking=False)
    with pytest.raises(SystemExit) as usage:
        job.parse_args(["--folds", "five"])
    assert usage.value.code == 2
    with pytest.raises(ValueError, match="folds must be 'loo' or a number"):
        job.run(job.Config(root=str(tmp_path), folds="five"))
    with pytest.raises(TypeError):
        job.Config(fold=3)  # an unknown option fails at the call
    assert job.main(["--root", str(tmp_path / "empty"), "--no-tracking"]) == 1
