"""deploy/ validated offline: no cluster and no Docker engine here.

- every Kubernetes manifest, raw and as built by kustomize, passes ``kubernetes-validate
  --strict`` for its default (current) Kubernetes version; ``docker-compose.yml`` passes the
  compose-spec schema; ``yamllint --strict`` with the checked-in ``.yamllint.yml``;
- the pod shape of the built example overlay (a small renderer of the kustomize features
  deploy/k8s uses, and ``kubectl kustomize`` itself where kubectl is installed): the publisher
  mounts the ConfigMap volume whole and read-only, Redis has no port, the Secret is referenced,
  probes point at the endpoints the code really serves, every container is locked down;
- ``deploy/redis/redis.conf`` and the ACL users that ``gen-users-acl.sh`` writes, for real: a
  redis-server runs that file (only its paths moved into a temp dir); the real publisher daemon,
  subscribers, CLI and the example app under gunicorn work under their users with no ACL
  denial, while the subscriber user cannot write the events stream or destroy anything;
- the Dockerfile's stages, base, user and what it copies (text level: there is no engine).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry

from publisher.cli import main as hotreload
from publisher.daemon import Daemon
from publisher.endpoints import EndpointServer
from subscriber import AsyncSubscriber, Subscriber
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.testing import RedisServer, free_port
from tests.conftest import KubeletMount, Processes
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
REDIS_FILES = DEPLOY / "redis"
EXAMPLE = DEPLOY / "example"
COMPOSE = REPO / "docker-compose.yml"

SECRET_NAME = "hotreload-redis-users"
# The Secret's keys and what the test puts in them (the generator wants >= 16 URL-safe chars).
SECRET = {
    "publisher-password": "publisher-test-0123456789",
    "subscriber-password": "subscriber-test-0123456789",
    "operator-password": "operator-test-0123456789",
}
PASSWORDS = {key.removesuffix("-password"): value for key, value in SECRET.items()}
# Appended to the generated ACL file by these tests only: it reads CONFIG and ACL LOG.
ADMIN = ("test-admin", "test-admin-0123456789")
MIB = 1024 * 1024

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


# ---------------------------------------------------------------------------- kustomize

# Everything deploy/k8s uses; anything else fails the renderer so that it gets taught, rather
# than rendering something else than kustomize would.
_KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "configMapGenerator",
    "images",
    "replicas",
}


def _documents(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kustomization(directory: Path) -> dict[str, Any]:
    data = cast(dict[str, Any], yaml.safe_load((directory / "kustomization.yaml").read_text()))
    unknown = set(data) - _KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: the test's renderer does not handle {sorted(unknown)}"
    return data


def render(directory: Path) -> list[Resource]:
    """``kustomize build directory`` for the features deploy/k8s uses, in kustomize's order
    (resources, components, generators, transformers). Generated names get no hash suffix;
    references to them are by name either way."""
    kustomization = _kustomization(directory)
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        target = directory / entry
        resources += render(target) if target.is_dir() else _documents(target)
    for entry in kustomization.get("components", []):
        component_dir = directory / entry
        component = _kustomization(component_dir)
        assert component["kind"] == "Component", component_dir
        for item in component.get("resources", []):
            resources += _documents(component_dir / item)
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
        behavior = generator.get("behavior", "create")
        found = [r for r in resources if r["kind"] == "ConfigMap" and r["metadata"]["name"] == name]
        if behavior == "create":
            assert not found, f"ConfigMap {name} generated twice"
            metadata = {"name": name, **({"labels": labels} if labels else {})}
            resources.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata})
            resources[-1]["data"] = data
        else:
            assert behavior in {"replace", "merge"}, (name, behavior)
            assert len(found) == 1, f"no ConfigMap {name} to {behavior}"
            target = found[0]
            target["data"] = data if behavior == "replace" else {**target.get("data", {}), **data}
            target["metadata"].setdefault("labels", {}).update(labels)


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


class Pod:
    """The example overlay's Deployment and what it refers to."""

    def __init__(self, resources: list[Resource]) -> None:
        self.resources = resources
        (self.deployment,) = [r for r in resources if r["kind"] == "Deployment"]
        self.spec: dict[str, Any] = self.deployment["spec"]["template"]["spec"]

    def containers(self) -> list[dict[str, Any]]:
        return [*self.spec.get("initContainers", []), *self.spec["containers"]]

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


@pytest.fixture(scope="module", params=["renderer", "kubectl"])
def pod(request: pytest.FixtureRequest) -> Pod:
    if request.param == "kubectl":
        return Pod(kubectl_build(K8S / "example"))
    return Pod(render(K8S / "example"))


def probe_port(container: dict[str, Any], probe: str) -> tuple[str, int]:
    """(path, port number) of an httpGet probe, a named port resolved."""
    action = container[probe]["httpGet"]
    port = action["port"]
    if isinstance(port, str):
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return action["path"], int(port)


def container_env(container: dict[str, Any], secret: dict[str, str]) -> dict[str, str]:
    """The container's environment as kubelet builds it: secretKeyRef values, then $(VAR)
    references to variables defined earlier in the list."""
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


def redis_conf() -> dict[str, str]:
    """deploy/redis/redis.conf's directives (the last occurrence wins, as in Redis)."""
    settings = {}
    for line in (REDIS_FILES / "redis.conf").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.strip().partition(" ")
            settings[name.lower()] = value.strip()
    return settings


def test_the_manifests_pass_kubernetes_validate_strict(tmp_path: Path) -> None:
    files = [p for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml"]
    builds = {"renderer": render(K8S / "example"), "renderer-base": render(K8S / "base")}
    if shutil.which("kubectl"):
        builds["kubectl"] = kubectl_build(K8S / "example")
    for name, resources in builds.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(resources))
        files.append(path)
    expected = sum(len(_documents(p)) for p in files)
    result = run_tool(tool("kubernetes-validate"), "--strict", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.findall(r"passed for resource .* against version (\S+)", result.stdout)
    assert len(passed) == expected, result.stdout
    assert len(set(passed)) == 1  # the tool's default, i.e. its newest Kubernetes version


def test_the_compose_file_passes_the_compose_spec() -> None:
    result = run_tool(
        tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_strict() -> None:
    result = run_tool(
        tool("yamllint"), "--strict", "-c", ".yamllint.yml", "deploy", COMPOSE.name, ".yamllint.yml"
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------- pod shape


def test_the_publisher_mounts_the_configmap_whole_and_read_only(pod: Pod) -> None:
    publisher = pod.container("publisher")
    command = publisher["command"] + publisher.get("args", [])
    assert command[:2] == ["hotreload", "watch"]
    mount_path = command[2]
    mount, volume = pod.mount("publisher", mount_path)
    assert mount["readOnly"] is True
    assert "subPath" not in mount
    assert "subPathExpr" not in mount
    configmap = pod.configmap(volume["configMap"]["name"])
    assert "items" not in volume["configMap"]  # every key becomes a file
    # the example overlay's ConfigMap: the files of deploy/example/config, with a stable name
    assert configmap["metadata"]["name"] == "hotreload-config"
    files = {path.name: path.read_text() for path in (EXAMPLE / "config").iterdir()}
    assert configmap["data"] == files, "list every file of deploy/example/config in its component"
    yaml.safe_load(configmap["data"]["rate_limits.yaml"])
    json.loads(configmap["data"]["flags.json"])
    # no container mounts anything with subPath: such a mount never sees an update
    for container in pod.containers():
        for item in container.get("volumeMounts", []):
            assert not {"subPath", "subPathExpr"} & set(item), container["name"]
    # the app reads the same volume for its fallback file
    app_env = container_env(pod.container("app"), SECRET)
    app_mount, app_volume = pod.mount("app", app_env["HOTRELOAD_CONFIG_DIR"])
    assert app_volume == volume
    assert app_mount["readOnly"] is True


def test_the_configmap_keeps_its_name_so_updates_reach_running_pods() -> None:
    generators = [
        g
        for directory in (K8S / "example", EXAMPLE)
        for g in _kustomization(directory).get("configMapGenerator", [])
        if g["name"] == "hotreload-config"
    ]
    assert generators
    assert all(g["options"]["disableNameSuffixHash"] is True for g in generators)


def test_redis_serves_only_the_socket_with_the_acl_users_from_the_secret(pod: Pod) -> None:
    conf = redis_conf()
    assert conf["port"] == "0"
    socket_path = conf["unixsocket"]
    redis_c = pod.container("redis")
    assert "ports" not in redis_c
    for container in pod.containers():
        assert not any("hostPort" in p for p in container.get("ports", []))
    assert not pod.spec.get("hostNetwork")
    # its files come from the ConfigMap made of deploy/redis, the ACL from the Secret
    command = redis_c["command"] + redis_c.get("args", [])
    assert command[:2] == ["sh", "/etc/redis/entrypoint.sh"]
    _, files = pod.mount("redis", "/etc/redis")
    redis_files = pod.configmap(files["configMap"]["name"])["data"]
    for name in ("redis.conf", "entrypoint.sh", "gen-users-acl.sh"):
        assert redis_files[name] == (REDIS_FILES / name).read_text()
    env = container_env(redis_c, SECRET)
    generator = (REDIS_FILES / "gen-users-acl.sh").read_text()
    for user in ("publisher", "subscriber", "operator"):
        assert env[f"HOTRELOAD_{user.upper()}_PASSWORD"] == PASSWORDS[user]
        assert f"HOTRELOAD_{user.upper()}_PASSWORD" in generator
    secret_refs = [
        item["valueFrom"]["secretKeyRef"]
        for item in redis_c["env"]
        if "valueFrom" in item and "secretKeyRef" in item["valueFrom"]
    ]
    assert {ref["name"] for ref in secret_refs} == {SECRET_NAME}
    assert all("valueFrom" in item for item in redis_c["env"])  # no password inline
    # writable places on a read-only root: ACL file, AOF directory, socket directory
    for path in (str(Path(conf["aclfile"]).parent), conf["dir"], str(Path(socket_path).parent)):
        mount, volume = pod.mount("redis", path)
        assert "emptyDir" in volume, path
        assert not mount.get("readOnly"), path
    _, acl_volume = pod.mount("redis", str(Path(conf["aclfile"]).parent))
    assert acl_volume["emptyDir"]["medium"] == "Memory"  # never written to the node's disk
    # the publisher and the app share the socket's directory and use their own users
    socket_volume = pod.mount("redis", str(Path(socket_path).parent))[1]
    for name, user in (("publisher", "publisher"), ("app", "subscriber")):
        assert pod.mount(name, str(Path(socket_path).parent))[1] == socket_volume
        url = container_env(pod.container(name), SECRET)["HOTRELOAD_REDIS_URL"]
        assert url == f"unix://{user}:{PASSWORDS[user]}@{socket_path}"
    # the memory limit leaves room above maxmemory for the AOF rewrite's fork
    limit = redis_c["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    assert int(limit[:-2]) * MIB > _bytes(conf["maxmemory"]) * 1.5


def _bytes(value: str) -> int:
    found = re.fullmatch(r"(\d+)([a-z]*)", value.lower())
    assert found, f"not a Redis memory size: {value}"
    return int(found[1]) * {"": 1, "kb": 1024, "mb": MIB, "gb": 1024 * MIB}[found[2]]


def test_native_sidecars_start_redis_then_the_publisher_then_the_app(pod: Pod) -> None:
    init = pod.spec["initContainers"]
    assert [c["name"] for c in init] == ["redis", "publisher"]
    assert all(c["restartPolicy"] == "Always" for c in init)
    assert [c["name"] for c in pod.spec["containers"]] == ["app"]
    # each sidecar's startup probe gates the next container
    assert "exec" in pod.container("redis")["startupProbe"]
    assert probe_port(pod.container("publisher"), "startupProbe")[0] == "/readyz"


def test_probes_point_at_the_endpoints_the_code_serves(pod: Pod) -> None:
    publisher = pod.container("publisher")
    command = publisher["command"]
    metrics_port = int(command[command.index("--metrics-port") + 1])
    assert probe_port(publisher, "livenessProbe") == ("/healthz", metrics_port)
    assert probe_port(publisher, "readinessProbe") == ("/readyz", metrics_port)
    assert probe_port(publisher, "startupProbe") == ("/readyz", metrics_port)
    assert metrics_port == 9102
    assert any(p["containerPort"] == 9102 for p in publisher["ports"])
    app = pod.container("app")
    assert probe_port(app, "readinessProbe") == ("/readyz", 8000)
    assert probe_port(app, "livenessProbe") == ("/healthz", 8000)
    # the daemon's endpoint server answers exactly these paths (gunicorn's are proven below)
    server = EndpointServer(
        0, registry=CollectorRegistry(), healthy=lambda: (True, "ok"), ready=lambda: (True, "ok")
    )
    server.start()
    try:
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            path, _ = probe_port(publisher, probe)
            assert _get(f"http://127.0.0.1:{server.port}{path}")[0] == 200
        assert _get(f"http://127.0.0.1:{server.port}/nowhere")[0] == 404
    finally:
        server.stop()
    # the Service reaches the app's port
    (service,) = [r for r in pod.resources if r["kind"] == "Service"]
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in ("http", 8000)
    labels = pod.deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 -- local http
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def test_every_container_is_locked_down_and_has_resources(pod: Pod) -> None:
    assert pod.spec["securityContext"]["runAsNonRoot"] is True
    assert pod.spec["automountServiceAccountToken"] is False
    for container in pod.containers():
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True, container["name"]
        assert security["runAsUser"] > 0
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "add" not in security["capabilities"]
        assert security["seccompProfile"]["type"] == "RuntimeDefault"
        assert "privileged" not in security or security["privileged"] is False
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) >= {"cpu", "memory"}, container["name"]


def test_the_app_container_runs_gunicorn_with_a_multiprocess_metrics_directory(pod: Pod) -> None:
    app = pod.container("app")
    env = container_env(app, SECRET)
    _, volume = pod.mount("app", env["PROMETHEUS_MULTIPROC_DIR"])
    assert "emptyDir" in volume
    _, tmp = pod.mount("app", "/tmp")  # gunicorn's heartbeat files on a read-only root
    assert "emptyDir" in tmp
    assert "command" not in app  # the image's: gunicorn with the example's hooks
    for name in ("app", "publisher"):
        assert pod.container(name)["image"] == "hotreload:0.1.0"
    assert pod.deployment["spec"]["replicas"] == 2


def test_the_readme_creates_the_secret_the_pod_needs(pod: Pod) -> None:
    readme = (DEPLOY / "README.md").read_text()
    created = set(re.findall(r"--from-literal=([\w-]+)=", readme))
    needed = {
        item["valueFrom"]["secretKeyRef"]["key"]
        for container in pod.containers()
        for item in container.get("env", [])
        if "valueFrom" in item
    }
    assert created == needed == set(SECRET)
    assert f"create secret generic {SECRET_NAME}" in readme
    assert "kubectl apply -k deploy/k8s/example" in readme


# ---------------------------------------------------------------------------- compose


def test_compose_runs_the_same_three_containers() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"redis", "publisher", "app"}
    redis_s = services["redis"]
    assert "ports" not in redis_s
    assert redis_s["entrypoint"] == ["sh", "/etc/redis/entrypoint.sh"]
    assert "./deploy/redis:/etc/redis:ro" in redis_s["volumes"]
    socket_dir = str(Path(redis_conf()["unixsocket"]).parent)
    for service in services.values():
        assert f"redis-socket:{socket_dir}" in service["volumes"]
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
    # the publisher watches the directory (not a file: a file bind mount pins the inode)
    publisher = services["publisher"]
    assert publisher["command"][:3] == ["hotreload", "watch", "/etc/hotreload/config"]
    assert "./deploy/example/config:/etc/hotreload/config:ro" in publisher["volumes"]
    app = services["app"]
    assert app["environment"]["WEB_CONCURRENCY"] == "4"
    assert app["depends_on"]["publisher"]["condition"] == "service_healthy"
    assert publisher["depends_on"]["redis"]["condition"] == "service_healthy"
    for name, user in (("publisher", "publisher"), ("app", "subscriber")):
        url = services[name]["environment"]["HOTRELOAD_REDIS_URL"]
        assert re.fullmatch(rf"unix://{user}:\$\{{\w+:-[\w-]+\}}@{socket_dir}/redis.sock", url)


def test_the_compose_default_passwords_make_a_valid_acl_file(tmp_path: Path) -> None:
    redis_env = yaml.safe_load(COMPOSE.read_text())["services"]["redis"]["environment"]
    env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", v) for k, v in redis_env.items()}
    result = generate_acl(tmp_path / "users.acl", env)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------- Redis for real


def generate_acl(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(REDIS_FILES / "gen-users-acl.sh"), str(path)],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


def password_env() -> dict[str, str]:
    return {f"HOTRELOAD_{user.upper()}_PASSWORD": value for user, value in PASSWORDS.items()}


class DeployedRedis(RedisServer):
    """redis-server running deploy/redis/redis.conf, only its four paths moved into a temp
    directory, with the ACL file gen-users-acl.sh writes (plus the tests' admin user)."""

    PATHS = ("dir", "unixsocket", "aclfile", "logfile")

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.acl_path = self.directory / "users.acl"
        self.conf_path = self.directory / "redis.conf"
        moved = {
            "dir": str(self.directory),
            "unixsocket": self.socket_path,
            "aclfile": str(self.acl_path),
            "logfile": str(self.log_path),
        }
        lines = []
        for line in (REDIS_FILES / "redis.conf").read_text().splitlines():
            name = line.split(" ", 1)[0].lower()
            lines.append(f"{name} {moved.pop(name)}" if name in moved else line)
        assert not moved, f"redis.conf sets no {sorted(moved)}"
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _args(self) -> list[str]:
        return [self.executable, str(self.conf_path)]

    @property
    def url(self) -> str:  # what wait_ready() connects with: the default user is off
        return self.url_for("publisher")

    def url_for(self, user: str, password: str | None = None) -> str:
        return f"unix://{user}:{password or PASSWORDS[user]}@{self.socket_path}"


@pytest.fixture
def deployed_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployedRedis]:
    server = DeployedRedis(tmp_path_factory.mktemp("acl"))
    result = generate_acl(server.acl_path, password_env())
    assert result.returncode == 0, result.stderr
    with server.acl_path.open("a") as fh:
        fh.write(f"user {ADMIN[0]} on >{ADMIN[1]} ~* &* +@all\n")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def admin(deployed_redis: DeployedRedis) -> Iterator[redis.Redis]:
    client = connect(deployed_redis.url_for(*ADMIN), socket_timeout=5)
    yield client
    client.close()


def assert_no_acl_denials(admin: redis.Redis) -> None:
    denials = [(e["username"], e["reason"], e["object"]) for e in cast(list[Any], admin.acl_log())]
    assert denials == []


def test_the_generated_acl_file(tmp_path: Path) -> None:
    path = tmp_path / "users.acl"
    result = generate_acl(path, password_env())
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    assert [line.split()[1] for line in text.splitlines()] == [
        "default",
        "publisher",
        "subscriber",
        "operator",
    ]
    assert text.splitlines()[0].split()[2:] == ["reset", "off"]
    for password in PASSWORDS.values():
        assert password not in text  # hashed (#<sha256>) only
    # without the optional operator password there is no operator user
    env = password_env()
    del env["HOTRELOAD_OPERATOR_PASSWORD"]
    assert generate_acl(path, env).returncode == 0
    assert "operator" not in path.read_text()
    # passwords from files (docker secrets), a trailing newline ignored: the same users
    files = {}
    for name, value in password_env().items():
        (tmp_path / name).write_text(value + "\n")
        files[f"{name}_FILE"] = str(tmp_path / name)
    assert generate_acl(path, files).returncode == 0
    assert path.read_text() == text
    # another key prefix (hotreload watch --prefix) moves every key pattern
    assert generate_acl(path, {**password_env(), "HOTRELOAD_PREFIX": "shop"}).returncode == 0
    assert path.read_text() == text.replace("~hotreload:", "~shop:")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"HOTRELOAD_SUBSCRIBER_PASSWORD": ""}, "is not set"),
        ({"HOTRELOAD_PUBLISHER_PASSWORD": "short"}, "shorter than 16"),
        ({"HOTRELOAD_PUBLISHER_PASSWORD": "has@an:url/char-0123456789"}, "may only contain"),
        ({"HOTRELOAD_OPERATOR_PASSWORD": "with space 0123456789"}, "may only contain"),
        ({"HOTRELOAD_SUBSCRIBER_PASSWORD": PASSWORDS["publisher"]}, "must differ"),
        ({"HOTRELOAD_PREFIX": "hot*"}, "HOTRELOAD_PREFIX"),
    ],
)
def test_the_acl_generator_refuses_bad_passwords(
    tmp_path: Path, change: dict[str, str], message: str
) -> None:
    path = tmp_path / "users.acl"
    result = generate_acl(path, {**password_env(), **change})
    assert result.returncode != 0
    assert message in result.stderr
    assert not list(tmp_path.iterdir())  # no file, not even a temporary one


def test_redis_runs_with_the_deployed_settings(
    deployed_redis: DeployedRedis, admin: redis.Redis
) -> None:
    def config(name: str) -> str:
        value = cast(dict[str, str], admin.config_get(name))[name]
        return value.decode() if isinstance(value, bytes) else str(value)

    assert config("port") == "0"
    assert config("maxmemory-policy") == "noeviction"
    assert config("appendonly") == "yes"
    assert config("appendfsync") == "everysec"
    assert config("unixsocketperm") == "660"
    # sized for the history: 100 versions of up to 1 MiB (a whole ConfigMap) at 1.25 MiB each
    assert int(config("maxmemory")) >= 100 * MIB * 1.25
    # noeviction keeps the config: at the limit writes are refused, nothing is evicted
    publisher = connect(deployed_redis.url_for("publisher"), socket_timeout=5)
    try:
        from publisher.publish import Publisher

        Publisher(publisher).publish("app.yaml", b"a: 1\n")
        admin.config_set("maxmemory", "1")
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            Publisher(publisher).publish("app.yaml", b"a: 2\n" * 1000)
        assert admin.xlen(stream_keys("app.yaml").events) == 1
    finally:
        publisher.close()


@pytest.mark.parametrize(
    "attempt",
    ["no credentials", "default user", "password only", "wrong password", "another user's"],
)
def test_the_default_user_and_wrong_passwords_are_refused(
    deployed_redis: DeployedRedis, attempt: str
) -> None:
    socket_path = deployed_redis.socket_path
    url = {
        "no credentials": f"unix://{socket_path}",
        "default user": f"unix://default:anything-0123456789@{socket_path}",
        "password only": f"unix://:{PASSWORDS['publisher']}@{socket_path}",
        "wrong password": deployed_redis.url_for("subscriber", "not-the-password-0123"),
        "another user's": deployed_redis.url_for("subscriber", PASSWORDS["publisher"]),
    }[attempt]
    client = connect(url, socket_timeout=5)
    try:
        with pytest.raises(redis.AuthenticationError):
            client.ping()
    finally:
        client.close()


def test_credentials_in_a_unix_url_reach_redis(deployed_redis: DeployedRedis) -> None:
    client = connect(deployed_redis.url_for("operator"), socket_timeout=5)
    try:
        options = client.connection_pool.connection_kwargs
        assert (options["username"], options["password"]) == ("operator", PASSWORDS["operator"])
        assert options["path"] == deployed_redis.socket_path
        assert client.ping() is True
    finally:
        client.close()


def test_the_publisher_and_subscribers_work_under_their_users(
    deployed_redis: DeployedRedis,
    admin: redis.Redis,
    kubelet_mount: KubeletMount,
    capsys: pytest.CaptureFixture[str],
) -> None:
    kubelet_mount.write({"rate_limits.yaml": b"limit: 1\n", "flags.json": b'{"a": true}'})
    metrics_port = free_port()
    daemon = Daemon(
        [kubelet_mount.directory],
        redis_url=deployed_redis.url_for("publisher"),
        metrics_port=metrics_port,  # also runs the ack follower
        check_interval=0.2,
    )
    thread = threading.Thread(target=daemon.run, name="test-daemon", daemon=True)
    thread.start()
    try:
        wait_until(lambda: daemon.ready()[0])
        # its ack follower follows :acks from "now" on: let it block in XREAD first
        wait_until(
            lambda: any(
                c["user"] == "publisher" and c["cmd"] == "xread" and "b" in c["flags"]
                for c in admin.client_list()
            )
        )
        applied: list[str] = []
        with Subscriber(
            "rate_limits.yaml",
            applied.append,
            redis_url=deployed_redis.url_for("subscriber"),
            heartbeat_interval=0.5,
            metrics=False,
        ) as sub:
            assert applied == ["limit: 1\n"]
            assert sub.version == 1
            admin.script_flush()  # the next publish has to SCRIPT LOAD again
            kubelet_mount.set("rate_limits.yaml", b"limit: 2\n")
            wait_until(lambda: sub.version == 2)
            assert applied == ["limit: 1\n", "limit: 2\n"]
            for user, argv in (
                ("operator", ["wait", "rate_limits.yaml", "--version", "2", "--timeout", "10"]),
                ("publisher", ["wait", "rate_limits.yaml", "--timeout", "10"]),
                ("publisher", ["status"]),  # every key: SCAN
                ("operator", ["status", "--json"]),
                ("operator", ["history", "rate_limits.yaml"]),
                ("operator", ["diff", "rate_limits.yaml", "1"]),
            ):
                assert hotreload([*argv, "--redis", deployed_redis.url_for(user)]) == 0, argv
            # the daemon's ack follower (XREAD on :acks from "now" on) counted the v2 ack
            # the daemon's ack follower read both acks (XREAD on :acks) under its user
            wait_until(lambda: _propagation_count(metrics_port, "rate_limits.yaml") == 2)
        worker = cast(dict[bytes, bytes], admin.hgetall(stream_keys("rate_limits.yaml").workers))
        (state,) = worker.values()
        assert b'"stopped"' in state  # recorded by stop(), under the subscriber user
        # the asyncio transport issues the same commands
        assert asyncio.run(_async_subscriber_version(deployed_redis.url_for("subscriber"))) == 2
        acks = cast(list[Any], admin.xrange(stream_keys("rate_limits.yaml").acks))
        reported = {(fields[b"version"], fields[b"status"]) for _, fields in acks}
        assert reported >= {(b"1", b"applied"), (b"2", b"applied")}, acks
    finally:
        daemon.request_stop()
        thread.join(10)
    capsys.readouterr()
    assert not thread.is_alive()
    assert_no_acl_denials(admin)


async def _async_subscriber_version(url: str) -> int:
    applied: list[str] = []
    async with AsyncSubscriber(
        "rate_limits.yaml", applied.append, redis_url=url, worker_id="async:1", metrics=False
    ) as sub:
        assert applied == ["limit: 2\n"]
        return sub.version


def test_the_subscriber_user_cannot_write_events_or_destroy_anything(
    deployed_redis: DeployedRedis, admin: redis.Redis
) -> None:
    keys = stream_keys("rate_limits.yaml")
    entry = cast(bytes, admin.xadd(keys.events, {"version": "1"})).decode()
    admin.xadd(keys.acks, {"status": "applied"})
    admin.hset(keys.workers, "w", "{}")
    sha = admin.script_load("return 1")
    forbidden: dict[str, list[tuple[str, ...]]] = {
        "subscriber": [
            ("XADD", keys.events, "*", "version", "99"),
            ("XADD", keys.events, "MAXLEN", "0", "*", "version", "99"),
            ("XTRIM", keys.events, "MAXLEN", "0"),
            ("XTRIM", keys.acks, "MAXLEN", "0"),
            ("XDEL", keys.events, entry),
            ("XDEL", keys.acks, entry),
            ("XSETID", keys.events, "9999999999999-0"),
            ("XGROUP", "CREATE", keys.events, "g", "$"),
            ("DEL", keys.events),
            ("DEL", keys.acks),
            ("DEL", keys.workers),
            ("UNLINK", keys.events),
            ("HDEL", keys.workers, "w"),
            ("EXPIRE", keys.events, "1"),
            ("RENAME", keys.events, "elsewhere"),
            ("RESTORE", keys.events, "0", "x", "REPLACE"),
            ("HSET", keys.events, "f", "v"),
            ("SET", "other", "v"),
            ("EVAL", "return 1", "0"),
            ("EVALSHA", sha, "0"),
            ("SCRIPT", "LOAD", "return 1"),
            ("FUNCTION", "FLUSH"),
            ("FLUSHALL",),
            ("FLUSHDB",),
            ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
            ("ACL", "SETUSER", "subscriber", "+@all"),
            ("KEYS", "*"),
            ("SHUTDOWN", "NOSAVE"),
            ("PUBLISH", "channel", "x"),
        ],
        "operator": [
            ("XADD", keys.events, "*", "version", "99"),
            ("XADD", keys.acks, "*", "status", "x"),
            ("HSET", keys.workers, "w", "x"),
            ("DEL", keys.events),
            ("FLUSHALL",),
            ("EVALSHA", sha, "1", keys.events),
        ],
        "publisher": [
            ("XADD", keys.acks, "*", "status", "x"),
            ("HSET", keys.workers, "w", "x"),
            ("XTRIM", keys.events, "MAXLEN", "0"),
            ("XDEL", keys.events, entry),
            ("DEL", keys.events),
            ("EVAL", "return 1", "0"),
            ("FLUSHALL",),
            ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
        ],
    }
    allowed = []
    for user, commands in forbidden.items():
        client = connect(deployed_redis.url_for(user), socket_timeout=5)
        try:
            for command in commands:
                execute: Callable[..., Any] = client.execute_command
                try:
                    execute(*command)
                except redis.exceptions.NoPermissionError:
                    continue
                allowed.append((user, command))
        finally:
            client.close()
    assert allowed == []
    # nothing changed; and what the subscriber may do, it can
    assert admin.xlen(keys.events) == 1
    assert admin.xlen(keys.acks) == 1
    assert admin.hgetall(keys.workers) == {b"w": b"{}"}
    assert admin.dbsize() == 3
    subscriber = connect(deployed_redis.url_for("subscriber"), socket_timeout=5)
    try:
        assert len(cast(list[Any], subscriber.xrevrange(keys.events, count=1))) == 1
        subscriber.xadd(keys.acks, {"status": "applied"}, maxlen=1000, approximate=True)
        subscriber.hset(keys.workers, "w2", "{}")
    finally:
        subscriber.close()


def test_the_redis_probe_says_pong_only_with_the_right_password(
    deployed_redis: DeployedRedis,
) -> None:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not installed")
    redis_c = Pod(render(K8S / "example")).container("redis")
    socket_path = redis_conf()["unixsocket"]
    for probe in ("startupProbe", "livenessProbe"):
        command = [
            part.replace(socket_path, deployed_redis.socket_path)
            for part in redis_c[probe]["exec"]["command"]
        ]
        for secret, code in ((SECRET, 0), ({**SECRET, "publisher-password": "x" * 20}, 1)):
            env = {"PATH": os.environ["PATH"], **container_env(redis_c, secret)}
            probe_run = subprocess.run(
                command, env=env, capture_output=True, timeout=10, check=False
            )
            assert probe_run.returncode == code, (probe, secret, probe_run)


def test_the_example_pod_under_gunicorn_with_the_manifest_environment(
    deployed_redis: DeployedRedis,
    admin: redis.Redis,
    kubelet_mount: KubeletMount,
    processes: Processes,
    tmp_path: Path,
) -> None:
    """The publisher and the app as the Deployment runs them (their env, users, probes) with
    the example app under gunicorn: both workers follow a kubelet-style ConfigMap update."""
    pod = Pod(render(K8S / "example"))
    socket_path = redis_conf()["unixsocket"]
    config = pod.configmap("hotreload-config")["data"]
    kubelet_mount.write({key: value.encode() for key, value in config.items()})

    def env_of(name: str) -> dict[str, str]:
        env = container_env(pod.container(name), SECRET)
        env["HOTRELOAD_REDIS_URL"] = env["HOTRELOAD_REDIS_URL"].replace(
            socket_path, deployed_redis.socket_path
        )
        return env

    publisher = pod.container("publisher")
    command = list(publisher["command"])
    command[command.index("--metrics-port") + 1] = str(metrics_port := free_port())
    command[2] = str(kubelet_mount.directory)
    with (tmp_path / "publisher.log").open("wb") as log:
        processes.python("-m", "publisher", *command[1:], env=env_of("publisher"), stdout=log)
    path, _ = probe_port(publisher, "startupProbe")
    wait_until(lambda: _get_or_none(f"http://127.0.0.1:{metrics_port}{path}") == 200)

    app_env = env_of("app")
    app_env["HOTRELOAD_CONFIG_DIR"] = str(kubelet_mount.directory)
    app_env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "prometheus")
    (tmp_path / "prometheus").mkdir()
    app_port = free_port()
    with (tmp_path / "app.log").open("wb") as app_log:
        processes.python(
            "-m", "gunicorn", "-c", str(EXAMPLE / "gunicorn.conf.py"), "--chdir", str(EXAMPLE),
            "--bind", f"127.0.0.1:{app_port}", "--workers", "2", "app:app",
            env=app_env, cwd=str(EXAMPLE), stdout=app_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    app = pod.container("app")
    ready, _ = probe_port(app, "readinessProbe")
    live, _ = probe_port(app, "livenessProbe")
    wait_until(lambda: _get_or_none(f"http://127.0.0.1:{app_port}{ready}") == 200, timeout=30)
    assert _get(f"http://127.0.0.1:{app_port}{live}")[0] == 200
    workers_key = stream_keys("rate_limits.yaml").workers
    wait_until(lambda: admin.hlen(workers_key) == 2, timeout=30)  # both workers booted

    new_limits = config["rate_limits.yaml"].replace("burst: 100", "burst: 150")
    assert new_limits != config["rate_limits.yaml"]
    kubelet_mount.set("rate_limits.yaml", new_limits.encode())
    operator = deployed_redis.url_for("operator")
    wait_until(lambda: hotreload(["history", "rate_limits.yaml", "--redis", operator]) == 0)
    waited = hotreload(
        ["wait", "rate_limits.yaml", "--version", "2", "--timeout", "20", "--redis", operator]
    )
    assert waited == 0, (tmp_path / "app.log").read_text()
    body = json.loads(_get(f"http://127.0.0.1:{app_port}/")[1])
    assert body["versions"]["rate_limits.yaml"] == 2
    assert body["rate_limits"]["default"]["burst"] == 150
    processes.stop_all()
    assert_no_acl_denials(admin)


def _propagation_count(port: int, key: str) -> float:
    metrics = _get(f"http://127.0.0.1:{port}/metrics")[1]
    found = re.search(rf'^hotreload_propagation_seconds_count{{key="{re.escape(key)}"}} (\S+)$',
                      metrics, re.MULTILINE)  # fmt: skip
    return float(found[1]) if found else 0.0


def _get_or_none(url: str) -> int | None:
    try:
        return _get(url)[0]
    except OSError:
        return None


# ---------------------------------------------------------------------------- Dockerfile


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions per stage: (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        assert stages, f"instruction before FROM: {line}"
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def test_the_dockerfile_builds_in_stages_into_a_slim_non_root_image() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    builder, final = stages[0], stages[-1]
    assert re.fullmatch(r"python:3\.1\d-slim AS builder", builder[0][1])
    assert re.fullmatch(r"python:3\.1\d-slim", final[0][1])
    build_runs = " ".join(args for name, args in builder if name == "RUN")
    assert "pip install '.[yaml]'" in build_runs
    assert "gunicorn" in build_runs
    users = [args for name, args in final if name == "USER"]
    assert users, "the final stage sets no USER: it would run as root"
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1])  # numeric: runAsNonRoot can verify it
    final_text = " ".join(args for _, args in final)
    for build_tool in ("gcc", "build-essential", "g++", "make ", "apt-get install", "pip install"):
        assert build_tool not in final_text, build_tool
    copies = [args for name, args in final if name == "COPY"]
    assert "--from=builder /opt/venv /opt/venv" in copies
    assert "deploy/example/ /app/" in copies
    assert ("WORKDIR", "/app") in final
    (cmd,) = [args for name, args in final if name == "CMD"]
    assert "exec gunicorn -c /app/gunicorn.conf.py app:app" in cmd


def test_the_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        verdict = False
        for pattern in patterns:
            negated = pattern.startswith("!")
            body = pattern.lstrip("!").rstrip("/").removeprefix("**/")
            parts = path.split("/")
            prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
            if any(fnmatch(p, body) or fnmatch(p.rsplit("/", 1)[-1], body) for p in prefixes):
                verdict = not negated
        return verdict

    sources = []
    for stage in dockerfile_stages():
        for name, args in stage:
            if name == "COPY" and not args.startswith("--from"):
                sources += args.split()[:-1]
    assert sources
    for source in sources:
        pattern = source.rstrip("/") + ("/**/*" if source.endswith("/") else "")
        for path in sorted(REPO.glob(pattern)):
            if path.is_file() and "__pycache__" not in path.parts:
                assert not ignored(str(path.relative_to(REPO))), path
    for unwanted in (".venv/bin/python", ".git/config", "tests/conftest.py", "deploy/k8s"):
        assert ignored(unwanted), unwanted
