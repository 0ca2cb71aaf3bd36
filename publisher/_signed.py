"""Whether an entry the publish script returned is signed with this publisher's key.

A skip or a superseded answer returns the entry's signature: an entry anyone could append
(a forged copy of the content, a forged newest entry) must not hold the real content back,
so ``publisher.publish`` looks past one that does not verify (``force``, see ``publish.lua``).
"""

from __future__ import annotations

import hmac

from subscriber.protocol import sign

__all__ = ["genuine", "superseded_genuine", "text"]


def text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def genuine(secret: bytes, key: str, version: int, digest: str, found: list[object]) -> bool:
    """Whether the entry the script returned (its ``sig`` and ``published_at``) is signed with
    ``secret`` for ``digest``: a forged copy of the same content must not hold the real one
    back, nor a forged newest entry a publisher that is superseded."""
    if len(found) != 2:
        return False
    raw_sig, raw_published = (text(v) for v in found)
    try:
        published_at = int(raw_published)
    except ValueError:
        return False
    expected = sign(secret, key, version, digest, published_at)
    return hmac.compare_digest(expected.encode(), raw_sig.encode())


def superseded_genuine(
    signer: tuple[bytes, str], key: str, version: int, found: list[object]
) -> bool:
    """Whether the newest entry of a superseded answer (``found``: its sig, published_at,
    sha256 and kid; it carries another content) is signed with our key."""
    if len(found) != 4 or text(found[3]) != signer[1]:
        return False
    return genuine(signer[0], key, version, text(found[2]), found[:2])
