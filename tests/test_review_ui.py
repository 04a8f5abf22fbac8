"""What a reviewer meets in MLflow: the newest results on the pipeline run and in the
experiment's description, and (with Chromium installed) the experiment page opening on the
runs rather than the GenAI trace overview. Real MLflow sqlite stores and a real ``mlflow server``."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

# each test starts with MLflow unconfigured and leaves no run open or URI behind
from test_tracking import _isolated_mlflow  # noqa: F401

from t2v_core.review import tracking

ROOT = Path(__file__).resolve().parents[1]
TABLE1 = ("Relative error increase over the oracle expert (mean over held-out tasks, folds=loo).\n\n"
          "| selector | Mixed |\n|---|---|\n| task2vec | +6.81% |\n| chance | +52.52% |\n")
RECOMMENDATIONS = pd.DataFrame({
    "task_id": ["cub-1", "cub-1", "inat-2", "inat-2"], "rank": [2, 1, 1, 2],
    "expert_id": ["e-inat", "e-cub", "e-inat", "e-cub"], "score": [0.3, 0.7, 0.9, 0.1],
    "true_error": [0.4, 0.2, 0.1, float("nan")],
})


def _artifacts(client, run_id) -> set[str]:
    return {a.path for folder in (None, "tables") for a in client.list_artifacts(run_id, folder)}


def test_publish_puts_table1_and_recommendations_on_the_pipeline_run(tmp_path):
    cfg = tracking.configure(tmp_path / "zoo")
    client = MlflowClient(cfg.tracking_uri)
    with tracking.pipeline_run("refresh") as pipeline:
        with tracking.stage_run("evaluate") as evaluate:
            assert tracking.publish_to_pipeline(TABLE1) == pipeline.info.run_id
        assert client.get_run(pipeline.info.run_id).data.tags["mlflow.note.content"] == TABLE1.strip()
        with tracking.stage_run("recommend"):
            tracking.publish_to_pipeline(recommendations=RECOMMENDATIONS)

    run = client.get_run(pipeline.info.run_id)
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(TABLE1.strip())  # the later stage's results add to Table 1
    assert "| cub-1 | e-cub | 0.700 | 0.200 |" in note and "| inat-2 | e-inat | 0.900 | 0.100 |" in note
    assert note.index("cub-1") < note.index("inat-2") and "e-inat | 0.300" not in note
    assert {"table1.md", "tables/recommendations.json"} <= _artifacts(client, pipeline.info.run_id)
    assert mlflow.artifacts.load_text(f"runs:/{pipeline.info.run_id}/table1.md") == TABLE1
    assert "table1.md" not in _artifacts(client, evaluate.info.run_id)

    experiment = client.get_experiment(cfg.experiment_id)
    link = (f"](#/experiments/{cfg.experiment_id}/runs/{pipeline.info.run_id}"
            "?workflowType=machine_learning)")
    assert experiment.tags["mlflow.note.content"].startswith(f"**Latest results:** [{run.info.run_name}{link}")
    assert TABLE1.strip() in experiment.tags["mlflow.note.content"]
    assert experiment.tags["t2v.latest_pipeline_run_id"] == pipeline.info.run_id


def test_the_newest_publication_is_what_the_experiment_points_to(tmp_path):
    cfg = tracking.configure(tmp_path / "zoo")
    client = MlflowClient(cfg.tracking_uri)
    with tracking.pipeline_run("refresh"), tracking.stage_run("evaluate"):
        tracking.publish_to_pipeline(TABLE1)
    with tracking.stage_run("evaluate") as alone:  # by hand, outside any pipeline: its own run
        assert tracking.publish_to_pipeline("| selector | Mixed |\n|---|---|\n| new | 1% |") == \
            alone.info.run_id
    experiment = client.get_experiment(cfg.experiment_id)
    assert experiment.tags["t2v.latest_pipeline_run_id"] == alone.info.run_id
    assert "| new | 1% |" in experiment.tags["mlflow.note.content"]
    assert "task2vec" not in experiment.tags["mlflow.note.content"]


def test_publish_needs_a_run(tmp_path):
    tracking.configure(tmp_path / "zoo")
    with pytest.raises(ValueError, match="no run to publish to"):
        tracking.publish_to_pipeline(TABLE1)


def test_experiment_url_opens_the_runs_view():
    assert tracking.experiment_url("http://mlflow.example:5000/", "7") == \
        "http://mlflow.example:5000/#/experiments/7/runs?workflowType=machine_learning"


# --------------------------------------------------------------------------- in a browser


def _screenshot_script():
    spec = importlib.util.spec_from_file_location("mlflow_screenshot",
                                                  ROOT / "scripts" / "mlflow_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations there
    spec.loader.exec_module(module)
    return module


def _dom(chromium: str, url: str) -> str:
    """The page's HTML after its scripts ran, as ``chromium --headless --dump-dom`` sees it
    in a fresh profile (the UI's GenAI/model-training switch at its default)."""
    return subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
         "--virtual-time-budget=10000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium not installed (apt-get install chromium)")
def test_review_link_opens_on_the_runs_not_the_genai_overview(tmp_path):
    script = _screenshot_script()
    cfg = tracking.configure(tmp_path / "zoo")
    with tracking.pipeline_run("refresh") as pipeline:
        for stage in ("embed_tasks", "evaluate"):
            with tracking.stage_run(stage):
                tracking.log_metrics({"tasks_done": 3})
        tracking.publish_to_pipeline(TABLE1)
    where = script.landing(cfg.tracking_uri)
    assert (where.pipeline_id, where.stage_name.split(" · ")[0]) == (pipeline.info.run_id, "embed_tasks")

    with script.mlflow_server(cfg.tracking_uri) as url:
        plain = _dom("chromium", f"{url}/#/experiments/{cfg.experiment_id}")
        review = _dom("chromium", tracking.experiment_url(url, cfg.experiment_id))
        png, html = tmp_path / "page.png", tmp_path / "page.html"
        script.screenshot(script.Shot(tracking.experiment_url(url, cfg.experiment_id), where,
                                      png, html))
    # The control: MLflow's own experiment link lands on the empty GenAI overview ...
    assert any(marker in plain for marker in script.GENAI_OVERVIEW_MARKERS)
    # ... the review link on the runs, with the pipeline run and the latest-results description.
    assert not any(marker in review for marker in script.GENAI_OVERVIEW_MARKERS)
    assert where.pipeline_name in review and "Latest results:" in review
    shown = html.read_text()
    assert where.pipeline_name in shown and where.stage_name in shown  # expanded to its stages
    assert not any(marker in shown for marker in script.GENAI_OVERVIEW_MARKERS)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000


def test_screenshot_script_help():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "mlflow_screenshot.py"), "--help"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "--backend-store-uri" in out and "--demo" in out
