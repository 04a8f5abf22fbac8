"""What each row of Table 1 costs per new task, next to what it buys.

A recommender is worth running only if it is cheaper than what it replaces: the per-expert
transferability scores run every expert over the task's images, brute force trains every
expert, and the task-embedding selectors run one probe. The unit here is the expert forward
pass over a task's images (:func:`~t2v_core.recommend.shortlist.expert_forward_passes`), the
cost that grows with the zoo.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from t2v_core.recommend.protocol import MIXED, EvaluationResult
from t2v_core.recommend.selectors import Selector
from t2v_core.recommend.shortlist import expert_forward_passes

__all__ = ["CostPoint", "cost_markdown", "cost_payload", "cost_points", "passes_label"]


@dataclass(frozen=True)
class CostPoint:
    """One row of the table: its cost per task and its quality on one meta-task."""

    name: str
    passes: float  # expert forward passes per task; inf: trains every expert; NaN: reference
    relative_increase_pct: float
    ci95_pct: tuple[float, float]
    weighted_tau: float


def cost_points(result: EvaluationResult, selectors: Mapping[str, Selector],
                meta_task: str = MIXED) -> list[CostPoint]:
    """Every evaluated row's cost and quality on ``meta_task``. ``selectors`` are the templates
    the evaluation was given: their ledgers hold the passes their fitted copies spent."""
    n_experts = len(result.expert_ids)
    out = []
    for name, report in result.reports.items():
        scores = report.by_meta_task[meta_task]
        out.append(CostPoint(
            name, expert_forward_passes(selectors[name], n_experts), scores.relative_increase_pct,
            tuple(scores.relative_increase_ci95_pct), scores.weighted_tau))
    return out


def passes_label(passes: float, n_experts: int) -> str:
    """The cost as the table prints it."""
    if math.isnan(passes):
        return "– (reference)"
    if math.isinf(passes):
        return f"trains all {n_experts}"
    return f"{passes:.2f}" if passes != round(passes) else f"{int(passes)}"


def cost_markdown(points: list[CostPoint], n_experts: int, meta_task: str = MIXED) -> str:
    """The cost-vs-quality table, rows in the evaluation's order."""
    lines = [
        f"Cost and quality on {meta_task} (expert forward passes per new task, of "
        f"{n_experts} experts; the task-embedding rows also run one probe pass):",
        "",
        "| selector | expert forward passes | relative increase | 95% CI | weighted τ |",
        "|---|---|---|---|---|",
    ]
    for p in points:
        low, high = p.ci95_pct
        lines.append(f"| {p.name} | {passes_label(p.passes, n_experts)} | "
                     f"{_pct(p.relative_increase_pct)} | {_pct(low)} … {_pct(high)} | "
                     f"{'–' if math.isnan(p.weighted_tau) else f'{p.weighted_tau:.3f}'} |")
    return "\n".join(lines)


def _pct(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"+{value:.2f}%"


def cost_payload(points: list[CostPoint]) -> list[dict]:
    """The points as strict JSON values: passes null for a reference row, and
    ``trains_every_expert`` for brute force; NaN metrics become null."""
    def num(v: float) -> float | None:
        return None if v is None or math.isnan(v) or math.isinf(v) else float(v)

    return [{"selector": p.name, "expert_forward_passes": num(p.passes),
             "trains_every_expert": math.isinf(p.passes),
             "relative_increase_pct": num(p.relative_increase_pct),
             "relative_increase_ci95_pct": [num(v) for v in p.ci95_pct],
             "weighted_tau": num(p.weighted_tau)} for p in points]
