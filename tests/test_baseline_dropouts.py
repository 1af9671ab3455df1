"""Curriculum Dropout and Adaptive Dropout (Standout), two baselines of the paper's Table 2.

Curriculum Dropout (Morerio et al. 2017): theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar,
a per-element Bernoulli(theta(t)) mask, kept units scaled by 1/theta(t), identity at test; t is
the solver's iteration, handed to the layer by ``Net.set_iteration`` (the engine's training step)
and by the Caffe backend (``layer.iteration = solver.iter`` before each ``solver.step``).
Adaptive Dropout (Ba and Frey 2013): keep probability pi = sigmoid(alpha z + beta), mask not
differentiated, no rescaling in training, output x * pi at test.

Checked here: the formulas (functional core, torch modules, the numpy Caffe layers on the
engine's stand-in ``caffe.Layer``), the engine's Net in both phases, the iteration through
``Net.set_iteration`` and through the engine backend (a resume included), param_str errors,
and the same nets inside real pycaffe (skipped loudly where `make caffe` has not built it).
Keep rates are checked within 5 binomial standard deviations.
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
from exdrop.paths import LAYERS
from exdrop.engine.layer_types import LayerError
from exdrop.engine.net import Net
from exdrop.engine.nn import AdaptiveDropout, CurriculumDropout
from exdrop.engine.pylayer import TEST, TRAIN

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import require_pycaffe, write_tiny  # noqa: E402
from test_layers_numpy import make_layer, run  # noqa: E402

LAYER_MODULES = ("_guided", "curriculum_dropout", "adaptive_dropout")


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-np.asarray(v, np.float64)))


def within_binomial(kept: np.ndarray, p, sigmas: float = 5.0) -> None:
    """The number of kept draws against sum(p), within ``sigmas`` binomial standard deviations."""
    p = np.broadcast_to(np.asarray(p, np.float64), kept.shape)
    std = math.sqrt(float((p * (1 - p)).sum()))
    assert abs(float(kept.sum()) - float(p.sum())) <= sigmas * max(std, 1.0), (kept.mean(), p.mean(), std)


@pytest.fixture
def layers_mod():
    """The two layer classes against the stand-in caffe.Layer (as test_layers_numpy.py does),
    the process left as it was afterwards."""
    folder = LAYERS
    names = ("caffe",) + LAYER_MODULES + tuple(f"layers.{n}" for n in LAYER_MODULES)
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.modules["caffe"] = pylayer._STAND_IN
    try:
        for name in LAYER_MODULES:
            spec = importlib.util.spec_from_file_location(f"layers.{name}", folder / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = sys.modules[f"layers.{name}"] = mod
            spec.loader.exec_module(mod)
        yield {"CurriculumDropout": sys.modules["curriculum_dropout"].CurriculumDropout,
               "AdaptiveDropout": sys.modules["adaptive_dropout"].AdaptiveDropout}
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


# ------------------------------------------------------------------ Curriculum: theta(t)

def test_curriculum_retain_schedule():
    assert Fx.curriculum_retain(0, 0.5, 5e-4) == 1.0
    assert Fx.curriculum_retain(10**6, 0.5, 5e-4) == pytest.approx(0.5, abs=1e-12)
    # 0.5 exp(-0.5) + 0.5 and 0.25 exp(-2) + 0.75
    assert Fx.curriculum_retain(1000, 0.5, 5e-4) == pytest.approx(0.8032653298563167, rel=1e-12)
    assert Fx.curriculum_retain(2000, 0.25, 1e-3) == pytest.approx(0.7838338208091532, rel=1e-12)
    assert Fx.curriculum_retain(123, 0.5, 0.0) == 1.0           # gamma 0: never drops
    thetas = [Fx.curriculum_retain(t, 0.3, 1e-3) for t in range(0, 10000, 500)]
    assert all(a > b for a, b in zip(thetas, thetas[1:])) and thetas[-1] > 0.7
    for bad, msg in (({"p": 1.0}, r"dropout probability has to be in \[0, 1\), got 1.0 \(final retain"),
                     ({"p": -0.1}, r"in \[0, 1\), got -0.1 "),
                     ({"gamma": -1e-4}, r"Curriculum Dropout's gamma must be a finite number >= 0, got -0.0001$"),
                     ({"gamma": float("nan")}, "gamma must be a finite number >= 0, got nan$"),
                     ({"iteration": -1}, r"^Curriculum Dropout's iteration must be >= 0, got -1$")):
        args = {"iteration": 10, "p": 0.5, "gamma": 5e-4, **bad}
        with pytest.raises(ValueError, match=msg):
            Fx.curriculum_retain(**args)


def test_curriculum_keep_rate_and_scale():
    """1e6 elements at t = 1000: keep rate theta(t) = 0.8033 within 5 binomial std (0.002),
    kept ones exactly 1/theta(t), the gradient the same multiplier."""
    torch.manual_seed(0)
    theta = 0.5 * math.exp(-0.5) + 0.5
    x = torch.ones(400, 2500, requires_grad=True)
    y = Fx.curriculum_dropout(x, 1000, p=0.5, gamma=5e-4)
    kept = (y != 0).numpy()
    within_binomial(kept, theta)
    np.testing.assert_allclose(y.detach().numpy()[kept], 1 / theta, rtol=1e-6)
    g = torch.rand(400, 2500)
    y.backward(g)
    np.testing.assert_allclose(x.grad.numpy(), (g * y.detach()).numpy(), rtol=1e-6)
    # t = 0: nothing dropped, the input itself
    x0 = torch.randn(3, 4)
    assert Fx.curriculum_dropout(x0, 0) is x0


def test_curriculum_masks_are_per_element():
    """One draw per element, as Caffe's Dropout: on a conv blob the maps are mixed (a per-map
    mask would keep or drop whole 4x4 maps; 2 * 0.5^16 of them by chance), the images differ."""
    torch.manual_seed(1)
    y = Fx.curriculum_dropout(torch.ones(64, 16, 4, 4), 10**6, p=0.5)
    kept = (y != 0).reshape(64, 16, 16)
    mixed = kept.any(2) & ~kept.all(2)
    assert mixed.float().mean() > 0.99
    assert len({tuple(r.flatten().tolist()) for r in kept}) == 64


def test_curriculum_module_iteration_attribute_and_argument():
    drop = CurriculumDropout(p=0.5, gamma=1e-3)
    assert drop.needs_iteration and drop.is_dropout and drop.saliency is None
    x = torch.ones(200, 500)
    with pytest.raises(ValueError, match="needs the iteration t"):
        drop(x)                                            # no iteration: an error, not a silent theta = 1
    drop.iteration = 0
    assert torch.equal(drop(x), x)                         # iteration 0: theta = 1
    drop.iteration = 2000
    theta = 0.5 * math.exp(-2) + 0.5
    assert drop.retain_probability() == pytest.approx(theta, rel=1e-12)
    assert drop.retain_probability(0) == 1.0
    torch.manual_seed(2)
    y = drop(x)
    within_binomial((y != 0).numpy(), theta)
    np.testing.assert_allclose(y[y != 0].numpy(), 1 / theta, rtol=1e-6)
    assert torch.equal(drop(x, iteration=0), x)            # the argument wins over the attribute
    y = drop(x, iteration=10**6)
    np.testing.assert_allclose(y[y != 0].numpy(), 2.0, rtol=1e-6)
    drop.eval()
    assert drop(x) is x                                    # identity at test
    with pytest.raises(ValueError, match="dropout probability"):
        CurriculumDropout(p=1.0)
    with pytest.raises(ValueError, match="gamma"):
        CurriculumDropout(gamma=-1.0)


def test_curriculum_numpy_layer(layers_mod):
    """Caffe's side on numpy blobs: theta(t) from layer.iteration, kept ones 1/theta(t), the
    bottom diff the same multiplier; TEST identity; TRAIN without an iteration is an error."""
    cls = layers_mod["CurriculumDropout"]
    assert cls.needs_iteration and cls.is_dropout
    layer = make_layer(cls, "{'dropout_ratio': 0.25, 'gamma': 0.01}", shape=(200, 500))
    with pytest.raises(RuntimeError) as info:
        run(layer, np.ones((200, 500), np.float32))
    assert str(info.value) == (
        "CurriculumDropout in TRAIN needs the solver's iteration t for its retain probability theta(t): train with "
        "`exdrop train --backend caffe` (exdrop.caffe.backend sets layer.iteration = solver.iter before each step), "
        "or set the layer's `iteration` attribute yourself")
    layer.iteration = 100
    theta = 0.25 * math.exp(-1) + 0.75
    torch.manual_seed(3)
    x = np.ones((200, 500), np.float32)
    g = np.random.default_rng(0).random((200, 500)).astype(np.float32)
    y, dx = run(layer, x, g)
    kept = y != 0
    within_binomial(kept, theta)
    np.testing.assert_allclose(y[kept], 1 / theta, rtol=1e-6)
    np.testing.assert_allclose(dx, g * y, rtol=1e-6)
    layer.iteration = 0
    y, dx = run(layer, x, g)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, g)
    test = make_layer(cls, "{'dropout_ratio': 0.5}", phase=TEST, shape=(2, 3))
    xs = np.arange(6, dtype=np.float32).reshape(2, 3)
    y, dx = run(test, xs, np.ones((2, 3)))      # no iteration needed at test
    np.testing.assert_array_equal(y, xs)
    np.testing.assert_array_equal(dx, np.ones((2, 3)))


# ------------------------------------------------------------------ Adaptive: Standout

def test_standout_keep_probability_is_the_sigmoid():
    z = torch.linspace(-4, 4, 33)
    for alpha, beta in ((1.0, 0.0), (2.0, -1.0), (-0.5, 0.3)):
        pi = Fx.standout_keep_probability(z, alpha, beta).numpy()
        np.testing.assert_allclose(pi, sigmoid(alpha * z.numpy().astype(np.float64) + beta), atol=1e-6)


def test_adaptive_masks_follow_pi_without_rescaling():
    """Per column, the kept fraction over 40000 rows is pi = sigmoid(1.5 z + 0.2); kept values
    are the input itself (no rescaling); with ``pre_activation`` pi comes from that instead."""
    torch.manual_seed(4)
    z = torch.tensor([-2.0, -0.5, 0.5, 3.0])
    x = z.repeat(40000, 1)
    pi = sigmoid(1.5 * z.numpy() + 0.2)
    y = Fx.adaptive_dropout(x, 1.5, 0.2, training=True)
    kept = (y != 0).numpy()
    for j in range(4):
        within_binomial(kept[:, j], pi[j])
    np.testing.assert_array_equal(y.numpy()[kept], x.numpy()[kept])
    ones = torch.ones(40000, 4)
    y = Fx.adaptive_dropout(ones, 1.5, 0.2, training=True, pre_activation=x)
    assert set(np.unique(y.numpy())) <= {0.0, 1.0}
    for j in range(4):
        within_binomial(y.numpy()[:, j], pi[j])


def test_adaptive_test_time_scaling_and_gradients():
    """Test: y = x * sigmoid(alpha x + beta), gradient pi * g. Training: gradient = mask * g
    (the mask is not differentiated), by autograd and by finite differences with the mask fixed."""
    rng = np.random.default_rng(5)
    xn = rng.standard_normal((6, 8)) * 2
    x = torch.tensor(xn, dtype=torch.float64, requires_grad=True)
    g = torch.tensor(rng.random((6, 8)), dtype=torch.float64)
    y = Fx.adaptive_dropout(x, 2.0, -1.0, training=False)
    pi = sigmoid(2.0 * xn - 1.0)
    np.testing.assert_allclose(y.detach().numpy(), xn * pi, rtol=1e-12)
    y.backward(g)
    np.testing.assert_allclose(x.grad.numpy(), g.numpy() * pi, rtol=1e-12)

    def f(v, seed=7):
        return Fx.adaptive_dropout(v, 2.0, -1.0, training=True, generator=torch.Generator().manual_seed(seed))

    x.grad = None
    y = f(x)
    mask = (y != 0).double()
    assert 0 < mask.mean() < 1
    y.backward(g)
    np.testing.assert_array_equal(x.grad.numpy(), (g * mask).numpy())
    eps, fd = 1e-6, np.zeros_like(xn)
    with torch.no_grad():
        for i in np.ndindex(*xn.shape):
            d = torch.zeros_like(x)
            d[i] = eps
            fd[i] = float(((f(x + d) - f(x - d)) * g).sum()) / (2 * eps)
    np.testing.assert_allclose(fd, (g * mask).numpy(), atol=1e-6)


def test_adaptive_after_relu_equals_pi_of_the_pre_activation():
    """The docstring's argument: on a = relu(z), pi(a) gives exactly the outputs of pi(z), at
    test and (same random stream) in training."""
    z = torch.randn(300, 40, generator=torch.Generator().manual_seed(6))
    a = torch.relu(z)
    for training in (False, True):
        torch.manual_seed(8)
        from_a = Fx.adaptive_dropout(a, 1.0, 0.5, training=training)
        torch.manual_seed(8)
        from_z = Fx.adaptive_dropout(a, 1.0, 0.5, training=training, pre_activation=z)
        assert torch.equal(from_a, from_z), training
    # but not for an input that is not post-ReLU: the pre-activation's own pi
    assert not torch.equal(Fx.adaptive_dropout(z, training=False), Fx.adaptive_dropout(a, training=False))


def test_adaptive_module():
    drop = AdaptiveDropout(alpha=2.0, beta=-1.0)
    assert not drop.is_dropout and drop.saliency is None
    x = torch.randn(50, 20)
    torch.manual_seed(9)
    y = drop(x)
    kept = y != 0
    assert kept.any() and (~kept).any()
    assert torch.equal(y[kept], x[kept])
    drop.eval()
    np.testing.assert_allclose(drop(x).numpy(), x.numpy() * sigmoid(2 * x.numpy() - 1), rtol=1e-6, atol=1e-7)
    pre = torch.randn(50, 20)
    np.testing.assert_allclose(drop(x, pre_activation=pre).numpy(), x.numpy() * sigmoid(2 * pre.numpy() - 1),
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="alpha"):
        AdaptiveDropout(alpha=float("inf"))


def test_adaptive_numpy_layer(layers_mod):
    """Caffe's side: TRAIN top = mask * bottom and bottom diff = mask * top diff; TEST top =
    pi * bottom and bottom diff = pi * top diff (Caffe's TEST phase scales too)."""
    cls = layers_mod["AdaptiveDropout"]
    assert not cls.is_dropout
    rng = np.random.default_rng(10)
    x = rng.standard_normal((300, 20)).astype(np.float32)
    g = rng.random((300, 20)).astype(np.float32)
    layer = make_layer(cls, "{'alpha': 2, 'beta': -0.5}", shape=x.shape)
    torch.manual_seed(11)
    y, dx = run(layer, x, g)
    mask = np.asarray(layer.mult)
    assert set(np.unique(mask)) == {0.0, 1.0}
    np.testing.assert_array_equal(y, x * mask)
    np.testing.assert_array_equal(dx, g * mask)
    within_binomial(mask.astype(bool), sigmoid(2 * x - 0.5))
    test = make_layer(cls, "{'alpha': 2, 'beta': -0.5}", phase=TEST, shape=x.shape)
    y, dx = run(test, x, g)
    pi = sigmoid(2 * x.astype(np.float64) - 0.5)
    np.testing.assert_allclose(y, x * pi, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dx, g * pi, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ param_str

GOOD = {"CurriculumDropout": [("dropout_ratio", 0.25), ("gamma", 0), ("gamma", 0.001), ("gamma", 2)],
        "AdaptiveDropout": [("alpha", 2), ("alpha", -1.5), ("beta", 0), ("beta", 0.25)]}
BAD = [
    ("CurriculumDropout", "gamma", -0.001, "a number >= 0"),
    ("CurriculumDropout", "gamma", "fast", "a number >= 0"),
    ("CurriculumDropout", "gamma", True, "a number >= 0"),
    ("CurriculumDropout", "gamma", float("inf"), "a number >= 0"),
    ("CurriculumDropout", "dropout_ratio", 1.0, "in [0, 1) (a number)"),
    ("AdaptiveDropout", "alpha", "big", "a finite number"),
    ("AdaptiveDropout", "alpha", None, "a finite number"),
    ("AdaptiveDropout", "beta", False, "a finite number"),
    ("AdaptiveDropout", "beta", float("-inf"), "a finite number"),
]


@pytest.mark.parametrize("layer", sorted(GOOD))
def test_param_str_good_values(layers_mod, layer):
    cls = layers_mod[layer]
    assert cls.parse("") == cls.defaults
    for key, value in GOOD[layer]:
        assert cls.parse(repr({key: value}))[key] == value


@pytest.mark.parametrize("layer, key, value, must", BAD)
def test_param_str_bad_value_named(layers_mod, layer, key, value, must):
    text = repr({key: value}).replace("inf", "1e999")   # a literal that parses to inf
    with pytest.raises(ValueError) as ei:
        layers_mod[layer].parse(text)
    assert str(ei.value) == f"{layer} param_str: {key} must be {must}, got {value!r}"


def test_param_str_unknown_keys(layers_mod):
    with pytest.raises(ValueError) as ei:
        layers_mod["CurriculumDropout"].parse("{'gama': 0.001}")
    assert str(ei.value) == "CurriculumDropout: unknown param_str keys ['gama']; known: ['dropout_ratio', 'gamma']"
    with pytest.raises(ValueError) as ei:
        layers_mod["AdaptiveDropout"].parse("{'dropout_ratio': 0.5}")
    assert str(ei.value) == "AdaptiveDropout: unknown param_str keys ['dropout_ratio']; known: ['alpha', 'beta']"


# ------------------------------------------------------------------ the engine's Net

TINY = """
name: "tiny_baseline"
layer {{ name: "in" type: "Input" top: "data" top: "label"
        input_param {{ shape {{ dim: {b} dim: 6 }} shape {{ dim: {b} }} }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param {{ num_output: 32 weight_filler {{ type: "gaussian" std: 1 }}
                               bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "drop" type: "Python" bottom: "ip1" top: "ip1"
        python_param {{ module: "{module}" layer: "{layer}" param_str: "{params}" }} }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""
CURRICULUM = ("curriculum_dropout", "CurriculumDropout", "{{'dropout_ratio': 0.5, 'gamma': 0.001}}")
ADAPTIVE = ("adaptive_dropout", "AdaptiveDropout", "{{'alpha': 2.0, 'beta': -1.0}}")


def write_tiny_net(path: Path, kind, batch: int) -> Path:
    module, layer, params = kind
    path.write_text(TINY.format(b=batch, module=module, layer=layer, params=params.format()))
    return path


def tiny_input(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 6)).astype(np.float32), rng.integers(0, 3, batch).astype(np.float32)


def engine(path: Path, phase) -> Net:
    return Net(cio.read_net_prototxt(path), phase, "cpu", str(path))


def hidden(net: Net, x) -> tuple[np.ndarray, np.ndarray]:
    """(pre-activation z, relu(z)) of ip1, from the net's weights."""
    w, b = (p.detach().numpy().astype(np.float64) for p in net.layer("ip1").blobs)
    z = x.astype(np.float64) @ w.T + b
    return z, np.maximum(z, 0)


def test_engine_curriculum_follows_set_iteration(tmp_path):
    batch = 512
    path = write_tiny_net(tmp_path / "cur.prototxt", CURRICULUM, batch)
    net = engine(path, TRAIN)
    module = net.layer("drop").module
    assert isinstance(module, CurriculumDropout) and (module.p, module.gamma) == (0.5, 0.001)
    x, y = tiny_input(batch)
    feed = {"data": torch.from_numpy(x), "label": torch.from_numpy(y)}
    _, h = hidden(net, x)
    torch.manual_seed(12)
    net.set_iteration(0)
    np.testing.assert_allclose(net(feed)["ip1"].detach().numpy(), h, rtol=1e-5, atol=1e-6)
    for t in (1000, 10**5):
        net.set_iteration(t)
        assert module.iteration == t
        theta = 0.5 * math.exp(-0.001 * t) + 0.5
        out = net(feed)["ip1"].detach().numpy()
        on = h > 0
        kept = out[on] != 0
        within_binomial(kept, theta)
        np.testing.assert_allclose(out[on][kept], h[on][kept] / theta, rtol=1e-5, atol=1e-6)
        net.loss().backward()               # autograd through the module
    test = engine(path, TEST)
    test.share_weights_from(net)
    test.set_iteration(10**5)
    np.testing.assert_allclose(test(feed)["ip1"].detach().numpy(), h, rtol=1e-5, atol=1e-6)


def test_engine_adaptive_both_phases(tmp_path):
    """TEST: ip1 = relu(z) * sigmoid(2 relu(z) - 1), which equals relu(z) * sigmoid(2 z - 1);
    TRAIN: each positive unit kept (unscaled) with probability sigmoid(2 z - 1)."""
    batch = 512
    path = write_tiny_net(tmp_path / "ada.prototxt", ADAPTIVE, batch)
    train, test = engine(path, TRAIN), engine(path, TEST)
    test.share_weights_from(train)
    assert isinstance(train.layer("drop").module, AdaptiveDropout) and not train.layer("drop").is_dropout
    x, y = tiny_input(batch, seed=1)
    feed = {"data": torch.from_numpy(x), "label": torch.from_numpy(y)}
    z, h = hidden(train, x)
    out = test(feed)["ip1"].detach().numpy()
    np.testing.assert_allclose(out, h * sigmoid(2 * h - 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, h * sigmoid(2 * z - 1), rtol=1e-5, atol=1e-6)
    torch.manual_seed(13)
    out = train(feed)["ip1"].detach().numpy()
    on = h > 0
    kept = out[on] != 0
    np.testing.assert_allclose(out[on][kept], h[on][kept], rtol=1e-5, atol=1e-6)
    within_binomial(kept, sigmoid(2 * z[on] - 1))


def write_ed_under_adaptive(path: Path) -> Path:
    """The tiny net with ExcitationDropout on ip1 and AdaptiveDropout ('adrop') on ip2 above it."""
    text = TINY.format(b=4, module="excitation_dropout", layer="ExcitationDropout",
                       params="{'dropout_ratio': 0.5}")
    text = text.replace('layer { name: "loss"',
                        'layer { name: "relu2" type: "ReLU" bottom: "ip2" top: "ip2" }\n'
                        'layer { name: "adrop" type: "Python" bottom: "ip2" top: "ip2"\n'
                        '  python_param { module: "adaptive_dropout" layer: "AdaptiveDropout" } }\n'
                        'layer { name: "ip3" type: "InnerProduct" bottom: "ip2" top: "ip3"\n'
                        '  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }\n'
                        'layer { name: "loss"').replace('bottom: "ip2" bottom: "label"', 'bottom: "ip3" bottom: "label"')
    path.write_text(text)
    return path


ADAPTIVE_EB_ERROR = r"layer 'adrop' \(type Python\): Excitation Backprop has no rule for the Python layer AdaptiveDropout"


def test_excitation_dropout_below_adaptive_is_refused(tmp_path):
    """EB runs the head in test mode, where Adaptive Dropout scales by pi: not a pass-through
    dropout, so p_EB through it is an error naming the layer, not a silently wrong map."""
    net = engine(write_ed_under_adaptive(tmp_path / "ed_under_adaptive.prototxt"), TRAIN)
    x, y = tiny_input(4)
    with pytest.raises(LayerError, match=ADAPTIVE_EB_ERROR):
        net({"data": torch.from_numpy(x), "label": torch.from_numpy(y)})


@pytest.mark.parametrize("kind, params, message", [
    (CURRICULUM, "{{'gamma': -1}}", "CurriculumDropout param_str: gamma must be a number >= 0, got -1"),
    (CURRICULUM, "{{'gamma': 0.001, 'rate': 2}}", "CurriculumDropout: unknown param_str keys ['rate']"),
    (ADAPTIVE, "{{'alpha': 'x'}}", "AdaptiveDropout param_str: alpha must be a finite number, got 'x'"),
])
def test_engine_param_errors_name_the_layer(tmp_path, kind, params, message):
    path = write_tiny_net(tmp_path / "bad.prototxt", (kind[0], kind[1], params), 2)
    with pytest.raises(LayerError) as ei:
        engine(path, TRAIN)
    assert f"{path}: layer 'drop' (type Python): {message}" in str(ei.value)


def test_engine_backend_hands_the_solver_iteration(tmp_path):
    """EngineBackend.step sets the solver's iteration before the forward: 0, 1, 2 on a tiny
    LMDB run, and after a resume from the iteration-3 snapshot, 3 (from the .solverstate)."""
    from exdrop.run.train import EngineBackend, TrainConfig, Trainer
    solver = write_tiny(tmp_path)
    net = tmp_path / "tiny_ed.prototxt"
    net.write_text(net.read_text().replace(
        'module: "excitation_dropout" layer: "ExcitationDropout" param_str: "{\'dropout_ratio\': 0.5}"',
        'module: "curriculum_dropout" layer: "CurriculumDropout" param_str: "{\'gamma\': 0.2}"'))
    assert "CurriculumDropout" in net.read_text()
    seen = []

    def watch(backend):
        module = backend.train_net.layer("drop").module
        module.register_forward_pre_hook(lambda m, args: seen.append((m.iteration, backend.solver.iter)))

    cfg = TrainConfig(solver=str(solver), out=str(tmp_path / "run"), max_iter=3, device="cpu", progress=False,
                      test_interval=1000, display=100)
    backend = EngineBackend(cfg)
    watch(backend)
    Trainer(cfg, backend=backend).run()
    assert seen == [(0, 0), (1, 1), (2, 2)]
    state = tmp_path / "run" / "snapshots" / "tiny_ed_iter_3.solverstate"
    assert state.is_file()
    resumed = EngineBackend(TrainConfig(solver=str(solver), out=str(tmp_path / "run"), max_iter=5, device="cpu",
                                        progress=False, resume=str(state)))
    watch(resumed)
    seen.clear()
    resumed.step()
    assert seen == [(3, 3)]


# ------------------------------------------------------------------ inside real pycaffe

@pytest.fixture
def caffe():
    require_pycaffe("the Curriculum / Adaptive Dropout checks inside Caffe")
    from exdrop.caffe.backend import load_caffe
    return load_caffe()


def _caffe_and_engine(caffe, path: Path, phase, tmp_path: Path):
    """The same net in pycaffe and in the engine, with Caffe's initial weights."""
    from exdrop.engine.snapshot import load_weights
    caffe.set_random_seed(1)
    cnet = caffe.Net(str(path), caffe.TRAIN if phase == TRAIN else caffe.TEST)
    weights = tmp_path / f"{path.stem}_{phase}.caffemodel"
    cnet.save(str(weights))
    enet = engine(path, phase)
    load_weights(enet, weights)
    return cnet, enet


def _caffe_forward(cnet, x, y) -> np.ndarray:
    cnet.blobs["data"].data[...] = x
    cnet.blobs["label"].data[...] = y
    cnet.forward()
    return cnet.blobs["ip1"].data.copy()


@pytest.mark.caffe
@pytest.mark.parametrize("kind", [CURRICULUM, ADAPTIVE], ids=["curriculum", "adaptive"])
def test_caffe_test_phase_equals_engine(caffe, tmp_path, kind):
    """TEST phase, same weights and input: Caffe's ip1 / ip2 equal the engine's (Adaptive's
    scaling by pi included; Curriculum the identity)."""
    batch = 64
    path = write_tiny_net(tmp_path / f"{kind[0]}.prototxt", kind, batch)
    cnet, enet = _caffe_and_engine(caffe, path, TEST, tmp_path)
    x, y = tiny_input(batch, seed=2)
    c_ip1 = _caffe_forward(cnet, x, y)
    blobs = enet({"data": torch.from_numpy(x), "label": torch.from_numpy(y)})
    for name, c in (("ip1", c_ip1), ("ip2", cnet.blobs["ip2"].data)):
        np.testing.assert_allclose(blobs[name].detach().numpy(), c, rtol=1e-5, atol=1e-5)
    z, h = hidden(enet, x)
    want = h * sigmoid(2 * z - 1) if kind is ADAPTIVE else h
    np.testing.assert_allclose(c_ip1, want, rtol=1e-5, atol=1e-6)


@pytest.mark.caffe
def test_caffe_train_phase_statistics_match_engine(caffe, tmp_path):
    """TRAIN phase, the iteration set as the Caffe backend sets it: Curriculum keeps theta(t)
    of the units, scaled by 1/theta(t), in Caffe as in the engine (t = 1000 and a large t,
    where theta = theta_bar); Adaptive keeps sigmoid(2 z - 1) of them, unscaled."""
    from exdrop.caffe.backend import iteration_layers
    batch = 512
    x, y = tiny_input(batch, seed=3)
    feed = {"data": torch.from_numpy(x), "label": torch.from_numpy(y)}
    path = write_tiny_net(tmp_path / "cur.prototxt", CURRICULUM, batch)
    cnet, enet = _caffe_and_engine(caffe, path, TRAIN, tmp_path)
    layers = iteration_layers(cnet)
    assert len(layers) == 1 and layers[0] is cnet.layers[list(cnet._layer_names).index("drop")]
    _, h = hidden(enet, x)
    on = h > 0
    torch.manual_seed(14)
    for t in (1000, 10**5):
        theta = 0.5 * math.exp(-0.001 * t) + 0.5
        layers[0].iteration = t
        enet.set_iteration(t)
        for out in (_caffe_forward(cnet, x, y), enet(feed)["ip1"].detach().numpy()):
            kept = out[on] != 0
            within_binomial(kept, theta)
            np.testing.assert_allclose(out[on][kept], h[on][kept] / theta, rtol=1e-5, atol=1e-6)

    path = write_tiny_net(tmp_path / "ada.prototxt", ADAPTIVE, batch)
    cnet, enet = _caffe_and_engine(caffe, path, TRAIN, tmp_path)
    z, h = hidden(enet, x)
    on = h > 0
    for out in (_caffe_forward(cnet, x, y), enet(feed)["ip1"].detach().numpy()):
        kept = out[on] != 0
        within_binomial(kept, sigmoid(2 * z[on] - 1))
        np.testing.assert_allclose(out[on][kept], h[on][kept], rtol=1e-5, atol=1e-6)


@pytest.mark.caffe
def test_caffe_backend_hands_the_iteration(caffe, tmp_path):
    """The Caffe backend sets layer.iteration = solver.iter before each solver.step(1): the
    layer's multiplier in step k holds exactly 1/theta(k) (gamma 0.2: 1, 1.22, 1.49, 1.72)."""
    from exdrop.caffe.backend import CaffeBackend
    from exdrop.run.train import TrainConfig
    solver = write_tiny(tmp_path)
    net = tmp_path / "tiny_ed.prototxt"
    net.write_text(net.read_text().replace(
        'module: "excitation_dropout" layer: "ExcitationDropout" param_str: "{\'dropout_ratio\': 0.5}"',
        'module: "curriculum_dropout" layer: "CurriculumDropout" param_str: "{\'gamma\': 0.2}"'))
    backend = CaffeBackend(TrainConfig(solver=str(solver), out=str(tmp_path / "run"), backend="caffe",
                                       max_iter=4, progress=False))
    assert backend.guided_layers == [] and len(backend.iteration_layers) == 1
    layer = backend.iteration_layers[0]
    torch.manual_seed(15)
    for k in range(4):
        backend.step()
        assert layer.iteration == k and backend.solver.iter == k + 1
        mult = np.asarray(layer.mult)
        theta = 0.5 * math.exp(-0.2 * k) + 0.5
        assert (mult != 0).any()
        np.testing.assert_allclose(mult[mult != 0], 1 / theta, rtol=1e-6)


@pytest.mark.caffe
def test_caffe_excitation_dropout_below_adaptive_is_refused(caffe, tmp_path):
    """The same refusal inside real Caffe: the p_EB hook's walk stops at the Adaptive layer."""
    from exdrop.caffe.backend import install_saliency_hooks
    path = write_ed_under_adaptive(tmp_path / "ed_under_adaptive.prototxt")
    cnet = caffe.Net(str(path), caffe.TRAIN)
    assert install_saliency_hooks(cnet, cio.read_net_prototxt(path), str(path)) == ["drop"]
    x, y = tiny_input(4)
    with pytest.raises(LayerError, match=ADAPTIVE_EB_ERROR):
        _caffe_forward(cnet, x, y)
