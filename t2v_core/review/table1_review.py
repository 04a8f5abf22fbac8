"""Table 1 where a reviewer looks: its files under the storage root, its figures, its MLflow run.

``evaluation/<run>/table1.md``, ``table1.json`` and ``cost_vs_quality.png``, with
``evaluation/LATEST`` naming the newest run; in MLflow, an ``evaluate`` stage run with the
table's metrics, files and diagnostic figures, and the table on the pipeline run's page."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from t2v_core.recommend.meta_dataset import MetaDataset
from t2v_core.recommend.table1 import Table1Report
from t2v_core.review.reports import REPORTS_DIR, write_report
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import TaskSpec

__all__ = ["LATEST", "cost_figure", "table1_figures", "track_table1", "write_table1"]

LATEST = f"{REPORTS_DIR}/LATEST"


def cost_figure(data: MetaDataset, table: Table1Report):
    """Each row's cost against its quality: drawn once, saved beside the report and logged."""
    from t2v_core.review import plots  # matplotlib, only when plots are drawn

    floor = table.payload.get("oracle_noise_floor") or {}
    return plots.cost_vs_quality(table.costs, len(data.expert_ids),
                                 tau_ceiling=floor.get("weighted_tau"))


def write_table1(root: StorageRoot, table: Table1Report, *, figure=None) -> str:
    """The report's files (with ``figure``, the :func:`cost_figure`, as
    ``cost_vs_quality.png``), then LATEST (so a reader following it finds them all); returns
    ``evaluation/<run>``."""
    folder = write_report(root, "table1", table.markdown, table.payload)
    if figure is not None:
        from t2v_core.review.plots import png_bytes

        root.write_bytes_atomic(f"{folder}/cost_vs_quality.png", png_bytes(figure))
    root.write_bytes_atomic(LATEST, folder.rsplit("/", 1)[-1].encode())
    return folder


def table1_figures(data: MetaDataset, table: Table1Report, cost=None) -> dict[str, Any]:
    """The evaluation's diagnostic figures by name: where the tasks lie, the error matrix,
    and each row's cost against its quality (``cost``, when already drawn)."""
    from t2v_core.review import plots  # matplotlib, only when plots are drawn

    families, task_ids = list(data.families), list(data.task_ids)
    task_map = plots.task_map(data.embeddings, families, task_ids)
    heatmap, _ = plots.distance_heatmap(families=families, distances=task_map.distances)
    return {
        "task_map": task_map.figure,
        "distance_heatmap": heatmap,
        "error_matrix": plots.error_matrix_heatmap(data.errors, task_ids, list(data.expert_ids),
                                                   task_families=families),
        "cost_vs_quality": cost_figure(data, table) if cost is None else cost,
    }


def track_table1(root: StorageRoot, data: MetaDataset, table: Table1Report,
                 params: Mapping[str, Any], *, figures: bool = True,
                 tasks: Sequence[TaskSpec] | None = None,
                 tracking_uri: str | None = None, cost=None) -> None:
    """One ``evaluate`` stage run: the table's metrics and files, with ``figures`` the
    diagnostic figures (``cost``: the :func:`cost_figure` when already drawn) and what the
    norm tracks (``norm_correlates.json``)."""
    import mlflow  # the MLflow client, only when tracking

    from t2v_core.review import plots, tracking

    tracking.configure(root, tracking_uri=tracking_uri)
    with tracking.stage_run("evaluate", params):
        tracking.log_metrics(tracking.table1_metrics(table.result))
        mlflow.log_text(table.markdown, "table1.md")
        mlflow.log_dict(table.payload, "table1.json")
        if figures:
            norms, norm_figure = plots.norm_report(data, tasks)
            tracking.log_figures({**table1_figures(data, table, cost),
                                  "norm_correlates": norm_figure})
            mlflow.log_dict(norms.to_dict(), "norm_correlates.json")
        tracking.publish_to_pipeline(table.markdown)  # where a reviewer lands
