"""Pretrained weights into a prototxt's net: the Model Zoo's ``.caffemodel`` files (V1 or V2
format) by layer name, and torchvision-style ``.pth`` state dicts (VGG16, VGG19, AlexNet) by
layer order, their input convention converted to the prototxt's.

    load_pretrained(net, path, transform=None) -> {"format", "loaded", "kept_filler", "skipped"}
    torch_to_caffe_conv1(w, b, transform) / caffe_to_torch_conv1(w, b, transform)
    fetch(name, folder)                       a Model Zoo file, sha1-checked (needs a network)

A torchvision model takes ``x_t = (rgb / 255 - mean_t) / std_t`` (RGB, 0..1, ImageNet mean
and std); a Caffe prototxt takes ``x_c = (bgr - mean_c) * scale`` (BGR, 0..255, its
``transform_param``). Both are affine in the pixel, so the first convolution absorbs the
change exactly: per output channel and BGR input channel c' (torch channel c = 2 - c')::

    W_c[:, c'] = W_t[:, c] / (255 * scale * std_t[c])
    b_c        = b_t + sum_{c', kh, kw} W_t[:, c, kh, kw] * (mean_c[c'] / 255 - mean_t[c]) / std_t[c]

Exact wherever the kernel lies inside the image. Where it overlaps the zero padding the two
conventions pad different pixels (torch pads x_t = 0, the pixel 255 * mean_t; Caffe x_c = 0,
the pixel mean_c), so border outputs of conv1 differ by the padded taps times that offset;
tests/test_pretrained.py measures what reaches the logits.

``.pth`` files are read with ``torch.load(weights_only=True)``: tensors only, nothing
unpickled that could run code. Convolution weights pair with the net's Convolution layers in
order, fully connected weights with its InnerProduct layers; a pair whose shapes differ (the
ImageNet classifier against the prototxt's UCF101 layer) is skipped and keeps its filler.
"""
from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

import torch

from exdrop.engine.snapshot import load_weights
from exdrop.proto import io as cio


__all__ = ["load_pretrained", "torch_to_caffe_conv1", "caffe_to_torch_conv1", "fetch", "MODEL_ZOO",
           "TORCHVISION_MEAN", "TORCHVISION_STD", "input_transform"]

# the Model Zoo's files: (URL, sha1)
MODEL_ZOO = {
    "bvlc_alexnet.caffemodel": ("http://dl.caffe.berkeleyvision.org/bvlc_alexnet.caffemodel",
                                "9116a64c0fbe4459d18f4bb6b56d647b63920377"),
    "VGG_ILSVRC_16_layers.caffemodel": ("http://www.robots.ox.ac.uk/~vgg/software/very_deep/caffe/"
                                        "VGG_ILSVRC_16_layers.caffemodel", "9363e1f6d65f7dba68c4f27a1e62105cdf6c4e24"),
    "VGG_ILSVRC_19_layers.caffemodel": ("http://www.robots.ox.ac.uk/~vgg/software/very_deep/caffe/"
                                        "VGG_ILSVRC_19_layers.caffemodel", "239785e7862442717d831f682bb824055e51e9ba"),
}
TORCHVISION_MEAN = (0.485, 0.456, 0.406)   # RGB, of pixels in 0..1
TORCHVISION_STD = (0.229, 0.224, 0.225)


def sha1(path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str, folder="data/weights") -> Path:
    """Download a Model Zoo file (MODEL_ZOO) into ``folder`` and check its sha1."""
    if name not in MODEL_ZOO:
        raise ValueError(f"{name}: not a known Model Zoo file ({', '.join(MODEL_ZOO)})")
    url, digest = MODEL_ZOO[name]
    path = Path(folder) / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(name + ".part")
        try:
            urllib.request.urlretrieve(url, tmp)
        except (urllib.error.URLError, OSError) as exc:
            raise FileNotFoundError(f"{path}: not here and the download failed ({exc}); fetch {url} on a machine "
                                    f"with a network and put it at {path}") from None
        tmp.replace(path)
    _check_known(path)
    return path


def _check_known(path: Path) -> None:
    known = MODEL_ZOO.get(path.name)
    digest = sha1(path) if known else None
    if known and digest != known[1]:
        raise ValueError(f"{path}: sha1 {digest} is not the Model Zoo file's {known[1]} (a truncated or other "
                         f"download? fetch {known[0]} again)")


def input_transform(param) -> dict:
    """The prototxt's input convention from its first data layer: {"mean_bgr": (3,), "scale": s}."""
    for lp in param.layer:
        if lp.type in ("Data", "ImageData") and len(lp.transform_param.mean_value) in (1, 3):
            mean = list(lp.transform_param.mean_value)
            tp = lp.transform_param
            return {"mean_bgr": tuple(mean * 3 if len(mean) == 1 else mean),
                    "scale": float(tp.scale) if tp.HasField("scale") else 1.0}
    raise ValueError(f"net '{param.name}': no data layer with 1 or 3 transform_param mean_value, which the "
                     "conversion of a torchvision first convolution needs (a mean_file is not supported)")


def torch_to_caffe_conv1(w: torch.Tensor, b: torch.Tensor, transform: dict):
    """A torchvision first convolution (RGB, 0..1, mean/std) rewritten for the prototxt's input."""
    mean_t = torch.tensor(TORCHVISION_MEAN, dtype=torch.float64)
    std_t = torch.tensor(TORCHVISION_STD, dtype=torch.float64)
    mean_c = torch.tensor(transform["mean_bgr"], dtype=torch.float64).flip(0)   # now RGB, 0..255
    w64, b64 = w.double(), b.double()
    offset = (mean_c / 255 - mean_t) / std_t                                   # per RGB channel
    b_new = b64 + (w64.sum(dim=(2, 3)) * offset).sum(1)
    w_new = (w64 / (255 * transform["scale"] * std_t).view(1, 3, 1, 1)).flip(1)  # RGB -> BGR
    return w_new.float(), b_new.float()


def caffe_to_torch_conv1(w: torch.Tensor, b: torch.Tensor, transform: dict):
    """The inverse of :func:`torch_to_caffe_conv1`."""
    mean_t = torch.tensor(TORCHVISION_MEAN, dtype=torch.float64)
    std_t = torch.tensor(TORCHVISION_STD, dtype=torch.float64)
    mean_c = torch.tensor(transform["mean_bgr"], dtype=torch.float64).flip(0)
    w_t = w.double().flip(1) * (255 * transform["scale"] * std_t).view(1, 3, 1, 1)
    b_t = b.double() - (w_t.sum(dim=(2, 3)) * ((mean_c / 255 - mean_t) / std_t)).sum(1)
    return w_t.float(), b_t.float()


def load_pretrained(net, path, transform: dict | None = None) -> dict:
    """Copy pretrained weights into ``net`` (an engine Net). ``.pth`` / ``.pt``: a torchvision-style
    state dict, its first convolution converted with ``transform`` (:func:`input_transform`);
    anything else: a .caffemodel, V1 or V2, by layer name (Model Zoo files are sha1-checked)."""
    path = Path(path)
    if not path.is_file():
        hint = f"; fetch {MODEL_ZOO[path.name][0]}" if path.name in MODEL_ZOO else ""
        raise FileNotFoundError(f"{path}: no such weights file{hint}")
    learnable = [layer.name for layer in net.layer_list if len(layer.blobs)]
    if path.suffix in (".pth", ".pt"):
        if transform is None:
            raise ValueError(f"{path}: a torchvision state dict needs the prototxt's input convention (transform)")
        loaded, skipped = _load_torchvision(net, path, transform)
        fmt = "torchvision state dict"
    else:
        _check_known(path)
        loaded, skipped = load_weights(net, path, allow_v1=True), []
        fmt = "caffemodel"
    if not loaded:
        raise ValueError(f"{path}: --weights loaded no layer of the net ({fmt}"
                         + (f"; shapes differ: {'; '.join(skipped)}" if skipped else
                            f"; the net's learnable layers are {', '.join(learnable)}, the file names none of them")
                         + "): training would start from the fillers")
    return {"format": fmt, "loaded": loaded, "skipped": skipped,
            "kept_filler": [n for n in learnable if n not in loaded]}


def check_caffemodel_names(path, learnable: list[str]) -> list[str]:
    """The layers of ``learnable`` that the .caffemodel ``path`` holds weights for; none is an error
    (real Caffe's ``copy_from`` would start from the fillers without a word)."""
    param = cio.read_caffemodel(path, allow_v1=True)
    held = {lp.name for lp in (*param.layer, *param.layers) if len(lp.blobs)}
    found = [n for n in learnable if n in held]
    if not found:
        raise ValueError(f"{path}: --weights loaded no layer of the net (caffemodel; the net's learnable layers are "
                         f"{', '.join(learnable)}, the file names {', '.join(sorted(held)) or 'no layer'}): "
                         "training would start from the fillers")
    return found


def _load_torchvision(net, path: Path, transform: dict):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # a pickle that needs code, or not a torch file at all
        raise ValueError(f"{path}: not a plain state dict of tensors ({exc}); only weights_only files load") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    weights = [k for k in state if k.endswith("weight") and state[k].dim() in (2, 4)]
    pairs = []
    for kind, dim in (("Convolution", 4), ("InnerProduct", 2)):
        theirs = [k for k in weights if state[k].dim() == dim]
        mine = [layer for layer in net.layer_list if layer.type == kind and len(layer.blobs)]
        if len(theirs) != len(mine):
            raise ValueError(f"{path}: {len(theirs)} {'convolution' if dim == 4 else 'linear'} weights, the net has "
                             f"{len(mine)} {kind} layers: not the same architecture")
        pairs += list(zip(theirs, mine))
    loaded, skipped = [], []
    first_conv = next((layer for layer in net.layer_list if layer.type == "Convolution"), None)
    for key, layer in pairs:
        w = state[key]
        b = state.get(key[:-len("weight")] + "bias")
        if tuple(w.shape) != tuple(layer.blobs[0].shape) or (b is not None and len(layer.blobs) > 1
                                                             and tuple(b.shape) != tuple(layer.blobs[1].shape)):
            skipped.append(f"{key} {tuple(w.shape)} -> {layer.name} {tuple(layer.blobs[0].shape)}")
            continue
        if layer is first_conv:
            w, b = torch_to_caffe_conv1(w, b if b is not None else torch.zeros(w.shape[0]), transform)
        with torch.no_grad():
            layer.blobs[0].copy_(w.to(layer.blobs[0].device))
            if len(layer.blobs) > 1 and b is not None:
                layer.blobs[1].copy_(b.reshape(layer.blobs[1].shape).to(layer.blobs[1].device))
        loaded.append(layer.name)
    return loaded, skipped
