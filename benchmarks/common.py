"""Shared bits of the benchmark scripts: timing, tables, JSON results."""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("benchmarks")


def timed(fn, *args, repeat: int = 1, **kwargs):
    """Best wall time over ``repeat`` runs, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best, out


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}


def report(name: str, rows: list[dict], extra: dict) -> Path:
    """Print rows as a table and write them with the machine description to results/<name>.json."""
    cols = list(rows[0])
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(_fmt(r[c]).ljust(w) for c, w in zip(cols, widths, strict=True)) for r in rows]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "rows": rows, **extra}, indent=2))
    log.info("wrote %s", path)
    return path


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
