"""The rollout fields of one publish: what ``publish.lua``'s rollout arguments carry.

A canary entry names its audience (the worker ids it is for) and is schema 2, signed with the
v2 message that covers the audience and the rollout kind, so stripping or changing the
audience breaks the signature. Promote, halt and rollback entries are for everyone: schema 1,
the v1 signature byte for byte, their ``rollout*`` / ``request`` / ``reason`` fields unsigned
labels (they change what history shows, never what a worker runs). An operation (``expect``
set) is written only on top of the entry its caller decided on, so racing daemons write one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass

from subscriber.protocol import SCHEMA_VERSION, sign

__all__ = ["AUDIENCE_SCHEMA", "REFUSALS", "RolloutMark", "audience_json", "sign_v2"]

AUDIENCE_SCHEMA = 2  # entries with an audience; older subscribers reject them as malformed
_V2_CONTEXT = b"hotreload-event-v2"
# publish.lua's answers that write nothing and are not "found": pinned by a rollback, the
# halted canary content, an operation whose expected newest entry is no longer the newest
REFUSALS = {4: "pinned", 5: "halted", 6: "moved"}
_REASON_LIMIT = 200


def audience_json(audience: tuple[str, ...]) -> str:
    """The ``audience`` field's exact text: a compact JSON array, ids sorted."""
    return json.dumps(sorted(audience), separators=(",", ":"))


def sign_v2(
    secret: bytes,
    key: str,
    version: int,
    sha256: str,
    published_at: int,
    *,
    rollout: str,
    audience: str,
) -> str:
    """The v2 signature (entries with an audience): context, key, version, sha256,
    published_at, rollout, the audience's JSON text, one per line (the contract's message;
    ``subscriber.protocol.sign`` computes the same once it takes ``audience_json``)."""
    message = b"\n".join(
        [
            _V2_CONTEXT,
            key.encode(),
            b"%d" % version,
            sha256.encode(),
            b"%d" % published_at,
            rollout.encode(),
            audience.encode(),
        ]
    )
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class RolloutMark:
    """The rollout fields of one entry to write (all optional; see ``publish.lua``).

    ``expect``: an operation (promote, halt, rollback, a restored pin): the version the newest
    entry must have (0: an empty stream), else nothing is written (``moved``).
    """

    rollout: str = ""
    audience: tuple[str, ...] | None = None
    rollout_of: int = 0
    rollout_sha256: str = ""
    request: str = ""
    expect: int | None = None
    reason: str = ""

    @property
    def schema(self) -> int:
        return AUDIENCE_SCHEMA if self.audience is not None else SCHEMA_VERSION

    def args(self) -> list[str]:
        """ARGV[17..23] of ``publish.lua``."""
        return [
            audience_json(self.audience) if self.audience is not None else "",
            self.rollout,
            str(self.rollout_of) if self.rollout_of else "",
            self.rollout_sha256,
            self.request,
            "" if self.expect is None else str(self.expect),
            " ".join(self.reason.split())[:_REASON_LIMIT],
        ]

    def sign(self, secret: bytes, key: str, version: int, sha256: str, published_at: int) -> str:
        if self.audience is None:
            return sign(secret, key, version, sha256, published_at)
        return sign_v2(
            secret,
            key,
            version,
            sha256,
            published_at,
            rollout=self.rollout,
            audience=audience_json(self.audience),
        )
