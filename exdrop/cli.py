"""Command line: python -m exdrop {data,train,test,bench,plot,sweep,analyze,report,saliency} ...
(or the exdrop script); `exdrop COMMAND --help` lists every option.

    exdrop data [--dataset] cifar10|cifar100|caltech256|images SOURCE [--out DIR] [--split 0..4]
                                                         convert once into Datum LMDBs
    exdrop data imagenet TRAIN_DIR --val VAL_DIR [--val-labels FILE] [--out data/ilsvrc12]
                                                         ILSVRC-2012: list files and LMDBs (Sec. 5)
    exdrop data ucf101 UCF-101 --splits LISTS [--split 1..3] [--every N]   UCF101 frames, lists, LMDBs
    exdrop train SOLVER [--net NET] [--backend engine|caffe] [--data SOURCE] [--max-iter N] [--out DIR]
                        [--device auto|cpu|cuda] [--snapshot X.solverstate [--inexact-resume]]
                        [--weights X.caffemodel] [--display N] [--keep-snapshots K]
    exdrop test SOLVER_OR_NET --weights X.caffemodel [--data DATA] [--iterations N] [--out DIR]
                [--device cpu|cuda] [--backend engine|caffe]   evaluate a snapshot (like `caffe test`)
    exdrop bench [cnn2-cifar10|table6|caffe|precision|utilization] [--iters N] [--device ...]
                                                         seconds per iteration, side by side (Table 6)
    exdrop plot RUN [RUN ...] [--out PNG] [--utilization] [--fig2 PNG]   curves from each run's log.csv
    exdrop sweep [--table 2|3|4] [--datasets cifar10,...] [--nets alexnet,...] [--weights NET=FILE]
                 [--budget paper|cpu|cpu-full|cpu-200ep] [--recipe paper|authors] [--seeds N] [--workers N]
                                                         the paper's comparisons, resumable
    exdrop analyze RUN_OR_SWEEP [--data DATA] [--blob B] [--methods ...] [--no-over-training]
                                                         utilization (Table 5, Figs. 4-5), compression
                                                         (Fig. 7), calibration
    exdrop report SWEEP_OR_RUN [--out DIR]               one HTML page + Markdown of a sweep's or a run's analysis
    exdrop saliency RUN [RUN ...] --images 0,1 [--blob conv3] [--k 0,100,...]   Fig. 6
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


DEFAULT_CIFAR10_ARCHIVE = "data/cifar-10-python.tar.gz"


def _converted(data_dir) -> bool:
    """The LMDBs the CIFAR-10 prototxts read are already in ``data_dir``."""
    d = Path(data_dir)
    return all((d / k / "data.mdb").is_file() for k in ("train_lmdb", "val_lmdb"))


def _cmd_data(args) -> int:
    from exdrop.data import official_source, prepare_caltech256, prepare_cifar10, prepare_cifar100, prepare_image_dataset
    if args.dataset and args.dataset_opt and args.dataset != args.dataset_opt:
        raise ValueError(f"two datasets given: {args.dataset} and --dataset {args.dataset_opt}")
    dataset = args.dataset or args.dataset_opt or "cifar10"
    short_side = None
    if dataset == "imagenet" and args.resize and args.resize.isdigit():
        short_side = int(args.resize)   # S: the short side S, then the centre S x S
    resize = None
    if args.resize and dataset != "ucf101" and short_side is None:
        try:
            resize = tuple(int(v) for v in args.resize.lower().split("x"))
        except ValueError:
            resize = ()
        if len(resize) != 2 or min(resize) < 1:
            raise ValueError(f"--resize {args.resize}: expected HxW, e.g. 128x128")
    if dataset == "ucf101" and args.resize is not None and not (args.resize.isdigit() and int(args.resize) > 0):
        raise ValueError(f"--resize {args.resize}: for ucf101 the short side of the frames, a positive integer "
                         "(default 256)")
    if dataset == "imagenet" and short_side is not None and short_side < 1:
        raise ValueError(f"--resize {args.resize}: the short side must be positive")
    if args.split is not None and dataset not in ("caltech256", "ucf101"):
        raise ValueError(f"--split picks one of Caltech-256's five or UCF101's three splits; {dataset} has its own")
    if (args.splits or args.every) and dataset != "ucf101":
        raise ValueError("--splits and --every are for ucf101")
    given = [o for o, v in (("--val", args.val), ("--val-labels", args.val_labels), ("--meta", args.meta),
                            ("--lists-only", args.lists_only)) if v]
    if given and dataset != "imagenet":
        raise ValueError(f"{', '.join(given)}: for imagenet")
    if dataset == "imagenet":
        from exdrop.data.imagenet import prepare_imagenet
        if args.val_size is not None:
            raise ValueError("--val-size: not for imagenet, whose validation images are ILSVRC-2012's val "
                             "folder (--val)")
        if not args.val:
            raise ValueError("imagenet: give --val, the ILSVRC-2012 val folder (flat with --val-labels, or sorted "
                             "into wnid folders)")
        info = prepare_imagenet(args.source, args.val, args.out or "data/ilsvrc12", val_labels=args.val_labels,
                                meta=args.meta, resize=resize, short_side=short_side, lmdb=not args.lists_only,
                                limit_per_class=args.limit_per_class, seed=args.seed or 0)
    elif dataset == "ucf101":
        from exdrop.data.ucf101 import prepare_ucf101
        if not args.splits:
            raise ValueError("ucf101: give --splits, the folder of classInd.txt and trainlist0N.txt / testlist0N.txt")
        info = prepare_ucf101(args.source, args.splits, args.out or "data/ucf101", split=args.split or 1,
                              every=5 if args.every is None else args.every,
                              short_side=int(args.resize) if args.resize else 256)
    elif dataset == "caltech256":
        given = [o for o, v in (("--val-size", args.val_size), ("--seed", args.seed),
                                ("--limit-per-class", args.limit_per_class)) if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: not for caltech256, whose splits are fixed "
                             "(50 train + 20 test images per class; --split 0..4 picks one)")
        if resize and resize[0] != resize[1]:
            raise ValueError(f"--resize {args.resize}: Caltech-256 images are square (SxS, default 128x128)")
        info = prepare_caltech256(args.source, args.out or "data/caltech256", split=args.split or 0,
                                  size=resize[0] if resize else 128)
    elif dataset in ("cifar10", "cifar100"):
        if resize:
            raise ValueError(f"--resize: {dataset} images stay 32x32")
        source = official_source(args.source, dataset)
        prepare = prepare_cifar10 if dataset == "cifar10" else prepare_cifar100
        info = prepare(source, args.out or f"data/{dataset}", val_size=args.val_size,
                       seed=args.seed or 0, limit_per_class=args.limit_per_class)
    else:
        if not args.out:
            raise ValueError("--out: an output folder is needed for an image dataset")
        info = prepare_image_dataset(args.source, args.out, val_size=args.val_size, seed=args.seed or 0,
                                     resize=resize, limit_per_class=args.limit_per_class)
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
    from exdrop.data import official_source, prepare_cifar10
    path = Path(args.data)
    if (not path.exists() and path.name == "cifar-10-python.tar.gz" and _converted(args.data_dir)):
        print(f"data: {path} not found; using the converted LMDBs in {args.data_dir} (train_lmdb, val_lmdb)")
        return
    info = prepare_cifar10(official_source(args.data, "cifar10"), args.data_dir, val_size=args.val_size, seed=0,
                           limit_per_class=args.limit_per_class)
    print(_data_summary(info))


def _check_solver_arg(solver: str) -> None:
    """A net prototxt given where the solver goes: say so, instead of protobuf's
    'SolverParameter has no field named ...'."""
    from exdrop.proto.io import read_net_prototxt, read_solver_prototxt
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
    from exdrop.run.train import Trainer, TrainConfig, TrainingDiverged
    _check_solver_arg(args.solver)
    if args.net is not None and not Path(args.net).is_file():
        raise FileNotFoundError(f"--net {args.net}: no such net prototxt")
    fresh = args.snapshot is None   # not --snapshot auto, which may start fresh in a folder without snapshots
    if args.snapshot == "auto":
        args.snapshot = _auto_resume(args)
        if args.snapshot == "finished":
            return 0
    from exdrop.engine import distributed as dist
    world = dist.world_from_env()
    if args.data:
        if world.active:   # rank 0 converts, the others wait for it
            from exdrop.run.train import pick_device
            dist.init(world, pick_device(args.device, world))
            if world.main:
                _prepare_train_data(args)
            dist.barrier(world)
        else:
            _prepare_train_data(args)
    extra = {}
    if args.keep_snapshots is not None:   # else TrainConfig's default
        extra["keep_snapshots"] = args.keep_snapshots
    if args.utilization is not None:
        extra["utilization"] = None if args.utilization in ("", "off") else args.utilization
    if args.utilization_images is not None:
        extra["utilization_images"] = args.utilization_images
    if args.tensorboard:
        extra["tensorboard"] = args.tensorboard
    cfg = TrainConfig(solver=args.solver, out=args.out, backend=args.backend, max_iter=args.max_iter,
                      device=args.device, resume=args.snapshot, weights=args.weights, test_interval=args.test_interval,
                      test_iter=args.test_iter, display=args.display, snapshot=args.snapshot_every,
                      seed=args.seed, progress=not args.quiet, amp=args.amp, channels_last=args.channels_last,
                      inexact_resume=args.inexact_resume, net=args.net, command=_train_arguments(args),
                      dense_short_runs=True, keep_init=args.keep_init, **extra)
    if fresh and world.main:
        _fresh_run_folder(cfg, args.overwrite)
    trainer = Trainer(cfg)
    try:
        res = trainer.run()
    except TrainingDiverged as exc:
        if world.main:
            print(f"exdrop: error: {exc}", file=sys.stderr)
        return 2
    finally:
        dist.close(world)
    if not world.main:
        return 0
    acc = res.get("test_accuracy")
    print(f"final: {res['iterations']} iterations in {res['seconds']:.1f} s on {res['device']}; "
          f"test accuracy {acc:.4f}" if acc is not None else f"final: {res['iterations']} iterations")
    print(f"run folder: {trainer.out.resolve()} ({res['budget']})")
    return 0


def _train_arguments(args) -> tuple[str, ...]:
    """This run's ``exdrop train`` arguments as given, less ``--snapshot`` and ``--overwrite``: the resume
    line repeats them, so a resumed run keeps its own display, test interval, precision and data."""
    given = list(getattr(args, "argv", None) or [])
    given = given[given.index("train") + 1:] if "train" in given else []
    out, skip = [], False
    for a in given:
        if skip:
            skip = False
        elif a == "--snapshot":
            skip = True
        elif not (a.startswith("--snapshot=") or a == "--overwrite"):
            out.append(a)
    return tuple(out)


RUN_RECORDS = ("log.csv", "results.json", "curves.png", "init.json", "init.caffemodel", "snapshots")


def _fresh_run_folder(cfg, overwrite: bool) -> None:
    """A fresh run (no --snapshot) into a folder that holds a run is refused: it would rewrite that
    run's log.csv and results.json and prune its snapshots. ``--overwrite`` deletes them first."""
    import shutil

    from exdrop.run.train import prepare_solver
    out = prepare_solver(cfg, write=False)[1]
    snapshots = out / "snapshots"
    held = [name for name in RUN_RECORDS[:-1] if (out / name).exists()] + \
        (["snapshots/"] if snapshots.is_dir() and any(snapshots.iterdir()) else [])
    if not held:
        return
    if not overwrite:
        raise ValueError(f"{out} holds a run ({', '.join(held)}): continue it with --snapshot auto (make: "
                         f"RESUME=<its .solverstate>), or start over with --overwrite (deletes it) or another --out")
    for name in RUN_RECORDS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _auto_resume(args) -> str | None:
    """``--snapshot auto``: the newest .solverstate in ``--out``/snapshots, None for a fresh start, or
    "finished" when the run folder's results.json says the run already reached its max_iter."""
    if not args.out:
        raise ValueError("--snapshot auto needs --out (the run folder to resume)")
    from exdrop.proto.io import read_solver_prototxt
    from exdrop.experiments.sweep import status
    out = Path(args.out)
    if status(out) == "finished":
        done = json.loads((out / "results.json").read_text()).get("iterations") or 0
        if not isinstance(done, int):
            raise ValueError(f"{out / 'results.json'}: 'iterations' is {done!r}, not a number of iterations")
        want = args.max_iter or read_solver_prototxt(args.solver).max_iter
        if done >= want:
            print(f"{out}: finished already (results.json); nothing to do")
            return "finished"   # else the run goes on from its last snapshot to the longer max_iter
    states = []
    for path in (out / "snapshots").glob("*_iter_*.solverstate"):
        it = path.name[:-len(".solverstate")].rsplit("_iter_", 1)[1]
        if it.isdigit():
            states.append((int(it), path))
    if not states:
        return None
    newest = max(states)[1]
    print(f"{out}: resuming from {newest.name}")
    return str(newest)


def _seed_list(text: str) -> list[int]:
    """``--seeds``: N (seeds 1..N), a list 2,3 or a range 2-5."""
    try:
        if "," in text:
            seeds = [int(v) for v in text.split(",") if v]
        elif "-" in text:
            lo, hi = (int(v) for v in text.split("-", 1))
            seeds = list(range(lo, hi + 1))
        else:
            seeds = list(range(1, int(text) + 1))
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds {text}: give N (seeds 1..N), a list like 2,3 or a range like 2-5")
    return seeds


def _cmd_sweep(args) -> int:
    from exdrop.experiments import sweep as S
    budget = S.BUDGETS[args.budget]
    import dataclasses
    if args.amp is not None and (args.amp or None) != budget.amp:
        # another precision is another protocol: its own budget name, so its runs get their own sweep folder
        # and are never pooled with (or taken for finished runs of) the budget's own
        bf16 = ", bf16 autocast of the training forward"
        budget = dataclasses.replace(budget, amp=args.amp or None, name=f"{budget.name}-{args.amp or 'fp32'}",
                                     description=budget.description.replace(bf16, "")
                                     + (bf16 if args.amp else ", float32"))
    if args.max_iter is not None:
        budget = dataclasses.replace(budget, name=f"{budget.name}-{args.max_iter}it", max_iter=args.max_iter,
                                     reduced=True, description=f"{budget.description}; stopped at "
                                                               f"{args.max_iter} iterations")
    datasets = [d for d in (args.datasets or S.TABLE_DATASETS[args.table]).split(",") if d]
    for d in datasets:
        if d not in S.DATASETS:
            raise ValueError(f"--datasets: unknown dataset {d!r} (known: {', '.join(S.DATASETS)})")
    if args.table == "3" and datasets != ["ucf101"]:
        raise ValueError(f"--datasets {','.join(datasets)}: Table 3 is the nets fine-tuned on ucf101")
    nets = [n for n in args.nets.split(",") if n] if args.nets else None
    for n in nets or []:
        if n not in S.NETS:
            raise ValueError(f"--nets: unknown net {n!r} (known: {', '.join(S.NETS)})")
    weights = {}
    for item in ",".join(args.weights or []).split(","):
        name, _, path = item.partition("=")
        if item and (not path or S.NETS.get(name) is None):
            raise ValueError(f"--weights {item}: write NET=FILE with NET one of "
                             f"{', '.join(n for n, zoo in S.NETS.items() if zoo)}")
        if item:
            weights[name] = path
    methods = args.methods.split(",") if args.methods else list(S.TABLE_METHODS[args.table])
    for m in methods:
        if m not in S.METHODS:
            raise ValueError(f"--methods: unknown method {m!r} (known: {', '.join(S.METHODS)})")
    rates = args.rates or list(S.TABLE_RATES[args.table])
    seeds = _seed_list(args.seeds)
    sources = {}
    for item in args.data or []:
        name, _, path = item.partition("=")
        if not path or name not in S.DATASETS:
            raise ValueError(f"--data {item}: write DATASET=PATH with DATASET one of {', '.join(S.DATASETS)}")
        sources[name] = path
    recipe = "" if args.recipe == "paper" else f"_{args.recipe}"
    out = Path(args.out or f"results/table{args.table}_{'_'.join(datasets)}_{budget.name}{recipe}")
    runs = S.plan(out, datasets, methods, rates, seeds, budget, sources, device=args.device, backend=args.backend,
                  nets=nets, weights=weights, recipe=args.recipe)
    print(f"sweep: {len(runs)} runs planned in {out} (plan.txt: one command per run)")
    from exdrop.engine.backend import pick_device
    if budget.amp and args.backend == "engine" and pick_device(args.device).type == "cpu":
        from exdrop.engine.step import slow_cpu_autocast_warning
        slow = slow_cpu_autocast_warning(budget.amp)
        if slow:
            print(f"sweep: warning: {slow}", file=sys.stderr, flush=True)
    if not args.plan_only:
        try:
            report = S.execute(runs, workers=args.workers, threads=args.threads)
        except KeyboardInterrupt:
            return 130
        if report["failed"]:
            print(f"sweep: {len(report['failed'])} run(s) failed: {', '.join(report['failed'])}", file=sys.stderr)
    written = S.write_outputs(out, args.table)
    for path in written:
        print(f"wrote {path}")
    print((out / f"table{args.table}.md").read_text())
    return 0 if args.plan_only or not report["failed"] else 1


def _cmd_test(args) -> int:
    """``exdrop test``: a raw CIFAR-10 ``--data`` source is converted into ``--data-dir`` first, as
    ``exdrop train --data`` does; a converted folder or LMDB is read as it is."""
    from exdrop.analysis.evaluate import default_out, evaluate, format_table, is_converted, write_report
    data = args.data
    if data and not is_converted(data) and (Path(data).exists() or Path(data).name == "cifar-10-python.tar.gz"):
        try:
            _prepare_train_data(args)
        except ValueError as exc:
            raise ValueError(f"--data {data}: {exc}; `exdrop test --data` converts CIFAR-10 sources, other "
                             "datasets once with `exdrop data DATASET SOURCE --out DIR`, then --data DIR") from None
        data = args.data_dir
    res = evaluate(args.net, args.weights, data=data, iterations=args.iterations, device=args.device,
                   backend=args.backend, progress=not args.quiet)
    paths = write_report(res, args.out or default_out(args.weights))
    print(format_table(res))
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


def _cmd_analyze(args) -> int:
    from exdrop.analysis import analyze as A
    from exdrop.analysis import report as R
    path = Path(args.path)
    common = dict(data=args.data, blob=args.blob, over_training=not args.no_over_training,
                  training_images=args.training_images, device=args.device, force=args.force)
    if (path / "plan.json").is_file():
        methods = args.methods.split(",") if args.methods else list(R.TABLE5_METHODS)
        summary = R.analyze_sweep(path, methods, **common)
        for p in R.write_analysis_outputs(summary, args.out or path):
            print(f"wrote {p}")
        print(R.table5_markdown(summary))
        print(R.calibration_markdown(summary))
        return 0
    res = A.analyze_run(path, delta=args.delta, progress=not args.quiet, **common)
    f = res["final"]
    print(f"{path} iteration {res['iteration']}, blob '{f['blob']}' ({f['units']} units), {f['images']} images:")
    for key in (*A.METRICS, "conservative", "accuracy", "nll", "ece"):
        if f.get(key) is not None:
            print(f"  {A.METRIC_TITLES.get(key, key):24s} {f[key]:.4f}")
    if f.get("conservative_note"):
        print(f"  ({f['conservative_note']})")
    print(f"wrote {path / A.ANALYSIS / 'analysis.json'}")
    page, _ = R.write_run_report(path, args.out or path)
    print(f"wrote {page} (Table 5 row, Fig. 7, calibration, curves)")
    return 0


def _cmd_report(args) -> int:
    from exdrop.analysis.report import write_report
    images = [int(i) for i in args.saliency_images.split(",") if i.strip()]
    page, md = write_report(args.sweep, args.out, saliency=args.saliency, saliency_images=images,
                            device=args.device)
    print(f"wrote {page} and {md}")
    return 0


def _cmd_saliency(args) -> int:
    from exdrop.analysis.saliency import figure
    ks = args.k
    images = args.images
    out = figure(args.runs, images, ks, blob=args.blob, data=args.data, contrastive=args.contrastive,
                 out=args.out, device=args.device)
    print(f"wrote {out}")
    return 0


def _cmd_plot(args) -> int:
    from exdrop.run.plot import plot_run, plot_runs
    if args.fig2:
        from exdrop.analysis.report import plot_fig2
        print(f"wrote {plot_fig2(args.fig2, args.n, args.base_retain)}")
        if not args.runs:
            return 0
    if not args.runs:
        raise ValueError("give run folder(s), or --fig2 PNG")
    if args.utilization:
        from exdrop.analysis.report import plot_logged_utilization
        print(f"wrote {plot_logged_utilization(args.runs, args.out or 'utilization.png')}")
        return 0
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
    from exdrop.experiments.bench import main as bench_main
    if args.what == "cnn2-cifar10" and args.iters is None:
        args.iters = 20
    return bench_main(args)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def _number_list(text: str, kind, example: str, ok, rule: str) -> list:
    """A comma-separated list of ``kind`` values, each passing ``ok``, else an argparse error saying ``rule``."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise argparse.ArgumentTypeError(f"{text!r}: expected {noun} separated by commas, e.g. {example}") from None
    if not values or not all(ok(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: {rule}")
    return values


def _rate_list(text: str) -> list[float]:
    """``--rates 0.25,0.5``: dropout rates (the probability of dropping), each strictly between 0 and 1."""
    return _number_list(text, float, "0.25,0.5", lambda v: 0.0 < v < 1.0,
                        "a dropout rate is strictly between 0 and 1 (No Dropout is the method none)")


def _index_list(text: str) -> list[int]:
    """``0,7,100``: indices or counts, each an integer >= 0."""
    return _number_list(text, int, "0,7", lambda v: v >= 0, "each value must be an integer >= 0")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="exdrop", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("data", help="convert a dataset into Caffe Datum LMDBs")
    datasets = ["cifar10", "cifar100", "caltech256", "ucf101", "imagenet", "images"]
    d.add_argument("dataset", nargs="?", choices=datasets,
                   help="cifar10 (default), cifar100: the official archive or an image tree of the 10 / 100 "
                        "classes; caltech256: 256_ObjectCategories (folder or .tar); imagenet: ILSVRC-2012 "
                        "(with --val); images: any class/*.jpg tree")
    d.add_argument("source", help="cifar-10-python.tar.gz, cifar-100-python.tar.gz (a missing one is downloaded), "
                                  "256_ObjectCategories(.tar), ILSVRC-2012's train folder of wnid folders, an image "
                                  "folder tree, a .tgz of one, or a list file")
    d.add_argument("--dataset", dest="dataset_opt", choices=datasets, help="the dataset, as the first argument does")
    d.add_argument("--out", help="output folder (default data/cifar10, data/cifar100, data/caltech256, "
                                 "data/ilsvrc12: the prototxts' paths)")
    d.add_argument("--split", type=int, help="caltech256: which of the paper's five random splits of 50 train + "
                                             "20 test images per class, 0..4 (default 0); ucf101: the official "
                                             "split 1..3 (default 1)")
    d.add_argument("--splits", help="ucf101: the folder of the official lists (classInd.txt, trainlist0N.txt, "
                                    "testlist0N.txt)")
    d.add_argument("--every", type=_positive_int, help="ucf101: keep every N-th frame of each video (default 5)")
    d.add_argument("--val", help="imagenet: the ILSVRC-2012 val folder, flat (ILSVRC2012_val_00000001.JPEG ..., "
                                 "labelled by --val-labels) or sorted into the train set's wnid folders")
    d.add_argument("--val-labels", help="imagenet: the devkit's ILSVRC2012_validation_ground_truth.txt (its meta.mat "
                                        "beside it), Caffe's val.txt (synsets.txt beside it) or LOC_val_solution.csv")
    d.add_argument("--meta", help="imagenet: the devkit's meta.mat or Caffe's synsets.txt, when it is not beside "
                                  "--val-labels")
    d.add_argument("--lists-only", action="store_true",
                   help="imagenet: write only the list files train.txt, val.txt (Caffe's ImageData format, paths "
                        "relative to the train / val folder) and synsets.txt, no LMDBs")
    d.add_argument("--val-size", type=int, default=None, help="stratified validation images (default 5000 when no test split)")
    d.add_argument("--seed", type=int, default=None, help="seed of the validation split and of the train shuffle (default 0)")
    d.add_argument("--limit-per-class", type=int, default=None,
                   help="keep at most N images per class (quick experiments)")
    d.add_argument("--resize", help="HxW, e.g. 128x128 (images; caltech256: SxS, default 128x128; ucf101: the "
                                    "frames' short side, default 256; imagenet: HxW, default 256x256, or S: the "
                                    "short side S, then the centre SxS)")
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
    t.add_argument("--snapshot", help="resume from a .solverstate; 'auto': from the newest one in --out "
                                      "(a fresh start if none; nothing to do if the run finished)")
    t.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an --out that holds a run (its log.csv, results.json, curves and "
                        "snapshots are deleted first); without it such a folder is refused")
    t.add_argument("--inexact-resume", action="store_true",
                   help="resume even when the snapshot's .engine.pt (RNG and data cursors) is missing or "
                        "unreadable: the data order and random draws then differ from the uninterrupted run")
    t.add_argument("--weights", help="initialise from a .caffemodel (V1 or V2, by layer name: e.g. the Model Zoo's "
                                     "VGG_ILSVRC_16_layers.caffemodel, sha1-checked) or a torchvision-style .pth "
                                     "state dict (by layer order, its first convolution converted to the prototxt's "
                                     "input convention; tensors only, nothing unpickled)")
    t.add_argument("--test-interval", type=int, help="test every N iterations (default: the solver's test_interval)")
    t.add_argument("--test-iter", type=int, help="test batches per test pass (default: the solver's test_iter)")
    t.add_argument("--display", type=int, help="log a training row every N iterations (default: the solver's display)")
    t.add_argument("--snapshot-every", type=int, help="snapshot every N iterations (default: the solver's snapshot)")
    t.add_argument("--tensorboard", metavar="DIR",
                   help="also write every log.csv row (loss, accuracy, learning rate, the utilization metrics) as "
                        "TensorBoard event files in DIR (`tensorboard --logdir DIR`)")
    t.add_argument("--utilization", metavar="BLOB",
                   help="log Table 5's metrics (# neurons ON, peak p_EB, the two entropies) of BLOB at every test "
                        "point as log.csv columns (both backends); default auto: the first fc of a test net with "
                        "a SoftmaxWithLoss; off to disable")
    t.add_argument("--utilization-images", type=int, metavar="N",
                   help="test images the utilization is measured on at each test point (default 1000)")
    t.add_argument("--keep-snapshots", type=int, metavar="K",
                   help="snapshot sets kept in the run folder: the newest K (0: all; default: the trainer's, 1)")
    t.add_argument("--keep-init", action="store_true",
                   help="keep the iteration-0 weights as RUN/init.caffemodel (a full copy of the net); by default "
                        "RUN/init.json records them and the run's seed draws them again when needed")
    t.add_argument("--seed", type=int, help="random seed (default: the solver's random_seed)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--amp", choices=["bf16", "fp16"], help="mixed-precision training forward (EB and the test passes stay float32)")
    t.add_argument("--channels-last", action="store_true", help="NHWC convolutions (GPU)")
    t.set_defaults(fn=_cmd_train)

    b = sub.add_parser("bench", help="seconds per training iteration of the dropout variants, side by side")
    b.add_argument("what", nargs="?", default="cnn2-cifar10", choices=["cnn2-cifar10", "table6", "caffe", "precision", "utilization"],
                   help="cnn2-cifar10: Standard vs Excitation (batch 100); table6: the paper's Table 6 runtimes; "
                        "caffe: real Caffe vs the engine on CPU (CNN-2, needs `make caffe`); precision: CNN-2 ED "
                        "as float32, bf16 autocast and torch.compile, and one multi-thread process vs one "
                        "single-thread process per core (CPU); utilization: what the trainer's Table 5 columns at "
                        "each test point cost")
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
    b.add_argument("--recipe", choices=["paper", "authors"], default="paper",
                   help="cnn2-cifar10: the paper's recipe (Adam) or the authors' (*_authors variants, SGD)")
    b.add_argument("--no-compile", action="store_true", help="precision: leave torch.compile out")
    b.add_argument("--no-processes", action="store_true", help="precision: leave the processes-vs-threads run out")
    b.add_argument("--per-image-loop", action="store_true",
                   help="table6: add an ED column that runs EB image by image (the authors' numpy loop)")
    b.set_defaults(fn=_cmd_bench)

    sw = sub.add_parser("sweep", help="the paper's comparisons: method x dataset x net x rate x seed (Tables 2-4, "
                                      "Fig. 3)")
    sw.add_argument("--table", choices=["2", "3", "4"], default="2",
                    help="2: every method at rate 0.5 (Table 2, Fig. 3); 3: No, Standard first fc / both fcs, "
                         "Curriculum and Excitation Dropout in AlexNet, VGG16, VGG19 fine-tuned on UCF101 (Table 3); "
                         "4: Standard first fc / both fcs and Excitation at rates 0.25, 0.5, 0.75 (Table 4)")
    sw.add_argument("--datasets", help="comma-separated: cifar10, cifar100, caltech256 (CNN-2), ucf101 (AlexNet, "
                                       "VGG16, VGG19); default cifar10, for Table 3 ucf101")
    sw.add_argument("--nets", help="comma-separated subset of the datasets' nets, e.g. alexnet,vgg16 (default: "
                                   "all of them; ucf101: alexnet, vgg16, vgg19)")
    sw.add_argument("--weights", action="append", metavar="NET=FILE",
                    help="the ImageNet .caffemodel a fine-tuned net starts from (repeatable, or comma-separated: "
                         "alexnet=A,vgg16=B); default: the Model Zoo file in data/weights/ "
                         "(exdrop.engine.pretrained.fetch); a missing file stops the sweep before it starts")
    sw.add_argument("--budget", choices=["paper", "cpu", "cpu-full", "cpu-200ep"], default="paper",
                    help="paper: the paper's protocol, the prototxts' solvers (CNN-2 100K iterations; UCF101: "
                         "AlexNet 5K, VGG16/19 30K); cpu: the reduced protocol of the README (5,000-image subset, 1,200 "
                         "iterations; CNN-2 on CIFAR only); cpu-full: the other design compared there (the full "
                         "training set, 1,500 iterations); cpu-200ep: the paper's shape (200 epochs, lr drop at 25%%) "
                         "on 200 images per class, 4,000 iterations")
    sw.add_argument("--recipe", choices=["paper", "authors"], default="paper",
                    help="paper: the prototxts' Adam / msra / pixels-256 recipe; authors: the *_authors variants "
                         "(the authors' script: SGD momentum 0.9, gaussian 0.01, raw pixels; CIFAR-10 only); "
                         "the default sweep folder gets the suffix _authors")
    sw.add_argument("--seeds", default="5",
                    help="N: seeds 1..N per cell (init and data order; default 5); or a list 2,3 or a range 2-5")
    sw.add_argument("--methods", help="comma-separated subset of the table's methods (default: all of them)")
    sw.add_argument("--rates", type=_rate_list, help="comma-separated dropout rates, each in (0, 1) (default: the table's)")
    sw.add_argument("--data", action="append", metavar="DATASET=PATH",
                    help="raw source of a dataset (repeatable), e.g. cifar10=../shared/data/cifar10-jpg/train.tgz "
                         "(default: data/cifar-10-python.tar.gz, data/cifar-100-python.tar.gz, "
                         "data/256_ObjectCategories.tar); ucf101: the folder `make data-ucf101` converted "
                         "(default data/ucf101)")
    sw.add_argument("--out", help="sweep folder (default results/table<T>_<datasets>_<budget>)")
    sw.add_argument("--workers", type=int, default=1,
                    help="local runs at once (CPU: the cores are shared among them; GPUs: round-robin, "
                         "several runs per GPU when workers > GPUs)")
    sw.add_argument("--threads", type=int, help="torch threads per run on CPU (default: cores / workers)")
    sw.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    sw.add_argument("--backend", choices=["engine", "caffe"], default="engine", help="engine (default) or caffe")
    sw.add_argument("--amp", choices=["bf16", ""], default=None,
                    help="override the budget's mixed precision: bf16, or '' for float32")
    sw.add_argument("--max-iter", type=int, help="stop every run at N iterations (a shorter, reduced budget)")
    sw.add_argument("--plan-only", action="store_true",
                    help="write the run folders and plan.txt (for a cluster's job array) and the tables of what "
                         "has finished; run nothing")
    sw.set_defaults(fn=_cmd_sweep)

    te = sub.add_parser("test", help="evaluate a snapshot on a data source (like `caffe test`)",
                        description="Accuracy, loss, per-class accuracy and the confusion matrix of a .caffemodel "
                                    "with the TEST net. With a solver and no --data: the solver's test_iter "
                                    "batches of the TEST layer's own source, read as Caffe and the trainer's test "
                                    "passes read them (in order, wrapping around at the end), so the run's logged "
                                    "test accuracy is reproduced. Otherwise every image exactly once (the last "
                                    "batch cut to the images left; Caffe's `caffe test` would wrap around and count "
                                    "the first images twice).")
    te.add_argument("net", metavar="SOLVER_OR_NET",
                    help="a solver prototxt (its test net, else its net, TEST phase) or a train_val net prototxt")
    te.add_argument("--weights", required=True, help="the .caffemodel to evaluate, e.g. RUN/snapshots/X_iter_N.caffemodel")
    te.add_argument("--data", help="evaluate on this instead of the TEST data layer's source: an LMDB folder, a "
                                   "converted dataset folder (its test_lmdb, else val_lmdb), or a raw CIFAR-10 "
                                   "source, converted into --data-dir first (as `exdrop train --data`)")
    te.add_argument("--data-dir", default="data/cifar10",
                    help="with a raw --data source: where the converted LMDBs go (default data/cifar10)")
    te.add_argument("--iterations", type=int,
                    help="evaluate N batches, in record order, wrapping around at the end like `caffe test` "
                         "(default: the solver's test_iter on its own source, else each image exactly once)")
    te.add_argument("--out", help="folder for test.json and confusion.png (default: RUN/test_<weights stem> for "
                                  "RUN/snapshots/<stem>.caffemodel, else test_<stem> beside the weights)")
    te.add_argument("--device", default="cpu", help="cpu (default), cuda or auto (the caffe backend: CPU only)")
    te.add_argument("--backend", choices=["engine", "caffe"], default="engine",
                    help="engine: PyTorch (default); caffe: real pycaffe's caffe.Net(net, weights, TEST)")
    te.add_argument("--quiet", action="store_true", help="no progress bar")
    te.set_defaults(fn=_cmd_test, val_size=None, limit_per_class=None)

    pl = sub.add_parser("plot", help="training curves (loss, test accuracy) from run folders' log.csv")
    pl.add_argument("runs", nargs="*", metavar="RUN", help="run folder(s) holding log.csv")
    pl.add_argument("--utilization", action="store_true",
                    help="Figs. 4-5: the utilization columns of the runs' log.csv, a mean curve and std band per "
                         "method (runs grouped by the sweep's method, else their parent folder's name)")
    pl.add_argument("--fig2", metavar="PNG", help="draw Fig. 2 (the retain probability of Eqn. 3 against p_EB)")
    pl.add_argument("--n", type=_positive_int, default=10, help="Fig. 2: the layer's units N (default 10, as the paper)")
    pl.add_argument("--base-retain", type=float, default=0.5, help="Fig. 2: the base retain probability P")
    pl.add_argument("--out", metavar="PNG",
                    help="output image (default: RUN/curves.png for one run, runs.png for several, overlaid)")
    pl.set_defaults(fn=_cmd_plot)

    an = sub.add_parser("analyze", help="utilization metrics, compression and calibration of a run or a sweep",
                        description="A run folder: RUN/analysis/analysis.json for its last snapshot (every test "
                                    "image) and every kept snapshot (the first --training-images images), and "
                                    "RUN/report.html of it (a few minutes for CNN-2 on 2 CPU cores: Fig. 7 runs the "
                                    "test set once per compression point). A sweep "
                                    "folder: every finished run of --methods, then table5.md/.json, fig7_*.png, "
                                    "fig4_*.png (over training) and reliability_*.png in the sweep folder. Results "
                                    "are reused while the snapshots and options are unchanged.")
    an.add_argument("path", metavar="RUN_OR_SWEEP", help="a run folder (exdrop train --out) or a sweep folder "
                                                         "(exdrop sweep, with plan.json)")
    an.add_argument("--data", help="another test set: an LMDB or a converted dataset folder (default: the run's "
                                   "TEST data layer source)")
    an.add_argument("--blob", help="the blob to measure (default: the first InnerProduct's top, fc1)")
    an.add_argument("--delta", type=float, help="conservative-filter threshold (default: Table 5's for the "
                                                "run's data set, from the sweep's plan or the net's path: cifar10 "
                                                "0.25, cifar100 0.30, caltech256 1.25; none known: no conservative "
                                                "filters, and the output says so)")
    an.add_argument("--methods", help="sweep: the methods to analyse (default none,standard_fc1,curriculum,ed)")
    an.add_argument("--no-over-training", action="store_true", help="the last snapshot only")
    an.add_argument("--training-images", type=int, default=1000,
                    help="test images per snapshot for the curves over training (default 1000)")
    an.add_argument("--out", help="where the tables, figures and report go (default: the run or sweep folder)")
    an.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    an.add_argument("--force", action="store_true", help="recompute even when the saved analysis is current")
    an.add_argument("--quiet", action="store_true", help="no progress bar")
    an.set_defaults(fn=_cmd_analyze)

    rp = sub.add_parser("report", help="one self-contained HTML page (and Markdown) of a sweep or a run and its analysis")
    rp.add_argument("sweep", metavar="SWEEP_OR_RUN", help="a sweep folder or a run folder analysed by `exdrop analyze`")
    rp.add_argument("--out", help="folder for report.html, report.md and the figures (default: the sweep folder)")
    rp.add_argument("--saliency", help="a saliency figure (exdrop saliency) to include (default: drawn for "
                                       "--saliency-images of each method's first run)")
    rp.add_argument("--saliency-images", default="0,1", help="test images of the drawn Fig. 6 ('' for none)")
    rp.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    rp.set_defaults(fn=_cmd_report)

    sa = sub.add_parser("saliency", help="EB saliency maps as the most relevant units are switched off (Fig. 6)")
    sa.add_argument("runs", nargs="+", metavar="RUN", help="run folders (one row each), their last snapshot")
    sa.add_argument("--images", default="0", type=_index_list, help="test image indices, e.g. 0,7 (default 0)")
    sa.add_argument("--k", type=_index_list,
                    help="most relevant units of the dropout blob switched off per column (default 0,100,...,500, "
                         "scaled down for a blob of fewer than 500 units)")
    sa.add_argument("--blob", help="the conv blob of the maps (default: the last Convolution top at least 8x8)")
    sa.add_argument("--data", help="another test set (LMDB or converted folder)")
    sa.add_argument("--contrastive", action="store_true", help="contrastive EB (Zhang et al. 2016)")
    sa.add_argument("--out", default="saliency.png", help="output PNG (default saliency.png)")
    sa.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    sa.set_defaults(fn=_cmd_saliency)
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError, OSError, ImportError) as exc:
        print(f"exdrop: error: {exc}", file=sys.stderr)
        return 1
