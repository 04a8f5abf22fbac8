"""Training one matrix cell: batched probe heads against torch's own Adam, divergence
reporting, deterministic whole-network fine-tuning, and the feature cache."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from t2v_core.embedding.probes import build_probe
from t2v_core.matrix.features import FeatureCache, FeatureKey, Features, cell_features
from t2v_core.matrix.finetune import (
    FinetuneRecipe,
    HeadConfig,
    ImageProblem,
    ProbeRecipe,
    SearchSpace,
    TrainResult,
    finetune_cell,
    fit_head,
    fit_heads,
    make_problem,
    select_best,
    split_validation,
)
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import ExpertSpec, TaskSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gaussian_problem(n: int = 60, d: int = 12, c: int = 3, seed: int = 0, val: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(c, d, generator=g) * 1.5
    y = torch.randint(0, c, (n,), generator=g)
    yt = torch.randint(0, c, (40,), generator=g)
    x = means[y] + torch.randn(n, d, generator=g)
    xt = means[yt] + torch.randn(40, d, generator=g)
    return make_problem(x, y, xt, yt, c, val, seed)


def torch_adam_reference(problem, cfg: HeadConfig, epochs: int) -> float:
    """The same head trained the ordinary way: nn.Linear + torch.optim.Adam."""
    x = problem.x_train
    z = (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-6)
    head = torch.nn.Linear(x.shape[1], problem.n_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(head(z), problem.y_train).backward()
        opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(head(z), problem.y_train))


def test_batched_heads_match_torch_adam_and_one_by_one():
    problems = [gaussian_problem(60, c=3, seed=0), gaussian_problem(45, c=5, seed=1),
                gaussian_problem(80, c=2, seed=2)]
    configs = SearchSpace().sample(3, seed=0)
    recipe = ProbeRecipe(epochs=80)
    batched = fit_heads(problems, configs, recipe)
    for p, prob in enumerate(problems):
        for k, cfg in enumerate(configs):
            alone = fit_head(prob, cfg, recipe)
            b = batched[p][k]
            assert b.ok and alone.ok
            assert b.train_loss == pytest.approx(alone.train_loss, abs=1e-5)
            assert b.test_error == pytest.approx(alone.test_error, abs=1e-6)
            assert b.train_loss == pytest.approx(torch_adam_reference(prob, cfg, recipe.epochs), abs=1e-5)
            assert 0 <= b.test_error <= 1 and b.n_val == len(prob.y_val)
            assert b.n_test == len(prob.y_test) > 0


def test_mlp_heads_batched_equal_alone_and_are_deterministic():
    problems = [gaussian_problem(50, c=3, seed=3), gaussian_problem(70, c=4, seed=4)]
    configs = [HeadConfig(0.01, 1e-4), HeadConfig(0.003, 0.0)]
    recipe = ProbeRecipe(epochs=60, hidden=16, seed=5)
    batched = fit_heads(problems, configs, recipe)
    again = fit_heads(problems, configs, recipe)
    for p, prob in enumerate(problems):
        for k, cfg in enumerate(configs):
            assert batched[p][k].train_loss == again[p][k].train_loss
            assert batched[p][k].train_loss == pytest.approx(
                fit_head(prob, cfg, recipe).train_loss, abs=1e-5)


def test_diverging_configuration_fails_with_reason_and_others_land():
    prob = gaussian_problem(60, seed=6)
    out = fit_heads([prob], [HeadConfig(1e6), HeadConfig(0.01)], ProbeRecipe(epochs=50))[0]
    assert not out[0].ok and "diverged" in out[0].error and "lr=1e+06" in out[0].error
    assert out[0].test_error is None
    assert out[1].ok and out[1].test_error is not None
    assert select_best(out) == 1

    nan = gaussian_problem(60, seed=7)
    nan.x_train[3, 2] = float("nan")
    res = fit_head(nan, HeadConfig(0.01), ProbeRecipe(epochs=20))
    assert res.status == "failed" and "loss nan" in res.error and res.epochs == 1


def test_selection_uses_validation_and_validation_is_stratified():
    y = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    tr, va = split_validation(y, 0.2, seed=1)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(16))
    assert np.bincount(y[va].numpy(), minlength=3).tolist() == [2, 1, 0]
    assert (tr, va)[1].tolist() == split_validation(y, 0.2, seed=1)[1].tolist()

    def r(val, loss, status="ok"):
        return TrainResult(status, 0.5, 0.1, val, 0.2, loss, 1, 0.0, 10, 2)

    assert select_best([r(0.3, 1.0), r(0.2, 2.0), r(0.2, 1.5), r(0.0, 0.0, "failed")]) == 2
    assert select_best([r(0.0, 0.0, "failed")]) is None
    configs = SearchSpace((1e-3, 1e-1), (1e-6, 1e-2)).sample(5, seed=3)
    assert configs[0] == HeadConfig(pytest.approx(1e-2), pytest.approx(1e-4))
    assert configs == SearchSpace((1e-3, 1e-1), (1e-6, 1e-2)).sample(5, seed=3)
    assert all(1e-3 <= c.lr <= 1e-1 for c in configs)


def _image_problem(seed: int = 0):
    """Images whose class is the sign of their mean brightness: learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (48,), generator=g)
    x = torch.randn(48, 3, 8, 8, generator=g) * 0.5 + (y.float() * 2 - 1)[:, None, None, None]
    yt = torch.randint(0, 2, (24,), generator=g)
    xt = torch.randn(24, 3, 8, 8, generator=g) * 0.5 + (yt.float() * 2 - 1)[:, None, None, None]
    return ImageProblem.with_validation(x, y, xt, yt, 2, 0.25, seed)


def test_finetune_cell_is_deterministic_and_learns():
    backbone = build_probe("small_cnn", seed=0, input_size=8).backbone
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    recipe = FinetuneRecipe(epochs=4, batch_size=8, head_epochs=20, seed=3)
    epochs = []
    a = finetune_cell(backbone, _image_problem(), HeadConfig(0.02, 1e-4), recipe,
                      on_epoch=epochs.append)
    b = finetune_cell(backbone, _image_problem(), HeadConfig(0.02, 1e-4), recipe)
    assert a.ok and a.to_dict() | {"seconds": 0} == b.to_dict() | {"seconds": 0}
    assert a.test_error <= 0.1 and 0 <= a.train_error <= 1 and a.epochs == 4
    assert a.n_test == len(_image_problem().y_test) > 0
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4] and "val_error" in epochs[-1]
    assert recipe.milestones() == [2, 3]
    for k, v in backbone.state_dict().items():  # the expert itself is not modified
        assert torch.equal(v, before[k])
    other = finetune_cell(backbone, _image_problem(), HeadConfig(0.02, 1e-4),
                          FinetuneRecipe(epochs=4, batch_size=8, head_epochs=20, seed=4))
    assert other.train_loss != a.train_loss


def test_finetune_divergence_is_a_failed_result():
    # Labels independent of the images: no weights make the loss vanish, so a huge step
    # shows up as an exploding loss (an easy task would just become very confident).
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 3, 8, 8, generator=g), torch.randint(0, 2, (48,), generator=g)
    problem = ImageProblem.with_validation(x, y, x[:8], y[:8], 2, 0.25)
    backbone = build_probe("small_cnn", seed=0, input_size=8).backbone
    recipe = FinetuneRecipe(epochs=2, batch_size=8, head_epochs=5)
    res = finetune_cell(backbone, problem, HeadConfig(1e6), recipe)
    assert res.status == "failed" and "diverged" in res.error and "lr=1e+06" in res.error
    assert res.test_error is None and res.epochs == 1
    assert finetune_cell(backbone, problem, HeadConfig(0.01), recipe).ok


# -- feature cache --------------------------------------------------------------------------
def _task(path, h="hash-a") -> TaskSpec:
    return TaskSpec("t1", "f", str(path), "imagefolder", ("a", "b"), 6, 4, h)


def test_feature_cache_computes_once_per_key(tmp_path, image_folder):
    task_dir = image_folder(tmp_path / "tasks", "t1", {"a": 3, "b": 3}, {"a": 2, "b": 2}, size=8)
    root = StorageRoot(tmp_path / "root")
    cache = FeatureCache(root)
    expert = ExpertSpec("e=1", "small_cnn", "unused", None, "w1")
    loads = []

    def factory():
        loads.append(1)
        return build_probe("small_cnn", seed=0, input_size=8).backbone, "small_cnn-random0"

    task = _task(task_dir)
    first = cell_features(cache, factory, expert, task, "train", 8)
    second = cell_features(cache, factory, expert, task, "train", 8)
    assert (cache.misses, cache.hits, len(loads)) == (1, 1, 1)
    np.testing.assert_array_equal(first.features, second.features)
    assert first.features.shape == (6, 32) and first.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert second.probe_id == "small_cnn-random0"
    key = FeatureKey.for_cell(expert, task, "train", 8)
    assert key.rel.startswith("features/expert=e%3D1/task=t1/w1-hash-a-train-s8")
    # Another task content hash, size or split is another entry.
    cell_features(cache, factory, expert, _task(task_dir, "hash-b"), "train", 8)
    cell_features(cache, factory, expert, task, "test", 8)
    assert cache.misses == 3
    files = sorted(p for p in root.list("features", recursive=True))
    assert len(files) == 3 and not any(os.path.basename(f).startswith(".") for f in files)


def test_unreadable_cache_entry_is_recomputed(tmp_path):
    root = StorageRoot(tmp_path)
    cache = FeatureCache(root)
    key = FeatureKey("e", "h", "t", "h", "train", 8)
    root.write_bytes_atomic(key.rel, b"not an npz")
    feats = Features(np.ones((2, 3), np.float32), np.array([0, 1]))
    out = cache.get_or_compute(key, lambda: feats)
    assert cache.misses == 1 and out is feats
    assert cache.get_or_compute(key, lambda: None).features.tolist() == feats.features.tolist()
    assert cache.hits == 1
