"""Weights in and out of the engine as Caffe ``.caffemodel`` files.

A caffemodel is a binary NetParameter whose layers carry their learnable
blobs in Caffe's order (weights, then bias). Loading matches layers by name,
like Caffe's ``Net::CopyTrainedLayersFrom``: layers of the file that the net
lacks are skipped; a blob count or shape mismatch is an error naming the layer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import io as cio
from .proto import caffe_pb2


def to_net_param(net) -> caffe_pb2.NetParameter:
    """The net's layers with their current blobs, as Caffe's ``Net::ToProto`` writes them."""
    out = caffe_pb2.NetParameter()
    out.name = net.name or "net"
    for layer in net.layer_list:
        lp = out.layer.add()
        lp.CopyFrom(layer.lp)
        del lp.blobs[:]
        for p in layer.blobs:
            lp.blobs.append(cio.array_to_blob(p.detach().float().cpu().numpy()))
    return out


def save_weights(net, path) -> None:
    cio.write_caffemodel(to_net_param(net), path)


def load_weights(net, path, strict_missing: bool = False) -> list[str]:
    """Copy blobs from a .caffemodel into ``net`` by layer name; returns the layers loaded."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} not found")
    src = cio.read_caffemodel(path)
    # V1 files (the model zoo's VGG/AlexNet) keep name and blobs in `layers`: enough to load by name.
    by_name = {l.name: l for l in (src.layer if len(src.layer) else src.layers)}
    loaded = []
    for layer in net.layer_list:
        if not len(layer.blobs):
            continue
        lp = by_name.get(layer.name)
        if lp is None:
            if strict_missing:
                raise ValueError(f"{path}: has no layer '{layer.name}'")
            continue
        if len(lp.blobs) != len(layer.blobs):
            raise ValueError(f"{path}: layer '{layer.name}' has {len(lp.blobs)} blobs, the net expects {len(layer.blobs)}")
        for i, (blob, p) in enumerate(zip(lp.blobs, layer.blobs)):
            arr = cio.blob_to_array(blob)
            if arr.size != p.numel() or (len(blob.shape.dim) and tuple(arr.shape) != tuple(p.shape)):
                raise ValueError(f"{path}: layer '{layer.name}' blob {i} has shape {tuple(arr.shape)}, "
                                 f"the net expects {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(torch.from_numpy(np.ascontiguousarray(arr.reshape(tuple(p.shape)))).to(p.device))
        loaded.append(layer.name)
    return loaded
