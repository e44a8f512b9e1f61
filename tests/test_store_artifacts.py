"""A SQLite store keeps its artifacts next to the database (`mlartifacts/<experiment>`), not in
MLflow's default `./mlruns` of whatever directory the sweep or the report ran in."""

import subprocess
from pathlib import Path

import pytest

from study.tracking import artifact_location
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "search_spaces" / "smoke.yaml"


def test_artifact_location_is_next_to_a_sqlite_database(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    db_dir = (tmp_path / "store").resolve()
    assert artifact_location(f"sqlite:///{db_dir}/mlflow.db", "smoke") == \
        (db_dir / "mlartifacts" / "smoke").as_uri()
    # a relative database path is relative to the current directory, like the database
    assert artifact_location("sqlite:///store/mlflow.db", "smoke") == \
        (db_dir / "mlartifacts" / "smoke").as_uri()
    # an experiment name is one safe folder name
    assert artifact_location("sqlite:///mlflow.db", "../a b/c") == \
        (tmp_path.resolve() / "mlartifacts" / "_a_b_c").as_uri()
    # a tracking server (or any other store) chooses where its artifacts go
    assert artifact_location("http://127.0.0.1:5000", "smoke") is None
    assert artifact_location("postgresql://u@h/mlflow", "smoke") is None


@pytest.mark.slow
def test_sweep_and_report_leave_no_mlruns_in_the_working_directory(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    uri = "sqlite:///store/mlflow.db"  # relative: resolved against the working directory
    db = cwd / "store" / "mlflow.db"
    db.parent.mkdir()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return run_cli(*args, cwd=cwd, timeout=300)

    res = cli("sweep", str(SMOKE), "--name", "arts", "--trials", "1", "--epochs", "1",
              "--tracking-uri", uri)
    assert res.returncode == 0, res.stderr[-3000:]
    rep = cli("report", "--experiment", "arts", "--tracking-uri", uri, "--out", "report")
    assert rep.returncode == 0, rep.stderr[-3000:]

    assert db.is_file() and not (cwd / "mlruns").exists()
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("arts")
    root = cwd / "store" / "mlartifacts" / "arts"
    assert Path(exp.artifact_location.removeprefix("file://")) == root
    parent = next(r for r in client.search_runs([exp.experiment_id])
                  if r.data.tags.get("study.kind") == "sweep")
    arts = root / parent.info.run_id / "artifacts"
    assert (arts / "space.yaml").is_file() and (arts / "report" / "index.html").is_file()
    child = next(r for r in client.search_runs([exp.experiment_id])
                 if "mlflow.parentRunId" in r.data.tags)
    assert (root / child.info.run_id / "artifacts" / "seed_0.json").is_file()
