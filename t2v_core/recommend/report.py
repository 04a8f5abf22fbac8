"""Evaluation results as people and programs read them: Markdown tables next to the paper's
numbers, and strict JSON.

It sits in ``recommend`` rather than ``review`` because the Table-1 protocol
(:mod:`t2v_core.recommend.table1`) returns its report as Markdown, and a package may import
only those below it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from t2v_core.recommend.diagnostics import FamilyRecovery, NormDifficulty
from t2v_core.recommend.meta_dataset import MetaDataset
from t2v_core.recommend.protocol import MIXED, EvaluationResult

__all__ = [
    "PAPER_TABLE1",
    "EfficiencySetting",
    "data_efficiency_markdown",
    "data_efficiency_report",
    "folds_label",
    "size_label",
    "to_json",
    "to_markdown",
    "views_markdown",
]

# Achille et al. 2019, Table 1: relative error increase over the oracle expert, in percent.
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "Chance": {"iNat+CUB": 59.52, MIXED: 112.49},
    "ImageNet": {"iNat+CUB": 30.18, MIXED: 75.73},
    "Task2Vec": {"iNat+CUB": 42.54, MIXED: 40.30},
    "Asym Task2Vec": {"iNat+CUB": 9.97, MIXED: 29.23},
    "Model2Vec": {"iNat+CUB": 6.81, MIXED: 27.81},
}


def folds_label(folds: str | int, repeats: int = 1) -> str:
    """How tasks were held out, as report headers state it: "folds=5" or "folds=5, 3 repeats"."""
    return f"folds={folds}" + (f", {repeats} repeats" if repeats > 1 else "")


def _fmt(value: float, pct: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"+{value:.2f}%" if pct else f"{value:.3f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table_head(header: list[str]) -> list[str]:
    return [_row(header), "|" + "|".join("---" for _ in header) + "|"]


def _ranking_quality(result: EvaluationResult) -> list[str]:
    """The second table: the interval, the ratio of mean errors, hit rate, regret@k and rank
    correlations on Mixed."""
    ks = result.ks
    head = ["selector", "95% CI (bootstrap over tasks)", "mean error / Optimal", "top-1 hit",
            *(f"regret@{k}" for k in ks), "Kendall τ", "weighted τ"]
    lines = [
        f"Ranking quality on {MIXED} (regret = relative increase of the best of the top k; the "
        "interval is that of the relative increase, i.e. of regret@1; mean error / Optimal = "
        "the mean test error of the picks over that of the oracle's):",
        "",
        *_table_head(head),
    ]
    for name, rep in result.reports.items():
        s = rep.by_meta_task[MIXED]
        low, high = s.relative_increase_ci95_pct
        cells = [name, f"{_fmt(low)} … {_fmt(high)}", _fmt(s.error_ratio, pct=False),
                 _fmt(s.top1_hit_rate, pct=False)]
        cells += [_fmt(s.regret_at_k_pct[k]) for k in ks]
        cells += [_fmt(s.kendall_tau, pct=False), _fmt(s.weighted_tau, pct=False)]
        lines.append(_row(cells))
    return lines


def _weighted_tau_table(result: EvaluationResult) -> list[str]:
    """Weighted Kendall τ per meta-task: how well each selector orders the whole zoo."""
    metas = list(result.meta_tasks)
    lines = ["Weighted Kendall τ between the predicted and the true ranking, per meta-task:", "",
             *_table_head(["selector", *metas])]
    for name, rep in result.reports.items():
        lines.append(_row([name, *(_fmt(rep.by_meta_task[m].weighted_tau, pct=False)
                                   for m in metas)]))
    return lines


def _optimal(result: EvaluationResult) -> dict[str, float]:
    """The oracle's mean test error per meta-task (the paper's "Optimal"), from any report."""
    rep = next(iter(result.reports.values()), None)
    if rep is None:
        return {}
    return {m: rep.by_meta_task[m].oracle_mean_error for m in result.meta_tasks}


def to_markdown(result: EvaluationResult, paper: bool = True) -> str:
    """Table-1 style Markdown: relative error increase per meta-task, plus ranking metrics.

    With ``paper=True`` the paper's numbers sit next to the rows that correspond to its
    selectors (matched through each selector's ``paper_name``).
    """
    metas = list(result.meta_tasks)
    paper_cols = list(next(iter(PAPER_TABLE1.values()))) if paper else []
    header = ["selector", "cost", *metas, *(f"paper {c}" for c in paper_cols)]
    lines = [
        "Relative error increase over the oracle expert (mean over held-out tasks, "
        f"{folds_label(result.folds, result.repeats)}).",
        "",
        *_table_head(header),
    ]
    for name, rep in result.reports.items():
        cells = [name, rep.cost]
        cells += [_fmt(rep.by_meta_task[m].relative_increase_pct) for m in metas]
        row_paper = PAPER_TABLE1.get(rep.paper_name or "", {})
        cells += [_fmt(row_paper[c]) if c in row_paper else "" for c in paper_cols]
        lines.append(_row(cells))
    chance = ["expected chance", "exact", *(_fmt(result.expected_chance_pct[m]) for m in metas)]
    lines.append(_row(chance + [""] * len(paper_cols)))
    optimal = _optimal(result)
    lines.append(_row(["Optimal (oracle's mean test error)", "",
                       *(_fmt(optimal.get(m), pct=False) for m in metas)] + [""] * len(paper_cols)))
    n_tasks = {m: len(idx) for m, idx in result.meta_tasks.items()}
    lines += ["", "Tasks per meta-task: " + ", ".join(f"{m} {n}" for m, n in n_tasks.items()), ""]
    return "\n".join(lines + _ranking_quality(result) + [""] + _weighted_tau_table(result)) + "\n"


def views_markdown(result: EvaluationResult, titles: Mapping[str, str] | None = None,
                   notes: Mapping[str, str] | None = None, paper: bool = True) -> str:
    """:func:`to_markdown` of every view of ``result``, the headline first, each under a
    heading (``titles`` maps a view to its heading, default the view's name) and followed by
    its ``notes`` paragraph, if any."""
    parts = []
    for view in result.views:
        title = (titles or {}).get(view, view)
        text = f"### {title}\n\n" + to_markdown(result.in_view(view), paper=paper).rstrip()
        note = (notes or {}).get(view)
        parts.append(text + (f"\n\n{note}" if note else ""))
    return "\n\n".join(parts) + "\n"


_EFFICIENCY_TITLES = {
    "relative_increase_pct": "Relative error increase over the oracle",
    "top1_hit_rate": "Top-1 hit rate",
    "kendall_tau": "Kendall τ",
    "weighted_tau": "Weighted Kendall τ",
}


def data_efficiency_markdown(
    results: Mapping[Any, EvaluationResult],
    meta_task: str = MIXED,
    metric: str = "relative_increase_pct",
) -> str:
    """One table: rows = selectors, columns = training-set sizes, cells = ``metric`` (a scalar
    field of :class:`~t2v_core.recommend.metrics.MetaTaskScores`; percentages for the
    relative increase)."""
    sizes = list(results)
    names = list(next(iter(results.values())).reports) if results else []
    title = _EFFICIENCY_TITLES.get(metric, metric)
    lines = [
        f"{title} on {meta_task}, by training-set size.",
        "",
        *_table_head(["selector", *(str(s) for s in sizes)]),
    ]
    pct = metric.endswith("_pct")
    for name in names:
        cells = [name] + [
            _fmt(getattr(results[s].reports[name].by_meta_task[meta_task], metric), pct=pct)
            for s in sizes
        ]
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class EfficiencySetting:
    """How a data-efficiency evaluation was run, as its report states it."""

    mode: str  # the matrix: probe or finetune
    task_embeddings: str  # "subsample" (embedded on each size's images) or "full"
    folds: str | int
    repeats: int
    error_floor: float
    seed: int  # of the image subsets


def size_label(max_per_class: int | None) -> str:
    """A training-set size as a column of the data-efficiency table: "5/class" or "all"."""
    return "all" if max_per_class is None else f"{max_per_class}/class"


def _oracle_error(errors: np.ndarray) -> float | None:
    finite = np.isfinite(errors).any(axis=1)
    return float(np.nanmin(errors[finite], axis=1).mean()) if finite.any() else None


def _context_columns_line(columns: list[str]) -> str:
    """Where the table's context columns read their inputs at a size."""
    scores = [n for n in columns if n != "Brute force (val)"]
    parts = [f"{', '.join(scores)}: each expert's features of the same images, as the matrix "
             "job cached them at that size"] if scores else []
    if "Brute force (val)" in columns:
        parts.append("Brute force (val): the validation errors of that size's cells")
    return "; ".join(parts) + "." if parts else ""


def data_efficiency_report(results: Mapping[int | None, EvaluationResult],
                           data: Mapping[int | None, MetaDataset], setting: EfficiencySetting,
                           context_columns: list[str]) -> tuple[str, dict]:
    """The Markdown and JSON of a data-efficiency evaluation: ``results`` and ``data`` map each
    training-set size (images per class, None: all) to its evaluation and the meta-dataset it
    ran on (the same tasks and experts at every size); ``context_columns`` are the rows that
    read per-size inputs (LogME, LEEP, ridge LOO, NCE, brute force)."""
    first = next(iter(data.values()))
    by_label = {size_label(size): res for size, res in results.items()}
    oracle = {size_label(size): _oracle_error(d.errors) for size, d in data.items()}
    if setting.task_embeddings == "subsample":
        embedded = ("task embeddings computed on the same images (experts keep their "
                    "full-data source embeddings)")
    else:
        embedded = ("LIMITATION: full-data task embeddings at every size, so the selectors "
                    "see more of each task than its training did")
    header = (f"## Data efficiency: expert selection by training-set size "
              f"({len(first.task_ids)} tasks × {len(first.expert_ids)} experts, {setting.mode}-"
              f"mode matrix, probe {first.probe_id}, {first.method} Fisher, "
              f"{folds_label(setting.folds, setting.repeats)}, "
              f"oracle errors floored at {setting.error_floor:g})")
    sizes_line = (f"A column is a cap on training images per class (seeded subset, seed "
                  f"{setting.seed}; 'all' = the whole training split), for the matrix cells and "
                  f"the selectors alike; {embedded}.")
    columns_line = _context_columns_line(context_columns)
    oracle_line = "Mean test error of the oracle expert: " + ", ".join(
        f"{k} {'–' if v is None else f'{v:.3f}'}" for k, v in oracle.items()) + "."
    markdown = "\n\n".join([
        header, sizes_line, *([columns_line] if columns_line else []),
        data_efficiency_markdown(by_label).rstrip(),
        data_efficiency_markdown(by_label, metric="top1_hit_rate").rstrip(),
        oracle_line,
    ]) + "\n"
    payload = {
        "sizes": list(by_label), "max_per_class": list(results),
        "task_embeddings": setting.task_embeddings, "mode": setting.mode,
        "probe_id": first.probe_id, "method": first.method, "folds": setting.folds,
        "repeats": setting.repeats, "error_floor": setting.error_floor, "seed": setting.seed,
        "task_ids": list(first.task_ids), "expert_ids": list(first.expert_ids),
        "mean_oracle_error": oracle, "context_columns": list(context_columns),
        "by_size": {label: json.loads(to_json(res)) for label, res in by_label.items()},
    }
    return markdown, payload


def _jsonable(value: Any) -> Any:
    """NaN/inf -> None and numpy -> Python, so the output is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(result: EvaluationResult | NormDifficulty | FamilyRecovery, **dumps_kwargs: Any) -> str:
    """Strict JSON of a result dataclass (NaN becomes null)."""
    return json.dumps(_jsonable(asdict(result)), allow_nan=False, **dumps_kwargs)
