"""The per-pod variant's pod (the example overlay, built by the renderer and by ``kubectl
kustomize``): the publisher mounts the ConfigMap volume whole and read-only, Redis has no
port and takes its users from the Secret, native sidecars start in order, probes point at
the endpoints the code really serves, every container is locked down.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from publisher.endpoints import EndpointServer
from tests.deploy.render import (
    DEPLOY,
    EXAMPLE,
    MIB,
    PASSWORDS,
    REDIS_FILES,
    SECRET,
    SECRET_MOUNT,
    SECRET_NAME,
    Pod,
    conf_directives,
    container_env,
    memory_bytes,
    probe_port,
    secret_files,
)
from tests.deploy.servers import (
    http_get,
)


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


def test_redis_serves_only_the_socket_with_the_acl_users_from_the_secret(pod: Pod) -> None:
    conf = conf_directives(REDIS_FILES / "redis.conf")
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
    # the passwords: files of the Secret's volume the generator reads (*_FILE), never env
    env = container_env(redis_c, SECRET)
    files = secret_files(pod.spec, redis_c, SECRET)
    generator = (REDIS_FILES / "gen-users-acl.sh").read_text()
    for user in ("publisher", "subscriber", "operator"):
        assert files[env[f"HOTRELOAD_{user.upper()}_PASSWORD_FILE"]] == PASSWORDS[user]
        assert f"HOTRELOAD_{user.upper()}_PASSWORD" in generator
    assert "valueFrom" not in str(redis_c["env"])
    assert not set(PASSWORDS.values()) & set(env.values())
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
        password_path = f"{SECRET_MOUNT}/{user}-password"
        assert url == f"unix://{user}@{socket_path}?password_file={password_path}"
        # each container sees its own user's password only
        assert secret_files(pod.spec, pod.container(name), SECRET) == {
            password_path: PASSWORDS[user]
        }
    # the memory limit leaves room above maxmemory for the AOF rewrite's fork
    limit = redis_c["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    assert int(limit[:-2]) * MIB > memory_bytes(conf["maxmemory"]) * 1.5


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
            assert http_get(f"http://127.0.0.1:{server.port}{path}")[0] == 200
        assert http_get(f"http://127.0.0.1:{server.port}/nowhere")[0] == 404
    finally:
        server.stop()
    # the Service reaches the app's port
    (service,) = [r for r in pod.resources if r["kind"] == "Service"]
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in ("http", 8000)
    labels = pod.deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


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
        Path(path).name
        for container in pod.containers()
        for path in secret_files(pod.spec, container, SECRET)
    }
    assert created == needed == set(SECRET)
    assert f"create secret generic {SECRET_NAME}" in readme
    assert "kubectl apply -k deploy/k8s/example" in readme
