"""The jobs' shared command line: flags become the job's Config (same names, same defaults),
and batch jobs leave an MLflow record when there is somewhere to put it, and only then."""

import dataclasses
import importlib

import mlflow
import pytest

from jobs._cli import CommonOptions, config_parser, parse_config, record_stage
from t2v_core.review import tracking


def _args(root, *argv):
    return parse_config(CommonOptions, ["--root", str(root), *argv])


def test_no_record_without_a_tracking_target(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    record_stage(_args(tmp_path), "embed_tasks", {"probe": "p"}, {"tasks_done": 3})
    assert not (tmp_path / "mlflow.db").exists()


def test_stage_nests_under_the_pipeline_run(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.configure(tmp_path)
    with tracking.pipeline_run("demo") as parent:
        record_stage(_args(tmp_path), "embed_tasks", {"probe": "p"},
                     {"tasks_done": 3, "tasks_failed": 1})
        record_stage(_args(tmp_path, "--no-tracking"), "fill_matrix", {}, {"cells_ok": 1})
    runs = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert list(runs["tags.t2v.stage"]) == ["embed_tasks"]
    assert runs.iloc[0]["metrics.tasks_done"] == 3 and runs.iloc[0]["params.probe"] == "p"


def test_explicit_uri_records_and_broken_tracking_does_not_fail_the_job(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/explicit.db"
    record_stage(_args(tmp_path, "--tracking-uri", uri), "fill_matrix", {}, {"cells_ok": 2})
    assert (tmp_path / "explicit.db").exists()
    (tmp_path / "a-file").write_text("not a directory")
    record_stage(_args(tmp_path, "--tracking-uri", f"sqlite:///{tmp_path}/a-file/x.db"),
                 "fill_matrix", {}, {"cells_ok": 2})
    assert "could not log fill_matrix" in caplog.text


@pytest.fixture(autouse=True)
def _no_active_run():
    yield
    while mlflow.active_run():
        mlflow.end_run()


REQUIRED = {
    "register_zoo": ["--folders", "tasks/"],
    "train_experts": [],
    "embed_tasks": ["--probe", "small_cnn"],
    "train_model2vec": [],
    "recommend": ["--tasks", "a*"],
    "evaluate": [],
    "fill_matrix": [],
    "demo": [],
    "data_efficiency": ["--probe", "small_cnn"],
    "refresh_zoo": [],
}


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_flags_and_config_share_names_and_defaults(name, capsys):
    job = importlib.import_module(f"jobs.{name}")
    argv = REQUIRED[name]
    required = {argv[i].removeprefix("--").replace("-", "_"): argv[i + 1]
                for i in range(0, len(argv), 2)}
    assert job.parse_args(argv) == job.Config(**required)
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--help"])
    assert exit_info.value.code == 0 and "--root" in capsys.readouterr().out
    with pytest.raises(TypeError):
        job.Config(**required, no_such_option=1)


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_config_field_is_a_flag(name):
    job = importlib.import_module(f"jobs.{name}")
    actions = {a.dest: a for a in config_parser(job.Config)._actions if a.dest != "help"}
    fields = {f.name: f for f in dataclasses.fields(job.Config)}
    assert sorted(actions) == sorted(fields)
    for field in fields.values():
        if isinstance(field.default, bool):  # each switch flips its field
            flipped = job.parse_args([*REQUIRED[name], actions[field.name].option_strings[0]])
            assert getattr(flipped, field.name) is not field.default, field.name
        elif field.default is not dataclasses.MISSING:
            assert actions[field.name].default == field.default, field.name


def test_options_keep_their_own_spellings():
    from jobs import embed_tasks, evaluate, fill_matrix, train_model2vec

    fixed = train_model2vec.parse_args(["--fixed-alpha", "--fixed-gamma"])
    assert not (fixed.learn_alpha or fixed.learn_gamma)
    assert not embed_tasks.parse_args(["--probe", "small_cnn", "--no-forward-env"]).forward_env
    assert not evaluate.parse_args(["--no-plots", "--no-tracking"]).tracking
    config = fill_matrix.parse_args(["--shard", "1/4", "--weight-decay", "1e-4,1e-3", "-v",
                                     "--lr", "0.01"])
    assert (config.shard, config.weight_decay, config.lr) == ((1, 4), (1e-4, 1e-3), (0.01, 0.01))
    assert config.verbose


def test_values_a_config_refuses_are_usage_errors(capsys):
    from jobs import recommend, train_experts

    with pytest.raises(SystemExit) as exit_info:
        train_experts.parse_args(["--epochs", "0"])
    assert exit_info.value.code == 2 and "epochs and batch_size must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        recommend.parse_args(["--data", "x/"])
    assert exit_info.value.code == 2 and "--data needs --probe" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["demo", "fill_matrix", "refresh_zoo", "data_efficiency"])
def test_a_relative_root_in_a_submitted_job_is_a_usage_error(name, monkeypatch, capsys):
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    monkeypatch.setenv(RAY_JOB_CONFIG_JSON_ENV_VAR, "{}")
    job = importlib.import_module(f"jobs.{name}")
    with pytest.raises(SystemExit) as exit_info:
        job.parse_args([*REQUIRED[name], "--root", "t2v-data"])
    assert exit_info.value.code == 2 and "relative to" in capsys.readouterr().err
