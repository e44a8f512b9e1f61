"""Every bad input is refused before anything starts (README "Search spaces").

The corpus `tests/malformed/` (space files, `--config` files, data files and `cases.yaml`, the
command-line cases) runs through the real command line: `study.cli.main` in-process for speed
(the same exception handling and exit codes as the installed `study`, with Ray, MLflow and the
tracker made to fail loudly if anything got that far), and a few cases through the installed
`study` in a subprocess. Each case must exit 2 with exactly one line on stderr naming the file,
key or flag, without a traceback, and write nothing: no mlflow.db, no ray_results, no file at
all in its scratch folder.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from study import cli, preflight
from study.config import MAX_YAML_BYTES
from study.spaces import SpaceError, infeasible, load_space

CORPUS = Path(__file__).resolve().parent / "malformed"
MANIFEST = yaml.safe_load((CORPUS / "cases.yaml").read_text())
STUDY = Path(sys.executable).with_name("study")  # the installed entry point
WRITTEN = ("mlflow.db", "ray_results", "mlruns", "mlartifacts")


def _cases() -> list[Any]:
    out = [pytest.param(c["argv"], c["expect"], c.get("env", {}), c.get("make"), id=c["id"])
           for c in MANIFEST["cases"]]
    out += [pytest.param(["sweep", f"malformed/spaces/{name}.yaml"], expect, {}, None,
                         id=f"space_{name}") for name, expect in MANIFEST["spaces"].items()]
    return out


CASES = _cases()
SUBPROCESS = ("space_binary", "space_alias_bomb", "space_constraint_zero_division",
              "trials_many", "trial_lr_inf", "address_auto_unreachable")


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding a copy of the corpus as `malformed/`; RAY_ADDRESS unset."""
    shutil.copytree(CORPUS, tmp_path / "malformed")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path


def _make(kind: str | None, root: Path) -> None:
    if kind == "big":  # a syntactically fine file over the size limit
        line = "# " + "x" * 76 + "\n"
        (root / "malformed" / "big.yaml").write_text(line * (MAX_YAML_BYTES // len(line) + 2))


def _no_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray, MLflow and the tracker raise if a case gets as far as starting them."""
    import ray

    from study.sweep import lifecycle

    def started(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a malformed input got as far as starting Ray or MLflow")

    monkeypatch.setattr(lifecycle, "init_ray", started)
    monkeypatch.setattr(lifecycle, "Tracker", started)
    monkeypatch.setattr(ray, "init", started)


def _main(argv: list[str], capsys: pytest.CaptureFixture[str],
          monkeypatch: pytest.MonkeyPatch) -> tuple[Any, str, str]:
    monkeypatch.setattr(sys, "argv", ["study", *argv])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _check(code: Any, out: str, err: str, expect: list[str], root: Path,
           before: dict[str, int]) -> None:
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    for part in expect:
        assert part in lines[0], (part, lines[0])
    assert out == ""
    assert not [w for w in WRITTEN if (root / w).exists()]
    assert _snapshot(root) == before  # nothing written, nothing changed


@pytest.mark.parametrize(("argv", "expect", "env", "make"), CASES)
def test_refused_in_one_line_before_anything_starts(
        argv: list[str], expect: list[str], env: dict[str, str], make: str | None,
        scratch: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _make(make, scratch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _no_start(monkeypatch)
    before = _snapshot(scratch)
    code, out, err = _main(argv, capsys, monkeypatch)
    _check(code, out, err, expect, scratch, before)


@pytest.mark.parametrize(("argv", "expect", "env", "make"),
                         [c for c in CASES if c.id in SUBPROCESS])
def test_refused_by_the_installed_command(argv: list[str], expect: list[str],
                                          env: dict[str, str], make: str | None,
                                          scratch: Path) -> None:
    _make(make, scratch)
    before = _snapshot(scratch)
    cmd = [str(STUDY)] if STUDY.exists() else [sys.executable, "-m", "study.cli"]
    run_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run_env.update({"COLUMNS": "40", "NO_COLOR": "1", **env})  # a narrow terminal: still one line
    r = subprocess.run([*cmd, *argv], cwd=scratch, env=run_env, capture_output=True, text=True,
                       timeout=120, check=False)
    _check(r.returncode, r.stdout, r.stderr, expect, scratch, before)


def test_the_corpus_is_complete() -> None:
    files = {p.stem for p in (CORPUS / "spaces").glob("*.yaml")}
    assert files == set(MANIFEST["spaces"]), files ^ set(MANIFEST["spaces"])
    assert len(CASES) >= 40
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_the_valid_base_space_parses(scratch: Path) -> None:
    space = load_space("malformed/valid.yaml")
    assert space.name == "malformed_base" and space.num_trials == 2
    preflight.check_start(space, space.name, storage=None, tracking_uri=None, address=None)
    assert not [w for w in WRITTEN if (scratch / w).exists()]


# --- the checks that cannot be staged by a file ------------------------------------------------
def test_too_little_free_space(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = shutil.disk_usage(scratch)._replace(free=50 * 2**20)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage)
    with pytest.raises(SpaceError, match=r"--storage: 50 MB free on the disk of .*, below the "
                                         r"100 MB a sweep needs"):
        preflight.check_storage(scratch / "ray_results", "--storage")


def test_unwritable_storage(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(preflight.os, "access", lambda path, mode: False)
    with pytest.raises(SpaceError, match="--storage: .* is not writable"):
        preflight.check_storage(scratch / "ray_results", "--storage")


def test_resources_against_the_machine_and_the_cluster(scratch: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    spec = load_space("malformed/valid.yaml").replace(cpu=4.0, gpu=1.0)
    preflight.check_local_resources(spec, capacity=(4.0, 1))
    with pytest.raises(SpaceError, match=r"resources.cpu: each trial asks for 4 CPUs, but this "
                                         r"machine has 2"):
        preflight.check_local_resources(spec, capacity=(2.0, 1))
    with pytest.raises(SpaceError, match=r"resources.gpu .*asks for 1 GPU, .*no CUDA GPU"):
        preflight.check_local_resources(spec, capacity=(8.0, 0))
    import ray
    nodes = [{"Alive": True, "Resources": {"CPU": 16.0}},
             {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    with pytest.raises(SpaceError, match=r"4 CPUs and 1 GPUs on one node, but no node of the Ray "
                                         r"cluster at auto has them \(2 node\(s\), the largest "
                                         r"16 CPUs / 1 GPUs\)"):
        preflight.check_cluster(spec, "auto")
    preflight.check_cluster(spec.replace(cpu=2.0), "auto")


class _Server(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Server]]]:
    handler = type("Handler", (_Server,), {"status": 200})
    httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


def test_an_http_tracking_uri_must_answer(server: tuple[str, type[_Server]]) -> None:
    uri, handler = server
    preflight.check_tracking_uri(uri)  # /health answers 200
    handler.status = 401  # the API behind a login: a server is there
    preflight.check_tracking_uri(uri)
    handler.status = 404  # something else listens there
    with pytest.raises(SpaceError, match=r"no MLflow server answers \(HTTP 404"):
        preflight.check_tracking_uri(uri)


def test_a_data_problem_is_refused_with_every_combination(scratch: Path) -> None:
    text = (scratch / "malformed/valid.yaml").read_text().replace(
        "task: digits", "task: text_file").replace(
        "n_layers: 1}", "n_layers: 1, data_path: malformed/data/single_class.csv}")
    (scratch / "text.yaml").write_text(text)
    with pytest.raises(SpaceError, match="text.yaml: label_column: .* has a single class"):
        preflight.check_data(load_space("text.yaml"))


def test_an_unevaluable_constraint_is_infeasible_during_a_sweep(scratch: Path) -> None:
    """Parsing refuses it (strict); a point met later is infeasible with the reason, so the
    searcher resamples instead of crashing the sweep."""
    space = load_space("malformed/valid.yaml").replace(
        constraints=("d_model / (n_heads - 2) > 1",))
    assert infeasible(space, {"n_heads": 4, "attn_dropout": 0.1}) is None
    why = infeasible(space, {"n_heads": 2, "attn_dropout": 0.1})
    assert why is not None and "division by zero" in why
    with pytest.raises(SpaceError, match=r"constraints\[0\].*at d_model=32, n_heads=2: division"):
        infeasible(space, {"n_heads": 2, "attn_dropout": 0.1}, strict=True)


@pytest.mark.parametrize(("expr", "bounded"), [
    pytest.param("((d_model ** 64) ** 64) ** 64 > 0", True, id="tower"),
    pytest.param("(d_model * 1000000000000) ** 8 > 0", True, id="product"),
    pytest.param("-d_model ** -64 < 1", False, id="small_float")])
def test_constraint_arithmetic_is_bounded(expr: str, bounded: bool, scratch: Path) -> None:
    """An intermediate integer beyond 2**256 makes the constraint unevaluable (it would be
    computed, at any size, without the bound); a small float is evaluated."""
    space = load_space("malformed/valid.yaml").replace(constraints=(expr,))
    why = infeasible(space, {"n_heads": 2, "attn_dropout": 0.1})
    if bounded:
        assert why is not None and "an intermediate value exceeds 2**256" in why, why
    else:
        assert why is None
