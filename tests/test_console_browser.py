"""``hotreload console`` in a real browser: Debian's headless Chromium (/usr/bin/chromium,
``make test`` installs it), driven by Playwright, against a real ``hotreload watch`` daemon
and real worker processes (tests/workers/subscriber_worker.py).

The page is opened once and never reloaded: it must show the key, its workers, follow a
rejected version and a fix as they happen, say why the version was rejected, diff two
versions, and show a hostile worker id and error as text. Any console error or uncaught
exception of the page fails the test (the CSP would report a blocked script as one).
``HOTRELOAD_SCREENSHOTS=docs/img`` saves the README's screenshots there (default: the test's
temporary directory).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from playwright.sync_api import Page, Route, expect, sync_playwright

from publisher.console import Console, Model
from publisher.inspect import status
from subscriber._redis import connect
from subscriber.keys import stream_keys
from subscriber.protocol import WorkerState, encode_worker_state
from subscriber.testing import RedisServer
from tests.conftest import KubeletMount, Processes
from tests.helpers import start_daemon, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # root in a container: Chromium's sandbox needs user namespaces
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000  # a deadline for what the page must come to show, not a timing claim
HOSTILE_WORKER = "<script>window.pwned=1</script>"
HOSTILE_ERROR = '<img src=x onerror="window.pwned=2"> bad'


@pytest.fixture
def page(tmp_path: Path) -> Iterator[tuple[Page, list[str]]]:
    """A page of a fresh Chromium profile, and the errors it reports."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (as root)")
    with sync_playwright() as driver:
        context = driver.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            tab = context.new_page()
            errors: list[str] = []
            tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            tab.on("pageerror", lambda e: errors.append(str(e)))
            yield tab, errors
        finally:
            context.close()


def workers_live(client: redis.Redis, version: int, count: int) -> bool:
    report = status(client, prefix="hotreload")  # every key: none before the first publish
    if not report.summaries:
        return False
    summary = report.summaries[0]
    return (
        summary.target is not None
        and summary.target.version == version
        and len(summary.live) == count
        and summary.state in {"converged", "rejected"}
    )


@pytest.fixture
def system(
    redis_server: RedisServer, kubelet_mount: KubeletMount, processes: Processes, tmp_path: Path
) -> KubeletMount:
    """A daemon publishing ``kubelet_mount`` and two workers of app.yaml running v1."""
    url = redis_server.url
    kubelet_mount.write({"app.yaml": b"rate: 1\n"})
    start_daemon(processes, tmp_path, url, kubelet_mount.directory)
    for n in range(2):
        processes.python(
            "-m", "tests.workers.subscriber_worker", "--url", url, "--key", "app.yaml",
            "--out", str(tmp_path / f"worker{n}.jsonl"),
        )  # fmt: skip
    client = connect(url, socket_timeout=5)
    try:
        wait_until(lambda: workers_live(client, 1, 2), "2 workers run v1", timeout=30)
    finally:
        client.close()
    return kubelet_mount


def test_the_page_follows_keys_workers_and_a_rejection_live(
    page: tuple[Page, list[str]],
    system: KubeletMount,
    redis_server: RedisServer,
    client: redis.Redis,
    tmp_path: Path,
) -> None:
    tab, errors = page
    url = redis_server.url
    kubelet_mount = system
    shots = Path(os.environ.get("HOTRELOAD_SCREENSHOTS") or tmp_path)

    console_client = connect(url, socket_timeout=5)
    console = Console(Model(console_client, prefix="hotreload"), port=0, interval=0.2)
    serving = threading.Thread(target=console.serve_forever)
    serving.start()
    try:
        tab.goto(console.url)
        tab.evaluate("window.sameDocument = true")  # gone if the page ever reloads
        key = tab.locator('section.key[data-key="app.yaml"]')
        expect(key.locator(".badge.state")).to_have_text("converged", timeout=WAIT_MS)
        expect(key.locator("tr.worker")).to_have_count(2)
        expect(key.locator('tr.worker[data-liveness="live"]')).to_have_count(2)
        expect(key.locator(".version")).to_contain_text("v1")
        expect(tab.locator("#conn")).to_have_text("connected")

        kubelet_mount.set("app.yaml", b"rate: REJECT\n")
        expect(key.locator(".badge.state")).to_have_text("rejected", timeout=WAIT_MS)
        expect(key.locator(".rejection")).to_have_count(2, timeout=WAIT_MS)
        expect(key.locator(".rejection .reason").first).to_have_text(
            "ValueError: refusing content marked REJECT"
        )
        key.locator('details[data-section="app.yaml:timeline"] > summary').click()
        expect(key.locator('ol.timeline > li[data-version="2"] li.ack-rejected')).to_have_count(
            2, timeout=WAIT_MS
        )
        tab.screenshot(path=str(shots / "console-rejected.png"), full_page=True)

        kubelet_mount.set("app.yaml", b"rate: 3\n")
        expect(key.locator(".badge.state")).to_have_text("converged", timeout=WAIT_MS)
        expect(key.locator(".version")).to_contain_text("v3")
        expect(key.locator(".rejection")).to_have_count(0)
        expect(key.locator('ol.timeline > li[data-version="3"] li.ack-applied')).to_have_count(
            2, timeout=WAIT_MS
        )
        key.locator('details[data-section="app.yaml:history"] > summary').click()
        key.get_by_role("button", name="diff v2→v3").click()
        diff = key.locator("pre.diff")
        expect(diff).to_contain_text("-rate: REJECT", timeout=WAIT_MS)
        expect(diff.locator(".add")).to_have_text(["+rate: 3\n"])
        tab.screenshot(path=str(shots / "console-converged.png"), full_page=True)

        # a worker state anyone who can write Redis could write: shown as text, never run
        hostile = WorkerState(
            worker=HOSTILE_WORKER, status="rejected", error=HOSTILE_ERROR, rejected_version=1,
            heartbeat=int(client.time()[0]) * 1000, heartbeat_interval=3600.0,
        )  # fmt: skip
        workers = stream_keys("hostile.yaml", "hotreload").workers
        client.hset(workers, HOSTILE_WORKER, encode_worker_state(hostile))
        row = tab.locator('section.key[data-key="hostile.yaml"] tr.worker')
        expect(row.locator("td").first).to_have_text(HOSTILE_WORKER, timeout=WAIT_MS)
        expect(row.locator("td.error")).to_have_text(f"v1: {HOSTILE_ERROR}")
        assert tab.evaluate("window.pwned") is None
        assert tab.locator("section.key img").count() == 0

        assert tab.evaluate("window.sameDocument") is True, "the page was reloaded"
        assert errors == []
    finally:
        console.shutdown()
        serving.join(10)
        console_client.close()


def test_the_page_shows_a_rollout_when_the_status_carries_one(
    page: tuple[Page, list[str]], redis_server: RedisServer, client: redis.Redis
) -> None:
    """Rollout control adds ``rollout`` to each summary of ``status --json`` ({state,
    version, canary, reason}) and may mark history entries; the page shows them. The real
    console serves the page; its state is passed through with a rollout added (as the
    status will carry it), so this holds before rollout control exists and after."""
    tab, errors = page
    from publisher.publish import Publisher

    publisher = Publisher(client, publisher_id="pod-a:1")
    publisher.publish("app.yaml", b"rate: 1\n")
    publisher.publish("app.yaml", b"rate: 2\n")
    rollout: dict[str, object] = {
        "state": "canary", "version": 2, "canary": ["web-1:11"], "reason": "10% first",
    }  # fmt: skip

    def with_rollout(route: Route) -> None:
        state = route.fetch().json()
        state["summary"][0]["rollout"] = dict(rollout)
        # as history --json marks a canary entry (rollout control's branch)
        state["keys"]["app.yaml"]["history"][0].update(rollout="canary", audience=["web-1:11"])
        state["keys"]["app.yaml"]["timeline"][0].update(rollout="canary", audience=["web-1:11"])
        route.fulfill(json=state)

    console_client = connect(redis_server.url, socket_timeout=5)
    console = Console(Model(console_client, prefix="hotreload"), port=0, interval=0.2)
    serving = threading.Thread(target=console.serve_forever)
    serving.start()
    try:
        tab.route("**/api/state", with_rollout)
        tab.goto(console.url)
        key = tab.locator('section.key[data-key="app.yaml"]')
        expect(key.locator(".badge.state")).to_have_text("canary", timeout=WAIT_MS)
        expect(key.locator(".rollout")).to_have_text(
            "rollout: canary v2 canary on web-1:11 — 10% first"
        )
        key.locator('details[data-section="app.yaml:history"] > summary').click()
        expect(key.locator('table.history tr[data-version="2"]')).to_contain_text(
            "canary for web-1:11"
        )
        key.locator('details[data-section="app.yaml:timeline"] > summary').click()
        expect(key.locator('ol.timeline > li[data-version="2"]')).to_contain_text(
            "(canary for web-1:11)"
        )
        rollout.update(state="halted", reason="rejected by web-1:11")
        expect(key.locator(".badge.state")).to_have_text("halted", timeout=WAIT_MS)
        expect(key.locator(".rollout")).to_contain_text("rejected by web-1:11")
        rollout.update(state="none", version=None, canary=[], reason="")
        expect(key.locator(".badge.state")).to_have_text("no-live-workers", timeout=WAIT_MS)
        expect(key.locator(".rollout")).to_have_count(0)
        assert errors == []
    finally:
        console.shutdown()
        serving.join(10)
        console_client.close()
