"""cluster/: every YAML parses, has the keys its tool needs, and names jobs and configs that exist."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _check_entrypoint(cmd: str) -> str:
    m = re.match(r"python (jobs/\w+\.py)(.*)", cmd)
    assert m, cmd
    assert (ROOT / m.group(1)).is_file(), m.group(1)
    for cfg in re.findall(r"--config (\S+)", m.group(2)):
        assert (ROOT / cfg).is_file(), cfg
    return m.group(1)


def test_runtime_env():
    env = _load("runtime_env.yaml")
    assert env["working_dir"] == "."
    assert all((ROOT / m).is_dir() for m in env["py_modules"]) and ".venv" in env["excludes"]


def test_cluster_launcher_config():
    c = _load("cluster.yaml")
    for key in ("cluster_name", "provider", "head_node_type", "available_node_types", "setup_commands"):
        assert key in c, key
    assert c["head_node_type"] in c["available_node_types"]
    assert c["provider"]["type"] and all("node_config" in t for t in c["available_node_types"].values())


def test_kuberay_manifests_cover_every_job():
    rc = _load("kuberay/raycluster.yaml")
    assert rc["kind"] == "RayCluster" and rc["spec"]["headGroupSpec"] and rc["spec"]["workerGroupSpecs"]
    jobs = set()
    for f in sorted((CLUSTER / "kuberay").glob("rayjob-*.yaml")):
        doc = yaml.safe_load(f.read_text())
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob", f
        spec = doc["spec"]
        assert spec["rayClusterSpec"]["headGroupSpec"] and "py_modules" in yaml.safe_load(spec["runtimeEnvYAML"])
        jobs.add(_check_entrypoint(spec["entrypoint"]))
    expected = {"jobs/precompute_embeddings.py", "jobs/train_base.py", "jobs/finetune_experts.py", "jobs/generate.py"}
    assert expected <= jobs


def test_local_recipe_names_real_jobs():
    text = (CLUSTER / "local.sh").read_text()
    assert "ray stop" not in text.replace("never `ray stop`", "")
    for job in re.findall(r"submit (jobs/\w+\.py)", text):
        assert (ROOT / job).is_file()
