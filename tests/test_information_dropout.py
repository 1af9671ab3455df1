"""Information Dropout (Achille & Soatto, TPAMI 2018): the functional core, the drop-in module, the
Caffe Python layer (layers/information_dropout.py) driven as Caffe drives it, the engine's Python
layer with learnable blobs and a weighted KL top, and real pycaffe against the engine.

    out = f * exp(alpha(x) eps),  eps ~ N(0, 1)        (TRAIN; TEST: out = f)
    alpha(x) = 0.001 + max_alpha sigmoid(x W^T + b)
    KL = mean over images of sum over units of -log(alpha / (max_alpha + 0.001))

The differential tests make the comparison exact in the noise: both sides draw eps from torch's
CPU generator, seeded identically right before each forward (nothing else in these nets draws
from it), and the test checks that the two eps agree.
"""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exdrop.engine import functional as Fx
from exdrop.proto import io as cio
from exdrop.engine import pylayer
from exdrop.engine.layer_types import LayerError
from exdrop.engine.net import Net
from exdrop.engine.nn import InformationDropout
from exdrop.engine.pylayer import TEST, TRAIN
from exdrop.engine.snapshot import load_weights, save_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import rel_err, require_pycaffe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_ALPHA = 0.7

# f = ip1 (post-ReLU, in place), x = pool1 (the input of ip1), the KL weighted by beta = 3.
NET = """
name: "tiny_information"
{force_backward}
layer {{ name: "input" type: "Input" top: "data" top: "label"
  input_param {{ shape {{ dim: 4 dim: 3 dim: 8 dim: 8 }} shape {{ dim: 4 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  convolution_param {{ num_output: 4 kernel_size: 3
    weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
{conv_drop}layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{ num_output: 10
    weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "ip1" top: "ip1" }}
{fc_drop}layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""
FC_DROP = """layer { name: "drop" type: "Python" bottom: "ip1" bottom: "pool1" top: "ip1" top: "drop_kl"
  loss_weight: 0 loss_weight: 3
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  python_param { module: "information_dropout" layer: "InformationDropout" param_str: "%s" } }
"""
# on a convolution blob, alpha from the blob itself (one bottom): a 1x1 convolution, one alpha per element
CONV_DROP = """layer { name: "cdrop" type: "Python" bottom: "conv1" top: "conv1" top: "cdrop_kl"
  loss_weight: 0 loss_weight: 0.5
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  python_param { module: "information_dropout" layer: "InformationDropout" param_str: "%s" } }
"""


def net_text(kind: str = "fc", param_str: str = "{'max_alpha': 0.7}", force_backward: bool = False) -> str:
    return NET.format(force_backward="force_backward: true" if force_backward else "",
                      fc_drop=FC_DROP % param_str if kind == "fc" else "",
                      conv_drop=CONV_DROP % param_str if kind == "conv" else "")


def write_net(tmp_path, kind="fc", param_str="{'max_alpha': 0.7}", force_backward=False) -> Path:
    path = tmp_path / f"info_{kind}.prototxt"
    path.write_text(net_text(kind, param_str, force_backward))
    return path


def engine(path, phase=TRAIN, seed=0) -> Net:
    torch.manual_seed(seed)
    return Net(cio.read_net_prototxt(path), phase, "cpu", str(path))


def inputs(seed=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((4, 3, 8, 8)).astype(np.float32), np.array([0, 1, 2, 1], np.float32)


def feed(x, y):
    return {"data": torch.from_numpy(x.copy()), "label": torch.from_numpy(y.copy())}


# ------------------------------------------------------------------ the functional core
def test_kl_is_the_closed_form_on_given_alpha():
    rng = np.random.default_rng(0)
    alpha = rng.uniform(0.001, 0.001 + MAX_ALPHA, (5, 7))
    want = np.mean(np.sum(-np.log(alpha / (MAX_ALPHA + 0.001)), axis=1))
    got = Fx.information_kl(torch.from_numpy(alpha), MAX_ALPHA)
    assert got.shape == () and got.item() == pytest.approx(want, rel=1e-12)
    # a convolution blob sums over channels and space
    alpha4 = rng.uniform(0.001, 0.701, (3, 2, 4, 4))
    want4 = np.mean(np.sum(-np.log(alpha4 / 0.701), axis=(1, 2, 3)))
    assert Fx.information_kl(torch.from_numpy(alpha4), MAX_ALPHA).item() == pytest.approx(want4, rel=1e-12)
    # zero at the largest noise, log(701) per unit at the smallest
    at_max, at_min = (torch.full((2, 3), a, dtype=torch.float64) for a in (0.701, 0.001))
    assert Fx.information_kl(at_max, MAX_ALPHA).item() == pytest.approx(0, abs=1e-12)
    assert Fx.information_kl(at_min, MAX_ALPHA).item() == pytest.approx(3 * math.log(701))


def test_alpha_range_and_its_formula():
    x = torch.linspace(-40, 40, 201, dtype=torch.float64).reshape(201, 1)
    w, b = torch.ones(3, 1, dtype=torch.float64), torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    alpha = Fx.information_alpha(x, w, b, MAX_ALPHA)
    assert alpha.min() >= 0.001 and alpha.max() <= 0.001 + MAX_ALPHA
    assert alpha.min().item() == pytest.approx(0.001, abs=1e-12)          # sigmoid(-40) ~ 4e-18
    assert alpha.max().item() == pytest.approx(0.001 + MAX_ALPHA, abs=1e-12)
    want = 0.001 + MAX_ALPHA / (1 + torch.exp(-(x @ w.t() + b)))
    assert torch.allclose(alpha, want, rtol=1e-12, atol=0)
    # x is flattened like InnerProduct's bottom; a 4-D weight is a 1x1 convolution
    x4 = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    w2 = torch.randn(5, 12, dtype=torch.float64)
    assert torch.allclose(Fx.information_alpha(x4, w2, None, 0.3), 0.001 + 0.3 * torch.sigmoid(x4.flatten(1) @ w2.t()))
    wc = torch.randn(4, 3, 1, 1, dtype=torch.float64)
    want_c = 0.001 + 0.3 * torch.sigmoid(torch.einsum("ck,bkhw->bchw", wc[:, :, 0, 0], x4))
    assert torch.allclose(Fx.information_alpha(x4, wc, None, 0.3), want_c)


def test_noise_is_log_normal_with_scale_alpha():
    """log(out / f) / alpha ~ N(0, 1), element by element, on a large tensor."""
    torch.manual_seed(0)
    f = torch.rand(256, 1024) + 0.5
    x = torch.randn(256, 16)
    w, b = torch.randn(1024, 16) * 0.5, torch.zeros(1024)
    out, _ = Fx.information_dropout(f, x, w, b, MAX_ALPHA, training=True)
    alpha = Fx.information_alpha(x, w, b, MAX_ALPHA)
    assert alpha.std() > 0.05, "alpha must vary for the test to check the per-element scale"
    z = (torch.log(out / f) / alpha).double()
    n = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert z.std().item() == pytest.approx(1.0, abs=0.01)
    assert abs((z ** 3).mean().item()) < 0.03                      # symmetric
    assert (z.abs() < 1).double().mean().item() == pytest.approx(0.6827, abs=0.005)
    # the scale is per element: the units with the largest alpha spread their log-output most
    hi = alpha > alpha.quantile(0.9)
    lo = alpha < alpha.quantile(0.1)
    assert torch.log(out / f)[hi].std() > 2 * torch.log(out / f)[lo].std()


def test_identity_at_test_and_the_kl_still_reported():
    mod = InformationDropout(units=6, in_features=5, max_alpha=MAX_ALPHA).eval()
    f, x = torch.rand(3, 6), torch.randn(3, 5)
    state = torch.get_rng_state()
    out, kl = mod(f, x, return_kl=True)
    assert out is f and torch.equal(torch.get_rng_state(), state)   # nothing drawn
    alpha = Fx.information_alpha(x, mod.weight, mod.bias, MAX_ALPHA)
    assert kl.item() == pytest.approx(Fx.information_kl(alpha, MAX_ALPHA).item())
    assert not torch.equal(mod.train()(f, x), f)


@pytest.mark.parametrize("case", ["fc_x", "fc_self", "conv_x"])
def test_module_gradients_by_finite_differences(case):
    """d/d(f, x, W, b) of sum(out * G) + beta KL with a fixed eps, against central differences."""
    g = torch.Generator().manual_seed(1)
    if case == "fc_x":
        f_shape, x_shape, w_shape = (3, 5), (3, 2, 2, 2), (5, 8)
    elif case == "fc_self":
        f_shape, x_shape, w_shape = (3, 5), None, (5, 5)
    else:
        f_shape, x_shape, w_shape = (2, 3, 2, 2), (2, 4, 2, 2), (3, 4, 1, 1)
    f = (torch.rand(f_shape, generator=g, dtype=torch.float64) + 0.2).requires_grad_()
    x = None if x_shape is None else torch.randn(x_shape, generator=g, dtype=torch.float64).requires_grad_()
    w = (torch.randn(w_shape, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    b = torch.randn(w_shape[0], generator=g, dtype=torch.float64).requires_grad_()
    eps = torch.randn(f_shape, generator=g, dtype=torch.float64)
    G = torch.randn(f_shape, generator=g, dtype=torch.float64)

    def objective(ff, ww, bb, xx=None):
        out, kl = Fx.information_dropout(ff, xx, ww, bb, MAX_ALPHA, training=True, eps=eps)
        return (out * G).sum() + 3.0 * kl

    args = (f, w, b) + (() if x is None else (x,))
    assert torch.autograd.gradcheck(objective, args, eps=1e-6, atol=1e-7, rtol=1e-5)
    # the module computes that function from its own parameters, eps from torch's generator
    mod = InformationDropout(units=w_shape[0], in_features=w_shape[1], spatial=len(w_shape) == 4).double()
    with torch.no_grad():
        mod.weight.copy_(w), mod.bias.copy_(b)
    torch.manual_seed(4)
    out, kl = mod(f, x, return_kl=True)
    torch.manual_seed(4)
    want, want_kl = Fx.information_dropout(f, x, w, b, MAX_ALPHA, eps=Fx.information_noise(f).double())
    assert torch.allclose(out, want, rtol=1e-12) and mod.kl is kl and kl.item() == pytest.approx(want_kl.item())
    ((out * G).sum() + 3.0 * kl).backward()
    want_grads = torch.autograd.grad((want * G).sum() + 3.0 * want_kl, (w, b))
    assert torch.allclose(mod.weight.grad, want_grads[0]) and torch.allclose(mod.bias.grad, want_grads[1])


def test_module_parameters_init_and_errors():
    torch.manual_seed(0)
    mod = InformationDropout(units=300, in_features=200)
    assert mod.weight.shape == (300, 200) and mod.bias.shape == (300,)
    assert mod.weight.std().item() == pytest.approx(math.sqrt(2 / 200), rel=0.02)   # msra, fan_in D_x
    assert torch.equal(mod.bias, torch.zeros(300))
    m2 = InformationDropout(units=4, in_features=3, weight_std=0.0, bias=0.5)
    assert torch.equal(m2.weight, torch.zeros(4, 3)) and torch.equal(m2.bias, torch.full((4,), 0.5))
    assert InformationDropout(units=4, spatial=True).weight.shape == (4, 4, 1, 1)
    with pytest.raises(ValueError, match="max_alpha must be a finite number > 0"):
        InformationDropout(units=3, max_alpha=0)
    with pytest.raises(ValueError, match="built without `units`"):
        InformationDropout()(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"1x1 convolution of its input, which must be \(B, C_x, 4, 5\), got \(2, 12\)$"):
        Fx.information_blobs((2, 3, 4, 5), (2, 12))
    with pytest.raises(ValueError, match=r"^max_alpha must be > 0, got 0.0$"):
        Fx.information_dropout(torch.ones(2, 3), None, torch.ones(3, 3), torch.zeros(3), max_alpha=0.0)


def test_information_blobs_default_bias_is_zero_and_both_blobs_are_float32_whatever_the_default_dtype():
    """Caffe's blobs are float32: the filled weight and bias stay float32 under a float64 default."""
    weight, bias = Fx.information_blobs((2, 5), (2, 3))
    assert torch.equal(bias, torch.zeros(5)) and weight.shape == (5, 3)
    assert Fx.information_blobs((2, 5))[0].shape == (5, 5)   # alpha from the noised blob itself
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        blobs = Fx.information_blobs((2, 5), (2, 3), bias=0.25)
    finally:
        torch.set_default_dtype(saved)
    assert [b.dtype for b in blobs] == [torch.float32, torch.float32] and torch.all(blobs[1] == 0.25)


# ------------------------------------------------------------------ the Caffe layer, as Caffe drives it
class Blob:
    """What a Caffe Python layer sees of a blob; a new one holds nothing until a layer reshapes it
    (Caffe's ``Net`` makes each top an empty ``Blob``)."""

    def __init__(self, arr=None, shape=(0,)):
        self.data = np.array(arr, np.float32) if arr is not None else np.zeros(shape, np.float32)
        self.diff = np.zeros_like(self.data)

    def reshape(self, *shape):
        if tuple(self.data.shape) != tuple(shape):
            self.data = np.zeros(shape, np.float32)
            self.diff = np.zeros(shape, np.float32)


class BlobVec(list):
    """pycaffe's ``layer.blobs`` (a BlobVec with ``add_blob(*shape)``)."""

    def add_blob(self, *shape):
        self.append(Blob(shape=shape))


@pytest.fixture
def layer_cls():
    """The Caffe layer class, imported against the engine's stand-in caffe.Layer (process restored after)."""
    names = ("caffe", "information_dropout", "layers.information_dropout")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.modules["caffe"] = pylayer._STAND_IN
    try:
        spec = importlib.util.spec_from_file_location("layers.information_dropout",
                                                      ROOT / "layers" / "information_dropout.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["information_dropout"] = sys.modules["layers.information_dropout"] = mod
        spec.loader.exec_module(mod)
        assert issubclass(mod.InformationDropout, pylayer._STAND_IN.Layer)
        yield mod.InformationDropout
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def caffe_layer(cls, bottoms, n_top=2, phase=TRAIN, param_str="{'max_alpha': 0.7}", blobs=None):
    layer = cls()
    layer.param_str, layer.phase, layer.blobs = param_str, phase, BlobVec()
    top = [Blob() for _ in range(n_top)]
    layer.setup(bottoms, top)
    if blobs is not None:
        for blob, value in zip(layer.blobs, blobs):
            blob.data[...] = value
    return layer


def run_caffe_layer(layer, f, x, top_diff=None, kl_weight=3.0, n_top=2, seed=0):
    """Forward (in place, top[0] is bottom[0], as in the prototxt) and, if ``top_diff``, backward:
    (top data, kl, diff of f, diff of x)."""
    fb = Blob(f)
    bottom = [fb] if x is None else [fb, Blob(x)]
    top = [fb] + [Blob() for _ in range(n_top - 1)]
    layer.reshape(bottom, top)
    if n_top > 1:
        assert top[1].data.shape == ()
        top[1].diff[...] = kl_weight           # Caffe's SetLossWeights
    torch.manual_seed(seed)
    layer.forward(bottom, top)
    out, kl = fb.data.copy(), (float(top[1].data) if n_top > 1 else None)
    if top_diff is None:
        return out, kl, None, None
    fb.diff[...] = top_diff
    layer.backward(top, [True] * len(bottom), bottom)
    return out, kl, fb.diff.copy(), (None if x is None else bottom[1].diff.copy())


CASES = {"fc_x": ((4, 6), (4, 2, 3, 3)), "fc_self": ((4, 6), None), "conv_x": ((2, 3, 3, 3), (2, 4, 3, 3))}


def _case_arrays(case, seed=2):
    rng = np.random.default_rng(seed)
    f_shape, x_shape = CASES[case]
    f = np.maximum(rng.standard_normal(f_shape), 0).astype(np.float32) + 0.1
    x = None if x_shape is None else rng.standard_normal(x_shape).astype(np.float32)
    return f, x, rng.standard_normal(f_shape).astype(np.float32)


@pytest.mark.parametrize("case", list(CASES))
def test_caffe_layer_forward_backward_matches_autograd_and_finite_differences(layer_cls, case):
    f, x, G = _case_arrays(case)
    layer = caffe_layer(layer_cls, [Blob(f)] + ([] if x is None else [Blob(x)]))
    w, b = layer.blobs[0].data.copy(), layer.blobs[1].data.copy()
    w *= 3   # a spread of alphas
    layer.blobs[0].data[...] = w
    out, kl, df, dx = run_caffe_layer(layer, f, x, G, kl_weight=3.0)
    dw, db = layer.blobs[0].diff.copy(), layer.blobs[1].diff.copy()

    # the same eps, autograd through the functional core
    torch.manual_seed(0)
    eps = torch.randn(f.shape)
    tf, tw, tb = (torch.from_numpy(a.copy()).requires_grad_() for a in (f, w, b))
    tx = None if x is None else torch.from_numpy(x.copy()).requires_grad_()
    t_out, t_kl = Fx.information_dropout(tf, tx, tw, tb, MAX_ALPHA, training=True, eps=eps)
    ((t_out * torch.from_numpy(G)).sum() + 3.0 * t_kl).backward()
    assert np.allclose(out, t_out.detach().numpy(), rtol=1e-6, atol=1e-7) and kl == pytest.approx(t_kl.item(), rel=1e-6)
    for name, got, want in (("f", df, tf.grad), ("W", dw, tw.grad), ("b", db, tb.grad)) + \
            ((("x", dx, tx.grad),) if x is not None else ()):
        assert rel_err(got, want.numpy()) < 1e-5, name

    # central differences of the layer's own forward, float32: a direction per blob
    rng = np.random.default_rng(9)

    def objective(f_, x_, w_, b_):
        layer.blobs[0].data[...], layer.blobs[1].data[...] = w_, b_
        o, k, _, _ = run_caffe_layer(layer, f_, x_)
        return float(np.sum(o.astype(np.float64) * G) + 3.0 * k)

    h = 1e-2
    for name, grad in (("f", df), ("W", dw), ("b", db)) + ((("x", dx),) if x is not None else ()):
        base = {"f": f, "x": x, "W": w, "b": b}
        d = rng.standard_normal(grad.shape).astype(np.float32)
        plus = {k: (v + h * d if k == name else v) for k, v in base.items()}
        minus = {k: (v - h * d if k == name else v) for k, v in base.items()}
        fd = (objective(plus["f"], plus["x"], plus["W"], plus["b"]) -
              objective(minus["f"], minus["x"], minus["W"], minus["b"])) / (2 * h)
        assert float(np.sum(grad * d)) == pytest.approx(fd, rel=2e-2, abs=1e-3), name


def test_caffe_layer_reads_the_loss_weight_and_accumulates_param_diffs(layer_cls):
    f, x, G = _case_arrays("fc_x")
    base = caffe_layer(layer_cls, [Blob(f), Blob(x)])
    blobs = [b.data.copy() for b in base.blobs]
    grads = {}
    for weight in (0.0, 1.0, 3.0):
        layer = caffe_layer(layer_cls, [Blob(f), Blob(x)], blobs=blobs)
        _, _, df, dx = run_caffe_layer(layer, f, x, G, kl_weight=weight)
        grads[weight] = (layer.blobs[0].diff.copy(), layer.blobs[1].diff.copy(), dx, df)
    for i in range(4):
        kl_part = grads[1.0][i] - grads[0.0][i]
        assert np.allclose(grads[3.0][i], grads[0.0][i] + 3 * kl_part, rtol=1e-4, atol=1e-5), i
    assert np.abs(grads[1.0][0] - grads[0.0][0]).max() > 1e-3       # the KL does reach W
    assert np.array_equal(grads[1.0][3], grads[0.0][3])             # ... but not f (alpha is a map of x)
    # b's KL gradient in closed form: -w / B * sum over images of max_alpha s (1 - s) / alpha
    alpha, gate = Fx.information_alpha(torch.from_numpy(x), torch.from_numpy(blobs[0]), torch.from_numpy(blobs[1]),
                                       MAX_ALPHA, with_gate=True)
    want_db = -(MAX_ALPHA * gate * (1 - gate) / alpha).sum(0).numpy() / f.shape[0]
    assert np.allclose(grads[1.0][1] - grads[0.0][1], want_db, rtol=1e-4, atol=1e-6)
    # a second backward adds into the parameter diffs (Caffe zeroes them once per iteration)
    layer = caffe_layer(layer_cls, [Blob(f), Blob(x)], blobs=blobs)
    run_caffe_layer(layer, f, x, G)
    run_caffe_layer(layer, f, x, G)
    assert np.allclose(layer.blobs[0].diff, 2 * grads[3.0][0], rtol=1e-5, atol=1e-6)


def test_caffe_layer_test_phase_identity_and_setup(layer_cls):
    f, x, G = _case_arrays("fc_x")
    layer = caffe_layer(layer_cls, [Blob(f), Blob(x)], phase=TEST)
    assert [b.data.shape for b in layer.blobs] == [(6, 18), (6,)]
    torch.manual_seed(0)              # what run_caffe_layer seeds before the forward
    state = torch.get_rng_state()
    out, kl, df, dx = run_caffe_layer(layer, f, x, G)
    assert np.array_equal(out, f) and np.array_equal(df, G) and torch.equal(torch.get_rng_state(), state)
    alpha = Fx.information_alpha(torch.from_numpy(x), *(torch.from_numpy(b.data) for b in layer.blobs), MAX_ALPHA)
    assert kl == pytest.approx(Fx.information_kl(alpha, MAX_ALPHA).item(), rel=1e-6)
    # one top: no KL, and the setup / param_str checks
    one = caffe_layer(layer_cls, [Blob(f), Blob(x)], n_top=1)
    assert run_caffe_layer(one, f, x, n_top=1)[1] is None
    fixed = caffe_layer(layer_cls, [Blob(f), Blob(x)], param_str="{'weight_std': 0, 'bias': 2.0}")
    assert not fixed.blobs[0].data.any() and np.all(fixed.blobs[1].data == 2.0)
    for bad, msg in (("{'max_alpha': 0}", "max_alpha must be a finite number > 0"),
                     ("{'weight_std': -1}", "weight_std must be None or a finite number >= 0"),
                     ("{'bias': True}", r"bias must be a finite number, got True$"),
                     ("{'bias': 1e999}", r"bias must be a finite number, got inf$"),
                     ("{'bias': 'x'}", r"bias must be a finite number, got 'x'$"),
                     ("{'p': 0.5}", r"unknown param_str keys \['p'\]")):
        with pytest.raises(ValueError, match=msg):
            caffe_layer(layer_cls, [Blob(f), Blob(x)], param_str=bad)
    with pytest.raises(Exception, match="takes bottoms f"):
        caffe_layer(layer_cls, [Blob(f), Blob(x), Blob(x)])


def test_caffe_layer_with_one_top_has_no_kl_gradient(layer_cls):
    """Without the KL top nothing weights the KL: the gradients are those of two tops at loss_weight 0
    (the first top's diff is not read as a loss weight)."""
    f, x, G = _case_arrays("fc_x")
    blobs = [b.data.copy() for b in caffe_layer(layer_cls, [Blob(f), Blob(x)]).blobs]
    grads = []
    for n_top, kl_weight in ((1, None), (2, 0.0)):
        layer = caffe_layer(layer_cls, [Blob(f), Blob(x)], n_top=n_top, blobs=blobs)
        _, _, df, dx = run_caffe_layer(layer, f, x, G, kl_weight=kl_weight, n_top=n_top)
        grads.append([layer.blobs[0].diff.copy(), layer.blobs[1].diff.copy(), df, dx])
    for one, two in zip(*grads):
        np.testing.assert_array_equal(one, two)
    assert np.abs(grads[0][0]).max() > 0   # the data term does reach W


# ------------------------------------------------------------------ the engine
def test_engine_net_loss_learnable_blobs_and_caffemodel_round_trip(tmp_path):
    path = write_net(tmp_path)
    net = engine(path)
    drop = net.layer("drop")
    assert net.loss_weights == {"loss": 1.0, "drop_kl": 3.0}       # top 0's loss_weight 0 honoured
    assert "drop_kl" in net.outputs
    entries = {e.name: e for e in net.learnable()}
    assert (entries["drop.0"].lr_mult, entries["drop.0"].decay_mult) == (1, 1)
    assert (entries["drop.1"].lr_mult, entries["drop.1"].decay_mult) == (2, 0)
    assert entries["drop.0"].tensor is drop.blobs[0] and tuple(drop.blobs[0].shape) == (10, 36)
    assert drop.blobs[0].std().item() == pytest.approx(math.sqrt(2 / 36), rel=0.25)   # msra on D_x = 36
    assert not drop.blobs[1].any()

    x, y = inputs()
    blobs = net(feed(x, y))
    assert blobs["drop_kl"].shape == ()
    total = net.loss(blobs)
    assert total.item() == pytest.approx(blobs["loss"].item() + 3 * blobs["drop_kl"].item(), rel=1e-6)
    total.backward()
    assert drop.blobs[0].grad.abs().sum() > 0 and drop.blobs[1].grad.abs().sum() > 0
    assert net.layer("conv1").blobs[0].grad.abs().sum() > 0   # x = pool1 passes gradient down

    model = tmp_path / "w.caffemodel"
    save_weights(net, model)
    saved = {lp.name: lp for lp in cio.read_caffemodel(model).layer}
    assert [tuple(b.shape.dim) for b in saved["drop"].blobs] == [(10, 36), (10,)]
    other = engine(path, TEST, seed=99)
    assert not torch.equal(other.layer("drop").blobs[0], drop.blobs[0])
    load_weights(other, model, strict_missing=True)
    for a, b in zip(other.layer("drop").blobs, drop.blobs):
        assert torch.equal(a, b)
    # the test net shares the train net's blobs, as Caffe's solver does
    test_net = engine(path, TEST, seed=5)
    test_net.share_weights_from(net)
    with torch.no_grad():
        drop.blobs[1].add_(1.0)
    out = test_net(feed(x, y))
    alpha = Fx.information_alpha(out["pool1"], drop.blobs[0], drop.blobs[1], MAX_ALPHA)
    assert out["drop_kl"].item() == pytest.approx(Fx.information_kl(alpha, MAX_ALPHA).item(), rel=1e-6)


def test_engine_test_phase_is_the_identity(tmp_path):
    path = write_net(tmp_path)
    net = engine(path, TEST)
    x, y = inputs()
    state = torch.get_rng_state()
    with torch.no_grad():
        blobs = net(feed(x, y))
    assert torch.equal(torch.get_rng_state(), state)
    ip1 = net.layer("ip1")
    want = torch.relu(blobs["pool1"].flatten(1) @ ip1.blobs[0].t() + ip1.blobs[1])
    assert torch.allclose(blobs["ip1"], want, rtol=1e-6, atol=1e-7)
    assert blobs["drop_kl"].item() > 0


def test_engine_gradients_equal_the_caffe_layers_backward(tmp_path, layer_cls):
    """Same bottoms, same eps, same top diffs: autograd in the engine = the hand-written backward."""
    path = write_net(tmp_path)
    net = engine(path)
    x, y = inputs()
    drop = net.layer("drop")
    seen = {}
    hook = drop.register_forward_pre_hook(lambda m, args: seen.update(f=args[0], x=args[1]))
    torch.manual_seed(11)
    blobs = net(feed(x, y))
    hook.remove()
    for t in (seen["f"], seen["x"], blobs["ip1"]):
        t.retain_grad()
    net.loss(blobs).backward()
    f, xin = seen["f"].detach().numpy(), seen["x"].detach().numpy()
    layer = caffe_layer(layer_cls, [Blob(f), Blob(xin)], blobs=[b.detach().numpy() for b in drop.blobs])
    out, kl, df, dx = run_caffe_layer(layer, f, xin, blobs["ip1"].grad.numpy(), kl_weight=3.0, seed=11)
    assert np.allclose(out, blobs["ip1"].detach().numpy(), rtol=1e-6, atol=1e-7)
    assert kl == pytest.approx(blobs["drop_kl"].item(), rel=1e-6)
    assert rel_err(layer.blobs[0].diff, drop.blobs[0].grad.numpy()) < 1e-5
    assert rel_err(layer.blobs[1].diff, drop.blobs[1].grad.numpy()) < 1e-5
    assert rel_err(df, seen["f"].grad.numpy()) < 1e-5
    # pool1 also feeds ip1: the engine's gradient there is the sum, the layer's part is dx
    ip1_w = net.layer("ip1").blobs[0].detach()
    relu_mask = (seen["f"] > 0).float()
    via_ip1 = ((seen["f"].grad * relu_mask) @ ip1_w).reshape(xin.shape).numpy()
    assert rel_err(dx + via_ip1, seen["x"].grad.numpy()) < 1e-5


def test_engine_conv_blob_one_bottom(tmp_path):
    path = write_net(tmp_path, "conv")
    net = engine(path)
    cdrop = net.layer("cdrop")
    assert [tuple(b.shape) for b in cdrop.blobs] == [(4, 4, 1, 1), (4,)]
    assert net.loss_weights == {"loss": 1.0, "cdrop_kl": 0.5}
    x, y = inputs()
    blobs = net(feed(x, y))
    assert blobs["conv1"].shape == (4, 4, 6, 6) and blobs["cdrop_kl"].shape == ()
    net.loss(blobs).backward()
    assert cdrop.blobs[0].grad.abs().sum() > 0


@pytest.mark.parametrize("text, msg", [
    (FC_DROP.replace('bottom: "pool1"', 'bottom: "pool1" bottom: "data"') % "{}",
     "takes 1..2 bottoms, the prototxt gives 3"),
    (FC_DROP % "{'max_alpha': -1}", "max_alpha must be a finite number > 0"),
    (FC_DROP % "{'maxalpha': 1}", "unknown param_str keys"),
    (FC_DROP.replace('bottom: "pool1"', 'bottom: "label"') % "{}", "batch size"),
])
def test_engine_errors_name_the_layer(tmp_path, text, msg):
    path = tmp_path / "bad.prototxt"
    path.write_text(NET.format(force_backward="", fc_drop=text, conv_drop=""))
    with pytest.raises(LayerError, match=f"layer 'drop'.*{msg}"):
        Net(cio.read_net_prototxt(path), TRAIN, "cpu", str(path))
    bad_conv = CONV_DROP.replace('bottom: "conv1" top', 'bottom: "conv1" bottom: "data" top') % "{}"
    path.write_text(NET.format(force_backward="", fc_drop="", conv_drop=bad_conv))
    with pytest.raises(LayerError, match=r"layer 'cdrop'.*1x1 convolution of its input"):
        Net(cio.read_net_prototxt(path), TRAIN, "cpu", str(path))


EB_NET = """
name: "eb_head"
layer { name: "input" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 5 dim: 12 } shape { dim: 5 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 16 weight_filler { type: "gaussian" std: 0.4 }
                        bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ed" type: "Python" bottom: "ip1" top: "ip1"
  python_param { module: "excitation_dropout" layer: "ExcitationDropout" param_str: "{'dropout_ratio': 0.5}" } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 8 weight_filler { type: "gaussian" std: 0.4 }
                        bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu2" type: "ReLU" bottom: "ip2" top: "ip2" }
%s
layer { name: "ip3" type: "InnerProduct" bottom: "ip2" top: "ip3"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.4 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip3" bottom: "label" top: "loss" }
"""
EB_INFO = """layer { name: "info" type: "Python" bottom: "ip2" bottom: "ip1" top: "ip2" top: "info_kl"
  loss_weight: 0 loss_weight: 1
  python_param { module: "information_dropout" layer: "InformationDropout" param_str: "{}" } }"""


def test_excitation_backprop_passes_an_information_dropout_in_the_head(tmp_path):
    """ED at ip1 with Information Dropout above it (two bottoms, two tops): the head pass takes
    it as the identity (no noise drawn), so p_EB equals that of the same net without it."""
    weights = tmp_path / "eb.caffemodel"

    def p_eb(text):
        path = tmp_path / "eb.prototxt"
        path.write_text(text)
        net = Net(cio.read_net_prototxt(path), TRAIN, "cpu", str(path))
        if weights.exists():
            assert load_weights(net, weights) == ["ip1", "ip2", "ip3"]   # the same weights, the info layer aside
        else:
            save_weights(net, weights)
        seen = []
        net.layer("ed").module.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
        x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))
        blobs = net({"data": x, "label": torch.tensor([0.0, 1, 2, 0, 1])})
        net.loss(blobs).backward()
        return seen[0], blobs

    with_info, blobs = p_eb(EB_NET % EB_INFO)
    without, _ = p_eb(EB_NET % "")
    assert "info_kl" in blobs and blobs["info_kl"].item() > 0
    sums = with_info.sum(1)
    assert torch.allclose(sums[sums > 0], torch.ones_like(sums[sums > 0]), atol=1e-5) and (sums > 0).any()
    assert torch.equal(with_info, without)


# ------------------------------------------------------------------ real pycaffe against the engine
@pytest.fixture(scope="module")
def caffe():
    require_pycaffe("Information Dropout inside real Caffe")
    from exdrop.caffe.backend import load_caffe
    return load_caffe()


@pytest.mark.caffe
@pytest.mark.parametrize("kind", ["fc", "conv"])
def test_caffe_and_engine_agree_forward_loss_and_gradients(caffe, tmp_path, kind):
    path = write_net(tmp_path, kind, force_backward=True)
    layer_name, kl_top = ("drop", "drop_kl") if kind == "fc" else ("cdrop", "cdrop_kl")
    cnet = caffe.Net(str(path), caffe.TRAIN)
    assert [b.data.shape for b in cnet.params[layer_name]] == \
        ([(10, 36), (10,)] if kind == "fc" else [(4, 4, 1, 1), (4,)])
    weights = tmp_path / "caffe_init.caffemodel"
    cnet.save(str(weights))                    # Caffe writes the Python layer's blobs by layer name
    enet = engine(path, TRAIN, seed=42)
    assert load_weights(enet, weights, strict_missing=True)
    for i, b in enumerate(cnet.params[layer_name]):
        assert np.array_equal(enet.layer(layer_name).blobs[i].detach().numpy(), b.data)

    x, y = inputs()
    cnet.blobs["data"].data[...], cnet.blobs["label"].data[...] = x, y
    torch.manual_seed(123)
    caffe_loss = cnet._forward(0, len(cnet.layers) - 1)    # Caffe's own total: sum of weighted loss tops
    torch.manual_seed(123)
    eblobs = enet({"data": torch.from_numpy(x.copy()).requires_grad_(), "label": torch.from_numpy(y.copy())})
    for t in eblobs.values():
        if t.requires_grad:
            t.retain_grad()
    eloss = enet.loss(eblobs)
    errs = {n: rel_err(eblobs[n].detach().numpy(), cnet.blobs[n].data) for n in eblobs if n in cnet.blobs}
    print(f"[information-dropout] {kind} forward rel err: { {k: f'{v:.1e}' for k, v in errs.items()} }")
    assert max(errs.values()) < 1e-5, errs
    assert float(cnet.blob_loss_weights[kl_top]) == enet.loss_weights[kl_top]
    assert eloss.item() == pytest.approx(caffe_loss, rel=1e-5)
    assert caffe_loss == pytest.approx(float(cnet.blobs["loss"].data) + enet.loss_weights[kl_top] *
                                       float(cnet.blobs[kl_top].data), rel=1e-6)
    # (the noised blob agreeing to float precision means the two eps are the same draw: another
    # draw would move it by alpha * |eps difference| ~ 0.3)
    noised = "ip1" if kind == "fc" else "conv1"

    cnet.clear_param_diffs()
    cnet.backward()
    eloss.backward()
    gerrs = {f"{n}[{i}]": rel_err(enet.layer(n).blobs[i].grad.numpy(), b.diff)
             for n, bs in cnet.params.items() for i, b in enumerate(bs)}
    gerrs["data"] = rel_err(eblobs["data"].grad.numpy(), cnet.blobs["data"].diff)
    print(f"[information-dropout] {kind} gradient rel err: { {k: f'{v:.1e}' for k, v in gerrs.items()} }")
    assert max(gerrs.values()) < 1e-4, gerrs
    assert np.abs(cnet.params[layer_name][0].diff).sum() > 0

    # TEST phase: the identity, and the same KL reported
    tnet = caffe.Net(str(path), str(weights), caffe.TEST)
    tnet.blobs["data"].data[...], tnet.blobs["label"].data[...] = x, y
    tnet.forward()
    etest = engine(path, TEST)
    load_weights(etest, weights)
    with torch.no_grad():
        tblobs = etest(feed(x, y))
    for n in (noised, kl_top, "ip2", "loss"):
        assert rel_err(tblobs[n].numpy(), tnet.blobs[n].data) < 1e-5, n


SOLVER = """net: "{net}"
base_lr: 0.05
momentum: 0.9
weight_decay: 0.01
lr_policy: "fixed"
type: "SGD"
max_iter: 10
display: 0
snapshot: 0
snapshot_prefix: "{prefix}"
solver_mode: CPU
random_seed: 1
"""


@pytest.mark.caffe
def test_caffe_solver_steps_train_the_layer_like_the_engine(caffe, tmp_path):
    from exdrop.engine.solver import make_solver
    path = write_net(tmp_path)
    sp_path = tmp_path / "solver.prototxt"
    sp_path.write_text(SOLVER.format(net=path.resolve(), prefix=tmp_path / "snap"))
    solver = caffe.get_solver(str(sp_path))
    cnet = solver.net
    init = tmp_path / "init.caffemodel"
    cnet.save(str(init))
    start = [b.data.copy() for b in cnet.params["drop"]]
    x, y = inputs(5)
    caffe_after = []
    for step in range(2):
        cnet.blobs["data"].data[...], cnet.blobs["label"].data[...] = x, y
        torch.manual_seed(1000 + step)
        solver.step(1)
        caffe_after.append({n: [b.data.copy() for b in bs] for n, bs in cnet.params.items()})
    moved = [np.abs(a - b).max() for a, b in zip(caffe_after[-1]["drop"], start)]
    assert min(moved) > 1e-4, moved          # W and b of the layer were trained by Caffe's solver

    enet = engine(path)
    load_weights(enet, init, strict_missing=True)
    esolver = make_solver(cio.read_solver_prototxt(sp_path), enet.learnable())
    for step in range(2):
        for p in enet.parameters():
            p.grad = None
        torch.manual_seed(1000 + step)
        enet.loss(enet(feed(x, y))).backward()
        esolver.step_update()
        errs = {f"{n}[{i}]": rel_err(enet.layer(n).blobs[i].detach().numpy(), w)
                for n, ws in caffe_after[step].items() for i, w in enumerate(ws)}
        print(f"[information-dropout] SGD step {step + 1} weights rel err: max {max(errs.values()):.1e}")
        assert max(errs.values()) < 1e-4, errs
