"""The house as the README draws it: every module on the map, the stages in the order a record
meets them, each importing only what comes before it, and each outside system behind one door."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from worker.loop import Loop

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "worker"
STAGES = ["intake", "planning", "pending", "sending", "outcome"]
# The emulator's model of the API is one piece on purpose (it is the oracle the tests trust).
LONG_ON_PURPOSE = {"worker/emulator/state.py"}
MAX_LINES = 300


def modules() -> set[str]:
    return {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}


def mapped() -> list[str]:
    """The modules the README's map names, in its order."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Map of the code", 1)[1]
    table = [line for line in section.splitlines() if line.startswith("| `worker/")]
    return [m for line in table for m in re.findall(r"`(worker/[\w/]+\.py)`", line.split("|")[1])]


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def test_the_map_lists_every_module_once_and_nothing_else():
    names = mapped()
    assert len(names) == len(set(names)), "a module is on the map twice"
    assert set(names) == modules()


def test_the_map_shows_the_stages_in_the_order_a_record_meets_them():
    names = mapped()
    first = [min(i for i, n in enumerate(names) if n.startswith(f"worker/{s}/")) for s in STAGES]
    assert first == sorted(first)


def test_a_stage_imports_no_stage_after_it():
    for i, stage in enumerate(STAGES):
        later = {f"worker.{s}" for s in STAGES[i + 1 :]} | {"worker.loop", "worker.app"}
        for path in (PACKAGE / stage).rglob("*.py"):
            wrong = {
                m for m in imports(path) if any(m == w or m.startswith(w + ".") for w in later)
            }
            assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_each_outside_system_has_one_door():
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        tops = {m.split(".")[0] for m in imports(path)}
        if "kafka" in tops:
            assert rel.startswith("worker/kafka/"), f"{rel} imports kafka-python"
        if "requests" in tops:
            assert rel.startswith("worker/cloudflare/") or rel == "worker/outcome/warming.py", (
                f"{rel} imports requests"
            )


def test_modules_stay_small_and_the_loop_keeps_at_most_ten_fields():
    for name in modules() - LONG_ON_PURPOSE:
        lines = len((ROOT / name).read_text().splitlines())
        assert lines <= MAX_LINES, f"{name} has {lines} lines"
    assert len(dataclasses.fields(Loop)) <= 10
