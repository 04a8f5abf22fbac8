"""An evaluation's report, as files under the storage root (``evaluation/<run>/<name>.md`` and
``.json``, the run named by its UTC start) and as an MLflow stage run with its numbers."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping
from typing import Any

from t2v_core.storage import StorageRoot

log = logging.getLogger(__name__)

REPORTS_DIR = "evaluation"


def run_stamp() -> str:
    """UTC time to the second: the sortable name of a run's output folder under the root."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def write_report(root: StorageRoot, name: str, markdown: str, payload: dict) -> str:
    """``evaluation/<run>/<name>.md`` and ``.json``; returns the folder."""
    folder = f"{REPORTS_DIR}/{run_stamp()}"
    root.write_bytes_atomic(f"{folder}/{name}.md", markdown.encode())
    root.write_bytes_atomic(f"{folder}/{name}.json",
                            json.dumps(payload, indent=2, allow_nan=False).encode())
    return folder


def log_report(root: StorageRoot, name: str, markdown: str, payload: dict,
               params: Mapping[str, Any], *metrics: Mapping[str, Any],
               tracking_uri: str | None = None) -> None:
    """One MLflow stage run ``name`` with ``params``, ``metrics`` and the report's files.
    Tracking trouble is logged, never raised: the report is written already."""
    import mlflow  # the MLflow client, only when tracking

    from t2v_core.review import tracking

    try:
        tracking.configure(root, tracking_uri=tracking_uri)
        with tracking.stage_run(name, params):
            for values in metrics:
                tracking.log_metrics(values)
            mlflow.log_text(markdown, f"{name}.md")
            mlflow.log_dict(payload, f"{name}.json")
    except Exception as exc:  # the record is a convenience
        log.warning("could not log %s to MLflow: %s", name, exc)
