"""Command-line plumbing shared by the jobs. A job's ``Config`` dataclass is its command line:
each field is declared once, with its flag's help, by :func:`opt`, and :func:`parse_config`
builds the parser from the fields. Also: logging, the shared options, the shape of every
``main`` (:func:`run_main`) and the MLflow record of a stage."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass
from typing import Any, TypeVar

from jobs._ray_util import checked_root
from t2v_core.review.reports import run_stamp  # noqa: F401 (the jobs' run folders)

C = TypeVar("C")
R = TypeVar("R")


def opt(default: Any = MISSING, help: str | None = None, *,
        flag: str | tuple[str, ...] | None = None, group: str | None = None,
        exclusive: bool = False, **argparse_kwargs: Any) -> Any:
    """A Config field that is also a flag. The flag is ``--field-name`` unless ``flag`` names
    it; a bool defaulting to False is a ``store_true`` switch, one defaulting to True a
    ``store_false`` switch (``--no-field-name``); a field without default is a required flag.
    ``group`` titles its --help section, ``exclusive`` makes it one of the job's required
    either-or flags; the rest (type, choices, metavar, nargs) goes to ``add_argument``. Without
    ``type``, an int or float field (or an optional one) parses as that. The help shows a
    default other than None unless it speaks of the default itself."""
    return dataclasses.field(default=default, metadata={
        "help": help, "flag": flag, "group": group, "exclusive": exclusive,
        "argparse": argparse_kwargs})


def _value_type(hint: Any) -> type | None:
    members = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return members[0] if len(members) == 1 and members[0] in (int, float) else None


def add_option(parser: argparse.ArgumentParser | argparse._ActionsContainer, name: str,
               field: dataclasses.Field, hint: Any) -> None:
    """The flag of one :func:`opt` field, whose value lands in ``name``."""
    meta = field.metadata
    kwargs = {"dest": name, "help": meta.get("help"), **meta.get("argparse", {})}
    if (field.default not in (None, MISSING) and not isinstance(field.default, bool)
            and "default" not in (kwargs["help"] or "")):
        kwargs["help"] = f"{kwargs['help'] or ''} (default: %(default)s)".lstrip()
    flags = meta.get("flag") or f"--{name.replace('_', '-')}"
    if isinstance(field.default, bool):
        kwargs["action"] = "store_false" if field.default else "store_true"
        if field.default and not meta.get("flag"):
            flags = f"--no-{name.replace('_', '-')}"
    else:
        kwargs.setdefault("type", _value_type(hint))
        if field.default is MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = field.default
    parser.add_argument(*([flags] if isinstance(flags, str) else flags), **kwargs)


def add_options(parser: argparse.ArgumentParser, config_type: type) -> None:
    """The fields of ``config_type`` as flags, in field order, except that the --help sections
    a job inherits (Ray) come after its own flags."""
    hints = typing.get_type_hints(config_type)
    own = config_type.__dict__.get("__annotations__", {})
    chosen = sorted(dataclasses.fields(config_type),
                    key=lambda f: bool(f.metadata.get("group")) and f.name not in own)
    titles = dict.fromkeys(f.metadata["group"] for f in chosen if f.metadata.get("group"))
    groups = {title: parser.add_argument_group(title) for title in titles}
    either = (parser.add_mutually_exclusive_group(required=True)
              if any(f.metadata.get("exclusive") for f in chosen) else None)
    for f in chosen:
        where = either if f.metadata.get("exclusive") else groups.get(f.metadata.get("group"))
        add_option(where or parser, f.name, f, hints[f.name])


def config_parser(config_type: type, **parser_kwargs: Any) -> argparse.ArgumentParser:
    """``python -m jobs.<name>``'s parser: description from the job's module docstring."""
    module = sys.modules[config_type.__module__]
    parser = argparse.ArgumentParser(prog=f"python -m {_module_name(config_type)}",
                                     description=(module.__doc__ or "").split("\n\n")[0],
                                     **parser_kwargs)
    add_options(parser, config_type)
    return parser


def parse_config(config_type: type[C], argv: Sequence[str] | None, **parser_kwargs: Any) -> C:
    """Flags → the job's frozen ``Config`` (lists become tuples). Values the Config refuses
    are a usage error: argparse's message and exit status 2."""
    parser = config_parser(config_type, **parser_kwargs)
    args = vars(parser.parse_args(argv))
    try:
        return config_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    except ValueError as exc:
        parser.error(str(exc))


def config_reader(config_type: type[C], **parser_kwargs: Any
                  ) -> Callable[[Sequence[str] | None], C]:
    """A job's ``parse_args``: :func:`parse_config` for its Config."""
    return lambda argv=None: parse_config(config_type, argv, **parser_kwargs)


def _module_name(obj: Any) -> str:
    """The importable name of ``obj``'s module, also when it runs as ``__main__``."""
    module = sys.modules[obj.__module__]
    return module.__spec__.name if getattr(module, "__spec__", None) else module.__name__


def run_main(parse: Callable[[Sequence[str] | None], C], run: Callable[[C], R],
             argv: Sequence[str] | None, *,
             errors: Mapping[type[Exception], int | tuple[int, str]] | None = None,
             report: Callable[[C, R], int | None] | None = None) -> int:
    """Every job's ``main``: flags → Config, logging, ``run``. An exception of a type in
    ``errors`` is logged on the job's logger (with the format given beside its exit status,
    else ``"%s"``) and its status returned; ``report`` shows a finished run's result and
    returns its exit status (None: 0)."""
    config = parse(argv)
    setup_logging(config.verbose)
    errors = errors or {}
    try:
        result = run(config)
    except tuple(errors) as exc:
        outcome = next(v for t, v in errors.items() if isinstance(exc, t))
        code, message = outcome if isinstance(outcome, tuple) else (outcome, "%s")
        logging.getLogger(_module_name(type(config))).error(message, exc)
        return code
    return (report(config, result) if report else None) or 0


def setup_logging(verbose: bool = False) -> None:
    """One readable log format for every job; third-party chatter stays at WARNING."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("mlflow", "alembic", "botocore", "urllib3", "numba", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# -- options several jobs share ---------------------------------------------------------------
def root_option() -> Any:
    return opt("./t2v-data", type=checked_root, help="storage root: a local path or "
               "s3://bucket/prefix (default: %(default)s)")


def tracking_uri_option(default: str = "a sqlite store under the root") -> Any:
    return opt(None, help=f"MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else {default})")


def _shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or int(match[1]) >= int(match[2]):
        raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n, got {text!r}")
    return int(match[1]), int(match[2])


def shard_option(what: str, group: str | None = None) -> Any:
    return opt(None, group=group, type=_shard, help=f"i/n: {what}")


def repeats_option(group: str | None = None) -> Any:
    return opt(1, group=group, metavar="N", help="repeated k-fold: average each task's "
               "metrics over N fold assignments (seeds --seed .. --seed+N-1), since on a few "
               "dozen tasks which tasks share a fold moves the table by several points; costs "
               "N times the fitting (default 1)")


def error_floor_option(group: str | None = None) -> Any:
    """A near-zero oracle error would make every relative miss enormous."""
    from t2v_core.recommend.metrics import DEFAULT_ERROR_FLOOR

    return opt(DEFAULT_ERROR_FLOOR, group=group, help="oracle errors below this count as this "
               "in (err − oracle)/oracle, in every fit and report: a task some expert solves "
               "perfectly would otherwise turn any miss into +1000s of %%")


@dataclass(frozen=True, kw_only=True)
class CommonOptions:
    """--root, the MLflow options and -v, taken by every job that reads the zoo."""

    root: str = root_option()
    tracking_uri: str | None = tracking_uri_option()
    tracking: bool = opt(True, help="do not log to MLflow")
    verbose: bool = opt(False, flag=("-v", "--verbose"), help="debug logging")


@dataclass(frozen=True, kw_only=True)
class EmbeddingSetOptions(CommonOptions):
    """Which stored embeddings to use: needed only when the root holds several."""

    probe_id: str | None = opt(None, help="probe id of the embeddings (default: the only one "
                               "in the root)")
    method: str | None = opt(None, help="Fisher method of the embeddings (default: the only "
                             "one stored)")
    mode: str = opt("probe", choices=["probe", "finetune"], help="which matrix to learn from")


@dataclass(frozen=True, kw_only=True)
class MetaDatasetOptions(EmbeddingSetOptions):
    """The options of the jobs that learn from the meta-dataset and score its selections."""

    error_floor: float = error_floor_option()


@dataclass(frozen=True, kw_only=True)
class RayOptions:
    """The Ray options of the jobs that fan out Ray tasks themselves."""

    address: str | None = opt(None, group="Ray", help="Ray cluster to join: 'auto', host:port "
                              "or ray://host:port. Default: RAY_ADDRESS (set by 'ray job "
                              "submit') or else a new local Ray on loopback")
    local_cpus: int | None = opt(None, group="Ray", help="CPUs of a new local Ray (default: "
                                 "all); ignored when joining a cluster")
    forward_env: bool = opt(True, group="Ray", help="do not pass the driver's AWS_*/MLFLOW_* "
                            "variables to the workers")


def repeats_problem(repeats: int, folds: str | int) -> str | None:
    """Leave-one-task-out has a single split, so only k-fold can be repeated."""
    if repeats < 1:
        return f"--repeats must be at least 1, got {repeats}"
    if repeats > 1 and folds == "loo":
        return "--repeats needs --folds K: leave-one-task-out has no random split to repeat"
    return None


def record_stage(config: Any, name: str, params: dict, metrics: dict) -> None:
    """:func:`t2v_core.review.tracking.record_stage` for a job's Config (MLflow, heavy, is
    imported only here: Tune's workers import the jobs)."""
    from t2v_core.review.tracking import record_stage as record

    record(config.root, name, params, metrics, enabled=config.tracking,
           tracking_uri=config.tracking_uri)
