"""No secret leaks: credentials planted in the environment of a real sweep and its report
appear nowhere the two write: the MLflow store (the SQLite file and the artifacts), Ray's
storage directory, Ray's session directory (its logs), the report folder, the console.

The same sweep checks the console progress a user reads: the first line before Ray starts
and before any trial finished, an ETA, a last line with nothing running, nothing of Ray's."""

import re
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "search_spaces" / "smoke.yaml"
# what a user's shell may well hold: cloud and tracking-server credentials, a custom token
# (Ray Tune passes the AWS ones on to its trials: study/sweep/lifecycle.py KEPT_FROM_TRIALS)
PLANTED = {name: f"planted-{uuid.uuid4().hex}" for name in (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "STUDY_TOKEN")}
# Ray's own lines on the console: its log records, its workers' output, a traceback
RAY_OUTPUT = re.compile(r"^\(\w+ pid=\d+|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|\bINFO\b|\bWARNING\b"
                        r"|Traceback", re.M)


def leaks(roots: Iterable[Path], texts: Mapping[str, str],
          secrets: Mapping[str, str] = PLANTED) -> list[str]:
    """Where a planted value appears, as 'PLACE: VARIABLE': every file under `roots` (its
    bytes, as UTF-8 or UTF-16) and every named text."""
    forms = {name: (v.encode(), v.encode("utf-16-le")) for name, v in secrets.items()}
    found = [f"{where}: {name}" for where, text in texts.items()
             for name, v in secrets.items() if v in text]
    for root in roots:
        for f in sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink()):
            data = f.read_bytes()
            found += [f"{f}: {name}" for name, enc in forms.items() if any(e in data for e in enc)]
    return found


def test_the_scan_finds_a_planted_value(tmp_path: Path) -> None:
    """The check below is not vacuous: a value in a SQLite row, a nested file (as UTF-16)
    and a text is found, and nothing else is."""
    secrets = {"X_TOKEN": f"planted-{uuid.uuid4().hex}", "Y_TOKEN": f"planted-{uuid.uuid4().hex}"}
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        db.execute("CREATE TABLE tags (key TEXT, value TEXT)")
        db.execute("INSERT INTO tags VALUES ('env', ?)", (secrets["X_TOKEN"],))
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "log.txt").write_bytes(secrets["Y_TOKEN"].encode("utf-16-le"))
    (tmp_path / "clean.txt").write_text("nothing here")
    found = leaks([tmp_path], {"console": f"token={secrets['X_TOKEN']}", "other": "-"}, secrets)
    assert sorted(found) == sorted([f"{tmp_path / 'mlflow.db'}: X_TOKEN",
                                    f"{tmp_path / 'a' / 'b' / 'log.txt'}: Y_TOKEN",
                                    "console: X_TOKEN"])


@pytest.mark.slow
def test_planted_secrets_leak_nowhere_and_progress_reads_well(cli, tmp_path: Path) -> None:
    # Ray's session directory of this sweep alone (its socket paths must stay short)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env = {**PLANTED, "RAY_TMPDIR": str(ray_tmp)}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        sweep = cli("sweep", str(SMOKE), "--name", "secrets", "--trials", "3", "--tracking-uri",
                    uri, "--storage", str(tmp_path / "ray"), env=env)
        assert sweep.returncode == 0, sweep.stderr[-3000:]
        report = cli("report", "--experiment", "secrets", "--tracking-uri", uri, "--out",
                     str(tmp_path / "report"), env=env)
        assert report.returncode == 0, report.stderr[-3000:]
        # every place is there to be searched
        assert (tmp_path / "mlflow.db").stat().st_size > 0
        assert any(p.is_file() for p in (tmp_path / "mlartifacts").rglob("*"))
        assert (tmp_path / "ray" / "secrets" / "tuner.pkl").is_file()
        assert (tmp_path / "report" / "index.html").is_file()
        assert any(ray_tmp.glob("ray/session_*/logs/*.log"))
        found = leaks([tmp_path, ray_tmp], {
            "sweep stdout": sweep.stdout, "sweep stderr": sweep.stderr,
            "report stdout": report.stdout, "report stderr": report.stderr})
        assert not found, "planted secrets leaked:\n" + "\n".join(found)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # the progress a user reads
    lines = sweep.stderr.splitlines()
    progress = [ln for ln in lines if re.match(r"\[\d+/3\] ", ln)]
    assert [ln.split(" ")[0] for ln in progress] == ["[1/3]", "[2/3]", "[3/3]"]
    first = lines.index(next(ln for ln in lines if ln.startswith("sweep secrets: 3 trials x 2")))
    ray_up = lines.index(next(ln for ln in lines if "Ray on " in ln))
    assert first < ray_up < lines.index(progress[0])  # said before Ray starts
    assert "n_heads" in lines[first] and "starting Ray" in lines[first]
    assert all(re.match(r"\[\d/3\] elapsed \d+s", ln) for ln in progress)
    assert "ETA ~" in progress[0] and "ETA" not in progress[-1]
    assert "running 0," in progress[-1]
    assert all("best val_acc" in ln and "n_heads=" in ln for ln in progress)
    assert not RAY_OUTPUT.search(sweep.stderr), sweep.stderr
    # the store is not ./mlflow.db, which `make report` reads: the command for this one
    assert lines[-1] == ("report with calls and intervals: study report --experiment secrets "
                         f"--tracking-uri {uri}")


@pytest.mark.parametrize("text, shown", [
    pytest.param("http://alice:s3cr3t@127.0.0.1:5000/api", "http://alice:***@127.0.0.1:5000/api",
                 id="http"),
    pytest.param("store postgresql+psycopg2://u:p%40ss@db:5432/m failed",
                 "store postgresql+psycopg2://u:***@db:5432/m failed", id="postgres"),
    pytest.param("http://alice@host and sqlite:////tmp/a:b@c.db", "http://alice@host and "
                 "sqlite:////tmp/a:b@c.db", id="no_password"),
])
def test_redact_masks_only_a_uris_password(text: str, shown: str) -> None:
    from study.console import redact

    assert redact(text) == shown


def test_a_password_in_the_store_uri_stays_off_the_console(cli, tmp_path: Path) -> None:
    """A `--tracking-uri` with credentials: the refusal names the store without its password
    (the store does not answer here), and the sweep writes nothing."""
    password = f"planted-{uuid.uuid4().hex}"
    res = cli("sweep", str(SMOKE), "--tracking-uri", f"http://alice:{password}@127.0.0.1:9",
              "--storage", str(tmp_path / "ray"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "http://alice:***@127.0.0.1:9" in res.stderr
    assert password not in res.stderr + res.stdout
    assert not any(tmp_path.iterdir())
