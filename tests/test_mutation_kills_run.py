"""Contracts of the run machinery that mutants of the source used to survive: the sweep's test_iter
covering the whole held-out split, the analysis' image count with a partial last batch, the loss
weights of `exdrop test`, the layout and the resumed shuffle of a streamed ImageData list, the DDP
stop flag's reduction, the shape check of `load_weights`, the deletion order of `prune_snapshots`,
and the run log's resume, best accuracy and budget. Each test is small (tiny nets and data)."""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exdrop.proto import caffe_pb2
from exdrop.proto import io as cio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import write_tiny  # noqa: E402


# ---------------------------------------------------------------------- the sweep's test_iter
def test_sweep_test_iter_covers_a_held_out_split_not_a_multiple_of_the_batch(tmp_path):
    """70 held-out images at a TEST batch of 30: ceil(70 / 30) = 3 batches, so every image is tested
    (floor would give 2 batches, 60 images)."""
    from exdrop.experiments import sweep as S
    budget = S.Budget("t", "test budget", train_per_class=10, val_per_class=7, max_iter=4, stepvalue=2,
                      test_interval=2, snapshot=2, display=1, test_batch_size=30)
    data = {"train": {1: str(tmp_path / "train_lmdb")}, "val": {1: str(tmp_path / "val_lmdb")},
            "counts": {"train": 100, "val_per_class": [7] * 10}}
    run = S.write_run(S.Run("cifar10", "ed", 0.5, 1, tmp_path / "r"), budget, data)
    sp = cio.read_solver_prototxt(run.solver)
    net = cio.read_net_prototxt(run.folder / "net.prototxt")
    test_batch = [lp.data_param.batch_size for lp in net.layer
                  if lp.type == "Data" and {r.phase for r in lp.include} == {caffe_pb2.TEST}]
    assert test_batch == [30]
    assert list(sp.test_iter) == [3]
    assert sp.test_iter[0] * 30 >= 70


# ---------------------------------------------------------------------- analysis image count
def _tiny_with_test_batch(tmp, batch):
    """write_tiny's net with its TEST batch set to ``batch``; (net path, random weights)."""
    from exdrop.engine.net import Net
    from exdrop.engine.pylayer import TRAIN
    from exdrop.engine.snapshot import save_weights
    solver = write_tiny(tmp)
    text = (tmp / "tiny_ed.prototxt").read_text()
    old = "batch_size: 3 backend: LMDB"
    assert text.count(old) == 1
    net_path = tmp / f"tiny_b{batch}.prototxt"
    net_path.write_text(text.replace(old, f"batch_size: {batch} backend: LMDB"))
    weights = tmp / "w.caffemodel"
    if not weights.exists():
        torch.manual_seed(0)
        net = Net(cio.read_net_prototxt(tmp / "tiny_ed.prototxt"), TRAIN, "cpu", "tiny")
        save_weights(net, weights)
    return solver, net_path, weights


def test_analysis_means_are_over_the_images_analysed_with_a_partial_batch(tmp_path):
    """5 images at a TEST batch of 3 (batches of 3 and 2): the means divide by 5 images, so they equal
    those at a batch of 1 (5 full batches); counting 2 x 3 = 6 images would scale them by 5/6."""
    from exdrop.analysis import analyze as A
    _, net3, weights = _tiny_with_test_batch(tmp_path, 3)
    _, net1, _ = _tiny_with_test_batch(tmp_path, 1)
    r3 = A.analyze(net3, weights, images=5, compression=False)
    r1 = A.analyze(net1, weights, images=5, compression=False)
    assert r3["images"] == r1["images"] == 5
    assert r3["nll"] > 0
    for key in ("nll", "accuracy", "neurons_on", "entropy_act", "peb_mass"):
        assert r3[key] == pytest.approx(r1[key], rel=1e-5, abs=1e-7), key
    # the whole split (6 images: two full batches of 3) agrees with its own batch of 1 too
    assert A.analyze(net3, weights, compression=False)["nll"] == pytest.approx(
        A.analyze(net1, weights, compression=False)["nll"], rel=1e-5)


# ---------------------------------------------------------------------- exdrop test: loss weights
@pytest.mark.parametrize("extra, weight_of", [
    # a second loss weighted 0.5: loss + 0.5 loss2
    ('layer { name: "loss2" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss2" '
     'loss_weight: 0.5 }\n', {"loss": 1.0, "loss2": 0.5}),
    # the only loss, weighted 2
    (None, {"loss": 2.0}),
])
def test_exdrop_test_loss_is_the_loss_weighted_sum(tmp_path, extra, weight_of):
    import exdrop.analysis.evaluate as ev
    solver, net_path, weights = _tiny_with_test_batch(tmp_path, 3)
    text = net_path.read_text()
    if extra is not None:
        text += extra
    else:
        old = 'top: "loss" }'
        assert text.count(old) == 1
        text = text.replace(old, 'top: "loss" loss_weight: 2 }')
    path = tmp_path / "weighted.prototxt"
    path.write_text(text)
    res = ev.evaluate(path, weights)
    assert res["images"] == 6
    # by hand: every image in one batch, cross entropy of its logits
    from exdrop.engine.net import Net
    from exdrop.engine.pylayer import TEST
    from exdrop.engine.snapshot import load_weights
    net = Net(cio.read_net_prototxt(path), TEST, "cpu", str(path), batch_size=6)
    load_weights(net, weights)
    with torch.no_grad():
        blobs = net()
    ce = F.cross_entropy(blobs["ip2"].double(), blobs["label"].long()).item()
    assert ce > 0.01
    for name in weight_of:
        assert res["outputs"][name] == pytest.approx(ce, rel=1e-5)   # the outputs stay unweighted
    assert res["loss"] == pytest.approx(sum(weight_of.values()) * ce, rel=1e-5)
    # and through the command line's JSON
    from exdrop.cli import main as exdrop_main
    import json
    out = tmp_path / "cli"
    assert exdrop_main(["test", str(path), "--weights", str(weights), "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "test.json").read_text())["loss"] == pytest.approx(res["loss"], rel=1e-6)


# ---------------------------------------------------------------------- streamed ImageData
def _image_list(tmp_path, n=7, h=6, w=9):
    import cv2
    rng = np.random.default_rng(4)
    images, lines = [], []
    for k in range(n):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / f"{k}.png"), img)
        images.append(img)
        lines.append(f"{k}.png {k % 3}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return images


def _image_data_lp(tmp_path, batch, shuffle):
    lp = caffe_pb2.LayerParameter(name="data", type="ImageData")
    lp.top.extend(["data", "label"])
    lp.image_data_param.source, lp.image_data_param.batch_size = str(tmp_path / "list.txt"), batch
    lp.image_data_param.shuffle, lp.image_data_param.root_folder = shuffle, str(tmp_path) + "/"
    return lp


@pytest.mark.parametrize("h, w", [(6, 9), (8, 8)])
def test_streamed_image_data_batch_has_the_images_pixels_in_chw(tmp_path, h, w):
    """TEST phase, no transform: a streamed batch is the images (BGR, as OpenCV reads them) in
    (N, C, H, W) layout, pixel for pixel."""
    from exdrop.data import make_source
    from exdrop.data import stream as S
    images = _image_list(tmp_path, 7, h, w)
    src = make_source(_image_data_lp(tmp_path, 4, False), 1, stream=True)
    assert isinstance(src, S.StreamSource)
    assert src.top_shapes()[0] == (4, 3, h, w)
    want = np.stack([im.transpose(2, 0, 1) for im in images]).astype(np.float32)
    x, y = src.next_batch()
    np.testing.assert_array_equal(x.numpy(), want[:4])
    np.testing.assert_array_equal(y.numpy(), [0, 1, 2, 0])
    x, y = src.next_batch()   # wraps around: 4, 5, 6, 0
    np.testing.assert_array_equal(x.numpy(), want[[4, 5, 6, 0]])
    # the resident source gives the same
    resident = make_source(_image_data_lp(tmp_path, 4, False), 1, stream=False)
    np.testing.assert_array_equal(resident.next_batch()[0].numpy(), want[:4])
    src.close()


def test_streamed_shuffled_list_resumes_exactly_over_several_epochs(tmp_path):
    """A state taken mid-epoch, loaded into a source of another seed: the next 8 batches (several
    epochs, each a new permutation from the restored shuffle generator) equal the uninterrupted
    source's, images and labels."""
    from exdrop.data import make_source
    _image_list(tmp_path, 7, 8, 8)
    lp = _image_data_lp(tmp_path, 3, True)
    a = make_source(lp, 0, seed=1, stream=True)
    for _ in range(4):
        a.next_batch()
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(8)]
    b = make_source(lp, 0, seed=12345, stream=True)
    b.load_state_dict(state)
    again = [b.next_batch() for _ in range(8)]
    for k, ((x1, y1), (x2, y2)) in enumerate(zip(rest, again)):
        torch.testing.assert_close(x2, x1, rtol=0, atol=0, msg=f"batch {k}")
        torch.testing.assert_close(y2, y1, msg=f"batch {k}")
    # and the orders are shuffles indeed: the 8 batches are not all the list in order
    assert any(y.tolist() != [(i % 7) % 3 for i in range(3 * k, 3 * k + 3)] for k, (_, y) in enumerate(rest))
    a.close()
    b.close()


# ---------------------------------------------------------------------- DDP stop flag
def test_ddp_stop_flag_is_true_when_any_process_has_it(monkeypatch):
    """any_over on rank 0 of 2, the all-reduce faked with the other process's flag: true when either
    is true (a MAX reduction; MIN would stop only when all do)."""
    import torch.distributed as tdist
    from exdrop.engine import distributed as D
    ops = {tdist.ReduceOp.MAX: max, tdist.ReduceOp.MIN: min, tdist.ReduceOp.SUM: sum,
           tdist.ReduceOp.PRODUCT: math.prod}
    other = {"flag": 0}
    seen = []

    def fake_all_reduce(t, op=tdist.ReduceOp.SUM, group=None, async_op=False):
        seen.append(op)
        fn = next(f for o, f in ops.items() if o == op)
        t.fill_(fn([int(t.item()), other["flag"]]))

    monkeypatch.setattr(tdist, "all_reduce", fake_all_reduce)
    world = D.World(rank=0, size=2)
    for mine, theirs in ((True, False), (False, True), (True, True), (False, False)):
        other["flag"] = int(theirs)
        assert D.any_over(world, mine) is (mine or theirs), (mine, theirs)
    assert len(seen) == 4
    assert D.any_over(D.ONE, True) is True and D.any_over(D.ONE, False) is False


# ---------------------------------------------------------------------- load_weights shapes
def _ip_net():
    from exdrop.engine.net import Net
    from exdrop.engine.pylayer import TEST
    param = caffe_pb2.NetParameter(name="ipnet")
    inp = param.layer.add(name="input", type="Input", top=["data"])
    inp.input_param.shape.add().dim.extend([2, 16])
    ip = param.layer.add(name="fc", type="InnerProduct", bottom=["data"], top=["fc"])
    ip.inner_product_param.num_output = 3
    return Net(param, TEST, "cpu", "ipnet")


def _caffemodel(path, weight_shape, count=48):
    param = caffe_pb2.NetParameter(name="ipnet")
    lp = param.layer.add(name="fc", type="InnerProduct")
    w = lp.blobs.add()
    w.shape.dim.extend(weight_shape)
    w.data.extend(np.arange(count, dtype=np.float32).tolist())
    b = lp.blobs.add()
    b.shape.dim.extend([3])
    b.data.extend([0.5, 0.25, 0.125])
    cio.write_caffemodel(param, path)
    return path


@pytest.mark.parametrize("shape", [(48,), (16, 3), (1, 3, 16), (3, 16, 1)])
def test_load_weights_refuses_a_blob_of_the_same_count_but_another_shape(tmp_path, shape):
    from exdrop.engine.snapshot import load_weights
    net = _ip_net()
    assert tuple(net.layer("fc").blobs[0].shape) == (3, 16)
    before = net.layer("fc").blobs[0].detach().clone()
    with pytest.raises(ValueError, match=r"layer 'fc' blob 0 has shape .*the net expects \(3, 16\)"):
        load_weights(net, _caffemodel(tmp_path / "w.caffemodel", shape))
    torch.testing.assert_close(net.layer("fc").blobs[0].detach(), before)   # nothing copied
    # the right shape loads
    assert load_weights(net, _caffemodel(tmp_path / "ok.caffemodel", (3, 16))) == ["fc"]
    np.testing.assert_array_equal(net.layer("fc").blobs[0].detach().numpy(),
                                  np.arange(48, dtype=np.float32).reshape(3, 16))


# ---------------------------------------------------------------------- prune_snapshots order
@pytest.mark.parametrize("h5", [False, True])
def test_prune_deletes_each_old_sets_solverstate_first(tmp_path, monkeypatch, h5):
    import os
    import time
    from exdrop.engine import snapshot as snap
    suffixes = ((".caffemodel.h5", ".solverstate.h5") if h5 else (".caffemodel", ".solverstate")) + (".engine.pt",)
    t = time.time() - 100
    for it in (2, 4, 6):
        for k, suffix in enumerate(suffixes):
            p = tmp_path / f"net_iter_{it}{suffix}"
            p.write_bytes(b"x")
            os.utime(p, (t + it + 0.1 * k, t + it + 0.1 * k))
    order = []   # every file deletion (Path.unlink calls os.unlink), in order
    real_unlink = os.unlink

    def recording_unlink(path, *a, **kw):
        order.append(Path(path).name)
        return real_unlink(path, *a, **kw)

    monkeypatch.setattr(os, "unlink", recording_unlink)
    monkeypatch.setattr(os, "remove", recording_unlink)
    removed = snap.prune_snapshots(tmp_path / "net", newest=6, keep=1)
    assert sorted(p.name for p in removed) == sorted(order)
    assert len(order) == 6
    state = suffixes[1]
    for it in (2, 4):
        mine = [name for name in order if name.startswith(f"net_iter_{it}.")]
        assert len(mine) == 3 and mine[0] == f"net_iter_{it}{state}", order
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(f"net_iter_6{s}" for s in suffixes)


# ---------------------------------------------------------------------- the run log
def _log_rows(out):
    with open(out / "log.csv", newline="") as f:
        return [(int(r["iter"]), r["phase"]) for r in csv.DictReader(f)]


def _first_run(out):
    from exdrop.run.runlog import RunLog
    log = RunLog(out, ["loss", "accuracy"])
    for it in (0, 2, 4):
        log.add({"iter": it, "phase": "train", "lr": 0.1, "elapsed_s": 1.0, "loss": 1.0 / (it + 1)})
        if it:
            log.add({"iter": it, "phase": "test", "lr": 0.1, "elapsed_s": 1.0, "loss": 0.5, "accuracy": 0.1 * it})
    log.finish({})


@pytest.mark.parametrize("retest", [True, False])
def test_resumed_log_has_each_test_row_once(tmp_path, retest):
    """A run snapshotted at 4 after its test at 4, resumed: with a retest at the resume point the old
    test row at 4 goes (the new one replaces it); without, the old one is kept; never both."""
    from exdrop.run.runlog import RunLog
    _first_run(tmp_path)
    assert _log_rows(tmp_path) == [(0, "train"), (2, "train"), (2, "test"), (4, "train"), (4, "test")]
    log = RunLog(tmp_path, ["loss", "accuracy"], resume_iter=4, retest_at_resume=retest, display=2)
    if retest:
        log.add({"iter": 4, "phase": "test", "lr": 0.1, "elapsed_s": 2.0, "loss": 0.5, "accuracy": 0.4})
    for it in (6, 8):
        log.add({"iter": it, "phase": "train", "lr": 0.1, "elapsed_s": 2.0, "loss": 0.1})
        log.add({"iter": it, "phase": "test", "lr": 0.1, "elapsed_s": 2.0, "loss": 0.5, "accuracy": 0.1 * it})
    log.finish({})
    rows = _log_rows(tmp_path)
    assert len(rows) == len(set(rows)), rows
    assert [r for r in rows if r[1] == "test"] == [(2, "test"), (4, "test"), (6, "test"), (8, "test")]
    assert [r for r in rows if r[1] == "train"] == [(0, "train"), (2, "train"), (6, "train"), (8, "train")]
    assert [r for r in log.rows if r["phase"] == "test"][1]["iter"] in (4, "4")


def test_summary_best_accuracy_is_the_max_not_the_last(tmp_path):
    from exdrop.run.runlog import RunLog
    log = RunLog(tmp_path, ["loss", "accuracy"], write=False)
    for it, acc in ((2, 0.5), (4, 0.9), (6, 0.7)):
        log.add({"iter": it, "phase": "train", "lr": 0.1, "elapsed_s": 1.0, "loss": 2.0 - acc})
        log.add({"iter": it, "phase": "test", "lr": 0.1, "elapsed_s": 1.0, "loss": 1.0 - acc, "accuracy": acc})
    s = log.summary()
    assert s["best_test_accuracy"] == pytest.approx(0.9)
    assert s["test_accuracy"] == pytest.approx(0.7) and s["test_loss"] == pytest.approx(0.3)
    assert s["train_loss"] == pytest.approx(1.3)
    # read back from a written log (strings) the same
    _first_run(tmp_path / "w")
    log = RunLog(tmp_path / "w", ["loss", "accuracy"], resume_iter=5, retest_at_resume=False)
    log.add({"iter": 6, "phase": "test", "lr": 0.1, "elapsed_s": 1.0, "loss": 0.5, "accuracy": 0.05})
    s = log.summary()
    assert s["best_test_accuracy"] == pytest.approx(0.4) and s["test_accuracy"] == pytest.approx(0.05)


def test_a_resumed_log_with_empty_cells_reads_them_as_missing(tmp_path):
    """A kept row's empty cell (a test net without an accuracy, a train row's test columns) is a missing
    value in the summary, not a float() error."""
    from exdrop.run.runlog import RunLog
    (tmp_path / "log.csv").write_text("iter,phase,lr,elapsed_s,accuracy,loss\r\n"
                                      "2,train,0.1,1.0,,0.9\r\n2,test,0.1,1.0,0.3,0.8\r\n4,test,0.1,2.0,,0.7\r\n")
    log = RunLog(tmp_path, ["loss", "accuracy"], resume_iter=5, retest_at_resume=False)
    assert log.summary() == {"test_accuracy": None, "test_loss": pytest.approx(0.7),
                             "best_test_accuracy": pytest.approx(0.3), "train_loss": pytest.approx(0.9)}


def test_a_fresh_log_over_an_old_one_starts_empty(tmp_path):
    """``--overwrite``: a log that is not resumed keeps none of the rows already in the folder."""
    from exdrop.run.runlog import RunLog
    _first_run(tmp_path)
    assert len(_log_rows(tmp_path)) == 5
    log = RunLog(tmp_path, ["loss", "accuracy"])
    assert log.rows == [] and _log_rows(tmp_path) == []
    log.finish({})


def test_budget_is_full_at_the_solvers_max_iter():
    from exdrop.run.runlog import budget
    assert budget(20, 20).startswith("full")
    assert budget(30, 20).startswith("full")
    assert budget(19, 20).startswith("reduced") and "19 of the solver's 20" in budget(19, 20)


def test_summary_of_a_log_without_train_rows_has_no_train_loss(tmp_path):
    """A run that only tested (``exdrop test``-like rows, or a resume past its last display) reports
    ``train_loss`` None instead of failing on an empty list."""
    from exdrop.run.runlog import RunLog
    log = RunLog(tmp_path, ["loss", "accuracy"], write=False)
    assert log.summary() == {"test_accuracy": None, "test_loss": None, "best_test_accuracy": None, "train_loss": None}
    log.add({"iter": 0, "phase": "test", "lr": 0.1, "elapsed_s": 0.0, "loss": 2.0, "accuracy": 0.25})
    assert log.summary() == {"test_accuracy": 0.25, "test_loss": 2.0, "best_test_accuracy": 0.25, "train_loss": None}


def test_the_printed_row_shows_the_float_outputs_only():
    """The progress line: phase and iteration, then each float output to 4 decimals, one space apart;
    the schedule's own columns (lr, elapsed_s) and non-float values are not repeated."""
    from exdrop.run.runlog import format_row
    row = {"iter": 3, "phase": "test", "lr": 0.01, "elapsed_s": 2.5, "accuracy": 0.5, "loss": 1.25, "images": 7}
    assert format_row(row) == "[test @ 3] accuracy=0.5000 loss=1.2500"
    assert format_row({"iter": 0, "phase": "train", "lr": 0.1, "elapsed_s": 0.1}) == "[train @ 0] "


def test_run_log_keeps_its_columns_when_a_row_or_an_old_log_has_more(tmp_path):
    """A row with a key outside the log's columns (an output the log was not opened with, or a column of
    the log being resumed that this net does not have) is written without it, not refused mid-run."""
    from exdrop.run.runlog import BASE_COLUMNS, RunLog
    with open(tmp_path / "log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=BASE_COLUMNS + ["accuracy", "kl"])
        w.writeheader()
        w.writerow({"iter": 0, "phase": "test", "lr": 0.1, "elapsed_s": 1.0, "accuracy": 0.1, "kl": 3.0})
    log = RunLog(tmp_path, ["accuracy"], resume_iter=1)
    log.add({"iter": 1, "phase": "train", "lr": 0.1, "elapsed_s": 2.0, "loss": 0.5, "accuracy": 0.5, "extra": 1})
    log.finish({"status": "finished"})
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == BASE_COLUMNS + ["accuracy"]
    assert [(r["iter"], r["phase"], r["accuracy"]) for r in rows] == [("0", "test", "0.1"), ("1", "train", "0.5")]


def test_plan_run_folder_is_inside_the_sweep_else_the_recorded_folder(tmp_path):
    from exdrop.run.runlog import plan_run_folder
    (tmp_path / "cifar10" / "ed" / "seed1").mkdir(parents=True)
    entry = {"in_sweep": "cifar10/ed/seed1", "folder": "/elsewhere/cifar10/ed/seed1"}
    assert plan_run_folder(tmp_path, entry) == tmp_path / "cifar10" / "ed" / "seed1"
    assert plan_run_folder(tmp_path, {**entry, "in_sweep": "cifar10/ed/seed2"}) == Path(entry["folder"])
    assert plan_run_folder(tmp_path, {"in_sweep": "gone"}) == Path("")   # an old plan without either
