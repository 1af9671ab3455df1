"""Command line: python -m exdrop {train,data,bench,plot} ... (or the exdrop script).

    exdrop data cifar10 SOURCE [--out data/cifar10]     convert once into Datum LMDBs
    exdrop train SOLVER [--net NET] [--backend engine|caffe] [--data SOURCE] [--max-iter N] [--out DIR]
                        [--device auto|cpu|cuda] [--snapshot X.solverstate [--inexact-resume]]
                        [--weights X.caffemodel] [--display N] [--keep-snapshots K]
    exdrop bench [--iters N] [--batch B] [--device ...]  seconds per iteration, Standard vs ED
    exdrop bench caffe [--sizes 32,128] [--iters N]      real Caffe (CPU) next to the engine
    exdrop plot RUN [RUN ...] [--out PNG]                training curves from each run's log.csv
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


DEFAULT_CIFAR10_ARCHIVE = "data/cifar-10-python.tar.gz"


def _cifar10_source(source: str) -> str:
    """The official archive is fetched (with its checksum) when the default path is missing."""
    path = Path(source)
    if not path.exists() and path.name == "cifar-10-python.tar.gz":
        from .data import download_cifar10
        print(f"{path} not found: downloading the official CIFAR-10 archive (needs a network) ...")
        return str(download_cifar10(path.parent))
    return source


def _converted(data_dir) -> bool:
    """The LMDBs the CIFAR-10 prototxts read are already in ``data_dir``."""
    d = Path(data_dir)
    return all((d / k / "data.mdb").is_file() for k in ("train_lmdb", "val_lmdb"))


def _cmd_data(args) -> int:
    from .data import prepare_cifar10, prepare_image_dataset
    if args.dataset == "cifar10":
        args.source = _cifar10_source(args.source)
        info = prepare_cifar10(args.source, args.out or "data/cifar10", val_size=args.val_size,
                               seed=args.seed, limit_per_class=args.limit_per_class)
    else:
        resize = tuple(int(v) for v in args.resize.split("x")) if args.resize else None
        info = prepare_image_dataset(args.source, args.out, val_size=args.val_size, seed=args.seed, resize=resize)
    print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in info.items()}, indent=2, default=str))
    return 0


def _data_summary(info: dict) -> str:
    counts = info.get("counts") or {}
    parts = [f"{k} {counts[k]}" for k in ("train", "val", "test") if k in counts]
    shape = "x".join(str(v) for v in info.get("shape") or []) or "?"
    return (f"data: {info.get('out_dir')}: {', '.join(parts)} images, {len(info.get('classes') or [])} classes, "
            f"{shape} (details: {info.get('meta')})")


def _prepare_train_data(args) -> None:
    """``--data``: convert into ``--data-dir`` once (one summary line). The default archive path,
    missing, with the LMDBs already converted in ``--data-dir``: use those, offline."""
    from .data import prepare_cifar10
    path = Path(args.data)
    if (not path.exists() and path.name == "cifar-10-python.tar.gz" and _converted(args.data_dir)):
        print(f"data: {path} not found; using the converted LMDBs in {args.data_dir} (train_lmdb, val_lmdb)")
        return
    info = prepare_cifar10(_cifar10_source(args.data), args.data_dir, val_size=args.val_size, seed=0,
                           limit_per_class=args.limit_per_class)
    print(_data_summary(info))


def _check_solver_arg(solver: str) -> None:
    """A net prototxt given where the solver goes: say so, instead of protobuf's
    'SolverParameter has no field named ...'."""
    from .io import read_net_prototxt, read_solver_prototxt
    try:
        read_solver_prototxt(solver)
        return
    except Exception:  # noqa: BLE001 - the trainer reports the original error
        pass
    try:
        net = read_net_prototxt(solver)
    except Exception:  # noqa: BLE001
        return
    if len(net.layer):
        raise ValueError(f"{solver} is a net prototxt, not a solver: give a solver and --net {solver} "
                         f"(e.g. exdrop train prototxt/cnn2/cifar10/solver_ed.prototxt --net {solver})")


def _cmd_train(args) -> int:
    from .train import Trainer, TrainConfig, TrainingDiverged
    _check_solver_arg(args.solver)
    if args.net is not None and not Path(args.net).is_file():
        raise FileNotFoundError(f"--net {args.net}: no such net prototxt")
    if args.data:
        _prepare_train_data(args)
    extra = {}
    if args.keep_snapshots is not None:   # else TrainConfig's default
        extra["keep_snapshots"] = args.keep_snapshots
    cfg = TrainConfig(solver=args.solver, out=args.out, backend=args.backend, max_iter=args.max_iter,
                      device=args.device, resume=args.snapshot, weights=args.weights, test_interval=args.test_interval,
                      test_iter=args.test_iter, display=args.display, snapshot=args.snapshot_every,
                      seed=args.seed, progress=not args.quiet, amp=args.amp, channels_last=args.channels_last,
                      inexact_resume=args.inexact_resume, net=args.net, **extra)
    trainer = Trainer(cfg)
    try:
        res = trainer.run()
    except TrainingDiverged as exc:
        print(f"exdrop: error: {exc}", file=sys.stderr)
        return 2
    acc = res.get("test_accuracy")
    print(f"final: {res['iterations']} iterations in {res['seconds']:.1f} s on {res['device']}; "
          f"test accuracy {acc:.4f}" if acc is not None else f"final: {res['iterations']} iterations")
    print(f"run folder: {trainer.out.resolve()} ({res['budget']})")
    return 0


def _cmd_plot(args) -> int:
    from .plot import plot_run, plot_runs
    if len(args.runs) == 1:
        out = plot_run(args.runs[0])
        if args.out:
            import shutil
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            out = Path(shutil.copyfile(out, args.out))
    else:
        out = plot_runs(args.runs, args.out or "runs.png")
    print(f"wrote {out}")
    return 0


def _cmd_bench(args) -> int:
    from .bench import main as bench_main
    if args.what == "cnn2-cifar10" and args.iters is None:
        args.iters = 20
    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="exdrop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("data", help="convert a dataset into Caffe Datum LMDBs")
    d.add_argument("dataset", choices=["cifar10", "images"],
                   help="cifar10: the official archive or a CIFAR-10 image tree; images: any class/*.jpg tree")
    d.add_argument("source", help="cifar-10-python.tar.gz, an image folder tree, a .tgz of one, or a list file")
    d.add_argument("--out", help="output folder (default data/cifar10)")
    d.add_argument("--val-size", type=int, default=None, help="stratified validation images (default 5000 when no test split)")
    d.add_argument("--seed", type=int, default=0, help="seed of the validation split and of the train shuffle (default 0)")
    d.add_argument("--limit-per-class", type=int, default=None,
                   help="keep at most N images per class (quick experiments)")
    d.add_argument("--resize", help="HxW, e.g. 128x128 (images only)")
    d.set_defaults(fn=_cmd_data)

    t = sub.add_parser("train", help="train from a solver prototxt (like `caffe train`)")
    t.add_argument("solver", help="a solver prototxt, e.g. prototxt/cnn2/cifar10/solver_ed.prototxt")
    t.add_argument("--net", help="a net prototxt that replaces the solver's net: (your own dropout placement)")
    t.add_argument("--backend", choices=["engine", "caffe"], default="engine",
                   help="engine: PyTorch (default); caffe: real pycaffe from `make caffe` (CPU only)")
    t.add_argument("--data", help="CIFAR-10 source to convert into --data-dir first (the missing default archive "
                                  "is downloaded, unless --data-dir already holds converted LMDBs)")
    t.add_argument("--data-dir", default="data/cifar10",
                   help="where the converted LMDBs go (default data/cifar10, the path the prototxts read)")
    t.add_argument("--val-size", type=int, default=None,
                   help="with --data: stratified validation images carved from train (default 5000 when no test split)")
    t.add_argument("--limit-per-class", type=int, default=None,
                   help="with --data: keep at most N images per class")
    t.add_argument("--max-iter", type=int, help="stop after N iterations (default: the solver's max_iter)")
    t.add_argument("--out", help="run folder (log.csv, results.json, snapshots/)")
    t.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda (the caffe backend: CPU only)")
    t.add_argument("--snapshot", help="resume from a .solverstate")
    t.add_argument("--inexact-resume", action="store_true",
                   help="resume even when the snapshot's .engine.pt (RNG and data cursors) is missing or "
                        "unreadable: the data order and random draws then differ from the uninterrupted run")
    t.add_argument("--weights", help="initialise from a .caffemodel")
    t.add_argument("--test-interval", type=int, help="test every N iterations (default: the solver's test_interval)")
    t.add_argument("--test-iter", type=int, help="test batches per test pass (default: the solver's test_iter)")
    t.add_argument("--display", type=int, help="log a training row every N iterations (default: the solver's display)")
    t.add_argument("--snapshot-every", type=int, help="snapshot every N iterations (default: the solver's snapshot)")
    t.add_argument("--keep-snapshots", type=int, metavar="K",
                   help="snapshot sets kept in the run folder: the newest K (0: all; default: the trainer's, 1)")
    t.add_argument("--seed", type=int, help="random seed (default: the solver's random_seed)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--amp", choices=["bf16", "fp16"], help="mixed-precision forward (EB stays float32)")
    t.add_argument("--channels-last", action="store_true", help="NHWC convolutions (GPU)")
    t.set_defaults(fn=_cmd_train)

    b = sub.add_parser("bench", help="seconds per training iteration of the dropout variants, side by side")
    b.add_argument("what", nargs="?", default="cnn2-cifar10", choices=["cnn2-cifar10", "table6", "caffe"],
                   help="cnn2-cifar10: Standard vs Excitation (batch 100); table6: the paper's Table 6 runtimes; "
                        "caffe: real Caffe vs the engine on CPU (CNN-2, needs `make caffe`)")
    b.add_argument("--sizes", default="32,128",
                   help="caffe: input sizes, from 32 (batch 100, 10 classes) and 128 (batch 50, 256 classes)")
    b.add_argument("--nets", default="cnn2,vgg16", help="table6: which nets (cnn2, vgg16)")
    b.add_argument("--iters", type=int, default=None,
                   help="timed iterations (default: 20; table6: 100 on CUDA, few on CPU; caffe: 5)")
    b.add_argument("--warmup", type=int, default=None,
                   help="untimed iterations first (default 2; table6 on CPU and caffe: 1)")
    b.add_argument("--batch", type=int, default=None, help="batch size (default 100; table6: 50; caffe: set by --sizes)")
    b.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    b.add_argument("--json", help="write the figures here too")
    b.add_argument("--per-image-loop", action="store_true",
                   help="table6: add an ED column that runs EB image by image (the authors' numpy loop)")
    b.set_defaults(fn=_cmd_bench)

    pl = sub.add_parser("plot", help="training curves (loss, test accuracy) from run folders' log.csv")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) holding log.csv")
    pl.add_argument("--out", metavar="PNG",
                    help="output image (default: RUN/curves.png for one run, runs.png for several, overlaid)")
    pl.set_defaults(fn=_cmd_plot)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError, OSError, ImportError) as exc:
        print(f"exdrop: error: {exc}", file=sys.stderr)
        return 1
