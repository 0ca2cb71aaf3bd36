"""Typed configs: decode JSON, YAML or TOML content with msgspec into a given type.

::

    class Limits(msgspec.Struct):
        rate: int
        burst: int = 10

    sub, limits = typed_subscriber("limits.yaml", Limits)
    sub.start()
    ...
    limits.value.rate  # in a request handler: no lock, always one complete, valid config

Content that does not decode into the type is rejected with msgspec's message, which names
the offending field (``Expected `int`, got `str` - at `$.rate```); that text is what the
operator sees in ``:acks``. ``value`` is replaced by a single reference assignment, so a
reader sees either the old or the new object, never a mix.

A snapshot key (a whole environment-style ConfigMap, ``hotreload watch --snapshot NAME``) is
format ``"snapshot"``: the key -> value map is converted into the type with msgspec's lax
conversion (``"30"`` -> ``30``, ``"true"`` -> ``True``, ``"PT5M"`` or ``"300"`` -> a
``timedelta``), so a missing or malformed setting rejects the whole update, naming the key::

    class Settings(msgspec.Struct, rename="upper"):  # field timeout_s <- key TIMEOUT_S
        timeout_s: int
        debug: bool = False

    sub, settings = typed_snapshot("app-env", Settings)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Mapping
from typing import Any, Generic, Literal, TypeVar, get_args

import msgspec

from subscriber.client import Subscriber
from subscriber.errors import ConfigurationError
from subscriber.protocol import decode_snapshot

__all__ = ["Format", "TypedConfig", "format_for_key", "typed_snapshot", "typed_subscriber"]

T = TypeVar("T")
Format = Literal["yaml", "json", "toml", "snapshot"]
_FORMATS: tuple[str, ...] = get_args(Format)
_EXTENSIONS: dict[str, Format] = {
    ".yaml": "yaml",
    ".yml": "yaml",
    ".json": "json",
    ".toml": "toml",
}


def format_for_key(key: str) -> Format:
    """The format a config key's extension implies (``app.yaml`` -> ``yaml``)."""
    _, extension = os.path.splitext(key)
    try:
        return _EXTENSIONS[extension.lower()]
    except KeyError:
        raise ConfigurationError(
            f"cannot tell the format of {key!r} from its extension; pass format= "
            f"(one of {', '.join(_FORMATS)})"
        ) from None


def _convert_snapshot(content: str | bytes | Mapping[str, str], *, type: Any, strict: bool) -> Any:
    """A snapshot's map (or its encoded content) converted into ``type``."""
    if isinstance(content, bytes):
        content = {name: raw.decode("utf-8") for name, raw in decode_snapshot(content).items()}
    elif isinstance(content, str):
        raise TypeError("a snapshot config is a mapping: subscribe with snapshot=True")
    return msgspec.convert(dict(content), type, strict=strict)


def _decoder(fmt: Format) -> Callable[..., Any]:
    # Imported when a TypedConfig needs it: YAML decoding needs PyYAML, which JSON and TOML
    # users may lack. PyYAML itself now, not on the first decode: a TypedConfig is made at
    # import, so under gunicorn preload_app its ~1 MiB is shared with every worker instead
    # of allocated in each (measured: -1.1 MiB USS per worker, bench_gunicorn).
    if fmt == "snapshot":
        return _convert_snapshot
    if fmt == "json":
        return msgspec.json.decode
    if fmt == "yaml":
        import yaml  # noqa: F401
        from msgspec import yaml as msgspec_yaml

        return msgspec_yaml.decode
    from msgspec import toml

    return toml.decode


class TypedConfig(Generic[T]):
    """Holds the current config decoded into ``type_``; use ``apply`` as the callback.

    ``type_`` is anything msgspec decodes into: a ``msgspec.Struct``, ``dict[str, bool]``,
    a dataclass, ... ``format`` is ``"yaml"`` (default), ``"json"``, ``"toml"`` or
    ``"snapshot"`` (the key -> value map of a snapshot subscription). ``strict=False`` lets
    msgspec convert strings to numbers and the like; ``None`` (default) means strict, except
    for ``"snapshot"``, whose values are all strings.
    """

    def __init__(
        self, type_: type[T], format: Format = "yaml", *, strict: bool | None = None
    ) -> None:
        if format not in _FORMATS:
            raise ConfigurationError(f"unknown format {format!r}: use one of {_FORMATS}")
        if format == "yaml" and importlib.util.find_spec("yaml") is None:
            # Fail here, not by rejecting every config later with an ImportError.
            raise ConfigurationError(
                "YAML configs need PyYAML: pip install 'configmap-hotreload[yaml]'"
            )
        self.type = type_
        self.format: Format = format
        self._strict = strict if strict is not None else format != "snapshot"
        self._decode = _decoder(format)
        # msgspec builds a Struct's decoding plan on first use (evaluating its annotations)
        # and keeps it on the class: build it now, at import, so that under gunicorn
        # preload_app the workers share it. A type whose annotations cannot be resolved
        # yet (a name defined further down) gets it on its first decode instead, as before.
        with contextlib.suppress(Exception):
            msgspec.json.Decoder(type_)
        # A 1-tuple, replaced whole: one attribute read gives a reader a complete value.
        self._box: tuple[T] | None = None

    def decode(self, content: str | bytes | Mapping[str, str]) -> T:
        """Decode and validate ``content``; raises ``msgspec.DecodeError`` (a ValueError)
        naming the field that does not fit."""
        value: T = self._decode(content, type=self.type, strict=self._strict)
        return value

    def apply(self, content: Any) -> None:
        """Decode ``content`` and make it the current value, or raise and keep the old one.

        ``content`` is what :meth:`decode` takes (``str | bytes``, or a snapshot's
        ``Mapping[str, str]``); typed ``Any`` so wrappers typed for text stay assignable."""
        self._box = (self.decode(content),)

    @property
    def value(self) -> T:
        """The current config object. Treat it as read-only: it is shared by every thread."""
        box = self._box
        if box is None:
            raise LookupError(f"no {self.format} config applied yet: start the Subscriber first")
        return box[0]

    @property
    def loaded(self) -> bool:
        return self._box is not None

    def __repr__(self) -> str:
        name = getattr(self.type, "__name__", repr(self.type))
        return f"<TypedConfig {name} {self.format} loaded={self.loaded}>"


def typed_subscriber(
    key: str,
    type_: type[T],
    *,
    format: Format | None = None,
    strict: bool | None = None,
    **subscriber_kwargs: Any,
) -> tuple[Subscriber, TypedConfig[T]]:
    """A ``Subscriber`` for ``key`` whose callback decodes into ``type_``, and the holder.

    ``format`` defaults to the key's extension (``.yaml``/``.yml``, ``.json``, ``.toml``);
    ``subscriber_kwargs`` go to ``Subscriber`` (``redis_url``, ``fallback_path``, ...).
    ``format="snapshot"`` subscribes with ``snapshot=True`` (see :func:`typed_snapshot`).
    """
    config = TypedConfig(type_, format or format_for_key(key), strict=strict)
    if config.format == "snapshot":
        subscriber_kwargs["snapshot"] = True
    return Subscriber(key, config.apply, **subscriber_kwargs), config


def typed_snapshot(
    key: str, type_: type[T], *, strict: bool = False, **subscriber_kwargs: Any
) -> tuple[Subscriber, TypedConfig[T]]:
    """A snapshot ``Subscriber`` for ``key`` converting the whole map into ``type_``.

    Values are strings; ``strict=False`` (default) lets msgspec convert them (``"30"`` ->
    ``int``, ``"true"`` -> ``bool``...). A missing or malformed key rejects the whole update
    with msgspec's message naming it (``Expected `int`, got `str` - at `$.TIMEOUT_S```).
    """
    return typed_subscriber(key, type_, format="snapshot", strict=strict, **subscriber_kwargs)
