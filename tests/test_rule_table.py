"""One Excitation Backprop rule table for every backend.

A toy layer type (Caffe's ``AbsVal``, which the engine does not ship) is added through the
one table, as a single class, and Excitation Backprop goes through it in the engine
(``Net``), on the real-Caffe side (``CaffeExcitation`` over a ``caffe.Net``) and in the
drop-in modules (a torch module mapped onto the type), with the same result. Also: the EB
kernels are applied from the layer types only, and the top signal's class is picked by one
function everywhere.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from exdrop.engine import eb
from exdrop.proto import io
from exdrop.engine.layer_types import REGISTRY, TORCH_MODULES, Layer, LayerError, register
from exdrop.engine.net import Net
from exdrop.engine.nn import ExcitationDropout, excitation_through
from exdrop.engine.pylayer import TEST

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import require_pycaffe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

NET = """
name: "toy"
layer { name: "input" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 6 dim: 8 } shape { dim: 6 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 7 weight_filler { type: "gaussian" std: 0.5 }
                        bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "abs1" type: "AbsVal" bottom: "ip1" top: "abs1" }
layer { name: "ip2" type: "InnerProduct" bottom: "abs1" top: "ip2"
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


class ToyAbs(nn.Module):
    def forward(self, x):
        return x.abs()


@pytest.fixture
def absval():
    """Register the toy type for one test, then restore the table."""
    saved = dict(REGISTRY), dict(TORCH_MODULES)

    @register("AbsVal")
    class AbsVal(Layer):
        """|x|; EB: the signal passes to every unit that is not zero (a toy rule)."""

        torch_modules = (ToyAbs,)

        @staticmethod
        def eb_rule(g, bottoms, weights, signals):
            return [torch.where(bottoms[0] != 0, signals[0], torch.zeros_like(signals[0]))]

        def __init__(self, lp, bottom_shapes, phase):
            super().__init__(lp, bottom_shapes, phase)
            self.top_shapes = [tuple(bottom_shapes[0])]

        def forward(self, x):
            return x.abs()

    yield AbsVal
    REGISTRY.clear(), REGISTRY.update(saved[0])
    TORCH_MODULES.clear(), TORCH_MODULES.update(saved[1])


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 8, generator=g).abs() + 0.1, torch.tensor([0, 1, 2, 3, 0, 1])


def _engine(tmp_path):
    path = tmp_path / "toy.prototxt"
    path.write_text(NET)
    torch.manual_seed(0)
    net = Net(io.read_net_prototxt(path), TEST, source=str(path))
    x, y = _inputs()
    net({"data": x, "label": y}, record=True)
    return net, path, x, y


def _expected(net, x, y):
    """p_EB at data by hand: the toy rule is the identity on non-zero |ip1| units."""
    w1 = net.layer("ip1").blobs[0].detach()
    w2 = net.layer("ip2").blobs[0].detach()
    pre = x @ w1.t() + net.layer("ip1").blobs[1].detach()
    h = pre.abs()
    top = eb.top_signal(h @ w2.t(), y)
    p_h = eb.eb_linear(h, w2, top)
    p_h = torch.where(h != 0, p_h, torch.zeros_like(p_h))
    return eb.eb_linear(x, w1, p_h)


def test_a_layer_type_is_one_class_engine_and_dropin(absval, tmp_path):
    net, _, x, y = _engine(tmp_path)
    pre = net.blobs["ip1"]
    assert (pre < 0).any(), "the toy net must see negative inputs, or |x| would be a no-op"
    got = net.excitation("data")
    want = _expected(net, x, y)
    assert torch.allclose(got, want, atol=1e-6)
    ok = got.sum(1)
    assert torch.allclose(ok[ok > 0], torch.ones_like(ok[ok > 0]), atol=1e-5)
    # the drop-in module maps ToyAbs onto the same rule
    head = nn.Sequential(nn.Linear(8, 7), ToyAbs(), nn.Linear(7, 4, bias=False))
    with torch.no_grad():
        head[0].weight.copy_(net.layer("ip1").blobs[0])
        head[0].bias.copy_(net.layer("ip1").blobs[1])
        head[2].weight.copy_(net.layer("ip2").blobs[0])
    assert torch.allclose(excitation_through(head, x, y), got, atol=1e-6)
    drop = ExcitationDropout(head=head[1:], p=0.5).train()
    assert drop(head[0](x).detach(), target=y).shape == (6, 7)


def test_without_the_class_the_type_is_unknown_everywhere(tmp_path):
    path = tmp_path / "toy.prototxt"
    path.write_text(NET)
    with pytest.raises(LayerError, match="unknown layer type 'AbsVal'"):
        Net(io.read_net_prototxt(path), TEST, source=str(path))
    with pytest.raises(TypeError, match="no rule for ToyAbs"):
        excitation_through(nn.Sequential(ToyAbs(), nn.Linear(3, 2)), torch.ones(2, 3), torch.tensor([0, 1]))


def test_caffe_side_uses_the_same_table(absval, tmp_path):
    require_pycaffe("the Caffe side of the rule table")
    from exdrop.caffe.env import import_caffe
    from exdrop.caffe.eb import CaffeExcitation
    from exdrop.engine.snapshot import save_weights

    caffe = import_caffe()
    caffe.set_mode_cpu()
    net, path, x, y = _engine(tmp_path)
    model = tmp_path / "toy.caffemodel"
    save_weights(net, model)
    cnet = caffe.Net(str(path), str(model), caffe.TEST)
    cnet.blobs["data"].data[...] = x.numpy()
    cnet.blobs["label"].data[...] = y.numpy()
    cnet.forward()
    walker = CaffeExcitation(cnet, io.read_net_prototxt(path), str(path))
    got = walker.excitation("data", "ip2", y.numpy())
    want = net.excitation("data").numpy()
    print(f"[rule-table] AbsVal through Caffe vs engine: max abs err {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=1e-6)


# ------------------------------------------------------------------ one place for each rule

def test_eb_kernels_are_applied_by_the_layer_types_only():
    """No second copy of a rule: the kernels of exdrop/engine/eb.py are called from layer_types.py alone."""
    kernels = [n for n in dir(eb) if n.startswith("eb_")]
    assert {"eb_linear", "eb_conv2d", "eb_relu", "eb_max_pool2d", "eb_avg_pool2d"} <= set(kernels)
    for path in sorted((ROOT / "exdrop").rglob("*.py")) + sorted((ROOT / "layers").glob("*.py")):
        if path.name in ("eb.py", "layer_types.py"):
            continue
        text = path.read_text()
        used = [k for k in kernels if re.search(rf"\b{k}\(", text)]
        assert not used, f"{path.relative_to(ROOT)} applies EB kernels {used} itself: use the layer type's rule"


def test_every_eb_rule_is_a_registered_layer_type():
    with_rule = {n for n, cls in REGISTRY.items() if cls.eb_rule is not Layer.eb_rule}
    assert {"Convolution", "InnerProduct", "Pooling", "ReLU", "LRN", "Dropout", "Flatten", "Reshape",
            "Concat", "Eltwise", "Split", "Python"} <= with_rule
    # torch modules map onto those types, never onto a rule of their own
    assert TORCH_MODULES[nn.Linear] is REGISTRY["InnerProduct"]
    assert TORCH_MODULES[nn.Conv2d] is REGISTRY["Convolution"]
    assert TORCH_MODULES[nn.MaxPool2d] is REGISTRY["Pooling"]


@pytest.mark.parametrize("signal, expect", [("gt", [2, 0, 1]), ("pred", [1, 1, 0]), (3, [3, 3, 3])])
def test_one_function_picks_the_top_signal_class(signal, expect):
    logits = torch.tensor([[0.0, 5, 1, 0], [1, 9, 0, 0], [7, 0, 0, 0]])
    got = eb.signal_classes(signal, logits, torch.tensor([2.0, 0, 1]))
    assert got.tolist() == expect and got.dtype == torch.long


def test_signal_errors_are_named():
    logits = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="layer 'drop'.*labels"):
        eb.signal_classes("gt", logits, None, "layer 'drop'")
    with pytest.raises(ValueError, match="outside the logits' 4 classes"):
        eb.signal_classes(7, logits, None)
    with pytest.raises(ValueError, match="'gt', 'pred' or a class index"):
        eb.signal_classes("best", logits, None)
    with pytest.raises(ValueError, match="x.prototxt: layer 'drop' needs the logits blob"):
        eb.signal_blobs([], {}, "drop", "x.prototxt")
