"""Review figures: valid, non-blank PNGs of sensible size, drawn from exactly the data given."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from t2v_core.embedding.distance import d_sym
from t2v_core.review import plots
from t2v_core.storage import EMBEDDINGS_SCHEMA, StorageRoot, conform

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(data: bytes, min_size: tuple[int, int] = (300, 200)) -> Image.Image:
    """A real PNG, at least ``min_size`` pixels, with a drawing on it (not one flat colour)."""
    assert data[:8] == PNG_SIGNATURE
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
    assert max(image.size) <= 4000
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    background = pixels[0, 0]
    differs = np.abs(pixels - background).sum(axis=2) > 30
    assert differs.mean() > 0.02, "image is (nearly) blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 8
    return image


@pytest.fixture(scope="module")
def zoo():
    """Three families of log-normal Fisher profiles, families interleaved in input order."""
    rng = np.random.default_rng(0)
    centers = np.exp(rng.normal(0.0, 1.5, size=(3, 24)))
    fam_idx = np.array([0, 1, 2] * 6)
    emb = centers[fam_idx] * np.exp(rng.normal(0.0, 0.15, size=(18, 24)))
    families = [f"family{k}" for k in fam_idx]
    ids = [f"task{i:02d}" for i in range(18)]
    errors = rng.uniform(0.05, 0.6, size=(18, 4))
    errors[3, 1] = np.nan
    errors[7, :] = np.nan  # a task with no finished cell
    return emb.astype(np.float32), families, ids, errors


def test_task_map_runs_tsne_on_d_sym_of_the_given_embeddings(zoo, monkeypatch):
    emb, families, ids, _ = zoo
    seen = []

    class SpyTSNE(plots.TSNE):
        def fit_transform(self, X, y=None):
            seen.append((np.array(X, copy=True), self.metric))
            return super().fit_transform(X, y)

    monkeypatch.setattr(plots, "TSNE", SpyTSNE)
    result = plots.task_map(emb, families, ids)

    expected = d_sym(emb)
    np.testing.assert_array_equal(result.distances, expected)
    assert len(seen) == 1
    tsne_input, metric = seen[0]
    assert metric == "precomputed"
    np.testing.assert_array_equal(tsne_input, expected)
    assert result.coords.shape == (18, 2) and np.isfinite(result.coords).all()

    # The points drawn are the t-SNE output, coloured by family.
    ax = result.figure.axes[0]
    points = ax.collections[0]
    np.testing.assert_allclose(points.get_offsets(), result.coords)
    colors = [tuple(c) for c in points.get_facecolors()]
    by_family = {f: {c for c, g in zip(colors, families, strict=True) if g == f} for f in families}
    assert all(len(c) == 1 for c in by_family.values())
    assert len({next(iter(c)) for c in by_family.values()}) == 3

    # Well-separated families stay together on the map.
    d2 = ((result.coords[:, None] - result.coords[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    nearest = d2.argmin(axis=1)
    assert np.mean([families[i] == families[j] for i, j in enumerate(nearest)]) >= 0.9
    check_png(plots.png_bytes(result.figure), (500, 400))


def test_task_map_uses_the_stored_float32_embeddings(zoo, tmp_path):
    emb, families, ids, _ = zoo
    root = StorageRoot(tmp_path / "data")
    table = conform(pa.table({
        "task_id": ids, "content_hash": ["h"] * 18, "probe": ["p"] * 18, "method": ["m"] * 18,
        "embedding": pa.array([r.tolist() for r in emb], pa.list_(pa.float32())),
        "dim": [24] * 18,
    }), EMBEDDINGS_SCHEMA)
    root.write_part("embeddings/probe=p/method=m", table, ["task_id", "content_hash"])
    stored = root.read_table("embeddings/probe=p/method=m", EMBEDDINGS_SCHEMA)

    got_ids, matrix = plots.embedding_matrix(stored)
    assert matrix.dtype == np.float32
    order = [ids.index(t) for t in got_ids]
    np.testing.assert_array_equal(matrix, emb[order])
    result = plots.task_map(matrix, [families[i] for i in order], got_ids)
    np.testing.assert_array_equal(result.distances, d_sym(matrix))
    assert result.task_ids == got_ids

    ids_pd, matrix_pd = plots.embedding_matrix(stored.to_pandas())
    assert ids_pd == got_ids
    np.testing.assert_array_equal(matrix_pd, matrix)


def test_task_map_of_very_few_tasks():
    emb = np.exp(np.random.default_rng(1).normal(size=(3, 5)))
    result = plots.task_map(emb, ["a", "b", "a"])
    assert result.coords.shape == (3, 2) and np.isfinite(result.coords).all()
    # Classical MDS reproduces the three pairwise distances exactly.
    drawn = np.sqrt(((result.coords[:, None] - result.coords[None]) ** 2).sum(-1))
    np.testing.assert_allclose(drawn, result.distances, atol=1e-9)
    check_png(plots.png_bytes(result.figure))


def test_distance_heatmap_groups_families(zoo):
    emb, families, _, _ = zoo
    fig, order = plots.distance_heatmap(emb, families)
    sorted_families = [families[i] for i in order]
    assert sorted_families == sorted(families)
    assert list(order[:6]) == [0, 3, 6, 9, 12, 15]  # stable inside a family
    shown = fig.axes[0].images[0].get_array()
    dist = d_sym(emb)
    np.testing.assert_array_equal(np.asarray(shown), dist[np.ix_(order, order)])
    # Within-family blocks are closer than across families.
    block = np.asarray(shown)
    assert block[:6, :6].mean() < block[:6, 6:].mean()
    check_png(plots.png_bytes(fig), (500, 400))

    fig2, _ = plots.distance_heatmap(families=families, distances=dist)
    np.testing.assert_array_equal(np.asarray(fig2.axes[0].images[0].get_array()), block)


def test_error_matrix_heatmap_masks_missing_cells(zoo):
    _, families, ids, errors = zoo
    experts = ["e0", "e1", "e2", "generic"]
    fig = plots.error_matrix_heatmap(errors, ids, experts, task_families=families,
                                     expert_families=["family0", "family1", "family2", None])
    shown = fig.axes[0].images[0].get_array()
    rows = plots.family_order(families)
    np.testing.assert_array_equal(np.ma.getmaskarray(shown), np.isnan(errors[rows]))
    np.testing.assert_allclose(shown.filled(np.nan), errors[rows])
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == [ids[i] for i in rows]
    check_png(plots.png_bytes(fig))


def test_norm_vs_error(zoo):
    emb, families, _, errors = zoo
    fig, norms, best = plots.norm_vs_error(emb, errors, families)
    keep = np.arange(18) != 7
    np.testing.assert_allclose(norms, np.linalg.norm(emb[keep].astype(np.float64), axis=1))
    np.testing.assert_allclose(best, np.nanmin(errors[keep], axis=1))
    np.testing.assert_allclose(fig.axes[0].collections[0].get_offsets(), np.c_[norms, best])
    check_png(plots.png_bytes(fig))


def test_topk_bars_show_true_errors_of_the_recommended_experts():
    recs = pd.DataFrame({
        "task_id": ["t1"] * 4 + ["t2"] * 4,
        "rank": [1, 2, 3, 4] * 2,
        "expert_id": ["a", "b", "c", "d", "c", "a", "d", "b"],
        "score": [0.4, 0.3, 0.2, 0.1] * 2,
        "true_error": [0.20, 0.10, np.nan, 0.5, 0.30, 0.25, 0.40, 0.35],
    })
    fig = plots.topk_bars(recs.sample(frac=1.0, random_state=0), k=3,
                          oracle_errors={"t1": 0.10, "t2": 0.25})
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["t1", "t2"]
    heights = [p.get_height() for p in axes[0].patches]
    assert heights[:2] == [0.20, 0.10] and heights[2] == 0.0  # unknown error drawn as n/a
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["1. a", "2. b", "3. c"]
    assert [p.get_height() for p in axes[1].patches] == [0.30, 0.25, 0.40]
    assert axes[1].lines[0].get_ydata()[0] == 0.25
    check_png(plots.png_bytes(fig), (600, 250))


def test_save_png_local_and_s3(zoo, tmp_path, moto_s3):
    emb, families, _, _ = zoo
    fig, _ = plots.distance_heatmap(emb, families)
    local = plots.save_png(fig, tmp_path / "figs" / "heatmap.png")
    check_png(open(local, "rb").read())
    uri = plots.save_png(fig, f"s3://{moto_s3.bucket}/test-plots/heatmap.png")
    assert uri == f"s3://{moto_s3.bucket}/test-plots/heatmap.png"
    body = moto_s3.client.get_object(Bucket=moto_s3.bucket, Key="test-plots/heatmap.png")["Body"].read()
    check_png(body)
    assert not plots.new_figure().axes  # figures are not kept in pyplot's registry
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []


def test_cost_vs_quality_draws_every_priced_row_where_its_cost_says():
    import math

    from t2v_core.recommend.cost import CostPoint

    points = [CostPoint("Model2Vec", 0.0, 26.0, (10.0, 49.0), 0.39),
              CostPoint("Shortlist k=3", 3.9, 18.0, (6.0, 35.0), 0.55),
              CostPoint("LEEP", 10.0, 19.0, (6.5, 39.0), 0.55),
              CostPoint("Brute force (val)", math.inf, 53.0, (30.0, 80.0), 0.42),
              CostPoint("Oracle", math.nan, 0.0, (0.0, 0.0), 0.97)]
    fig = plots.cost_vs_quality(points, 10, tau_ceiling=0.77)
    check_png(plots.png_bytes(fig))
    increase_ax, tau_ax = fig.axes
    labels = [t.get_text() for t in tau_ax.get_legend().get_texts()]
    assert labels == ["Model2Vec (τw 0.39)", "Shortlist k=3 (τw 0.55)", "LEEP (τw 0.55)",
                      "Brute force (val) (τw 0.42)"]  # the oracle is a reference, not a cost
    for ax, column in ((increase_ax, "relative_increase_pct"), (tau_ax, "weighted_tau")):
        drawn = {label: (c.lines[0].get_xdata()[0], c.lines[0].get_ydata()[0])
                 for label, c in zip(labels, ax.containers, strict=True)}
        priced = {f"{p.name} (τw {p.weighted_tau:.2f})": p for p in points[:4]}
        for label, (x, y) in drawn.items():
            assert y == pytest.approx(getattr(priced[label], column))
            if not label.startswith("Brute"):
                assert x == pytest.approx(priced[label].passes)
        assert drawn["Brute force (val) (τw 0.42)"][0] > 10.0
        assert "trains\nall 10" in [t.get_text() for t in ax.get_xticklabels()]
    ceiling = [line for line in tau_ax.lines if line.get_linestyle() == "--"]
    assert len(ceiling) == 1 and ceiling[0].get_ydata()[0] == pytest.approx(0.77)
