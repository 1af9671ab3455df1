"""Excitation Backprop (exdrop.engine.eb and the layers' ``excite``): a hand-computed fc example
(Eqn 2), conv/pooling rules against naive numpy loops, zero inputs, and conservation of
probability mass through CNN-2."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from exdrop.engine import eb
from exdrop.proto import io
from exdrop.experiments.bench import with_input_layer
from exdrop.engine.net import Net
from exdrop.engine.nn import excitation_through
from exdrop.engine.pylayer import TEST

ROOT = Path(__file__).resolve().parents[1]
CNN2_ED = ROOT / "prototxt/cnn2/cifar10/train_val_ed.prototxt"


# ------------------------------------------------------------------ hand-computed fc example
#
# x = [1, 2]
# fc1: W1 = [[1, 0], [1, 1], [-1, 2], [-1, -1]], b1 = [0.5, 0, 0, 0]
#      pre = [1.5, 3, 3, -3] -> ReLU -> h = [1.5, 3, 3, 0]
# fc2: W2 = [[1, 2, -1, 5], [0, 1, 1, 1]], b2 = [10, -10] (biases play no part in EB)
#
# Signal one-hot on class 0. Eqn 2: P(h_i | c0) = h_i w+_i0 / Z, Z = sum_i h_i w+_i0
#   W2+ row 0 = [1, 2, 0, 5]; Z = 1.5*1 + 3*2 + 3*0 + 0*5 = 7.5
#   p(h) = [1.5/7.5, 6/7.5, 0, 0] = [0.2, 0.8, 0, 0]
# ReLU passes where pre > 0: unchanged (h3 already has 0).
# fc1, W1+ = [[1, 0], [1, 1], [0, 2], [0, 0]]:
#   h0: Z = 1*1 + 2*0 = 1  -> x0 gets 0.2 * 1/1 = 0.2, x1 gets 0
#   h1: Z = 1 + 2 = 3      -> x0 gets 0.8 * 1/3,       x1 gets 0.8 * 2/3
#   (h2 has no mass; h3: Z = 0, no mass either, and no NaN)
#   p(x) = [0.2 + 0.8/3, 1.6/3] = [7/15, 8/15]
#
# Signal one-hot on class 1: W2+ row 1 = [0, 1, 1, 1]; Z = 0 + 3 + 3 + 0 = 6
#   p(h) = [0, 0.5, 0.5, 0]
#   h1: x0 gets 0.5/3, x1 gets 0.5*2/3; h2 (Z = 0*1 + 2*2 = 4; the true pre-activation is 3:
#   Z uses W+ only): x0 gets 0, x1 gets 0.5
#   p(x) = [1/6, 1/3 + 1/2] = [1/6, 5/6]

X = torch.tensor([[1.0, 2.0], [1.0, 2.0]])
W1 = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 2.0], [-1.0, -1.0]])
B1 = torch.tensor([0.5, 0.0, 0.0, 0.0])
W2 = torch.tensor([[1.0, 2.0, -1.0, 5.0], [0.0, 1.0, 1.0, 1.0]])
B2 = torch.tensor([10.0, -10.0])
CLASSES = torch.tensor([0, 1])
EXPECT_H = torch.tensor([[0.2, 0.8, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]])
EXPECT_X = torch.tensor([[7 / 15, 8 / 15], [1 / 6, 5 / 6]])


def test_eb_hand_computed_rules():
    pre = X @ W1.t() + B1
    h = torch.relu(pre)
    assert torch.equal(h[0], torch.tensor([1.5, 3.0, 3.0, 0.0]))
    logits = h @ W2.t() + B2
    top = eb.top_signal(logits, CLASSES)
    assert torch.equal(top, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    p_h = eb.eb_linear(h, W2, top)
    assert torch.allclose(p_h, EXPECT_H, atol=1e-6)
    p_pre = eb.eb_relu(pre, p_h)
    assert torch.allclose(p_pre, EXPECT_H, atol=1e-6)
    p_x = eb.eb_linear(X, W1, p_pre)
    assert torch.allclose(p_x, EXPECT_X, atol=1e-6)
    assert torch.isfinite(p_x).all()


def _hand_head():
    head = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        head[0].weight.copy_(W1)
        head[0].bias.copy_(B1)
        head[2].weight.copy_(W2)
        head[2].bias.copy_(B2)
    return head


def test_eb_hand_computed_through_module_and_net():
    head = _hand_head()
    assert torch.allclose(excitation_through(head, X, CLASSES), EXPECT_X, atol=1e-6)
    assert torch.allclose(excitation_through(head[2:], torch.relu(X @ W1.t() + B1), CLASSES), EXPECT_H, atol=1e-6)
    net = Net(io.parse_net("""
        layer { name: "in" type: "Input" top: "data" top: "label"
                input_param { shape { dim: 2 dim: 2 } shape { dim: 2 } } }
        layer { name: "fc1" type: "InnerProduct" bottom: "data" top: "fc1" inner_product_param { num_output: 4 } }
        layer { name: "relu1" type: "ReLU" bottom: "fc1" top: "fc1" }
        layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2" inner_product_param { num_output: 2 } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc2" bottom: "label" top: "loss" }
    """), TEST)
    with torch.no_grad():
        for name, w, b in (("fc1", W1, B1), ("fc2", W2, B2)):
            net.layer(name).blobs[0].copy_(w)
            net.layer(name).blobs[1].copy_(b)
    net({"data": X, "label": CLASSES}, record=True)
    assert torch.allclose(net.excitation("fc1"), EXPECT_H, atol=1e-6)   # post-ReLU blob (in place)
    assert torch.allclose(net.excitation("data"), EXPECT_X, atol=1e-6)


# ------------------------------------------------------------------ conv against numpy loops

def naive_eb_conv(x, w, top, stride, pad, groups):
    """Z = X * W+, S = top / Z (0 where Z = 0), bottom = X * (S conv^T W+), as loops."""
    B, C, H, W = x.shape
    O, Cg, kh, kw = w.shape
    wp = np.maximum(w, 0)
    xp = np.zeros((B, C, H + 2 * pad, W + 2 * pad), np.float64)
    xp[:, :, pad:pad + H, pad:pad + W] = x
    Ho = (H + 2 * pad - kh) // stride + 1
    Wo = (W + 2 * pad - kw) // stride + 1
    og = O // groups
    back = np.zeros_like(xp)
    for b in range(B):
        for o in range(O):
            g = o // og
            chans = slice(g * Cg, (g + 1) * Cg)
            for i in range(Ho):
                for j in range(Wo):
                    win = xp[b, chans, i * stride:i * stride + kh, j * stride:j * stride + kw]
                    z = float((win * wp[o]).sum())
                    s = top[b, o, i, j] / z if z != 0 else 0.0
                    back[b, chans, i * stride:i * stride + kh, j * stride:j * stride + kw] += wp[o] * s
    return (xp * back)[:, :, pad:pad + H, pad:pad + W]


def test_eb_conv_matches_numpy_loops():
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(2, 4, 7, 6)), 0).astype(np.float32)
    x[0, 0:2, 0:3, 0:3] = 0.0     # a dead corner: Z = 0 for the first output of group 0
    w = rng.normal(size=(6, 2, 3, 3)).astype(np.float32)
    top = rng.random(size=(2, 6, 4, 3)).astype(np.float32)
    got = eb.eb_conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(top), stride=2, padding=1, groups=2)
    want = naive_eb_conv(x.astype(np.float64), w.astype(np.float64), top.astype(np.float64), 2, 1, 2)
    assert got.shape == x.shape
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)
    # conservation where Z > 0: the bottom mass equals the top mass that met Z > 0
    z = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w).clamp_min(0), None, 2, 1, 1, 2)
    assert (z == 0).any()
    kept_top = torch.from_numpy(top)[z > 0].sum()
    assert got.sum().item() == pytest.approx(kept_top.item(), rel=1e-5)


def test_eb_conv_layer_excite_uses_the_rule():
    params = io.parse_net("""
        layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 dim: 7 dim: 6 } } }
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
                convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 group: 2
                                    weight_filler { type: "gaussian" std: 1 } } }
    """)
    net = Net(params, TEST)
    conv = net.layer("conv")
    assert net.blob_shapes["conv"] == (2, 6, 4, 3)
    rng = np.random.default_rng(1)
    x = np.abs(rng.normal(size=(2, 4, 7, 6))).astype(np.float32)
    top = rng.random(size=(2, 6, 4, 3)).astype(np.float32)
    w = conv.blobs[0].detach().numpy().astype(np.float64)
    with torch.no_grad():   # the engine runs EB under no_grad
        (got,) = conv.excite_rule()([torch.from_numpy(x)], [torch.from_numpy(top)])
    np.testing.assert_allclose(got.numpy(), naive_eb_conv(x.astype(np.float64), w, top.astype(np.float64), 2, 1, 2),
                               rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ pooling against numpy loops

def _windows(size, k, s, p):
    """Caffe's pooling windows along one axis (ceil mode), clipped to the image."""
    out = int(np.ceil((size + 2 * p - k) / s)) + 1
    if p > 0 and (out - 1) * s >= size + p:
        out -= 1
    wins = []
    for i in range(out):
        start = i * s - p
        end = min(start + k, size + p)
        wins.append((max(start, 0), min(end, size)))
    return wins


def naive_eb_pool(x, top, k, s, p, method):
    B, C, H, W = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    for b in range(B):
        for c in range(C):
            for i, (h0, h1) in enumerate(_windows(H, k, s, p)):
                for j, (w0, w1) in enumerate(_windows(W, k, s, p)):
                    win = x[b, c, h0:h1, w0:w1]
                    if method == "max":
                        a, bb = np.unravel_index(np.argmax(win), win.shape)
                        out[b, c, h0 + a, w0 + bb] += top[b, c, i, j]
                    else:
                        tot = win.sum()
                        if tot != 0:
                            out[b, c, h0:h1, w0:w1] += top[b, c, i, j] * win / tot
    return out


@pytest.mark.parametrize("H,W,k,s,p", [(7, 7, 3, 2, 0), (8, 8, 3, 2, 0), (8, 7, 3, 2, 1), (6, 9, 2, 2, 1), (5, 5, 3, 3, 1)])
@pytest.mark.parametrize("method", ["max", "ave"])
def test_eb_pooling_matches_numpy_loops(H, W, k, s, p, method):
    rng = np.random.default_rng(H * 100 + W * 10 + k + s + p)
    x = rng.random(size=(2, 3, H, W)).astype(np.float32) + 0.01
    if method == "ave":
        x[0, 0, :3, :3] = 0.0    # some all-zero windows: their mass is lost, no NaN
    oh, ow = len(_windows(H, k, s, p)), len(_windows(W, k, s, p))
    top = rng.random(size=(2, 3, oh, ow)).astype(np.float32)
    xt, tt = torch.from_numpy(x), torch.from_numpy(top)
    if method == "max":
        got = eb.eb_max_pool2d(xt, tt, k, s, p)
        assert torch.nn.functional.max_pool2d(xt, k, s, p, ceil_mode=True).shape[2:] == (oh, ow)
    else:
        got = eb.eb_avg_pool2d(xt, tt, k, s, p)
    assert torch.isfinite(got).all()
    want = naive_eb_pool(x.astype(np.float64), top.astype(np.float64), k, s, p, method)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    if method == "max":
        # everything goes to an argmax: mass conserved, and only window maxima receive any
        assert got.sum().item() == pytest.approx(float(top.sum()), rel=1e-5)


def test_eb_avg_pool_ceil_partial_window_by_hand():
    # 1x1x1x3 input, kernel 2, stride 2, no pad: windows [0,2) and the partial [2,3) (ceil mode)
    x = torch.tensor([[[[1.0, 3.0, 5.0]]]])
    top = torch.tensor([[[[0.8, 0.2]]]])
    got = eb.eb_avg_pool2d(x, top, (1, 2), (1, 2), (0, 0))
    assert torch.allclose(got, torch.tensor([[[[0.2, 0.6, 0.2]]]]), atol=1e-7)
    gotm = eb.eb_max_pool2d(x, top, (1, 2), (1, 2), (0, 0))
    assert torch.allclose(gotm, torch.tensor([[[[0.0, 0.8, 0.2]]]]))


# ------------------------------------------------------------------ zeros in, zeros out

def test_eb_all_zero_activations_give_zeros_not_nan():
    z = torch.zeros(3, 5)
    top = torch.rand(3, 4)
    out = eb.eb_linear(z, torch.randn(4, 5), top)
    assert torch.equal(out, torch.zeros(3, 5))
    zc = torch.zeros(2, 4, 6, 6)
    oc = eb.eb_conv2d(zc, torch.randn(6, 2, 3, 3), torch.rand(2, 6, 3, 3), 2, 1, 1, 2)
    assert torch.equal(oc, torch.zeros_like(zc))
    oa = eb.eb_avg_pool2d(zc, torch.rand(2, 4, 3, 3), 2, 2, 0)
    assert torch.equal(oa, torch.zeros_like(zc))
    om = eb.eb_max_pool2d(zc, torch.rand(2, 4, 3, 3), 2, 2, 0)
    assert torch.isfinite(om).all()
    es = eb.eb_eltwise_sum([torch.zeros(2, 3), torch.zeros(2, 3)], torch.rand(2, 3))
    assert all(torch.equal(e, torch.zeros(2, 3)) for e in es)
    # a whole head on zeros
    head = _hand_head()
    with torch.no_grad():
        head[0].bias.zero_()
    pe = excitation_through(head, torch.zeros(2, 2), CLASSES)
    assert torch.equal(pe, torch.zeros(2, 2))
    assert eb.safe_divide(torch.ones(3), torch.zeros(3)).eq(0).all()


def test_eb_eltwise_sum_shares():
    a = torch.tensor([[1.0, 0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0, 2.0]])
    top = torch.tensor([[0.4, 0.5, 0.1]])
    pa, pb = eb.eb_eltwise_sum([a, b], top)
    assert torch.allclose(pa, torch.tensor([[0.1, 0.0, 0.05]]))
    assert torch.allclose(pb, torch.tensor([[0.3, 0.0, 0.05]]))


def test_eb_runs_in_float32_under_half_inputs():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float16)
    out = eb.eb_linear(x, W1[:2].half(), torch.tensor([[1.0, 0.0]], dtype=torch.float16))
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([[1.0, 0.0]]))


# ------------------------------------------------------------------ CNN-2 mass conservation

@pytest.fixture(scope="module")
def cnn2_recorded():
    torch.manual_seed(0)
    param = with_input_layer(io.read_net_prototxt(CNN2_ED), TEST, 4, (3, 32, 32))
    net = Net(param, TEST, source=str(CNN2_ED))
    g = torch.Generator().manual_seed(1)
    feed = {"data": torch.randn(4, 3, 32, 32, generator=g) * 50,
            "label": torch.tensor([0, 3, 7, 9])}
    with torch.no_grad():
        net(feed, record=True)
    return net


@pytest.mark.parametrize("blob", ["ip2", "ip1", "pool3", "conv3", "pool2", "conv2", "pool1", "conv1"])
def test_cnn2_p_eb_sums_to_one(cnn2_recorded, blob):
    net = cnn2_recorded
    pe = net.excitation(blob)
    assert pe.shape == net.blobs[blob].shape
    assert torch.isfinite(pe).all() and (pe >= 0).all()
    assert torch.allclose(pe.flatten(1).sum(1), torch.ones(4), atol=1e-4)
    # mass only where the activation is positive
    assert (pe[net.blobs[blob] <= 0] == 0).all()


def test_cnn2_p_eb_depends_on_class(cnn2_recorded):
    net = cnn2_recorded
    a = net.excitation("ip1", classes=torch.tensor([0, 0, 0, 0]))
    b = net.excitation("ip1", classes=torch.tensor([1, 1, 1, 1]))
    assert not torch.allclose(a, b)
    assert torch.allclose(net.excitation("ip1", classes=torch.tensor([0, 3, 7, 9])), net.excitation("ip1"))


# ------------------------------------------------------------------ every rule against its definition
#
# Independent per-image references (plain loops over the definition, float64) for each layer
# type's EB rule, compared with the rule as the engine applies it: net.layer(name).excite_rule()(...).

RULES_NET = """
layer { name: "in" type: "Input" top: "a" top: "b" top: "v"
        input_param { shape { dim: 2 dim: 3 dim: 4 dim: 5 } shape { dim: 2 dim: 3 dim: 4 dim: 5 }
                      shape { dim: 2 dim: 7 } } }
layer { name: "ip" type: "InnerProduct" bottom: "v" top: "ip"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "ipt" type: "InnerProduct" bottom: "a" top: "ipt"
        inner_product_param { num_output: 4 transpose: true weight_filler { type: "gaussian" std: 1 } } }
layer { name: "relu" type: "ReLU" bottom: "a" top: "relu" }
layer { name: "leaky" type: "ReLU" bottom: "a" top: "leaky" relu_param { negative_slope: 0.1 } }
layer { name: "lrn" type: "LRN" bottom: "a" top: "lrn" lrn_param { local_size: 3 } }
layer { name: "lrnw" type: "LRN" bottom: "a" top: "lrnw" lrn_param { local_size: 3 norm_region: WITHIN_CHANNEL } }
layer { name: "drop" type: "Dropout" bottom: "a" top: "drop" dropout_param { dropout_ratio: 0.3 } }
layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "b" top: "sum"
        eltwise_param { operation: SUM coeff: 2 coeff: 0.5 } }
layer { name: "sum1" type: "Eltwise" bottom: "a" bottom: "b" top: "sum1" }
layer { name: "cat" type: "Concat" bottom: "a" bottom: "b" top: "cat" }
layer { name: "cat2" type: "Concat" bottom: "a" bottom: "b" top: "cat2" concat_param { axis: 2 } }
layer { name: "split" type: "Split" bottom: "a" top: "s1" top: "s2" top: "s3" }
layer { name: "flat" type: "Flatten" bottom: "a" top: "flat" }
layer { name: "reshape" type: "Reshape" bottom: "a" top: "reshape" reshape_param { shape { dim: 0 dim: -1 dim: 5 } } }
layer { name: "pmax" type: "Pooling" bottom: "a" top: "pmax" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pave" type: "Pooling" bottom: "a" top: "pave" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
"""


@pytest.fixture(scope="module")
def rules_net():
    torch.manual_seed(0)
    return Net(io.parse_net(RULES_NET, "rules.prototxt"), TEST, source="rules.prototxt")


def _excite(net, name, bottoms, signals):
    with torch.no_grad():
        return net.layer(name).excite_rule()([torch.from_numpy(b.astype(np.float32)) for b in bottoms],
                                             [None if s is None else torch.from_numpy(s.astype(np.float32))
                                              for s in signals])


def _acts(rng, shape, dead=0.3):
    """Post-ReLU-like activations with some exact zeros (dead units)."""
    x = rng.random(shape) + 0.05
    x[rng.random(shape) < dead] = 0.0
    return x.astype(np.float32).astype(np.float64)


def _signal(rng, shape):
    return rng.random(shape).astype(np.float32).astype(np.float64)


def naive_eb_fc(x, w, top):
    """Per image: P(x_k | y_n) = x_k w+_nk / Z_n, Z_n = sum_k x_k w+_nk (0 where Z_n = 0)."""
    B, K = x.shape
    N = w.shape[0]
    out = np.zeros((B, K))
    for b in range(B):
        for n in range(N):
            z = sum(x[b, k] * max(w[n, k], 0.0) for k in range(K))
            if z == 0:
                continue
            for k in range(K):
                out[b, k] += top[b, n] * x[b, k] * max(w[n, k], 0.0) / z
    return out


@pytest.mark.parametrize("name", ["ip", "ipt"])
def test_rule_inner_product_matches_definition(rules_net, name):
    rng = np.random.default_rng(10)
    layer = rules_net.layer(name)
    shape = rules_net.blob_shapes[layer.lp.bottom[0]]
    x = _acts(rng, shape)
    x[1] = 0.0                      # a dead image: every Z = 0, no mass, no NaN
    top = _signal(rng, (2, 4))
    w = layer.blobs[0].detach().double().numpy()
    w = w.T if name == "ipt" else w  # transpose: true stores (K, N)
    (got,) = _excite(rules_net, name, [x], [top])
    want = naive_eb_fc(x.reshape(2, -1), w, top).reshape(shape)
    assert got.shape == shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
    assert (got[1] == 0).all()


@pytest.mark.parametrize("name,slope", [("relu", 0.0), ("leaky", 0.1)])
def test_rule_relu_matches_definition(rules_net, name, slope):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32).astype(np.float64)
    x[0, 0, 0, :] = 0.0                        # exactly 0 is not positive
    top = _signal(rng, x.shape) + 0.1          # non-zero where the input is <= 0 too
    assert (top[x <= 0] != 0).all()
    want = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        want[i] = top[i] if x[i] > 0 else slope * top[i]
    (got,) = _excite(rules_net, name, [x], [top])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=0)
    if slope == 0.0:
        assert (got.numpy()[x <= 0] == 0).all()


@pytest.mark.parametrize("name", ["lrn", "lrnw", "drop", "flat", "reshape"])
def test_rule_identity_layers_match_definition(rules_net, name):
    # LRN and Dropout pass each unit's probability to the same unit; Flatten and Reshape move
    # it to the same position in C order (the signal comes in the top's shape)
    rng = np.random.default_rng(12)
    x = _acts(rng, (2, 3, 4, 5))
    tshape = rules_net.blob_shapes[name]
    top = _signal(rng, tshape)
    flat_top = top.reshape(-1)
    want = np.zeros(x.shape)
    for pos, i in enumerate(np.ndindex(*x.shape)):   # C order: the flat position of unit i
        want[i] = flat_top[pos]
    (got,) = _excite(rules_net, name, [x], [top])
    assert got.shape == x.shape
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("name,coeff", [("sum", (2.0, 0.5)), ("sum1", (1.0, 1.0))])
def test_rule_eltwise_sum_matches_definition(rules_net, name, coeff):
    rng = np.random.default_rng(13)
    a, b = _acts(rng, (2, 3, 4, 5), 0.5), _acts(rng, (2, 3, 4, 5), 0.5)
    top = _signal(rng, a.shape)
    want_a, want_b = np.zeros(a.shape), np.zeros(a.shape)
    for i in np.ndindex(*a.shape):
        z = coeff[0] * a[i] + coeff[1] * b[i]
        if z != 0:
            want_a[i] = top[i] * coeff[0] * a[i] / z
            want_b[i] = top[i] * coeff[1] * b[i] / z
    got_a, got_b = _excite(rules_net, name, [a, b], [top])
    np.testing.assert_allclose(got_a.numpy(), want_a, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got_b.numpy(), want_b, rtol=1e-6, atol=1e-8)
    assert ((a == 0) & (b == 0)).any() and (got_a.numpy()[(a == 0) & (b == 0)] == 0).all()


@pytest.mark.parametrize("name,axis", [("cat", 1), ("cat2", 2)])
def test_rule_concat_matches_definition(rules_net, name, axis):
    rng = np.random.default_rng(14)
    a, b = _acts(rng, (2, 3, 4, 5)), _acts(rng, (2, 3, 4, 5))
    top = _signal(rng, rules_net.blob_shapes[name])
    want_a, want_b = np.zeros(a.shape), np.zeros(b.shape)
    for i in np.ndindex(*a.shape):
        j = list(i)
        want_a[i] = top[tuple(j)]
        j[axis] += a.shape[axis]
        want_b[i] = top[tuple(j)]
    got_a, got_b = _excite(rules_net, name, [a, b], [top])
    np.testing.assert_array_equal(got_a.numpy(), want_a)
    np.testing.assert_array_equal(got_b.numpy(), want_b)


def test_rule_split_matches_definition(rules_net):
    rng = np.random.default_rng(15)
    x = _acts(rng, (2, 3, 4, 5))
    s1, s3 = _signal(rng, x.shape), _signal(rng, x.shape)
    want = np.zeros(x.shape)
    for i in np.ndindex(*x.shape):
        want[i] = s1[i] + s3[i]                  # the top without a signal adds nothing
    (got,) = _excite(rules_net, "split", [x], [s1, None, s3])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    assert _excite(rules_net, "split", [x], [None, None, None]) == [None]


@pytest.mark.parametrize("name,method", [("pmax", "max"), ("pave", "ave")])
def test_rule_pooling_through_the_layer(rules_net, name, method):
    rng = np.random.default_rng(16)
    x = _acts(rng, (2, 3, 4, 5), 0.2)
    x[0, 0] = 0.0                              # all-zero windows
    top = _signal(rng, rules_net.blob_shapes[name])
    (got,) = _excite(rules_net, name, [x], [top])
    np.testing.assert_allclose(got.numpy(), naive_eb_pool(x, top, 3, 2, 1, method), rtol=1e-5, atol=1e-7)
