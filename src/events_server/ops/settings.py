"""Settings from the environment or flags: the helpers every process's settings share."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Annotated, Literal, TypeVar

from pydantic import AliasChoices, BeforeValidator, Field, SecretStr
from pydantic_settings import BaseSettings

ENV_PREFIX = "EVENTS_"

S = TypeVar("S", bound=BaseSettings)

LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v),
]


AccessLogSample = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
"""EVENTS_ACCESS_LOG_SAMPLE, which the server and the bridge both read."""

ACCESS_LOG_SAMPLE = 0.01
ACCESS_LOG_SAMPLE_HELP = (
    "Share of successful requests' access lines written, 0 to 1 (0.01: the first, then one"
    " in a hundred); refusals and errors (any other HTTP status, any other gRPC code) are"
    " always written, and the metrics count every request."
)


MIN_BRIDGE_TOKEN_CHARS = 16


def _bridge_token(value: object) -> object:
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    if raw is None or raw == "":
        return None  # EVENTS_BRIDGE_TOKEN= (empty) is unset
    if isinstance(raw, str) and (
        len(raw) < MIN_BRIDGE_TOKEN_CHARS or not (raw.isascii() and raw.isprintable())
    ):
        # It travels as gRPC metadata (printable ASCII); a short secret is a guessable one.
        raise ValueError(
            f"must be at least {MIN_BRIDGE_TOKEN_CHARS} printable ASCII characters"
            " (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return value


BridgeToken = Annotated[SecretStr | None, BeforeValidator(_bridge_token)]
"""EVENTS_BRIDGE_TOKEN, which the server and the bridge both read: unset when empty."""


def add_settings_flags(
    parser: argparse.ArgumentParser,
    settings_cls: type[BaseSettings],
    names: Iterable[str],
    short: Mapping[str, str] | None = None,
) -> None:
    """Add a --flag for each named setting (plus any ``short`` alias), with env and default."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    for name in names:
        field = settings_cls.model_fields[name]
        aliases = field.validation_alias
        env = (
            aliases.choices[0]
            if isinstance(aliases, AliasChoices) and isinstance(aliases.choices[0], str)
            else f"{prefix}{name}".upper()
        )
        flags = [f"--{name.replace('_', '-')}"]
        if short and name in short:
            flags.insert(0, short[name])
        if field.annotation is bool:
            parser.add_argument(
                *flags,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{field.description} [env {env}; default: {field.default}]",
            )
            continue
        kind: type[object] = (
            int if field.annotation is int else float if field.annotation is float else str
        )
        parser.add_argument(
            *flags,
            dest=name,
            type=kind,
            default=None,
            metavar=name.split("_")[-1].upper(),
            help=f"{field.description} [env {env}; default: {field.default}]",
        )


def settings_from_args(settings_cls: type[S], args: argparse.Namespace) -> S:
    """Settings from the environment, overridden by any flag given on the command line."""
    given = {
        name: value
        for name, value in vars(args).items()
        if name in settings_cls.model_fields and value is not None
    }
    return settings_cls(**given)
