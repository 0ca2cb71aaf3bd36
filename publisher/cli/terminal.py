"""The terminal a rendering goes to, text made safe for it, and tables that fit it.

Tables fit 80 columns (or the terminal's width, on a terminal): a column marked ``shrink``
gives up width (with ``...``) when the rows would be wider, and long free text (errors,
malformed-entry reasons) goes on a note line under its row instead of a column. Text that came
from Redis is made one printable line first, by the rule logs follow too
(``publisher._printable``), so a worker's multi-line error or stray escape codes cannot break
the layout or drive the terminal. Colour is applied after
padding (escape codes take no columns) and only when the caller's ``Terminal`` says so.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Literal

__all__ = [
    "Cell",
    "Column",
    "Note",
    "Row",
    "Terminal",
    "age_text",
    "iso_utc",
    "local_time",
    "render_table",
    "short",
    "size_text",
    "wrap",
]

WIDTH = 80
SHORT_SHA = 12
_GAP = "  "
_NOTE_LINES = 3
_ANSI = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}


@dataclass(frozen=True, slots=True)
class Terminal:
    """Where human output goes: whether to colour it and how wide tables may be."""

    colour: bool = False
    width: int = WIDTH

    @classmethod
    def for_stream(cls, stream: IO[str]) -> Terminal:
        """On a terminal: its width, and colour unless ``NO_COLOR`` is set (no-color.org).

        Pipes and logs get plain text 80 columns wide.
        """
        isatty = getattr(stream, "isatty", None)
        if not (isatty and isatty()):
            return cls()
        width = shutil.get_terminal_size((WIDTH, 24)).columns
        return cls(colour=not os.environ.get("NO_COLOR"), width=max(40, width))

    def paint(self, text: str, style: str) -> str:
        if not (self.colour and style and text):
            return text
        return f"\x1b[{_ANSI[style]}m{text}\x1b[0m"


# ---------------------------------------------------------------------------- small values


def short(sha256: str) -> str:
    return sha256[:SHORT_SHA]


def size_text(size: int | None) -> str:
    if size is None:
        return "?"
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1024 * 1024):.1f} MiB"


def age_text(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 86400)}d"


def _moment(ms: int | None) -> datetime | None:
    if ms is None:
        return None
    try:
        return datetime.fromtimestamp(ms / 1000, tz=UTC)
    except (ValueError, OverflowError, OSError):
        return None  # a malformed entry's nonsense


def local_time(ms: int | None) -> str:
    moment = _moment(ms)
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "?"


def iso_utc(ms: int | None) -> str | None:
    moment = _moment(ms)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z") if moment else None


def _truncate(text: str, width: int, where: Literal["end", "middle"]) -> str:
    if len(text) <= width:
        return text
    if width <= 3:
        return text[:width]
    if where == "middle":  # ids end in what tells them apart (a pod suffix, a pid): keep more
        head = (width - 3) // 3
        return text[:head] + "..." + text[len(text) - (width - 3 - head) :]
    return text[: width - 3] + "..."


def wrap(text: str, term: Terminal, indent: str) -> list[str]:
    lines = textwrap.wrap(
        text,
        term.width,
        initial_indent=indent,
        subsequent_indent=indent + "  ",
        break_on_hyphens=False,
        max_lines=_NOTE_LINES,
        placeholder=" ...",
    )
    return lines or [indent]


# ---------------------------------------------------------------------------- tables


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    align: Literal["<", ">"] = "<"
    shrink: Literal["", "end", "middle"] = ""  # how this column gives up width; "" never


@dataclass(frozen=True, slots=True)
class Cell:
    text: str
    style: str = ""


@dataclass(frozen=True, slots=True)
class Note:
    """Free text under the previous row, wrapped to the terminal (at most ``_NOTE_LINES``)."""

    text: str
    style: str = ""


Row = Sequence[Cell] | Note


def render_table(
    columns: Sequence[Column], rows: Sequence[Row], term: Terminal, *, indent: str = ""
) -> list[str]:
    cells = [row for row in rows if not isinstance(row, Note)]
    widths = [
        max([len(col.header)] + [len(row[i].text) for row in cells])
        for i, col in enumerate(columns)
    ]
    excess = len(indent) + sum(widths) + len(_GAP) * (len(columns) - 1) - term.width
    for i in reversed(range(len(columns))):
        if excess <= 0:
            break
        if columns[i].shrink:
            give = min(excess, widths[i] - max(len(columns[i].header), 8))
            if give > 0:
                widths[i] -= give
                excess -= give

    def line(texts: Sequence[Cell]) -> str:
        parts = []
        for i, (col, cell) in enumerate(zip(columns, texts, strict=True)):
            text = _truncate(cell.text, widths[i], col.shrink or "end")
            last = i == len(columns) - 1
            padded = text if last and col.align == "<" else f"{text:{col.align}{widths[i]}}"
            parts.append(term.paint(padded, cell.style))
        return (indent + _GAP.join(parts)).rstrip()

    lines = [line([Cell(col.header, "bold") for col in columns])]
    for row in rows:
        if isinstance(row, Note):
            lines += [term.paint(text, row.style) for text in wrap(row.text, term, indent + "  ")]
        else:
            lines.append(line(row))
    return lines
