"""Reading deploy/ as Kubernetes would get it: a small renderer of the kustomize features
deploy/k8s uses (and ``kubectl kustomize`` where installed), the built pods of the two
variants, and the Secrets' test values the manifests refer to.

The renderer refuses any kustomization field it does not know, so that a new feature in
deploy/k8s gets taught here rather than rendered differently from kustomize.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SHARED = K8S / "shared"
REDIS_FILES = DEPLOY / "redis"
CLUSTER_FILES = DEPLOY / "redis-cluster"
GENERATOR = REDIS_FILES / "gen-users-acl.sh"
EXAMPLE = DEPLOY / "example"
COMPOSE = REPO / "docker-compose.yml"
MIB = 1024 * 1024

# -- the Secrets' test values (the generator wants >= 16 URL-safe characters) ----------------

SECRET_NAME = USERS_SECRET = "hotreload-redis-users"
URLS_SECRET = "hotreload-redis-urls"  # the shared variant: the URLs, password included
# every user's password; the per-pod variant has the first three, the cluster all five
PASSWORDS = {
    "publisher": "publisher-test-0123456789",
    "subscriber": "subscriber-test-0123456789",
    "operator": "operator-test-0123456789",
    "replication": "replication-test-0123456789",
    "admin": "admin-test-0123456789",
}
POD_USERS = ("publisher", "subscriber", "operator")
# the per-pod variant's Secret: its keys and values
SECRET = {f"{user}-password": PASSWORDS[user] for user in POD_USERS}
# the shared variant's users Secret
USERS = {f"{user}-password": value for user, value in PASSWORDS.items()}
# Appended to a generated ACL file by these tests only: it reads CONFIG, ACL LOG, INFO, roles.
TEST_ADMIN = ("test-admin", "test-admin-0123456789")

Resource = dict[str, Any]


def tool(name: str) -> str:
    """A command-line tool of the lint extra, next to this interpreter (the .venv) or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: install the lint extra (pip install -e '.[lint]')")
    return found


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)


def conf_directives(path: Path) -> dict[str, str]:
    """A redis.conf's directives (the last occurrence wins, as in Redis)."""
    settings = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.strip().partition(" ")
            settings[name.lower()] = value.strip()
    return settings


def memory_bytes(value: str) -> int:
    """A Redis memory size (``64mb``) in bytes."""
    found = re.fullmatch(r"(\d+)([a-z]*)", value.lower())
    assert found, f"not a Redis memory size: {value}"
    return int(found[1]) * {"": 1, "kb": 1024, "mb": MIB, "gb": 1024 * MIB}[found[2]]


# -- kustomize ----------------------------------------------------------------------------

# Everything deploy/k8s uses; anything else fails the renderer so that it gets taught, rather
# than rendering something else than kustomize would.
KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "configMapGenerator",
    "images",
    "replicas",
}


def documents(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def read_kustomization(directory: Path) -> dict[str, Any]:
    data = cast(dict[str, Any], yaml.safe_load((directory / "kustomization.yaml").read_text()))
    unknown = set(data) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: the test's renderer does not handle {sorted(unknown)}"
    return data


def render(directory: Path) -> list[Resource]:
    """``kustomize build directory`` for the features deploy/k8s uses, in kustomize's order
    (resources, components, generators, transformers). Generated names get no hash suffix;
    references to them are by name either way."""
    kustomization = read_kustomization(directory)
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        target = directory / entry
        resources += render(target) if target.is_dir() else documents(target)
    for entry in kustomization.get("components", []):
        component_dir = directory / entry
        component = read_kustomization(component_dir)
        assert component["kind"] == "Component", component_dir
        for item in component.get("resources", []):
            resources += documents(component_dir / item)
        _generate(component_dir, component, resources)
        _transform(component, resources)
    _generate(directory, kustomization, resources)
    _transform(kustomization, resources)
    return resources


def _generate(directory: Path, kustomization: dict[str, Any], resources: list[Resource]) -> None:
    for generator in kustomization.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for item in generator.get("files", []):
            key, _, path = item.rpartition("=") if "=" in item else (Path(item).name, "", item)
            assert (directory / path).resolve().is_relative_to(directory.resolve()), (
                f"{directory}: kustomize refuses {path}, outside the kustomization's directory"
            )
            data[key] = (directory / path).read_text()
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        name = generator["name"]
        labels = generator.get("options", {}).get("labels", {})
        annotations = generator.get("options", {}).get("annotations", {})
        behavior = generator.get("behavior", "create")
        found = [r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == name]
        if behavior == "create":
            assert not found, f"ConfigMap {name} generated twice"
            metadata = {"name": name, **({"labels": labels} if labels else {})}
            if annotations:
                metadata["annotations"] = annotations
            resources.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata})
            resources[-1]["data"] = data
        else:
            assert behavior in {"replace", "merge"}, (name, behavior)
            assert len(found) == 1, f"no ConfigMap {name} to {behavior}"
            target = found[0]
            target["data"] = data if behavior == "replace" else {**target.get("data", {}), **data}
            target["metadata"].setdefault("labels", {}).update(labels)
            if annotations:
                target["metadata"].setdefault("annotations", {}).update(annotations)


def _transform(kustomization: dict[str, Any], resources: list[Resource]) -> None:
    for image in kustomization.get("images", []):
        for pod in (r["spec"]["template"]["spec"] for r in resources if r["kind"] == "Deployment"):
            for container in pod.get("initContainers", []) + pod["containers"]:
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    new_tag = image.get("newTag", tag)
                    suffix = f":{new_tag}" if new_tag else ""
                    container["image"] = image.get("newName", name) + suffix
    for replicas in kustomization.get("replicas", []):
        for resource in resources:
            named = resource["metadata"]["name"] == replicas["name"]
            if resource["kind"] == "Deployment" and named:
                resource["spec"]["replicas"] = replicas["count"]


def kubectl_build(directory: Path) -> list[Resource]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the test's renderer checks the build alone")
    built = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


# -- the built pods -----------------------------------------------------------------------


def containers_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


class Pod:
    """The example overlay's Deployment and what it refers to."""

    def __init__(self, resources: list[Resource]) -> None:
        self.resources = resources
        (self.deployment,) = [r for r in resources if r["kind"] == "Deployment"]
        self.spec: dict[str, Any] = self.deployment["spec"]["template"]["spec"]

    def containers(self) -> list[dict[str, Any]]:
        return containers_of(self.spec)

    def container(self, name: str) -> dict[str, Any]:
        (found,) = [c for c in self.containers() if c["name"] == name]
        return found

    def volume(self, name: str) -> dict[str, Any]:
        volumes: list[dict[str, Any]] = self.spec["volumes"]
        (found,) = [v for v in volumes if v["name"] == name]
        return found

    def mount(self, container: str, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(volumeMount, volume) of ``container`` at ``path``."""
        (found,) = [m for m in self.container(container)["volumeMounts"] if m["mountPath"] == path]
        return found, self.volume(found["name"])

    def configmap(self, name: str) -> Resource:
        (found,) = [
            r for r in self.resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == name
        ]
        return found


class Shared:
    """The built shared variant: the app Deployment, the Redis StatefulSet and the rest."""

    def __init__(self, resources: list[Resource]) -> None:
        self.resources = resources
        self.deployment = self.one("Deployment", "hotreload-app")
        self.statefulset = self.one("StatefulSet", "hotreload-redis")
        self.job = self.one("Job", "hotreload-redis-create")
        self.app_spec: dict[str, Any] = self.deployment["spec"]["template"]["spec"]
        self.redis_spec: dict[str, Any] = self.statefulset["spec"]["template"]["spec"]
        self.job_spec: dict[str, Any] = self.job["spec"]["template"]["spec"]

    def one(self, kind: str, name: str) -> Resource:
        (found,) = [
            r for r in self.resources if r["kind"] == kind and r["metadata"]["name"] == name
        ]
        return found

    def of_kind(self, kind: str) -> list[Resource]:
        return [r for r in self.resources if r["kind"] == kind]

    def configmap(self, name: str) -> Resource:
        """By its name before kustomize's hash suffix."""
        (found,) = [
            r
            for r in self.of_kind("ConfigMap")
            if re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", r["metadata"]["name"])
        ]
        return found

    def app_container(self, name: str) -> dict[str, Any]:
        (found,) = [c for c in containers_of(self.app_spec) if c["name"] == name]
        return found

    @property
    def redis(self) -> dict[str, Any]:
        (found,) = self.redis_spec["containers"]
        return cast(dict[str, Any], found)

    def pod_specs(self) -> list[dict[str, Any]]:
        return [self.app_spec, self.redis_spec, self.job_spec]


def secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """env name -> (Secret, key) of every secretKeyRef."""
    refs = {}
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            refs[item["name"]] = (ref["name"], ref["key"])
    return refs


def probe_port(container: dict[str, Any], probe: str) -> tuple[str, int]:
    """(path, port number) of an httpGet probe, a named port resolved."""
    action = container[probe]["httpGet"]
    port = action["port"]
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return action["path"], int(port)


def container_env(
    container: dict[str, Any], secret: dict[str, str], directories: dict[str, str] | None = None
) -> dict[str, str]:
    """The container's environment as kubelet builds it: secretKeyRef values, then $(VAR)
    references to variables defined earlier in the list; with ``directories``
    (:func:`write_secret_files`), the Secret files' paths moved there."""
    env = _container_env(container, secret)
    return {name: moved(value, directories or {}) for name, value in env.items()}


def _container_env(container: dict[str, Any], secret: dict[str, str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == SECRET_NAME
            if ref["key"] not in secret and ref.get("optional"):
                continue
            env[item["name"]] = secret[ref["key"]]
        else:
            env[item["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), str(item["value"])
            )
    return env


def env_values(container: dict[str, Any], fields: dict[str, str]) -> dict[str, str]:
    """The container's environment as kubelet builds it: Secret values (from ``USERS`` and a
    URL per key), downward API ``fields``, then $(VAR) references to earlier variables."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "secretKeyRef" in source:
            env[item["name"]] = {**USERS, "publisher-url": "P", "subscriber-url": "S"}[
                source["secretKeyRef"]["key"]
            ]
        elif "fieldRef" in source:
            env[item["name"]] = fields[source["fieldRef"]["fieldPath"]]
        else:
            env[item["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), str(item["value"])
            )
    return env


# -- Secrets as files ---------------------------------------------------------------------

SECRET_MOUNT = "/run/secrets/hotreload"  # where every container of deploy/ mounts its keys


def secret_files(
    spec: dict[str, Any], container: dict[str, Any], secret: dict[str, str]
) -> dict[str, str]:
    """path -> content of every file ``container`` sees from a Secret volume, the Secret
    holding ``secret`` (kubelet's view: ``items`` pick keys, else every key is a file)."""
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    files: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        source = volumes.get(mount["name"], {}).get("secret")  # else a claim's, or not one
        if source is None:
            continue
        assert mount.get("readOnly") is True, (container["name"], mount)
        assert "subPath" not in mount  # a subPath mount never sees a rotated Secret
        assert source["secretName"] == USERS_SECRET, source
        items = source.get("items") or [{"key": key, "path": key} for key in secret]
        for item in items:
            files[f"{mount['mountPath']}/{item['path']}"] = secret[item["key"]]
    return files


def write_secret_files(
    spec: dict[str, Any], container: dict[str, Any], secret: dict[str, str], root: Path
) -> dict[str, str]:
    """The container's Secret files written under ``root``; returns mountPath -> its
    directory there (for :func:`moved`)."""
    directories: dict[str, str] = {}
    for path, content in secret_files(spec, container, secret).items():
        mount, _, name = path.rpartition("/")
        local = root / container["name"] / mount.strip("/").replace("/", "_")
        local.mkdir(parents=True, exist_ok=True)
        (local / name).write_text(content)
        directories[mount] = str(local)
    return directories


def moved(text: str, directories: dict[str, str]) -> str:
    """``text`` with each mount path of ``directories`` replaced by its local directory."""
    for mount, local in directories.items():
        text = text.replace(mount, local)
    return text
