"""The embedded demo world, the wheel-shipped EfficientNet-Lite0 probe, experts and the demo
orchestrator: all on the small preset at 32 px."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2v_core.embedding.distance import d_sym
from t2v_core.embedding.efficientnet_lite import pretrained_weights_path
from t2v_core.embedding.fisher import fit_head, per_filter_fisher, per_filter_fisher_naive, task2vec
from t2v_core.embedding.probes import build_probe, extract_features, load_state_dict
from t2v_core.matrix.experts import Recipe, blocks, finetune, linear_probe_error, state_digest
from t2v_core.zoo import demo_world
from t2v_core.zoo.data import load_split
from t2v_core.zoo.manifest import read_experts, read_tasks
from t2v_core.zoo.register import register_folders

SIZE = 32


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread: on 2 shared cores, two threads spin-wait for each other and run
    these small networks several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lite0():
    return build_probe("efficientnet_lite0", pretrained_weights_path(), input_size=SIZE)


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    """The small demo world, built and registered once for this module."""
    root = tmp_path_factory.mktemp("demo-small")
    report = demo_world.build_world(root, "small")
    registered = register_folders(report.tasks_uri, root)
    assert not registered.skipped and not registered.problems
    return root, report


# --------------------------------------------------------------------------- the world


def test_small_world_has_the_expected_families_and_classes(small_zoo):
    root, report = small_zoo
    cfg = demo_world.PRESETS["small"]
    plan = {t.task_id: t for t in demo_world.plan_world("small")}
    specs = read_tasks(root)
    assert sorted(report.built) == sorted(plan) == [s.task_id for s in specs]
    assert {s.family for s in specs} == set(demo_world.SMALL_FAMILIES)
    for s in specs:
        task = plan[s.task_id]
        assert s.family == task.family
        assert set(s.classes) == set(task.classes)
        assert 2 <= s.n_classes <= cfg.max_classes
        per_class = demo_world.test_per_class(task, cfg)
        assert (s.n_train, s.n_test) == (s.n_classes * cfg.n_train, s.n_classes * per_class)
        assert s.n_test >= cfg.min_test_per_task and per_class >= cfg.n_test
    images, labels = load_split(specs[0], "train", SIZE)
    assert images.shape[1:] == (3, SIZE, SIZE)


def test_default_world_plan_size_and_families():
    plan = demo_world.plan_world("default")
    families = {t.family for t in plan}
    assert 40 <= len(plan) <= 80
    assert {"digits", "texture", "photo", "shapes"} < families
    assert sum(f.startswith("script_") for f in families) == len(demo_world.SCRIPT_GROUPS)
    assert all(2 <= t.n_classes <= 30 for t in plan)
    assert len({t.task_id for t in plan}) == len(plan)
    # one expert per family in the default demo, plus the generic one: at least 8
    assert len(demo_world.representative_tasks(plan)) + 1 >= 8


def test_generation_is_deterministic_and_cached(small_zoo, tmp_path):
    root, _ = small_zoo
    first = {s.task_id: s.content_hash for s in read_tasks(root)}
    again = demo_world.build_world(root, "small")
    assert again.built == [] and sorted(again.cached) == sorted(first)

    other = tmp_path / "again"
    demo_world.build_world(other, "small")
    register_folders(demo_world.tasks_uri(other), other)
    assert {s.task_id: s.content_hash for s in read_tasks(other)} == first

    # a folder whose fingerprint does not match is made again, with the same bytes
    task_id = sorted(first)[0]
    (other / demo_world.TASKS_DIR / task_id / demo_world.FINGERPRINT).write_text("stale")
    rebuilt = demo_world.build_world(other, "small")
    assert rebuilt.built == [task_id]
    register_folders(demo_world.tasks_uri(other), other)
    assert {s.task_id: s.content_hash for s in read_tasks(other)} == first


def test_scripts_have_real_letters():
    for script in demo_world.SCRIPTS:
        letters = demo_world.script_letters(script)
        assert len(letters) >= 20, script
    # the letters of one script are rendered differently from each other
    a, b = demo_world.script_letters("devanagari")[:2]
    font = demo_world.SCRIPTS["devanagari"][0]
    assert not np.array_equal(demo_world._glyph_mask(font, 400, a),
                              demo_world._glyph_mask(font, 400, b))


def test_families_embed_closer_within_than_across(small_zoo, lite0):
    root, _ = small_zoo
    specs = read_tasks(root)
    vectors = []
    for s in specs:
        x, y = load_split(s, "train", SIZE)
        vectors.append(task2vec(lite0, x, y, n_classes=s.n_classes, method="montecarlo").vector)
    dist = d_sym(np.stack(vectors))
    family = np.array([s.family for s in specs])
    same = family[:, None] == family[None, :]
    off_diagonal = ~np.eye(len(specs), dtype=bool)
    within, across = dist[same & off_diagonal].mean(), dist[~same].mean()
    assert within < across - 0.02, (within, across)


# --------------------------------------------------------------------------- the probe


def test_lite0_matches_the_package_network_and_classifies_imagenet_photos(lite0):
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image
    from skimage.data import chelsea, coffee

    from t2v_core.zoo.data import IMAGENET_MEAN, IMAGENET_STD

    state = load_state_dict(pretrained_weights_path())
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(state)
    reference.eval()
    probe = build_probe("efficientnet_lite0", pretrained_weights_path())
    head = torch.nn.Linear(1280, 1000)
    head.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    batch = []
    for photo in (chelsea(), coffee()):
        arr = np.asarray(Image.fromarray(photo).resize((224, 224)), np.float32) / 255.0
        batch.append(((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(batch))
    with torch.no_grad():
        ours, theirs = head(probe.backbone(x)), reference(x)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # ImageNet classes 281–285 are cats, 967 is espresso
    assert 281 <= int(ours[0].argmax()) <= 285
    assert int(ours[1].argmax()) == 967


def test_fisher_engine_is_exact_through_same_padding(lite0):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 24, 24)
    y = torch.tensor([0, 1, 2])
    head = fit_head(extract_features(lite0.backbone, x), y, 3)
    fast = per_filter_fisher(lite0.backbone, head, x, y, method="expected")
    slow = per_filter_fisher_naive(lite0.backbone, head, x, y, method="expected")
    np.testing.assert_allclose(fast, slow, rtol=1e-3, atol=1e-6 * slow.max())


def test_lite0_weights_round_trip(tmp_path, lite0):
    from t2v_core.embedding.probes import save_weights

    path = tmp_path / "lite0.pt"
    save_weights(lite0.backbone, str(path))
    again = build_probe("efficientnet_lite0", str(path), input_size=SIZE)
    assert again.probe_id == lite0.probe_id
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.testing.assert_close(extract_features(again.backbone, x),
                               extract_features(lite0.backbone, x))


# --------------------------------------------------------------------------- experts


def test_blocks_open_containers():
    resnet = build_probe("resnet18").backbone
    names = [n for n, _ in blocks(resnet)]
    assert names[:2] == ["conv1", "bn1"] and names[-1] == "layer4.1"
    lite = [n for n, _ in blocks(build_probe("efficientnet_lite0").backbone)]
    assert lite[0] == "_conv_stem" and "_blocks.15" in lite and lite[-1] == "_bn1"


def test_finetune_is_deterministic_and_train_last_freezes_the_rest():
    probe = build_probe("small_cnn", seed=1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 16, 16, generator=gen)
    y = torch.arange(24) % 3
    recipe = Recipe(epochs=2, batch_size=8, image_size=16)
    a = finetune(probe, x, y, 3, recipe)
    b = finetune(probe, x, y, 3, recipe)
    assert state_digest(a.backbone) == state_digest(b.backbone)
    assert state_digest(a.backbone) != state_digest(probe.backbone)  # the probe is untouched

    last = finetune(probe, x, y, 3, Recipe(epochs=2, batch_size=8, train_last=1))
    before, after = probe.backbone.state_dict(), last.backbone.state_dict()
    trained = blocks(last.backbone)[-1][0]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(f"{trained}.") for k in changed)


def test_train_experts_with_ray(small_zoo, ray_local, lite0):
    from jobs import train_experts

    root, _ = small_zoo
    sources = ["script_western__latin", "shapes__polygons"]
    argv = ["--root", str(root), "--tasks", ",".join(sources), "--epochs", "8",
            "--image-size", str(SIZE), "--no-progress", "--no-tracking"]
    assert train_experts.main(argv) == 0
    experts = {e.expert_id: e for e in read_experts(root)}
    generic = experts.pop("efficientnet_lite0__generic")
    assert generic.source_task_id is None
    assert sorted(e.source_task_id for e in experts.values()) == sources
    assert all(e.weights_uri.endswith(f"experts/{e.expert_id}.pt") for e in experts.values())
    assert build_probe("efficientnet_lite0", generic.weights_uri).probe_id == \
        build_probe("efficientnet_lite0", pretrained_weights_path()).probe_id

    specs = {s.task_id: s for s in read_tasks(root)}
    random_probe = build_probe("efficientnet_lite0", seed=0, input_size=SIZE)
    for expert in experts.values():
        spec = specs[expert.source_task_id]
        train, test = load_split(spec, "train", SIZE), load_split(spec, "test", SIZE)
        loaded = build_probe("efficientnet_lite0", expert.weights_uri, input_size=SIZE)
        ours = linear_probe_error(loaded.backbone, train, test, spec.n_classes)
        generic_error = linear_probe_error(lite0.backbone, train, test, spec.n_classes)
        random_error = linear_probe_error(random_probe.backbone, train, test, spec.n_classes)
        assert ours < generic_error and ours < random_error, (expert.expert_id, ours,
                                                              generic_error, random_error)

    # re-running changes nothing
    manifest = (root / "zoo" / "experts.parquet").read_bytes()
    assert train_experts.main(argv) == 0
    assert (root / "zoo" / "experts.parquet").read_bytes() == manifest


# --------------------------------------------------------------------------- the demo


@pytest.mark.parametrize("small", [True, False])
def test_every_stage_config_is_made_for_both_presets(small):
    """Each stage's Config is built from the preset, without running: an option a job does
    not take would be a TypeError here."""
    from jobs import demo

    config = demo.Config(root="/tmp/unused", small=small)
    configs = demo.stage_configs(config)
    assert list(configs) == list(demo.JOBS) == list(demo.STAGE_NAMES[1:])
    for name, stage_config in configs.items():
        assert type(stage_config) is demo.JOBS[name].Config, name
        assert stage_config.root == "/tmp/unused"
    probe = configs["embed_tasks"]
    assert (probe.probe, probe.weights) == (demo.PROBE_ARCH, pretrained_weights_path())
    # the probe, the experts, the matrix and the LogME column all see the world's image size
    sizes = {configs[n].image_size for n in ("train_experts", "embed_tasks", "fill_matrix",
                                              "evaluate", "data_efficiency")}
    assert sizes == {demo_world.PRESETS["small" if small else "default"].image_size}
    assert configs["train_experts"].epochs == (4 if small else 6)
    assert configs["evaluate"].folds == (3 if small else 5)
    assert not any(c.tracking for c in demo.stage_configs(
        demo.Config(small=small, tracking=False)).values() if hasattr(c, "tracking"))
    # --image-size renders the world and runs every stage at that size
    bigger = demo.stage_configs(demo.Config(root="/tmp/unused", small=small, image_size=64))
    assert {bigger[n].image_size for n in ("train_experts", "embed_tasks", "fill_matrix",
                                           "evaluate", "data_efficiency")} == {64}
    assert demo.Config(small=small, image_size=64).world.image_size == 64


def test_expert_seed_reaches_the_experts_and_the_matrix_search():
    """--expert-seed makes another zoo of the same world: the experts' training and the
    matrix's probe search take it, the world and the probe's embeddings do not."""
    from jobs import demo

    default = demo.stage_configs(demo.Config(root="/tmp/unused"))
    seeded = demo.stage_configs(demo.parse_args(["--root", "/tmp/unused", "--expert-seed", "3"]))
    def seeds(configs):
        return (configs["train_experts"].seed, configs["fill_matrix"].seed,
                configs["evaluate"].features_seed)

    assert seeds(default) == (0, 0, 0)
    # the evaluation finds the features the matrix cached under its seed
    assert seeds(seeded) == (3, 3, 3)
    assert seeded["train_experts"].recipe.seed == 3
    assert seeded["embed_tasks"] == default["embed_tasks"]
    assert seeded["register_zoo"] == default["register_zoo"]


def test_a_failing_stage_stops_the_demo_with_the_job_s_reason(tmp_path):
    from types import SimpleNamespace

    from jobs import demo, train_model2vec
    from t2v_core.embedding.store import EmbedSummary

    config = demo.Config(root=str(tmp_path), stages=("train_model2vec",), tracking=False)
    empty = {"train_model2vec": train_model2vec.Config(root=str(tmp_path), tracking=False)}
    with pytest.raises(demo.StageFailed, match="train_model2vec: ValueError: 0 probes"):
        demo.run_stage("train_model2vec", config, empty)
    # finished with some items failed: partial, and the demo goes on; a matrix with errored
    # trials leaves the later stages without inputs: the demo stops
    assert demo.stage_status("embed_tasks", EmbedSummary(failed={"t": "bad"})) == "partial"
    assert demo.stage_status("embed_tasks", EmbedSummary(done=["t"])) == "done"
    matrix = SimpleNamespace(interrupted=False, trials_errored=2, cells_missing=0)
    with pytest.raises(demo.StageFailed, match="2 trial"):
        demo.stage_status("fill_matrix", matrix)
    with pytest.raises(ValueError, match="unknown stage"):
        demo.Config(stages=("world", "nonsense"))


def test_demo_help():
    from jobs import demo

    with pytest.raises(SystemExit) as exit_info:
        demo.parse_args(["--help"])
    assert exit_info.value.code == 0


def test_demo_small_first_stages_end_to_end(tmp_path, ray_local):
    from jobs import demo

    root = tmp_path / "demo"
    argv = ["--root", str(root), "--small", "--no-tracking",
            "--stages", "world,register_zoo,train_experts"]
    assert demo.main(argv) == 0
    tasks = read_tasks(root)
    assert len(tasks) == len(demo_world.plan_world("small"))
    experts = read_experts(root)
    # the generic expert and one expert per family
    assert len(experts) == 1 + len(demo_world.SMALL_FAMILIES)
    assert {e.source_task_id for e in experts} - {None} == set(
        demo_world.representative_tasks(tasks))
    with pytest.raises(SystemExit) as exit_info:  # a usage error, as every job's
        demo.main(argv + ["--stages", "nonsense"])
    assert exit_info.value.code == 2
