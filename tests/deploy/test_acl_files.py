"""What ``deploy/redis/gen-users-acl.sh`` writes: the per-pod users (hashed passwords, from
variables or files, another key prefix), the two more users of ``--cluster``, and the
passwords it refuses -- leaving no file behind.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.render import (
    COMPOSE,
    PASSWORDS,
    REPO,
)
from tests.deploy.servers import (
    CLUSTER_USERS,
    generate_acl,
    password_env,
)


def test_the_generated_acl_file(tmp_path: Path) -> None:
    path = tmp_path / "users.acl"
    result = generate_acl(path, password_env())
    assert result.returncode == 0, result.stderr
    text = path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    assert [line.split()[1] for line in text.splitlines()] == [
        "default",
        "publisher",
        "subscriber",
        "operator",
    ]
    assert text.splitlines()[0].split()[2:] == ["reset", "off"]
    for password in PASSWORDS.values():
        assert password not in text  # hashed (#<sha256>) only
    # without the optional operator password there is no operator user
    env = password_env()
    del env["HOTRELOAD_OPERATOR_PASSWORD"]
    assert generate_acl(path, env).returncode == 0
    assert "operator" not in path.read_text()
    # passwords from files (docker secrets), a trailing newline ignored: the same users
    files = {}
    for name, value in password_env().items():
        (tmp_path / name).write_text(value + "\n")
        files[f"{name}_FILE"] = str(tmp_path / name)
    assert generate_acl(path, files).returncode == 0
    assert path.read_text() == text
    # the file wins: a variable is only the fallback
    stale = {name.removesuffix("_FILE"): "stale-but-valid-0123456789" for name in files}
    assert generate_acl(path, {**stale, **files}).returncode == 0
    assert path.read_text() == text
    # the optional operator's file is absent when the Secret has no such key: no operator
    missing = {**files, "HOTRELOAD_OPERATOR_PASSWORD_FILE": str(tmp_path / "nothing")}
    assert generate_acl(path, missing).returncode == 0
    assert "operator" not in path.read_text()
    # a required one's is an error naming the variable
    missing = {**files, "HOTRELOAD_PUBLISHER_PASSWORD_FILE": str(tmp_path / "nothing")}
    result = generate_acl(path, missing)
    assert result.returncode == 1
    assert "HOTRELOAD_PUBLISHER_PASSWORD_FILE: cannot read" in result.stderr
    # another key prefix (hotreload watch --prefix) moves every key pattern
    assert generate_acl(path, {**password_env(), "HOTRELOAD_PREFIX": "shop"}).returncode == 0
    assert path.read_text() == text.replace("~hotreload:", "~shop:").replace(
        "&hotreload:", "&shop:"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"HOTRELOAD_SUBSCRIBER_PASSWORD": ""}, "is not set"),
        ({"HOTRELOAD_PUBLISHER_PASSWORD": "short"}, "shorter than 16"),
        ({"HOTRELOAD_PUBLISHER_PASSWORD": "has@an:url/char-0123456789"}, "may only contain"),
        ({"HOTRELOAD_OPERATOR_PASSWORD": "with space 0123456789"}, "may only contain"),
        ({"HOTRELOAD_SUBSCRIBER_PASSWORD": PASSWORDS["publisher"]}, "must differ"),
        ({"HOTRELOAD_PREFIX": "hot*"}, "HOTRELOAD_PREFIX"),
    ],
)
def test_the_acl_generator_refuses_bad_passwords(
    tmp_path: Path, change: dict[str, str], message: str
) -> None:
    path = tmp_path / "users.acl"
    result = generate_acl(path, {**password_env(), **change})
    assert result.returncode != 0
    assert message in result.stderr
    assert not list(tmp_path.iterdir())  # no file, not even a temporary one


def test_the_compose_default_passwords_make_a_valid_acl_file(tmp_path: Path) -> None:
    """Redis' service as compose runs it: the *_FILE variables name its secrets' files."""
    compose = yaml.safe_load(COMPOSE.read_text())
    redis_s = compose["services"]["redis"]
    mounted = {}
    for name in redis_s["secrets"]:
        source = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", compose["secrets"][name]["file"])
        mounted[f"/run/secrets/{name}"] = str(REPO / source)
    env = {k: mounted[v] for k, v in redis_s["environment"].items()}
    assert set(env) == {
        f"HOTRELOAD_{u}_PASSWORD_FILE" for u in ("PUBLISHER", "SUBSCRIBER", "OPERATOR")
    }
    result = generate_acl(tmp_path / "users.acl", env)
    assert result.returncode == 0, result.stderr


def test_the_cluster_acl_adds_two_users_and_only_what_cluster_clients_send(tmp_path: Path) -> None:
    per_pod, cluster = tmp_path / "per-pod.acl", tmp_path / "cluster.acl"
    assert generate_acl(per_pod, password_env(CLUSTER_USERS)).returncode == 0
    result = generate_acl(cluster, password_env(CLUSTER_USERS), "--cluster")
    assert result.returncode == 0, result.stderr
    assert cluster.stat().st_mode & 0o777 == 0o600

    def users(path: Path) -> dict[str, list[str]]:
        return {line.split()[1]: line.split()[2:] for line in path.read_text().splitlines()}

    pod_users, cluster_users = users(per_pod), users(cluster)
    assert list(pod_users) == ["default", "publisher", "subscriber", "operator"]
    assert list(cluster_users) == [*pod_users, "replication", "admin"]
    for password in PASSWORDS.values():
        assert password not in cluster.read_text()
    # the per-pod users stay as narrow as they were: no cluster client commands
    for name in ("publisher", "operator"):
        assert "+command" not in pod_users[name]
        assert "+cluster|slots" not in pod_users[name]
        extra = set(cluster_users[name]) - set(pod_users[name])
        assert {rule for rule in extra if not rule.startswith("#")} == {
            "+cluster|slots",
            "+command",
        }
    for name in ("default", "subscriber"):
        assert cluster_users[name] == pod_users[name]
    # the subscriber probes CLUSTER SLOTS on every connection, whichever Redis it talks to
    assert "+cluster|slots" in pod_users["subscriber"]
    # a process's keys share one blocked XREAD, which a key starting later wakes (_hub)
    assert {"+client|id", "+client|unblock"} <= set(pod_users["subscriber"])
    # the publish script announces entries on :notify, cluster keys wait there (_clusterhub)
    assert {"+spublish", "&hotreload:{*}:notify"} <= set(pod_users["publisher"])
    assert {"+ssubscribe", "&hotreload:{*}:notify"} <= set(pod_users["subscriber"])
    # neither new user may touch a key
    for name in ("replication", "admin"):
        assert not [rule for rule in cluster_users[name] if "~" in rule or rule == "allkeys"]
    assert [r for r in cluster_users["replication"] if r.startswith("+")] == [
        "+psync",
        "+replconf",
        "+ping",
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"HOTRELOAD_REPLICATION_PASSWORD": ""}, "HOTRELOAD_REPLICATION_PASSWORD"),
        ({"HOTRELOAD_ADMIN_PASSWORD": ""}, "HOTRELOAD_ADMIN_PASSWORD"),
        ({"HOTRELOAD_ADMIN_PASSWORD": "short"}, "shorter than 16"),
        ({"HOTRELOAD_ADMIN_PASSWORD": PASSWORDS["replication"]}, "must differ"),
        ({"HOTRELOAD_REPLICATION_PASSWORD": PASSWORDS["subscriber"]}, "must differ"),
        ({"HOTRELOAD_ADMIN_PASSWORD": PASSWORDS["operator"]}, "must differ"),
    ],
)
def test_the_cluster_acl_needs_its_own_passwords(
    tmp_path: Path, change: dict[str, str], message: str
) -> None:
    result = generate_acl(
        tmp_path / "users.acl", {**password_env(CLUSTER_USERS), **change}, "--cluster"
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert not list(tmp_path.iterdir())
    # the per-pod variant needs neither
    assert (
        generate_acl(tmp_path / "users.acl", {**password_env(CLUSTER_USERS), **change}).returncode
        == 0
    )
