"""What commands print: every line to stdout or stderr goes through here, redacted.

Error texts can carry what an API or a proxy echoed back (request headers included), and the
commands print error texts; one choke point means no command can forget the redactor.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from worker.observe.logs import redact, redact_text


def line(text: str, *, err: bool = False) -> None:
    print(redact_text(text), file=sys.stderr if err else sys.stdout, flush=True)


def json_line(obj: Any, *, indent: int | None = None, sort_keys: bool = False) -> None:
    print(json.dumps(redact(obj), indent=indent, sort_keys=sort_keys), flush=True)
