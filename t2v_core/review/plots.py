"""Figures for reviewing a zoo: the task map, distance and error-matrix heatmaps, norm vs error,
top-k recommendations against their true errors, and each recommender's cost against its
quality.

Every function builds a :class:`matplotlib.figure.Figure` on its own Agg canvas instead of
going through ``pyplot``: no global backend switch, nothing kept alive in pyplot's figure
registry (batch jobs draw many figures), and notebooks still display the returned figures.
Functions that compute something on the way (t-SNE coordinates, orderings) return it next to
the figure, so what was drawn can be checked against the data it came from.
"""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from sklearn.manifold import TSNE

from t2v_core.embedding.distance import d_sym
from t2v_core.recommend.diagnostics import (
    ALL_TASKS,
    WITHIN_FAMILY,
    NormCorrelates,
    norm_correlates_of,
)
from t2v_core.recommend.meta_dataset import MetaDataset
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import TaskSpec

__all__ = [
    "TaskMap",
    "cost_vs_quality",
    "distance_heatmap",
    "embedding_matrix",
    "error_matrix_heatmap",
    "family_order",
    "new_figure",
    "norm_correlates_figure",
    "norm_report",
    "norm_vs_error",
    "png_bytes",
    "save_png",
    "task_map",
    "topk_bars",
]

_MISSING = "lightgrey"


@dataclass
class TaskMap:
    """The t-SNE task map and exactly what it was computed from."""

    figure: Figure
    distances: np.ndarray  # n×n d_sym of the embeddings passed in: the t-SNE input
    coords: np.ndarray  # n×2 positions drawn
    task_ids: list[str]
    families: list[str]


def new_figure(width: float = 6.0, height: float = 5.0) -> Figure:
    """A figure with its own Agg canvas and constrained layout."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    """The figure rendered as PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> str:
    """Write the figure as PNG to a local path or a URI (``s3://...``), atomically; returns
    where it went."""
    path = str(path)
    parent, name = posixpath.split(path.replace(os.sep, "/"))
    return StorageRoot(parent or ".").write_bytes_atomic(name, png_bytes(fig, dpi))


def embedding_matrix(table) -> tuple[list[str], np.ndarray]:
    """(task ids, n×d embeddings) from an embeddings table (Arrow or pandas) in row order,
    keeping the stored float32 values exactly."""
    if hasattr(table, "column_names"):  # pyarrow
        import pyarrow.compute as pc

        ids = [str(x) for x in table.column("task_id").to_pylist()]
        column = table.column("embedding").combine_chunks()
        dims = set(pc.list_value_length(column).to_pylist())
        if len(dims) > 1:
            raise ValueError(f"embeddings of different sizes: {sorted(dims)}")
        values = np.array(column.flatten().to_numpy(zero_copy_only=False))  # writable copy
        return ids, values.reshape(len(ids), dims.pop() if dims else 0)
    ids = [str(x) for x in table["task_id"]]
    rows = [np.asarray(v) for v in table["embedding"]]
    return ids, np.stack(rows) if rows else np.zeros((0, 0))


def family_order(families: Sequence[str]) -> np.ndarray:
    """Indices that group items by family name (stable: input order inside a family)."""
    return np.argsort(np.asarray([str(f) for f in families]), kind="stable")


def _family_colors(families: Sequence[str]) -> dict[str, tuple]:
    names = sorted({str(f) for f in families})
    cmap_name = "tab10" if len(names) <= 10 else "tab20"
    from matplotlib import colormaps

    cmap = colormaps[cmap_name]
    return {name: to_rgba(cmap(i % cmap.N)) for i, name in enumerate(names)}


def _default_ids(n: int, ids: Sequence | None) -> list[str]:
    out = [str(i) for i in (range(n) if ids is None else ids)]
    if len(out) != n:
        raise ValueError(f"{len(out)} ids for {n} rows")
    return out


def _tsne_coords(distances: np.ndarray, perplexity: float | None, random_state: int) -> np.ndarray:
    n = distances.shape[0]
    if n < 4:
        # t-SNE needs a few neighbours; classical MDS places 1–3 points exactly.
        j = np.eye(n) - 1.0 / n
        b = -0.5 * j @ (distances**2) @ j
        vals, vecs = np.linalg.eigh(b)
        top = np.argsort(vals)[::-1][:2]
        coords = vecs[:, top] * np.sqrt(np.clip(vals[top], 0, None))
        return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    p = perplexity if perplexity is not None else min(30.0, max(2.0, (n - 1) / 3.0))
    tsne = TSNE(
        n_components=2, metric="precomputed", init="random",
        perplexity=min(p, n - 1.0), random_state=random_state,
    )
    return np.asarray(tsne.fit_transform(distances), dtype=np.float64)


def task_map(
    embeddings,
    families: Sequence[str],
    task_ids: Sequence | None = None,
    *,
    perplexity: float | None = None,
    random_state: int = 0,
    annotate: bool | None = None,
    title: str = "Task embeddings (t-SNE on d_sym)",
) -> TaskMap:
    """t-SNE map of tasks coloured by family, computed on the d_sym matrix of exactly the
    ``embeddings`` given (as a precomputed metric), like the paper's task-space figure."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] == 0:
        raise ValueError(f"need an n×d embedding matrix, got shape {emb.shape}")
    fams = [str(f) for f in families]
    ids = _default_ids(emb.shape[0], task_ids)
    if len(fams) != emb.shape[0]:
        raise ValueError(f"{len(fams)} families for {emb.shape[0]} tasks")
    distances = np.asarray(d_sym(emb), dtype=np.float64)
    coords = _tsne_coords(distances, perplexity, random_state)

    fig = new_figure(7.0, 6.0)
    ax = fig.add_subplot()
    colors = _family_colors(fams)
    ax.scatter(coords[:, 0], coords[:, 1], c=[colors[f] for f in fams], s=36,
               edgecolors="black", linewidths=0.3)
    for name, color in colors.items():
        ax.scatter([], [], color=color, label=name)
    if len(colors) <= 20:
        ax.legend(title="family", fontsize="small", loc="best")
    if annotate if annotate is not None else emb.shape[0] <= 40:
        for (x, y), label in zip(coords, ids, strict=True):
            ax.annotate(label, (x, y), fontsize=6, alpha=0.7, xytext=(2, 2),
                        textcoords="offset points")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return TaskMap(fig, distances, coords, ids, fams)


def _family_ticks(ax, sorted_fams: list[str], axis: str) -> None:
    """One tick per family block at its centre, with separators between blocks."""
    starts = [0] + [i for i in range(1, len(sorted_fams)) if sorted_fams[i] != sorted_fams[i - 1]]
    ends = starts[1:] + [len(sorted_fams)]
    centers = [(s + e - 1) / 2 for s, e in zip(starts, ends, strict=True)]
    labels = [sorted_fams[s] for s in starts]
    for b in starts[1:]:
        (ax.axhline if axis == "y" else ax.axvline)(b - 0.5, color="white", linewidth=1.0)
    if axis == "y":
        ax.set_yticks(centers, labels, fontsize="small")
    else:
        ax.set_xticks(centers, labels, rotation=60, ha="right", fontsize="small")


def distance_heatmap(
    embeddings=None,
    families: Sequence[str] = (),
    *,
    distances: np.ndarray | None = None,
    title: str = "d_sym between tasks (ordered by family)",
) -> tuple[Figure, np.ndarray]:
    """Heatmap of the task × task d_sym matrix with tasks grouped by family; pass
    ``distances`` (e.g. ``TaskMap.distances``) to reuse a matrix. Returns (figure, order)."""
    dist = np.asarray(d_sym(np.asarray(embeddings)) if distances is None else distances)
    fams = [str(f) for f in families]
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1] or len(fams) != dist.shape[0]:
        raise ValueError(f"need an n×n matrix and n families, got {dist.shape} and {len(fams)}")
    order = family_order(fams)
    fig = new_figure(7.0, 6.0)
    ax = fig.add_subplot()
    image = ax.imshow(dist[np.ix_(order, order)], cmap="viridis", interpolation="nearest")
    sorted_fams = [fams[i] for i in order]
    _family_ticks(ax, sorted_fams, "y")
    _family_ticks(ax, sorted_fams, "x")
    fig.colorbar(image, ax=ax, label="d_sym")
    ax.set_title(title)
    return fig, order


def error_matrix_heatmap(
    errors,
    task_ids: Sequence | None = None,
    expert_ids: Sequence | None = None,
    *,
    task_families: Sequence[str] | None = None,
    expert_families: Sequence[str | None] | None = None,
    title: str = "Test error: task × expert",
) -> Figure:
    """The performance matrix (rows tasks, columns experts), missing cells grey; rows (and
    columns, when expert families are given) grouped by family."""
    err = np.asarray(errors, dtype=np.float64)
    if err.ndim != 2 or err.size == 0:
        raise ValueError(f"need a non-empty T×E error matrix, got shape {err.shape}")
    tids = _default_ids(err.shape[0], task_ids)
    eids = _default_ids(err.shape[1], expert_ids)
    rows = family_order(task_families) if task_families is not None else np.arange(err.shape[0])
    cols = (family_order([f if f is not None else "~generic" for f in expert_families])
            if expert_families is not None else np.arange(err.shape[1]))
    shown = np.ma.masked_invalid(err[np.ix_(rows, cols)])
    fig = new_figure(min(4.0 + 0.25 * err.shape[1], 16.0), min(3.0 + 0.18 * err.shape[0], 16.0))
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["magma_r"].with_extremes(bad=_MISSING)
    image = ax.imshow(shown, cmap=cmap, aspect="auto", interpolation="nearest")
    if task_families is not None and err.shape[0] > 40:
        _family_ticks(ax, [str(task_families[i]) for i in rows], "y")
    else:
        ax.set_yticks(range(len(rows)), [tids[i] for i in rows], fontsize=6)
    if err.shape[1] <= 60:
        ax.set_xticks(range(len(cols)), [eids[j] for j in cols], rotation=60, ha="right",
                      fontsize=6)
    ax.set_xlabel("expert")
    ax.set_ylabel("task")
    fig.colorbar(image, ax=ax, label="test error")
    ax.set_title(title)
    return fig


def norm_vs_error(
    embeddings,
    errors,
    families: Sequence[str] | None = None,
    *,
    ord: int | float = 2,
    title: str = "Embedding norm vs best test error",
) -> tuple[Figure, np.ndarray, np.ndarray]:
    """Scatter of each task's embedding norm against its best (oracle) test error — the
    paper's observation that the norm tracks task difficulty. Tasks with no observed error
    are left out. Returns (figure, norms, best errors) of the tasks drawn."""
    from scipy.stats import spearmanr

    emb = np.asarray(embeddings, dtype=np.float64)
    err = np.asarray(errors, dtype=np.float64)
    if emb.ndim != 2 or err.ndim != 2 or emb.shape[0] != err.shape[0]:
        raise ValueError(f"need n×d embeddings and n×E errors, got {emb.shape}, {err.shape}")
    keep = np.isfinite(err).any(axis=1)
    norms = np.linalg.norm(emb[keep], ord=ord, axis=1)
    best = np.nanmin(err[keep], axis=1)
    fams = [str(f) for f in (families if families is not None else ["task"] * emb.shape[0])]
    fams = [f for f, k in zip(fams, keep, strict=True) if k]
    colors = _family_colors(fams)
    fig = new_figure(6.0, 4.5)
    ax = fig.add_subplot()
    ax.scatter(norms, best, c=[colors[f] for f in fams], s=30, edgecolors="black", linewidths=0.3)
    if families is not None and len(colors) <= 20:
        for name, color in colors.items():
            ax.scatter([], [], color=color, label=name)
        ax.legend(title="family", fontsize="small")
    if norms.size >= 3 and np.ptp(norms) > 0 and np.ptp(best) > 0:
        rho = spearmanr(norms, best).statistic
        title = f"{title} (Spearman ρ = {rho:.2f})"
    ax.set_xlabel(f"‖embedding‖_{ord}")
    ax.set_ylabel("best test error")
    ax.set_title(title)
    return fig, norms, best


def topk_bars(
    recommendations: pd.DataFrame,
    k: int = 5,
    *,
    oracle_errors: Mapping[str, float] | None = None,
    tasks: Sequence[str] | None = None,
    ncols: int = 3,
    title: str = "Top-k recommended experts and their true test errors",
) -> Figure:
    """One panel per task: the true test error of each of its top-k recommended experts
    (``recommendations``: task_id, rank, expert_id, score, true_error — the table
    :func:`t2v_core.review.recommender_model.recommendations_frame` makes), with the task's best
    achievable error as a dashed line when ``oracle_errors`` gives it. Unknown errors are
    marked "n/a"."""
    needed = {"task_id", "rank", "expert_id"}
    if not needed <= set(recommendations.columns):
        raise ValueError(f"recommendations need columns {sorted(needed)}")
    recs = recommendations.sort_values(["task_id", "rank"], kind="stable")
    task_list = [str(t) for t in (tasks if tasks is not None else recs["task_id"].unique())]
    if not task_list:
        raise ValueError("no tasks to plot")
    ncols = max(1, min(ncols, len(task_list)))
    nrows = -(-len(task_list) // ncols)
    fig = new_figure(3.6 * ncols, 2.8 * nrows + 0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, task in zip(axes, task_list, strict=False):
        top = recs[recs["task_id"].astype(str) == task].head(k)
        true = (top["true_error"].to_numpy(dtype=np.float64)
                if "true_error" in top else np.full(len(top), np.nan))
        known = np.isfinite(true)
        x = np.arange(len(top))
        ax.bar(x[known], true[known], color="tab:blue")
        ax.bar(x[~known], np.zeros((~known).sum()), color=_MISSING)
        for xi, ok in zip(x, known, strict=True):
            if not ok:
                ax.annotate("n/a", (xi, 0), ha="center", va="bottom", fontsize=7)
        if oracle_errors is not None and task in oracle_errors:
            ax.axhline(oracle_errors[task], color="tab:red", linestyle="--", linewidth=1,
                       label="oracle")
            ax.legend(fontsize="x-small", loc="upper left")
        labels = [f"{r}. {e}" for r, e in zip(top["rank"], top["expert_id"], strict=True)]
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=6)
        ax.set_title(str(task), fontsize="small")
        ax.set_ylabel("test error", fontsize="small")
    for ax in axes[len(task_list):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize="medium")
    return fig


def _correlation_bars(ax, result: NormCorrelates, scope: str, colors: Mapping[str, tuple]) -> None:
    """Horizontal bars of Spearman ρ with their intervals: one group per task variable, one
    bar per norm."""
    norms, variables = list(result.norms), list(result.variables)
    height = 0.8 / len(norms)
    for a, norm in enumerate(norms):
        rows = [result.get(norm, var, scope) for var in variables]
        y = np.arange(len(variables)) + (a - (len(norms) - 1) / 2) * height
        rho = np.array([r.spearman for r in rows])
        err = np.abs(np.array([[r.low for r in rows], [r.high for r in rows]]) - rho)
        ax.barh(y, np.nan_to_num(rho), height=height * 0.9, color=colors[norm], label=norm,
                xerr=np.nan_to_num(err), error_kw={"elinewidth": 0.8, "capsize": 2})
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(np.arange(len(variables)), variables)
    ax.invert_yaxis()
    lows = [c.low for c in result.correlations if np.isfinite(c.low)]
    ax.set_xlim(min([-0.25, *lows]) - 0.05, 1.0)
    ax.set_xlabel("Spearman ρ (bars: bootstrap interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"Norm vs task variables, {scope}")


def _family_share_bars(ax, result: NormCorrelates, colors: Mapping[str, tuple]) -> None:
    shares = list(result.family)
    y = np.arange(len(shares))
    eta = np.array([f.eta_squared for f in shares])
    err = np.abs(np.array([[f.low for f in shares], [f.high for f in shares]]) - eta)
    ax.barh(y, eta, color=[colors[f.norm] for f in shares], xerr=err,
            error_kw={"elinewidth": 0.8, "capsize": 2})
    ax.axvline(shares[0].chance, color="tab:red", linestyle="--", linewidth=1,
               label=f"chance ({shares[0].chance:.2f})")
    ax.set_yticks(y, [f.norm for f in shares])
    ax.invert_yaxis()
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("η² of the norm's ranks on family")
    ax.legend(fontsize="small", loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Share of the norm explained by the family")


def _norm_scatter(ax, result: NormCorrelates, norm: str) -> None:
    values, best = result.norms[norm], result.variables["oracle error"]
    colors = _family_colors(result.families)
    for name, color in colors.items():
        mask = np.array([f == name for f in result.families])
        ax.scatter(values[mask], best[mask], color=color, s=28, edgecolors="black",
                   linewidths=0.3, label=name)
    if norm != "mean log10" and np.all(values > 0) and values.max() > 100 * values.min():
        ax.set_xscale("log")
    pooled, within = result.get(norm, "oracle error"), result.get(norm, "oracle error", WITHIN_FAMILY)
    ax.set_title(f"{norm} norm vs oracle error: ρ = {pooled.spearman:.2f} over all tasks, "
                 f"{within.spearman:.2f} within family")
    ax.set_xlabel(f"{norm} norm of the task embedding")
    ax.set_ylabel("oracle (best expert) test error")
    ax.legend(title="family", fontsize="small", title_fontsize="small", ncols=3,
              loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)


def _alike_variables(result: NormCorrelates, threshold: float = 0.95) -> str:
    """The pairs of task variables whose ranks agree almost fully, as a phrase ("" if none)."""
    names = list(result.between_variables)
    pairs = [f"{a} and {b} (ρ = {result.between_variables[a][b]:.2f})"
             for i, a in enumerate(names) for b in names[i + 1:]
             if abs(result.between_variables[a][b]) >= threshold]
    return "; ".join(pairs)


def norm_correlates_figure(result: NormCorrelates, norm: str = "L1") -> Figure:
    """What the embedding's norm tracks, on one page: the ``norm`` against each task's oracle
    error coloured by family; the family's share of every norm against its chance level; and
    every norm's Spearman ρ with each task variable over all tasks and within families."""
    if norm not in result.norms:
        raise ValueError(f"norm must be one of {list(result.norms)}, got {norm!r}")
    from matplotlib import colormaps

    palette = colormaps["Set2"]
    colors = {n: to_rgba(palette(i % palette.N)) for i, n in enumerate(result.norms)}
    fig = new_figure(13.0, 9.5)
    (scatter, family), (pooled, within) = fig.subplots(2, 2)
    _norm_scatter(scatter, result, norm)
    _family_share_bars(family, result, colors)
    _correlation_bars(pooled, result, ALL_TASKS, colors)
    _correlation_bars(within, result, WITHIN_FAMILY, colors)
    within.legend(*pooled.get_legend_handles_labels(), title="norm", fontsize="small",
                  loc="center left", bbox_to_anchor=(1.0, 0.5))
    if twins := _alike_variables(result):
        fig.supxlabel("Ranked alike, so no norm can tell them apart: " + twins,
                      fontsize="small")
    fig.suptitle(f"What the task embedding's norm tracks ({result.n_tasks} tasks, "
                 f"{result.confidence:.0%} intervals from {result.n_boot} bootstrap resamples)")
    return fig


def norm_report(data: MetaDataset, tasks: Sequence[TaskSpec] | None = None, *,
                norm: str = "L1", **kwargs) -> tuple[NormCorrelates, Figure]:
    """The norm's correlates on a meta-dataset (classes and training images from the task
    manifest entries ``tasks`` when given; ``kwargs`` go to
    :func:`t2v_core.recommend.diagnostics.norm_correlates`) and their figure."""
    result = norm_correlates_of(data, tasks, **kwargs)
    return result, norm_correlates_figure(result, norm)


def cost_vs_quality(
    points: Sequence,
    n_experts: int,
    *,
    tau_ceiling: float | None = None,
    title: str = "Cost vs quality per new task",
) -> Figure:
    """Each row of Table 1 as a point, expert forward passes per new task against its quality:
    on the left its relative error increase over the oracle with the 95% interval as an error
    bar, on the right its weighted τ, with ``tau_ceiling`` (the noise floor's: what the ranking
    by the true errors scores) as a dashed line (``points``:
    :class:`~t2v_core.recommend.cost.CostPoint`). Brute force, which trains every expert, sits
    right of the axis's end; reference rows (oracle, family told) are left out. Rows at the same
    cost are spread sideways a little so their intervals stay apart; the default recommender's
    rows are joined by a line."""
    drawn = [p for p in points if not np.isnan(p.passes) and np.isfinite(p.relative_increase_pct)]
    if not drawn:
        raise ValueError("no row with a cost and a relative increase to plot")
    xs = _cost_positions(drawn, n_experts)
    fig = new_figure(13.0, 5.5)
    increase_ax, tau_ax = fig.subplots(1, 2, width_ratios=[3, 2])
    ys = np.asarray([p.relative_increase_pct for p in drawn])
    _cost_points(increase_ax, drawn, xs, ys, [p.ci95_pct for p in drawn])
    _increase_axis(increase_ax, drawn)
    taus = np.asarray([p.weighted_tau for p in drawn], np.float64)
    _cost_points(tau_ax, drawn, xs, taus, None)
    if tau_ceiling is not None and np.isfinite(tau_ceiling):
        tau_ax.axhline(tau_ceiling, color="grey", linestyle="--", linewidth=1)
        tau_ax.annotate("ranking by the true errors (test noise)", (0.02, tau_ceiling),
                        xycoords=("axes fraction", "data"), va="bottom", fontsize="small",
                        color="grey")
    tau_ax.set_ylabel("weighted τ with the measured errors' ranking (1 = perfect)")
    tau_ax.grid(True, axis="y", color="0.9")
    for ax in (increase_ax, tau_ax):
        _cost_axis(ax, drawn, n_experts)
    fig.suptitle(title)
    tau_ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def _brute_force_x(n_experts: int) -> float:
    """Where brute force, which trains every expert, sits: right of the passes axis's end."""
    return n_experts * 1.2 + 1


def _cost_positions(drawn: Sequence, n_experts: int) -> np.ndarray:
    """Each row's x: its passes (brute force right of the axis's end), rows at the same cost
    spread sideways a little."""
    brute_x = _brute_force_x(n_experts)
    xs = np.asarray([brute_x if np.isinf(p.passes) else p.passes for p in drawn])
    offsets = np.zeros(len(drawn))
    for x in np.unique(xs):
        same = np.flatnonzero(xs == x)
        offsets[same] = (np.arange(same.size) - (same.size - 1) / 2) * 0.2 * (n_experts / 10)
    return xs + offsets


def _cost_points(ax, drawn: Sequence, xs: np.ndarray, ys: np.ndarray, intervals) -> None:
    """One marker per row (with its interval as an error bar when given), the default
    recommender's rows joined by a dotted line."""
    cmap = _family_colors([p.name for p in drawn])
    markers = "osD^vP*Xh<>"
    shortlist = [i for i, p in enumerate(drawn) if p.name.startswith("Shortlist")]
    if len(shortlist) > 1:
        ax.plot(xs[shortlist], ys[shortlist], color="black", linewidth=1, linestyle=":",
                zorder=1)
    for i, p in enumerate(drawn):
        yerr = None
        if intervals is not None and not np.isnan(intervals[i][0]):
            low, high = intervals[i]
            yerr = [[max(ys[i] - low, 0.0)], [max(high - ys[i], 0.0)]]
        ax.errorbar(xs[i], ys[i], yerr=yerr, fmt=markers[i % len(markers)],
                    color=cmap[p.name], markersize=8, capsize=3, markeredgecolor="black",
                    markeredgewidth=0.5, label=f"{p.name} (τw {p.weighted_tau:.2f})", zorder=2)


def _increase_axis(ax, drawn: Sequence) -> None:
    """A log axis of relative increases: a +5% and a +400% row on one axis."""
    values = np.asarray([[p.relative_increase_pct, *p.ci95_pct] for p in drawn], np.float64)
    positive = values[np.isfinite(values) & (values > 0)]
    bottom = max(0.5, 0.7 * positive.min()) if positive.size else 1.0
    top = 1.4 * np.nanmax(values)
    ax.set_yscale("log")  # +0% would sit at the bottom
    ax.set_ylim(bottom, max(top, 2 * bottom))
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if bottom <= t <= top]
    ax.set_yticks(ticks, [f"+{t}%" for t in ticks])
    ax.minorticks_off()
    ax.grid(True, axis="y", color="0.9")
    ax.set_ylabel("relative error increase over the oracle (95% CI)")


def _cost_axis(ax, drawn: Sequence, n_experts: int) -> None:
    """The x axis in expert forward passes, with a "trains all" tick for brute force."""
    brute_x = _brute_force_x(n_experts)
    xticks = list(range(0, n_experts + 1, max(1, n_experts // 10)))
    labels = [str(t) for t in xticks]
    right = n_experts
    if any(np.isinf(p.passes) for p in drawn):
        xticks.append(brute_x)
        labels.append(f"trains\nall {n_experts}")
        ax.axvline((n_experts + brute_x) / 2, color="lightgrey", linewidth=1)
        right = brute_x
    ax.set_xticks(xticks, labels)
    margin = 0.8 * max(1, n_experts / 10)
    ax.set_xlim(-margin, right + margin)
    ax.set_xlabel(f"expert forward passes per new task (of {n_experts} experts)")
