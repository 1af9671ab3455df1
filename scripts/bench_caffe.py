#!/usr/bin/env python
"""Seconds per CNN-2 training iteration on CPU: real Caffe (pycaffe) next to the engine.

    scripts/bench_caffe.py [--iters 5] [--warmup 1] [--json PATH] [--sizes 32,128]

One iteration = forward (with the p_EB step for Excitation Dropout), backward and the
solver's update (the paper's Adam solver, prototxt/cnn2/cifar10/solver_ed.prototxt):
``solver.step(1)`` in Caffe, ``exdrop.bench.Variant.step`` in the engine. Variants:

* Standard: Caffe's own ``Dropout`` layer (train_val_standard.prototxt);
* Excitation Dropout: the ``excitation_dropout.ExcitationDropout`` Python layer
  (train_val_ed.prototxt); on the Caffe side with the p_EB provider of
  scripts/train_caffe.py (the head runs with ``net._forward``, EB in numpy/torch).

Sizes: 32x32 with batch 100 and 10 classes (CIFAR-10), and 128x128 with batch 50 and
256 classes (the same prototxt, another input size). Data layers become an Input layer
fed with the same fixed random images on both sides (set before every Caffe step), so
the figure is the network's cost alone. The four variants of a size are timed in
interleaved rounds in one process, so machine load drifts hit them alike.
Prints a markdown table (mean +- std seconds per iteration, ratios from the same run).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from google.protobuf import text_format  # noqa: E402

from exdrop import io as cio  # noqa: E402
from exdrop.bench import Variant, with_input_layer  # noqa: E402
from exdrop.caffe_env import import_caffe  # noqa: E402
from exdrop.pylayer import TRAIN  # noqa: E402

METHODS = {
    "Standard": "prototxt/cnn2/cifar10/train_val_standard.prototxt",
    "Excitation Dropout": "prototxt/cnn2/cifar10/train_val_ed.prototxt",
}
SOLVER = "prototxt/cnn2/cifar10/solver_ed.prototxt"
SIZES = {  # input side -> (batch, classes)
    32: (100, 10),
    128: (50, 256),
}


def load_train_caffe():
    spec = importlib.util.spec_from_file_location("exdrop_train_caffe", ROOT / "scripts" / "train_caffe.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_net(method: str, side: int, batch: int, classes: int, folder: Path) -> Path:
    """The method's CNN-2 for TRAIN with an Input layer (batch, 3, side, side) and ``classes`` outputs."""
    param = with_input_layer(cio.read_net_prototxt(ROOT / METHODS[method]), TRAIN, batch, (3, side, side))
    for lp in param.layer:
        if lp.name == "ip3":
            lp.inner_product_param.num_output = classes
    path = folder / f"{method.split()[0].lower()}_{side}.prototxt"
    path.write_text(text_format.MessageToString(param))
    return path


def write_solver(net_path: Path) -> tuple[object, Path]:
    sp = cio.read_solver_prototxt(ROOT / SOLVER)
    sp.net = str(net_path)
    del sp.test_iter[:]
    sp.test_interval = 0
    sp.display = 0
    sp.snapshot = 0
    sp.snapshot_after_train = False
    sp.solver_mode = 0  # CPU
    path = net_path.with_name(net_path.stem + "_solver.prototxt")
    path.write_text(text_format.MessageToString(sp))
    return sp, path


class CaffeVariant:
    """pycaffe's solver on the same net, fed the same arrays before every step."""

    def __init__(self, caffe, train_caffe, net_path: Path, solver_path: Path, data: np.ndarray, label: np.ndarray):
        caffe.set_random_seed(1)
        self.solver = caffe.get_solver(str(solver_path))
        self.net = self.solver.net
        self.hooked = train_caffe.hook_guided_layers(caffe, self.net, cio.read_net_prototxt(net_path))
        self.data, self.label = data, label

    def step(self):
        self.net.blobs["data"].data[...] = self.data
        self.net.blobs["label"].data[...] = self.label
        self.solver.step(1)


def stats(ts: list[float]) -> dict:
    return {"mean_s": statistics.mean(ts), "std_s": statistics.stdev(ts) if len(ts) > 1 else 0.0,
            "median_s": statistics.median(ts), "times_s": ts}


def bench_size(caffe, train_caffe, side: int, iters: int, warmup: int, folder: Path) -> dict:
    batch, classes = SIZES[side]
    variants = {}
    for method in METHODS:
        net_path = write_net(method, side, batch, classes, folder)
        sp, solver_path = write_solver(net_path)
        eng = Variant(method, str(net_path), sp, batch, (3, side, side), classes, torch.device("cpu"))
        data = eng.feed["data"].numpy().copy()
        label = eng.feed["label"].numpy().astype(np.float32)
        variants[("Caffe", method)] = CaffeVariant(caffe, train_caffe, net_path, solver_path, data, label)
        variants[("engine", method)] = eng
        if method == "Excitation Dropout" and variants[("Caffe", method)].hooked != ["drop"]:
            raise SystemExit(f"{net_path}: the Caffe ED net got no p_EB provider (hooked: "
                             f"{variants[('Caffe', method)].hooked})")
    order = [("Caffe", m) for m in METHODS] + [("engine", m) for m in METHODS]
    for _ in range(warmup):
        for k in order:
            variants[k].step()
    times = {k: [] for k in order}
    for r in range(iters):
        for k in order:
            t = time.perf_counter()
            variants[k].step()
            times[k].append(time.perf_counter() - t)
        print(f"  {side}x{side} round {r + 1}/{iters}: "
              + ", ".join(f"{b} {m.split()[0]} {times[(b, m)][-1]:.2f}s" for b, m in order),
              file=sys.stderr, flush=True)
    losses = {f"{b}/{m}": float(variants[(b, m)].net.blobs["loss"].data) if b == "Caffe"
              else float(variants[(b, m)].net.blobs["loss"].detach()) for b, m in order}
    del variants
    gc.collect()
    rows = {f"{b}/{m}": stats(ts) for (b, m), ts in times.items()}
    mean = {k: v["mean_s"] for k, v in rows.items()}
    ratios = {}
    for m in METHODS:
        ratios[f"engine/Caffe {m}"] = mean[f"engine/{m}"] / mean[f"Caffe/{m}"]
    for b in ("Caffe", "engine"):
        ratios[f"ED/Standard {b}"] = mean[f"{b}/Excitation Dropout"] / mean[f"{b}/Standard"]
    return {"side": side, "batch": batch, "classes": classes, "variants": rows, "ratios": ratios,
            "last_losses": losses}


def markdown(results: list[dict], meta: dict) -> str:
    lines = [f"CNN-2, one training iteration (forward + backward + Adam update) on CPU, "
             f"{meta['iters']} timed rounds after {meta['warmup']} warm-up, interleaved; "
             f"seconds per iteration, mean +- std.",
             f"torch {meta['torch']} ({meta['torch_threads']} threads), Caffe CPU "
             f"(OPENBLAS_NUM_THREADS={meta['openblas_threads']}), {meta['cpus']} CPUs, {meta['machine']}.",
             "",
             "| input | batch | method | Caffe (s/iter) | engine (s/iter) | engine / Caffe |",
             "|---|---:|---|---:|---:|---:|"]
    for res in results:
        for m in METHODS:
            c, e = res["variants"][f"Caffe/{m}"], res["variants"][f"engine/{m}"]
            lines.append(f"| {res['side']}x{res['side']}, {res['classes']} classes | {res['batch']} | {m} | "
                         f"{c['mean_s']:.3f} +- {c['std_s']:.3f} | {e['mean_s']:.3f} +- {e['std_s']:.3f} | "
                         f"{res['ratios'][f'engine/Caffe {m}']:.2f} |")
        lines.append(f"| {res['side']}x{res['side']}, {res['classes']} classes | {res['batch']} | ED / Standard | "
                     f"{res['ratios']['ED/Standard Caffe']:.2f} | {res['ratios']['ED/Standard engine']:.2f} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=5, help="timed rounds (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--sizes", default="32,128", help="input sizes to run, from 32,128 (default both)")
    args = ap.parse_args(argv)
    sides = [int(s) for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sides if s not in SIZES]
    if unknown:
        ap.error(f"unknown size(s) {unknown}; choose from {sorted(SIZES)}")
    if args.iters < 1:
        ap.error("--iters must be at least 1")

    caffe = import_caffe()
    caffe.set_mode_cpu()
    sys.path.insert(0, str(ROOT / "layers"))
    train_caffe = load_train_caffe()
    meta = {"iters": args.iters, "warmup": args.warmup, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
            "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "solver": SOLVER, "methods": METHODS}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_caffe_") as tmp:
        for side in sides:
            results.append(bench_size(caffe, train_caffe, side, args.iters, args.warmup, Path(tmp)))
    table = markdown(results, meta)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
