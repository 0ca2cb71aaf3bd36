"""The ``pod`` factory fixture of the fault scenarios."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Processes
from tests.fault.pod import Pod

MakePod = Callable[..., Pod]


@pytest.fixture
def make_pod(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, processes: Processes
) -> Iterator[MakePod]:
    """``make_pod(appendonly=False, signed=False, workers=6, daemon_args=())``: a started pod
    on revision 1.

    Redis is stopped by PID at the end; the daemon and workers through ``processes``.
    """
    pods: list[Pod] = []

    def make(*, appendonly: bool = False, signed: bool = False, **start: object) -> Pod:
        # unix socket paths are limited to 107 bytes: Redis gets a short directory of its own
        redis_dir = tmp_path_factory.mktemp("fr")
        pod = Pod(tmp_path, redis_dir, processes, appendonly=appendonly, signed=signed)
        pods.append(pod)
        return pod.start(**start)  # type: ignore[arg-type]

    try:
        yield make
    finally:
        processes.stop_all()  # workers write their final state while Redis still runs
        for pod in pods:
            pod.redis.stop()
