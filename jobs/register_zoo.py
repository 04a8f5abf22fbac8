"""Register a folder of tasks into the zoo manifest.

    python -m jobs.register_zoo --folders DIR|s3://bucket/tasks --root ./t2v-data

Each subfolder of ``--folders`` with ``train/`` and ``test/`` (ImageFolder) or ``train.parquet``
and ``test.parquet`` is one task, named after it; new tasks are added, changed ones re-hashed.
The closing summary lists every skipped folder and problem. Exit status 0 when at least one
task is registered, 1 when none could be, 2 on bad arguments.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jobs._cli import config_reader, opt, root_option, run_main
from t2v_core.storage import redact_uri
from t2v_core.zoo.data import DataError
from t2v_core.zoo.register import RegisterResult, register_folders

log = logging.getLogger("jobs.register_zoo")


@dataclass(frozen=True, kw_only=True)
class Config:
    """The job's options, one field per flag."""

    folders: str = opt(help="folder (local or s3://) holding one subfolder per task")
    root: str = root_option()
    family_from: str = opt("name-prefix", choices=["name-prefix", "parent"], help="task family "
                           "when the task folder has no family.txt: the name up to the first "
                           "'__' or '-' (name-prefix), or the name of the folder holding the "
                           "tasks (parent)")
    format: str = opt("auto", choices=["auto", "imagefolder", "parquet"])
    no_progress: bool = opt(False, help="no progress bar")
    verbose: bool = opt(False, flag=("-v", "--verbose"))


class NothingRegisteredError(RuntimeError):
    """No folder held a valid task; ``result`` says why for each."""

    def __init__(self, message: str, result: RegisterResult):
        super().__init__(message)
        self.result = result


parse_args = config_reader(Config)


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
    result = RegisterResult.of(report, redact_uri(config.root))
    log.info("%s", result.summary[0])
    for task_id in result.added:
        log.info("added %s", task_id)
    for task_id in result.updated:
        log.info("updated %s", task_id)
    for line in result.summary[1:]:
        log.warning("%s", line)
    if not report.registered:
        raise NothingRegisteredError(
            f"no task could be registered from {redact_uri(config.folders)}", result)
    return result


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args, run, argv, errors={DataError: 1, NothingRegisteredError: 1})


if __name__ == "__main__":
    sys.exit(main())
