"""Register a folder of tasks into the zoo manifest.

    python -m jobs.register_zoo --folders DIR|s3://bucket/tasks --root ./t2v-data

Each immediate subdirectory of ``--folders`` with ``train/`` and ``test/`` (ImageFolder) or
``train.parquet`` and ``test.parquet`` is one task, named after the subdirectory. New tasks are
added, changed ones re-hashed, unchanged ones left alone. Exit status 0 when at least one task
is registered, 1 when none could be, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from t2v_core.storage import redact_uri
from t2v_core.zoo.data import DataError
from t2v_core.zoo.register import register_folders

log = logging.getLogger("jobs.register_zoo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.register_zoo", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--folders", required=True, help="folder (local or s3://) holding one subfolder per task"
    )
    p.add_argument(
        "--root", default="./t2v-data", help="storage root (local path or s3://bucket/prefix)"
    )
    p.add_argument(
        "--family-from",
        choices=["name-prefix", "parent"],
        default="name-prefix",
        help="task family when the task folder has no family.txt: the name up to the first "
        "'__' or '-' (name-prefix), or the name of the folder holding the tasks (parent)",
    )
    p.add_argument("--format", choices=["auto", "imagefolder", "parquet"], default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    progress = (
        None if args.no_progress else (lambda dirs: tqdm(dirs, desc="scanning tasks", unit="task"))
    )
    try:
        with logging_redirect_tqdm():
            report = register_folders(
                args.folders,
                args.root,
                family_from=args.family_from,
                format=args.format,
                progress=progress,
            )
    except DataError as exc:
        log.error("%s", exc)
        return 1
    up = report.upsert
    log.info(
        "zoo %s: %d added, %d updated, %d unchanged, %d skipped, %d problems",
        redact_uri(args.root),
        len(up.added),
        len(up.updated),
        len(up.unchanged),
        len(report.skipped),
        len(report.problems),
    )
    for task_id in up.added:
        log.info("added %s", task_id)
    for task_id in up.updated:
        log.info("updated %s", task_id)
    for name, reason in sorted(report.skipped.items()):
        log.warning("skipped %s: %s", name, reason)
    if not report.registered:
        log.error("no task could be registered from %s", redact_uri(args.folders))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
