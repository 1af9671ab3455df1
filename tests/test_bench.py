"""The benchmark harness: input-layer rewriting, the per-image-loop ED, the one timing loop
(any objects with a ``.step()``), a tiny timed run. (``exdrop bench caffe`` runs in
tests/test_caffe_diff.py.)"""
import time
from pathlib import Path

import torch

from exdrop import io as cio
from exdrop.bench import CNN2_CIFAR10, Variant, time_steps, time_variants

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


def test_time_variants_reports_ratios_from_one_run():
    variants = {k: str(ROOT / v) for k, v in CNN2_CIFAR10.items()}
    res = time_variants(variants, solver=SOLVER, iters=2, warmup=1, batch=2)
    rows = res["variants"]
    assert list(rows) == ["Standard", "Excitation"]
    assert rows["Standard"]["ratio_to_Standard"] == 1.0
    ed = rows["Excitation"]
    assert ed["mean_s"] > 0 and abs(ed["ratio_to_Standard"] - ed["mean_s"] / rows["Standard"]["mean_s"]) < 1e-12
    assert res["batch"] == 2 and res["iters"] == 2 and res["image_shape"] == [3, 32, 32]


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
    assert rows["fast"]["ratio_to_fast"] == 1.0
    assert rows["slow"]["ratio_to_fast"] == rows["slow"]["mean_s"] / rows["fast"]["mean_s"] > 2
    assert rows["slow"]["median_s"] >= 0.02 and rows["slow"]["std_s"] >= 0.0
