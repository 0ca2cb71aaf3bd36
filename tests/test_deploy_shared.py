"""The shared-Redis variant of deploy/: the app without a Redis sidecar (deploy/k8s/shared) and
the Redis Cluster it uses (deploy/redis-cluster), validated offline like tests/test_deploy.py.

- every manifest, raw and as built by kustomize (the renderer of tests/test_deploy.py and
  ``kubectl kustomize`` where installed), passes ``kubernetes-validate --strict``;
  ``yamllint --strict``;
- the rendered shapes: the app pod has no Redis sidecar and takes its Redis URL from a Secret,
  never from a ConfigMap; 6 Redis nodes with hostname endpoints on a headless Service,
  persistence on PVCs, the ACL from the Secret, a PodDisruptionBudget, anti-affinity, every
  container locked down; the create Job addresses exactly the StatefulSet's pods;
- a real Redis Cluster of 6 ``redis-server`` processes on loopback, each running
  ``deploy/redis-cluster/redis.conf`` (only paths, port and bind moved) with the users that
  ``gen-users-acl.sh --cluster`` writes and the node settings that ``entrypoint.sh`` writes,
  created by the create Job's own script: the real publisher daemon, subscribers and CLI work
  under their users with no ACL denial on any node, each user is refused what it must not do,
  replicas follow their masters with the replication user also after a failover, and the
  nodes find each other again after every one of them restarted with a new IP
  (``refresh-nodes-conf.sh``).

Not ``subscriber.testing.RedisCluster``: it runs its own settings with the default user on,
while these tests run the shipped file with the default user off.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from publisher._admin import connect_any
from publisher.ackwatch import AckCache
from publisher.cli import main as hotreload
from publisher.daemon import Daemon
from subscriber import AsyncSubscriber, Subscriber
from subscriber.keys import stream_keys
from subscriber.testing import free_port
from tests.conftest import KubeletMount
from tests.helpers import wait_until
from tests.test_deploy import kubectl_build, render, run_tool, tool

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
SHARED = DEPLOY / "k8s" / "shared"
CLUSTER_FILES = DEPLOY / "redis-cluster"
GENERATOR = DEPLOY / "redis" / "gen-users-acl.sh"
MIB = 1024 * 1024

USERS_SECRET = "hotreload-redis-users"
URLS_SECRET = "hotreload-redis-urls"
PASSWORDS = {
    "publisher": "publisher-test-0123456789",
    "subscriber": "subscriber-test-0123456789",
    "operator": "operator-test-0123456789",
    "replication": "replication-test-0123456789",
    "admin": "admin-test-0123456789",
}
USERS = {f"{user}-password": value for user, value in PASSWORDS.items()}
# Appended to the generated ACL file by these tests only: it reads ACL LOG, INFO, roles.
TEST_ADMIN = ("test-admin", "test-admin-0123456789")

Resource = dict[str, Any]


def password_env() -> dict[str, str]:
    return {f"HOTRELOAD_{user.upper()}_PASSWORD": value for user, value in PASSWORDS.items()}


def generate_acl(path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(GENERATOR), *args, str(path)],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


def conf_directives(path: Path) -> dict[str, str]:
    """A redis.conf's directives (the last occurrence wins, as in Redis)."""
    settings = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.strip().partition(" ")
            settings[name.lower()] = value.strip()
    return settings


def _bytes(value: str) -> int:
    found = re.fullmatch(r"(\d+)([a-z]*)", value.lower())
    assert found, f"not a Redis memory size: {value}"
    return int(found[1]) * {"": 1, "kb": 1024, "mb": MIB, "gb": 1024 * MIB}[found[2]]


# ---------------------------------------------------------------------------- manifests


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


def containers_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """env name -> (Secret, key) of every secretKeyRef."""
    refs = {}
    for item in container.get("env", []):
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            refs[item["name"]] = (ref["name"], ref["key"])
    return refs


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


@pytest.fixture(scope="module", params=["renderer", "kubectl"])
def shared(request: pytest.FixtureRequest) -> Shared:
    if request.param == "kubectl":
        return Shared(kubectl_build(SHARED))
    return Shared(render(SHARED))


def _manifest_files() -> list[Path]:
    return [
        path
        for directory in (SHARED, CLUSTER_FILES)
        for path in sorted(directory.rglob("*.yaml"))
        if path.name != "kustomization.yaml"
    ]


def test_the_shared_manifests_pass_kubernetes_validate_strict(tmp_path: Path) -> None:
    files = _manifest_files()
    builds = {
        "shared": render(SHARED),
        "app": render(SHARED / "app"),
        "redis-cluster": render(CLUSTER_FILES),
    }
    if shutil.which("kubectl"):
        builds["kubectl-shared"] = kubectl_build(SHARED)
        builds["kubectl-redis-cluster"] = kubectl_build(CLUSTER_FILES)
    for name, resources in builds.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(resources))
        files.append(path)
    expected = sum(len([d for d in yaml.safe_load_all(p.read_text()) if d]) for p in files)
    result = run_tool(tool("kubernetes-validate"), "--strict", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.findall(r"passed for resource .* against version (\S+)", result.stdout)
    assert len(passed) == expected, result.stdout
    assert len(set(passed)) == 1


def test_yamllint_strict_on_the_shared_variant() -> None:
    result = run_tool(
        tool("yamllint"), "--strict", "-c", ".yamllint.yml", str(SHARED), str(CLUSTER_FILES)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_app_pod_has_no_redis_and_takes_its_url_from_a_secret(shared: Shared) -> None:
    spec = shared.app_spec
    assert [c["name"] for c in spec["initContainers"]] == ["publisher"]
    assert spec["initContainers"][0]["restartPolicy"] == "Always"  # a native sidecar
    assert [c["name"] for c in spec["containers"]] == ["app"]
    assert {v["name"] for v in spec["volumes"]} == {"config", "prometheus", "tmp"}
    for container in containers_of(spec):
        assert "redis" not in container["image"]
        assert not any(
            m["mountPath"].startswith("/var/run/hotreload") for m in container["volumeMounts"]
        )
    # the URL (with the password) comes from the Secret, one user per container
    for name, key in (("publisher", "publisher-url"), ("app", "subscriber-url")):
        container = shared.app_container(name)
        assert secret_refs(container) == {"HOTRELOAD_REDIS_URL": (URLS_SECRET, key)}
        for item in container["env"]:
            assert "redis" not in str(item.get("value", "")).lower(), item
    # and never from a ConfigMap: no URL or password in any of them
    for configmap in shared.of_kind("ConfigMap"):
        text = yaml.safe_dump(configmap)
        assert not re.search(r"rediss?://", text), configmap["metadata"]["name"]
    for container in containers_of(spec):
        assert "envFrom" not in container
    # several pods share the one Redis; the app still reads the mount as its fallback
    assert shared.deployment["spec"]["replicas"] == 3
    publisher = shared.app_container("publisher")
    assert publisher["command"][:3] == ["hotreload", "watch", "/etc/hotreload/config"]
    (mount,) = [m for m in publisher["volumeMounts"] if m["name"] == "config"]
    assert mount["readOnly"] is True
    assert not {"subPath", "subPathExpr"} & set(mount)
    app = shared.app_container("app")
    app_env = {item["name"]: item.get("value") for item in app["env"]}
    assert app_env["HOTRELOAD_CONFIG_DIR"] == mount["mountPath"]
    for container in (publisher, app):
        assert container["image"] == "hotreload:0.1.0"


def test_a_redis_outage_neither_blocks_the_app_nor_takes_it_out_of_the_service(
    shared: Shared,
) -> None:
    publisher = shared.app_container("publisher")
    # the app starts once the watchers run (/healthz ignores Redis), not on the first publish
    assert publisher["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert publisher["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # a native sidecar's readiness counts for the pod's: /readyz would follow Redis
    assert "readinessProbe" not in publisher
    app = shared.app_container("app")
    assert app["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (service,) = [s for s in shared.of_kind("Service") if s["metadata"]["name"] == "hotreload-app"]
    labels = shared.deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_six_redis_nodes_announce_stable_hostnames(shared: Shared) -> None:
    sts = shared.statefulset["spec"]
    assert sts["replicas"] == 6
    assert sts["podManagementPolicy"] == "Parallel"
    conf = conf_directives(CLUSTER_FILES / "redis.conf")
    assert conf["cluster-enabled"] == "yes"
    assert conf["cluster-preferred-endpoint-type"] == "hostname"
    assert conf["port"] == "6379"
    # the headless Service gives each pod its name, also before it is ready
    headless = shared.one("Service", sts["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    pod_labels = sts["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= pod_labels.items()
    assert {p["port"] for p in headless["spec"]["ports"]} == {6379, 16379}
    # each node announces POD.SERVICE.NAMESPACE.svc (entrypoint.sh writes it into node.conf)
    pod = {"metadata.name": "hotreload-redis-4", "metadata.namespace": "ns"}
    env = env_values(shared.redis, pod)
    assert env["HOTRELOAD_NODE_HOSTNAME"] == f"hotreload-redis-4.{sts['serviceName']}.ns.svc"
    entrypoint = (CLUSTER_FILES / "entrypoint.sh").read_text()
    assert 'echo "cluster-announce-hostname $hostname"' in entrypoint
    assert "HOTRELOAD_NODE_HOSTNAME" in entrypoint
    assert conf["include"] == "/run/redis/node.conf"
    # clients' URLs name the client Service: any ready node, on the Redis port
    client = shared.one("Service", "hotreload-redis")
    assert "clusterIP" not in client["spec"]
    assert client["spec"]["selector"].items() <= pod_labels.items()
    assert [p["port"] for p in client["spec"]["ports"]] == [6379]
    ports = {p["name"]: p["containerPort"] for p in shared.redis["ports"]}
    assert ports == {"redis": 6379, "bus": 16379}
    # the create Job addresses exactly the StatefulSet's pods by those names
    (create,) = shared.job_spec["containers"]
    nodes = env_values(create, {})["NODES"].split()
    name = shared.statefulset["metadata"]["name"]
    assert nodes == [f"{name}-{i}.{sts['serviceName']}:6379" for i in range(6)]
    command = " ".join(create["command"])
    assert "--cluster create $NODES --cluster-replicas 1 --cluster-yes" in command
    assert "--user admin" in command
    assert secret_refs(create) == {"REDISCLI_AUTH": (USERS_SECRET, "admin-password")}


def test_redis_keeps_its_data_and_identity_on_pvcs(shared: Shared) -> None:
    conf = conf_directives(CLUSTER_FILES / "redis.conf")
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    (claim,) = shared.statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {m["mountPath"]: m for m in shared.redis["volumeMounts"]}
    assert mounts[conf["dir"]]["name"] == claim["metadata"]["name"]
    assert str(Path(conf["cluster-config-file"]).parent) == conf["dir"]
    # users.acl and node.conf (masterauth): memory-backed, writable
    run_dir = str(Path(conf["aclfile"]).parent)
    assert run_dir == str(Path(conf["include"]).parent)
    volumes = {v["name"]: v for v in shared.redis_spec["volumes"]}
    assert volumes[mounts[run_dir]["name"]]["emptyDir"]["medium"] == "Memory"
    assert not mounts[run_dir].get("readOnly")
    # the files: this directory's, plus the per-pod variant's ACL generator
    files = volumes[mounts["/etc/redis"]["name"]]["projected"]["sources"]
    served = {}
    for source in files:
        data = shared.configmap(
            re.sub(r"-[a-z0-9]{10}$", "", source["configMap"]["name"])
        )["data"]  # fmt: skip
        items = source["configMap"].get("items") or [{"key": k, "path": k} for k in data]
        served.update({item["path"]: data[item["key"]] for item in items})
    assert served == {
        "redis.conf": (CLUSTER_FILES / "redis.conf").read_text(),
        "entrypoint.sh": (CLUSTER_FILES / "entrypoint.sh").read_text(),
        "refresh-nodes-conf.sh": (CLUSTER_FILES / "refresh-nodes-conf.sh").read_text(),
        "gen-users-acl.sh": GENERATOR.read_text(),
    }
    assert shared.redis["command"] == ["sh", "/etc/redis/entrypoint.sh"]
    # the passwords come from the Secret, none inline
    refs = secret_refs(shared.redis)
    assert {secret for secret, _ in refs.values()} == {USERS_SECRET}
    assert {key for _, key in refs.values()} == set(USERS)
    for name in refs:
        assert name.removeprefix("HOTRELOAD_").removesuffix("_PASSWORD").lower() in PASSWORDS
    # the memory limit leaves room above maxmemory for the AOF rewrite's fork
    limit = shared.redis["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    assert int(limit[:-2]) * MIB > _bytes(conf["maxmemory"]) * 1.5


def test_disruptions_take_one_node_at_a_time_on_separate_machines(shared: Shared) -> None:
    labels = shared.statefulset["spec"]["template"]["metadata"]["labels"]
    (pdb,) = shared.of_kind("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    anti = shared.redis_spec["affinity"]["podAntiAffinity"]
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    # ready = the node sees the cluster ok (the PDB and rolling updates count on it)
    readiness = " ".join(shared.redis["readinessProbe"]["exec"]["command"])
    assert "cluster info" in readiness
    assert "cluster_state:ok" in readiness


def test_every_container_is_locked_down_and_has_resources(shared: Shared) -> None:
    for spec in shared.pod_specs():
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        assert not spec.get("hostNetwork")
        for container in containers_of(spec):
            security = container["securityContext"]
            assert security["runAsNonRoot"] is True, container["name"]
            assert security["runAsUser"] > 0
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert "add" not in security["capabilities"]
            assert security["seccompProfile"]["type"] == "RuntimeDefault"
            assert not security.get("privileged")
            assert not any("hostPort" in p for p in container.get("ports", []))
            for kind in ("requests", "limits"):
                assert set(container["resources"][kind]) >= {"cpu", "memory"}, container["name"]


def test_the_readme_creates_the_secrets_the_shared_variant_needs(shared: Shared) -> None:
    readme = (DEPLOY / "README.md").read_text()
    section = readme[readme.index("## Shared Redis / Redis Cluster") :]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    needed: dict[str, set[str]] = {}
    for spec in shared.pod_specs():
        for container in containers_of(spec):
            for secret, key in secret_refs(container).values():
                needed.setdefault(secret, set()).add(key)
    assert needed == {USERS_SECRET: set(USERS), URLS_SECRET: {"publisher-url", "subscriber-url"}}
    for secret, keys in needed.items():
        (command,) = re.findall(
            rf"kubectl create secret generic {secret}((?:\s*\\\n\s*--from-file=[\w-]+)+)", section
        )
        assert set(re.findall(r"--from-file=([\w-]+)", command)) == keys, secret
    assert "kubectl apply -k deploy/k8s/shared" in section
    assert "--from-literal" not in section


def test_every_script_is_valid_posix_sh() -> None:
    for script in [*sorted(CLUSTER_FILES.glob("*.sh")), *sorted((DEPLOY / "redis").glob("*.sh"))]:
        result = subprocess.run(
            ["sh", "-n", str(script)], capture_output=True, text=True, timeout=10, check=False
        )
        assert result.returncode == 0, (script, result.stderr)


def test_the_entrypoint_writes_users_and_node_settings_then_runs_redis(
    tmp_path: Path, shared: Shared
) -> None:
    """entrypoint.sh as the StatefulSet runs it (its env from the manifest), with its two
    directories moved into tmp_path and a redis-server that prints what it was given."""
    etc, run, data, fake = (tmp_path / name for name in ("etc", "run", "data", "bin"))
    for directory in (etc, run, data, fake):
        directory.mkdir()
    conf = conf_directives(CLUSTER_FILES / "redis.conf")
    for name in ("entrypoint.sh", "refresh-nodes-conf.sh", "redis.conf"):
        text = (CLUSTER_FILES / name).read_text()
        if name == "entrypoint.sh":
            for original, moved in ((str(Path(conf["aclfile"]).parent), run), (conf["dir"], data)):
                assert f"{original}/" in text
                text = text.replace(f"{original}/", f"{moved}/")
        (etc / name).write_text(text)
    shutil.copy(GENERATOR, etc / "gen-users-acl.sh")
    (fake / "redis-server").write_text('#!/bin/sh\necho "redis-server $*"\n')
    (fake / "redis-server").chmod(0o755)
    pod = {"metadata.name": "hotreload-redis-2", "metadata.namespace": "ns"}
    env = {"PATH": f"{fake}:{os.environ['PATH']}", **env_values(shared.redis, pod)}
    command = shared.redis["command"]
    assert command == ["sh", "/etc/redis/entrypoint.sh"]
    result = subprocess.run(
        ["sh", str(etc / "entrypoint.sh"), "--maxmemory", "64mb"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"redis-server {etc}/redis.conf --maxmemory 64mb\n"
    node_conf = run / Path(conf["include"]).name
    assert node_conf.read_text().splitlines() == [
        "cluster-announce-hostname hotreload-redis-2.hotreload-redis-nodes.ns.svc",
        "masteruser replication",
        f"masterauth {PASSWORDS['replication']}",
    ]
    users = (run / Path(conf["aclfile"]).name).read_text()
    assert [line.split()[1] for line in users.splitlines()] == [
        "default", "publisher", "subscriber", "operator", "replication", "admin",
    ]  # fmt: skip
    for written in (node_conf, run / Path(conf["aclfile"]).name):
        assert written.stat().st_mode & 0o777 == 0o600


# ---------------------------------------------------------------------------- ACL generator


def test_the_cluster_acl_adds_two_users_and_only_what_cluster_clients_send(tmp_path: Path) -> None:
    per_pod, cluster = tmp_path / "per-pod.acl", tmp_path / "cluster.acl"
    assert generate_acl(per_pod, password_env()).returncode == 0
    result = generate_acl(cluster, password_env(), "--cluster")
    assert result.returncode == 0, result.stderr
    assert cluster.stat().st_mode & 0o777 == 0o600

    def users(path: Path) -> dict[str, list[str]]:
        return {line.split()[1]: line.split()[2:] for line in path.read_text().splitlines()}

    pod_users, cluster_users = users(per_pod), users(cluster)
    assert list(pod_users) == ["default", "publisher", "subscriber", "operator"]
    assert list(cluster_users) == [*pod_users, "replication", "admin"]
    for password in PASSWORDS.values():
        assert password not in cluster.read_text()
    # the per-pod users stay as narrow as they were: no cluster client commands
    for name in ("publisher", "operator"):
        assert "+command" not in pod_users[name]
        assert "+cluster|slots" not in pod_users[name]
        extra = set(cluster_users[name]) - set(pod_users[name])
        assert {rule for rule in extra if not rule.startswith("#")} == {
            "+cluster|slots",
            "+command",
        }
    for name in ("default", "subscriber"):
        assert cluster_users[name] == pod_users[name]
    # the subscriber probes CLUSTER SLOTS on every connection, whichever Redis it talks to
    assert "+cluster|slots" in pod_users["subscriber"]
    # neither new user may touch a key
    for name in ("replication", "admin"):
        assert not [rule for rule in cluster_users[name] if "~" in rule or rule == "allkeys"]
    assert [r for r in cluster_users["replication"] if r.startswith("+")] == [
        "+psync",
        "+replconf",
        "+ping",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"HOTRELOAD_REPLICATION_PASSWORD": ""}, "HOTRELOAD_REPLICATION_PASSWORD"),
        ({"HOTRELOAD_ADMIN_PASSWORD": ""}, "HOTRELOAD_ADMIN_PASSWORD"),
        ({"HOTRELOAD_ADMIN_PASSWORD": "short"}, "shorter than 16"),
        ({"HOTRELOAD_ADMIN_PASSWORD": PASSWORDS["replication"]}, "must differ"),
        ({"HOTRELOAD_REPLICATION_PASSWORD": PASSWORDS["subscriber"]}, "must differ"),
        ({"HOTRELOAD_ADMIN_PASSWORD": PASSWORDS["operator"]}, "must differ"),
    ],
)
def test_the_cluster_acl_needs_its_own_passwords(
    tmp_path: Path, change: dict[str, str], message: str
) -> None:
    result = generate_acl(tmp_path / "users.acl", {**password_env(), **change}, "--cluster")
    assert result.returncode != 0
    assert message in result.stderr
    assert not list(tmp_path.iterdir())
    # the per-pod variant needs neither
    assert generate_acl(tmp_path / "users.acl", {**password_env(), **change}).returncode == 0


# ---------------------------------------------------------------------------- a real cluster

_BUS = 10000


def _free_pair(taken: set[int]) -> int:
    """A loopback port P whose cluster bus port P + 10000 is free too, below the ephemeral
    range (so no outgoing connection takes it meanwhile), never 6379."""
    for _ in range(1000):
        port = random.randrange(20000, 22700)
        if {port, port + _BUS} & (taken | {6379, 16379}):
            continue
        try:
            for candidate in (port, port + _BUS):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair")


class Node:
    def __init__(self, directory: Path, port: int, ip: str) -> None:
        self.directory = directory
        self.port = port
        self.ip = ip
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def url(self, user: str) -> str:
        password = TEST_ADMIN[1] if user == TEST_ADMIN[0] else PASSWORDS[user]
        return f"redis://{user}:{password}@{self.ip}:{self.port}/0"

    def client(self, user: str = TEST_ADMIN[0]) -> redis.Redis:
        password = TEST_ADMIN[1] if user == TEST_ADMIN[0] else PASSWORDS[user]
        return redis.Redis(
            host=self.ip,
            port=self.port,
            username=user,
            password=password,
            socket_timeout=5,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),  # a refusal fails at once, not after retries
            decode_responses=True,
        )

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as client:
            return cast(dict[str, Any], client.info(section))

    def cluster_info(self) -> dict[str, str]:
        with self.client() as client:
            text = cast(str, client.execute_command("CLUSTER", "INFO"))
        return dict(line.split(":", 1) for line in text.split() if ":" in line)


class ShippedCluster:
    """Six ``redis-server`` processes, each running deploy/redis-cluster/redis.conf with only
    its paths, port and bind address moved, the users ``gen-users-acl.sh --cluster`` writes
    (plus the tests' admin) and the node.conf ``entrypoint.sh`` writes; created by the create
    Job's own script. Every process is stopped by PID."""

    MOVED = ("port", "bind", "dir", "cluster-config-file", "aclfile", "include", "logfile")

    def __init__(self, directory: Path, job_script: str, *, ips: list[str] | None = None) -> None:
        self.directory = directory
        self.job_script = job_script
        self.hostnames = ["localhost"] * 6 if ips is None else [f"n{i}.test" for i in range(6)]
        taken: set[int] = set()
        self.nodes = []
        for index in range(6):
            port = _free_pair(taken)
            taken |= {port, port + _BUS}
            ip = "127.0.0.1" if ips is None else ips[index]
            self.nodes.append(Node(directory / f"node-{index}", port, ip))
        self.announce_ip = ips is not None  # the pods' own IP, as the bus would see it

    def _configure(self, index: int) -> None:
        node = self.nodes[index]
        node.directory.mkdir(parents=True, exist_ok=True)
        acl = node.directory / "users.acl"
        result = generate_acl(acl, password_env(), "--cluster")
        assert result.returncode == 0, result.stderr
        with acl.open("a") as fh:
            fh.write(f"user {TEST_ADMIN[0]} on >{TEST_ADMIN[1]} ~* &* +@all\n")
        # what entrypoint.sh writes (plus, for the new-IP test, the pod's own IP)
        node_conf = [
            f"cluster-announce-hostname {self.hostnames[index]}",
            "masteruser replication",
            f"masterauth {PASSWORDS['replication']}",
        ]
        if self.announce_ip:
            node_conf.append(f"cluster-announce-ip {node.ip}")
        (node.directory / "node.conf").write_text("\n".join(node_conf) + "\n")
        moved = {
            "port": str(node.port),
            "bind": node.ip,
            "dir": str(node.directory),
            "cluster-config-file": str(node.directory / "nodes.conf"),
            "aclfile": str(acl),
            "include": str(node.directory / "node.conf"),
            "logfile": str(node.directory / "redis.log"),
        }
        lines = []
        for line in (CLUSTER_FILES / "redis.conf").read_text().splitlines():
            name = line.split(" ", 1)[0].lower()
            lines.append(f"{name} {moved.pop(name)}" if name in moved else line)
        assert not moved, f"redis.conf sets no {sorted(moved)}"
        (node.directory / "redis.conf").write_text("\n".join(lines) + "\n")

    def start_nodes(self, nodes: list[Node] | None = None) -> None:
        for node in self.nodes if nodes is None else nodes:
            self._configure(self.nodes.index(node))
            node.process = subprocess.Popen(
                ["redis-server", str(node.directory / "redis.conf")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for node in self.nodes if nodes is None else nodes:
            wait_until(functools.partial(self._pong, node), f"{node.address} answers", timeout=15)

    def _pong(self, node: Node) -> bool:
        assert node.process is not None
        if node.process.poll() is not None:
            log = (node.directory / "redis.log").read_text(errors="replace")
            pytest.fail(f"redis-server {node.address} exited: {log[-2000:]}")
        try:
            with node.client() as client:
                return bool(client.ping())
        except (redis.RedisError, OSError):
            return False

    def create(self) -> subprocess.CompletedProcess[str]:
        """The create Job's script, with this cluster's nodes as NODES."""
        return subprocess.run(
            ["sh", "-c", self.job_script],
            env={
                "PATH": os.environ["PATH"],
                "REDISCLI_AUTH": PASSWORDS["admin"],
                "NODES": " ".join(node.address for node in self.nodes),
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def start(self) -> ShippedCluster:
        try:
            self.start_nodes()
            created = self.create()
            assert created.returncode == 0, created.stdout + created.stderr
            assert "All 16384 slots covered" in created.stdout
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM to every node first (so that an interruption while waiting leaves none
        behind), then wait; SIGKILL whatever is still there after the grace period."""
        running = [n.process for n in self.nodes if n.process and n.process.poll() is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGCONT)
                process.terminate()
        try:
            deadline = time.monotonic() + 15
            for process in running:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(max(0.1, deadline - time.monotonic()))
        finally:
            for process in running:
                if process.poll() is None:
                    process.kill()
                    process.wait(5)

    def problem(self) -> str | None:
        """Why the cluster is not settled yet: 3 masters with a replica each, all ok."""
        masters = 0
        for node in self.nodes:
            try:
                state = node.cluster_info()
                replication = node.info("replication")
            except (redis.RedisError, OSError) as exc:
                return f"{node.address}: {exc}"
            if state.get("cluster_state") != "ok" or state.get("cluster_known_nodes") != "6":
                return f"{node.address}: {state}"
            if replication["role"] == "master":
                masters += 1
                if replication["connected_slaves"] != 1:
                    return f"{node.address} has {replication['connected_slaves']} replicas"
            elif replication["master_link_status"] != "up":
                return f"{node.address}: replication link down"
        return None if masters == 3 else f"{masters} masters"

    def wait_ok(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (problem := self.problem()) is not None:
            if time.monotonic() > deadline:
                pytest.fail(f"the cluster did not settle: {problem}")
            time.sleep(0.1)

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def master_of(self, key: str) -> Node:
        with self.live()[0].client() as client:
            slot = int(cast(int, client.execute_command("CLUSTER", "KEYSLOT", key)))
        for node in self.live():
            with node.client() as client:
                replication = cast(dict[str, Any], client.info("replication"))
                if replication["role"] != "master":
                    continue
                lines = cast(str, client.execute_command("CLUSTER", "NODES")).splitlines()
            (me,) = [line.split() for line in lines if "myself" in line.split()[2]]
            for item in me[8:]:
                first, _, last = item.partition("-")
                if not item.startswith("[") and int(first) <= slot <= int(last or first):
                    return node
        raise AssertionError(f"no master serves slot {slot}")

    def reset_acl_logs(self) -> None:
        for node in self.live():
            with node.client() as client:
                client.acl_log_reset()

    def acl_denials(self) -> list[tuple[int, str, str, str]]:
        denials = []
        for node in self.live():
            with node.client() as client:
                for entry in cast(list[dict[str, Any]], client.acl_log()):
                    denials.append((node.port, entry["username"], entry["reason"], entry["object"]))
        return denials


def job_script() -> str:
    (container,) = Shared(render(SHARED)).job_spec["containers"]
    command = container["command"]
    assert command[:2] == ["sh", "-c"]
    return cast(str, command[2])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShippedCluster]:
    shipped = ShippedCluster(tmp_path_factory.mktemp("shipped-cluster"), job_script()).start()
    try:
        yield shipped
    finally:
        shipped.stop()


def test_the_create_job_makes_the_cluster_once_and_nodes_announce_hostnames(
    cluster: ShippedCluster,
) -> None:
    # created by the Job's script in the fixture; running it again changes nothing
    again = cluster.create()
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing to do" in again.stdout
    assert cluster.problem() is None
    # clients are sent to the announced hostnames, not to IPs
    with cluster.nodes[0].client("subscriber") as client:
        slots = cast(list[Any], client.execute_command("CLUSTER", "SLOTS"))
    assert len(slots) == 3
    for _first, _last, *nodes in slots:
        for node in nodes:
            assert node[0] == "localhost", node
    # the default user is off, with or without a password
    anonymous = redis.Redis(
        host="127.0.0.1", port=cluster.nodes[0].port, socket_timeout=5, retry=Retry(NoBackoff(), 0)
    )
    with anonymous:
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with pytest.raises(redis.AuthenticationError):
            anonymous.auth("anything-0123456789", username="default")


def test_publisher_subscribers_and_cli_work_under_their_users_without_denials(
    cluster: ShippedCluster, kubelet_mount: KubeletMount, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.reset_acl_logs()
    key = "rate_limits.yaml"
    keys = stream_keys(key)
    kubelet_mount.write({key: b"limit: 1\n", "flags.json": b'{"a": true}'})
    # every URL names some node, most often not the key's master: the clients find it
    master = cluster.master_of(keys.events)
    others = [node for node in cluster.nodes if node is not master]
    daemon = Daemon(
        [kubelet_mount.directory],
        redis_url=others[0].url("publisher"),
        metrics_port=free_port(),  # also runs the ack follower
        check_interval=0.2,
    )
    thread = threading.Thread(target=daemon.run, name="test-daemon", daemon=True)
    thread.start()
    try:
        wait_until(lambda: daemon.ready()[0], "initial publish", timeout=20)
        applied: list[str] = []
        with Subscriber(
            key,
            applied.append,
            redis_url=others[1].url("subscriber"),
            heartbeat_interval=0.5,
            metrics=False,
        ) as sub:
            assert applied == ["limit: 1\n"]
            kubelet_mount.set(key, b"limit: 2\n")
            wait_until(lambda: sub.version == 2, "v2 applied")
            for user, argv in (
                ("operator", ["wait", key, "--version", "2", "--timeout", "10"]),
                ("publisher", ["wait", key, "--timeout", "10"]),
                ("publisher", ["status"]),  # every key: SCAN on every master
                ("operator", ["status", "--json"]),
                ("operator", ["history", key]),
                ("operator", ["show", key, "2"]),
                ("operator", ["diff", key, "1"]),
            ):
                assert hotreload([*argv, "--redis", others[2].url(user)]) == 0, (user, argv)
            # the daemon's ack follower reads only what is new from its second status pass
            # on (MULTI, XLEN, XRANGE, EXEC): the same reads, twice, under the same user
            publisher = connect_any(others[3].url("publisher"), socket_timeout=5)
            try:
                cache = AckCache()
                first = cache.read(publisher, keys.acks)
                assert {ack.version for ack in first} == {1, 2}
                assert len(cache.read(publisher, keys.acks)) == len(first)
            finally:
                publisher.close()
        # the async transport issues the same commands; stop() recorded "stopped"
        assert asyncio.run(_async_version(others[4].url("subscriber"), key)) == 2
        with master.client() as admin:
            states = cast(dict[str, str], admin.hgetall(keys.workers))
        assert any('"stopped"' in state for state in states.values()), states
    finally:
        daemon.request_stop()
        thread.join(10)
    capsys.readouterr()
    assert not thread.is_alive()
    assert cluster.acl_denials() == []


async def _async_version(url: str, key: str) -> int:
    applied: list[str] = []
    async with AsyncSubscriber(
        key, applied.append, redis_url=url, worker_id="async:1", metrics=False
    ) as sub:
        assert applied == ["limit: 2\n"]
        return sub.version


def test_each_user_is_refused_what_it_must_not_do(cluster: ShippedCluster) -> None:
    keys = stream_keys("forbidden.yaml")
    master = cluster.master_of(keys.events)
    with master.client() as admin:
        entry = cast(str, admin.xadd(keys.events, {"version": "1"}))
        admin.xadd(keys.acks, {"status": "applied"})
        admin.hset(keys.workers, "w", "{}")
        sha = cast(str, admin.script_load("return 1"))
        node_id = cast(str, admin.execute_command("CLUSTER", "MYID"))
        before = cast(int, admin.dbsize())
    other = "hotreload:{forbidden.yaml}:other"  # same slot: refused by the ACL, not redirected
    forbidden: dict[str, list[tuple[str, ...]]] = {
        "subscriber": [
            ("XADD", keys.events, "*", "version", "99"),
            ("XADD", keys.events, "MAXLEN", "0", "*", "version", "99"),
            ("XTRIM", keys.events, "MAXLEN", "0"),
            ("XTRIM", keys.acks, "MAXLEN", "0"),
            ("XDEL", keys.events, entry),
            ("DEL", keys.events),
            ("DEL", keys.workers),
            ("HDEL", keys.workers, "w"),
            ("HSET", keys.events, "f", "v"),
            ("SET", other, "v"),
            ("EVAL", "return 1", "0"),
            ("EVALSHA", sha, "0"),
            ("SCRIPT", "LOAD", "return 1"),
            ("FLUSHALL",),
            ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
            ("ACL", "SETUSER", "subscriber", "+@all"),
            ("KEYS", "*"),
            ("SPUBLISH", "channel", "x"),
            ("CLUSTER", "FAILOVER"),
            ("CLUSTER", "RESET"),
            ("CLUSTER", "FORGET", node_id),
            ("CLUSTER", "NODES"),
            ("MIGRATE", "127.0.0.1", "1", keys.events, "0", "100"),
            ("SHUTDOWN", "NOSAVE"),
        ],
        "operator": [
            ("XADD", keys.events, "*", "version", "99"),
            ("XADD", keys.acks, "*", "status", "x"),
            ("HSET", keys.workers, "w", "x"),
            ("DEL", keys.events),
            ("EVALSHA", sha, "1", keys.events),
            ("FLUSHALL",),
            ("CLUSTER", "FAILOVER"),
            ("CLUSTER", "RESET"),
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
            ("CLUSTER", "FAILOVER"),
            ("CLUSTER", "RESET"),
        ],
        "replication": [
            ("XRANGE", keys.events, "-", "+"),
            ("XADD", keys.events, "*", "version", "99"),
            ("HGETALL", keys.workers),
            ("KEYS", "*"),
            ("SCAN", "0"),
            ("CLUSTER", "SLOTS"),
            ("CLUSTER", "FAILOVER"),
            ("FLUSHALL",),
            ("CONFIG", "GET", "masterauth"),
        ],
        "admin": [
            ("XRANGE", keys.events, "-", "+"),
            ("XREVRANGE", keys.events, "+", "-"),
            ("XADD", keys.events, "*", "version", "99"),
            ("HGETALL", keys.workers),
            ("DEL", keys.events),
            ("KEYS", "*"),
            ("SCAN", "0"),
            ("EVAL", "return 1", "0"),
            ("FLUSHALL",),
            ("CONFIG", "GET", "masterauth"),
            ("CONFIG", "SET", "maxmemory-policy", "allkeys-lru"),
            ("ACL", "LIST"),
            ("CLUSTER", "RESET"),
            ("CLUSTER", "DELSLOTS", "0"),
            ("CLUSTER", "SETSLOT", "0", "STABLE"),
            ("CLUSTER", "FLUSHSLOTS"),
            ("MIGRATE", "127.0.0.1", "1", keys.events, "0", "100"),
            ("SHUTDOWN", "NOSAVE"),
        ],
    }
    allowed = []
    for user, commands in forbidden.items():
        with master.client(user) as client:
            for command in commands:
                execute: Callable[..., Any] = client.execute_command
                try:
                    execute(*command)
                except redis.exceptions.NoPermissionError:
                    continue
                allowed.append((user, command))
    assert allowed == []
    with master.client() as admin:
        assert admin.xlen(keys.events) == 1
        assert admin.xlen(keys.acks) == 1
        assert admin.hgetall(keys.workers) == {"w": "{}"}
        assert admin.dbsize() == before
    assert cluster.problem() is None
    # what the admin user is for: the layout, and the readiness probe's question
    with master.client("admin") as admin_user:
        assert "cluster_state:ok" in cast(str, admin_user.execute_command("CLUSTER", "INFO"))
        assert cast(str, admin_user.execute_command("CLUSTER", "NODES")).count("\n") == 6


def test_a_manual_failover_by_the_admin_user_swaps_roles_with_replication_intact(
    cluster: ShippedCluster,
) -> None:
    """The replication user carries the sync both ways: the promoted replica's old master
    becomes its replica and logs in to it with masteruser/masterauth."""
    key = stream_keys("failover.yaml").events
    old_master = cluster.master_of(key)
    with old_master.client() as admin:
        admin.xadd(key, {"version": "1"})
        (replica_address,) = [
            f"{r['ip']}:{r['port']}"
            for name, r in cast(dict[str, Any], admin.info("replication")).items()
            if name.startswith("slave") and isinstance(r, dict)
        ]
    (replica,) = [node for node in cluster.nodes if node.address == replica_address]
    cluster.reset_acl_logs()
    with replica.client("admin") as admin_user:
        admin_user.execute_command("CLUSTER", "FAILOVER")
    wait_until(lambda: cluster.master_of(key) is replica, "the replica took over", timeout=20)
    cluster.wait_ok()
    assert old_master.info("replication")["master_port"] == replica.port
    with replica.client() as admin:
        assert admin.xlen(key) == 1
    assert cluster.acl_denials() == []


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_users_need_nothing_more_through_an_automatic_failover(
    cluster: ShippedCluster, kubelet_mount: KubeletMount, capsys: pytest.CaptureFixture[str]
) -> None:
    """A master killed: redis-py reloads the slot map, the daemon reconnects and re-seeds,
    workers reconnect to the promoted replica, the old master comes back as its replica (with
    the replication user). None of it needs a command the users do not have."""
    key = "failover-acl.yaml"
    kubelet_mount.write({key: b"v: 1\n"})
    master = cluster.master_of(stream_keys(key).events)
    others = [node for node in cluster.nodes if node is not master]
    daemon = Daemon(
        [kubelet_mount.directory], redis_url=others[0].url("publisher"), check_interval=0.2
    )
    thread = threading.Thread(target=daemon.run, name="test-daemon", daemon=True)
    thread.start()
    try:
        wait_until(lambda: daemon.ready()[0], "initial publish", timeout=20)
        with Subscriber(
            key, lambda _content: None, redis_url=others[1].url("subscriber"), metrics=False
        ) as sub:
            assert sub.version == 1
            cluster.reset_acl_logs()
            assert master.process is not None
            master.process.kill()
            master.process.wait(5)
            kubelet_mount.set(key, b"v: 2\n")  # published once the slot is served again
            wait_until(lambda: sub.version == 2, "v2 after the failover", timeout=45)
        cluster.start_nodes([master])
        cluster.wait_ok(timeout=45)
        assert master.info("replication")["role"] == "slave"
    finally:
        daemon.request_stop()
        thread.join(10)
    capsys.readouterr()
    assert cluster.acl_denials() == []


def test_a_node_that_lost_its_pvc_is_added_back_by_the_admin_user(cluster: ShippedCluster) -> None:
    """deploy/README.md's procedure for a pod that came back without its PVC (a new, empty
    node): the create Job refuses the half-formed cluster; the admin user forgets the old node
    id on the others and adds the new node as a replica, and the layout is whole again."""
    lost = next(n for n in cluster.nodes if n.info("replication")["role"] == "slave")
    with lost.client() as admin:
        old_id = cast(str, admin.execute_command("CLUSTER", "MYID"))
    assert lost.process is not None
    lost.process.kill()
    lost.process.wait(5)
    (lost.directory / "nodes.conf").unlink()
    shutil.rmtree(lost.directory / "appendonlydir", ignore_errors=True)
    cluster.start_nodes([lost])
    refused = cluster.create()
    assert refused.returncode == 1
    assert "add the 1 new node(s) by hand" in refused.stderr
    assert lost.cluster_info()["cluster_known_nodes"] == "1"  # left alone
    cluster.reset_acl_logs()
    for node in cluster.nodes:
        if node is not lost:
            with node.client("admin") as admin_user:
                admin_user.execute_command("CLUSTER", "FORGET", old_id)
    existing = next(node for node in cluster.nodes if node is not lost)
    added = subprocess.run(
        ["redis-cli", "--user", "admin", "--cluster", "add-node", lost.address, existing.address,
         "--cluster-slave"],
        env={"PATH": os.environ["PATH"], "REDISCLI_AUTH": PASSWORDS["admin"]},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert added.returncode == 0, added.stdout + added.stderr
    cluster.wait_ok()
    with existing.client() as admin:
        assert old_id not in cast(str, admin.execute_command("CLUSTER", "NODES"))
    assert cluster.acl_denials() == []


# ---------------------------------------------------------------------------- new pod IPs


def _loopback_aliases_work() -> bool:
    try:
        with socket.socket() as server:
            server.bind(("127.0.0.21", 0))
            server.listen()
            with socket.create_connection(server.getsockname(), timeout=1):
                return True
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_nodes_find_each_other_after_every_pod_got_a_new_ip(tmp_path: Path) -> None:
    """All six pods restarted at once (e.g. the StatefulSet scaled to 0 and back): each comes
    back with a new IP, and every IP recorded in every nodes.conf is stale. Without
    refresh-nodes-conf.sh the cluster never forms again (the bus knows no names); with it,
    each node's address is looked up by its announced hostname before Redis starts."""
    if not _loopback_aliases_work():
        pytest.skip("binding 127.0.0.x other than 127.0.0.1 is not possible here")
    first = [f"127.0.0.{11 + i}" for i in range(6)]
    shipped = ShippedCluster(tmp_path / "cluster", job_script(), ips=first).start()
    try:
        shipped.stop()
        # "DNS" for refresh-nodes-conf.sh: the pods' new IPs by their announced names
        hosts = tmp_path / "hosts"
        fake = tmp_path / "bin" / "getent"
        fake.parent.mkdir()
        fake.write_text(
            '#!/bin/sh\n[ "$1" = hosts ] || exit 2\n'
            f'awk -v n="$2" \'$2 == n {{ print $1 "  " $2; f = 1 }} END {{ exit !f }}\' {hosts}\n'
        )
        fake.chmod(0o755)
        for index, node in enumerate(shipped.nodes):
            node.ip = f"127.0.0.{21 + index}"
        hosts.write_text(
            "".join(
                f"{n.ip} {name}\n" for n, name in zip(shipped.nodes, shipped.hostnames, strict=True)
            )
        )
        for node in shipped.nodes:
            refresh = [
                str(CLUSTER_FILES / "refresh-nodes-conf.sh"),
                str(node.directory / "nodes.conf"),
            ]
            refreshed = subprocess.run(
                ["sh", *refresh, "5"],
                env={"PATH": f"{fake.parent}:{os.environ['PATH']}"},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert refreshed.returncode == 0, refreshed.stderr
            recorded = (node.directory / "nodes.conf").read_text()
            assert not [old for old in first if f"{old}:" in recorded]  # no stale IP left
            for other in shipped.nodes:
                assert f"{other.ip}:{other.port}@{other.port + _BUS}," in recorded
        shipped.start_nodes()
        shipped.wait_ok(timeout=45)
    finally:
        shipped.stop()
