"""`study ui` serves the MLflow UI on 127.0.0.1 over the given store."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from study import server
from tests.helpers import on_free_port, stop_group

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _start_ui(db: Path, port: int) -> tuple[subprocess.Popen, int] | None:
    """`study ui` on `port`, once it answers /health; None (stopped) if it exited first,
    e.g. because another process took the port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "study.cli", "ui", "--port", str(port), "--tracking-uri",
         f"sqlite:///{db}"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    if server.wait_healthy(f"http://127.0.0.1:{port}", proc, timeout=90):
        return proc, port
    stop_group(proc)
    return None


def test_ui_serves_on_localhost(tmp_path: Path) -> None:
    proc, port = on_free_port(lambda p: _start_ui(tmp_path / "mlflow.db", p))
    try:
        # bound to loopback only: the machine's other addresses do not answer
        others = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), port,
                                                      socket.AF_INET)} - {"127.0.0.1"}
        for addr in others:
            with pytest.raises(OSError):
                socket.create_connection((addr, port), timeout=2).close()
    finally:
        stop_group(proc)
