"""The rollout fields of one publish: what ``publish.lua``'s rollout arguments carry.

A canary entry names its audience (the worker ids it is for) and is schema 2, signed with the
v2 message that covers the audience and the rollout kind, so stripping or changing the
audience breaks the signature. Promote, halt and rollback entries are for everyone: schema 1,
the v1 signature byte for byte, their ``rollout*`` / ``request`` / ``reason`` fields unsigned
labels (they change what history shows, never what a worker runs). An operation (``expect``
set) is written only on top of the entry its caller decided on, so racing daemons write one.
"""

from __future__ import annotations

from dataclasses import dataclass

from subscriber.protocol import AUDIENCE_SCHEMA, SCHEMA_VERSION, encode_audience, sign

__all__ = ["AUDIENCE_SCHEMA", "REFUSALS", "RolloutMark", "audience_json"]

# publish.lua's answers that write nothing and are not "found": pinned by a rollback, the
# halted canary content, an operation whose expected newest entry is no longer the newest
REFUSALS = {4: "pinned", 5: "halted", 6: "moved"}
_REASON_LIMIT = 200


def audience_json(audience: tuple[str, ...]) -> str:
    """The ``audience`` field's exact text (``protocol.encode_audience``: compact, sorted)."""
    return encode_audience(audience)


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
        if self.audience is None:  # for everyone: the v1 message, byte for byte
            return sign(secret, key, version, sha256, published_at)
        return sign(
            secret,
            key,
            version,
            sha256,
            published_at,
            audience_json=audience_json(self.audience),
            rollout=self.rollout,
        )
