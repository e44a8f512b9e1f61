"""A sweep on a Ray cluster of two local nodes (`ray start --block` twice, each stopped by its
own process group, never `ray stop`), driven with --address."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import on_free_port, stop_group

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _nodes(ray: str, address: str, env: dict) -> int:
    """Alive nodes of the cluster at `address` (0 while it does not answer)."""
    res = subprocess.run([ray, "status", f"--address={address}"], capture_output=True,
                         text=True, env=env, timeout=60)
    if res.returncode != 0:
        return 0
    active = res.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return len(re.findall(r"^\s*\d+ node_", active, re.M))


def _wait_nodes(ray: str, address: str, env: dict, n: int, procs: list) -> bool:
    deadline = time.time() + 120
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        if _nodes(ray, address, env) >= n:
            return True
        time.sleep(1)
    return False


@pytest.fixture
def two_node_cluster(monkeypatch):
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    if ray is None:
        pytest.skip("the ray CLI is not installed next to this Python")
    # `ray start --head` turns on token authentication (token in ~/.ray/auth_token); the
    # worker node and the drivers (this test, `study sweep --address`) must use it too
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    # a (logical) GPU on each node: a trial asking for none must not see it
    common = ["--block", "--num-cpus=1", "--num-gpus=1", "--disable-usage-stats",
              "--node-ip-address=127.0.0.1"]
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are bounded
    procs: list[subprocess.Popen] = []

    def start(args: list[str]) -> subprocess.Popen:
        p = subprocess.Popen([ray, "start", *common, *args], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    def head(port: int) -> str | None:
        p = start(["--head", f"--port={port}", "--include-dashboard=false",
                   f"--temp-dir={temp}"])
        address = f"127.0.0.1:{port}"
        if _wait_nodes(ray, address, env, 1, [p]):
            return address
        stop_group(p)  # the port was taken first, or the head did not come up
        return None

    try:
        address = on_free_port(head, attempts=3)
        worker = start([f"--address={address}"])
        assert _wait_nodes(ray, address, env, 2, [worker]), "the worker node did not join"
        yield address
    finally:
        for p in reversed(procs):
            stop_group(p, timeout=10)  # `ray start --block` may linger after SIGTERM
        shutil.rmtree(temp, ignore_errors=True)


def test_sweep_on_two_local_nodes(cli, tmp_path: Path, two_node_cluster: str) -> None:
    # checked in a fresh process: an earlier in-process Ray session (other tests) caches its
    # authentication state
    probe = (f"import json, ray; ray.init(address={two_node_cluster!r}, logging_level='ERROR'); "
             "print(json.dumps([sum(n['Alive'] for n in ray.nodes()), "
             "ray.cluster_resources()['CPU']]))")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [2, 2]
    # what a trial that asks for no GPU sees on a node with one, connected as a sweep connects
    # (Ray 2.60 leaves every GPU visible to it unless its worker is told otherwise)
    probe = ("import json, os, ray\n"
             "from study.sweep.lifecycle import init_ray, sweep_environment\n"
             "def seen(): return os.environ.get('CUDA_VISIBLE_DEVICES')\n"
             "with sweep_environment():\n"
             f"    init_ray({two_node_cluster!r})\n"
             "    print(json.dumps([ray.get(ray.remote(num_gpus=g, num_cpus=0.1)(seen)"
             ".remote()) for g in (0, 1)]))\n")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == ["", "0"]
    db = tmp_path / "mlflow.db"
    res = cli("sweep", str(ROOT / "search_spaces" / "smoke.yaml"), "--name", "cluster",
              "--address", two_node_cluster, "--tracking-uri", f"sqlite:///{db}",
              "--storage", str(tmp_path / "ray"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on 2 CPUs" in res.stderr
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("cluster")
    children = [r for r in client.search_runs([exp.experiment_id])
                if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4
    assert all(r.data.tags["stop_reason"] in ("completed", "early_stopped") for r in children)
