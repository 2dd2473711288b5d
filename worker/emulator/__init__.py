"""A local emulator of Cloudflare's Cache API, for development, tests and trying rules safely."""

from worker.emulator.server import Emulator
from worker.emulator.state import EmulatorState

__all__ = ["Emulator", "EmulatorState"]
