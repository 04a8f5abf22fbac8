"""Register a folder of tasks into the zoo manifest.

    python -m jobs.register_zoo --folders DIR|s3://bucket/tasks --root ./t2v-data

Each immediate subdirectory of ``--folders`` with ``train/`` and ``test/`` (ImageFolder) or
``train.parquet`` and ``test.parquet`` is one task, named after the subdirectory. New tasks are
added, changed ones re-hashed, unchanged ones left alone. The closing summary lists every
skipped folder and every problem (task, file, reason). Exit status 0 when at least one task
is registered, 1 when none could be, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass, field

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jobs._cli import add_root_arg, parse_config, setup_logging
from t2v_core.storage import redact_uri
from t2v_core.zoo.data import DataError, Problem
from t2v_core.zoo.register import register_folders

log = logging.getLogger("jobs.register_zoo")


@dataclass(frozen=True, kw_only=True)
class Config:
    """The job's options; field names are the flags' dest names, defaults the flags'."""

    folders: str
    root: str = "./t2v-data"
    family_from: str = "name-prefix"
    format: str = "auto"
    no_progress: bool = False
    verbose: bool = False


@dataclass(frozen=True)
class RegisterResult:
    """Task ids by outcome, skipped folders with their reason, the problems left out of the
    registered tasks, and the closing summary (headline, then one line per skip and problem)."""

    root: str
    added: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)
    problems: tuple[Problem, ...] = ()
    summary: tuple[str, ...] = ()

    @property
    def registered(self) -> tuple[str, ...]:
        return self.added + self.updated + self.unchanged


class NothingRegisteredError(RuntimeError):
    """No folder held a valid task; ``result`` says why for each."""

    def __init__(self, message: str, result: RegisterResult):
        super().__init__(message)
        self.result = result


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        prog="python -m jobs.register_zoo", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--folders", required=True, help="folder (local or s3://) holding one subfolder per task"
    )
    add_root_arg(p)
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
    return parse_config(p, Config, argv)


def run(config: Config) -> RegisterResult:
    """Scan the folders, upsert the valid tasks and log the summary. Raises
    :class:`~t2v_core.zoo.data.DataError` when the folders cannot be read and
    :class:`NothingRegisteredError` when no task could be registered."""
    progress = (
        None if config.no_progress
        else (lambda dirs: tqdm(dirs, desc="scanning tasks", unit="task"))
    )
    with logging_redirect_tqdm():
        report = register_folders(config.folders, config.root, family_from=config.family_from,
                                  format=config.format, progress=progress)
    where = redact_uri(config.root)
    up = report.upsert
    problems = report.problem_lines()
    result = RegisterResult(where, up.added, up.updated, up.unchanged, dict(report.skipped),
                            tuple(report.problems), (report.headline(where), *problems))
    log.info("%s", result.summary[0])
    for task_id in up.added:
        log.info("added %s", task_id)
    for task_id in up.updated:
        log.info("updated %s", task_id)
    for line in problems:
        log.warning("%s", line)
    if not report.registered:
        raise NothingRegisteredError(
            f"no task could be registered from {redact_uri(config.folders)}", result)
    return result


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    setup_logging(config.verbose)
    try:
        run(config)
    except (DataError, NothingRegisteredError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
