"""Shared Caffe-side plumbing for the dropout layers in this folder.

Caffe calls setup/reshape/forward/backward with numpy blobs; the masks come
from the same functional core the engine uses (exdrop.functional), run on
CPU tensors that view the numpy arrays. ``dropout_ratio`` (Caffe's
DropoutParameter name) is the probability of dropping a unit; the paper's base
retain probability is P = 1 - dropout_ratio.
"""
import numpy as np
import torch

from exdrop.engine.pylayer import TRAIN, caffe_module, parse_param_str  # noqa: F401 (TRAIN re-exported)

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
        unknown = set(given) - set(params)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown param_str keys {sorted(unknown)}; known: {sorted(params)}")
        for key, value in given.items():
            problem = _type_problem(key, value, params[key])
            if problem:
                raise ValueError(f"{cls.__name__} param_str: {key} must be {problem}, got {value!r}")
        params.update(given)
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


def _type_problem(key, value, default):
    """What ``value`` of param_str key ``key`` should be (judged by its default), or None if fine."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key == "dropout_ratio":
        return None if number and 0.0 <= value < 1.0 else "in [0, 1) (a number)"
    if key == "signal":
        if value in ("gt", "pred") or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return None
        return "'gt', 'pred' or a class index (an int >= 0)"
    if key == "count":
        return None if value in ("all", "alive") else "'all' (N of Eqn 3 is the layer's width) or 'alive'"
    if key == "gamma":
        return None if number and 0.0 <= value < float("inf") else "a number >= 0"
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "True or False"
    if isinstance(default, float):   # alpha, beta: any finite number, an int included
        return None if number and abs(value) < float("inf") else "a finite number"
    if default is None:   # blob names
        return None if value is None or (isinstance(value, str) and value) else "a blob name (a string)"
    return None if isinstance(value, type(default)) else f"of type {type(default).__name__}"
