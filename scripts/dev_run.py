"""``make run``: a local broker, the emulator, the worker and sample events, all on loopback."""

from __future__ import annotations

import sys

from scripts.kafka_broker import main

if __name__ == "__main__":
    sys.exit(main(["run"]))
