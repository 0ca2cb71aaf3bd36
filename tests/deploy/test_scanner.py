"""deploy/ judged by a policy scanner: checkov (pinned in requirements/scan.lock, installed by
``make scan-venv`` into .venv-scan, which ``make test`` does first) on every kustomization
deploy/ ships, rendered, and on deploy/Dockerfile.

Zero failed checks, and every skipped one carries its reason in the manifest itself
(``checkov.io/skipN: CHECK=reason`` annotations; ``# checkov:skip=CHECK:reason`` in the
Dockerfile). A new finding fails this test, listed: fix it, or skip it in the manifest with a
reason a reader can judge.

Rendering: ``kubectl kustomize`` where installed (what ``kubectl apply -k`` sends), else this
package's renderer (``render.py``); the test's id says which.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.render import DEPLOY, K8S, REPO, kubectl_build, render

SCAN_VENV = REPO / ".venv-scan"
CHECKOV = SCAN_VENV / "bin" / "checkov"
PINNED = re.search(
    r"^checkov==(\S+)", (REPO / "requirements" / "scan.lock").read_text(), re.MULTILINE
)
# every directory `kubectl apply -k` can take (deploy/example is a component of the overlays)
KUSTOMIZATIONS = {
    "base": K8S / "base",
    "example": K8S / "example",
    "shared": K8S / "shared",
    "redis-cluster": DEPLOY / "redis-cluster",
}
RENDERER = "kubectl" if shutil.which("kubectl") else "renderer"
SKIP_ANNOTATION = re.compile(r"checkov\.io/skip\d+")


def checkov() -> str:
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing: run `make scan-venv` (make test does it first)")
    return str(CHECKOV)


def rendered(name: str) -> list[dict[str, Any]]:
    directory = KUSTOMIZATIONS[name]
    return kubectl_build(directory) if RENDERER == "kubectl" else render(directory)


def scan(*files: Path) -> list[dict[str, Any]]:
    """checkov's JSON reports (one per framework) on ``files``, offline."""
    argv = [checkov(), "--framework", "kubernetes", "dockerfile", "--skip-download", "-o", "json"]
    for path in files:
        argv += ["-f", str(path)]
    # BC_SKIP_MAPPING: no download of the vendor's check-ID mappings (the skips use CKV_ IDs)
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "WARNING"}
    ran = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False, env=env)
    # checkov exits 1 when a check failed: the report says which
    assert ran.returncode in (0, 1), ran.stderr[-2000:]
    reports = json.loads(ran.stdout)
    return reports if isinstance(reports, list) else [reports]


def findings(
    reports: list[dict[str, Any]], file: str | None = None
) -> tuple[list[str], list[str], int]:
    """(failed checks, skips without a reason, resources scanned), of ``file`` alone if named."""
    failed, unexplained, resources = [], [], 0
    for report in reports:
        summary = report["summary"]
        assert summary["parsing_errors"] == 0, summary
        checks = report["results"]["passed_checks"] + report["results"]["failed_checks"]
        if file is None:
            resources += summary["resource_count"]
        else:  # resources of that file with at least one check
            resources += len({c["resource"] for c in checks if Path(c["file_path"]).name == file})
        for check in report["results"]["failed_checks"]:
            if file is not None and Path(check["file_path"]).name != file:
                continue
            failed.append(
                f"{check['check_id']} {check['check_name']!r} on {check['resource']} "
                f"({Path(check['file_path']).name}:{check['file_line_range']})"
            )
        for check in report["results"]["skipped_checks"]:
            if file is not None and Path(check["file_path"]).name != file:
                continue
            reason = (check["check_result"].get("suppress_comment") or "").strip()
            if len(reason.split()) < 5:  # a sentence a reader can judge, not a bare ID
                unexplained.append(f"{check['check_id']} on {check['resource']}: {reason!r}")
    return failed, unexplained, resources


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One scan of every rendered kustomization (NAME.yaml) and the Dockerfile (~3 s each)."""
    directory = tmp_path_factory.mktemp("rendered")
    for name in KUSTOMIZATIONS:
        resources = rendered(name)
        (directory / f"{name}.yaml").write_text(yaml.safe_dump_all(resources, sort_keys=False))
    return scan(*sorted(directory.iterdir()), DEPLOY / "Dockerfile")


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS), ids=lambda n: f"{n}-{RENDERER}")
def test_every_kustomization_passes_the_scanner(name: str, scanned: list[dict[str, Any]]) -> None:
    failed, unexplained, count = findings(scanned, f"{name}.yaml")
    workloads = [r for r in rendered(name) if r["kind"] in {"Deployment", "StatefulSet", "Job"}]
    assert count > len(workloads) > 0  # it did read them (and more: Services, ConfigMaps...)
    assert not failed, f"{len(failed)} unexplained finding(s):\n" + "\n".join(failed)
    assert not unexplained, "skips without a reason:\n" + "\n".join(unexplained)


def test_the_dockerfile_passes_the_scanner(scanned: list[dict[str, Any]]) -> None:
    failed, unexplained, count = findings(scanned, "Dockerfile")
    assert count >= 1  # its stages and instructions
    assert not failed, f"{len(failed)} unexplained finding(s):\n" + "\n".join(failed)
    assert not unexplained, "skips without a reason:\n" + "\n".join(unexplained)


def test_the_scanner_is_the_pinned_one_and_catches_what_it_should(tmp_path: Path) -> None:
    """The pin is what runs, and the scan is not vacuous: the example overlay without its
    NetworkPolicy and skip annotations fails exactly the checks they answer."""
    assert PINNED, "requirements/scan.lock pins no checkov"
    version = subprocess.run(
        [checkov(), "--version"], capture_output=True, text=True, timeout=120, check=True
    )
    assert version.stdout.strip() == PINNED[1]
    stripped = []
    for resource in rendered("example"):
        if resource["kind"] == "NetworkPolicy":
            continue
        annotations = resource["metadata"].get("annotations", {})
        for key in [k for k in annotations if SKIP_ANNOTATION.fullmatch(k)]:
            del annotations[key]
        stripped.append(resource)
    manifest = tmp_path / "stripped.yaml"
    manifest.write_text(yaml.safe_dump_all(stripped, sort_keys=False))
    failed, _, _ = findings(scan(manifest))
    assert {line.split()[0] for line in failed} == {
        "CKV2_K8S_6",  # no NetworkPolicy
        "CKV_K8S_15",  # imagePullPolicy of the locally built image
        "CKV_K8S_21",  # the default namespace
        "CKV_K8S_43",  # images by tag
    }


def test_every_skip_in_deploy_names_a_check_and_gives_its_reason() -> None:
    """At the source: each ``checkov.io/skipN`` annotation is ``CHECK_ID=reason``."""
    seen = 0
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if not isinstance(document, dict):
                continue
            metadata = document.get("metadata") or {}
            generators = document.get("configMapGenerator", [])
            sources = [metadata.get("annotations") or {}] + [
                g.get("options", {}).get("annotations", {}) for g in generators
            ]
            for found in sources:
                for key, value in found.items():
                    if SKIP_ANNOTATION.fullmatch(key):
                        seen += 1
                        assert re.fullmatch(r"CKV2?_[A-Z0-9]+_\d+=\S.{20,}", value), (path, key)
    assert seen > 0
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for skip in re.findall(r"checkov:skip=(.*)", dockerfile):
        assert re.fullmatch(r"CKV2?_[A-Z0-9]+_\d+:\S.{20,}", skip.strip()), skip
