"""A sweep on a Ray cluster of two local nodes (`ray start` twice), driven with --address."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture
def two_node_cluster(monkeypatch):
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    if ray is None:
        pytest.skip("the ray CLI is not installed next to this Python")
    port = free_port()
    # `ray start --head` turns on token authentication (token in ~/.ray/auth_token); the
    # worker node and the drivers (this test, `study sweep --address`) must use it too
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--num-gpus=0", "--disable-usage-stats"]
    subprocess.run([ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                    "--include-dashboard=false", *common], check=True, capture_output=True,
                   env=env, timeout=120)
    try:
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}",
                        "--node-ip-address=127.0.0.1", *common], check=True,
                       capture_output=True, env=env, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_sweep_on_two_local_nodes(cli, tmp_path: Path, two_node_cluster: str) -> None:
    import ray
    ray.init(address=two_node_cluster, logging_level="ERROR")
    try:
        alive = [n for n in ray.nodes() if n["Alive"]]
        assert len(alive) == 2 and ray.cluster_resources()["CPU"] == 2
    finally:
        ray.shutdown()
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
