"""Evaluation (`study.evaluation`): the same values whatever the chunking, the named sets
evaluated together give each set's own accuracy, and the chunk size each device gets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from study import evaluation as E
from study.config import make_config
from study.model import build_model
from study.tasks import get_task
from study.tasks.base import IGNORE, Split
from study.train import device_batches

CPU = torch.device("cpu")
TASKS = [pytest.param({"task": "digits"}, id="classification"),
         pytest.param({"task": "sort", "n_train": 256}, id="per_token"),
         pytest.param({"task": "listops", "n_train": 256}, id="padded")]


def model_and_data(changes: dict):
    cfg = make_config({"d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2, "seed": 1,
                       **changes})
    data = get_task(cfg)
    torch.manual_seed(0)
    return build_model(cfg, data.spec).eval(), data


def reference(model, split: Split) -> dict[str, torch.Tensor]:
    """The split in one forward, the metrics written out by hand."""
    with torch.no_grad():
        logits, _ = model(split.x, split.mask)
    logits, y = logits.float(), split.y
    if y.dim() == 2:
        keep = y != IGNORE
        ex = ((logits.argmax(-1) == y) & keep).sum(1) / keep.sum(1).clamp_min(1)
        logits, y = logits[keep], y[keep]
    else:
        ex = (logits.argmax(-1) == y).float()
    p = logits.softmax(-1)
    return {"loss": F.cross_entropy(logits, y), "acc": (p.argmax(-1) == y).float().mean(),
            "conf": p.amax(-1), "pred": p.argmax(-1), "target": y, "example_correct": ex}


@pytest.mark.parametrize("changes", TASKS)
@pytest.mark.parametrize("rows", [7, 512, 100_000])
def test_evaluate_is_the_whole_split_at_once_whatever_the_chunks(changes, rows, monkeypatch):
    model, data = model_and_data(changes)
    monkeypatch.setattr(E, "eval_rows", lambda *a, **k: rows)
    got, want = E.evaluate(model, data.val, CPU), reference(model, data.val)
    assert got.loss == pytest.approx(float(want["loss"]), rel=1e-5)
    assert float(got.acc) == pytest.approx(float(want["acc"]), abs=1e-6)
    torch.testing.assert_close(got.conf, want["conf"], rtol=1e-5, atol=1e-6)
    assert torch.equal(got.target, want["target"])
    # a prediction may differ only where two classes tie to rounding
    assert (got.pred != want["pred"]).float().mean() < 0.005
    torch.testing.assert_close(got.example_correct, want["example_correct"].float(),
                               atol=0.01, rtol=0)


@pytest.mark.parametrize("changes", TASKS)
def test_sets_evaluated_together_give_each_sets_own_accuracy(changes):
    model, data = model_and_data(changes)
    sets = dict(list(data.extra.items())[:5])
    # two more of one shape as an existing set (grouped with it) and one of another shape
    first = next(iter(sets.values()))
    sets["head"] = first.subset(np.arange(0, len(first) // 3))
    sets["tail"] = first.subset(np.arange(len(first) // 3, len(first)))
    sets["val"] = data.val
    shapes = {tuple(s.x.shape[1:]) for s in sets.values()}
    assert len(shapes) < len(sets)  # some are evaluated together
    got = E.set_accuracies(model, sets, CPU)
    assert list(got) == list(sets)
    for name, s in sets.items():
        assert float(got[name]) == pytest.approx(float(E.evaluate(model, s, CPU).acc),
                                                 abs=1e-6), name


def test_chunk_rows_by_device():
    model, data = model_and_data({"task": "mnist1d", "d_model": 64, "d_ff": 128,
                                  "n_heads": 4, "patch_size": 4})
    T = data.val.x.shape[1]
    assert E.eval_rows(model, T, CPU) == E.EVAL_BATCH
    assert E.eval_rows(model, T, CPU, k=4) == E.EVAL_BATCH // 4
    cuda = torch.device("cuda")  # read for its type only: no GPU needed
    one, sixteen = E.eval_rows(model, T, cuda), E.eval_rows(model, T, cuda, k=16)
    tokens, width = T // 4, 3 * 64  # the widest: the fused q, k, v projection
    assert E.EVAL_ELEMENTS // (tokens * width) > E.EVAL_MAX_ROWS  # capped by the kernel's rows
    assert one == E.EVAL_MAX_ROWS > len(data.train)  # one chunk per split
    assert sixteen == E.EVAL_MAX_ROWS // 16 < E.EVAL_ELEMENTS // (16 * tokens * width)
    # a wider model: the activation budget binds first
    wide, _ = model_and_data({"task": "mnist1d", "d_model": 256, "d_ff": 512, "n_heads": 4,
                              "patch_size": 4})
    want = E.EVAL_ELEMENTS // (16 * tokens * 3 * 256)
    assert E.eval_rows(wide, T, cuda, k=16) == want < E.EVAL_MAX_ROWS // 16
    # a model whose chunk of EVAL_BATCH rows is already over the budget keeps EVAL_BATCH
    big, _ = model_and_data({"task": "sort", "n_train": 64, "d_model": 1024, "d_ff": 4096})
    assert E.eval_rows(big, 4096, cuda) == E.EVAL_BATCH
    assert E.eval_rows(big, 4096, cuda, k=8) == E.EVAL_BATCH // 8


@pytest.mark.parametrize("shape", [(), (3,)], ids=["one_trial", "replicates"])
def test_an_epochs_indices_arrive_in_batches_in_order(shape):
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 100, size=(*shape, n)) for n in (8, 8, 5)]
    got = list(device_batches(batches, CPU))
    assert len(got) == 3
    for want, (idx_np, idx) in zip(batches, got):
        assert idx_np is want
        assert np.array_equal(idx.numpy(), want)
    assert list(device_batches([], CPU)) == []


def test_task_data_on_the_cpu_is_itself_and_elsewhere_a_copy():
    _, data = model_and_data({"task": "digits"})
    assert data.on(CPU) is data
    moved = data.on(torch.device("meta"))
    assert moved.train.x.device.type == "meta" and moved.val.mask.device.type == "meta"
    assert all(s.y.device.type == "meta" for s in moved.extra.values())
    assert moved.extra.keys() == data.extra.keys() and moved.spec is data.spec
    assert data.train.x.device == CPU  # the original is left as it was


def test_an_empty_evaluation_set_is_refused():
    model, data = model_and_data({"task": "digits"})
    empty = data.val.subset(np.arange(0))
    with pytest.raises(ValueError, match="evaluation set 'none' is empty"):
        E.set_accuracies(model, {"val": data.val, "none": empty}, CPU)


def test_data_whose_spec_hides_its_padding_is_refused():
    import dataclasses

    from study.train import run_trial

    cfg = make_config({"task": "listops", "n_train": 256, "d_model": 16, "d_ff": 32,
                       "n_layers": 1, "n_heads": 2, "epochs": 1})
    data = get_task(cfg)
    assert data.spec.padded
    hidden = dataclasses.replace(data, spec=dataclasses.replace(data.spec, padded=False))
    with pytest.raises(ValueError, match="padded=False"):
        next(run_trial(cfg, hidden))


def test_param_norm_is_the_global_l2_norm():
    """One multi-tensor norm gives the norm of all parameters side by side, as the sum of
    squares over each parameter did; the batched replicates' per-replicate norm likewise."""
    from study.replicas import Replicas
    from study.trainable import replicate

    model = build_model(make_config({"task": "digits", "d_model": 16, "n_layers": 2}),
                        get_task(make_config({"task": "digits"})).spec)
    params = list(model.parameters())
    want = torch.cat([p.detach().flatten() for p in params]).double().norm()
    assert E.param_norm(params).item() == pytest.approx(want.item(), rel=1e-6)
    cfg = make_config({"task": "digits", "d_model": 16, "n_layers": 1, "device": "cpu"})
    cfgs = [replicate(cfg, k, False) for k in range(3)]
    reps = Replicas(cfgs, [get_task(c) for c in cfgs])
    got = reps.norms(reps.params.values())
    for r in range(3):
        assert got[r].item() == pytest.approx(E.param_norm(reps.model(r).parameters()).item(),
                                              rel=1e-6)


def test_weighted_ece_is_the_ece_of_the_rows_it_marks():
    """A 0/1 weight counts only the rows it marks, as selecting them would; leading dims give
    one ECE each (replicates), the same as each row's own."""
    from study import metrics as M

    g = torch.Generator().manual_seed(0)
    conf = torch.rand(3, 50, generator=g)
    correct = torch.rand(3, 50, generator=g) < conf
    keep = torch.rand(3, 50, generator=g) < 0.7
    got = M.expected_calibration_error(conf, correct, weight=keep)
    assert got.shape == (3,)
    for r in range(3):
        want = M.expected_calibration_error(conf[r][keep[r]], correct[r][keep[r]])
        assert got[r].item() == pytest.approx(want.item(), rel=1e-6)
        assert M.expected_calibration_error(conf[r], correct[r]).item() == pytest.approx(
            M.expected_calibration_error(conf[r:r + 1], correct[r:r + 1])[0].item())
    # an unmarked row counts for nothing, even a NaN one (a non-finite unlabelled position)
    poisoned = conf.masked_fill(~keep, float("nan"))
    torch.testing.assert_close(M.expected_calibration_error(poisoned, correct, weight=keep), got)
    assert M.expected_calibration_error(torch.zeros(0), torch.zeros(0)).isnan()


class _Syncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations that make the host wait for the device (on a GPU)."""

    SYNCING = ("nonzero", "_local_scalar_dense", "masked_select", "unique")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        # indexing with a bool mask finds its True positions (`nonzero`) inside the kernel
        bool_index = name in ("index", "index_put", "index_put_") and any(
            t is not None and t.dtype == torch.bool for t in args[1])
        if name in self.SYNCING or bool_index:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("changes", TASKS)
def test_an_epochs_evaluation_never_waits_for_the_device(changes):
    """The per-epoch metrics (one model, and k batched replicates) select no labelled rows
    and read no value to the host: on a GPU each would stall the host (before, 4 per split
    per replicate, as `nonzero`)."""
    from study.replicas import Replicas
    from study.trainable import replicate

    model, data = model_and_data(changes)
    with _Syncs() as syncs:
        E.epoch_metrics(model, data, CPU)
    assert syncs.seen == []
    cfg = make_config({"d_model": 16, "d_ff": 32, "n_layers": 1, "n_heads": 2, "seed": 1,
                       "device": "cpu", **changes})
    cfgs = [replicate(cfg, k, False) for k in range(2)]
    reps = Replicas(cfgs, [get_task(c) for c in cfgs], vmap_eval=True)
    with _Syncs() as syncs:
        reps.epoch_values()
    assert syncs.seen == []
