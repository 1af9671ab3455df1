"""The prototxt -> torch graph engine (exdrop.engine.net, exdrop.engine.layer_types): Caffe's pooling
arithmetic, CNN-2 shapes, error messages, phase filtering, in-place layers, fillers and
ParamSpecs, fan-out blobs, the numpy bridge for Caffe Python layers, and moving the
Excitation Dropout layer to other places of CNN-2."""
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from exdrop.proto import io
from exdrop.experiments.bench import with_input_layer
from exdrop.engine.eb import eb_linear, eb_relu, top_signal
from exdrop.engine.layer_types import LayerError, Pooling, caffe_pooled_size
from exdrop.engine.net import Net, filter_layers
from exdrop.proto import caffe_pb2
from exdrop.engine.pylayer import TEST, TRAIN

ROOT = Path(__file__).resolve().parents[1]
CNN2_DIR = ROOT / "prototxt/cnn2/cifar10"
CNN2_ED = CNN2_DIR / "train_val_ed.prototxt"


def net_from(text: str, phase=TEST, **kw) -> Net:
    return Net(io.parse_net(textwrap.dedent(text), "t.prototxt"), phase, source="t.prototxt", **kw)


# ------------------------------------------------------------------ pooling arithmetic

def caffe_formula(h, k, s, p):
    """src/caffe/layers/pooling_layer.cpp, Reshape()."""
    out = int(math.ceil(float(h + 2 * p - k) / s)) + 1
    if p > 0 and (out - 1) * s >= h + p:
        out -= 1
    return out


def _empty_last_window(h, k, s, p):
    """Caffe's last window starts at or past the end of the image (possible when s > k, p = 0)."""
    return (caffe_formula(h, k, s, p) - 1) * s - p >= h


POOL_CASES = [(h, k, s, p) for h in range(1, 14) for k in range(1, 6) for s in range(1, 4)
              for p in range(0, k // 2 + 1) if h + 2 * p >= k]
REGULAR = [c for c in POOL_CASES if not _empty_last_window(*c)]
EMPTY_LAST = [c for c in POOL_CASES if _empty_last_window(*c)]


def pooling_layer(h, w, k, s, p, method):
    lp = caffe_pb2.LayerParameter(name="pool", type="Pooling")
    lp.pooling_param.pool = method
    lp.pooling_param.kernel_size, lp.pooling_param.stride, lp.pooling_param.pad = k, s, p
    return Pooling(lp, [(2, 3, h, w)], TEST)


def test_pool_cases_cover_padding_and_partial_windows():
    assert len(REGULAR) > 200
    assert any(p > 0 for _, _, _, p in REGULAR)
    # the grid holds cases where ceil mode adds a partial window and where the pad correction bites
    assert any(caffe_formula(*c) != (c[0] + 2 * c[3] - c[1]) // c[2] + 1 for c in REGULAR)
    assert any(caffe_formula(*c) < int(math.ceil((c[0] + 2 * c[3] - c[1]) / c[2])) + 1 for c in REGULAR)
    # the engine on one of each, values from pooling_layer.cpp by hand: 8, k3, s2 -> 4 (floor
    # mode: 3); 5, k2, s2, pad 1 -> 3 (ceil alone: 4)
    assert caffe_pooled_size(8, 3, 2, 0) == 4 and caffe_pooled_size(5, 2, 2, 1) == 3
    max_, ave = caffe_pb2.PoolingParameter.MAX, caffe_pb2.PoolingParameter.AVE
    assert pooling_layer(8, 5, 3, 2, 0, max_).top_shapes == [(2, 3, 4, 2)]
    assert pooling_layer(5, 8, 2, 2, 1, ave).top_shapes == [(2, 3, 3, 5)]
    assert tuple(pooling_layer(5, 8, 2, 2, 1, ave)(torch.rand(2, 3, 5, 8)).shape) == (2, 3, 3, 5)


@pytest.mark.parametrize("method", [caffe_pb2.PoolingParameter.MAX, caffe_pb2.PoolingParameter.AVE])
def test_pooling_sizes_follow_caffe(method):
    for h, k, s, p in REGULAR:
        want = caffe_formula(h, k, s, p)
        assert caffe_pooled_size(h, k, s, p) == want, (h, k, s, p)
        w = h + 1 if not _empty_last_window(h + 1, k, s, p) else h   # non-square where possible
        layer = pooling_layer(h, w, k, s, p, method)
        assert layer.top_shapes == [(2, 3, want, caffe_formula(w, k, s, p))], (h, k, s, p)
        out = layer(torch.rand(2, 3, h, w))
        assert tuple(out.shape) == layer.top_shapes[0], (h, k, s, p)
        assert torch.isfinite(out).all()


def test_pooling_known_values():
    # 3x3/2 max pooling over 4x4: Caffe gives 2x2 (ceil), windows rows/cols {0..2}, {2..3}
    layer = pooling_layer(4, 4, 3, 2, 0, caffe_pb2.PoolingParameter.MAX)
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(2, 3, 4, 4).contiguous()
    out = layer(x)
    assert torch.equal(out[0, 0], torch.tensor([[10.0, 11.0], [14.0, 15.0]]))
    # average pooling, pad 1, 3x3/2 over 3x3: divisor counts the padding (Caffe)
    layer = pooling_layer(3, 3, 3, 2, 1, caffe_pb2.PoolingParameter.AVE)
    out = layer(torch.ones(2, 3, 3, 3))
    assert out.shape[2:] == (2, 2)
    assert torch.allclose(out[0, 0], torch.full((2, 2), 4.0 / 9.0))


def test_pooling_stride_larger_than_kernel_is_consistent():
    """Stride > kernel without pad: Caffe's last window can start past the image (it outputs
    -FLT_MAX or 0 there). The engine refuses every such geometry, in either axis and for both
    methods, naming the layer, rather than build a net whose shapes or values differ from Caffe's."""
    assert EMPTY_LAST, "no such case in the grid"
    for h, k, s, p in EMPTY_LAST:
        assert caffe_pooled_size(h, k, s, p) == caffe_formula(h, k, s, p)
        w = next(w for w in range(k, 20) if not _empty_last_window(w, k, s, p))
        for method in (caffe_pb2.PoolingParameter.MAX, caffe_pb2.PoolingParameter.AVE):
            for hh, ww in ((h, h), (h, w), (w, h)):
                with pytest.raises(LayerError, match="starts outside") as ei:
                    pooling_layer(hh, ww, k, s, p, method)
                assert "'pool'" in str(ei.value), (h, k, s, p)


# ------------------------------------------------------------------ CNN-2 shapes

def _cnn2(phase, batch, hw, edit=None):
    param = with_input_layer(io.read_net_prototxt(CNN2_ED), phase, batch, (3, hw, hw))
    if edit:
        edit(param)
    return param


def test_cnn2_cifar_shapes():
    torch.manual_seed(0)
    net = Net(_cnn2(TEST, 2, 32), TEST, source=str(CNN2_ED))
    s = net.blob_shapes
    assert s["conv1"] == (2, 96, 32, 32) and s["pool1"] == (2, 96, 16, 16)
    assert s["conv2"] == (2, 128, 16, 16) and s["pool2"] == (2, 128, 8, 8)
    assert s["conv3"] == (2, 256, 8, 8) and s["pool3"] == (2, 256, 4, 4)
    assert tuple(net.layer("ip1").blobs[0].shape) == (2048, 4096)
    assert s["ip1"] == (2, 2048) and s["ip2"] == (2, 2048) and s["ip3"] == (2, 10)
    with torch.no_grad():
        blobs = net({"data": torch.randn(2, 3, 32, 32), "label": torch.tensor([1, 2])})
    for name, shape in s.items():
        if name in blobs and blobs[name].dim():
            assert tuple(blobs[name].shape) == shape, name


def test_cnn2_caltech_shapes():
    def small_ip1(param):   # keep ip1 small: its weight would be 2048 x 65536 otherwise
        for lp in param.layer:
            if lp.name == "ip1":
                lp.inner_product_param.num_output = 4
            if lp.name == "ip2":
                lp.inner_product_param.num_output = 4
    net = Net(_cnn2(TEST, 1, 128, small_ip1), TEST)
    s = net.blob_shapes
    assert s["pool1"][2:] == (64, 64) and s["pool2"][2:] == (32, 32) and s["pool3"] == (1, 256, 16, 16)
    assert tuple(net.layer("ip1").blobs[0].shape) == (4, 256 * 16 * 16)


# ------------------------------------------------------------------ errors

def test_syntax_error_reports_file_line_column(tmp_path):
    text = 'name: "n"\nlayer {\n  name: "a"\n  type: "ReLU" bottom: "x" top "y"\n}\n'
    with pytest.raises(io.PrototxtError) as ei:
        io.parse_net(text, "bad.prototxt")
    e = ei.value
    assert (e.filename, e.line, e.column) == ("bad.prototxt", 4, 32)   # the token '"y"'
    assert str(e).startswith("bad.prototxt:4:32:")
    f = tmp_path / "bad2.prototxt"
    f.write_text('layer {\n  name: "a"\n  typo: "ReLU"\n}\n')
    with pytest.raises(io.PrototxtError) as ei:
        io.read_net_prototxt(f)
    assert ei.value.line == 3 and ei.value.column == 3
    assert str(ei.value).startswith(f"{f}:3:3:") and "typo" in str(ei.value)


INPUT = 'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 4 dim: 4 } } }\n'


def test_unknown_layer_type_names_the_layer():
    with pytest.raises(LayerError) as ei:
        net_from(INPUT + 'layer { name: "mystery" type: "FancyConv" bottom: "data" top: "y" }')
    assert "'mystery'" in str(ei.value) and "FancyConv" in str(ei.value) and "t.prototxt" in str(ei.value)


def test_missing_bottom_names_layer_and_blob():
    with pytest.raises(LayerError) as ei:
        net_from(INPUT + 'layer { name: "r" type: "ReLU" bottom: "nowhere" top: "y" }')
    assert "'r'" in str(ei.value) and "'nowhere'" in str(ei.value)


def test_shape_mismatch_names_the_layer():
    two = INPUT + ('layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
                   'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n')
    with pytest.raises(LayerError) as ei:
        net_from(two + 'layer { name: "cat" type: "Concat" bottom: "data" bottom: "p" top: "c" }')
    assert "'cat'" in str(ei.value)
    with pytest.raises(LayerError) as ei:
        net_from(two + 'layer { name: "sum" type: "Eltwise" bottom: "data" bottom: "p" top: "e" }')
    assert "'sum'" in str(ei.value)
    # the compatible versions build
    ok = net_from(INPUT + 'layer { name: "cat" type: "Concat" bottom: "data" bottom: "data" top: "c" }')
    assert ok.blob_shapes["c"] == (2, 6, 4, 4)


# ------------------------------------------------------------------ phases

def test_cnn2_train_and_test_layer_sets():
    param = io.read_net_prototxt(CNN2_ED)
    train = filter_layers(param, TRAIN)
    test = filter_layers(param, TEST)
    body = ["conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "conv3", "relu3", "pool3",
            "ip1", "relu4", "drop", "ip2", "relu5", "ip3", "accuracy", "loss"]
    assert [lp.name for lp in train] == ["data"] + body
    assert [lp.name for lp in test] == ["data"] + body
    assert train[0].data_param.source.endswith("train_lmdb") and train[0].transform_param.mirror
    assert test[0].data_param.source.endswith("val_lmdb") and not test[0].transform_param.mirror
    assert sum(lp.type == "Data" for lp in param.layer) == 2


def test_include_exclude_rules():
    text = INPUT + """
    layer { name: "only_train" type: "ReLU" bottom: "data" top: "a" include { phase: TRAIN } }
    layer { name: "not_train" type: "ReLU" bottom: "data" top: "b" exclude { phase: TRAIN } }
    layer { name: "staged" type: "ReLU" bottom: "data" top: "c" include { phase: TEST stage: "deploy" } }
    layer { name: "always" type: "ReLU" bottom: "data" top: "d" }
    """
    param = io.parse_net(text)
    names = lambda *a, **k: [lp.name for lp in filter_layers(param, *a, **k)]
    assert names(TRAIN) == ["in", "only_train", "always"]
    assert names(TEST) == ["in", "not_train", "always"]
    assert names(TEST, stages=["deploy"]) == ["in", "not_train", "staged", "always"]
    assert set(Net(param, TRAIN).blob_shapes) == {"data", "a", "d"}
    assert set(Net(param, "TEST").blob_shapes) == {"data", "b", "d"}
    bad = io.parse_net(INPUT + 'layer { name: "both" type: "ReLU" bottom: "data" top: "x" '
                               'include { phase: TRAIN } exclude { phase: TEST } }')
    with pytest.raises(LayerError, match="both"):
        Net(bad, TRAIN)


# ------------------------------------------------------------------ in-place

def test_in_place_relu_overwrites_the_blob():
    torch.manual_seed(0)
    net = net_from("""
        layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 4 dim: 5 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
                inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 1 } } }
        layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
        layer { name: "ip2" type: "InnerProduct" bottom: "ip" top: "ip2"
                inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 1 } } }
    """)
    x = torch.randn(4, 5)
    with torch.no_grad():
        blobs = net({"data": x}, record=True)
        pre = x @ net.layer("ip").blobs[0].t() + net.layer("ip").blobs[1]
        assert (pre < 0).any()
        assert torch.allclose(blobs["ip"], torch.relu(pre), atol=1e-6)
        assert torch.allclose(blobs["ip2"], torch.relu(pre) @ net.layer("ip2").blobs[0].t(), atol=1e-5)
        assert torch.allclose(net.records[0][2][0], pre, atol=1e-6)   # the ip record keeps the pre-ReLU top
    assert net.outputs == ["ip2"]


def test_net_ending_in_place_has_that_output():
    net = net_from("""
        layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 4 } }
        layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
    """)
    assert net.outputs == ["ip"]


# ------------------------------------------------------------------ fillers and ParamSpecs

FILLERS = """
layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 1 dim: 32 dim: 8 dim: 8 } } }
layer { name: "c_gauss" type: "Convolution" bottom: "data" top: "a"
  param { lr_mult: 3 decay_mult: 0.5 } param { lr_mult: 7 decay_mult: 0 }
  convolution_param { num_output: 64 kernel_size: 3
    weight_filler { type: "gaussian" mean: 0.2 std: 0.05 } bias_filler { type: "constant" value: 0.3 } } }
layer { name: "c_xavier" type: "Convolution" bottom: "data" top: "b"
  convolution_param { num_output: 64 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "c_xavier_avg" type: "Convolution" bottom: "data" top: "b2"
  convolution_param { num_output: 64 kernel_size: 3 weight_filler { type: "xavier" variance_norm: AVERAGE } } }
layer { name: "c_msra" type: "Convolution" bottom: "data" top: "c"
  convolution_param { num_output: 64 kernel_size: 3 weight_filler { type: "msra" } } }
layer { name: "ip_uniform" type: "InnerProduct" bottom: "data" top: "d"
  param { lr_mult: 0 }
  inner_product_param { num_output: 40 weight_filler { type: "uniform" min: -0.2 max: 0.7 }
                        bias_filler { type: "uniform" min: 1 max: 2 } } }
layer { name: "ip_default" type: "InnerProduct" bottom: "data" top: "e" inner_product_param { num_output: 3 } }
layer { name: "ip_shared" type: "InnerProduct" bottom: "data" top: "f"
  param { name: "shared_w" lr_mult: 5 } inner_product_param { num_output: 3 bias_term: false } }
layer { name: "ip_shared2" type: "InnerProduct" bottom: "data" top: "g"
  param { name: "shared_w" } inner_product_param { num_output: 3 bias_term: false } }
"""


def test_fillers():
    torch.manual_seed(0)
    net = net_from(FILLERS)
    fan_in = 32 * 3 * 3            # Caffe: count / num
    fan_out = 64 * 3 * 3           # Caffe: count / channels
    g = net.layer("c_gauss").blobs
    assert tuple(g[0].shape) == (64, 32, 3, 3)
    assert g[0].mean().item() == pytest.approx(0.2, abs=0.003)
    assert g[0].std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.equal(g[1].detach(), torch.full((64,), 0.3))
    xv = net.layer("c_xavier").blobs[0].detach()
    bound = math.sqrt(3.0 / fan_in)
    assert xv.abs().max().item() <= bound
    assert xv.var().item() == pytest.approx(1.0 / fan_in, rel=0.06)
    assert torch.equal(net.layer("c_xavier").blobs[1].detach(), torch.zeros(64))   # default bias: constant 0
    xa = net.layer("c_xavier_avg").blobs[0].detach()
    assert xa.var().item() == pytest.approx(2.0 / (fan_in + fan_out), rel=0.06)
    ms = net.layer("c_msra").blobs[0].detach()
    assert ms.var().item() == pytest.approx(2.0 / fan_in, rel=0.06)
    assert ms.mean().item() == pytest.approx(0.0, abs=0.002)
    u = net.layer("ip_uniform").blobs
    assert tuple(u[0].shape) == (40, 32 * 64)
    assert u[0].min().item() >= -0.2 and u[0].max().item() <= 0.7
    assert u[0].mean().item() == pytest.approx(0.25, abs=0.01)
    assert u[1].min().item() >= 1 and u[1].max().item() <= 2
    assert (net.layer("ip_default").blobs[0] == 0).all()   # Caffe's default filler: constant 0


def test_param_specs_reach_learnable():
    net = net_from(FILLERS)
    entries = {e.name: e for e in net.learnable()}
    assert (entries["c_gauss.0"].lr_mult, entries["c_gauss.0"].decay_mult) == (3, 0.5)
    assert (entries["c_gauss.1"].lr_mult, entries["c_gauss.1"].decay_mult) == (7, 0)
    assert (entries["c_xavier.0"].lr_mult, entries["c_xavier.0"].decay_mult) == (1, 1)
    assert (entries["ip_uniform.0"].lr_mult, entries["ip_uniform.0"].decay_mult) == (0, 1)
    assert (entries["ip_uniform.1"].lr_mult, entries["ip_uniform.1"].decay_mult) == (1, 1)
    assert entries["c_gauss.0"].tensor is net.layer("c_gauss").blobs[0]
    # a shared blob appears once, with its owner's multipliers
    assert "ip_shared.0" in entries and "ip_shared2.0" not in entries
    assert entries["ip_shared.0"].lr_mult == 5
    assert net.layer("ip_shared").blobs[0] is net.layer("ip_shared2").blobs[0]
    names = [e.name for e in net.learnable()]
    assert names == ["c_gauss.0", "c_gauss.1", "c_xavier.0", "c_xavier.1", "c_xavier_avg.0", "c_xavier_avg.1",
                     "c_msra.0", "c_msra.1", "ip_uniform.0", "ip_uniform.1", "ip_default.0", "ip_default.1",
                     "ip_shared.0"]


def test_cnn2_param_specs():
    net = Net(_cnn2(TRAIN, 2, 32), TRAIN)
    e = {x.name: x for x in net.learnable()}
    for layer in ("conv1", "conv2", "conv3", "ip1", "ip2", "ip3"):
        assert (e[f"{layer}.0"].lr_mult, e[f"{layer}.0"].decay_mult) == (1, 1)
        assert (e[f"{layer}.1"].lr_mult, e[f"{layer}.1"].decay_mult) == (2, 0)
    assert torch.equal(net.layer("conv1").blobs[1].detach(), torch.full((96,), 0.1))
    # msra: std sqrt(2 / fan_in), fan_in = 3 * 5 * 5
    assert net.layer("conv1").blobs[0].std().item() == pytest.approx((2 / 75) ** 0.5, rel=0.1)


# ------------------------------------------------------------------ fan-out

FANOUT = """
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 8 dim: 5 } shape { dim: 8 } } }
layer { name: "ipA" type: "InnerProduct" bottom: "data" top: "ipA"
        inner_product_param { num_output: 4 weight_filler { type: "uniform" min: -0.3 max: 1 } } }
layer { name: "ipB" type: "InnerProduct" bottom: "data" top: "ipB"
        inner_product_param { num_output: 3 weight_filler { type: "uniform" min: -0.3 max: 1 } } }
layer { name: "reluA" type: "ReLU" bottom: "ipA" top: "ipA" }
layer { name: "reluB" type: "ReLU" bottom: "ipB" top: "ipB" }
layer { name: "cat" type: "Concat" bottom: "ipA" bottom: "ipB" top: "cat" }
layer { name: "ipC" type: "InnerProduct" bottom: "cat" top: "ipC"
        inner_product_param { num_output: 3 weight_filler { type: "uniform" min: -0.3 max: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ipC" bottom: "label" top: "loss" }
"""


def test_fanout_blob_trains():
    torch.manual_seed(0)
    net = net_from(FANOUT, TRAIN)
    g = torch.Generator().manual_seed(5)
    feed = {"data": torch.rand(8, 5, generator=g), "label": torch.randint(0, 3, (8,), generator=g)}
    # the gradient at the shared blob is the sum over both consumers: compare with plain torch
    x = feed["data"].clone().requires_grad_(True)
    net.loss(net({"data": x, "label": feed["label"]})).backward()
    (wa, ba), (wb, bb), (wc, bc) = (tuple(t.detach() for t in net.layer(n).blobs) for n in ("ipA", "ipB", "ipC"))
    xr = feed["data"].clone().requires_grad_(True)
    h = torch.cat([torch.relu(xr @ wa.t() + ba), torch.relu(xr @ wb.t() + bb)], 1)
    torch.nn.functional.cross_entropy(h @ wc.t() + bc, feed["label"]).backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-6) and x.grad.abs().sum() > 0
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = net.loss(net(feed))
        loss.backward()
        for p in net.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_fanout_blob_excitation_conserves_mass():
    torch.manual_seed(1)
    net = net_from(FANOUT, TEST)
    g = torch.Generator().manual_seed(6)
    x = torch.rand(8, 5, generator=g) + 0.05
    label = torch.randint(0, 3, (8,), generator=g)
    with torch.no_grad():
        blobs = net({"data": x, "label": label}, record=True)
        pe = net.excitation("data")
        assert torch.allclose(pe.sum(1), torch.ones(8), atol=1e-5)
        # the same thing composed by hand: both branches' shares add up at "data"
        top = top_signal(blobs["ipC"], label)
        p_cat = eb_linear(blobs["cat"], net.layer("ipC").blobs[0], top)
        pa, pb = p_cat[:, :4], p_cat[:, 4:]
        preA = x @ net.layer("ipA").blobs[0].t() + net.layer("ipA").blobs[1]
        preB = x @ net.layer("ipB").blobs[0].t() + net.layer("ipB").blobs[1]
        want = (eb_linear(x, net.layer("ipA").blobs[0], eb_relu(preA, pa))
                + eb_linear(x, net.layer("ipB").blobs[0], eb_relu(preB, pb)))
        assert torch.allclose(pe, want, atol=1e-6)
        assert torch.allclose(net.excitation("ipA").sum(1) + net.excitation("ipB").sum(1), torch.ones(8), atol=1e-5)


# ------------------------------------------------------------------ Caffe Python layers (numpy bridge)

DOUBLE_LAYER = '''
{base_import}


class DoubleLayer({base}):
    """A classic numpy Caffe layer: top = factor * bottom."""

    def setup(self, bottom, top):
        if len(bottom) != 1:
            raise Exception("DoubleLayer takes one bottom")
        params = eval(self.param_str) if self.param_str else {{}}
        self.factor = float(params.get("factor", 2.0))

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.factor * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = self.factor * top[0].diff
'''

BRIDGE_NET = """
layer {{ name: "in" type: "Input" top: "data" input_param {{ shape {{ dim: 3 dim: 4 }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        inner_product_param {{ num_output: 5 weight_filler {{ type: "gaussian" std: 1 }} }} }}
layer {{ name: "dbl" type: "Python" bottom: "ip" top: "dbl"
        python_param {{ module: "{module}" layer: "DoubleLayer" param_str: "{{'factor': 2}}" }} }}
"""


def _bridge(tmp_path, module, base_import, base):
    (tmp_path / f"{module}.py").write_text(DOUBLE_LAYER.format(base_import=base_import, base=base))
    torch.manual_seed(0)
    net = net_from(BRIDGE_NET.format(module=module), TRAIN, search_paths=[tmp_path])
    assert net.blob_shapes["dbl"] == (3, 5)
    x = torch.randn(3, 4)
    blobs = net({"data": x})
    w, b = net.layer("ip").blobs
    ip = x @ w.t() + b
    assert torch.allclose(blobs["dbl"], 2 * ip, atol=1e-5)
    assert blobs["dbl"].requires_grad
    r = torch.randn(3, 5)
    (blobs["dbl"] * r).sum().backward()
    assert torch.allclose(w.grad, 2 * r.t() @ x, atol=1e-5)
    assert torch.allclose(b.grad, 2 * r.sum(0), atol=1e-5)


def test_python_layer_numpy_bridge(tmp_path):
    _bridge(tmp_path, "exdrop_test_double_stand_in",
            "from exdrop.engine.pylayer import caffe_module\ncaffe = caffe_module()", "caffe.Layer")


def test_python_layer_numpy_bridge_plain_class(tmp_path):
    _bridge(tmp_path, "exdrop_test_double_plain", "", "object")


WITHOUT_PYCAFFE = r"""
import sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[2])
from test_net import BRIDGE_NET, DOUBLE_LAYER, net_from
from exdrop.engine.layer_types import LayerError
from exdrop.engine.pylayer import TRAIN
folder = Path(sys.argv[1])
assert "caffe" not in sys.modules
for module, base_import in (("exdrop_test_plain_import", "import caffe"),
                            ("exdrop_test_released", "from exdrop.engine.pylayer import caffe_module\ncaffe = caffe_module()")):
    (folder / f"{module}.py").write_text(DOUBLE_LAYER.format(base_import=base_import, base="caffe.Layer"))
    try:
        net = net_from(BRIDGE_NET.format(module=module), TRAIN, search_paths=[folder])
        print(module, "built", module in sys.modules, "caffe" in sys.modules)
    except LayerError as exc:
        print(module, "error", exc)
"""


def test_no_stand_in_caffe_in_sys_modules(tmp_path):
    """Without pycaffe on the path (a fresh interpreter): no stand-in ``caffe`` is lent through
    sys.modules. A file that writes ``import caffe`` gets an error naming the layer and the one-line
    fix; a file that uses ``caffe_module()`` builds, and leaves sys.modules again (so real Caffe,
    loaded later in the same process, imports it afresh against its own ``caffe.Layer``)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", WITHOUT_PYCAFFE, str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    plain, released = proc.stdout.splitlines()
    assert re.search(r"exdrop_test_plain_import error .*layer 'dbl'.*imports caffe.*caffe = caffe_module\(\)", plain)
    assert released == "exdrop_test_released built False False"


# ------------------------------------------------------------------ moving Excitation Dropout

DROP_BLOCK = re.compile(r'layer \{\n  name: "drop" type: "Python" bottom: "ip1" top: "ip1"\n.*?\n\}\n', re.S)


def moved_ed_text(blob: str, after_layer: str) -> str:
    text = CNN2_ED.read_text()
    m = DROP_BLOCK.search(text)
    assert m, "the drop layer of the CNN-2 ED prototxt changed shape"
    block = m.group(0).replace('bottom: "ip1" top: "ip1"', f'bottom: "{blob}" top: "{blob}"')
    text = text[:m.start()] + text[m.end():]
    anchor = re.search(r'layer \{ name: "%s" type: "ReLU"[^\n]*\}\n' % after_layer, text)
    assert anchor, after_layer
    return text[:anchor.end()] + block + text[anchor.end():]


def _train_two_steps(text, batch=4):
    param = with_input_layer(io.parse_net(text, "moved.prototxt"), TRAIN, batch, (3, 32, 32))
    torch.manual_seed(0)
    net = Net(param, TRAIN, source="moved.prototxt")
    g = torch.Generator().manual_seed(1)
    feed = {"data": torch.randn(batch, 3, 32, 32, generator=g) * 50,
            "label": torch.randint(0, 10, (batch,), generator=g)}
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    records = []
    for _ in range(2):
        opt.zero_grad()
        blobs = net(feed, record=True)
        loss = net.loss(blobs)
        assert torch.isfinite(loss)
        loss.backward()
        for e in net.learnable():
            assert e.tensor.grad is not None and torch.isfinite(e.tensor.grad).all(), e.name
        opt.step()
        records.append(net.records)
    return net, records


def test_moved_ed_after_ip2():
    text = moved_ed_text("ip2", "relu5")
    names = [lp.name for lp in io.parse_net(text).layer]
    assert names.index("drop") == names.index("relu5") + 1 and names.index("drop") > names.index("ip2")
    net, records = _train_two_steps(text)
    drop_idx = [l.name for l in net.layer_list].index("drop")
    n_kept = []
    for recs in records:
        _, bottoms, tops = [r for r in recs if r[0] == drop_idx][0]
        x, y = bottoms[0].detach(), tops[0].detach()
        assert y.shape == (4, 2048)
        dropped = (y == 0) & (x > 0)
        assert dropped.any() and ((y != 0) & (x > 0)).any()
        # a unit with x == 0 has p_EB 0, hence retain probability 1 (Eqn 3): it is kept. So each
        # image's kept count is known, and its rescale factor is 2048 / kept, that image's alone
        kept = (x == 0) | (y != 0)
        for b in range(4):
            factor = 2048 / kept[b].sum().item()
            live = x[b] > 0
            assert torch.allclose(y[b][live], x[b][live] * kept[b][live] * factor, rtol=1e-5), b
            n_kept.append(int(kept[b].sum()))
    assert len(set(n_kept)) > 1, "every image kept as many units: per-image and batch rescale agree"


def test_moved_ed_after_conv3_drops_whole_maps():
    text = moved_ed_text("conv3", "relu3")
    names = [lp.name for lp in io.parse_net(text).layer]
    assert names.index("drop") == names.index("relu3") + 1
    net, records = _train_two_steps(text)
    drop_idx = [l.name for l in net.layer_list].index("drop")
    kept_counts = []
    for recs in records:
        _, bottoms, tops = [r for r in recs if r[0] == drop_idx][0]
        x, y = bottoms[0].detach(), tops[0].detach()
        assert y.shape == (4, 256, 8, 8)
        n_dropped = 0
        for b in range(4):
            live = x[b].flatten(1).abs().sum(1) > 0          # maps where conv3 is not all zero
            kept_maps = y[b].flatten(1).abs().sum(1) > 0
            n_dropped += int((live & ~kept_maps).sum())
            scales = []
            for c in range(256):
                if not kept_maps[c]:
                    assert (y[b, c] == 0).all()
                    continue
                nz = x[b, c] != 0
                assert ((y[b, c] != 0) == nz).all(), (b, c)    # nonzero exactly where conv3 was
                scales.append((y[b, c][nz] / x[b, c][nz]))
            s = torch.cat(scales)
            # one factor per image: 256 / kept maps (an all-zero map has p_EB 0: always kept)
            n_kept = int((kept_maps | ~live).sum())
            kept_counts.append(n_kept)
            assert torch.allclose(s, torch.full_like(s, 256 / n_kept), rtol=1e-5), (b, s[0].item(), n_kept)
        assert n_dropped > 0
    assert len(set(kept_counts)) > 1, "every image kept as many maps: per-image and batch rescale agree"


# ------------------------------------------------------------------ param_str names

FC_INPUT = 'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 4 dim: 10 } } }\n'


@pytest.mark.parametrize("module, layer", [("excitation_dropout", "ExcitationDropout"),
                                           ("activation_dropout", "ActivationDropout"),
                                           ("standard_dropout", "StandardDropout")])
def test_param_str_key_p_is_refused_naming_dropout_ratio(module, layer):
    text = FC_INPUT + (f'layer {{ name: "drop" type: "Python" bottom: "data" top: "data" python_param {{ '
                       f'module: "{module}" layer: "{layer}" param_str: "{{\'p\': 0.8}}" }} }}')
    with pytest.raises(LayerError) as ei:
        net_from(text, TRAIN)
    msg = str(ei.value)
    assert "layer 'drop'" in msg and "unknown param_str keys ['p']" in msg and "'dropout_ratio'" in msg


@pytest.mark.parametrize("ratio", [0.2, 0.7])
def test_param_str_dropout_ratio_drops_that_fraction(ratio):
    text = FC_INPUT.replace("dim: 4 dim: 10", "dim: 200 dim: 1000") + (
        f'layer {{ name: "drop" type: "Python" bottom: "data" top: "out" python_param {{ '
        f'module: "standard_dropout" layer: "StandardDropout" param_str: "{{\'dropout_ratio\': {ratio}}}" }} }}')
    net = net_from(text, TRAIN)
    torch.manual_seed(0)
    out = net({"data": torch.ones(200, 1000)})["out"]
    assert abs((out == 0).float().mean().item() - ratio) < 0.01
    with pytest.raises(LayerError, match="dropout_ratio must be in"):
        net_from(text.replace(f"{ratio}", "1.5"), TRAIN)


def test_ed_directly_under_the_logits_warns_once_with_the_docs_section():
    """After relu5 (blob ip2, only ip3 above it) ED collapses CNN-2 (docs/dropout-layers.md): the
    build says so; at ip1 (the paper's place) it says nothing."""
    import warnings

    from exdrop.engine.net import UnderTheLogitsWarning
    with pytest.warns(UnderTheLogitsWarning, match=r"layer 'drop'.*directly under the logits .*'ip3'.*"
                                                   r"docs/dropout-layers\.md"):
        Net(with_input_layer(io.parse_net(moved_ed_text("ip2", "relu5"), "moved.prototxt"), TRAIN, 2, (3, 32, 32)),
            TRAIN)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnderTheLogitsWarning)
        Net(with_input_layer(io.read_net_prototxt(CNN2_ED), TRAIN, 2, (3, 32, 32)), TRAIN)
        Net(with_input_layer(io.parse_net(moved_ed_text("ip2", "relu5"), "moved.prototxt"), TEST, 2, (3, 32, 32)),
            TEST)
