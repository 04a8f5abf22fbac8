"""Zoo manifests and folder registration: local and S3, idempotent, incremental, robust."""

from __future__ import annotations

import shutil

import pytest
import torch

from jobs import register_zoo
from t2v_core.storage import StorageRoot
from t2v_core.zoo.data import load_split
from t2v_core.zoo.manifest import (
    TASKS_MANIFEST,
    ExpertSpec,
    TaskSpec,
    read_experts,
    read_tasks,
    upsert_experts,
    upsert_tasks,
    write_tasks,
)
from t2v_core.zoo.register import register_folders


@pytest.fixture
def tree(tmp_path, image_folder):
    base = tmp_path / "tasks"
    image_folder(base, "cub__gulls", {"a": 2, "b": 1}, {"a": 1, "b": 1}, seed=1)
    image_folder(base, "cub__terns", {"x": 1, "y": 1, "z": 2}, {"x": 1, "z": 1}, seed=2)
    fungi = image_folder(base, "inat-fungi", {"m": 1, "n": 1}, {"m": 1, "n": 1}, seed=3)
    (fungi / "family.txt").write_text("mushrooms")
    return base


def _by_id(specs):
    return {s.task_id: s for s in specs}


def _register(folders, root):
    register_folders(str(folders), str(root))
    return _by_id(read_tasks(str(root)))


def test_register_tree_manifest(tmp_path, tree):
    root = tmp_path / "root"
    report = register_folders(str(tree), str(root))
    assert report.upsert.added == ("cub__gulls", "cub__terns", "inat-fungi")
    assert report.skipped == {} and report.problems == []
    tasks = _by_id(read_tasks(str(root)))
    assert {k: (t.family, t.classes, t.n_train, t.n_test) for k, t in tasks.items()} == {
        "cub__gulls": ("cub", ("a", "b"), 3, 2),
        "cub__terns": ("cub", ("x", "y", "z"), 4, 2),
        "inat-fungi": ("mushrooms", ("m", "n"), 2, 2),
    }
    assert tasks["cub__gulls"].data_uri == str(tree / "cub__gulls")
    table = StorageRoot(root).read_table(TASKS_MANIFEST)
    assert table.column("n_classes").to_pylist() == [2, 3, 2]


def test_reregister_is_noop_and_changes_are_incremental(tmp_path, tree, write_png, image_folder):
    root = StorageRoot(tmp_path / "root")
    register_folders(str(tree), root)
    before = _by_id(read_tasks(root))
    manifest = root.read_bytes(TASKS_MANIFEST)

    again = register_folders(str(tree), root)
    assert again.upsert.unchanged == tuple(sorted(before)) and not again.upsert.changed
    assert root.read_bytes(TASKS_MANIFEST) == manifest  # same rows, not even rewritten

    write_png(tree / "cub__terns" / "train" / "x" / "0.png", seed=999)
    changed = register_folders(str(tree), root)
    assert changed.upsert.updated == ("cub__terns",) and changed.upsert.added == ()
    after = _by_id(read_tasks(root))
    assert after["cub__terns"].content_hash != before["cub__terns"].content_hash
    assert {k: v for k, v in after.items() if k != "cub__terns"} == {
        k: v for k, v in before.items() if k != "cub__terns"
    }

    image_folder(tree, "cub__owls", {"p": 1, "q": 1}, {"p": 1, "q": 1}, seed=4)
    added = register_folders(str(tree), root)
    assert added.upsert.added == ("cub__owls",) and added.upsert.updated == ()
    assert [t.task_id for t in read_tasks(root)] == [
        "cub__gulls",
        "cub__owls",
        "cub__terns",
        "inat-fungi",
    ]


def test_bad_inputs_are_reported_and_good_tasks_kept(tmp_path, tree, image_folder):
    image_folder(tree, "one-class", {"a": 2}, {"a": 1})
    image_folder(tree, "no-test", {"a": 1, "b": 1}, None)
    (tree / "not-a-task").mkdir()
    (tree / "cub__gulls" / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tree / "cub__terns" / "train" / "empty").mkdir()
    report = register_folders(str(tree), str(tmp_path / "root"))
    assert report.upsert.added == ("cub__gulls", "cub__terns", "inat-fungi")
    assert set(report.skipped) == {"one-class", "no-test", "not-a-task"}
    assert "at least 2 classes" in report.skipped["one-class"]
    assert "no test split" in report.skipped["no-test"]
    assert "no training split" in report.skipped["not-a-task"]
    found = {(p.task_id, p.kind, p.path) for p in report.problems}
    assert ("cub__gulls", "corrupt_image", "train/a/broken.png") in found
    assert ("cub__terns", "empty_class", "empty") in found
    assert _by_id(read_tasks(str(tmp_path / "root")))["cub__gulls"].n_train == 3


def test_upsert_and_write_manifests(tmp_path):
    root = str(tmp_path / "root")
    t = TaskSpec("t1", "f", "/d/t1", "imagefolder", ("a", "b"), 2, 2, "h1")
    assert read_tasks(root) == []
    assert upsert_tasks(root, [t]).added == ("t1",)
    with pytest.raises(ValueError, match="duplicate"):
        upsert_tasks(root, [t, t])
    write_tasks(root, [t.__class__(**{**t.__dict__, "task_id": "t2"})])
    assert [s.task_id for s in read_tasks(root)] == ["t2"]

    generic = ExpertSpec("imagenet", "resnet18", "s3://w/imagenet.pt", None, "w0")
    own = ExpertSpec("e-t1", "resnet18", "s3://w/e-t1.pt", "t1", "w1")
    assert upsert_experts(root, [generic, own]).added == ("e-t1", "imagenet")
    moved = ExpertSpec("e-t1", "resnet18", "s3://w/e-t1.pt", "t1", "w2")
    rep = upsert_experts(root, [moved, generic])
    assert (rep.updated, rep.unchanged) == (("e-t1",), ("imagenet",))
    assert read_experts(root) == [moved, generic]


def test_job_exit_codes(tmp_path, tree, capsys):
    with pytest.raises(SystemExit) as exc:
        register_zoo.main(["--help"])
    assert exc.value.code == 0 and "--folders" in capsys.readouterr().out
    root = str(tmp_path / "root")
    assert register_zoo.main(["--folders", str(tree), "--root", root, "--no-progress"]) == 0
    assert len(read_tasks(root)) == 3
    empty = tmp_path / "nothing"
    (empty / "junk").mkdir(parents=True)
    assert register_zoo.main(["--folders", str(empty), "--root", root, "--no-progress"]) == 1
    assert (
        register_zoo.main(["--folders", str(tmp_path / "missing"), "--root", root, "--no-progress"])
        == 1
    )


def test_closing_summary_lists_each_problem_with_task_file_and_reason(tmp_path, tree, caplog):
    (tree / "cub__gulls" / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tree / "cub__terns" / "train" / "empty").mkdir()
    config = register_zoo.Config(folders=str(tree), root=str(tmp_path / "root"), no_progress=True)
    caplog.set_level("INFO", logger="jobs.register_zoo")
    result = register_zoo.run(config)
    assert result.added == ("cub__gulls", "cub__terns", "inat-fungi")
    assert {(p.task_id, p.kind, p.path) for p in result.problems} == {
        ("cub__gulls", "corrupt_image", "train/a/broken.png"), ("cub__terns", "empty_class", "empty")}
    assert result.summary[0].endswith("3 added, 0 updated, 0 unchanged, 0 skipped, 2 problems")
    text = "\n".join(result.summary)
    assert "problem in cub__gulls, train/a/broken.png: corrupt_image: skipped" in text
    assert "problem in cub__terns, empty: empty_class: class 'empty' has no valid training" in text
    # The log ends with the same list, after the counts, not only as warnings during the scan.
    job_lines = [r.getMessage() for r in caplog.records if r.name == "jobs.register_zoo"]
    closing = job_lines[job_lines.index(result.summary[0]):]
    assert [line for line in closing if line.startswith("problem in ")] == list(result.summary[1:])


def test_nothing_registered_raises_with_the_reasons(tmp_path, image_folder):
    image_folder(tmp_path / "tasks", "one-class", {"a": 2}, {"a": 1})
    config = register_zoo.Config(folders=str(tmp_path / "tasks"), root=str(tmp_path / "root"),
                                 no_progress=True)
    with pytest.raises(register_zoo.NothingRegisteredError, match="no task could be registered"
                       ) as error:
        register_zoo.run(config)
    assert "at least 2 classes" in error.value.result.skipped["one-class"]
    assert error.value.result.summary[1].startswith("skipped one-class: needs at least 2")


def test_s3_registration_matches_local(tmp_path, tree, moto_s3):
    local = _register(tree, tmp_path / "root")
    folders = moto_s3.upload_tree(tree, "zoo-test/tasks")
    s3_root = f"s3://{moto_s3.bucket}/zoo-test/root"
    report = register_folders(folders, s3_root)
    assert report.upsert.added == tuple(sorted(local))
    remote = _by_id(read_tasks(s3_root))
    for task_id, spec in local.items():
        assert remote[task_id].content_hash == spec.content_hash
        assert remote[task_id].classes == spec.classes and remote[task_id].family == spec.family
        assert remote[task_id].data_uri == f"{folders}/{task_id}"
    assert register_folders(folders, s3_root).upsert.unchanged == tuple(sorted(local))
    x_s3, y_s3 = load_split(remote["cub__terns"], "train", 8, max_per_class=1, seed=3)
    x_local, y_local = load_split(local["cub__terns"], "train", 8, max_per_class=1, seed=3)
    assert torch.equal(x_s3, x_local) and torch.equal(y_s3, y_local)


def test_s3_unreadable_folder(moto_s3):
    from t2v_core.zoo.data import UnreadableURIError

    with pytest.raises(UnreadableURIError, match="no-such-bucket"):
        register_folders("s3://no-such-bucket/tasks", f"s3://{moto_s3.bucket}/r")


def test_copied_tree_has_same_hashes(tmp_path, tree):
    copy = tmp_path / "copy"
    shutil.copytree(tree, copy)
    a = _register(tree, tmp_path / "r1")
    b = _register(copy, tmp_path / "r2")
    assert {k: v.content_hash for k, v in a.items()} == {k: v.content_hash for k, v in b.items()}


def test_select_specs_takes_ids_and_globs_and_refuses_a_pattern_matching_nothing():
    from t2v_core.zoo.manifest import TaskSpec, select_specs

    specs = [TaskSpec(task_id=t, family=t.split("__")[0], data_uri=f"/x/{t}", format="imagefolder",
                      classes=("a", "b"), n_train=4, n_test=2, content_hash="h")
             for t in ("digits__3v8", "digits__all", "photo__cat-dog")]
    picked = select_specs(specs, "digits__*,photo__cat-dog")
    assert [s.task_id for s in picked] == ["digits__3v8", "digits__all", "photo__cat-dog"]
    assert [s.task_id for s in select_specs(specs, ["digits__all"])] == ["digits__all"]
    assert select_specs(specs, None) == specs
    with pytest.raises(ValueError, match="'digits__3v9'"):
        select_specs(specs, "digits__3v9,digits__all")


def test_train_experts_tasks_add_all_and_representative_to_the_shared_rule():
    from t2v_core.matrix.expert_training import select_tasks

    specs = [TaskSpec(task_id=t, family=t.split("__")[0], data_uri=f"/x/{t}", format="imagefolder",
                      classes=tuple("abc"[:n]), n_train=4, n_test=2, content_hash="h")
             for t, n in (("digits__3v8", 2), ("digits__all", 3), ("photo__cat-dog", 2))]

    def ids(selector):
        return [s.task_id for s in select_tasks(specs, selector)]

    assert ids("representative") == ["digits__all", "photo__cat-dog"]
    assert ids("all") == ids("") == ids("digits__3v8,all") == [s.task_id for s in specs]
    assert ids("representative,digits__3*") == ["digits__3v8", "digits__all", "photo__cat-dog"]
    assert ids("photo__*") == ["photo__cat-dog"]
    with pytest.raises(ValueError, match="'nope'"):
        select_tasks(specs, "representative,nope")
