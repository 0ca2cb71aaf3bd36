"""hotreload subscriber: validate, apply and acknowledge config events in every worker.

The errors are plain classes and load at once; every other public name loads on first use (a
module ``__getattr__``, as stamina does), so that importing ``subscriber.errors`` (as
``publisher.FileWatcher`` does) or ``subscriber.keys`` does not load redis-py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from subscriber._lazy import lazy_names
from subscriber.errors import (
    ChecksumMismatch,
    ConfigurationError,
    ContentTooLarge,
    HotReloadError,
    InitialLoadError,
    MalformedEntry,
    NoAcceptableConfig,
    RedisUnavailable,
    SignatureInvalid,
    SigningKeyMismatch,
)

if TYPE_CHECKING:
    from subscriber.aio import AsyncSubscriber
    from subscriber.client import Subscriber, all_subscribers, unstarted
    from subscriber.typed import TypedConfig, typed_snapshot, typed_subscriber

__all__ = [
    "AsyncSubscriber",
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
    "Subscriber",
    "TypedConfig",
    "all_subscribers",
    "typed_snapshot",
    "typed_subscriber",
    "unstarted",
]

_HOMES = {
    "AsyncSubscriber": "subscriber.aio",
    "Subscriber": "subscriber.client",
    "TypedConfig": "subscriber.typed",
    "all_subscribers": "subscriber.client",
    "typed_snapshot": "subscriber.typed",
    "typed_subscriber": "subscriber.typed",
    "unstarted": "subscriber.client",
}

__getattr__, __dir__ = lazy_names(globals(), _HOMES, __all__)
