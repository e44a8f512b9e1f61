"""Search-space parsing: every shipped file is valid; bad files get one-line errors."""

import random
import shutil
from pathlib import Path

import pytest

from study.spaces import SpaceError, infeasible, load_space

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_CSV = ROOT / "study" / "data" / "sample_sentiment.csv"
SHIPPED = sorted((ROOT / "search_spaces").glob("*.yaml"))

GOOD = """
name: t
task: digits
fixed: {d_model: 32}
params:
  n_heads: [1, 2, 3, 4]
  qk_norm: [none, l2]
  qk_norm_gain: {type: float, low: 2.0, high: 20.0, log: true, when: {qk_norm: l2}}
  n_layers: {type: int, low: 1, high: 3}
constraints: ["d_model % n_heads == 0"]
budget: {epochs: 4, grace_period: 1}
seeds: 2
objective: {metric: val_acc, mode: max}
num_trials: 3
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in SHIPPED])
def test_shipped_spaces_parse(path: Path) -> None:
    space = load_space(path)
    assert space.num_trials >= 1 and space.params
    rng = random.Random(1)
    assert any(infeasible(space, space.sample(rng)) is None for _ in range(200))


def test_required_files_ship() -> None:
    names = {p.stem for p in SHIPPED}
    assert {"smoke", "default", "temperature_norm", "regularization", "positional",
            "efficiency"} <= names


def test_good_space_semantics(tmp_path: Path) -> None:
    s = load_space(write(tmp_path, GOOD))
    assert s.fixed["epochs"] == 4 and s.fixed["task"] == "digits" and s.seeds == 2
    assert infeasible(s, {"n_heads": 3, "qk_norm": "none", "n_layers": 1}) is not None
    assert infeasible(s, {"n_heads": 4, "qk_norm": "none", "n_layers": 1}) is None
    gain = next(p for p in s.params if p.name == "qk_norm_gain")
    assert gain.active({"qk_norm": "l2"}) and not gain.active({"qk_norm": "none"})
    rng = random.Random(0)
    for _ in range(50):
        sample = s.sample(rng)
        assert ("qk_norm_gain" in sample) == (sample["qk_norm"] == "l2")


BAD = [
    pytest.param("params: {n_heads: [1, 2]\n", "malformed YAML", id="malformed"),
    pytest.param(GOOD + "bogus: 1\n", "unknown key 'bogus'", id="unknown-top-key"),
    pytest.param(GOOD.replace("n_layers: {type: int", "n_layerz: {type: int"),
                 "params.n_layerz: unknown field", id="unknown-param"),
    pytest.param(GOOD.replace("d_model: 32", "d_model: big"), "fixed.d_model", id="wrong-type"),
    pytest.param(GOOD.replace("[none, l2]", "[none, l3]"), "valid choices", id="bad-choice"),
    pytest.param(GOOD.replace("low: 1, high: 3", "low: 3, high: 1"), "must be <", id="low-high"),
    pytest.param(GOOD.replace("d_model % n_heads == 0", "d_model % n_heads == 7"),
                 "constraints", id="impossible-constraint"),
    pytest.param(GOOD.replace("d_model % n_heads == 0", "import os"), "constraints[0]",
                 id="constraint-syntax"),
    pytest.param(GOOD.replace("metric: val_acc", "metric: val_accuracy"), "unknown metric",
                 id="unknown-metric"),
    pytest.param(GOOD.replace("grace_period: 1", "grace_period: 9"), "grace_period",
                 id="grace-exceeds-epochs"),
    pytest.param(GOOD.replace("num_trials: 3", "num_trials: zero"), "num_trials", id="trials"),
    pytest.param(GOOD.replace("{qk_norm: l2}", "{qk_normx: l2}"), "when", id="bad-when"),
    pytest.param(GOOD + "searcher: grid\n", "searcher", id="bad-searcher"),
    pytest.param("- a\n- b\n", "mapping", id="not-a-mapping"),
    pytest.param(GOOD.replace("when: {qk_norm: l2}", "when: [qk_norm]"),
                 "when: expected a mapping", id="when-not-mapping"),
    pytest.param(GOOD.replace("when: {qk_norm: l2}", "when: {qk_norm: L2}"), "not a valid value",
                 id="when-bad-value"),
    pytest.param(GOOD.replace("objective: {metric: val_acc, mode: max}", "objective: []"),
                 "at least one", id="empty-objective"),
    pytest.param(GOOD.replace("low: 1, high: 3}", "low: 1, high: 3, step: 0.5}"), "step",
                 id="float-step-on-int"),
    pytest.param(GOOD.replace("low: 1, high: 3}", "low: 1, high: 4, step: 2}"),
                 "step: 2 does not divide high - low = 3", id="high-off-the-step-grid"),
    # every value a step grid holds (8, 24, 40) breaks the constraint; others would not
    pytest.param("task: digits\nfixed: {n_heads: 4}\nparams:\n  d_model: {type: int, low: 8,"
                 " high: 40, step: 16}\nconstraints: ['d_model % 16 == 0']\n",
                 "no configuration of 2000 sampled can run", id="step-grid-infeasible"),
    pytest.param("task: digits\nfixed: {n_heads: 1}\nparams:\n  d_model: {type: int, low: 1,"
                 " high: 1000}\nconstraints: ['d_model == 500']\n",
                 "too few for a searcher to find", id="searcher-would-rarely-find-one"),
]


@pytest.mark.parametrize(("text", "needle"), BAD)
def test_bad_spaces_one_line_errors(tmp_path: Path, text: str, needle: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(SpaceError) as e:
        load_space(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and needle in msg


@pytest.mark.parametrize("fixed, params, mended", [
    pytest.param("{d_model: 30}", "{n_heads: [2, 3, 4]}", "n_heads", id="heads_divide"),
    pytest.param("{d_model: 32}", "{vocab_size: [32, 64, 128]}", "vocab_size", id="assoc_keys"),
    pytest.param("{vocab_size: 32}", "{max_len: [4, 8, 16]}", "max_len", id="assoc_lengths"),
])
def test_fixed_values_the_params_mend_are_accepted(tmp_path: Path, fixed: str, params: str,
                                                   mended: str) -> None:
    """Fixed values invalid with the other fields at their defaults (n_heads 4 does not divide
    30; associative_recall's 64 longest pairs against 16 keys) are not the file's fault when
    levels of the params mend them; the searcher then samples only the levels that can run."""
    task = "digits" if "d_model: 30" in fixed else "associative_recall"
    space = load_space(write(tmp_path, f"task: {task}\nfixed: {fixed}\nparams: {params}\n"))
    rng = random.Random(0)
    ran = {space.sample(rng)[mended] for _ in range(200)}
    runs = {v for v in ran if infeasible(space, {mended: v}) is None}
    assert runs and runs < ran  # some levels run, the others are infeasible


def test_relative_data_path_is_found_from_the_given_base(tmp_path: Path, monkeypatch) -> None:
    """`study resume` parses the saved space from where the sweep started (`study.json`'s
    cwd), so a relative `data_path` is found whatever directory the resume runs in."""
    (tmp_path / "start" / "data").mkdir(parents=True)
    shutil.copy(SAMPLE_CSV, tmp_path / "start" / "data" / "s.csv")
    saved = write(tmp_path, "task: text_file\nfixed: {data_path: data/s.csv}\n"
                            "params: {n_heads: [1, 2]}\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(SpaceError, match="fixed.data_path: data/s.csv not found"):
        load_space(saved)
    space = load_space(saved, base=tmp_path / "start")
    assert space.fixed["data_path"] == str(tmp_path / "start" / "data" / "s.csv")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="file not found"):
        load_space(tmp_path / "nope.yaml")


def test_validate_cli(cli, tmp_path: Path) -> None:
    ok = cli("spaces", "validate", str(ROOT / "search_spaces" / "smoke.yaml"))
    assert ok.returncode == 0 and "qk_norm_gain" in ok.stdout
    bad = cli("spaces", "validate", str(write(tmp_path, GOOD + "bogus: 1\n")))
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "bogus" in bad.stderr


def test_readme_example_parses(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text()
    block = text.split("An annotated example (every key):\n\n```yaml\n", 1)[1].split("```")[0]
    space = load_space(write(tmp_path, block))
    assert space.searcher == "nsga2" and len(space.objectives) == 2 and space.gpu == 0.25


def test_final_only_metric_cannot_drive_early_stopping(tmp_path: Path) -> None:
    text = GOOD.replace("objective: {metric: val_acc, mode: max}",
                        "objective: [{metric: ood_len_acc, mode: max}, {metric: val_acc}]")
    with pytest.raises(SpaceError, match="first objective drives early stopping"):
        load_space(write(tmp_path, text))
    ok = GOOD.replace("objective: {metric: val_acc, mode: max}",
                      "objective: [{metric: val_acc, mode: max}, {metric: ood_len_acc}]")
    # ood_len_acc exists on the sequence tasks only (their len: sets)
    with pytest.raises(SpaceError, match="ood_len_acc is measured on generated sequence tasks"):
        load_space(write(tmp_path, ok))
    ok = ok.replace("task: digits\n", "task: sort\n")
    assert load_space(write(tmp_path, ok)).objectives[1] == ("ood_len_acc", "max")


def test_missing_user_data_file_refused_before_anything_starts(tmp_path: Path) -> None:
    text = GOOD.replace("task: digits\n", "task: text_file\n").replace(
        "fixed: {d_model: 32}", "fixed: {d_model: 32, data_path: /nonexistent/reviews.csv}")
    with pytest.raises(SpaceError, match="fixed.data_path: /nonexistent/reviews.csv not found"):
        load_space(write(tmp_path, text))


def test_numeric_fields_refuse_bools_and_check_numpy_scalars() -> None:
    import numpy as np

    from study.config import ConfigError, TrialConfig, field_limit_error

    with pytest.raises(ConfigError, match="epochs: expected a number, got False"):
        TrialConfig(epochs=False)
    assert field_limit_error("batch_size", np.int64(0)) == (
        "batch_size: must be > 0, got np.int64(0)")
    assert "exceeds the limit" in field_limit_error("d_model", 10**400)
    assert field_limit_error("learned_temperature", True) is None  # a bool field
