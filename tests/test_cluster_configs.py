"""Every shipped cluster config parses, and every entrypoint in it is a real job whose flags parse."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from devise.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
YAML_FILES = sorted(CLUSTER.rglob("*.yaml"))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _rayjobs() -> list[tuple[str, dict]]:
    """(where, RayJob) for every RayJob shipped, including those inside ConfigMaps."""
    found = []
    for path in YAML_FILES:
        for doc in _docs(path):
            if doc.get("kind") == "RayJob":
                found.append((path.name, doc))
            if doc.get("kind") == "ConfigMap":
                for key, text in doc.get("data", {}).items():
                    for inner in yaml.safe_load_all(text):
                        if inner and inner.get("kind") == "RayJob":
                            found.append((f"{path.name}:{key}", inner))
    return found


def _parse_job_command(tokens: list[str]):
    """['python', 'jobs/X.py', flags...] -> argparse namespace of `devise X flags...`."""
    assert tokens[0] == "python", tokens
    script = ROOT / tokens[1]
    assert script.is_file(), f"{tokens[1]} is not a job in this repository"
    command = script.stem
    return build_parser().parse_args([command, *tokens[2:]])


def test_there_are_configs_to_check():
    names = {p.name for p in YAML_FILES}
    assert {
        "runtime_env.yaml",
        "ray-cluster.yaml",
        "rayjob-train.yaml",
        "rayjob-embed.yaml",
    } <= names
    assert {"raycluster.yaml", "cronjob-reembed.yaml"} <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses(path):
    assert _docs(path), f"{path} is empty"


def test_ray_up_config_matches_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any("g5" in t["node_config"]["InstanceType"] for t in types.values())
    assert any(t.get("max_workers", 0) > t.get("min_workers", 0) for t in types.values())


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown or malformed fields
    assert env["working_dir"] == "."


def test_every_rayjob_runs_a_real_job_with_flags_that_parse():
    jobs = _rayjobs()
    assert len(jobs) >= 3
    for where, job in jobs:
        assert job["apiVersion"] == "ray.io/v1", where
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True, where
        assert spec["ttlSecondsAfterFinished"] > 0, where
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert "working_dir" in env, where
        args = _parse_job_command(shlex.split(spec["entrypoint"]))
        assert args.use_gpu, f"{where}: a GPU cluster job should pass --use-gpu"
        workers = spec["rayClusterSpec"]["workerGroupSpecs"]
        assert any(
            w["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for w in workers
        ), where


def test_shared_storage_is_given_as_flags_and_mounted():
    by_name = {where: job for where, job in _rayjobs()}
    train = _parse_job_command(shlex.split(by_name["rayjob-train.yaml"]["spec"]["entrypoint"]))
    assert str(train.storage).startswith("/data") and str(train.out).startswith("/data")
    embed = _parse_job_command(shlex.split(by_name["rayjob-embed.yaml"]["spec"]["entrypoint"]))
    assert str(embed.out).startswith("/data")
    head = by_name["rayjob-train.yaml"]["spec"]["rayClusterSpec"]["headGroupSpec"]
    mounts = head["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "data", "mountPath": "/data"} in mounts


def test_scheduled_reembedding_is_incremental_and_never_overlaps():
    docs = _docs(CLUSTER / "kuberay" / "cronjob-reembed.yaml")
    cron = next(d for d in docs if d["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    nested = [job for where, job in _rayjobs() if where.startswith("cronjob-reembed")]
    assert len(nested) == 1
    args = _parse_job_command(shlex.split(nested[0]["spec"]["entrypoint"]))
    assert args.incremental
    assert "generateName" in nested[0]["metadata"]  # a new RayJob per tick
    role = next(d for d in docs if d["kind"] == "Role")
    assert "create" in role["rules"][0]["verbs"]


def test_crontab_script_runs_a_real_embed_job():
    text = (CLUSTER / "reembed.sh").read_text()
    command = text[text.index("python jobs/embed.py") :].replace("\\\n", " ")
    tokens = shlex.split(command.splitlines()[0])
    tokens = [re.sub(r'^"?\$\{?(\w+).*$', r"/tmp/\1", t) if "$" in t else t for t in tokens]
    tokens = [t if not t.startswith("/tmp/DEVISE") else "2" for t in tokens]
    args = _parse_job_command(tokens)
    assert args.incremental


def test_cluster_readme_commands_name_real_jobs():
    text = (CLUSTER / "README.md").read_text()
    for script in set(re.findall(r"python (jobs/\w+\.py)", text)):
        assert (ROOT / script).is_file(), script
    for needle in ("ray start --head", "ray job submit", "ray up", "kubectl apply", "crontab"):
        assert needle in text, needle
    assert "ray job logs" in text and "--follow" in text


def _unknown_fields(value, schema: dict, where: str = "") -> list[str]:
    """Fields Kubernetes would silently prune: keys not in a structural schema's properties."""
    found = []
    if isinstance(value, dict) and "properties" in schema:
        open_ended = schema.get("additionalProperties") or schema.get(
            "x-kubernetes-preserve-unknown-fields"
        )
        for key, sub in value.items():
            if key in schema["properties"]:
                found += _unknown_fields(sub, schema["properties"][key], f"{where}.{key}")
            elif not open_ended:
                found.append(f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, sub in enumerate(value):
            found += _unknown_fields(sub, schema["items"], f"{where}[{i}]")
    return found


def _check_serve_app(app: dict, where: str) -> None:
    """A Serve application entry names devise's builder with arguments the service takes."""
    from dataclasses import fields

    from ray.serve._private.utils import import_attr

    from devise.config import ServiceConfig

    assert app["import_path"] == "devise.serve:app_builder", where
    assert callable(import_attr(app["import_path"])), where
    allowed = {f.name for f in fields(ServiceConfig)} | {"replicas", "cpus_per_replica"}
    assert set(app["args"]) <= allowed, f"{where}: unknown args {set(app['args']) - allowed}"
    assert app["args"]["embeddings"].startswith("/data"), where


def test_serve_deploy_config_matches_serves_schema():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((CLUSTER / "serve-config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # raises on unknown or malformed fields
    assert config["http_options"]["host"] == "127.0.0.1"
    for app in config["applications"]:
        _check_serve_app(app, "serve-config.yaml")


def test_rayservice_matches_kuberays_crd():
    import gzip

    import jsonschema
    from ray.serve.schema import ServeDeploySchema

    with gzip.open(Path(__file__).parent / "data" / "kuberay_rayservice_v1.schema.json.gz") as f:
        schema = json.load(f)["openAPIV3Schema"]
    doc = _docs(CLUSTER / "kuberay" / "rayservice.yaml")[0]
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    jsonschema.validate(doc, schema)
    assert _unknown_fields(doc, schema) == []
    serve_config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    for app in serve_config["applications"]:
        _check_serve_app(app, "rayservice.yaml")
    cluster = doc["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "data", "mountPath": "/data"} in head["volumeMounts"]
    import ray

    assert cluster["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]
