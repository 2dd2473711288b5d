"""The image's recipe, run without a container engine: the package installed into a fresh
virtual environment as the Dockerfile does, then `purge-worker run` as uid 10001 on a read-only
root filesystem with only /tmp writable (bubblewrap), against the test broker and the emulator.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from scripts.kafka_broker import free_port
from tests.conftest import TOKEN
from tests.helpers import cloudevent, purged_items, wait_for
from tests.kafka_helpers import all_committed, produce, worker_config

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"


def bwrap() -> str:
    path = shutil.which("bwrap")
    if path is None:
        pytest.fail("bubblewrap (bwrap) is not installed: `make test` installs it", pytrace=False)
    return path


def test_the_installed_package_runs_read_only_as_uid_10001(
    emulator, make_topic, kafka_bootstrap, unique, tmp_path
):
    venv = tmp_path / "opt" / "purge-worker"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = str(venv / "bin" / "pip")
    # As the Dockerfile: the locked dependencies, each checked against its hash, then the worker.
    lock = [pip, "install", "-q", "--no-cache-dir", "--require-hashes", "-r", str(LOCK)]
    for argv in (lock, [pip, "install", "-q", "--no-cache-dir", "--no-deps", str(ROOT)]):
        install = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert install.returncode == 0, install.stderr[-3000:]
    # As in the image: no pip left, the C CRC present.
    subprocess.run([str(venv / "bin" / "pip"), "uninstall", "-q", "--yes", "pip"], check=True)
    assert not (venv / "bin" / "pip").exists()
    subprocess.run([str(venv / "bin" / "python"), "-c", "import crc32c"], check=True)

    topic, dlq = make_topic("cms"), make_topic("dlq")
    group = f"g-{unique}"
    hport = free_port()
    etc = tmp_path / "etc"
    etc.mkdir()
    cfg = worker_config(
        tmp_path,
        emulator,
        kafka_bootstrap,
        topic,
        dlq,
        group,
        path=etc / "config.yaml",
        observability={"health_port": hport, "log_format": "json"},
    )
    before = {p: p.stat().st_mtime for p in tmp_path.rglob("*") if p.is_file()}
    # / read-only; /tmp a fresh tmpfs; the environment and the config bound read-only at the
    # same paths (the scripts' #! lines name them); uid 10001 in its own user namespace.
    argv = [
        bwrap(),
        "--ro-bind", "/", "/",
        "--tmpfs", "/tmp",
        "--ro-bind", str(venv), str(venv),
        "--ro-bind", str(etc), str(etc),
        "--dev", "/dev",
        "--proc", "/proc",
        "--unshare-user", "--uid", "10001", "--gid", "10001",
        "--die-with-parent",
        "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
        "--setenv", "CLOUDFLARE_API_TOKEN", TOKEN,
        "--unsetenv", "KAFKA_BOOTSTRAP",
        "--chdir", "/",
    ]  # fmt: skip
    whoami = subprocess.run([*argv, "id", "-u"], capture_output=True, text=True, check=True)
    assert whoami.stdout.strip() == "10001"
    denied = subprocess.run([*argv, "touch", str(etc / "x")], capture_output=True, check=False)
    assert denied.returncode != 0  # read-only outside /tmp
    argv += [str(venv / "bin" / "purge-worker"), "run", "-c", cfg]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(
            lambda: _status(hport, "/readyz") == 200, timeout=60, what="/readyz in the sandbox"
        )
        assert _status(hport, "/healthz") == 200
        produce(
            kafka_bootstrap,
            topic,
            [cloudevent("image.updated", {"host": "img.example-cdn.net", "path": "smoke"})],
        )
        wait_for(lambda: all_committed(kafka_bootstrap, group, topic), what="commit")
    finally:
        # SIGTERM to the worker inside (bwrap itself would die of it, not pass it on); bwrap
        # then exits with the worker's status.
        for pid in _descendants(proc.pid):
            os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert "https://img.example-cdn.net/smoke" in purged_items(emulator)
    # Nothing written outside the sandbox's /tmp: the bound directories are as they were.
    after = {p: p.stat().st_mtime for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _status(port: int, path: str) -> int | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}{path}", timeout=1).status_code
    except requests.RequestException:
        return None


def test_the_dockerfile_builds_a_venv_and_labels_the_image():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG PYTHON_IMAGE=" in text and "FROM ${PYTHON_IMAGE}" in text
    final = text.split("FROM ${PYTHON_IMAGE}\n", 1)[1]
    assert "COPY --from=build /opt/purge-worker /opt/purge-worker" in final
    assert "/wheels" not in text  # no wheel layer left behind
    for label in ("title", "version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{label}" in final
