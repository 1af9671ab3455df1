"""The drop-in ExcitationDropout refuses labels it cannot use, each with a named error that says
what shape and dtype it expected (it used to take them silently: with 1 label for 8 images,
images 2-8 kept every unit)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from exdrop.nn import ExcitationDropout, excitation_through


@pytest.fixture
def drop():
    torch.manual_seed(0)
    return ExcitationDropout(head=nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)), p=0.5)


A = torch.relu(torch.randn(8, 16, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("target, message", [
    (torch.zeros(7, dtype=torch.long), r"class indices of shape \(8,\) for this batch, got shape \(7,\)"),
    (torch.zeros(1, dtype=torch.long), r"shape \(8,\) for this batch, got shape \(1,\)"),
    (torch.zeros(8, 1, dtype=torch.long), r"shape \(8,\) for this batch, got shape \(8, 1\)"),
    (torch.zeros(2, 4, dtype=torch.long), r"shape \(8,\) for this batch, got shape \(2, 4\)"),
    (torch.zeros(8), r"integer class indices \(torch.long\), got dtype torch.float32"),
    (torch.zeros(8, dtype=torch.bool), r"integer class indices \(torch.long\), got dtype torch.bool"),
    (torch.eye(10, dtype=torch.long)[:8], r"shape \(8, 10\) looks one-hot; give class indices of shape \(8,\)"),
    ([0] * 8, r"target must be a tensor of class indices of shape \(8,\), got list"),
])
def test_a_wrong_target_is_named(drop, target, message):
    with pytest.raises(ValueError, match=message):
        drop(A, target=target)


@pytest.mark.parametrize("bad", [10, -1])
def test_a_class_out_of_range_is_named(drop, bad):
    target = torch.arange(8)
    target[3] = bad
    with pytest.raises(RuntimeError, match=r"a target class index is outside \[0, 10\)"):
        drop(A, target=target)


def test_the_label_given_positionally_is_named(drop):
    """drop(a, y), as torch losses take the label: the second argument is the saliency."""
    with pytest.raises(ValueError, match=r"second argument is the saliency .*give the labels as target=\.\.\."):
        drop(A, torch.arange(8))


def test_good_targets_still_work(drop):
    assert drop(A, target=torch.arange(8)).shape == A.shape
    assert drop(A, target=torch.arange(8, dtype=torch.int32)).shape == A.shape
    p = excitation_through(drop.head, A, torch.arange(8))
    assert p.shape == A.shape and (p >= 0).all() and (p.sum(1) <= 1 + 1e-5).all()   # mass lost only where Z = 0


def test_the_head_is_not_a_second_copy_in_state_dict():
    head = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))
    model = nn.ModuleDict({"head": head, "drop": ExcitationDropout(head=head)})
    keys = list(model.state_dict())
    assert keys == ["head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"]
    assert model["drop"].head is head


def test_p_is_the_base_rate_and_most_units_are_kept(drop):
    """p = 0.5 drops a unit holding 1/N of the evidence half the time; on ordinary data the
    evidence is uneven, so far more than half the units are kept (the docstring's 0.7-0.85)."""
    torch.manual_seed(3)
    a = torch.relu(torch.randn(256, 16))
    kept = (drop(torch.ones_like(a), saliency=excitation_through(drop.head, a, torch.randint(0, 10, (256,))))
            != 0).float().mean().item()
    assert 0.65 < kept < 0.9, kept
