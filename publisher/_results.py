"""What a publish returns or raises (re-exported by ``publisher.publish``)."""

from __future__ import annotations

from dataclasses import dataclass

from subscriber.errors import HotReloadError

__all__ = ["PublishConflict", "PublishResult", "VersionsExhausted"]


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What one compare-and-publish did for one key."""

    key: str
    written: bool  # False: the stream already carried this content (see ``publish``)
    version: int  # the new version, or that of the entry found carrying the content
    entry_id: str
    sha256: str
    size: int
    kid: str = ""  # id of the key the newest entry is signed with; "" when unsigned
    sensitive: bool = False
    # not written, and the entry (the newest) does not carry this content: it is unchanged
    # since this publisher's previous call and another publisher wrote after that, having seen
    # further, or (first call) it is in an older entry and another host wrote after that one
    # (this publisher's mount lags); version and entry_id are the newest entry's
    superseded: bool = False
    # not written: "pinned" (the newest entry is a rollback from this content), "halted" (a
    # halt of it), "moved" (an operation's expected newest entry is no longer the newest)
    refused: str = ""
    # not written: not found after this publisher's base, and another publisher appended an
    # entry after that and after what this one had seen when it read the content (``seen``),
    # so the content may be older; version and entry_id are the newest entry's, the base stays
    behind: bool = False


class PublishConflict(HotReloadError):
    """A signed publish lost the race for the next version ``MAX_SIGN_ATTEMPTS`` times in a
    row (other publishers kept appending); nothing was written, try again later."""

    def __init__(self, key: str, attempts: int) -> None:
        self.key = key
        self.attempts = attempts
        super().__init__(
            f"{key}: other publishers took the next version {attempts} times in a row; "
            "the signed publish is retried later"
        )


class VersionsExhausted(PublishConflict):
    """Nothing written: the highest version (in the stream, this publisher's floor or the
    workers' reports) is ``MAX_VERSION``, so no version is left above it; only a junk entry
    gets there. The message names it and what to do (``publisher._head.exhausted``)."""

    def __init__(self, key: str, message: str, entry_id: str) -> None:
        self.key, self.attempts, self.entry_id = key, 0, entry_id
        HotReloadError.__init__(self, message)
