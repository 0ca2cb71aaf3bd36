"""The documentation stays true: its examples run and its links stay inside the repository.

Every ```python block of README.md and docs/*.md runs against a private Redis holding the keys
the examples read (``flags.json``, ``limits.yaml``), in a temp working directory; every
``$ hotreload ...`` line is parsed by the real argument parser, so a renamed flag or command
fails here before a reader copies it. Links are checked because a user's clone has nothing
beside it: a relative link must name a file (and heading) inside the repository, and no link
may leave it.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path

import pytest
import redis

from publisher import Publisher
from publisher.cli import build_parser
from subscriber.testing import RedisServer
from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# checked for links too: the deployment guide is linked from the docs and links back
LINKED = [*DOCS, REPO / "deploy" / "README.md"]

_FENCE = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
_PYTHON = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
_CLI = re.compile(r"^\$ (hotreload .*?)(?:\s+#.*)?$", re.MULTILINE)
_CODE_SPAN = re.compile(r"(`+).*?\1", re.DOTALL)
_INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
_AUTOLINK = re.compile(r"<([a-zA-Z][a-zA-Z0-9+.-]*:[^>\s]*)>")
_SLUG_KEPT = {"Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No", "Pc"}
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _name(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _python_blocks() -> list[tuple[str, str]]:
    return [(_name(doc), code) for doc in DOCS for code in _PYTHON.findall(doc.read_text())]


def _cli_lines() -> list[tuple[str, str]]:
    return [(_name(doc), line) for doc in DOCS for line in _CLI.findall(doc.read_text())]


def _prose(text: str) -> str:
    """The Markdown outside fenced blocks and code spans: where links and headings are."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _links(path: Path) -> list[str]:
    prose = _prose(path.read_text())
    return [
        *_INLINE_LINK.findall(prose),
        *_REFERENCE_LINK.findall(prose),
        *_AUTOLINK.findall(prose),
    ]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text lowercased, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts as its text
    text = text.replace("`", "").strip().lower()
    # kept: letters, marks, numbers, connector punctuation ('_'), spaces and '-'
    kept = (c for c in text if c in " -" or unicodedata.category(c) in _SLUG_KEPT)
    return "".join(kept).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """Every heading anchor of ``path``, numbered as GitHub numbers repeated ones."""
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for heading in _HEADING.findall(_FENCE.sub("", path.read_text())):
        slug = _slug(heading)
        seen = counts.get(slug, 0)
        counts[slug] = seen + 1
        anchors.add(slug if seen == 0 else f"{slug}-{seen}")
    return anchors


def _broken(doc: Path, link: str) -> str | None:
    """Why ``link`` in ``doc`` points nowhere or outside the repository; ``None`` if fine."""
    if re.match(r"[a-zA-Z][a-zA-Z0-9+.-]*:", link) or link.startswith("//"):
        return "points outside the repository (an absolute URL; a clone must be enough)"
    target, _, fragment = link.partition("#")
    path = (doc.parent / target).resolve() if target else doc
    if not path.is_relative_to(REPO):
        return f"points outside the repository ({path})"
    if not path.exists():
        return f"names a file that does not exist ({_name(path)})"
    if fragment and path.suffix == ".md" and fragment not in _anchors(path):
        return f"names a heading {_name(path)} does not have (#{fragment})"
    return None


def test_every_doc_has_examples() -> None:
    readme = REPO / "README.md"
    assert len(_PYTHON.findall(readme.read_text())) >= 5
    assert len(_CLI.findall(readme.read_text())) >= 3
    names = {_name(doc) for doc in DOCS}
    assert {"docs/design.md", "docs/python-api.md", "docs/cli.md"} <= names
    assert len(_python_blocks()) >= 10
    assert len(_cli_lines()) >= 15


@pytest.mark.parametrize(
    "code",
    [code for _doc, code in _python_blocks()],
    ids=[f"{doc}:{code.strip().splitlines()[0][:40]}" for doc, code in _python_blocks()],
)
def test_python_example_runs(
    code: str, redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = redis.Redis.from_url(redis_server.url)
    try:
        publisher = Publisher(client)
        publisher.publish("flags.json", b'{"dark_mode": true}')
        publisher.publish("limits.yaml", b"requests_per_second: 5\n")
    finally:
        client.close()
    monkeypatch.setenv("HOTRELOAD_REDIS_URL", redis_server.url)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs example", "exec"), {"__name__": "docs_example"})  # noqa: S102


@pytest.mark.parametrize(
    "line",
    [line for _doc, line in _cli_lines()],
    ids=[f"{doc}:{line[:50]}" for doc, line in _cli_lines()],
)
def test_cli_example_parses(line: str) -> None:
    argv = shlex.split(line)[1:]
    build_parser().parse_args(argv)  # raises SystemExit on a wrong flag or command


@pytest.mark.parametrize("doc", LINKED, ids=_name)
def test_links_stay_inside_the_repository(doc: Path) -> None:
    assert "../shared" not in doc.read_text(), f"{_name(doc)} refers to ../shared"
    problems = [f"{link}: {why}" for link in _links(doc) if (why := _broken(doc, link))]
    assert not problems, f"{_name(doc)} has links that a clone cannot follow:\n" + "\n".join(
        problems
    )


def test_link_checker_catches_what_it_must(tmp_path: Path) -> None:
    doc = REPO / "docs" / "design.md"
    assert _broken(doc, "../shared/DESIGN.md") is not None
    assert _broken(doc, "../../outside.md") is not None
    assert _broken(doc, "https://example.com/") is not None
    assert _broken(doc, "missing.md") is not None
    assert _broken(doc, "cli.md#no-such-heading") is not None
    assert _broken(doc, "cli.md#snapshots") is None
    assert _broken(doc, "#wire-contract-owned-by-subscriber") is None
    assert _broken(doc, "../deploy/README.md#shared-redis--redis-cluster") is None
    assert _slug("asyncio / ASGI: `AsyncSubscriber`") == "asyncio--asgi-asyncsubscriber"
    sample = tmp_path / "sample.md"
    sample.write_text(
        "# A\n\n```\n[in a fence](nowhere.md)\n```\n`[in code](nowhere.md)` "
        "[real](elsewhere.md)\n\n[ref]: other.md\n"
    )
    assert _links(sample) == ["elsewhere.md", "other.md"]
