"""Cells of the performance matrix: which are missing, training them, and their rows.

A *cell* is one (task, expert) pair. Filling the matrix is three steps, shared by the Ray
Tune job, notebooks and benchmarks:

* :func:`plan_cells` picks the requested cells that have no current row, and
  :func:`plan_trials` groups them into units of work (one expert, some of its tasks) with the
  hyper-parameter configurations each unit trains;
* :func:`train_unit` trains every configuration of every cell of one unit and keeps, per
  cell, the configuration with the best validation error (:class:`CellOutcome`);
* :func:`combine` turns the outcomes of one cell (one per unit that trained it) into its
  :class:`~t2v_core.matrix.rows.MatrixRow`, recording the recipe that produced it;
  :class:`CellWriter` writes each cell's row once all its units have reported, and
  :func:`tally` says how the requested cells stand afterwards.

:class:`FillConfig` holds what every cell of a run shares: the storage root, the recipe, the
data settings and the searched configurations. It, :class:`CellUnit` and
:class:`CellOutcome` turn into plain values and back, to cross process boundaries.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from t2v_core import __version__
from t2v_core.embedding.probes import WeightsError, build_probe, default_input_size
from t2v_core.matrix.features import FeatureCache, cell_features
from t2v_core.matrix.finetune import (
    FinetuneRecipe,
    HeadConfig,
    ImageProblem,
    ProbeRecipe,
    SearchSpace,
    TrainResult,
    finetune_cell,
    fit_heads,
    make_problem,
    select_best,
)
from t2v_core.matrix.rows import MatrixRow, done_cells, read_matrix, write_rows
from t2v_core.storage import StorageRoot
from t2v_core.zoo.data import DataError, UnreadableURIError, load_split
from t2v_core.zoo.manifest import ExpertSpec, TaskSpec

CellKey = tuple[str, str]  # (task_id, expert_id)
Cell = tuple[TaskSpec, ExpertSpec]
LAYOUTS = ("batched", "trial")


def cell_key(task: TaskSpec, expert: ExpertSpec) -> CellKey:
    return (task.task_id, expert.expert_id)


def recipe_for(mode: str, *, epochs: int | None = None, hidden: int = 0, batch_size: int = 32,
               seed: int = 0) -> ProbeRecipe | FinetuneRecipe:
    """The recipe of a mode ("probe" or "finetune"); ``epochs`` None keeps the recipe's own."""
    if mode == "probe":
        return ProbeRecipe(epochs=ProbeRecipe.epochs if epochs is None else epochs,
                           hidden=hidden, seed=seed)
    if mode == "finetune":
        return FinetuneRecipe(epochs=FinetuneRecipe.epochs if epochs is None else epochs,
                              batch_size=batch_size, seed=seed)
    raise ValueError(f"mode must be 'probe' or 'finetune', got {mode!r}")


# -- what every cell of a run shares --------------------------------------------------------
@dataclass(frozen=True)
class FillConfig:
    """The settings every cell of a run is trained with. ``image_size`` None: each expert's
    architecture's own size. ``layout`` says how cells were grouped into units of work
    ("batched": many cells and all configurations per unit; "trial": one of each); it changes
    no number but is recorded with every row."""

    root: str
    recipe: ProbeRecipe | FinetuneRecipe = ProbeRecipe()
    search: SearchSpace = SearchSpace()
    num_samples: int = 4
    seed: int = 0
    image_size: int | None = None
    max_per_class: int | None = None
    max_test_per_class: int | None = None
    val_fraction: float = 0.2
    layout: str = "batched"
    code_version: str = __version__

    def __post_init__(self) -> None:
        # Absolute, so that a worker whose working directory differs reads the same root.
        object.__setattr__(self, "root", self.storage().uri)
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")

    @classmethod
    def for_mode(cls, root: str, mode: str, *, layout: str = "auto", epochs: int | None = None,
                 hidden: int = 0, batch_size: int = 32, seed: int = 0,
                 lr: tuple[float, float] | None = None,
                 weight_decay: tuple[float, float] = SearchSpace.weight_decay,
                 **data) -> FillConfig:
        """The settings of a run in ``mode``, its recipe (:func:`recipe_for`) and search space
        from plain values; layout "auto" is batched for probe, trial for finetune, and ``lr``
        None the search space's own. ``data``: the other fields (num_samples, image_size,
        max_per_class, ...)."""
        if layout == "auto":
            layout = "batched" if mode == "probe" else "trial"
        return cls(root=root, recipe=recipe_for(mode, epochs=epochs, hidden=hidden,
                                                batch_size=batch_size, seed=seed),
                   search=SearchSpace(lr=lr or SearchSpace.lr, weight_decay=weight_decay),
                   seed=seed, layout=layout, **data)

    def storage(self) -> StorageRoot:
        return StorageRoot(self.root)

    @property
    def mode(self) -> str:
        return "probe" if isinstance(self.recipe, ProbeRecipe) else "finetune"

    def configs(self) -> list[HeadConfig]:
        """The searched configurations, the same for every cell."""
        return self.search.sample(self.num_samples, self.seed)

    def data_record(self) -> dict:
        return {"max_per_class": self.max_per_class, "max_test_per_class": self.max_test_per_class,
                "val_fraction": self.val_fraction, "seed": self.seed, "image_size": self.image_size}

    def search_record(self) -> dict:
        return {"lr": list(self.search.lr), "weight_decay": list(self.search.weight_decay),
                "num_samples": self.num_samples, "seed": self.seed}

    def to_dict(self) -> dict:
        """Plain values, e.g. for a Ray Tune experiment, which restores only those."""
        return {**asdict(self), "recipe": self.recipe.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> FillConfig:
        recipe = {k: v for k, v in data["recipe"].items() if k not in ("mode", "version")}
        kind = ProbeRecipe if data["recipe"]["mode"] == "probe" else FinetuneRecipe
        search = SearchSpace(**{k: tuple(v) for k, v in data["search"].items()})
        return cls(**{**data, "recipe": kind(**recipe), "search": search})

    def record(self) -> dict:
        """Everything but the root, as JSON-ready values: what makes two runs the same run."""
        return {"mode": self.mode, "recipe": self.recipe.to_dict(), "data": self.data_record(),
                "search": self.search_record(), "code_version": self.code_version,
                "layout": self.layout}


# -- planning -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellPlan:
    """The cells asked for, how many of them need no work, and the ones to train now."""

    requested: tuple[Cell, ...]
    already_done: int
    todo: tuple[Cell, ...]


@dataclass(frozen=True)
class CellUnit:
    """One unit of work: some tasks of one expert, read at ``image_size`` pixels."""

    expert: ExpertSpec
    tasks: tuple[TaskSpec, ...]
    image_size: int

    def keys(self) -> list[CellKey]:
        return [cell_key(t, self.expert) for t in self.tasks]

    def to_dict(self) -> dict:
        """Plain values, e.g. for a Ray Tune experiment, which restores only those."""
        return {"expert": asdict(self.expert), "tasks": [asdict(t) for t in self.tasks],
                "image_size": self.image_size}

    @classmethod
    def from_dict(cls, data: dict) -> CellUnit:
        return cls(ExpertSpec(**data["expert"]), tuple(TaskSpec(**t) for t in data["tasks"]),
                   int(data["image_size"]))


@dataclass(frozen=True)
class TrialGrid:
    """Every unit is trained with every configuration list; ``expected`` says how many
    (unit, list) pairs report each cell."""

    units: tuple[CellUnit, ...]
    config_lists: tuple[tuple[HeadConfig, ...], ...]
    expected: dict[CellKey, int] = field(default_factory=dict)

    @property
    def n_trials(self) -> int:
        return len(self.units) * len(self.config_lists)


def plan_cells(fill: FillConfig, requested: Sequence[Cell], *, retry_failed: bool = False,
               skip: Iterable[CellKey] = (), max_cells: int | None = None) -> CellPlan:
    """The ``requested`` cells without a current row at this mode and training-set size (a
    failed row counts as done unless ``retry_failed``) and not in ``skip``, at most
    ``max_cells`` of them, in the order given."""
    tasks = list({t.task_id: t for t, _ in requested}.values())
    experts = list({e.expert_id: e for _, e in requested}.values())
    done = done_cells(fill.storage(), tasks, experts, fill.mode, retry_failed=retry_failed,
                      max_per_class=fill.max_per_class) | set(skip)
    todo = [c for c in requested if cell_key(*c) not in done]
    kept = todo if max_cells is None else todo[:max_cells]
    return CellPlan(tuple(requested), len(requested) - len(todo), tuple(kept))


def plan_trials(cells: Sequence[Cell], fill: FillConfig, cells_per_trial: int = 32) -> TrialGrid:
    """Units of consecutive cells of one expert (``cells_per_trial`` of them in the batched
    layout, one otherwise) and the configuration lists they are trained with (all at once in
    the batched layout, one per list otherwise)."""
    by_expert: dict[str, list[TaskSpec]] = defaultdict(list)
    experts: dict[str, ExpertSpec] = {}
    for task, expert in cells:
        by_expert[expert.expert_id].append(task)
        experts[expert.expert_id] = expert
    per_trial = cells_per_trial if fill.layout == "batched" else 1
    units = tuple(
        CellUnit(experts[eid], tuple(tasks[i : i + per_trial]),
                 fill.image_size or default_input_size(experts[eid].arch))
        for eid, tasks in by_expert.items() for i in range(0, len(tasks), per_trial))
    configs = tuple(fill.configs())
    if fill.layout == "batched":
        config_lists, per_cell = (configs,), 1
    else:
        config_lists, per_cell = tuple((c,) for c in configs), len(configs)
    return TrialGrid(units, config_lists, {cell_key(*c): per_cell for c in cells})


# -- training -------------------------------------------------------------------------------
@dataclass(frozen=True)
class CellOutcome:
    """What one unit of work gave for one cell: the kept configuration's result (the best on
    validation, or the first failure when all failed), its hyper-parameters ({} then), how
    many configurations were tried and how many diverged, and the seconds they took."""

    task_id: str
    expert_id: str
    task_hash: str
    expert_hash: str
    result: TrainResult
    hp: dict
    configs_tried: int
    diverged: int
    seconds: float
    device: str
    probe_id: str = ""

    @property
    def key(self) -> CellKey:
        return (self.task_id, self.expert_id)

    @classmethod
    def best_of(cls, task: TaskSpec, expert: ExpertSpec, results: Sequence[TrainResult],
                configs: Sequence[HeadConfig], *, seconds: float, device: str,
                probe_id: str) -> CellOutcome:
        best = select_best(results)
        pick = results[best] if best is not None else results[0]
        return cls(task.task_id, expert.expert_id, task.content_hash, expert.content_hash, pick,
                   configs[best].to_dict() if best is not None else {}, len(results),
                   sum(not r.ok for r in results), seconds, device, probe_id)

    @classmethod
    def input_failure(cls, task: TaskSpec, expert: ExpertSpec, exc: Exception, n_configs: int,
                      device: str) -> CellOutcome:
        """A cell whose task or weights cannot be used: no retry would fix it."""
        result = TrainResult("failed", None, None, None, None, None, 0, 0.0, 0, 0,
                             error=f"input error: {type(exc).__name__}: {exc}")
        return cls(task.task_id, expert.expert_id, task.content_hash, expert.content_hash,
                   result, {}, n_configs, 0, 0.0, device)

    def to_dict(self) -> dict:
        """JSON-ready, for reporting outcomes across processes."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CellOutcome:
        return cls(**{**data, "result": TrainResult(**data["result"])})


@dataclass(frozen=True)
class UnitResult:
    """The outcomes of one unit's cells and what reading their features cost."""

    outcomes: list[CellOutcome]
    feature_hits: int
    feature_misses: int
    seconds: float
    device: str


class _ExpertLoader:
    """The expert's network, built on first use: cells whose features are cached need none."""

    def __init__(self, expert: ExpertSpec, image_size: int):
        self.expert, self.image_size = expert, image_size
        self._probe = None

    def __call__(self) -> tuple[nn.Module, str]:
        if self._probe is None:
            self._probe = build_probe(self.expert.arch, self.expert.weights_uri, seed=0,
                                      input_size=self.image_size)
        return self._probe.backbone, self._probe.probe_id


def train_unit(fill: FillConfig, unit: CellUnit, configs: Sequence[HeadConfig],
               on_epoch: Callable[[dict], None] | None = None) -> UnitResult:
    """Train every configuration of every cell of ``unit`` and keep the best per cell.
    Input errors no retry can fix (a task that no longer reads, weights that do not load)
    become failed cells; an unreachable URI and anything else raise. ``on_epoch`` receives
    the metrics of each fine-tuning epoch."""
    start = time.perf_counter()
    cache = FeatureCache(fill.storage())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loader = _ExpertLoader(unit.expert, unit.image_size)
    if fill.mode == "probe":
        outcomes = _probe_cells(fill, unit, list(configs), loader, cache, device)
    else:
        outcomes = _finetune_cells(fill, unit, list(configs), loader, device, on_epoch)
    return UnitResult(outcomes, cache.hits, cache.misses, time.perf_counter() - start, device)


def _probe_cells(fill: FillConfig, unit: CellUnit, configs: list[HeadConfig],
                 loader: _ExpertLoader, cache: FeatureCache, device: str) -> list[CellOutcome]:
    """Heads on cached features, all cells and configurations as one batched program."""
    outcomes, problems, ready = [], [], []
    for task in unit.tasks:
        t0 = time.perf_counter()
        try:
            train = cell_features(cache, loader, unit.expert, task, "train", unit.image_size,
                                  max_per_class=fill.max_per_class, seed=fill.seed, device=device)
            test = cell_features(cache, loader, unit.expert, task, "test", unit.image_size,
                                 max_per_class=fill.max_test_per_class, seed=fill.seed,
                                 device=device)
        except UnreadableURIError:
            raise
        except (DataError, WeightsError) as exc:
            outcomes.append(CellOutcome.input_failure(task, unit.expert, exc, len(configs), device))
            continue
        problems.append(make_problem(
            torch.from_numpy(train.features), torch.from_numpy(train.labels),
            torch.from_numpy(test.features), torch.from_numpy(test.labels),
            task.n_classes, fill.val_fraction, fill.seed))
        ready.append((task, train.probe_id, time.perf_counter() - t0))
    if problems:
        results = fit_heads(problems, configs, fill.recipe, device)
        for (task, probe_id, feature_seconds), res in zip(ready, results, strict=True):
            outcomes.append(CellOutcome.best_of(
                task, unit.expert, res, configs, device=device, probe_id=probe_id,
                seconds=feature_seconds + sum(r.seconds for r in res)))
    return outcomes


def _finetune_cells(fill: FillConfig, unit: CellUnit, configs: list[HeadConfig],
                    loader: _ExpertLoader, device: str,
                    on_epoch: Callable[[dict], None] | None) -> list[CellOutcome]:
    """The whole network, one cell and configuration at a time."""
    outcomes = []
    for task in unit.tasks:
        t0 = time.perf_counter()
        try:
            backbone, probe_id = loader()
            x, y = load_split(task, "train", unit.image_size, fill.max_per_class, fill.seed)
            xt, yt = load_split(task, "test", unit.image_size, fill.max_test_per_class, fill.seed)
        except UnreadableURIError:
            raise
        except (DataError, WeightsError) as exc:
            outcomes.append(CellOutcome.input_failure(task, unit.expert, exc, len(configs), device))
            continue
        problem = ImageProblem.with_validation(x, y, xt, yt, task.n_classes, fill.val_fraction,
                                               fill.seed)
        res = [finetune_cell(backbone, problem, hp, fill.recipe, device, on_epoch)
               for hp in configs]
        outcomes.append(CellOutcome.best_of(task, unit.expert, res, configs, device=device,
                                            probe_id=probe_id, seconds=time.perf_counter() - t0))
    return outcomes


# -- outcomes into rows ---------------------------------------------------------------------
def _selection_key(outcome: CellOutcome) -> tuple:
    r = outcome.result
    return (r.val_error, r.val_loss) if r.val_error is not None else (r.train_error, r.train_loss)


def combine(outcomes: Sequence[CellOutcome], fill: FillConfig) -> MatrixRow:
    """One cell's matrix row from its outcomes (one per unit of work that trained it): the
    best on validation among the successes, else a failed row saying why."""
    ok = [o for o in outcomes if o.result.ok]
    pick = min(ok, key=_selection_key) if ok else outcomes[0]
    res = pick.result
    tried = sum(o.configs_tried for o in outcomes)
    diverged = sum(o.diverged for o in outcomes)
    error = res.error
    if not ok and diverged:
        error = f"all {tried} configurations diverged; first: {error}"
    config = {
        "mode": fill.mode, "hp": pick.hp, "recipe": fill.recipe.to_dict(),
        "data": fill.data_record(), "val_error": res.val_error, "n_val": res.n_val,
        "n_test": res.n_test, "configs_tried": tried, "diverged": diverged,
        "device": pick.device, "layout": fill.layout, "probe_id": pick.probe_id,
        "code_version": fill.code_version, "search": fill.search_record(),
    }
    return MatrixRow(
        task_id=pick.task_id, expert_id=pick.expert_id, mode=fill.mode,
        status="ok" if ok else "failed", test_error=res.test_error, train_error=res.train_error,
        n_train=int(res.n_train), epochs=int(res.epochs), trials=int(tried),
        gpu_seconds=float(sum(o.seconds for o in outcomes)), task_hash=pick.task_hash,
        expert_hash=pick.expert_hash, config=config, error=error,
        max_per_class=fill.max_per_class,
    )


def combine_cells(outcomes: Iterable[CellOutcome], fill: FillConfig,
                  cells: Iterable[CellKey]) -> list[MatrixRow]:
    """The rows of those of ``cells`` that have outcomes, one per cell."""
    wanted = set(cells)
    by_cell: dict[CellKey, list[CellOutcome]] = defaultdict(list)
    for o in outcomes:
        if o.key in wanted:
            by_cell[o.key].append(o)
    return [combine(v, fill) for v in by_cell.values()]


def write_missing_rows(fill: FillConfig, outcomes: Iterable[CellOutcome], cells: Iterable[CellKey],
                       tasks: Sequence[TaskSpec], experts: Sequence[ExpertSpec]) -> int:
    """Write the rows of those of ``cells`` that have outcomes but no current row (of
    ``tasks`` × ``experts``) yet; returns how many."""
    root = fill.storage()
    done = done_cells(root, tasks, experts, fill.mode, max_per_class=fill.max_per_class)
    rows = combine_cells(outcomes, fill, set(cells) - done)
    if rows:
        write_rows(root, rows)
    return len(rows)


class OutcomeCollector:
    """Outcomes grouped by cell as units report them; a cell is complete once every unit
    that trains it (``expected`` per cell, 1 when not given) has reported."""

    def __init__(self, expected: dict[CellKey, int]):
        self.expected = expected
        self.outcomes: dict[CellKey, list[CellOutcome]] = defaultdict(list)

    def add(self, outcomes: Iterable[CellOutcome]) -> list[CellKey]:
        """Record ``outcomes``; returns the cells they completed."""
        done = []
        for o in outcomes:
            self.outcomes[o.key].append(o)
            if len(self.outcomes[o.key]) == self.expected.get(o.key, 1):
                done.append(o.key)
        return done


class CellWriter:
    """Writes each cell's row as soon as every unit that trains it has reported. Cells in
    ``written`` (rows already in the matrix) are counted, never rewritten. ``on_written``
    hears how many cells each call completed: a progress bar."""

    def __init__(self, fill: FillConfig, expected: dict[CellKey, int],
                 written: Iterable[CellKey] = (),
                 on_written: Callable[[int], object] | None = None):
        self.fill = fill
        self.collector = OutcomeCollector(expected)
        self.written: set[CellKey] = set(written)
        self.on_written = on_written

    def add(self, outcomes: Iterable[CellOutcome]) -> list[CellKey]:
        """Record reported outcomes and write the rows of the cells they completed."""
        complete = [k for k in self.collector.add(outcomes) if k not in self.written]
        if complete:
            write_rows(self.fill.storage(),
                       [combine(self.collector.outcomes[k], self.fill) for k in complete])
        return self.mark(complete)

    def mark(self, keys: Iterable[CellKey]) -> list[CellKey]:
        """Count ``keys`` as written; returns those not counted before."""
        new = [k for k in dict.fromkeys(keys) if k not in self.written]
        self.written.update(new)
        if new and self.on_written is not None:
            self.on_written(len(new))
        return new


def cells_with_rows(fill: FillConfig, grid: TrialGrid, *, retry_failed: bool = False
                    ) -> set[CellKey]:
    """The cells of ``grid`` that have a current row (a failed one counts unless
    ``retry_failed``): what an interrupted run over the grid has written."""
    tasks = {t.task_id: t for u in grid.units for t in u.tasks}
    experts = {u.expert.expert_id: u.expert for u in grid.units}
    done = done_cells(fill.storage(), list(tasks.values()), list(experts.values()), fill.mode,
                      retry_failed=retry_failed, max_per_class=fill.max_per_class)
    return done & set(grid.expected)


# -- the state of the requested cells -------------------------------------------------------
@dataclass(frozen=True)
class CellTally:
    """The requested cells' rows at this mode and size: how many succeeded, failed or are
    missing, the mean test error of the successes (0 when none), and each failure's reason
    as (task_id, expert_id, error)."""

    ok: int
    failed: int
    missing: int
    mean_test_error: float
    failures: tuple[tuple[str, str, str], ...] = ()


def tally(fill: FillConfig, tasks: Sequence[TaskSpec], experts: Sequence[ExpertSpec],
          requested: Sequence[Cell]) -> CellTally:
    table = read_matrix(fill.storage(), mode=fill.mode, tasks=tasks, experts=experts,
                        max_per_class=fill.max_per_class)
    want = {cell_key(*c) for c in requested}
    rows = [r for r in table.to_pylist() if (r["task_id"], r["expert_id"]) in want]
    ok = [r for r in rows if r["status"] == "ok"]
    failures = tuple((r["task_id"], r["expert_id"], r["error"]) for r in rows
                     if r["status"] != "ok" and r["task_id"] and r["error"])
    return CellTally(ok=len(ok), failed=len(rows) - len(ok), missing=len(want) - len(rows),
                     mean_test_error=sum(r["test_error"] for r in ok) / max(1, len(ok)),
                     failures=failures)
