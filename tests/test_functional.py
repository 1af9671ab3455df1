"""The functional core of guided dropout (exdrop.engine.functional) and the drop-in modules
(exdrop.engine.nn): Eqn 3 at its three design constraints, mask statistics, the per-image
rescale, whole-map dropping on convolution blobs, and the drop-in ExcitationDropout
against the prototxt engine's p_EB."""
import math

import pytest
import torch
from torch import nn

from exdrop.engine import functional as Fx
from exdrop.proto import io
from exdrop.engine.net import Net
from exdrop.engine.nn import ActivationDropout, ExcitationDropout, StandardDropout, excitation_through
from exdrop.engine.pylayer import TEST

NS = [2, 3, 10, 100, 2048]
PS = [0.1, 0.25, 0.5, 0.8, 0.95]


def eqn3(p_eb: float, n: int, P: float) -> float:
    """Eqn 3 of the paper, written out directly (float64)."""
    return 1.0 - (1.0 - P) * (n - 1) * p_eb / (((1.0 - P) * n - 1.0) * p_eb + P)


# ------------------------------------------------------------------ Eqn 3

@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("P", PS)
def test_retain_probability_three_constraints(n, P):
    p = torch.zeros(1, n, dtype=torch.float64)
    assert Fx.retain_probability(p, P)[0, 0].item() == pytest.approx(1.0, abs=1e-12)   # p_EB = 0 -> keep
    p[0, 0] = 1.0
    assert Fx.retain_probability(p, P)[0, 0].item() == pytest.approx(0.0, abs=1e-12)   # p_EB = 1 -> drop
    uniform = torch.full((3, n), 1.0 / n, dtype=torch.float64)
    assert torch.allclose(Fx.retain_probability(uniform, P), torch.full_like(uniform, P), atol=1e-12)
    # float32 too (what the engine uses)
    assert torch.allclose(Fx.retain_probability(uniform.float(), P), torch.full((3, n), P), atol=1e-5)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("P", [0.2, 0.5, 0.9])
def test_retain_probability_matches_formula_and_decreases(n, P):
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
    # Treat each grid value as a unit of an n-unit layer: build a (1001, n) batch with the value in column 0.
    batch = torch.zeros(1001, n, dtype=torch.float64)
    batch[:, 0] = grid
    got = Fx.retain_probability(batch, P)[:, 0]
    want = torch.tensor([eqn3(v, n, P) for v in grid.tolist()], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-12)
    assert (got[1:] < got[:-1]).all(), "retain probability must strictly decrease in p_EB"
    assert (got >= 0).all() and (got <= 1).all()


def test_retain_probability_rejects_bad_base():
    with pytest.raises(ValueError):
        Fx.retain_probability(torch.zeros(1, 4), 0.0)
    with pytest.raises(ValueError):
        Fx.retain_probability(torch.zeros(1, 4), 1.5)


def test_paper_figure2_point():
    # Fig. 2 of the paper: N = 10, P = 0.5; p_EB = 0.5 -> 1 - 0.5*9*0.5 / (4*0.5 + 0.5) = 0.1
    p = torch.zeros(1, 10, dtype=torch.float64)
    p[0, 0] = 0.5
    assert Fx.retain_probability(p, 0.5)[0, 0].item() == pytest.approx(0.1, abs=1e-12)


# ------------------------------------------------------------------ sampled masks

@pytest.mark.parametrize("P", [0.3, 0.5, 0.8])
def test_mask_mean_is_base_retain_for_uniform_p_eb(P):
    g = torch.Generator().manual_seed(1234)
    B, N = 400, 1000                       # 4e5 draws: std of the mean <= 7.9e-4
    share = torch.full((B, N), 1.0 / N)
    retain = Fx.retain_probability(share, P)
    mask = Fx.sample_unit_mask(retain, g)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert abs(mask.mean().item() - P) < 0.01   # > 12 standard deviations
    # every image individually is near P too (std per image 0.016 at N = 1000)
    assert (mask.mean(1) - P).abs().max().item() < 0.1


def test_guided_dropout_mean_retain_and_frequencies():
    # Non-uniform p_EB: per-unit keep frequencies follow Eqn 3 (4000 draws per unit).
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    N, P = 8, 0.5
    share = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0]])
    retain = Fx.retain_probability(share, P)[0]
    x = torch.ones(4000, N)
    out = Fx.guided_dropout(x, share.expand(4000, N), 1 - P, rescale=False, generator=g)  # p = 1 - P
    freq = (out != 0).float().mean(0)
    assert torch.allclose(freq, retain, atol=0.04)   # std <= 0.008
    assert freq[6].item() == 1.0 and freq[7].item() == 1.0   # p_EB = 0 -> always kept


def test_activation_share_sums_to_one_and_zero_image_not_dropped():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(5, 12))
    x[2] = 0.0
    share = Fx.activation_share(x)
    sums = share.sum(1)
    assert torch.allclose(sums[[0, 1, 3, 4]], torch.ones(4), atol=1e-6)
    assert sums[2].item() == 0.0 and torch.isfinite(share).all()
    assert torch.allclose(share[0], x[0] / x[0].sum())
    retain = Fx.retain_probability(share, 0.5)
    assert (retain[2] == 1.0).all()
    # 4-D: share is per feature map (summed over space)
    y = torch.relu(torch.randn(3, 6, 4, 4))
    y[1] = 0.0
    s4 = Fx.activation_share(y)
    assert s4.shape == (3, 6)
    assert torch.allclose(s4[0], y[0].sum((1, 2)) / y[0].sum())
    assert s4[1].abs().sum().item() == 0.0
    # An all-zero image goes through guided dropout untouched (not dropped, not rescaled).
    g = torch.Generator().manual_seed(3)
    z = torch.zeros(2, 10)
    z[1] = torch.arange(1.0, 11.0)
    zs = torch.zeros(2, 10)   # p = 0 everywhere -> retain 1
    out = Fx.guided_dropout(z, zs, 0.5, generator=g)
    assert torch.equal(out, z)


def test_activation_dropout_module_train_eval():
    torch.manual_seed(0)
    x = torch.relu(torch.randn(6, 20)) + 0.01
    m = ActivationDropout(p=0.5)
    m.eval()
    assert torch.equal(m(x), x)
    m.train()
    out = m(x)
    kept = out != 0
    for b in range(6):
        frac = kept[b].float().mean()
        assert torch.allclose(out[b][kept[b]], x[b][kept[b]] / frac)


# ------------------------------------------------------------------ apply_unit_mask

def test_apply_unit_mask_exact_values_fc():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                      [1.0, 2.0, 3.0, 4.0],
                      [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0],    # kept 1/2 -> x2
                         [1.0, 1.0, 1.0, 0.0],    # kept 3/4 -> x4/3
                         [0.0, 0.0, 0.0, 0.0]])   # nothing kept -> stays zero, no NaN
    out = Fx.apply_unit_mask(x, mask)
    want = torch.tensor([[2.0, 0.0, 6.0, 0.0],
                         [4.0 / 3, 8.0 / 3, 4.0, 0.0],
                         [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(out, want, atol=1e-6)
    assert torch.equal(Fx.apply_unit_mask(x, mask, rescale=False), x * mask)


def test_apply_unit_mask_drops_whole_feature_maps():
    torch.manual_seed(0)
    x = torch.rand(2, 4, 3, 5) + 0.1
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0],
                         [0.0, 1.0, 1.0, 1.0]])
    out = Fx.apply_unit_mask(x, mask)
    for b in range(2):
        kept = mask[b].mean().item()
        for c in range(4):
            if mask[b, c] == 0:
                assert (out[b, c] == 0).all()
            else:
                assert torch.allclose(out[b, c], x[b, c] / kept)


def test_grad_rescale_true_vs_false():
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0],
                         [1.0, 1.0, 1.0, 0.0]])
    w = torch.randn(2, 4)
    scale = torch.tensor([[2.0], [4.0 / 3]])
    outs, grads = {}, {}
    for gr in (True, False):
        xx = x.clone().requires_grad_(True)
        y = Fx.apply_unit_mask(xx, mask, grad_rescale=gr)
        (y * w).sum().backward()
        outs[gr], grads[gr] = y.detach(), xx.grad
    assert torch.allclose(outs[True], outs[False])                 # same forward
    assert torch.allclose(outs[True], x * mask * scale)
    assert torch.allclose(grads[True], w * mask * scale, atol=1e-6)   # autograd: mask / kept
    assert torch.allclose(grads[False], w * mask, atol=1e-6)          # authors' code: bare mask
    # 4-D as well
    x4 = torch.randn(2, 4, 2, 2, requires_grad=True)
    Fx.apply_unit_mask(x4, mask, grad_rescale=False).sum().backward()
    assert torch.allclose(x4.grad, mask.view(2, 4, 1, 1).expand(2, 4, 2, 2))


# ------------------------------------------------------------------ standard dropout

def test_standard_dropout_per_image_vs_shared():
    torch.manual_seed(0)
    x = torch.ones(16, 64)
    P = 0.5
    g = torch.Generator().manual_seed(11)
    shared = Fx.standard_dropout(x, P, per_image=False, generator=g)
    assert set(shared.unique().tolist()) <= {0.0, 1.0 / P}
    assert (shared == shared[0]).all(), "per_image=False must share one mask across the batch"
    per = Fx.standard_dropout(x, P, per_image=True, generator=g)
    assert set(per.unique().tolist()) <= {0.0, 1.0 / P}
    distinct = {tuple(r.tolist()) for r in per}
    assert len(distinct) == 16, "per_image=True must draw a new mask for every image"
    # conv blob: whole maps, one value per (image, map)
    x4 = torch.ones(8, 32, 3, 3)
    y4 = Fx.standard_dropout(x4, P, per_image=True, generator=g)
    flat = y4.flatten(2)
    assert (flat == flat[:, :, :1]).all()
    y4s = Fx.standard_dropout(x4, P, per_image=False, generator=g)
    assert (y4s == y4s[:1]).all()
    # mean keep rate near P on a big draw
    # p is the dropout probability, as in torch.nn.functional.dropout
    big = Fx.standard_dropout(torch.ones(200, 1000), 0.3, generator=g)
    assert abs((big == 0).float().mean().item() - 0.3) < 0.01
    assert torch.allclose(big[big != 0], torch.tensor(1 / 0.7))
    assert torch.equal(Fx.standard_dropout(x, 0.0), x)
    assert torch.equal(Fx.standard_dropout(x, 1.0), torch.zeros_like(x))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            Fx.standard_dropout(x, bad)


def test_standard_dropout_draws_its_mask_on_the_input_device():
    """The mask is drawn where x lives, with no host copy ("meta" stands in for CUDA here: a mask
    drawn on the host cannot multiply it)."""
    for per_image in (True, False):
        for shape in ((4, 6), (2, 3, 5, 5)):
            y = Fx.standard_dropout(torch.ones(shape, device="meta"), 0.5, per_image=per_image)
            assert y.device.type == "meta" and y.shape == shape


def test_standard_dropout_module_eval_identity():
    m = StandardDropout(p=0.5, per_image=False).eval()
    x = torch.randn(3, 5)
    assert torch.equal(m(x), x)


# ------------------------------------------------------------------ the drop-in module

def _head():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def test_dropin_excitation_dropout_train_vs_eval():
    head = _head()
    drop = ExcitationDropout(head=head, p=0.5)
    torch.manual_seed(0)
    x = torch.relu(torch.randn(5, 8)) + 0.05
    y = torch.tensor([0, 1, 2, 0, 1])
    drop.eval()
    assert torch.equal(drop(x, target=y), x)    # test time: identity, no target needed
    assert torch.equal(drop(x), x)
    drop.train()
    with pytest.raises(ValueError):
        drop(x)                                   # 'gt' signal needs targets in training
    torch.manual_seed(1)
    out = drop(x, target=y)
    assert out.shape == x.shape
    for b in range(5):
        kept = out[b] != 0
        frac = kept.float().mean()
        assert 0 < frac.item() <= 1
        assert torch.allclose(out[b][kept], x[b][kept] / frac)   # per-image rescale
    # units with p_EB = 0 are never dropped
    pe = excitation_through(head, x, y)
    torch.manual_seed(2)
    for _ in range(20):
        o = drop(x, target=y)
        assert (o[pe == 0] != 0).all()


def test_dropin_gradient_flows():
    torch.manual_seed(0)
    features = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    head = _head()
    drop = ExcitationDropout(head=head, p=0.5).train()
    x = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    h = drop(features(x), target=y)
    loss = nn.functional.cross_entropy(head(h), y)
    loss.backward()
    for p in list(features.parameters()) + list(head.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert features[0].weight.grad.abs().sum() > 0


TINY_FC = """
name: "tiny"
layer { name: "input" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 5 dim: 8 } shape { dim: 5 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def test_dropin_p_eb_equals_net_excitation():
    head = _head()
    net = Net(io.parse_net(TINY_FC, "tiny.prototxt"), TEST, source="tiny.prototxt")
    with torch.no_grad():
        for name, lin in (("ip1", head[0]), ("ip2", head[2])):
            net.layer(name).blobs[0].copy_(lin.weight)
            net.layer(name).blobs[1].copy_(lin.bias)
    torch.manual_seed(0)
    x = torch.relu(torch.randn(5, 8)) + 0.05
    y = torch.tensor([0, 1, 2, 2, 1])
    blobs = net({"data": x, "label": y}, record=True)
    assert torch.allclose(blobs["ip2"], head(x), atol=1e-6)
    pe_net = net.excitation("data")
    pe_mod = excitation_through(head, x, y)
    assert pe_net.shape == pe_mod.shape == (5, 8)
    assert torch.allclose(pe_net, pe_mod, atol=1e-6)
    # mass 1 per image, or 0 where the signal meets Z = 0 (all positive weights of the
    # class sit on dead units): never anything in between
    sums = pe_mod.sum(1)
    assert all(abs(v - 1) < 1e-5 or v == 0 for v in sums.tolist())
    assert sum(abs(v - 1) < 1e-5 for v in sums.tolist()) >= 3
    # and the "pred" / fixed-class signals agree as well
    pred = head(x).argmax(1)
    assert torch.allclose(net.excitation("data", classes=pred),
                          excitation_through(head, x, pred), atol=1e-6)
    assert not math.isnan(pe_net.sum().item())


# ------------------------------------------------------------------ p means what torch.nn.Dropout's p means

@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_p_is_the_dropout_probability_as_in_torch(p):
    torch.manual_seed(0)
    x = torch.ones(200, 1000)
    ref = (nn.Dropout(p=p).train()(x) != 0).float().mean().item()
    ours = (StandardDropout(p=p).train()(x) != 0).float().mean().item()
    shared = (StandardDropout(p=p, per_image=False).train()(x) != 0).float().mean().item()
    assert abs(ref - (1 - p)) < 0.01
    assert abs(ours - ref) < 0.01
    assert abs(shared - ref) < 0.05          # one 1000-unit mask for the whole batch
    # guided layers: with a uniform share every unit is kept with P = 1 - p (Eqn 3 at p_EB = 1/N)
    uniform = torch.full((200, 1000), 1e-3)
    kept = (ExcitationDropout(p=p).train()(x, saliency=uniform) != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.01
    kept = (ActivationDropout(p=p).train()(x) != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.01
    assert ExcitationDropout(p=p).base_retain == pytest.approx(1 - p)


def test_modules_reject_p_outside_torch_range():
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout probability"):
            ExcitationDropout(p=bad)
        with pytest.raises(ValueError, match="dropout probability"):
            ActivationDropout(p=bad)
    with pytest.raises(ValueError, match="dropout probability"):
        StandardDropout(p=1.5)
    assert "p=0.2" in repr(StandardDropout(p=0.2))


# ------------------------------------------------------------------ always a valid Bernoulli probability

@pytest.mark.parametrize("n", [2, 3, 5, 7, 2048])
@pytest.mark.parametrize("P", [0.1, 0.2, 0.7, 0.8, 0.9, 0.95])
def test_retain_probability_is_a_valid_probability_in_float32(n, P):
    # In float32, 1 - drop at p_EB = 1 rounds to -1.2e-7 for some (N, P): the result is clamped,
    # so torch.bernoulli (which refuses anything outside [0, 1]) always gets a probability.
    p = torch.zeros(3, n)
    p[0, 0] = 1.0
    p[1] = 1.0 / n
    r = Fx.retain_probability(p, P)
    assert (r >= 0).all() and (r <= 1).all(), r[0, 0].item()
    assert r[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(r[2], torch.ones(n))
    torch.bernoulli(r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_retain_probability_clamps_shares_and_keeps_nan(dtype):
    # shares outside [0, 1] count as 0 or 1; a NaN share keeps its unit (retain 1), so a NaN
    # input reaches the loss instead of failing inside torch.bernoulli
    big = torch.finfo(dtype).max
    vals = [-0.2, -big, -math.inf, 0.0, 1.0, 1.5, big, math.inf, math.nan]
    want = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    for n, P in ((2048, 0.5), (10, 0.5), (2, 0.8), (1, 0.5)):
        for v, w in zip(vals, want):
            p = torch.zeros(1, n, dtype=dtype)
            p[0, 0] = v
            r = Fx.retain_probability(p, P)
            assert not torch.isnan(r).any(), (n, P, v)
            assert (r >= 0).all() and (r <= 1).all(), (n, P, v, r[0, 0].item())
            if n > 1:
                assert r[0, 0].item() == pytest.approx(w, abs=1e-6), (n, P, v, r[0, 0].item())
            torch.bernoulli(r)
    share = torch.tensor([[math.nan, 0.5, 0.5, 0.0], [math.inf, 1e38, -1.0, math.nan]])
    g = torch.Generator().manual_seed(0)
    out = Fx.guided_dropout(torch.ones(2, 4), share, 0.5, rescale=False, generator=g)
    assert out[0, 0] == 1.0 and out[0, 3] == 1.0 and out[1, 2] == 1.0 and out[1, 3] == 1.0
    assert out[1, 0] == 0.0 and out[1, 1] == 0.0


def test_activation_share_of_an_all_zero_image_has_a_zero_gradient_not_nan():
    """An image whose activations are all 0 gets shares of 0, and the gradient through them is 0:
    the division's denominator is replaced before dividing, so no 0/0 reaches autograd."""
    from exdrop.engine.functional import activation_share
    x = torch.zeros(2, 4)
    x[1] = torch.tensor([1.0, 2.0, 0.0, 1.0])
    x.requires_grad_(True)
    share = activation_share(x)
    assert share[0].eq(0).all() and torch.allclose(share[1], torch.tensor([0.25, 0.5, 0.0, 0.25]))
    share.pow(2).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad[0].eq(0).all()


def test_information_dropout_noise_comes_from_the_given_generator():
    from exdrop.engine.functional import information_dropout
    f = torch.rand(3, 5) + 0.5
    w, b = torch.full((5, 5), 0.1), torch.zeros(5)
    outs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)   # the global RNG differs; the layer's own generator does not
        outs.append(information_dropout(f, None, w, b, generator=torch.Generator().manual_seed(7))[0])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert not torch.equal(outs[0], f)
