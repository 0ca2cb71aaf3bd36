"""Human and JSON renderings of ``history``, ``status`` and ``wait`` results.

Each command's rows become a table (``publisher.cli.terminal``) with the notes an operator
needs under it, or a JSON document whose field names are the stable, scriptable interface
(``--json``): times as ISO 8601 UTC, hashes in full, absent values as ``null``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from publisher._printable import printable
from publisher.cli.terminal import (
    Cell,
    Column,
    Note,
    Row,
    Terminal,
    age_text,
    iso_utc,
    local_time,
    render_table,
    short,
    size_text,
    wrap,
)
from publisher.inspect import Convergence, HistoryRow, StatusReport, WaitResult, WorkerRow

__all__ = [
    "history_json",
    "history_lines",
    "status_json",
    "status_lines",
    "summary_json",
    "summary_lines",
    "wait_lines",
]

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
        publisher = Cell(printable(row.publisher))
        size = Cell(size_text(row.size))
        if row.malformed:
            sha, applied, rejected = Cell("malformed", "red"), Cell("-"), Cell("-")
        else:
            sha, applied = Cell(short(row.sha256)), Cell(str(row.applied))
            rejected = Cell(str(row.rejected), "red" if row.rejected else "")
        table.append([version, sha, size, published, applied, rejected, publisher])
        if row.malformed:
            table.append(Note(f"entry {row.entry_id}: {printable(row.malformed)}", "red"))
        elif row.verified is False:
            note = "unverified: its signature does not verify with the key given (forged, or "
            table.append(Note(f"{note}another key); workers ignore it", "red"))
        if not row.malformed and (row.rollout or row.audience is not None):
            table.append(_rollout_note(row))
    return render_table(_HISTORY_COLUMNS, table, term) + _security_lines(rows, term)


_ROLLOUT_NOTE = {
    "promote": ("promotion of canary v{of} to everyone", "green"),
    "halt": ("halt of canary v{of}: the previous content again, for everyone", "red"),
    "rollback": ("rollback from v{of}, pinned", "red"),
}


def _rollout_note(row: HistoryRow) -> Note:
    """The line under a rollout entry's row: what it is in the rollout."""
    if row.audience is not None:
        who = ", ".join(printable(w) for w in row.audience[:5])
        more = f" and {len(row.audience) - 5} more" if len(row.audience) > 5 else ""
        return Note(f"canary for {len(row.audience)} worker(s): {who}{more}", "yellow")
    text, style = _ROLLOUT_NOTE.get(row.rollout, (f"rollout: {printable(row.rollout)}", ""))
    return Note(text.format(of=row.rollout_of), style)


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
            + (f" {printable(kid)}" if kid else " unsigned")
            for kid, high, low in runs
        ]
        # the key ids the entries claim; subscribers verify the signatures themselves
        lines += wrap("key id: " + "; ".join(parts), term, "")
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
            "verified": row.verified,
            "rollout": row.rollout or ("canary" if row.audience is not None else None),
            "rollout_of": row.rollout_of or None,
            "audience": list(row.audience) if row.audience is not None else None,
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
_STATUS_STYLE = {
    "applied": "green",
    "rejected": "red",
    "fallback": "yellow",
    "holding": "yellow",
    "invalid": "red",
}
_LIVENESS_STYLE = {"live": "green", "stale": "yellow", "gone": "dim"}
_STATE_STYLE = {
    "converged": "green",
    "behind": "yellow",
    "holding": "yellow",
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
        elif summary.state == "holding":
            detail = (
                f"{len(summary.holding)}/{live} live workers hold a newer version than the "
                "stream's newest (restored or failed over behind them; the publisher "
                "re-publishes above them)"
            )
        else:
            detail = f"{verdict}, {len(summary.current)}/{live} live workers run it"
    extras = [f"{len(summary.stale)} stale"] * bool(summary.stale)
    extras += [f"{len(summary.gone)} gone"] * bool(summary.gone)
    tail = f"; {', '.join(extras)}" if extras else ""
    lines = wrap(f"{head}: {detail}{tail}", term, "")  # a long key name wraps, indented
    # colour after wrapping, which counts characters: the verdict follows the "KEY ...: " head
    marker = f"{head}: "
    if term.colour and lines[0].startswith(marker):
        after = lines[0][len(marker) :]
        verdict_text = re.split("[,;]", after, maxsplit=1)[0]
        painted = term.paint(verdict_text, _STATE_STYLE[summary.state])
        lines[0] = term.paint(marker, "bold") + painted + after[len(verdict_text) :]
    rollout = summary.rollout
    if rollout.state != "none":
        who = f" ({', '.join(printable(w) for w in rollout.canary)})" if rollout.canary else ""
        text = f"rollout: {rollout.state} v{rollout.version}{who}: {printable(rollout.reason)}"
        style = {"canary": "yellow", "promoted": "green"}.get(rollout.state, "red")
        lines += [term.paint(line, style) for line in wrap(text, term, "  ")]
    return lines


def _worker_row(row: WorkerRow, summary: Convergence) -> list[Row]:
    behind = row.live and summary.target is not None and row.worker not in summary.current
    cells: list[Row] = [
        [
            Cell(printable(row.worker)),
            Cell(str(row.version) if row.version else "-", "yellow" if behind else ""),
            Cell(printable(short(row.sha256)) or "-"),  # worker-reported: anything
            Cell(printable(row.status, limit=20), _STATUS_STYLE.get(row.status, "")),
            Cell(age_text(row.heartbeat_age_s)),
            Cell(row.liveness, _LIVENESS_STYLE[row.liveness]),
        ]
    ]
    if row.error and row.status == "holding":
        cells.append(Note(f"holding: {printable(row.error)}", "yellow"))
    elif row.error:
        which = f"v{row.rejected_version} " if row.rejected_version else ""
        cells.append(Note(f"{which}error: {printable(row.error)}", "red"))
    return cells


def status_lines(
    report: StatusReport, term: Terminal, prefix: str, *, all_workers: bool = False
) -> list[str]:
    """Per key, its summary and its workers; workers gone (stopped: every restart leaves
    one for ``--forget-workers-after``) as a count unless ``all_workers``."""
    lines: list[str] = []
    if report.refuses_writes:
        lines += [term.paint(f"Redis refuses writes: {report.refuses_writes}", "red")]
    if not report.summaries:
        return lines + [f"no config keys under prefix {prefix!r}"] * (not report.unreadable)
    # (report.unreadable: said on stderr, by the command)
    for summary in report.summaries:
        if lines:
            lines.append("")
        lines += summary_lines(summary, term)
        shown = [w for w in report.workers if w.key == summary.key]
        gone = 0
        if not all_workers:
            gone = sum(w.liveness == "gone" for w in shown)
            shown = [w for w in shown if w.liveness != "gone"]
        rows = [r for w in shown for r in _worker_row(w, summary)]
        if rows:
            lines += render_table(_STATUS_COLUMNS, rows, term, indent="  ")
        elif not gone:
            lines.append("  no worker has reported for this key")
        if gone:
            lines.append(f"  and {gone} gone (stopped) workers: --all shows them")
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
        "seen": row.seen,
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
        "holding": [
            {"worker": r.worker, "version": r.version, "seen": r.seen, "reason": r.error}
            for r in summary.holding
        ],
        "stale": list(summary.stale),
        "gone": list(summary.gone),
        "rollout": summary.rollout.as_json(),
    }


def status_json(report: StatusReport) -> dict[str, object]:
    document: dict[str, object] = {
        "workers": [_worker_json(w) for w in report.workers],
        "summary": [summary_json(s) for s in report.summaries],
    }
    if report.refuses_writes:
        document["redis_refuses_writes"] = report.refuses_writes
    if report.unreadable:
        document["unreadable"] = {key: reason for key, reason in report.unreadable}
    return document


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
    if result.halted:
        lines = [f"{what}: a canary, halted: {printable(result.halted)}"]
    elif seen.state == "converged":
        lines = [f"{what}: all {live} live workers run it (after {result.elapsed_s:.1f} s)"]
    elif seen.state == "rejected":
        lines = [f"{what}: rejected by {len(seen.rejected)} of {live} live workers:"]
        lines += [f"  {printable(r.worker)}: {printable(r.error)}" for r in seen.rejected]
    elif not live:
        lines = [f"{what}: timed out after {timeout:g} s with no live workers"]
        lines.append("  (workers may still be starting: wait again, or see `hotreload status`)")
    else:
        ran = f"{len(seen.current)}/{live} live workers run it"
        lines = [f"{what}: timed out after {timeout:g} s, {ran}; behind:"]
        for row in seen.behind:
            running = f"v{row.version}" if row.version else "no version"
            lines.append(f"  {printable(row.worker)}: on {running} ({row.status})")
        for row in seen.holding:
            reason = f": {printable(row.error)}" if row.error else ""
            lines.append(f"  {printable(row.worker)}: holding v{row.version}{reason}")
    if seen.failed:  # never gets there: the outcome, whatever the live workers did
        ran = f"{len(seen.current)}/{live} live workers run it"
        headline = f"{what}: {len(seen.failed)} stopped with an error without running it"
        lines = lines if seen.state == "rejected" or result.halted else [f"{headline} ({ran}):"]
        lines += [
            f"  {printable(f.worker)}: stopped on v{f.version}: {printable(f.error)}"
            for f in seen.failed
        ]
        lines.append("  (restart them; remove the :workers entry of one whose pod is gone)")
    if seen.stale or seen.gone:
        lines.append(f"  (not counted: {len(seen.stale)} stale, {len(seen.gone)} gone)")
    return lines
