"""Human and JSON renderings of ``publisher.inspect`` results, for ``publisher.cli``.

Tables fit 80 columns (or the terminal's width, on a terminal): a column marked ``shrink``
gives up width (with ``...``) when the rows would be wider, and long free text (errors,
malformed-entry reasons) goes on a note line under its row instead of a column. Text that came
from Redis is flattened to one printable line, so a worker's multi-line error or stray escape
codes cannot break the layout or the terminal. Colour is applied after padding (escape codes
take no columns) and only when the caller's ``Terminal`` says so.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Literal

from publisher.inspect import Convergence, HistoryRow, StatusReport, WaitResult, WorkerRow
from subscriber.protocol import Event, decode_snapshot, is_snapshot, sha256_hex

__all__ = [
    "Terminal",
    "diff_lines",
    "history_json",
    "history_lines",
    "snapshot_lines",
    "status_json",
    "status_lines",
    "wait_lines",
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


_ESCAPE_SEQUENCE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def one_line(text: str) -> str:
    """No escape sequences, printable characters only, whitespace runs as one space."""
    text = _ESCAPE_SEQUENCE.sub("", text)
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


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


def _wrap(text: str, term: Terminal, indent: str) -> list[str]:
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
            lines += [term.paint(text, row.style) for text in _wrap(row.text, term, indent + "  ")]
        else:
            lines.append(line(row))
    return lines


# ---------------------------------------------------------------------------- history

_HISTORY_COLUMNS = (
    Column("VERSION", ">"),
    Column("SHA256"),
    Column("SIZE", ">"),
    Column("PUBLISHED"),
    Column("APPLIED", ">"),
    Column("REJECTED", ">"),
    Column("PUBLISHER", shrink="middle"),
)


def history_lines(key: str, rows: Sequence[HistoryRow], term: Terminal) -> list[str]:
    if not rows:
        return [f"{key}: no versions in the history"]
    table: list[Row] = []
    for row in rows:
        version = Cell("?" if row.version is None else str(row.version))
        published = Cell(local_time(row.published_at_ms))
        publisher = Cell(one_line(row.publisher))
        size = Cell(size_text(row.size))
        if row.malformed:
            sha, applied, rejected = Cell("malformed", "red"), Cell("-"), Cell("-")
        else:
            sha, applied = Cell(short(row.sha256)), Cell(str(row.applied))
            rejected = Cell(str(row.rejected), "red" if row.rejected else "")
        table.append([version, sha, size, published, applied, rejected, publisher])
        if row.malformed:
            table.append(Note(f"entry {row.entry_id}: {one_line(row.malformed)}", "red"))
    return render_table(_HISTORY_COLUMNS, table, term) + _security_lines(rows, term)


def _security_lines(rows: Sequence[HistoryRow], term: Terminal) -> list[str]:
    """Under the table, only when there is something to say: which signing key each run of
    versions names (newest first), and that the key is sensitive."""
    lines: list[str] = []
    if any(row.kid for row in rows):
        runs: list[tuple[str, str, str]] = []  # (kid, newest version, oldest version)
        for row in rows:
            number = "?" if row.version is None else str(row.version)
            if runs and runs[-1][0] == row.kid:
                runs[-1] = (row.kid, runs[-1][1], number)
            else:
                runs.append((row.kid, number, number))
        parts = [
            ("v" + (high if high == low else f"{low}-{high}"))
            + (f" {one_line(kid)}" if kid else " unsigned")
            for kid, high, low in runs
        ]
        # the key ids the entries claim; subscribers verify the signatures themselves
        lines += _wrap("key id: " + "; ".join(parts), term, "")
    if rows and rows[0].sensitive:
        lines.append(term.paint("sensitive: `hotreload show` and `diff` need --reveal", "yellow"))
    if rows and rows[0].snapshot_keys is not None:
        lines.append(
            f"snapshot of a whole ConfigMap ({rows[0].snapshot_keys} keys in the newest); "
            "`hotreload show` prints it as KEY=value, `diff` key by key"
        )
    return lines


def history_json(rows: Sequence[HistoryRow]) -> list[dict[str, object]]:
    return [
        {
            "version": row.version,
            "sha256": row.sha256,
            "size": row.size,
            "published_at": iso_utc(row.published_at_ms),
            "published_at_ms": row.published_at_ms,
            "publisher": row.publisher,
            "applied": row.applied,
            "rejected": row.rejected,
            "entry_id": row.entry_id,
            "malformed": row.malformed or None,
            "kid": row.kid or None,
            "sensitive": row.sensitive,
            "snapshot_keys": row.snapshot_keys,
        }
        for row in rows
    ]


# ---------------------------------------------------------------------------- status

_STATUS_COLUMNS = (
    Column("WORKER", shrink="middle"),
    Column("VERSION", ">"),
    Column("SHA256"),
    Column("STATUS"),
    Column("HEARTBEAT", ">"),
    Column("LIVE"),
)
_STATUS_STYLE = {"applied": "green", "rejected": "red", "fallback": "yellow", "invalid": "red"}
_LIVENESS_STYLE = {"live": "green", "stale": "yellow", "gone": "dim"}
_STATE_STYLE = {
    "converged": "green",
    "behind": "yellow",
    "rejected": "red",
    "no-live-workers": "yellow",
    "unpublished": "dim",
}


def summary_lines(summary: Convergence, term: Terminal) -> list[str]:
    """``KEY vN (sha): verdict, counts; stale and gone`` -- wrapped to the terminal's width."""
    target, live = summary.target, len(summary.live)
    verdict = summary.state.replace("-", " ")
    if target is None:
        head, detail = summary.key, f"nothing published yet, {live} live workers"
    else:
        head = f"{summary.key} v{target.version} ({short(target.sha256)})"
        if summary.state == "rejected":
            detail = f"rejected by {len(summary.rejected)}/{live} live workers"
        elif summary.state == "no-live-workers":
            detail = verdict
        else:
            detail = f"{verdict}, {len(summary.current)}/{live} live workers run it"
    extras = [f"{len(summary.stale)} stale"] * bool(summary.stale)
    extras += [f"{len(summary.gone)} gone"] * bool(summary.gone)
    tail = f"; {', '.join(extras)}" if extras else ""
    lines = _wrap(f"{head}: {detail}{tail}", term, "")  # a long key name wraps, indented
    # colour after wrapping, which counts characters: the verdict follows the "KEY ...: " head
    marker = f"{head}: "
    if term.colour and lines[0].startswith(marker):
        after = lines[0][len(marker) :]
        verdict_text = re.split("[,;]", after, maxsplit=1)[0]
        painted = term.paint(verdict_text, _STATE_STYLE[summary.state])
        lines[0] = term.paint(marker, "bold") + painted + after[len(verdict_text) :]
    return lines


def _worker_row(row: WorkerRow, summary: Convergence) -> list[Row]:
    behind = row.live and summary.target is not None and row.worker not in summary.current
    cells: list[Row] = [
        [
            Cell(one_line(row.worker)),
            Cell(str(row.version) if row.version else "-", "yellow" if behind else ""),
            Cell(short(row.sha256) or "-"),
            Cell(row.status, _STATUS_STYLE.get(row.status, "")),
            Cell(age_text(row.heartbeat_age_s)),
            Cell(row.liveness, _LIVENESS_STYLE[row.liveness]),
        ]
    ]
    if row.error:
        which = f"v{row.rejected_version} " if row.rejected_version else ""
        cells.append(Note(f"{which}error: {one_line(row.error)}", "red"))
    return cells


def status_lines(report: StatusReport, term: Terminal, prefix: str) -> list[str]:
    if not report.summaries:
        return [f"no config keys under prefix {prefix!r}"]
    lines: list[str] = []
    for summary in report.summaries:
        if lines:
            lines.append("")
        lines += summary_lines(summary, term)
        rows = [r for w in report.workers if w.key == summary.key for r in _worker_row(w, summary)]
        if rows:
            lines += render_table(_STATUS_COLUMNS, rows, term, indent="  ")
        else:
            lines.append("  no worker has reported for this key")
    return lines


def _worker_json(row: WorkerRow) -> dict[str, object]:
    return {
        "key": row.key,
        "worker": row.worker,
        "version": row.version,
        "sha256": row.sha256,
        "status": row.status,
        "error": row.error,
        "rejected_version": row.rejected_version,
        "heartbeat_age_s": None if row.heartbeat_age_s is None else round(row.heartbeat_age_s, 3),
        "live": row.live,
        "liveness": row.liveness,
    }


def summary_json(summary: Convergence) -> dict[str, object]:
    return {
        "key": summary.key,
        "state": summary.state,
        "converged": summary.state == "converged",
        "newest_version": summary.target.version if summary.target else None,
        "newest_sha256": summary.target.sha256 if summary.target else None,
        "live": list(summary.live),
        "current": list(summary.current),
        "behind": [
            {"worker": r.worker, "version": r.version, "status": r.status} for r in summary.behind
        ],
        "rejected": [
            {"worker": r.worker, "version": r.version, "error": r.error} for r in summary.rejected
        ],
        "stale": list(summary.stale),
        "gone": list(summary.gone),
    }


def status_json(report: StatusReport) -> dict[str, object]:
    return {
        "workers": [_worker_json(w) for w in report.workers],
        "summary": [summary_json(s) for s in report.summaries],
    }


# ---------------------------------------------------------------------------- wait


def wait_lines(result: WaitResult, timeout: float) -> list[str]:
    """``KEY vN (sha): outcome``, then one line per rejecting or lagging worker."""
    seen = result.convergence
    if result.unpublished:
        newest = f"newest is v{result.newest}" if result.newest else "nothing published yet"
        return [
            f"{seen.key} {result.unpublished}: not published within {timeout:g} s ({newest})",
            "  (has kubelet updated the mount yet? see `hotreload history` and the publisher)",
        ]
    assert seen.target is not None  # published: wait resolved its target first
    what = f"{seen.key} v{seen.target.version} ({short(seen.target.sha256)})"
    live = len(seen.live)
    if seen.state == "converged":
        lines = [f"{what}: all {live} live workers run it (after {result.elapsed_s:.1f} s)"]
    elif seen.state == "rejected":
        lines = [f"{what}: rejected by {len(seen.rejected)} of {live} live workers:"]
        lines += [f"  {one_line(r.worker)}: {one_line(r.error)}" for r in seen.rejected]
    elif not live:
        lines = [f"{what}: timed out after {timeout:g} s with no live workers"]
        lines.append("  (workers may still be starting: wait again, or see `hotreload status`)")
    else:
        ran = f"{len(seen.current)}/{live} live workers run it"
        lines = [f"{what}: timed out after {timeout:g} s, {ran}; behind:"]
        for row in seen.behind:
            running = f"v{row.version}" if row.version else "no version"
            lines.append(f"  {one_line(row.worker)}: on {running} ({row.status})")
    if seen.stale or seen.gone:
        lines.append(f"  (not counted: {len(seen.stale)} stale, {len(seen.gone)} gone)")
    return lines


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


def snapshot_lines(content: bytes) -> list[str]:
    """A snapshot's map, one key after the other in key order: ``KEY=value`` for a one-line
    text value, ``KEY:`` and the value's lines indented by 4 for a multi-line one, and a
    ``<binary ...>`` marker (size, hash) for a value that is not UTF-8."""
    lines: list[str] = []
    for name, raw in sorted(decode_snapshot(content).items()):
        text = _text_of(raw)
        if text is None:
            lines.append(f"{name}: <binary, {size_text(len(raw))}, {short(sha256_hex(raw))}>")
        elif "\n" not in text.removesuffix("\n"):
            lines.append(f"{name}={text}")
        else:
            lines.append(f"{name}:")
            lines.extend("    " + line.removesuffix("\n") for line in _lines(text))
    return lines


def _snapshot_diff(key: str, old: Event, new: Event, term: Terminal) -> list[str]:
    """Key by key: a unified diff per added, removed or changed key (``/dev/null`` on the
    side where it is missing), one line for a binary value; unchanged keys are not shown."""
    before, after = decode_snapshot(old.content), decode_snapshot(new.content)
    lines: list[str] = []
    for name in sorted(before.keys() | after.keys()):
        was, now = before.get(name), after.get(name)
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
