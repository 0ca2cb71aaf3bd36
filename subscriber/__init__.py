"""hotreload subscriber: validate, apply and acknowledge config events in every worker."""

from subscriber.aio import AsyncSubscriber
from subscriber.client import Subscriber, all_subscribers, unstarted
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
