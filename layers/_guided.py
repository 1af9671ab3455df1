"""Shared Caffe-side plumbing for the dropout layers in this folder.

Caffe calls setup/reshape/forward/backward with numpy blobs; the masks come
from the same functional core the engine uses (exdrop.functional), run on
CPU tensors that view the numpy arrays. ``dropout_ratio`` (Caffe's
DropoutParameter name) is the probability of dropping a unit; the paper's base
retain probability is P = 1 - dropout_ratio.
"""
import numpy as np
import torch

from exdrop.pylayer import TRAIN, caffe_module, parse_param_str  # noqa: F401 (TRAIN re-exported)

caffe = caffe_module()


class DropoutLayerBase(caffe.Layer):
    """setup/reshape/backward common to the mask-based dropout layers."""

    defaults: dict = {}
    is_dropout = True  # the identity at test time, and so for Excitation Backprop

    def setup(self, bottom, top):
        if len(bottom) != 1 or len(top) != 1:
            raise Exception(f"{type(self).__name__} takes one bottom and one top")
        self.params = self.parse(self.param_str)

    @classmethod
    def parse(cls, param_str):
        params = dict(cls.defaults)
        given = parse_param_str(param_str, cls.__name__ + " param_str")
        if "p" in given:
            raise ValueError(
                f"{cls.__name__} param_str: the key 'p' (the retain probability P) was renamed "
                f"'dropout_ratio', Caffe's DropoutParameter name, and now means the probability of "
                f"dropping: write {{'dropout_ratio': {1 - float(given['p']):g}}} for p {given['p']}")
        unknown = set(given) - set(params)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown param_str keys {sorted(unknown)}; known: {sorted(params)}")
        params.update(given)
        ratio = params.get("dropout_ratio")
        if ratio is not None and not 0.0 <= float(ratio) < 1.0:
            raise ValueError(f"{cls.__name__}: dropout_ratio must be in [0, 1), got {ratio}")
        return params

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        x = bottom[0].data
        if self.phase != TRAIN:
            self.mult = None
            top[0].data[...] = x
            return
        self.mult, self.grad_mult = self.multiplier(torch.from_numpy(np.ascontiguousarray(x)))
        top[0].data[...] = x * self.mult

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        g = top[0].diff
        bottom[0].diff[...] = g if self.mult is None else g * self.grad_mult

    def multiplier(self, x):
        """(forward multiplier, gradient multiplier) as numpy arrays broadcastable to x."""
        raise NotImplementedError
