"""Excitation Backprop on a real ``caffe.Net``: numpy blobs, the engine's rules.

Caffe has no EB mode (that lived in the authors' fork), so the Caffe backend
reads the net's blobs and parameters after a forward pass and applies the
very same rules as the engine (:mod:`exdrop.eb`, run on CPU tensors that view
the numpy arrays). Layer geometry (stride, pad, group, pooling kind) comes
from the prototxt, parsed with exdrop's schema, matched by layer name.

In-place layers are handled the Caffe way: a blob name holds its latest
value, so a walk keyed by blob name, going backwards over the layers, sees
each layer's input as Caffe left it. (For ReLU the post-ReLU blob has the same
sign pattern as its input, which is all the ReLU rule needs.)
"""
from __future__ import annotations

import numpy as np
import torch

from . import eb
from .layer_types import _hw, _pair_or
from .proto import caffe_pb2

IDENTITY_TYPES = {"LRN", "Dropout", "BatchNorm", "Scale", "Python", "Flatten", "Reshape", "Split"}


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class CaffeExcitation:
    """EB over a pycaffe ``net`` built from ``net_param`` (the same prototxt, parsed by exdrop)."""

    def __init__(self, net, net_param):
        self.net = net
        self.params = {lp.name: lp for lp in net_param.layer}
        self.names = list(net._layer_names)
        self.types = [l.type for l in net.layers]

    def layer_index(self, name: str) -> int:
        return self.names.index(name)

    def producer(self, blob: str, before: int | None = None) -> int:
        """Index of the last layer (before ``before``) that writes ``blob``."""
        end = len(self.names) if before is None else before
        for i in range(end - 1, -1, -1):
            if blob in self.net.top_names[self.names[i]]:
                return i
        raise KeyError(f"no layer produces blob '{blob}'")

    def excitation(self, bottom: str, top: str, classes: np.ndarray, stop_after: int | None = None) -> np.ndarray:
        """p_EB at blob ``bottom`` from a one-hot of ``classes`` at blob ``top``.

        Walks from the layer producing ``top`` down to (not including) layer
        ``stop_after`` (default: the last producer of ``bottom`` before it).
        """
        start = self.producer(top)
        stop = self.producer(bottom, start) if stop_after is None else stop_after
        logits = _t(self.net.blobs[top].data)
        signals = {top: eb.one_hot_signal(logits, torch.as_tensor(classes).reshape(-1).long())}
        for i in range(start, stop, -1):
            name = self.names[i]
            tops = list(self.net.top_names[name])
            if not any(t in signals for t in tops):
                continue
            top_sig = [signals.pop(t, None) for t in tops]
            bottoms = list(self.net.bottom_names[name])
            for b, s in zip(bottoms, self._rule(i, name, bottoms, top_sig)):
                if s is not None:
                    signals[b] = signals[b] + s if b in signals else s
        out = signals.get(bottom)
        if out is None:
            return np.zeros_like(self.net.blobs[bottom].data, dtype=np.float32)
        return out.numpy()

    def _rule(self, i, name, bottoms, top_sig):
        kind = self.types[i]
        x = [_t(self.net.blobs[b].data) for b in bottoms]
        lp = self.params.get(name)
        if kind == "InnerProduct":
            w = _t(self.net.layers[i].blobs[0].data)
            if lp is not None and lp.inner_product_param.transpose:
                w = w.t()
            return [eb.eb_linear(x[0], w, top_sig[0])]
        if kind == "Convolution":
            p = lp.convolution_param
            w = _t(self.net.layers[i].blobs[0].data)
            dil = list(p.dilation) or [1]
            return [eb.eb_conv2d(x[0], w, top_sig[0], _hw(p, "stride", "stride_h", "stride_w", 1),
                                 _hw(p, "pad", "pad_h", "pad_w", 0), (dil[0], dil[-1]), p.group)]
        if kind == "ReLU":
            return [eb.eb_relu(x[0], top_sig[0], lp.relu_param.negative_slope if lp else 0.0)]
        if kind == "Pooling":
            p = lp.pooling_param
            if p.global_pooling:
                k, s, pad = tuple(x[0].shape[2:]), (1, 1), (0, 0)
            else:
                k = _hw(p, "kernel_size", "kernel_h", "kernel_w", None)
                s = _pair_or(p, "stride", "stride_h", "stride_w")
                pad = _pair_or(p, "pad", "pad_h", "pad_w")
            if p.pool == caffe_pb2.PoolingParameter.MAX:
                return [eb.eb_max_pool2d(x[0], top_sig[0], k, s, pad)]
            return [eb.eb_avg_pool2d(x[0], top_sig[0], k, s, pad)]
        if kind == "Concat":
            p = lp.concat_param
            axis = p.concat_dim if p.HasField("concat_dim") else p.axis
            return list(torch.split(top_sig[0], [xi.shape[axis] for xi in x], dim=axis))
        if kind == "Eltwise":
            return eb.eb_eltwise_sum(x, top_sig[0], list(lp.eltwise_param.coeff) or None)
        if kind == "Split":
            got = [s for s in top_sig if s is not None]
            return [sum(got)]
        if kind in IDENTITY_TYPES:
            return [top_sig[0].reshape(x[0].shape)]
        raise ValueError(f"layer '{name}' (type {kind}): Excitation Backprop has no rule for this layer type")
