"""Compare-and-publish: turn a key's current content into at most one new stream entry.

The decision runs server-side in one Lua script (``publish.lua``) registered through redis-py:
redis-py sends EVALSHA and falls back to EVAL when the script cache was flushed (``SCRIPT
FLUSH``, a restarted Redis), so the script is reloaded without our help. On a single Redis
the ``EVALSHA`` is packed and sent by hand (``FastPath.evalsha``: redis-py's packing and
command machinery were ~0.1 ms of a 1 KiB publish's 0.45 ms), and a ``NOSCRIPT`` answer goes
through redis-py's ``Script`` as before. It reads the newest
entry's version, hash and marks from the key's head (``publisher._head``: the newest entry
without its content, written with each entry) while the head matches the stream, instead of
copying a content of up to 1 MiB into Lua (a 1 MiB publish: 4.05 -> 2.3 ms p50). A content
of 64 KiB or more does not pass through Lua at all (``publisher._fast``: the script decides on
the entry without its content, a plain ``XADD`` in the same ``MULTI`` appends it on the
script's consent; 1 MiB: x3.5-4.4 -> x1.06-1.18 a plain ``XADD``).

Publishers of several pods may share one Redis, and kubelets on different nodes update their
mounts seconds apart: a publisher whose mount lags is handed contents that faster ones have
published, and replaced, already. So each ``Publisher`` remembers per key its *base*, the id
of the entry it wrote or found carrying its content on its previous call, and the script
skips a content found at or after the base (the publisher is catching up), not only one equal
to the newest entry. With a base newer than the newest entry (Redis lost data) the newest
entry alone decides.

Without a base (the first publish of the key since the publisher started: a pod scaled up,
restarted or crashed, maybe while its kubelet still shows an older ConfigMap) a content that
is the newest entry is skipped, and one not in the retained history written, as ever; one
found further back is written only if every newer entry was written from this publisher's
own host (the host part of ``publisher_id``, ``host:pid``: the pod's previous publisher wrote
them, and the mount has gone back since: a revert). If another host wrote a newer entry,
another pod has seen a newer ConfigMap: nothing is written, the answer is *superseded*
(below), and the entry found becomes the base, so the mount catching up later writes
nothing either. A revert made while every pod's publisher was down is thus not published
until the next change (``publish.lua`` says when exactly).

It also remembers the SHA-256 of the content it held then: a publisher whose content has not
changed since its base has nothing new, so when the newest entry was written after its base
by someone who had seen further (its version is above this publisher's floor), it writes
nothing even though its content is nowhere after the base. That is a lagging mount after a
Redis that restarted EMPTY and was re-seeded first by an up-to-date publisher: the base entry
is gone, and comparing with the newest alone would put the older content back on top. The
answer is then *superseded* (``PublishResult.superseded``): the newest entry is returned and
becomes the base (on a first publish, the entry found carrying the content does), the floor
stays where it was. ``publish.lua`` describes the rule in full.

A caller that says what it had seen of the stream before it read the content (``seen``: the
daemon's read of the key's head while kubelet writes) is answered *behind* when a publisher
appended, after that, a content this one had not seen: its own may be older (docs/design.md).

Signed publishing is optimistic: the signature covers the version, which the script assigns,
so the publisher signs for the version it expects (the next after the highest it has seen)
and the script appends only if that is still the next one; otherwise it answers with the
version to sign for, and the publisher signs again (at most ``MAX_SIGN_ATTEMPTS`` times): a
single publisher per key guesses right every time after its first publish. A superseded or
behind signed publish checks the newest entry's signature as a skip checks the entry it
found: one that does not verify with this publisher's key (forged, or signed with another
key id) is looked past, and the content written.
"""

from __future__ import annotations

import logging
from importlib.resources import files
from typing import TYPE_CHECKING, Any, cast

from redis.exceptions import NoPermissionError, OutOfMemoryError

from publisher._fast import FastPath
from publisher._head import EXHAUSTED, exhausted, script_keys
from publisher._marks import REFUSALS, RolloutMark
from publisher._results import PublishConflict, PublishResult, VersionsExhausted
from publisher._room import make_room
from publisher._signed import genuine, superseded_genuine
from publisher._signed import text as _text
from publisher._unanswered import LOST, Arg, unanswered, with_seen
from subscriber.defaults import DEFAULT_HISTORY, DEFAULT_PREFIX
from subscriber.errors import ContentTooLarge
from subscriber.keys import stream_keys
from subscriber.protocol import (
    MAX_CONTENT_BYTES,
    SCHEMA_VERSION,
    key_id,
    now_ms,
    process_identity,
    sha256_hex,
)
from subscriber.protocol import signing_key as normalized_key

if TYPE_CHECKING:
    import redis

__all__ = [
    "DEFAULT_HISTORY",
    "MAX_SIGN_ATTEMPTS",
    "PublishConflict",
    "PublishResult",
    "Publisher",
    "VersionsExhausted",
]

logger = logging.getLogger(__name__)

# Signed publishes retried because another publisher took the version first; each retry means
# someone else appended in between, so only a storm of different contents gets this far.
MAX_SIGN_ATTEMPTS = 16
_FOUND, _WRITTEN, _CONFLICT, _SUPERSEDED, _BEHIND = 0, 1, 2, 3, 10  # the script's answers
_PASSED = (_SUPERSEDED, _BEHIND)  # not written, the newest entry returned: the floor stays
_SCRIPT = files("publisher").joinpath("publish.lua").read_text()


class Publisher:
    """Publishes contents of config keys to their events streams, once per distinct content.

    ``history`` bounds each stream (approximate trimming, so a few more may stay). The
    publisher remembers per key the highest version it wrote or found carrying its content
    and passes it as the floor, so versions never go backwards while it lives, even if Redis
    loses its data; and the id of the entry its previous call returned and the SHA-256 of the
    content it held then (the key's base, see the module docstring), so that, keeping one
    ``Publisher`` across reconnects, a lagging mount or a re-seed never publishes an older
    content over a newer one another publisher wrote, even after Redis restarted empty. A call
    whose answer is lost with the connection raises the floor to the version it would have
    written, lest another content be numbered the same (``publisher._unanswered``).

    ``signing_key`` (normalized bytes, see ``subscriber.protocol.signing_key``) signs every
    event; :meth:`set_signing_key` swaps it (or turns signing off with ``None``) at any time."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        history: int = DEFAULT_HISTORY,
        publisher_id: str | None = None,
        signing_key: bytes | None = None,
    ) -> None:
        if history < 1:
            raise ValueError(f"history must be at least 1, not {history}")
        self.client = client
        self.prefix = prefix
        self.history = history
        self.publisher_id = publisher_id or process_identity()
        self.highest_version: dict[str, int] = {}
        self.base_ids: dict[str, str] = {}  # key -> id of the entry the last call returned
        self.base_sha256s: dict[str, str] = {}  # key -> sha256 of the content it passed
        self._base_marks: dict[str, tuple[str, bool]] = {}  # key -> (kid, sensitive) it had
        self._appended: dict[str, str] = {}  # key -> the id of the last entry it appended
        self._script = client.register_script(_SCRIPT)
        # large contents around Lua (publisher._fast); not on a Redis Cluster client
        self._fast = None if _clustered(client) else FastPath(client, self._script.sha, history)
        self._headless = False  # the user's ACL refuses the head key (see _call)
        self._signer: tuple[bytes, str] | None = None  # (key, key id); swapped whole
        self.set_signing_key(signing_key)

    @property
    def key_id(self) -> str:
        """The id of the signing key in use, ``""`` when unsigned."""
        signer = self._signer
        return signer[1] if signer is not None else ""

    def set_signing_key(self, signing_key: bytes | None) -> None:
        """Sign from now on with ``signing_key`` (``None``: unsigned); safe from any thread.

        The key is normalized as subscribers normalize theirs (``ValueError`` if too short).
        """
        if signing_key is None:
            self._signer = None
            return
        key = normalized_key(signing_key)
        self._signer = (key, key_id(key))

    def publish(
        self,
        key: str,
        content: bytes,
        *,
        sensitive: bool = False,
        sha256: str | None = None,
        above: int = 0,
        mark: RolloutMark | None = None,
        seen: str = "",
    ) -> PublishResult:
        """Publish ``content`` as ``key``'s newest version unless it already is, or unless
        this publisher is only catching up: the content is in an entry at or after the one
        its previous call for ``key`` returned (then that entry is returned, with ``written``
        False, and may be older than the newest), or it is superseded: the content is the one
        its previous call passed and the newest entry was written after that by a publisher
        that had seen further, or, on the first call for ``key``, the content is in an older
        entry than the newest and another host wrote after it (then the newest entry is
        returned, ``superseded`` True).

        ``sensitive`` marks the entry (``sensitive=1``). Signed or sensitive, "already is"
        also needs the entry's key id and mark to match. ``sha256``: the content's hex
        SHA-256 when the caller computed it already (the daemon has, for these very bytes),
        so a 1 MiB content is not hashed twice per publish. ``above``: the highest version
        the key's workers report having seen (``publisher._floor``); when the stream's newest
        entry is numbered below it (the stream is behind the workers: restored older, failed
        over, re-created, an old entry replayed), the content is written above it whatever
        is found, and in every case the next version is above it. ``mark``: the rollout fields
        (``publisher._marks``; ``refused`` says why nothing was written). ``seen``: the id of
        the newest entry the caller knew of BEFORE it read ``content`` ("": the rules as
        before): a content not found after the previous call's entry, with an entry newer
        than both appended meanwhile, may be older than that one: nothing is written
        (``behind``, the base stays; docs/design.md "Behind"). Raises ``ContentTooLarge`` (nothing
        sent), ``PublishConflict`` (signed, lost every race), ``VersionsExhausted`` (a
        ``PublishConflict``: no version is left above a junk entry's) and redis-py's errors.
        """
        if len(content) > MAX_CONTENT_BYTES:
            raise ContentTooLarge(key, len(content), MAX_CONTENT_BYTES)
        digest = sha256 if sha256 is not None else sha256_hex(content)
        appended = self._appended.get(key, seen)  # its own appends, operations too, it knows
        if appended != seen and seen and _id_key(appended) > _id_key(seen):
            seen = appended
        signer = self._signer
        if signer is not None or sensitive or mark is not None:
            return self._publish_extended(
                key, content, digest, signer, sensitive, above=above, mark=mark, seen=seen
            )
        floor = self.highest_version.get(key, 0)
        code, version, raw_id, *origin = self._run(
            key,
            with_seen(
                digest,
                content,
                now_ms(),
                self.publisher_id,
                key,
                SCHEMA_VERSION,
                self.history,
                floor,
                self.base_ids.get(key, ""),
                self._held(key, "", False),
                above,
                seen=seen,
            ),
        )
        code, version, entry_id = int(code), int(version), _text(raw_id)
        found = _text(origin[0]) if origin and code == _SUPERSEDED else self._kept(key, code)
        self._remember(key, code, version, entry_id, floor=floor, digest=digest, kid="",
                       sensitive=False, base=found)  # fmt: skip
        return PublishResult(
            key=key,
            written=code == _WRITTEN,
            version=version,
            entry_id=entry_id,
            sha256=digest,
            size=len(content),
            superseded=code == _SUPERSEDED,
            refused=REFUSALS.get(code, ""),
            behind=code == _BEHIND,
        )

    def _run(self, key: str, args: list[Arg]) -> list[Any]:
        """``_answer``; its answer lost, the floor is raised first (``publisher._unanswered``)."""
        try:
            return self._answer(key, args)
        except LOST as exc:  # the fast path's EVALSHA may have lost one before this one
            before = self._fast is not None and self._fast.lost is args
            unanswered(self.highest_version, key, args, exc, lost_before=before)
            raise

    def _answer(self, key: str, args: list[Arg]) -> list[Any]:
        """The script for ``key``; refused for memory (``maxmemory``, noeviction), history gives
        way: this key's stream is trimmed to its newest entry and the script run again, then
        other keys' histories, oldest first (see ``make_room``). What still does not fit raises
        redis-py's ``OutOfMemoryError``, which the daemon reports (``publisher.health``)."""
        keys = script_keys(key, self.prefix)
        events = keys[0]
        if self._fast is not None and not self._headless:
            try:  # a large content around Lua (publisher._fast); None: through Lua after all
                reply = self._fast.publish(keys, args, _text(args[8]))
            except OutOfMemoryError:
                reply = None  # through Lua, which makes room
            if reply is not None:
                return self._checked(key, reply)
        try:
            return self._checked(key, self._call(keys, args))
        except OutOfMemoryError:
            pass
        trimmed: list[str] = []
        for freed in make_room(self.client, events, self._others(key)):
            trimmed.append(freed)
            try:
                reply = self._checked(key, self._call(keys, args))
            except OutOfMemoryError:
                continue
            logger.info(
                "%s: Redis is at maxmemory; made room by trimming %s to its newest entry",
                key,
                ", ".join(trimmed),
            )
            return reply
        raise OutOfMemoryError(
            f"{key} does not fit even with every history trimmed to its newest entry "
            "(Redis' memory is taken by something else: raise maxmemory or free memory)"
        )

    def _call(self, keys: list[str], args: list[Arg]) -> list[Any]:
        """The script on ``keys`` (the stream and its head); a user whose ACL predates the
        head (refused as an argument) calls it on the stream alone from then on, and the
        script reads the newest entry whole, as it did before the head."""
        if not self._headless:
            try:
                reply = self._fast.evalsha(keys, args) if self._fast is not None else None
                return reply if reply is not None else self._script(keys=keys, args=args)
            except NoPermissionError:
                reply = cast(list[Any], self._script(keys=keys[:1], args=args))
                self._headless = True  # the stream alone went through: the head is refused
                logger.warning(
                    "the Redis user may not use %s: every publish reads the newest entry whole "
                    "(regenerate the ACL with deploy/redis/gen-users-acl.sh)",
                    keys[1],
                )
                return reply
        return cast(list[Any], self._script(keys=keys[:1], args=args))

    def _checked(self, key: str, reply: list[Any]) -> list[Any]:
        """``reply``, unless no version is left above the highest (``VersionsExhausted``)."""
        if int(reply[0]) == _WRITTEN:
            self._appended[key] = _text(reply[2])
        if int(reply[0]) != EXHAUSTED:
            return reply
        _, version, entry_id, source = (_text(value) for value in reply)
        events = stream_keys(key, self.prefix).events
        message = exhausted(key, events, int(version), entry_id, source)
        raise VersionsExhausted(key, message, entry_id)

    def _others(self, key: str) -> list[str]:
        """The events streams of the other keys this publisher wrote or found, oldest base
        first (the key published longest ago)."""
        others = [(_id_key(base), name) for name, base in self.base_ids.items() if name != key]
        return [stream_keys(name, self.prefix).events for _, name in sorted(others)]

    def _held(self, key: str, kid: str, sensitive: bool) -> str:
        """The script's ``held``: the SHA-256 of the content the previous call passed, ""
        when there was none or its key id or sensitive mark differed from this call's."""
        if self._base_marks.get(key, ("", False)) != (kid, sensitive):
            return ""
        return self.base_sha256s.get(key, "")

    def _kept(self, key: str, code: int) -> str | None:
        """Behind: the base stays (docs/design.md "Behind"), else None: the entry returned."""
        return self.base_ids.get(key) if code == _BEHIND else None

    def _remember(
        self,
        key: str,
        code: int,
        version: int,
        entry_id: str,
        *,
        floor: int,
        digest: str,
        kid: str,
        sensitive: bool,
        base: str | None = None,
    ) -> None:
        """The new base: ``entry_id``, or ``base`` when given (a first call superseded: the
        entry carrying our content, older than the newest returned); a superseded answer
        leaves the floor where it was (the newest entry does not carry our content: numbering
        a later re-seed of it above that entry would make up-to-date publishers take the older
        content for one written after theirs)."""
        if code not in _PASSED:
            self.highest_version[key] = max(floor, version)
        self.base_ids[key] = base if base is not None else entry_id
        self.base_sha256s[key] = digest
        self._base_marks[key] = (kid, sensitive)

    def _publish_extended(
        self,
        key: str,
        content: bytes,
        digest: str,
        signer: tuple[bytes, str] | None,
        sensitive: bool,
        *,
        above: int,
        mark: RolloutMark | None = None,
        seen: str = "",
    ) -> PublishResult:
        """Signed and/or sensitive, or with rollout fields: sign for the expected version,
        re-sign if it moved. Entries found for a rollout publish are not checked for forgery
        (their signature message depends on their own audience)."""
        floor = self.highest_version.get(key, 0)
        base = self.base_ids.get(key, "")
        published_at = now_ms()
        expected = max(floor, above) + 1  # what the script assigns unless others appended
        kid = signer[1] if signer is not None else ""
        force = ""  # the id of an entry found forged: it and older ones are disregarded
        held = self._held(key, kid, sensitive)
        for _attempt in range(MAX_SIGN_ATTEMPTS):
            sig = ""
            if signer is not None:
                sig = (mark or _PLAIN).sign(signer[0], key, expected, digest, published_at)
            code, version, raw_id, *found = self._run(
                key,
                with_seen(
                    digest,
                    content,
                    published_at,
                    self.publisher_id,
                    key,
                    mark.schema if mark is not None else SCHEMA_VERSION,
                    self.history,
                    floor,
                    base,
                    held,
                    above,
                    expected if signer is not None else "",
                    sig,
                    kid,
                    "1" if sensitive else "",
                    force,
                    *(mark.args() if mark is not None else ()),
                    seen=seen,
                ),
            )
            code, version, entry_id = int(code), int(version), _text(raw_id)
            if code == _CONFLICT:
                expected = version
                continue
            operation = mark is not None and mark.expect is not None
            if operation or code in REFUSALS:  # the mount's base and held stay as they were
                if code != 6:
                    self.highest_version[key] = max(floor, version)
                if code in (4, 5):  # pinned / halted: the newest entry, our content's fate
                    self._remember(key, 0, version, entry_id, floor=floor, digest=digest,
                                   kid=kid, sensitive=sensitive)  # fmt: skip
                return PublishResult(
                    key=key,
                    written=code == _WRITTEN,
                    version=version,
                    entry_id=entry_id,
                    sha256=digest,
                    size=len(content),
                    kid=kid,
                    sensitive=sensitive,
                    refused=REFUSALS.get(code, ""),
                )
            if (
                mark is None
                and code == _FOUND
                and signer is not None
                and not genuine(signer[0], key, version, digest, found)
            ):
                logger.warning(
                    "%s: entry v%d has this content and key id but a signature that does not "
                    "verify (forged); looking past it, publishing the content again if needed",
                    key,
                    version,
                )
                force, expected = entry_id, max(version, floor, above) + 1
                continue
            newest, origin = found[:4], found[4:]  # origin: a first call superseded
            if (
                code in _PASSED
                and signer is not None
                and mark is None
                and not superseded_genuine(signer, key, version, newest)
            ):
                # (with another key id: a rotation under way, as rare as the rest; publishing
                # ours, as before this rule, may put an older content back until the mount
                # catches up)
                logger.warning(
                    "%s: newest entry v%d, written after this publisher's previous call, is not "
                    "signed with this key (forged, or another key id); looking past it, "
                    "publishing the content again if needed",
                    key,
                    version,
                )
                force, expected = entry_id, max(version, floor, above) + 1
                continue
            first = _text(origin[0]) if code == _SUPERSEDED and origin else self._kept(key, code)
            self._remember(key, code, version, entry_id, floor=floor, digest=digest, kid=kid,
                           sensitive=sensitive, base=first)  # fmt: skip
            return PublishResult(
                key=key,
                written=code == _WRITTEN,
                version=version,
                entry_id=entry_id,
                sha256=digest,
                size=len(content),
                kid=kid,
                sensitive=sensitive,
                superseded=code == _SUPERSEDED,
                behind=code == _BEHIND,
            )
        raise PublishConflict(key, MAX_SIGN_ATTEMPTS)


_PLAIN = RolloutMark()  # no rollout fields: the v1 signature


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq or 0)) if ms.isdigit() and seq.isdigit() else (0, 0)


def _clustered(client: object) -> bool:
    """A Redis Cluster client: its pipelines are not sent as one MULTI (publisher._fast)."""
    return hasattr(client, "get_nodes")
