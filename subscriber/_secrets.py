"""Redis passwords read from files, at parse time and again for every new connection.

A password in an environment variable is readable in ``/proc/PID/environ`` by the process's
user, is inherited by every child process, and has leaked before (a config directory with a
symlink to ``/proc/self/environ``). A file -- a key of a mounted Kubernetes Secret, a docker
secret -- is read by hotreload alone and never logged. ``_target`` reads it when a URL names
it (``?password_file=``) so that a missing or empty file is an error at start, and the
clients ``_redis`` and ``publisher._admin`` build read it again for every new connection
(:func:`password_file_credentials`): kubelet updates a mounted Secret in place, so a rotated
password reaches the next reconnect without restarting the process.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from subscriber.errors import ConfigurationError

if TYPE_CHECKING:
    from redis.credentials import CredentialProvider

__all__ = [
    "ENV_PASSWORD_FILE",
    "MAX_PASSWORD_FILE_BYTES",
    "PASSWORD_FILE_OPTION",
    "password_file_credentials",
    "read_password_file",
]

logger = logging.getLogger(__name__)

ENV_PASSWORD_FILE = "HOTRELOAD_REDIS_PASSWORD_FILE"  # noqa: S105 (a variable's name)
PASSWORD_FILE_OPTION = "password_file"  # noqa: S105 (an option's name)
# a password file longer than this is not one (a wrong path: a log, /proc/self/environ)
MAX_PASSWORD_FILE_BYTES = 1024


def read_password_file(path: str) -> str:
    """The password in the file at ``path`` (a trailing line break dropped, as ``$(cat)``
    does); ``ConfigurationError`` saying what to do when it cannot be used. The content is
    never part of a message."""
    where = (
        f"the Redis password file {path!r} "
        f"(password_file=, --redis-password-file, ${ENV_PASSWORD_FILE})"
    )
    if not path:
        raise ConfigurationError(
            "password_file= names no file: give the path of the password's file"
        )
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_PASSWORD_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read {where}: {exc.strerror or exc}; mount the Secret's key there "
            "(deploy/README.md) or correct the path"
        ) from None
    if len(data) > MAX_PASSWORD_FILE_BYTES:
        raise ConfigurationError(
            f"{where} is longer than {MAX_PASSWORD_FILE_BYTES} bytes: not a password file"
        )
    try:
        password = data.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise ConfigurationError(f"{where} is not UTF-8 text") from None
    if not password:
        raise ConfigurationError(f"{where} is empty: the Secret's key has no value")
    if "\n" in password or "\r" in password:
        raise ConfigurationError(f"{where} holds more than one line: not a password file")
    return password


def password_file_credentials(
    username: str | None, path: str, password: str | None
) -> CredentialProvider:
    """A redis-py credential provider that reads ``path`` for every new connection (redis-py
    asks it when it connects), starting from ``password`` (read when the URL was parsed)."""
    return _provider_class()(username, path, password)


@functools.cache
def _provider_class() -> Callable[[str | None, str, str | None], CredentialProvider]:
    from redis.credentials import CredentialProvider  # lazily: workers load redis on first use

    class PasswordFile(CredentialProvider):
        def __init__(self, username: str | None, path: str, password: str | None) -> None:
            self.username = username
            self.path = path
            self.password = password or ""

        def get_credentials(self) -> tuple[str] | tuple[str, str]:
            try:
                self.password = read_password_file(self.path)
            except ConfigurationError as exc:
                # e.g. kubelet swapping the Secret's files: the last one read; Redis refuses
                # it if it was rotated (and the next connection reads the file again)
                logger.warning("%s; using the password read before", exc)
            if self.username:
                return (self.username, self.password)
            return (self.password,)

        async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
            return self.get_credentials()

        def __repr__(self) -> str:  # never the password
            return f"PasswordFile({self.username!r}, {self.path!r})"

    return PasswordFile
