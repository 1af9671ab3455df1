"""Wide residual networks (Zagoruyko and Komodakis 2016) as Caffe prototxts, for Sec. 5 of the
paper: WRN-28-10 on CIFAR-10 with Activation Dropout in place of its dropout.

``python -m exdrop.experiments.wrn`` (run by ``make prototxt``) writes ``prototxt/wrn/cifar10/``:
``train_val_<variant>.prototxt`` for WRN-28-10 (variants: activation, ed, standard, none) and
``solver_<variant>.prototxt`` (the Sec. 5 recipe: SGD with momentum 0.9 and Nesterov, lr 0.1
x0.2 at epochs 60 / 120 / 160 of 200, batch 128, weight decay 5e-4). ``wrn_net(depth, width, ...)``
gives any depth and width (the differential tests use WRN-10-1).

The architecture: a 3x3 convolution to 16 channels, then three groups of (depth - 4) / 6
pre-activation blocks of widths 16k, 32k, 64k (stride 2 at the start of groups 2 and 3);
a block is BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 added to its shortcut (the identity, or a
1x1 convolution of the pre-activated input where the shape changes); then BN-ReLU, 8x8
average pooling and the classifier. Caffe form: BatchNorm + Scale (bias) per BN, Eltwise SUM.
"""
from __future__ import annotations

import sys
from pathlib import Path

from google.protobuf import text_format

from exdrop.paths import REPO_ROOT
from exdrop.proto import caffe_pb2

ROOT = REPO_ROOT   # the checkout: prototxt/, layers/ (exdrop.paths)
OUT = ROOT / "prototxt" / "wrn" / "cifar10"
MEAN_BGR = (113.87, 122.95, 125.31)     # the CIFAR-10 training set's, as the CNN-2 prototxts
DROPOUT = {   # the dropout between a block's convolutions
    "activation": ("Python", "activation_dropout", "ActivationDropout"),
    "ed": ("Python", "excitation_dropout", "ExcitationDropout"),   # EB through the residual head above it
    "standard": ("Dropout", None, None),
    "none": (None, None, None),
}
RATE = 0.3   # WRN's dropout rate


def _layer(net, name, type_, bottoms, tops, **fields):
    lp = net.layer.add(name=name, type=type_)
    lp.bottom.extend(bottoms)
    lp.top.extend(tops)
    for key, value in fields.items():
        getattr(lp, key).CopyFrom(value)
    return lp


def _conv(net, name, bottom, out, kernel, stride=1):
    p = caffe_pb2.ConvolutionParameter(num_output=out, kernel_size=[kernel], stride=[stride], pad=[kernel // 2],
                                       bias_term=False)
    p.weight_filler.type = "msra"
    _layer(net, name, "Convolution", [bottom], [name], convolution_param=p)
    return name


def _bn_relu(net, name, bottom):
    """BatchNorm + Scale + ReLU into a new blob ``name`` (the bottom is kept for the shortcut)."""
    _layer(net, f"{name}_bn", "BatchNorm", [bottom], [name])
    _layer(net, f"{name}_scale", "Scale", [name], [name], scale_param=caffe_pb2.ScaleParameter(bias_term=True))
    _layer(net, f"{name}_relu", "ReLU", [name], [name])
    return name


def _dropout(net, name, blob, variant, rate):
    kind, module, cls = DROPOUT[variant]
    if kind == "Dropout":
        _layer(net, name, "Dropout", [blob], [blob], dropout_param=caffe_pb2.DropoutParameter(dropout_ratio=rate))
    elif kind == "Python":
        p = caffe_pb2.PythonParameter(module=module, layer=cls, param_str=f"{{'dropout_ratio': {rate}}}")
        _layer(net, name, "Python", [blob], [blob], python_param=p)


def wrn_net(depth: int = 28, width: int = 10, variant: str = "activation", classes: int = 10, rate: float = RATE,
            batch: int = 128, test_batch: int = 100, train_source: str = "data/cifar10/train_lmdb",
            test_source: str = "data/cifar10/val_lmdb", input_shape=None) -> caffe_pb2.NetParameter:
    """A WRN-``depth``-``width`` NetParameter (Data layers, or one Input of ``input_shape``)."""
    if (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4, got {depth}")
    if variant not in DROPOUT:
        raise ValueError(f"variant must be one of {', '.join(DROPOUT)}")
    n = (depth - 4) // 6
    net = caffe_pb2.NetParameter(name=f"WRN_{depth}_{width}_{variant}")
    if input_shape is not None:
        p = caffe_pb2.InputParameter()
        p.shape.add().dim.extend(input_shape)
        p.shape.add().dim.extend(input_shape[:1])
        _layer(net, "data", "Input", [], ["data", "label"], input_param=p)
    else:
        for phase, source, size, mirror in ((caffe_pb2.TRAIN, train_source, batch, True),
                                            (caffe_pb2.TEST, test_source, test_batch, False)):
            # (Zagoruyko's random crops of a 4-pixel padded image have no Caffe transform: mirror only)
            t = caffe_pb2.TransformationParameter(scale=0.00390625, mirror=mirror, mean_value=MEAN_BGR)
            lp = _layer(net, "data", "Data", [], ["data", "label"], transform_param=t,
                        data_param=caffe_pb2.DataParameter(source=source, batch_size=size,
                                                           backend=caffe_pb2.DataParameter.LMDB))
            lp.include.add(phase=phase)
    x = _conv(net, "conv1", "data", 16, 3)
    channels = 16
    for g, out in enumerate((16 * width, 32 * width, 64 * width), start=1):
        for b in range(1, n + 1):
            stride = 2 if g > 1 and b == 1 else 1
            name = f"g{g}b{b}"
            pre = _bn_relu(net, f"{name}_pre", x)
            h = _conv(net, f"{name}_conv1", pre, out, 3, stride)
            h = _bn_relu(net, f"{name}_mid", h)
            _dropout(net, f"{name}_drop", h, variant, rate)
            h = _conv(net, f"{name}_conv2", h, out, 3)
            short = x if channels == out and stride == 1 else _conv(net, f"{name}_short", pre, out, 1, stride)
            _layer(net, f"{name}_sum", "Eltwise", [h, short], [f"{name}_sum"])
            x, channels = f"{name}_sum", out
    x = _bn_relu(net, "final", x)
    pool = caffe_pb2.PoolingParameter(pool=caffe_pb2.PoolingParameter.AVE, global_pooling=True)
    _layer(net, "pool", "Pooling", [x], ["pool"], pooling_param=pool)
    ip = caffe_pb2.InnerProductParameter(num_output=classes)
    ip.weight_filler.type = "msra"
    _layer(net, "fc", "InnerProduct", ["pool"], ["fc"], inner_product_param=ip)
    acc = _layer(net, "accuracy", "Accuracy", ["fc", "label"], ["accuracy"])
    if input_shape is None:
        acc.include.add(phase=caffe_pb2.TEST)
    _layer(net, "loss", "SoftmaxWithLoss", ["fc", "label"], ["loss"])
    return net


def solver(net_path: str, variant: str, train_images: int = 45000, batch: int = 128) -> caffe_pb2.SolverParameter:
    """Sec. 5's recipe for WRN-28-10: Nesterov SGD, lr 0.1, x0.2 at epochs 60 / 120 / 160, 200 epochs, batch 128."""
    per_epoch = -(-train_images // batch)
    sp = caffe_pb2.SolverParameter(net=net_path, type="Nesterov", base_lr=0.1, momentum=0.9, weight_decay=5e-4,
                                   lr_policy="multistep", gamma=0.2, max_iter=200 * per_epoch,
                                   test_interval=per_epoch, test_iter=[50], display=100,
                                   snapshot=20 * per_epoch, random_seed=1,
                                   snapshot_prefix=f"models/wrn_cifar10_{variant}/wrn28_10_{variant}")
    sp.stepvalue.extend(e * per_epoch for e in (60, 120, 160))
    sp.test_initialization = False
    return sp


def write_all(out: Path = OUT) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for variant in DROPOUT:
        net_path = out / f"train_val_{variant}.prototxt"
        head = (f"# WRN-28-10 on CIFAR-10 (Sec. 5 of the paper), dropout between each block's convolutions: "
                f"{variant}.\n# Generated by `python -m exdrop.experiments.wrn` (make prototxt): edit exdrop/experiments/wrn.py, not this file.\n")
        net_path.write_text(head + text_format.MessageToString(wrn_net(variant=variant)))
        sp = solver(f"prototxt/wrn/cifar10/{net_path.name}", variant)   # the committed place, relative to the repo
        solver_path = out / f"solver_{variant}.prototxt"
        solver_path.write_text(f"# Sec. 5's WRN-28-10 recipe (Nesterov SGD, lr 0.1 x0.2 at epochs 60/120/160, batch 128).\n"
                               f"# Generated by `python -m exdrop.experiments.wrn`.\n" + text_format.MessageToString(sp))
        written += [net_path, solver_path]
    return written


def main(argv=None) -> int:
    for path in write_all():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
