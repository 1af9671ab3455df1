"""Nothing unsafe, nothing lost (issue 8): no file that exdrop reads runs code (engine state,
CIFAR pickles, Python layers from the current directory); a kill -9 at any iteration or during a
snapshot write resumes bit-exactly or refuses with the reason; a NaN/inf or a saturated loss
stops the run naming the iteration and the last good snapshot, with nothing non-finite on disk;
bad inputs get named errors. All on the tiny LMDB net of tests/caffe_nets.py (CPU, seconds)."""
import csv
import dataclasses
import io
import json
import os
import pickle
import random
import shlex
import shutil
import subprocess
import inspect
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from exdrop.proto import io as cio
from exdrop.cli import main as exdrop_main
from exdrop.engine.pylayer import load_layer_class
from exdrop.run import train as train_module
from exdrop.run.train import CLAMPED_LOSS, Trainer, TrainConfig, TrainingDiverged, prepare_solver

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import ROOT, write_tiny  # noqa: E402

MAX_ITER = 8
RUN = ["--max-iter", str(MAX_ITER), "--display", "1", "--test-interval", "3", "--test-iter", "1",
       "--snapshot-every", "2", "--device", "cpu", "--quiet"]


def _log(path):
    """log.csv without the wall-clock column."""
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in csv.DictReader(f)]


def _final_model(run):
    return (run / "snapshots" / f"tiny_ed_iter_{MAX_ITER}.caffemodel").read_bytes()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny solver and its uninterrupted run (the reference every resume must equal)."""
    tmp = tmp_path_factory.mktemp("tiny")
    solver = write_tiny(tmp)
    with pytest.MonkeyPatch.context() as mp:   # every snapshot set kept: the tests resume from each
        mp.setattr(train_module, "TrainConfig", _KeepAllSnapshots)
        assert exdrop_main(["train", str(solver), "--out", str(tmp / "full"), *RUN]) == 0
    return solver, tmp / "full"


@dataclasses.dataclass
class _KeepAllSnapshots(TrainConfig):
    keep_snapshots: int = 0


# A command line that dies by SIGKILL at a chosen point: after `iter:N` steps, or on the
# os.replace that would publish the file of snapshot N ending in SUFFIX (`rename:N:SUFFIX`).
KILLER = r'''
import os, signal, sys
from exdrop.run import train
kind, n, *rest = os.environ["EXDROP_TEST_KILL"].split(":")
n = int(n)
if kind == "iter":
    step = train.EngineBackend.step
    def killing_step(self):
        if self.solver.iter == n:
            os.kill(os.getpid(), getattr(signal, os.environ.get("EXDROP_TEST_SIGNAL", "SIGKILL")))
        return step(self)
    train.EngineBackend.step = killing_step
else:
    replace = os.replace
    def killing_replace(src, dst):
        if str(dst).endswith(f"_iter_{n}{rest[0]}"):
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst)
    os.replace = killing_replace
from exdrop.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _killed_run(solver, out, kill: str):
    proc = subprocess.run([sys.executable, "-c", KILLER, "train", str(solver), "--out", str(out), *RUN],
                          env={**os.environ, "EXDROP_TEST_KILL": kill}, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == -9, proc.stdout + proc.stderr


def _latest_state(run) -> Path:
    states = sorted((run / "snapshots").glob("*.solverstate"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return states[-1]


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_the_printed_resume_line_run_verbatim_gives_the_uninterrupted_run(tiny, tmp_path, signame):
    """Ctrl-C (or SIGTERM, a scheduler's stop) at iteration 5 of a run with its own display, test
    interval and snapshot period: a snapshot, the resume line, and that line, run as printed, keeps
    them all (log.csv and weights equal the uninterrupted run's)."""
    solver, full = tiny
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILLER, "train", str(solver), "--out", str(run), *RUN],
                          env={**os.environ, "EXDROP_TEST_KILL": "iter:5", "EXDROP_TEST_SIGNAL": signame},
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert json.loads((run / "results.json").read_text())["status"] == "interrupted", proc.stderr
    line = next(x for x in proc.stderr.splitlines() if "resume with:" in x).split("resume with:", 1)[1]
    for option in RUN:
        assert option in line
    resumed = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr
    assert _final_model(run) == _final_model(full)
    assert _log(run / "log.csv") == _log(full / "log.csv")


# ---------------------------------------------------------------------- kill -9, resume
def test_kill_at_a_random_iteration_resumes_bit_exact(tiny, tmp_path):
    solver, full = tiny
    kill_at = random.randint(3, MAX_ITER - 1)
    run = tmp_path / "run"
    _killed_run(solver, run, f"iter:{kill_at}")
    state = _latest_state(run)
    assert exdrop_main(["train", str(solver), "--out", str(run), *RUN, "--snapshot", str(state)]) == 0, kill_at
    assert _final_model(run) == _final_model(full), f"killed at iteration {kill_at}, resumed from {state.name}"
    assert _log(run / "log.csv") == _log(full / "log.csv"), f"killed at iteration {kill_at}"


@pytest.mark.parametrize("suffix", [".caffemodel", ".solverstate"])
def test_kill_during_a_snapshot_write_leaves_the_previous_set(tiny, tmp_path, suffix):
    """Killed while publishing snapshot 4 (before its first rename, or before its last): no
    .solverstate 4 exists, so the resume takes snapshot 2 and is exact; the .tmp files go."""
    solver, full = tiny
    run = tmp_path / "run"
    _killed_run(solver, run, f"rename:4:{suffix}")
    snaps = run / "snapshots"
    assert not (snaps / "tiny_ed_iter_4.solverstate").exists()
    assert list(snaps.glob("*.tmp")), "the killed write should leave its .tmp files"
    state = _latest_state(run)
    assert state.name == "tiny_ed_iter_2.solverstate"
    assert exdrop_main(["train", str(solver), "--out", str(run), *RUN, "--snapshot", str(state)]) == 0
    assert not list(snaps.glob("*.tmp"))
    assert _final_model(run) == _final_model(full)
    assert _log(run / "log.csv") == _log(full / "log.csv")


def _copy_run(full, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(full, run)
    return run


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_resume_without_the_engine_state_is_refused_unless_inexact(tiny, tmp_path, capsys, damage):
    solver, full = tiny
    run = _copy_run(full, tmp_path)
    state = run / "snapshots" / "tiny_ed_iter_4.solverstate"
    extra = run / "snapshots" / "tiny_ed_iter_4.engine.pt"
    if damage == "missing":
        extra.unlink()
    else:
        extra.write_bytes(extra.read_bytes()[:200])
    assert exdrop_main(["train", str(solver), "--out", str(run), *RUN, "--snapshot", str(state)]) == 1
    err = capsys.readouterr().err
    assert f"exdrop: error: cannot resume {state} exactly" in err and str(extra) in err
    assert ("is missing" if damage == "missing" else "truncated or not an engine state") in err
    assert "--inexact-resume" in err
    assert exdrop_main(["train", str(solver), "--out", str(run), *RUN, "--snapshot", str(state),
                        "--inexact-resume"]) == 0
    err = capsys.readouterr().err
    assert f"exdrop: warning: inexact resume from {state}" in err and "the data order" in err


def test_resume_reads_the_weights_beside_the_solverstate(tiny, tmp_path, capsys):
    """A run folder moved elsewhere resumes from its own .caffemodel, not the path stored in the state."""
    solver, full = tiny
    moved = _copy_run(full, tmp_path)
    state = moved / "snapshots" / "tiny_ed_iter_4.solverstate"
    from exdrop.proto import caffe_pb2
    stored = cio.read_binary_proto(state, caffe_pb2.SolverState()).learned_net
    assert stored == str(full.resolve() / "snapshots" / "tiny_ed_iter_4.caffemodel")
    # the original folder's weights are not the snapshot's: a resume reading them would drift
    original = Path(stored)
    saved = original.read_bytes()
    try:
        shutil.copy(full / "snapshots" / "tiny_ed_iter_2.caffemodel", original)
        with pytest.MonkeyPatch.context() as mp:   # snapshot 4 stays for the second resume below
            mp.setattr(train_module, "TrainConfig", _KeepAllSnapshots)
            assert exdrop_main(["train", str(solver), "--out", str(moved), *RUN, "--snapshot", str(state)]) == 0
    finally:
        original.write_bytes(saved)
    assert _final_model(moved) == _final_model(full)
    # without the .caffemodel beside it: an error naming both paths
    (moved / "snapshots" / "tiny_ed_iter_4.caffemodel").unlink()
    assert exdrop_main(["train", str(solver), "--out", str(moved), *RUN, "--snapshot", str(state)]) == 1
    err = capsys.readouterr().err
    assert str(moved / "snapshots" / "tiny_ed_iter_4.caffemodel") in err and stored in err


@pytest.mark.parametrize("at", [4, 6, MAX_ITER])
def test_resumed_log_equals_the_uninterrupted_log(tiny, tmp_path, at):
    """No row lost or doubled: from a snapshot between tests, at a test iteration, and at the end."""
    solver, full = tiny
    run = _copy_run(full, tmp_path)
    state = run / "snapshots" / f"tiny_ed_iter_{at}.solverstate"
    assert exdrop_main(["train", str(solver), "--out", str(run), *RUN, "--snapshot", str(state)]) == 0
    assert _log(run / "log.csv") == _log(full / "log.csv")


def test_resume_past_the_first_end_keeps_its_final_test(tiny, tmp_path):
    """The first run's final test at 8 (not a test_interval multiple) stays when the run goes on."""
    solver, full = tiny
    run = _copy_run(full, tmp_path)
    longer = [*RUN, "--max-iter", "10", "--snapshot", str(run / "snapshots" / "tiny_ed_iter_8.solverstate")]
    assert exdrop_main(["train", str(solver), "--out", str(run), *longer]) == 0
    rows = [(r["iter"], r["phase"]) for r in _log(run / "log.csv")]
    assert rows.count(("8", "test")) == 1 and rows[-1] == ("10", "test")
    assert _log(run / "log.csv")[:len(_log(full / "log.csv"))] == _log(full / "log.csv")


# ---------------------------------------------------------------------- nothing runs from a file
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_a_crafted_engine_state_is_refused_and_runs_nothing(tiny, tmp_path, capsys):
    solver, full = tiny
    run = _copy_run(full, tmp_path)
    marker = tmp_path / "ran"
    extra = run / "snapshots" / "tiny_ed_iter_4.engine.pt"
    torch.save({"iter": 4, "elapsed": 0.0, "torch_rng": _RunsCode(marker), "solver": {}, "data": {}}, extra)
    state = run / "snapshots" / "tiny_ed_iter_4.solverstate"
    assert exdrop_main(["train", str(solver), "--out", str(run), *RUN, "--snapshot", str(state)]) == 1
    err = capsys.readouterr().err
    assert f"{extra}: refused" in err and "nothing from it was run" in err
    assert not marker.exists()


def test_the_engine_state_holds_plain_data_only(tiny):
    _, full = tiny
    state = torch.load(full / "snapshots" / "tiny_ed_iter_4.engine.pt", weights_only=True)
    assert state["iter"] == 4 and isinstance(state["torch_rng"], torch.Tensor)
    assert set(state["data"]) == {"train", "test"} and "recent_losses" in state["loop"]


def _cifar_archive(path, batch_1: bytes):
    meta = pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}, protocol=2)
    labels = list(range(10))
    rows = np.arange(10 * 3072, dtype=np.uint8).reshape(10, 3072)
    test = pickle.dumps({b"labels": labels, b"data": rows}, protocol=2)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in (("data_batch_1", batch_1), ("test_batch", test), ("batches.meta", meta)):
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_a_crafted_cifar_archive_runs_nothing(tmp_path):
    from exdrop.data import read_cifar10_python
    marker = tmp_path / "ran"
    archive = _cifar_archive(tmp_path / "cifar-10-python.tar.gz", pickle.dumps({b"data": _RunsCode(marker)}))
    with pytest.raises(ValueError, match=r"cifar-10-python\.tar\.gz: member data_batch_1: refused: "
                                         r"the pickle asks for builtins\.exec"):
        read_cifar10_python(archive)
    assert exdrop_main(["data", "cifar10", str(archive), "--out", str(tmp_path / "db")]) == 1
    assert not marker.exists()


def test_a_small_cifar_archive_still_loads(tmp_path):
    from exdrop.data import read_cifar10_python
    labels = [i % 10 for i in range(20)]
    data = np.random.default_rng(0).integers(0, 256, (20, 3072), dtype=np.uint8)
    archive = _cifar_archive(tmp_path / "c.tar.gz", pickle.dumps({b"labels": labels, b"data": data,
                                                                  b"filenames": [b"x.png"] * 20}, protocol=2))
    ds = read_cifar10_python(archive)
    assert ds.classes == [f"c{i}" for i in range(10)] and len(ds.splits["train"].names) == 20
    assert (ds.splits["train"].load(3) == data[3].reshape(3, 32, 32)[::-1]).all()


def test_a_truncated_cifar_member_is_named(tmp_path):
    from exdrop.data import read_cifar10_python
    good = pickle.dumps({b"labels": [0], b"data": np.zeros((1, 3072), np.uint8)}, protocol=2)
    archive = _cifar_archive(tmp_path / "c.tar.gz", good[:40])
    with pytest.raises(ValueError, match="member data_batch_1: not a readable CIFAR-10 batch pickle"):
        read_cifar10_python(archive)


LAYER_FILE = ("open({marker!r}, 'w').write('imported')\nclass Layer:\n"
              "    def setup(self, bottom, top):\n        pass\n    reshape = forward = backward = setup\n")


def test_layer_modules_come_from_configured_folders_never_the_cwd(tmp_path, monkeypatch):
    folder = tmp_path / "cwd"
    folder.mkdir()
    marker = tmp_path / "imported"
    (folder / "exdrop_test_cwd_layer.py").write_text(LAYER_FILE.format(marker=str(marker)))
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))   # as `python -m exdrop` run from there would
    monkeypatch.delenv("EXDROP_LAYER_PATH", raising=False)
    with pytest.raises(ImportError, match=r"layer 'drop': python_param module 'exdrop_test_cwd_layer' not "
                                          r"found .*never in the current directory.*EXDROP_LAYER_PATH"):
        load_layer_class("exdrop_test_cwd_layer", "Layer", "drop")
    assert not marker.exists()
    monkeypatch.setenv("EXDROP_LAYER_PATH", os.pathsep.join([str(tmp_path / "absent"), str(folder)]))
    try:
        assert load_layer_class("exdrop_test_cwd_layer", "Layer", "drop").__name__ == "Layer"
        assert marker.exists()
    finally:
        sys.modules.pop("exdrop_test_cwd_layer", None)


def test_repo_layers_win_over_a_same_named_module_in_the_cwd(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "excitation_dropout.py").write_text(LAYER_FILE.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = load_layer_class("excitation_dropout", "ExcitationDropout", "drop")
    # the class's own functions come from layers/ (mutation testing wraps some in functions of its own)
    files = {Path(inspect.unwrap(f).__code__.co_filename).parent for f in vars(cls).values() if inspect.isfunction(f)}
    assert ROOT / "layers" in files and not marker.exists(), files


# ---------------------------------------------------------------------- divergence
def _no_dropout_solver(tmp_path, base_lr: float) -> Path:
    solver = write_tiny(tmp_path)
    net = tmp_path / "tiny_ed.prototxt"
    text = net.read_text()
    drop = next(line for line in text.splitlines(True) if 'name: "drop"' in line)
    start = text.index(drop)
    end = text.index(" } }\n", text.index("python_param", start)) + len(" } }\n")
    net.write_text(text[:start] + text[end:])
    solver.write_text(solver.read_text().replace("base_lr: 0.01", f"base_lr: {base_lr}"))
    return solver


def _assert_no_nonfinite_snapshot(snaps: Path):
    from exdrop.proto import caffe_pb2
    for model in snaps.glob("*.caffemodel"):
        for layer in cio.read_caffemodel(model).layer:
            for blob in layer.blobs:
                assert np.isfinite(cio.blob_to_array(blob)).all(), f"{model.name}: layer {layer.name}"
    for state in snaps.glob("*.solverstate"):
        for blob in cio.read_binary_proto(state, caffe_pb2.SolverState()).history:
            assert np.isfinite(cio.blob_to_array(blob)).all(), state.name


def test_a_nan_loss_stops_the_run_before_any_nonfinite_snapshot(tmp_path, capsys):
    solver = _no_dropout_solver(tmp_path, base_lr=1e30)
    run = tmp_path / "run"
    args = ["--max-iter", "40", "--display", "10", "--test-interval", "0", "--snapshot-every", "1",
            "--device", "cpu", "--quiet"]
    assert exdrop_main(["train", str(solver), "--out", str(run), *args]) == 2
    err = capsys.readouterr().err
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "diverged" and res["error"] in err
    assert f"exdrop: error: {solver}: the " in err and "backend); last good snapshot: " in err
    assert "not finite (NaN or inf) at iteration" in err
    snaps = run / "snapshots"
    _assert_no_nonfinite_snapshot(snaps)
    good = err.split("last good snapshot: ")[1].split(";")[0]
    assert Path(good).is_file() and Path(good).parent == snaps.resolve()
    newest = max(int(p.stem.rsplit("_", 1)[1]) for p in snaps.glob("*.caffemodel"))
    assert good.endswith(f"_iter_{newest}.caffemodel")


def test_a_nan_through_excitation_dropout_is_named_too(tmp_path, capsys):
    solver = write_tiny(tmp_path)
    solver.write_text(solver.read_text().replace("base_lr: 0.01", "base_lr: 1e30"))
    run = tmp_path / "run"
    args = ["--max-iter", "40", "--display", "10", "--test-interval", "0", "--snapshot-every", "1",
            "--device", "cpu", "--quiet"]
    assert exdrop_main(["train", str(solver), "--out", str(run), *args]) == 2
    err = capsys.readouterr().err
    assert "not finite (NaN or inf) at iteration" in err and "last good snapshot: " in err
    assert json.loads((run / "results.json").read_text())["status"] == "diverged"
    _assert_no_nonfinite_snapshot(run / "snapshots")


class _StubBackend:
    """Scripted losses (floats, as the Caffe backend gives, or tensors, as the engine does)."""

    name = "stub"

    def __init__(self, cfg, losses, as_tensor):
        self.sp, self.out = prepare_solver(cfg)
        self.iter, self.elapsed, self.outputs, self.num_test_nets = 0, 0.0, ["loss"], 0
        self.losses, self.as_tensor, self.snapshots = losses, as_tensor, []

    def learning_rate(self):
        return 0.1

    def step(self):
        loss = self.losses[self.iter]
        self.iter += 1
        loss = torch.tensor(loss) if self.as_tensor else loss
        return loss, {"loss": loss}

    def snapshot(self, elapsed):
        self.snapshots.append(self.iter)
        return self.out / f"stub_iter_{self.iter}.caffemodel"

    def save_weights(self, path):   # the run's iteration-0 weights: nothing to write for a stub
        Path(path).write_bytes(b"")

    def nonfinite_weights(self):
        return None

    def results_extra(self):
        return {}


def _stub_run(tmp_path, losses, as_tensor, display=4, snapshot=2):
    path = tmp_path / "solver.prototxt"
    path.write_text(f'net: "stub.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: {len(losses)}\n'
                    f"display: {display}\nsnapshot: {snapshot}\n")
    cfg = TrainConfig(solver=str(path), out=str(tmp_path / "run"), progress=False)
    backend = _StubBackend(cfg, losses, as_tensor)
    with pytest.raises(TrainingDiverged) as info:
        Trainer(cfg, backend=backend).run()
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "diverged" and res["error"] == str(info.value)
    return str(info.value), backend.snapshots


@pytest.mark.parametrize("as_tensor", [False, True], ids=["floats", "tensors"])
def test_a_nan_between_display_points_is_named_with_its_iteration(tmp_path, as_tensor):
    msg, snaps = _stub_run(tmp_path, [2.0, 1.5, 1.0, float("nan"), 1.0, 1.0, 1.0, 1.0], as_tensor,
                           display=100, snapshot=2)
    assert "not finite (NaN or inf) at iteration 3" in msg and "stub_iter_2.caffemodel" in msg
    assert snaps == [2]   # the snapshot at 4 would hold the NaN step: not written


@pytest.mark.parametrize("as_tensor", [False, True], ids=["floats", "tensors"])
def test_a_loss_stuck_at_the_clamp_for_a_display_window_diverges(tmp_path, as_tensor):
    clamp = CLAMPED_LOSS
    losses = [2.0, 3.0, clamp, 1.0, 2.0, clamp, clamp, clamp, clamp, 2.0]   # display windows 1-4, 5-8
    msg, _ = _stub_run(tmp_path, losses, as_tensor, display=4, snapshot=0)
    assert "sat at Caffe's clamp -log(FLT_MIN) = 87.3365 at every iteration from 5 to 8" in msg
    assert "no snapshot was written before it" in msg


# ---------------------------------------------------------------------- named errors
def test_a_truncated_solverstate_is_named(tiny, tmp_path, capsys):
    solver, full = tiny
    run = _copy_run(full, tmp_path)
    state = run / "snapshots" / "tiny_ed_iter_4.solverstate"
    state.write_bytes(state.read_bytes()[:37])
    assert exdrop_main(["train", str(solver), "--out", str(run), *RUN, "--snapshot", str(state)]) == 1
    err = capsys.readouterr().err
    assert f"exdrop: error: {state}: not a valid SolverState" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_names_what_torch_sees(tiny, tmp_path, capsys):
    solver, _ = tiny
    assert exdrop_main(["train", str(solver), "--out", str(tmp_path / "run"), *RUN, "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert f"exdrop: error: --device cuda: torch {torch.__version__} sees no CUDA device" in err


@pytest.mark.parametrize("flag, value, message", [
    ("--max-iter", "0", "max_iter is 0, it must be positive"),
    ("--max-iter", "-3", "max_iter is -3, it must be positive"),
    ("--test-iter", "-1", "test_iter is -1, it must be 0 or positive"),
    ("--display", "-2", "display is -2, it must be 0 (off) or positive"),
])
def test_impossible_counts_name_the_solver(tiny, tmp_path, capsys, flag, value, message):
    solver, _ = tiny
    assert exdrop_main(["train", str(solver), "--out", str(tmp_path / "run"), *RUN, flag, value]) == 1
    assert f"exdrop: error: {solver}: {message}" in capsys.readouterr().err


def test_caffe_backend_before_make_caffe_says_so(tiny, tmp_path):
    solver, _ = tiny
    env = {**os.environ, "EXDROP_CAFFE_DIR": str(tmp_path / "no_build")}
    proc = subprocess.run([sys.executable, "-m", "exdrop", "train", str(solver), "--backend", "caffe",
                           "--out", str(tmp_path / "run"), "--quiet"], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    assert "exdrop: error: pycaffe is not built" in proc.stderr and "run `make caffe`" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_non_finite_value_inside_excitation_backprop_is_a_divergence(tmp_path, capsys, monkeypatch):
    """EB meets inf activations (base_lr 1e8 on CNN-2) while the clamped loss still looks finite: exit 2,
    "status": "diverged", the iteration and the last good snapshot named, nothing non-finite written."""
    from exdrop.engine.eb import NonFiniteError
    solver = write_tiny(tmp_path)
    step = train_module.EngineBackend.step

    def overflowing_step(self):
        if self.solver.iter == 5:
            raise NonFiniteError("layer 'drop': blob 'ip1' is not finite (0 NaN, 3 inf of 64 values)")
        return step(self)
    monkeypatch.setattr(train_module.EngineBackend, "step", overflowing_step)
    run = tmp_path / "run"
    assert exdrop_main(["train", str(solver), "--out", str(run), "--max-iter", "20", "--snapshot-every", "2",
                        "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "diverged" and res["error"] in err
    assert "non-finite at iteration 5" in err and "blob 'ip1' is not finite" in err
    assert f"last good snapshot: {(run / 'snapshots' / 'tiny_ed_iter_4.caffemodel').resolve()}" in err


def test_a_full_disk_during_a_snapshot_names_the_file_and_the_last_complete_one(tmp_path, capsys, monkeypatch):
    import errno
    solver = write_tiny(tmp_path)
    snapshot = train_module.EngineBackend.snapshot

    def full_disk(self, elapsed):
        if self.solver.iter == 4:
            path = Path(self.sp.snapshot_prefix + "_iter_4.solverstate.tmp")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return snapshot(self, elapsed)
    monkeypatch.setattr(train_module.EngineBackend, "snapshot", full_disk)
    run = tmp_path / "run"
    assert exdrop_main(["train", str(solver), "--out", str(run), "--max-iter", "8", "--snapshot-every", "2",
                        "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    snaps = (run / "snapshots").resolve()
    assert f"{snaps / 'tiny_ed_iter_4.solverstate.tmp'}: No space left on device while writing the snapshot of " \
           f"iteration 4; last complete snapshot: {snaps / 'tiny_ed_iter_2.caffemodel'}" in err
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "failed" and "No space left on device" in res["error"] and res["iterations"] == 4
