"""Caffe layer types on PyTorch: one class per type, registered by Caffe's name.

``REGISTRY`` is the one table of layer types. Each class parses its
``LayerParameter`` once into a geometry, creates its learnable blobs in
Caffe's order (weights, then bias) with Caffe's fillers, reports its top
shapes, runs ``forward`` on tensors, and holds the type's Excitation Backprop
rule (``eb_rule``), which the engine (``Net``), the real-Caffe backend
(:mod:`exdrop.caffe.eb`) and the drop-in modules (:mod:`exdrop.engine.nn`, through
``torch_modules``) all apply. Adding a layer type is one class here. Errors
name the layer.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair  # torch's (h, w) helper
from torch import nn

from exdrop.engine import eb
from exdrop.engine.pylayer import TEST, TRAIN, load_layer_class, parse_param_str
from exdrop.proto import caffe_pb2

REGISTRY: dict[str, type["Layer"]] = {}        # Caffe type name -> layer type
TORCH_MODULES: dict[type, type["Layer"]] = {}  # torch.nn module class -> layer type


class LayerError(ValueError):
    """A problem with one layer of a net: the message names the layer."""


def register(*names):
    """Class decorator: the layer type of Caffe ``names`` (and of its ``torch_modules``)."""
    def deco(cls):
        for n in names:
            REGISTRY[n] = cls
        for t in cls.torch_modules:
            TORCH_MODULES[t] = cls
        return cls
    return deco


# ----------------------------------------------------------------- fillers
def fill(shape: tuple[int, ...], filler, generator: torch.Generator | None = None) -> torch.Tensor:
    """Caffe's fillers (src/caffe/filler.hpp): constant, gaussian, uniform, xavier, msra."""
    t = torch.empty(shape, dtype=torch.float32)
    kind = filler.type if filler.HasField("type") else "constant"
    count = t.numel()
    fan_in = count // shape[0] if shape else 1
    fan_out = count // shape[1] if len(shape) > 1 else 1
    norm = filler.variance_norm
    n = {caffe_pb2.FillerParameter.FAN_IN: fan_in,
         caffe_pb2.FillerParameter.FAN_OUT: fan_out}.get(norm, (fan_in + fan_out) / 2.0)
    if kind == "constant":
        t.fill_(filler.value)
    elif kind == "gaussian":
        t.normal_(filler.mean, filler.std, generator=generator)
        if filler.sparse >= 0:
            raise ValueError("gaussian filler with `sparse` is not supported")
    elif kind == "uniform":
        t.uniform_(filler.min, filler.max, generator=generator)
    elif kind == "xavier":
        scale = math.sqrt(3.0 / n)
        t.uniform_(-scale, scale, generator=generator)
    elif kind == "msra":
        t.normal_(0.0, math.sqrt(2.0 / n), generator=generator)
    else:
        raise ValueError(f"unknown filler type '{kind}' (constant, gaussian, uniform, xavier, msra)")
    return t


# ----------------------------------------------------------------- base
class Layer(nn.Module):
    """One Caffe layer type: its geometry, forward, EB rule and torch.nn counterparts.

    A subclass is the whole of a layer type, registered under its Caffe name:

    * ``geometry(lp, bottom_shapes)`` parses the LayerParameter once (kernel,
      stride, axis, ...); the engine's forward, the engine's EB and the
      real-Caffe backend's EB all read that one result;
    * ``__init__`` creates the learnable blobs (Caffe's order and fillers) and
      ``self.top_shapes``; ``forward`` runs on tensors;
    * ``eb_rule(g, bottoms, weights, signals)`` is the Excitation Backprop rule:
      the bottoms' top-down probabilities from the tops' (None where a top
      carries none), given the geometry and the layer's weights (Caffe's blob
      order) -- the one rule of this type, used by every backend;
    * ``torch_modules`` and ``module_geometry(m, x)`` map ``torch.nn`` modules
      onto the type, so the drop-in modules of :mod:`exdrop.engine.nn` use the same rule.

    Errors name the layer.
    """

    n_bottom: tuple[int, int] = (1, 1)  # min, max number of bottoms
    is_dropout = False  # the identity at test time and for EB
    is_loss = False
    torch_modules: tuple[type, ...] = ()

    def __init__(self, lp, bottom_shapes: list[tuple], phase: int, **context):
        super().__init__()
        self.lp, self.phase = lp, phase
        self.name, self.type = lp.name, lp.type
        lo, hi = self.n_bottom
        if not lo <= len(bottom_shapes) <= hi:
            self.fail(f"takes {lo}..{hi} bottoms, got {len(bottom_shapes)}")
        self.blobs = nn.ParameterList()
        self.top_shapes: list[tuple] = []
        try:
            self.g = self.geometry(lp, [tuple(s) for s in bottom_shapes], **context)
        except LayerError:
            raise
        except ValueError as exc:
            self.fail(str(exc))

    # -- the type's description, shared by every backend
    @staticmethod
    def geometry(lp, bottom_shapes: list[tuple]) -> SimpleNamespace:
        return SimpleNamespace()

    @staticmethod
    def eb_rule(g, bottoms, weights, signals):
        raise NotImplementedError("Excitation Backprop has no rule for this layer type")

    @classmethod
    def module_geometry(cls, m: nn.Module, x: torch.Tensor) -> tuple[SimpleNamespace, list]:
        return SimpleNamespace(), []

    # -- engine side
    def fail(self, msg: str):
        raise LayerError(f"layer '{self.name}' (type {self.type}): {msg}")

    def add_blob(self, shape: tuple[int, ...], filler) -> None:
        try:
            self.blobs.append(nn.Parameter(fill(tuple(shape), filler)))
        except ValueError as exc:
            self.fail(str(exc))

    def param_spec(self, i: int):
        """(lr_mult, decay_mult, name) of learnable blob i, Caffe's defaults 1, 1."""
        if i < len(self.lp.param):
            p = self.lp.param[i]
            return p.lr_mult, p.decay_mult, p.name
        return 1.0, 1.0, ""

    def excite_rule(self):
        """This layer's EB rule, bound to its geometry and current weights: ``rule(bottoms, signals)``."""
        return bound_rule(type(self), self.g, list(self.blobs), f"layer '{self.name}' (type {self.type})")


def bound_rule(kind: type[Layer], g, weights: list, where: str):
    """``kind``'s EB rule bound to one layer's geometry and weights: ``rule(bottoms, signals)``."""
    def rule(bottoms, signals):
        try:
            return kind.eb_rule(g, bottoms, weights, signals)
        except (ValueError, NotImplementedError) as exc:
            raise LayerError(f"{where}: {exc}") from None
    return rule


def module_layer(m: nn.Module, x: torch.Tensor):
    """(layer type, bound EB rule) of a torch module, for the drop-in modules' walk."""
    if getattr(m, "is_dropout", False) or isinstance(m, nn.modules.dropout._DropoutNd):
        kind = REGISTRY["Dropout"]
    else:
        kind = next((TORCH_MODULES[t] for t in type(m).__mro__ if t in TORCH_MODULES), None)
        if kind is None:
            raise TypeError(f"Excitation Backprop has no rule for {type(m).__name__}: map it onto a Caffe "
                            "layer type (`torch_modules` of a class in exdrop/engine/layer_types.py)")
    try:
        g, weights = kind.module_geometry(m, x)
    except ValueError as exc:
        raise TypeError(f"Excitation Backprop does not support {m}: {exc}") from None
    return kind, bound_rule(kind, g, weights, f"module {type(m).__name__}")


# ----------------------------------------------------------------- helpers
def canonical_axis(axis: int, ndim: int, what: str = "axis") -> int:
    """Caffe's Blob::CanonicalAxisIndex: -ndim <= axis < ndim, negative counts from the end."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what} {axis} is out of range for a {ndim}-axis bottom")
    return axis % ndim


def positive(name: str, values, minimum: int = 1):
    """Caffe's CHECK_GT(value, 0) on geometry fields (``minimum`` 0 for pads)."""
    for v in values:
        if v < minimum:
            raise ValueError(f"{name} must be {'positive' if minimum == 1 else '>= 0'}, got {v}")
    return values


def _hw(param, single: str, h: str, w: str, default: int | None):
    """Caffe's repeated-or-(h, w) geometry fields, e.g. kernel_size / kernel_h, kernel_w."""
    if param.HasField(h) != param.HasField(w):
        raise ValueError(f"{h} and {w} must be given together")
    raw = getattr(param, single)
    if param.HasField(h):
        if (param.HasField(single) if isinstance(raw, int) else len(raw)):
            raise ValueError(f"give {single} or {h} and {w}, not both")
        return int(getattr(param, h)), int(getattr(param, w))
    if isinstance(raw, int):  # PoolingParameter's fields are scalars
        vals = [raw] if param.HasField(single) else []
    else:
        vals = list(raw)
    if not vals:
        if default is None:
            raise ValueError(f"{single} is required")
        return default, default
    if len(vals) == 1:
        return int(vals[0]), int(vals[0])
    if len(vals) == 2:
        return int(vals[0]), int(vals[1])
    raise ValueError(f"{single}: only 2-D geometry is supported, got {vals}")


def _pair_or(param, single: str, h: str, w: str) -> tuple[int, int]:
    """A scalar field with (h, w) overrides, e.g. PoolingParameter's stride / stride_h, stride_w."""
    if param.HasField(h) != param.HasField(w):
        raise ValueError(f"{h} and {w} must be given together")
    if param.HasField(h):
        return int(getattr(param, h)), int(getattr(param, w))
    v = int(getattr(param, single))
    return v, v


def caffe_pooled_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Caffe's pooling output size: rounded up, the last window starting inside the image."""
    out = int(math.ceil((size + 2 * pad - kernel) / stride)) + 1
    if pad > 0 and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def conv_out_size(size, kernel, stride, pad, dilation):
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


def _same_shape(g, bottoms, weights, signals):
    """The EB rule of layers that keep each unit where it is (LRN, Dropout, Flatten, ...)."""
    return [signals[0].reshape(bottoms[0].shape)]


# ----------------------------------------------------------------- vision layers
@register("Convolution")
class Convolution(Layer):
    torch_modules = (nn.Conv2d,)

    @staticmethod
    def geometry(lp, bottom_shapes):
        p = lp.convolution_param
        if len(bottom_shapes[0]) != 4 or p.axis != 1:
            raise ValueError(f"only 2-D convolution on (N, C, H, W) is supported, got bottom {bottom_shapes[0]}")
        dil = list(p.dilation) or [1]
        if len(dil) > 2:
            raise ValueError(f"dilation: only 2-D geometry is supported, got {dil}")
        positive("group", [p.group])
        return SimpleNamespace(kernel=positive("kernel size", _hw(p, "kernel_size", "kernel_h", "kernel_w", None)),
                               stride=positive("stride", _hw(p, "stride", "stride_h", "stride_w", 1)),
                               pad=_hw(p, "pad", "pad_h", "pad_w", 0),
                               dilation=positive("dilation", (dil[0], dil[-1])), groups=p.group)

    @staticmethod
    def eb_rule(g, bottoms, weights, signals):
        return [eb.eb_conv2d(bottoms[0], weights[0], signals[0], g.stride, g.pad, g.dilation, g.groups)]

    @classmethod
    def module_geometry(cls, m, x):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError("EB supports Conv2d with numeric zero padding only")
        return SimpleNamespace(kernel=m.kernel_size, stride=m.stride, pad=m.padding, dilation=m.dilation,
                               groups=m.groups), [m.weight]

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        p, g, shape = lp.convolution_param, self.g, bottom_shapes[0]
        c = shape[1]
        if p.num_output <= 0:
            self.fail("num_output must be positive")
        if c % g.groups or p.num_output % g.groups:
            self.fail(f"channels ({c}) and num_output ({p.num_output}) must be divisible by group ({g.groups})")
        self.add_blob((p.num_output, c // g.groups) + g.kernel, p.weight_filler)
        self.bias_term = p.bias_term
        if self.bias_term:
            self.add_blob((p.num_output,), p.bias_filler)
        h, w = (conv_out_size(shape[2 + i], g.kernel[i], g.stride[i], g.pad[i], g.dilation[i]) for i in range(2))
        if h <= 0 or w <= 0:
            self.fail(f"input {shape[2:]} is smaller than the kernel {g.kernel}")
        self.top_shapes = [(shape[0], p.num_output, h, w)]

    def forward(self, x):
        g = self.g
        return F.conv2d(x, self.blobs[0], self.blobs[1] if self.bias_term else None,
                        g.stride, g.pad, g.dilation, g.groups)


@register("InnerProduct")
class InnerProduct(Layer):
    torch_modules = (nn.Linear,)

    @staticmethod
    def geometry(lp, bottom_shapes):
        p = lp.inner_product_param
        positive("num_output", [p.num_output])
        return SimpleNamespace(axis=canonical_axis(p.axis, len(bottom_shapes[0])), transpose=p.transpose)

    @staticmethod
    def eb_rule(g, bottoms, weights, signals):
        if g.axis != 1:
            raise ValueError("Excitation Backprop supports InnerProduct with axis 1 only")
        w = weights[0].t() if g.transpose else weights[0]
        return [eb.eb_linear(bottoms[0], w, signals[0])]

    @classmethod
    def module_geometry(cls, m, x):
        return SimpleNamespace(axis=1, transpose=False), [m.weight]

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        p, shape = lp.inner_product_param, bottom_shapes[0]
        k = int(np.prod(shape[self.g.axis:]))
        self.add_blob((k, p.num_output) if self.g.transpose else (p.num_output, k), p.weight_filler)
        self.bias_term = p.bias_term
        if self.bias_term:
            self.add_blob((p.num_output,), p.bias_filler)
        self.top_shapes = [tuple(shape[: self.g.axis]) + (p.num_output,)]

    def weight(self):
        return self.blobs[0].t() if self.g.transpose else self.blobs[0]

    def forward(self, x):
        bias = self.blobs[1] if self.bias_term else None
        return F.linear(x.flatten(self.g.axis), self.weight(), bias)


@register("Pooling")
class Pooling(Layer):
    """Caffe's pooling: windows rounded up (ceil mode), AVE divides by the padded window."""

    torch_modules = (nn.MaxPool2d, nn.AvgPool2d)

    @staticmethod
    def geometry(lp, bottom_shapes):
        p, shape = lp.pooling_param, bottom_shapes[0]
        if len(shape) != 4:
            raise ValueError(f"needs a (N, C, H, W) bottom, got {shape}")
        if p.pool == caffe_pb2.PoolingParameter.STOCHASTIC:
            raise ValueError("STOCHASTIC pooling is not supported")
        if p.global_pooling:
            if any(p.HasField(f) for f in ("kernel_size", "kernel_h", "kernel_w")):
                raise ValueError("with global_pooling: true the kernel size cannot be specified")
            if _pair_or(p, "pad", "pad_h", "pad_w") != (0, 0) or _pair_or(p, "stride", "stride_h", "stride_w") != (1, 1):
                raise ValueError("with global_pooling: true only pad 0 and stride 1 are supported")
            kernel, stride, pad = tuple(shape[2:]), (1, 1), (0, 0)
        else:
            if not any(p.HasField(f) for f in ("kernel_size", "kernel_h", "kernel_w")):
                raise ValueError("kernel_size (or kernel_h and kernel_w) is required")
            kernel = positive("kernel size", _hw(p, "kernel_size", "kernel_h", "kernel_w", None))
            stride = positive("stride", _pair_or(p, "stride", "stride_h", "stride_w"))
            pad = _pair_or(p, "pad", "pad_h", "pad_w")
        return SimpleNamespace(max=p.pool == caffe_pb2.PoolingParameter.MAX, kernel=kernel, stride=stride,
                               pad=pad, dilation=(1, 1), ceil_mode=True, count_include_pad=True)

    @staticmethod
    def eb_rule(g, bottoms, weights, signals):
        if g.max:
            return [eb.eb_max_pool2d(bottoms[0], signals[0], g.kernel, g.stride, g.pad, g.dilation, g.ceil_mode)]
        return [eb.eb_avg_pool2d(bottoms[0], signals[0], g.kernel, g.stride, g.pad, g.ceil_mode,
                                 g.count_include_pad)]

    @classmethod
    def module_geometry(cls, m, x):
        is_max = isinstance(m, nn.MaxPool2d)
        if not is_max and m.divisor_override:
            raise ValueError("AvgPool2d with divisor_override")
        return SimpleNamespace(max=is_max, kernel=_pair(m.kernel_size), stride=_pair(m.stride or m.kernel_size),
                               pad=_pair(m.padding), dilation=_pair(m.dilation) if is_max else (1, 1),
                               ceil_mode=m.ceil_mode,
                               count_include_pad=True if is_max else m.count_include_pad), []

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        g, shape = self.g, bottom_shapes[0]
        for k, pd in zip(g.kernel, g.pad):
            if pd >= k:
                self.fail(f"pad {g.pad} must be smaller than kernel {g.kernel}")
            if 2 * pd > k:
                self.fail(f"pad {g.pad} larger than half the kernel {g.kernel} is not supported")
        h, w = (caffe_pooled_size(shape[2 + i], g.kernel[i], g.stride[i], g.pad[i]) for i in range(2))
        for size, out, st, pd in zip(shape[2:], (h, w), g.stride, g.pad):
            if (out - 1) * st - pd >= size:  # Caffe keeps this window when pad == 0; it is empty
                self.fail(f"the last pooling window starts outside the {tuple(shape[2:])} input "
                          f"(kernel {g.kernel}, stride {g.stride}): Caffe gives it -FLT_MAX/0; "
                          "choose a stride <= kernel or add padding")
        self.top_shapes = [(shape[0], shape[1], h, w)]

    def forward(self, x):
        g = self.g
        if g.max:
            return F.max_pool2d(x, g.kernel, g.stride, g.pad, ceil_mode=True)
        return F.avg_pool2d(x, g.kernel, g.stride, g.pad, ceil_mode=True, count_include_pad=True)


@register("LRN")
class LRN(Layer):
    """Caffe's local response normalisation; EB passes through it unchanged."""

    torch_modules = (nn.LocalResponseNorm,)

    @staticmethod
    def geometry(lp, bottom_shapes):
        p = lp.lrn_param
        if p.local_size % 2 == 0:
            raise ValueError("local_size must be odd")
        return SimpleNamespace(size=p.local_size, alpha=p.alpha, beta=p.beta, k=p.k,
                               within=p.norm_region == caffe_pb2.LRNParameter.WITHIN_CHANNEL)

    eb_rule = staticmethod(_same_shape)

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        self.top_shapes = [tuple(bottom_shapes[0])]

    def forward(self, x):
        g = self.g
        if not g.within:
            return F.local_response_norm(x, g.size, g.alpha, g.beta, g.k)
        # Caffe: x * (1 + alpha * avgpool(x^2))^-beta over a size x size window (pad (size-1)/2).
        pad = (g.size - 1) // 2
        avg = F.avg_pool2d(x * x, g.size, 1, pad, ceil_mode=True, count_include_pad=True)
        return x * (1.0 + g.alpha * avg).pow(-g.beta)


@register("BatchNorm")
class BatchNorm(Layer):
    """Caffe's BatchNorm: normalisation only (a Scale layer after it holds gamma and beta).

    Three blobs, never learned (Caffe masks them from the solver): the running sums of the mean
    and of the variance and their scale factor. Without ``use_global_stats`` (the default in
    the TRAIN phase) a forward normalises with the batch's statistics over every axis but the
    channels and updates the sums, as Caffe's BatchNormLayer::Forward_cpu::

        s = s * f + 1;  mean_sum = mean_sum * f + mean;  var_sum = var_sum * f + m / (m - 1) * var

    (f the moving_average_fraction, m the values per channel); with it (TEST) it uses
    ``mean_sum / s`` and ``var_sum / s``. The engine updates the sums in the forward of a
    training step (autograd on), not in the guided layers' no-grad re-runs of the head. EB
    passes through unchanged (the original Caffe EB).
    """

    eb_rule = staticmethod(_same_shape)

    @staticmethod
    def geometry(lp, bottom_shapes):
        if len(bottom_shapes[0]) < 2:
            raise ValueError(f"needs a channel axis, got shape {bottom_shapes[0]}")
        p = lp.batch_norm_param
        return SimpleNamespace(channels=bottom_shapes[0][1], fraction=p.moving_average_fraction, eps=p.eps,
                               global_stats=p.use_global_stats if p.HasField("use_global_stats") else None)

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        self.top_shapes = [tuple(bottom_shapes[0])]
        c = self.g.channels
        for shape in ((c,), (c,), (1,)):
            self.blobs.append(nn.Parameter(torch.zeros(shape), requires_grad=False))
        self.global_stats = self.g.global_stats if self.g.global_stats is not None else phase == TEST

    def param_spec(self, i: int):
        return 0.0, 0.0, self.lp.param[i].name if i < len(self.lp.param) else ""

    def forward(self, x):
        g, dims = self.g, [0, *range(2, x.dim())]
        view = (1, -1) + (1,) * (x.dim() - 2)
        xf = x.float()
        if self.global_stats:
            s = self.blobs[2][0]
            factor = torch.where(s == 0, torch.zeros_like(s), 1.0 / torch.where(s == 0, torch.ones_like(s), s))
            mean, var = self.blobs[0] * factor, self.blobs[1] * factor
        else:
            mean = xf.mean(dims)
            var = (xf - mean.view(view)).pow(2).mean(dims)
            if torch.is_grad_enabled():
                m = x.numel() // g.channels
                with torch.no_grad():
                    self.blobs[2].mul_(g.fraction).add_(1.0)
                    self.blobs[0].mul_(g.fraction).add_(mean.detach())
                    self.blobs[1].mul_(g.fraction).add_(var.detach() * (m / (m - 1) if m > 1 else 1.0))
        return ((xf - mean.view(view)) / torch.sqrt(var.view(view) + g.eps)).to(x.dtype)


@register("Scale")
class Scale(Layer):
    """Caffe's Scale with one bottom: ``top = x * gamma (+ beta)`` over ``num_axes`` axes from
    ``axis`` (gamma's filler defaults to constant 1, as Caffe's). EB passes through unchanged."""

    eb_rule = staticmethod(_same_shape)

    @staticmethod
    def geometry(lp, bottom_shapes):
        p, shape = lp.scale_param, bottom_shapes[0]
        axis = p.axis + len(shape) if p.axis < 0 else p.axis
        n = len(shape) - axis if p.num_axes == -1 else p.num_axes
        if not 0 <= axis <= len(shape) or axis + n > len(shape):
            raise ValueError(f"axis {p.axis} and num_axes {p.num_axes} do not fit the bottom shape {shape}")
        return SimpleNamespace(axis=axis, shape=tuple(shape[axis:axis + n]), bias=p.bias_term,
                               after=len(shape) - axis - n)

    def __init__(self, lp, bottom_shapes, phase):
        if len(bottom_shapes) != 1:
            raise LayerError(f"layer '{lp.name}' (type Scale): only the one-bottom form (learned scale) is supported")
        super().__init__(lp, bottom_shapes, phase)
        self.top_shapes = [tuple(bottom_shapes[0])]
        p = lp.scale_param
        self.add_blob(self.g.shape, p.filler if p.HasField("filler") else caffe_pb2.FillerParameter(type="constant",
                                                                                                   value=1.0))
        if self.g.bias:
            self.add_blob(self.g.shape, p.bias_filler)

    def forward(self, x):
        view = (1,) * self.g.axis + self.g.shape + (1,) * self.g.after
        y = x * self.blobs[0].view(view)
        return y + self.blobs[1].view(view) if self.g.bias else y


# ----------------------------------------------------------------- activations & dropout
@register("ReLU")
class ReLU(Layer):
    torch_modules = (nn.ReLU, nn.LeakyReLU)

    @staticmethod
    def geometry(lp, bottom_shapes):
        return SimpleNamespace(slope=lp.relu_param.negative_slope)

    @staticmethod
    def eb_rule(g, bottoms, weights, signals):
        return [eb.eb_relu(bottoms[0], signals[0], g.slope)]

    @classmethod
    def module_geometry(cls, m, x):
        return SimpleNamespace(slope=getattr(m, "negative_slope", 0.0)), []

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        self.top_shapes = [tuple(bottom_shapes[0])]

    def forward(self, x):
        return F.relu(x) if self.g.slope == 0 else F.leaky_relu(x, self.g.slope)


@register("Dropout")
class Dropout(Layer):
    """Caffe's Dropout: an independent Bernoulli(1 - ratio) draw per element, scale 1/(1 - ratio)."""

    is_dropout = True
    eb_rule = staticmethod(_same_shape)

    @staticmethod
    def geometry(lp, bottom_shapes):
        ratio = lp.dropout_param.dropout_ratio
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"dropout_ratio must be in [0, 1), got {ratio}")
        return SimpleNamespace(ratio=ratio)

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        self.top_shapes = [tuple(bottom_shapes[0])]

    def forward(self, x):
        return F.dropout(x, self.g.ratio, training=self.training and self.phase == TRAIN)


@register("Softmax")
class Softmax(Layer):
    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        try:
            self.axis = canonical_axis(lp.softmax_param.axis, len(bottom_shapes[0]))
        except ValueError as exc:
            self.fail(str(exc))
        self.top_shapes = [tuple(bottom_shapes[0])]

    def forward(self, x):
        return F.softmax(x, dim=self.axis)


# ----------------------------------------------------------------- shape layers
@register("Flatten")
class Flatten(Layer):
    torch_modules = (nn.Flatten, nn.Unflatten, nn.Identity)
    eb_rule = staticmethod(_same_shape)

    @staticmethod
    def geometry(lp, bottom_shapes):
        p, shape = lp.flatten_param, bottom_shapes[0]
        start, end = canonical_axis(p.axis, len(shape)), canonical_axis(p.end_axis, len(shape), "end_axis")
        if end < start:
            raise ValueError(f"end_axis {p.end_axis} comes before axis {p.axis}")
        return SimpleNamespace(start=start, end=end)

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        a, e, shape = self.g.start, self.g.end, bottom_shapes[0]
        self.top_shapes = [tuple(shape[:a]) + (int(np.prod(shape[a:e + 1])),) + tuple(shape[e + 1:])]

    def forward(self, x):
        return x.flatten(self.g.start, self.g.end)


@register("Reshape")
class Reshape(Layer):
    eb_rule = staticmethod(_same_shape)

    @staticmethod
    def geometry(lp, bottom_shapes):
        p, shape = lp.reshape_param, list(bottom_shapes[0])
        start = p.axis % (len(shape) + 1) if p.axis < 0 else p.axis
        end = len(shape) if p.num_axes == -1 else start + p.num_axes
        if not 0 <= start <= end <= len(shape) or p.num_axes < -1:
            raise ValueError(f"axis {p.axis} / num_axes {p.num_axes} do not fit a {len(shape)}-axis bottom")
        dims = list(p.shape.dim)
        if any(d < -1 for d in dims) or dims.count(-1) > 1:
            raise ValueError(f"shape {dims}: dims must be >= 0, with at most one -1 (inferred)")
        if any(d == 0 and start + i >= end for i, d in enumerate(dims)):
            raise ValueError(f"shape {dims}: a 0 (copy) dim beyond the bottom's axes {tuple(shape)}")
        new = [shape[start + i] if d == 0 else d for i, d in enumerate(dims)]
        out = shape[:start] + new + shape[end:]
        if -1 in out:
            known = int(np.prod([d for d in out if d != -1]))
            if known == 0:
                raise ValueError(f"cannot infer the -1 dim of {tuple(out)}")
            out[out.index(-1)] = int(np.prod(shape)) // known
        if int(np.prod(out)) != int(np.prod(shape)):
            raise ValueError(f"cannot reshape {tuple(shape)} to {tuple(out)}")
        return SimpleNamespace(shape=tuple(out))

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        self.top_shapes = [self.g.shape]

    def forward(self, x):
        return x.reshape((x.shape[0],) + self.g.shape[1:])


@register("Concat")
class Concat(Layer):
    n_bottom = (1, 1 << 20)

    @staticmethod
    def geometry(lp, bottom_shapes):
        p, first = lp.concat_param, bottom_shapes[0]
        axis = canonical_axis(p.concat_dim if p.HasField("concat_dim") else p.axis, len(first))
        for s in bottom_shapes[1:]:
            if len(s) != len(first) or any(a != b for i, (a, b) in enumerate(zip(s, first)) if i != axis):
                raise ValueError(f"bottom shapes {bottom_shapes} differ outside the concat axis {axis}")
        return SimpleNamespace(axis=axis, sizes=[s[axis] for s in bottom_shapes])

    @staticmethod
    def eb_rule(g, bottoms, weights, signals):
        return list(torch.split(signals[0], g.sizes, dim=g.axis))

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        out = list(bottom_shapes[0])
        out[self.g.axis] = sum(self.g.sizes)
        self.top_shapes = [tuple(out)]

    def forward(self, *xs):
        return torch.cat(xs, dim=self.g.axis)


@register("Eltwise")
class Eltwise(Layer):
    n_bottom = (2, 1 << 20)

    @staticmethod
    def geometry(lp, bottom_shapes):
        p = lp.eltwise_param
        if any(tuple(s) != tuple(bottom_shapes[0]) for s in bottom_shapes):
            raise ValueError(f"bottoms must have equal shapes, got {bottom_shapes}")
        if len(p.coeff) and p.operation != caffe_pb2.EltwiseParameter.SUM:
            raise ValueError("coeff is only for the SUM operation")
        coeff = list(p.coeff) or [1.0] * len(bottom_shapes)
        if len(coeff) != len(bottom_shapes):
            raise ValueError("needs one coeff per bottom")
        return SimpleNamespace(op=p.operation, coeff=coeff)

    @staticmethod
    def eb_rule(g, bottoms, weights, signals):
        if g.op != caffe_pb2.EltwiseParameter.SUM:
            raise ValueError("Excitation Backprop supports Eltwise SUM only")
        return eb.eb_eltwise_sum(list(bottoms), signals[0], g.coeff)

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        self.top_shapes = [tuple(bottom_shapes[0])]

    def forward(self, *xs):
        if self.g.op == caffe_pb2.EltwiseParameter.PROD:
            out = xs[0]
            for x in xs[1:]:
                out = out * x
            return out
        if self.g.op == caffe_pb2.EltwiseParameter.MAX:
            return torch.stack(xs).amax(0)
        return sum(c * x for c, x in zip(self.g.coeff, xs))


@register("Split")
class Split(Layer):
    @staticmethod
    def eb_rule(g, bottoms, weights, signals):
        got = [s for s in signals if s is not None]
        return [sum(got) if got else None]

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        self.top_shapes = [tuple(bottom_shapes[0])] * len(lp.top)

    def forward(self, x):
        return tuple(x for _ in self.top_shapes)


@register("Silence")
class Silence(Layer):
    n_bottom = (1, 1 << 20)

    def forward(self, *xs):
        return ()


# ----------------------------------------------------------------- loss & metrics
def _check_labels(layer: Layer, logits_shape, label_shape, axis):
    outer = int(np.prod(logits_shape[:axis])) * int(np.prod(logits_shape[axis + 1:]))
    if int(np.prod(label_shape)) != outer:
        layer.fail(f"label count {int(np.prod(label_shape))} does not match prediction count {outer} "
                   f"(bottom shapes {tuple(logits_shape)} and {tuple(label_shape)})")


_NEG_LOG_FLT_MIN = -math.log(np.finfo(np.float32).tiny)  # 87.3365


def _class_last(x: torch.Tensor, axis: int) -> torch.Tensor:
    """(N, C, ...) -> (M, C) rows, one per prediction."""
    return x.movedim(axis, -1).reshape(-1, x.shape[axis])


@register("SoftmaxWithLoss")
class SoftmaxWithLoss(Layer):
    n_bottom = (2, 2)
    is_loss = True

    @staticmethod
    def geometry(lp, bottom_shapes):
        return SimpleNamespace(axis=canonical_axis(lp.softmax_param.axis, len(bottom_shapes[0])))

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        self.axis = self.g.axis
        _check_labels(self, bottom_shapes[0], bottom_shapes[1], self.axis)
        lp_loss = lp.loss_param
        self.ignore = lp_loss.ignore_label if lp_loss.HasField("ignore_label") else None
        norm = lp_loss.normalization
        if lp_loss.HasField("normalize") and not lp_loss.HasField("normalization"):
            norm = caffe_pb2.LossParameter.VALID if lp_loss.normalize else caffe_pb2.LossParameter.BATCH_SIZE
        self.norm = norm
        self.batch = bottom_shapes[0][0]
        self.top_shapes = [()] + ([tuple(bottom_shapes[0])] if len(lp.top) > 1 else [])

    def forward(self, logits, label):
        rows = _class_last(logits, self.axis).float()
        target = label.reshape(-1).long()
        ignore = -100 if self.ignore is None else self.ignore
        per = F.cross_entropy(rows, target, ignore_index=ignore, reduction="none")
        # Caffe takes -log(max(prob, FLT_MIN)): each loss term saturates at 87.34 while the
        # gradient stays softmax - onehot. Same value, same gradient here: the clamped value plus
        # a term that is exactly 0 (x - x) but carries per's gradient, so no cancellation can hide
        # a blow-up (per - (per - 87.34) is 0 in float32 once per reaches ~1e9).
        per = per.clamp(max=_NEG_LOG_FLT_MIN).detach() + (per - per.detach())
        total = per.sum()
        N = caffe_pb2.LossParameter
        if self.norm == N.VALID:
            denom = (target != ignore).sum().clamp_min(1) if self.ignore is not None else rows.shape[0]
        elif self.norm == N.FULL:
            denom = rows.shape[0]
        elif self.norm == N.BATCH_SIZE:
            denom = self.batch
        else:
            denom = 1
        loss = total / denom
        if len(self.top_shapes) > 1:
            return loss, F.softmax(logits, dim=self.axis)
        return loss


@register("Accuracy")
class Accuracy(Layer):
    n_bottom = (2, 2)

    @staticmethod
    def geometry(lp, bottom_shapes):
        p = lp.accuracy_param
        axis = canonical_axis(p.axis, len(bottom_shapes[0]))
        positive("top_k", [p.top_k])
        if p.top_k > bottom_shapes[0][axis]:
            raise ValueError(f"top_k {p.top_k} is more than the {bottom_shapes[0][axis]} classes")
        return SimpleNamespace(axis=axis)

    def __init__(self, lp, bottom_shapes, phase):
        super().__init__(lp, bottom_shapes, phase)
        p = lp.accuracy_param
        self.k, self.axis = p.top_k, self.g.axis
        self.ignore = p.ignore_label if p.HasField("ignore_label") else None
        _check_labels(self, bottom_shapes[0], bottom_shapes[1], self.axis)
        self.top_shapes = [()]

    def forward(self, scores, label):
        rows = _class_last(scores, self.axis)
        target = label.reshape(-1).long()
        valid = torch.ones_like(target, dtype=torch.bool) if self.ignore is None else target != self.ignore
        true_score = rows.gather(1, target.clamp_min(0).view(-1, 1))
        # Caffe counts a hit when fewer than top_k classes score strictly higher.
        hits = ((rows > true_score).sum(1) < self.k) & valid
        return hits.sum().float() / valid.sum().clamp_min(1).float()


# ----------------------------------------------------------------- Python layers
class _NumpyBlob:
    """What a Caffe Python layer sees: ``.data``, ``.diff``, ``.shape``, ``.reshape``."""

    def __init__(self, arr: np.ndarray | None = None, shape=()):
        self.data = arr if arr is not None else np.zeros(shape, np.float32)
        self.diff = np.zeros_like(self.data)

    @property
    def shape(self):
        return self.data.shape

    @property
    def count(self):
        return self.data.size

    @property
    def num(self):
        return self.data.shape[0]

    def reshape(self, *shape):
        if tuple(self.data.shape) != tuple(shape):
            self.data = np.zeros(shape, np.float32)
            self.diff = np.zeros(shape, np.float32)


@register("Python")
class Python(Layer):
    """``python_param { module layer param_str }``: a layer from ``layers/``.

    A layer class with a ``torch_module`` factory runs as a torch module (on
    any device, autograd included); any other Caffe Python layer runs through
    its numpy forward/backward, exactly as in Caffe. For Excitation Backprop a
    dropout layer (class attribute ``is_dropout``) is the identity from its
    first bottom to its first top (its other bottoms get no signal); other
    Python layers have no rule.

    A torch module with ``caffe_setup`` (e.g. Information Dropout) may take
    several bottoms and tops (``caffe_bottoms`` / ``caffe_tops``: (min, max))
    and own learnable blobs: ``caffe_setup(bottom_shapes, n_top)`` returns the
    top shapes and the filled blobs (Caffe's order), which become this layer's
    ``blobs`` (the solver, ``param { lr_mult decay_mult }``, sharing with the
    test net and .caffemodel files see them as any layer's), and
    ``caffe_forward(bottoms, blobs, n_top, training)`` computes the tops from
    them. A top with a ``loss_weight`` adds to the net's loss as in Caffe.
    """

    n_bottom = (0, 1 << 20)

    @staticmethod
    def geometry(lp, bottom_shapes, search_paths=None):
        pp = lp.python_param
        try:
            cls = load_layer_class(pp.module, pp.layer, lp.name, search_paths)
        except ImportError as exc:
            raise LayerError(str(exc)) from None
        if getattr(cls, "torch_module", None) is not None:
            params = cls.parse(pp.param_str) if hasattr(cls, "parse") else parse_param_str(pp.param_str)
        else:
            params = parse_param_str(pp.param_str)
        return SimpleNamespace(cls=cls, params=params, dropout=bool(getattr(cls, "is_dropout", False)))

    @staticmethod
    def eb_rule(g, bottoms, weights, signals):
        if not g.dropout:
            raise NotImplementedError(f"Excitation Backprop has no rule for the Python layer {g.cls.__name__} "
                                      "(only dropout layers, class attribute is_dropout, pass through)")
        first = None if signals[0] is None else _same_shape(g, bottoms, weights, signals)[0]
        return [first] + [None] * (len(bottoms) - 1)   # e.g. Information Dropout's x: no EB signal

    def __init__(self, lp, bottom_shapes, phase, search_paths=None):
        super().__init__(lp, bottom_shapes, phase, search_paths=search_paths)
        pp = lp.python_param
        self.cls, self.params = self.g.cls, self.g.params
        self.module = None
        factory = getattr(self.cls, "torch_module", None)
        if factory is not None:
            self.module = factory(self.params, "TRAIN" if phase == TRAIN else "TEST")
            self.is_dropout = self.g.dropout or bool(getattr(self.module, "is_dropout", False))
            self.g.dropout = self.is_dropout
            self.saliency = getattr(self.module, "saliency", None)
            if hasattr(self.module, "caffe_setup"):
                self._setup_module(bottom_shapes)
            elif len(bottom_shapes) != 1:
                self.fail("a guided dropout layer takes exactly one bottom")
            else:
                self.top_shapes = [tuple(bottom_shapes[0])]
        else:
            self.saliency = None
            self._init_numpy_layer(pp.param_str, bottom_shapes, phase)

    def _setup_module(self, bottom_shapes):
        """A torch module with several bottoms / tops and learnable blobs (``caffe_setup``)."""
        name = type(self.module).__name__
        for what, have, (lo, hi) in (("bottoms", len(bottom_shapes), getattr(self.module, "caffe_bottoms", (1, 1))),
                                     ("tops", len(self.lp.top), getattr(self.module, "caffe_tops", (1, 1)))):
            if not lo <= have <= hi:
                self.fail(f"{name} takes {lo}..{hi} {what}, the prototxt gives {have}")
        try:
            self.top_shapes, blobs = self.module.caffe_setup([tuple(s) for s in bottom_shapes], len(self.lp.top))
        except ValueError as exc:
            self.fail(f"{name}: {exc}")
        for b in blobs:
            self.blobs.append(nn.Parameter(b))

    def test_mode_tops(self, *xs) -> tuple:
        """A dropout layer's tops as in test mode (its first top is its first bottom), without
        drawing noise: Excitation Backprop's head pass through a multi-top dropout layer."""
        if self.module is not None and hasattr(self.module, "caffe_forward"):
            with torch.no_grad():
                tops = self.module.caffe_forward(list(xs), list(self.blobs), len(self.lp.top), training=False)
            return tops if isinstance(tops, tuple) else (tops,)
        if len(self.lp.top) > 1:
            self.fail("Excitation Backprop cannot run a multi-top dropout layer without a torch module "
                      "(caffe_forward) in test mode")
        return (xs[0],)

    # -- numpy bridge for ordinary Caffe Python layers
    def _init_numpy_layer(self, param_str, bottom_shapes, phase):
        try:
            obj = self.cls()
        except TypeError:  # a real caffe.Layer subclass wants a LayerParameter: skip its C++ constructor
            obj = self.cls.__new__(self.cls)
        obj.param_str, obj.phase = param_str, phase
        bottoms = [_NumpyBlob(shape=s) for s in bottom_shapes]
        tops = [_NumpyBlob() for _ in self.lp.top]
        try:
            obj.setup(bottoms, tops)
            obj.reshape(bottoms, tops)
        except Exception as exc:   # a Python layer's own check (Caffe prints it and stops)
            self.fail(f"{self.cls.__name__}.setup: {type(exc).__name__}: {exc}")
        self.obj = obj
        self.top_shapes = [t.shape for t in tops]

    def forward(self, *xs, saliency=None):
        if self.module is not None:
            if hasattr(self.module, "caffe_forward"):
                return self.module.caffe_forward(list(xs), list(self.blobs), len(self.lp.top))
            return self.module(xs[0], saliency)
        return _NumpyLayerFn.apply(self, *xs)


class _NumpyLayerFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layer, *xs):
        obj = layer.obj
        bottoms = [_NumpyBlob(x.detach().cpu().numpy().astype(np.float32, copy=True)) for x in xs]
        tops = [_NumpyBlob() for _ in layer.lp.top]
        obj.reshape(bottoms, tops)
        obj.forward(bottoms, tops)
        ctx.layer, ctx.blobs, ctx.device = layer, (bottoms, tops), xs[0].device if xs else "cpu"
        outs = tuple(torch.from_numpy(np.array(t.data, dtype=np.float32)).to(ctx.device) for t in tops)
        return outs if len(outs) != 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        bottoms, tops = ctx.blobs
        for t, g in zip(tops, grads):
            t.diff = g.detach().cpu().numpy().astype(np.float32) if g is not None else np.zeros_like(t.data)
        ctx.layer.obj.backward(tops, [True] * len(bottoms), bottoms)
        return (None,) + tuple(torch.from_numpy(np.array(b.diff, dtype=np.float32)).to(ctx.device) for b in bottoms)
