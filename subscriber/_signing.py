"""Signing: the keys, their public ids and the message an event's ``sig`` is the HMAC of.

Part of the wire contract (``protocol`` re-exports every name here and documents the fields);
kept apart because it is the one part of the contract that touches secrets, and so the rules
for them (length, normalization, domain separation) read in one place.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["MIN_SIGNING_KEY_BYTES", "key_id", "sign", "signature_message", "signing_key"]

# A signing key shorter than this is refused on both sides: an HMAC is only as strong as its
# key, and a short one can be guessed offline from any signed entry.
MIN_SIGNING_KEY_BYTES = 16
_SIGNATURE_CONTEXT = b"hotreload-event-v1"  # domain separation: never valid for other data
_SIGNATURE_CONTEXT_V2 = b"hotreload-event-v2"  # entries with an audience
_KEY_ID_CONTEXT = b"hotreload-key-id-v1\x00"


def signing_key(raw: bytes | str) -> bytes:
    """A signing key as the publisher and subscribers both use it, or ``ValueError``.

    Surrounding ASCII whitespace is dropped on both sides (``echo KEY > file`` and
    ``kubectl create secret --from-file`` keep a trailing newline), and what is left must be
    at least ``MIN_SIGNING_KEY_BYTES`` long. ``openssl rand -hex 32`` makes a good key.
    """
    key = (raw.encode() if isinstance(raw, str) else bytes(raw)).strip(b" \t\r\n\v\f")
    if len(key) < MIN_SIGNING_KEY_BYTES:
        raise ValueError(
            f"the signing key is {len(key)} bytes, shorter than {MIN_SIGNING_KEY_BYTES} "
            "(surrounding whitespace does not count); make one with: openssl rand -hex 32"
        )
    return key


def key_id(key: bytes) -> str:
    """The public name of a signing key (16 hex digits): a one-way hash, safe to log."""
    return hashlib.sha256(_KEY_ID_CONTEXT + key).hexdigest()[:16]


def signature_message(
    key: str,
    version: int,
    sha256: str,
    published_at: int,
    *,
    audience_json: str | None = None,
    rollout: str = "",
) -> bytes:
    """The bytes an event's ``sig`` is the HMAC of: its identity, one field per line.

    Key names cannot hold a newline (``keys.validate_key``) and the other parts are decimal
    or hex, so no two identities give the same message. Without ``audience_json`` (the
    entry's ``audience`` field, its exact text) it is the v1 message, byte for byte what it
    was before rollout control (``rollout`` is then an unsigned label and not part of it).
    With it, the v2 message: its own context, then ``rollout`` and the audience, so an
    audience stripped (the v1 message would not verify) or changed breaks the signature.
    Neither may hold a newline (``ValueError``): every v2 message has exactly seven lines,
    so no other split of one gives another entry's fields.
    """
    if audience_json is None:
        return b"%b\n%b\n%d\n%b\n%d" % (
            _SIGNATURE_CONTEXT,
            key.encode(),
            version,
            sha256.encode(),
            published_at,
        )
    if "\n" in audience_json or "\n" in rollout:
        raise ValueError("an audience or rollout holding a newline cannot be signed")
    return b"%b\n%b\n%d\n%b\n%d\n%b\n%b" % (
        _SIGNATURE_CONTEXT_V2,
        key.encode(),
        version,
        sha256.encode(),
        published_at,
        rollout.encode("utf-8", "surrogateescape"),
        audience_json.encode("utf-8", "surrogateescape"),
    )


def sign(
    secret: bytes,
    key: str,
    version: int,
    sha256: str,
    published_at: int,
    *,
    audience_json: str | None = None,
    rollout: str = "",
) -> str:
    """The ``sig`` field of an event: hex HMAC-SHA256 of :func:`signature_message`."""
    message = signature_message(
        key, version, sha256, published_at, audience_json=audience_json, rollout=rollout
    )
    return hmac.new(secret, message, hashlib.sha256).hexdigest()
