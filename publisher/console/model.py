"""What the console shows, as JSON documents built from ``publisher.inspect`` and the CLI's
``--json`` renderings (``publisher.cli.render``): the page sees exactly what ``hotreload
status --json`` and ``history --json`` print, plus a timeline of acks.

One :class:`Model` serves every browser tab. :meth:`Model.state` is refreshed at most once
per ``interval`` whatever the number of tabs polling it, so the load on Redis is one
``status`` pass per interval (``Console`` in ``server``). Two reads are kept from one pass to
the next, because ``status`` alone would re-read them whole every second:

- each key's ``:acks`` stream is read incrementally (``acks_after`` from the last id seen,
  the newest ``MAX_ACKS`` kept; a stream that went back, i.e. was deleted and re-created, is
  read anew) and handed to ``status`` as its ``read_acks``;
- a key's history and timeline are re-read only when its newest version or its acks changed.

Everything here only reads (the ``operator`` ACL user's EXISTS, XREVRANGE, HGETALL, TIME,
SCAN); the tests run it under such a user.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from publisher.cli.content import diff_lines
from publisher.cli.render import history_json, status_json
from publisher.cli.terminal import Terminal, iso_utc
from publisher.inspect import NotFound, find_event, history, status
from publisher.inspect.events import MAX_ACKS, acks_after
from subscriber.keys import stream_keys
from subscriber.protocol import Ack

if TYPE_CHECKING:
    from publisher._admin import AnyRedis

__all__ = ["HISTORY_SHOWN", "TIMELINE_ACKS", "Model"]

HISTORY_SHOWN = 20  # versions per key in the history and the timeline
TIMELINE_ACKS = 50  # acks per version in the timeline, newest first


def _stream_id(text: str) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms or 0), int(seq or 0)


@dataclass
class _Acks:
    last: str = "-"
    acks: list[Ack] = field(default_factory=list)


@dataclass
class _KeyPages:
    fingerprint: tuple[object, ...] = ()
    history: list[dict[str, object]] = field(default_factory=list)
    timeline: list[dict[str, object]] = field(default_factory=list)


def ack_json(ack: Ack) -> dict[str, object]:
    return {
        "worker": ack.worker,
        "status": ack.status,
        "error": ack.error or None,
        "at": iso_utc(ack.at) if ack.at else None,
        "at_ms": ack.at or None,
        "after_s": round((ack.at - ack.published_at) / 1000, 3)
        if ack.at and ack.published_at
        else None,
        "apply_ms": round(ack.apply_ms, 3),
        "unchanged": ack.unchanged,
    }


class Model:
    """The console's read model on one Redis connection (see the module docstring)."""

    def __init__(
        self,
        client: AnyRedis,
        *,
        prefix: str,
        reveal: bool = False,
        signing_key: bytes | None = None,
        redis_label: str = "",
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.reveal = reveal
        self.signing_key = signing_key
        self.redis_label = redis_label
        self._lock = threading.Lock()
        self._acks: dict[str, _Acks] = {}
        self._pages: dict[str, _KeyPages] = {}

    # ------------------------------------------------------------------ acks, kept

    def read_acks(self, client: AnyRedis, acks_key: str) -> list[Ack]:
        """``status``'s ``read_acks``: the acks read before plus the new ones."""
        kept = self._acks.setdefault(acks_key, _Acks())
        newest = cast(list[tuple[bytes, object]], client.xrevrange(acks_key, count=1))
        newest_id = newest[0][0].decode() if newest else "-"
        if kept.last != "-" and (newest_id == "-" or _stream_id(newest_id) < _stream_id(kept.last)):
            kept = self._acks[acks_key] = _Acks()  # deleted or re-created: read it anew
        if newest_id != kept.last:
            new, kept.last = acks_after(client, acks_key, kept.last)
            kept.acks = (kept.acks + new)[-MAX_ACKS:]
        return kept.acks

    # ------------------------------------------------------------------ documents

    def state(self) -> dict[str, object]:
        """The whole page: ``status --json``, each key's history and timeline, and when."""
        with self._lock:
            started = time.time()
            report = status(
                self.client,
                prefix=self.prefix,
                read_acks=self.read_acks,
                signing_key=self.signing_key,
                check_memory=True,
            )
            document = status_json(report)
            keys: dict[str, object] = {}
            for summary in report.summaries:
                keys[summary.key] = self._key_pages(summary.key, summary.target)
            document.update(
                {
                    "keys": keys,
                    "prefix": self.prefix,
                    "redis": self.redis_label,
                    "reveal": self.reveal,
                    "connected": True,
                    "generated_at": iso_utc(int(started * 1000)),
                    "took_s": round(time.time() - started, 3),
                }
            )
            return document

    def _key_pages(self, key: str, target: object) -> dict[str, object]:
        acks_key = stream_keys(key, self.prefix).acks
        kept = self._acks.get(acks_key, _Acks())
        pages = self._pages.setdefault(key, _KeyPages())
        fingerprint = (target, kept.last)
        if pages.fingerprint != fingerprint or not pages.history:
            try:
                rows = history(
                    self.client, key, prefix=self.prefix, limit=HISTORY_SHOWN,
                    signing_key=self.signing_key,
                )  # fmt: skip
            except NotFound:  # workers that started before the first publish
                rows = ()
            pages.history = history_json(rows)
            pages.timeline = [self._version_acks(row, kept.acks) for row in pages.history]
            pages.fingerprint = fingerprint
        return {"history": pages.history, "timeline": pages.timeline}

    @staticmethod
    def _version_acks(row: dict[str, object], acks: list[Ack]) -> dict[str, object]:
        mine = [
            a
            for a in acks
            if a.version == row["version"] and (not a.sha256 or a.sha256 == row["sha256"])
        ]
        mine.sort(key=lambda a: a.at)
        return {
            "version": row["version"],
            "published_at": row["published_at"],
            "publisher": row["publisher"],
            # rollout control's marks, when history carries them
            "rollout": row.get("rollout"),
            "rollout_of": row.get("rollout_of"),
            "audience": row.get("audience"),
            "acks": [ack_json(a) for a in mine[-TIMELINE_ACKS:]],
        }

    def diff(self, key: str, old: int, new: int | None) -> dict[str, object]:
        """A unified diff of two versions (``new`` ``None``: the newest), as lines; a
        sensitive key's raises ``SensitiveContent`` unless the console was started with
        ``--reveal``."""
        events = [
            find_event(
                self.client, key, version, prefix=self.prefix, reveal=self.reveal,
                signing_key=self.signing_key,
            )
            for version in (old, new)
        ]  # fmt: skip
        lines = diff_lines(key, events[0], events[1], Terminal())
        return {
            "key": key,
            "old": events[0].version,
            "new": events[1].version,
            "lines": lines,
        }
