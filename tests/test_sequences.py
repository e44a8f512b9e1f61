"""Generated sequence tasks: determinism, correct answers, padding, length and corruption sets,
and that a small transformer learns one of them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import study.tasks as T
import study.tasks.sequences as S  # the generated sequence tasks
from study.config import ConfigError, TrialConfig
from study.tasks.base import IGNORE, Split, TaskData
from study.train import final_metrics

TASKS = ("copy", "reverse", "sort", "associative_recall", "listops", "many_class")
BUILDERS = {"copy": S.build_copy, "reverse": S.build_reverse, "sort": S.build_sort,
            "associative_recall": S.build_associative_recall, "listops": S.build_listops,
            "many_class": S.build_many_class}
# small but with every feature: two OOD factors (lengths 2 and 3 x max_len, plus midpoints)
BASE = {"min_len": 3, "max_len": 8, "ood_len_factors": (2.0, 3.0), "vocab_size": 10,
        "n_train": 300, "n_classes": 12}
OVERRIDES = {"associative_recall": {"vocab_size": 24}, "listops": {"min_len": 6, "max_len": 20}}


def make_cfg(task: str, **changes) -> TrialConfig:
    return TrialConfig(task=task, **{**BASE, **OVERRIDES.get(task, {}), **changes})


@pytest.fixture(scope="module")
def built() -> dict[str, TaskData]:
    return {t: BUILDERS[t](make_cfg(t)) for t in TASKS}


def all_splits(data: TaskData) -> dict[str, Split]:
    return {"train": data.train, "val": data.val, "test": data.test, **data.extra}


def unit_lengths(task: str, split: Split) -> np.ndarray:
    """Lengths in the task's unit (content symbols, pairs or tokens)."""
    n = split.lengths().numpy()
    if task in ("copy", "reverse", "sort"):
        return (n - 1) // 2  # s SEP BLANK*n
    if task == "associative_recall":
        return (n - 2) // 2  # n pairs, SEP, query
    return n


def check_algorithmic(task: str, split: Split) -> None:
    reference = {"copy": lambda s: s, "reverse": lambda s: s[::-1], "sort": sorted}[task]
    for x, y in zip(split.x.tolist(), split.y.tolist()):
        n = x.index(S.SEP)
        content = [t - S.SYM0 for t in x[:n]]
        assert n >= 1 and all(0 <= c for c in content)
        assert x[n + 1:2 * n + 1] == [S.BLANK] * n and set(x[2 * n + 1:]) <= {S.PAD}
        assert y[n + 1:2 * n + 1] == list(reference(content))
        assert set(y[:n + 1] + y[2 * n + 1:]) == {IGNORE}


def check_recall(split: Split) -> None:
    for x, y, m in zip(split.x.tolist(), split.y.tolist(), split.mask.tolist()):
        T = sum(m)
        keys, values = x[0:T - 2:2], x[1:T - 2:2]
        assert x[T - 2] == S.SEP and len(set(keys)) == len(keys)
        assert values[keys.index(x[T - 1])] - S.SYM0 == y


def check_listops(split: Split) -> None:
    for x, y in zip(split.x, split.y.tolist()):
        assert S.evaluate_listops(S.render_listops(x)) == y


def check_rows(task: str, split: Split) -> None:
    if task in ("copy", "reverse", "sort"):
        check_algorithmic(task, split)
    elif task == "associative_recall":
        check_recall(split)
    elif task == "listops":
        check_listops(split)
    else:
        sym = split.x[split.mask]
        assert bool(((sym >= S.SYM0) & (sym < S.SYM0 + BASE["vocab_size"])).all())
        assert bool(((split.y >= 0) & (split.y < BASE["n_classes"])).all())


@pytest.mark.parametrize("task", TASKS)
def test_same_data_seed_same_tensors_other_seed_differs(task, built):
    again = BUILDERS[task](make_cfg(task))
    a, b = all_splits(built[task]), all_splits(again)
    assert a.keys() == b.keys()
    for name in a:
        for f in ("x", "y", "mask"):
            assert torch.equal(getattr(a[name], f), getattr(b[name], f)), (name, f)
    assert again.spec == built[task].spec
    other = BUILDERS[task](make_cfg(task, data_seed=1))
    assert not torch.equal(other.train.x[:, :4], built[task].train.x[:, :4])


@pytest.mark.parametrize("task", TASKS)
def test_every_split_and_extra_set_holds_correct_answers(task, built):
    for name, split in all_splits(built[task]).items():
        assert len(split) > 0, name
        check_rows(task, split)


def test_many_class_prototypes_do_not_share_the_training_lengths_stream():
    """The prototypes' stream is not the one that draws the training lengths (a trailing 0 in
    its seed made it the same: numpy's SeedSequence drops trailing zeros)."""
    cfg = make_cfg("many_class")
    tag = S.rng_tag("many_class")
    lengths = np.random.default_rng([cfg.data_seed, tag]).integers(
        cfg.min_len, cfg.max_len + 1, 64)
    width = max(S.length_grid(cfg.min_len, cfg.max_len, cfg.ood_len_factors))
    protos = np.random.default_rng([cfg.data_seed, tag, 3]).integers(
        0, cfg.vocab_size, (cfg.n_classes, width))
    n = min(64, width)
    assert abs(np.corrcoef(lengths[:n], protos[0, :n])[0, 1]) < 0.5
    # the task builds its prototypes from that stream: rows start with their class's symbol
    data = S.build_many_class(cfg)
    first = protos[data.train.y.numpy(), 0] + S.SYM0
    assert (data.train.x[:, 0].numpy() == first).mean() > 0.8  # 10% of symbols replaced


@pytest.mark.parametrize("task", TASKS)
def test_sizes_spec_and_training_lengths(task, built):
    data, cfg = built[task], make_cfg(task)
    lo, hi = data.id_lengths
    assert (lo, hi) == ((cfg.min_len, cfg.max_len) if task != "listops"
                        else (max(4, cfg.min_len), max(4, cfg.max_len)))
    if task == "many_class":
        counts = np.bincount(data.train.y.numpy(), minlength=cfg.n_classes)
        assert len(set(counts.tolist())) == 1 and counts[0] == cfg.n_train // cfg.n_classes
        for s in (data.val, data.test):
            assert len(set(np.bincount(s.y.numpy()).tolist())) == 1
    else:
        assert len(data.train) == cfg.n_train and len(data.val) == len(data.test) == 500
    for s in (data.train, data.val, data.test):
        u = unit_lengths(task, s)
        assert u.min() >= lo and u.max() <= hi
    assert data.spec.max_len == max(s.x.shape[1] for s in all_splits(data).values())
    assert data.spec.per_token == (task in ("copy", "reverse", "sort"))
    assert data.spec.vocab_size > int(max(s.x.max() for s in all_splits(data).values()))


@pytest.mark.parametrize("task", TASKS)
def test_length_sets_are_exact_and_ood_ones_longer_than_training(task, built):
    data = built[task]
    lo, hi = data.id_lengths
    lengths = sorted(int(k.split(":")[1]) for k in data.extra if k.startswith("len:"))
    expect = S.length_grid(lo, hi, (2.0, 3.0))
    assert lengths == expect and lo in lengths and hi in lengths
    assert {2 * hi, 3 * hi, (hi + 2 * hi) // 2} <= set(lengths)  # with a midpoint
    longest_train = int(data.train.lengths().max())
    for L in lengths:
        split = data.extra[f"len:{L}"]
        assert len(split) == S.N_LEN
        assert set(unit_lengths(task, split).tolist()) == {L}
        if L > hi:
            assert int(split.lengths().min()) > longest_train


@pytest.mark.parametrize("task", TASKS)
def test_mask_is_a_prefix_and_padding_is_zero(task, built):
    for name, s in all_splits(built[task]).items():
        n = s.lengths()
        assert torch.equal(s.mask, torch.arange(s.x.shape[1])[None, :] < n[:, None]), name
        assert bool((s.x[~s.mask] == 0).all()) and bool((s.x[s.mask] != 0).all()), name
        assert s.x.dtype == torch.long and s.x.shape[1] == int(n.max()), name
        if s.y.dim() == 2:
            assert bool((s.y[~s.mask] == IGNORE).all()), name


@pytest.mark.parametrize("task", TASKS)
def test_corruption_sets_exist_stay_valid_and_change_inputs(task, built):
    data = built[task]
    hi = data.id_lengths[1]
    n = min(S.N_CORRUPT, len(data.test))
    clean = data.test.subset(np.arange(n))
    for kind in S.KINDS:
        changed = []
        for sev in range(1, 6):
            s = data.extra[f"corrupt:{kind}:{sev}"]
            assert len(s) == n
            check_rows(task, s)
            assert s.x.shape[1] <= data.spec.max_len
            assert int(unit_lengths(task, s).max()) <= hi  # never longer than training
            if task in ("associative_recall", "many_class"):
                assert torch.equal(s.y, clean.y)  # the label is untouched
            w = max(s.x.shape[1], clean.x.shape[1])
            pad = lambda t, w=w: torch.nn.functional.pad(t, (0, w - t.shape[1]))
            changed.append(float((pad(s.x) != pad(clean.x)).any(1).float().mean()))
        assert 0.0 < changed[0] <= changed[-1], (kind, changed)


def test_deletion_shortens_and_insertion_lengthens_on_average(built):
    data = built["copy"]
    clean = float(data.test.lengths()[:S.N_CORRUPT].float().mean())
    assert float(data.extra["corrupt:deletion:5"].lengths().float().mean()) < clean
    assert float(data.extra["corrupt:insertion:5"].lengths().float().mean()) > clean


def test_listops_reference_evaluator():
    ev = lambda s: S.evaluate_listops(s.split())
    assert ev("[ MAX 2 9 [ MIN 4 7 ] 0 ]") == 9
    assert ev("[ MIN 3 [ MAX 1 8 ] 5 ]") == 3
    assert ev("[ MED 7 1 4 ]") == 4
    assert ev("[ MED 1 9 5 3 ]") == 3  # even count: lower median
    assert ev("[ SM 9 8 7 ]") == 4 and ev("[ SUM_MOD 9 8 7 ]") == 4
    assert ev("[ SM [ MAX 5 6 ] [ MED 2 ] 3 ]") == 1
    assert ev("[MAX 2 [MIN 4 7 ] ]") == 4  # LRA's fused "[OP" tokens
    for bad in ("[ MAX ]", "[ MAX 2", "[ 2 ]", "MAX 2 ]", "[ MAX 2 ] 3", "[ FOO 1 ]"):
        with pytest.raises(ValueError):
            ev(bad)


def test_listops_rows_render_to_expressions_of_the_right_shape(built):
    data = built["listops"]
    ops = set(S.LISTOPS_OPS)
    for x in data.train.x[:50]:
        toks = S.render_listops(x)
        assert toks[0] == "[" and toks[1] in ops and toks[-1] == "]"
        assert toks.count("[") == toks.count("]") == sum(t in ops for t in toks)
    labels = np.bincount(data.train.y.numpy(), minlength=10)
    assert (labels > 0).sum() >= 8  # labels spread over the digits


def test_listops_min_len_is_clamped_to_the_shortest_expression():
    data = S.build_listops(make_cfg("listops", min_len=1, max_len=2, n_train=50))
    assert data.id_lengths == (4, 4)
    assert set(data.train.lengths().tolist()) == {4}
    check_listops(data.train)


def test_associative_recall_refuses_more_pairs_than_keys():
    """Refused when the config is made, before any data: its longest evaluation rows (3 x 8 =
    24 pairs here) need as many distinct keys; 24 keys build (the `built` fixture)."""
    with pytest.raises(ConfigError, match="vocab_size >= 24"):
        make_cfg("associative_recall", vocab_size=23)
    assert make_cfg("associative_recall").vocab_size == 24


@pytest.mark.parametrize("task", TASKS)
def test_the_task_table_knows_what_the_data_holds(task, built):
    """`study.tasks.TASKS` says, without building data, what the built task holds: per-token
    targets, and content symbols drawn from `vocab_size` (refused below 2)."""
    entry, data = T.TASKS[task], built[task]
    assert entry.per_token == data.spec.per_token
    assert entry.symbols == (data.spec.vocab_size == make_cfg(task).vocab_size + S.SYM0)
    if entry.symbols:
        with pytest.raises(ConfigError, match="at least 2 symbols"):
            make_cfg(task, vocab_size=1)
    else:
        assert make_cfg(task, vocab_size=1).vocab_size == 1




@pytest.mark.slow
def test_a_small_transformer_learns_sort(one_thread):
    cfg = TrialConfig(task="sort", min_len=2, max_len=8, vocab_size=8, n_train=2000, epochs=8,
                      d_model=64, n_heads=4, n_layers=2, d_ff=128, lr=3e-3, device="cpu")
    result = final_metrics(cfg)
    assert result.diverged is None
    assert result.metrics["test_acc"] >= 0.6  # chance is 1 / vocab_size = 0.125
