"""``events-server storefronts add | list | remove``: origins that may send without a key."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, TextIO

from events_server.cli.common import redis_for
from events_server.ops.settings import add_settings_flags
from events_server.server.settings import Settings
from events_server.server.storefronts import Storefront, StorefrontStore

FLAGS = ("redis_url", "redis_cluster", "key_prefix", "redis_timeout_seconds")


def add_commands(commands: Any) -> None:
    """The ``storefronts`` command and its subcommands."""
    command = commands.add_parser(
        "storefronts", help="register the page origins that may send a tenant's events keyless"
    )
    actions = command.add_subparsers(dest="storefronts_command", required=True)
    add = actions.add_parser("add", help="let pages of these origins send the tenant's events")
    add.add_argument("--tenant", required=True, help="the tenant (store) the origins belong to")
    add.add_argument(
        "--origin",
        action="append",
        required=True,
        help="a page origin such as https://shop.example (repeatable)",
    )
    listing = actions.add_parser("list", help="every registered origin and its tenants")
    listing.add_argument("--json", action="store_true", help="one JSON object per origin")
    remove = actions.add_parser("remove", help="unregister origins of a tenant")
    remove.add_argument("--tenant", required=True, help="whose registrations")
    remove.add_argument(
        "--origin",
        action="append",
        default=[],
        help="an origin to unregister (repeatable; none: every origin of the tenant)",
    )
    for sub in (add, listing, remove):
        add_settings_flags(sub, Settings, FLAGS)
        sub.set_defaults(run=lambda args, settings: asyncio.run(_run(args, settings, sys.stdout)))


async def _run(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    async with redis_for(settings) as (redis, keys):
        store = StorefrontStore(redis, keys)
        action = args.storefronts_command
        try:
            if action == "add":
                for front in await store.add(args.tenant, args.origin):
                    out.write(f"registered {describe(front)}\n")
            elif action == "list":
                for front in await store.list():
                    out.write((json.dumps(public(front)) if args.json else describe(front)) + "\n")
            else:
                removed = await store.remove(args.tenant, args.origin)
                if not removed:
                    print(
                        f"events-server storefronts remove: no origin registered for"
                        f" {args.tenant!r}"
                        + (f" among {', '.join(args.origin)}" if args.origin else ""),
                        file=sys.stderr,
                    )
                    return 1
                for origin in removed:
                    out.write(f"removed {origin} for tenant {args.tenant}\n")
        except ValueError as exc:
            print(f"events-server storefronts {action}: {exc}", file=sys.stderr)
            return 2
    if action != "list":
        out.write(
            f"servers see the change within {settings.key_cache_seconds:g} s"
            " (EVENTS_KEY_CACHE_SECONDS)\n"
        )
    return 0


def public(front: Storefront) -> dict[str, Any]:
    """The JSON form ``list --json`` prints."""
    return {"origin": front.origin, "tenants": list(front.tenants), "created": front.created}


def describe(front: Storefront) -> str:
    """One line for people."""
    return f"{front.origin}  tenants={','.join(front.tenants)}  created={front.created}"
