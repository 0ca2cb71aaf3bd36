"""The shared-Redis variant (deploy/k8s/shared, deploy/redis-cluster) as built: the app pod
has no Redis sidecar and reads its user's password from a Secret's file, never from the
environment or a ConfigMap; 6 Redis
nodes with hostname endpoints on a headless Service, persistence on PVCs, the ACL from the
Secret, a PodDisruptionBudget, anti-affinity, every container locked down; the create Job
addresses exactly the StatefulSet's pods; entrypoint.sh writes what the nodes need.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.deploy.render import (
    CLUSTER_FILES,
    DEPLOY,
    GENERATOR,
    MIB,
    PASSWORDS,
    SECRET_MOUNT,
    USERS,
    USERS_SECRET,
    Shared,
    conf_directives,
    containers_of,
    env_values,
    memory_bytes,
    secret_files,
    secret_refs,
    write_secret_files,
)
from tests.deploy.render import moved as moved_paths


def test_the_app_pod_has_no_redis_and_reads_its_password_from_a_file(shared: Shared) -> None:
    spec = shared.app_spec
    assert [c["name"] for c in spec["initContainers"]] == ["publisher"]
    assert spec["initContainers"][0]["restartPolicy"] == "Always"  # a native sidecar
    assert [c["name"] for c in spec["containers"]] == ["app"]
    assert {v["name"] for v in spec["volumes"]} == {
        "config", "prometheus", "tmp", "publisher-password", "subscriber-password",
    }  # fmt: skip
    for container in containers_of(spec):
        assert "redis" not in container["image"]
        assert not any(
            m["mountPath"].startswith("/var/run/hotreload") for m in container["volumeMounts"]
        )
    # the URL names the client Service and the user; the password is the user's own key of
    # the Secret, a file only that container sees
    for name, user in (("publisher", "publisher"), ("app", "subscriber")):
        container = shared.app_container(name)
        assert secret_refs(container) == {}
        path = f"{SECRET_MOUNT}/{user}-password"
        assert secret_files(spec, container, USERS) == {path: PASSWORDS[user]}
        url = env_values(container, {})["HOTRELOAD_REDIS_URL"]
        assert url == f"redis://{user}@hotreload-redis:6379/0?password_file={path}"
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
    command = " ".join(" ".join(create["command"]).replace("\\\n", " ").split())
    assert "--cluster create $NODES --cluster-replicas 1 --cluster-yes" in command
    assert "--user admin --askpass" in command
    assert secret_refs(create) == {}
    path = env_values(create, {})["HOTRELOAD_ADMIN_PASSWORD_FILE"]
    assert secret_files(shared.job_spec, create, USERS) == {path: PASSWORDS["admin"]}


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
    # the passwords are the Secret's files, named by *_FILE variables; none in the env
    assert secret_refs(shared.redis) == {}
    env = env_values(shared.redis, {"metadata.name": "n", "metadata.namespace": "ns"})
    files = secret_files(shared.redis_spec, shared.redis, USERS)
    named = {name: env[name] for name in env if name.endswith("_PASSWORD_FILE")}
    assert set(named.values()) == set(files)
    for name, path in named.items():
        user = name.removeprefix("HOTRELOAD_").removesuffix("_PASSWORD_FILE").lower()
        assert files[path] == PASSWORDS[user]
    # the memory limit leaves room above maxmemory for the AOF rewrite's fork
    limit = shared.redis["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    assert int(limit[:-2]) * MIB > memory_bytes(conf["maxmemory"]) * 1.5


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
            assert secret_refs(container) == {}
            for path in secret_files(spec, container, USERS):
                needed.setdefault(USERS_SECRET, set()).add(Path(path).name)
    assert needed == {USERS_SECRET: set(USERS)}
    for secret, keys in needed.items():
        (command,) = re.findall(
            rf"kubectl create secret generic {secret}((?:\s*\\\n\s*--from-file=[\w-]+)+)", section
        )
        assert set(re.findall(r"--from-file=([\w-]+)", command)) == keys, secret
    assert "kubectl apply -k deploy/k8s/shared" in section
    assert "--from-literal" not in section


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
    files = write_secret_files(shared.redis_spec, shared.redis, USERS, tmp_path / "secrets")
    values = {
        name: moved_paths(value, files) for name, value in env_values(shared.redis, pod).items()
    }
    env = {"PATH": f"{fake}:{os.environ['PATH']}", **values}
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
