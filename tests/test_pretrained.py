"""Pretrained weights: the first-convolution conversion between torchvision's input convention and
a prototxt's (exact inside the image, measured at the border), and a Model-Zoo-format VGG16
(.caffemodel V1, the real layer names and shapes, generated) against a torchvision-style .pth of
the same weights: the same logits within the stated tolerance."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exdrop.proto import io as cio
from exdrop.experiments.bench import with_input_layer
from exdrop.engine.net import Net
from exdrop.engine.pretrained import (TORCHVISION_MEAN, TORCHVISION_STD, caffe_to_torch_conv1, input_transform,
                                      load_pretrained, torch_to_caffe_conv1)
from exdrop.proto import caffe_pb2
from exdrop.engine.pylayer import TEST

ROOT = Path(__file__).resolve().parents[1]
VGG16 = ROOT / "prototxt/vgg16/ucf101/train_val_none.prototxt"
VGG_MEAN = {"mean_bgr": (103.939, 116.779, 123.68), "scale": 1.0}


def _inputs(pixels_rgb: torch.Tensor, transform):
    """(torchvision input, prototxt input) of the same RGB 0..255 pixels."""
    mean_t = torch.tensor(TORCHVISION_MEAN).view(1, 3, 1, 1)
    std_t = torch.tensor(TORCHVISION_STD).view(1, 3, 1, 1)
    x_t = (pixels_rgb / 255 - mean_t) / std_t
    x_c = (pixels_rgb.flip(1) - torch.tensor(transform["mean_bgr"]).view(1, 3, 1, 1)) * transform["scale"]
    return x_t, x_c


@pytest.mark.parametrize("transform", [VGG_MEAN, {"mean_bgr": (104.0, 117.0, 123.0), "scale": 0.017}])
def test_conv1_conversion_is_exact_inside_the_image(transform):
    g = torch.Generator().manual_seed(0)
    w_t, b_t = torch.randn(8, 3, 3, 3, generator=g), torch.randn(8, generator=g)
    w_c, b_c = torch_to_caffe_conv1(w_t, b_t, transform)
    back = caffe_to_torch_conv1(w_c, b_c, transform)
    torch.testing.assert_close(back[0], w_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back[1], b_t, rtol=1e-5, atol=1e-4)
    pixels = torch.randint(0, 256, (2, 3, 12, 12), generator=g).float()
    x_t, x_c = _inputs(pixels, transform)
    y_t = F.conv2d(x_t.double(), w_t.double(), b_t.double(), padding=1)
    y_c = F.conv2d(x_c.double(), w_c.double(), b_c.double(), padding=1)
    torch.testing.assert_close(y_c[..., 1:-1, 1:-1], y_t[..., 1:-1, 1:-1], rtol=1e-5, atol=1e-4)
    assert (y_c[..., 0, :] - y_t[..., 0, :]).abs().max() > 1e-3     # the padding differs: the border does not agree


def test_conv1_conversion_is_float64_to_the_last_bit():
    """mean / 255 - torchvision's mean nearly cancels, so the conversion runs in float64: the bias is
    the float64 value rounded once (a float32 Model Zoo mean would move it by up to ~1e-6)."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(256, 3, 3, 3, generator=g) * 0.05, torch.randn(256, generator=g) * 0.1
    transform = VGG_MEAN
    w64 = w.numpy().astype(np.float64)[:, ::-1] * (255 * np.array(TORCHVISION_STD)).reshape(1, 3, 1, 1)
    offset = (np.array(transform["mean_bgr"][::-1]) / 255 - np.array(TORCHVISION_MEAN)) / np.array(TORCHVISION_STD)
    b64 = b.numpy().astype(np.float64) - (w64.sum(axis=(2, 3)) * offset).sum(1)
    w_t, b_t = caffe_to_torch_conv1(w, b, transform)
    np.testing.assert_allclose(w_t.numpy(), w64, rtol=1e-7)
    np.testing.assert_allclose(b_t.numpy(), b64, rtol=1e-7, atol=1e-9)


def _vgg16_v1(path: Path, names_shapes, seed=0) -> dict:
    """A V1 (Model Zoo format) caffemodel with the given layers: legacy 4-d dims, He-scaled random
    weights, small biases; returns the arrays."""
    rng = np.random.default_rng(seed)
    net = caffe_pb2.NetParameter(name="VGG_ILSVRC_16_layers")
    arrays = {}
    for name, shape in names_shapes:
        lp = net.layers.add()
        lp.name = name
        fan_in = int(np.prod(shape[1:]))
        w = (rng.standard_normal(shape, dtype=np.float32) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (rng.standard_normal(shape[0], dtype=np.float32) * 0.01).astype(np.float32)
        arrays[name] = (w, b)
        dims = shape if len(shape) == 4 else (1, 1, *shape)
        for arr, legacy in ((w, dims), (b, (1, 1, 1, shape[0]))):
            blob = lp.blobs.add()
            blob.num, blob.channels, blob.height, blob.width = legacy
            cio._set_data(blob, arr)
    cio.write_caffemodel(net, path)
    return arrays


def test_vgg16_model_zoo_caffemodel_and_pth_give_the_same_logits(tmp_path, capsys):
    param = cio.read_net_prototxt(VGG16)
    transform = input_transform(param)
    assert transform == {"mean_bgr": (pytest.approx(103.939), pytest.approx(116.779), pytest.approx(123.68)),
                         "scale": 1.0}
    test_param = with_input_layer(param, TEST, 1, (3, 224, 224))
    layers = [lp for lp in test_param.layer if lp.type in ("Convolution", "InnerProduct")]
    names_shapes = []
    for lp in layers:   # the Model Zoo's names: fc8 with ImageNet's 1000 classes, not the prototxt's fc8_ucf101
        if lp.type == "Convolution":
            names_shapes.append((lp.name, None))
        else:
            names_shapes.append(("fc8" if lp.name == "fc8_ucf101" else lp.name, None))
    probe = Net(test_param, TEST, torch.device("cpu"), str(VGG16))
    shapes = {layer.name: tuple(layer.blobs[0].shape) for layer in probe.layer_list if len(layer.blobs)}
    names_shapes = [(n, shapes.get(n, (1000, 4096))) for n, _ in names_shapes]
    assert [n for n, _ in names_shapes] == ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2",
                                            "conv3_3", "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2",
                                            "conv5_3", "fc6", "fc7", "fc8"]
    del probe
    t0 = time.perf_counter()
    caffemodel = tmp_path / "VGG16_zoo_format.caffemodel"
    arrays = _vgg16_v1(caffemodel, names_shapes)
    # the same weights as torchvision's vgg16 state dict: features.<i>, classifier.<0, 3, 6>, conv1 converted
    state, feature = {}, 0
    conv_index = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    for i, (name, _) in enumerate(names_shapes):
        w, b = (torch.from_numpy(a.reshape(a.shape)) for a in arrays[name])
        if i < 13:
            if i == 0:
                w, b = caffe_to_torch_conv1(w, b, transform)
            state[f"features.{conv_index[i]}.weight"], state[f"features.{conv_index[i]}.bias"] = w, b
        else:
            k = {13: 0, 14: 3, 15: 6}[i]
            state[f"classifier.{k}.weight"], state[f"classifier.{k}.bias"] = w, b
    pth = tmp_path / "vgg16_torchvision_format.pth"
    torch.save(state, pth)

    nets, reports = {}, {}
    for kind, path in (("caffemodel", caffemodel), ("pth", pth)):
        torch.manual_seed(7)     # the same filler for fc8_ucf101, which neither file has
        nets[kind] = Net(test_param, TEST, torch.device("cpu"), str(VGG16))
        reports[kind] = load_pretrained(nets[kind], path, transform)
    assert reports["caffemodel"]["kept_filler"] == reports["pth"]["kept_filler"] == ["fc8_ucf101"]
    assert reports["pth"]["skipped"] == ["classifier.6.weight (1000, 4096) -> fc8_ucf101 (101, 4096)"]
    pixels = torch.randint(0, 256, (1, 3, 224, 224), generator=torch.Generator().manual_seed(3)).float()
    x_t, x_c = _inputs(pixels, transform)
    feed = {"data": x_c, "label": torch.zeros(1)}
    with torch.no_grad():
        out = {kind: net(feed) for kind, net in nets.items()}
    # conv1: equal inside, different at the one-pixel border (the paddings differ)
    c1 = {k: o["conv1_1"] for k, o in out.items()}
    inner = (c1["caffemodel"][..., 1:-1, 1:-1] - c1["pth"][..., 1:-1, 1:-1]).abs().max().item()
    assert inner < 1e-3
    fc7 = {k: o["fc7"] for k, o in out.items()}
    logits = {k: o["fc8_ucf101"] for k, o in out.items()}
    rel_fc7 = ((fc7["caffemodel"] - fc7["pth"]).norm() / fc7["caffemodel"].norm()).item()
    rel = ((logits["caffemodel"] - logits["pth"]).norm() / logits["caffemodel"].norm()).item()
    with torch.no_grad():   # conv1_1 in torchvision's convention: the same inside, the padding at the border
        own_c1 = F.relu(F.conv2d(x_t, state["features.0.weight"], state["features.0.bias"], padding=1))
    diff = (c1["caffemodel"] - own_c1).abs()
    inside_own, border = diff[..., 1:-1, 1:-1].max().item(), diff.max().item()
    # the .pth run as torchvision runs it (its own input convention and zero padding), fc7 after its ReLU
    own = _torchvision_vgg16_fc7(state, x_t)
    rel_own = ((fc7["caffemodel"] - own).norm() / own.norm()).item()
    with capsys.disabled():
        print(f"\n[pretrained] VGG16 .caffemodel (V1) vs .pth: conv1_1 of the prototxt net vs torchvision's "
              f"convention: inside {inside_own:.2e}, at the border up to {border:.2e}; fc7 relative L2 difference {rel_fc7:.2e}; logits {rel:.2e}; fc7 against the .pth run in "
              f"torchvision's own convention {rel_own:.2e} "
              f"({time.perf_counter() - t0:.0f} s)")
    # the stated tolerance (README): the two ImageNet means differ by under 0.5 grey levels, so the border's
    # padding difference is small; float32 rounding of the converted conv1 adds ~1e-6
    assert rel < 1e-4 and rel_fc7 < 1e-4
    assert rel_own < 1e-3   # there the paddings differ: by under 0.5 grey levels (the two ImageNet means)
    assert logits["caffemodel"].argmax() == logits["pth"].argmax()


def _torchvision_vgg16_fc7(state, x):
    """torchvision's VGG16 forward (features, 7x7 pool, classifier up to fc7's ReLU) in plain torch."""
    convs = [k[:-len(".weight")] for k in state if k.startswith("features.") and k.endswith(".weight")]
    pools_after = {"features.2", "features.7", "features.14", "features.21", "features.28"}
    with torch.no_grad():
        for key in convs:
            x = F.relu(F.conv2d(x, state[key + ".weight"], state[key + ".bias"], padding=1))
            if key in pools_after:
                x = F.max_pool2d(x, 2, 2)
        x = F.adaptive_avg_pool2d(x, (7, 7)).flatten(1)
        x = F.relu(F.linear(x, state["classifier.0.weight"], state["classifier.0.bias"]))
        return F.relu(F.linear(x, state["classifier.3.weight"], state["classifier.3.bias"]))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")   # torch's note on the refused pickle
def test_pretrained_errors_name_the_file(tmp_path):
    param = cio.read_net_prototxt(ROOT / "prototxt/cnn2/cifar10/train_val_ed.prototxt")
    net = Net(with_input_layer(param, TEST, 1, (3, 32, 32)), TEST, torch.device("cpu"), "cnn2")
    with pytest.raises(FileNotFoundError, match="VGG_ILSVRC_16_layers.caffemodel: no such weights file; fetch http"):
        load_pretrained(net, tmp_path / "VGG_ILSVRC_16_layers.caffemodel")
    bad = tmp_path / "VGG_ILSVRC_16_layers.caffemodel"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="sha1 .* is not the Model Zoo file's"):
        load_pretrained(net, bad)
    import pickle
    evil = tmp_path / "evil.pth"

    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))
    evil.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="not a plain state dict of tensors"):
        load_pretrained(net, evil, input_transform(param))
    alexnet_like = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(4, 3, 3, 3)}, alexnet_like)
    with pytest.raises(ValueError, match="1 convolution weights, the net has 3 Convolution layers"):
        load_pretrained(net, alexnet_like, input_transform(param))
    as_pt = tmp_path / "other.pt"   # torch.save's other suffix: read as a state dict too, not a caffemodel
    torch.save({"features.0.weight": torch.zeros(4, 3, 3, 3)}, as_pt)
    with pytest.raises(ValueError, match="other.pt: 1 convolution weights, the net has 3 Convolution layers"):
        load_pretrained(net, as_pt, input_transform(param))
    three_convs = tmp_path / "three_convs.pth"
    torch.save({**{f"features.{i}.weight": torch.zeros(4, 3, 3, 3) for i in (0, 3, 6)},
                "classifier.0.weight": torch.zeros(10, 4)}, three_convs)
    with pytest.raises(ValueError, match=r"three_convs.pth: 1 linear weights, the net has 3 InnerProduct layers: not "
                                         r"the same architecture"):
        load_pretrained(net, three_convs, input_transform(param))
    no_mean = caffe_pb2.NetParameter(name="bare")
    no_mean.layer.add(name="data", type="Data")
    with pytest.raises(ValueError, match=r"^net 'bare': no data layer with 1 or 3 transform_param mean_value, which the "
                                         r"conversion of a torchvision first convolution needs \(a mean_file is not "
                                         r"supported\)$"):
        input_transform(no_mean)
    one_mean = caffe_pb2.NetParameter(name="gray")
    data = one_mean.layer.add(name="data", type="ImageData")
    data.transform_param.mean_value.append(117.0)   # one value: every channel's
    data.transform_param.scale = 0.5
    assert input_transform(one_mean) == {"mean_bgr": (117.0, 117.0, 117.0), "scale": 0.5}


def test_fetch_downloads_through_a_part_file_and_checks_the_sha1(tmp_path, monkeypatch):
    """fetch (in this process, the download stood in for): a known name is fetched to
    folder/name through name.part, checked against its sha1, and not fetched again once there; a
    failed download names the file and the URL; an unknown name or a wrong digest is refused."""
    import hashlib
    import urllib.error
    import urllib.request

    from exdrop.engine import pretrained as P
    payload = b"weights of a small net"
    url = "http://example.org/small.caffemodel"
    monkeypatch.setitem(P.MODEL_ZOO, "small.caffemodel", (url, hashlib.sha1(payload).hexdigest()))
    fetched = []

    def urlretrieve(u, target):
        fetched.append((u, Path(target).name))
        Path(target).write_bytes(payload)

    monkeypatch.setattr(urllib.request, "urlretrieve", urlretrieve)
    path = P.fetch("small.caffemodel", tmp_path / "weights")
    assert path == tmp_path / "weights" / "small.caffemodel" and path.read_bytes() == payload
    assert fetched == [(url, "small.caffemodel.part")] and not (tmp_path / "weights" / "small.caffemodel.part").exists()
    assert P.fetch("small.caffemodel", tmp_path / "weights") == path and len(fetched) == 1   # already here
    monkeypatch.chdir(tmp_path)   # by default into data/weights, where the sweep looks for Model Zoo files
    from exdrop.experiments.sweep import WEIGHTS_DIR
    assert P.fetch("small.caffemodel") == Path(WEIGHTS_DIR) / "small.caffemodel" == Path("data/weights/small.caffemodel")
    assert (tmp_path / "data" / "weights" / "small.caffemodel").read_bytes() == payload
    path.write_bytes(b"truncated")
    with pytest.raises(ValueError, match=r"small.caffemodel: sha1 [0-9a-f]{40} is not the Model Zoo file's"):
        P.fetch("small.caffemodel", tmp_path / "weights")
    with pytest.raises(ValueError, match=r"nosuch.caffemodel: not a known Model Zoo file "
                                         r"\(bvlc_alexnet\.caffemodel, VGG_ILSVRC_16_layers\.caffemodel, "):
        P.fetch("nosuch.caffemodel", tmp_path / "weights")

    def offline(u, target):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(FileNotFoundError, match=r"elsewhere.small.caffemodel: not here and the download failed "
                                                r"\(<urlopen error no network>\); fetch http://example.org/small"):
        P.fetch("small.caffemodel", tmp_path / "elsewhere")
