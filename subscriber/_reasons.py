"""The texts a subscriber reports about an entry it rejected.

They go into the log, ``:acks`` and ``:workers``, so each is bounded (a callback's exception
can be arbitrarily long), never quotes a sensitive entry's content, and says what an entry
that did not even decode claimed to be. Versions only go up: :func:`replay` is why an entry
at or below what a worker has seen is refused, :func:`holding` why a worker keeps its config
on a stream that is behind it, :func:`renumbered` on one whose version it runs is another
content.
"""

from __future__ import annotations

from subscriber.protocol import parse_version

__all__ = [
    "MAX_ERROR_CHARS",
    "as_text",
    "bounded",
    "claimed",
    "claimed_version",
    "describe",
    "ended",
    "gave_up",
    "holding",
    "redact",
    "renumbered",
    "replay",
]

# Rejection texts go into :acks and :workers; a callback's exception can be arbitrarily long.
MAX_ERROR_CHARS = 2000


def as_text(raw: object) -> str:
    """A reply value as text (bytes decoded leniently; anything else: empty)."""
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "replace")
    return raw if isinstance(raw, str) else ""


def claimed(fields: object, name: str) -> str:
    """A field as the entry states it, for reporting an entry that did not decode."""
    if not isinstance(fields, dict):
        return ""
    value = fields.get(name.encode(), fields.get(name))
    return as_text(value)[:200]


def claimed_version(fields: object) -> int:
    """The version a malformed entry claims, by the wire's rule; 0 for a junk one."""
    if not isinstance(fields, dict):
        return 0
    return parse_version(fields.get(b"version", fields.get("version"))) or 0


# A sensitive entry's rejection text loses every run of this many characters that also
# occurs in its content (callback errors such as YAML's quote the offending line).
_REDACT_RUN = 6
_REDACTED = "[redacted]"


def redact(text: str, content: bytes) -> str:
    """``text`` with every run of ``_REDACT_RUN``+ characters found in ``content`` replaced.

    For rejection texts of sensitive entries: what a callback's exception quotes from the
    content never reaches the log or ``:acks``. Costs one substring search per character of
    ``text`` (at most ``MAX_ERROR_CHARS``), and runs only for a rejected sensitive entry.
    """
    haystack = content.decode("utf-8", "replace")
    hidden = [False] * len(text)
    for start in range(len(text) - _REDACT_RUN + 1):
        window = text[start : start + _REDACT_RUN]
        if not window.isspace() and haystack.find(window) >= 0:
            hidden[start : start + _REDACT_RUN] = [True] * _REDACT_RUN
    if not any(hidden):
        return text
    parts: list[str] = []
    for char, gone in zip(text, hidden, strict=True):
        if not gone:
            parts.append(char)
        elif not parts or parts[-1] != _REDACTED:
            parts.append(_REDACTED)
    return "".join(parts)


def describe(exc: BaseException) -> str:
    """The rejection text for a callback's exception: its type and message, bounded."""
    message = str(exc)
    return bounded(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def bounded(text: str) -> str:
    """``text`` cut to ``MAX_ERROR_CHARS``, saying so."""
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 15] + "... (truncated)"
    return text


def _running(version: int) -> str:
    return f"v{version}" if version else "the fallback file"


def replay(version: int, seen: int, running: int) -> str:
    """Why an entry whose version does not exceed what the worker has seen is refused."""
    return (
        f"replay: version {version} is not above version {seen}, the highest this worker has "
        "seen (an old entry appended again, or a stream restored behind the worker); keeping "
        f"{_running(running)}"
    )


def holding(running: int, highest: int, *, empty: bool, seen: int) -> str:
    """Why a worker keeps its config on a stream whose highest version is below ``seen``."""
    if highest:
        stream = f"the stream's newest version is {highest}"
    elif empty:
        stream = "the stream is empty"
    else:
        stream = "the stream holds no valid version"
    return (
        f"holding {_running(running)}: {stream} (restored, re-created or failed over behind "
        f"this worker); waiting for a version above {seen}"
    )


def renumbered(version: int, sha256: str) -> str:
    """Why a worker keeps its config when the stream's ``version`` is another content than the
    one it applied as ``version`` (sha256 ``sha256``)."""
    return (
        f"holding version {version} (sha256 {sha256[:12]}): the stream's version {version} is "
        "another entry (Redis lost the one this worker applied and numbered another content "
        f"the same); waiting for a version above {version}"
    )


def ended(exc: BaseException, key: str, version: int) -> str:
    """Why a follower ended that was not stopped (the error of its "stopped" state)."""
    return (
        f"the follower ended on {describe(exc)}; this worker no longer follows {key} "
        f"(running version {version}): restart it"
    )


def gave_up(timeout: float, callback: str, running: float) -> str:
    """Why ``stop()`` returned before the follower ended (a callback that does not return)."""
    if running:
        what = f"the callback {callback} (running for {running:.1f} s) did not return"
    else:
        what = "the follower thread did not end"
    return f"stop() gave up after {timeout:g} s: {what}; the thread is left to end alone"
