"""`--weights` that loads nothing, or loads blobs in the wrong layout: refused, naming the file, the
layer and the blob; a partial load says which layers keep their fillers even under --quiet."""
import re

import numpy as np
import pytest
import torch

from caffe_nets import require_pycaffe, train_tiny
from exdrop.cli import main as exdrop_main
from exdrop.proto import io as cio


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny solver and the weights of a 1-iteration run (every learnable layer, V2)."""
    run = train_tiny(tmp_path_factory.mktemp("weights"), 1)
    return run.parent / "solver.prototxt", run / "snapshots" / "tiny_ed_iter_1.caffemodel"


def _train(solver, weights, out, *extra):
    return exdrop_main(["train", str(solver), "--out", str(out), "--max-iter", "1", "--device", "cpu", "--quiet",
                        "--weights", str(weights), *extra])


def test_an_empty_caffemodel_loads_nothing_and_is_refused(tiny, tmp_path, capsys):
    solver, _ = tiny
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    assert _train(solver, empty, tmp_path / "r") == 1
    err = capsys.readouterr().err
    assert f"{empty}: --weights loaded no layer of the net" in err and "conv1, ip1, ip2" in err


@pytest.mark.parametrize("backend", ["engine", "caffe"])
def test_a_caffemodel_with_other_layer_names_is_refused(tiny, tmp_path, capsys, backend):
    """Real Caffe's copy_from would start from the fillers without a word: refused before it, on
    either backend, naming the net's learnable layers and the file's."""
    if backend == "caffe":
        require_pycaffe("exdrop train --backend caffe --weights")
    solver, weights = tiny
    param = cio.read_caffemodel(weights)
    for lp in param.layer:
        lp.name = "other_" + lp.name
    renamed = tmp_path / "renamed.caffemodel"
    cio.write_caffemodel(param, renamed)
    assert _train(solver, renamed, tmp_path / "r", "--backend", backend) == 1
    err = capsys.readouterr().err
    if backend == "engine":
        assert "names none of them" in err and "other_ip1" not in err.split("learnable layers are")[1].split(",")[0]
    else:
        assert (f"{renamed}: --weights loaded no layer of the net (caffemodel; the net's learnable layers are conv1, "
                "ip1, ip2, the file names other_conv1, other_ip1, other_ip2): training would start from the "
                "fillers") in err


def test_a_strict_load_names_the_layer_the_file_lacks(tiny, tmp_path):
    """`exdrop test` and the analysis load every learnable layer (strict_missing): a file without one
    is an error naming the file and that layer."""
    from exdrop.engine.net import Net
    from exdrop.engine.pylayer import TEST
    from exdrop.engine.snapshot import load_weights
    solver, weights = tiny
    param = cio.read_caffemodel(weights)
    kept = [lp for lp in param.layer if lp.name != "ip2"]
    del param.layer[:]
    param.layer.extend(kept)
    partial = tmp_path / "no_ip2.caffemodel"
    cio.write_caffemodel(param, partial)
    net_param = cio.read_net_prototxt(solver.parent / cio.read_solver_prototxt(solver).net)
    net = Net(net_param, TEST, "cpu", "tiny")
    with pytest.raises(ValueError, match=f"^{re.escape(str(partial))}: has no layer 'ip2'$"):
        load_weights(net, partial, strict_missing=True)
    assert "ip1" in load_weights(net, partial)   # not strict: the layers it has


def test_a_pth_whose_shapes_all_differ_is_refused(tiny, tmp_path, capsys):
    solver, _ = tiny
    net = tmp_path / "with_mean.prototxt"   # a torchvision file needs the prototxt's mean to convert conv1
    net.write_text((solver.parent / "tiny_ed.prototxt").read_text().replace(
        "transform_param { scale: 0.00390625 }", "transform_param { scale: 0.00390625 mean_value: 104 }"))
    pth = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(5, 3, 3, 3), "classifier.0.weight": torch.zeros(7, 9),
                "classifier.1.weight": torch.zeros(2, 7)}, pth)
    assert _train(solver, pth, tmp_path / "r", "--net", str(net)) == 1
    err = capsys.readouterr().err
    assert err == (f"exdrop: error: {pth}: --weights loaded no layer of the net (torchvision state dict; shapes "
                   "differ: features.0.weight (5, 3, 3, 3) -> conv1 (4, 3, 3, 3); classifier.0.weight (7, 9) -> ip1 "
                   "(16, 144); classifier.1.weight (2, 7) -> ip2 (3, 16)): training would start from the fillers\n")


def test_a_partial_load_is_shown_under_quiet(tiny, tmp_path, capsys):
    solver, weights = tiny
    param = cio.read_caffemodel(weights)
    keep = [lp for lp in param.layer if lp.name == "ip2"]
    del param.layer[:]
    param.layer.extend(keep)
    part = tmp_path / "ip2_only.caffemodel"
    cio.write_caffemodel(param, part)
    assert _train(solver, part, tmp_path / "r") == 0
    err = capsys.readouterr().err
    assert "weights: 1 layers from" in err and "from their fillers: conv1, ip1" in err


def _legacy(param, name, dims):
    blob = next(lp for lp in param.layer if lp.name == name).blobs[0]
    values = np.asarray(blob.data, np.float32)
    blob.ClearField("shape")
    blob.num, blob.channels, blob.height, blob.width = dims
    return values


def test_legacy_4d_blobs_are_checked_as_caffe_does(tiny, tmp_path, capsys):
    """A (3, 16) InnerProduct weight is 1/1/3/16 in the legacy layout; 1/1/16/3 (the same 48 values)
    is refused, naming the layer and the blob, as Caffe's ShapeEquals refuses it."""
    solver, weights = tiny
    param = cio.read_caffemodel(weights)
    values = _legacy(param, "ip2", (1, 1, 16, 3))
    wrong = tmp_path / "transposed.caffemodel"
    cio.write_caffemodel(param, wrong)
    assert _train(solver, wrong, tmp_path / "r") == 1
    err = capsys.readouterr().err
    assert f"{wrong}: layer 'ip2' blob 0 has shape 1/1/16/3 (legacy num/channels/height/width), the net expects (3, 16)" in err
    _legacy(param, "ip2", (1, 1, 3, 16))
    right = tmp_path / "legacy.caffemodel"
    cio.write_caffemodel(param, right)
    assert _train(solver, right, tmp_path / "r2") == 0
    capsys.readouterr()
    from exdrop.run.init_weights import iteration0_weights
    with iteration0_weights(tmp_path / "r2") as path:   # drawn again: fillers, then the --weights file
        init = cio.read_caffemodel(path)
    loaded = next(lp for lp in init.layer if lp.name == "ip2").blobs[0]
    np.testing.assert_array_equal(np.asarray(loaded.data, np.float32), values)
