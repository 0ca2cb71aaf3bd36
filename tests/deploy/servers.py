"""Redis as deploy/ ships it, for real: the ACL generator, one redis-server running
deploy/redis/redis.conf (the per-pod sidecar), and a 6-node Redis Cluster running
deploy/redis-cluster/redis.conf, created by the create Job's own script.

Only paths, ports and bind addresses are moved; the users are the ones ``gen-users-acl.sh``
writes, plus the tests' admin (``TEST_ADMIN``), which reads CONFIG, ACL LOG and roles. The
cluster is a ``subscriber.testing.RedisCluster`` whose nodes run the shipped file (default
user off) instead of the helper's own settings: every wait and fault of the helper applies.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from subscriber.testing import ClusterNode, RedisCluster, RedisServer
from tests.deploy.render import (
    CLUSTER_FILES,
    GENERATOR,
    PASSWORDS,
    POD_USERS,
    REDIS_FILES,
    SHARED,
    TEST_ADMIN,
    Shared,
    render,
)

CLUSTER_USERS = tuple(PASSWORDS)


def password_env(users: Iterable[str] = POD_USERS) -> dict[str, str]:
    """The generator's environment: ``HOTRELOAD_<USER>_PASSWORD`` of each of ``users``."""
    return {f"HOTRELOAD_{user.upper()}_PASSWORD": PASSWORDS[user] for user in users}


def generate_acl(path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``gen-users-acl.sh [args] path`` with only ``env`` (and PATH) in its environment."""
    return subprocess.run(
        ["sh", str(GENERATOR), *args, str(path)],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


def password_files(directory: Path, users: Iterable[str] = POD_USERS) -> dict[str, str]:
    """The generator's environment as deploy/ ships it: ``HOTRELOAD_<USER>_PASSWORD_FILE``,
    each naming a file of ``directory`` (the Secret's volume) with that user's password."""
    directory.mkdir(parents=True, exist_ok=True)
    env = {}
    for user in users:
        (directory / f"{user}-password").write_text(PASSWORDS[user])
        env[f"HOTRELOAD_{user.upper()}_PASSWORD_FILE"] = str(directory / f"{user}-password")
    return env


def write_acl(path: Path, users: Iterable[str], *args: str) -> None:
    """The generated ACL file of ``users`` (passwords from files, as deployed), plus the tests'
    admin user."""
    result = generate_acl(path, password_files(path.parent / "secrets", users), *args)
    assert result.returncode == 0, result.stderr
    with path.open("a") as fh:
        fh.write(f"user {TEST_ADMIN[0]} on >{TEST_ADMIN[1]} ~* &* +@all\n")


def moved_conf(source: Path, moved: dict[str, str]) -> str:
    """``source``'s text with the directives in ``moved`` set to new values (each must be
    there: a directive the shipped file no longer sets fails the test)."""
    moved = dict(moved)
    lines = []
    for line in source.read_text().splitlines():
        name = line.split(" ", 1)[0].lower()
        lines.append(f"{name} {moved.pop(name)}" if name in moved else line)
    assert not moved, f"{source.name} sets no {sorted(moved)}"
    return "\n".join(lines) + "\n"


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET, also for an HTTP error status."""
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 -- local http
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def http_status(url: str) -> int | None:
    """The status of a GET, None while nothing listens."""
    try:
        return http_get(url)[0]
    except OSError:
        return None


# ---------------------------------------------------------------------------- per-pod sidecar


class DeployedRedis(RedisServer):
    """redis-server running deploy/redis/redis.conf, only its four paths moved into a temp
    directory, with the ACL file gen-users-acl.sh writes (plus the tests' admin user)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.acl_path = self.directory / "users.acl"
        self.conf_path = self.directory / "redis.conf"
        moved = {
            "dir": str(self.directory),
            "unixsocket": self.socket_path,
            "aclfile": str(self.acl_path),
            "logfile": str(self.log_path),
        }
        self.conf_path.write_text(moved_conf(REDIS_FILES / "redis.conf", moved))

    def _args(self) -> list[str]:
        return [self.executable, str(self.conf_path)]

    @property
    def url(self) -> str:  # what wait_ready() connects with: the default user is off
        return self.url_for("publisher")

    def url_for(self, user: str, password: str | None = None) -> str:
        known = TEST_ADMIN[1] if user == TEST_ADMIN[0] else PASSWORDS[user]
        return f"unix://{user}:{password or known}@{self.socket_path}"


# ---------------------------------------------------------------------------- the cluster


def _password(user: str) -> str:
    return TEST_ADMIN[1] if user == TEST_ADMIN[0] else PASSWORDS[user]


def node_url(node: ClusterNode, user: str) -> str:
    return f"redis://{user}:{_password(user)}@{node.host}:{node.port}/0"


def node_client(node: ClusterNode, user: str = TEST_ADMIN[0]) -> redis.Redis:
    """A plain connection to one node as ``user``; a refusal fails at once, not after retries."""
    return redis.Redis(
        host=node.host,
        port=node.port,
        username=user,
        password=_password(user),
        socket_timeout=5,
        socket_connect_timeout=2,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def node_info(node: ClusterNode, section: str) -> dict[str, Any]:
    with node_client(node) as client:
        return cast(dict[str, Any], client.info(section))


def node_cluster_info(node: ClusterNode) -> dict[str, str]:
    with node_client(node) as client:
        text = cast(str, client.execute_command("CLUSTER", "INFO"))
    return dict(line.split(":", 1) for line in text.split() if ":" in line)


def job_script() -> str:
    """The create Job's shell script, as the built shared variant runs it."""
    (container,) = Shared(render(SHARED)).job_spec["containers"]
    command = container["command"]
    assert command[:2] == ["sh", "-c"]
    return cast(str, command[2])


class ShippedCluster(RedisCluster):
    """Six ``redis-server`` processes, each running deploy/redis-cluster/redis.conf with only
    its paths, port and bind address moved, the users ``gen-users-acl.sh --cluster`` writes
    (plus the tests' admin) and the node.conf ``entrypoint.sh`` writes; created by the create
    Job's own script. ``ips`` puts the nodes on loopback aliases, announcing hostnames
    ``n0.test``... and their IP (as pods do); otherwise they announce ``localhost``."""

    def __init__(self, directory: Path, job_script: str, *, ips: list[str] | None = None) -> None:
        super().__init__(directory, hosts=ips, username=TEST_ADMIN[0], password=TEST_ADMIN[1])
        self.job_script = job_script
        self.hostnames = ["localhost"] * 6 if ips is None else [f"n{i}.test" for i in range(6)]
        self.announce_ip = ips is not None  # the pods' own IP, as the bus would see it

    def node_command(self, node: ClusterNode) -> list[str]:
        index = self.nodes.index(node)
        acl = node.directory / "users.acl"
        write_acl(acl, CLUSTER_USERS, "--cluster")
        # what entrypoint.sh writes (plus, for the new-IP test, the pod's own IP)
        node_conf = [
            f"cluster-announce-hostname {self.hostnames[index]}",
            "masteruser replication",
            f"masterauth {PASSWORDS['replication']}",
        ]
        if self.announce_ip:
            node_conf.append(f"cluster-announce-ip {node.host}")
        (node.directory / "node.conf").write_text("\n".join(node_conf) + "\n")
        moved = {
            "port": str(node.port),
            "bind": node.host,
            "dir": str(node.directory),
            "cluster-config-file": str(node.config_path),
            "aclfile": str(acl),
            "include": str(node.directory / "node.conf"),
            "logfile": str(node.log_path),
        }
        conf = node.directory / "redis.conf"
        conf.write_text(moved_conf(CLUSTER_FILES / "redis.conf", moved))
        return [self.executable, str(conf)]

    def form_cluster(self, deadline: float) -> None:
        created = self.create()
        if created.returncode != 0 or "All 16384 slots covered" not in created.stdout:
            raise RuntimeError(f"the create Job's script failed: {created.stdout}{created.stderr}")

    def create(self) -> subprocess.CompletedProcess[str]:
        """The create Job's script, with this cluster's nodes as NODES."""
        return subprocess.run(
            ["sh", "-c", self.job_script],
            env={
                "PATH": os.environ["PATH"],
                **password_files(self.directory / "job-secrets", ["admin"]),
                "NODES": " ".join(node.address for node in self.nodes),
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def reset_acl_logs(self) -> None:
        for node in self.nodes:
            if node.live:
                with node_client(node) as client:
                    client.acl_log_reset()

    def acl_denials(self) -> list[tuple[int, str, str, str]]:
        denials = []
        for node in self.nodes:
            if not node.live:
                continue
            with node_client(node) as client:
                for entry in cast(list[dict[str, Any]], client.acl_log()):
                    denials.append((node.port, entry["username"], entry["reason"], entry["object"]))
        return denials
