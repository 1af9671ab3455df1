"""The paper's comparisons as sweeps: method x dataset x dropout rate x seed (Tables 2 and 4, Fig. 3).

One sweep is one folder (``results/table2_cifar10_cpu``)::

    plan.txt        one shell command per run, the same for a fresh start and a resume
                    (a cluster's job array runs line $SLURM_ARRAY_TASK_ID of it unchanged)
    plan.json       every run: method, dataset, rate, seed, budget, folder, command
    data/           the converted data of the budget, one train LMDB order per seed
    <dataset>/<method>[_r<rate>]/seed<k>/   a normal run folder (exdrop train), with the run's
                    net.prototxt and sweep_solver.prototxt
    table2.md / table4.md, table2.json / table4.json, fig3_<dataset>.png   (``collect``)

A run whose ``results.json`` says finished is skipped; one with a snapshot resumes from it
(``exdrop train --snapshot auto``). Seeds change the initialisation (the solver's
``random_seed``) and the data order (Caffe's Data layer reads its LMDB in order, so each seed
gets the training LMDB shuffled with that seed, as the paper shuffles the training images for
each model). Budgets (:data:`BUDGETS`): ``paper`` is the paper's protocol as the prototxts
state it; ``cpu`` is a reduced protocol that fits a 2-core machine (its numbers are labelled
"reduced budget" everywhere).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import io as cio

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "prototxt"

# ------------------------------------------------------------------ what a sweep can run

METHODS = ("none", "standard_fc1", "standard_both", "maskimg", "curriculum", "adaptive", "information",
           "activation", "ed")
METHOD_LABELS = {
    "none": "No Dropout", "standard_fc1": "Standard first fc", "standard_both": "Standard both fcs",
    "maskimg": "Standard + Mask/Img", "curriculum": "Curriculum", "adaptive": "Adaptive",
    "information": "Information", "activation": "Activation", "ed": "Excitation",
}
# methods whose dropout rate a sweep can set (Table 4); the others run at their own parameters
RATED = ("standard_fc1", "standard_both", "maskimg", "curriculum", "activation", "ed")
TABLE_METHODS = {
    "2": METHODS,
    "4": ("standard_fc1", "standard_both", "ed"),
}
TABLE_RATES = {"2": (0.5,), "4": (0.25, 0.5, 0.75)}

DATASETS = {   # dataset -> prototxt folder, default raw source
    "cifar10": ("cnn2/cifar10", "data/cifar-10-python.tar.gz"),
    "cifar100": ("cnn2/cifar100", "data/cifar-100-python.tar.gz"),
    "caltech256": ("cnn2/caltech256", "data/256_ObjectCategories.tar"),
}
VARIANT_ALIASES = {("cnn2/cifar10", "standard_fc1"): "standard"}

# The paper's accuracies (%): Table 2 (rate 0.5), Table 4 (standard_fc1 / standard_both / ed at
# 0.25 / 0.5 / 0.75), Table 6 top (activation) and Sec. 4.2 (no dropout on CIFAR-10).
PAPER = {
    ("cifar10", 0.5): {"none": 76.91, "standard_fc1": 80.13, "standard_both": 80.80, "curriculum": 80.03,
                       "adaptive": 76.82, "information": 79.41, "activation": 81.33, "ed": 81.94},
    ("cifar100", 0.5): {"standard_fc1": 50.36, "standard_both": 51.96, "curriculum": 50.74, "adaptive": 44.55,
                        "information": 49.79, "activation": 51.43, "ed": 52.04},
    ("caltech256", 0.5): {"standard_fc1": 28.73, "standard_both": 31.77, "curriculum": 28.91, "adaptive": 23.32,
                          "information": 28.66, "activation": 35.29, "ed": 35.77},
    ("cifar10", 0.25): {"standard_fc1": 79.16, "standard_both": 79.47, "ed": 81.38},
    ("cifar10", 0.75): {"standard_fc1": 81.19, "standard_both": 81.72, "ed": 81.55},
    ("cifar100", 0.25): {"standard_fc1": 48.44, "standard_both": 50.30, "ed": 53.23},
    ("cifar100", 0.75): {"standard_fc1": 51.64, "standard_both": 49.46, "ed": 51.87},
    ("caltech256", 0.25): {"standard_fc1": 26.23, "standard_both": 27.70, "ed": 33.60},
    ("caltech256", 0.75): {"standard_fc1": 32.51, "standard_both": 33.54, "ed": 36.81},
}


@dataclass(frozen=True)
class Budget:
    """A training protocol. ``None`` fields keep what the prototxts say (the paper's protocol)."""
    name: str
    description: str
    train_per_class: int | None = None   # a stratified subset of the training split
    val_per_class: int | None = None     # held back from the training split for evaluation
    max_iter: int | None = None
    stepvalue: int | None = None         # the 10x learning-rate drop
    test_interval: int | None = None
    snapshot: int | None = None
    display: int | None = None
    amp: str | None = None               # "bf16": autocast the forward (EB stays float32)
    keep_snapshots: int = 1              # snapshot sets each run keeps (0: all, for the analysis over training)
    reduced: bool = True


# cpu: 24 epochs of the 5,000-image subset, tests at 400 / 800 / 1,200; a snapshot every 200 iterations,
# all kept, for the analysis over training (utilization metrics from each snapshot)
_CPU_SCHEDULE = dict(max_iter=1200, stepvalue=800, test_interval=400, snapshot=200, display=100, amp="bf16",
                     keep_snapshots=0)
BUDGETS = {
    "paper": Budget("paper", "the paper's protocol (Sec. 4.1): the prototxts' solver, 100K iterations, "
                    "lr 1e-3 -> 1e-4 at 25K, batch 100, the full training split", reduced=False),
    # the two reduced designs tried for a 2-core CPU (README, "Table 2 at a CPU budget"); cpu is
    # the one where the net without dropout overfits inside the budget
    "cpu": Budget("cpu", "reduced budget for a 2-core CPU: a stratified subset of 500 training images per "
                  "class, evaluated on 500 per class held back from the training split; batch 100, 1,200 "
                  "iterations (24 epochs), lr 1e-3 -> 1e-4 at 800, bf16 autocast of the training forward",
                  train_per_class=500, val_per_class=500, **_CPU_SCHEDULE),
    # as measured (README): the first, longer schedule of the cpu design, on the whole training split
    "cpu-full": Budget("cpu-full", "reduced budget for a 2-core CPU: the whole training split less 500 images "
                       "per class held back for evaluation; batch 100, 1,500 iterations (3.3 epochs of CIFAR), "
                       "lr 1e-3 -> 1e-4 at 1,000, bf16 autocast of the training forward",
                       train_per_class=100000, val_per_class=500, max_iter=1500, stepvalue=1000,
                       test_interval=250, snapshot=500, display=100, amp="bf16"),
}


@dataclass
class Run:
    dataset: str
    method: str
    rate: float
    seed: int
    folder: Path
    solver: Path = None   # written by `write_run`
    command: list = None

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.method}_r{self.rate:g}/seed{self.seed}"


# ------------------------------------------------------------------ data

def prepare_data(dataset: str, source: str, budget: Budget, out: Path, seeds, progress: bool = True) -> dict:
    """The budget's converted data under ``out``: {"train": {seed: LMDB}, "val": {seed: LMDB}, "counts"}.

    CIFAR: the split is converted once (seed 0: the same subset and held-back images for every
    seed and method); each seed then gets its own copy of the training LMDB in an order drawn
    from that seed. Caltech-256: seed k uses the paper's random split (k - 1) mod 5.
    """
    from . import data as D
    folder = out / f"{dataset}_{budget.name}"
    if budget.train_per_class is not None:
        per_class = budget.train_per_class + (budget.val_per_class or 0)
        classes = {"cifar10": 10, "cifar100": 100, "caltech256": 256}[dataset]
        val_size = (budget.val_per_class or 0) * classes or None
        kw = dict(val_size=val_size, seed=0, limit_per_class=per_class, progress=progress)
    else:
        kw = dict(seed=0, progress=progress)
    if dataset == "caltech256":
        if budget.train_per_class is not None:
            raise ValueError("the caltech256 data of the paper is already 50 train / 20 test images per class; "
                             "run it at BUDGET=paper (no CPU budget is defined for 128x128 CNN-2)")
        # the paper's five random splits: seed k trains on split (k - 1) mod 5, in its own order
        trains, vals, counts = {}, {}, None
        for s in seeds:
            info = D.prepare_caltech256(source, folder / f"split{(int(s) - 1) % 5}", split=(int(s) - 1) % 5,
                                        progress=progress)
            trains[int(s)] = _seeded_order(Path(info["train"]), folder / f"train_seed{s}_lmdb", int(s))
            vals[int(s)], counts = info.get("test") or info["val"], info.get("counts")
        return {"val": vals, "train": trains, "counts": counts}
    if dataset == "cifar10":
        from .cli import official_source
        info = D.prepare_cifar10(official_source(source, "cifar10"), folder / "split", **kw)
    elif dataset == "cifar100":
        from .cli import official_source
        info = D.prepare_cifar100(official_source(source, "cifar100"), folder / "split", **kw)
    else:
        raise ValueError(f"unknown dataset {dataset!r}: one of {sorted(DATASETS)}")
    val = info.get("val") or info.get("test")
    trains = {int(s): _seeded_order(Path(info["train"]), folder / f"train_seed{s}_lmdb", int(s)) for s in seeds}
    return {"val": {int(s): val for s in seeds}, "train": trains, "counts": info.get("counts")}


def _seeded_order(src: Path, dst: Path, seed: int) -> str:
    """``dst``: the records of LMDB ``src`` in an order drawn from ``seed`` (written once)."""
    from .data import DatumLMDB, write_datum_lmdb
    done = dst / "order.json"
    if done.is_file() and json.loads(done.read_text()).get("source") == str(src.resolve()):
        return str(dst)
    with DatumLMDB(src) as db:
        images, labels = db.read_all()
    order = np.random.default_rng(seed).permutation(len(labels))
    write_datum_lmdb(dst, images[order], labels[order])
    done.write_text(json.dumps({"source": str(src.resolve()), "seed": seed, "records": int(len(labels))}))
    return str(dst)


# ------------------------------------------------------------------ runs

def variant_paths(dataset: str, method: str) -> tuple[Path, Path]:
    folder = DATASETS[dataset][0]
    name = VARIANT_ALIASES.get((folder, method), method)
    net, solver = PROTO / folder / f"train_val_{name}.prototxt", PROTO / folder / f"solver_{name}.prototxt"
    if not net.is_file():
        raise FileNotFoundError(f"no prototxt for method {method!r} on {dataset}: {net}")
    return net, solver


def set_rate(net_param, rate: float, where: str) -> int:
    """Set the dropout rate of every dropout layer of ``net_param``; returns how many were set."""
    from .pylayer import parse_param_str
    n = 0
    for lp in net_param.layer:
        if lp.type == "Dropout":
            lp.dropout_param.dropout_ratio = rate
            n += 1
        elif lp.type == "Python":
            params = parse_param_str(lp.python_param.param_str, f"{where}: layer '{lp.name}'")
            if "dropout_ratio" in params:
                params["dropout_ratio"] = rate
                lp.python_param.param_str = repr(params)
                n += 1
    return n


def write_run(run: Run, budget: Budget, data: dict, python: str = sys.executable, device: str = "auto",
              backend: str = "engine") -> Run:
    """Write the run folder's net.prototxt and sweep_solver.prototxt; set the run's command."""
    from google.protobuf import text_format
    net_path, solver_path = variant_paths(run.dataset, run.method)
    net = cio.read_net_prototxt(net_path)
    if run.method in RATED:
        if not set_rate(net, run.rate, str(net_path)):
            raise ValueError(f"{net_path}: method {run.method} has no dropout layer whose rate can be set")
    elif run.rate != 0.5:
        raise ValueError(f"method {run.method} has no dropout rate to sweep (rated methods: {', '.join(RATED)})")
    n_train = (data.get("counts") or {}).get("train")
    for lp in net.layer:
        if n_train and lp.type == "Python" and lp.python_param.layer == "InformationDropout" \
                and len(lp.loss_weight) == 2:
            from .variants import information_kl_weight   # beta / N_train of the run's own training set
            lp.loss_weight[1] = information_kl_weight(int(n_train))
        if lp.type != "Data":
            continue
        phases = {r.phase for r in lp.include if r.HasField("phase")}
        lp.data_param.source = str(Path(data["train" if phases == {0} else "val"][run.seed]).resolve())
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "net.prototxt").write_text(
        f"# {run.key}: {net_path.relative_to(ROOT)} with the sweep's data and rate\n"
        + text_format.MessageToString(net))
    sp = cio.read_solver_prototxt(solver_path)
    sp.net = str((run.folder / "net.prototxt").resolve())
    sp.random_seed = run.seed
    for key in ("max_iter", "test_interval", "snapshot", "display"):
        if getattr(budget, key) is not None:
            setattr(sp, key, getattr(budget, key))
    if budget.stepvalue is not None:
        del sp.stepvalue[:]
        sp.stepvalue.append(budget.stepvalue)
    if budget.train_per_class is not None:   # evaluate the whole held-back split
        test_batch = next(lp.data_param.batch_size for lp in net.layer if lp.type == "Data"
                          and any(r.phase == 1 for r in lp.include))
        n_val = sum((data.get("counts") or {}).get("val_per_class") or []) or 0
        if n_val:
            del sp.test_iter[:]
            sp.test_iter.append(math.ceil(n_val / test_batch))
    run.solver = run.folder / "sweep_solver.prototxt"
    run.solver.write_text(f"# {run.key}, budget {budget.name}: {solver_path.relative_to(ROOT)} with the "
                          f"sweep's seed and budget\n" + text_format.MessageToString(sp))
    run.command = [python, "-m", "exdrop", "train", str(run.solver.resolve()), "--out", str(run.folder.resolve()),
                   "--snapshot", "auto", "--quiet", "--device", device, "--backend", backend]
    if budget.amp:
        run.command += ["--amp", budget.amp]
    if budget.keep_snapshots != 1:
        run.command += ["--keep-snapshots", str(budget.keep_snapshots)]
    return run


def plan(out: Path, datasets, methods, rates, seeds, budget: Budget, sources: dict, device="auto",
         backend="engine", progress=True) -> list[Run]:
    """Prepare the data, write every run folder and ``plan.txt`` / ``plan.json``; returns the runs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for dataset in datasets:
        data = prepare_data(dataset, sources.get(dataset) or DATASETS[dataset][1], budget, out / "data", seeds,
                            progress)
        for method in methods:
            for rate in (rates if method in RATED else (0.5,)):
                for seed in seeds:
                    name = method if len(rates) == 1 else f"{method}_r{rate:g}"
                    run = Run(dataset, method, float(rate), int(seed), out / dataset / name / f"seed{seed}")
                    runs.append(write_run(run, budget, data, device=device, backend=backend))
    (out / "plan.txt").write_text("".join(
        f"cd {shlex.quote(str(ROOT))} && {shlex.join(r.command)} > {shlex.quote(str(r.folder / 'stdout.log'))} 2>&1\n"
        for r in runs))
    (out / "plan.json").write_text(json.dumps({
        "budget": dataclasses.asdict(budget), "root": str(ROOT),
        "runs": [{"key": r.key, "dataset": r.dataset, "method": r.method, "rate": r.rate, "seed": r.seed,
                  "folder": str(r.folder), "command": r.command} for r in runs]}, indent=1))
    return runs


def status(run_folder: Path) -> str:
    """``finished``, ``started`` (a snapshot or a log to resume from) or ``new``."""
    res = run_folder / "results.json"
    if res.is_file():
        try:
            r = json.loads(res.read_text())
            if r.get("status") == "finished" and r.get("iterations") == r.get("max_iter"):
                return "finished"
        except (OSError, ValueError):
            pass
    return "started" if any((run_folder / "snapshots").glob("*.solverstate")) else "new"


def execute(runs: list[Run], workers: int = 1, threads: int | None = None, gpus: int | None = None,
            echo=print) -> dict:
    """Run the plan with ``workers`` local processes; finished runs are skipped. On CPU each
    process gets ``threads`` torch threads (default: the cores divided among the workers); with
    GPUs the runs go round-robin over them (several runs share a GPU when workers > GPUs)."""
    import torch
    gpus = torch.cuda.device_count() if gpus is None else gpus
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    todo = [r for r in runs if status(r.folder) != "finished"]
    echo(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run with {workers} "
         f"worker(s)" + (f" on {gpus} GPU(s)" if gpus else f", {threads} thread(s) each"))
    running: list[tuple[subprocess.Popen, Run, float, object]] = []
    failed, slot = [], 0
    queue = list(todo)
    try:
        while queue or running:
            while queue and len(running) < workers:
                run = queue.pop(0)
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                slot += 1
                log = open(run.folder / "stdout.log", "ab")
                echo(f"sweep: start {run.key}" + (" (resuming)" if status(run.folder) == "started" else ""))
                proc = subprocess.Popen(run.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                running.append((proc, run, time.perf_counter(), log))
            time.sleep(0.5)
            for item in list(running):
                proc, run, t0, log = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                took = time.perf_counter() - t0
                if proc.returncode == 0:
                    echo(f"sweep: done  {run.key} in {took:.0f} s")
                else:
                    failed.append(run.key)
                    echo(f"sweep: FAILED {run.key} (exit {proc.returncode}; see {run.folder / 'stdout.log'})")
    except KeyboardInterrupt:
        # Ctrl-C reached the runs too (one process group): each snapshots and stops; wait for that
        echo(f"sweep: interrupted; waiting for {len(running)} run(s) to write their snapshots ...")
        for proc, run, _, log in running:
            try:
                proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        echo("sweep: stopped; the same command again skips the finished runs and resumes the others")
        raise
    return {"runs": len(runs), "ran": len(todo), "failed": failed}


# ------------------------------------------------------------------ results

def _final_test(folder: Path) -> tuple[float | None, float | None, list[tuple[int, float]]]:
    """(final test accuracy, final test loss, the test-accuracy curve) from a run's log.csv."""
    import csv
    log = folder / "log.csv"
    if not log.is_file():
        return None, None, []
    with open(log, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("phase") == "test" and r.get("accuracy") not in (None, "")]
    curve = sorted({int(r["iter"]): float(r["accuracy"]) for r in rows}.items())
    if not rows:
        return None, None, []
    last = max(rows, key=lambda r: int(r["iter"]))
    loss = float(last["loss"]) if last.get("loss") not in (None, "") else None
    return float(last["accuracy"]), loss, curve


def collect(out: Path) -> dict:
    """Every number of the sweep in ``out`` (from plan.json and the run folders)."""
    out = Path(out)
    p = json.loads((out / "plan.json").read_text())
    budget = p["budget"]
    cells: dict = {}
    for r in p["runs"]:
        folder = Path(r["folder"])
        acc, loss, curve = _final_test(folder)
        st = status(folder)
        res = {}
        if (folder / "results.json").is_file():
            res = json.loads((folder / "results.json").read_text())
        key = (r["dataset"], r["method"], r["rate"])
        cells.setdefault(key, []).append({
            "seed": r["seed"], "status": st, "accuracy": acc if st == "finished" else None,
            "last_accuracy": acc, "loss": loss, "curve": curve, "iterations": res.get("iterations"),
            "seconds": res.get("seconds"), "folder": str(folder)})
    summary = []
    for (dataset, method, rate), runs in sorted(cells.items()):
        accs = [x["accuracy"] for x in runs if x["accuracy"] is not None]
        paper = PAPER.get((dataset, rate), {}).get(method)
        summary.append({"dataset": dataset, "method": method, "rate": rate, "seeds": len(accs),
                        "planned_seeds": len(runs),
                        "mean": float(np.mean(accs)) * 100 if accs else None,
                        "std": float(np.std(accs, ddof=1)) * 100 if len(accs) > 1 else None,
                        "paper": paper, "runs": runs})
    return {"budget": budget, "reduced": budget.get("reduced", True), "cells": summary}


def _cell(c: dict) -> str:
    if c is None or c["mean"] is None:
        return "not yet"
    s = f"{c['mean']:.2f}" + (f" +- {c['std']:.2f}" if c["std"] is not None else "")
    s += f" (n={c['seeds']})" if c["seeds"] != c["planned_seeds"] or c["seeds"] == 1 else ""
    return s + (f" [{c['paper']:.2f}]" if c["paper"] is not None else "")


def _budget_line(summary: dict) -> str:
    b = summary["budget"]
    head = "**Reduced budget**" if summary["reduced"] else "**The paper's protocol**"
    return f"{head} (`{b['name']}`): {b['description']}."


def table_markdown(summary: dict, table: str) -> str:
    """Table 2 (methods as columns, datasets as rows) or Table 4 (rates as columns)."""
    cells = {(c["dataset"], c["method"], c["rate"]): c for c in summary["cells"]}
    datasets = sorted({c["dataset"] for c in summary["cells"]}, key=list(DATASETS).index)
    lines = [_budget_line(summary), "",
             "Test accuracy (%), mean +- std over seeds (n = seeds finished), the paper's figure in [brackets]. ",
             ""]
    if table == "2":
        methods = [m for m in METHODS if any(c["method"] == m for c in summary["cells"])]
        lines += ["| Dataset (CNN-2) | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for d in datasets:
            lines.append(f"| {d} | " + " | ".join(_cell(cells.get((d, m, 0.5))) for m in methods) + " |")
    else:
        rates = sorted({c["rate"] for c in summary["cells"]})
        lines += ["| Dataset (CNN-2) | Dropout scheme | " + " | ".join(f"{r:g}" for r in rates) + " |",
                  "|---|---|" + "---|" * len(rates)]
        for d in datasets:
            for m in [m for m in METHODS if any(c["method"] == m and c["dataset"] == d for c in summary["cells"])]:
                lines.append(f"| {d} | {METHOD_LABELS[m]} | " + " | ".join(_cell(cells.get((d, m, r)))
                                                                         for r in rates) + " |")
    return "\n".join(lines) + "\n"


def plot_fig3(summary: dict, dataset: str, path: Path, rate: float = 0.5) -> Path:
    """Fig. 3: test accuracy over iterations, the mean curve and a +-std band per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in summary["cells"]:
        if c["dataset"] != dataset or c["rate"] != rate:
            continue
        curves = [dict(r["curve"]) for r in c["runs"] if r["curve"]]
        if not curves:
            continue
        iters = sorted(set.intersection(*(set(k) for k in curves)))
        if not iters:
            continue
        ys = np.array([[cv[i] for i in iters] for cv in curves]) * 100
        mean, std = ys.mean(0), ys.std(0)
        line, = ax.plot(iters, mean, label=f"{METHOD_LABELS[c['method']]} (n={len(curves)})",
                        lw=2.2 if c["method"] == "ed" else 1.4)
        if len(curves) > 1:
            ax.fill_between(iters, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    b = summary["budget"]
    ax.set_title(f"{dataset}: test accuracy, CNN-2 ({'reduced budget ' if summary['reduced'] else ''}"
                 f"'{b['name']}')", fontsize=10)
    ax.set_xlabel("iteration")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no test results yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(out: Path, table: str) -> list[Path]:
    """table<N>.md, table<N>.json and fig3_<dataset>.png in the sweep folder."""
    out = Path(out)
    summary = collect(out)
    md = out / f"table{table}.md"
    md.write_text(f"# Table {table}: CNN-2, {', '.join(sorted({c['dataset'] for c in summary['cells']}))}\n\n"
                  + table_markdown(summary, table))
    js = out / f"table{table}.json"
    js.write_text(json.dumps(summary, indent=1))
    written = [md, js]
    if table == "2":
        for d in sorted({c["dataset"] for c in summary["cells"]}):
            written.append(plot_fig3(summary, d, out / f"fig3_{d}.png"))
    return written
