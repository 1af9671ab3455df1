"""Excitation Dropout's ablations (the README's "Does it reproduce?", phase C): N of Eqn 3 counted
over each image's alive units (``count='alive'``, not the paper's formula) in the functional core,
the drop-in module and the Python layer, and the sweep's ablation methods."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from exdrop.engine import functional as Fx
from exdrop.proto import io as cio
from exdrop.experiments import sweep as S
from exdrop.engine.nn import ExcitationDropout

ROOT = Path(__file__).resolve().parents[1]


def test_alive_count_is_eqn3_on_the_alive_units_alone():
    """An image with K alive units under count='alive' gets, on those units, Eqn 3 with N = K:
    the same numbers as the formula on a K-unit layer; its dead units (share 0) are kept."""
    x = torch.tensor([[0.0, 2.0, 0.0, 1.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    share = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0], [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]])
    units = Fx.alive_units(x)
    assert units.tolist() == [[3], [6]]
    got = Fx.retain_probability(share, 0.5, units)
    alive = [1, 3, 4]
    assert torch.allclose(got[0, alive], Fx.retain_probability(share[:1, alive], 0.5)[0])
    assert got[0, [0, 2, 5]].tolist() == [1.0, 1.0, 1.0]
    assert torch.allclose(got[1], Fx.retain_probability(share[1:], 0.5)[0])   # all alive: the paper's N
    # by hand: N = 3, P = 0.5, p = 0.5: 1 - 0.5 * 2 * 0.5 / ((1.5 - 1) * 0.5 + 0.5) = 1 - 0.5 / 0.75
    assert got[0, 1].item() == pytest.approx(1 - 0.5 / 0.75)
    # at p = 1/K a unit is kept with probability P, whatever the layer's width
    assert Fx.retain_probability(torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0]]), 0.5,
                                 torch.tensor([[3]]))[0, :3].tolist() == pytest.approx([0.5] * 3)
    # the probabilities keep the shares' dtype, whatever the count's (an int, a float64, a bfloat16 layer)
    for dtype in (torch.float32, torch.bfloat16):
        for count in (torch.tensor([[3], [6]]), torch.tensor([[3.0], [6.0]], dtype=torch.float64)):
            assert Fx.retain_probability(share.to(dtype), 0.5, count).dtype == dtype, (dtype, count.dtype)
    # a feature map counts as alive when any position is positive
    conv = torch.zeros(1, 3, 2, 2)
    conv[0, 1, 1, 0] = 0.1
    assert Fx.alive_units(conv).tolist() == [[1]]


def test_alive_count_keeps_more_than_the_paper_in_a_sparse_layer():
    """The point of the ablation: with K << N alive units sharing the evidence, Eqn 3 with the
    layer's N keeps them with probability ~ 1 - 1023.5 / (1023 + 0.5 K) (K = 370: 0.15), with
    N = K near P."""
    n, k = 2048, 370
    share = torch.zeros(1, n)
    share[0, :k] = 1.0 / k
    x = (share > 0).float()
    paper = Fx.retain_probability(share, 0.5)[0, 0].item()
    alive = Fx.retain_probability(share, 0.5, Fx.alive_units(x))[0, 0].item()
    assert paper == pytest.approx(1 - 1023.5 / (1023 + 0.5 * k), abs=2e-3) and paper < 0.16
    assert alive == pytest.approx(0.5)


def test_module_and_layer_take_count(tmp_path):
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(16, 10))
    drop = ExcitationDropout(head=head, p=0.5, count="alive")
    assert "count='alive'" in repr(drop)
    out = drop(torch.relu(torch.randn(4, 16)), target=torch.tensor([0, 1, 2, 3]))
    assert out.shape == (4, 16)
    with pytest.raises(ValueError, match="count must be one of .*'all', 'alive'.* got 'some'"):
        ExcitationDropout(head=head, count="some")
    with pytest.raises(ValueError, match="count must be one of"):
        Fx.guided_dropout(torch.ones(1, 4), torch.ones(1, 4) / 4, count="dead")
    sys.path.insert(0, str(ROOT / "layers"))
    try:
        import excitation_dropout as layer_module
    finally:
        sys.path.remove(str(ROOT / "layers"))
    params = layer_module.ExcitationDropout.parse("{'dropout_ratio': 0.5, 'count': 'alive'}")
    assert params["count"] == "alive"
    assert layer_module.ExcitationDropout.torch_module(params, 0).count == "alive"
    with pytest.raises(ValueError, match="count must be 'all'"):
        layer_module.ExcitationDropout.parse("{'count': 'some'}")


@pytest.mark.parametrize("method", sorted(S.ABLATIONS))
def test_sweep_ablation_writes_ed_with_its_parameters(method, tmp_path):
    data = {"train": {1: str(tmp_path / "train_lmdb")}, "val": {1: str(tmp_path / "val_lmdb")}}
    run = S.write_run(S.Run("cifar10", method, 0.5, 1, tmp_path / method), S.BUDGETS["cpu-200ep"], data)
    net = cio.read_net_prototxt(run.folder / "net.prototxt")
    ed = [lp for lp in net.layer if lp.type == "Python"]
    assert [lp.python_param.layer for lp in ed] == ["ExcitationDropout"]
    import ast
    params = ast.literal_eval(ed[0].python_param.param_str)
    assert params == {"dropout_ratio": 0.5, **S.ABLATIONS[method]}
    assert "solver_ed.prototxt" in run.solver.read_text()
    assert method in S.METHOD_LABELS and method in S.METHODS
