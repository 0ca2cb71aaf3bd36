"""The built pods of both variants and Redis as deploy/ ships it, shared by tests/deploy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from subscriber._redis import connect
from tests.deploy.render import (
    K8S,
    POD_USERS,
    SHARED,
    TEST_ADMIN,
    Pod,
    Shared,
    kubectl_build,
    render,
)
from tests.deploy.servers import DeployedRedis, ShippedCluster, job_script, write_acl


@pytest.fixture(scope="module", params=["renderer", "kubectl"])
def pod(request: pytest.FixtureRequest) -> Pod:
    """The example overlay's pod, built by the renderer and by ``kubectl kustomize``."""
    if request.param == "kubectl":
        return Pod(kubectl_build(K8S / "example"))
    return Pod(render(K8S / "example"))


@pytest.fixture(scope="module", params=["renderer", "kubectl"])
def shared(request: pytest.FixtureRequest) -> Shared:
    """The shared variant, built by the renderer and by ``kubectl kustomize``."""
    if request.param == "kubectl":
        return Shared(kubectl_build(SHARED))
    return Shared(render(SHARED))


@pytest.fixture
def deployed_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeployedRedis]:
    server = DeployedRedis(tmp_path_factory.mktemp("acl"))
    write_acl(server.acl_path, POD_USERS)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def admin(deployed_redis: DeployedRedis) -> Iterator[redis.Redis]:
    """The tests' admin user on ``deployed_redis``."""
    client = connect(deployed_redis.url_for(*TEST_ADMIN), socket_timeout=5)
    yield client
    client.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShippedCluster]:
    shipped = ShippedCluster(tmp_path_factory.mktemp("shipped-cluster"), job_script())
    shipped.start(timeout=90)
    try:
        yield shipped
    finally:
        shipped.stop(grace=15)
