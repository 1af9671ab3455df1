"""Seconds per training iteration of prototxt variants, measured side by side.

One full iteration = forward (with the EB step for guided layers), backward
and the solver's update. The variants are timed in interleaved rounds in one
process (A, B, A, B, ...) so that machine load drifts hit them alike; each
ratio is computed from the same run. Data layers are replaced by an Input fed
with fixed random images, so the figure is the network's cost alone.

The variants of one table share one set of weights and one solver (they differ only in
the dropout layer), so the solver state exists once and memory is one net's weights plus
one step's activations: each variant's step updates the shared weights, the same work for
every variant. Between steps no variant keeps activations or gradients alive.

``exdrop bench caffe`` times real Caffe (pycaffe, CPU: ``solver.step(1)``, with
the p_EB hook of :mod:`exdrop.caffe.backend` for Excitation Dropout) next to
the engine on the same CNN-2 nets, arrays and solver, in the same rounds.
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from exdrop import paper
from exdrop.caffe.backend import CaffeBenchVariant
from exdrop.engine.net import Net
from exdrop.engine.net import filter_layers
from exdrop.engine.pylayer import TRAIN
from exdrop.engine.pylayer import TEST
from exdrop.engine.solver import make_solver
from exdrop.engine.step import training_step
from exdrop.engine.utilization import utilization
from exdrop.paths import REPO_ROOT
from exdrop.proto import io as cio
from exdrop.proto import caffe_pb2
from exdrop.run.train import pick_device

ROOT = REPO_ROOT   # the checkout: prototxt/, layers/ (exdrop.paths)

CNN2_CIFAR10 = {
    "Standard": "prototxt/cnn2/cifar10/train_val_standard.prototxt",
    "Excitation": "prototxt/cnn2/cifar10/train_val_ed.prototxt",
}


def cnn2_cifar10(recipe: str = "paper") -> tuple[dict[str, str], str]:
    """The Standard / Excitation prototxts of CNN-2 on CIFAR-10 and their solver under ``recipe``
    (``authors``: the *_authors variants, SGD)."""
    suffix = {"paper": "", "authors": "_authors"}[recipe]
    variants = {k: v.replace(".prototxt", f"{suffix}.prototxt") for k, v in CNN2_CIFAR10.items()}
    return variants, f"prototxt/cnn2/cifar10/solver_ed{suffix}.prototxt"


LOOP_SUFFIX = " (per-image loop)"


def with_input_layer(net_param, phase: int, batch: int, image_shape: tuple[int, int, int]):
    """A copy of ``net_param`` whose data layers of ``phase`` become one Input (data, label)."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    del out.layer[:]
    added = False
    for lp in filter_layers(net_param, phase):
        if lp.type in ("Data", "ImageData", "Input"):
            if not added:
                inp = out.layer.add()
                inp.name, inp.type = "input", "Input"
                inp.top.extend(list(lp.top)[:2])
                inp.input_param.shape.add().dim.extend([batch, *image_shape])
                inp.input_param.shape.add().dim.extend([batch])
                added = True
            continue
        out.layer.add().CopyFrom(lp)
    return out


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One prototxt ready to train on fixed random data."""

    def __init__(self, name: str, prototxt: str, solver_param, batch: int, image_shape, classes: int, device,
                 per_image_loop: bool = False, share: "Variant | None" = None, amp: str | None = None,
                 compile: bool = False):
        """``share``: another Variant whose weights and solver this one uses (by layer name).
        ``amp`` "bf16": the forward under bfloat16 autocast (EB stays float32, as in training);
        ``compile``: the net's layers run through torch.compile."""
        original = cio.read_net_prototxt(prototxt)
        param = with_input_layer(original, TRAIN, batch, image_shape)
        torch.manual_seed(0)
        self.name, self.device = name, device
        self.net = Net(param, TRAIN, device, prototxt)
        if share is None:
            self.solver = make_solver(solver_param, self.net.learnable())
        else:
            self.net.share_weights_from(share.net)
            self.solver = share.solver
            mine = [(id(e.tensor), e.lr_mult, e.decay_mult) for e in self.net.learnable()]
            theirs = [(id(e.tensor), e.lr_mult, e.decay_mult) for e in self.solver.params]
            if mine != theirs:
                raise ValueError(f"{prototxt}: its learnable blobs (or their lr/decay multipliers) differ "
                                 f"from {share.name}'s, so the two cannot share weights and solver")
        # what the data layer would deliver: mean-subtracted pixels (std ~60) times transform scale
        scale = next((lp.transform_param.scale for lp in original.layer if lp.type in ("Data", "ImageData")), 1.0)
        g = torch.Generator().manual_seed(1)
        self.feed = {"data": (torch.randn(batch, *image_shape, generator=g) * 60 * scale).to(device),
                     "label": torch.randint(0, classes, (batch,), generator=g).to(device)}
        self.net.per_image_saliency = per_image_loop
        self.autocast = (lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)) if amp \
            else contextlib.nullcontext
        if compile:
            for layer in self.net.layer_list:
                if len(layer.blobs):   # the convolutions and inner products: the bulk of the work
                    layer.forward = torch.compile(layer.forward, dynamic=False)

    def step(self):
        """The training step of ``exdrop train``'s engine backend, on the fixed feed."""
        self._loss, _ = training_step(self.net, self.solver, feed=self.feed, autocast=self.autocast)

    @property
    def last_loss(self) -> float:
        return float(self._loss)


def time_steps(steppers: dict, *, iters: int, warmup: int, device="cpu", on_round=None) -> dict:
    """Seconds per ``.step()`` of each object in ``steppers`` (engine Variants, Caffe variants, ...).

    ``warmup`` untimed rounds, then ``iters`` timed rounds, each stepping every object once
    in order; the torch ``device`` is synchronised around each step. ``on_round(r, times)``
    is called after each timed round. Returns {name: {mean_s, std_s, median_s,
    ratio_to_<first name>, times_s}}.
    """
    device = torch.device(device)
    times = {k: [] for k in steppers}
    for _ in range(warmup):
        for s in steppers.values():
            s.step()
    _sync(device)
    for r in range(iters):
        for k, s in steppers.items():
            _sync(device)
            t = time.perf_counter()
            s.step()
            _sync(device)
            times[k].append(time.perf_counter() - t)
        if on_round is not None:
            on_round(r, times)
    first = next(iter(times))
    base = statistics.mean(times[first])
    return {k: {"mean_s": statistics.mean(ts), "std_s": statistics.stdev(ts) if len(ts) > 1 else 0.0,
                "median_s": statistics.median(ts), "ratio_to_" + first: statistics.mean(ts) / base,
                "times_s": ts} for k, ts in times.items()}


def time_variants(variants: dict[str, str], *, solver: str, iters: int, warmup: int, batch: int,
                  image_shape=(3, 32, 32), classes: int = 10, device="cpu") -> dict:
    """The engine's seconds per iteration of each prototxt in ``variants`` (name -> path)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sp = cio.read_solver_prototxt(solver)
    built = share_variants(variants, sp, batch, image_shape, classes, device)
    rows = time_steps(built, iters=iters, warmup=warmup, device=device)
    del built  # free the net before the next table
    gc.collect()
    for k, row in rows.items():
        row["prototxt"] = variants[k]
    res = {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": batch,
           "image_shape": list(image_shape), "iters": iters, "warmup": warmup, "shared_weights": True,
           "peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        res["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    res["variants"] = rows
    return res


def share_variants(variants: dict[str, str], solver_param, batch: int, image_shape, classes: int, device) -> dict:
    """One Variant per prototxt (name -> path), all on the first one's weights and solver."""
    built: dict[str, Variant] = {}
    for k, v in variants.items():
        first = next(iter(built.values()), None)
        built[k] = Variant(k, v, solver_param, batch, image_shape, classes, device,
                           per_image_loop=k.endswith(LOOP_SUFFIX), share=first)
        gc.collect()  # the weights the new net was built with, now replaced by the shared ones
    return built


def precision_variants(prototxt: str, solver: str, batch: int, device, compile_too: bool = True) -> dict:
    """One prototxt as float32, bf16 autocast and (``compile_too``) torch.compile'd float32, all
    on one set of weights and one solver: the speed side of the CPU budget's choice."""
    sp = cio.read_solver_prototxt(solver)
    built = {"float32": Variant("float32", prototxt, sp, batch, (3, 32, 32), 10, device)}
    built["bf16 autocast"] = Variant("bf16 autocast", prototxt, sp, batch, (3, 32, 32), 10, device,
                                     share=built["float32"], amp="bf16")
    if compile_too:
        built["torch.compile"] = Variant("torch.compile", prototxt, sp, batch, (3, 32, 32), 10, device,
                                         share=built["float32"], compile=True)
    return built


def processes_vs_threads(prototxt: str, solver: str, iters: int, batch: int) -> dict:
    """Throughput of one process with all cores' threads against one single-thread process per core,
    each running ``iters`` training iterations of ``prototxt`` (the two ways a sweep can use a CPU)."""
    import subprocess
    cores = os.cpu_count() or 1
    code = ("import sys, time, torch; from exdrop.experiments import bench; from exdrop.proto import io; "
            "torch.set_num_threads(int(sys.argv[1])); "
            "v = bench.Variant('x', sys.argv[2], io.read_solver_prototxt(sys.argv[3]), int(sys.argv[5]), (3, 32, 32), 10, 'cpu'); "
            "v.step(); t = time.perf_counter(); [v.step() for _ in range(int(sys.argv[4]))]; "
            "print(time.perf_counter() - t)")

    def launch(threads, n):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        return subprocess.Popen([sys.executable, "-c", code, str(threads), prototxt, solver, str(n), str(batch)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)

    t = time.perf_counter()
    one = launch(cores, iters * cores)
    one.wait()
    one_wall = time.perf_counter() - t
    t = time.perf_counter()
    many = [launch(1, iters) for _ in range(cores)]
    for p in many:
        p.wait()
    many_wall = time.perf_counter() - t
    total = iters * cores
    return {"cores": cores, "iterations": total,
            "one_process_s_per_iter": float(one.stdout.read()) / total,
            "processes_s_per_iter": max(float(p.stdout.read()) for p in many) / iters / cores,
            "one_process_wall_s": one_wall, "processes_wall_s": many_wall,
            "throughput_ratio_processes_to_one": one_wall / many_wall}


def utilization_cost(batch: int, iters: int, device, images: int = 1000) -> dict:
    """What the trainer's utilization columns cost: a test batch with Table 5's metrics (recorded
    forward, EB from the ground truth to fc1, the four metrics) against a plain test batch, and a
    training step, CNN-2 ED on 32x32, interleaved rounds; then the share of a run it adds under the
    paper's schedule and the cpu budget's."""
    proto, solver = CNN2_CIFAR10["Excitation"], cio.read_solver_prototxt(ROOT / "prototxt/cnn2/cifar10/solver_ed.prototxt")
    train = Variant("train step (ED)", str(ROOT / proto), solver, batch, (3, 32, 32), 10, device)
    param = with_input_layer(cio.read_net_prototxt(ROOT / proto), TEST, batch, (3, 32, 32))
    test_net = Net(param, TEST, device, proto)
    test_net.share_weights_from(train.net)
    feed = train.feed

    class Plain:
        name = "test batch"

        @torch.no_grad()
        def step(self):
            self.out = test_net(feed)["loss"]

        last_loss = property(lambda self: float(self.out))

    class WithMetrics(Plain):
        name = "test batch + utilization"

        @torch.no_grad()
        def step(self):
            blobs = test_net.forward(feed, record=True)
            self.sums = utilization(blobs["ip1"], test_net.excitation("ip1", "ip3"))
            test_net.records = None
            self.out = blobs["loss"]

    rows = time_steps({"train step (ED)": train, "test batch": Plain(), "test batch + utilization": WithMetrics()},
                      iters=iters, warmup=2, device=device)
    step, plain, util = (rows[k]["median_s"] for k in ("train step (ED)", "test batch", "test batch + utilization"))
    per_test = (util - plain) * math.ceil(images / batch)

    def share(max_iter, test_interval, test_iter):
        tests = max_iter // test_interval
        return tests * per_test / (max_iter * step + tests * test_iter * plain)
    return {"device": str(device), "threads": torch.get_num_threads(), "batch": batch, "iters": iters, "warmup": 2,
            "peak_rss_mb": peak_rss_mb(), "utilization_images": images, "variants": rows, "extra_s_per_test_point": per_test,
            "run_share_paper_schedule": share(100000, 1000, 50), "run_share_cpu_budget": share(1200, 400, 50)}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


TABLE6 = {
    # The paper's Table 6 setting: batch 50; CNN-2 on Caltech-256 (128x128, 256 classes), VGG16 on UCF101.
    "cnn2": {"title": "CNN-2 (128x128, 256 classes)", "image": (3, 128, 128), "classes": 256,
             "solver": "prototxt/cnn2/caltech256/solver_ed.prototxt",
             "variants": {"Standard first fc": "prototxt/cnn2/caltech256/train_val_standard_fc1.prototxt",
                          "Standard both fcs": "prototxt/cnn2/caltech256/train_val_standard_both.prototxt",
                          "Activation Dropout": "prototxt/cnn2/caltech256/train_val_activation.prototxt",
                          "Excitation Dropout": "prototxt/cnn2/caltech256/train_val_ed.prototxt"}},
    "vgg16": {"title": "VGG16 (224x224, 101 classes)", "image": (3, 224, 224), "classes": 101,
              "solver": "prototxt/vgg16/ucf101/solver_ed.prototxt",
              "variants": {"Standard first fc": "prototxt/vgg16/ucf101/train_val_standard_fc6.prototxt",
                           "Standard both fcs": "prototxt/vgg16/ucf101/train_val_standard_both.prototxt",
                           "Activation Dropout": "prototxt/vgg16/ucf101/train_val_activation.prototxt",
                           "Excitation Dropout": "prototxt/vgg16/ucf101/train_val_ed.prototxt"}},
}
def _print_table(title: str, res: dict, paper: dict | None) -> None:
    first = next(iter(res["variants"]))
    print(f"\n{title}: batch {res['batch']}, one training iteration on {res['device']}, "
          f"mean +- std of {res['iters']} after {res['warmup']} warm-up (interleaved)")
    print(f"| variant | seconds | ratio to {first} | ratio of medians |"
          + (" paper (Titan X) | paper ratio |" if paper else ""))
    print("|---|---|---|---|" + ("---|---|" if paper else ""))
    base_median = res["variants"][first]["median_s"]
    for k, r in res["variants"].items():
        line = (f"| {k} | {r['mean_s']:.4f} +- {r['std_s']:.4f} | {r['ratio_to_' + first]:.3f} "
                f"| {r['median_s'] / base_median:.3f} |")
        if paper and k in paper:
            line += f" {paper[k][0]:.3f} +- {paper[k][1]:.3f} | {paper[k][0] / paper[first][0]:.3f} |"
        print(line)
    memory = f"peak memory of the process: RSS {res['peak_rss_mb'] / 1024:.2f} GiB"
    if "cuda_peak_allocated_mb" in res:
        memory += f", CUDA allocated {res['cuda_peak_allocated_mb'] / 1024:.2f} GiB"
    print(memory + " (the variants share one set of weights and one solver)")


CAFFE_METHODS = {
    "Standard": "prototxt/cnn2/cifar10/train_val_standard.prototxt",
    "Excitation Dropout": "prototxt/cnn2/cifar10/train_val_ed.prototxt",
}
CAFFE_SOLVER = "prototxt/cnn2/cifar10/solver_ed.prototxt"
CAFFE_SIZES = {  # input side -> (batch, classes): CIFAR-10, and the paper's Table 6 CNN-2 setting
    32: (100, 10),
    128: (50, 256),
}


def _cnn2_input_net(method: str, side: int, batch: int, classes: int, folder: Path) -> Path:
    """The method's CNN-2 for TRAIN with an Input layer (batch, 3, side, side) and ``classes`` outputs."""
    from google.protobuf import text_format
    param = with_input_layer(cio.read_net_prototxt(ROOT / CAFFE_METHODS[method]), TRAIN, batch, (3, side, side))
    for lp in param.layer:
        if lp.name == "ip3":
            lp.inner_product_param.num_output = classes
    path = folder / f"{method.split()[0].lower()}_{side}.prototxt"
    path.write_text(text_format.MessageToString(param))
    return path


def caffe_vs_engine(side: int, iters: int, warmup: int, folder: Path) -> dict:
    """Caffe and the engine, Standard and Excitation Dropout, at one input size, in the same rounds."""
    batch, classes = CAFFE_SIZES[side]
    sp = cio.read_solver_prototxt(ROOT / CAFFE_SOLVER)
    steppers = {}
    for method in CAFFE_METHODS:
        net_path = _cnn2_input_net(method, side, batch, classes, folder)
        engine = Variant(method, str(net_path), sp, batch, (3, side, side), classes, torch.device("cpu"))
        caffe = CaffeBenchVariant(net_path, sp, engine.feed["data"].numpy().copy(),
                                  engine.feed["label"].numpy().astype("float32"))
        if method == "Excitation Dropout" and caffe.guided_layers != ["drop"]:
            raise RuntimeError(f"{net_path}: the Caffe ED net got no p_EB hook (hooked: {caffe.guided_layers})")
        steppers[f"Caffe/{method}"] = caffe
        steppers[f"engine/{method}"] = engine
    order = [f"{b}/{m}" for b in ("Caffe", "engine") for m in CAFFE_METHODS]
    steppers = {k: steppers[k] for k in order}

    def report(r, times):
        shown = (f"{k.split('/')[0]} {k.split('/')[1].split()[0]} {ts[-1]:.2f}s" for k, ts in times.items())
        print(f"  {side}x{side} round {r + 1}/{iters}: " + ", ".join(shown), file=sys.stderr, flush=True)

    rows = time_steps(steppers, iters=iters, warmup=warmup, on_round=report)
    losses = {k: s.last_loss for k, s in steppers.items()}
    del steppers
    gc.collect()
    mean = {k: v["mean_s"] for k, v in rows.items()}
    ratios = {f"engine/Caffe {m}": mean[f"engine/{m}"] / mean[f"Caffe/{m}"] for m in CAFFE_METHODS}
    for b in ("Caffe", "engine"):
        ratios[f"ED/Standard {b}"] = mean[f"{b}/Excitation Dropout"] / mean[f"{b}/Standard"]
    return {"side": side, "batch": batch, "classes": classes, "variants": rows, "ratios": ratios,
            "last_losses": losses}


def caffe_markdown(results: list[dict], meta: dict) -> str:
    lines = [f"CNN-2, one training iteration (forward + backward + Adam update) on CPU, "
             f"{meta['iters']} timed rounds after {meta['warmup']} warm-up, interleaved; "
             f"seconds per iteration, mean +- std.",
             f"torch {meta['torch']} ({meta['torch_threads']} threads), Caffe CPU "
             f"(OPENBLAS_NUM_THREADS={meta['openblas_threads']}), {meta['cpus']} CPUs, {meta['machine']}.",
             "",
             "| input | batch | method | Caffe (s/iter) | engine (s/iter) | engine / Caffe |",
             "|---|---:|---|---:|---:|---:|"]
    for res in results:
        size = f"{res['side']}x{res['side']}, {res['classes']} classes | {res['batch']}"
        for m in CAFFE_METHODS:
            c, e = res["variants"][f"Caffe/{m}"], res["variants"][f"engine/{m}"]
            lines.append(f"| {size} | {m} | {c['mean_s']:.3f} +- {c['std_s']:.3f} | "
                         f"{e['mean_s']:.3f} +- {e['std_s']:.3f} | {res['ratios'][f'engine/Caffe {m}']:.2f} |")
        lines.append(f"| {size} | ED / Standard | {res['ratios']['ED/Standard Caffe']:.2f} | "
                     f"{res['ratios']['ED/Standard engine']:.2f} | |")
    return "\n".join(lines)


def caffe_main(args) -> int:
    if args.device not in (None, "auto", "cpu"):
        raise ValueError(f"bench caffe compares both on CPU (pycaffe is built CPU-only); drop --device {args.device}")
    sides = [int(s) for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sides if s not in CAFFE_SIZES]
    if unknown:
        raise ValueError(f"unknown size(s) {unknown}; choose from {sorted(CAFFE_SIZES)}")
    iters = 5 if args.iters is None else args.iters
    warmup = 1 if args.warmup is None else args.warmup
    if iters < 1:
        raise ValueError("--iters must be at least 1")
    meta = {"iters": iters, "warmup": warmup, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
            "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
            "solver": CAFFE_SOLVER, "methods": CAFFE_METHODS}
    with tempfile.TemporaryDirectory(prefix="bench_caffe_") as tmp:
        results = [caffe_vs_engine(side, iters, warmup, Path(tmp)) for side in sides]
    table = caffe_markdown(results, meta)
    print(table)
    _write_json(args.json, {"meta": meta, "results": results, "table": table})
    return 0


def _write_json(path, figures) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(figures, indent=2))
        print(f"\nwritten to {path}")


def main(args) -> int:
    if args.what == "caffe":
        return caffe_main(args)
    device = pick_device(args.device)
    out: dict = {}
    if args.what == "precision":
        proto, solver = CNN2_CIFAR10["Excitation"], "prototxt/cnn2/cifar10/solver_ed.prototxt"
        built = precision_variants(proto, solver, args.batch or 100, device, compile_too=not args.no_compile)
        rows = time_steps(built, iters=args.iters or 10, warmup=2 if args.warmup is None else args.warmup,
                          device=device)
        res = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "batch": args.batch or 100, "iters": args.iters or 10,
               "warmup": 2 if args.warmup is None else args.warmup, "peak_rss_mb": peak_rss_mb(), "variants": rows}
        _print_table("CNN-2 ED on CIFAR-10 (32x32): float32 vs bf16 autocast vs torch.compile", res, None)
        if device.type == "cpu" and not args.no_processes:
            pt = processes_vs_threads(proto, solver, args.iters or 10, args.batch or 100)
            res["processes_vs_threads"] = pt
            print(f"{pt['cores']} single-thread processes vs one {pt['cores']}-thread process, "
                  f"{pt['iterations']} iterations each way: wall {pt['processes_wall_s']:.1f} s vs "
                  f"{pt['one_process_wall_s']:.1f} s, throughput ratio {pt['throughput_ratio_processes_to_one']:.3f}")
        _write_json(args.json, res)
        return 0
    if args.what == "utilization":
        res = utilization_cost(args.batch or 100, args.iters or 10, device)
        _print_table("CNN-2 ED on CIFAR-10 (32x32): Table 5's metrics at each test point", res, None)
        print(f"extra per test point ({res['utilization_images']} images): {res['extra_s_per_test_point']:.3f} s; "
              f"share of a run: {100 * res['run_share_paper_schedule']:.2f}% (paper schedule: 100K iterations, a "
              f"test every 1,000), {100 * res['run_share_cpu_budget']:.2f}% (cpu budget: 1,200, a test every 400)")
        _write_json(args.json, res)
        return 0
    if args.what == "cnn2-cifar10":
        variants, solver = cnn2_cifar10(getattr(args, "recipe", "paper"))
        res = time_variants(variants, solver=solver, iters=args.iters,
                            warmup=2 if args.warmup is None else args.warmup, batch=args.batch or 100, device=device)
        _print_table(f"CNN-2 on CIFAR-10 (32x32), {getattr(args, 'recipe', 'paper')} recipe", res, None)
        ed, st = res["variants"]["Excitation"], res["variants"]["Standard"]
        print(f"ratio Excitation / Standard = {ed['mean_s'] / st['mean_s']:.3f} "
              f"(medians: {ed['median_s'] / st['median_s']:.3f})")
        out = res
    else:
        for net in args.nets.split(","):
            spec = TABLE6[net]
            on_gpu = device.type == "cuda"
            iters = args.iters or (100 if on_gpu else (5 if net == "cnn2" else 2))
            warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
            variants = dict(spec["variants"])
            if args.per_image_loop:
                variants["Excitation Dropout" + LOOP_SUFFIX] = variants["Excitation Dropout"]
            res = time_variants(variants, solver=spec["solver"], iters=iters,
                                warmup=warmup, batch=args.batch or 50, image_shape=spec["image"],
                                classes=spec["classes"], device=device)
            _print_table(spec["title"], res, paper.TABLE6.get(net))
            out[net] = res
    _write_json(args.json, out)
    return 0
