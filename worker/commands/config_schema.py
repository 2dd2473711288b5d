"""``purge-worker config-schema``: the config file's JSON Schema, generated from the model."""

from __future__ import annotations

import argparse

from worker.config.schema import config_schema, section_schema
from worker.errors import UsageError
from worker.observe import output

SECTIONS = ("kafka", "cloudflare", "coalesce", "delivery", "observability")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--section", choices=SECTIONS, help="print only this top-level section's schema")


def run(args: argparse.Namespace) -> int:
    try:
        schema = section_schema(args.section) if args.section else config_schema()
    except KeyError:
        raise UsageError(f"--section {args.section}: no such section") from None
    output.json_line(schema, indent=2, sort_keys=True)
    return 0
