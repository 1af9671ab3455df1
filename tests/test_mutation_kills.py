"""Exact values of the engine's SoftmaxWithLoss and Accuracy layers against Caffe's
definitions (src/caffe/layers/softmax_loss_layer.cpp, accuracy_layer.cpp): the loss term
saturating at -log(FLT_MIN) with the gradient left alone, the four normalisations with an
ignore_label, and top-k with ties. Each test kills a mutant that the rest of the suite let
live (see `make mutation`)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from exdrop.engine import functional as Fx
from exdrop.engine.layer_types import Accuracy, SoftmaxWithLoss
from exdrop.proto import caffe_pb2
from exdrop.engine.pylayer import TRAIN

NEG_LOG_FLT_MIN = 87.33654475   # -log(FLT_MIN), float32's smallest normal 1.17549435e-38
L = caffe_pb2.LossParameter


def loss_layer(logit_shape, label_shape, norm=None, ignore=None, normalize=None, axis=None):
    lp = caffe_pb2.LayerParameter(name="loss", type="SoftmaxWithLoss", bottom=["x", "y"], top=["loss"])
    if norm is not None:
        lp.loss_param.normalization = norm
    if normalize is not None:
        lp.loss_param.normalize = normalize
    if ignore is not None:
        lp.loss_param.ignore_label = ignore
    if axis is not None:
        lp.softmax_param.axis = axis
    return SoftmaxWithLoss(lp, [logit_shape, label_shape], TRAIN)


def accuracy_layer(logit_shape, label_shape, top_k=1, ignore=None):
    lp = caffe_pb2.LayerParameter(name="acc", type="Accuracy", bottom=["x", "y"], top=["acc"])
    lp.accuracy_param.top_k = top_k
    if ignore is not None:
        lp.accuracy_param.ignore_label = ignore
    return Accuracy(lp, [logit_shape, label_shape], TRAIN)


def softmax_np(z, axis=-1):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


# ------------------------------------------------------------------ saturation

def test_loss_term_saturates_at_neg_log_flt_min_with_the_softmax_gradient():
    """Caffe: loss -= log(max(prob[label], FLT_MIN)). A logit gap of 100 > 88 gives a probability
    below FLT_MIN, so that term is 87.3365 exactly, while the gradient stays softmax - onehot."""
    assert NEG_LOG_FLT_MIN == pytest.approx(-math.log(np.finfo(np.float32).tiny), abs=1e-6)
    logits = torch.tensor([[0.0, 100.0, 0.0],      # label 0: prob e^-100 < FLT_MIN: saturated
                           [0.0, 0.0, 95.0],       # label 1: gap 95: saturated
                           [1.0, 2.0, 3.0]],       # label 2: ordinary
                          requires_grad=True)
    label = torch.tensor([0.0, 1.0, 2.0])
    layer = loss_layer((3, 3), (3,), norm=L.NONE)
    loss = layer(logits, label)
    ordinary = -math.log(softmax_np([1.0, 2.0, 3.0])[2])
    assert loss.item() == pytest.approx(2 * NEG_LOG_FLT_MIN + ordinary, rel=1e-6)
    loss.backward()
    want = softmax_np(logits.detach().numpy()) - np.eye(3)
    np.testing.assert_allclose(logits.grad.numpy(), want, atol=1e-6)
    assert logits.grad[0, 0].item() == pytest.approx(-1.0, abs=1e-6)   # not 0: the clamp is value-only


@pytest.mark.parametrize("gap", [1e8, 1e9, 1e10, 1e30])
def test_a_huge_logit_gap_gives_the_clamp_not_a_cancelled_zero(gap):
    """A gap of 1e9 or more used to give 64.0 or 0.0 per image (per - (per - 87.34) cancels in
    float32); Caffe gives 87.34 whatever the gap, and the gradient stays softmax - onehot."""
    logits = torch.tensor([[0.0, gap], [gap, 0.0]], requires_grad=True)
    loss = loss_layer((2, 2), (2,), norm=L.NONE)(logits, torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(2 * NEG_LOG_FLT_MIN, rel=1e-6)
    loss.backward()
    np.testing.assert_allclose(logits.grad.numpy(), [[-1.0, 1.0], [1.0, -1.0]], atol=1e-6)


def test_loss_just_below_saturation_is_not_clamped():
    logits = torch.tensor([[0.0, 80.0]], requires_grad=True)
    loss = loss_layer((1, 2), (1,))(logits, torch.tensor([0.0]))
    assert loss.item() == pytest.approx(80.0, rel=1e-6)


# ------------------------------------------------------------------ normalisation with ignore_label

# (N=2, C=3, H=3, W=1): six predictions, two of them ignored (label 7)
LOGITS = np.array([[[0.2, -1.0, 0.5], [1.0, 0.3, -0.4], [2.0, 0.1, 0.0]],
                   [[-0.3, 0.8, 0.0], [0.6, 0.6, -2.0], [0.0, 1.5, 0.2]]], np.float32)[..., None]
LABELS = np.array([[1, 7, 2], [0, 1, 7]], np.float32)[:, None, :, None]   # (2, 1, 3, 1)


def _terms():
    p = softmax_np(LOGITS, axis=1)                       # (2, 3, 3, 1)
    lab = LABELS[:, 0]                                   # (2, 3, 1)
    terms, onehot = np.zeros(lab.shape), np.zeros(p.shape)
    for n, h in np.ndindex(2, 3):
        k = int(lab[n, h, 0])
        if k != 7:
            terms[n, h, 0] = -math.log(p[n, k, h, 0])
            onehot[n, k, h, 0] = 1
    valid = (lab != 7)[:, None]                          # (2, 1, 3, 1)
    return terms.sum(), (p - onehot) * valid


@pytest.mark.parametrize("norm, normalize, denom", [
    (L.VALID, None, 4),        # non-ignored predictions
    (None, None, 4),           # the default is VALID
    (L.FULL, None, 6),         # every prediction, ignored ones too (N * H * W)
    (L.BATCH_SIZE, None, 2),   # N
    (L.NONE, None, 1),
    (None, False, 2),          # legacy normalize: false -> BATCH_SIZE
    (None, True, 4),           # legacy normalize: true -> VALID
])
def test_loss_normalisation_with_ignore_label_exact(norm, normalize, denom):
    layer = loss_layer(LOGITS.shape, LABELS.shape, norm=norm, ignore=7, normalize=normalize)
    x = torch.from_numpy(LOGITS.copy()).requires_grad_(True)
    loss = layer(x, torch.from_numpy(LABELS.copy()))
    total, grad = _terms()
    assert loss.item() == pytest.approx(total / denom, rel=1e-6)
    loss.backward()
    np.testing.assert_allclose(x.grad.numpy(), grad / denom, atol=1e-6)


def test_loss_valid_without_ignore_label_counts_every_prediction():
    labels = np.where(LABELS == 7, 0, LABELS).astype(np.float32)
    layer = loss_layer(LOGITS.shape, labels.shape)
    loss = layer(torch.from_numpy(LOGITS.copy()), torch.from_numpy(labels))
    p = softmax_np(LOGITS, axis=1)
    total = sum(-math.log(p[n, int(labels[n, 0, h, 0]), h, 0]) for n, h in np.ndindex(2, 3))
    assert loss.item() == pytest.approx(total / 6, rel=1e-6)


def test_loss_valid_with_every_label_ignored_is_zero_not_nan():
    layer = loss_layer((2, 3), (2,), ignore=1)
    loss = layer(torch.randn(2, 3), torch.tensor([1.0, 1.0]))
    assert loss.item() == 0.0


# ------------------------------------------------------------------ accuracy: top-k and ties

SCORES = torch.tensor([[1.0, 2.0, 2.0, 0.0],
                       [1.0, 2.0, 2.0, 0.0],
                       [1.0, 2.0, 2.0, 0.0],
                       [5.0, 5.0, 5.0, 5.0]])
# classes scoring strictly higher than the label's: 2, 0, 3, 0
TRUTH = torch.tensor([0.0, 2.0, 3.0, 3.0])


@pytest.mark.parametrize("k, hits", [(1, [0, 1, 0, 1]),   # ties at the top count as hits
                                     (2, [0, 1, 0, 1]),   # two strictly higher: not in the top 2
                                     (3, [1, 1, 0, 1]),
                                     (4, [1, 1, 1, 1])])
def test_accuracy_hit_when_fewer_than_k_score_strictly_higher(k, hits):
    acc = accuracy_layer((4, 4), (4,), top_k=k)(SCORES, TRUTH)
    assert acc.item() == pytest.approx(sum(hits) / 4, abs=1e-7)
    for i in range(4):   # row by row: each row alone is 1 or 0
        one = accuracy_layer((1, 4), (1,), top_k=k)(SCORES[i:i + 1], TRUTH[i:i + 1])
        assert one.item() == hits[i], (k, i)


def test_accuracy_ignore_label_leaves_those_out_of_both_counts():
    acc = accuracy_layer((4, 4), (4,), top_k=1, ignore=0)(SCORES, TRUTH)
    assert acc.item() == pytest.approx(2 / 3, abs=1e-7)   # rows 1, 2, 3: hits 1, 0, 1


# ------------------------------------------------------------------ solver edges (exdrop/engine/solver.py)

from exdrop.engine.solver import ParamEntry, make_solver  # noqa: E402


def _sp(**kw):
    sp = caffe_pb2.SolverParameter()
    for k, v in kw.items():
        setattr(sp, k, v)
    return sp


@pytest.mark.parametrize("kw, msg", [
    (dict(lr_policy="step", gamma=0.5, stepsize=0), "lr_policy 'step' needs stepsize > 0"),
    (dict(lr_policy="poly", power=1.0, max_iter=0), "lr_policy 'poly' needs max_iter > 0"),
])
def test_rate_policies_refuse_a_zero_period(kw, msg):
    s = make_solver(_sp(type="SGD", base_lr=0.1, **kw), [])
    with pytest.raises(ValueError) as ei:
        s.learning_rate()
    assert str(ei.value) == msg


@pytest.mark.parametrize("kw, msg", [
    (dict(type="AdaGrad", momentum=0.9), "Momentum cannot be used with AdaGrad."),
    (dict(type="RMSProp", momentum=0.9), "Momentum cannot be used with RMSProp."),
    (dict(type="RMSProp", rms_decay=1.0), "rms_decay should lie between 0 and 1."),
    (dict(type="RMSProp", rms_decay=-0.1), "rms_decay should lie between 0 and 1."),
    (dict(type="SGD", regularization_type="L3"), "Unknown regularization type: L3"),
])
def test_solver_parameter_checks_say_what_caffe_says(kw, msg):
    with pytest.raises(ValueError) as ei:
        make_solver(_sp(base_lr=0.1, lr_policy="fixed", **kw), [])
    assert str(ei.value) == msg


def test_rmsprop_accepts_the_bounds_of_rms_decay():
    make_solver(_sp(type="RMSProp", base_lr=0.1, lr_policy="fixed", rms_decay=0.0), [])


def test_unknown_solver_type_lists_the_known_ones_and_names_the_file():
    from exdrop.engine.solver import SOLVER_TYPES
    with pytest.raises(ValueError) as ei:
        make_solver(_sp(type="Lion"), [], source="s.prototxt")
    assert str(ei.value) == f"s.prototxt: Unknown solver type: 'Lion' (known types: {', '.join(SOLVER_TYPES)})"
    with pytest.raises(ValueError) as ei:
        make_solver(_sp(type="Lion"), [])
    assert str(ei.value).startswith("Unknown solver type: 'Lion'")
    both = _sp(type="Adam", solver_type=caffe_pb2.SolverParameter.SGD)
    with pytest.raises(ValueError, match="^Failed to upgrade solver: old solver_type field"):
        make_solver(both, [])


def test_local_decay_of_exactly_one_is_applied():
    w = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    s = make_solver(_sp(type="SGD", base_lr=0.5, lr_policy="fixed", weight_decay=1.0), [ParamEntry(w, 1, 1)])
    w.grad = torch.tensor([0.0, 0.0])
    s.step_update()
    np.testing.assert_allclose(w.detach().numpy(), [1.0, -0.5])   # w - 0.5 * (0 + 1 * w)


def test_clip_gradients_zero_zeroes_the_update():
    """Caffe clips when clip_gradients >= 0: with 0 every diff is scaled by 0/||g||."""
    w = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
    s = make_solver(_sp(type="SGD", base_lr=0.5, lr_policy="fixed", clip_gradients=0.0), [ParamEntry(w, 1, 1)])
    w.grad = torch.tensor([3.0, 4.0])
    s.step_update()
    np.testing.assert_array_equal(w.detach().numpy(), [2.0, -1.0])


def test_state_dict_names_its_solver_type_and_refuses_another(tmp_path):
    w = torch.nn.Parameter(torch.tensor([1.0]))
    sgd = make_solver(_sp(type="SGD", base_lr=0.1, lr_policy="fixed"), [ParamEntry(w, 1, 1)])
    state = sgd.state_dict()
    assert state["type"] == "SGD" and state["iter"] == 0 and state["current_step"] == 0
    adam = make_solver(_sp(type="Adam", base_lr=0.1, lr_policy="fixed"), [ParamEntry(w, 1, 1)])
    with pytest.raises(ValueError, match="solver state is for SGD, this solver is Adam"):
        adam.load_state_dict(state)
    with pytest.raises(ValueError) as ei:
        sgd.restore_solverstate(tmp_path / "x.solverstate.h5")
    assert str(ei.value) == f"{tmp_path / 'x.solverstate.h5'}: HDF5 solver states are not supported"


def test_restore_names_the_history_blob_of_the_wrong_size(tmp_path):
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    sp = _sp(type="SGD", base_lr=0.1, lr_policy="fixed")
    make_solver(sp, [ParamEntry(torch.nn.Parameter(torch.zeros(3)), 1, 1)]).save_solverstate(tmp_path / "s", "n")
    with pytest.raises(ValueError) as ei:
        make_solver(sp, [ParamEntry(w, 1, 1)]).restore_solverstate(tmp_path / "s")
    assert str(ei.value) == f"{tmp_path / 's'}: history blob 0 has 3 values, expected 2"


def test_signal_classes_names_the_layer_and_the_label_shape_it_was_given():
    from exdrop.engine.eb import signal_classes
    logits = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"^drop: 6 label\(s\) of shape \(2, 3\) for a batch of 4: give one class "
                                         r"index per image, shape \(4,\)$"):
        signal_classes("gt", logits, torch.zeros(2, 3), where="drop")
    assert signal_classes("gt", logits, torch.tensor([[0], [2], [1], [1]])).tolist() == [0, 2, 1, 1]


def test_standard_dropout_draws_a_mask_per_image_by_default():
    g = torch.Generator().manual_seed(0)
    y = Fx.standard_dropout(torch.ones(8, 64), generator=g)
    assert len({tuple(row.tolist()) for row in y}) > 1          # not one mask shared by the batch


def test_adaptive_dropout_keeps_the_dtype_of_its_input_whatever_the_pre_activation():
    x = torch.rand(4, 6)
    z = torch.randn(4, 6, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    assert Fx.adaptive_dropout(x, pre_activation=z, training=True, generator=g).dtype == torch.float32
    assert Fx.adaptive_dropout(x, pre_activation=z, training=False).dtype == torch.float32
