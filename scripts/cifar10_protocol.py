#!/usr/bin/env python
"""The paper's CIFAR-10 protocol: CNN-2 with Excitation, Standard and no dropout, side by side.

    scripts/cifar10_protocol.py --data ../shared/data/cifar10-jpg/train.tgz [--max-iter N]
                                [--variants ed,standard,none] [--out models/protocol] [--device cuda]

Converts the data once, then trains each variant's solver (100K iterations by
default, the paper's budget) as concurrent processes on the one device, each
writing its own run folder, and prints a Table 2 style summary. Concurrency
keeps a large GPU busy: one CNN-2 at batch 100 is far too small to fill it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--data-dir", default="data/cifar10")
    ap.add_argument("--variants", default="ed,standard,none")
    ap.add_argument("--max-iter", type=int)
    ap.add_argument("--out", default="models/protocol")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sequential", action="store_true", help="one run after another instead of concurrently")
    ap.add_argument("--extra", default="", help="extra arguments for `exdrop train` (e.g. '--amp bf16')")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from exdrop.data import official_source, prepare_cifar10
    prepare_cifar10(official_source(args.data, "cifar10"), args.data_dir)

    runs, t0 = {}, time.perf_counter()
    for v in args.variants.split(","):
        out = Path(args.out) / v
        cmd = [sys.executable, "-m", "exdrop", "train", f"prototxt/cnn2/cifar10/solver_{v}.prototxt",
               "--out", str(out), "--device", args.device, "--quiet", *args.extra.split()]
        if args.max_iter:
            cmd += ["--max-iter", str(args.max_iter)]
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "stdout.txt", "w")
        runs[v] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), out)
        if args.sequential:
            runs[v][0].wait()
    codes = {v: p.wait() for v, (p, _) in runs.items()}
    wall = time.perf_counter() - t0

    print(f"\nCNN-2 on CIFAR-10, {len(runs)} runs {'one after another' if args.sequential else 'concurrently'}, "
          f"wall {wall:.1f} s")
    print("| variant | iterations | budget | validation accuracy | best | s/iter | device |")
    print("|---|---|---|---|---|---|---|")
    summary = {"wall_s": wall, "runs": {}}
    for v, (_, out) in runs.items():
        res_path = out / "results.json"
        if codes[v] or not res_path.exists():
            print(f"| {v} | failed (exit {codes[v]}, see {out / 'stdout.txt'}) |")
            continue
        r = json.loads(res_path.read_text())
        summary["runs"][v] = r
        acc = r["test_accuracy"]
        best = r["best_test_accuracy"]
        print(f"| {v} | {r['iterations']} | {r['budget']} | {acc:.4f} | {best:.4f} | {r['seconds_per_iter']} | {r['device']} |")
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    return 1 if any(codes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
