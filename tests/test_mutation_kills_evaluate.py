"""Contracts of `exdrop test` (exdrop/analysis/evaluate.py) and the sweep summary
(exdrop/experiments/sweep.py) that mutants of the source used to survive: a label outside the
net's classes is refused by name, the count of scored images next to the images read, UCF101's
video accuracy as the per-video mean of frame softmaxes, a final test row without a loss, and a
run's iteration count taken from its results.json. Each test is small (tiny nets and data)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import exdrop.analysis.evaluate as ev
from exdrop.experiments import sweep as S
from exdrop.proto import io as cio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import write_tiny  # noqa: E402
from test_sweep import _plan_of  # noqa: E402
import golden  # noqa: E402


def _tiny_with_weights(tmp: Path) -> tuple[Path, Path, Path]:
    """write_tiny's net and LMDBs (6 validation images, 2 per class a, b, c) in ``tmp`` with seeded
    random weights: (folder, net prototxt, weights)."""
    from exdrop.engine.net import Net
    from exdrop.engine.pylayer import TRAIN
    from exdrop.engine.snapshot import save_weights
    write_tiny(tmp / "tiny")
    net = tmp / "tiny" / "tiny_ed.prototxt"
    torch.manual_seed(0)
    weights = tmp / "w.caffemodel"
    save_weights(Net(cio.read_net_prototxt(net), TRAIN, "cpu", "tiny"), weights)
    return tmp, net, weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_with_weights(tmp_path_factory.mktemp("eval_kills"))


# ---------------------------------------------------------------------- labels and scored images
@pytest.mark.parametrize("bad", [3, -1])
def test_a_label_outside_the_nets_classes_is_refused_by_name(tiny, monkeypatch, bad):
    """A backend that hands back a label >= the number of classes (3 here) or < 0 (real Caffe's
    layers do not check): `exdrop test` refuses it with the label and the class count named,
    instead of a confusion matrix of the wrong shape or numpy's bincount error."""
    _, net, weights = tiny

    def fake_engine(tn, lp, score, w, sizes, device, progress):
        n = sum(sizes)
        probs = np.full((n, 3), 1 / 3, dtype=np.float32)
        labels = np.array([0, 1, 2, 0, 1, bad][:n], dtype=np.int64)
        return {"accuracy": 0.5, "loss": 1.0}, {"loss": 1.0}, probs, labels, 3, "cpu"
    monkeypatch.setattr(ev, "_run_engine", fake_engine)
    with pytest.raises(ValueError, match=rf"label {bad} is outside the 3 classes of 'ip2'"):
        ev.evaluate(net, weights)


def test_scored_images_leave_out_the_ignored_label(tiny):
    """With the Accuracy and loss layers' ignore_label 2, the 2 images of class c are read but not
    scored: the result counts 6 images and 4 scored images, and the confusion holds those 4."""
    tmp, net, weights = tiny
    text = net.read_text()
    for old, new in (('top: "accuracy" }', 'top: "accuracy" accuracy_param { ignore_label: 2 } }'),
                     ('top: "loss" }', 'top: "loss" loss_param { ignore_label: 2 } }')):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    ignoring = tmp / "ignore2.prototxt"
    ignoring.write_text(text)
    res = ev.evaluate(ignoring, weights)
    assert res["images"] == 6 and res["each_image_once"] is True
    assert res["scored_images"] == 4
    assert np.array(res["confusion"]).sum() == 4 and res["per_class_images"] == [2, 2, 0]


def test_a_test_videos_list_beside_the_lmdb_adds_the_video_accuracy(tmp_path):
    """`exdrop test` of an LMDB with test_videos.json beside it (as `make data-ucf101` writes): the
    videos' accuracy from the evaluated labels; one frame per video, it is the frames' accuracy."""
    from exdrop.data.lmdb_datum import DatumLMDB
    _, net, weights = _tiny_with_weights(tmp_path)   # its own copy: the list is written beside the LMDB
    val = Path(ev._layer_source(ev._test_data_layer(ev.load_test_net(net))))
    _, labels = DatumLMDB(val).read_all()
    (val.parent / "test_videos.json").write_text(json.dumps(
        {"videos": [{"frames": 1, "label": int(y)} for y in labels]}))
    res = ev.evaluate(net, weights)
    assert res["videos"] == len(labels) == res["images"] and res["video_accuracy"] == pytest.approx(res["accuracy"])


def test_result_names_its_blobs_and_times_the_pass_to_milliseconds(tiny):
    tmp, net, weights = tiny
    res = ev.evaluate(net, weights)
    assert (res["scores_blob"], res["label_blob"]) == ("ip2", "label")
    assert isinstance(res["seconds"], float) and 0 < res["seconds"] == round(res["seconds"], 3)


@pytest.mark.parametrize("iterations", [None, 3])
def test_result_whole_against_its_golden_copy(tiny, iterations):
    """Every field of `exdrop test`'s result for the tiny net (each image once; then 3 batches of 3,
    wrapping around as Caffe does), numbers within 1e-4."""
    tmp, net, weights = tiny
    res = ev.evaluate(net, weights, iterations=iterations)
    assert res["seconds"] > 0
    res = json.loads(json.dumps({**res, "seconds": None}).replace(str(tmp), "<tmp>"))
    golden.check_close(f"evaluate_tiny_iterations_{iterations}.json", res)


def test_an_accuracy_layer_scoring_along_another_axis_and_two_test_data_layers_are_refused(tiny):
    tmp, net, weights = tiny
    text = net.read_text()
    assert text.count('top: "accuracy" }') == 1
    other_axis = tmp / "axis2.prototxt"
    other_axis.write_text(text.replace('top: "accuracy" }', 'top: "accuracy" accuracy_param { axis: 2 } }'))
    with pytest.raises(ValueError, match=r"axis2.prototxt: layer 'accuracy' scores along axis 2; exdrop test scores "
                                         r"one class vector per image \(axis 1\)$"):
        ev.evaluate(other_axis, weights)
    from google.protobuf import text_format
    loss_only = cio.read_net_prototxt(net)   # no Accuracy layer: the loss's softmax axis is the one read
    kept = [lp for lp in loss_only.layer if lp.type != "Accuracy"]
    del loss_only.layer[:]
    loss_only.layer.extend(kept)
    next(lp for lp in loss_only.layer if lp.type == "SoftmaxWithLoss").softmax_param.axis = 2
    (tmp / "loss_axis2.prototxt").write_text(text_format.MessageToString(loss_only))
    with pytest.raises(ValueError, match=r"loss_axis2.prototxt: layer 'loss' scores along axis 2"):
        ev.evaluate(tmp / "loss_axis2.prototxt", weights)
    param = cio.read_net_prototxt(net)
    test_data = next(lp for lp in param.layer if lp.type == "Data" and lp.include and lp.include[0].phase == 1)
    second = param.layer.add()
    second.CopyFrom(test_data)
    second.name = "data2"
    del second.top[:]
    second.top.extend(["data2", "label2"])
    two = tmp / "two_data.prototxt"
    two.write_text(text_format.MessageToString(param))
    with pytest.raises(ValueError, match=r"two_data.prototxt: the TEST phase has 2 data layers \('data', 'data2'\); "
                                         r"exdrop test evaluates nets with one$"):
        ev.evaluate(two, weights)


def test_class_names_are_taken_only_when_there_is_one_per_class(tmp_path):
    lmdb = tmp_path / "test_lmdb"
    for classes, names, want in ((3, ["a", "b", "c"], ["a", "b", "c"]), (3, ["a", "b"], None), (3, [1, 2, 3], ["1", "2", "3"]),
                                 (2, {"a": 0, "b": 1}, None), (2, "ab", None)):
        (tmp_path / "meta.json").write_text(json.dumps({"classes": names}))
        assert ev._class_names(lmdb, classes) == want, names


# ---------------------------------------------------------------------- UCF101's video accuracy
def test_video_accuracy_averages_each_videos_frame_softmaxes(tmp_path):
    """Three videos of 1, 3 and 2 frames (labels 0, 1, 2) listed in test_videos.json beside the LMDB:
    each video's frame softmaxes are averaged and the mean's argmax scored. By hand: video 0 mean
    [.9 .05 .05] -> 0 right; video 1 mean [.267 .733 0] -> 1 right; video 2 mean [.6 0 .4] -> 0
    wrong: 2/3, while the frames score 3/6 and the argmax of all frames together (class 0) would
    give 1/3."""
    lmdb = tmp_path / "test_lmdb"
    lmdb.mkdir()
    videos = [{"frames": 1, "label": 0}, {"frames": 3, "label": 1}, {"frames": 2, "label": 2}]
    (tmp_path / "test_videos.json").write_text(json.dumps({"videos": videos}))
    probs = np.array([[0.9, 0.05, 0.05],
                      [0.1, 0.9, 0.0], [0.1, 0.9, 0.0], [0.6, 0.4, 0.0],
                      [0.6, 0.0, 0.4], [0.6, 0.0, 0.4]], dtype=np.float32)
    labels = np.array([0, 1, 1, 1, 2, 2])
    assert (probs.argmax(1) == labels).mean() == 0.5   # the frame accuracy differs from the video one
    res = ev.video_accuracy(lmdb, probs, labels, True)
    assert res == {"video_accuracy": pytest.approx(2 / 3), "videos": 3}
    # frames of another split or order: refused, naming the list
    with pytest.raises(ValueError) as info:
        ev.video_accuracy(lmdb, probs, np.array([0, 1, 1, 1, 1, 2]), True)
    assert str(info.value) == (f"{tmp_path / 'test_videos.json'}: the videos' labels do not match the LMDB's "
                               "frames (another split or order?)")


# ---------------------------------------------------------------------- the sweep summary
def test_sweep_summary_has_results_iterations_and_no_loss_for_an_empty_loss_cell(tmp_path):
    """A run whose last test row logs an empty loss ("") has loss None in the summary (not a crash on
    float("")), its accuracy still from that row; each run's "iterations" is results.json's."""
    _plan_of(tmp_path, {("ed", 1): ([0.7], [(2, 0.40, 1.3), (4, 0.55, "")])})
    assert S._final_test(tmp_path / "cifar10" / "ed" / "seed1") == (0.55, None, [(2, 0.40), (4, 0.55)])
    cells = S.collect(tmp_path)["cells"]
    (run,) = cells[0]["runs"]
    assert run["loss"] is None and run["accuracy"] == 0.55
    assert run["iterations"] == 4   # _plan_of's results.json: {"iterations": 4, "max_iter": 4}


# ---------------------------------------------------------------------- seed-2 sample survivors
def _result(**over):
    result = {"net": "n.prototxt", "weights": "w_iter_8.caffemodel", "data": "data/ucf101", "data_split": "test_lmdb",
              "images": 9, "iterations": 3, "batch_size": 3, "reading": "each image once", "accuracy": 2 / 3,
              "loss": 0.87654, "backend": "engine", "device": "cpu", "video_accuracy": 0.5, "videos": 2,
              "classes": ["walk", "run", "jump"], "per_class_images": [3, 3, 3],
              "per_class_accuracy": [1.0, 1 / 3, None], "num_classes": 3, "confusion": [[3, 0, 0], [1, 1, 1], [0, 0, 0]]}
    return {**result, **over}


def test_format_table_prints_every_field_it_is_given():
    lines = ev.format_table(_result()).splitlines()
    assert lines == ["net:      n.prototxt", "weights:  w_iter_8.caffemodel",
                     "data:     data/ucf101 (test_lmdb): 9 images (3 batches of 3; each image once)",
                     "accuracy: 0.6667   loss: 0.8765   [engine, cpu]",
                     "video accuracy: 0.5000 over 2 videos (each video's frame softmax averaged)",
                     "  class  images  accuracy", "  walk        3  1.0000", "  run         3  0.3333",
                     "  jump        3  -"]
    bare = ev.format_table(_result(loss=None, video_accuracy=None, data_split=None, classes=None)).splitlines()
    assert bare[2] == "data:     data/ucf101: 9 images (3 batches of 3; each image once)"
    assert bare[3] == "accuracy: 0.6667   loss: n/a   [engine, cpu]"
    assert not any(line.startswith("video accuracy") for line in bare) and bare[5] == "  0           3  1.0000"


def test_write_report_writes_again_into_its_folder_with_the_class_names(tmp_path, monkeypatch):
    seen = []
    real = ev.confusion_figure
    monkeypatch.setattr(ev, "confusion_figure", lambda c, classes, title: seen.append((classes, title)) or real(c, classes, title))
    for _ in range(2):   # a second test of the same snapshot replaces the first report
        paths = ev.write_report(_result(), tmp_path / "final_test")
    assert json.loads(paths["json"].read_text())["accuracy"] == pytest.approx(2 / 3) and paths["png"].is_file()
    assert seen[-1] == (["walk", "run", "jump"], "w_iter_8.caffemodel on ucf101: accuracy 0.6667, 9 images")


def test_resolve_data_names_what_it_was_given(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes.txt: a file, not a converted LMDB or dataset folder"):
        ev.resolve_data(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match=r": a folder without data.mdb, test_lmdb/ or val_lmdb/, not a converted"):
        ev.resolve_data(tmp_path)


@pytest.mark.parametrize("device, allowed", [(None, True), ("", True), ("auto", True), ("cpu", True),
                                             ("cuda", False), ("cuda:0", False)])
def test_caffe_backend_takes_only_cpu_devices(monkeypatch, device, allowed):
    class Reached(Exception):
        pass

    def load_caffe():
        raise Reached

    monkeypatch.setattr(ev, "load_caffe", load_caffe)
    with pytest.raises(Reached if allowed else ValueError, match=None if allowed else "runs on CPU only"):
        ev._run_caffe(None, None, None, None, [], device, False)


def test_standout_keep_probability_defaults_to_sigmoid_of_z():
    from exdrop.engine import functional as Fx
    z = torch.linspace(-3, 3, 7)
    torch.testing.assert_close(Fx.standout_keep_probability(z), torch.sigmoid(z))
    torch.testing.assert_close(Fx.standout_keep_probability(z, 2.0, -1.0), torch.sigmoid(2 * z - 1))


def test_confusion_figure_writes_dark_cells_in_white():
    fig = ev.confusion_figure(np.array([[9, 1], [4, 6]]), ["a", "b"], "t")
    colours = {t.get_text(): t.get_color() for t in fig.axes[0].texts}
    assert colours == {"0.90": "white", "0.10": "black", "0.40": "black", "0.60": "white"}
    assert fig.axes[0].images[0].get_clim() == (0.0, 1.0)   # the colour scale is the fraction, 0 to 1


@pytest.mark.parametrize("test_iter, refused", [(0, True), (1, False)])
def test_a_solver_whose_test_iter_is_zero_is_refused(tiny, tmp_path, test_iter, refused):
    """`exdrop test SOLVER` reads test_iter batches; a solver with test_iter 0 would score no image."""
    _, net, weights = tiny
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{net}"\ntest_iter: {test_iter}\ntest_interval: 10\nbase_lr: 0.01\nlr_policy: "fixed"\n'
                      'max_iter: 10\n')
    if refused:
        with pytest.raises(ValueError, match=r"tiny_ed.prototxt \(test net of .*solver.prototxt\): the solver's "
                                             r"test_iter is 0; give --iterations"):
            ev.evaluate(solver, weights)
    else:
        assert ev.evaluate(solver, weights)["iterations"] == 1


def test_a_solver_without_test_nets_is_scored_on_its_net(tiny, tmp_path):
    """No test_iter: no test net, so `exdrop test` scores the solver's net in the TEST phase, and says so."""
    _, net, _ = tiny
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{net}"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 10\n')
    tn = ev.load_test_net(solver)
    assert tn.source == f"{net} (net of {solver})" and tn.test_iter is None


def test_load_test_net_says_what_a_file_is_not(tmp_path):
    empty = tmp_path / "empty.prototxt"
    empty.write_text("# nothing here\n")
    with pytest.raises(ValueError, match=r"empty.prototxt: a net prototxt without layers$"):
        ev.load_test_net(empty)
    garbage = tmp_path / "garbage.prototxt"
    garbage.write_text("this is { not a prototxt\n")
    with pytest.raises(ValueError, match=r"garbage.prototxt: neither a net nor a solver prototxt \(as a net: .+; "
                                         r"as a solver: .+\)"):
        ev.load_test_net(garbage)
