"""Information Dropout (Achille & Soatto, TPAMI 2018) as a Caffe Python layer.

    layer {
      name: "drop" type: "Python" bottom: "ip1" bottom: "pool3" top: "ip1" top: "drop_kl"
      loss_weight: 0 loss_weight: 6e-05   # beta / N_train = 3 / 50000
      param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
      python_param { module: "information_dropout" layer: "InformationDropout"
                     param_str: "{'max_alpha': 0.7}" }
    }

bottom[0] = f, the blob to noise (post-ReLU ``ip1``, in place); bottom[1] = x,
the input of the layer that produced f (``pool3`` for CNN-2's ip1), flattened
as InnerProduct does; with one bottom alpha is computed from f itself.
TRAIN: ``f * exp(alpha(x) * eps)``, eps ~ N(0, 1) per element drawn with
torch's CPU generator; TEST: f unchanged.
``alpha(x) = 0.001 + max_alpha * sigmoid(x W^T + b)``; W ``(N_f, D_x)`` and b
``(N_f,)`` are the layer's two learnable blobs (InnerProduct's layout, so the
``param`` specs and .caffemodel files treat them as any layer's). On a
convolution blob ``(B, C, H, W)`` alpha is a 1x1 convolution of x ``(B, C_x, H,
W)`` (W ``(C, C_x, 1, 1)``), one alpha per element.

top[1] (optional) is the KL term with the log-uniform prior,
``mean over images of sum over units of -log(alpha / (max_alpha + 0.001))``, a
scalar blob of shape () like Caffe's loss tops. Its ``loss_weight`` is
beta / N_train: Achille and Soatto's code adds ``beta * KL / N_train`` (N_train
training images, beta 3 for CIFAR) to the loss, and so do the shipped
prototxts (3 / 50000 on CIFAR; the sweep sets it from each run's training set).
It is computed in TEST too (deterministic, reported as a test output; the
engine does the same).

param_str keys: max_alpha (default 0.7), weight_std (std of W's normal init;
default None = msra, sqrt(2 / fan_in), fan_in = D_x or C_x), bias (b's initial
value, default 0). The init draws from torch's global generator.

Backward, by hand as Caffe runs it (out = f * m, m = exp(alpha * eps)):
d out / d f = m; d out / d alpha = out * eps; d KL / d alpha = -1 / (B alpha)
per unit; d alpha / d pre = max_alpha * s (1 - s), s the sigmoid; then pre =
x W^T + b gives W, b and x. The loss weight of the KL top is read from
top[1].diff, where Caffe put it. Parameter diffs are accumulated (Caffe zeroes
them before each iteration, and its own layers add into them).
"""
import math

import numpy as np
import torch

from exdrop.engine import functional as Fx
from exdrop.nn import InformationDropout as _Module
from exdrop.engine.pylayer import TRAIN, caffe_module, parse_param_str

caffe = caffe_module()

DEFAULTS = {"max_alpha": 0.7, "weight_std": None, "bias": 0.0}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class InformationDropout(caffe.Layer):
    defaults = DEFAULTS
    is_dropout = True  # the identity at test time, and so for Excitation Backprop (bottom[0] -> top[0])

    @classmethod
    def parse(cls, param_str) -> dict:
        given = parse_param_str(param_str, cls.__name__ + " param_str")
        unknown = set(given) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown param_str keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        checks = {"max_alpha": (lambda v: _number(v) and v > 0, "a finite number > 0"),
                  "weight_std": (lambda v: v is None or (_number(v) and v >= 0), "None or a finite number >= 0"),
                  "bias": (_number, "a finite number")}
        for key, value in given.items():
            ok, what = checks[key]
            if not ok(value):
                raise ValueError(f"{cls.__name__} param_str: {key} must be {what}, got {value!r}")
        return {**DEFAULTS, **given}

    @staticmethod
    def torch_module(params, phase):
        return _Module(max_alpha=params["max_alpha"], weight_std=params["weight_std"], bias=params["bias"])

    # ------------------------------------------------------------------ Caffe's calls
    def setup(self, bottom, top):
        if not 1 <= len(bottom) <= 2 or not 1 <= len(top) <= 2:
            raise Exception(f"{type(self).__name__} takes bottoms f (and x) and tops f (and the KL term), "
                            f"got {len(bottom)} bottoms and {len(top)} tops")
        self.params = self.parse(self.param_str)
        self.max_alpha = float(self.params["max_alpha"])
        f_shape, x_shape = tuple(bottom[0].data.shape), tuple(bottom[-1].data.shape)
        try:
            weight, bias = Fx.information_blobs(f_shape, x_shape, self.params["weight_std"], self.params["bias"])
        except ValueError as exc:
            raise Exception(f"{type(self).__name__}: {exc}") from None
        if len(self.blobs) == 0:   # Caffe then copies trained blobs over these (by layer name)
            for value in (weight, bias):
                self.blobs.add_blob(*value.shape)
                self.blobs[len(self.blobs) - 1].data[...] = value.numpy()
        self.cache = None

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)
        if len(top) > 1:
            top[1].reshape()   # a scalar, as Caffe's loss layers' tops

    def forward(self, bottom, top):
        f = torch.from_numpy(np.array(bottom[0].data, dtype=np.float32))   # a copy: top[0] may be bottom[0]
        x = f if len(bottom) == 1 else torch.from_numpy(np.array(bottom[1].data, dtype=np.float32))
        weight, bias = (torch.from_numpy(np.ascontiguousarray(b.data, dtype=np.float32)) for b in self.blobs)
        alpha, gate = Fx.information_alpha(x, weight, bias, self.max_alpha, with_gate=True)
        if self.phase == TRAIN:
            eps = Fx.information_noise(f)
            mult = torch.exp(alpha * eps)
            out = f * mult
        else:
            eps = mult = None
            out = f
        top[0].data[...] = out.numpy()
        if len(top) > 1:
            top[1].data[...] = Fx.information_kl(alpha, self.max_alpha).numpy()
        self.cache = (f, x, alpha, gate, eps, mult, out)

    def backward(self, top, propagate_down, bottom):
        f, x, alpha, gate, eps, mult, out = self.cache
        g = torch.from_numpy(np.array(top[0].diff, dtype=np.float32))   # read before bottom[0].diff is written
        grad_f = g if mult is None else g * mult
        grad_alpha = torch.zeros_like(alpha) if eps is None else g * out * eps
        if len(top) > 1:
            kl_weight = float(np.asarray(top[1].diff).reshape(-1)[0])   # the top's loss_weight, set by Caffe
            grad_alpha = grad_alpha - kl_weight / (f.shape[0] * alpha)
        grad_pre = grad_alpha * (self.max_alpha * gate * (1.0 - gate))
        weight = torch.from_numpy(np.ascontiguousarray(self.blobs[0].data, dtype=np.float32))
        spatial = weight.dim() == 4   # a 1x1 convolution: one row per pixel
        rows_pre, rows_x = _rows(grad_pre, spatial), _rows(x, spatial)
        self.blobs[0].diff[...] += (rows_pre.t() @ rows_x).reshape(weight.shape).numpy()
        self.blobs[1].diff[...] += rows_pre.sum(0).numpy()
        grad_x = _unrows(rows_pre @ weight.reshape(weight.shape[0], -1), x.shape, spatial)
        if len(bottom) == 1:
            if propagate_down[0]:
                bottom[0].diff[...] = (grad_f + grad_x).numpy()
            return
        if propagate_down[0]:
            bottom[0].diff[...] = grad_f.numpy()
        if propagate_down[1]:
            bottom[1].diff[...] = grad_x.numpy()


def _rows(t: torch.Tensor, spatial: bool) -> torch.Tensor:
    """One row per place the alpha map applies: (B, D) flattened, or (B*H*W, C) channels last."""
    return t.movedim(1, -1).reshape(-1, t.shape[1]) if spatial else t.reshape(t.shape[0], -1)


def _unrows(rows: torch.Tensor, shape, spatial: bool) -> torch.Tensor:
    """Back from :func:`_rows` to a blob of ``shape``."""
    if spatial:
        b, c, h, w = shape
        return rows.reshape(b, h, w, c).movedim(-1, 1)
    return rows.reshape(shape)
