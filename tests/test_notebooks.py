"""The notebooks run from top to bottom without an error, and are committed without outputs.

Each notebook runs in a fresh ``python3`` kernel of this interpreter (jupyter_client swaps the
kernel spec's ``python`` for ``sys.executable``), in the repository root. ``01_quickstart``
builds the ``--small`` demo zoo into a temporary storage root (``T2V_NOTEBOOK_ROOT``) and
``03_review_recommendations`` reviews that same root; ``02_unit_square_toy`` needs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient", reason="the 'notebooks' extra is not installed")
pytest.importorskip("ipykernel", reason="the 'notebooks' extra is not installed")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
QUICKSTART = "01_quickstart.ipynb"
TOY = "02_unit_square_toy.ipynb"
REVIEW = "03_review_recommendations.ipynb"
ALL = (QUICKSTART, TOY, REVIEW)
# Per cell. The longest is the demo pipeline in 01 (about a minute on 2 busy shared cores).
CELL_TIMEOUT_S = 420


def kernel_env(root: Path) -> dict[str, str]:
    """The kernel's environment: a local Ray on loopback without token auth, MLflow on the
    sqlite store under the root (no tracking server or registry from the caller's shell)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS")}
    env.update({
        "T2V_NOTEBOOK_ROOT": str(root),
        "RAY_AUTH_MODE": "disabled",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Torch's default of one thread per core oversubscribes a busy 2-core machine: measured
        # there, a MODEL2VEC fit took 20 s with 2 threads and 3 s with 1 (Ray workers already
        # run with one thread each; this sets the kernel, which trains MODEL2VEC, alike).
        "OMP_NUM_THREADS": "1",
    })
    return env


def execute(name: str, env: dict[str, str]) -> nbformat.NotebookNode:
    """Run every cell; nbclient raises CellExecutionError (with the traceback) on the first
    cell that fails or runs past the timeout."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, allow_errors=False,
        resources={"metadata": {"path": str(REPO)}},
    )
    client.execute(env=env)
    return nb


def code_cells(nb: nbformat.NotebookNode) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def check_ran(nb: nbformat.NotebookNode, name: str) -> None:
    """Every code cell ran, none errored, and the figures came out inline as PNGs."""
    cells = code_cells(nb)
    assert cells, f"{name} has no code cells"
    assert all(c.execution_count is not None for c in cells), f"{name}: a cell did not run"
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{name}: {[(e.ename, e.evalue) for e in errors]}"
    images = [o for c in cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{name}: no inline figure"


@pytest.fixture(scope="module")
def notebook_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("t2v-notebook-root")


@pytest.fixture(scope="module")
def quickstart(notebook_root: Path) -> nbformat.NotebookNode:
    """01 runs once per module; it leaves the demo zoo and its MODEL2VEC in the root."""
    return execute(QUICKSTART, kernel_env(notebook_root))


@pytest.mark.parametrize("name", ALL)
def test_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    for i, cell in enumerate(code_cells(nb)):
        assert cell.outputs == [], f"{name}: code cell {i} has outputs; strip them"
        assert cell.execution_count is None, f"{name}: code cell {i} has an execution count"


@pytest.mark.slow
def test_unit_square_toy_runs(tmp_path: Path) -> None:
    nb = execute(TOY, kernel_env(tmp_path))
    check_ran(nb, TOY)


@pytest.mark.slow
def test_quickstart_runs(quickstart, notebook_root: Path) -> None:
    check_ran(quickstart, QUICKSTART)
    for rel in ("zoo/tasks.parquet", "model2vec/LATEST", "mlflow.db"):
        assert (notebook_root / rel).exists(), f"the quickstart left no {rel}"


@pytest.mark.slow
def test_review_runs(quickstart, notebook_root: Path) -> None:
    nb = execute(REVIEW, kernel_env(notebook_root))
    check_ran(nb, REVIEW)
    text = "\n".join(o.get("text", "") for c in code_cells(nb) for o in c.outputs)
    assert "loaded models:/task2vec-recommender@champion" in text, "the registered model was not used"
    assert "ranks as model2vec/LATEST: True" in text
    assert (notebook_root / "evaluation" / "LATEST").exists()
    tables = [o for c in code_cells(nb) for o in c.outputs if "text/markdown" in o.get("data", {})]
    assert any("Expert selection" in t.data["text/markdown"] for t in tables), "no Table 1"
