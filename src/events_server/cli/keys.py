"""``events-server keys create | list | revoke``: API keys, as operators manage them."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, TextIO

from events_server.cli.common import redis_for
from events_server.ops.settings import add_settings_flags
from events_server.server.auth import ApiKey, KeyStore
from events_server.server.settings import Settings

KEY_FLAGS = ("redis_url", "redis_cluster", "key_prefix", "redis_timeout_seconds")


def add_commands(commands: Any) -> None:
    """The ``keys`` command and its subcommands."""
    keys_cmd = commands.add_parser("keys", help="create, list and revoke API keys")
    actions = keys_cmd.add_subparsers(dest="keys_command", required=True)

    create = actions.add_parser(
        "create", help="create a key; its secret is printed once, alone on the last line"
    )
    create.add_argument(
        "--tenant", action="append", required=True, help="a tenant the key may write (repeatable)"
    )
    create.add_argument("--label", default="", help="what the key is for, shown by keys list")
    create.add_argument(
        "--origin",
        action="append",
        default=[],
        help="a page origin (https://shop.example) that may use the key from a browser"
        " (repeatable; none: EVENTS_CORS_ORIGINS applies)",
    )
    limits = actions.add_parser(
        "limits", help="set a key's rate limits (a flag left out: the server's default)"
    )
    limits.add_argument("key_id", metavar="ID", help="the key's id (key_...), from keys list")
    for command in (create, limits):
        _add_rate_flags(command)
    listing = actions.add_parser("list", help="ids, tenants, labels and origins; never secrets")
    listing.add_argument("--json", action="store_true", help="one JSON object per key")
    revoke = actions.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", metavar="ID", help="the key's id (key_...), from keys list")
    for command in (create, listing, revoke, limits):
        add_settings_flags(command, Settings, KEY_FLAGS)
        command.set_defaults(
            run=lambda args, settings: asyncio.run(_run(args, settings, sys.stdout))
        )


async def _run(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    async with redis_for(settings) as (redis, keys):
        store = KeyStore(redis, keys)
        if args.keys_command == "create":
            try:
                key, secret = await store.create(
                    args.tenant, args.label, args.origin, **_rates(args)
                )
            except ValueError as exc:
                print(f"events-server keys create: {exc}", file=sys.stderr)
                return 2
            out.write(f"created {describe(key)}\n")
            out.write("the key (shown only this once; Redis keeps only its SHA-256):\n")
            out.write(secret + "\n")
        elif args.keys_command == "limits":
            changed = await store.set_rates(args.key_id, **_rates(args))
            if changed is None:
                print(f"events-server keys limits: no key {args.key_id!r}", file=sys.stderr)
                return 1
            out.write(
                f"limits of {describe(changed)}; servers apply them within"
                f" {settings.key_cache_seconds:g} s (EVENTS_KEY_CACHE_SECONDS)\n"
            )
        elif args.keys_command == "list":
            for key in await store.list():
                out.write((json.dumps(public(key)) if args.json else describe(key)) + "\n")
        else:
            revoked = await store.revoke(args.key_id)
            if revoked is None:
                print(f"events-server keys revoke: no key {args.key_id!r}", file=sys.stderr)
                return 1
            out.write(
                f"revoked {revoked.id} at {revoked.revoked}; servers refuse it within"
                f" {settings.key_cache_seconds:g} s (EVENTS_KEY_CACHE_SECONDS)\n"
            )
    return 0


def public(key: ApiKey) -> dict[str, Any]:
    """What may be shown of a key: everything but its digest."""
    return {
        "id": key.id,
        "tenants": list(key.tenants),
        "label": key.label,
        "origins": list(key.origins),
        "created": key.created,
        "revoked": key.revoked,
        **{name: value for name, value in _key_rates(key).items() if value is not None},
    }


def describe(key: ApiKey) -> str:
    """One line: id, tenants, label, origins, created (and revoked)."""
    parts = [
        key.id,
        f"tenants={','.join(key.tenants)}",
        f"label={key.label!r}",
        f"origins={','.join(key.origins) or '-'}",
        f"created={key.created}",
    ]
    if key.revoked:
        parts.append(f"revoked={key.revoked}")
    parts.extend(
        f"{name}={value:g}" for name, value in _key_rates(key).items() if value is not None
    )
    return " ".join(parts)


RATE_FLAGS = ("requests_per_second", "events_per_second", "burst_seconds")


def _add_rate_flags(command: argparse.ArgumentParser) -> None:
    for name, help_text in (
        (
            "requests_per_second",
            "requests/s the key may make (default: EVENTS_KEY_REQUESTS_PER_SECOND)",
        ),
        ("events_per_second", "events/s the key may send (default: EVENTS_KEY_EVENTS_PER_SECOND)"),
        (
            "burst_seconds",
            "seconds' worth of its rates it may send at once (default: EVENTS_RATE_BURST_SECONDS)",
        ),
    ):
        command.add_argument(
            f"--{name.replace('_', '-')}", type=_rate, default=None, metavar="N", help=help_text
        )


def _rate(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be 0 (no limit) or more")
    return value


def _rates(args: argparse.Namespace) -> dict[str, float | None]:
    return {name: getattr(args, name) for name in RATE_FLAGS}


def _key_rates(key: ApiKey) -> dict[str, float | None]:
    return {name: getattr(key, name) for name in RATE_FLAGS}
