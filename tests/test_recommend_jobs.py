"""train_model2vec → evaluate → recommend on a storage root holding a synthetic zoo.

The zoo's embeddings and matrix come from :func:`t2v_core.embedding.synthetic_zoo.synthetic_zoo`, where each
expert is built to be best on its own family, and are written with the same storage code the
embedding and matrix jobs use; the jobs then only see Parquet.
"""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs import evaluate as evaluate_job
from jobs import recommend as recommend_job
from jobs import train_model2vec
from t2v_core.embedding.store import TaskOutcome, dataset_path, embeddings_table, write_filter_names
from t2v_core.embedding.synthetic_zoo import synthetic_zoo
from t2v_core.matrix.rows import MatrixRow, write_rows
from t2v_core.recommend import model_store
from t2v_core.recommend.table1 import evaluate_table1
from t2v_core.recommend.task_vectors import RecommendError
from t2v_core.storage import StorageRoot
from t2v_core.zoo.manifest import ExpertSpec, TaskSpec, write_experts, write_tasks

PROBE, METHOD = "small_cnn-random0", "montecarlo"


def _task(task_id, family):
    return TaskSpec(task_id, family, f"/nowhere/{task_id}", "imagefolder", ("a", "b"), 10, 4,
                    f"hash-{task_id}")


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory):
    zoo = synthetic_zoo(n_clusters=3, tasks_per_cluster=6, experts_per_cluster=1, dim=32,
                        source_noise=0.2, random_state=1)
    root = StorageRoot(tmp_path_factory.mktemp("zoo") / "root")
    tasks = [_task(f"{fam}-{i:02d}", fam) for i, fam in enumerate(zoo.families)]
    sources = [_task(f"source-{e}", fam or "generic")
               for e, fam, src in zip(zoo.expert_ids, zoo.expert_families,
                                      zoo.expert_source_embeddings, strict=True) if src is not None]
    write_tasks(root, tasks + sources)
    source_ids = iter(t.task_id for t in sources)
    experts = [ExpertSpec(e, "small_cnn", f"/nowhere/{e}.pt",
                          None if src is None else next(source_ids), f"w-{e}")
               for e, src in zip(zoo.expert_ids, zoo.expert_source_embeddings, strict=True)]
    write_experts(root, experts)
    vectors = list(zoo.task_embeddings) + [s for s in zoo.expert_source_embeddings if s is not None]
    outcomes = [TaskOutcome(t.task_id, t.content_hash, np.asarray(v, np.float32), 10)
                for t, v in zip(tasks + sources, vectors, strict=True)]
    root.write_part(dataset_path(PROBE, METHOD), embeddings_table(outcomes, PROBE, METHOD),
                    ["task_id", "content_hash"])
    write_filter_names(root, PROBE, [f"f{i}" for i in range(zoo.task_embeddings.shape[1])])
    rows = [MatrixRow(t.task_id, e.expert_id, "probe", "ok", float(err), float(err) / 2, 10, 5,
                      1, 0.1, t.content_hash, e.content_hash)
            for t, errs in zip(tasks, zoo.errors, strict=True)
            for e, err in zip(experts, errs, strict=True)]
    write_rows(root, rows)
    return root, zoo, tasks


def test_train_evaluate_recommend_end_to_end(zoo_root):
    root, zoo, tasks = zoo_root
    assert train_model2vec.main(["--root", root.uri, "--no-tracking", "--max-epochs", "200"]) == 0
    model, meta = model_store.load_model(root)
    assert meta["probe_id"] == PROBE and len(meta["task_ids"]) == len(tasks)
    assert meta["metrics"]["train_relative_increase_pct"] < 10

    assert evaluate_job.main(["--root", root.uri, "--no-tracking", "--folds", "3",
                              "--repeats", "2", "--model2vec-epochs", "150"]) == 0
    run = root.read_bytes("evaluation/LATEST").decode()
    report = json.loads(root.read_bytes(f"evaluation/{run}/table1.json"))
    mixed = {name: rep["by_meta_task"]["Mixed"]["relative_increase_pct"]
             for name, rep in report["table1"]["reports"].items()}
    assert mixed["Oracle"] == 0.0
    assert mixed["Model2Vec"] < mixed["Chance"] and mixed["Model2Vec"] < mixed["ImageNet"]
    assert mixed["Asym Task2Vec"] < mixed["Chance"]
    markdown = root.read_bytes(f"evaluation/{run}/table1.md").decode()
    assert "+27.81%" in markdown  # the paper's Mixed Model2Vec number sits beside ours
    assert report["table1"]["repeats"] == 2 and "folds=3, 2 repeats" in markdown
    assert report["family_recovery"]["accuracy"] > 0.9
    assert root.exists(f"evaluation/{run}/cost_vs_quality.png")  # the plot beside the report

    picked = [tasks[0].task_id, tasks[-1].task_id]
    assert recommend_job.main(["--root", root.uri, "--no-tracking", "--tasks", ",".join(picked),
                               "--top-k", "2"]) == 0
    parts = root.list("recommendations", recursive=True)
    frame = pq.read_table(root.join(parts[-1])).to_pandas()
    n_experts = len(zoo.expert_ids)
    assert len(frame) == 2 * n_experts
    for _, group in frame.groupby("task_id"):
        assert sorted(group["rank"]) == list(range(1, n_experts + 1))
        assert group["true_error"].notna().all()
        best = group.sort_values("rank").iloc[0]
        assert best["true_error"] <= group["true_error"].median()


def test_recommend_names_what_is_missing(zoo_root, capsys, caplog):
    root, _, _ = zoo_root
    train_model2vec.main(["--root", root.uri, "--no-tracking", "--max-epochs", "20"])
    with pytest.raises(RecommendError, match="no registered task matches 'nope'"):
        recommend_job.run(recommend_job.Config(root=root.uri, tracking=False, tasks="*,nope"))
    assert recommend_job.main(["--root", root.uri, "--no-tracking", "--tasks", "nope"]) == 1
    assert "no registered task matches 'nope'" in caplog.text
    with pytest.raises(SystemExit) as exit_info:
        recommend_job.main(["--root", root.uri, "--no-tracking", "--data", "/tmp/x"])
    assert exit_info.value.code == 2 and "--data needs --probe" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exactly one of --tasks"):
        recommend_job.Config(root=root.uri)
    with pytest.raises(FileNotFoundError, match="no MODEL2VEC version 'nope'"):
        recommend_job.run(recommend_job.Config(root=root.uri, tasks="*", version="nope"))


@pytest.mark.parametrize("job", [train_model2vec, evaluate_job, recommend_job])
def test_help(job, capsys):
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--help"])
    assert exit_info.value.code == 0
    assert "--root" in capsys.readouterr().out


def test_repeats_need_k_folds():
    for bad in (["--repeats", "2"], ["--folds", "3", "--repeats", "0"]):
        with pytest.raises(SystemExit):
            evaluate_job.parse_args(bad)
    assert evaluate_job.parse_args(["--folds", "3", "--repeats", "2"]).repeats == 2


def test_registered_model_in_local_mlflow_ranks_like_the_stored_one(zoo_root, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, _, tasks = zoo_root
    assert train_model2vec.main(["--root", root.uri, "--max-epochs", "30"]) == 0
    db = f"sqlite:///{root.path}/mlflow.db"
    ids = ",".join(t.task_id for t in tasks[:3])
    stored = recommend_job.recommend(recommend_job.parse_args(
        ["--root", root.uri, "--tasks", ids]))
    registered = recommend_job.recommend(recommend_job.parse_args(
        ["--root", root.uri, "--tasks", ids, "--tracking-uri", db,
         "--model", "models:/task2vec-recommender@champion"]))
    assert list(stored["expert_id"]) == list(registered["expert_id"])
    assert np.allclose(stored["score"], registered["score"], atol=1e-6)


def test_logme_column_from_cached_expert_features(zoo_root):
    from t2v_core.matrix.features import FeatureCache, FeatureKey, Features
    from t2v_core.zoo.manifest import read_experts

    root, zoo, tasks = zoo_root
    experts = read_experts(root)
    rng = np.random.default_rng(0)
    cache = FeatureCache(root)
    for t, errs in zip(tasks, zoo.errors, strict=True):
        labels = np.arange(40) % 2
        for e in experts:
            # features whose class signal shrinks with the cell's error: LogME should follow
            err = errs[zoo.expert_ids.index(e.expert_id)]
            feats = rng.normal(size=(40, 8)) + (1 - err) * 3 * labels[:, None]
            cache.save(FeatureKey.for_cell(e, t, "train", 32), Features(feats, labels))
    args = ["--root", root.uri, "--no-tracking", "--no-plots", "--folds", "3",
            "--model2vec-epochs", "20", "--image-size", "32"]
    assert evaluate_job.main(args) == 0
    report = json.loads(root.read_bytes(f"evaluation/{root.read_bytes('evaluation/LATEST').decode()}"
                                        "/table1.json"))
    logme = report["table1"]["reports"]["LogME"]["by_meta_task"]["Mixed"]
    chance = report["table1"]["reports"]["Chance"]["by_meta_task"]["Mixed"]
    assert logme["relative_increase_pct"] < chance["relative_increase_pct"]
    # so does ridge LOO, from the same features
    ridge = report["table1"]["reports"]["Ridge LOO"]["by_meta_task"]["Mixed"]
    assert ridge["relative_increase_pct"] < chance["relative_increase_pct"]
    # the default recommender re-ranks by ridge LOO (no source heads, so no LEEP) and screens
    # by LogME on 3 images per class: k passes + every expert's 6 of 40 images
    passes = {row["selector"]: row["expert_forward_passes"] for row in report["cost"]}
    screen = len(experts) * 6 / 40
    assert passes["Shortlist k=1"] == pytest.approx(1 + screen)
    assert passes["Shortlist k=3"] == pytest.approx(3 + screen)
    assert passes["LogME"] == len(experts) and passes["Model2Vec"] == 0
    # one expert's features missing on one task: the column is left out, the rest runs
    root.fs.rm(root.join(FeatureKey.for_cell(experts[0], tasks[0], "train", 32).rel))
    assert evaluate_job.main(args) == 0
    report = json.loads(root.read_bytes(f"evaluation/{root.read_bytes('evaluation/LATEST').decode()}"
                                        "/table1.json"))
    assert "LogME" not in report["table1"]["reports"]
    assert "Ridge LOO" not in report["table1"]["reports"]


@pytest.mark.parametrize("validation", ["exact", "reversed"])
def test_brute_force_column_follows_the_recorded_validation_errors(zoo_root, tmp_path, validation):
    """Cells that record a validation error add the brute-force column; it picks by that
    error alone (exact: the oracle's picks; reversed: each task's worst expert)."""
    import shutil

    from t2v_core.recommend.meta_dataset import load_meta_dataset

    src, zoo, tasks = zoo_root
    shutil.copytree(src.uri, tmp_path / "root")
    root = StorageRoot(str(tmp_path / "root"))
    for part in root.list("matrix"):
        root.fs.rm(root.join(f"matrix/{part.rsplit('/', 1)[-1]}"))
    experts = {e: f"w-{e}" for e in zoo.expert_ids}
    rows = [MatrixRow(t.task_id, e, "probe", "ok", float(err), float(err) / 2, 10, 5, 1, 0.1,
                      t.content_hash, experts[e],
                      config={"val_error": float(err if validation == "exact" else 1 - err)})
            for t, errs in zip(tasks, zoo.errors, strict=True)
            for e, err in zip(zoo.expert_ids, errs, strict=True)]
    write_rows(root, rows)
    data = load_meta_dataset(root)
    assert np.allclose(data.val_errors, zoo.errors if validation == "exact" else 1 - zoo.errors)

    report = evaluate_table1(data, 3, model2vec_epochs=5)
    brute = report.result.reports["Brute force (val)"]
    assert list(report.result.reports)[-3:] == ["Brute force (val)", "Family best", "Oracle"]
    picks = np.asarray(brute.rankings)[:, 0]
    target = np.argmin if validation == "exact" else np.argmax
    assert (picks == target(zoo.errors, axis=1)).all()
    assert "training every expert on the task" in report.markdown


def test_report_has_the_oracle_noise_floor_when_the_matrix_records_test_sizes(zoo_root, tmp_path):
    """Rows recording their test-set size give the report a noise floor computed from those
    sizes; the zoo's own rows (no sizes recorded) give none."""
    import shutil
    from dataclasses import asdict

    from t2v_core.recommend.meta_dataset import load_meta_dataset
    from t2v_core.recommend.noise_floor import oracle_noise_floor

    src, zoo, tasks = zoo_root
    assert evaluate_table1(load_meta_dataset(src), 3, model2vec_epochs=5).payload[
        "oracle_noise_floor"] is None
    shutil.copytree(src.uri, tmp_path / "root")
    root = StorageRoot(str(tmp_path / "root"))
    for part in root.list("matrix"):
        root.fs.rm(root.join(f"matrix/{part.rsplit('/', 1)[-1]}"))
    sizes = [40 + 10 * i for i in range(len(tasks))]
    rows = [MatrixRow(t.task_id, e, "probe", "ok", float(err), float(err) / 2, 10, 5, 1, 0.1,
                      t.content_hash, f"w-{e}", config={"n_test": n})
            for t, errs, n in zip(tasks, zoo.errors, sizes, strict=True)
            for e, err in zip(zoo.expert_ids, errs, strict=True)]
    write_rows(root, rows)
    data = load_meta_dataset(root)
    assert data.task_test_sizes().tolist() == sizes
    report = evaluate_table1(data, 3, model2vec_epochs=5, error_floor=0.02)
    expected = oracle_noise_floor(zoo.errors, sizes, error_floor=0.02)
    assert report.payload["oracle_noise_floor"] == asdict(expected)
    assert f"+{expected.mean_pct:.1f}% over the re-measured oracle" in report.markdown


def test_new_task_folders_are_embedded_by_the_recommenders_own_probe(tmp_path, image_folder):
    from t2v_core.embedding.probes import build_probe
    from t2v_core.embedding.store import EmbedConfig, embed_task
    from t2v_core.recommend.task_vectors import new_task_vectors
    from t2v_core.zoo.data import scan_task

    folder = str(image_folder(tmp_path, "shapes-new", {"a": 4, "b": 4}, {"a": 1, "b": 1},
                              size=12))
    ids, vectors = new_task_vectors([folder], "small_cnn", None, "small_cnn-random0",
                                    "montecarlo", image_size=12)
    expected = embed_task(scan_task(folder)[0], build_probe("small_cnn", None, input_size=12),
                          EmbedConfig(method="montecarlo", image_size=12)).vector
    assert ids == ["shapes-new"] and vectors.shape == (1, len(expected))
    assert np.allclose(vectors[0], expected)
    with pytest.raises(RecommendError, match="trained on embeddings of probe resnet-x, but"):
        new_task_vectors([folder], "small_cnn", None, "resnet-x", "montecarlo", image_size=12)


# --------------------------------------------------------------------------- new task folders


@pytest.fixture(scope="module")
def image_zoo(tmp_path_factory, write_task_folder):
    """A real tiny zoo: four image-folder tasks in two families, three small_cnn experts with
    their own weights and source heads (one generic), the tasks' real embeddings, a synthetic
    matrix, and a trained MODEL2VEC; plus one new task folder no one has seen."""
    from t2v_core.embedding.probes import build_probe, save_weights
    from t2v_core.embedding.store import EmbedConfig, embed_task
    from t2v_core.matrix.experts import SourceHead, head_uri
    from t2v_core.zoo.manifest import read_tasks
    from t2v_core.zoo.register import register_folders

    base = tmp_path_factory.mktemp("image-zoo")
    for i, name in enumerate(["fa__t0", "fa__t1", "fb__t0", "fb__t1"]):
        write_task_folder(base / "zoo", name, {"x": 5, "y": 5}, {"x": 2, "y": 2}, seed=i, size=8)
    new = write_task_folder(base / "new", "fa__new", {"x": 5, "y": 5, "z": 5}, {"x": 1}, seed=9,
                            size=8)
    root = StorageRoot(base / "root")
    register_folders(str(base / "zoo"), root)
    tasks = read_tasks(root)
    experts = []
    for seed, source in enumerate(["fa__t0", "fb__t0", None], start=1):
        expert_id = f"small_cnn__{source or 'generic'}"
        probe = build_probe("small_cnn", None, seed=seed)
        weights = str(base / "experts" / f"{expert_id}.pt")
        digest = save_weights(probe.backbone, weights)
        gen = torch.Generator().manual_seed(seed)
        head = SourceHead(torch.randn(3, probe.feature_dim, generator=gen), torch.zeros(3))
        StorageRoot(base / "experts").write_bytes_atomic(
            head_uri(weights).rsplit("/", 1)[-1], head.to_bytes())
        experts.append(ExpertSpec(expert_id, "small_cnn", weights, source, digest))
    write_experts(root, experts)
    probe = build_probe("small_cnn", None, input_size=8)
    outcomes = [TaskOutcome(t.task_id, t.content_hash, embed_task(
        t, probe, EmbedConfig(image_size=8)).vector.astype(np.float32), 10) for t in tasks]
    root.write_part(dataset_path(PROBE, METHOD), embeddings_table(outcomes, PROBE, METHOD),
                    ["task_id", "content_hash"])
    write_filter_names(root, PROBE, [f"f{i}" for i in range(outcomes[0].vector.size)])
    rng = np.random.default_rng(0)
    write_rows(root, [MatrixRow(t.task_id, e.expert_id, "probe", "ok",
                                float(rng.uniform(0.1, 0.6)), 0.1, 10, 5, 1, 0.1,
                                t.content_hash, e.content_hash)
                      for t in tasks for e in experts])
    assert train_model2vec.main(["--root", root.uri, "--no-tracking", "--max-epochs", "20"]) == 0
    return root, experts, str(new)


def test_new_task_folders_get_the_shortlist_reranked_by_the_experts_own_scores(image_zoo):
    """Every expert screens 3 images per class, only the k shortlisted experts run over all of
    the new task's images (the cached features say so); the table shows every score, and the
    shortlist is ordered by its ridge LOO and LEEP, z-scored and added."""
    from t2v_core.embedding.probes import build_probe
    from t2v_core.matrix.experts import load_head
    from t2v_core.matrix.features import compute_features
    from t2v_core.recommend.transferability import leep, logme, ridge_loo
    from t2v_core.zoo.data import scan_task

    root, experts, new = image_zoo
    result = recommend_job.run(recommend_job.parse_args(
        ["--root", root.uri, "--no-tracking", "--data", new, "--probe", "small_cnn",
         "--image-size", "8", "--shortlist-k", "2"]))
    frame = result.frame.sort_values("rank")
    assert list(frame["rank"]) == [1, 2, 3]
    short, left = frame[frame["shortlisted"]], frame[~frame["shortlisted"]].iloc[0]
    assert len(short) == 2 and list(short["rank"]) == [1, 2]
    assert left[["logme", "leep", "ridge", "fused"]].isna().all() and frame["screen_leep"].notna().all()
    assert (np.diff(short["fused"]) <= 1e-9).all()  # a tie keeps the first stage's order
    both = short[["ridge", "leep"]].to_numpy()
    z = (both - both.mean(0)) / both.std(0)
    np.testing.assert_allclose(short["fused"], z.sum(1), atol=1e-9)
    # the first stage is monotone in both of its inputs: what it left out beats no shortlisted
    # expert on both MODEL2VEC's rank and the screen
    assert not any(left["model2vec_rank"] < s["model2vec_rank"]
                   and left["screen"] > s["screen"] for _, s in short.iterrows())
    cached = root.list("features", recursive=True)
    assert len(cached) == 3 + 2  # a screen per expert, a full pass per shortlisted expert
    spec = scan_task(new)[0]
    by_id = {e.expert_id: e for e in experts}
    for _, row in frame.iterrows():  # the scores by hand, from the expert's own network
        expert = by_id[row["expert_id"]]
        net, head = build_probe("small_cnn", expert.weights_uri).backbone, load_head(
            expert.weights_uri)
        few = compute_features(net, spec, "train", 8, max_per_class=3)
        assert len(few.labels) == 9
        assert row["screen_leep"] == pytest.approx(
            leep(head.probabilities(few.features.astype(np.float64)), few.labels), rel=1e-6)
        assert row["screen_logme"] == pytest.approx(logme(few.features, few.labels), rel=1e-6)
        if row["shortlisted"]:
            feats = compute_features(net, spec, "train", 8)
            probs = head.probabilities(feats.features.astype(np.float64))
            assert row["logme"] == pytest.approx(logme(feats.features, feats.labels), rel=1e-6)
            assert row["leep"] == pytest.approx(leep(probs, feats.labels), rel=1e-6)
            assert row["ridge"] == pytest.approx(ridge_loo(feats.features, feats.labels),
                                                 rel=1e-6)
    stored = pq.read_table(result.path).to_pandas()
    assert {"model2vec_rank", "screen_leep", "screen_logme", "screen", "shortlisted", "logme",
            "leep", "ridge", "fused"} <= set(
        stored.columns)
    alone = recommend_job.recommend(recommend_job.parse_args(
        ["--root", root.uri, "--no-tracking", "--data", new, "--probe", "small_cnn",
         "--image-size", "8", "--shortlist-k", "0"]))
    assert list(alone.sort_values("rank")["expert_id"]) == list(
        frame.sort_values("model2vec_rank")["expert_id"])
