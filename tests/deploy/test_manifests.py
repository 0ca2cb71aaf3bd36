"""Every file of deploy/ passes the checkers Kubernetes and compose users would run:
``kubernetes-validate --strict`` (raw and as built by kustomize, both variants), the
compose-spec schema, ``yamllint --strict``, ``sh -n``; and docker-compose.yml runs the same
three containers as the per-pod variant.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.deploy.render import (
    CLUSTER_FILES,
    COMPOSE,
    DEPLOY,
    EXAMPLE,
    K8S,
    REDIS_FILES,
    SHARED,
    conf_directives,
    documents,
    kubectl_build,
    read_kustomization,
    render,
    run_tool,
    tool,
)


def test_the_manifests_pass_kubernetes_validate_strict(tmp_path: Path) -> None:
    files = [p for p in sorted(K8S.rglob("*.yaml")) if p.name != "kustomization.yaml"]
    builds = {"renderer": render(K8S / "example"), "renderer-base": render(K8S / "base")}
    if shutil.which("kubectl"):
        builds["kubectl"] = kubectl_build(K8S / "example")
    for name, resources in builds.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(resources))
        files.append(path)
    expected = sum(len(documents(p)) for p in files)
    result = run_tool(tool("kubernetes-validate"), "--strict", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.findall(r"passed for resource .* against version (\S+)", result.stdout)
    assert len(passed) == expected, result.stdout
    assert len(set(passed)) == 1  # the tool's default, i.e. its newest Kubernetes version


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


def test_yamllint_strict_on_the_shared_variant() -> None:
    result = run_tool(
        tool("yamllint"), "--strict", "-c", ".yamllint.yml", str(SHARED), str(CLUSTER_FILES)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_script_is_valid_posix_sh() -> None:
    for script in [*sorted(CLUSTER_FILES.glob("*.sh")), *sorted((DEPLOY / "redis").glob("*.sh"))]:
        result = subprocess.run(
            ["sh", "-n", str(script)], capture_output=True, text=True, timeout=10, check=False
        )
        assert result.returncode == 0, (script, result.stderr)


def test_the_configmap_keeps_its_name_so_updates_reach_running_pods() -> None:
    generators = [
        g
        for directory in (K8S / "example", EXAMPLE)
        for g in read_kustomization(directory).get("configMapGenerator", [])
        if g["name"] == "hotreload-config"
    ]
    assert generators
    assert all(g["options"]["disableNameSuffixHash"] is True for g in generators)


def test_compose_runs_the_same_three_containers() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"redis", "publisher", "app"}
    redis_s = services["redis"]
    assert "ports" not in redis_s
    assert redis_s["entrypoint"] == ["sh", "/etc/redis/entrypoint.sh"]
    assert "./deploy/redis:/etc/redis:ro" in redis_s["volumes"]
    socket_dir = str(Path(conf_directives(REDIS_FILES / "redis.conf")["unixsocket"]).parent)
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
        secret = f"{user}-password"
        assert url == f"unix://{user}@{socket_dir}/redis.sock?password_file=/run/secrets/{secret}"
        assert services[name]["secrets"] == [secret]  # its own password only
