"""Screenshot of a zoo's experiment page in MLflow's UI, as a reviewer opens it.

    python scripts/mlflow_screenshot.py --backend-store-uri sqlite:///t2v-data/mlflow.db \\
        --out docs/mlflow-experiment.png
    python scripts/mlflow_screenshot.py --demo --out docs/mlflow-experiment.png

Starts ``mlflow server --workers 1 --host 127.0.0.1`` on a free port, opens the experiment's
runs page (the link :func:`t2v_core.review.tracking.experiment_url` gives reviewers) in
headless Chromium with the runs table set as a reviewer leaves it after a first look (newest
pipeline run expanded to its stages, run names in full; the UI keeps that in the browser),
waits until the pipeline and its stages are listed, closes the assistant panel the UI opens on
a first visit (with ``--expand-description`` opens the experiment description, which holds
Table 1), saves the PNG
(and with ``--dump-dom`` the page's HTML), and stops the server. ``--demo`` first records a
synthetic zoo's refresh (a pipeline run, its stage runs, Table 1 and recommendations) in a
temporary root, through the same tracking functions the jobs use.

Chromium is driven over its DevTools protocol (aiohttp, which Ray already brings): the plain
``chromium --screenshot`` can neither wait for the runs to load nor set the table's view. Needs ``chromium`` on the
PATH (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t2v_core.review import tracking  # noqa: E402

log = logging.getLogger("mlflow_screenshot")

#: What the UI's GenAI trace overview shows (the page a reviewer must not land on).
GENAI_OVERVIEW_MARKERS = ("Detect Issues", "Tool calls")
#: Clicked once the runs are listed: the assistant panel's close button (the UI opens the panel
#: on a first visit), and with ``--expand-description`` the experiment description's expand
#: button (Table 1 then fills the top of the page).
_CLOSE_ASSISTANT = """
document.querySelector('button[data-component-id="mlflow.assistant.chat_panel.close"]')?.click();
"""
_EXPAND_DESCRIPTION = """
document.querySelector('button[data-component-id="mlflow.experiment.metadata_editor.expand_button"]')?.click();
"""
_RUN_NAME_COLUMN = "attributes.`Run Name`"


def chromium() -> str | None:
    """The Chromium executable, if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, logfile: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {logfile.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.3)
    raise RuntimeError(f"mlflow server not healthy after {timeout:.0f}s: {logfile.read_text()[-2000:]}")


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, timeout: float = 120) -> Iterator[str]:
    """A local ``mlflow server`` on a free port for the store; yields its URL, stops it after.

    The server's job runner (GenAI scoring jobs) is left off: it starts a dozen processes."""
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="mlflow-server-") as workdir:
        logfile = Path(workdir) / "server.log"
        with open(logfile, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--workers", "1", "--host", "127.0.0.1",
                 "--port", str(port), "--backend-store-uri", backend_store_uri],
                cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, logfile, timeout)
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


class _DevTools:
    """The few DevTools-protocol calls a screenshot needs, over one page's websocket."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json()
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    async def shows(self, text: str) -> bool:
        return bool(await self.evaluate(
            f"!!document.body && document.body.innerText.includes({json.dumps(text)})"))

    async def wait_for(self, text: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not await self.shows(text):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.5)
        return True


@dataclasses.dataclass(frozen=True)
class Landing:
    """The experiment a reviewer opens, its newest pipeline run and that run's first stage."""

    experiment_id: str
    pipeline_id: str
    pipeline_name: str
    stage_name: str | None


@dataclasses.dataclass(frozen=True)
class Shot:
    """What to capture and where the PNG (and the page's HTML) go."""

    page_url: str
    landing: Landing
    out: Path
    dom_out: Path | None = None
    window_size: str = "1400,900"
    expand_description: bool = False
    timeout: float = 90


def _table_view(landing: Landing) -> dict:
    """The runs table as a reviewer leaves it after a first look: the newest pipeline expanded
    to its stages, the name column wide enough for ``<stage> · <zoo> · <time>``, and each
    stage's wall time. The UI keeps this per experiment in the browser's localStorage."""
    return {
        "runsExpanded": {landing.pipeline_id: True},
        "selectedColumns": ["metrics.`wall_time_s`"],
        "columnOrder": [_RUN_NAME_COLUMN, "runDateAndNestInfo", "duration", "metrics.`wall_time_s`"],
        "columnWidths": {_RUN_NAME_COLUMN: 380},
    }


async def _set_table_view(tools: _DevTools, page_url: str, landing: Landing) -> None:
    """Store the table view for the page's origin before the page first loads."""
    origin = "{0.scheme}://{0.netloc}".format(urllib.parse.urlsplit(page_url))
    await tools.call("Page.navigate", url=f"{origin}/health")
    key = f'MLflowLocalStorage-1.1-ExperimentPage-["{landing.experiment_id}"]-ReactComponentState'
    value = json.dumps(_table_view(landing))
    for _ in range(20):  # until the navigation has reached the origin
        if await tools.evaluate(f"location.origin === {json.dumps(origin)} && "
                                f"(localStorage.setItem({json.dumps(key)}, {json.dumps(value)}), true)"):
            return
        await asyncio.sleep(0.25)
    raise RuntimeError(f"could not reach {origin}")


async def _capture(devtools_url: str, shot: Shot) -> None:
    landing = shot.landing
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{devtools_url}/json/list") as resp:
            page = next(t for t in await resp.json() if t["type"] == "page")
        async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tools = _DevTools(ws)
            width, height = (int(v) for v in shot.window_size.split(","))
            await tools.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                             deviceScaleFactor=1, mobile=False)
            await _set_table_view(tools, shot.page_url, landing)
            await tools.call("Page.navigate", url=shot.page_url)
            if not await tools.wait_for(landing.pipeline_name, shot.timeout):
                raise TimeoutError(f"{landing.pipeline_name!r} not shown at {shot.page_url} "
                                   f"in {shot.timeout:.0f}s")
            if landing.stage_name and not await tools.wait_for(landing.stage_name, 10):
                log.warning("stage run %r not shown", landing.stage_name)
            await asyncio.sleep(1.0)
            await tools.evaluate(_CLOSE_ASSISTANT)
            if shot.expand_description:
                await tools.evaluate(_EXPAND_DESCRIPTION)
            await asyncio.sleep(1.5)  # the closing panel and the opening text settle
            png = await tools.call("Page.captureScreenshot", format="png")
            shot.out.write_bytes(base64.b64decode(png["data"]))
            if shot.dom_out is not None:
                shot.dom_out.write_text(await tools.evaluate("document.documentElement.outerHTML"))


def _devtools_url(profile: Path, proc: subprocess.Popen, timeout: float = 30) -> str:
    active = profile / "DevToolsActivePort"  # Chromium writes its port here
    deadline = time.monotonic() + timeout
    while not active.is_file() or not active.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("chromium did not start its DevTools endpoint")
        time.sleep(0.2)
    return f"http://127.0.0.1:{active.read_text().split()[0]}"


def screenshot(shot: Shot) -> None:
    """Open the page in a fresh headless Chromium profile with the reviewer's table view, wait
    until the pipeline run and its stages are listed, and save the PNG (and the page's HTML)."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium not found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", f"--user-data-dir={profile}", "--remote-debugging-port=0",
             f"--window-size={shot.window_size}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        try:
            asyncio.run(_capture(_devtools_url(Path(profile), proc), shot))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)


def landing(backend_store_uri: str, experiment: str | None = None) -> Landing:
    """The experiment (by name, else the newest task2vec-zoo one), its newest pipeline run and
    that run's first stage."""
    client = MlflowClient(backend_store_uri)
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise SystemExit(f"no experiment {experiment!r} in {backend_store_uri}")
    else:
        zoos = [e for e in client.search_experiments() if e.name.startswith("task2vec-zoo:")]
        if not zoos:
            raise SystemExit(f"no task2vec-zoo experiment in {backend_store_uri}")
        exp = max(zoos, key=lambda e: e.creation_time or 0)
    newest = client.search_runs([exp.experiment_id], "tags.`t2v.kind` = 'pipeline'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    if not newest:
        raise SystemExit(f"experiment {exp.name!r} holds no pipeline run")
    pipeline = newest[0].info
    stages = client.search_runs([exp.experiment_id],
                                f"tags.mlflow.parentRunId = '{pipeline.run_id}'",
                                order_by=["attributes.start_time ASC"], max_results=1)
    return Landing(exp.experiment_id, pipeline.run_id, pipeline.run_name,
                   stages[0].info.run_name if stages else None)


def build_demo_store(root: Path) -> str:
    """A synthetic zoo's refresh recorded under ``root``; returns the backend store URI."""
    from t2v_core.embedding.synthetic_zoo import synthetic_zoo
    from t2v_core.recommend.model2vec import Model2Vec
    from t2v_core.recommend.protocol import evaluate_selectors
    from t2v_core.recommend.report import to_markdown
    from t2v_core.recommend.selectors import ChanceSelector, OracleSelector, Task2VecSelector
    from t2v_core.review.recommender_model import recommendations_frame

    zoo = synthetic_zoo(n_clusters=3, tasks_per_cluster=4, experts_per_cluster=1, dim=16,
                        random_state=3)
    task_ids = [f"{family}-{i}" for i, family in enumerate(zoo.families)]
    cfg = tracking.configure(root)
    with tracking.pipeline_run("refresh", {"preset": "synthetic", "tasks": len(task_ids)}):
        with tracking.stage_run("embed_tasks", {"probe": "resnet18", "method": "montecarlo"}):
            tracking.log_task_counts(done=len(task_ids), failed=0)
        with tracking.stage_run("fill_matrix", {"mode": "probe"}):
            tracking.log_metrics({"cells_ok": zoo.errors.size, "cells_failed": 0})
        with tracking.stage_run("evaluate", {"folds": "loo"}):
            result = evaluate_selectors(
                {"oracle": OracleSelector(), "chance": ChanceSelector(), "task2vec": Task2VecSelector()},
                zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings, zoo.expert_ids,
                zoo.families)
            tracking.log_metrics(tracking.table1_metrics(result))
            tracking.publish_to_pipeline(to_markdown(result))
        with tracking.stage_run("recommend", {"top_k": 3}):
            model = Model2Vec(max_epochs=40, patience=10).fit(
                zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings,
                expert_ids=zoo.expert_ids)
            frame = recommendations_frame(model, zoo.task_embeddings, task_ids, top_k=3)
            tracking.publish_to_pipeline(recommendations=frame)
    return cfg.tracking_uri


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend-store-uri", help="the tracking store, e.g. sqlite:///t2v-data/mlflow.db")
    p.add_argument("--demo", action="store_true", help="record a synthetic zoo's refresh first")
    p.add_argument("--experiment", help="experiment name (default: the newest task2vec-zoo one)")
    p.add_argument("--out", type=Path, default=Path("docs/mlflow-experiment.png"))
    p.add_argument("--dump-dom", type=Path, help="also save the page's HTML here")
    p.add_argument("--window-size", default="1400,900", help="viewport WIDTH,HEIGHT")
    p.add_argument("--expand-description", action="store_true",
                   help="open the experiment description (Table 1) above the runs")
    args = p.parse_args(argv)
    if bool(args.demo) == bool(args.backend_store_uri):
        p.error("give --backend-store-uri or --demo")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="t2v-demo-") as tmp:
        store = build_demo_store(Path(tmp) / "zoo") if args.demo else args.backend_store_uri
        where = landing(store, args.experiment)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with mlflow_server(store) as url:
            page = tracking.experiment_url(url, where.experiment_id)
            log.info("opening %s", page)
            screenshot(Shot(page, where, args.out, args.dump_dom, args.window_size,
                            args.expand_description))
    log.info("saved %s (%d KB)", args.out, args.out.stat().st_size // 1024)
    return 0


if __name__ == "__main__":
    sys.exit(main())
