"""Scale on a Redis Cluster: ``bench_scale --cluster`` as a suite entry (``scale-cluster``).

1,000 asyncio subscribers in 4 processes, given the URL of a master that does not own their
key's slot, against the floor on the same 6-node cluster (see bench_scale).
"""

from __future__ import annotations

from typing import Any

from tests.benchmarks import bench_scale

render = bench_scale.render


def run(quick: bool = False) -> dict[str, Any]:
    return bench_scale.run(quick, cluster=True)
