"""Shared test helpers: the CLI in a subprocess, servers started on a free port (retried when
another process takes the port first), processes stopped by their own process group, Ray's
trials as the callbacks see them, headless Chromium checks."""

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from study import server
from study.server import stop_group  # noqa: F401 (the tests stop what they start with it)

T = TypeVar("T")
PORT_ATTEMPTS = 5
ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `study` CLI in a subprocess (in the repository root by default)."""
    return subprocess.run([sys.executable, "-m", "study.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or ROOT,
                          env={**os.environ, **(env or {})})


@dataclass
class FakeTrial:
    """What the sweep's callbacks and progress view read of a Ray Tune `Trial`."""

    trial_id: str
    config: dict = field(default_factory=dict)
    status: str = "PENDING"
    last_result: dict[str, Any] = field(default_factory=dict)
    error_file: str | None = None

    def set_config(self, config: dict) -> None:
        self.config = config


def free_port() -> int:
    """A port free at this instant; another process may take it before ours binds, so start
    servers with `on_free_port`, which retries."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_free_port(start: Callable[[int], T | None], attempts: int = PORT_ATTEMPTS) -> T:
    """Call `start(port)` with a fresh free port until it returns something (None means the
    server could not bind or did not come up, and cleaned up after itself)."""
    for _ in range(attempts):
        out = start(free_port())
        if out is not None:
            return out
    raise RuntimeError(f"no server came up on a free port in {attempts} attempts")


def answers_health(port: int) -> bool:
    """Whether an MLflow server on 127.0.0.1:`port` answers its `/health` with 200."""
    return server.answers_health(f"http://127.0.0.1:{port}")


CHECK = ("<script>window.addEventListener('load',function(){var a=Array.from(document.images);"
         "var ok=a.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;"
         "var d=document.createElement('div');d.id='img-check';"
         "d.textContent='loaded='+ok+' total='+a.length;document.body.appendChild(d);});"
         "</script>")


def render_images(index: Path, tmp_path: Path) -> tuple[int, int]:
    """Open a report page in headless Chromium (network blocked) and return how many of its
    images decoded after load, and how many there are. Skips where Chromium is missing."""
    exe = next((c for c in (shutil.which("chromium"), "/usr/bin/chromium")
                if c and Path(c).is_file()), None)
    if exe is None:
        pytest.skip("chromium not installed (apt-get install -y chromium; .ci/run does it)")
    # a test-only copy with a probe script that counts the images that decoded after load
    page = tmp_path / "check.html"
    page.write_text(index.read_text(encoding="utf-8").replace(
        "</body>", CHECK + "</body>"), encoding="utf-8")
    args = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'ud'}",
            "--host-resolver-rules=MAP * ~NOTFOUND",  # any network fetch would fail
            "--virtual-time-budget=5000", "--dump-dom", page.as_uri()]
    res = subprocess.run(args, capture_output=True, encoding="utf-8", errors="replace",
                         timeout=90)
    m = re.search(r'id="img-check">loaded=(\d+) total=(\d+)<', res.stdout)
    assert m, f"no probe output (rc {res.returncode}): {res.stderr[-2000:]}"
    return int(m.group(1)), int(m.group(2))
