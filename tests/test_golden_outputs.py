"""What a user reads, whole: the sweep's Tables 2-4 with their paired differences and regime check,
and Fig. 3, each for hand-made runs, against the copies kept in tests/golden/ (tests/golden.py says
how to write them again after a change made on purpose). The other tests check the numbers behind
these outputs; these check that every word, digit, band and colour of the outputs stays put. Also
`exdrop test`'s printed table and its confusion figure, for 3 to 101 classes."""
from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exdrop.analysis import evaluate as E
from exdrop.experiments import sweep as S

sys.path.insert(0, str(Path(__file__).resolve().parent))
import golden  # noqa: E402
from test_sweep import _plan_of  # noqa: E402
from test_mutation_kills_sweep import no_conversion  # noqa: E402,F401 (a fixture)
from test_stream import lmdb  # noqa: E402,F401 (a fixture)

OVERFIT = ([0.90, 0.97, 0.99, 1.0], [(2, 0.55, 1.20), (4, 0.50, 1.40)])   # loss min 1.20 at 2, last 1.40

SWEEPS = {
    "empty": {},   # planned, nothing to show yet
    # every part of the regime check passes over three seeds
    "passes": {("none", 1): OVERFIT, ("none", 2): OVERFIT, ("none", 3): ([0.99], [(2, 0.52, 1.1), (4, 0.51, 1.3)]),
               ("standard_fc1", 1): ([0.8], [(2, 0.52, 1.2), (4, 0.60, 1.1)]),
               ("standard_fc1", 2): ([0.8], [(2, 0.50, 1.2), (4, 0.59, 1.1)]),
               ("standard_fc1", 3): ([0.8], [(2, 0.50, 1.2), (4, 0.595, 1.1)]),
               ("ed", 1): ([0.7], [(2, 0.41, 1.3), (4, 0.58, 1.2)]), ("ed", 3): ([0.7], [(2, 0.47, 1.3), (4, 0.60, 1.2)])},
    # two seeds: Standard ahead on each by more than one seed's noise (10 and 8 points), though the
    # interval of two seeds holds 0: the check passes; bands for two seeds
    "wide": {("none", 1): OVERFIT, ("none", 2): ([0.9, 0.98, 0.99, 0.99], [(2, 0.53, 1.25), (4, 0.51, 1.5)]),
               ("standard_fc1", 1): ([0.8], [(2, 0.52, 1.2), (4, 0.60, 1.1)]),
               ("standard_fc1", 2): ([0.8], [(2, 0.50, 1.2), (4, 0.59, 1.1)]),
               ("ed", 1): ([0.7], [(2, 0.41, 1.3), (4, 0.58, 1.2)]), ("ed", 2): ([0.7], [(2, 0.47, 1.3), (4, 0.60, 1.2)]),
               ("activation", 1): ([0.7], [(2, 0.44, 1.3), (4, 0.57, 1.25)])},
    # No Dropout neither fits nor rises; Standard ahead by less than one seed's noise
    "fails": {("none", 1): ([0.6, 0.7, 0.7], [(2, 0.5, 1.2), (4, 0.5, 1.1)]),
              ("standard_fc1", 1): ([0.8], [(4, 0.51, 1.1)])},
    # no Standard run yet: the check is not decided; one seed of Standard would be an anecdote
    "undecided": {("none", 1): OVERFIT, ("ed", 1): ([0.7], [(2, 0.45, 1.2), (4, 0.55, 1.1)])},
    # one seed each, Standard far enough ahead of No Dropout to pass on one seed
    "one_seed": {("none", 1): OVERFIT, ("standard_fc1", 1): ([0.8], [(2, 0.5, 1.2), (4, 0.56, 1.1)])},
    # no No Dropout run yet: nothing of the check is decided
    "no_none": {("standard_fc1", 1): ([0.8], [(2, 0.5, 1.2), (4, 0.56, 1.1)]),
                ("ed", 1): ([0.7], [(2, 0.45, 1.2), (4, 0.55, 1.1)])},
    # a No Dropout log without a training accuracy row: its fit is unknown, not a number
    "none_without_train_rows": {("none", 1): ([], OVERFIT[1]),
                                ("standard_fc1", 1): ([0.8], [(2, 0.5, 1.2), (4, 0.56, 1.1)])},
}


def _normalised(text: str, tmp_path: Path) -> str:
    return text.replace(str(tmp_path), "<sweep>")


@pytest.mark.parametrize("case", list(SWEEPS))
def test_table2_with_its_paired_differences_regime_check_and_fig3(case, tmp_path, monkeypatch):
    figures = golden.record_saved_figures(monkeypatch)
    _plan_of(tmp_path, SWEEPS[case])
    written = S.write_outputs(tmp_path, "2")
    assert [p.name for p in written] == ["table2.md", "table2.json"] + ["fig3_cifar10.png"] * bool(SWEEPS[case])
    golden.check(f"sweep_{case}_table2.md", _normalised((tmp_path / "table2.md").read_text(), tmp_path))
    assert len(figures) == bool(SWEEPS[case])
    if figures:
        golden.check(f"sweep_{case}_fig3.json", figures[0])
    golden.check(f"sweep_{case}_table2.json", _normalised((tmp_path / "table2.json").read_text(), tmp_path) + "\n")


def _as_net(summary: dict, dataset: str, nets: dict) -> dict:
    """The cells of ``summary`` copied as fine-tuned nets on ``dataset``, their accuracies shifted."""
    out = copy.deepcopy(summary)
    out["cells"] = []
    for net, shift in nets.items():
        for c in summary["cells"]:
            cell = copy.deepcopy(c)
            cell.update(dataset=dataset, net=net, paper=None)
            if cell["mean"] is not None:
                cell["mean"] += shift
                cell["video_mean"], cell["video_std"], cell["video_seeds"] = cell["mean"] + 3, cell["std"], cell["seeds"]
            for r in cell["runs"]:
                r["curve"] = [[it, a + shift / 100] for it, a in r["curve"]]
            out["cells"].append(cell)
    return out


def test_table3_rows_of_fine_tuned_nets_with_video_accuracy_and_their_fig3(tmp_path, monkeypatch):
    _plan_of(tmp_path, SWEEPS["passes"])
    summary = _as_net(S.collect(tmp_path), "ucf101", {"alexnet": -5.0, "vgg16": 2.0})
    golden.check("sweep_table3.md", _normalised(S.table_markdown(summary, "3"), tmp_path))
    figures = golden.record_saved_figures(monkeypatch)
    S.plot_fig3(summary, "ucf101", tmp_path / "fig3_ucf101.png")
    golden.check("sweep_ucf101_fig3.json", figures[0])


def test_table4_rates_as_columns(tmp_path):
    _plan_of(tmp_path, SWEEPS["passes"])
    summary = S.collect(tmp_path)
    for c in list(summary["cells"]):
        if c["method"] in ("ed", "standard_fc1"):
            summary["cells"].append({**copy.deepcopy(c), "rate": 0.25,
                                     "mean": None if c["method"] == "ed" else c["mean"] - 1.5})
    golden.check("sweep_table4.md", _normalised(S.table_markdown(summary, "4"), tmp_path))


# ---------------------------------------------------------------------- exdrop test's report
def _result(k: int, named: bool, video: bool = False) -> dict:
    """A hand-made `exdrop test` result over k classes (the last one without images)."""
    rng = np.random.default_rng(k)
    confusion = rng.integers(0, 6, (k, k)) * (rng.random((k, k)) < 0.3) + np.diag(rng.integers(3, 9, k))
    confusion[-1] = 0
    per_class = confusion.sum(1)
    acc = [None if n == 0 else float(confusion[i, i] / n) for i, n in enumerate(per_class)]
    result = {"net": "prototxt/cnn2/cifar10/train_val_ed.prototxt", "weights": "run/snapshots/cnn2_iter_400.caffemodel",
              "data": "data/cifar10/test_lmdb", "data_split": "the official test split", "images": int(per_class.sum()),
              "iterations": 3, "batch_size": 100, "reading": "each image once", "accuracy": 0.61234, "loss": 1.23456,
              "backend": "engine", "device": "cpu", "num_classes": k, "confusion": confusion.tolist(),
              "classes": [f"class{i}" for i in range(k)] if named else None,
              "per_class_images": per_class.tolist(), "per_class_accuracy": acc}
    if video:
        result.update(video_accuracy=0.7, videos=12, loss=None, data_split=None)
    return result


@pytest.mark.parametrize("k,named", [(3, True), (12, False), (45, True), (101, False)])
def test_report_figure_and_json_of_a_confusion_matrix(k, named, tmp_path, monkeypatch):
    figures = golden.record_saved_figures(monkeypatch)
    result = _result(k, named)
    paths = E.write_report(result, tmp_path / "final_test")
    assert json.loads(paths["json"].read_text()) == result and paths["png"].is_file()
    golden.check(f"test_report_{k}_classes_figure.json", figures[0])


@pytest.mark.parametrize("k,video,rows", [(3, False, 20), (3, True, 20), (12, False, 8), (45, True, 20)])
def test_exdrop_test_table(k, video, rows):
    golden.check(f"test_table_{k}_classes{'_video' if video else ''}_max{rows}.txt",
                 E.format_table(_result(k, k != 12, video), max_rows=rows) + "\n")


# ---------------------------------------------------------------------- the sweep's run folders
RUNS = {
    # (dataset, method, rate, net, recipe, budget, data extras)
    "cifar10_ed_r0.25_authors_cpu-200ep": ("cifar10", "ed", 0.25, "cnn2", "authors", "cpu-200ep",
                                           {"counts": {"train": 2000, "val_per_class": [10] * 10}}),
    "cifar10_information_paper_cpu": ("cifar10", "information", 0.5, "cnn2", "paper", "cpu",
                                      {"counts": {"train": 5000, "val_per_class": [500] * 10}}),
    "cifar10_ed_alive_authors_paper": ("cifar10", "ed_alive", 0.5, "cnn2", "authors", "paper", {}),
    "ucf101_alexnet_curriculum_paper": ("ucf101", "curriculum", 0.5, "alexnet", "paper", "paper",
                                        {"root": "frames/", "evaluate": "data/ucf101/split1"}),
    # a sweep on real Caffe: its final test on the CPU, where pycaffe runs
    "ucf101_alexnet_ed_caffe": ("ucf101", "ed", 0.5, "alexnet", "paper", "paper",
                                {"root": "frames/", "evaluate": "data/ucf101/split1"}, {"backend": "caffe", "device": "auto"}),
}


@pytest.mark.parametrize("name", list(RUNS))
def test_a_sweep_run_folder_and_its_commands(name, tmp_path):
    """The net and solver prototxts a sweep writes for one run, and its training (and final test)
    command: the sweep's data, rate, seed, budget, recipe, KL weight and weights, and nothing else."""
    dataset, method, rate, net, recipe, budget, extra, *how = RUNS[name]
    data = {"train": {2: str(tmp_path / "train_seed2_lmdb")}, "val": {2: str(tmp_path / "val_lmdb")}, **extra}
    weights = str(tmp_path / "bvlc_alexnet.caffemodel") if net != "cnn2" else None
    run = S.Run(dataset, method, rate, 2, tmp_path / "run", net=net, weights=weights, recipe=recipe)
    S.write_run(run, S.BUDGETS[budget], data, python="python3", **{"device": "cpu", **(how[0] if how else {})})
    parts = ["# net.prototxt", (run.folder / "net.prototxt").read_text(),
             "# sweep_solver.prototxt", run.solver.read_text(), "# plan.txt", S._plan_line(run)]
    text = "\n".join(parts).replace(str(tmp_path.resolve()), "<tmp>").replace(str(tmp_path), "<tmp>")
    golden.check(f"sweep_run_{name}.txt", text.replace(str(S.ROOT), "<repo>"))


def test_a_sweep_plan_and_what_a_smaller_plan_keeps(no_conversion, tmp_path):
    """plan.json and plan.txt of a Table 4 style sweep (two rates, a method without a rate, two seeds);
    then a plan of one method, after one run of the first finished: that run is kept in plan.json."""
    out = tmp_path / "sweep"
    budget = S.BUDGETS["cpu-200ep"]
    S.plan(out, ["cifar10"], ["none", "ed"], [0.25, 0.5], [1, 2], budget, {"cifar10": "src"}, device="cpu",
           progress=False, recipe="authors")
    first = (out / "plan.json").read_text(), (out / "plan.txt").read_text()
    (out / "cifar10" / "none_r0.5" / "seed1" / "results.json").write_text(json.dumps({"status": "finished"}))
    S.plan(out, ["cifar10"], ["ed"], [0.5], [1], budget, {"cifar10": "src"}, device="cpu", progress=False,
           recipe="authors")
    second = (out / "plan.json").read_text(), (out / "plan.txt").read_text()
    for name, (js, txt) in (("plan_first", first), ("plan_second", second)):
        text = js + "\n# plan.txt\n" + txt
        text = text.replace(sys.executable, "<python>").replace(str(tmp_path), "<tmp>").replace(str(S.ROOT), "<repo>")
        golden.check(f"sweep_{name}.txt", text)


# ---------------------------------------------------------------------- data layers' batches
SOURCES = {   # name: (layer type, phase, stream, make_source keywords, layer edits)
    "data_train_resident": ("Data", 0, False, {}, {}),
    "data_train_stream": ("Data", 0, True, {}, {}),
    "data_train_auto": ("Data", 0, None, {}, {}),
    "data_test_stream_gray_scaled": ("Data", 1, True, {}, {"force_gray": True, "scale": 0.5}),
    "data_test_resident_color_skip": ("Data", 1, False, {}, {"force_color": True, "rand_skip": 5}),
    "data_train_stream_part_batch6": ("Data", 0, True, {"batch_size": 6, "part": slice(2, 5)}, {}),
    "data_train_resident_part_batch6": ("Data", 0, False, {"batch_size": 6, "part": slice(2, 5)}, {}),
    "list_train_stream_shuffle": ("ImageData", 0, True, {}, {"shuffle": True}),
    "list_train_resident_shuffle": ("ImageData", 0, False, {}, {"shuffle": True}),
    "list_test_stream_gray": ("ImageData", 1, True, {}, {"is_color": False}),   # (no resize: OpenCV's rounding varies)
    "list_test_auto_skip": ("ImageData", 1, None, {}, {"rand_skip": 4}),
    "input_test": ("Input", 1, None, {"batch_size": 4}, {}),
}


@pytest.fixture(scope="module")
def records(lmdb):
    """test_stream's 13 records of 3x9x8 as a Datum LMDB, and as PNG files with a list beside it."""
    import cv2
    path, images, labels = lmdb
    lines = []
    for k, (img, y) in enumerate(zip(images, labels)):
        cv2.imwrite(str(path.parent / f"{k}.png"), img.transpose(1, 2, 0))
        lines.append(f"{k}.png {y}")
    (path.parent / "list.txt").write_text("\n".join(lines) + "\n")
    return path.parent


def _layer(kind: str, folder: Path, edits: dict):
    from exdrop.proto import caffe_pb2
    lp = caffe_pb2.LayerParameter(name="data", type=kind, top=["data", "label"])
    tp = lp.transform_param
    tp.crop_size, tp.mirror = 6, True
    tp.mean_value.extend([10, 20, 30] if not edits.get("force_gray") and edits.get("is_color", True) else [15])
    for key in ("force_gray", "force_color", "scale"):
        if key in edits:
            setattr(tp, key, edits[key])
    if kind == "Data":
        lp.data_param.source, lp.data_param.batch_size = str(folder / "db"), 5
        lp.data_param.backend = caffe_pb2.DataParameter.LMDB
        lp.data_param.rand_skip = edits.get("rand_skip", 0)
    elif kind == "ImageData":
        ip = lp.image_data_param
        ip.source, ip.batch_size, ip.root_folder = str(folder / "list.txt"), 5, str(folder) + "/"
        for key in ("shuffle", "new_height", "new_width", "is_color", "rand_skip"):
            if key in edits:
                setattr(ip, key, edits[key])
    else:
        lp.input_param.shape.add().dim.extend([4, 3, 9, 8])
    return lp


def _batch_record(x, y) -> dict:
    return {"shape": list(x.shape), "dtype": str(x.dtype), "sum": float(x.double().sum()),
            "sum_sq": float((x.double() ** 2).sum()), "first_row": x.flatten(1)[:, :3].tolist(), "labels": y.tolist()}


def _state_record(state: dict) -> dict:
    """A source's saved state as plain data: small tensors listed, a generator's state by digest."""
    import hashlib
    out = {}
    for key, v in sorted(state.items()):
        if isinstance(v, torch.Tensor):
            v = v.tolist() if v.numel() <= 64 and v.dtype != torch.uint8 else \
                {"shape": list(v.shape), "sha256": hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()}
        out[key] = v
    return out


@pytest.mark.parametrize("name", list(SOURCES))
def test_a_data_layers_source_and_its_first_batches(name, records):
    """For each kind of data layer, phase and way of reading: the source's kind and shapes, four
    batches (a digest of the images, the labels), seeded, and the state it saves then; a source of
    another seed given that state goes on with the same two batches."""
    from exdrop.data import make_source
    kind, phase, stream, kw, edits = SOURCES[name]

    def source(seed):
        return make_source(_layer(kind, records, edits), phase, seed=seed, stream=stream,
                           source=str(records / "db") if kind == "Input" else None, **kw)
    src, again = source(11), source(99)
    try:
        batches = [_batch_record(*src.next_batch()) for _ in range(4)]
        state = src.state_dict()
        again.load_state_dict(state)
        after = [_batch_record(*src.next_batch()) for _ in range(2)]
        assert [_batch_record(*again.next_batch()) for _ in range(2)] == after
        got = {"source": type(src).__name__, "top_shapes": [list(s) for s in src.top_shapes()],
               "repr": repr(src).replace(str(records), "<tmp>"), "batches": batches,
               "state": _state_record(state), "after_resume": after}
    finally:
        for s in (src, again):
            if hasattr(s, "close"):
                s.close()
    golden.check(f"source_{name}.json", got)


def test_a_sweep_of_runs_in_every_state_collected(tmp_path):
    """A sweep whose runs are finished, interrupted (a snapshot to resume from), never started,
    stopped short of max_iter, and fine-tuned with or without their final test: collect()'s
    summary and Tables 2 and 3 of it."""
    import dataclasses
    from test_sweep import TINY, _log_run

    def folder(*parts):
        return tmp_path.joinpath(*parts)

    _log_run(folder("cifar10", "ed", "seed1"), [0.7], [(2, 0.41, 1.3), (4, 0.58, 1.2)])
    _log_run(folder("cifar10", "ed", "seed2"), [0.7], [(2, 0.44, 1.3)])
    (folder("cifar10", "ed", "seed2", "results.json")).write_text(json.dumps({"status": "interrupted", "iterations": 2,
                                                                              "max_iter": 4}))
    folder("cifar10", "ed", "seed2", "snapshots").mkdir()
    (folder("cifar10", "ed", "seed2", "snapshots", "s_iter_2.solverstate")).write_bytes(b"")
    _log_run(folder("cifar10", "none", "seed1"), [0.9], [(2, 0.5, 1.2)], max_iter=2)   # finished at 2 of 4
    (folder("cifar10", "none", "seed1", "results.json")).write_text(json.dumps({"status": "finished", "iterations": 2,
                                                                                "max_iter": 4, "seconds": 12.5}))
    for seed, test in ((1, {"weights": "x/alexnet_ed_iter_4.caffemodel", "accuracy": 0.61, "video_accuracy": 0.7,
                            "images": 30, "videos": 6}),
                       (2, {"weights": "x/alexnet_ed_iter_2.caffemodel", "accuracy": 0.5}),   # an older snapshot's
                       (3, None)):
        run = folder("ucf101", "alexnet", "ed", f"seed{seed}")
        _log_run(run, [0.6], [(4, 0.55, 1.4)])
        if test is not None:
            (run / S.FINAL_TEST).mkdir()
            (run / S.FINAL_TEST / "test.json").write_text(json.dumps(test))
    runs = [{"key": f"cifar10/{m}_r0.5/seed{s}", "dataset": "cifar10", "method": m, "rate": 0.5, "seed": s,
             "folder": "/elsewhere", "in_sweep": f"cifar10/{m}/seed{s}", "command": []}
            for m, s in (("ed", 1), ("ed", 2), ("ed", 3), ("none", 1))]
    runs += [{"key": f"ucf101/alexnet/ed_r0.5/seed{s}", "dataset": "ucf101", "net": "alexnet", "method": "ed",
              "rate": 0.5, "seed": s, "folder": "/elsewhere", "in_sweep": f"ucf101/alexnet/ed/seed{s}", "command": [],
              "evaluate": ["exdrop", "test"]} for s in (1, 2, 3)]
    (tmp_path / "plan.json").write_text(json.dumps({"budget": dataclasses.asdict(TINY), "runs": runs}))
    summary = S.collect(tmp_path)
    golden.check("sweep_every_state_collected.json", json.loads(_normalised(json.dumps(summary), tmp_path)))
    cifar, ucf = ({**summary, "cells": [c for c in summary["cells"] if c["dataset"] == d]} for d in ("cifar10", "ucf101"))
    golden.check("sweep_every_state_tables.md", S.table_markdown(cifar, "2") + "\n" + S.table_markdown(ucf, "3"))


# ---------------------------------------------------------------------- a run's log
def test_a_run_log_resumed_at_each_point_it_can_be(tmp_path):
    """log.csv and its summary after a first run (train rows each iteration, tests at 0, 4 and 8 on
    two test nets) and a resume at iteration 4 or 8, retesting there or not, with each display
    interval; then the continued run's rows."""
    from exdrop.run.runlog import RunLog
    out = []
    for resume in (4, 8):
        for retest in (True, False):
            for display in (None, 0, 2, 3):
                folder = tmp_path / f"r{resume}_{retest}_{display}"
                first = RunLog(folder, ["loss", "accuracy"])
                for it in range(9):
                    first.add({"iter": it, "phase": "train", "lr": 0.01, "elapsed_s": it * 0.5, "loss": 2.0 - it / 10})
                    if it % 4 == 0:
                        for net in ("test", "test1"):
                            first.add({"iter": it, "phase": net, "lr": 0.01, "elapsed_s": it * 0.5 + 0.1,
                                       "loss": 1.5 - it / 20, "accuracy": 0.3 + it / 40 + (net == "test1") / 100})
                first.finish({"status": "interrupted"})
                again = RunLog(folder, ["accuracy", "loss"], resume_iter=resume, retest_at_resume=retest, display=display)
                for it in range(resume, resume + 2):
                    again.add({"iter": it, "phase": "train", "lr": 0.001, "elapsed_s": 9.0 + it, "loss": 1.0 / 3})
                again.add({"iter": resume + 1, "phase": "test", "lr": 0.001, "elapsed_s": 20.0, "loss": 0.9,
                           "accuracy": 0.1})
                again.finish({"status": "finished", **again.summary()})
                out += [f"## resume {resume}, retest {retest}, display {display}", (folder / "log.csv").read_text(),
                        (folder / "results.json").read_text(), ""]
    golden.check("run_log_resumes.txt", "\n".join(out))


# ---------------------------------------------------------------------- a sweep's execution
_RECORD = ("import json, os, sys; folder, finish, code = sys.argv[1], sys.argv[2] == '1', int(sys.argv[3]); "
           "open(folder + '/env_' + sys.argv[4] + '.json', 'w').write(json.dumps({k: os.environ.get(k) for k in "
           "('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'CUDA_VISIBLE_DEVICES')})); "
           "finish and open(folder + '/results.json', 'w').write(json.dumps({'status': 'finished', 'iterations': 8, "
           "'max_iter': 8})); "
           "print('stdout of', sys.argv[4]); raise SystemExit(code)")


@pytest.mark.parametrize("gpus", [0, 2])
def test_a_sweep_executes_each_kind_of_run(tmp_path, gpus):
    """What `exdrop sweep` says and gives each process for runs already finished, finished now,
    stopped early (exit 0 before max_iter), failing, resumed from a snapshot, and fine-tuned with
    a final test after training; on the CPU (threads) and over 2 GPUs (round-robin)."""
    def run(name, finish="1", code="0", evaluate=False, state=None):
        folder = tmp_path / name
        folder.mkdir()
        if state == "finished":
            (folder / "results.json").write_text(json.dumps({"status": "finished", "iterations": 8, "max_iter": 8}))
        elif state == "started":
            (folder / "snapshots").mkdir()
            (folder / "snapshots" / "s_iter_4.solverstate").write_bytes(b"")
        r = S.Run("cifar10", name, 0.5, 1, folder, command=[sys.executable, "-c", _RECORD, str(folder), finish, code,
                                                              "train"])
        if evaluate:
            r.evaluate = [sys.executable, "-c", _RECORD, str(folder), "1", "0", "test"]
        return r
    runs = [run("already", state="finished"), run("finishes"), run("tuned", evaluate=True), run("stops", finish="0"),
            run("fails", code="3"), run("resumes", state="started")]   # a final test goes next, before the others
    said = []
    report = S.execute(runs, workers=1, threads=3, gpus=gpus, echo=said.append)
    text = "\n".join(said) + "\n" + json.dumps(report) + "\n"
    for r in runs[1:]:
        for step in ("train", "test"):
            env = r.folder / f"env_{step}.json"
            if env.is_file():
                text += f"{r.folder.name} {step}: {env.read_text()}\n"
        text += f"{r.folder.name} stdout.log: {(r.folder / 'stdout.log').read_text()!r}\n"
    text = re.sub(r" in \d+ s", " in N s", re.sub(r"after \d+ s", "after N s", text)).replace(str(tmp_path), "<tmp>")
    golden.check(f"sweep_execute_gpus{gpus}.txt", text)


# ---------------------------------------------------------------------- pretrained weights
PTH = {   # name: how the torchvision-style state dict differs from CNN-2's own
    "whole": {},
    "nested": {"nest": True},
    "one_linear_of_another_shape": {"reshape": "classifier.1.weight"},
    "first_conv_without_bias": {"drop": "features.0.bias"},
    # 2- and 4-dimensional tensors that are not weights (a weight-norm direction, a table): ignored
    "with_other_tensors": {"extra": {"features.0.weight_v": (2, 3, 3, 3), "classifier.position_table": (4, 8)}},
}


@pytest.mark.parametrize("name", list(PTH))
def test_a_torchvision_state_dict_loaded_into_cnn2(name, tmp_path):
    """load_pretrained of a seeded state dict into CNN-2 (the first convolution converted to the
    prototxt's input convention): its report and a digest of every blob after it."""
    from exdrop.engine.net import Net
    from exdrop.engine.pretrained import input_transform, load_pretrained
    from exdrop.engine.pylayer import TEST
    from exdrop.experiments.bench import with_input_layer
    from exdrop.proto import io as cio
    param = cio.read_net_prototxt(S.ROOT / "prototxt/cnn2/cifar10/train_val_ed.prototxt")
    torch.manual_seed(0)
    net = Net(with_input_layer(param, TEST, 1, (3, 32, 32)), TEST, torch.device("cpu"), "cnn2")
    g = torch.Generator().manual_seed(1)
    state = {}
    for kind, prefix in (("Convolution", "features"), ("InnerProduct", "classifier")):
        for i, layer in enumerate(lp for lp in net.layer_list if lp.type == kind and len(lp.blobs)):
            state[f"{prefix}.{i}.weight"] = torch.randn(tuple(layer.blobs[0].shape), generator=g)
            state[f"{prefix}.{i}.bias"] = torch.randn(tuple(layer.blobs[1].shape), generator=g)
    how = PTH[name]
    if "reshape" in how:
        state[how["reshape"]] = state[how["reshape"]][:, :-1].contiguous()
    if "drop" in how:
        del state[how["drop"]]
    for key, shape in how.get("extra", {}).items():
        state[key] = torch.randn(shape, generator=g)
    pth = tmp_path / f"{name}.pth"
    torch.save({"state_dict": state} if how.get("nest") else state, pth)
    report = load_pretrained(net, pth, input_transform(param))
    blobs = {f"{layer.name}.{i}": [list(b.shape), float(b.detach().double().sum()), float(b.detach().double().abs().sum()),
                                   b.detach().flatten()[:3].tolist()]
             for layer in net.layer_list for i, b in enumerate(layer.blobs)}
    golden.check_close(f"pretrained_cnn2_{name}.json",
                       {"report": json.loads(json.dumps(report, default=str).replace(str(tmp_path), "<tmp>")),
                        "transform": input_transform(param), "blobs": blobs})


def test_ucf101_data_of_a_converted_folder_and_what_is_said_when_a_part_is_missing(tmp_path):
    """prepare_data for UCF101: the data dict and each seed's order of train.txt; then the error for
    a folder missing each part in turn (val_lmdb standing in for test_lmdb)."""
    import shutil
    from test_mutation_kills_sweep import _converted_ucf101
    src = _converted_ucf101(tmp_path / "ucf101_conv")
    info = S.prepare_data("ucf101", str(src), S.BUDGETS["paper"], tmp_path / "data", [1, 2], progress=False)
    out = [json.dumps(info, indent=1, sort_keys=True), " ".join(sorted(p.name for p in (tmp_path / "data" / "ucf101").iterdir()))]
    out += [f"# seed {s}\n" + Path(info["train"][s]).read_text() for s in (1, 2)]
    (src / "test_lmdb").rename(src / "val_lmdb")
    out.append(json.dumps(S.prepare_data("ucf101", str(src), S.BUDGETS["paper"], tmp_path / "data", [3],
                                         progress=False)["val"]))
    for part in ("train.txt", "frames", "val_lmdb", "test_videos.json", "meta.json"):
        broken = tmp_path / f"without_{part}"
        shutil.copytree(src, broken)
        target = broken / part
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        with pytest.raises(FileNotFoundError) as err:
            S.prepare_data("ucf101", str(broken), S.BUDGETS["paper"], tmp_path / "data", [1], progress=False)
        out.append(str(err.value))
    golden.check("sweep_ucf101_data.txt", "\n".join(out).replace(str(tmp_path), "<tmp>") + "\n")
