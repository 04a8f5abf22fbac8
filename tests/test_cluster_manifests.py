"""The cluster files, checked offline: the image agrees with pyproject's pins, `ray up` YAML
passes Ray's own validation, KubeRay manifests pass the KubeRay v1.7.0 schemas (vendored in
cluster/schemas/), no file carries a credential, and the runtime_env packs this repository
small enough for Ray even beside a large virtual environment."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
SCHEMAS = CLUSTER / "schemas"

PINNED = ("torch", "torchvision", "ray", "pyarrow", "s3fs", "mlflow")
PIN = re.compile(r"(?<![\w-])(torch|torchvision|ray|pyarrow|s3fs|mlflow)(?:\[[^\]]*\])?==([0-9][\w.+-]*)")
RAY_IMAGE = re.compile(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)(?:-(cpu|gpu|cu\d+))?")
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", re.IGNORECASE)
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
PLACEHOLDER = re.compile(r"^<[^<>]+>$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


@functools.cache
def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _pins() -> dict[str, str]:
    pins = {}
    for requirement in _project()["dependencies"]:
        match = PIN.fullmatch(requirement.strip())
        if match:
            pins[match.group(1)] = match.group(2)
    assert set(PINNED) <= set(pins), f"pyproject pins {sorted(pins)}, expected {PINNED}"
    return pins


def _python_minor() -> str:
    """"3.11" from requires-python ">=3.11,<3.12": the one minor version the project runs on."""
    low = re.search(r">=\s*(\d+)\.(\d+)", _project()["requires-python"])
    high = re.search(r"<\s*(\d+)\.(\d+)", _project()["requires-python"])
    assert low and high and (int(high[1]), int(high[2])) == (int(low[1]), int(low[2]) + 1)
    return f"{low[1]}.{low[2]}"


def _cluster_text_files() -> list[Path]:
    return sorted(
        p for p in CLUSTER.rglob("*")
        if p.is_file() and p.suffix != ".json" and "__pycache__" not in p.parts
    )


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _kuberay_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _docs(p)]


def _ray_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in _kuberay_docs() if d["apiVersion"] == "ray.io/v1"]


def _cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster specs in a RayCluster, RayJob or RayCronJob."""
    spec = doc["spec"]
    return {
        "RayCluster": lambda: [spec],
        "RayJob": lambda: [spec["rayClusterSpec"]],
        "RayCronJob": lambda: [spec["jobTemplate"]["rayClusterSpec"]],
    }[doc["kind"]]()


def _pod_specs(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster_spec.get("workerGroupSpecs", [])
    ]
    return [(name, group["template"]["spec"]) for name, group in groups]


def _containers(doc: dict) -> list[tuple[str, dict]]:
    return [
        (group, c)
        for spec in _cluster_specs(doc)
        for group, pod in _pod_specs(spec)
        for c in pod["containers"]
    ]


# -- the image -------------------------------------------------------------------------------
def test_the_dockerfile_installs_the_project_with_pyprojects_pins():
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^COPY .*pyproject\.toml", text, re.MULTILINE)
    install = re.search(r"^RUN pip install ([^\n\\]*)", text, re.MULTILINE)
    assert install and install.group(1).split()[-1] == ".", "the image must `pip install .`"
    base = re.search(r"^ARG BASE=(\S+)", text, re.MULTILINE)
    assert base and re.search(r"^FROM \$\{BASE\}", text, re.MULTILINE)
    assert RAY_IMAGE.fullmatch(base.group(1)), base.group(1)


@pytest.mark.parametrize("path", _cluster_text_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_pins_and_ray_images_wherever_they_appear_match_pyproject(path):
    text = path.read_text()
    pins = _pins()
    for name, version in PIN.findall(text):
        assert version == pins[name], f"{path.name}: {name}=={version}, pyproject has {pins[name]}"
    for ray_version, major, minor, _ in RAY_IMAGE.findall(text):
        assert ray_version == pins["ray"], f"{path.name}: rayproject/ray:{ray_version}"
        assert f"{major}.{minor}" == _python_minor(), f"{path.name}: py{major}{minor}"


def test_the_ray_images_come_as_cpu_and_gpu_builds():
    flavours = {m[3] for m in RAY_IMAGE.findall((CLUSTER / "Dockerfile").read_text())}
    assert {"cpu", "gpu"} <= flavours


# -- ray up ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_up_config() -> dict:
    return yaml.safe_load((CLUSTER / "ray-aws.yaml").read_text())


def test_ray_up_config_passes_rays_own_validation(ray_up_config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(json.loads(json.dumps(ray_up_config))))


def test_ray_up_config_autoscales_gpu_workers_with_s3_from_instance_profiles(ray_up_config):
    nodes = ray_up_config["available_node_types"]
    gpu = [n for n in nodes.values() if n["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 1
    assert gpu[0]["node_config"]["InstanceType"].startswith("g5.")
    for name, node in nodes.items():
        assert node["node_config"]["IamInstanceProfile"], f"{name} has no instance profile"
    assert ray_up_config["file_mounts"]["/home/ray/task2vec-zoo"] == "."
    assert "pip install --no-cache-dir /home/ray/task2vec-zoo" in ray_up_config["setup_commands"]
    assert {".git", ".venv", "t2v-data", "my-zoo", "mlruns"} <= set(ray_up_config["rsync_exclude"])


def test_ray_up_dashboard_listens_on_the_heads_loopback_only(ray_up_config):
    head = " ".join(ray_up_config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in head


# -- KubeRay ---------------------------------------------------------------------------------
@functools.cache
def _validator(kind: str) -> jsonschema.Draft7Validator:
    # Draft7Validator(...).validate skips re-checking the large schema itself (~1 s a call).
    return jsonschema.Draft7Validator(
        json.loads((SCHEMAS / f"{kind.lower()}_v1.json").read_text())
    )


def test_every_ray_kind_has_a_manifest():
    assert {d["kind"] for _, d in _ray_docs()} == {"RayCluster", "RayJob", "RayCronJob"}


@pytest.mark.parametrize(
    "path,doc", _ray_docs(), ids=[f"{p.name}:{d['kind']}" for p, d in _ray_docs()]
)
def test_ray_manifests_pass_the_kuberay_schemas(path, doc):
    errors = [f"{e.json_path}: {e.message}" for e in _validator(doc["kind"]).iter_errors(doc)]
    assert not errors, f"{path.name}:\n" + "\n".join(errors)


def test_the_schema_check_rejects_a_misspelt_field():
    doc = _docs(KUBERAY / "rayjob-refresh.yaml")[0]
    doc["spec"]["entryPoint"] = doc["spec"].pop("entrypoint")
    assert any("entryPoint" in e.message for e in _validator("RayJob").iter_errors(doc))


@pytest.mark.parametrize("kind", ["Secret", "ConfigMap"])
def test_core_objects_have_what_kubernetes_requires(kind):
    docs = [d for _, d in _kuberay_docs() if d.get("kind") == kind]
    assert len(docs) == 1
    doc = docs[0]
    assert doc["apiVersion"] == "v1"
    assert DNS_SUBDOMAIN.match(doc["metadata"]["name"])
    payload = {**doc.get("data", {}), **doc.get("stringData", {})}
    assert payload, f"{kind} has neither data nor stringData"
    for key, value in payload.items():
        assert ENV_NAME.match(key) and isinstance(value, str), (key, value)


def test_every_ray_container_reads_settings_and_credentials_by_reference():
    names = {d["kind"]: d["metadata"]["name"] for _, d in _kuberay_docs()}
    for path, doc in _ray_docs():
        for group, container in _containers(doc):
            refs = container.get("envFrom", [])
            where = f"{path.name} {group}"
            assert {"configMapRef": {"name": names["ConfigMap"]}} in refs, where
            assert {"secretRef": {"name": names["Secret"], "optional": True}} in refs, where


def test_one_image_everywhere_built_from_this_version():
    images = {c["image"] for _, d in _ray_docs() for _, c in _containers(d)}
    assert len(images) == 1, images
    assert images.pop().rsplit(":", 1)[1] == f"{_project()['version']}-gpu"


def test_gpu_workers_request_and_limit_gpus_and_the_head_none():
    for path, doc in _ray_docs():
        for group, container in _containers(doc):
            requests = container["resources"]["requests"]
            limits = container["resources"]["limits"]
            if group == "head":
                assert "nvidia.com/gpu" not in limits, path.name
            else:
                assert int(limits["nvidia.com/gpu"]) >= 1, path.name
                assert requests["nvidia.com/gpu"] == limits["nvidia.com/gpu"], path.name
            assert requests["cpu"] == limits["cpu"] and requests["memory"] == limits["memory"]


def test_ray_version_of_every_cluster_is_the_pinned_one():
    versions = {s["rayVersion"] for _, d in _ray_docs() for s in _cluster_specs(d)}
    assert versions == {_pins()["ray"]}


def test_the_scheduled_refresh_runs_the_one_off_refresh_job():
    job = _docs(KUBERAY / "rayjob-refresh.yaml")[0]
    cron = _docs(KUBERAY / "raycronjob-refresh.yaml")[0]
    assert cron["spec"]["jobTemplate"] == job["spec"]
    assert len(cron["spec"]["schedule"].split()) == 5
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:3] == ["python", "-m", "jobs.refresh_zoo"]
    assert entrypoint[entrypoint.index("--root") + 1].startswith("s3://")


# -- credentials -----------------------------------------------------------------------------
def _inline_credentials(node, where: str = "") -> list[str]:
    """Places in a parsed document where a credential-like name has a literal value
    (placeholders such as ``<secret access key>`` excepted)."""
    found = []
    if isinstance(node, dict):
        name = node.get("name")
        if isinstance(name, str) and SECRET_NAME.search(name) and "value" in node:
            found.append(f"{where}/{name}: value")
        for key, value in node.items():
            if (isinstance(key, str) and IDENTIFIER.match(key) and SECRET_NAME.search(key)
                    and isinstance(value, str) and not PLACEHOLDER.match(value)):
                found.append(f"{where}/{key}")
            found += _inline_credentials(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += _inline_credentials(item, f"{where}[{i}]")
    return found


def test_the_credential_check_finds_inline_values():
    env = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}, {"name": "REGION", "value": "y"}]
    assert _inline_credentials({"env": env}) == ["/env[0]/AWS_SECRET_ACCESS_KEY: value"]
    assert _inline_credentials({"env_vars": {"MLFLOW_TRACKING_PASSWORD": "hunter2"}})
    assert not _inline_credentials({"stringData": {"AWS_ACCESS_KEY_ID": "<access key id>"}})


@pytest.mark.parametrize("path", [p for p in _cluster_text_files() if p.suffix == ".yaml"],
                         ids=lambda p: str(p.relative_to(CLUSTER)))
def test_no_cluster_file_holds_an_inline_credential(path):
    for doc in _docs(path):
        assert not _inline_credentials(doc), f"{path.name}: {_inline_credentials(doc)}"
    text = path.read_text()
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "an AWS access key id"
    assert not re.search(r"secret_access_key\s*[:=]\s*[A-Za-z0-9/+]{40}", text, re.IGNORECASE)


# -- runtime_env -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime_env() -> dict:
    return yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())


def test_runtime_env_is_one_ray_accepts(runtime_env):
    from ray.runtime_env import RuntimeEnv

    assert RuntimeEnv(**runtime_env)["working_dir"] == "."
    assert {"AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI"} <= set(runtime_env["env_vars"])


@pytest.mark.parametrize("path", [
    ".venv/lib/python3.11/site-packages/torch/lib/libtorch.so", "t2v-data/zoo/tasks.parquet",
    "my-zoo/matrix/part-1.parquet", ".git/objects/pack/pack-1.pack", "mlruns/0/meta.yaml",
    "t2v_core/__pycache__/storage.cpython-311.pyc", ".pytest_cache/v/cache/nodeids",
    ".ruff_cache/0.9/1", "jobs/__pycache__/demo.cpython-311.pyc",
])
def test_runtime_env_excludes_cover_environments_data_and_caches(runtime_env, path):
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(REPO, runtime_env["excludes"])
    parts = Path(path).parts
    assert any(excluded(REPO.joinpath(*parts[:i])) for i in range(1, len(parts) + 1)), path


def _tracked_copy(dst: Path) -> None:
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                                 capture_output=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"needs a git checkout to copy the tracked files: {exc}")
    for rel in filter(None, listing.split("\0")):
        if (REPO / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst / rel)


def _sparse(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)  # takes no disk space, but Ray would read and zip every byte


def test_runtime_env_packs_the_repository_under_rays_limit_beside_a_large_venv(
    runtime_env, tmp_path
):
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package

    checkout = tmp_path / "checkout"
    _tracked_copy(checkout)
    _sparse(checkout / ".venv/lib/python3.11/site-packages/torch/lib/libtorch.so",
            GCS_STORAGE_MAX_SIZE + 1)
    for rel in ["t2v-data/zoo/tasks.parquet", "my-zoo/zoo/tasks.parquet", "mlruns/0/meta.yaml",
                ".git/objects/pack/pack-1.pack", "t2v_core/__pycache__/lease.cpython-311.pyc",
                ".pytest_cache/v/cache/nodeids", ".ruff_cache/0.9/1"]:
        _sparse(checkout / rel, 1 << 20)
    package = tmp_path / "package.zip"
    # gitignore off: the excludes alone must keep the package small.
    create_package(str(checkout), package, include_gitignore=False,
                   excludes=runtime_env["excludes"])
    names = zipfile.ZipFile(package).namelist()
    assert {"pyproject.toml", "t2v_core/lease.py", "jobs/__init__.py"} <= set(names)
    heavy = [n for n in names if re.match(r"(\.venv|t2v-data|my-zoo|mlruns|\.git|\.\w+_cache)/", n)
             or "__pycache__" in n]
    assert not heavy
    assert package.stat().st_size < min(GCS_STORAGE_MAX_SIZE, 16 << 20)


def test_runtime_env_script_passes_credentials_by_name(runtime_env):
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    script = [sys.executable, str(CLUSTER / "runtime_env.py")]
    env = {"PATH": "", "AWS_ACCESS_KEY_ID": "id-from-shell", "AWS_SECRET_ACCESS_KEY": "key"}
    out = subprocess.run(script + ["--pass", "AWS_ACCESS_KEY_ID", "--pass",
                                   "AWS_SECRET_ACCESS_KEY"],
                         env=env, capture_output=True, text=True, check=True)
    passed = parse_runtime_env_args(runtime_env_json=out.stdout)
    assert passed["env_vars"] == {**runtime_env["env_vars"],
                                  "AWS_ACCESS_KEY_ID": "id-from-shell",
                                  "AWS_SECRET_ACCESS_KEY": "key"}
    assert passed["excludes"] == runtime_env["excludes"]
    assert "id-from-shell" not in out.stderr and "AWS_SECRET_ACCESS_KEY" in out.stderr
    missing = subprocess.run(script + ["--pass", "MLFLOW_TRACKING_TOKEN"], env=env,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "MLFLOW_TRACKING_TOKEN" in missing.stderr
    assert missing.stdout == ""
