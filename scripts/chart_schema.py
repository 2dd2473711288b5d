"""Copy the worker's generated config schema into the Helm chart's ``values.schema.json``.

The chart passes ``worker.coalesce``, ``worker.delivery`` and ``worker.warming`` through to the
worker's config file as they are, so their schema is the config model's own
(``purge-worker config-schema``), never a hand-written copy. Run by ``make chart-schema``; a
test fails when the two disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.config.schema import section_schema  # noqa: E402

CHART_SCHEMA = ROOT / "helm" / "purge-worker" / "values.schema.json"
PASSED_THROUGH = ("coalesce", "delivery", "warming")


def synced(values_schema: dict) -> dict:
    worker = values_schema["properties"]["worker"]["properties"]
    for name in PASSED_THROUGH:
        worker[name] = section_schema(name)
    return values_schema


def main() -> int:
    schema = synced(json.loads(CHART_SCHEMA.read_text()))
    CHART_SCHEMA.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"wrote {CHART_SCHEMA.relative_to(ROOT)}: worker.{', worker.'.join(PASSED_THROUGH)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
