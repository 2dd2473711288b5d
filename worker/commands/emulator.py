"""``purge-worker emulator``: serve the local Cloudflare API emulator until interrupted."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys

from worker.commands import args
from worker.emulator import Emulator, EmulatorState
from worker.errors import UsageError

# A fixed demo zone, so the examples work against a freshly started emulator.
DEMO_ZONE = "023e105f4ecef8ad9ca31a8372d0c353"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument(
        "--port", type=args.port, default=8787, help="port to listen on (0 picks a free one)"
    )
    p.add_argument("--plan", choices=args.PLANS, default="pro", help="the default account's plan")
    p.add_argument("--token", default="emulator-token", help="the API token it accepts")
    p.add_argument(
        "--zone",
        action="append",
        default=[],
        metavar="ZONE_ID[:PLAN]",
        type=args.zone_spec,
        help=f"a zone it knows (repeatable; default {DEMO_ZONE}); ':PLAN' puts the "
        "zone in its own account on that plan",
    )
    p.add_argument("--no-rate-limit", action="store_true", help="accept every request at once")
    p.add_argument(
        "--files-cap",
        type=args.positive_int,
        default=None,
        help="URLs per request (default: the plan's)",
    )
    p.add_argument(
        "--flex-cost",
        choices=["request", "item"],
        default="request",
        help="whether a tag/host/prefix request costs one token or one per item",
    )
    p.add_argument(
        "--clear-seconds",
        type=args.positive_float,
        default=5.0,
        help="seconds a Cache Reserve clear takes",
    )
    p.add_argument("--verbose", action="store_true", help="log every request")


def build_state(opts: argparse.Namespace) -> EmulatorState:
    zones: dict[str, str] = {}
    accounts: dict[str, str] = {"default": opts.plan}
    for spec in opts.zone or [DEMO_ZONE]:
        zone_id, _, plan = spec.partition(":")
        if plan:
            accounts[zone_id] = plan
            zones[zone_id] = zone_id
        else:
            zones[zone_id] = "default"
    return EmulatorState(
        zones,
        accounts,
        token=opts.token,
        rate_limits=not opts.no_rate_limit,
        files_cap=opts.files_cap,
        flex_cost_per_item=opts.flex_cost == "item",
        clear_seconds=opts.clear_seconds,
    )


def run(opts: argparse.Namespace) -> int:
    state = build_state(opts)
    try:
        emulator = Emulator(state, host=opts.host, port=opts.port, verbose=opts.verbose)
    except OSError as exc:
        raise UsageError(f"cannot listen on {opts.host}:{opts.port}: {exc.strerror}") from None
    print(
        f"emulator: Cloudflare API on {emulator.api_url} (plan {opts.plan}, zones "
        f"{', '.join(state.zones)}); inspect {emulator.url}/__emulator/purges",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        emulator.serve_forever()
    return 0
