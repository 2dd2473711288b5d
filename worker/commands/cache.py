"""``purge-worker cache``: Cache Reserve, Regional and Smart Tiered Cache, Variants."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from worker import app
from worker.clock import SystemClock
from worker.cloudflare.client import CacheSetting
from worker.config.settings import Config
from worker.errors import UnknownZone, UsageError
from worker.observe import output

# setting name on the command line -> (API setting, actions it supports)
SETTINGS: dict[str, tuple[CacheSetting, tuple[str, ...]]] = {
    "reserve": (CacheSetting.CACHE_RESERVE, ("get", "edit", "status", "clear")),
    "regional-tiered": (CacheSetting.REGIONAL_TIERED, ("get", "edit")),
    "smart-tiered": (CacheSetting.SMART_TIERED, ("get", "edit", "delete")),
    "variants": (CacheSetting.VARIANTS, ("get", "edit", "delete")),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("setting", choices=list(SETTINGS))
    p.add_argument("action", choices=["get", "edit", "delete", "status", "clear"])
    p.add_argument("--zone", help="zone name or id (default: the only zone)")
    p.add_argument(
        "--value", help='on|off, or for variants a JSON object like {"jpeg": ["image/webp"]}'
    )


def run(args: argparse.Namespace, config: Config) -> int:
    setting, actions = SETTINGS[args.setting]
    if args.action not in actions:
        raise UsageError(f"cache {args.setting} supports {', '.join(actions)}, not {args.action}")
    accounts = app.accounts(config, SystemClock())
    try:
        zone = accounts.zone(args.zone)
    except UnknownZone as exc:
        raise UsageError(str(exc)) from None
    client = accounts.clients[zone.account]
    result: Any
    if args.action == "get":
        result = client.get_setting(zone.id, setting)
    elif args.action == "edit":
        result = client.edit_setting(zone.id, setting, _value(args, setting))
    elif args.action == "delete":
        result = client.delete_setting(zone.id, setting)
    elif args.action == "status":
        result = client.cache_reserve_clear_status(zone.id)
    else:
        result = client.cache_reserve_clear_start(zone.id)
    output.json_line({"zone": zone.name, **asdict(result)})
    accounts.close()
    return 0


def _value(args: argparse.Namespace, setting: CacheSetting) -> Any:
    if args.value is None:
        raise UsageError("edit needs --value")
    if setting is CacheSetting.VARIANTS:
        try:
            value = json.loads(args.value)
        except ValueError as exc:
            raise UsageError(f"--value for variants must be JSON: {exc}") from None
        if not isinstance(value, dict):
            raise UsageError(
                '--value for variants must be a JSON object like {"jpeg": ["image/webp"]}'
            )
        return value
    if args.value not in ("on", "off"):
        raise UsageError(f"--value must be on or off, got {args.value!r}")
    return args.value
