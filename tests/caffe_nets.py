"""Prototxt builders shared by the differential tests (tests/test_caffe_diff.py) and the
backend tests (tests/test_backends.py). The CNN-2 and misc nets have Input layers (data +
label), so real Caffe and the engine see identical input, and Caffe can read the file as it
is; the tiny net reads a small LMDB with Data layers, so both backends can train on it.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from exdrop.proto import io as cio
from exdrop.experiments.bench import with_input_layer
from exdrop.caffe.env import caffe_unavailable_reason
from exdrop.engine.pylayer import TEST, TRAIN

ROOT = Path(__file__).resolve().parents[1]


def require_pycaffe(what: str) -> None:
    """Skip loudly (a warning with the reason) where real pycaffe cannot be imported."""
    reason = caffe_unavailable_reason()
    if reason is not None:
        msg = f"pycaffe NOT AVAILABLE: {reason} -- {what} did not run"
        warnings.warn(msg, UserWarning, stacklevel=2)
        pytest.skip(msg)


CNN2 = {
    "none": ROOT / "prototxt/cnn2/cifar10/train_val_none.prototxt",
    "standard": ROOT / "prototxt/cnn2/cifar10/train_val_standard.prototxt",
    "ed": ROOT / "prototxt/cnn2/cifar10/train_val_ed.prototxt",
}
CNN2_SOLVER = ROOT / "prototxt/cnn2/cifar10/solver_ed.prototxt"


def cnn2_param(variant: str, phase: int, batch: int, image_shape=(3, 32, 32), classes: int = 10,
               force_backward: bool = False):
    """CNN-2 (``variant``: none / standard / ed) for ``phase`` with an Input layer, ``classes`` outputs."""
    src = CNN2[variant] if variant in CNN2 else Path(variant)
    param = with_input_layer(cio.read_net_prototxt(src), phase, batch, tuple(image_shape))
    for lp in param.layer:
        if lp.name == "ip3":
            lp.inner_product_param.num_output = classes
    if force_backward:  # Caffe's Accuracy aborts in Backward when forced to propagate down
        param.force_backward = True
        keep = [lp for lp in param.layer if lp.type != "Accuracy"]
        del param.layer[:]
        param.layer.extend(keep)
    return param


def write_param(param, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_format.MessageToString(param))
    return path


def write_cnn2(path, variant: str, phase: int = TRAIN, batch: int = 8, image_shape=(3, 32, 32),
               classes: int = 10, force_backward: bool = False) -> Path:
    return write_param(cnn2_param(variant, phase, batch, image_shape, classes, force_backward), path)


# A small net with every layer kind the CNN-2 does not exercise: LRN across and within channels,
# AVE pooling that Caffe rounds up (3x3/2 on 14x14 -> 7x7; 3x3/2 pad 1 on 7x7 -> 4x4), a grouped
# convolution, a global pooling, two Concats (channels, then features), ReLU, InnerProduct.
# Blobs used twice make Caffe insert Split layers (pool_a; label too where there is an Accuracy).
MISC_NET = """
name: "caffe_diff_misc"
{force_backward}
layer {{ name: "input" type: "Input" top: "data" top: "label"
  input_param {{ shape {{ dim: {batch} dim: 3 dim: 14 dim: 14 }} shape {{ dim: {batch} }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1
    weight_filler {{ type: "gaussian" std: 0.2 }} bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "norm1" type: "LRN" bottom: "conv1" top: "norm1"
  lrn_param {{ local_size: 5 alpha: 0.3 beta: 0.75 k: 2 norm_region: ACROSS_CHANNELS }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 group: 2
    weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" value: 0.05 }} }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "pool_a" type: "Pooling" bottom: "conv2" top: "pool_a"
  pooling_param {{ pool: AVE kernel_size: 3 stride: 2 }} }}
layer {{ name: "norm2" type: "LRN" bottom: "pool_a" top: "norm2"
  lrn_param {{ local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL }} }}
layer {{ name: "conv3" type: "Convolution" bottom: "pool_a" top: "conv3"
  convolution_param {{ num_output: 6 kernel_size: 3 pad: 1
    weight_filler {{ type: "gaussian" std: 0.2 }} bias_filler {{ type: "constant" value: 0.05 }} }} }}
layer {{ name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }}
layer {{ name: "cat1" type: "Concat" bottom: "norm2" bottom: "conv3" top: "cat1" concat_param {{ axis: 1 }} }}
layer {{ name: "pool_b" type: "Pooling" bottom: "cat1" top: "pool_b"
  pooling_param {{ pool: AVE kernel_size: 3 stride: 2 pad: 1 }} }}
layer {{ name: "gpool" type: "Pooling" bottom: "cat1" top: "gpool"
  pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "ip_a" type: "InnerProduct" bottom: "pool_b" top: "ip_a"
  inner_product_param {{ num_output: 16
    weight_filler {{ type: "gaussian" std: 0.1 }} bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu_a" type: "ReLU" bottom: "ip_a" top: "ip_a" }}
layer {{ name: "ip_g" type: "InnerProduct" bottom: "gpool" top: "ip_g"
  inner_product_param {{ num_output: 8
    weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu_g" type: "ReLU" bottom: "ip_g" top: "ip_g" }}
layer {{ name: "cat2" type: "Concat" bottom: "ip_a" bottom: "ip_g" top: "cat2" }}
layer {{ name: "ip_out" type: "InnerProduct" bottom: "cat2" top: "ip_out"
  inner_product_param {{ num_output: {classes}
    weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "constant" value: 0 }} }} }}
{accuracy}layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip_out" bottom: "label" top: "loss" }}
"""

MISC_SHAPES = {"pool_a": (8, 7, 7), "cat1": (14, 7, 7), "pool_b": (14, 4, 4), "gpool": (14, 1, 1)}


def write_misc(path, batch: int = 4, classes: int = 5, force_backward: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Caffe's Accuracy aborts in Backward when forced to propagate down: only without force_backward
    accuracy = 'layer { name: "accuracy" type: "Accuracy" bottom: "ip_out" bottom: "label" top: "accuracy" }\n'
    path.write_text(MISC_NET.format(batch=batch, classes=classes,
                                    force_backward="force_backward: true" if force_backward else "",
                                    accuracy="" if force_backward else accuracy))
    return path


# A net both backends train in a second: Data layers on a tiny LMDB (3 classes of 8x8 images),
# a convolution, ip1 with Excitation Dropout, ip2 -> Accuracy and (unless left out) the loss.
TINY_NET = """
name: "tiny_ed"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.00390625 }} data_param {{ source: "{train}" batch_size: 4 backend: LMDB }} }}
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.00390625 }} data_param {{ source: "{val}" batch_size: 3 backend: LMDB }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
  inner_product_param {{ num_output: 16 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "drop" type: "Python" bottom: "ip1" top: "ip1"
  python_param {{ module: "excitation_dropout" layer: "ExcitationDropout" param_str: "{{'dropout_ratio': 0.5}}" }} }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy" }}
{loss}"""
TINY_LOSS = 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }\n'

TINY_SOLVER = """net: "{net}"
test_iter: 2
test_interval: 1000
test_initialization: false
display: 100
average_loss: 2
max_iter: 1000
type: "SGD"
base_lr: 0.01
momentum: 0.9
lr_policy: "fixed"
snapshot: 0
snapshot_prefix: "models/tiny/tiny_ed"
solver_mode: CPU
random_seed: 1
"""


def write_tiny(folder, with_loss: bool = True) -> Path:
    """A tiny LMDB (12 train, 6 val images) and TINY_NET on it in ``folder``; returns the solver path."""
    import cv2

    from exdrop.data import prepare_image_dataset
    folder = Path(folder)
    images = folder / "images"
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (images / c).mkdir(parents=True, exist_ok=True)
        for n in range(6):
            cv2.imwrite(str(images / c / f"{n}.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    db = prepare_image_dataset(images, folder / "db", val_size=6, seed=0, progress=False)
    net = folder / "tiny_ed.prototxt"
    net.write_text(TINY_NET.format(train=db["train"], val=db["val"], loss=TINY_LOSS if with_loss else ""))
    solver = folder / "solver.prototxt"
    solver.write_text(TINY_SOLVER.format(net=net.name))
    return solver


def fixed_input(batch: int, image_shape, classes: int, seed: int = 0, scale: float = 1.0):
    """(data float32 (B, C, H, W), label float32 (B,)) from a seeded generator."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((batch, *image_shape)) * scale).astype(np.float32)
    y = rng.integers(0, classes, batch).astype(np.float32)
    return x, y


def rel_err(a, b) -> float:
    """max|a - b| / max(1e-8, max|b|)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(1e-8, float(np.abs(b).max()))) if b.size else 0.0


def one_iteration(folder: Path, variant: str, data_prefix: str, data_dir: Path, tmp: Path, snapshot: bool = True):
    """One training iteration at batch 2, then one test batch, of the shipped ``folder``'s
    train_val/solver pair ``variant`` with its data paths (``"data_prefix...``) moved to
    ``data_dir``; returns (net path, the solver as used, results). ``snapshot``: the final one."""
    from exdrop.proto import caffe_pb2
    from exdrop.run.train import Trainer, TrainConfig
    folder = ROOT / folder
    text = (folder / f"train_val_{variant}.prototxt").read_text()
    assert text.count(f'"{data_prefix}') == 2, "a TRAIN and a TEST data layer"
    net_path = Path(tmp) / f"train_val_{variant}.prototxt"
    net_path.write_text(text.replace(f'"{data_prefix}', f'"{data_dir}/'))
    sp = cio.read_solver_prototxt(folder / f"solver_{variant}.prototxt")
    used = caffe_pb2.SolverParameter()
    used.CopyFrom(sp)
    used.net = str(net_path)
    used.snapshot_after_train = snapshot
    solver = Path(tmp) / "solver.prototxt"
    solver.write_text(text_format.MessageToString(used))
    cfg = TrainConfig(solver=str(solver), out=str(Path(tmp) / "run"), max_iter=1, batch_size=2, test_iter=1,
                      device="cpu", progress=False, utilization=None)
    res = Trainer(cfg).run()
    assert res["status"] == "finished" and res["iterations"] == 1 and np.isfinite(res["train_loss"])
    return net_path, sp, res


__all__ = ["ROOT", "require_pycaffe", "CNN2", "CNN2_SOLVER", "TRAIN", "TEST", "cnn2_param", "write_param", "write_cnn2",
           "write_misc", "MISC_SHAPES", "write_tiny", "fixed_input", "rel_err",
           "one_iteration"]


def train_tiny(folder, max_iter: int) -> Path:
    """The tiny solver in ``folder`` trained ``max_iter`` iterations on CPU; returns its run folder."""
    from exdrop.cli import main
    folder = Path(folder)
    solver = write_tiny(folder)
    assert main(["train", str(solver), "--out", str(folder / "run"), "--max-iter", str(max_iter), "--device", "cpu",
                 "--quiet"]) == 0
    return folder / "run"
