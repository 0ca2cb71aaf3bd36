"""The one rule for text from outside (Redis, file names) on an operator's terminal or in a log.

Anyone who can write Redis writes worker states, acks and snapshot key names; anyone who can
write a mounted directory names files. Printed raw, such text can move the cursor, recolour,
retitle or clear an operator's terminal, and forge or split a log line (an ESC sequence, a
newline). So everything of that kind goes through :func:`printable` before it is printed or
logged, by the CLI's renderings and by the daemon's log lines alike:

- bytes that are not UTF-8 (a file name from ``os.fsdecode``) show as ``\\xNN``;
- every character that is not printable (ESC, newlines, tabs, other controls, bidi
  overrides and the like) shows escaped (``\\x1b``, ``\\n``, ``\\u202e``): visible, never acted
  on, and one line stays one line;
- text longer than ``limit`` characters is cut, and says how long it was: a worker's 20 MiB
  error is not printed on one line.

JSON output is not scrubbed: ``json.dumps`` escapes control characters itself, and a program
reading it wants the value as it is.
"""

from __future__ import annotations

__all__ = ["MAX_PRINTED", "printable"]

MAX_PRINTED = 1000  # characters of one outside value printed, at most


def printable(text: str, *, limit: int | None = MAX_PRINTED) -> str:
    """``text`` fit for one line of a terminal or a log (see the module docstring);
    ``limit`` ``None`` never cuts (a file name: it must be told apart from others)."""
    cut = ""
    if limit is not None and len(text) > limit:
        cut = f" ... [cut: {len(text)} characters]"
        text = text[:limit]
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if not text.isprintable():
        text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text + cut
