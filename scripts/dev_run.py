"""``make run``: a local broker, the emulator, the worker and sample events, all on loopback.

With ``KAFKA_BOOTSTRAP``, ``CLOUDFLARE_API_TOKEN`` and ``CONFIG`` all set it runs the worker for
real instead: ``purge-worker run -c $CONFIG``. Ctrl-C stops every process it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.kafka_broker import Broker, BrokerError, free_port  # noqa: E402
from scripts.publish import main as publish  # noqa: E402

CONFIG = ROOT / "examples" / "config.yaml"
TOPIC, DLQ = "cms.content", "cms.content.purge-dlq"
ZONES = ["023e105f4ecef8ad9ca31a8372d0c353", "9a7806061c88ada191ed06f989cc3dac"]
TOKEN = "emulator-token"
SHOWN_ITEMS = 20


def real_run() -> int:
    cmd = [sys.executable, "-m", "worker", "run", "-c", os.environ["CONFIG"]]
    print("running for real:", " ".join(cmd), flush=True)
    os.execv(sys.executable, cmd)
    return 1


def port_or_free(port: int) -> int:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


def show_new_purges(emulator_url: str, seen: int) -> int:
    try:
        purges = requests.get(f"{emulator_url}/__emulator/purges", timeout=2).json()
    except requests.RequestException:
        return seen
    for p in purges[seen:]:
        items = [
            i if isinstance(i, str) else f"{i['url']} {json.dumps(i['headers'])}"
            for i in p["items"]
        ]
        print(
            f"  PURGE {p['endpoint']:16} zone {p['zone_id'][:8]}… {p['kind']:10} "
            f"{len(items)} item(s)",
            flush=True,
        )
        for item in items[:SHOWN_ITEMS]:
            print(f"        {item}", flush=True)
        if len(items) > SHOWN_ITEMS:
            print(f"        … and {len(items) - SHOWN_ITEMS} more", flush=True)
    return len(purges)


def main() -> int:
    if all(os.environ.get(v) for v in ("KAFKA_BOOTSTRAP", "CLOUDFLARE_API_TOKEN", "CONFIG")):
        return real_run()
    children: list[subprocess.Popen[bytes]] = []
    broker = Broker(port=port_or_free(9092))
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        print(f"starting a local Kafka broker on {broker.bootstrap} …", flush=True)
        broker.start()
        emu_port = port_or_free(8787)
        emulator_url = f"http://127.0.0.1:{emu_port}"
        zone_args = [a for z in ZONES for a in ("--zone", z)]
        children.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "worker",
                    "emulator",
                    "--port",
                    str(emu_port),
                    "--token",
                    TOKEN,
                    *zone_args,
                ],
                cwd=ROOT,
            )
        )
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        for name, parts in ((TOPIC, 3), (DLQ, 1)):
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([NewTopic(name, num_partitions=parts, replication_factor=1)])
        admin.close()
        env = {
            **os.environ,
            "KAFKA_BOOTSTRAP": broker.bootstrap,
            "CLOUDFLARE_API_TOKEN": TOKEN,
            "CLOUDFLARE_BASE_URL": f"{emulator_url}/client/v4",
        }
        # The example's ports, unless something else holds them already.
        metrics_port, health_port = port_or_free(9464), port_or_free(8080)
        run = [sys.executable, "-m", "worker", "run", "-c", str(CONFIG)]
        ports = ["--metrics-port", str(metrics_port), "--health-port", str(health_port)]
        children.append(subprocess.Popen([*run, *ports], cwd=ROOT, env=env))
        time.sleep(2)
        events = sorted((ROOT / "examples" / "events").glob("*.json"))
        publish([*map(str, events), "--topic", TOPIC, "--bootstrap", broker.bootstrap])
        print(
            "\npurge-worker is running; purges appear below "
            f"(also at {emulator_url}/__emulator/purges).\nMetrics: "
            f"http://127.0.0.1:{metrics_port}/metrics, health: "
            f"http://127.0.0.1:{health_port}/readyz\nPublish more: .venv/bin/python "
            "scripts/publish.py examples/events/article-updated.json "
            f"--bootstrap {broker.bootstrap}\nCtrl-C stops everything.\n",
            flush=True,
        )
        seen = 0
        while not stopping:
            seen = show_new_purges(emulator_url, seen)
            if any(c.poll() is not None for c in children):
                print("a child process exited; stopping", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    except BrokerError as exc:
        print(f"could not start Kafka: {exc}", file=sys.stderr)
        return 1
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        broker.cleanup()
        print("stopped: worker, emulator and broker", flush=True)


if __name__ == "__main__":
    sys.exit(main())
