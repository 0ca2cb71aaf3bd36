"""Redis key names, all in one place.

For the config key ``app.yaml`` under the default prefix the keys are literally
``hotreload:{app.yaml}:events``, ``...:acks``, ``...:workers`` and ``...:floor`` (a sorted
set: each worker's highest version seen, its score, so the workers' floor is one read inside
the publish script). The braces are a Redis Cluster hash tag: all the keys of one config key
live in one slot, so the publish script that reads and appends atomically also works on a
cluster.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from subscriber.defaults import DEFAULT_PREFIX
from subscriber.errors import ConfigurationError

# DEFAULT_PREFIX is defined in subscriber.defaults, re-exported here beside the key names
__all__ = ["DEFAULT_PREFIX", "StreamKeys", "stream_keys", "validate_key"]

# ConfigMap keys are [-._a-zA-Z0-9]+ (max 253); braces would break the hash tag and ':' the
# key scheme, so the same rule also protects names chosen by an operator.
_KEY_RE = re.compile(r"[-._a-zA-Z0-9]{1,253}")
_PREFIX_RE = re.compile(r"[^{}\s]{1,100}")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid config key, else raise ``ConfigurationError``."""
    if not _KEY_RE.fullmatch(key) or key in {".", ".."}:
        raise ConfigurationError(
            f"invalid config key {key!r}: use a ConfigMap key name "
            "(letters, digits, '-', '_', '.'; at most 253 characters)"
        )
    return key


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """The Redis keys of one config key."""

    events: str
    acks: str
    workers: str
    floor: str


def stream_keys(key: str, prefix: str = DEFAULT_PREFIX) -> StreamKeys:
    validate_key(key)
    if not _PREFIX_RE.fullmatch(prefix):
        raise ConfigurationError(
            f"invalid prefix {prefix!r}: no braces or spaces, at most 100 characters"
        )
    base = f"{prefix}:{{{key}}}"
    return StreamKeys(
        events=f"{base}:events",
        acks=f"{base}:acks",
        workers=f"{base}:workers",
        floor=f"{base}:floor",
    )
