"""Exact behaviour of the small checks around the dropout layers and EB: each param_str key of
the layers in layers/ against its expected type and range (with the exact message), the
signal blobs a guided layer uses, Eltwise SUM's shares, and the functional core's argument
checks. The layer files are loaded as ``layers.<file>`` (the fixture of test_layers_numpy.py),
so `make mutation` finds these tests for mutants of layers/*.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from exdrop.engine import eb
from exdrop.engine import functional as Fx
from exdrop.proto import caffe_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_layers_numpy import layers_mod  # noqa: E402,F401  (the fixture)

GOOD = {
    "ExcitationDropout": [("dropout_ratio", 0.0), ("dropout_ratio", 0.25), ("dropout_ratio", 0), ("signal", "gt"),
                          ("signal", "pred"), ("signal", 0), ("signal", 7), ("logits", "ip3"), ("label", "lbl"),
                          ("rescale", False), ("grad_rescale", False), ("count", "all"), ("count", "alive")],
    "ActivationDropout": [("dropout_ratio", 0.75), ("rescale", True), ("grad_rescale", False)],
    "StandardDropout": [("dropout_ratio", 0.5), ("per_image", False)],
}
BAD = [  # (layer, key, value, what the message says it must be)
    ("ExcitationDropout", "dropout_ratio", 1.0, "in [0, 1) (a number)"),
    ("ExcitationDropout", "dropout_ratio", -0.1, "in [0, 1) (a number)"),
    ("ExcitationDropout", "dropout_ratio", "0.5", "in [0, 1) (a number)"),
    ("ExcitationDropout", "dropout_ratio", True, "in [0, 1) (a number)"),
    ("ExcitationDropout", "signal", "best", "'gt', 'pred' or a class index (an int >= 0)"),
    ("ExcitationDropout", "signal", -1, "'gt', 'pred' or a class index (an int >= 0)"),
    ("ExcitationDropout", "signal", True, "'gt', 'pred' or a class index (an int >= 0)"),
    ("ExcitationDropout", "signal", 1.0, "'gt', 'pred' or a class index (an int >= 0)"),
    ("ExcitationDropout", "rescale", "no", "True or False"),
    ("ExcitationDropout", "grad_rescale", 0, "True or False"),
    ("ExcitationDropout", "logits", "", "a blob name (a string)"),
    ("ExcitationDropout", "label", 3, "a blob name (a string)"),
    ("ExcitationDropout", "count", "some", "'all' (N of Eqn 3 is the layer's width) or 'alive'"),
    ("ExcitationDropout", "count", "", "'all' (N of Eqn 3 is the layer's width) or 'alive'"),
    ("ActivationDropout", "rescale", 1, "True or False"),
    ("ActivationDropout", "dropout_ratio", None, "in [0, 1) (a number)"),
    ("StandardDropout", "per_image", "yes", "True or False"),
    ("StandardDropout", "dropout_ratio", 2, "in [0, 1) (a number)"),
]


@pytest.mark.parametrize("layer", sorted(GOOD))
def test_param_str_defaults_and_good_values(layers_mod, layer):
    cls = layers_mod[layer]
    assert cls.parse("") == cls.defaults and cls.parse("") is not cls.defaults
    assert cls.defaults["dropout_ratio"] == 0.5
    for key, value in GOOD[layer]:
        params = cls.parse(repr({key: value}))
        assert params[key] == value and set(params) == set(cls.defaults)


@pytest.mark.parametrize("layer, key, value, must", BAD)
def test_param_str_bad_value_named(layers_mod, layer, key, value, must):
    with pytest.raises(ValueError) as ei:
        layers_mod[layer].parse(repr({key: value}))
    assert str(ei.value) == f"{layer} param_str: {key} must be {must}, got {value!r}"


def test_param_str_unknown_key(layers_mod):
    cls = layers_mod["StandardDropout"]
    with pytest.raises(ValueError) as ei:
        cls.parse("{'per_image': True, 'ratio': 0.5}")
    assert str(ei.value) == "StandardDropout: unknown param_str keys ['ratio']; known: ['dropout_ratio', 'per_image']"
    with pytest.raises(ValueError, match=r"ExcitationDropout: unknown param_str keys \['p'\]; known: .*'dropout_ratio'"):
        layers_mod["ExcitationDropout"].parse("{'p': 0.75}")


def test_setup_wants_one_bottom_and_one_top(layers_mod):
    layer = layers_mod["StandardDropout"]()
    layer.param_str = ""
    with pytest.raises(Exception, match="StandardDropout takes one bottom and one top"):
        layer.setup([object(), object()], [object()])
    with pytest.raises(Exception, match="takes one bottom and one top"):
        layer.setup([object()], [])


# ------------------------------------------------------------------ eb's small functions

def _lp(name, kind, bottoms):
    return caffe_pb2.LayerParameter(name=name, type=kind, bottom=bottoms, top=[name])


def test_signal_blobs():
    layers = [_lp("ip", "InnerProduct", ["data"]), _lp("acc", "Accuracy", ["ip", "label"]),
              _lp("loss", "SoftmaxWithLoss", ["ip", "label"]), _lp("loss2", "SoftmaxWithLoss", ["z", "y"])]
    assert eb.signal_blobs(layers, {}, "drop") == ("ip", "label")
    assert eb.signal_blobs(layers, {"logits": "z"}, "drop") == ("z", "label")
    assert eb.signal_blobs(layers, {"label": "y", "logits": None}, "drop") == ("ip", "y")
    one = [_lp("loss", "SoftmaxWithLoss", ["ip"])]
    assert eb.signal_blobs(one, {}, "drop") == ("ip", None)
    assert eb.signal_blobs([], {"logits": "out"}, "drop") == ("out", None)
    with pytest.raises(ValueError) as ei:
        eb.signal_blobs(layers[:2], {}, "drop", "n.prototxt")
    assert str(ei.value) == ("n.prototxt: layer 'drop' needs the logits blob for Excitation Backprop: "
                             "add a SoftmaxWithLoss layer or set 'logits' in its param_str")


def test_eltwise_sum_shares():
    a = torch.tensor([[1.0, 0.0, 3.0, 2.0]])
    b = torch.tensor([[3.0, 0.0, 1.0, 2.0]])
    top = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    pa, pb = eb.eb_eltwise_sum([a, b], top)
    assert torch.allclose(pa, torch.tensor([[0.1, 0.0, 0.15, 0.05]]))
    assert torch.allclose(pb, torch.tensor([[0.3, 0.0, 0.05, 0.05]]))
    pa, pb = eb.eb_eltwise_sum([a, b], top, [2.0, 0.5])     # shares of 2a + 0.5b
    assert torch.allclose(pa, top * 2 * a / (2 * a + 0.5 * b).clamp_min(1e-30))
    assert torch.allclose(pb, top * 0.5 * b / (2 * a + 0.5 * b).clamp_min(1e-30))
    pa, pb = eb.eb_eltwise_sum([a * 1e-30, b * 1e-30], top)   # tiny inputs: the same shares
    assert torch.allclose(pa, torch.tensor([[0.1, 0.0, 0.15, 0.05]]))


# ------------------------------------------------------------------ functional argument checks

def test_guided_and_standard_dropout_argument_ranges():
    x = torch.ones(4, 6)
    share = torch.full((4, 6), 1 / 6)
    assert torch.equal(Fx.guided_dropout(x, share, 0.0), x)        # p = 0: P = 1, every unit kept
    for bad in (1.0, -0.01, 1.5):
        with pytest.raises(ValueError) as ei:
            Fx.guided_dropout(x, share, bad)
        assert str(ei.value) == f"dropout probability has to be in [0, 1), got {bad} (base retain probability P = 1 - p)"
    for bad in (-0.01, 1.01):
        with pytest.raises(ValueError) as ei:
            Fx.standard_dropout(x, bad)
        assert str(ei.value) == f"dropout probability has to be between 0 and 1, got {bad}"
    y = Fx.standard_dropout(x, 0.75, generator=torch.Generator().manual_seed(0))
    assert set(y.unique().tolist()) <= {0.0, 4.0}
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError):
            Fx.retain_probability(share, bad)
    assert torch.allclose(Fx.retain_probability(share, 1.0), torch.ones_like(share))


def test_signal_classes_exact():
    logits = torch.tensor([[0.0, 5, 1], [9, 0, 0]])
    got = eb.signal_classes(2, logits)
    assert got.tolist() == [2, 2] and got.dtype == torch.long
    assert eb.signal_classes(0, logits).tolist() == [0, 0]
    labels = torch.tensor([[1.0], [2.0]])
    got = eb.signal_classes("gt", logits, labels)
    assert got.tolist() == [1, 2] and got.dtype == torch.long
    for bad in (3, -1):
        with pytest.raises(ValueError) as ei:
            eb.signal_classes(bad, logits, None, "L")
        assert str(ei.value) == f"L: signal class {bad} is outside the logits' 3 classes"
    for bad in (True, 1.0, None, "x"):
        with pytest.raises(ValueError) as ei:
            eb.signal_classes(bad, logits, None, "L")
        assert str(ei.value) == f"L: signal must be 'gt', 'pred' or a class index, got {bad!r}"
    with pytest.raises(ValueError) as ei:
        eb.signal_classes("gt", logits)
    assert str(ei.value) == ("ExcitationDropout: the ground-truth top signal (signal 'gt') needs the labels: "
                             "give the label blob (or `target`), or use signal 'pred' or a class index")


def _step(bottoms, tops):
    return eb.Step(lambda b, s: s, [], list(bottoms), list(tops))


def test_walked_lists_the_steps_the_walk_runs():
    steps = [_step(["x"], ["a"]), _step(["a"], ["b"]), _step(["x"], ["side"]), _step(["b"], ["c"]),
             _step(["c"], ["logits"])]
    assert eb.walked(steps, ["logits"]) == [0, 1, 3, 4]
    assert eb.walked(steps, ["c"]) == [0, 1, 3]
    assert eb.walked(steps, ["side"]) == [2]
    assert eb.walked(steps, ["nothing"]) == []
    assert eb.walked([], ["logits"]) == []
    assert eb.walked(steps[:1], ["a"]) == [0]


def test_require_finite_names_the_first_bad_item():
    eb.require_finite([], "W")
    eb.require_finite([("a", torch.ones(3)), ("none", None)], "W")
    bad = torch.tensor([1.0, float("nan"), float("inf"), float("-inf"), 2.0])
    with pytest.raises(eb.NonFiniteError) as ei:
        eb.require_finite([("blob 'a'", torch.ones(2)), ("blob 'b'", bad), ("blob 'c'", bad)], "W")
    assert str(ei.value) == ("W: blob 'b' is not finite (1 NaN, 2 inf of 5 values); "
                             "Excitation Backprop needs finite activations and weights")
    import numpy as np
    with pytest.raises(eb.NonFiniteError, match=r"^W: w is not finite \(0 NaN, 1 inf of 2 values\)"):
        eb.require_finite([("none", None), ("w", np.array([np.inf, 1.0], np.float32))], "W")


def test_top_signal_one_image_and_shapes():
    sig = eb.top_signal(torch.zeros(1, 4), torch.tensor([2]))
    assert sig.tolist() == [[0.0, 0.0, 1.0, 0.0]] and sig.dtype == torch.float32
    sig = eb.top_signal(torch.zeros(2, 3, 1, 1, dtype=torch.float64), torch.tensor([1, 0]))
    assert sig.shape == (2, 3, 1, 1) and sig.dtype == torch.float32
    assert sig.flatten(1).tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_the_generator_decides_the_masks():
    x = torch.ones(3, 50)
    share = torch.rand(3, 50, generator=torch.Generator().manual_seed(1))
    share = share / share.sum(1, keepdim=True)
    runs = []
    for seed in (0, 1):   # the global RNG moves, the passed generator does not
        torch.manual_seed(seed)
        runs.append((Fx.standard_dropout(x, 0.5, generator=torch.Generator().manual_seed(5)),
                     Fx.guided_dropout(x, share, 0.5, generator=torch.Generator().manual_seed(5))))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_standard_dropout_units_of_other_shapes():
    g = torch.Generator().manual_seed(0)
    one = Fx.standard_dropout(torch.ones(1, 400), 0.5, generator=g)     # a batch of one image
    assert one.shape == (1, 400) and 100 < int((one == 0).sum()) < 300
    seq = Fx.standard_dropout(torch.ones(64, 3, 5), 0.5, per_image=True, generator=g)   # (N, C, L): every element a unit
    assert not (seq == seq[:, :, :1]).all(), "a 3-D blob is not a conv blob: its elements are units"


def test_guided_dropout_passes_grad_rescale_on():
    x = torch.ones(2, 6, requires_grad=True)
    share = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1.0]])   # the unit with all the mass is dropped
    Fx.guided_dropout(x, share, 0.5, rescale=True, grad_rescale=False).sum().backward()
    assert torch.equal(x.grad, (share == 0).float())                      # the bare 0/1 mask
    x.grad = None
    Fx.guided_dropout(x, share, 0.5, rescale=True, grad_rescale=True).sum().backward()
    assert torch.allclose(x.grad, (share == 0).float() * 6 / 5)           # mask / kept fraction


def test_retain_probability_message():
    with pytest.raises(ValueError) as ei:
        Fx.retain_probability(torch.zeros(1, 3), 0.0)
    assert str(ei.value) == "base retain probability must be in (0, 1], got 0.0"


def test_a_new_key_is_checked_against_its_default_type(layers_mod):
    base = layers_mod["StandardDropout"]

    class WithCount(base):   # a hypothetical new key ('count' is Excitation Dropout's own now)
        defaults = {**base.defaults, "width": 3}

    assert WithCount.parse("{'width': 5}")["width"] == 5
    with pytest.raises(ValueError) as ei:
        WithCount.parse("{'width': 'five'}")
    assert str(ei.value) == "WithCount param_str: width must be of type int, got 'five'"
