"""cluster/: every YAML parses, has the keys its tool needs, and names jobs and configs that exist;
every job command in it parses into its job's config; the cluster launcher installs what
pyproject.toml needs."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from ediffi_platform.config import to_dict

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


def _job_config(cmd: str, monkeypatch, capsys):
    """The config `python jobs/X.py ARGS` builds, through the job's own main() (its flags included), not run."""
    argv = shlex.split(cmd)
    assert len(argv) >= 2 and argv[0] == "python" and re.fullmatch(r"jobs/\w+\.py", argv[1]), cmd
    spec = importlib.util.spec_from_file_location(f"_job_{Path(argv[1]).stem}", ROOT / argv[1])
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    built, parse = [], job.job_config

    def capture(*args):
        built.append(parse(*args))
        return built[-1]

    monkeypatch.setattr(job, "job_config", capture)
    monkeypatch.setattr(job, "run_job", lambda body: 0)  # parse only: nothing runs
    monkeypatch.chdir(ROOT)  # --config paths are relative to the working_dir, the repository
    try:
        rc = job.main(argv[2:])
    except SystemExit as e:  # job_config rejects bad input with exit 2 and a message naming the key
        pytest.fail(f"{cmd!r} does not parse (exit {e.code}): {capsys.readouterr().err.strip()}")
    assert rc == 0 and len(built) == 1, f"{cmd!r}: exit {rc}: {capsys.readouterr().err.strip()}"
    return built[0]


def _commented_commands(text: str) -> list[str]:
    """`python jobs/...` commands in a file's comments (backslash continuations joined)."""
    comments = "\n".join(line.lstrip().lstrip("#") for line in text.splitlines() if line.lstrip().startswith("#"))
    comments = re.sub(r"\\\n\s*", " ", comments)
    found = re.findall(r"python (jobs/\w+\.py[^\n]*)", comments)
    found += re.findall(r"local\.sh submit (jobs/\w+\.py[^\n]*)", comments)
    return ["python " + c.split("  #")[0].strip() for c in found]


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
        jobs.add(re.match(r"python (jobs/\w+\.py)", spec["entrypoint"]).group(1))
    expected = {"jobs/precompute_embeddings.py", "jobs/train_base.py", "jobs/finetune_experts.py", "jobs/generate.py"}
    assert expected <= jobs


def test_local_recipe_names_real_jobs():
    text = (CLUSTER / "local.sh").read_text()
    assert "ray stop" not in text.replace("never `ray stop`", "")
    for job in re.findall(r"submit (jobs/\w+\.py)", text):
        assert (ROOT / job).is_file()


def _job_commands() -> list[tuple[str, str]]:
    """(where, command) for every job command in cluster/: RayJob entrypoints and the commented examples."""
    out = []
    for f in sorted((CLUSTER / "kuberay").glob("rayjob-*.yaml")):
        out.append((f.name, yaml.safe_load(f.read_text())["spec"]["entrypoint"]))
    for f in ("cluster.yaml", "local.sh"):
        out += [(f, cmd) for cmd in _commented_commands((CLUSTER / f).read_text())]
    return out


@pytest.mark.parametrize("where, cmd", [pytest.param(w, c, id=f"{w}:{c.split()[1]}") for w, c in _job_commands()])
def test_job_commands_parse_into_their_configs(where, cmd, monkeypatch, capsys):
    data = to_dict(_job_config(cmd, monkeypatch, capsys))
    for override in shlex.split(cmd)[2:]:  # each key=value reached the config (not dropped or shadowed)
        if "=" in override and not override.startswith("-"):
            key, value = override.split("=", 1)
            node = data
            for k in key.split("."):
                node = node[k]
            assert node == yaml.safe_load(value), f"{where}: {override} gave {key}={node!r}"


def test_job_commands_are_found():
    where = [w for w, _ in _job_commands()]
    assert sum(w.startswith("rayjob-") for w in where) == 4 and "cluster.yaml" in where and "local.sh" in where


def _requirements(specs: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in specs]
    names = [canonicalize_name(r.name) for r in reqs]
    assert len(set(names)) == len(names), f"a package is listed twice: {names}"
    return dict(zip(names, reqs, strict=True))


def _overlap(a: SpecifierSet, b: SpecifierSet) -> bool:
    """Whether some version satisfies both (tried on the versions the two name and their next releases)."""
    named = [Version(s.version.replace(".*", "")) for s in (*a, *b)]
    tries = {Version("0")} | set(named)
    for v in named:
        r = list(v.release) + [0] * (3 - len(v.release))
        tries |= {Version(f"{r[0]}.{r[1]}.{r[2] + 1}"), Version(f"{r[0]}.{r[1] + 1}"), Version(f"{r[0] + 1}")}
    return any(a.contains(v, prereleases=True) and b.contains(v, prereleases=True) for v in tries)


def test_cluster_launcher_installs_every_runtime_dependency():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    needed = _requirements(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    installed = {}
    for cmd in _load("cluster.yaml")["setup_commands"]:
        args = shlex.split(cmd)
        if args[:2] == ["pip", "install"]:
            installed |= _requirements([a for a in args[2:] if not a.startswith("-")])
    assert installed, "cluster.yaml's setup_commands install nothing with pip"
    for name, req in needed.items():
        assert name in installed, f"cluster.yaml does not install {req} (a runtime dependency in pyproject.toml)"
        got = installed[name]
        assert req.extras <= got.extras, f"cluster.yaml installs {got}, pyproject.toml needs extras {req.extras}"
        assert _overlap(req.specifier, got.specifier), f"cluster.yaml installs {got}, pyproject.toml needs {req}"


def test_overlap():
    for a, b, both in [
        (">=2.16", "<3.18", True),
        (">=2.40", "==2.60.0", True),
        (">2.4", "<2.5", True),
        ("", "==1.*", True),
        (">=2.4", "<2.4", False),
        ("==2.39", ">=2.40", False),
    ]:
        assert _overlap(SpecifierSet(a), SpecifierSet(b)) == both, (a, b)


def test_one_ray_version_everywhere():
    pin = next(
        Requirement(a) for c in _load("cluster.yaml")["setup_commands"] for a in shlex.split(c) if a.startswith("ray[")
    )
    (version,) = [s.version for s in pin.specifier if s.operator == "=="]
    text = "\n".join(f.read_text() for f in sorted(CLUSTER.rglob("*.yaml")))
    assert set(re.findall(r"rayproject/ray(?:-ml)?:([\d.]+)", text)) == {version}
    assert set(re.findall(r'rayVersion: "([\d.]+)"', text)) == {version}
