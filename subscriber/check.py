"""What a worker would decide about a config, decided before it is published: ``hotreload check``.

A CI job runs the workers' own validation on the files it is about to ``kubectl apply``; a
content the workers would reject is then stopped before it reaches any of them. To say
*exactly* what a worker would say, nothing here re-implements a worker's decision: the
content goes through the same :meth:`SubscriberCore.apply <subscriber._core.SubscriberCore.apply>`
a worker runs (UTF-8 decoding, the snapshot checks, the callback) and a rejection is described
by the same ``_reasons`` functions that write the ``error`` of a worker's ack in ``:acks``
(bounded; redacted for a ``sensitive`` key). A typed config (``--type MODULE:TYPE``) uses the
very ``TypedConfig`` a ``typed_subscriber`` would.

Loading what the worker runs is the part that is not a worker's: :func:`load_object` imports
``MODULE`` and follows ``ATTR.ATTR...`` (``app:rate_limits.apply``); anything wrong there is
a ``ConfigurationError`` (bad input, exit 2 for the CLI), never a rejection.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

import msgspec

from subscriber import _reasons
from subscriber._core import SubscriberCore
from subscriber.errors import ConfigurationError
from subscriber.protocol import MAX_CONTENT_BYTES
from subscriber.typed import Format, TypedConfig

__all__ = ["load_object", "rejection", "typed_callback"]

_log = logging.getLogger(__name__)


def load_object(spec: str) -> Any:
    """``MODULE:ATTR[.ATTR...]`` imported and looked up, or ``ConfigurationError``."""
    module_name, colon, path = spec.partition(":")
    if not colon or not module_name or not path:
        raise ConfigurationError(f"{spec!r} is not MODULE:NAME (e.g. app:rate_limits.apply)")
    try:
        found: Any = importlib.import_module(module_name)
    except BaseException as exc:  # whatever importing the app raises (SystemExit too)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise ConfigurationError(
            f"cannot import {module_name!r}: {_reasons.describe(exc)}"
        ) from None
    for name in path.split("."):
        try:
            found = getattr(found, name)
        except AttributeError:
            raise ConfigurationError(f"{spec!r}: {module_name} has no attribute {path}") from None
    return found


def typed_callback(type_: Any, format: Format) -> Callable[[Any], object]:
    """The callback a ``typed_subscriber`` of ``type_`` runs, or ``ConfigurationError``."""
    try:
        msgspec.json.Decoder(type_)  # msgspec's own test of a type it can decode into
    except TypeError as exc:
        raise ConfigurationError(f"{type_!r} is not a type msgspec decodes into: {exc}") from None
    return TypedConfig(type_, format).apply


def rejection(
    content: bytes,
    callback: Callable[[Any], object],
    *,
    decode: bool = True,
    snapshot: bool = False,
    sensitive: bool = False,
) -> str | None:
    """``None`` when a worker with this callback would apply ``content``; otherwise the
    ``error`` its ack would carry. ``decode``/``snapshot`` as the worker's ``Subscriber``
    takes them; ``sensitive``: the key is published with ``--sensitive``."""
    if not callable(callback):
        raise ConfigurationError(f"{callback!r} is not callable")
    if len(content) > MAX_CONTENT_BYTES:  # the publisher refuses it: no worker gets it
        return f"content is {len(content)} bytes, over the {MAX_CONTENT_BYTES} limit"
    core = SubscriberCore(
        "check",
        callback,
        decode=decode,
        logger=_log,
        snapshot=snapshot,
        propagates=lambda exc: isinstance(exc, KeyboardInterrupt),
    )
    try:
        core.apply(content)
    except BaseException as exc:  # SystemExit too, as a worker: see Subscriber
        if core.propagates(exc):
            raise
        error = _reasons.describe(exc)
        return _reasons.redact(error, content) if sensitive else error
    return None
