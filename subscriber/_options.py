"""The subscriber's options checked, and its fallback file read.

The constructor of ``Subscriber`` and ``AsyncSubscriber`` refuses a setting that cannot work
with a ``ConfigurationError`` saying what to pass instead (before any I/O: a subscriber is
often made at import time); ``start()`` reads ``fallback_path=`` with :func:`read_fallback`
when Redis cannot give it a config.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from subscriber.errors import ConfigurationError
from subscriber.protocol import encode_snapshot, signing_key

__all__ = ["read_fallback", "require", "signing_keys"]


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)


def signing_keys(given: bytes | str | Sequence[bytes | str] | None) -> list[bytes]:
    """``signing_key=`` as a list of normalized keys (``[]``: signatures are not checked)."""
    if given is None:
        return []
    keys = [given] if isinstance(given, bytes | bytearray | str) else list(given)
    require(bool(keys), "signing_key= is an empty list: give at least one key, or None")
    normalized: list[bytes] = []
    for raw in keys:
        require(
            isinstance(raw, bytes | bytearray | str),
            f"signing_key= must be bytes or a list of bytes, not {type(raw).__name__}",
        )
        try:
            key = signing_key(raw)
        except ValueError as exc:
            raise ConfigurationError(f"signing_key=: {exc}") from None
        if key not in normalized:
            normalized.append(key)
    return normalized


def read_fallback(path: Path, *, snapshot: bool) -> bytes:
    """The content of ``fallback_path=``: the file, or for a snapshot subscriber also a mount
    directory (raises ``OSError``)."""
    if snapshot and path.is_dir():
        return _read_directory(path)
    return path.read_bytes()


def _read_directory(path: Path) -> bytes:
    """A mount directory's keys (its files not starting with ``.``) as a snapshot content,
    read from the resolved ``..data`` target of a kubelet volume (one consistent set)."""
    if (path / "..data").is_dir():
        path = (path / "..data").resolve()
    files = {
        child.name: child.read_bytes()
        for child in sorted(path.iterdir())
        if not child.name.startswith(".") and child.is_file()
    }
    return encode_snapshot(files)
