"""hotreload subscriber: validate, apply and acknowledge config events in every worker."""

from subscriber.errors import (
    ChecksumMismatch,
    ConfigurationError,
    ContentTooLarge,
    HotReloadError,
    InitialLoadError,
    MalformedEntry,
    NoAcceptableConfig,
    RedisUnavailable,
)

__all__ = [
    "ChecksumMismatch",
    "ConfigurationError",
    "ContentTooLarge",
    "HotReloadError",
    "InitialLoadError",
    "MalformedEntry",
    "NoAcceptableConfig",
    "RedisUnavailable",
]
