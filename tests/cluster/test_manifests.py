"""The cluster manifests: the launcher YAML against Ray's own JSON schema, the KubeRay resources
for the fields KubeRay requires, and every embedded config (entrypoints, Serve config) against
the code that will read it."""
import glob
import json
import os
import shlex

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MANIFESTS = os.path.join(ROOT, "cluster", "manifests")


def load(name: str) -> dict:
    with open(os.path.join(MANIFESTS, name)) as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(MANIFESTS, "*.yaml"))), ids=os.path.basename)
def test_every_manifest_parses(path):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher (AWS)
# ---------------------------------------------------------------------------------------------

def test_launcher_yaml_validates_against_ray_schema():
    import jsonschema
    import ray.autoscaler

    cfg = load("aws-gpu.yaml")
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        schema = json.load(f)
    jsonschema.validate(cfg, schema)
    from ray.autoscaler._private.util import validate_config      # schema + cross-field checks

    validate_config(cfg)


def test_launcher_yaml_shape():
    cfg = load("aws-gpu.yaml")
    assert cfg["provider"]["type"] == "aws"
    assert cfg["idle_timeout_minutes"] > 0
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must not take training work"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert len(gpu_types) >= 2
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0, f"{name}: GPU pools scale from zero"
        assert t["max_workers"] >= 1
    assert sum(t["max_workers"] for t in gpu_types.values()) >= cfg["max_workers"] // 2
    assert cfg["docker"]["image"].startswith("rayproject/ray:2.60.0")
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "ray-posttrain" in setup
    assert "/home/ray/ray-posttrain" in cfg["file_mounts"]
    assert any("--head" in c for c in cfg["head_start_ray_commands"])


# ---------------------------------------------------------------------------------------------
# KubeRay
# ---------------------------------------------------------------------------------------------

def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def check_cluster_spec(spec: dict, where: str) -> None:
    """The fields KubeRay needs, our conventions (autoscaler v2, CPU head, GPU groups from 0),
    and that Ray's own KubeRay config translation accepts the spec."""
    assert spec.get("rayVersion") == "2.60.0", where
    assert spec.get("enableInTreeAutoscaling") is True, where
    assert spec.get("autoscalerOptions", {}).get("version") == "v2", where
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head schedules no work"
    (head_c, *_) = _containers(head)
    assert head_c["image"] and head_c["name"]
    env = {e["name"]: e.get("value") for e in head_c.get("env", [])}
    assert env.get("RAY_enable_autoscaler_v2") == "1", where
    groups = spec["workerGroupSpecs"]
    assert groups, where
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names), f"{where}: groupName must be unique"
    for g in groups:
        assert isinstance(g["rayStartParams"], dict)
        assert g["maxReplicas"] >= 1 and g["minReplicas"] <= g["maxReplicas"]
        c = _containers(g)[0]
        assert c["image"] and c["name"]
        limits = c["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, f"{where}/{g['groupName']}: a GPU group"
        assert c["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
    for group in [head, *groups]:
        pod = group["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{where}: volumeMount {m['name']} has no volume"
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    derived = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": "x", "namespace": "default"}, "spec": spec})
    node_types = derived["available_node_types"]
    assert node_types["headgroup"]["resources"]["CPU"] == 0
    for g in groups:
        assert node_types[g["groupName"]]["resources"]["GPU"] == int(_containers(g)[0]["resources"]["limits"]["nvidia.com/gpu"])


def test_raycluster():
    doc = load("raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    assert doc["spec"]["authOptions"]["mode"] == "token"
    check_cluster_spec(doc["spec"], "raycluster.yaml")
    assert all(g["minReplicas"] == 0 for g in doc["spec"]["workerGroupSpecs"])
    assert len(doc["spec"]["workerGroupSpecs"]) >= 2


@pytest.mark.parametrize("name, module", [("rayjob-sft.yaml", "jobs.sft"), ("rayjob-grpo.yaml", "jobs.grpo")])
def test_rayjob(name, module):
    doc = load(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", module]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env["env_vars"]["HF_HOME"].startswith("/mnt/shared")
    # keys the jobs put in ray.init's runtime_env must not be repeated here (Ray refuses to merge)
    assert not {"RAY_TRAIN_V2_ENABLED", "TOKENIZERS_PARALLELISM", "RAY_DATA_DISABLE_PROGRESS_BARS"} & set(runtime_env["env_vars"])
    assert spec["shutdownAfterJobFinishes"] is True
    check_cluster_spec(spec["rayClusterSpec"], name)
    # the entrypoint's config file and overrides are what the job accepts
    config_path, overrides = argv[3], argv[4:]
    if module == "jobs.sft":
        from jobs.config import load as load_config
        from jobs.sft import SFTJobConfig

        cfg = load_config(SFTJobConfig, os.path.join(ROOT, config_path), overrides)
        assert cfg.trainer.use_gpu and cfg.trainer.num_workers == 8
    elif os.path.isfile(os.path.join(ROOT, "jobs", "grpo.py")):
        assert os.path.isfile(os.path.join(ROOT, config_path)), f"{name}: {config_path} does not exist"
        from jobs.config import load as load_config
        from jobs.grpo import GRPOJobConfig

        load_config(GRPOJobConfig, os.path.join(ROOT, config_path), overrides)


def test_rayservice():
    from ray.serve.schema import ServeDeploySchema

    from cluster.serve import IMPORT_PATH, ServeConfig

    doc = load("rayservice.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    (app,) = serve_cfg["applications"]
    assert app["import_path"] == IMPORT_PATH
    cfg = ServeConfig.from_dict(app["args"])
    assert cfg.engine == "vllm-async" and cfg.api_key_env   # the GPU engine that imports with the gpu extra
    check_cluster_spec(doc["spec"]["rayClusterSpec"], "rayservice.yaml")
    # the API key's env var is present on every pod that may host the ingress
    spec = doc["spec"]["rayClusterSpec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        env = {e["name"] for e in _containers(group)[0].get("env", [])}
        assert cfg.api_key_env in env


def test_dockerfile_installs_the_project():
    text = open(os.path.join(MANIFESTS, "Dockerfile")).read()
    assert "FROM rayproject/ray:2.60.0" in text and "pip install" in text and "[gpu]" in text
    ignore = open(os.path.join(MANIFESTS, "Dockerfile.dockerignore")).read().split()
    assert ".venv" in ignore and ".git" in ignore
