"""Seconds per training iteration of prototxt variants, measured side by side.

One full iteration = forward (with the EB step for guided layers), backward
and the solver's update. The variants are timed in interleaved rounds in one
process (A, B, A, B, ...) so that machine load drifts hit them alike; each
ratio is computed from the same run. Data layers are replaced by an Input fed
with fixed random images, so the figure is the network's cost alone.
"""
from __future__ import annotations

import gc
import json
import statistics
import time
from pathlib import Path

import torch

from . import io as cio
from .net import Net
from .proto import caffe_pb2
from .pylayer import TRAIN
from .solver import make_solver

CNN2_CIFAR10 = {
    "Standard": "prototxt/cnn2/cifar10/train_val_standard.prototxt",
    "Excitation": "prototxt/cnn2/cifar10/train_val_ed.prototxt",
}


LOOP_SUFFIX = " (per-image loop)"


def with_input_layer(net_param, phase: int, batch: int, image_shape: tuple[int, int, int]):
    """A copy of ``net_param`` whose data layers of ``phase`` become one Input (data, label)."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net_param)
    del out.layer[:]
    added = False
    from .net import filter_layers
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
                 per_image_loop: bool = False):
        original = cio.read_net_prototxt(prototxt)
        param = with_input_layer(original, TRAIN, batch, image_shape)
        torch.manual_seed(0)
        self.name, self.device = name, device
        self.net = Net(param, TRAIN, device, prototxt)
        self.solver = make_solver(solver_param, self.net.learnable())
        # what the data layer would deliver: mean-subtracted pixels (std ~60) times transform scale
        scale = next((lp.transform_param.scale for lp in original.layer if lp.type in ("Data", "ImageData")), 1.0)
        g = torch.Generator().manual_seed(1)
        self.feed = {"data": (torch.randn(batch, *image_shape, generator=g) * 60 * scale).to(device),
                     "label": torch.randint(0, classes, (batch,), generator=g).to(device)}
        if per_image_loop:
            self._loop_saliency()

    def _loop_saliency(self):
        """The authors' way: EB one image at a time in a Python loop (to show what batching buys)."""
        net, batched = self.net, self.net._saliency
        batch = self.feed["data"].shape[0]

        def one_by_one(i, layer, blobs):
            rows = []
            for b in range(batch):
                sliced = {k: v[b:b + 1] if v.dim() and v.shape[0] == batch else v for k, v in blobs.items()}
                rows.append(batched(i, layer, sliced))
            return torch.cat(rows)

        net._saliency = one_by_one

    def step(self):
        for p in self.net.parameters():
            p.grad = None
        self.net.loss(self.net(self.feed)).backward()
        self.solver.step_update()


def time_variants(variants: dict[str, str], *, solver: str, iters: int, warmup: int, batch: int,
                  image_shape=(3, 32, 32), classes: int = 10, device="cpu") -> dict:
    device = torch.device(device)
    sp = cio.read_solver_prototxt(solver)
    built = {k: Variant(k, v, sp, batch, image_shape, classes, device, per_image_loop=k.endswith(LOOP_SUFFIX))
             for k, v in variants.items()}
    times = {k: [] for k in built}
    for _ in range(warmup):
        for v in built.values():
            v.step()
    _sync(device)
    for _ in range(iters):
        for k, v in built.items():
            _sync(device)
            t = time.perf_counter()
            v.step()
            _sync(device)
            times[k].append(time.perf_counter() - t)
    first = next(iter(built))
    del built  # free the nets before the next table (VGG16 x 4 variants needs the memory)
    gc.collect()
    base = statistics.mean(times[first])
    rows = {k: {"mean_s": statistics.mean(ts), "std_s": statistics.stdev(ts) if len(ts) > 1 else 0.0,
                "median_s": statistics.median(ts), "ratio_to_" + first: statistics.mean(ts) / base,
                "prototxt": variants[k]} for k, ts in times.items()}
    return {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": batch,
            "image_shape": list(image_shape), "iters": iters, "warmup": warmup, "variants": rows}


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
PAPER_TABLE6 = {  # seconds per iteration, Caffe Python layer on a GTX Titan X (the paper's Table 6)
    "cnn2": {"Standard first fc": (0.152, 0.007), "Standard both fcs": (0.161, 0.006),
             "Activation Dropout": (0.184, 0.006), "Excitation Dropout": (0.189, 0.007)},
    "vgg16": {"Standard first fc": (2.279, 0.028), "Standard both fcs": (2.290, 0.018),
              "Activation Dropout": (2.803, 0.024), "Excitation Dropout": (2.820, 0.031)},
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


def main(args) -> int:
    from .train import pick_device
    device = pick_device(args.device, 0)
    out: dict = {}
    if args.what == "cnn2-cifar10":
        res = time_variants(CNN2_CIFAR10, solver="prototxt/cnn2/cifar10/solver_ed.prototxt", iters=args.iters,
                            warmup=2 if args.warmup is None else args.warmup, batch=args.batch or 100, device=device)
        _print_table("CNN-2 on CIFAR-10 (32x32)", res, None)
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
            _print_table(spec["title"], res, PAPER_TABLE6.get(net))
            out[net] = res
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"\nwritten to {args.json}")
    return 0
