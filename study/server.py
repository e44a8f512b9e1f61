"""A local MLflow tracking server on PostgreSQL (`study server`, `make tracking-server`).

`scripts/pg-local` initialises and starts PostgreSQL in DIR/pgdata (127.0.0.1 only, the `mlflow`
role's password in DIR/pgpass); `mlflow server` runs over it, serving the artifacts it stores
in DIR/artifacts. Sweeps log to it with `--tracking-uri http://HOST:PORT`. Ctrl-C (or SIGTERM)
stops the MLflow server, and PostgreSQL too unless it was already running before.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

PG_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pg-local"
DEFAULT_DIR = Path(".tracking")
DEFAULT_PG_PORT = 5433
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServerError(RuntimeError):
    """The server could not start: PostgreSQL missing or refusing, MLflow exiting early."""


def pg_local(command: str, data_dir: Path, port: int | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `scripts/pg-local COMMAND --dir DATA_DIR [--port PORT]`."""
    if not PG_SCRIPT.is_file():
        raise ServerError(f"{PG_SCRIPT} is missing: `study server` runs from a checkout of the "
                          "repository")
    args = ["bash", str(PG_SCRIPT), command, "--dir", str(data_dir)]
    if port is not None:
        args += ["--port", str(port)]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def start_postgres(data_dir: Path, port: int) -> str:
    """Start (or reuse) the PostgreSQL of `data_dir`; returns its backend store URI."""
    res = pg_local("start", data_dir, port)
    if res.returncode != 0 or not res.stdout.strip():
        raise ServerError("PostgreSQL did not start: " + (res.stderr.strip() or "no output"))
    return res.stdout.strip().splitlines()[-1]


def client_uri(host: str, port: int) -> str:
    """The tracking URI a driver uses: the bind address, or this host's name for a wildcard."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn()
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}"


def allowed_hosts(client_host: str) -> list[str]:
    """The Host headers the MLflow server accepts: its defaults (localhost and private IPs,
    any port) and the host name drivers are told to use (`client_uri`), which MLflow 3's
    default (DNS-rebinding protection) refuses: a server on 0.0.0.0 would answer /health and
    refuse every API call through the URI it printed."""
    from mlflow.server.security_utils import get_default_allowed_hosts

    return [*get_default_allowed_hosts(), client_host, f"{client_host}:*"]


def port_free(host: str, port: int) -> bool:
    """Whether `host:port` can be bound now (so that a server already listening there is not
    mistaken for the one about to start)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def answers_health(url: str) -> bool:
    """Whether an MLflow server at `url` answers its `/health` with 200 now."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Whether `url`/health answers 200 before `proc` exits or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if answers_health(url):
            return True
        time.sleep(0.5)
    return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Stop `proc`, started in a session of its own, with every process of its group (the
    MLflow server's uvicorn workers and job runners): SIGTERM, then SIGKILL after `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + timeout
        while time.time() < deadline:
            proc.poll()
            if not _group_alive(proc.pid):
                break
            time.sleep(0.2)
        else:
            continue
        break
    proc.wait()


def serve(data_dir: Path = DEFAULT_DIR, host: str = "127.0.0.1", port: int = 5000,
          pg_port: int = DEFAULT_PG_PORT, workers: int = 2,
          say: Callable[[str], None] = print) -> int:
    """Run the tracking server until Ctrl-C or SIGTERM; returns MLflow's exit status (0 when
    stopped by a signal). Raises ServerError when it cannot start."""
    data_dir = data_dir.resolve()
    if not port_free(host, port):
        raise ServerError(f"{host}:{port} is in use (another server?); choose another --port")
    data_dir.mkdir(parents=True, exist_ok=True)
    # one server a folder: a second would overwrite mlflow.pid, and the first to stop would
    # stop the PostgreSQL the other still serves from (released when this process ends)
    lock = os.open(data_dir / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise ServerError(f"--dir: {data_dir} is served by another study server; stop it, or "
                          "use another --dir") from None
    artifacts = data_dir / "artifacts"
    uri = client_uri(host, port)
    pid_file = data_dir / "mlflow.pid"  # the server's PID, also its process group
    # PostgreSQL is stopped on the way out only if it was not running before
    started_pg = pg_local("status", data_dir).returncode != 0
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    proc: subprocess.Popen | None = None
    try:
        backend = start_postgres(data_dir, pg_port)
        artifacts.mkdir(parents=True, exist_ok=True)
        # MLflow's job runner (GenAI evaluation jobs, a handful of worker processes) is of no
        # use to sweeps: off unless the environment turns it on
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ,
               "PGPASSFILE": str(data_dir / "pgpass")}
        args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                "--serve-artifacts", "--artifacts-destination", str(artifacts),
                "--host", host, "--port", str(port), "--workers", str(workers)]
        if host not in LOOPBACK:
            args += ["--allowed-hosts", ",".join(allowed_hosts(urlsplit(uri).hostname or host))]
        say(f"backend store {backend} (PostgreSQL, password in {data_dir / 'pgpass'}), "
            f"artifacts {artifacts}")
        # a session of its own: Ctrl-C reaches this process only, which stops the whole group
        proc = subprocess.Popen(args, env=env, start_new_session=True)
        pid_file.write_text(f"{proc.pid}\n")
        if not wait_healthy(f"http://127.0.0.1:{port}" if host in ("0.0.0.0", "::") else uri,
                            proc):
            raise ServerError(f"mlflow server did not come up on {host}:{port}"
                              + (f" (exit {proc.returncode})" if proc.poll() is not None
                                 else ""))
        if host not in LOOPBACK:
            say(f"warning: {host}:{port} has no authentication; see README 'Running on a "
                "cluster' (MLflow authentication: mlflow server --app-name basic-auth)")
        say(f"tracking server ready: study sweep SPACE --tracking-uri {uri}  "
            f"(UI {uri}; Ctrl-C stops it)")
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        # a second Ctrl-C (or SIGTERM) must not cut the shutdown short
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if proc is not None:
                say(f"stopping the MLflow server (process group {proc.pid})")
                stop_group(proc)
                pid_file.unlink(missing_ok=True)
            if started_pg and pg_local("status", data_dir).returncode == 0:
                res = pg_local("stop", data_dir)
                say(res.stderr.strip() or f"pg-local stop: exit {res.returncode}")
        finally:
            os.close(lock)  # (releases the folder's lock)
            signal.signal(signal.SIGINT, previous_int)
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
