"""What ``show`` and ``diff`` print of a version's content.

Text is diffed as ``diff -u`` would (only ``\\n`` ends a line, a missing final newline is
marked); content that is not UTF-8 is described (size, hash), never dumped to a terminal. A
snapshot (a whole ConfigMap as one key) is shown as ``KEY=value`` lines and diffed key by key.
"""

from __future__ import annotations

import difflib

from publisher._printable import printable
from publisher.cli.terminal import Terminal, iso_utc, short, size_text
from subscriber.protocol import Event, decode_snapshot, is_snapshot, sha256_hex

__all__ = ["diff_lines", "snapshot_lines"]

# ---------------------------------------------------------------------------- diff

_DIFF_STYLE = {"+": "green", "-": "red", "@": "cyan"}


def _lines(text: str) -> list[str]:
    # only "\n" ends a line (str.splitlines also splits on form feeds and the like)
    parts = text.split("\n")
    return [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _text_of(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def snapshot_lines(content: bytes, *, terminal: bool = True) -> list[str]:
    """A snapshot's map, one key after the other in key order: ``KEY=value`` for a one-line
    text value, ``KEY:`` and the value's lines indented by 4 for a multi-line one, and a
    ``<binary ...>`` marker (size, hash) for a value that is not UTF-8. Key names (anyone who
    can write Redis chose them) are scrubbed (``publisher._printable``), and values too when
    ``terminal``: a pipe gets them as they are."""

    def shown(text: str) -> str:
        return printable(text, limit=None) if terminal else text

    lines: list[str] = []
    for raw_name, raw in sorted(decode_snapshot(content).items()):
        name = printable(raw_name, limit=None)  # anyone who can write Redis chose it
        text = _text_of(raw)
        if text is None:
            lines.append(f"{name}: <binary, {size_text(len(raw))}, {short(sha256_hex(raw))}>")
        elif "\n" not in text.removesuffix("\n"):
            lines.append(f"{name}={shown(text)}")
        else:
            lines.append(f"{name}:")
            lines.extend("    " + shown(line.removesuffix("\n")) for line in _lines(text))
    return lines


def _snapshot_diff(key: str, old: Event, new: Event, term: Terminal) -> list[str]:
    """Key by key: a unified diff per added, removed or changed key (``/dev/null`` on the
    side where it is missing), one line for a binary value; unchanged keys are not shown."""
    before, after = decode_snapshot(old.content), decode_snapshot(new.content)
    lines: list[str] = []
    for raw_name in sorted(before.keys() | after.keys()):
        was, now = before.get(raw_name), after.get(raw_name)
        name = printable(raw_name, limit=None)
        if was == now:
            continue
        old_label = f"{key}@v{old.version}:{name}" if was is not None else "/dev/null"
        new_label = f"{key}@v{new.version}:{name}" if now is not None else "/dev/null"
        old_text, new_text = _text_of(was or b""), _text_of(now or b"")
        if old_text is None or new_text is None:
            change = "added" if was is None else "removed" if now is None else "changed"
            lines.append(term.paint(f"Binary value of {name} {change}", "bold"))
            continue
        labels = (old_label, new_label)
        # one-line values (env-style, shown as KEY=value) have no newline to speak of
        multiline = "\n" in old_text + new_text
        lines += _unified(
            old_text, new_text, labels=labels, events=(old, new), term=term, mark_eol=multiline
        )
    return lines


def _unified(
    old_text: str,
    new_text: str,
    *,
    labels: tuple[str, str],
    events: tuple[Event, Event],
    term: Terminal,
    mark_eol: bool = True,
) -> list[str]:
    (old_label, new_label), (old, new) = labels, events
    lines = []
    diff = difflib.unified_diff(
        _lines(old_text),
        _lines(new_text),
        fromfile=old_label,
        tofile=new_label,
        fromfiledate=iso_utc(old.published_at) or "",
        tofiledate=iso_utc(new.published_at) or "",
    )
    for n, raw in enumerate(diff):
        text = raw.removesuffix("\n")
        lines.append(term.paint(text, "bold" if n < 2 else _DIFF_STYLE.get(text[:1], "")))
        if mark_eol and not raw.endswith("\n"):  # as diff(1) marks it
            lines.append("\\ No newline at end of file")
    return lines


def diff_lines(key: str, old: Event, new: Event, term: Terminal) -> list[str]:
    """A unified diff of two versions' content; one line saying so when either is binary.
    Two snapshots are diffed key by key (:func:`_snapshot_diff`)."""
    old_label, new_label = f"{key}@v{old.version}", f"{key}@v{new.version}"
    if is_snapshot(old.content) and is_snapshot(new.content):
        return _snapshot_diff(key, old, new, term)
    try:
        old_text, new_text = old.content.decode("utf-8"), new.content.decode("utf-8")
    except UnicodeDecodeError:
        if old.sha256 == new.sha256:
            return []
        return [
            f"Binary contents {old_label} ({size_text(len(old.content))}, "
            f"{short(old.sha256)}) and {new_label} ({size_text(len(new.content))}, "
            f"{short(new.sha256)}) differ; not UTF-8, use `hotreload show` to get the bytes"
        ]
    return _unified(old_text, new_text, labels=(old_label, new_label), events=(old, new), term=term)
