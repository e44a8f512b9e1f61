"""A real tracking server: PostgreSQL started by scripts/pg-local, `study server` running
`mlflow server` over it on 127.0.0.1, the smoke sweep logging to it over HTTP and `study report`
reading it back. Rows are counted in PostgreSQL itself too: the backend is PostgreSQL."""

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from study.server import pg_local, wait_healthy
from tests.helpers import answers_health, on_free_port, run_cli, stop_group

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
NAME, TRIALS, EPOCHS = "server_smoke", 2, 2
pytestmark = pytest.mark.slow


def _why_skip() -> str | None:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return "PostgreSQL is not installed (apt-get install -y postgresql; .ci/run does it)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "as root, PostgreSQL runs as the 'postgres' user, and there is none"
    return None


def _postmaster_pid(data: Path) -> int | None:
    pid_file = data / "pgdata" / "postmaster.pid"
    return int(pid_file.read_text().split()[0]) if pid_file.is_file() else None


def _alive(pid: int, comm: str | None = None) -> bool:
    """Whether `pid` runs (a zombie does not), as `comm` if given."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2]
    return state != "Z" and (comm is None or name == comm)


@pytest.fixture(scope="module")
def server() -> Iterator[dict[str, Any]]:
    """PostgreSQL on a free port (scripts/pg-local, a temporary data dir), then `study server`
    over it on another free port; both stopped by PID at the end."""
    why = _why_skip()
    if why:
        pytest.skip(why)
    # as root, postgres runs as the `postgres` user, which must reach its data dir: not under
    # pytest's tmp dirs (mode 0700)
    base = Path(tempfile.mkdtemp(prefix="study-tracking-"))
    base.chmod(0o755)
    data = base / "tracking"
    errors: list[str] = []

    def start_pg(port: int) -> tuple[int, str] | None:
        res = pg_local("start", data, port)
        if res.returncode != 0:
            errors.append(res.stderr[-2000:])
            return None
        return port, res.stdout.strip().splitlines()[-1]

    def start_server(port: int) -> tuple[subprocess.Popen, int] | None:
        log = (base / f"server_{port}.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "study.cli", "server", "--dir", str(data), "--port", str(port),
             "--pg-port", str(pg_port), "--workers", "1"], cwd=base, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        if wait_healthy(f"http://127.0.0.1:{port}", proc):
            return proc, port
        errors.append((base / f"server_{port}.log").read_text()[-3000:])
        _stop_server(proc, data)
        return None

    info: dict[str, Any] = {"base": base, "data": data}
    try:
        try:
            pg_port, backend = on_free_port(start_pg)
        except RuntimeError:
            pytest.fail("PostgreSQL did not start:\n" + "\n".join(errors[-2:]))
        info.update(pg_port=pg_port, backend=backend, pg_pid=_postmaster_pid(data))
        try:
            proc, port = on_free_port(start_server)
        except RuntimeError:
            pytest.fail("study server did not come up:\n" + "\n".join(errors[-2:]))
        info.update(proc=proc, port=port, uri=f"http://127.0.0.1:{port}")
        yield info
    finally:
        if "proc" in info:
            _stop_server(info["proc"], data)
        pg_local("stop", data)
        pg_pid = info.get("pg_pid")
        if pg_pid and _alive(pg_pid, "postgres"):  # the script could not stop it: by its PID
            os.kill(pg_pid, signal.SIGQUIT)
        shutil.rmtree(base, ignore_errors=True)


def _stop_server(proc: subprocess.Popen, data: Path) -> None:
    """`study server` by its process group; its MLflow server (a session of its own) by the
    PID it wrote, in case it did not stop it itself."""
    mlflow_pid = data / "mlflow.pid"
    pid = int(mlflow_pid.read_text()) if mlflow_pid.is_file() else None
    stop_group(proc)
    if pid is not None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def swept(server: dict[str, Any]) -> dict[str, Any]:
    """The smoke sweep (2 trials, 2 epochs) logged to the server, run from an empty folder."""
    work = server["base"] / "work"
    work.mkdir()
    res = run_cli("sweep", str(SMOKE), "--name", NAME, "--trials", str(TRIALS), "--epochs",
               str(EPOCHS), "--tracking-uri", server["uri"], "--storage", str(work / "ray"),
               cwd=work)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{TRIALS}/{TRIALS} trials" in res.stderr
    assert f"open {server['uri']}/#/experiments/" in res.stderr  # the server's own UI
    return {**server, "work": work}


def _pg_rows(server: dict[str, Any], sql: str, *args: Any) -> list[tuple]:
    psycopg2 = pytest.importorskip("psycopg2")
    conn = psycopg2.connect(host="127.0.0.1", port=server["pg_port"], dbname="mlflow",
                            user="mlflow", passfile=str(server["data"] / "pgpass"))
    try:
        with conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()
    finally:
        conn.close()


def test_sweep_logs_every_trial_to_the_server_on_postgres(swept: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(swept["uri"])
    exp = client.get_experiment_by_name(NAME)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("study.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == TRIALS
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    steps_of = {}
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        reason = r.data.tags["stop_reason"]
        assert reason in ("completed", "early_stopped")
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_acc"))
        n_epochs = EPOCHS if reason == "completed" else steps[-1]
        assert steps == list(range(1, n_epochs + 1))  # one point per epoch
        steps_of[r.info.run_id] = steps
    assert any(r.data.tags["stop_reason"] == "completed" for r in children)

    # the same rows, counted in PostgreSQL itself
    assert _pg_rows(swept, "SELECT version()")[0][0].startswith("PostgreSQL")
    pg_runs = _pg_rows(swept, "SELECT r.run_uuid FROM runs r JOIN experiments e "
                              "ON r.experiment_id = e.experiment_id WHERE e.name = %s "
                              "AND r.lifecycle_stage = 'active'", NAME)
    assert {row[0] for row in pg_runs} == {parent.info.run_id, *steps_of}
    points = _pg_rows(swept, "SELECT run_uuid, step FROM metrics WHERE key = 'val_acc' "
                             "AND run_uuid = ANY(%s)", list(steps_of))
    by_run: dict[str, list[int]] = {}
    for rid, step in points:
        by_run.setdefault(rid, []).append(step)
    assert {rid: sorted(s) for rid, s in by_run.items()} == steps_of

    # artifacts go through the server into its artifacts folder; none in the sweep's folder
    assert parent.info.artifact_uri.startswith("mlflow-artifacts:")
    assert "space.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    stored = (swept["data"] / "artifacts" / exp.experiment_id / parent.info.run_id
              / "artifacts" / "space.yaml")
    assert stored.read_text() == SMOKE.read_text()
    assert not (swept["work"] / "mlruns").exists()


def test_report_reads_the_server(swept: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    out = swept["work"] / "report"
    res = run_cli("report", "--experiment", NAME, "--tracking-uri", swept["uri"], "--out",
               str(out), cwd=swept["work"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith(str(out / "index.html"))
    assert (out / "index.html").stat().st_size > 0 and (out / "effects.csv").is_file()
    client = MlflowClient(swept["uri"])
    exp = client.get_experiment_by_name(NAME)
    parent = next(r for r in client.search_runs([exp.experiment_id])
                  if r.data.tags.get("study.kind") == "sweep")
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert "report/index.html" in arts
    assert (swept["data"] / "artifacts" / exp.experiment_id / parent.info.run_id / "artifacts"
            / "report" / "index.html").is_file()
    assert not (swept["work"] / "mlruns").exists()


def test_ctrl_c_stops_the_server_and_not_a_postgres_it_found(server: dict[str, Any]) -> None:
    """Ctrl-C stops `study server` with its MLflow server; PostgreSQL, which was running
    before it started, stays up until `pg-local stop` stops it."""
    proc, data = server["proc"], server["data"]
    mlflow_pid = int((data / "mlflow.pid").read_text())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    deadline = time.time() + 30
    while time.time() < deadline and _alive(mlflow_pid):
        time.sleep(0.2)
    assert not _alive(mlflow_pid) and not answers_health(server["port"])
    assert not (data / "mlflow.pid").exists()
    pg_pid = server["pg_pid"]
    assert pg_pid and _alive(pg_pid)
    res = pg_local("stop", data)
    assert res.returncode == 0, res.stderr
    assert not _alive(pg_pid) and _postmaster_pid(data) is None


def test_a_stale_pid_file_never_makes_another_postgres_ours(tmp_path: Path) -> None:
    """A postmaster.pid left by a crash whose number now belongs to another process named
    postgres (here a copy of sleep, started in another folder): pg-local neither reports it
    as this folder's server nor stops it."""
    why = _why_skip()
    if why:
        pytest.skip(why)
    fake = tmp_path / "bin" / "postgres"
    fake.parent.mkdir()
    shutil.copy(shutil.which("sleep") or "/bin/sleep", fake)
    proc = subprocess.Popen([str(fake), "300"], cwd=tmp_path / "bin")
    try:
        (tmp_path / "srv" / "pgdata").mkdir(parents=True)
        (tmp_path / "srv" / "pgdata" / "postmaster.pid").write_text(f"{proc.pid}\n")
        assert _alive(proc.pid, "postgres")
        status = pg_local("status", tmp_path / "srv")
        assert status.returncode == 3 and "not running" in status.stderr, status.stderr
        stop = pg_local("stop", tmp_path / "srv")
        assert stop.returncode == 0, stop.stderr
        assert proc.poll() is None  # still running: not ours to stop
    finally:
        proc.kill()
        proc.wait()


def test_one_server_a_folder(tmp_path: Path) -> None:
    """A second `study server` on a folder another one serves is refused at once, before it
    touches the folder's PostgreSQL or its mlflow.pid (the lock is released at exit)."""
    import fcntl

    from study.server import ServerError, serve

    folder = tmp_path / "srv"
    folder.mkdir()
    held = os.open(folder / "server.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        with pytest.raises(ServerError, match="served by another study server"):
            serve(folder, port=on_free_port(lambda p: p))
    finally:
        os.close(held)
    assert sorted(p.name for p in folder.iterdir()) == ["server.lock"]


def test_a_wildcard_server_accepts_the_host_it_prints() -> None:
    """On 0.0.0.0 the URI printed names this host, which MLflow 3's default Host check
    refuses (only localhost and private IPs): the server is told to accept it."""
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    from study.server import allowed_hosts

    name = "head-node.cluster.internal"
    assert not is_allowed_host_header(get_default_allowed_hosts(), f"{name}:5000")
    assert is_allowed_host_header(allowed_hosts(name), f"{name}:5000")
    assert is_allowed_host_header(allowed_hosts(name), "localhost:5000")
