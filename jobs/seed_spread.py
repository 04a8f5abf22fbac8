"""Table 1 across expert seeds: each row's spread, and which differences survive the seed.

    python -m jobs.seed_spread --roots ROOT_SEED0,ROOT_SEED1,ROOT_SEED2 [--out DIR]

Each root is one zoo of the same world with its own expert seed (``jobs.demo --expert-seed``),
evaluated; its ``evaluation/LATEST`` table is read. Prints the Markdown
(:mod:`t2v_core.review.seed_spread`) and with ``--out`` writes ``seed_spread.md`` and
``seed_spread.json`` there.

Exit status: 0 done; 1 a root without an evaluation, or evaluations of different tasks; 2 bad
arguments.
"""

from __future__ import annotations

import json
import logging
import posixpath
import sys
from dataclasses import dataclass

from jobs._cli import config_reader, opt, run_main
from t2v_core.review.seed_spread import SeedSpread, latest_table1, seed_spread
from t2v_core.storage import StorageRoot, redact_uri

log = logging.getLogger("jobs.seed_spread")


def _list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


@dataclass(frozen=True, kw_only=True)
class Config:
    """The job's options, one field per flag."""

    roots: tuple[str, ...] = opt(type=_list, help="comma-separated storage roots, one per "
                                 "expert seed, each evaluated")
    names: tuple[str, ...] | None = opt(None, type=_list, help="comma-separated name of each "
                                        "root in the report (default: the roots' last path "
                                        "parts)")
    out: str | None = opt(None, help="folder (local or s3://) for seed_spread.md and .json "
                          "(default: only print)")
    verbose: bool = opt(False, flag=("-v", "--verbose"), help="debug logging")

    def __post_init__(self) -> None:
        if self.names is not None and len(self.names) != len(self.roots):
            raise ValueError(f"{len(self.names)} names for {len(self.roots)} roots")

    @property
    def labels(self) -> tuple[str, ...]:
        return self.names or tuple(posixpath.basename(r.rstrip("/")) or r for r in self.roots)


def run(config: Config) -> SeedSpread:
    """Read every root's latest Table 1, summarise, and write the report to --out."""
    payloads = []
    for root in config.roots:
        payloads.append(latest_table1(root))
        log.info("read the latest Table 1 of %s", redact_uri(root))
    spread = seed_spread(payloads, config.labels)
    if config.out:
        out = StorageRoot(config.out)
        out.write_bytes_atomic("seed_spread.md", spread.markdown().encode())
        out.write_bytes_atomic("seed_spread.json",
                               json.dumps(spread.to_dict(), indent=2, allow_nan=False).encode())
        log.info("wrote seed_spread.md and .json to %s", redact_uri(config.out))
    return spread


parse_args = config_reader(Config)


def main(argv: list[str] | None = None) -> int:
    return run_main(parse_args, run, argv, errors={ValueError: 1, FileNotFoundError: 1},
                    report=lambda config, spread: print(spread.markdown()))


if __name__ == "__main__":
    sys.exit(main())
