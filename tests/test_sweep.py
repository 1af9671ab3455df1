"""The sweep runner (exdrop.experiments.sweep, `exdrop sweep`, `make table2` / `make table4`).

A tiny sweep on a generated CIFAR-10-like image tree runs end to end in subprocesses; the
tables are checked on run folders with known numbers; a stopped sweep resumes.
"""
from __future__ import annotations

import csv
import json
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from exdrop.proto import io as cio
from exdrop.experiments import sweep as S
from make_dry import unquoted  # noqa: E402

TINY = S.Budget("tiny", "test budget: 10 images per class, 4 iterations", train_per_class=10, val_per_class=10,
                max_iter=4, stepvalue=2, test_interval=2, snapshot=2, display=1)


@pytest.fixture(scope="module")
def image_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar_tree") / "train"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                              "truck"]):
        (root / name).mkdir(parents=True)
        for i in range(20):
            img = np.clip(rng.normal(40 + 20 * c, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / name / f"{i:04d}.png"), img)
    return root


def test_plan_writes_runs_with_seed_rate_and_data(image_tree, tmp_path):
    runs = S.plan(tmp_path, ["cifar10"], ["standard_fc1", "ed", "adaptive"], [0.25, 0.75], [1, 2], TINY,
                  {"cifar10": str(image_tree)}, progress=False)
    # rated methods get every rate, the others their own parameters once
    assert sorted({(r.method, r.rate) for r in runs}) == [
        ("adaptive", 0.5), ("ed", 0.25), ("ed", 0.75), ("standard_fc1", 0.25), ("standard_fc1", 0.75)]
    assert len(runs) == 10
    by = {(r.method, r.rate, r.seed): r for r in runs}
    r = by[("ed", 0.25, 2)]
    net = cio.read_net_prototxt(r.folder / "net.prototxt")
    drop = next(lp for lp in net.layer if lp.name == "drop")
    assert "'dropout_ratio': 0.25" in drop.python_param.param_str
    std = cio.read_net_prototxt(by[("standard_fc1", 0.75, 1)].folder / "net.prototxt")
    assert next(lp for lp in std.layer if lp.type == "Dropout").dropout_param.dropout_ratio == pytest.approx(0.75)
    sp = cio.read_solver_prototxt(r.solver)
    assert (sp.random_seed, sp.max_iter, list(sp.stepvalue), sp.test_interval) == (2, 4, [2], 2)
    assert list(sp.test_iter) == [1]   # the 100 held-back images once, at the test batch of 100
    # seeds change the data order: same records, another order
    sources = {lp.data_param.source for lp in net.layer if lp.type == "Data"}
    assert any("train_seed2_lmdb" in s for s in sources) and any(s.endswith("val_lmdb") for s in sources)
    from exdrop.data import DatumLMDB
    with DatumLMDB(tmp_path / "data/cifar10_tiny/train_seed1_lmdb") as a, \
            DatumLMDB(tmp_path / "data/cifar10_tiny/train_seed2_lmdb") as b:
        (xa, ya), (xb, yb) = a.read_all(), b.read_all()
    assert len(ya) == 100 and np.bincount(ya).tolist() == [10] * 10
    assert not np.array_equal(ya, yb) and sorted(map(bytes, xa)) == sorted(map(bytes, xb))
    # plan.txt: one runnable line per run, the same command whether fresh or resumed
    lines = (tmp_path / "plan.txt").read_text().splitlines()
    assert len(lines) == 10 and all("--snapshot auto" in line for line in lines)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["budget"]["name"] == "tiny" and len(plan["runs"]) == 10


def test_unrated_method_refuses_a_rate(image_tree, tmp_path):
    data = {"train": {1: "x"}, "val": {1: "y"}}
    with pytest.raises(ValueError, match="adaptive has no dropout rate"):
        S.write_run(S.Run("cifar10", "adaptive", 0.25, 1, tmp_path / "r"), TINY, data)


def _fake_run(folder: Path, accs: list[tuple[int, float]], finished: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iter", "phase", "lr", "elapsed_s", "accuracy", "loss"])
        for it, a in accs:
            w.writerow([it, "train", 0.001, 1.0, 0.5, 1.0])
            w.writerow([it, "test", 0.001, 1.0, a, 2.0])
    last = accs[-1][0]
    (folder / "results.json").write_text(json.dumps({"status": "finished" if finished else "interrupted",
                                                     "iterations": last, "max_iter": 4}))


def test_tables_mean_std_and_paper_figures(tmp_path):
    runs = []
    for method, seeds in (("ed", {1: 0.60, 2: 0.64}), ("standard_fc1", {1: 0.50, 2: 0.54})):
        for seed, acc in seeds.items():
            folder = tmp_path / "cifar10" / method / f"seed{seed}"
            _fake_run(folder, [(2, 0.3), (4, acc)])
            runs.append({"key": f"cifar10/{method}/seed{seed}", "dataset": "cifar10", "method": method, "rate": 0.5,
                         "seed": seed, "folder": str(folder), "command": []})
    folder = tmp_path / "cifar10" / "none" / "seed1"
    _fake_run(folder, [(2, 0.3)], finished=False)
    runs.append({"key": "cifar10/none/seed1", "dataset": "cifar10", "method": "none", "rate": 0.5, "seed": 1,
                 "folder": str(folder), "command": []})
    import dataclasses
    (tmp_path / "plan.json").write_text(json.dumps({"budget": dataclasses.asdict(TINY), "runs": runs}))
    written = S.write_outputs(tmp_path, "2")
    md = (tmp_path / "table2.md").read_text()
    assert "**Reduced budget** (`tiny`)" in md
    row = next(line for line in md.splitlines() if line.startswith("| cifar10"))
    # mean and sample std (ddof 1) in %, the paper's Table 2 figure beside each
    assert "62.00 +- 2.83 [81.94]" in row and "52.00 +- 2.83 [80.13]" in row
    assert "not yet" in row   # the unfinished run is not averaged in
    summary = json.loads((tmp_path / "table2.json").read_text())
    ed = next(c for c in summary["cells"] if c["method"] == "ed")
    assert ed["mean"] == pytest.approx(62.0) and [r["curve"] for r in ed["runs"]][0] == [[2, 0.3], [4, 0.6]]
    assert (tmp_path / "fig3_cifar10.png").stat().st_size > 5000 and len(written) == 3


def test_table4_layout(tmp_path):
    runs = []
    for rate, acc in ((0.25, 0.7), (0.75, 0.8)):
        folder = tmp_path / "cifar100" / f"ed_r{rate}" / "seed1"
        _fake_run(folder, [(4, acc)])
        runs.append({"key": "k", "dataset": "cifar100", "method": "ed", "rate": rate, "seed": 1,
                     "folder": str(folder), "command": []})
    (tmp_path / "plan.json").write_text(json.dumps({"budget": {"name": "paper", "description": "the paper's",
                                                               "reduced": False}, "runs": runs}))
    S.write_outputs(tmp_path, "4")
    md = (tmp_path / "table4.md").read_text()
    assert "**The paper's protocol**" in md
    assert "| cifar100 | Excitation | 70.00 (n=1) [53.23] | 80.00 (n=1) [51.87] |" in md


def test_tiny_sweep_runs_skips_finished_and_resumes(image_tree, tmp_path):
    """Two runs in two worker processes; then one is made to look interrupted (its results removed,
    a snapshot kept): the second execute skips the finished run and resumes the other."""
    runs = S.plan(tmp_path, ["cifar10"], ["none", "ed"], [0.5], [1], TINY, {"cifar10": str(image_tree)},
                  device="cpu", progress=False)
    report = S.execute(runs, workers=2, threads=1, gpus=0, echo=lambda *a: None)
    assert report == {"runs": 2, "ran": 2, "failed": []}
    for r in runs:
        res = json.loads((r.folder / "results.json").read_text())
        assert res["status"] == "finished" and res["iterations"] == 4, (r.folder / "stdout.log").read_text()
    ed = next(r for r in runs if r.method == "ed")
    (ed.folder / "results.json").unlink()
    assert S.status(ed.folder) == "started"
    said = []
    report = S.execute(runs, workers=1, threads=1, gpus=0, echo=said.append)
    assert report["ran"] == 1 and not report["failed"]
    assert "resuming" in " ".join(said)
    assert "resuming from" in (ed.folder / "stdout.log").read_text()
    # the plan's line for a finished run is a no-op
    line = next(l for l in (tmp_path / "plan.txt").read_text().splitlines() if "/none/" in l)
    out = subprocess.run(line.split(" > ")[0], shell=True, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "finished already" in out.stdout
    summary = S.collect(tmp_path)
    assert all(c["seeds"] == 1 and 0 <= c["mean"] <= 100 for c in summary["cells"])
    # `exdrop test` on a run's final snapshot gives the run's own final test accuracy and loss
    from exdrop.analysis.evaluate import evaluate
    for r in runs:
        res = json.loads((r.folder / "results.json").read_text())
        model = next((r.folder / "snapshots").glob("*_iter_4.caffemodel"))
        ev = evaluate(r.solver, model)
        acc, loss, _ = S._final_test(r.folder)
        assert ev["accuracy"] == pytest.approx(acc, abs=1e-6) == pytest.approx(res["test_accuracy"], abs=1e-6)
        assert ev["loss"] == pytest.approx(loss, rel=1e-5)


def test_cli_sweep_plan_only(image_tree, tmp_path, monkeypatch, capsys):
    from exdrop import cli
    monkeypatch.setitem(S.BUDGETS, "cpu", TINY)
    rc = cli.main(["sweep", "--budget", "cpu", "--seeds", "1", "--methods", "none", "--out", str(tmp_path / "sw"),
                   "--data", f"cifar10={image_tree}", "--plan-only"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "1 runs planned" in out and "not yet" in out
    assert cli.main(["sweep", "--datasets", "mnist", "--plan-only"]) == 1
    assert "unknown dataset 'mnist'" in capsys.readouterr().err


def test_another_precision_is_another_sweep_folder(image_tree, tmp_path, monkeypatch, capsys):
    """``--amp ''`` on a bf16 budget (a CPU without native bf16, where bf16 autocast is many times slower)
    is another protocol: its own budget name and folder, never the bf16 runs' folder; the budget's own
    precision given again changes nothing."""
    import dataclasses

    from exdrop import cli
    monkeypatch.setitem(S.BUDGETS, "cpu", dataclasses.replace(TINY, name="cpu", amp="bf16",
                                                              description=TINY.description + ", bf16 autocast of the training forward"))
    monkeypatch.chdir(tmp_path)
    for amp, folder, precision in (("", "results/table2_cifar10_cpu-fp32", "float32"),
                                   ("bf16", "results/table2_cifar10_cpu", "bf16 autocast")):
        assert cli.main(["sweep", "--budget", "cpu", "--seeds", "1", "--methods", "none", "--amp", amp,
                         "--data", f"cifar10={image_tree}", "--plan-only"]) == 0, capsys.readouterr().err
        plan = json.loads((tmp_path / folder / "plan.json").read_text())
        assert plan["budget"]["name"] == Path(folder).name.removeprefix("table2_cifar10_")
        assert plan["budget"]["description"].endswith(precision + (" of the training forward" if amp else ""))
        command = (tmp_path / folder / "plan.txt").read_text()
        assert ("--amp bf16" in command) == bool(amp), command


def test_a_bf16_sweep_on_a_slow_cpu_is_warned(image_tree, tmp_path, monkeypatch, capsys):
    import dataclasses

    from exdrop import cli
    from exdrop.engine import step
    monkeypatch.setattr(step, "cpu_autocast_slowdown", lambda dtype=None, repeats=3: 25.0)
    monkeypatch.setitem(S.BUDGETS, "cpu", dataclasses.replace(TINY, name="cpu", amp="bf16"))
    for amp, warned in (("bf16", True), ("", False)):
        assert cli.main(["sweep", "--budget", "cpu", "--seeds", "1", "--methods", "none", "--amp", amp, "--device",
                         "cpu", "--out", str(tmp_path / f"sw{amp}"), "--data", f"cifar10={image_tree}",
                         "--plan-only"]) == 0
        err = capsys.readouterr().err
        assert ("sweep: warning: bf16 autocast is 25x slower than float32 on this CPU" in err) == warned, err


def test_make_targets_call_the_sweep():
    root = Path(__file__).resolve().parents[1]
    def sweep_line(stdout):   # under `make test` make may also print "Entering directory" lines
        return shlex.split(next(line for line in stdout.splitlines() if " exdrop sweep " in line))

    out = subprocess.run(["make", "--no-print-directory", "-n", "table2", "DATASETS=cifar10,cifar100", "BUDGET=cpu",
                          "WORKERS=2", "DATA=x.tgz", "CIFAR100=y.tar.gz"], cwd=root, capture_output=True, text=True,
                         check=True)
    cmd = sweep_line(out.stdout)
    assert cmd[1:5] == ["-m", "exdrop", "sweep", "--table"] and cmd[5] == "2"
    args = dict(zip(cmd[6::2], cmd[7::2]))
    assert args["--datasets"] == "cifar10,cifar100" and args["--budget"] == "cpu" and args["--seeds"] == "1"
    assert args["--workers"] == "2" and "cifar100=y.tar.gz" in cmd and "cifar10=x.tgz" in cmd
    assert ("cp results/table2_cifar10_cifar100_cpu/table2.md results/table2_cifar10_cifar100_cpu/table2.json "
            "results/table2_cifar10_cifar100_cpu/fig3_*.png results/") in unquoted(out.stdout)
    out = subprocess.run(["make", "--no-print-directory", "-n", "table4"], cwd=root, capture_output=True, text=True,
                         check=True)
    cmd = sweep_line(out.stdout)
    assert cmd[5] == "4" and dict(zip(cmd[6::2], cmd[7::2]))["--seeds"] == "5"   # the paper's five seeds


def test_ctrl_c_stops_the_sweep_and_loses_nothing(image_tree, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while two runs train: both
    write a snapshot and stop; the same sweep again resumes them from there and finishes."""
    import os
    import signal
    import time
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import dataclasses, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # a suite started in the background ignores it\n"
        "from exdrop.experiments import sweep as S\n"
        "sys.path.insert(0, %r)\n"
        "from test_sweep import TINY\n"
        "b = dataclasses.replace(TINY, max_iter=120, snapshot=0, test_interval=0)\n"
        "runs = S.plan(%r, ['cifar10'], ['none', 'standard_fc1'], [0.5], [1], b, {'cifar10': %r}, device='cpu',"
        " progress=False)\n"
        "try:\n"
        "    S.execute(runs, workers=2, threads=1, gpus=0)\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n" % (str(Path(__file__).parent), str(tmp_path / "sw"), str(image_tree)))
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    folders = [tmp_path / "sw/cifar10" / m / "seed1" for m in ("none", "standard_fc1")]
    deadline = time.time() + 240
    while not all((f / "log.csv").is_file() and len((f / "log.csv").read_text().splitlines()) > 3 for f in folders):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "slow"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 130, out
    assert "waiting for 2 run(s) to write their snapshots" in out
    assert out.rstrip().endswith("sweep: stopped; the same command again skips the finished runs and resumes the others")
    for f in folders:
        assert S.status(f) == "started", (f / "stdout.log").read_text()
        assert json.loads((f / "results.json").read_text())["status"] == "interrupted"
    runs = [S.Run("cifar10", m, 0.5, 1, f, f / "sweep_solver.prototxt",
                  json.loads((tmp_path / "sw/plan.json").read_text())["runs"][i]["command"])
            for i, (m, f) in enumerate(zip(("none", "standard_fc1"), folders))]
    said = []
    assert S.execute(runs, workers=2, threads=1, gpus=0, echo=said.append)["failed"] == []
    assert sum("(resuming)" in line for line in said) == 2
    for f in folders:
        assert S.status(f) == "finished" and "resuming from" in (f / "stdout.log").read_text()


# ------------------------------------------------------------------ the answer's statistics

def test_paired_interval_on_hand_made_numbers():
    """Differences 2, 3, 0 (seeds 1-3): mean 5/3, sd sqrt(7/3), t(0.975, 2) = 4.302653 (tables)."""
    p = S.paired_interval({1: 60.0, 2: 62.0, 3: 61.0, 4: 70.0}, {1: 58.0, 2: 59.0, 3: 61.0})
    assert p["seeds"] == [1, 2, 3] and p["n"] == 3   # seed 4 has no partner
    assert p["mean"] == pytest.approx(5 / 3) and p["sd"] == pytest.approx((7 / 3) ** 0.5)
    half = 4.302653 * (7 / 3) ** 0.5 / 3 ** 0.5
    assert (p["low"], p["high"]) == (pytest.approx(5 / 3 - half, abs=1e-5), pytest.approx(5 / 3 + half, abs=1e-5))
    assert S.format_interval(p) == "+1.67 +- 1.53 [95% CI -2.13, +5.46], seeds 1,2,3"
    one = S.paired_interval({1: 60.0}, {1: 58.5})
    assert one["mean"] == pytest.approx(1.5) and one["low"] is None
    assert S.format_interval(one) == "+1.50 (one seed: 1; no interval)"
    assert S.format_interval(S.paired_interval({}, {1: 1.0})) == "not yet"


def _log_run(folder: Path, train_accs, tests, max_iter=4):
    """A finished run folder: train rows with ``train_accs``, test rows (iter, accuracy, loss)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iter", "phase", "lr", "elapsed_s", "accuracy", "loss"])
        for i, a in enumerate(train_accs):
            w.writerow([i, "train", 0.001, 1.0, a, 0.1])
        for it, a, loss in tests:
            w.writerow([it, "test", 0.001, 1.0, a, loss])
    (folder / "results.json").write_text(json.dumps({"status": "finished", "iterations": max_iter,
                                                     "max_iter": max_iter}))


def _plan_of(tmp_path, cells: dict) -> None:
    """plan.json for {(method, seed): (train_accs, tests)}; each run in <method>/seed<k>."""
    import dataclasses
    runs = []
    for (method, seed), (train, tests) in cells.items():
        folder = tmp_path / "cifar10" / method / f"seed{seed}"
        _log_run(folder, train, tests)
        runs.append({"key": f"cifar10/{method}_r0.5/seed{seed}", "dataset": "cifar10", "method": method,
                     "rate": 0.5, "seed": seed, "folder": "/elsewhere/gone",
                     "in_sweep": f"cifar10/{method}/seed{seed}", "command": []})
    (tmp_path / "plan.json").write_text(json.dumps({"budget": dataclasses.asdict(TINY), "runs": runs,
                                                    "recipe": "authors"}))


def test_regime_without_a_no_dropout_run_decides_nothing(tmp_path):
    """regime() of a sweep whose No Dropout has no finished run (here none at all): every part None."""
    _plan_of(tmp_path, {("standard_fc1", 1): ([0.8], [(4, 0.60, 1.1)]), ("standard_fc1", 2): ([0.8], [(4, 0.59, 1.1)])})
    check = S.regime(S.collect(tmp_path))
    assert check["none"] == [] and check["standard_minus_none"]["mean"] is None
    assert [check[k] for k in ("overfits", "held_out_loss_rises", "dropout_helps", "ok")] == [None] * 4


def test_regime_check_and_paired_table_on_hand_made_runs(tmp_path):
    overfit = ([0.90, 0.97, 0.99, 1.0], [(2, 0.55, 1.20), (4, 0.50, 1.40)])   # loss min 1.20, last 1.40
    _plan_of(tmp_path, {("none", 1): overfit, ("none", 2): overfit,
                        ("standard_fc1", 1): ([0.8], [(4, 0.60, 1.1)]), ("standard_fc1", 2): ([0.8], [(4, 0.59, 1.1)]),
                        ("ed", 1): ([0.7], [(4, 0.58, 1.2)]), ("ed", 2): ([0.7], [(4, 0.60, 1.2)])})
    S.write_outputs(tmp_path, "2")
    summary = json.loads((tmp_path / "table2.json").read_text())
    check = summary["regime"]["cifar10"]
    # the folders recorded in plan.json are gone: each run is found inside the sweep folder
    assert [s["train_accuracy"] for s in check["none"]] == [pytest.approx((0.97 + 0.99 + 1.0) / 3)] * 2
    assert check["none"][0]["held_out_loss_min"] == 1.20 and check["none"][0]["held_out_loss_last"] == 1.40
    assert check["overfits"] and check["held_out_loss_rises"]
    gap = check["standard_minus_none"]   # 60 - 50 and 59 - 50: mean 9.5, sd 0.71, t(0.975, 1) 12.71
    assert gap["mean"] == pytest.approx(9.5) and gap["low"] == pytest.approx(9.5 - 12.7062 * 0.5, abs=1e-3)
    assert check["dropout_helps"] and check["ok"]
    pairs = {(p["a"], p["b"]): p for p in summary["paired"]["cifar10"]}
    assert pairs[("ed", "standard_fc1")]["mean"] == pytest.approx(-0.5)
    md = (tmp_path / "table2.md").read_text()
    assert md.startswith("# Table 2: CNN-2, cifar10\n")        # trained from scratch: not "fine-tuned"
    assert "| Dataset (CNN-2) | No Dropout | Standard first fc | Excitation |" in md
    assert "Recipe: the authors' recipe" in md and "**passes**" in md
    assert "- No Dropout fits its training subset (train accuracy >= 0.95): yes" in md
    assert "- its held-out loss rises (last >= 1.05 x its minimum): yes" in md
    assert "- Excitation - Standard first fc: -0.50 +- 2.12 [95% CI -19.56, +18.56], seeds 1,2" in md
    # a No Dropout run that does not fit its training data fails the check, whatever Standard does
    _plan_of(tmp_path, {("none", 1): ([0.6, 0.7, 0.7], [(2, 0.5, 1.2), (4, 0.5, 1.1)]),
                        ("standard_fc1", 1): ([0.8], [(4, 0.60, 1.1)])})
    check = S.regime(S.collect(tmp_path))
    assert check["overfits"] is False and check["held_out_loss_rises"] is False
    # each part is its own verdict: fitting the training data with a flat held-out loss
    _plan_of(tmp_path, {("none", 1): ([0.99, 1.0, 1.0], [(2, 0.5, 1.2), (4, 0.5, 1.21)]),
                        ("standard_fc1", 1): ([0.8], [(4, 0.60, 1.1)])})
    check = S.regime(S.collect(tmp_path))
    assert check["overfits"] is True and check["held_out_loss_rises"] is False and check["ok"] is False
    assert "- its held-out loss rises (last >= 1.05 x its minimum): **no**" in S.regime_markdown(check)
    assert check["dropout_helps"] is True and check["ok"] is False   # one seed: 10 points > the 1.9 noise


@pytest.mark.parametrize("standard, none, helps", [
    ([59.52], [56.06], True),                  # one seed: 3.46 > the 1.9 noise
    ([51.0], [50.0], False),                   # one seed inside the noise
    ([51.9], [50.0], False),                   # exactly the noise is not beyond it ("> 1.9")
    ([59.52, 60.12], [56.06, 57.30], True),    # 3.46 and 2.82: each seed clears the noise, though two seeds' t
                                               # interval [-0.93, +7.21] holds 0 (the float32 runs of this project)
    ([60.0, 51.5], [50.0, 50.0], False),       # 10 and 1.5: one seed inside the noise, the interval holds 0
    ([51.5, 51.6, 51.7, 51.5], [50.0] * 4, True),   # no seed clears 1.9, but four agree: interval [+1.42, +1.73]
    ([52.0, 52.1, 70.0], [50.0] * 3, True),    # every seed clears the noise, however wide the interval
    ([52.0, 58.0, 50.5], [50.0] * 3, False),   # 2, 8 and 0.5: neither rule
])
def test_regime_dropout_helps_on_every_seed_or_by_the_interval(standard, none, helps, tmp_path):
    """Standard beats No Dropout beyond the seed noise when every seed's gap exceeds one seed's noise
    (1.9 points) or the paired 95% interval lies above 0: adding a seed that agrees never turns a pass
    into a failure, as the bare interval of two seeds (12.7 standard errors wide) would."""
    overfit = ([0.90, 0.97, 0.99, 1.0], [(2, 0.55, 1.20), (4, 0.50, 1.40)])
    runs = {}
    for seed, (a, b) in enumerate(zip(standard, none), 1):
        runs[("standard_fc1", seed)] = ([0.8], [(4, a / 100, 1.1)])
        runs[("none", seed)] = (overfit[0], [(2, 0.45, 1.20), (4, b / 100, 1.40)])
    _plan_of(tmp_path, runs)
    check = S.regime(S.collect(tmp_path))
    assert check["standard_minus_none_by_seed"] == pytest.approx([a - b for a, b in zip(standard, none)], abs=1e-4)
    assert check["dropout_helps"] is helps and check["ok"] is helps
    line = S.regime_markdown(check).splitlines()[-1]
    assert line.endswith("beyond the seed noise (every seed's gap > 1.9 points, or the interval above 0): "
                         + ("yes" if helps else "**no**"))
    assert ("(per seed: " in line) is (len(standard) > 1)


def test_committed_sweep_is_not_retrained(image_tree, tmp_path, monkeypatch):
    """A sweep folder holding only its finished runs' small files (results.json, log.csv; no
    snapshots, as committed) plans again on another machine and runs nothing; a later plan with
    fewer methods keeps the finished runs in plan.json."""
    first = tmp_path / "a" / "sweep"
    runs = S.plan(first, ["cifar10"], ["none", "ed"], [0.5], [1], TINY, {"cifar10": str(image_tree)}, progress=False)
    for r in runs:
        _log_run(r.folder, [0.9], [(2, 0.4, 1.0), (4, 0.5, 1.0)])
    moved = tmp_path / "clone" / "sweep"   # the same files in another checkout, without the data
    moved.parent.mkdir()
    import shutil
    shutil.copytree(first, moved, ignore=shutil.ignore_patterns("data"))
    shutil.rmtree(tmp_path / "a")
    started = []
    monkeypatch.setattr(S.subprocess, "Popen", lambda *a, **k: started.append(a) or pytest.fail("retrained"))
    again = S.plan(moved, ["cifar10"], ["none", "ed"], [0.5], [1], TINY, {"cifar10": str(image_tree)}, progress=False)
    assert S.execute(again, echo=lambda *_: None) == {"runs": 2, "ran": 0, "failed": []} and not started
    fewer = S.plan(moved, ["cifar10"], ["ed"], [0.5], [1], TINY, {"cifar10": str(image_tree)}, progress=False)
    assert len(fewer) == 1
    kept = json.loads((moved / "plan.json").read_text())["runs"]
    assert sorted(r["method"] for r in kept) == ["ed", "none"]
    summary = S.collect(moved)
    assert {c["method"]: c["mean"] for c in summary["cells"]} == {"none": pytest.approx(50.0),
                                                                  "ed": pytest.approx(50.0)}
    # another recipe in the same folder does not inherit the paper recipe's runs
    with pytest.raises(FileNotFoundError, match="under the authors recipe"):
        S.plan(moved, ["cifar100"], ["ed"], [0.5], [1], TINY, {}, progress=False, recipe="authors")


def test_recipe_picks_the_authors_variants(image_tree, tmp_path):
    runs = S.plan(tmp_path, ["cifar10"], ["standard_fc1", "ed"], [0.5], [1], TINY, {"cifar10": str(image_tree)},
                  progress=False, recipe="authors")
    by = {r.method: r for r in runs}
    sp = cio.read_solver_prototxt(by["ed"].solver)
    assert sp.type == "SGD" and "solver_ed_authors.prototxt" in by["ed"].solver.read_text()
    net = cio.read_net_prototxt(by["ed"].folder / "net.prototxt")
    drop = next(lp for lp in net.layer if lp.name == "drop")
    assert "'grad_rescale': False" in drop.python_param.param_str
    assert "solver_standard_authors.prototxt" in by["standard_fc1"].solver.read_text()
    assert json.loads((tmp_path / "plan.json").read_text())["recipe"] == "authors"


def test_a_run_stopped_by_its_own_signal_is_not_reported_done(tmp_path):
    """A run that a scheduler's SIGTERM (or a Ctrl-C to it alone) stops exits 0 after its snapshot:
    the sweep says it stopped and counts it as not finished, instead of "done"."""
    import sys
    folder = tmp_path / "run"
    folder.mkdir()
    stop = ("import json, sys; open(sys.argv[1], 'w').write(json.dumps("
            "{'status': 'interrupted', 'iterations': 3, 'max_iter': 8}))")
    run = S.Run("cifar10", "ed", 0.5, 1, folder, command=[sys.executable, "-c", stop, str(folder / "results.json")])
    said = []
    out = S.execute([run], workers=1, threads=1, gpus=0, echo=said.append)
    assert out["failed"] == [run.key]
    assert any(line.startswith(f"sweep: stopped {run.key} before max_iter") for line in said), said
    assert not any(line.startswith("sweep: done") for line in said)
