"""`study ui` serves the MLflow UI on 127.0.0.1 over the given store."""

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_ui_serves_on_localhost(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "study.cli", "ui", "--port", str(port), "--tracking-uri",
         f"sqlite:///{tmp_path / 'mlflow.db'}"], cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline, status = time.time() + 90, None
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    status = r.status
                    break
            except OSError:
                time.sleep(1)
        assert status == 200, proc.stderr.read() if proc.poll() is not None else "no answer"
        # bound to loopback only: the machine's other addresses do not answer
        others = {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), port,
                                                      socket.AF_INET)} - {"127.0.0.1"}
        for addr in others:
            with pytest.raises(OSError):
                socket.create_connection((addr, port), timeout=2).close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
