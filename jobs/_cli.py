"""Command-line plumbing shared by the jobs: logging and the MLflow options."""

from __future__ import annotations

import argparse
import logging


def setup_logging(verbose: bool = False) -> None:
    """One readable log format for every job; third-party chatter stays at WARNING."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("mlflow", "alembic", "botocore", "urllib3", "numba", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--root, the MLflow options and -v, taken by every job that reads the zoo."""
    parser.add_argument("--root", default="./t2v-data",
                        help="storage root: a local path or s3://bucket/prefix")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a sqlite "
                        "store under the root)")
    parser.add_argument("--no-tracking", dest="tracking", action="store_false",
                        help="do not log to MLflow")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


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
