"""A short real-data run of the training loop: a slice of the real CIFAR-10 (the shared
JPEG archive) through prepare_cifar10 into LMDBs, CNN-2 with Excitation Dropout, the
paper's solver (Adam, lr 1e-3) cut to a few iterations; the run folder, the loss going
down, and a resume from a late snapshot that keeps the log and lands on the same weights.

Sizes were measured on 2 busy CPU cores: one CNN-2 iteration costs ~1.5 s whatever the
batch (Adam over 12.6M parameters dominates) and a snapshot ~2.7 s. In 20 iterations
CNN-2 cannot get off the ln(10) plateau on fresh images, so the training split is one
image per class (10 images, 500 validation images): the loss falling is then the net
memorising them, which a broken forward/EB/backward/solver chain would not do."""
import csv
import json
import re
import shutil
import time
from pathlib import Path

import pytest

from exdrop.data import prepare_cifar10
from exdrop.run.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TGZ = ROOT.parent / "shared/data/cifar10-jpg/train.tgz"
SOLVER = ROOT / "prototxt/cnn2/cifar10/solver_ed.prototxt"
TRAIN_VAL = ROOT / "prototxt/cnn2/cifar10/train_val_ed.prototxt"

BATCH = 5
MAX_ITER = 20
SNAPSHOT = 5
RESUME_AT = 15
TEST_ITER = 4
PER_CLASS = 51          # 50 per class go to validation, 1 per class is the training set

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def solver_copy(tmp_path_factory):
    if not TGZ.is_file():
        pytest.skip(f"!!! REAL-DATA TRAINING TEST SKIPPED: the shared CIFAR-10 archive {TGZ} is missing !!!")
    tmp = tmp_path_factory.mktemp("real")
    info = prepare_cifar10(TGZ, tmp / "c10", val_size=500, limit_per_class=PER_CLASS, progress=False)
    assert info["counts"]["train"] == 10 and info["counts"]["val"] == 500
    assert info["counts"]["train_per_class"] == [1] * 10
    net = TRAIN_VAL.read_text()
    net, n_src = re.subn(r'source: "data/cifar10/(train|val)_lmdb"',
                         lambda m: f'source: "{info[m.group(1)]}"', net)
    net, n_bs = re.subn(r"batch_size: 100", f"batch_size: {BATCH}", net)
    assert n_src == 2 and n_bs == 2, "train_val_ed.prototxt changed: update this test's rewrite"
    (tmp / "train_val.prototxt").write_text(net)
    solver, n_net = re.subn(r'net: "[^"]*"', f'net: "{tmp / "train_val.prototxt"}"', SOLVER.read_text())
    assert n_net == 1
    (tmp / "solver.prototxt").write_text(solver)
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)   # snapshots are ~0.2 GB each: do not leave them behind


def _cfg(tmp, **kw):
    return TrainConfig(solver=str(tmp / "solver.prototxt"), out=str(tmp / "run"), max_iter=MAX_ITER, display=1,
                       test_interval=MAX_ITER, test_iter=TEST_ITER, snapshot=SNAPSHOT, device="cpu",
                       progress=False, overrides={"average_loss": 1}, **kw)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_short_real_run_and_resume(solver_copy):
    tmp = solver_copy
    run = tmp / "run"
    t0 = time.perf_counter()
    res = train(_cfg(tmp, keep_snapshots=0))   # every snapshot kept: the resume below takes a late one
    first_s = time.perf_counter() - t0

    # results.json
    saved = json.loads((run / "results.json").read_text())
    assert saved == json.loads(json.dumps(res))
    for key in ("status", "iterations", "test_accuracy", "test_loss", "train_loss", "seconds", "snapshot", "budget"):
        assert key in saved, key
    assert saved["status"] == "finished" and saved["iterations"] == MAX_ITER
    assert 0.0 <= saved["test_accuracy"] <= 1.0
    assert saved["budget"].startswith("reduced")

    # log.csv: a train row per iteration (display 1); one test row at the end
    rows = _rows(run / "log.csv")
    train_rows = [r for r in rows if r["phase"] == "train"]
    test_rows = [r for r in rows if r["phase"] == "test"]
    assert [int(r["iter"]) for r in train_rows] == list(range(MAX_ITER))
    assert [int(r["iter"]) for r in test_rows] == [MAX_ITER]
    assert {"loss", "accuracy", "lr"} <= set(rows[0])
    assert float(train_rows[0]["lr"]) == pytest.approx(1e-3)
    assert float(test_rows[0]["accuracy"]) == pytest.approx(saved["test_accuracy"], rel=1e-5)
    # the loss goes down: the last iterations' loss is below the first one
    losses = [float(r["loss"]) for r in train_rows]
    assert 2.0 < losses[0] < 4.0, losses   # an untrained 10-way classifier: near ln(10) = 2.30
    assert sum(losses[-4:]) / 4 < losses[0] - 0.3, losses

    # snapshots every SNAPSHOT iterations
    snaps = run / "snapshots"
    for it in range(SNAPSHOT, MAX_ITER + 1, SNAPSHOT):
        for ext in (".caffemodel", ".solverstate"):
            assert (snaps / f"cnn2_ed_iter_{it}{ext}").is_file(), f"cnn2_ed_iter_{it}{ext}"
    final_model = (snaps / f"cnn2_ed_iter_{MAX_ITER}.caffemodel").read_bytes()

    # resume from a late snapshot: the run goes on to MAX_ITER and keeps the rows before it
    t0 = time.perf_counter()
    res2 = train(_cfg(tmp, resume=str(snaps / f"cnn2_ed_iter_{RESUME_AT}.solverstate")))
    resume_s = time.perf_counter() - t0
    assert res2["status"] == "finished" and res2["iterations"] == MAX_ITER
    rows2 = _rows(run / "log.csv")
    assert [(r["iter"], r["phase"]) for r in rows2] == [(r["iter"], r["phase"]) for r in rows]
    for a, b in zip(rows2, rows):
        if int(a["iter"]) < RESUME_AT:
            assert a == b   # kept verbatim
        elif a["phase"] == "train":   # recomputed, and the same numbers: an exact resume
            assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5), (a, b)
    # the engine stores RNG and data state: the resumed run is the same run
    assert (snaps / f"cnn2_ed_iter_{MAX_ITER}.caffemodel").read_bytes() == final_model
    assert res2["test_accuracy"] == pytest.approx(res["test_accuracy"], abs=1e-6)
    assert res2["test_loss"] == pytest.approx(res["test_loss"], rel=1e-5)
    print(f"real-data run: {first_s:.1f} s for {MAX_ITER} iterations, resume {resume_s:.1f} s")

    # the run folder as docs/training.md describes it (the resume kept one snapshot set, the default)
    files = {p.relative_to(run).as_posix(): p.stat().st_size for p in run.rglob("*") if p.is_file()}
    doc = (ROOT / "docs/training.md").read_text()
    listed = re.search(r"A run folder holds (.*?)for an exact resume", doc, re.S).group(1)
    for name in ("solver.prototxt", "log.csv", "results.json", "curves.png", "init.json", "snapshots/"):
        assert f"`{name}`" in listed, f"docs/training.md does not list {name} in a run folder"
    assert {f.split("/")[0] for f in files} <= {"solver.prototxt", "log.csv", "results.json", "curves.png",
                                                "init.json", "snapshots"}, sorted(files)
    said = int(re.search(r"A CNN-2 run folder under the paper's solver \(Adam\) is (\d+) MB", doc).group(1))
    measured = sum(files.values()) / 1e6
    assert abs(measured - said) <= 0.02 * said, f"docs/training.md says {said} MB, the run folder is {measured:.0f} MB"
    assert measured < 180, f"a {MAX_ITER}-iteration run folder is {measured:.0f} MB: it holds a second copy of the net"
    # its parts, as the doc gives them: the net (the snapshot) once, Adam's m and v twice; the iteration-0
    # weights only as their record, drawn again here from the run's seed, byte for byte as recorded
    net_mb = int(re.search(r"\(the net is (\d+) MB", doc).group(1))
    model = files[f"snapshots/cnn2_ed_iter_{MAX_ITER}.caffemodel"] / 1e6
    assert abs(model - net_mb) <= 0.02 * net_mb and files["init.json"] < 2000
    from exdrop.run.init_weights import iteration0_weights
    with iteration0_weights(run) as init:
        assert abs(init.stat().st_size / 1e6 - model) < 0.01 * model
    assert abs(files[f"snapshots/cnn2_ed_iter_{MAX_ITER}.solverstate"] / 1e6 - 2 * model) < 0.02 * model
