"""The real `study` command line, run as a subprocess: JSON output and one-line input errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from study.config import CHOICES, FIELD_NAMES
from study.metrics import CORE_METRICS

ROOT = Path(__file__).resolve().parents[1]


def study(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    # a narrow terminal: error messages must still come out as one line
    env = {**os.environ, "COLUMNS": "40", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "study.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_trial_json_prints_one_object_with_every_core_metric():
    r = study("trial", "--json", "--set", "epochs=1", "--set", "d_model=32")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    out = json.loads(lines[0])
    assert isinstance(out, dict)
    missing = set(CORE_METRICS) - set(out)
    assert not missing, missing
    assert "stop_reason" not in out
    assert out["epoch"] == 1.0
    assert 0.0 <= out["test_acc"] <= 1.0
    assert set(out["config"]) == set(FIELD_NAMES)
    assert out["config"]["epochs"] == 1 and out["config"]["d_model"] == 32
    assert out["config"]["task"] == "digits"


def test_trial_set_overrides_the_config_file(tmp_path):
    cfg = tmp_path / "small.yaml"
    cfg.write_text("epochs: 5\nd_model: 16\nn_layers: 1\nseed: 3\n")
    r = study("trial", "--json", "--config", str(cfg), "--set", "epochs=1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config"]["epochs"] == 1  # --set wins
    assert out["config"]["d_model"] == 16 and out["config"]["seed"] == 3  # from the file
    assert out["epoch"] == 1.0


def test_diverged_trial_reports_the_stop_reason_and_exits_1():
    r = study("trial", "--json", "--set", "epochs=1", "--set", "d_model=16", "--set", "lr=1e30",
              "--set", "grad_clip=0")
    assert r.returncode == 1, r.stderr
    out = json.loads(r.stdout)
    assert re.fullmatch(r"diverged at step \d+", out["stop_reason"])


def _yaml(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# (id, args builder, substrings the one-line message must contain)
BAD_INPUTS = [
    ("unknown_key", lambda t: ["--set", "foo=1"], ["unknown key 'foo'", "valid keys", "epochs"]),
    ("wrong_type", lambda t: ["--set", "epochs=x"], ["epochs", "expected int", "'x'"]),
    ("float_for_int", lambda t: ["--set", "epochs=1.5"], ["epochs", "expected int"]),
    ("invalid_choice", lambda t: ["--set", "norm=foo"],
     ["norm", "'foo'", "valid choices", *CHOICES["norm"]]),
    ("out_of_range", lambda t: ["--set", "attn_dropout=1.5"], ["attn_dropout", "[0, 1)"]),
    ("n_heads", lambda t: ["--set", "n_heads=3"], ["n_heads", "3", "d_model"]),
    ("no_equals", lambda t: ["--set", "epochs"], ["'epochs'", "expected key=value"]),
    ("markup_in_value", lambda t: ["--set", "norm=[bold]x"], ["'[bold]x'", "valid choices"]),
    ("missing_config", lambda t: ["--config", str(t / "nope.yaml")],
     ["nope.yaml", "not found"]),
    ("malformed_yaml", lambda t: ["--config", _yaml(t, "bad.yaml", "epochs: [1, 2\n")],
     ["bad.yaml", "malformed YAML", "line"]),
    ("yaml_unknown_key", lambda t: ["--config", _yaml(t, "unk.yaml", "epochs: 1\nfoo: 2\n")],
     ["unk.yaml", "unknown key 'foo'"]),
    ("yaml_wrong_type", lambda t: ["--config", _yaml(t, "typ.yaml", "epochs: many\n")],
     ["typ.yaml", "epochs", "expected int"]),
    ("yaml_not_a_mapping", lambda t: ["--config", _yaml(t, "list.yaml", "- 1\n- 2\n")],
     ["list.yaml", "mapping"]),
    ("nan_temperature", lambda t: ["--set", "attn_temperature=nan"],
     ["attn_temperature", "finite"]),
    ("inf_lr", lambda t: ["--set", "lr=inf"], ["lr", "finite"]),
    ("huge_seed", lambda t: ["--set", "seed=1e20"], ["seed", "expected int"]),
    ("huge_seed_int", lambda t: ["--set", "seed=100000000000000000000"], ["seed", "limit"]),
    ("huge_model", lambda t: ["--set", "d_model=1000000000"], ["d_model", "limit"]),
]


@pytest.mark.parametrize(("make_args", "expected"), [pytest.param(a, e, id=i)
                                                      for i, a, e in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line(tmp_path, make_args, expected):
    r = study("trial", "--json", *make_args(tmp_path), timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    msg = lines[0]
    assert msg.startswith("error: ")
    assert "Traceback" not in msg
    for part in expected:
        assert part in msg, (part, msg)
    assert "--set --set" not in msg
