"""``purge-worker emulator``: serve the local Cloudflare API emulator until interrupted."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys

from worker.emulator import Emulator, EmulatorState

# A fixed demo zone, so the examples work against a freshly started emulator.
DEMO_ZONE = "023e105f4ecef8ad9ca31a8372d0c353"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8787, help="port (default 8787; 0 picks a free one)")
    p.add_argument("--plan", choices=["free", "pro", "business", "enterprise"], default="pro")
    p.add_argument("--token", default="emulator-token", help="the API token it accepts")
    p.add_argument(
        "--zone",
        action="append",
        default=[],
        metavar="ZONE_ID[:PLAN]",
        help=f"a zone it knows (repeatable; default {DEMO_ZONE}); ':PLAN' puts the "
        "zone in its own account on that plan",
    )
    p.add_argument("--no-rate-limit", action="store_true", help="accept every request at once")
    p.add_argument("--files-cap", type=int, default=None, help="URLs per request (default by plan)")
    p.add_argument(
        "--flex-cost",
        choices=["request", "item"],
        default="request",
        help="whether a tag/host/prefix request costs one token or one per item",
    )
    p.add_argument(
        "--clear-seconds",
        type=float,
        default=5.0,
        help="how long a Cache Reserve clear takes (default 5)",
    )
    p.add_argument("--verbose", action="store_true", help="log every request")


def build_state(args: argparse.Namespace) -> EmulatorState:
    zones: dict[str, str] = {}
    accounts: dict[str, str] = {"default": args.plan}
    for spec in args.zone or [DEMO_ZONE]:
        zone_id, _, plan = spec.partition(":")
        if plan:
            accounts[zone_id] = plan
            zones[zone_id] = zone_id
        else:
            zones[zone_id] = "default"
    return EmulatorState(
        zones,
        accounts,
        token=args.token,
        rate_limits=not args.no_rate_limit,
        files_cap=args.files_cap,
        flex_cost_per_item=args.flex_cost == "item",
        clear_seconds=args.clear_seconds,
    )


def run(args: argparse.Namespace) -> int:
    state = build_state(args)
    emulator = Emulator(state, host=args.host, port=args.port, verbose=args.verbose)
    print(
        f"emulator: Cloudflare API on {emulator.api_url} (plan {args.plan}, zones "
        f"{', '.join(state.zones)}); inspect {emulator.url}/__emulator/purges",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        emulator.serve_forever()
    return 0
