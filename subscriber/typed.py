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
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar, get_args

import msgspec

from subscriber.client import Subscriber
from subscriber.errors import ConfigurationError

__all__ = ["Format", "TypedConfig", "format_for_key", "typed_subscriber"]

T = TypeVar("T")
Format = Literal["yaml", "json", "toml"]
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


def _decoder(fmt: Format) -> Callable[..., Any]:
    # Imported on first use: YAML decoding needs PyYAML, which JSON and TOML users may lack
    # (msgspec.yaml then fails with a clear ImportError when the first content arrives).
    if fmt == "json":
        return msgspec.json.decode
    if fmt == "yaml":
        from msgspec import yaml

        return yaml.decode
    from msgspec import toml

    return toml.decode


class TypedConfig(Generic[T]):
    """Holds the current config decoded into ``type_``; use ``apply`` as the callback.

    ``type_`` is anything msgspec decodes into: a ``msgspec.Struct``, ``dict[str, bool]``,
    a dataclass, ... ``format`` is ``"yaml"`` (default), ``"json"`` or ``"toml"``.
    ``strict=False`` lets msgspec convert strings to numbers and the like.
    """

    def __init__(self, type_: type[T], format: Format = "yaml", *, strict: bool = True) -> None:
        if format not in _FORMATS:
            raise ConfigurationError(f"unknown format {format!r}: use one of {_FORMATS}")
        if format == "yaml" and importlib.util.find_spec("yaml") is None:
            # Fail here, not by rejecting every config later with an ImportError.
            raise ConfigurationError(
                "YAML configs need PyYAML: pip install 'configmap-hotreload[yaml]'"
            )
        self.type = type_
        self.format: Format = format
        self._strict = strict
        self._decode = _decoder(format)
        # A 1-tuple, replaced whole: one attribute read gives a reader a complete value.
        self._box: tuple[T] | None = None

    def decode(self, content: str | bytes) -> T:
        """Decode and validate ``content``; raises ``msgspec.DecodeError`` (a ValueError)
        naming the field that does not fit."""
        value: T = self._decode(content, type=self.type, strict=self._strict)
        return value

    def apply(self, content: str | bytes) -> None:
        """Decode ``content`` and make it the current value, or raise and keep the old one."""
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
    strict: bool = True,
    **subscriber_kwargs: Any,
) -> tuple[Subscriber, TypedConfig[T]]:
    """A ``Subscriber`` for ``key`` whose callback decodes into ``type_``, and the holder.

    ``format`` defaults to the key's extension (``.yaml``/``.yml``, ``.json``, ``.toml``);
    ``subscriber_kwargs`` go to ``Subscriber`` (``redis_url``, ``fallback_path``, ...).
    """
    config = TypedConfig(type_, format or format_for_key(key), strict=strict)
    return Subscriber(key, config.apply, **subscriber_kwargs), config
