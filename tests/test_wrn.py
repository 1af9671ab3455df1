"""WRN (Sec. 5): the generated WRN-28-10 prototxts (36.5M parameters, as Zagoruyko and Komodakis
report), one training iteration on CPU at a small batch with Activation Dropout, and EB mass
conserved through the residual blocks (BatchNorm, Scale and Eltwise SUM). The match with real
pycaffe (WRN-10-1) is in tests/test_caffe_diff.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from google.protobuf import text_format

from exdrop.proto import io as cio
from exdrop.engine.net import Net
from exdrop.engine.pylayer import TEST, TRAIN
from exdrop.engine.solver import make_solver
from exdrop.experiments.wrn import OUT, solver, wrn_net, write_all
from make_dry import unquoted  # noqa: E402


def test_committed_prototxts_are_the_generated_ones(tmp_path):
    written = write_all(tmp_path)
    assert len(written) == 8
    for path in written:
        committed = OUT / path.name
        assert committed.read_text() == path.read_text(), f"{committed}: regenerate with make prototxt"
    sp = cio.read_solver_prototxt(OUT / "solver_activation.prototxt")
    assert (sp.type, sp.base_lr, sp.gamma, sp.momentum) == ("Nesterov", pytest.approx(0.1), pytest.approx(0.2),
                                                            pytest.approx(0.9))
    assert list(sp.stepvalue) == [60 * 352, 120 * 352, 160 * 352] and sp.max_iter == 200 * 352   # 45K / 128
    net = cio.read_net_prototxt(OUT / "train_val_activation.prototxt")
    drops = [lp for lp in net.layer if lp.type == "Python"]
    assert len(drops) == 12 and {lp.python_param.layer for lp in drops} == {"ActivationDropout"}
    assert next(lp for lp in net.layer if lp.include and lp.include[0].phase == TRAIN).data_param.batch_size == 128


def test_wrn_28_10_trains_one_iteration_on_cpu():
    torch.manual_seed(0)
    net = Net(wrn_net(28, 10, "activation", input_shape=(2, 3, 32, 32)), TRAIN, "cpu", "wrn28-10")
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == pytest.approx(36.5e6, rel=0.01)
    sp = solver("net.prototxt", "activation")
    opt = make_solver(sp, net.learnable())
    feed = {"data": torch.randn(2, 3, 32, 32), "label": torch.tensor([1.0, 7.0])}
    before = net.layer("g2b1_conv1").blobs[0].detach().clone()
    loss = net.loss(net(feed))
    loss.backward()
    opt.step_update()
    assert torch.isfinite(loss) and not torch.equal(before, net.layer("g2b1_conv1").blobs[0])
    bn = net.layer("g1b1_pre_bn").blobs
    assert float(bn[2][0]) == 1.0 and float(bn[0].abs().sum()) > 0   # the running sums moved once


def test_eb_mass_is_conserved_through_the_blocks():
    torch.manual_seed(1)
    net = Net(wrn_net(10, 1, "activation", input_shape=(3, 3, 32, 32)), TEST, "cpu", "wrn10-1")
    feed = {"data": torch.randn(3, 3, 32, 32), "label": torch.tensor([1.0, 2.0, 3.0])}
    with torch.no_grad():
        net.forward(feed, record=True)
        for blob in ("pool", "final", "g3b1_sum", "g2b1_sum", "g1b1_sum", "g1b1_pre", "conv1"):
            mass = net.excitation(blob).flatten(1).sum(1)
            assert mass.tolist() == pytest.approx([1.0] * 3, abs=1e-3), blob


def test_make_target_trains_the_generated_solver():
    import subprocess
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["make", "-n", "-C", str(root), "train-wrn-cifar10", "VARIANT=standard", "MAX_ITER=5"],
                         capture_output=True, text=True, check=True).stdout
    out = unquoted(out.replace("\\\n", " "))
    assert "exdrop train prototxt/wrn/cifar10/solver_standard.prototxt --out models/wrn_cifar10_standard" in out
    assert "--max-iter 5" in out


def test_excitation_dropout_inside_the_residual_blocks_trains():
    """ED between a block's convolutions: its p_EB comes from EB through the blocks above it
    (BatchNorm, Scale, Eltwise SUM, shortcuts) in the training step. A residual branch carries
    only its share of the mass (the shortcut takes the rest), so it does not sum to 1."""
    torch.manual_seed(2)
    net = Net(wrn_net(10, 1, "ed", input_shape=(4, 3, 32, 32)), TRAIN, "cpu", "wrn10-1-ed")
    seen = []
    layer = net.layer("g2b1_drop")
    original = net._saliency

    def spy(i, lyr, blobs):
        out = original(i, lyr, blobs)
        if lyr is layer:
            seen.append(out.flatten(1).sum(1))
        return out
    net._saliency = spy
    opt = make_solver(solver("net.prototxt", "ed"), net.learnable())
    feed = {"data": torch.randn(4, 3, 32, 32), "label": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    loss = net.loss(net(feed))
    loss.backward()
    opt.step_update()
    assert torch.isfinite(loss) and len(seen) == 1
    assert torch.isfinite(seen[0]).all() and (seen[0] != 0).all()
