"""TLS against a real ``redis-server`` with ``--tls-port`` and certificates made here.

The test makes its own CA (``openssl``), a server certificate for ``localhost`` only, a
client certificate, and an unrelated CA; the server requires client certificates
(``tls-auth-clients yes``). The TLS options are redis-py's, as ``rediss://`` URL query
parameters, so the daemon, the CLI and both subscribers take them the same way.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from publisher.cli import main
from subscriber import AsyncSubscriber, Subscriber
from subscriber._redis import connect
from subscriber._target import redacted, resolve_url
from subscriber.errors import ConfigurationError, RedisUnavailable
from subscriber.keys import stream_keys
from subscriber.testing import RedisServer, free_port
from tests.conftest import KubeletMount, Processes
from tests.helpers import events, start_daemon, wait_until
from tests.test_security import applied, start_worker


@dataclass(frozen=True)
class Pki:
    directory: Path

    def __getattr__(self, name: str) -> str:
        return str(self.directory / name.replace("_", "."))


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def _ca(directory: Path, name: str) -> None:
    # the extensions a real CA has: Python >= 3.13 verifies strictly (VERIFY_X509_STRICT) and
    # refuses a CA without keyUsage, and a leaf without an authority key identifier
    _openssl(
        directory, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
        "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def _issue(directory: Path, name: str, subject: str, extensions: str) -> None:
    strict = "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
    (directory / f"{name}.ext").write_text(extensions + "\n" + strict)
    _openssl(
        directory, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
    )  # fmt: skip
    _openssl(
        directory, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    _ca(directory, "ca")
    _ca(directory, "other")  # a CA that signed nothing the server has
    _issue(directory, "server", "/CN=localhost", "subjectAltName=DNS:localhost")
    _issue(directory, "client", "/CN=hotreload-worker", "extendedKeyUsage=clientAuth")
    return Pki(directory)


@dataclass(frozen=True)
class TlsRedis:
    server: RedisServer
    port: int
    pki: Pki

    def url(
        self, *, host: str = "localhost", ca: str | None = None, client_cert: bool = True
    ) -> str:
        options = [f"ssl_ca_certs={ca or self.pki.ca_crt}"]
        if client_cert:
            options += [f"ssl_certfile={self.pki.client_crt}", f"ssl_keyfile={self.pki.client_key}"]
        return f"rediss://{host}:{self.port}/0?" + "&".join(options)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TlsRedis]:
    """A redis-server with a TLS port that requires client certificates (and a unix socket
    for the fixture's own readiness check)."""
    port = free_port()
    server = RedisServer(
        tmp_path_factory.mktemp("redis-tls"),
        extra_args=(
            "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", pki.server_crt, "--tls-key-file", pki.server_key,
            "--tls-ca-cert-file", pki.ca_crt, "--tls-auth-clients", "yes",
        ),
    )  # fmt: skip
    try:
        server.start()
    except RuntimeError as exc:  # a redis-server built without TLS says so and exits
        pytest.skip(f"redis-server cannot serve TLS here: {exc}")
    try:
        yield TlsRedis(server, port, pki)
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _no_env_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTRELOAD_REDIS_URL", raising=False)


def cli(capsys: pytest.CaptureFixture[str], url: str, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--redis", url])
    out, err = capsys.readouterr()
    return code, out, err


def test_daemon_workers_and_cli_work_over_tls_with_client_certificates(
    tls_redis: TlsRedis, kubelet_mount: KubeletMount, processes: Processes, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    url = tls_redis.url()
    kubelet_mount.write({"tls-app.yaml": b"rev: 1\n"})
    daemon = start_daemon(processes, tmp_path, url, kubelet_mount.directory)
    workers = [
        start_worker(processes, tmp_path, url, "tls-app.yaml", "sync"),
        start_worker(processes, tmp_path, url, "tls-app.yaml", "aio", aio=True),
    ]
    for worker in workers:
        assert worker.ready()["version"] == 1
    kubelet_mount.set("tls-app.yaml", b"rev: 2\n")
    client = connect(url, socket_timeout=5)
    try:
        for worker in workers:
            applied(client, "tls-app.yaml", worker, 2)
        assert [e.content for e in events(client, "tls-app.yaml")] == [b"rev: 1\n", b"rev: 2\n"]
        # the daemon and the workers are connected over TCP, and the server's only TCP port
        # is its TLS port (--port 0), which requires a client certificate
        clients = client.client_list()
        names = {c["name"].split(":")[0] for c in clients if c["addr"].startswith("127.0.0.1:")}
        assert {"hotreload-pub", "hotreload-sub"} <= names
    finally:
        client.close()
    code, out, err = cli(capsys, url, "history", "tls-app.yaml")
    assert (code, err) == (0, "")
    assert len(out.strip().splitlines()) == 3
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("wrong CA", "TLS verification of the server's certificate failed"),
        ("name mismatch", "TLS verification of the server's certificate failed"),
        ("no client certificate", "client certificate"),
    ],
)
def test_tls_fails_closed_with_one_clear_error(
    tls_redis: TlsRedis, capsys: pytest.CaptureFixture[str], variant: str, expected: str
) -> None:
    url = {
        "wrong CA": tls_redis.url(ca=tls_redis.pki.other_crt),
        # the certificate names localhost; 127.0.0.1 is the same server, but not the name
        "name mismatch": tls_redis.url(host="127.0.0.1"),
        "no client certificate": tls_redis.url(client_cert=False),
    }[variant]

    code, out, err = cli(capsys, url, "history", "anything.yaml")
    assert (code, out) == (3, "")
    [line] = err.strip().splitlines()
    assert line.startswith("hotreload: error: cannot reach Redis at rediss://")
    assert expected in line

    with pytest.raises(RedisUnavailable) as raised:
        Subscriber("tls-closed.yaml", print, redis_url=url, start_timeout=0.3).start()
    assert expected in str(raised.value)
    assert "\n" not in str(raised.value)

    import asyncio

    async def start_async() -> None:
        await AsyncSubscriber("tls-closed.yaml", print, redis_url=url, start_timeout=0.3).start()

    with pytest.raises(RedisUnavailable, match=expected):
        asyncio.run(start_async())


def test_the_daemon_says_once_why_tls_fails_and_publishes_nothing(
    tls_redis: TlsRedis, kubelet_mount: KubeletMount, processes: Processes, tmp_path: Path
) -> None:
    kubelet_mount.write({"tls-never.yaml": b"a: 1\n"})
    daemon = start_daemon(
        processes, tmp_path, tls_redis.url(ca=tls_redis.pki.other_crt), kubelet_mount.directory
    )
    wait_until(lambda: "TLS verification" in daemon.output(), timeout=10)
    time.sleep(1.5)  # several retries later
    lines = [line for line in daemon.output().splitlines() if "TLS verification" in line]
    assert len(lines) == 1
    assert "ERROR" in lines[0]
    assert "ssl_ca_certs" in lines[0]
    assert daemon.stop() == 0
    client = connect(tls_redis.url(), socket_timeout=5)
    try:
        assert not client.exists(stream_keys("tls-never.yaml").events)
    finally:
        client.close()


def test_a_plain_connection_to_the_tls_port_is_refused(
    tls_redis: TlsRedis, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(capsys, f"redis://localhost:{tls_redis.port}/0", "status")
    assert code == 3
    assert err.startswith("hotreload: error: cannot reach Redis")


def test_url_options_are_checked_before_anything_connects() -> None:
    good = "rediss://h:6380/0?ssl_ca_certs=/ca.crt&ssl_cert_reqs=required&ssl_check_hostname=true"
    assert resolve_url(good) == good
    for url, message in [
        ("redis://h/0?ssl_ca_certs=/ca.crt", "use a rediss:// URL"),
        ("unix:///r.sock?ssl_certfile=/c.crt", "use a rediss:// URL"),
        ("rediss://h/0?ssl_ca_cert=/ca.crt", "unknown option 'ssl_ca_cert'"),  # a typo
        ("rediss://h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of"),
        ("rediss://h/0?socket_timeout=1", "set by hotreload itself"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            resolve_url(url)
    # the passphrase of an encrypted client key is a secret: never shown
    shown = redacted("rediss://u:pw@h/0?ssl_keyfile=/k&ssl_password=hunter2")
    assert shown == "rediss://u:***@h/0?ssl_keyfile=/k&ssl_password=***"
    with pytest.raises(ConfigurationError, match=r"ssl_password=\*\*\*"):
        resolve_url("rediss://h/0?ssl_password=hunter2&bogus=1")
