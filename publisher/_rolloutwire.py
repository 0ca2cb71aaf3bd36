"""The small, dependency-free part of rollout control that the CLI needs too: the canary
policy (``--canary N|P%``) and the ``:control`` stream's name and bounds. Importing it loads
neither the daemon nor prometheus_client (the query commands run where only the worker's
dependencies are installed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from subscriber.keys import validate_key

__all__ = [
    "CONTROL_MAXLEN",
    "OPS",
    "REQUEST_MAX_AGE_MS",
    "CanaryPolicy",
    "control_key",
    "parse_canary",
]

OPS = ("rollback", "promote", "halt")
REQUEST_MAX_AGE_MS = 60_000
CONTROL_MAXLEN = 1000


def control_key(key: str, prefix: str) -> str:
    """``{prefix}:{KEY}:control``: in the key's hash slot, beside its other streams."""
    validate_key(key)
    return f"{prefix}:{{{key}}}:control"


@dataclass(frozen=True, slots=True)
class CanaryPolicy:
    """``--canary N`` (``count``) or ``--canary P%`` (``percent``), ``--canary-hold``."""

    count: int = 0
    percent: float = 0.0
    hold_s: float = 30.0

    def size(self, live: int) -> int:
        """How many canary workers among ``live`` live workers (at least one while any)."""
        if live <= 0:
            return 0
        wanted = self.count if self.count else math.ceil(live * self.percent / 100)
        return max(1, min(live, wanted))


def parse_canary(text: str) -> CanaryPolicy:
    """``N`` or ``P%``; ``ValueError`` with what is wrong."""
    raw = text.strip()
    if raw.endswith("%"):
        try:
            percent = float(raw[:-1])
        except ValueError:
            raise ValueError(f"{text!r} is not a percentage like 10%") from None
        if not 0 < percent <= 100:
            raise ValueError(f"{text!r}: a percentage must be above 0 and at most 100")
        return CanaryPolicy(percent=percent)
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{text!r} is not a worker count (1 or more) or a percentage (10%)")
    return CanaryPolicy(count=int(raw))
