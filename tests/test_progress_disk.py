"""Progress you can trust and a run folder that does not grow (issue 9): the bar, log.csv and
results.json end on the same smoothed loss; test passes get their own bar; a snapshot set is a
caffemodel, a solverstate (the solver's whole history) and a small .engine.pt; older sets go
(``keep_snapshots``); the files get the modes of ordinary files; ``TrainConfig.net`` replaces the
solver's net. All on the tiny LMDB net of tests/caffe_nets.py (CPU, seconds)."""
import csv
import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from exdrop.run import train as train_module
from exdrop.engine.snapshot import prune_snapshots, snapshot_state_path
from exdrop.run.train import Trainer, TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import write_tiny  # noqa: E402


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    return write_tiny(tmp)


def _adam(tmp_path, solver) -> Path:
    """The tiny solver with Adam (two history sets: m and v)."""
    text = solver.read_text().replace('type: "SGD"', 'type: "Adam"\nmomentum2: 0.999')
    path = tmp_path / "solver_adam.prototxt"
    path.write_text(text.replace('net: "tiny_ed.prototxt"', f'net: "{solver.parent / "tiny_ed.prototxt"}"'))
    return path


def _cfg(solver, out, **kw):
    kw = {"max_iter": 30, "device": "cpu", "test_iter": 1, "progress": False, **kw}
    return TrainConfig(solver=str(solver), out=str(out), **kw)


class _Bar:
    """What the run loop uses of tqdm, recording the postfix."""

    instances: list = []

    def __init__(self, *a, **kw):
        self.postfix, self.kw, self.updates, self.writes = None, kw, 0, []
        _Bar.instances.append(self)

    def set_postfix(self, d, refresh=True):
        self.postfix = dict(d)

    def update(self, n=1):
        self.updates += n

    def write(self, s):
        self.writes.append(s)

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_short_run_bar_log_and_results_agree_on_the_last_loss(tiny, tmp_path, monkeypatch):
    """display 100 and a 30-iteration run: a closing train row at iteration 29, the bar's loss
    refreshed during the run and ending on the same value as log.csv and results.json."""
    import tqdm
    _Bar.instances = []
    monkeypatch.setattr(tqdm, "tqdm", _Bar)
    monkeypatch.setattr(train_module, "PROGRESS_SECONDS", 0.0)   # every iteration: the test sees refreshes
    shown = []
    show = Trainer._show_loss

    def recording_show(self, bar):
        show(self, bar)
        shown.append(bar.postfix["loss"])
    monkeypatch.setattr(Trainer, "_show_loss", recording_show)
    out = tmp_path / "run"
    res = Trainer(_cfg(tiny, out, progress=True)).run()
    rows = _rows(out / "log.csv")
    train = [r for r in rows if r["phase"] == "train"]
    assert [int(r["iter"]) for r in train] == [0, 29]
    main, *tests = _Bar.instances
    assert main.updates == 30 and main.postfix["loss"] == f"{float(train[-1]['loss']):.4f}"
    assert res["train_loss"] == pytest.approx(float(train[-1]["loss"]), rel=1e-5)
    assert json.loads((out / "results.json").read_text())["train_loss"] == res["train_loss"]
    assert res["train_loss"] != pytest.approx(float(train[0]["loss"]))   # not the iteration-0 value
    assert len(shown) >= 20 and len(set(shown)) > 1   # a running loss between display points
    # the final test pass has its own transient bar, one tick per test iteration
    assert tests and all(b.kw.get("leave") is False for b in tests) and tests[-1].updates == 1


def test_the_bar_refresh_is_rate_limited(tiny, tmp_path, monkeypatch):
    """At the default PROGRESS_SECONDS the loss is read at the first iteration and then about once a
    second, not per step (each read is a host sync on CUDA)."""
    import tqdm
    monkeypatch.setattr(tqdm, "tqdm", _Bar)
    reads = []
    show = Trainer._show_loss
    monkeypatch.setattr(Trainer, "_show_loss", lambda self, bar: (reads.append(self.backend.iter), show(self, bar)))
    Trainer(_cfg(tiny, tmp_path / "run", progress=True, max_iter=20)).run()
    assert len(reads) < 10


def test_resumed_bar_shows_the_loss_from_its_first_iteration(tiny, tmp_path, monkeypatch):
    import tqdm
    out = tmp_path / "run"
    Trainer(_cfg(tiny, out, max_iter=10, snapshot=5)).run()
    _Bar.instances = []
    monkeypatch.setattr(tqdm, "tqdm", _Bar)
    state = out / "snapshots" / "tiny_ed_iter_10.solverstate"
    Trainer(_cfg(tiny, out, max_iter=12, resume=str(state), progress=True)).run()
    assert _Bar.instances[0].postfix and "loss" in _Bar.instances[0].postfix


def test_each_weights_file_names_its_solverstate():
    """Caffe's pairs: X.caffemodel with X.solverstate, X.caffemodel.h5 with X.solverstate.h5."""
    for model, state in (("a/x_iter_4.caffemodel", "a/x_iter_4.solverstate"),
                         ("a/x_iter_4.caffemodel.h5", "a/x_iter_4.solverstate.h5"),
                         ("a/x_iter_4.engine.pt", "a/x_iter_4.engine.pt")):
        assert snapshot_state_path(model) == Path(state)


def test_keep_snapshots(tiny, tmp_path):
    out = tmp_path / "keep1"
    Trainer(_cfg(tiny, out, max_iter=8, snapshot=2)).run()
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == [
        "tiny_ed_iter_8.caffemodel", "tiny_ed_iter_8.engine.pt", "tiny_ed_iter_8.solverstate"]
    out = tmp_path / "keep2"
    Trainer(_cfg(tiny, out, max_iter=8, snapshot=2, keep_snapshots=2)).run()
    assert sorted({p.name.split(".")[0] for p in (out / "snapshots").iterdir()}) == ["tiny_ed_iter_6", "tiny_ed_iter_8"]
    out = tmp_path / "keep0"
    Trainer(_cfg(tiny, out, max_iter=8, snapshot=2, keep_snapshots=0)).run()
    assert len(list((out / "snapshots").glob("*.solverstate"))) == 4


def test_prune_leaves_other_prefixes_and_an_unknown_newest(tmp_path):
    for name in ("a_iter_2.caffemodel", "a_iter_2.solverstate", "a_iter_4.caffemodel", "a_iter_4.solverstate",
                 "b_iter_2.solverstate", "a_iter_x.solverstate", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert prune_snapshots(tmp_path / "a", 6, 1) == []            # set 6 is not there: nothing goes
    removed = prune_snapshots(tmp_path / "a", 4, 1)
    assert sorted(p.name for p in removed) == ["a_iter_2.caffemodel", "a_iter_2.solverstate"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a_iter_4.caffemodel", "a_iter_4.solverstate", "a_iter_x.solverstate", "b_iter_2.solverstate", "notes.txt"]


def test_engine_state_is_small_and_adam_resume_is_bit_exact(tiny, tmp_path):
    """The .engine.pt holds no solver history (the .solverstate has Adam's m and v); a resume from
    it still ends on the very bytes of the uninterrupted run."""
    solver = _adam(tmp_path, tiny)
    full, part = tmp_path / "full", tmp_path / "part"
    Trainer(_cfg(solver, full, max_iter=12, display=1, keep_snapshots=0, snapshot=6)).run()
    snaps = full / "snapshots"
    extra = torch.load(snaps / "tiny_ed_iter_6.engine.pt", weights_only=True)
    assert "solver" not in extra and set(extra) >= {"iter", "torch_rng", "data", "loop", "elapsed"}
    history = sum(p.stat().st_size for p in snaps.glob("tiny_ed_iter_6.solverstate"))
    model = (snaps / "tiny_ed_iter_6.caffemodel").stat().st_size
    assert history > 1.5 * model   # m and v
    assert (snaps / "tiny_ed_iter_6.engine.pt").stat().st_size < 20_000

    Trainer(_cfg(solver, part, max_iter=6, display=1)).run()
    Trainer(_cfg(solver, part, max_iter=12, display=1, resume=str(part / "snapshots" / "tiny_ed_iter_6.solverstate"))).run()
    assert (part / "snapshots" / "tiny_ed_iter_12.caffemodel").read_bytes() == \
        (snaps / "tiny_ed_iter_12.caffemodel").read_bytes()
    assert (part / "snapshots" / "tiny_ed_iter_12.solverstate").read_bytes().replace(
        str(part.resolve()).encode(), b"") == \
        (snaps / "tiny_ed_iter_12.solverstate").read_bytes().replace(str(full.resolve()).encode(), b"")
    # the train rows too (the first part's own final test at 6 stays in its log)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows  # noqa: E731
                          if r["phase"] == "train"]
    assert strip(_rows(part / "log.csv")) == strip(_rows(full / "log.csv"))


def test_snapshot_files_have_ordinary_modes(tiny, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        Trainer(_cfg(tiny, out, max_iter=2)).run()
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (out / "snapshots").iterdir()}
    assert modes == {f"tiny_ed_iter_2{ext}": 0o644 for ext in (".caffemodel", ".engine.pt", ".solverstate")}


def test_net_override(tiny, tmp_path):
    """TrainConfig.net replaces the solver's net (train_net/test_net cleared) and is recorded."""
    other = tmp_path / "other.prototxt"
    other.write_text((tiny.parent / "tiny_ed.prototxt").read_text())
    solver = tmp_path / "solver_split.prototxt"
    solver.write_text(tiny.read_text().replace('net: "tiny_ed.prototxt"',
                                               'train_net: "missing_train.prototxt"\ntest_net: "missing_test.prototxt"'))
    out = tmp_path / "run"
    res = Trainer(_cfg(solver, out, max_iter=2, net=str(other))).run()
    assert res["net_override"] == str(other)
    assert res["net"] == str(other.resolve())
    from exdrop.proto import io as cio
    used = cio.read_solver_prototxt(out / "solver.prototxt")
    assert used.net == str(other.resolve()) and not used.HasField("train_net") and not len(used.test_net)
    assert res["test_accuracy"] is not None   # the override's TEST phase is the test net
    assert json.loads((out / "results.json").read_text())["net_override"] == str(other)


def test_interrupt_prints_how_to_resume(tiny, tmp_path, monkeypatch, capsys):
    import signal
    out = tmp_path / "run"
    cfg = _cfg(tiny, out, max_iter=20)
    trainer = Trainer(cfg)
    step = trainer.backend.step

    def interrupting_step():
        if trainer.backend.iter == 4:
            signal.raise_signal(signal.SIGINT)
        return step()
    trainer.backend.step = interrupting_step
    res = trainer.run()
    assert res["status"] == "interrupted" and res["iterations"] == 5
    err = capsys.readouterr().err
    state = out / "snapshots" / "tiny_ed_iter_5.solverstate"
    assert f"-m exdrop train {tiny} --max-iter 20 --device cpu --test-iter 1 --out {out} --snapshot {state}" in err
    assert [int(r["iter"]) for r in _rows(out / "log.csv") if r["phase"] == "train"] == [0, 4]
    # the resumed log drops the closing row at 4 and continues like the uninterrupted run
    Trainer(_cfg(tiny, out, max_iter=20, resume=str(state))).run()
    assert [int(r["iter"]) for r in _rows(out / "log.csv") if r["phase"] == "train"] == [0, 19]


def test_a_plot_failure_is_a_warning(tiny, tmp_path, monkeypatch, capsys):
    import exdrop.run.train as train_module

    def broken(folder):
        raise RuntimeError("no matplotlib here")
    monkeypatch.setattr(train_module, "plot_run", broken)
    res = Trainer(_cfg(tiny, tmp_path / "run", max_iter=2)).run()
    assert res["status"] == "finished"
    assert "exdrop: warning: no training curves" in capsys.readouterr().err


def test_interrupt_message_of_a_trainer_built_in_python(tmp_path, capsys):
    """Without a command line the resume line is built from the config: every option that changes
    the run (display, test interval, precision...) is in it (without training: the message alone)."""
    from exdrop.engine import distributed
    trainer = Trainer.__new__(Trainer)
    trainer.world = distributed.ONE
    trainer.cfg = TrainConfig(solver="prototxt/cnn2/cifar10/solver_ed.prototxt", out="models/quick", max_iter=300,
                              display=5, test_interval=50, amp="bf16")
    trainer.out, trainer.last_snapshot = Path("models/quick"), Path("models/quick/snapshots/cnn2_ed_iter_7.caffemodel")

    class _B:
        iter = 7
    trainer.backend = _B()
    trainer._say_how_to_resume()
    err = capsys.readouterr().err
    state = "models/quick/snapshots/cnn2_ed_iter_7.solverstate"
    assert (f"-m exdrop train prototxt/cnn2/cifar10/solver_ed.prototxt --max-iter 300 --test-interval 50 "
            f"--display 5 --amp bf16 --out models/quick --snapshot {state}") in err
    assert "make " not in err   # the package knows nothing of the Makefile


def test_a_short_command_line_run_logs_a_curve(tiny, tmp_path):
    """`--max-iter 60` on a solver with display 100 and test_interval 1000: at least 20 train rows
    and 4 test points, so curves.png draws a curve; a given --display wins."""
    from exdrop.cli import main as exdrop_main
    out = tmp_path / "short"
    assert exdrop_main(["train", str(tiny), "--out", str(out), "--max-iter", "60", "--device", "cpu",
                        "--test-iter", "1", "--quiet"]) == 0
    rows = _rows(out / "log.csv")
    assert len([r for r in rows if r["phase"] == "train"]) >= 20
    assert len({r["iter"] for r in rows if r["phase"] != "train"}) >= 4
    out2 = tmp_path / "given"
    assert exdrop_main(["train", str(tiny), "--out", str(out2), "--max-iter", "6", "--display", "3", "--device", "cpu",
                        "--test-iter", "1", "--quiet"]) == 0
    assert [int(r["iter"]) for r in _rows(out2 / "log.csv") if r["phase"] == "train"] == [0, 3, 5]
