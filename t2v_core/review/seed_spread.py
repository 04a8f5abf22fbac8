"""Table 1 over several zoos of one world: what stays when only the experts' seed changes.

Expert training is deterministic only per machine and thread count, and the gaps between
selectors are of the size of that drift, so one table says little about which selector is
better. Given the evaluation of several zoos trained with different seeds (each root's
``evaluation/<LATEST>/table1.json``), :func:`seed_spread` gives every row (selector), in every
view (the novel tasks, the headline, and all tasks), the mean and spread across seeds of the
Mixed relative increase over the oracle and of the weighted τ, and for every pair of rows
whether their difference *survives* the seed:

    the per-seed gaps g_s = m_row(s) − m_other(s) all have the same sign (none is zero), and
    the mean gap exceeds their range: |mean(g)| > max(g) − min(g).

The range is the seeds' spread of the gap itself, so a row whose lead over another moves by
more than the lead is worth across seeds does not survive, even when it never changes sign.
Why the range and not the standard deviation: with three seeds a gap that is pure noise
(normal, zero mean) keeps one sign 25% of the time, and also clears its standard deviation
21% of the time, but its range only 8%; a true gap of two standard deviations survives the
range rule 64% of the time. The rule grows stricter with more seeds. A single seed has no
spread: nothing survives it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from t2v_core.recommend.protocol import MIXED
from t2v_core.recommend.table1 import CONTEXT_COLUMNS, NOVEL
from t2v_core.review.reports import REPORTS_DIR
from t2v_core.review.table1_review import LATEST
from t2v_core.storage import StorageRoot

__all__ = ["METRICS", "PER_EXPERT_SCORES", "Gap", "RowSpread", "SeedSpread", "Spread",
           "latest_table1", "seed_spread"]

# metric key in the report -> (its heading, whether higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "relative_increase_pct": ("relative increase (%)", False),
    "weighted_tau": ("weighted τ", True),
}
# The rows that score each expert on the task's data; the best of them is a reference.
PER_EXPERT_SCORES = tuple(name for name, (key, _) in CONTEXT_COLUMNS.items()
                          if key != "val_errors")
MODEL2VEC = "Model2Vec"


def latest_table1(root: StorageRoot | str) -> dict:
    """The ``table1.json`` of the evaluation ``evaluation/LATEST`` names under ``root``."""
    root = root if isinstance(root, StorageRoot) else StorageRoot(root)
    if not root.exists(LATEST):
        raise FileNotFoundError(f"no evaluation under {root.uri} ({LATEST} is missing)")
    run = root.read_bytes(LATEST).decode().strip()
    return json.loads(root.read_bytes(f"{REPORTS_DIR}/{run}/table1.json"))


@dataclass(frozen=True)
class Spread:
    """One number across seeds: per-seed values, mean, sample std (NaN for one seed) and
    range. Any missing value (NaN) makes the summary NaN."""

    values: tuple[float, ...]
    mean: float
    std: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        v = np.asarray([math.nan if x is None else x for x in values], dtype=float)
        std = float(v.std(ddof=1)) if len(v) > 1 else math.nan
        return cls(tuple(float(x) for x in v), float(v.mean()), std, float(v.min()),
                   float(v.max()))

    @property
    def range(self) -> float:
        return self.high - self.low


@dataclass(frozen=True)
class RowSpread:
    """A row's metrics across seeds in one view."""

    row: str
    view: str
    metrics: dict[str, Spread]


@dataclass(frozen=True)
class Gap:
    """``row`` minus ``other`` in one view and metric, per seed; ``better`` names the row
    that is better in every seed when the difference survives (see the module), else None."""

    row: str
    other: str
    view: str
    metric: str
    gap: Spread
    survives: bool
    better: str | None


def _survives(gap: Spread) -> bool:
    values = np.asarray(gap.values)
    if len(values) < 2 or not np.isfinite(values).all():
        return False
    same_sign = bool((values > 0).all() or (values < 0).all())
    return same_sign and abs(gap.mean) > gap.range


def _gap(row: str, other: str, view: str, metric: str, a: Spread, b: Spread) -> Gap:
    gap = Spread.of([x - y for x, y in zip(a.values, b.values, strict=True)])
    survives = _survives(gap)
    higher_better = METRICS[metric][1]
    row_better = (gap.mean > 0) == higher_better
    return Gap(row, other, view, metric, gap, survives,
               (row if row_better else other) if survives else None)


def _strict(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def _views(payload: Mapping) -> dict[str, dict[str, dict]]:
    """view -> row -> the row's Mixed scores in that view."""
    reports = payload["table1"]["reports"]
    names = list(payload["table1"].get("views") or {}) or ["all"]
    return {view: {row: (r.get("by_view") or {}).get(view, r["by_meta_task"])[MIXED]
                   for row, r in reports.items()} for view in names}


def _check_same_tasks(payloads: Sequence[Mapping]) -> None:
    first = payloads[0]
    for i, other in enumerate(payloads[1:], start=1):
        for key in ("task_ids", "views"):
            if other.get(key) != first.get(key):
                raise ValueError(f"evaluation {i} scores other tasks than evaluation 0 "
                                 f"({key} differ): not the same world")


@dataclass(frozen=True)
class SeedSpread:
    """Every row's spread and every pair's gap, per view and metric."""

    seeds: tuple[str, ...]
    views: tuple[str, ...]
    rows: tuple[str, ...]
    spreads: dict[str, dict[str, RowSpread]]  # view -> row -> spread
    missing_rows: tuple[str, ...]  # rows some evaluation lacks: left out

    def gap(self, row: str, other: str, view: str, metric: str) -> Gap:
        a, b = self.spreads[view][row], self.spreads[view][other]
        return _gap(row, other, view, metric, a.metrics[metric], b.metrics[metric])

    def pairs(self) -> list[Gap]:
        """Every unordered pair of rows (in row order), in every view and metric."""
        return [self.gap(a, b, view, metric) for view in self.views for metric in METRICS
                for i, a in enumerate(self.rows) for b in self.rows[i + 1:]]

    def best_per_expert_score(self, view: str) -> str | None:
        """The per-expert score (LogME, LEEP, ridge LOO, NCE) with the lowest mean Mixed relative
        increase across seeds in ``view``; None when none was evaluated."""
        present = [r for r in PER_EXPERT_SCORES if r in self.spreads[view]]
        return min(present, default=None, key=lambda r: self.spreads[view][r]
                   .metrics["relative_increase_pct"].mean)

    def references(self, view: str) -> list[str]:
        """The rows every row is compared with in the Markdown: the best per-expert score
        and Model2Vec (those evaluated)."""
        refs = [self.best_per_expert_score(view), MODEL2VEC]
        return [r for r in dict.fromkeys(refs) if r is not None and r in self.spreads[view]]

    def to_dict(self) -> dict:
        """Plain data for strict JSON (a missing number is None)."""
        return _strict({
            "seeds": list(self.seeds), "views": list(self.views), "rows": list(self.rows),
            "missing_rows": list(self.missing_rows),
            "survival_rule": "per-seed gaps share one nonzero sign and |mean gap| > max − min",
            "spreads": {view: {row: {m: asdict(s) for m, s in rs.metrics.items()}
                               for row, rs in by_row.items()}
                        for view, by_row in self.spreads.items()},
            "references": {view: self.references(view) for view in self.views},
            "pairs": [asdict(g) for g in self.pairs()],
        })

    def markdown(self) -> str:
        return spread_markdown(self)


def seed_spread(payloads: Sequence[Mapping], seeds: Sequence[str] | None = None) -> SeedSpread:
    """The spread of ``payloads`` (``table1.json`` of one world's zoos, one per seed, named
    by ``seeds``). Rows missing from some payload are left out; payloads scoring different
    tasks raise ValueError."""
    if not payloads:
        raise ValueError("no evaluation to summarise")
    seeds = tuple(seeds) if seeds is not None else tuple(str(i) for i in range(len(payloads)))
    if len(seeds) != len(payloads):
        raise ValueError(f"{len(seeds)} seed names for {len(payloads)} evaluations")
    _check_same_tasks(payloads)
    per_seed = [_views(p) for p in payloads]
    views = tuple(v for v in per_seed[0] if all(v in s for s in per_seed))
    first_rows = list(per_seed[0][views[0]])
    rows = tuple(r for r in first_rows if all(r in s[v] for s in per_seed for v in views))
    every = dict.fromkeys(r for s in per_seed for v in views for r in s[v])
    missing = tuple(r for r in every if r not in rows)
    spreads = {view: {row: RowSpread(row, view, {
        m: Spread.of([s[view][row].get(m) for s in per_seed]) for m in METRICS})
        for row in rows} for view in views}
    return SeedSpread(seeds, views, rows, spreads, missing)


# --------------------------------------------------------------------------- Markdown


def _num(x: float, metric: str, signed: bool = False) -> str:
    if not math.isfinite(x):
        return "n/a"
    text = f"{x:+.1f}" if metric == "relative_increase_pct" else f"{x:+.3f}"
    return (text if signed else text.lstrip("+")).replace("-", "−")


def _spread_cells(s: Spread, metric: str) -> list[str]:
    return [_num(s.mean, metric), _num(s.std, metric),
            f"{_num(s.low, metric)} … {_num(s.high, metric)}"]


def _gap_cell(g: Gap) -> str:
    text = (f"{_num(g.gap.mean, g.metric, True)} "
            f"({_num(g.gap.low, g.metric, True)} … {_num(g.gap.high, g.metric, True)})")
    return f"**{text}** ✓" if g.survives else text


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _rows_table(spread: SeedSpread, view: str) -> str:
    header = ["Row"] + [f"{METRICS[m][0]} {h}" for m in METRICS for h in ("mean", "std",
                                                                           "min … max")]
    body = [[row] + [c for m in METRICS for c in _spread_cells(rs.metrics[m], m)]
            for row, rs in spread.spreads[view].items()]
    return _table(header, body)


def _references_table(spread: SeedSpread, view: str) -> str:
    refs = spread.references(view)
    header = ["Row"] + [f"Δ {METRICS[m][0]} vs {ref}" for m in METRICS
                        for ref in refs]
    body = [[row] + ["—" if row == ref else _gap_cell(spread.gap(row, ref, view, m))
                     for m in METRICS for ref in refs] for row in spread.rows]
    return _table(header, body)


def _survivors_table(spread: SeedSpread, view: str) -> str:
    better: dict[tuple[str, str], list[str]] = {}
    for g in spread.pairs():
        if g.view == view and g.survives:
            worse = g.other if g.better == g.row else g.row
            better.setdefault((g.better, g.metric), []).append(worse)
    header = ["Row"] + [f"better in every seed, beyond the spread ({METRICS[m][0]})"
                        for m in METRICS]
    body = [[row] + [", ".join(better.get((row, m), [])) or "—" for m in METRICS]
            for row in spread.rows]
    return _table(header, body)


def spread_markdown(spread: SeedSpread) -> str:
    """Per view: every row's spread, its gaps to the references, and the pairs that
    survive."""
    parts = [
        f"## Table 1 across {len(spread.seeds)} expert seeds ({', '.join(spread.seeds)})",
        "Every row's Mixed score in each seed's zoo: mean, sample std and range across seeds. "
        "Gaps are row − reference per seed (mean, then min … max). A difference *survives* "
        "(bold, ✓) when every seed's gap has the same sign and the mean gap exceeds the "
        "gaps' range (max − min). Lower relative increase and higher τ are better.",
    ]
    if spread.missing_rows:
        parts.append(f"Left out (not in every evaluation): {', '.join(spread.missing_rows)}.")
    for view in spread.views:
        title = "novel tasks (headline)" if view == NOVEL else f"{view} tasks"
        parts += [f"### View: {title}", _rows_table(spread, view),
                  f"Gaps to the best per-expert score and to {MODEL2VEC}:",
                  _references_table(spread, view),
                  "Surviving differences, all pairs:", _survivors_table(spread, view)]
    return "\n\n".join(parts) + "\n"
