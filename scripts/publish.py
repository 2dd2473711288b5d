"""Publish event files (JSON) to a Kafka topic: `python scripts/publish.py FILE... [--topic T]`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kafka import KafkaProducer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--topic", default="cms.content")
    parser.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:9092"))
    parser.add_argument("--key", default=None, help="record key (default: the file name)")
    args = parser.parse_args(argv)
    producer = KafkaProducer(bootstrap_servers=args.bootstrap)
    for path in args.files:
        key = (args.key or path.stem).encode()
        value = path.read_bytes()
        # Only CloudEvents are labelled as such; a plain JSON event goes without the header.
        is_ce = '"specversion"' in value.decode("utf-8", "replace")
        headers = [("content-type", b"application/cloudevents+json")] if is_ce else []
        producer.send(args.topic, value=value, key=key, headers=headers).get(timeout=30)
        print(f"published {path} to {args.topic}")
    producer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
