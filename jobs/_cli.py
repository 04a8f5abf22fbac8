"""Command-line plumbing shared by the jobs: flags into a job's Config, logging, the common
options (root, MLflow, embeddings) and the MLflow record of a stage."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any, TypeVar

from jobs._ray_util import checked_root

C = TypeVar("C")


def setup_logging(verbose: bool = False) -> None:
    """One readable log format for every job; third-party chatter stays at WARNING."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("mlflow", "alembic", "botocore", "urllib3", "numba", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_tracking_args(parser: argparse.ArgumentParser, default: str = "a sqlite store under "
                      "the root") -> None:
    parser.add_argument("--tracking-uri", default=None,
                        help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {default})")
    parser.add_argument("--no-tracking", dest="tracking", action="store_false",
                        help="do not log to MLflow")


def add_root_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="./t2v-data", type=checked_root,
                        help="storage root: a local path or s3://bucket/prefix "
                        "(default: %(default)s)")


def add_common_args(parser: argparse.ArgumentParser, tracking_default: str = "a sqlite store "
                    "under the root") -> None:
    """--root, the MLflow options and -v, taken by every job that reads the zoo."""
    add_root_arg(parser)
    add_tracking_args(parser, default=tracking_default)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


@dataclass(frozen=True, kw_only=True)
class CommonOptions:
    """The Config fields of :func:`add_common_args`; a job's Config extends it."""

    root: str = "./t2v-data"
    tracking: bool = True
    tracking_uri: str | None = None
    verbose: bool = False


@dataclass(frozen=True, kw_only=True)
class EmbeddingSetOptions(CommonOptions):
    """:class:`CommonOptions` plus the fields of :func:`add_embedding_args`."""

    probe_id: str | None = None
    method: str | None = None
    mode: str = "probe"


def parse_config(parser: argparse.ArgumentParser, config_type: type[C],
                 argv: list[str] | None) -> C:
    """Flags → the job's frozen ``Config`` (dest names are its field names; lists become
    tuples). Values the Config refuses are a usage error: argparse's message and exit status 2."""
    args = vars(parser.parse_args(argv))
    names = {f.name for f in dataclasses.fields(config_type)}
    unmapped = sorted(set(args) - names)
    if unmapped:  # a flag with nowhere to go would be silently ignored
        raise TypeError(f"{config_type.__qualname__} has no field for {unmapped}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    try:
        return config_type(**values)
    except ValueError as exc:
        parser.error(str(exc))


def record_stage(args: Any, name: str, params: dict, metrics: dict) -> None:
    """Log a finished batch job as an MLflow stage run, where there is somewhere to log it.

    The batch jobs (embedding, matrix) run often and on clusters, so they log only when asked
    to by --tracking-uri or $MLFLOW_TRACKING_URI, or when called inside a pipeline run (the
    demo). Tracking trouble is logged and never fails a job whose results are written.
    ``args`` is the job's Config (or its parsed flags): ``root``, ``tracking`` and
    ``tracking_uri`` are read.
    """
    import os

    import mlflow

    if not args.tracking or not (args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                                 or mlflow.active_run()):
        return
    try:
        from t2v_core.review import tracking

        if mlflow.active_run() is None:
            tracking.configure(args.root, tracking_uri=args.tracking_uri)
        with tracking.stage_run(name, params):
            tracking.log_metrics(metrics)
    except Exception as exc:  # the stage's results are stored; the record is a convenience
        logging.getLogger(__name__).warning("could not log %s to MLflow: %s", name, exc)


def add_embedding_args(parser: argparse.ArgumentParser) -> None:
    """Which stored embeddings to use: needed only when the root holds several."""
    parser.add_argument("--probe-id", default=None,
                        help="probe id of the embeddings (default: the only one in the root)")
    parser.add_argument("--method", default=None,
                        help="Fisher method of the embeddings (default: the only one stored)")
    parser.add_argument("--mode", default="probe", choices=["probe", "finetune"],
                        help="which matrix to learn from")


def add_error_floor_arg(parser: argparse.ArgumentParser) -> None:
    """The smallest oracle error used as a denominator of the relative error increase."""
    parser.add_argument(
        "--error-floor", type=float, default=0.02,
        help="oracle errors below this count as this in (err − oracle)/oracle (default 0.02): "
        "a task some expert solves perfectly would otherwise turn any miss into +1000s of %%")


def add_repeats_arg(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Repeated k-fold: one fold assignment moves the table by several points on a few dozen
    tasks."""
    parser.add_argument(
        "--repeats", type=int, default=1, metavar="N",
        help="repeated k-fold: average each task's metrics over N fold assignments (seeds "
        "--seed .. --seed+N-1), since on a few dozen tasks which tasks share a fold moves the "
        "table by several points; costs N times the fitting (default 1)")


def check_repeats(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Leave-one-task-out has a single split, so only k-fold can be repeated."""
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.repeats > 1 and args.folds == "loo":
        parser.error("--repeats needs --folds K: leave-one-task-out has no random split to repeat")


def run_stamp() -> str:
    """UTC time to the second: the sortable name of a run's output folder under the root."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
