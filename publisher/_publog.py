"""What the daemon logs for each publish, written, skipped or refused (out of ``daemon.py``:
kept under the 500 lines of a module)."""

from __future__ import annotations

import logging

from publisher.publish import PublishResult

__all__ = ["log_publish"]

logger = logging.getLogger("publisher.daemon")  # the daemon's logger, as before the split


def log_publish(result: PublishResult) -> None:
    if result.refused:
        logger.info(
            "skipped %s: sha256=%s is %s (the newest entry, v%d, %s); a new content is "
            "published as usual",
            result.key,
            result.sha256[:12],
            result.refused,
            result.version,
            "rolled back from it" if result.refused == "pinned" else "halted its canary",
        )
    elif result.written:
        logger.info(
            "published %s v%d sha256=%s (%d bytes)",
            result.key,
            result.version,
            result.sha256[:12],
            result.size,
        )
    elif result.behind:
        logger.info(
            "not published %s: sha256=%s was read before another publisher appended v%d, "
            "which this one had not seen: the content may be older (the pod that appended it "
            'publishes what its mount shows next; docs/design.md "Behind")',
            result.key,
            result.sha256[:12],
            result.version,
        )
    elif result.superseded:  # e.g. re-seeding after Redis restarted empty
        logger.info(
            "skipped %s: superseded by v%d, which another publisher wrote after this mount's "
            "content (this mount lags)",
            result.key,
            result.version,
        )
    else:
        # v is the entry carrying this content: the newest, or for a daemon whose kubelet
        # lags another pod's, the one it is catching up with
        logger.info("skipped %s: already published as v%d", result.key, result.version)
