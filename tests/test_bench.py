"""The benchmark harness: input-layer rewriting, the per-image-loop ED, the one timing loop
(any objects with a ``.step()``), a tiny timed run. (``exdrop bench caffe`` runs in
tests/test_caffe_diff.py.)"""
import time
from pathlib import Path

import pytest
import torch

from exdrop.proto import io as cio
from exdrop.experiments.bench import CNN2_CIFAR10, Variant, share_variants, time_steps, time_variants

ROOT = Path(__file__).resolve().parents[1]
SOLVER = str(ROOT / "prototxt/cnn2/cifar10/solver_ed.prototxt")
ED = str(ROOT / "prototxt/cnn2/cifar10/train_val_ed.prototxt")


def test_per_image_loop_gives_the_batched_p_eb():
    sp = cio.read_solver_prototxt(SOLVER)
    batched = Variant("b", ED, sp, 4, (3, 32, 32), 10, torch.device("cpu"))
    looped = Variant("l", ED, sp, 4, (3, 32, 32), 10, torch.device("cpu"), per_image_loop=True)
    looped.net.load_state_dict(batched.net.state_dict())
    net_b, net_l = batched.net, looped.net
    i = [layer.name for layer in net_b.layer_list].index("drop")
    blobs = net_b.eval()(batched.feed)
    net_b.train()
    a = net_b._saliency(i, net_b.layer_list[i], blobs)
    b = net_l._saliency(i, net_l.layer_list[i], blobs)
    assert a.shape == (4, 2048)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(a.sum(1), torch.ones(4), atol=1e-4)


def _mean(xs):
    return sum(xs) / len(xs)


def test_time_variants_reports_ratios_from_one_run(monkeypatch):
    log = []
    step = Variant.step
    monkeypatch.setattr(Variant, "step", lambda self: (log.append(self.name), step(self)))
    variants = {k: str(ROOT / v) for k, v in CNN2_CIFAR10.items()}
    res = time_variants(variants, solver=SOLVER, iters=2, warmup=1, batch=2)
    assert log == ["Standard", "Excitation"] * 3  # one warm-up round, then 2 timed rounds, interleaved
    rows = res["variants"]
    assert list(rows) == ["Standard", "Excitation"]
    base = _mean(rows["Standard"]["times_s"])
    for row in rows.values():
        assert len(row["times_s"]) == 2 and all(t > 0 for t in row["times_s"])
        assert row["mean_s"] == pytest.approx(_mean(row["times_s"]))
        assert row["ratio_to_Standard"] == pytest.approx(_mean(row["times_s"]) / base)
    assert res["batch"] == 2 and res["iters"] == 2 and res["image_shape"] == [3, 32, 32]
    assert res["shared_weights"] is True
    assert 50 < res["peak_rss_mb"] < 64 * 1024  # MiB: ru_maxrss read in the right unit
    assert "cuda_peak_allocated_mb" not in res


def test_variants_share_one_set_of_weights_and_one_solver():
    sp = cio.read_solver_prototxt(SOLVER)
    paths = {k: str(ROOT / v) for k, v in CNN2_CIFAR10.items()}
    built = share_variants(paths, sp, 2, (3, 32, 32), 10, torch.device("cpu"))
    st, ed = built["Standard"], built["Excitation"]
    params = list(st.net.parameters())
    assert len(params) == 12  # 6 weights, 6 biases
    assert len(list(ed.net.parameters())) == 12 and all(a is b for a, b in zip(params, ed.net.parameters()))
    assert ed.solver is st.solver
    assert len(st.solver.history) == 2 * len(params)  # Adam: m and v, once
    before = params[0].detach().clone()
    ed.step()
    assert not torch.equal(params[0], before)  # ED's step moved the weights Standard uses
    assert st.solver.iter == 1
    for v in built.values():  # nothing of a step is kept alive until the next
        assert v.net.blobs == {} and v.net.records is None
        assert all(p.grad is None for p in v.net.parameters())


def test_variants_that_differ_in_weights_refuse_to_share(tmp_path):
    sp = cio.read_solver_prototxt(SOLVER)
    text = Path(ED).read_text().replace("lr_mult: 2", "lr_mult: 3")
    assert text != Path(ED).read_text()
    other = tmp_path / "ed_other_rates.prototxt"
    other.write_text(text)
    first = Variant("Standard", str(ROOT / CNN2_CIFAR10["Standard"]), sp, 2, (3, 32, 32), 10, torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot share"):
        Variant("other", str(other), sp, 2, (3, 32, 32), 10, torch.device("cpu"), share=first)


class Sleeper:
    """Anything with a ``.step()`` can be timed: here a step that takes ``seconds``."""

    def __init__(self, seconds, log, name):
        self.seconds, self.log, self.name = seconds, log, name

    def step(self):
        self.log.append(self.name)
        time.sleep(self.seconds)


def test_time_steps_interleaves_any_steppers():
    log, rounds = [], []
    steppers = {"fast": Sleeper(0.002, log, "fast"), "slow": Sleeper(0.02, log, "slow")}
    rows = time_steps(steppers, iters=3, warmup=1, on_round=lambda r, times: rounds.append(len(times["slow"])))
    assert log == ["fast", "slow"] * 4  # one warm-up round, then 3 timed rounds, interleaved
    assert rounds == [1, 2, 3]
    assert list(rows) == ["fast", "slow"] and len(rows["slow"]["times_s"]) == 3
    slow, fast = _mean(rows["slow"]["times_s"]), _mean(rows["fast"]["times_s"])
    assert rows["slow"]["mean_s"] == pytest.approx(slow) and rows["fast"]["mean_s"] == pytest.approx(fast)
    assert rows["fast"]["ratio_to_fast"] == pytest.approx(1.0)
    assert rows["slow"]["ratio_to_fast"] == pytest.approx(slow / fast) and slow / fast > 2
    assert rows["slow"]["median_s"] >= 0.02 and rows["slow"]["std_s"] >= 0.0


def test_utilization_cost_reports_the_share_of_a_run(capsys):
    """`exdrop bench utilization`: a test batch with Table 5's metrics against a plain one and a
    training step, interleaved; the extra per test point and the share of the two schedules."""
    from exdrop.experiments.bench import utilization_cost
    res = utilization_cost(batch=4, iters=1, device=torch.device("cpu"), images=8)
    rows = res["variants"]
    assert list(rows) == ["train step (ED)", "test batch", "test batch + utilization"]
    extra = (rows["test batch + utilization"]["median_s"] - rows["test batch"]["median_s"]) * 2   # 8 images / 4
    assert res["extra_s_per_test_point"] == pytest.approx(extra)
    step, plain = rows["train step (ED)"]["median_s"], rows["test batch"]["median_s"]
    assert res["run_share_cpu_budget"] == pytest.approx(3 * extra / (1200 * step + 3 * 50 * plain))
