"""`exdrop test` (exdrop/analysis/evaluate.py): a tiny run's own logged test accuracy and loss reproduced
from its snapshots, each image counted once with a partial last batch (against a one-batch
reference computed here), Caffe's wrap-around when a batch count is given, the data folder
rules, scores without an Accuracy layer, the named errors, the confusion image, the command
line, and real pycaffe's numbers next to the engine's."""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import exdrop.data
import exdrop.analysis.evaluate as ev
from exdrop.proto import io as cio
from exdrop.cli import build_parser, main
from exdrop.data import DatumLMDB, write_datum_lmdb
from exdrop.engine.net import Net
from exdrop.engine.pylayer import TEST, TRAIN
from exdrop.engine.snapshot import save_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import require_pycaffe, write_tiny  # noqa: E402

MAX_ITER, EVERY = 30, 10


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny engine run: tests at 10, 20, 30 (test_iter 2 x batch 3 = the 6 validation images),
    every snapshot kept."""
    tmp = tmp_path_factory.mktemp("evaluate")
    solver = write_tiny(tmp / "tiny")
    out = tmp / "run"
    assert main(["train", str(solver), "--out", str(out), "--max-iter", str(MAX_ITER), "--test-interval", str(EVERY),
                 "--snapshot-every", str(EVERY), "--keep-snapshots", "0", "--seed", "5", "--device", "cpu",
                 "--quiet"]) == 0
    return tmp, solver, out


def _snap(out, it):
    return out / "snapshots" / f"tiny_ed_iter_{it}.caffemodel"


def _net_copy(tmp, name, *edits):
    """A copy of the tiny net with text edits (old, new), each of which must apply."""
    text = (tmp / "tiny" / "tiny_ed.prototxt").read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    path = tmp / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def sharp(run):
    """Weights whose top-1 predictions differ from image to image (the tiny run learns noise)."""
    tmp, _, _ = run
    torch.manual_seed(3)
    net = Net(cio.read_net_prototxt(tmp / "tiny" / "tiny_ed.prototxt"), TRAIN, "cpu", "tiny")
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(2.0)
    path = tmp / "sharp.caffemodel"
    save_weights(net, path)
    return path


def _reference(net_path, weights, lmdb):
    """Every image of ``lmdb`` in ONE batch through the TEST net: per-image logits and labels."""
    param = cio.read_net_prototxt(net_path)
    for lp in param.layer:
        if lp.type == "Data":
            lp.data_param.source = str(lmdb)
    with DatumLMDB(lmdb) as db:
        n = len(db)
    net = Net(param, TEST, "cpu", str(net_path), batch_size=n)
    from exdrop.engine.snapshot import load_weights
    load_weights(net, weights)
    with torch.no_grad():
        blobs = net()
    return blobs["ip2"].double(), blobs["label"].long()


# ---------------------------------------------------------------------- the run's own numbers
def test_reproduces_the_runs_logged_test_accuracy_and_loss(run):
    tmp, solver, out = run
    results = json.loads((out / "results.json").read_text())
    with open(out / "log.csv", newline="") as f:
        logged = {int(r["iter"]): r for r in csv.DictReader(f) if r["phase"] == "test"}
    assert sorted(logged) == [10, 20, 30]
    for it in (10, 20, 30):
        res = ev.evaluate(solver, _snap(out, it))
        assert (res["iterations"], res["batch_size"], res["images"], res["each_image_once"]) == (2, 3, 6, False)
        assert res["accuracy"] == pytest.approx(float(logged[it]["accuracy"]), abs=5e-7)   # log.csv: 6 digits
        assert res["loss"] == pytest.approx(float(logged[it]["loss"]), rel=5e-6)
        if it == MAX_ITER:   # results.json keeps the floats: equal to the last bit
            assert res["accuracy"] == results["test_accuracy"] and res["loss"] == results["test_loss"]
        cm = np.array(res["confusion"])
        assert cm.sum() == 6 and cm.sum(1).tolist() == res["per_class_images"] == [2, 2, 2]
        assert res["accuracy"] == pytest.approx(np.trace(cm) / 6)   # the Accuracy layer agrees with argmax
        assert res["classes"] == ["a", "b", "c"] and res["data_split"] is None


def test_cli_writes_json_png_and_prints_a_table(run, capsys):
    tmp, solver, out = run
    capsys.readouterr()
    assert main(["test", str(solver), "--weights", str(_snap(out, MAX_ITER)), "--quiet"]) == 0
    printed = capsys.readouterr().out
    folder = out / f"test_tiny_ed_iter_{MAX_ITER}"   # beside snapshots/, named after the weights
    res = json.loads((folder / "test.json").read_text())
    assert res["accuracy"] == json.loads((out / "results.json").read_text())["test_accuracy"]
    assert (folder / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert f"accuracy: {res['accuracy']:.4f}" in printed and str(folder / "test.json") in printed
    for name, n, acc in zip(res["classes"], res["per_class_images"], res["per_class_accuracy"]):
        assert any(line.split() == [name, str(n), f"{acc:.4f}"] for line in printed.splitlines()), (name, printed)


# ---------------------------------------------------------------------- how many images
def test_each_image_once_with_a_partial_last_batch(run, sharp):
    """TEST batch 4 on 6 images: batches of 4 and 2, so nothing counts twice: the accuracy, the loss
    and the confusion are those of all 6 images in one batch."""
    tmp, _, _ = run
    net = _net_copy(tmp, "b4.prototxt", ("batch_size: 3", "batch_size: 4"))
    lmdb = tmp / "tiny" / "db" / "val_lmdb"
    res = ev.evaluate(net, sharp)
    assert (res["iterations"], res["batch_size"], res["images"], res["records"]) == (2, 4, 6, 6)
    assert res["each_image_once"] is True
    logits, labels = _reference(net, sharp, lmdb)
    pred = logits.argmax(1)
    assert len(set(pred.tolist())) > 1, "the weights should not predict one class for every image"
    cm = np.zeros((3, 3), int)
    np.add.at(cm, (labels.numpy(), pred.numpy()), 1)
    assert res["confusion"] == cm.tolist()
    assert res["accuracy"] == pytest.approx(float((pred == labels).double().mean()), abs=1e-6)
    assert res["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-5)
    assert res["per_class_accuracy"] == pytest.approx([cm[c, c] / cm[c].sum() for c in range(3)])


def test_a_batch_count_wraps_around_like_caffe(run, sharp):
    """--iterations 2 with batch 4 reads images 0..5 then 0, 1 again (Caffe's test): 8 images."""
    tmp, _, _ = run
    net = _net_copy(tmp, "b4w.prototxt", ("batch_size: 3", "batch_size: 4"))
    res = ev.evaluate(net, sharp, iterations=2)
    assert (res["images"], res["each_image_once"]) == (8, False)
    logits, labels = _reference(net, sharp, tmp / "tiny" / "db" / "val_lmdb")
    order = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])
    per_image = F.cross_entropy(logits[order], labels[order], reduction="none")
    assert res["loss"] == pytest.approx(float(per_image.mean()), rel=1e-5)
    hits = (logits[order].argmax(1) == labels[order]).double()
    assert res["accuracy"] == pytest.approx(float(hits.mean()), abs=1e-6)
    assert np.array(res["confusion"]).sum() == 8


def test_a_solvers_test_iter_is_used_only_on_its_own_source(run):
    tmp, solver, out = run
    db = tmp / "tiny" / "db"
    assert ev.evaluate(solver, _snap(out, 10), iterations=1)["images"] == 3
    res = ev.evaluate(solver, _snap(out, 10), data=db)   # another source: each image once
    assert res["each_image_once"] and res["images"] == 6 and res["data_split"] == "val_lmdb"


# ---------------------------------------------------------------------- data
def test_data_folders_test_lmdb_first_then_val_lmdb(run, tmp_path):
    tmp, solver, out = run
    images, labels = DatumLMDB(tmp / "tiny" / "db" / "val_lmdb").read_all()
    write_datum_lmdb(tmp_path / "d" / "test_lmdb", images[:5], labels[:5])
    write_datum_lmdb(tmp_path / "d" / "val_lmdb", images, labels)
    res = ev.evaluate(solver, _snap(out, MAX_ITER), data=tmp_path / "d")
    assert res["data_split"] == "test_lmdb" and res["records"] == 5 and res["images"] == 5
    assert res["classes"] is None   # no meta.json
    (tmp_path / "d" / "meta.json").write_text(json.dumps({"classes": ["x", "y", "z"]}))
    res = ev.evaluate(solver, _snap(out, MAX_ITER), data=tmp_path / "d" / "val_lmdb")   # an LMDB as such
    assert res["data_split"] is None and res["records"] == 6 and res["classes"] == ["x", "y", "z"]
    assert ev.is_converted(tmp_path / "d") and ev.is_converted(tmp_path / "d" / "test_lmdb")
    assert not ev.is_converted(tmp / "tiny" / "images")


def test_missing_data_is_named_with_the_way_to_convert(run, tmp_path):
    tmp, solver, out = run
    with pytest.raises(FileNotFoundError, match=r"--data .*nowhere: no such file or folder.*exdrop data"):
        ev.evaluate(solver, _snap(out, MAX_ITER), data=tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"not a converted LMDB or dataset folder.*exdrop data"):
        ev.evaluate(solver, _snap(out, MAX_ITER), data=tmp / "tiny" / "images")
    gone = _net_copy(tmp, "gone.prototxt", (str(tmp / "tiny" / "db" / "val_lmdb"), str(tmp_path / "no_lmdb")))
    with pytest.raises(FileNotFoundError, match=r"TEST data layer 'data' reads '.*no_lmdb', which does not exist "
                                                r"\(relative to the current folder .*\); convert the data once with "
                                                r".*exdrop data.*, or run from the folder that the prototxt's relative "
                                                r"paths start from$"):
        ev.evaluate(gone, _snap(out, MAX_ITER))
    with pytest.raises(FileNotFoundError, match=r"^.*nowhere.prototxt: no such solver or net prototxt$"):
        ev.evaluate(tmp_path / "nowhere.prototxt", _snap(out, MAX_ITER))
    text = (tmp / "tiny" / "tiny_ed.prototxt").read_text()
    no_test_data = tmp_path / "no_test_data.prototxt"   # the TEST phase's Data layer made a TRAIN one
    no_test_data.write_text(text.replace("phase: TEST", "phase: TRAIN"))
    assert text.count("phase: TEST") >= 1
    with pytest.raises(ValueError, match=r"no_test_data.prototxt: the TEST phase has no Data or ImageData layer to "
                                         r"read images from$"):
        ev.evaluate(no_test_data, _snap(out, MAX_ITER))


def test_cli_converts_a_raw_cifar_source_into_data_dir(run, tmp_path, monkeypatch):
    tmp, solver, out = run
    raw = tmp_path / "train.tgz"
    raw.write_bytes(b"x")
    converted = []

    def fake_prepare(source, out_dir, **kw):
        converted.append((str(source), str(out_dir)))
        return {"out_dir": str(out_dir), "counts": {}, "classes": [], "shape": [], "meta": ""}
    seen = {}

    def fake_evaluate(net, weights, data=None, **kw):
        seen["data"] = data
        raise ValueError("stop here")
    monkeypatch.setattr(exdrop.data, "prepare_cifar10", fake_prepare)
    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    args = ["test", str(solver), "--weights", str(_snap(out, MAX_ITER)), "--quiet"]
    assert main(args + ["--data", str(raw), "--data-dir", str(tmp_path / "c10")]) == 1
    assert converted == [(str(raw), str(tmp_path / "c10"))] and seen["data"] == str(tmp_path / "c10")
    db = str(tmp / "tiny" / "db")
    assert main(args + ["--data", db]) == 1   # a converted folder is read as it is
    assert len(converted) == 1 and seen["data"] == db


# ---------------------------------------------------------------------- scores and errors
def test_without_an_accuracy_layer_the_softmax_scores_are_used(run, sharp):
    tmp, _, _ = run
    acc_line = 'layer { name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy" }'
    with_acc = ev.evaluate(tmp / "tiny" / "tiny_ed.prototxt", sharp)
    res = ev.evaluate(_net_copy(tmp, "noacc.prototxt", (acc_line, "")), sharp)
    assert "accuracy" not in res["outputs"] and "top-1 of 'ip2'" in res["accuracy_from"]
    assert res["accuracy"] == pytest.approx(with_acc["accuracy"], abs=1e-6)
    assert res["loss"] == with_acc["loss"] and res["confusion"] == with_acc["confusion"]
    neither = _net_copy(tmp, "neither.prototxt", (acc_line, ""),
                        ('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }', ""))
    with pytest.raises(ValueError) as info:
        ev.evaluate(neither, sharp)
    assert str(info.value) == (f"{neither}: the TEST net has neither an Accuracy nor a SoftmaxWithLoss layer, so no "
                               "blob holds class scores next to a label; add one, e.g. layer { name: \"accuracy\" "
                               "type: \"Accuracy\" bottom: \"<scores>\" bottom: \"label\" top: \"accuracy\" }")


def test_weights_errors_name_the_file_layer_and_shapes(run, tmp_path, capsys):
    tmp, solver, _ = run
    missing = tmp_path / "none.caffemodel"
    with pytest.raises(FileNotFoundError, match=r"--weights .*none\.caffemodel: no such file"):
        ev.evaluate(solver, missing)
    assert main(["test", str(solver), "--weights", str(missing)]) == 1
    assert "none.caffemodel" in capsys.readouterr().err
    wide = _net_copy(tmp, "wide.prototxt", ("num_output: 3", "num_output: 4"))
    torch.manual_seed(0)
    misfit = tmp_path / "wide.caffemodel"
    save_weights(Net(cio.read_net_prototxt(wide), TRAIN, "cpu", "wide"), misfit)
    with pytest.raises(ValueError, match=r"do not fit the net .*layer 'ip2' blob 0 has shape \(4, 16\), "
                                         r"the net expects \(3, 16\)"):
        ev.evaluate(solver, misfit)


def test_a_deploy_net_and_bad_counts_are_refused(run, tmp_path):
    tmp, solver, out = run
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 '
                      'dim: 8 } } }\nlayer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                      'inner_product_param { num_output: 3 } }\n')
    with pytest.raises(ValueError, match=r"layer 'data' is an Input \(a deploy net\)"):
        ev.evaluate(deploy, _snap(out, MAX_ITER))
    legacy = tmp_path / "legacy_deploy.prototxt"   # the old deploy form: net-level input fields
    legacy.write_text('input: "data"\ninput_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n' + deploy.read_text().split("\n", 1)[1])
    with pytest.raises(ValueError, match=r"^" + re.escape(f"{legacy}: its 'input' fields is an Input (a deploy net)")):
        ev.evaluate(legacy, _snap(out, MAX_ITER))
    with pytest.raises(ValueError, match="--iterations 0"):
        ev.evaluate(solver, _snap(out, MAX_ITER), iterations=0)


def test_progress_is_a_bar_that_clears_its_line(run, sharp, capsys):
    tmp, _, _ = run
    ev.evaluate(tmp / "tiny" / "tiny_ed.prototxt", sharp, progress=True)
    err = capsys.readouterr().err
    assert "test: " in err and "batch" in err and "\n" not in err and err.endswith("\r")


def test_test_time_mirrors_are_seeded_and_leave_torchs_generator_alone(run, sharp):
    tmp, _, _ = run
    net = _net_copy(tmp, "mirror.prototxt", ("include { phase: TEST }\n  transform_param { scale: 0.00390625 }",
                                             "include { phase: TEST }\n  transform_param { scale: 0.00390625 "
                                             "mirror: true }"))
    state = torch.get_rng_state()
    a, b = ev.evaluate(net, sharp), ev.evaluate(net, sharp)
    assert torch.equal(state, torch.get_rng_state())
    assert a["loss"] == b["loss"] and a["confusion"] == b["confusion"]
    assert a["loss"] != ev.evaluate(tmp / "tiny" / "tiny_ed.prototxt", sharp)["loss"]   # it does flip
    tn = ev.load_test_net(net)
    assert ev.engine_test_net(tn, sharp).source == tn.source == str(net)   # its errors name the file


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_test_net_on_cuda_leaves_the_gpus_generator_alone(run, sharp):
    tmp, _, _ = run
    tn = ev.load_test_net(tmp / "tiny" / "tiny_ed.prototxt")
    torch.cuda.manual_seed(12345)
    state = torch.cuda.get_rng_state()
    ev.engine_test_net(tn, sharp, "cuda")
    assert torch.equal(state, torch.cuda.get_rng_state())


# ---------------------------------------------------------------------- the report
def test_confusion_figure_normalises_rows_and_drops_cell_text_from_100_classes():
    cm = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    fig = ev.confusion_figure(cm, ["cat", "dog", "emu"], "t")
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    assert np.allclose(shown, [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0.25, 0.5]])
    assert sorted(t.get_text() for t in ax.texts) == ["0.25", "0.25", "0.25", "0.50", "0.75"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "emu"]
    # up to 10 classes, names of up to 4 letters lie flat; a longer name turns them upright
    for names, angle in ((["frog", "deer", "bird"], 0.0), (["frogs", "deer", "bird"], 90.0)):
        flat = ev.confusion_figure(cm, names, "t").axes[0]
        assert {t.get_rotation() for t in flat.get_xticklabels()} == {angle}
    big = ev.confusion_figure(np.eye(120, dtype=int) * 3 + 1, None, "t")
    assert len(big.axes[0].texts) == 0 and np.allclose(big.axes[0].images[0].get_array().sum(1), 1.0)
    assert len(ev.confusion_figure(np.eye(99, dtype=int), None, "t").axes[0].texts) == 99
    from exdrop.run.plot import _pyplot
    _pyplot().close("all")


def test_default_out_is_beside_the_snapshots_folder(tmp_path):
    assert ev.default_out("models/r/snapshots/cnn2_ed_iter_5.caffemodel") == Path("models/r/test_cnn2_ed_iter_5")
    assert ev.default_out("w/model.caffemodel.h5") == Path("w/test_model")


def test_every_option_of_exdrop_test_has_help():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices["test"]._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help and action.help.strip(), action.option_strings or action.dest


# ---------------------------------------------------------------------- real Caffe
def test_caffe_backend_gives_the_engines_numbers(run, sharp):
    require_pycaffe("exdrop test --backend caffe")
    tmp, solver, out = run
    for args in ((solver, _snap(out, MAX_ITER)), (tmp / "tiny" / "tiny_ed.prototxt", sharp),
                 (_net_copy(tmp, "b4c.prototxt", ("batch_size: 3", "batch_size: 4")), sharp)):
        engine = ev.evaluate(*args)
        caffe = ev.evaluate(*args, backend="caffe")
        assert caffe["backend"] == "caffe" and caffe["images"] == engine["images"]
        assert caffe["accuracy"] == pytest.approx(engine["accuracy"], abs=1e-6)
        assert caffe["confusion"] == engine["confusion"]
        assert caffe["loss"] == pytest.approx(engine["loss"], rel=1e-5)
    # one batch, its progress shown
    engine = ev.evaluate(solver, _snap(out, MAX_ITER), iterations=1)
    caffe = ev.evaluate(solver, _snap(out, MAX_ITER), iterations=1, backend="caffe", progress=True)
    assert caffe["iterations"] == engine["iterations"] == 1 and caffe["images"] == engine["images"]
    assert caffe["accuracy"] == pytest.approx(engine["accuracy"], abs=1e-6)
    assert caffe["loss"] == pytest.approx(engine["loss"], rel=1e-5)
    # a run trained by real Caffe: its own logged numbers, from its own snapshot, in Caffe and in the engine
    caffe_run = tmp / "caffe_run"
    assert main(["train", str(solver), "--backend", "caffe", "--out", str(caffe_run), "--max-iter", "10",
                 "--test-interval", "5", "--seed", "5", "--device", "cpu", "--quiet"]) == 0
    logged = json.loads((caffe_run / "results.json").read_text())
    res = ev.evaluate(solver, _snap(caffe_run, 10), backend="caffe")
    assert res["accuracy"] == logged["test_accuracy"] and res["loss"] == logged["test_loss"]
    engine = ev.evaluate(solver, _snap(caffe_run, 10))
    assert engine["accuracy"] == pytest.approx(res["accuracy"], abs=1e-6)
    assert engine["loss"] == pytest.approx(res["loss"], rel=1e-5)
    wide = _net_copy(tmp, "widec.prototxt", ("num_output: 3", "num_output: 4"))
    torch.manual_seed(0)
    save_weights(Net(cio.read_net_prototxt(wide), TRAIN, "cpu", "wide"), tmp / "widec.caffemodel")
    with pytest.raises(ValueError, match=r"layer 'ip2' blob 0 has shape \(4, 16\)"):   # not Caffe's abort
        ev.evaluate(solver, tmp / "widec.caffemodel", backend="caffe")


def test_set_data_source_turns_an_image_list_into_a_datum_lmdb_source():
    from exdrop.proto import caffe_pb2
    lp = caffe_pb2.LayerParameter(name="data", type="ImageData")
    lp.image_data_param.source = "list.txt"
    lp.image_data_param.batch_size = 7
    lp.transform_param.mean_value.append(104.0)
    ev.set_data_source(lp, "/tmp/db")
    assert lp.type == "Data" and not lp.HasField("image_data_param")
    assert lp.data_param.batch_size == 7 and lp.data_param.source == "/tmp/db"
    assert lp.data_param.backend == caffe_pb2.DataParameter.LMDB and list(lp.transform_param.mean_value) == [104.0]
    data = caffe_pb2.LayerParameter(name="data", type="Data")
    data.data_param.batch_size = 5
    data.data_param.source = "old"
    ev.set_data_source(data, "/tmp/db2")
    assert data.type == "Data" and data.data_param.batch_size == 5 and data.data_param.source == "/tmp/db2"


def test_format_table_of_many_classes_shows_the_lowest_and_the_highest():
    accs = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.05, 0.95, 0.15]
    names = [f"c{i}" for i in range(len(accs))]
    result = {"net": "n", "weights": "w", "data": "d", "images": 120, "iterations": 2, "batch_size": 60,
              "reading": "once", "accuracy": 0.5, "loss": 1.0, "backend": "engine", "device": "cpu",
              "classes": names, "per_class_images": [10] * len(accs), "per_class_accuracy": accs}
    lines = ev.format_table(result, max_rows=8).splitlines()
    rows = lines[lines.index("  class  images  accuracy") + 1:]
    assert [r.split()[0] for r in rows] == ["c9", "c1", "...", "c2", "c10"]   # 2 lowest, 2 highest, in order
    assert rows[0] == "  c9         10  0.0500"


@pytest.mark.parametrize("k, named", [(40, True), (41, False)])
def test_confusion_figure_labels_every_class_up_to_40(k, named):
    fig = ev.confusion_figure(np.eye(k) * 3 + 1, classes=[f"class{i}" for i in range(k)])
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert (labels == [f"class{i}" for i in range(k)]) is named   # above 40: matplotlib's numeric ticks
    assert len(ax.texts) == k * k   # every non-zero cell has its fraction, centred on the cell
    assert {(t.get_ha(), t.get_va()) for t in ax.texts} == {("center", "center")}
    import matplotlib.pyplot as plt
    plt.close(fig)
