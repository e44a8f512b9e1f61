"""Data tasks digits, mnist1d and text_file: splits, determinism, corruption sets, errors."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import study
from study.config import ConfigError, TrialConfig
from study.tasks import digits, mnist1d, text_file
from study.tasks.base import TaskData, stratified_split

SAMPLE = Path(study.__file__).parent / "data" / "sample_sentiment.csv"


def assert_same(a: TaskData, b: TaskData) -> None:
    assert a.spec == b.spec
    for sa, sb in [(a.train, b.train), (a.val, b.val), (a.test, b.test)]:
        for t in ("x", "y", "mask"):
            assert torch.equal(getattr(sa, t), getattr(sb, t))
    assert a.extra.keys() == b.extra.keys()
    for k in a.extra:
        assert torch.equal(a.extra[k].x, b.extra[k].x), k
        assert torch.equal(a.extra[k].y, b.extra[k].y), k


def check_corruption_sets(data: TaskData, kinds, n_test: int) -> None:
    for kind in kinds:
        for s in range(1, 6):
            split = data.extra[f"corrupt:{kind}:{s}"]
            assert len(split) == n_test
            assert split.x.dtype == data.test.x.dtype
            assert split.x.shape[0] == split.mask.shape[0] == n_test
            assert split.mask[:, 0].all()
    assert len(data.extra) == 5 * len(kinds)


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits_data() -> TaskData:
    return digits.build(TrialConfig(task="digits", data_seed=3))


def test_digits_clean_splits_unchanged(digits_data):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)[..., None]
    tr, va, te = stratified_split(d.target, (0.6, 0.2, 0.2), 3)
    for split, idx in [(digits_data.train, tr), (digits_data.val, va), (digits_data.test, te)]:
        assert torch.equal(split.x, x[idx])
        assert torch.equal(split.y, torch.as_tensor(d.target[idx]))
        assert split.x.shape[1:] == (64, 1) and split.mask.all()


def test_digits_corruptions(digits_data):
    te = digits_data.test
    check_corruption_sets(digits_data, digits.CORRUPTIONS, len(te))
    dev = []
    for s in range(1, 6):
        noisy = digits_data.extra[f"corrupt:gaussian_noise:{s}"]
        assert noisy.x.shape == te.x.shape and torch.equal(noisy.y, te.y)
        assert noisy.x.min() >= 0 and noisy.x.max() <= 1
        dev.append(float((noisy.x - te.x).abs().mean()))
        occ = digits_data.extra[f"corrupt:occlusion:{s}"]
        assert occ.x.shape == te.x.shape and torch.equal(occ.y, te.y)
        changed = occ.x != te.x
        assert (occ.x[changed] == 0).all()  # occlusion only zeroes pixels...
        # ...and never more than a (s+1) x (s+1) square of them
        assert int(changed.reshape(len(te), -1).sum(1).max()) <= (s + 1) ** 2
    assert all(a < b for a, b in zip(dev, dev[1:])), dev
    zeroed = [int((digits_data.extra[f"corrupt:occlusion:{s}"].x == 0).sum()) for s in range(1, 6)]
    assert all(a < b for a, b in zip(zeroed, zeroed[1:])), zeroed


def test_digits_deterministic(digits_data):
    assert_same(digits_data, digits.build(TrialConfig(task="digits", data_seed=3)))
    other = digits.build(TrialConfig(task="digits", data_seed=4))
    assert not torch.equal(other.extra["corrupt:gaussian_noise:1"].x,
                           digits_data.extra["corrupt:gaussian_noise:1"].x)


# ---------------------------------------------------------------- mnist1d


@pytest.fixture(scope="module")
def m1d() -> TaskData:
    return mnist1d.build(TrialConfig(task="mnist1d"))


def test_mnist1d_generator_matches_package():
    """The vectorized generator draws exactly what mnist1d.data.make_dataset draws."""
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    for over in ({}, {"max_translation": 72, "shear_scale": 2.0, "iid_noise_scale": 0.2}):
        args = {**mnist1d.default_args(), "num_samples": 200, "seed": 5, **over}
        state = np.random.get_state()
        ref = make_dataset(ObjectView(dict(args)))
        np.random.set_state(state)
        x, y = mnist1d.generate(args, 5)
        after = np.random.get_state()
        assert np.array_equal(after[1], state[1]) and after[2] == state[2]  # RNG restored
        x = (x - x.mean()) / x.std()  # the package standardizes each dataset with its own stats
        np.testing.assert_allclose(x[:160], ref["x"], rtol=0, atol=1e-12)
        np.testing.assert_allclose(x[160:], ref["x_test"], rtol=0, atol=1e-12)
        assert np.array_equal(y[:160], ref["y"]) and np.array_equal(y[160:], ref["y_test"])


def test_mnist1d_default_splits(m1d):
    assert m1d.spec.n_classes == 10 and m1d.spec.max_len == 40 and m1d.spec.vocab_size == 0
    for split, n in [(m1d.train, 4000), (m1d.val, 1000), (m1d.test, 1000)]:
        assert split.x.shape == (n, 40, 1) and split.x.dtype == torch.float32
        assert split.mask.all()
        assert set(split.y.tolist()) == set(range(10))
    # standardized with the training split's statistics
    assert abs(float(m1d.train.x.mean())) < 1e-4 and abs(float(m1d.train.x.std()) - 1) < 1e-3
    assert abs(float(m1d.test.x.std()) - 1) < 0.1
    # validation is a separate draw, not a copy of train or test
    assert not torch.equal(m1d.val.x, m1d.test.x)


def test_mnist1d_shift_sets(m1d):
    check_corruption_sets(m1d, mnist1d.SHIFTS, mnist1d.N_SHIFT)
    for name, split in m1d.extra.items():
        assert split.x.shape == (mnist1d.N_SHIFT, 40, 1), name
        assert set(split.y.tolist()) == set(range(10)), name
    # noise knobs increase the spread of the inputs with severity
    for kind in ("corr_noise", "iid_noise", "shear"):
        stds = [float(m1d.extra[f"corrupt:{kind}:{s}"].x.std()) for s in range(1, 6)]
        assert all(a < b for a, b in zip(stds, stds[1:])), (kind, stds)
    assert mnist1d.shift_args("translation", 5)["max_translation"] == 72


def test_mnist1d_deterministic_and_seeded(m1d):
    mnist1d.raw_sets.cache_clear()  # regenerate, not just re-read the cache
    assert_same(m1d, mnist1d.build(TrialConfig(task="mnist1d")))
    other = mnist1d.build(TrialConfig(task="mnist1d", data_seed=1))
    assert not torch.equal(other.train.x, m1d.train.x)
    assert not torch.equal(other.extra["corrupt:shear:3"].x, m1d.extra["corrupt:shear:3"].x)


def test_mnist1d_shuffle_seq(m1d):
    sh = mnist1d.build(TrialConfig(task="mnist1d", shuffle_seq=True))
    a, b = m1d.train.x[..., 0], sh.train.x[..., 0]
    # recover the permutation column by column: shuffled step j is original step perm[j]
    perm = [int(np.flatnonzero((a == b[:, j:j + 1]).all(0))[0]) for j in range(40)]
    assert sorted(perm) == list(range(40)) and perm != list(range(40))
    pairs = [(m1d.train, sh.train), (m1d.val, sh.val), (m1d.test, sh.test)]
    pairs += [(m1d.extra[k], sh.extra[k]) for k in m1d.extra]
    for clean, shuf in pairs:
        assert torch.equal(shuf.x, clean.x[:, perm]), "one permutation for every split"
        assert torch.equal(shuf.x.sort(1).values, clean.x.sort(1).values)
        assert torch.equal(shuf.y, clean.y)


# ---------------------------------------------------------------- text_file


def text_cfg(path, **kw) -> TrialConfig:
    return TrialConfig(task="text_file", data_path=str(path), **kw)


@pytest.fixture(scope="module")
def sample() -> text_file.TextData:
    return text_file.prepare(text_cfg(SAMPLE, tokenizer="word", data_seed=2))


def test_sample_file_loads(sample):
    d = sample.data
    assert sample.classes == ["negative", "positive"]
    assert (len(d.train), len(d.val), len(d.test)) == (84, 18, 18)
    for split in (d.train, d.val, d.test):
        assert split.x.dtype == torch.long and split.y.tolist().count(0) == len(split) // 2
        assert ((split.x == 0) == ~split.mask).all()  # 0 is padding and only padding
    assert d.spec.vocab_size == len(sample.vocab) + 2
    assert d.spec.max_len >= d.train.x.shape[1]
    ids = sorted(sample.vocab.values())
    assert ids == list(range(2, d.spec.vocab_size))
    # frequency descending, then lexicographic
    counts = {}
    for i in sample.splits[0]:
        for t in sample.tokens[i]:
            counts[t] = counts.get(t, 0) + 1
    order = sorted(sample.vocab, key=sample.vocab.get)
    assert order == sorted(counts, key=lambda t: (-counts[t], t))
    char = text_file.prepare(text_cfg(SAMPLE, data_seed=2))
    assert " " in char.vocab and "e" in char.vocab and "the" not in char.vocab


def test_text_formats_round_trip(tmp_path):
    df = pd.read_csv(SAMPLE)
    df.to_json(tmp_path / "s.jsonl", orient="records", lines=True)
    df.to_json(tmp_path / "s.json", orient="records", lines=True)
    df.to_parquet(tmp_path / "s.parquet")
    ref = text_file.prepare(text_cfg(SAMPLE, data_seed=1))
    for name in ("s.jsonl", "s.json", "s.parquet"):
        got = text_file.prepare(text_cfg(tmp_path / name, data_seed=1))
        assert got.vocab == ref.vocab and got.classes == ref.classes, name
        assert_same(got.data, ref.data)
    assert_same(text_file.prepare(text_cfg(SAMPLE, data_seed=1)).data, ref.data)
    assert not torch.equal(text_file.prepare(text_cfg(SAMPLE, data_seed=2)).data.train.x,
                           ref.data.train.x)


def test_text_vocab_from_train_only(tmp_path):
    # every row carries a word of its own, so the words of val/test rows are unseen in train
    rows = [{"text": f"good w{i}", "label": "pos"} for i in range(20)]
    rows += [{"text": f"bad w{i + 20}", "label": "neg"} for i in range(20)]
    path = tmp_path / "u.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    td = text_file.prepare(text_cfg(path, tokenizer="word"))
    tr, va, te = td.splits
    train_tokens = {t for i in tr for t in td.tokens[i]}
    assert set(td.vocab) == train_tokens
    unseen = [f"w{i}" for i in range(40) if f"w{i}" not in train_tokens]
    assert unseen and all(w not in td.vocab for w in unseen)
    for split in (td.data.val, td.data.test):
        assert (split.x[:, 1] == text_file.UNK).all()  # the row's own word
        assert (split.x[:, 0] >= 2).all()  # good / bad are known
    assert td.classes == ["neg", "pos"]


@pytest.mark.parametrize("n", [pytest.param(n, id=f"{n}_rows") for n in (3, 4, 5, 6)])
def test_small_text_classes_reach_every_split(tmp_path, n):
    """Every class the file check accepts (3 rows or more) has rows in train, val and test:
    rounding 70/15/15 gave a 3-row class no validation row, a 4- or 5-row class no test row
    (its test accuracy then silently left out), and a file of only such classes crashed."""
    rows = [{"text": f"{c} example {i}", "label": c} for c in ("neg", "pos") for i in range(n)]
    rows += [{"text": f"big example {i}", "label": "big"} for i in range(40)]
    for name, data in (("mixed", rows), ("small", rows[:2 * n])):
        path = tmp_path / f"{name}.csv"
        pd.DataFrame(data).to_csv(path, index=False)
        d = text_file.prepare(text_cfg(path)).data
        classes = 3 if name == "mixed" else 2
        for split in (d.train, d.val, d.test):
            assert (np.bincount(split.y.numpy(), minlength=classes) >= 1).all(), (name, split)
        assert len(d.train) + len(d.val) + len(d.test) == len(data)


def test_stratified_split_of_large_classes_is_rounding_alone():
    """Classes large enough for every split split as before (digits' splits unchanged)."""
    y = np.repeat(np.arange(3), [180, 179, 7])
    tr, va, te = stratified_split(y, (0.6, 0.2, 0.2), 0)
    counts = [np.bincount(y[s], minlength=3).tolist() for s in (tr, va, te)]
    assert counts == [[108, 107, 4], [36, 36, 1], [36, 36, 2]]
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(len(y)))


def test_text_corruptions(sample):
    d = sample.data
    check_corruption_sets(d, text_file.CORRUPTIONS, len(d.test))
    V, n_test = d.spec.vocab_size, d.test.lengths()
    prev_changed = -1
    for s in range(1, 6):
        sub = d.extra[f"corrupt:substitution:{s}"]
        assert torch.equal(sub.lengths(), n_test) and torch.equal(sub.y, d.test.y)
        changed = (sub.x != d.test.x) & d.test.mask
        assert (sub.x[changed] >= 2).all() and (sub.x[changed] < V).all()
        assert int(changed.sum()) >= prev_changed
        prev_changed = int(changed.sum())
        dele = d.extra[f"corrupt:deletion:{s}"]
        assert (dele.lengths() <= n_test).all() and (dele.lengths() >= 1).all()
        ins = d.extra[f"corrupt:insertion:{s}"]
        assert (ins.lengths() >= n_test).all()
        assert ins.x.shape[1] <= d.spec.max_len
        assert ((ins.x == 0) == ~ins.mask).all()
    assert int(d.extra["corrupt:deletion:5"].lengths().sum()) < int(n_test.sum())
    assert int(d.extra["corrupt:insertion:5"].lengths().sum()) > int(n_test.sum())


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def csv_rows(rows) -> str:
    return "text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows)


ERROR_CASES = {
    "missing": (lambda d: d / "nope.csv", {}, "not found"),
    "extension": (lambda d: write(d / "a.txt", "x"), {}, "unsupported extension '.txt'"),
    "malformed_csv": (lambda d: write(d / "m.csv", 'text,label\n"unclosed,1\n'), {},
                      "cannot read as CSV"),
    "malformed_jsonl": (lambda d: write(d / "m.jsonl", '{"text": "a", "label": 1}\nnot json\n'),
                        {}, "cannot read as JSON lines"),
    "malformed_parquet": (lambda d: write(d / "m.parquet", "not parquet"), {},
                          "cannot read as Parquet"),
    "empty": (lambda d: write(d / "e.csv", ""), {}, "is empty"),
    "header_only": (lambda d: write(d / "h.csv", "text,label\n"), {}, "has no rows"),
    "no_text_column": (lambda d: write(d / "c.csv", csv_rows([("a", 0), ("b", 1)])),
                       {"text_column": "sentence"}, "available columns: text, label"),
    "no_label_column": (lambda d: write(d / "c.csv", csv_rows([("a", 0), ("b", 1)])),
                        {"label_column": "y"}, "label_column: column 'y' not in"),
    "same_columns": (lambda d: write(d / "c.csv", csv_rows([("a", 0), ("b", 1)])),
                     {"label_column": "text"}, "two different columns"),
    "single_class": (lambda d: write(d / "s.csv", csv_rows([("a", 1)] * 9)), {},
                     "at least 2 classes"),
    "tiny_class": (lambda d: write(d / "t.csv", csv_rows([("a", 0)] * 9 + [("b", 1)] * 2)), {},
                   "class 1 in"),
}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_text_errors(tmp_path, case):
    make, kw, expect = ERROR_CASES[case]
    path = make(tmp_path)
    with pytest.raises(ConfigError) as err:
        text_file.prepare(text_cfg(path, **kw))
    msg = str(err.value)
    assert expect in msg and "\n" not in msg, msg
    assert msg.split(":", maxsplit=1)[0] in ("data_path", "text_column", "label_column"), msg


def test_cli_missing_text_file(cli):
    r = cli("trial", "--json", "--set", "task=text_file", "--set", "data_path=MISSING")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "MISSING not found" in lines[0], r.stderr
    assert r.stdout == ""


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_trials_run_on_each_task():
    """One short epoch per task through run_trial: corruption metrics come out."""
    from study.train import final_metrics

    cases = [(TrialConfig(task="digits", epochs=1, device="cpu"), None),
             (text_cfg(SAMPLE, epochs=1, device="cpu", pos_encoding="learned"), None)]
    for cfg, data in cases:
        res = final_metrics(cfg, data)
        assert res.diverged is None
        assert 0 <= res.metrics["corrupt_acc"] <= 1
        kinds = {row["kind"] for row in res.artifacts["per_corruption"]}
        assert kinds == set(digits.CORRUPTIONS if cfg.task == "digits"
                            else text_file.CORRUPTIONS)


@pytest.mark.slow
def test_mnist1d_learns(m1d):
    """A 2-layer pre-LN transformer with patches of 4 beats chance (0.1) by far in 10 epochs."""
    from study.train import final_metrics

    res = final_metrics(TrialConfig(task="mnist1d", epochs=10, patch_size=4, device="cpu"), m1d)
    print(json.dumps({k: round(res.metrics[k], 3)
                      for k in ("train_acc", "test_acc", "corrupt_acc")}))
    assert res.metrics["test_acc"] >= 0.5


def test_mnist1d_seq_length_sets_the_generated_length() -> None:
    from study.config import TrialConfig
    from study.tasks import get_task
    data = get_task(TrialConfig(task="mnist1d", seq_length=24))
    assert data.spec.max_len == 24
    assert data.train.x.shape[1:] == (24, 1) and data.test.x.shape[1:] == (24, 1)
    assert all(s.x.shape[1] == 24 for s in data.extra.values())
    assert len(data.train) == 4000  # same samples, subsampled to fewer points
