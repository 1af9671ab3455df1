"""The shared run loop and its backends, without pycaffe: the engine's run folder (the effective
solver.prototxt, log.csv, results.json), the loop's schedule over a stub backend, the Caffe
backend's p_EB hook installation on a net without a loss layer, and the scripts/ boundary.
(The Caffe backend itself runs in tests/test_caffe_diff.py.)"""
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exdrop.proto import io as cio
from exdrop.engine.net import Net, filter_layers
from exdrop.engine.pylayer import TRAIN
from exdrop.caffe.env import caffe_unavailable_reason
from exdrop.cli import main as exdrop_main
from exdrop.run.train import Trainer, TrainConfig, TrainingDiverged, net_params, prepare_solver

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import ROOT, TINY_LOSS, TINY_NET, write_tiny  # noqa: E402

RESULT_KEYS = {"status", "backend", "solver", "solver_used", "iterations", "max_iter", "budget", "test_accuracy",
               "test_loss", "best_test_accuracy", "train_loss", "seconds", "seconds_per_iter", "net", "test_source",
               "device", "guided_layers", "torch", "host", "snapshot", "net_override", "keep_snapshots", "processes"}
UTILIZATION = ["entropy_act", "entropy_peb"]
OVERRIDES = ["--max-iter", "6", "--display", "2", "--test-interval", "3", "--test-iter", "1",
             "--snapshot-every", "2", "--seed", "5", "--device", "cpu", "--quiet"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_engine_run_folder(tmp_path):
    solver = write_tiny(tmp_path)
    out = tmp_path / "run"
    assert exdrop_main(["train", str(solver), "--out", str(out), *OVERRIDES]) == 0

    sp = cio.read_solver_prototxt(out / "solver.prototxt")
    assert (sp.max_iter, sp.display, sp.test_interval, list(sp.test_iter), sp.snapshot, sp.random_seed) \
        == (6, 2, 3, [1], 2, 5)
    assert sp.average_loss == 2 and sp.base_lr == pytest.approx(0.01)  # the rest as the solver file says
    assert sp.net == str((tmp_path / "tiny_ed.prototxt").resolve())  # relative to the solver's folder
    assert sp.snapshot_prefix == str((out / "snapshots" / "tiny_ed").resolve())

    rows = _rows(out / "log.csv")
    assert list(rows[0]) == ["iter", "phase", "lr", "elapsed_s", "accuracy", *UTILIZATION, "loss", "neurons_on",
                             "peak_peb"]
    for r in rows:   # Table 5's metrics of ip1 (16 units) at each test point, empty in the train rows
        if r["phase"] == "test":
            assert 0 <= float(r["neurons_on"]) <= 16 and 0 < float(r["peak_peb"]) <= 1
            assert all(0 <= float(r[k]) <= math.log(16) + 1e-6 for k in UTILIZATION)
        else:
            assert r["neurons_on"] == r["peak_peb"] == ""
    assert [(r["iter"], r["phase"]) for r in rows] == [("0", "train"), ("2", "train"), ("3", "test"),
                                                       ("4", "train"), ("5", "train"), ("6", "test")]
    res = json.loads((out / "results.json").read_text())
    assert set(res) == RESULT_KEYS
    assert res["backend"] == "engine" and res["status"] == "finished" and res["iterations"] == 6
    assert res["guided_layers"] == ["drop"] and res["solver_used"] == str(out / "solver.prototxt")
    assert res["snapshot"] == str(out.resolve() / "snapshots" / "tiny_ed_iter_6.caffemodel")
    # keep_snapshots 1 (the default): the newest set only
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == [
        f"tiny_ed_iter_6{ext}" for ext in (".caffemodel", ".engine.pt", ".solverstate")]

    # the iteration-0 weights: the fillers drawn after the solver's random_seed, as the run drew them
    torch.manual_seed(5)
    (train_param, src), _ = net_params(sp, str(solver))
    fresh = {l.name: [b.detach().numpy() for b in l.blobs] for l in Net(train_param, TRAIN, torch.device("cpu"), src).layer_list
             if len(l.blobs)}
    from exdrop.run.init_weights import iteration0_weights
    with iteration0_weights(out) as path:   # drawn again from init.json, checked against its SHA-256
        init = {l.name: [np.array(b.data).reshape(b.shape.dim) for b in l.blobs] for l in cio.read_caffemodel(path).layer
                if len(l.blobs)}
    assert set(init) == set(fresh) == {"conv1", "ip1", "ip2"}
    for name in fresh:
        for a, b in zip(init[name], fresh[name]):
            np.testing.assert_array_equal(a, b)


def test_a_cpu_run_and_its_rebuilt_weights_leave_the_gpu_generators_alone(tmp_path, monkeypatch):
    """A run seeds the generators of its own device: on the CPU, the CPU's alone. So a CPU run and
    iteration0_weights (which draws a run's fillers again, on the CPU, inside the caller's process) never
    reseed a caller's GPU stream, and the rebuild leaves the caller's CPU stream as it was."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    solver = write_tiny(tmp_path)
    out = tmp_path / "run"
    assert exdrop_main(["train", str(solver), "--out", str(out), *OVERRIDES]) == 0
    assert torch.initial_seed() == 5   # the solver's random_seed (--seed 5) did seed the CPU
    from exdrop.run.init_weights import iteration0_weights
    torch.manual_seed(11)
    before = torch.random.get_rng_state()
    with iteration0_weights(out) as path:
        assert path is not None and path.is_file()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert reseeded == [11]   # the test's own torch.manual_seed(11), nothing from the run or the rebuild


def test_tensorboard_event_files_hold_the_log_rows(tmp_path):
    """--tensorboard DIR: every number of log.csv as a TensorBoard scalar (phase/column, at its iteration)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    solver = write_tiny(tmp_path)
    out, tb = tmp_path / "run", tmp_path / "tb"
    assert exdrop_main(["train", str(solver), "--out", str(out), *OVERRIDES, "--tensorboard", str(tb)]) == 0
    events = EventAccumulator(str(tb))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/accuracy", "test/accuracy", "test/loss", "test/neurons_on",
            "test/peak_peb"} <= tags
    for r in _rows(out / "log.csv"):
        for key in ("loss", "accuracy", "lr") + (("neurons_on",) if r["phase"] == "test" else ()):
            got = {e.step: e.value for e in events.Scalars(f"{r['phase']}/{key}")}
            assert got[int(r["iter"])] == pytest.approx(float(r[key]), rel=1e-5), (r["phase"], key, r["iter"])


# ---------------------------------------------------------------------- the loop over a stub
class StubBackend:
    """The backend interface with scripted numbers: loss 10 - iter, output 'acc' = iter."""

    name = "stub"

    def __init__(self, cfg, losses=None):
        self.sp, self.out = prepare_solver(cfg)
        self.iter, self.elapsed, self.outputs, self.num_test_nets = 0, 0.0, ["acc", "loss"], 1
        self.losses = losses
        self.events = []

    def learning_rate(self):
        return 0.1

    def step(self):
        loss = self.losses[self.iter] if self.losses else 10.0 - self.iter
        self.events.append(("step", self.iter))
        self.iter += 1
        return loss, {"acc": float(self.iter - 1), "loss": loss}

    def test(self, k, tick=None):
        self.events.append(("test", self.iter))
        return {"acc": 0.5, "loss": 1.0}

    def nonfinite_weights(self):
        return None

    def snapshot(self, elapsed):
        self.events.append(("snapshot", self.iter))
        return self.out / "snapshots" / f"stub_iter_{self.iter}.caffemodel"

    def save_weights(self, path):
        self.events.append(("init weights", self.iter))
        Path(path).write_bytes(b"")

    def results_extra(self):
        return {"net": "stub.prototxt", "test_source": [], "device": "none", "guided_layers": []}


def _stub_solver(tmp_path, **fields) -> str:
    text = 'net: "stub.prototxt"\ntest_iter: 1\nbase_lr: 0.1\nlr_policy: "fixed"\n'
    text += "".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}\n" for k, v in fields.items())
    path = tmp_path / "solver.prototxt"
    path.write_text(text)
    return str(path)


def test_loop_schedule_over_a_stub_backend(tmp_path):
    solver = _stub_solver(tmp_path, max_iter=20, test_interval=5, test_initialization=True, display=4,
                          average_loss=3, snapshot=8)
    cfg = TrainConfig(solver=solver, out=str(tmp_path / "run"), max_iter=10, progress=False)
    backend = StubBackend(cfg)
    res = Trainer(cfg, backend=backend).run()
    tests = [it for kind, it in backend.events if kind == "test"]
    snaps = [it for kind, it in backend.events if kind == "snapshot"]
    assert tests == [0, 5, 10]       # test_initialization, every test_interval, and the final test
    assert snaps == [8, 10]          # every `snapshot`, and snapshot_after_train
    assert backend.events[0] == ("init weights", 0) and (tmp_path / "run" / "init.json").is_file()
    rows = _rows(tmp_path / "run" / "log.csv")
    train = [r for r in rows if r["phase"] == "train"]
    assert [int(r["iter"]) for r in train] == [0, 4, 8, 9]   # 9: the last iteration, off the display schedule
    # the loss is Caffe's smoothed loss over average_loss steps; outputs average since the last display
    assert [float(r["loss"]) for r in train] == [10.0, (8 + 7 + 6) / 3, (4 + 3 + 2) / 3, (3 + 2 + 1) / 3]
    assert [float(r["acc"]) for r in train] == [0.0, (1 + 2 + 3 + 4) / 4, (5 + 6 + 7 + 8) / 4, 9.0]
    assert res["train_loss"] == (3 + 2 + 1) / 3
    assert res["backend"] == "stub" and res["iterations"] == 10 and res["snapshot"].endswith("stub_iter_10.caffemodel")
    assert res["budget"] == "reduced: 10 of the solver's 20 iterations"
    assert set(res) == RESULT_KEYS
    assert (tmp_path / "run" / "solver.prototxt").is_file()


def test_loop_stops_on_a_diverging_loss(tmp_path):
    solver = _stub_solver(tmp_path, max_iter=6, display=1)
    cfg = TrainConfig(solver=solver, out=str(tmp_path / "run"), progress=False)
    backend = StubBackend(cfg, losses=[2.0, 1.0, math.nan, 1.0, 1.0, 1.0])
    with pytest.raises(TrainingDiverged, match="iteration 2"):
        Trainer(cfg, backend=backend).run()
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "diverged" and "stub backend" in res["error"]


# ---------------------------------------------------------------------- the Caffe side, no pycaffe
class _ExcitationLayer:
    saliency = "excitation"  # what install_saliency_hooks looks for on the layer's class
    type, blobs = "Python", []


class _FakeLayer:
    def __init__(self, kind):
        self.type, self.blobs = kind, []


class _FakeBlob:
    def __init__(self):
        self.data = np.zeros((2, 3), np.float32)


class _FakeCaffeNet:
    """What install_saliency_hooks reads from a TRAIN caffe.Net: layer names, types and objects,
    bottoms and tops, blob shapes (weakly referenceable, as pycaffe's Net is)."""

    def __init__(self, net_param):
        kept = [lp for lp in filter_layers(net_param, TRAIN) if lp.type != "Data"]
        self._layer_names = [lp.name for lp in kept]
        self.layers = [_ExcitationLayer() if lp.name == "drop" else _FakeLayer(lp.type) for lp in kept]
        self.bottom_names = {lp.name: list(lp.bottom) for lp in kept}
        self.top_names = {lp.name: list(lp.top) for lp in kept}
        self.blobs = {b: _FakeBlob() for lp in kept for b in [*lp.bottom, *lp.top]}


def test_hooks_on_a_net_without_a_loss_layer_name_the_layer(tmp_path):
    from exdrop.caffe.backend import install_saliency_hooks
    net_path = tmp_path / "no_loss.prototxt"
    net_path.write_text(TINY_NET.format(train="t", val="v", loss=""))
    net_param = cio.read_net_prototxt(net_path)
    with pytest.raises(ValueError, match=rf"{re.escape(str(net_path))}: layer 'drop' needs the logits"):
        install_saliency_hooks(_FakeCaffeNet(net_param), net_param, str(net_path))
    net_path.write_text(TINY_NET.format(train="t", val="v", loss=TINY_LOSS))
    with_loss = cio.read_net_prototxt(net_path)
    assert install_saliency_hooks(_FakeCaffeNet(with_loss), with_loss, str(net_path)) == ["drop"]


@pytest.mark.skipif(caffe_unavailable_reason() is None, reason="pycaffe is built here (tests/test_caffe_diff.py)")
def test_caffe_backend_without_pycaffe_says_how_to_build_it(tmp_path, capsys):
    solver = write_tiny(tmp_path)
    assert exdrop_main(["train", str(solver), "--backend", "caffe", "--out", str(tmp_path / "run")]) == 1
    assert "make caffe" in capsys.readouterr().err


# ---------------------------------------------------------------------- scripts/
def test_nothing_imports_from_scripts():
    """scripts/ holds thin command lines; the package and the tests never load code from there."""
    # `import scripts...`, a path built with "scripts", or a string naming a script file
    pattern = re.compile(r"^\s*(from|import)\s+scripts\b|[\"']scripts[\"']|[\"']scripts/[\w./-]*\.py[\"']", re.M)
    offenders = [str(p.relative_to(ROOT)) for folder in ("exdrop", "tests") for p in (ROOT / folder).rglob("*.py")
                 if p.resolve() != Path(__file__).resolve() and pattern.search(p.read_text())]
    assert not offenders, offenders


@pytest.mark.parametrize("script, usage", [("train_caffe.py", "exdrop train"), ("bench_caffe.py", "exdrop bench")])
def test_scripts_are_the_command_line(script, usage):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {usage}"), proc.stdout + proc.stderr
