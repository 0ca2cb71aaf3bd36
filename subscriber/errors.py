"""Every error hotreload raises, in one flat module with one root.

Errors carry the data a caller needs (``ChecksumMismatch.expected``/``.actual``) and their
messages say what to do about them. Both packages raise these: ``publisher`` imports them
from here because workers install only ``subscriber``. This module imports nothing, so
catching them loads no Redis client.

One error lives elsewhere: ``_cluster.TopologyChanged`` (the node connected to no longer
serves the key's slot) is a ``redis.ConnectionError`` too, so every loop that reconnects on a
lost connection does so on it; it derives from :class:`HotReloadError` as well, but sits
beside the code that raises it rather than make this module import redis.
"""

from __future__ import annotations

__all__ = [
    "ChecksumMismatch",
    "ConfigurationError",
    "ContentTooLarge",
    "HotReloadError",
    "InitialLoadError",
    "MalformedEntry",
    "NoAcceptableConfig",
    "RedisUnavailable",
    "SignatureInvalid",
    "SigningKeyMismatch",
]


class HotReloadError(Exception):
    """Root of every error raised by hotreload."""


class ConfigurationError(HotReloadError, ValueError):
    """A setting is missing or invalid (Redis URL, key name, option value)."""


class MalformedEntry(HotReloadError):
    """A stream entry does not follow the wire contract; it is rejected, never applied."""

    def __init__(self, entry_id: str, reason: str) -> None:
        self.entry_id = entry_id
        self.reason = reason
        super().__init__(f"malformed entry {entry_id}: {reason}")


class ChecksumMismatch(MalformedEntry):
    """An entry's content does not hash to the sha256 it claims (corrupt or forged)."""

    def __init__(self, entry_id: str, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(
            entry_id,
            f"content sha256 is {actual} but the entry claims {expected}; "
            "the entry is corrupt or forged and was not applied",
        )


class SignatureInvalid(MalformedEntry):
    """An entry is unsigned, or its signature does not verify with the subscriber's keys.

    Only a subscriber created with ``signing_key=`` checks signatures; it never applies such
    an entry and reports ``reason`` to ``:acks``.
    """

    def __init__(self, entry_id: str, reason: str) -> None:
        self.entry_id = entry_id
        self.reason = reason
        HotReloadError.__init__(self, f"entry {entry_id} not trusted: {reason}")


class ContentTooLarge(HotReloadError):
    """Content exceeds what one stream entry may carry (ConfigMaps cap at 1 MiB)."""

    def __init__(self, key: str, size: int, limit: int) -> None:
        self.key = key
        self.size = size
        self.limit = limit
        super().__init__(
            f"{key}: content is {size} bytes, over the {limit}-byte limit; "
            "split the config into several keys"
        )


class InitialLoadError(HotReloadError):
    """``FileWatcher.start()`` could not load the initial content (missing file or rejected)."""

    def __init__(self, path: str, cause: BaseException) -> None:
        self.path = path
        self.cause = cause
        super().__init__(f"cannot load initial config from {path}: {cause}")


class RedisUnavailable(HotReloadError):
    """Redis could not be reached in time and there is no fallback to use instead."""

    def __init__(self, url: str, cause: BaseException | str) -> None:
        self.url = url
        self.cause = cause
        super().__init__(
            f"cannot reach Redis at {url}: {cause}; check that the Redis sidecar runs and the "
            "URL (HOTRELOAD_REDIS_URL) is right, or give fallback_path= to start from the "
            "mounted file"
        )


class NoAcceptableConfig(HotReloadError):
    """Every version in the history was rejected by the callback, or none could be found."""

    def __init__(self, key: str, reasons: list[str]) -> None:
        self.key = key
        self.reasons = reasons
        detail = "; ".join(reasons[:5]) if reasons else "no version was published"
        super().__init__(
            f"{key}: no acceptable config ({detail}); fix the ConfigMap or the validation, "
            "`hotreload history` shows what was published"
        )


class SigningKeyMismatch(NoAcceptableConfig):
    """Every entry in the history failed the signature check: the subscriber's signing keys
    are not the publisher's (or the publisher signs nothing)."""

    def __init__(self, key: str, reasons: list[str], key_ids: list[str]) -> None:
        self.key = key
        self.reasons = reasons
        self.key_ids = key_ids
        detail = reasons[0] if reasons else "no entry"
        HotReloadError.__init__(
            self,
            f"{key}: cannot start: no entry in the history verifies with this subscriber's "
            f"signing key (key id {', '.join(key_ids)}). Check that signing_key= holds the "
            "Secret the publisher reads with --signing-key-file ($HOTRELOAD_SIGNING_KEY_FILE), "
            f"and that the publisher runs with it; `hotreload history {key}` shows each "
            f"version's key id. Newest entry: {detail}",
        )
