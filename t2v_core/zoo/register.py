"""Registration: scan task folders (local or s3://) and upsert the valid ones into the task
manifest. Rejected folders are reported with their reason and never stop the others."""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from t2v_core.storage import StorageRoot, filesystem_for, redact_uri
from t2v_core.zoo.data import (
    FORMATS,
    DataError,
    Problem,
    UnreadableURIError,
    detect_format,
    scan_task,
)
from t2v_core.zoo.manifest import TaskSpec, UpsertReport, read_tasks, upsert_tasks

log = logging.getLogger(__name__)


@dataclass
class RegisterReport:
    """What :func:`register_folders` did; ``skipped`` maps a folder name to the reason."""

    upsert: UpsertReport = field(default_factory=UpsertReport)
    skipped: dict[str, str] = field(default_factory=dict)
    problems: list = field(default_factory=list)  # list[t2v_core.zoo.data.Problem]

    @property
    def registered(self) -> tuple[str, ...]:
        return self.upsert.added + self.upsert.updated + self.upsert.unchanged

    def headline(self, where: str) -> str:
        up = self.upsert
        return (f"zoo {where}: {len(up.added)} added, {len(up.updated)} updated, "
                f"{len(up.unchanged)} unchanged, {len(self.skipped)} skipped, "
                f"{len(self.problems)} problems")

    def problem_lines(self) -> list[str]:
        """One line per skipped folder and per problem (task, file, reason), so the end of a
        run says what to fix without searching the warnings scrolled past during the scan."""
        lines = [f"skipped {name}: {reason}" for name, reason in sorted(self.skipped.items())]
        lines += [f"problem in {p.task_id}, {p.path or '(task)'}: {p.kind}: {p.message}"
                  for p in self.problems]
        return lines


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

    @classmethod
    def of(cls, report: RegisterReport, where: str) -> RegisterResult:
        up = report.upsert
        return cls(where, up.added, up.updated, up.unchanged, dict(report.skipped),
                   tuple(report.problems), (report.headline(where), *report.problem_lines()))


def discover_task_dirs(folders_uri: str) -> list[str]:
    """URIs of the candidate task folders: ``folders_uri`` itself when it is a task folder,
    else each of its immediate, non-hidden subdirectories (validated later by the scan)."""
    fs, path = filesystem_for(folders_uri)
    try:
        if not fs.isdir(path):
            raise UnreadableURIError(folders_uri, "not a directory (or does not exist)")
        if detect_format(folders_uri) is not None:
            return [str(folders_uri).rstrip("/")]
        entries = fs.ls(path, detail=True)
    except UnreadableURIError:
        raise
    except Exception as exc:
        raise UnreadableURIError(folders_uri, f"{type(exc).__name__}: {exc}") from exc
    base = str(folders_uri).rstrip("/")
    names = sorted(
        posixpath.basename(e["name"].rstrip("/")) for e in entries if e["type"] == "directory"
    )
    return [f"{base}/{n}" for n in names if not n.startswith((".", "_"))]


def register_folders(
    folders_uri: str,
    root_uri: StorageRoot | str,
    *,
    family_from: str = "name-prefix",
    format: str = "auto",
    progress: Callable[[Sequence[str]], Iterable[str]] | None = None,
) -> RegisterReport:
    """Scan every task folder under ``folders_uri`` and upsert the valid ones into the task
    manifest at ``root_uri``. Rejected folders are reported in ``skipped`` and never stop the
    others. ``format`` is ``auto`` or the one format every task must have. ``progress`` wraps
    the list of folders (e.g. a tqdm bar)."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")
    root = root_uri if isinstance(root_uri, StorageRoot) else StorageRoot(root_uri)
    report = RegisterReport()
    specs: list[TaskSpec] = []
    dirs = discover_task_dirs(folders_uri)
    for uri in progress(dirs) if progress else dirs:
        name = posixpath.basename(uri)
        try:
            spec, problems = scan_task(uri, family_from=family_from)
        except DataError as exc:
            report.skipped[name] = getattr(exc, "reason", str(exc))
            report.problems.extend(getattr(exc, "problems", []))
            log.debug("skipped %s: %s", redact_uri(uri), report.skipped[name])
            continue
        if format != "auto" and spec.format != format:
            report.skipped[name] = f"format is {spec.format}, expected {format}"
            continue
        if any(s.task_id == spec.task_id for s in specs):
            report.skipped[name] = f"duplicate task_id {spec.task_id!r}"
            continue
        report.problems.extend(problems)
        specs.append(spec)
    known = {s.task_id for s in read_tasks(root)}
    for name in report.skipped:
        if name in known:
            log.warning(
                "task %s is registered but now fails to scan; its manifest row is kept", name
            )
    if specs:
        report.upsert = upsert_tasks(root, specs)
    return report
