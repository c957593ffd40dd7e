"""Page origins: how they are written down, and which a key may be used from."""

from __future__ import annotations

import pytest

from events_server.server.settings import Settings
from events_server.wire.origins import decide_origin, normalize_origin


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("https://shop.example", "https://shop.example"),
        ("https://Shop.EXAMPLE/", "https://shop.example"),
        ("https://shop.example:443", "https://shop.example"),
        ("http://shop.example:80", "http://shop.example"),
        ("http://localhost:3000", "http://localhost:3000"),
        ("https://shop.example:8443", "https://shop.example:8443"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_origins_are_written_as_browsers_send_them(given: str, normal: str) -> None:
    assert normalize_origin(given) == normal


@pytest.mark.parametrize(
    "bad",
    [
        "null",
        "*",
        "",
        "shop.example",
        "ftp://shop.example",
        "https://shop.example/path",
        "https://shop.example?x=1",
        "https://user@shop.example",
        "https://shop.example:99999",
    ],
)
def test_anything_else_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="origin"):
        normalize_origin(bad)


def test_a_keys_own_list_rules_and_credentials_need_a_named_origin() -> None:
    own = ("https://a.example",)
    assert decide_origin(own, "https://a.example", ("*",)).credentials
    # The key's list is the whole answer: the global fallback does not widen it.
    assert not decide_origin(own, "https://b.example", ("https://b.example", "*")).allowed
    assert not decide_origin(own, "https://a.example.evil", ()).allowed
    assert not decide_origin(own, "http://a.example", ()).allowed


def test_keys_without_origins_fall_back_and_a_wildcard_never_carries_credentials() -> None:
    named = decide_origin((), "https://b.example", ("https://b.example",))
    assert (named.allowed, named.credentials) == (True, True)
    wild = decide_origin((), "https://anyone.example", ("*",))
    assert (wild.allowed, wild.credentials) == (True, False)
    assert not decide_origin((), "null", ("*",)).allowed
    assert not decide_origin((), "https://b.example", ()).allowed


def test_the_global_list_is_checked_at_start_up() -> None:
    settings = Settings(cors_origins="https://A.example, *,http://localhost:3000")
    assert settings.cors_origins == ("https://a.example", "*", "http://localhost:3000")
    with pytest.raises(ValueError, match="must look like"):
        Settings(cors_origins="null")
