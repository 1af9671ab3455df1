#!/usr/bin/env python
"""Train a solver prototxt with real Caffe (pycaffe, CPU), the paper's five steps.

    scripts/train_caffe.py SOLVER [--out DIR] [--max-iter N] [--snapshot X.solverstate]

Each iteration is one ``solver.step(1)``: Caffe's forward runs up to the
ExcitationDropout layer, whose forward (1) runs the layers above it to the
logits, (2) computes p_EB there with numpy on the net's blobs (exdrop's EB
rules), (3) masks its blob; then (4) Caffe's forward continues from the
dropout layer on, (5) Caffe's backward and the solver's own update follow.
Writes the same run folder as the engine: log.csv, results.json, snapshots/
(.caffemodel + .solverstate written by Caffe itself).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "layers"))

from google.protobuf import text_format  # noqa: E402

from exdrop import io as cio  # noqa: E402
from exdrop.caffe_eb import CaffeExcitation  # noqa: E402
from exdrop.caffe_env import import_caffe  # noqa: E402
from exdrop.net import filter_layers  # noqa: E402
from exdrop.pylayer import parse_param_str  # noqa: E402
from exdrop.runlog import RunLog, budget, format_row  # noqa: E402
from exdrop.solver import caffe_rate  # noqa: E402


def prepare_solver(args) -> tuple[object, Path, Path]:
    """Copy the solver with the run's overrides into the run folder; returns (param, path, net path)."""
    sp = cio.read_solver_prototxt(args.solver)
    if args.max_iter is not None:
        sp.max_iter = args.max_iter
    for key, value in (("test_interval", args.test_interval), ("display", args.display),
                       ("snapshot", args.snapshot_every)):
        if value is not None:
            setattr(sp, key, value)
    if args.test_iter is not None:
        del sp.test_iter[:]
        sp.test_iter.append(args.test_iter)
    if not sp.HasField("net"):
        raise SystemExit(f"{args.solver}: the Caffe backend needs a solver with `net:`")
    net_path = Path(sp.net)
    if not net_path.exists():
        net_path = Path(args.solver).parent / sp.net
    sp.net = str(net_path.resolve())
    out = Path(args.out)
    (out / "snapshots").mkdir(parents=True, exist_ok=True)
    prefix = Path(sp.snapshot_prefix).name if sp.snapshot_prefix else "snapshot"
    sp.snapshot_prefix = str((out / "snapshots" / prefix).resolve())
    sp.solver_mode = 0  # CPU: the Caffe backend is CPU-only here
    path = out / "solver.prototxt"
    path.write_text(text_format.MessageToString(sp))
    return sp, path, net_path


def hook_guided_layers(caffe, net, net_param) -> list[str]:
    """Give each ExcitationDropout layer of ``net`` a p_EB provider (steps 1-2 of Fig. 1)."""
    walker = CaffeExcitation(net, net_param)
    loss = next((lp for lp in filter_layers(net_param, 0) if lp.type == "SoftmaxWithLoss"), None)
    hooked = []
    for i, layer in enumerate(net.layers):
        name = walker.names[i]
        lp = walker.params.get(name)
        if lp is None or lp.type != "Python" or lp.python_param.layer != "ExcitationDropout":
            continue
        params = parse_param_str(lp.python_param.param_str)
        logits = params.get("logits") or loss.bottom[0]
        label = params.get("label") or loss.bottom[1]
        signal = params.get("signal", "gt")
        end = walker.producer(logits)
        top = lp.top[0]

        def provider(_layer, i=i, end=end, logits=logits, label=label, signal=signal, top=top):
            net._forward(i + 1, end)  # the head, on the unmasked blob
            scores = net.blobs[logits].data
            if signal == "gt":
                classes = net.blobs[label].data.reshape(-1).astype(np.int64)
            elif signal == "pred":
                classes = scores.reshape(scores.shape[0], -1).argmax(1)
            else:
                classes = np.full(scores.shape[0], int(signal), np.int64)
            return walker.excitation(top, logits, classes, stop_after=i)

        layer.provider = provider
        hooked.append(name)
    return hooked


def run(args) -> dict:
    caffe = import_caffe()
    caffe.set_mode_cpu()
    sp, solver_path, net_path = prepare_solver(args)
    if sp.random_seed >= 0:
        caffe.set_random_seed(sp.random_seed)
        np.random.seed(sp.random_seed)
        import torch  # the guided layers draw their masks with torch
        torch.manual_seed(sp.random_seed)
    solver = caffe.get_solver(str(solver_path))
    if args.snapshot:
        solver.restore(args.snapshot)
    net_param = cio.read_net_prototxt(net_path)
    hooked = hook_guided_layers(caffe, solver.net, net_param)
    outputs = list(solver.net.outputs) + [o for t in solver.test_nets for o in t.outputs]
    log = RunLog(Path(args.out), outputs, solver.iter if args.snapshot else None)
    recent, t0 = [], time.perf_counter()
    while solver.iter < sp.max_iter:
        it = solver.iter
        if sp.test_interval and it % sp.test_interval == 0 and (it > 0 or sp.test_initialization):
            test(solver, sp, log, t0)
        solver.step(1)
        recent = (recent + [float(solver.net.blobs["loss"].data)])[-max(1, sp.average_loss):]
        if sp.display and it % sp.display == 0:
            row = {"iter": it, "phase": "train", "lr": _rate(sp, it), "elapsed_s": time.perf_counter() - t0}
            row.update({o: float(np.mean(solver.net.blobs[o].data)) for o in solver.net.outputs})
            row["loss"] = float(np.mean(recent))
            log.add(row)
            print(format_row(row), flush=True)
            if not np.isfinite(row["loss"]):
                raise SystemExit(f"{args.solver}: loss is {row['loss']} at iteration {it}")
    if sp.snapshot_after_train and (not sp.snapshot or solver.iter % sp.snapshot):
        solver.snapshot()
    if solver.test_nets:
        test(solver, sp, log, t0)
    elapsed = time.perf_counter() - t0
    res = {"status": "finished", "backend": "caffe", "solver": args.solver, "net": str(net_path),
           "iterations": solver.iter, "max_iter": sp.max_iter,
           "budget": budget(sp.max_iter, cio.read_solver_prototxt(args.solver).max_iter)}
    res.update(log.summary())
    res.update({"seconds": round(elapsed, 2), "seconds_per_iter": round(elapsed / max(1, solver.iter), 4),
                "device": "cpu (Caffe)", "guided_layers": hooked,
                "snapshot": f"{sp.snapshot_prefix}_iter_{solver.iter}.caffemodel"})
    log.finish(res)
    acc = res["test_accuracy"]
    print(f"final: {solver.iter} iterations with Caffe in {elapsed:.1f} s; "
          + (f"test accuracy {acc:.4f}" if acc is not None else "no test net"))
    return res


def test(solver, sp, log, t0) -> None:
    for k, tn in enumerate(solver.test_nets):
        tn.share_with(solver.net)  # Caffe's Solver::Test does this first; else the test net keeps its fillers
        n = sp.test_iter[min(k, len(sp.test_iter) - 1)]
        sums = {}
        for _ in range(n):
            tn.forward()
            for o in tn.outputs:
                sums[o] = sums.get(o, 0.0) + float(np.mean(tn.blobs[o].data))
        row = {"iter": solver.iter, "phase": "test" if len(solver.test_nets) == 1 else f"test{k}",
               "lr": _rate(sp, solver.iter), "elapsed_s": time.perf_counter() - t0}
        row.update({o: v / n for o, v in sums.items()})
        log.add(row)
        print(format_row(row), flush=True)


def _rate(sp, it: int) -> float:
    """Caffe's learning rate at ``it`` (for the log; Caffe's solver applies its own)."""
    return caffe_rate(sp, it, sum(1 for v in sp.stepvalue if it >= v))[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("solver")
    ap.add_argument("--out", default="models/caffe_run")
    ap.add_argument("--max-iter", type=int)
    ap.add_argument("--snapshot", help="resume from a .solverstate")
    ap.add_argument("--test-interval", type=int)
    ap.add_argument("--test-iter", type=int)
    ap.add_argument("--display", type=int)
    ap.add_argument("--snapshot-every", type=int)
    ap.add_argument("--device", default="cpu", help="ignored: Caffe runs on CPU here")
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
