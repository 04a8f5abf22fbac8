"""MODEL2VEC: the differentiable distance, fitting, inference and persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone

from t2v_core.embedding.distance import d_asym, d_sym, trivial_embedding
from t2v_core.embedding.synthetic_zoo import synthetic_zoo
from t2v_core.recommend.meta_dataset import place_generic_experts
from t2v_core.recommend.model2vec import (
    Model2Vec,
    resolve_expert_sources,
    torch_d_asym,
    torch_d_sym,
)
from t2v_core.recommend.selectors import top1_relative_increase

FAST = {"max_epochs": 150, "patience": 20}


@pytest.fixture(scope="module")
def zoo():
    return synthetic_zoo(
        n_clusters=3,
        tasks_per_cluster=8,
        experts_per_cluster=2,
        dim=32,
        source_noise=0.3,
        missing_fraction=0.1,
        random_state=1,
    )


@pytest.fixture(scope="module")
def fitted(zoo) -> Model2Vec:
    return Model2Vec(**FAST).fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings, expert_ids=zoo.expert_ids
    )


def test_torch_d_sym_matches_library() -> None:
    rng = np.random.default_rng(0)
    a = np.exp(rng.normal(size=(7, 40))) * rng.uniform(0.01, 100, size=(7, 1))
    b = np.exp(rng.normal(size=(5, 40)))
    a[0, :5] = 0.0  # zero Fisher entries, and a coordinate that is zero on both sides
    b[1, :3] = 0.0
    got = torch_d_sym(
        torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    )
    np.testing.assert_allclose(got.numpy(), d_sym(a, b), atol=1e-5)

    t0 = trivial_embedding(40, 1.3)
    got = torch_d_asym(
        torch.as_tensor(a, dtype=torch.float32),
        torch.as_tensor(b, dtype=torch.float32),
        torch.as_tensor(t0),
        0.15,
    )
    np.testing.assert_allclose(got.numpy(), d_asym(a, b, t0=t0, alpha=0.15), atol=1e-5)


def test_torch_d_sym_has_finite_gradients() -> None:
    m = torch.rand(3, 10, requires_grad=True)
    tasks = torch.rand(4, 10)
    tasks[0] = 0.0  # an all-zero task makes one of the norms vanish
    torch_d_sym(m, tasks).sum().backward()
    assert torch.isfinite(m.grad).all()


def test_model_distances_are_library_d_asym(zoo, fitted) -> None:
    """The trained model ranks by exactly t2v_core.embedding.distance.d_asym of its expert embeddings."""
    m, g = fitted.expert_embeddings_, fitted.gamma_
    assert (m > 0).all() and g != 1.0  # γ was learned
    expected = d_asym(m**g, zoo.task_embeddings**g, t0=fitted.t0_.numpy() ** g,
                      alpha=fitted.alpha_).T
    np.testing.assert_allclose(fitted.distances(zoo.task_embeddings), expected, atol=1e-5)
    np.testing.assert_allclose(fitted.offsets_, m - fitted.sources_.numpy(), rtol=1e-6)


def test_fixed_gamma_one_is_the_papers_distance(zoo) -> None:
    model = Model2Vec(learn_gamma=False, **FAST).fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings)
    assert model.gamma_ == 1.0
    expected = d_asym(model.expert_embeddings_, zoo.task_embeddings, t0=model.t0_.numpy(),
                      alpha=model.alpha_).T
    np.testing.assert_allclose(model.distances(zoo.task_embeddings), expected, atol=1e-5)
    half = Model2Vec(gamma=0.5, learn_gamma=False, max_epochs=5).fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings)
    assert half.gamma_ == 0.5


def test_learns_a_softer_comparison_for_sharpened_embeddings(zoo) -> None:
    """Raising every embedding to the 4th power makes u = sigmoid(4 Δlog F): the same zoo,
    compared four times too sharply. The fit undoes most of it by learning γ well below 1."""
    plain = Model2Vec(**FAST).fit(zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings)
    sharp = Model2Vec(**FAST).fit(
        zoo.task_embeddings**4, zoo.errors,
        [None if s is None else s**4 for s in zoo.expert_source_embeddings])
    assert sharp.gamma_ < 0.6 * plain.gamma_


def test_keeps_the_best_validation_state_across_both_phases(zoo) -> None:
    """The scalars train first, then the offsets; whichever epoch had the lowest validation
    loss is the state kept, even when the offsets only ever make it worse (huge steps)."""
    for lr in (0.05, 3.0):
        model = Model2Vec(lr=lr, max_epochs=60, patience=5).fit(
            zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings)
        phases = {h["phase"] for h in model.history_}
        assert phases == {"scalars", "offsets"}
        losses = [h["val_loss"] for h in model.history_]
        assert losses[model.best_epoch_] <= min(losses) + 1e-4
        kept = model.history_[model.best_epoch_]["phase"]
        offsets_moved = bool(np.abs(model.offsets_).max() > 0)
        assert offsets_moved == (kept == "offsets")


def test_outputs_are_consistent(zoo, fitted) -> None:
    ranks = fitted.rank(zoo.task_embeddings)
    n_experts = len(zoo.expert_ids)
    assert ranks.shape == (zoo.task_embeddings.shape[0], n_experts)
    assert (np.sort(ranks, axis=1) == np.arange(n_experts)).all()
    scores = fitted.scores(zoo.task_embeddings)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(fitted.predict(zoo.task_embeddings), ranks[:, 0])
    np.testing.assert_array_equal(scores.argmax(axis=1), ranks[:, 0])
    assert fitted.predict(zoo.task_embeddings[0]).shape == (1,)  # a single vector is one task
    assert fitted.tau_ > 0 and fitted.history_


def test_fit_is_deterministic(zoo, fitted) -> None:
    again = Model2Vec(**FAST).fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings, expert_ids=zoo.expert_ids
    )
    assert torch.equal(again.log_m_, fitted.log_m_)
    assert again.tau_ == fitted.tau_
    other = clone(Model2Vec(**FAST, random_state=7)).fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings
    )
    assert not torch.equal(other.log_m_, fitted.log_m_)  # another validation split


def test_save_load_round_trip(tmp_path, zoo, fitted) -> None:
    path = tmp_path / "models" / "m2v.pt"
    fitted.save(path)
    raw = torch.load(path, weights_only=True)  # a plain dict: loads with no code execution
    assert raw["format"] == "t2v-model2vec"
    loaded = Model2Vec.load(path)
    np.testing.assert_array_equal(
        loaded.rank(zoo.task_embeddings), fitted.rank(zoo.task_embeddings)
    )
    np.testing.assert_array_equal(
        loaded.scores(zoo.task_embeddings), fitted.scores(zoo.task_embeddings)
    )
    assert loaded.expert_ids_ == zoo.expert_ids and loaded.gamma_ == fitted.gamma_
    assert loaded.get_params() == fitted.get_params()
    assert list(tmp_path.joinpath("models").iterdir()) == [path]  # no temporary left behind
    # A file written before γ existed ranks by the paper's distance (γ = 1).
    del raw["gamma"]
    torch.save(raw, path)
    assert Model2Vec.load(path).gamma_ == 1.0


def _meta_dataset(zoo):
    from t2v_core.recommend.meta_dataset import MetaDataset

    sources = np.stack([np.full(zoo.task_embeddings.shape[1], np.nan) if s is None else s
                        for s in zoo.expert_source_embeddings])
    return MetaDataset("p-1", "montecarlo", tuple(f"t{i}" for i in range(len(zoo.families))),
                       tuple(zoo.families), zoo.task_embeddings, zoo.errors,
                       tuple(zoo.expert_ids), sources)


def test_model_store_versions_latest_and_folders_written_before_it(tmp_path, zoo, fitted):
    import datetime as dt
    import json

    from t2v_core.recommend import model_store
    from t2v_core.storage import StorageRoot

    root = StorageRoot(tmp_path / "root")
    assert model_store.latest_version(root) is None and model_store.list_versions(root) == []
    with pytest.raises(FileNotFoundError, match="run jobs.train_model2vec"):
        model_store.load_model(root)
    # A folder as the training job has always written it: model.pt, metadata.json, LATEST.
    old = "20250101T000000Z-0123abcd"
    fitted.save(tmp_path / "m.pt")
    root.write_bytes_atomic(f"model2vec/{old}/model.pt", (tmp_path / "m.pt").read_bytes())
    root.write_bytes_atomic(f"model2vec/{old}/metadata.json",
                            json.dumps({"version": old, "probe_id": "p-0"}).encode())
    root.write_bytes_atomic("model2vec/LATEST", old.encode())
    model, meta = model_store.load_model(root)
    assert meta["probe_id"] == "p-0"
    np.testing.assert_array_equal(model.rank(zoo.task_embeddings), fitted.rank(zoo.task_embeddings))

    data = _meta_dataset(zoo)
    version = model_store.model_version(data, now=dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=dt.UTC))
    assert version.startswith("20260304T050607Z-") and len(version) == len("20260304T050607Z-") + 8
    new = model_store.save_model(root, fitted, data, {"tau": 1.0})
    assert model_store.latest_version(root) == new and model_store.list_versions(root) == [old, new]
    model, meta = model_store.load_model(root)
    assert meta["task_ids"] == list(data.task_ids) and meta["metrics"] == {"tau": 1.0}
    assert model_store.load_model(root, old)[1]["probe_id"] == "p-0"
    with pytest.raises(FileNotFoundError, match=f"stored: {old}, {new}"):
        model_store.load_model(root, "nope")


def test_model_store_on_s3(moto_s3, zoo, fitted):
    from t2v_core.recommend import model_store

    root = f"s3://{moto_s3.bucket}/model-store"
    version = model_store.save_model(root, fitted, _meta_dataset(zoo), {})
    model, meta = model_store.load_model(root)
    assert meta["version"] == version and model_store.list_versions(root) == [version]
    np.testing.assert_array_equal(model.scores(zoo.task_embeddings),
                                  fitted.scores(zoo.task_embeddings))


def test_load_rejects_other_files(tmp_path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError):
        Model2Vec.load(path)


def test_generic_expert_starts_at_mean_task(zoo) -> None:
    """With no training steps, m_i is the source (plus the floor); the generic one is the mean
    (``missing_source="mean"``, the default) or its learnt place (``"learned"``)."""
    model = Model2Vec(max_epochs=0, missing_source="mean").fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings
    )
    m = model.expert_embeddings_
    g = zoo.generic_index
    np.testing.assert_allclose(m[g], zoo.task_embeddings.mean(axis=0), rtol=1e-4)
    learned = Model2Vec(max_epochs=0, missing_source="learned").fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings)
    missing = np.array([e is None for e in zoo.expert_source_embeddings])
    filled = np.stack([zoo.task_embeddings.mean(0) if e is None else e
                       for e in zoo.expert_source_embeddings])
    placed, _ = place_generic_experts(zoo.task_embeddings, zoo.errors, filled, missing,
                                      alpha=0.15, t0=learned.t0_.numpy())
    np.testing.assert_allclose(learned.sources_.numpy(), placed, rtol=1e-5)
    np.testing.assert_allclose(m[0], zoo.expert_source_embeddings[0], rtol=1e-4)
    # A NaN row means the same as None.
    nan_sources = np.stack(
        [
            np.full(zoo.task_embeddings.shape[1], np.nan) if s is None else s
            for s in zoo.expert_source_embeddings
        ]
    )
    same = Model2Vec(max_epochs=0, missing_source="mean").fit(zoo.task_embeddings, zoo.errors,
                                                              nan_sources)
    np.testing.assert_allclose(same.expert_embeddings_, m)
    at_t0 = Model2Vec(max_epochs=0, missing_source="t0").fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings
    )
    np.testing.assert_allclose(at_t0.expert_embeddings_[g], at_t0.t0_.numpy(), rtol=1e-5)


def test_missing_cells_and_uninformative_tasks(zoo) -> None:
    errors = zoo.errors.copy()
    errors[0, 1:] = np.nan  # one observed cell: no ranking information, skipped
    errors[1, ::2] = np.nan
    model = Model2Vec(**FAST).fit(zoo.task_embeddings, errors, zoo.expert_source_embeddings)
    assert np.isfinite(model.expert_embeddings_).all()
    with pytest.raises(ValueError):
        Model2Vec().fit(
            zoo.task_embeddings, np.full_like(errors, np.nan), zoo.expert_source_embeddings
        )


def test_rejects_inconsistent_input(zoo) -> None:
    with pytest.raises(ValueError):
        Model2Vec().fit(zoo.task_embeddings, zoo.errors[:, :-1], zoo.expert_source_embeddings)
    with pytest.raises(ValueError):
        Model2Vec().fit(-zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings)
    with pytest.raises(RuntimeError):
        Model2Vec().rank(zoo.task_embeddings)
    with pytest.raises(ValueError):
        resolve_expert_sources([np.ones(3)], np.ones((2, 4)))


def test_learns_to_correct_wrong_source_embeddings() -> None:
    """Swap the source embeddings of two families' experts: nearest-source selection then
    sends those families to the wrong experts, while MODEL2VEC learns from the matrix where
    the experts really belong and recovers the right ones on held-out tasks."""
    zoo = synthetic_zoo(
        n_clusters=3, tasks_per_cluster=12, experts_per_cluster=2, dim=32, random_state=2
    )
    sources = list(zoo.expert_source_embeddings)
    sources[0], sources[2] = sources[2], sources[0]
    sources[1], sources[3] = sources[3], sources[1]
    held_out = np.arange(zoo.task_embeddings.shape[0]) % 4 == 0
    train, test = ~held_out, held_out
    model = Model2Vec(**FAST).fit(zoo.task_embeddings[train], zoo.errors[train], sources)
    learned = top1_relative_increase(zoo.errors[test], model.rank(zoo.task_embeddings[test]))
    untrained = Model2Vec(max_epochs=0).fit(zoo.task_embeddings[train], zoo.errors[train], sources)
    start = top1_relative_increase(zoo.errors[test], untrained.rank(zoo.task_embeddings[test]))
    assert np.mean(start) > 0.3  # the swapped families are misrouted at initialisation
    assert np.mean(learned) < 0.05
    # The swapped experts moved: each is now nearer (d_sym in the model's geometry, on
    # embeddings raised to its learned γ) to its own family's tasks.
    fam = np.asarray(zoo.families)
    g = model.gamma_
    m = model.expert_embeddings_**g
    for i in range(4):
        own = zoo.expert_families[i]
        dist = d_sym(m[i], zoo.task_embeddings**g)
        assert dist[fam == own].mean() < min(
            dist[fam == f].mean() for f in set(zoo.families) - {own}
        )


def test_memory_blocks_do_not_change_the_fit(zoo, fitted, monkeypatch) -> None:
    """Gradients accumulated over small blocks of tasks equal one full-batch gradient."""
    import t2v_core.recommend.model2vec as module

    dim = zoo.task_embeddings.shape[1]
    monkeypatch.setattr(module, "_PAIR_ELEMENTS", 3 * len(zoo.expert_ids) * dim)  # 3 tasks
    blocked = Model2Vec(**FAST).fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings, expert_ids=zoo.expert_ids
    )
    assert blocked.best_epoch_ == fitted.best_epoch_
    np.testing.assert_allclose(blocked.log_m_.numpy(), fitted.log_m_.numpy(), atol=1e-4)
    np.testing.assert_array_equal(
        blocked.rank(zoo.task_embeddings), fitted.rank(zoo.task_embeddings)
    )


def test_minibatches_are_deterministic(zoo) -> None:
    params = {**FAST, "batch_size": 5, "max_epochs": 20}
    a = Model2Vec(**params).fit(zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings)
    b = Model2Vec(**params).fit(zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings)
    assert torch.equal(a.log_m_, b.log_m_)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(tmp_path, zoo, fitted) -> None:
    gpu = Model2Vec(**FAST, device="cuda").fit(
        zoo.task_embeddings, zoo.errors, zoo.expert_source_embeddings
    )
    np.testing.assert_allclose(gpu.log_m_.numpy(), fitted.log_m_.numpy(), atol=1e-3)
    gpu.save(tmp_path / "gpu.pt")
    on_cpu = Model2Vec.load(tmp_path / "gpu.pt", device="cpu")
    np.testing.assert_allclose(
        on_cpu.distances(zoo.task_embeddings), gpu.distances(zoo.task_embeddings), atol=1e-5
    )


def test_learns_the_complexity_weight_of_a_zoo_ranked_by_d_asym() -> None:
    """A matrix whose errors are an exact affine function of d_asym(source → task) with
    α = 0.6 is reproduced exactly by α = 0.6 and a matching τ: the fit, starting from the
    paper's 0.15, should find it; --fixed-alpha keeps 0.15."""
    rng = np.random.default_rng(3)
    tasks = np.exp(rng.normal(size=(40, 24))) * rng.uniform(0.2, 5.0, size=(40, 1))
    sources = np.exp(rng.normal(size=(6, 24))) * rng.uniform(0.2, 5.0, size=(6, 1))
    model = Model2Vec(learn_gamma=False, max_epochs=400, patience=40, val_fraction=0.0)
    t0 = trivial_embedding(24, float(np.median(tasks)))
    dist = d_asym(sources, tasks, t0=t0, alpha=0.6).T  # tasks × experts
    errors = 0.05 + 0.01 * (dist - dist.min(axis=1, keepdims=True))
    fitted = clone(model).set_params(l2=1e6).fit(tasks, errors, list(sources))
    assert fitted.alpha_ == pytest.approx(0.6, abs=0.1)
    fixed = clone(model).set_params(learn_alpha=False).fit(tasks, errors, list(sources))
    assert fixed.alpha_ == 0.15


def test_soft_targets_take_the_evaluations_error_floor(zoo) -> None:
    """MODEL2VEC's targets are relative increases with the floor the report uses (by default
    DEFAULT_ERROR_FLOOR): a task whose best error is below it weighs as the report weighs it."""
    from t2v_core.recommend.metrics import DEFAULT_ERROR_FLOOR
    from t2v_core.recommend.model2vec import soft_targets

    assert Model2Vec().error_floor == DEFAULT_ERROR_FLOOR
    row = np.array([[0.001, 0.011]])
    loose, _ = soft_targets(row, 0.1, DEFAULT_ERROR_FLOOR)
    gap = 0.01 / DEFAULT_ERROR_FLOOR
    np.testing.assert_allclose(loose[0], np.array([1.0, np.exp(-gap / 0.1)]) /
                               (1.0 + np.exp(-gap / 0.1)))


def test_files_of_the_old_complexity_term_are_refused(tmp_path, fitted) -> None:
    path = tmp_path / "old.pt"
    fitted.save(path)
    state = torch.load(path, weights_only=True)
    state["version"] = 1
    torch.save(state, path)
    with pytest.raises(ValueError, match="retrain"):
        Model2Vec.load(path)
