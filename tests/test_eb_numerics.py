"""Excitation Backprop across float32's whole range (hypothesis property tests).

Activations and weights of every magnitude from 1e-45 (subnormal) to 1e38, each EB kernel
(InnerProduct, Convolution, MAX and AVE pooling, Eltwise SUM) and the full walk through a
net: p_EB is finite, every unit in [0, 1], each image's mass at most its top mass, the mass
is conserved wherever Z > 0, and a unit is exactly 0 where the float64 EB gives 0 (Z == 0).
The float64 references below evaluate the plain definition (float64 holds every product of
two float32 numbers). Signed inputs (a data layer) never give NaN. A non-finite input is a
named error at the analysis entry points and a kept unit in guided dropout.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.grad import conv2d_input

from exdrop.engine import eb
from exdrop.proto import io
from exdrop.engine import functional as Fx
from exdrop.engine.nn import ExcitationDropout, excitation_through
from exdrop.engine.pylayer import TEST
from exdrop.engine.net import Net

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
EXP = st.integers(-45, 38)          # magnitudes 1e-45 (subnormal) .. 1e38
SEED = st.integers(0, 2**32 - 1)
ZEROS = st.sampled_from([0.0, 0.3, 0.9])
TINY = 2e-45                        # below float32's smallest subnormal step, doubled


def _arr(rng, shape, exp, signed=False, zeros=0.0, spread=0.0):
    """float32 values of magnitude ~10**exp (spread: decades below it), a fraction zeroed."""
    v = (0.1 + 0.9 * rng.random(shape)) * 10.0 ** (-spread * rng.random(shape))
    if signed:
        v = v * rng.choice([-1.0, 1.0], size=shape)
    v[rng.random(shape) < zeros] = 0.0
    return torch.from_numpy((v * 10.0 ** exp).astype(np.float32))


def _top(rng, shape, exp, zeros=0.0):
    """A top signal: per image a distribution (mass <= 1), scaled by 10**exp (exp <= 0)."""
    t = rng.random(shape) * (rng.random(shape) >= zeros)
    flat = t.reshape(shape[0], -1)
    flat /= np.maximum(flat.sum(1, keepdims=True), 1e-300)
    return torch.from_numpy((t * 10.0 ** exp).astype(np.float32))


def _check(out, ref, top, z_pos_mass):
    """The shared properties; ``ref`` float64, ``z_pos_mass`` the top mass that met Z > 0."""
    top_mass = top.double().flatten(1).sum(1)
    assert torch.isfinite(out).all(), "p_EB must be finite for finite inputs"
    assert out.dtype == torch.float32
    assert (out >= 0).all()
    assert (out <= 1 + 1e-5).all(), f"a unit above 1: {out.max().item()}"
    mass = out.double().flatten(1).sum(1)
    assert (mass <= top_mass * (1 + 1e-5) + TINY).all()
    # mass conserved wherever Z > 0 (relative), and nothing where Z == 0
    np.testing.assert_allclose(mass.numpy(), z_pos_mass.numpy(), rtol=1e-5, atol=TINY * out[0].numel())
    assert (out[ref == 0] == 0).all(), "a unit with float64 p_EB 0 (Z == 0 or no input) got mass"
    # and each unit is the float64 EB value to float32 precision
    err = (out.double() - ref).abs()
    tol = 1e-4 * ref.abs() + 1e-6 * top_mass.view(-1, *[1] * (ref.dim() - 1)) + TINY
    assert (err <= tol).all(), f"max error {err.max().item()} over tolerance"


# ------------------------------------------------------------------ float64 references
def ref_linear(x, w, top):
    x, wp, top = x.double().flatten(1), w.double().clamp_min(0), top.double()
    z = x @ wp.t()
    s = torch.where(z != 0, top / torch.where(z != 0, z, 1.0), 0.0)
    return x * (s @ wp), z


def ref_conv(x, w, top, stride, pad, groups):
    x, wp, top = x.double(), w.double().clamp_min(0), top.double()
    z = F.conv2d(x, wp, None, stride, pad, 1, groups)
    s = torch.where(z != 0, top / torch.where(z != 0, z, 1.0), 0.0)
    return x * conv2d_input(x.shape, wp, s, stride, pad, 1, groups), z


def ref_avg(x, top, k, s, p):
    x, top = x.double(), top.double()
    z = F.avg_pool2d(x, k, s, p, ceil_mode=True, count_include_pad=True)
    sg = torch.where(z != 0, top / torch.where(z != 0, z, 1.0), 0.0)
    back = torch.ops.aten.avg_pool2d_backward(sg, x, [k, k], [s, s], [p, p], True, True, None)
    return x * back, z


def ref_max(x, top, k, s, p):
    _, idx = F.max_pool2d(x.double(), k, s, p, ceil_mode=True, return_indices=True)
    b, c, h, w = x.shape
    out = torch.zeros(b, c, h * w, dtype=torch.float64)
    out.scatter_add_(2, idx.flatten(2), top.double().flatten(2))
    return out.view(b, c, h, w)


def _z_pos_mass(top, z):
    return (top.double() * (z != 0)).flatten(1).sum(1)


# ------------------------------------------------------------------ the kernels
@SETTINGS
@given(SEED, EXP, EXP, st.integers(-40, 0), ZEROS, st.sampled_from([0.0, 3.0]))
def test_eb_linear_any_magnitude(seed, ex, ew, et, zeros, spread):
    rng = np.random.default_rng(seed)
    x = _arr(rng, (3, 17), ex, zeros=zeros, spread=spread)
    w = _arr(rng, (11, 17), ew, signed=True, spread=spread)
    top = _top(rng, (3, 11), et, zeros=zeros)
    out = eb.eb_linear(x, w, top)
    ref, z = ref_linear(x, w, top)
    _check(out, ref, top, _z_pos_mass(top, z))


@SETTINGS
@given(SEED, EXP, EXP, st.integers(-40, 0), ZEROS,
       st.sampled_from([(1, 0, 1), (2, 1, 1), (1, 1, 2), (2, 0, 2)]))
def test_eb_conv2d_any_magnitude(seed, ex, ew, et, zeros, geom):
    stride, pad, groups = geom
    rng = np.random.default_rng(seed)
    x = _arr(rng, (2, 4, 7, 6), ex, zeros=zeros)
    w = _arr(rng, (6, 4 // groups, 3, 3), ew, signed=True)
    ho, wo = (7 + 2 * pad - 3) // stride + 1, (6 + 2 * pad - 3) // stride + 1
    top = _top(rng, (2, 6, ho, wo), et, zeros=zeros)
    out = eb.eb_conv2d(x, w, top, stride, pad, 1, groups)
    ref, z = ref_conv(x, w, top, stride, pad, groups)
    _check(out, ref, top, _z_pos_mass(top, z))


@SETTINGS
@given(SEED, EXP, st.integers(-40, 0), ZEROS, st.sampled_from([(3, 2, 0), (2, 2, 1), (3, 1, 1)]))
def test_eb_pooling_any_magnitude(seed, ex, et, zeros, geom):
    k, s, p = geom
    rng = np.random.default_rng(seed)
    x = _arr(rng, (2, 3, 7, 6), ex, zeros=zeros, spread=2.0)
    oh, ow = F.avg_pool2d(x, k, s, p, ceil_mode=True).shape[2:]
    top = _top(rng, (2, 3, oh, ow), et, zeros=zeros)
    out = eb.eb_avg_pool2d(x, top, k, s, p)
    ref, z = ref_avg(x, top, k, s, p)
    _check(out, ref, top, _z_pos_mass(top, z))
    # max pooling: every window has an argmax, so all of the mass arrives
    outm = eb.eb_max_pool2d(x, top, k, s, p)
    _check(outm, ref_max(x, top, k, s, p), top, top.double().flatten(1).sum(1))


def test_eb_avg_pooling_scales_each_channel_on_its_own():
    """Average pooling never mixes channels, so each (image, channel) is scaled alone: a channel of
    magnitude 1e-30 beside one of 1e30 keeps its EB values (scaled together, it would underflow)."""
    rng = np.random.default_rng(4)
    x = _arr(rng, (2, 2, 6, 6), 0)
    x[:, 0] *= 1e30
    x[:, 1] *= 1e-30
    top = _top(rng, (2, 2, 3, 3), 0)
    out = eb.eb_avg_pool2d(x, top, 2, 2, 0)
    ref, z = ref_avg(x, top, 2, 2, 0)
    _check(out, ref, top, _z_pos_mass(top, z))
    assert (out[:, 1] > 0).all()


@pytest.mark.parametrize("kernel", ["linear", "conv2d"])
def test_eb_scales_each_image_on_its_own(kernel):
    """Images of one batch at magnitudes 1e30 and 1e-30: each keeps its float64 EB values (scaled
    together by the batch's largest value, the small image would underflow to 0)."""
    rng = np.random.default_rng(5)
    if kernel == "linear":
        x, w = _arr(rng, (2, 17), 0), _arr(rng, (11, 17), 0, signed=True)
        top = _top(rng, (2, 11), 0)
    else:
        x, w = _arr(rng, (2, 4, 7, 6), 0), _arr(rng, (6, 4, 3, 3), 0, signed=True)
        top = _top(rng, (2, 6, 5, 4), 0)
    x[0] *= 1e30
    x[1] *= 1e-30
    out = eb.eb_linear(x, w, top) if kernel == "linear" else eb.eb_conv2d(x, w, top)
    ref, z = ref_linear(x, w, top) if kernel == "linear" else ref_conv(x, w, top, 1, 0, 1)
    _check(out, ref, top, _z_pos_mass(top, z))
    assert (out[1] > 0).any()


@SETTINGS
@given(SEED, EXP, EXP, st.integers(-40, 0), ZEROS, st.sampled_from([None, [1.0, 1.0], [2.0, 0.5], [1e-3, 3.0]]))
def test_eb_eltwise_any_magnitude(seed, ea, eb_, et, zeros, coeffs):
    rng = np.random.default_rng(seed)
    a = _arr(rng, (3, 8), ea, zeros=zeros)
    b = _arr(rng, (3, 8), eb_, zeros=zeros)
    top = _top(rng, (3, 8), et)
    pa, pb = eb.eb_eltwise_sum([a, b], top, coeffs)
    c = coeffs or [1.0, 1.0]
    parts = [c[0] * a.double(), c[1] * b.double()]
    z = parts[0] + parts[1]
    s = torch.where(z != 0, top.double() / torch.where(z != 0, z, 1.0), 0.0)
    for out, ref in ((pa, parts[0] * s), (pb, parts[1] * s)):
        assert torch.isfinite(out).all() and (out >= 0).all() and (out <= 1 + 1e-5).all()
        err = (out.double() - ref).abs()
        assert (err <= 1e-5 * ref.abs() + TINY).all()
    np.testing.assert_allclose((pa.double() + pb.double()).sum(1).numpy(), _z_pos_mass(top, z).numpy(),
                               rtol=1e-5, atol=TINY * 8)


@SETTINGS
@given(SEED, EXP, EXP)
def test_eb_signed_inputs_never_nan(seed, ex, ew):
    # a data layer's input is signed: EB values there leave [0, 1], but never become NaN
    rng = np.random.default_rng(seed)
    x = _arr(rng, (3, 17), ex, signed=True, zeros=0.2)
    w = _arr(rng, (11, 17), ew, signed=True)
    top = _top(rng, (3, 11), 0)
    assert not torch.isnan(eb.eb_linear(x, w, top)).any()
    xc = _arr(rng, (2, 3, 6, 6), ex, signed=True, zeros=0.2)
    assert not torch.isnan(eb.eb_conv2d(xc, _arr(rng, (4, 3, 3, 3), ew, signed=True),
                                        _top(rng, (2, 4, 4, 4), 0))).any()
    assert not torch.isnan(eb.eb_avg_pool2d(xc, _top(rng, (2, 3, 3, 3), 0), 2, 2, 0)).any()
    pa, pb = eb.eb_eltwise_sum([x, -x * 0.5], top.repeat(1, 2)[:, :17])
    assert not (torch.isnan(pa).any() or torch.isnan(pb).any())


def test_eb_linear_extreme_cases_by_hand():
    # the failures of the plain float32 formula, one by one
    w = torch.tensor([[1.0, 2.0], [0.5, 0.0]])
    top = torch.tensor([[0.75, 0.25]])
    want = torch.tensor([[0.75 / 5 + 0.25, 0.75 * 4 / 5]])   # x ~ [1, 2] at any scale
    for x in ([[2.0 ** -149, 2.0 ** -148]], [[2.0 ** -139, 2.0 ** -138]], [[1e-30, 2e-30]], [[1.0, 2.0]],
              [[1e30, 2e30]], [[1.5e38, 3e38]]):
        got = eb.eb_linear(torch.tensor(x), w, top)
        assert torch.allclose(got, want, rtol=1e-6), (x, got)
    # a subnormal Z next to a normal one (S = top / Z overflowed: inf, then inf * 0 = NaN)
    x = torch.tensor([[1.0, 1e-40, 0.0]])
    w = torch.tensor([[0.0, 1.0, 5.0], [1e-30, 0.0, 0.0]])
    got = eb.eb_linear(x, w, torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(got, torch.tensor([[0.5, 0.5, 0.0]]), rtol=1e-4) and got[0, 2] == 0   # Z has 15 bits
    # weights at 3e38: Z overflowed to inf and p_EB silently became 0
    got = eb.eb_linear(torch.tensor([[3e38, 3e38]]), torch.tensor([[3e38, 3e38]]), torch.tensor([[1.0]]))
    assert torch.allclose(got, torch.tensor([[0.5, 0.5]]))


def test_eb_exact_where_float32_is_fine():
    # where Caffe's float32 arithmetic neither over- nor underflows, bit for bit the plain formula
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(8, 64, generator=g))
    w = torch.randn(32, 64, generator=g)
    top = torch.softmax(torch.randn(8, 32, generator=g), 1)
    wp = w.clamp_min(0)
    plain = x * (eb.safe_divide(top, x @ wp.t()) @ wp)
    assert torch.equal(eb.eb_linear(x, w, top), plain)
    xc = torch.relu(torch.randn(2, 4, 6, 6, generator=g))
    wc = torch.randn(5, 4, 3, 3, generator=g)
    tc = torch.rand(2, 5, 4, 4, generator=g)
    wcp = wc.clamp_min(0)
    plain = xc * conv2d_input(xc.shape, wcp, eb.safe_divide(tc, F.conv2d(xc, wcp)), 1, 0, 1, 1)
    assert torch.equal(eb.eb_conv2d(xc, wc, tc), plain)


# ------------------------------------------------------------------ the full walk
NET = """
layer { name: "in" type: "Input" top: "data" top: "label"
        input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 5 kernel_size: 3 pad: 1 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1" inner_product_param { num_output: 6 } }
layer { name: "relu3" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""
_NET = {}


def _net():
    if "net" not in _NET:
        _NET["net"] = Net(io.parse_net(NET, "numerics.prototxt"), TEST, source="numerics.prototxt")
    return _NET["net"]


def _ref_walk(net, target_name):
    """The float64 walk over the recorded forward, with the float64 reference rules."""
    def rule(layer):
        g = layer.g
        if layer.type == "Convolution":
            return lambda b, s: [ref_conv(b[0], layer.blobs[0].detach(), s[0], g.stride, g.pad, g.groups)[0]]
        if layer.type == "InnerProduct":
            return lambda b, s: [ref_linear(b[0], layer.blobs[0].detach(), s[0])[0].reshape(b[0].shape)]
        if layer.type == "ReLU":
            return lambda b, s: [torch.where(b[0] > 0, s[0].double(), 0.0)]
        if layer.type == "Pooling" and g.max:
            return lambda b, s: [ref_max(b[0], s[0], g.kernel[0], g.stride[0], g.pad[0])]
        if layer.type == "Pooling":
            return lambda b, s: [ref_avg(b[0], s[0], g.kernel[0], g.stride[0], g.pad[0])[0]]
        raise AssertionError(layer.type)
    target = net.blobs[target_name]
    last = max(k for k, (_, _, tops) in enumerate(net.records) if any(t is target for t in tops))
    steps = [eb.Step(rule(net.layer_list[j]), b, [id(x) for x in b], [id(x) for x in t])
             for j, b, t in net.records[last + 1:] if net.layer_list[j].type != "SoftmaxWithLoss"]
    logits = net.blobs["ip2"]
    sig = eb.top_signal(logits, net.blobs["label"]).double()
    return eb.walk(steps, {id(logits): sig}, id(target))


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(SEED, st.lists(st.integers(-45, 38), min_size=5, max_size=5), st.booleans())
def test_walk_any_magnitude(seed, exps, positive):
    """Activations of any magnitude at every blob: data 10**e0, and each layer's weights chosen
    so that its output lands near 10**e_i (clamped into float32's range)."""
    rng = np.random.default_rng(seed)
    net = _net()
    fan = [27, 36, 5 * 2 * 2, 6]
    act = [float(e) for e in exps]
    with torch.no_grad():
        for i, name in enumerate(("conv1", "conv2", "ip1", "ip2")):
            layer = net.layer(name)
            ew = min(max(act[i + 1] - act[i] - math.log10(fan[i]), -45.0), 38.0)
            w = _arr(rng, tuple(layer.blobs[0].shape), ew, signed=not positive)
            layer.blobs[0].copy_(w)
            layer.blobs[1].copy_(_arr(rng, tuple(layer.blobs[1].shape), act[i + 1] - 1, signed=not positive))
    x = _arr(rng, (2, 3, 8, 8), act[0], signed=not positive)
    label = torch.tensor([0, 2])
    with torch.no_grad():
        net({"data": x, "label": label}, record=True)

    def finite_above(name):           # the inputs of the walk down to blob `name`
        target = net.blobs[name]
        last = max(k for k, (_, _, tops) in enumerate(net.records) if any(t is target for t in tops))
        recs = [r for r in net.records[last + 1:] if net.layer_list[r[0]].type != "SoftmaxWithLoss"]
        return all(torch.isfinite(b).all() for _, bs, _ in recs for b in bs) and all(
            torch.isfinite(p).all() for j, _, _ in recs for p in net.layer_list[j].blobs)

    for name in ("ip1", "pool2", "conv2", "pool1", "conv1"):
        if not finite_above(name):
            with pytest.raises(eb.NonFiniteError):
                net.excitation(name)
            continue
        pe = net.excitation(name)
        ref = _ref_walk(net, name)
        assert torch.isfinite(pe).all() and (pe >= 0).all() and (pe <= 1 + 1e-5).all()
        mass = pe.double().flatten(1).sum(1)
        assert (mass <= 1 + 1e-5).all()
        np.testing.assert_allclose(mass.numpy(), ref.flatten(1).sum(1).numpy(), rtol=1e-4, atol=1e-30)
        assert (pe[ref == 0] == 0).all()


# ------------------------------------------------------------------ non-finite inputs
def test_non_finite_input_is_a_named_error():
    head = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.rand(2, 4)
    x[1, 2] = float("nan")
    with pytest.raises(eb.NonFiniteError, match=r"input of module 0 \(Linear\).*1 NaN"):
        excitation_through(head, x, torch.tensor([0, 1]))
    with torch.no_grad():
        head[2].weight[0, 0] = float("inf")
    with pytest.raises(eb.NonFiniteError, match=r"parameter 'weight' of module 2 \(Linear\)"):
        excitation_through(head, torch.rand(2, 4), torch.tensor([0, 1]))
    # the training step does not check (no host sync): NaN shares keep their units
    pe = excitation_through(head, torch.rand(2, 4), torch.tensor([0, 1]), check_finite=False)
    assert pe.shape == (2, 4)

    net = _net()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.rand_like(p))
        x = torch.rand(2, 3, 8, 8)
        net({"data": x, "label": torch.tensor([0, 1])}, record=True)
        assert torch.isfinite(net.excitation("conv1")).all()
        net.layer("conv2").blobs[0][0, 0, 0, 0] = float("inf")
        net({"data": x, "label": torch.tensor([0, 1])}, record=True)
    with pytest.raises(eb.NonFiniteError, match="numerics.prototxt: excitation.*weight blob 0 of layer 'conv2'"):
        net.excitation("conv1")
    with pytest.raises(eb.NonFiniteError, match="blob 'conv2' \\(bottom of layer 'pool2'\\)"):
        net.excitation("conv2")         # conv2's weights are below the walk; its output is on it


def test_nan_share_keeps_the_unit_and_reaches_the_loss():
    # NaN input -> NaN p_EB -> retain 1 (no invalid probability for torch.bernoulli) -> NaN loss
    head = nn.Sequential(nn.Linear(6, 3))
    drop = ExcitationDropout(head=head, p=0.5).train()
    x = torch.rand(4, 6)
    x[2, 1] = float("nan")
    out = drop(x, target=torch.tensor([0, 1, 2, 0]))
    assert torch.isnan(out[2]).any()
    assert torch.isnan(torch.nn.functional.cross_entropy(head(out), torch.tensor([0, 1, 2, 0])))
    share = torch.tensor([[float("nan"), 0.5, 0.5], [float("inf"), float("-inf"), 0.0]])
    r = Fx.retain_probability(share, 0.5)
    assert torch.isfinite(r).all() and (r >= 0).all() and (r <= 1).all()
    assert r[0, 0] == 1.0 and r[1, 1] == 1.0 and r[1, 0] == 0.0
    # guided dropout on it: a valid draw, the NaN unit kept
    y = Fx.guided_dropout(torch.ones(2, 3), share, 0.5, rescale=False)
    assert y[0, 0] == 1.0 and y[1, 1] == 1.0
