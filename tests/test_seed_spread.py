"""The spread of Table 1 across expert seeds: closed-form spreads, and which differences
survive on hand-built evaluations whose answer is known."""

import json
import math

import pytest

from t2v_core.review.reports import write_report
from t2v_core.review.seed_spread import Spread, latest_table1, seed_spread
from t2v_core.review.table1_review import LATEST
from t2v_core.storage import StorageRoot

TASKS = ["a__1", "a__2", "b__1", "b__2"]


def _scores(rel: float, tau: float) -> dict:
    return {"Mixed": {"relative_increase_pct": rel, "weighted_tau": tau}}


def payload(rows: dict[str, tuple[float, float]], all_view: dict | None = None) -> dict:
    """A table1.json with the given (relative increase %, weighted τ) per row in the novel
    view; the all view is ``all_view`` or the novel one shifted."""
    all_view = all_view or {r: (rel + 1.0, tau) for r, (rel, tau) in rows.items()}
    reports = {r: {"by_meta_task": _scores(*rows[r]),
                   "by_view": {"novel": _scores(*rows[r]), "all": _scores(*all_view[r])}}
               for r in rows}
    return {"task_ids": TASKS, "views": {"novel": TASKS[1:], "all": TASKS},
            "table1": {"views": {"novel": {}, "all": {}}, "reports": reports}}


def seeds_of(**columns: tuple) -> list[dict]:
    """One payload per seed from per-row tuples of (rel, tau) over seeds."""
    n = len(next(iter(columns.values())))
    return [payload({row.replace("_", " "): values[s] for row, values in columns.items()})
            for s in range(n)]


def test_spread_is_mean_sample_std_and_range():
    s = Spread.of([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.low, s.high, s.range) == (2.0, 1.0, 1.0, 3.0, 2.0)
    assert math.isnan(Spread.of([4.0]).std)
    assert math.isnan(Spread.of([1.0, None]).mean)


def test_a_consistent_difference_survives_and_a_sign_flip_does_not():
    # LogME beats Model2Vec by about 10 points in every seed; Chance beats Model2Vec in
    # seed 1 only
    result = seed_spread(seeds_of(
        LogME=((10, .6), (12, .62), (11, .61)),
        Model2Vec=((20, .4), (21, .41), (22, .42)),
        Chance=((30, 0.), (19, .5), (35, 0.)),
    ), ["0", "1", "2"])
    consistent = result.gap("LogME", "Model2Vec", "novel", "relative_increase_pct")
    assert consistent.gap.values == (-10.0, -9.0, -11.0)
    assert consistent.survives and consistent.better == "LogME"
    tau = result.gap("Model2Vec", "LogME", "novel", "weighted_tau")
    assert tau.survives and tau.better == "LogME"  # higher τ is better
    flipped = result.gap("Chance", "Model2Vec", "novel", "relative_increase_pct")
    assert flipped.gap.values == (10.0, -2.0, 13.0)
    assert not flipped.survives and flipped.better is None
    # every pair is reported once per view and metric
    assert len(result.pairs()) == 3 * 2 * 2


@pytest.mark.parametrize(("gaps", "survives"), [
    ((-4.0, -6.0), True),    # mean 5 > range 2
    ((-2.0, -8.0), False),   # same sign, but mean 5 < range 6
    ((-1.0, -10.0, -20.0), False),
    ((3.0, 3.0, 3.0), True),  # no spread at all
    ((0.0, -5.0, -5.0), False),  # a tie in one seed is no sign
])
def test_same_sign_is_not_enough_the_mean_gap_must_exceed_its_range(gaps, survives):
    result = seed_spread(seeds_of(LEEP=tuple((50.0 + g, .5) for g in gaps),
                                  Model2Vec=tuple((50.0, .5) for _ in gaps)))
    assert result.gap("LEEP", "Model2Vec", "novel", "relative_increase_pct").survives is survives


def test_one_seed_has_no_spread_and_nothing_survives_it():
    result = seed_spread(seeds_of(LogME=((10, .9),), Model2Vec=((90, .1),)))
    assert not any(g.survives for g in result.pairs())


def test_views_are_kept_apart():
    novel = {"LogME": (10, .5), "Model2Vec": (20, .5)}
    flipped = {"LogME": (30, .5), "Model2Vec": (20, .5)}
    runs = [payload(novel, all_view=flipped if s == 1 else novel) for s in range(3)]
    result = seed_spread(runs)
    assert result.views == ("novel", "all")
    assert result.gap("LogME", "Model2Vec", "novel", "relative_increase_pct").survives
    assert not result.gap("LogME", "Model2Vec", "all", "relative_increase_pct").survives
    assert result.spreads["all"]["LogME"].metrics["relative_increase_pct"].values == (10, 30, 10)


def test_references_are_the_best_per_expert_score_and_model2vec():
    result = seed_spread(seeds_of(
        LogME=((30, .5), (32, .5)), LEEP=((25, .5), (40, .5)), NCE=((50, .5), (51, .5)),
        Model2Vec=((20, .5), (21, .5)), Oracle=((0, 1.), (0, 1.))))
    assert result.best_per_expert_score("novel") == "LogME"  # mean 31 against LEEP's 32.5
    assert result.references("novel") == ["LogME", "Model2Vec"]
    md = result.markdown()
    assert "vs LogME" in md and "vs Model2Vec" in md and "vs LEEP" not in md
    # Model2Vec − LogME: gaps −10, −11 survive; LEEP − LogME: −5, +8 flip sign
    assert "| Model2Vec | **−10.5 (−11.0 … −10.0)** ✓ |" in md
    assert "| LEEP | +1.5 (−5.0 … +8.0) |" in md


def test_rows_missing_from_a_seed_are_left_out_and_other_worlds_refused():
    runs = seeds_of(LogME=((10, .5), (11, .5)), Model2Vec=((20, .5), (21, .5)))
    runs[1]["table1"]["reports"].pop("LogME")
    result = seed_spread(runs)
    assert result.rows == ("Model2Vec",) and result.missing_rows == ("LogME",)
    assert "Left out (not in every evaluation): LogME." in result.markdown()
    other = seeds_of(Model2Vec=((20, .5), (21, .5)))
    other[1]["task_ids"] = TASKS[:2]
    with pytest.raises(ValueError, match="not the same world"):
        seed_spread(other)


def test_json_is_strict_and_holds_every_pair():
    result = seed_spread(seeds_of(LogME=((10, .5),), Model2Vec=((20, .5),)))  # std NaN
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["spreads"]["novel"]["LogME"]["relative_increase_pct"]["std"] is None
    assert {(p["row"], p["other"], p["view"], p["metric"]) for p in data["pairs"]} == {
        ("LogME", "Model2Vec", v, m) for v in ("novel", "all")
        for m in ("relative_increase_pct", "weighted_tau")}


def test_latest_table1_follows_latest(tmp_path):
    root = StorageRoot(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        latest_table1(root)
    old = payload({"Model2Vec": (1.0, .5)})
    new = payload({"Model2Vec": (2.0, .5)})
    write_report(root, "table1", "", old)
    folder = f"evaluation/2099{0:010d}Z"
    root.write_bytes_atomic(f"{folder}/table1.json", json.dumps(new).encode())
    root.write_bytes_atomic(LATEST, folder.rsplit("/", 1)[-1].encode())
    assert latest_table1(str(tmp_path)) == new


# --------------------------------------------------------------------------- the job


def _evaluated_root(path, rows: dict) -> str:
    root = StorageRoot(str(path))
    folder = write_report(root, "table1", "", payload(rows))
    root.write_bytes_atomic(LATEST, folder.rsplit("/", 1)[-1].encode())
    return str(path)


def test_seed_spread_job_writes_the_report_of_every_root(tmp_path, capsys):
    from jobs import seed_spread as job

    roots = [_evaluated_root(tmp_path / f"s{s}", {"LogME": (10.0 + s, .6), "Model2Vec": (20.0, .4)})
             for s in range(3)]
    out = tmp_path / "out"
    assert job.main(["--roots", ",".join(roots), "--out", str(out)]) == 0
    md = (out / "seed_spread.md").read_text()
    assert md == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "(s0, s1, s2)" in md
    data = json.loads((out / "seed_spread.json").read_text())
    assert data["spreads"]["novel"]["LogME"]["relative_increase_pct"]["values"] == [10, 11, 12]
    # a root without an evaluation, and names that do not match the roots
    assert job.main(["--roots", f"{roots[0]},{tmp_path / 'empty'}"]) == 1
    with pytest.raises(SystemExit) as bad:
        job.main(["--roots", ",".join(roots), "--names", "a,b"])
    assert bad.value.code == 2


def test_seed_spread_job_help(capsys):
    from jobs import seed_spread as job

    with pytest.raises(SystemExit) as done:
        job.main(["--help"])
    assert done.value.code == 0 and "--roots" in capsys.readouterr().out
