"""Caffe's solvers (exdrop.engine.solver) against hand-computed values and a plain numpy
re-implementation of src/caffe/solvers/*.cpp."""
import math

import numpy as np
import pytest
import torch

from exdrop.proto import io
from exdrop.proto import caffe_pb2
from exdrop.engine.solver import ParamEntry, make_solver


def solver_param(**kw) -> caffe_pb2.SolverParameter:
    sp = caffe_pb2.SolverParameter()
    for k, v in kw.items():
        if isinstance(v, list):
            getattr(sp, k).extend(v)
        else:
            setattr(sp, k, v)
    return sp


def rates(sp, iters):
    s = make_solver(sp, [])
    out = {}
    for it in range(max(iters) + 1):
        if it in iters:
            out[it] = s.learning_rate()
        s.step_update()
    return out


# ------------------------------------------------------------------ lr policies

def test_lr_fixed():
    assert rates(solver_param(base_lr=0.01, lr_policy="fixed"), [0, 7]) == pytest.approx({0: 0.01, 7: 0.01})


def test_lr_step():
    sp = solver_param(base_lr=0.01, lr_policy="step", gamma=0.1, stepsize=10)
    assert rates(sp, [0, 9, 10, 25]) == pytest.approx({0: 0.01, 9: 0.01, 10: 1e-3, 25: 1e-4}, rel=1e-6)


def test_lr_exp_inv_poly_sigmoid():
    r = rates(solver_param(base_lr=0.5, lr_policy="exp", gamma=0.9), [0, 3])
    assert r == pytest.approx({0: 0.5, 3: 0.5 * 0.729}, rel=1e-6)
    r = rates(solver_param(base_lr=0.01, lr_policy="inv", gamma=1e-4, power=0.75), [0, 100])
    assert r == pytest.approx({0: 0.01, 100: 0.01 * (1 + 1e-4 * 100) ** -0.75}, rel=1e-6)
    r = rates(solver_param(base_lr=0.01, lr_policy="poly", power=2, max_iter=40), [0, 10, 30])
    assert r == pytest.approx({0: 0.01, 10: 0.01 * 0.75 ** 2, 30: 0.01 * 0.25 ** 2}, rel=1e-6)
    r = rates(solver_param(base_lr=0.01, lr_policy="sigmoid", gamma=-0.5, stepsize=10), [0, 10, 12])
    assert r == pytest.approx({0: 0.01 / (1 + math.exp(-5)), 10: 0.005,
                               12: 0.01 / (1 + math.exp(1))}, rel=1e-6)


def test_lr_multistep_caffe_bookkeeping():
    sp = solver_param(base_lr=1e-3, lr_policy="multistep", gamma=0.1, stepvalue=[25000])
    s = make_solver(sp, [])
    s.iter = 24999
    assert s.learning_rate() == pytest.approx(1e-3)
    assert s.step_update() == pytest.approx(1e-3) and s.current_step == 0
    assert s.learning_rate() == pytest.approx(1e-4, rel=1e-6)  # iter 25000
    assert s.learning_rate() == pytest.approx(1e-4, rel=1e-6)  # learning_rate() has no side effect
    assert s.step_update() == pytest.approx(1e-4, rel=1e-6) and s.current_step == 1
    s.iter = 60000
    assert s.step_update() == pytest.approx(1e-4, rel=1e-6)
    # Caffe advances current_step_ at most once per iteration
    sp = solver_param(base_lr=1.0, lr_policy="multistep", gamma=0.5, stepvalue=[2, 3, 3])
    got = rates(sp, [0, 1, 2, 3, 4, 5])
    assert got == pytest.approx({0: 1, 1: 1, 2: 0.5, 3: 0.25, 4: 0.125, 5: 0.125})


def test_unknown_policy_and_type():
    with pytest.raises(ValueError, match="learning rate policy"):
        make_solver(solver_param(base_lr=0.1), []).learning_rate()
    with pytest.raises(ValueError, match="solver type"):
        make_solver(solver_param(type="LBFGS"), [])
    with pytest.raises(ValueError, match="cannot be both specified"):
        make_solver(solver_param(type="Adam", solver_type=caffe_pb2.SolverParameter.ADAM), [])
    with pytest.raises(ValueError, match="Momentum cannot be used with AdaGrad"):
        make_solver(solver_param(type="AdaGrad", momentum=0.9), [])
    assert type(make_solver(solver_param(solver_type=caffe_pb2.SolverParameter.NESTEROV), [])).type_name == "Nesterov"


# ------------------------------------------------------------------ update rules

def f32(x):
    return float(np.float32(x))


def numpy_caffe(kind, sp, ws, grads_seq, lr_mults, decay_mults):
    """Plain numpy transcription of Caffe's ApplyUpdate (float64 arithmetic)."""
    ws = [w.astype(np.float64).copy() for w in ws]
    n = len(ws)
    hist = [np.zeros_like(w) for w in ws] + ([np.zeros_like(w) for w in ws] if kind in ("Adam", "AdaDelta") else [])
    base_lr, mom, mom2 = f32(sp.base_lr), f32(sp.momentum), f32(sp.momentum2)
    wd, delta = f32(sp.weight_decay), f32(sp.delta)
    out = []
    for it, grads in enumerate(grads_seq):
        rate = base_lr  # fixed policy
        # lr_mult 0: Caffe never computes the param diff (param_propagate_down false)
        gs = [g.astype(np.float64) * (lr_mults[i] != 0) for i, g in enumerate(grads)]
        if sp.clip_gradients >= 0:
            norm = math.sqrt(sum(float((g ** 2).sum()) for g in gs))
            if norm > sp.clip_gradients:
                gs = [g * (f32(sp.clip_gradients) / norm) for g in gs]
        for i in range(n):
            g, w, lr = gs[i] / sp.iter_size, ws[i], rate * lr_mults[i]
            g = g + wd * decay_mults[i] * (np.sign(w) if sp.regularization_type == "L1" else w)
            if kind == "SGD":
                hist[i] = mom * hist[i] + lr * g
                upd = hist[i]
            elif kind == "Nesterov":
                old = hist[i].copy()
                hist[i] = mom * hist[i] + lr * g
                upd = (1 + mom) * hist[i] - mom * old
            elif kind == "AdaGrad":
                hist[i] = hist[i] + g * g
                upd = lr * g / (np.sqrt(hist[i]) + delta)
            elif kind == "RMSProp":
                d = f32(sp.rms_decay)
                hist[i] = d * hist[i] + (1 - d) * g * g
                upd = lr * g / (np.sqrt(hist[i]) + delta)
            elif kind == "AdaDelta":
                hist[i] = mom * hist[i] + (1 - mom) * g * g
                dx = g * np.sqrt((hist[n + i] + delta) / (hist[i] + delta))
                hist[n + i] = mom * hist[n + i] + (1 - mom) * dx * dx
                upd = lr * dx
            elif kind == "Adam":
                t = it + 1
                hist[i] = mom * hist[i] + (1 - mom) * g
                hist[n + i] = mom2 * hist[n + i] + (1 - mom2) * g * g
                corr = math.sqrt(1 - mom2 ** t) / (1 - mom ** t)
                upd = lr * corr * hist[i] / (np.sqrt(hist[n + i]) + delta)
            if lr_mults[i] != 0:
                ws[i] = w - upd
        out.append([w.copy() for w in ws])
    return out, hist


KINDS = {
    "SGD": dict(momentum=0.9),
    "Nesterov": dict(momentum=0.9),
    "AdaGrad": dict(),
    "RMSProp": dict(rms_decay=0.95),
    "AdaDelta": dict(momentum=0.95, delta=1e-6),
    "Adam": dict(momentum=0.9, momentum2=0.999, delta=1e-8),
}


def make_problem(seed=0, steps=3):
    rng = np.random.default_rng(seed)
    w0 = [rng.standard_normal((4, 3, 2, 2)).astype(np.float32),  # conv weight
          rng.standard_normal(4).astype(np.float32),              # its bias
          rng.standard_normal((5, 16)).astype(np.float32)]        # frozen (lr_mult 0)
    grads = [[rng.standard_normal(w.shape).astype(np.float32) for w in w0] for _ in range(steps)]
    return w0, grads


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("extra", [{}, dict(clip_gradients=1.0, iter_size=2, regularization_type="L1")])
def test_update_rule_matches_numpy_caffe(kind, extra):
    sp = solver_param(type=kind, base_lr=0.01, lr_policy="fixed", weight_decay=5e-4, **KINDS[kind], **extra)
    lr_mults, decay_mults = [1.0, 2.0, 0.0], [1.0, 0.0, 1.0]
    w0, grads = make_problem()
    ps = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in w0]
    solver = make_solver(sp, [ParamEntry(p, lr, dm, f"p{i}") for i, (p, lr, dm) in enumerate(zip(ps, lr_mults, decay_mults))])
    expect, expect_hist = numpy_caffe(kind, sp, w0, grads, lr_mults, decay_mults)
    for step, gs in enumerate(grads):
        for p, g in zip(ps, gs):
            p.grad = torch.from_numpy(g.copy())
        assert solver.step_update() == pytest.approx(0.01)
        for p, e in zip(ps, expect[step]):
            np.testing.assert_allclose(p.detach().numpy(), e, rtol=2e-5, atol=1e-7)
    assert solver.iter == 3
    assert torch.equal(ps[2].detach(), torch.from_numpy(w0[2]))  # lr_mult 0: fixed
    assert len(solver.history) == len(expect_hist)
    for h, e in zip(solver.history, expect_hist):
        np.testing.assert_allclose(h.numpy(), e, rtol=2e-5, atol=1e-9)


def test_sgd_and_adam_by_hand_bias_lr_mult2_decay_mult0():
    """Brief's explicit check: weight (lr_mult 1) + bias (lr_mult 2, decay_mult 0), 3 steps."""
    for kind in ("SGD", "Adam"):
        sp = solver_param(type=kind, base_lr=0.1, lr_policy="fixed", momentum=0.9, weight_decay=0.01)
        w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        b = torch.nn.Parameter(torch.tensor([0.5]))
        s = make_solver(sp, [ParamEntry(w, 1, 1), ParamEntry(b, 2, 0)])
        W, B = np.array([1.0, -2.0]), np.array([0.5])
        hw, hb, vw, vb = 0 * W, 0 * B, 0 * W, 0 * B
        for t in range(1, 4):
            gw, gb = np.array([0.3, -0.1]) * t, np.array([0.2])
            w.grad, b.grad = torch.tensor(gw, dtype=torch.float32), torch.tensor(gb, dtype=torch.float32)
            s.step_update()
            gw = gw + 0.01 * W  # L2 decay on the weight only
            if kind == "SGD":
                hw, hb = 0.9 * hw + 0.1 * gw, 0.9 * hb + 0.2 * gb
                W, B = W - hw, B - hb
            else:
                hw, hb = 0.9 * hw + 0.1 * gw, 0.9 * hb + 0.1 * gb
                vw, vb = 0.999 * vw + 0.001 * gw ** 2, 0.999 * vb + 0.001 * gb ** 2
                c = math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
                W = W - 0.1 * c * hw / (np.sqrt(vw) + 1e-8)
                B = B - 0.2 * c * hb / (np.sqrt(vb) + 1e-8)
            np.testing.assert_allclose(w.detach().numpy(), W, rtol=1e-5)
            np.testing.assert_allclose(b.detach().numpy(), B, rtol=1e-5)


def test_lr_mult_zero_without_grad_stays_fixed():
    w = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    v = torch.nn.Parameter(torch.ones(2))
    s = make_solver(solver_param(type="SGD", base_lr=1, lr_policy="fixed", momentum=0.9, weight_decay=0.1),
                    [ParamEntry(w, lr_mult=0), ParamEntry(v)])
    for _ in range(2):
        v.grad = torch.ones(2)
        s.step_update()
    assert torch.equal(w, torch.ones(3)) and w.grad is None
    assert not torch.equal(v.detach(), torch.ones(2))


def test_clip_gradients_scales_global_norm():
    w = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(1))
    s = make_solver(solver_param(base_lr=1, lr_policy="fixed", clip_gradients=1.0), [ParamEntry(w), ParamEntry(b)])
    w.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # norm 5 -> scale 0.2
    s.step_update()
    np.testing.assert_allclose(w.detach().numpy(), [-0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(b.detach().numpy(), [-0.8], rtol=1e-6)
    w.grad, b.grad = torch.tensor([0.3, 0.0]), torch.tensor([0.4])  # norm 0.5 <= 1: untouched
    s.step_update()
    np.testing.assert_allclose(w.detach().numpy(), [-0.9, 0.0], rtol=1e-6)


# ------------------------------------------------------------------ resume

@pytest.mark.parametrize("kind", ["SGD", "Adam", "AdaDelta"])
def test_solverstate_round_trip_gives_identical_updates(tmp_path, kind):
    sp = solver_param(type=kind, base_lr=0.01, lr_policy="multistep", gamma=0.1, stepvalue=[2, 4],
                      weight_decay=5e-4, **KINDS[kind])
    w0, grads = make_problem(seed=3, steps=6)

    def build(ws):
        ps = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in ws]
        return ps, make_solver(sp, [ParamEntry(p, lr) for p, lr in zip(ps, [1.0, 2.0, 0.0])])

    def run(ps, s, gs_seq):
        for gs in gs_seq:
            for p, g in zip(ps, gs):
                p.grad = torch.from_numpy(g.copy())
            s.step_update()

    ps, s = build(w0)
    run(ps, s, grads[:3])
    path = tmp_path / "snap_iter_3.solverstate"
    s.save_solverstate(path, "snap_iter_3.caffemodel")
    st = caffe_pb2.SolverState.FromString(path.read_bytes())
    assert (st.iter, st.current_step, st.learned_net) == (3, 1, "snap_iter_3.caffemodel")
    assert len(st.history) == (6 if kind in ("Adam", "AdaDelta") else 3)
    assert list(st.history[0].shape.dim) == [4, 3, 2, 2]
    snap_w = [p.detach().numpy().copy() for p in ps]
    sd = s.state_dict()
    run(ps, s, grads[3:])
    final = [p.detach().clone() for p in ps]

    ps2, s2 = build(snap_w)
    assert s2.restore_solverstate(path) == "snap_iter_3.caffemodel"
    assert (s2.iter, s2.current_step) == (3, 1)
    run(ps2, s2, grads[3:])
    for a, b in zip(final, ps2):
        assert torch.equal(a, b.detach())

    ps3, s3 = build(snap_w)
    s3.load_state_dict(sd)
    run(ps3, s3, grads[3:])
    for a, b in zip(final, ps3):
        assert torch.equal(a, b.detach())


def test_restore_rejects_wrong_history_count(tmp_path):
    w = torch.nn.Parameter(torch.zeros(2))
    sgd = make_solver(solver_param(type="SGD", base_lr=1, lr_policy="fixed"), [ParamEntry(w)])
    path = tmp_path / "s.solverstate"
    sgd.save_solverstate(path, "")
    adam = make_solver(solver_param(type="Adam", base_lr=1, lr_policy="fixed"), [ParamEntry(w)])
    with pytest.raises(ValueError, match="history"):
        adam.restore_solverstate(path)


def test_solver_prototxt_end_to_end():
    sp = io.parse_solver('base_lr: 0.001 lr_policy: "multistep" gamma: 0.1 stepvalue: 25000 '
                         'momentum: 0.9 weight_decay: 0.0005 type: "Nesterov"')
    assert type(make_solver(sp, [])).type_name == "Nesterov"
    from exdrop.engine.solver import AdamSolver, Solver
    s = Solver(solver_param(type="Adam", base_lr=0.1, lr_policy="fixed"), [])
    assert isinstance(s, AdamSolver) and s.iter == 0


def test_snapshot_model_path_is_the_learned_net_beside_the_state_or_its_own_name(tmp_path):
    """A .solverstate's weights: its learned_net's file name in its own folder; a state that names
    none (written by hand, or an old tool) takes the .caffemodel of its own name."""
    from exdrop.engine.snapshot import snapshot_model_path
    state = tmp_path / "snap_iter_3.solverstate"
    for learned, model in (("/elsewhere/other_iter_3.caffemodel", "other_iter_3.caffemodel"),
                           ("", "snap_iter_3.caffemodel")):
        state.write_bytes(caffe_pb2.SolverState(iter=3, learned_net=learned).SerializeToString())
        (tmp_path / model).write_bytes(b"")
        assert snapshot_model_path(state) == tmp_path / model
        (tmp_path / model).unlink()
        with pytest.raises(FileNotFoundError, match=f"^{state}: its weights {tmp_path / model} are missing \\(the "
                                                    f"solver state names learned_net {learned or '[(]none[)]'}; Caffe's "
                                                    "snapshots keep the .caffemodel beside the .solverstate\\)$"):
            snapshot_model_path(state)
    with pytest.raises(FileNotFoundError, match=f"^snapshot {tmp_path / 'gone.solverstate'} not found$"):
        snapshot_model_path(tmp_path / "gone.solverstate")


def test_plain_state_keeps_plain_values_and_names_where_another_sits():
    """An engine state saved for torch.load(weights_only=True): tensors (on the CPU), numpy arrays and
    scalars as tensors and numbers, tuples as lists; anything else is refused by its place."""
    import numpy as np
    from exdrop.engine.snapshot import plain_state
    got = plain_state({"t": torch.ones(2, requires_grad=True), "a": np.arange(3), "n": np.float32(1.5),
                       "l": (1, "x", None, [True])})
    assert torch.equal(got["t"], torch.ones(2)) and not got["t"].requires_grad
    assert torch.equal(got["a"], torch.arange(3)) and got["n"] == 1.5 and type(got["n"]) is float
    assert got["l"] == [1, "x", None, [True]]
    with pytest.raises(TypeError, match=r"^engine state state\['opt'\]\[1\]\[0\] is a object, not a plain value$"):
        plain_state({"opt": [1, (object(),)]})
