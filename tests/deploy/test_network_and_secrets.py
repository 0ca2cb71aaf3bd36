"""What the policy scanner cannot judge on its own: the NetworkPolicies select the pods they
mean and open exactly the ports those pods serve, to whom they must; the monitoring namespace
can be changed by a kustomize patch as deploy/README.md shows; and no Redis password sits in
any container's environment, in any kustomization deploy/ ships or in docker-compose.yml.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.render import (
    COMPOSE,
    DEPLOY,
    K8S,
    PASSWORDS,
    USERS,
    Resource,
    containers_of,
    kubectl_build,
    render,
    secret_refs,
)

KUSTOMIZATIONS = [K8S / "base", K8S / "example", K8S / "shared", DEPLOY / "redis-cluster"]
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}


def builds(directory: Path) -> list[tuple[str, list[Resource]]]:
    built = [("renderer", render(directory))]
    if shutil.which("kubectl"):
        built.append(("kubectl", kubectl_build(directory)))
    return built


def pod_templates(resources: list[Resource]) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(labels, pod spec) of every workload."""
    return [
        (r["spec"]["template"]["metadata"]["labels"], r["spec"]["template"]["spec"])
        for r in resources
        if r["kind"] in {"Deployment", "StatefulSet", "Job"}
    ]


def selected(policy: Resource, labels: dict[str, str]) -> bool:
    wanted: dict[str, str] = policy["spec"]["podSelector"]["matchLabels"]
    return wanted.items() <= labels.items()


def served_ports(spec: dict[str, Any]) -> set[int]:
    return {port["containerPort"] for c in containers_of(spec) for port in c.get("ports", [])}


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_no_redis_password_is_in_any_containers_environment(directory: Path) -> None:
    for _, resources in builds(directory):
        for _, spec in pod_templates(resources):
            for container in containers_of(spec):
                assert "envFrom" not in container, container["name"]
                assert secret_refs(container) == {}, container["name"]
                env_text = yaml.safe_dump(container.get("env", []))
                for password in PASSWORDS.values():
                    assert password not in env_text
                # no variable that would hold one (only *_FILE names of the Secret's files)
                for item in container.get("env", []):
                    assert not re.search(r"PASSWORD$|^REDISCLI_AUTH$", item["name"]), item
                    assert not re.search(r"://[^@/]*:[^@/]*@", str(item.get("value", ""))), item


def test_no_redis_password_is_in_the_compose_environment() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        text = yaml.safe_dump(environment) + str(service.get("healthcheck", ""))
        assert "env_file" not in service, name
        for key, value in environment.items():
            assert not key.endswith("PASSWORD"), (name, key)
            assert not re.search(r"://[^@/]*:[^@/]*@", str(value)), (name, key)
        for placeholder in ("local-publisher-password", "local-subscriber-password"):
            assert placeholder not in text, name
        assert "REDISCLI_AUTH" not in text
    for secret in compose["secrets"].values():
        assert set(secret) == {"file"}  # from files, not `environment:`


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda d: d.name)
def test_every_pod_has_a_network_policy_open_only_where_it_serves(directory: Path) -> None:
    for how, resources in builds(directory):
        policies = [r for r in resources if r["kind"] == "NetworkPolicy"]
        for labels, spec in pod_templates(resources):
            mine = [p for p in policies if selected(p, labels)]
            assert len(mine) == 1, (how, labels)
            (policy,) = mine
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            opened = {
                port["port"] for rule in policy["spec"].get("ingress", []) for port in rule["ports"]
            }
            assert opened == served_ports(spec), (how, labels)  # no more, no less
            for rule in policy["spec"].get("ingress", []):
                assert all(port["protocol"] == "TCP" for port in rule["ports"])


def rules_by_port(policy: Resource) -> dict[int, list[dict[str, Any]] | None]:
    """port -> the rule's ``from`` (None: from anywhere)."""
    return {
        port["port"]: rule.get("from")
        for rule in policy["spec"]["ingress"]
        for port in rule["ports"]
    }


def test_the_app_port_is_open_and_metrics_only_to_the_monitoring_namespace() -> None:
    for directory in (K8S / "example", K8S / "shared"):
        resources = render(directory)
        (policy,) = [r for r in resources if r["metadata"]["name"] == "hotreload-app"
                     and r["kind"] == "NetworkPolicy"]  # fmt: skip
        rules = rules_by_port(policy)
        assert rules[8000] is None  # clients, the Service, an ingress controller
        assert rules[9102] == [{"namespaceSelector": {"matchLabels": MONITORING}}]
        (deployment,) = [r for r in resources if r["kind"] == "Deployment"]
        publisher = containers_of(deployment["spec"]["template"]["spec"])
        (metrics,) = [c for c in publisher if c["name"] == "publisher"]
        assert "9102" in metrics["command"]


def test_redis_only_from_the_app_the_job_and_its_peers_the_bus_only_between_nodes() -> None:
    resources = render(K8S / "shared")
    policy = next(
        r
        for r in resources
        if r["kind"] == "NetworkPolicy" and r["metadata"]["name"] == "hotreload-redis"
    )
    labels = {
        kind: r["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        for r in resources
        for kind in [r["kind"]]
        if kind in {"Deployment", "StatefulSet", "Job"}
    }
    rules = rules_by_port(policy)
    clients = {
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in rules[6379] or []
    }
    assert clients == {labels["Deployment"], labels["Job"], labels["StatefulSet"]}
    bus = {
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for peer in rules[16379] or []
    }
    assert bus == {labels["StatefulSet"]}
    for peer in (rules[6379] or []) + (rules[16379] or []):
        assert set(peer) == {"podSelector"}  # this namespace only: no namespaceSelector


def test_the_monitoring_namespace_is_changed_by_the_documented_patch(tmp_path: Path) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: the patch is kustomize's to apply")
    readme = (DEPLOY / "README.md").read_text()
    (patch,) = re.findall(
        r"```yaml\n(# deploy/k8s/example/kustomization\.yaml.*?)```", readme, re.S
    )
    kustomization = yaml.safe_load(patch)
    # kustomize takes a relative path to another kustomization only
    kustomization["resources"] = [os.path.relpath(K8S / "example", tmp_path)]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    built = subprocess.run(
        ["kubectl", "kustomize", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    resources = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    (policy,) = [r for r in resources if r["kind"] == "NetworkPolicy"]
    assert rules_by_port(policy)[9102] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}
    ]
    assert rules_by_port(policy)[8000] is None
    assert set(USERS)  # the same Secret either way
