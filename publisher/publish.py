"""Compare-and-publish: turn a key's current content into at most one new stream entry.

The decision runs server-side in one Lua script (``publish.lua``) registered through redis-py:
redis-py sends EVALSHA and falls back to EVAL when the script cache was flushed (``SCRIPT
FLUSH``, a restarted Redis), so the script is reloaded without our help.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from typing import TYPE_CHECKING

from subscriber.errors import ContentTooLarge
from subscriber.keys import DEFAULT_PREFIX, stream_keys
from subscriber.protocol import (
    MAX_CONTENT_BYTES,
    SCHEMA_VERSION,
    now_ms,
    process_identity,
    sha256_hex,
)

if TYPE_CHECKING:
    import redis

__all__ = ["DEFAULT_HISTORY", "PublishResult", "Publisher"]

DEFAULT_HISTORY = 100
_SCRIPT = files("publisher").joinpath("publish.lua").read_text()


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What one compare-and-publish did for one key."""

    key: str
    written: bool  # False: the newest entry already carried this content
    version: int  # the new version, or the newest's when nothing was written
    entry_id: str
    sha256: str
    size: int


class Publisher:
    """Publishes contents of config keys to their events streams, once per distinct content.

    ``history`` bounds each stream (approximate trimming, so a few more may stay). The
    publisher remembers the highest version it has seen per key and passes it as the floor,
    so versions never go backwards while it lives, even if Redis loses its data.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        history: int = DEFAULT_HISTORY,
        publisher_id: str | None = None,
    ) -> None:
        if history < 1:
            raise ValueError(f"history must be at least 1, not {history}")
        self.client = client
        self.prefix = prefix
        self.history = history
        self.publisher_id = publisher_id or process_identity()
        self.highest_version: dict[str, int] = {}
        self._script = client.register_script(_SCRIPT)

    def publish(self, key: str, content: bytes) -> PublishResult:
        """Publish ``content`` as ``key``'s newest version unless it already is.

        Raises ``ContentTooLarge`` (nothing sent) and redis-py's connection errors.
        """
        if len(content) > MAX_CONTENT_BYTES:
            raise ContentTooLarge(key, len(content), MAX_CONTENT_BYTES)
        digest = sha256_hex(content)
        floor = self.highest_version.get(key, 0)
        written, version, entry_id = self._script(
            keys=[stream_keys(key, self.prefix).events],
            args=[
                digest,
                content,
                now_ms(),
                self.publisher_id,
                key,
                SCHEMA_VERSION,
                self.history,
                floor,
            ],
        )
        version = int(version)
        self.highest_version[key] = max(floor, version)
        return PublishResult(
            key=key,
            written=bool(written),
            version=version,
            entry_id=entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id),
            sha256=digest,
            size=len(content),
        )
