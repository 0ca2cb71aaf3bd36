"""What running the suite in parallel (``make test``: pytest-xdist workers) relies on: ports
that two workers never both hand out, a server that starts again elsewhere when its port was
taken anyway, and a ``QUIET`` list (tests/conftest.py) that names real tests."""

from __future__ import annotations

import importlib
import socket
from collections.abc import Iterator

import pytest

from subscriber._testing_ports import (
    BUS_OFFSET,
    CLUSTER_PORTS,
    SINGLE_LOW,
    cluster_port,
    ephemeral_low,
    free_port,
)
from subscriber.testing import RedisServer
from tests.conftest import QUIET


def as_worker(monkeypatch: pytest.MonkeyPatch, index: int, count: int) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{index}")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(count))


@pytest.fixture
def listening() -> Iterator[socket.socket]:
    """A loopback socket listening on a port, as another program's server would."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", free_port()))
        sock.listen()
        yield sock
    finally:
        sock.close()


def test_free_ports_are_below_the_ephemeral_range_and_never_handed_out_twice_in_a_row() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50  # none bound yet: a second call still gives another
    assert all(SINGLE_LOW <= port < ephemeral_low() for port in ports)


def test_each_xdist_worker_hands_out_ports_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    single: dict[int, set[int]] = {}
    cluster: dict[int, set[int]] = {}
    for index in range(3):
        as_worker(monkeypatch, index, 3)
        single[index] = {free_port() for _ in range(200)}
        nodes: set[int] = set()
        for _ in range(100):
            port = cluster_port(nodes)
            nodes |= {port, port + BUS_OFFSET}
        cluster[index] = nodes
    everything = [*single.values(), *cluster.values()]
    assert sum(map(len, everything)) == len(set().union(*everything))  # no port twice
    for index, ports in cluster.items():  # node ports (and so bus ports) in the worker's slice
        low = CLUSTER_PORTS[0] + index * (CLUSTER_PORTS[1] - CLUSTER_PORTS[0]) // 3
        high = CLUSTER_PORTS[0] + (index + 1) * (CLUSTER_PORTS[1] - CLUSTER_PORTS[0]) // 3
        assert all(low <= port < high for port in ports if port < CLUSTER_PORTS[1])


def test_a_server_whose_port_was_taken_starts_on_another_and_keeps_it_on_restart(
    tmp_path_factory: pytest.TempPathFactory, listening: socket.socket
) -> None:
    taken = listening.getsockname()[1]
    server = RedisServer(tmp_path_factory.mktemp("taken"), unix=False)
    server.port = taken  # lost the race: something bound it after free_port() said free
    try:
        server.start()
        assert server.port != taken
        assert server.url.endswith(f":{server.port}/0")
        moved = server.port
        server.restart()
        assert server.port == moved  # clients reconnect to the same URL
    finally:
        server.stop()


def test_a_restart_never_moves_the_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("restart"), unix=False).start()
    try:
        server.stop()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", server.port))
            sock.listen()
            port = server.port
            with pytest.raises(RuntimeError, match="Address already in use"):
                server.start()
            assert server.port == port
    finally:
        server.stop()


def test_the_quiet_list_names_tests_that_exist() -> None:
    for key in QUIET:
        path, name = key.split("::")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert callable(getattr(module, name, None)), f"tests/conftest.py QUIET: no {key}"
