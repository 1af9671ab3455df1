"""Excitation Backprop on a real ``caffe.Net``: numpy blobs, the engine's rules and walk.

Caffe has no EB mode (that lived in the authors' fork), so the Caffe backend
reads the net's blobs and parameters after a forward pass and runs the very
same walk (:func:`exdrop.engine.eb.walk`) with the very same rules (the layer types of
:mod:`exdrop.engine.layer_types`) as the engine, on CPU tensors that view the numpy
arrays. Each layer's geometry is parsed once, from the prototxt (matched by
layer name) and the net's blob shapes.

In-place layers are handled the Caffe way: the walk is keyed by blob name and a
blob holds its latest value, so going backwards over the layers each layer
sees its input as Caffe left it. (For ReLU the post-ReLU blob has the same
sign pattern as its input, which is all the ReLU rule needs.)
"""
from __future__ import annotations

import numpy as np
import torch

from exdrop.engine import eb
from exdrop.engine.graph import last_writer
from exdrop.engine.layer_types import REGISTRY, LayerError, bound_rule
from exdrop.proto import caffe_pb2


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class CaffeExcitation:
    """EB over a pycaffe ``net`` built from ``net_param`` (the same prototxt, parsed by exdrop)."""

    def __init__(self, net, net_param, source: str = "<net>"):
        self.net, self.source = net, source
        params = {lp.name: lp for lp in net_param.layer}
        self.names = list(net._layer_names)
        self.kinds, self.geometry = [], []
        for i, name in enumerate(self.names):
            kind_name = net.layers[i].type
            lp = params.get(name)
            if lp is None:  # a layer Caffe inserted itself (Split): rebuild its parameter
                lp = caffe_pb2.LayerParameter(name=name, type=kind_name, bottom=list(net.bottom_names[name]),
                                              top=list(net.top_names[name]))
            kind = REGISTRY.get(kind_name)
            shapes = [tuple(net.blobs[b].data.shape) for b in net.bottom_names[name]]
            try:
                g = kind.geometry(lp, shapes) if kind is not None else None
            except ValueError as exc:  # a layer the walk may never reach; the error waits for it
                g = exc
            self.kinds.append(kind)
            self.geometry.append(g)

    def layer_index(self, name: str) -> int:
        return self.names.index(name)

    def producer(self, blob: str, before: int | None = None) -> int:
        """Index of the last layer (before ``before``) that writes ``blob``."""
        i = last_writer([self.net.top_names[name] for name in self.names], blob, before)
        if i is None:
            raise KeyError(f"{self.source}: no layer produces blob '{blob}'")
        return i

    def _rule(self, i: int):
        name, kind, g = self.names[i], self.kinds[i], self.geometry[i]
        where = f"{self.source}: layer '{name}' (type {self.net.layers[i].type})"
        if kind is None:
            raise LayerError(f"{where}: Excitation Backprop has no rule for this layer type")
        if isinstance(g, Exception):
            raise LayerError(f"{where}: {g}")
        weights = [_t(b.data) for b in self.net.layers[i].blobs]
        return bound_rule(kind, g, weights, where)

    def excitation(self, bottom: str, top: str, classes, stop_after: int | None = None,
                   check_finite: bool = True) -> np.ndarray:
        """p_EB at blob ``bottom`` from a one-hot of ``classes`` at blob ``top``.

        Walks from the layer producing ``top`` down to (not including) layer
        ``stop_after`` (default: the last producer of ``bottom`` before it).
        ``check_finite``: a blob or weight on the walk that holds inf or NaN raises
        :class:`exdrop.engine.eb.NonFiniteError` naming it (the training step's hook turns
        it off: there a NaN keeps its units and reaches the loss, where the run loop
        names it).
        """
        start = self.producer(top)
        stop = self.producer(bottom, start) if stop_after is None else stop_after
        steps = []
        for i in range(stop + 1, start + 1):
            name = self.names[i]
            bottoms, tops = list(self.net.bottom_names[name]), list(self.net.top_names[name])
            steps.append(eb.Step(_LazyRule(self, i), [_t(self.net.blobs[b].data) for b in bottoms], bottoms, tops))
        if check_finite:
            items = []
            for k in eb.walked(steps, [top]):
                i, step = stop + 1 + k, steps[k]
                where = f"layer '{self.names[i]}'"
                items += [(f"blob '{b}' (bottom of {where})", x) for b, x in zip(step.bottom_keys, step.bottoms)]
                items += [(f"weight blob {w} of {where}", b.data) for w, b in enumerate(self.net.layers[i].blobs)]
            eb.require_finite(items, f"{self.source}: excitation({bottom!r})")
        logits = _t(self.net.blobs[top].data)
        signal = eb.top_signal(logits, torch.as_tensor(np.asarray(classes)).reshape(-1).long())
        out = eb.walk(steps, {top: signal}, bottom)
        if out is None:
            return np.zeros_like(self.net.blobs[bottom].data, dtype=np.float32)
        return out.numpy()


class _LazyRule:
    """Binds layer ``i``'s rule only when the walk reaches it (a layer off the path needs none)."""

    def __init__(self, walker: CaffeExcitation, i: int):
        self.walker, self.i = walker, i

    def __call__(self, bottoms, signals):
        return self.walker._rule(self.i)(bottoms, signals)
