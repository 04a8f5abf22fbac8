"""The Table-1 protocol of the core: its rows, their inputs, the noise floor, the whole report,
and the meta-dataset restricted to a set of tasks."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest

from t2v_core.embedding.fisher import PRIOR_PRECISION
from t2v_core.embedding.synthetic_zoo import synthetic_zoo
from t2v_core.recommend.meta_dataset import MetaDataset
from t2v_core.recommend.metrics import DEFAULT_ERROR_FLOOR
from t2v_core.recommend.noise_floor import oracle_noise_floor
from t2v_core.recommend.protocol import evaluate_selectors
from t2v_core.recommend.report import to_json
from t2v_core.recommend.selectors import (
    BruteForceSelector,
    ChanceSelector,
    FamilyBestSelector,
    LogMESelector,
    OracleSelector,
)
from t2v_core.recommend.shortlist import default_recommenders, with_screen
from t2v_core.recommend.table1 import (
    CONTEXT_COLUMNS,
    before_oracle,
    evaluate_table1,
    noise_floor,
    noise_floor_sentence,
    standard_selectors,
    table1_rows,
    with_context_columns,
    with_validation_errors,
)

PAPER_ROWS = ["Chance", "ImageNet", "Mean-error prior", "Task2Vec", "Asym Task2Vec",
              "Model2Vec", "Oracle"]


@pytest.fixture(scope="module")
def zoo():
    return synthetic_zoo(n_clusters=3, tasks_per_cluster=4, experts_per_cluster=1, dim=12,
                         source_noise=0.2, n_samples=16, random_state=5)


def meta_dataset(zoo, **fields) -> MetaDataset:
    """The synthetic zoo as the arrays the storage root would give."""
    n_tasks, n_experts = zoo.errors.shape
    dim = zoo.task_embeddings.shape[1]
    sources = np.stack([np.full(dim, np.nan) if s is None else s
                        for s in zoo.expert_source_embeddings])
    return MetaDataset("probe", "montecarlo", tuple(f"t{i:02d}" for i in range(n_tasks)),
                       tuple(zoo.families), zoo.task_embeddings, zoo.errors,
                       tuple(zoo.expert_ids), sources, **fields)


def test_standard_selectors_are_the_papers_rows(zoo):
    data = meta_dataset(zoo)
    rows = standard_selectors(data, seed=3, model2vec_epochs=7)
    assert list(rows) == PAPER_ROWS
    assert rows["ImageNet"].generic == "generic" and rows["Chance"].random_state == 3
    assert rows["Model2Vec"].model_params == {"max_epochs": 7, "random_state": 3,
                                              "error_floor": DEFAULT_ERROR_FLOOR,
                                              "t0_level": None}
    specialists = replace(data, expert_sources=np.nan_to_num(data.expert_sources, nan=1.0))
    assert "ImageNet" not in standard_selectors(specialists)  # no expert without a source


def test_every_fit_takes_the_reports_error_floor(zoo):
    """The floor the report scores with reaches every selector that fits on relative
    increases, and the fitted selectors of a whole evaluation hold it."""
    data = meta_dataset(zoo, val_errors=zoo.errors.copy())
    rows, _ = table1_rows(data, None, seed=0, model2vec_epochs=3, error_floor=0.05)
    floors = {name: sel.error_floor for name, sel in rows.items() if hasattr(sel, "error_floor")}
    assert set(floors) == {"Mean-error prior", "Task2Vec", "Asym Task2Vec", "Family best"}
    assert set(floors.values()) == {0.05}
    assert rows["Model2Vec"].model_params["error_floor"] == 0.05
    fitted = rows["Model2Vec"].fit(data.embeddings, data.errors, data.expert_sources)
    assert fitted.model_.error_floor == 0.05
    assert standard_selectors(data)["Asym Task2Vec"].error_floor == DEFAULT_ERROR_FLOOR
    variational = standard_selectors(replace(data, method="variational"))
    assert variational["Asym Task2Vec"].level == PRIOR_PRECISION  # t0 is the prior precision
    assert variational["Model2Vec"].model_params["t0_level"] == PRIOR_PRECISION


def _novel_and_source_tasks() -> MetaDataset:
    """Two experts trained on tasks s0 and s1, two novel tasks n0 and n1. On its own source
    each expert is best and Task2Vec finds it (d_sym = 0); on each novel task Task2Vec picks
    the nearer source's expert, 50% worse than the best."""
    a, b = np.array([10.0, 1.0, 1.0, 1.0]), np.array([1.0, 10.0, 1.0, 1.0])
    tasks = np.stack([a, b, [8.0, 1.0, 1.0, 1.5], [1.0, 8.0, 1.5, 1.0]])
    errors = np.array([[0.1, 0.2], [0.2, 0.1], [0.3, 0.2], [0.1, 0.15]])
    sizes = np.tile(np.array([[40.0], [50.0], [60.0], [70.0]]), (1, 2))
    return MetaDataset("probe", "montecarlo", ("s0", "s1", "n0", "n1"), ("fa", "fb", "fa", "fb"),
                       tasks, errors, ("e0", "e1"), np.stack([a, b]), test_sizes=sizes,
                       expert_source_task_ids=("s0", "s1"))


def test_table1_scores_novel_tasks_first_and_all_tasks_second():
    data = _novel_and_source_tasks()
    assert data.novel_task_indices() == [2, 3]
    report = evaluate_table1(data, "loo", model2vec_epochs=3)
    result = report.result
    assert list(result.views) == ["novel", "all"]
    t2v = result.reports["Task2Vec"]
    novel, every = t2v.by_view["novel"], t2v.by_view["all"]
    assert t2v.by_meta_task is novel  # the headline
    assert novel["Mixed"].relative_increase_pct == pytest.approx(50.0)
    assert every["Mixed"].relative_increase_pct == pytest.approx(25.0)
    assert novel["fa"].relative_increase_pct == pytest.approx(50.0)
    assert every["fa"].relative_increase_pct == pytest.approx(25.0)
    assert novel["Mixed"].n_tasks == 2 and every["Mixed"].n_tasks == 4
    # ratio of mean errors, and the oracle's mean error (the paper's "Optimal")
    assert novel["Mixed"].oracle_mean_error == pytest.approx(0.15)
    assert novel["Mixed"].error_ratio == pytest.approx(0.225 / 0.15)
    assert every["Mixed"].error_ratio == pytest.approx(0.65 / 0.5)
    assert result.in_view("all").reports["Task2Vec"].by_meta_task is every
    # the noise floor is over the same tasks as the view it sits in
    payload = report.payload
    assert payload["views"] == {"novel": ["n0", "n1"], "all": ["s0", "s1", "n0", "n1"]}
    floor = oracle_noise_floor(data.errors[[2, 3]], [60, 70], error_floor=0.02)
    assert payload["oracle_noise_floor"] == asdict(floor)
    assert payload["oracle_noise_floor_by_view"]["all"] == asdict(
        oracle_noise_floor(data.errors, [40, 50, 60, 70], error_floor=0.02))
    md = report.markdown
    novel_at, all_at = md.index("### Novel tasks: the 2 tasks"), md.index("### All 4 tasks")
    assert novel_at < md.index(noise_floor_sentence(floor)) < all_at
    assert "| Optimal (oracle's mean test error) |  | 0.200 | 0.100 | 0.150 |" in md
    assert "mean error / Optimal" in md and "Weighted Kendall τ" in md


def test_context_columns_join_above_the_oracle_when_their_inputs_exist():
    rows = {"Chance": ChanceSelector(), "Oracle": OracleSelector()}
    added = before_oracle(rows, "Mine", BruteForceSelector())
    assert list(added) == ["Chance", "Mine", "Oracle"]
    assert list(before_oracle({"Chance": ChanceSelector()}, "Mine", OracleSelector())) == [
        "Chance", "Mine"]
    assert with_context_columns(rows, None) == rows
    some = with_context_columns(rows, {"features": [], "val_errors": []})
    assert list(some) == ["Chance", "LogME", "Ridge LOO", "Brute force (val)", "Oracle"]
    assert isinstance(some["LogME"], LogMESelector)
    every = with_context_columns(rows, {key: [] for key, _ in CONTEXT_COLUMNS.values()})
    assert list(every) == ["Chance", *CONTEXT_COLUMNS, "Oracle"]


def test_validation_errors_join_the_context_only_when_every_task_has_some(zoo):
    val = zoo.errors + 0.01
    data = meta_dataset(zoo, val_errors=val)
    context = with_validation_errors(data, {"labels": [1]})
    assert context["labels"] == [1] and len(context["val_errors"]) == len(zoo.families)
    np.testing.assert_array_equal(context["val_errors"][2], val[2])
    holes = val.copy()
    holes[1] = np.nan
    assert with_validation_errors(replace(data, val_errors=holes), None) is None
    assert with_validation_errors(meta_dataset(zoo), {"labels": [1]}) == {"labels": [1]}


def test_noise_floor_needs_every_tasks_test_size(zoo):
    n_tasks, n_experts = zoo.errors.shape
    sizes = np.arange(30, 30 + n_tasks)
    data = meta_dataset(zoo, test_sizes=np.tile(sizes[:, None], (1, n_experts)).astype(float))
    floor = noise_floor(data, 0.02)
    assert floor == oracle_noise_floor(zoo.errors, sizes, error_floor=0.02)
    sentence = noise_floor_sentence(floor)
    assert f"+{floor.mean_pct:.1f}% over the re-measured oracle" in sentence
    assert f"+{floor.ci95_pct[0]:.1f}% … +{floor.ci95_pct[1]:.1f}%" in sentence
    assert noise_floor(meta_dataset(zoo), 0.02) is None


def test_evaluate_table1_is_the_protocol_on_the_tables_rows(zoo):
    data = meta_dataset(zoo, val_errors=zoo.errors.copy())
    report = evaluate_table1(data, 3, seed=2, model2vec_epochs=5, context=dict(zoo.context))
    names = list(report.result.reports)
    shortlists = ["Shortlist k=1", "Shortlist k=3", "Shortlist k=5"]
    assert names == [*PAPER_ROWS[:-1], "LogME", "LEEP", "Ridge LOO", "Brute force (val)", *shortlists,
                     "Family best", "Oracle"]  # NCE reads source_labels, which this context lacks
    # the same rows through the protocol directly give the same table
    rows = with_context_columns(standard_selectors(data, seed=2, model2vec_epochs=5),
                                {**zoo.context, "val_errors": []})
    for name, rec in default_recommenders(zoo.context, seed=2, model2vec_epochs=5,
                                          error_floor=0.02).items():
        rows = before_oracle(rows, name, rec)
    rows = before_oracle(rows, "Family best", FamilyBestSelector(0.02))
    context = with_screen({**zoo.context, "val_errors": list(data.errors),
                           "families": list(data.families)})
    direct = evaluate_selectors(rows, data.embeddings, data.errors, data.expert_sources,
                                list(data.expert_ids), list(data.families), folds=3,
                                random_state=2, error_floor=0.02, context=context)
    assert to_json(report.result) == to_json(direct)
    brute = report.result.reports["Brute force (val)"].by_meta_task["Mixed"]
    assert brute.relative_increase_pct == 0.0  # validation errors equal to the test errors
    assert report.markdown.startswith("## Expert selection (12 tasks × 4 experts, probe probe, "
                                      "montecarlo Fisher, folds=3, oracle errors floored at 0.02)")
    assert "Family recovery from embeddings alone" in report.markdown
    assert "Test-noise floor" not in report.markdown  # no test sizes recorded
    payload = json.loads(json.dumps(report.payload, allow_nan=False))
    assert payload["table1"] == json.loads(to_json(report.result))
    assert payload["oracle_noise_floor"] is None and payload["error_floor"] == 0.02
    assert payload["task_ids"] == list(data.task_ids)
    assert payload["family_recovery"]["accuracy"] > 0.9
    cost = {row["selector"]: row for row in payload["cost"]}
    assert cost["Model2Vec"]["expert_forward_passes"] == 0.0
    assert cost["LogME"]["expert_forward_passes"] == 4.0
    assert cost["Brute force (val)"]["trains_every_expert"]
    assert cost["Oracle"]["expert_forward_passes"] is None
    for k, name in zip((1, 3, 4), shortlists, strict=True):  # k=5 of 4 experts runs all 4
        screen = cost[name]["expert_forward_passes"] - k
        assert 0 < screen < 4  # every expert, on a few images per class
    assert "| Shortlist k=3 |" in report.markdown and "expert forward passes" in report.markdown


def test_one_family_has_no_family_best_row(zoo):
    data = meta_dataset(zoo)
    one = data.subset([t for t, f in zip(data.task_ids, data.families, strict=True)
                       if f == "family0"])
    report = evaluate_table1(one, "loo", model2vec_epochs=5)
    assert "Family best" not in report.result.reports
    assert list(report.result.reports) == PAPER_ROWS


# --------------------------------------------------------------------------- subset and align


def test_subset_keeps_every_per_task_array_aligned(zoo):
    n_tasks, n_experts = zoo.errors.shape
    data = meta_dataset(zoo, val_errors=zoo.errors + 1.0,
                        test_sizes=np.tile(np.arange(n_tasks)[:, None], (1, n_experts)) * 1.0)
    sub = data.subset(["t05", "t01"])
    assert sub.task_ids == ("t05", "t01") and sub.families == (zoo.families[5], zoo.families[1])
    for name in ("embeddings", "errors", "val_errors", "test_sizes"):
        np.testing.assert_array_equal(getattr(sub, name), getattr(data, name)[[5, 1]], name)
    assert sub.expert_ids == data.expert_ids and sub.expert_sources is data.expert_sources
    assert sub.task_test_sizes().tolist() == [5, 1]
    # every field with one row per task is cut: none is left at the old length
    per_task = [f for f, v in asdict(data).items() if np.ndim(v) and len(v) == n_tasks]
    assert all(len(getattr(sub, f)) == 2 for f in per_task), per_task
    assert data.subset(["t03"]).val_errors.shape == (1, n_experts)
    assert meta_dataset(zoo).subset(["t03"]).val_errors is None


def test_subset_rejects_unknown_and_repeated_tasks(zoo):
    data = meta_dataset(zoo)
    with pytest.raises(ValueError, match="not in this meta-dataset: nope"):
        data.subset(["t00", "nope"])
    with pytest.raises(ValueError, match="more than once"):
        data.subset(["t00", "t00"])


def test_align_keeps_the_tasks_both_have_in_this_order(zoo):
    data = meta_dataset(zoo)
    other = data.subset(["t07", "t02", "t09"])
    aligned = data.align(other)
    assert aligned.task_ids == ("t02", "t07", "t09")
    np.testing.assert_array_equal(aligned.errors, data.errors[[2, 7, 9]])
    assert other.align(data).task_ids == other.task_ids
    fewer = replace(data, expert_ids=data.expert_ids[:-1])
    with pytest.raises(ValueError, match="different experts"):
        data.align(fewer)
