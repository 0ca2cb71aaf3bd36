"""Redis passwords from files: ``?password_file=`` in a URL, ``--redis-password-file`` and
``$HOTRELOAD_REDIS_PASSWORD_FILE`` (subscriber._target), checked at the parser, then for real:
the daemon, a Subscriber and the CLI log in to the per-pod Redis (deploy/redis.conf, the
generated ACL users) with nothing but a file holding the password.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from publisher.cli import main as hotreload
from publisher.daemon import Daemon
from subscriber import Subscriber
from subscriber._redis import connect
from subscriber._target import ENV_PASSWORD_FILE, parse, redacted, resolve, resolve_url
from subscriber.errors import ConfigurationError
from subscriber.keys import stream_keys
from tests.conftest import KubeletMount
from tests.deploy.render import EXAMPLE, PASSWORDS
from tests.deploy.servers import DeployedRedis
from tests.helpers import wait_until

SECRET = "s3cret-from-a-file-0123456789"


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text(SECRET + "\n")  # as `kubectl create secret --from-file` often has it
    return path


def test_a_password_file_is_read_into_the_url_and_never_shown(password_file: Path) -> None:
    for url, user in (
        (f"unix://subscriber@/run/redis.sock?db=2&password_file={password_file}", "subscriber"),
        (f"redis://publisher@redis:6380/0?password_file={password_file}", "publisher"),
        (f"unix:///run/redis.sock?password_file={password_file}", None),
    ):
        target = parse(url)
        assert (target.username, target.password) == (user, SECRET)
        assert "password_file" not in target.url  # redis-py would pass it to the connection
        assert SECRET not in target.redacted()
        assert "***" in redacted(target.url)
    assert parse(f"unix://u@/s.sock?db=2&password_file={password_file}").db == 2
    sentinel = parse(f"redis+sentinel://app@s1:26379,s2/mymaster?password_file={password_file}")
    assert (sentinel.username, sentinel.password, sentinel.service) == ("app", SECRET, "mymaster")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read"),
        ("", "is empty"),
        ("\n", "is empty"),
        ("two\nlines-0123456789", "more than one line"),
        ("x" * 2000, "longer than 1024 bytes"),
        (b"\xff\xfe-0123456789", "not UTF-8"),
    ],
)
def test_an_unusable_password_file_is_one_clear_error(
    tmp_path: Path, content: str | bytes | None, problem: str
) -> None:
    path = tmp_path / "password"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigurationError, match=problem) as raised:
        parse(f"unix://subscriber@/run/redis.sock?password_file={path}")
    message = str(raised.value)
    assert str(path) in message
    assert "\n" not in message
    if isinstance(content, str) and content.strip():
        assert content.splitlines()[0] not in message  # never the content


def test_a_password_in_two_places_is_refused(
    password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError, match="both a password and password_file") as raised:
        parse(f"unix://subscriber:inline-0123456789@/s.sock?password_file={password_file}")
    assert "inline-0123456789" not in str(raised.value)
    with pytest.raises(ConfigurationError, match="more than once"):
        parse(f"unix://u@/s.sock?password_file={password_file}&password_file={password_file}")
    with pytest.raises(ConfigurationError, match="--redis-password-file names another"):
        resolve("unix://subscriber:inline-0123456789@/s.sock", str(password_file))
    # the flag fills a URL without a password
    assert resolve("unix://subscriber@/s.sock", str(password_file)).password == SECRET
    # $HOTRELOAD_REDIS_PASSWORD_FILE is a fallback: a URL's own password wins
    monkeypatch.setenv(ENV_PASSWORD_FILE, str(password_file))
    assert resolve("unix://subscriber@/s.sock").password == SECRET
    assert resolve("unix://subscriber:own-0123456789@/s.sock").password == "own-0123456789"
    monkeypatch.setenv(ENV_PASSWORD_FILE, "/nonexistent/password")
    with pytest.raises(ConfigurationError, match="cannot read"):
        resolve("unix://subscriber@/s.sock")


def file_url(server: DeployedRedis, user: str, directory: Path) -> str:
    """``user``'s URL with the password in a file of its own (a mounted Secret's key)."""
    path = directory / f"{user}-password"
    path.write_text(PASSWORDS[user])
    return f"unix://{user}@{server.socket_path}?password_file={path}"


def test_the_daemon_a_subscriber_and_the_cli_log_in_with_password_files(
    deployed_redis: DeployedRedis,
    admin: redis.Redis,
    kubelet_mount: KubeletMount,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    kubelet_mount.write({"app.yaml": b"limit: 1\n"})
    daemon = Daemon(
        [kubelet_mount.directory],
        redis_url=resolve_url(file_url(deployed_redis, "publisher", tmp_path)),
        check_interval=0.2,
    )
    thread = threading.Thread(target=daemon.run, name="test-daemon", daemon=True)
    thread.start()
    try:
        wait_until(lambda: daemon.ready()[0])
        applied: list[str] = []
        with Subscriber(
            "app.yaml",
            applied.append,
            redis_url=file_url(deployed_redis, "subscriber", tmp_path),
            metrics=False,
        ) as sub:
            assert applied == ["limit: 1\n"]
            kubelet_mount.set("app.yaml", b"limit: 2\n")
            wait_until(lambda: sub.version == 2)
        operator = file_url(deployed_redis, "operator", tmp_path)
        assert hotreload(["history", "app.yaml", "--redis", operator]) == 0
        # --redis-password-file with a URL that names the user only
        bare = f"unix://operator@{deployed_redis.socket_path}"
        flag = ["--redis-password-file", str(tmp_path / "operator-password")]
        assert hotreload(["status", "app.yaml", "--redis", bare, *flag]) == 0
        capsys.readouterr()
        # a missing file: one line saying what to do, no traceback, no Redis contacted
        missing = ["--redis-password-file", str(tmp_path / "nothing")]
        assert hotreload(["status", "app.yaml", "--redis", bare, *missing]) != 0
        err = capsys.readouterr().err
        assert "cannot read" in err
        assert "mount the Secret" in err
        assert "Traceback" not in err
    finally:
        daemon.request_stop()
        thread.join(10)
    assert not thread.is_alive()
    assert admin.xlen(stream_keys("app.yaml").events) == 2
    denials = admin.acl_log()
    assert denials == []


def test_a_wrong_password_in_the_file_is_refused(
    deployed_redis: DeployedRedis, tmp_path: Path
) -> None:
    path = tmp_path / "password"
    path.write_text(PASSWORDS["publisher"])  # another user's
    client = connect(
        resolve_url(f"unix://subscriber@{deployed_redis.socket_path}?password_file={path}"),
        socket_timeout=5,
    )
    try:
        with pytest.raises(redis.AuthenticationError):
            client.ping()
    finally:
        client.close()


def rotate(server: DeployedRedis, admin: redis.Redis, user: str, directory: Path) -> str:
    """A new password for ``user``: its file replaced as kubelet updates a Secret volume (a
    new file renamed over), then Redis' ACL changed, then its connections cut."""
    new = f"rotated-{user}-0123456789"
    path = directory / f"{user}-password"
    staged = directory / f".{user}-password.new"
    staged.write_text(new)
    staged.replace(path)
    cast(Any, admin).execute_command("ACL", "SETUSER", user, "resetpass", f">{new}")
    cast(Any, admin).execute_command("CLIENT", "KILL", "USER", user)
    return new


def test_a_rotated_password_file_is_read_again_on_reconnect(
    deployed_redis: DeployedRedis,
    admin: redis.Redis,
    kubelet_mount: KubeletMount,
    tmp_path: Path,
) -> None:
    """No restart: the daemon's pool and a Subscriber's next connection read the file anew."""
    kubelet_mount.write({"app.yaml": b"limit: 1\n"})
    daemon = Daemon(
        [kubelet_mount.directory],
        redis_url=resolve_url(file_url(deployed_redis, "publisher", tmp_path)),
        check_interval=0.2,
    )
    thread = threading.Thread(target=daemon.run, name="test-daemon", daemon=True)
    thread.start()
    try:
        wait_until(lambda: daemon.ready()[0])
        with Subscriber(
            "app.yaml",
            lambda _: None,
            redis_url=file_url(deployed_redis, "subscriber", tmp_path),
            metrics=False,
        ) as sub:
            assert sub.version == 1
            for user in ("publisher", "subscriber"):
                rotate(deployed_redis, admin, user, tmp_path)
            kubelet_mount.set("app.yaml", b"limit: 2\n")
            wait_until(lambda: sub.version == 2, timeout=30)
            # both logged in again, with the new passwords only
            users = {c["user"] for c in admin.client_list()}
            assert {"publisher", "subscriber"} <= users
        old = connect(deployed_redis.url_for("subscriber"), socket_timeout=5)
        try:
            with pytest.raises(redis.AuthenticationError):
                old.ping()
        finally:
            old.close()
    finally:
        daemon.request_stop()
        thread.join(10)
    assert not thread.is_alive()


def test_the_url_handed_on_names_the_file_never_the_password(password_file: Path) -> None:
    """What resolve_url gives the daemon and the CLI (``Target.spec``): parsed again, it reads
    the file again; it carries no password to copy into a log or another process."""
    for url in (
        f"unix://subscriber@/s.sock?db=1&password_file={password_file}",
        "unix:///s.sock",
    ):
        spec = resolve_url(url, None if "password_file" in url else str(password_file))
        assert SECRET not in spec
        assert f"password_file={password_file}" in spec
        assert parse(spec) == resolve(url, None if "password_file" in url else str(password_file))
        assert parse(spec).password == SECRET


def load_example_app(monkeypatch: pytest.MonkeyPatch, key_file: Path | None) -> None:
    """deploy/example/app.py imported afresh (it makes its Subscribers at import, no I/O)."""
    monkeypatch.setenv("HOTRELOAD_REDIS_URL", "unix:///nowhere/redis.sock")  # never connected
    if key_file is None:
        monkeypatch.delenv("HOTRELOAD_SIGNING_KEY_FILE", raising=False)
    else:
        monkeypatch.setenv("HOTRELOAD_SIGNING_KEY_FILE", str(key_file))
    spec = importlib.util.spec_from_file_location("example_app_under_test", EXAMPLE / "app.py")
    assert spec is not None
    assert spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_the_example_app_reads_its_signing_key_from_the_publishers_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The same $HOTRELOAD_SIGNING_KEY_FILE as the publisher's: a path, never the key."""
    key = tmp_path / "signing-key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    load_example_app(monkeypatch, key)
    load_example_app(monkeypatch, None)  # no key: signatures not checked
    key.write_text("too-short\n")  # proves the file's content reaches the Subscribers
    with pytest.raises(ConfigurationError, match=r"signing_key=.*shorter than 16"):
        load_example_app(monkeypatch, key)
