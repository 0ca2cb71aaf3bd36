"""The msgspec-typed helper: decode into a type, reject naming the field, swap the value."""

from __future__ import annotations

import threading

import msgspec
import pytest

from subscriber import ConfigurationError, TypedConfig, typed_subscriber
from subscriber.testing import RedisServer, append_event
from subscriber.typed import format_for_key
from tests.helpers import wait_until
from tests.workers.harness import acks


class Limits(msgspec.Struct, frozen=True):
    rate: int
    burst: int = 10
    paths: list[str] = []


def test_yaml_into_a_struct_and_a_precise_rejection() -> None:
    limits = TypedConfig(Limits)
    assert not limits.loaded
    with pytest.raises(LookupError, match="start the Subscriber"):
        _ = limits.value
    limits.apply("rate: 5\npaths: [/a, /b]\n")
    assert limits.value == Limits(rate=5, paths=["/a", "/b"])
    first = limits.value

    with pytest.raises(msgspec.ValidationError, match=r"Expected `int`, got `str` - at `\$.rate`"):
        limits.apply("rate: fast\n")
    with pytest.raises(msgspec.ValidationError, match=r"at `\$.paths\[1\]`"):
        limits.apply("rate: 1\npaths: [/a, 3]\n")
    with pytest.raises(msgspec.DecodeError):
        limits.apply("rate: [1\n")  # not YAML at all
    assert limits.value is first  # every rejection kept the previous value


def test_json_into_a_dict_of_flags() -> None:
    flags = TypedConfig(dict[str, bool], "json")
    flags.apply(b'{"new_checkout": true, "beta": false}')
    value: dict[str, bool] = flags.value  # typed for the app, checked by mypy
    assert value == {"new_checkout": True, "beta": False}
    with pytest.raises(msgspec.ValidationError, match="Expected `bool`, got `int`"):
        flags.apply('{"beta": 1}')


def test_toml_and_lenient_conversion() -> None:
    strict = TypedConfig(Limits, "toml")
    strict.apply('rate = 3\npaths = ["/x"]\n')
    assert strict.value.rate == 3
    lenient = TypedConfig(Limits, "yaml", strict=False)
    lenient.apply("rate: '7'\n")  # strings converted where msgspec can
    assert lenient.value.rate == 7


def test_format_comes_from_the_key_extension() -> None:
    assert format_for_key("limits.yaml") == "yaml"
    assert format_for_key("limits.YML") == "yaml"
    assert format_for_key("flags.json") == "json"
    assert format_for_key("app.toml") == "toml"
    with pytest.raises(ConfigurationError, match="pass format="):
        format_for_key("limits.conf")
    with pytest.raises(ConfigurationError, match="unknown format"):
        TypedConfig(Limits, "ini")  # type: ignore[arg-type]


def test_readers_never_see_a_partial_value() -> None:
    limits = TypedConfig(Limits)
    limits.apply("rate: 0\n")
    seen: list[Limits] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            value = limits.value
            assert value.burst == value.rate + 10  # one consistent object per read
            seen.append(value)

    reader = threading.Thread(target=read)
    limits.apply("rate: 0\nburst: 10\n")
    reader.start()
    for rate in range(1, 300):
        limits.apply(f"rate: {rate}\nburst: {rate + 10}\n")
    done.set()
    reader.join()
    assert seen


def test_typed_subscriber_end_to_end(redis_server: RedisServer) -> None:
    key = "limits.yaml"
    append_event(redis_server.url, key, b"rate: 5\n", version=1)
    sub, limits = typed_subscriber(
        key, Limits, redis_url=redis_server.url, worker_id="w", block_ms=300
    )
    with sub:
        assert limits.value.rate == 5
        append_event(redis_server.url, key, b"rate: lots\n", version=2)
        wait_until(lambda: sub.error_count == 1, "the bad config rejected")
        assert limits.value.rate == 5
        rejected = wait_until(
            lambda: [a for a in acks(redis_server.url, key) if a.status == "rejected"], "its ack"
        )
        # what the operator reads in :acks names the field
        assert rejected[0].error == "ValidationError: Expected `int`, got `str` - at `$.rate`"
        append_event(redis_server.url, key, b"rate: 6\nburst: 1\n", version=3)
        wait_until(lambda: limits.value.rate == 6, "version 3 decoded")
        assert limits.value == Limits(rate=6, burst=1)
