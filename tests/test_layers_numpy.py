"""The Caffe Python dropout layers of ``layers/`` driven the way Caffe drives them:
setup/reshape/forward/backward on numpy blobs (``.data``, ``.diff``), p_EB asked for
through :func:`exdrop.engine.pylayer.request_saliency` on every TRAIN forward, the multipliers of
``DropoutLayerBase`` for forward and backward. These run against the engine's stand-in
``caffe.Layer``; one test repeats the fresh-p_EB check inside real pycaffe (skipped, with a
warning, where `make caffe` has not built it)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exdrop.engine import pylayer
from exdrop.paths import LAYERS
from exdrop.engine.pylayer import TEST, TRAIN, set_saliency_hook

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import require_pycaffe  # noqa: E402

LAYER_MODULES = ("_guided", "excitation_dropout", "activation_dropout", "standard_dropout", "curriculum_dropout",
                 "adaptive_dropout", "information_dropout")


class Blob:
    """What a Caffe Python layer sees of a blob."""

    def __init__(self, arr=None, shape=()):
        self.data = np.asarray(arr, np.float32).copy() if arr is not None else np.zeros(shape, np.float32)
        self.diff = np.zeros_like(self.data)

    def reshape(self, *shape):
        if tuple(self.data.shape) != tuple(shape):
            self.data = np.zeros(shape, np.float32)
            self.diff = np.zeros(shape, np.float32)


@pytest.fixture
def layers_mod():
    """The layer classes, imported against the stand-in caffe.Layer whatever another test of
    this process imported before, and the process left as it was afterwards.

    The files are loaded as ``layers.<file>`` (aliased to the bare names the files import each
    other by), so a function's ``__module__`` names its file as `make mutation` (mutmut) does."""
    folder = LAYERS
    names = ("caffe",) + LAYER_MODULES + tuple(f"layers.{n}" for n in LAYER_MODULES)
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.modules["caffe"] = pylayer._STAND_IN
    try:
        for name in LAYER_MODULES:   # each file's imports come before it
            spec = importlib.util.spec_from_file_location(f"layers.{name}", folder / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = sys.modules[f"layers.{name}"] = mod
            spec.loader.exec_module(mod)
        classes = {"ExcitationDropout": sys.modules["excitation_dropout"].ExcitationDropout,
                   "ActivationDropout": sys.modules["activation_dropout"].ActivationDropout,
                   "StandardDropout": sys.modules["standard_dropout"].StandardDropout,
                   "CurriculumDropout": sys.modules["curriculum_dropout"].CurriculumDropout,
                   "AdaptiveDropout": sys.modules["adaptive_dropout"].AdaptiveDropout,
                   "InformationDropout": sys.modules["information_dropout"].InformationDropout}
        assert all(issubclass(c, pylayer._STAND_IN.Layer) for c in classes.values())
        yield classes
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def make_layer(cls, param_str="", phase=TRAIN, shape=(2, 4)):
    layer = cls()
    layer.param_str, layer.phase = param_str, phase
    bottom, top = [Blob(shape=shape)], [Blob()]
    layer.setup(bottom, top)
    layer.reshape(bottom, top)
    return layer


def run(layer, x, top_diff=None):
    """One forward (and backward when top_diff is given): (top data, bottom diff)."""
    bottom, top = [Blob(x)], [Blob()]
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    if top_diff is None:
        return top[0].data.copy(), None
    top[0].diff = np.asarray(top_diff, np.float32).copy()
    layer.backward(top, [True], bottom)
    return top[0].data.copy(), bottom[0].diff.copy()


def one_hot(batch, n, units):
    p = np.zeros((batch, n), np.float32)
    p[np.arange(batch), units] = 1.0
    return p


# ------------------------------------------------------------------ Excitation Dropout: fresh p_EB

def test_excitation_dropout_asks_for_fresh_p_eb_every_forward(layers_mod):
    """Each TRAIN forward asks the hook again and masks with that forward's p_EB.

    p_EB one-hot at unit j gives j retain probability 0 and every other unit 1 (Eqn 3), so the
    mask is known exactly: a layer reusing an earlier p_EB drops the earlier forward's unit."""
    layer = make_layer(layers_mod["ExcitationDropout"], "{'dropout_ratio': 0.5}", shape=(3, 5))
    calls = []

    def hook(lay):
        assert lay is layer
        calls.append(lay)
        return answers[len(calls) - 1]

    set_saliency_hook(layer, hook)
    answers = [one_hot(3, 5, [0, 1, 2]), one_hot(3, 5, [4, 3, 0]), one_hot(3, 5, [2, 2, 2])]
    x = np.arange(1, 16, dtype=np.float32).reshape(3, 5)
    g = np.full((3, 5), 2.0, np.float32)
    for k, p in enumerate(answers):
        y, dx = run(layer, x, g)
        assert len(calls) == k + 1
        np.testing.assert_array_equal(layer.p_eb, p)
        dropped = p > 0
        assert (y[dropped] == 0).all() and (dx[dropped] == 0).all()
        # the others kept, each image rescaled by its kept fraction 4/5 (grad_rescale: the same)
        np.testing.assert_allclose(y[~dropped], x[~dropped] * 5 / 4, rtol=1e-6)
        np.testing.assert_allclose(dx[~dropped], 2.0 * 5 / 4, rtol=1e-6)


def test_excitation_dropout_test_phase_is_identity_and_asks_nothing(layers_mod):
    layer = make_layer(layers_mod["ExcitationDropout"], phase=TEST)
    set_saliency_hook(layer, lambda lay: pytest.fail("TEST phase must not ask for p_EB"))
    x = np.random.default_rng(0).random((2, 4)).astype(np.float32)
    y, dx = run(layer, x, np.ones((2, 4)))
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, np.ones((2, 4)))


def test_excitation_dropout_conv_blob_drops_whole_maps_by_summed_p_eb(layers_mod):
    layer = make_layer(layers_mod["ExcitationDropout"], shape=(2, 3, 2, 2))
    p = np.zeros((2, 3, 2, 2), np.float32)
    p[0, 1, 0, 0], p[0, 1, 1, 1] = 0.5, 0.5   # image 0: all of the mass in map 1
    p[1, 2] = 0.25                             # image 1: all of it in map 2
    set_saliency_hook(layer, lambda lay: p)
    x = np.ones((2, 3, 2, 2), np.float32)
    y, _ = run(layer, x)
    want = np.full((2, 3, 2, 2), 1.5, np.float32)
    want[0, 1] = 0
    want[1, 2] = 0
    np.testing.assert_allclose(y, want, rtol=1e-6)


# ------------------------------------------------------------------ grad_rescale

@pytest.mark.parametrize("kind", ["ExcitationDropout", "ActivationDropout"])
@pytest.mark.parametrize("grad_rescale", [True, False])
def test_grad_rescale_chooses_the_backward_multiplier(layers_mod, kind, grad_rescale):
    """Forward: mask / kept fraction of the image. Backward: the same with grad_rescale True,
    the bare 0/1 mask with grad_rescale False (the authors' code)."""
    torch.manual_seed(3)
    layer = make_layer(layers_mod[kind], f"{{'dropout_ratio': 0.5, 'rescale': True, "
                                         f"'grad_rescale': {grad_rescale}}}", shape=(6, 10))
    rng = np.random.default_rng(1)
    x = (rng.random((6, 10)) + 0.5).astype(np.float32)
    set_saliency_hook(layer, lambda lay: x / x.sum(1, keepdims=True))
    g = (rng.random((6, 10)) + 0.5).astype(np.float32)
    y, dx = run(layer, x, g)
    kept = y != 0
    frac = kept.mean(1, keepdims=True)
    assert ((frac > 0) & (frac < 1)).any(), "need images with some units dropped"
    scale = np.where(kept, 1.0 / frac, 0.0)
    np.testing.assert_allclose(y, x * scale, rtol=1e-6)
    np.testing.assert_allclose(dx, g * (scale if grad_rescale else kept), rtol=1e-6)


def test_rescale_false_keeps_kept_units_as_they_are(layers_mod):
    torch.manual_seed(4)
    layer = make_layer(layers_mod["ActivationDropout"], "{'rescale': False}", shape=(6, 10))
    x = (np.random.default_rng(2).random((6, 10)) + 0.5).astype(np.float32)
    y, dx = run(layer, x, np.ones((6, 10)))
    kept = y != 0
    assert (~kept).any() and kept.any()
    np.testing.assert_array_equal(y[kept], x[kept])
    np.testing.assert_array_equal(dx, kept.astype(np.float32))


# ------------------------------------------------------------------ Activation Dropout: Eqn 4

def test_activation_dropout_kept_fractions_follow_eqn4(layers_mod):
    """p_Act = a / sum(a) per image in Eqn 3: the kept fraction of each unit over many images.

    Activations [0.05, 0.1, 0.15, 0.2] (sum 0.5) give shares [0.1, 0.2, 0.3, 0.4] and, with
    P = 0.5 and N = 4, retain probabilities [0.75, 4/7, 0.4375, 1/3]; the unnormalised shares
    (the activations themselves) would give [0.864, 0.75, 0.654, 4/7]."""
    draws = 40000
    layer = make_layer(layers_mod["ActivationDropout"], "{'dropout_ratio': 0.5}", shape=(draws, 4))
    a = np.array([0.05, 0.1, 0.15, 0.2], np.float32)
    torch.manual_seed(0)
    y, _ = run(layer, np.tile(a, (draws, 1)))
    share = a / a.sum()
    P, n = 0.5, 4
    want = 1 - (1 - P) * (n - 1) * share / (((1 - P) * n - 1) * share + P)
    np.testing.assert_allclose(want, [0.75, 4 / 7, 0.4375, 1 / 3], rtol=1e-6)
    got = (y != 0).mean(0)
    # binomial standard error <= 0.0025 with 40000 draws: 0.012 is ~5 of them, and the
    # unnormalised shares are >= 0.11 away
    np.testing.assert_allclose(got, want, atol=0.012)


def test_activation_dropout_all_zero_image_is_kept(layers_mod):
    layer = make_layer(layers_mod["ActivationDropout"], shape=(2, 3))
    x = np.array([[0, 0, 0], [1, 2, 3]], np.float32)
    torch.manual_seed(0)
    y, _ = run(layer, x)
    np.testing.assert_array_equal(y[0], 0)
    np.testing.assert_array_equal(layer.mult[0], 1)


# ------------------------------------------------------------------ Standard dropout: per_image

@pytest.mark.parametrize("shape", [(64, 40), (64, 40, 2, 2)])
def test_standard_dropout_per_image_true_draws_a_mask_per_image(layers_mod, shape):
    layer = make_layer(layers_mod["StandardDropout"], "{'dropout_ratio': 0.25}", shape=shape)
    torch.manual_seed(0)
    y, dx = run(layer, np.ones(shape, np.float32), np.ones(shape, np.float32))
    kept = (y != 0).reshape(shape[0], shape[1], -1)
    assert (kept.all(2) | ~kept.any(2)).all()          # whole feature maps
    rows = {tuple(r) for r in kept[:, :, 0]}
    assert len(rows) > shape[0] // 2                   # 64 draws of 40 units: all but surely distinct
    np.testing.assert_allclose(y[y != 0], 1 / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(dx, y)
    assert abs((~kept[:, :, 0]).mean() - 0.25) < 0.04


@pytest.mark.parametrize("shape", [(64, 40), (64, 40, 2, 2)])
def test_standard_dropout_per_image_false_shares_one_mask(layers_mod, shape):
    layer = make_layer(layers_mod["StandardDropout"], "{'dropout_ratio': 0.25, 'per_image': False}", shape=shape)
    torch.manual_seed(0)
    y, dx = run(layer, np.ones(shape, np.float32), np.ones(shape, np.float32))
    kept = y != 0
    assert kept.any() and (~kept).any()
    assert (kept == kept[:1]).all()                    # every image the same mask
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)
    np.testing.assert_array_equal(dx, y)


# ------------------------------------------------------------------ inside real pycaffe

TINY_ED = """
name: "tiny_ed"
force_backward: true
layer {{ name: "in" type: "Input" top: "data" top: "label"
        input_param {{ shape {{ dim: {b} dim: 6 }} shape {{ dim: {b} }} }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param {{ num_output: 8 weight_filler {{ type: "gaussian" std: 1 }}
                               bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "drop" type: "Python" bottom: "ip1" top: "ip1"
        python_param {{ module: "excitation_dropout" layer: "ExcitationDropout" param_str: "{{'dropout_ratio': 0.5}}" }} }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""


def _p_eb_by_hand(h, w2, label):
    """EB through one InnerProduct from a one-hot at the label: h * ((onehot / (h W+^T)) W+)."""
    wp = np.maximum(w2, 0).astype(np.float64)
    z = h.astype(np.float64) @ wp.T
    top = one_hot(h.shape[0], w2.shape[0], label).astype(np.float64)
    s = np.where(z != 0, top / np.where(z != 0, z, 1), 0)
    return h * (s @ wp)


@pytest.mark.caffe
def test_caffe_hook_gives_fresh_p_eb_every_forward(tmp_path):
    require_pycaffe("the fresh-p_EB check inside Caffe")
    from exdrop.proto import io as cio
    from exdrop.caffe.backend import install_saliency_hooks, load_caffe
    caffe = load_caffe()
    b = 5
    path = tmp_path / "tiny_ed.prototxt"
    path.write_text(TINY_ED.format(b=b))
    caffe.set_random_seed(1)
    net = caffe.Net(str(path), caffe.TRAIN)
    assert install_saliency_hooks(net, cio.read_net_prototxt(path), str(path)) == ["drop"]
    drop = net.layers[list(net._layer_names).index("drop")]
    w1, b1 = (a.data.copy() for a in net.params["ip1"])
    w2 = net.params["ip2"][0].data.copy()
    rng = np.random.default_rng(0)
    inputs = [(rng.standard_normal((b, 6)).astype(np.float32), rng.integers(0, 3, b).astype(np.float32))
              for _ in range(2)]
    inputs.append(inputs[0])
    seen = []
    for x, y in inputs:
        net.blobs["data"].data[...] = x
        net.blobs["label"].data[...] = y
        torch.manual_seed(0)
        net.forward()
        h = np.maximum(x @ w1.T + b1, 0)
        p = np.asarray(drop.p_eb, np.float64).copy()
        np.testing.assert_allclose(p, _p_eb_by_hand(h, w2, y.astype(int)), atol=1e-5)
        mult = np.asarray(drop.mult)
        np.testing.assert_allclose(net.blobs["ip1"].data, h * mult, rtol=1e-5, atol=1e-6)
        seen.append(p)
    assert np.abs(seen[0] - seen[1]).max() > 0.05
    np.testing.assert_allclose(seen[2], seen[0], atol=1e-6)


def test_excitation_dropout_count_alive_on_the_caffe_path(layers_mod):
    """count 'alive' (an ablation): N of Eqn 3 is each image's number of positive units. One alive
    unit holding all of p_EB is dropped under the paper's N (retain 0 at p = 1) and kept with
    N = 1 (no other unit to share the evidence with: retain 1)."""
    x = np.zeros((2, 5), np.float32)
    x[0, 3], x[1, 0] = 2.0, 7.0
    p = one_hot(2, 5, [3, 0])
    for count, want in (("all", np.zeros_like(x)), ("alive", x)):
        layer = make_layer(layers_mod["ExcitationDropout"], f"{{'dropout_ratio': 0.5, 'count': '{count}'}}",
                           shape=(2, 5))
        set_saliency_hook(layer, lambda lay: p)
        y, _ = run(layer, x)
        np.testing.assert_array_equal(y, want)


# Each layer's torch_module factory: what the prototxt engine runs in its place. Every param_str key
# reaches the module, checked at the defaults and at values away from them (so a dropped, swapped
# or None-ed argument shows either way). The module's attribute for each key:
FACTORY_CASES = {
    "ExcitationDropout": ("{'dropout_ratio': 0.3, 'rescale': False, 'grad_rescale': False, 'signal': 'pred', "
                          "'count': 'alive'}",
                          {"dropout_ratio": "p", "rescale": "rescale", "grad_rescale": "grad_rescale",
                           "signal": "signal", "count": "count"}),
    "ActivationDropout": ("{'dropout_ratio': 0.3, 'rescale': False, 'grad_rescale': False}",
                          {"dropout_ratio": "p", "rescale": "rescale", "grad_rescale": "grad_rescale"}),
    "StandardDropout": ("{'dropout_ratio': 0.3, 'per_image': False}", {"dropout_ratio": "p", "per_image": "per_image"}),
    "CurriculumDropout": ("{'dropout_ratio': 0.3, 'gamma': 0.002}", {"dropout_ratio": "p", "gamma": "gamma"}),
    "AdaptiveDropout": ("{'alpha': 2.5, 'beta': -1.5}", {"alpha": "alpha", "beta": "beta"}),
    "InformationDropout": ("{'max_alpha': 0.4, 'weight_std': 0.02, 'bias': 0.25}",
                           {"max_alpha": "max_alpha", "weight_std": "weight_std", "bias": "init_bias"}),
}


@pytest.mark.parametrize("name", sorted(FACTORY_CASES))
def test_torch_module_factory_passes_every_param_str_key(layers_mod, name):
    from exdrop import nn as drop_in
    cls = layers_mod[name]
    param_str, attribute = FACTORY_CASES[name]
    assert set(attribute) == set(cls.parse("")) - {"logits", "label"}   # every key of the layer is checked
    for given in ("", param_str):
        params = cls.parse(given)
        module = cls.torch_module(params, TRAIN)
        assert type(module) is getattr(drop_in, name)
        assert {k: getattr(module, a) for k, a in attribute.items()} == {k: params[k] for k in attribute}, given
    assert cls.parse(param_str) != cls.parse("")
