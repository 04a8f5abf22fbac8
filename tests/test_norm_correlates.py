"""What the embedding's norm tracks: on synthetic zoos whose norms are built to follow one task
variable and not another, the statistics name the right one, with intervals that exclude or
include zero accordingly; and the figure draws exactly those statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from t2v_core.recommend.diagnostics import (
    ALL_TASKS,
    WITHIN_FAMILY,
    layer_groups,
    norm_correlates,
    norm_correlates_of,
)
from t2v_core.recommend.meta_dataset import MetaDataset
from t2v_core.zoo.manifest import TaskSpec

N_FAMILIES, PER_FAMILY, PER_LAYER = 4, 12, 3
N = N_FAMILIES * PER_FAMILY
# two layers of the probe: "stem" (early) then "head" (late), PER_LAYER filters each
FILTERS = [f"stem:conv:{i}" for i in range(PER_LAYER)] + [f"head:conv:{i}" for i in range(PER_LAYER)]


@pytest.fixture(scope="module")
def zoo():
    """Early filters scale with the number of classes, late filters with the oracle error;
    classes, errors and family are drawn independently of one another."""
    rng = np.random.default_rng(0)
    families = [f"fam{k}" for k in np.repeat(np.arange(N_FAMILIES), PER_FAMILY)]
    n_classes = rng.integers(2, 40, size=N)
    errors = rng.uniform(0.02, 0.6, size=(N, 3))
    errors[5, 1] = np.nan  # a missing cell does not hide the task
    oracle = np.nanmin(errors, axis=1)
    noise = np.exp(rng.normal(0.0, 0.02, size=(N, 2 * PER_LAYER)))
    emb = np.hstack([np.repeat(n_classes[:, None], PER_LAYER, axis=1),
                     np.repeat(oracle[:, None], PER_LAYER, axis=1)]) * noise
    return emb, errors, families, n_classes, oracle


@pytest.fixture(scope="module")
def result(zoo):
    emb, errors, families, n_classes, _ = zoo
    return norm_correlates(emb, errors, families, n_classes=n_classes, n_train=32 * n_classes,
                           filter_names=FILTERS, n_boot=400, seed=1)


def test_each_depth_group_tracks_the_variable_it_was_built_from_and_not_the_other(result):
    early_classes = result.get("L1 early", "classes")
    assert early_classes.spearman > 0.95 and early_classes.low > 0.85
    early_error = result.get("L1 early", "oracle error")
    assert abs(early_error.spearman) < 0.35 and early_error.low < 0 < early_error.high
    late_error = result.get("L1 late", "oracle error")
    assert late_error.spearman > 0.95 and late_error.low > 0.85
    late_classes = result.get("L1 late", "classes")
    assert abs(late_classes.spearman) < 0.35 and late_classes.low < 0 < late_classes.high
    assert result.strongest("L1 late").variable == "oracle error"
    assert result.strongest("L1 early").variable in ("classes", "training images")
    # training images are 32 per class here: ranked exactly like the classes, and said so
    assert result.between_variables["classes"]["training images"] == pytest.approx(1.0)
    assert result.get("L1 early", "training images").spearman == early_classes.spearman


def test_a_norm_unrelated_to_family_has_a_chance_family_share(result):
    share = result.family_share("L1 early")
    assert share.chance == pytest.approx((N_FAMILIES - 1) / (N - 1))
    assert share.eta_squared < 0.25 and share.low < share.chance < share.high
    assert set(share.family_medians) == {f"fam{k}" for k in range(N_FAMILIES)}


def test_a_family_offset_hides_difficulty_over_all_tasks_but_not_within_families(zoo):
    _, errors, families, _, oracle = zoo
    # each family sits 3 orders of magnitude from the next, in an order unrelated to error;
    # inside a family the norm rises exactly with the oracle error
    level = np.array([1e3, 1e9, 1.0, 1e6])[[int(f[3:]) for f in families]]
    emb = (level * (1.0 + oracle))[:, None] * np.ones((1, 4))
    res = norm_correlates(emb, errors, families, n_boot=300)
    within = res.get("L1", "oracle error", WITHIN_FAMILY)
    assert within.spearman == pytest.approx(1.0) and within.low == pytest.approx(1.0)
    pooled = res.get("L1", "oracle error", ALL_TASKS)
    assert pooled.spearman < 0.5 and pooled.high < 0.9
    share = res.family_share("L1")
    assert share.eta_squared > 0.9 and share.low > 3 * share.chance
    assert share.family_medians["fam1"] > share.family_medians["fam3"] > share.family_medians["fam0"]
    assert set(res.norms) == {"L1", "L2", "mean log10"}  # no filter names: no depth groups


def test_the_statistics_are_the_plain_ones_and_deterministic(zoo, result):
    from scipy import stats

    emb, errors, families, n_classes, oracle = zoo
    l1 = np.abs(emb).sum(axis=1)
    assert result.get("L1", "oracle error").spearman == pytest.approx(
        stats.spearmanr(l1, oracle).statistic)
    assert result.get("L2", "mean error").spearman == pytest.approx(
        stats.spearmanr(np.linalg.norm(emb, axis=1), np.nanmean(errors, axis=1)).statistic)
    again = norm_correlates(emb, errors, families, n_classes=n_classes, n_train=32 * n_classes,
                            filter_names=FILTERS, n_boot=400, seed=1)
    assert again.correlations == result.correlations and again.family == result.family
    assert result.n_tasks == N and len(result.correlations) == 5 * 4 * 2
    payload = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert payload["correlations"][0].keys() == {"norm", "variable", "scope", "spearman", "low",
                                                 "high"}


def test_layer_groups_cut_consecutive_layers():
    names = [f"l{i}:conv:{j}" for i in range(5) for j in range(i + 1)]  # 5 layers, 1..5 filters
    two = layer_groups(names, 2)
    assert list(two) == ["early", "late"]
    assert two["early"].tolist() == list(range(1 + 2 + 3))  # layers 0-2
    three = layer_groups(names, 3)
    assert [len(v) for v in three.values()] == [1 + 2, 3 + 4, 5]
    with pytest.raises(ValueError, match="n_groups"):
        layer_groups(names, 4)
    with pytest.raises(ValueError, match="layers"):
        layer_groups(names[:1], 2)


def test_norm_correlates_of_a_meta_dataset_reads_sizes_from_the_manifest(zoo):
    emb, errors, families, n_classes, _ = zoo
    ids = [f"t{i:02d}" for i in range(N)]
    tasks = [TaskSpec(t, f, f"/data/{t}", "imagefolder", tuple(f"c{j}" for j in range(c)),
                      n_train=int(10 * c), n_test=5, content_hash="h")
             for t, f, c in zip(ids, families, n_classes, strict=True)]
    data = MetaDataset("probe", "montecarlo", tuple(ids), tuple(families), emb, errors,
                       ("e0", "e1", "e2"), np.full((3, emb.shape[1]), np.nan),
                       filter_names=tuple(FILTERS), max_per_class=4)
    res = norm_correlates_of(data, list(reversed(tasks)), n_boot=50)
    assert res.task_ids == tuple(ids)
    assert res.variables["classes"].tolist() == n_classes.tolist()
    assert res.variables["training images"].tolist() == (4 * n_classes).tolist()  # capped
    assert "L1 late" in res.norms
    assert "classes" not in norm_correlates_of(data, n_boot=50).variables
    with pytest.raises(ValueError, match="manifest"):
        norm_correlates_of(data, tasks[1:], n_boot=50)


def test_norm_report_draws_the_statistics(zoo, result):
    from test_plots import check_png

    from t2v_core.review import plots

    fig = plots.norm_correlates_figure(result, "L1 late")
    scatter, family, pooled, within = fig.axes[:4]
    x, y = scatter.collections[0].get_offsets().T  # the first family's points
    first = np.array([f == "fam0" for f in result.families])
    assert np.allclose(x, result.norms["L1 late"][first])
    assert np.allclose(y, result.variables["oracle error"][first])
    assert f"{result.get('L1 late', 'oracle error').spearman:.2f}" in scatter.get_title()
    bars = [p.get_width() for p in family.patches]
    assert np.allclose(bars, [f.eta_squared for f in result.family])
    first_norm = [p.get_width() for p in pooled.patches[: len(result.variables)]]
    assert np.allclose(first_norm, [result.get("L1", v).spearman for v in result.variables])
    assert "classes and training images" in fig.get_supxlabel()
    check_png(plots.png_bytes(fig), (900, 600))
    with pytest.raises(ValueError, match="norm"):
        plots.norm_correlates_figure(result, "L3")
