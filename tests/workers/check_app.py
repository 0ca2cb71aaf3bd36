"""What ``hotreload check`` loads in tests: an app module's callbacks and types.

``limits`` is a ``TypedConfig`` (its ``apply`` is a worker's callback), ``Limits`` the type a
``typed_subscriber`` decodes into, ``refuse_zero`` a plain validator, ``Settings`` a snapshot
type; ``not_callable`` is there to be refused.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from subscriber import TypedConfig


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    requests_per_second: Annotated[int, msgspec.Meta(gt=0)]
    burst: int = 10


class Settings(msgspec.Struct, rename="upper", frozen=True):
    timeout_s: int
    debug: bool = False


limits = TypedConfig(Limits, "yaml")
not_callable = 42


def refuse_zero(text: str) -> None:
    if "0" in text.split():
        raise ValueError(f"zero is not a rate: {text.strip()!r}")
