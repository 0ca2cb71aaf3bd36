"""The stress run's checker catches what it is there to catch (a checker that never fires
proves nothing): fed records and acks that break each invariant, it reports each one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import Ack, encode_ack
from subscriber.testing import RedisServer
from tests.stress.run import Checker, StressWorker, Truth, sha


class _Process:
    pid = os.getpid()


def test_each_invariant_breach_is_reported(redis_server: RedisServer, tmp_path: Path) -> None:
    truth = Truth()
    v1 = truth.new("alpha.yaml", invalid=False, size=4)
    v2 = truth.new("alpha.yaml", invalid=False, size=4)
    bad = truth.new("alpha.yaml", invalid=True, size=4)
    forged = truth.forged("alpha.yaml")
    other = truth.new("beta.json", invalid=False, size=4)
    out = tmp_path / "worker.jsonl"
    worker = StressWorker(_Process(), out)
    checker = Checker(truth, redis_server.url, lambda: [worker])

    def applied(text: str, **override: Any) -> dict[str, Any]:
        seq = truth.get(sha(text))
        row = {"event": "applied", "key": "alpha.yaml", "sha256": sha(text), "intact": True}
        return {**row, "seq": seq.seq if seq else -1, **override}

    rows = [
        applied(v2),  # a fresh worker may start anywhere (the replay)
        applied(v1),  # then goes back: reported
        applied(bad),  # content its validator refuses: reported
        applied(forged),  # content no publisher wrote: reported
        applied(other),  # another key's content: reported
        {"event": "applied", "key": "alpha.yaml", "sha256": "0" * 64, "seq": 9, "intact": True},
        applied(v2, intact=False),  # torn on its way: reported (and seq not newer)
        {"event": "refused", "key": "alpha.yaml", "sha256": sha(v1)},  # refused valid content
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"event": "app')  # + a partial
    client = connect(redis_server.url, socket_timeout=5.0)
    try:
        for version, text in ((3, v2), (2, v1), (4, forged)):
            ack = Ack(worker="w:1", version=version, sha256=sha(text), status="applied")
            client.xadd(stream_keys("alpha.yaml").acks, encode_ack(ack))  # type: ignore[arg-type]
        checker.check_once(client)
    finally:
        client.close()
    found = "\n".join(checker.violations)
    assert "applied seq 1 after seq 2" in found
    assert "invalid content" in found
    assert "forged content" in found
    assert "content of beta.json" in found
    assert "content the test never wrote" in found
    assert "not intact" in found
    assert "refused valid content" in found
    assert "applied v2 after v3" in found
    assert (
        "ack w:1 alpha.yaml v4: applied Written(key='alpha.yaml', seq=-1, kind='forged')" in found
    )
    assert checker.lines_read == len(rows)  # the partial line waits for its end
    assert len(checker.violations) == 10, found
