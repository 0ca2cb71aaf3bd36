"""Snapshots: a whole ConfigMap (key -> raw bytes) as one content.

The layout is part of the wire contract (``protocol`` documents it and re-exports these
names); these functions are the only code that knows it.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

__all__ = [
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_MAGIC",
    "SNAPSHOT_VERSION",
    "decode_snapshot",
    "encode_snapshot",
    "is_snapshot",
]

SNAPSHOT_FORMAT = "hotreload-snapshot"
SNAPSHOT_VERSION = 1
_snapshot_encoder = msgspec.msgpack.Encoder(order="sorted")
# array of 3, str of 18 "hotreload-snapshot", int 1: how every encode_snapshot() output begins
SNAPSHOT_MAGIC = b"\x93\xb2hotreload-snapshot\x01"
_snapshot_decoder = msgspec.msgpack.Decoder(tuple[str, int, dict[str, bytes]])


def encode_snapshot(files: Mapping[str, bytes]) -> bytes:
    """The content of a snapshot entry for ``files`` (key -> raw bytes); deterministic."""
    return _snapshot_encoder.encode((SNAPSHOT_FORMAT, SNAPSHOT_VERSION, dict(files)))


def is_snapshot(content: bytes) -> bool:
    """Whether ``content`` is a snapshot (starts with :data:`SNAPSHOT_MAGIC`)."""
    return content.startswith(SNAPSHOT_MAGIC)


def decode_snapshot(content: bytes) -> dict[str, bytes]:
    """The key -> raw bytes map of a snapshot content, or ``ValueError`` with the reason."""
    if not is_snapshot(content):
        raise ValueError(
            "the entry is a single config file, not a snapshot (a whole ConfigMap published "
            "with `hotreload watch --snapshot NAME`); subscribe to it without snapshot=True"
        )
    try:
        name, version, files = _snapshot_decoder.decode(content)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed snapshot content: {exc}") from None
    if (name, version) != (SNAPSHOT_FORMAT, SNAPSHOT_VERSION):  # pragma: no cover - magic
        raise ValueError(f"snapshot format {name!r} version {version} is not understood")
    return files
