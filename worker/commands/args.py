"""Argument types shared by the sub-commands: a bad value is one line and exit 2 via argparse."""

from __future__ import annotations

import argparse
import re

from worker.cloudflare.tiers import Tier
from worker.config.model import ZONE_ID_PATTERN

ZONE_ID = re.compile(ZONE_ID_PATTERN)
PLANS = tuple(p.value for p in Tier)


def port(text: str) -> int:
    """A TCP port; 0 means "off" (or "any free port" where a command says so)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (0..65535)")
    return value


def zone_spec(text: str) -> str:
    """``ZONE_ID[:PLAN]`` for the emulator."""
    zone_id, sep, plan = text.partition(":")
    if not ZONE_ID.match(zone_id):
        raise argparse.ArgumentTypeError(f"{zone_id!r} is not a zone id (32 lowercase hex)")
    if sep and plan not in PLANS:
        raise argparse.ArgumentTypeError(f"plan {plan!r} is not one of {', '.join(PLANS)}")
    return text


def positive_int(text: str) -> int:
    """A whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value
