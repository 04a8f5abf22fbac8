"""Run the embedding job on a two-node ``ray.cluster_utils.Cluster`` and kill the worker node
once the first batch has landed; report what happened as JSON.

Runs in its own process because the test session already holds another Ray. The head has no
CPUs, so every task runs on the worker node; a replacement node is added right after the kill.
The job runs in a thread because Ray adds nodes only from the main thread.
If the job does not finish on its own (retries exhausted), it is run a second time.

    python tests/_cluster_fault_script.py --root DIR --out result.json -- <job args>
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from jobs import embed_tasks  # noqa: E402
from t2v_core.embedding.store import dataset_path, read_embedding_rows  # noqa: E402
from t2v_core.storage import StorageRoot  # noqa: E402
from t2v_core.zoo.manifest import read_tasks  # noqa: E402

log = logging.getLogger("cluster_fault")


def _rows(root: StorageRoot, probe_id: str, method: str) -> int:
    return read_embedding_rows(root, probe_id, method).num_rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--probe-id", required=True)
    parser.add_argument("--method", default="montecarlo")
    parser.add_argument("job_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    job_args = [a for a in args.job_args if a != "--"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    root = StorageRoot(args.root)
    parts_dir = dataset_path(args.probe_id, args.method)
    report: dict = {"n_tasks": len(read_tasks(root))}

    def first_run() -> None:
        start = time.monotonic()
        report["rc_first"] = embed_tasks.main(["--root", args.root, *job_args])
        report["seconds_first"] = time.monotonic() - start

    job = threading.Thread(target=first_run, daemon=True)
    job.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not root.list(parts_dir, recursive=True):
        time.sleep(0.02)
    report["rows_at_kill"] = _rows(root, args.probe_id, args.method)
    cluster.remove_node(worker, allow_graceful=False)
    log.info("removed the worker node with %d of %d rows written",
             report["rows_at_kill"], report["n_tasks"])
    time.sleep(1.0)
    cluster.add_node(num_cpus=1)
    log.info("added a replacement node")
    job.join(timeout=100)
    report["first_run_hung"] = job.is_alive()
    report["rows_after_first"] = _rows(root, args.probe_id, args.method)
    if not job.is_alive() and (
        report["rc_first"] != 0 or report["rows_after_first"] < report["n_tasks"]
    ):
        report["rc_rerun"] = embed_tasks.main(["--root", args.root, *job_args])
    with open(args.out, "w") as f:
        json.dump(report, f)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
