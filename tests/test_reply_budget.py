"""The ack readers' per-reply byte budget (issue 23): a reply of many acks each just under
the reply cap is read off the socket but kept only up to ``ACK_REPLY_BUDGET`` (16 MiB).

Anyone with the ``subscriber`` password may ``XADD`` acks of ~1 MiB each; 2,000 of them (a
page) were one ~2 GB reply to ``hotreload status`` or the daemon's ack follower. Real
redis-server, real CLI and follower processes, peak RSS from VmHWM. Figures: see the
``FLOOD`` comment and docs/performance.md.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from hashlib import sha256
from typing import Any, Literal, cast

import redis

from publisher._rolloutwire import control_key
from publisher.inspect.events import ACK_REPLY_BUDGET, MAX_ACKS, decoded_ack
from subscriber._redis import connect_async
from subscriber._replybudget import reply_budget
from subscriber._replycap import Dropped
from subscriber.protocol import Ack, encode_ack
from subscriber.testing import RedisServer, append_event
from tests.conftest import KubeletMount, Processes
from tests.helpers import wait_until
from tests.test_reply_cap import KEY, KEYS, measured, peak_mib
from tests.test_rollout_publisher import A, B, cli, daemon, entries, has

# 240 acks of 900 KiB: a 211 MiB reply (~400 MiB of Redis memory while the test runs).
# Measured (the budget switched off in Budget.start for "without", 1 run): `status` 35 -> 459
# MiB peak without the budget, 35 -> 67..69 with it (3 runs; history, wait alike); the
# follower 36 -> 245 without, 36 -> 86..87 with (an XREAD and a status pass, each 16 MiB
# kept, held twice while parsed: the socket buffer and the bytes).
FLOOD, FLOOD_BYTES = 240, 900 * 1024
BOUND_MIB = 64
SHA = sha256(b"a: 1\n").hexdigest()


def ack(worker: str, status: Literal["applied", "rejected"] = "applied", version: int = 1) -> Any:
    error = "bad" if status == "rejected" else ""
    return encode_ack(Ack(worker=worker, version=version, sha256=SHA, status=status, error=error))


def flood(client: redis.Redis, count: int = FLOOD) -> None:
    """``count`` acks (of a version not published) whose error is ~900 KiB, as the
    subscriber user may XADD: those within the budget are read, the others are junk."""
    big = "x" * FLOOD_BYTES
    for start in range(0, count, 20):
        pipe = client.pipeline(transaction=False)
        for n in range(start, min(count, start + 20)):
            pipe.xadd(KEYS.acks, {**ack(f"evil:{n}", "applied", 9), "error": big})
        pipe.execute()


def test_the_budget_is_what_a_page_of_legitimate_acks_needs() -> None:
    longest = ack("w" * 64, "rejected") | {"error": "e" * 2000, "entry_id": "1-1"}
    charged = sum(len(str(k)) + len(str(v)) + 2 * 64 for k, v in longest.items()) + 64 + 41
    assert charged * MAX_ACKS < ACK_REPLY_BUDGET <= 16 * 1024 * 1024
    raw = {k.encode(): str(v).encode() for k, v in ack("w:1", "rejected").items()}
    decoded = decoded_ack({**raw, b"error": b"e" * 100_000})
    assert decoded is not None  # a rejection, its error cut to what a worker may write
    assert decoded.error.endswith("... (cut)")
    assert len(decoded.error) < 4100


def test_past_the_budget_entries_keep_their_ids_and_the_connection_its_step(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    ids = [client.xadd("s", {"v": "x" * 30_000}) for _ in range(6)]
    ids += [client.xadd("s", {"a": "1", "b": "2"}) for _ in range(2)]
    with reply_budget(100_000):
        entries = cast(list[Any], client.xrange("s"))
        assert client.get("nothing") is None  # the connection is in step
    assert [entry_id for entry_id, _ in entries] == ids  # every id, ever
    kept = [fields for _, fields in entries if fields.get(b"v") == b"x" * 30_000]
    assert len(kept) == 3  # 3 x 30 KB fit in 100 KB
    assert all(isinstance(fields[b"v"], Dropped) for _, fields in entries[3:6])
    assert [fields for _, fields in entries[6:]] == [{}, {}]  # aggregates skipped whole
    assert decoded_ack({b"worker": b"w", b"error": entries[3][1][b"v"]}) is None
    assert len(cast(list[Any], client.xrange("s"))) == 8  # no budget: read whole
    assert all(len(f[b"v"]) == 30_000 for _, f in cast(list[Any], client.xrange("s"))[:6])

    async def read() -> tuple[Any, Any, Any]:
        aio = connect_async(redis_server.url, socket_timeout=10)
        try:
            with reply_budget(100_000):
                cut = await aio.xrange("s")
            return cut, await aio.ping(), await aio.xrange("s")
        finally:
            await aio.aclose()

    cut, pong, whole = asyncio.run(read())
    assert [entry_id for entry_id, _ in cut] == ids
    assert pong is True
    assert [isinstance(f.get(b"v"), Dropped) for _, f in cut][:6] == [False] * 3 + [True] * 3
    assert [f for _, f in cut[6:]] == [{}, {}]
    assert [len(f.get(b"v", b"")) for _, f in whole[:6]] == [30_000] * 6


def test_status_wait_and_history_read_past_a_flood_of_big_acks(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    append_event(redis_server.url, KEY, b"a: 1\n", version=1)
    state = {"worker": "w:1", "status": "applied", "version": 1, "sha256": SHA,
             "heartbeat": int(time.time() * 1000), "heartbeat_interval": 60}  # fmt: skip
    client.hset(KEYS.workers, "w:1", json.dumps(state))
    client.xadd(KEYS.acks, ack("w:1"))
    _, _, baseline = measured(redis_server.url, "status")
    _, history, _ = measured(redis_server.url, "history", KEY)
    flood(client)
    client.xadd(KEYS.acks, ack("w:2"))  # a genuine ack after the flood: read first
    code, out, peak = measured(redis_server.url, "status")
    print(f"status over {FLOOD} acks: peak {peak:.0f} MiB (without them {baseline:.0f})")
    assert code == 0, out
    assert any(line.split()[:2] == ["w:1", "1"] and "live" in line for line in out.splitlines())
    assert peak - baseline < BOUND_MIB
    code, out, peak = measured(redis_server.url, "history", KEY)
    print(f"history: peak {peak:.0f} MiB\n{out}")
    assert code == 0, out
    # applied by w:2 (read first, before the flood's acks, of another version)
    assert out.splitlines()[1].split()[-3:] == history.splitlines()[1].split()[-3:], out
    assert peak - baseline < BOUND_MIB
    code, out, peak = measured(redis_server.url, "wait", KEY, "--timeout", "5")
    print(f"wait: exit {code}, peak {peak:.0f} MiB\n{out}")
    assert code == 0, out
    assert peak - baseline < BOUND_MIB


FOLLOWER = """
import sys, time
from publisher.ackwatch import AckFollower
from publisher.metrics import DaemonMetrics

metrics = DaemonMetrics()
follower = AckFollower(sys.argv[1], lambda: [sys.argv[2]], metrics, prefix="hotreload",
                       status_interval=0.2, block_ms=200)
def rejections():
    sample = {"key": sys.argv[2]}
    return metrics.registry.get_sample_value("hotreload_worker_rejections_total", sample) or 0
def peak():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:")) / 1024
follower.start()
time.sleep(1.5)
print("ready", peak(), flush=True)
for want in (1, 2):
    deadline = time.monotonic() + 30
    while rejections() < want and time.monotonic() < deadline:
        time.sleep(0.05)
    print(rejections(), peak(), flush=True)
follower.stop()
"""


def test_the_daemons_ack_follower_reads_past_a_flood_of_big_acks(
    redis_server: RedisServer, client: redis.Redis, processes: Processes
) -> None:
    append_event(redis_server.url, KEY, b"a: 1\n", version=1)
    follower = processes.python("-c", FOLLOWER, redis_server.url, KEY, stdout=subprocess.PIPE)
    assert follower.stdout is not None
    with follower.stdout:
        word, ready = follower.stdout.readline().split()
        assert word == b"ready"
        client.xadd(KEYS.acks, ack("w:1", "rejected"))
        first, _ = follower.stdout.readline().split()
        flood(client)
        time.sleep(1)  # status passes and XREADs over the flood
        client.xadd(KEYS.acks, ack("w:2", "rejected"))  # read after it: the cursor moved on
        second, peak = follower.stdout.readline().split()
    follower.wait(20)
    print(f"follower over {FLOOD} acks: ready {float(ready):.0f}, peak {float(peak):.0f} MiB")
    assert (float(first), float(second)) == (1, 2)
    assert float(peak) - float(ready) < BOUND_MIB


def test_the_daemon_carries_out_a_rollback_past_a_flood_of_big_control_entries(
    processes: Processes, kubelet_mount: KubeletMount, redis_server: RedisServer,
    client: redis.Redis,
) -> None:  # fmt: skip
    """Anyone with the operator password may XADD to ``:control``: 100 entries of 900 KiB
    (the daemon's XREAD COUNT) are read past within the budget, the rollback after them is
    carried out."""
    kubelet_mount.write({KEY: A})
    run = daemon(processes, kubelet_mount, redis_server)
    wait_until(has(client, 1), "v1")
    kubelet_mount.write({KEY: B})
    wait_until(has(client, 2), "v2")
    time.sleep(0.5)
    ready = peak_mib(run.pid)
    big = "x" * FLOOD_BYTES
    pipe = client.pipeline(transaction=True)  # one XREAD reply of 88 MiB
    for _ in range(100):
        pipe.xadd(control_key(KEY, "hotreload"), {"junk": big})
    pipe.execute()
    done = cli(redis_server, "rollback", KEY)
    peak = peak_mib(run.pid)
    print(f"daemon over 100 :control entries: ready {ready:.0f}, peak {peak:.0f} MiB")
    assert done.returncode == 0, done.stderr
    assert entries(client)[2]["rollout"] == "rollback"
    assert peak - ready < BOUND_MIB
