"""Excitation Backprop (Zhang et al. 2016), batched, one rule per layer kind.

EB replaces the backward pass of each layer with a probabilistic Winner-Take-
All step (Eqns 1-2 of the paper): a unit passes its top-down probability to
its children in proportion to ``x_i * w_ij^+``. For a layer with input X and
non-negative weights W+ this is, per image::

    Z = X W+            (the layer's forward on X with W+, no bias)
    S = top / Z         (0 where Z == 0: that mass is lost, never NaN)
    bottom = X * (S W+^T)

Probability is conserved wherever Z > 0. Every rule runs in float32 (1e-20
style epsilons vanish in half precision) and under ``torch.no_grad``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input


def safe_divide(top: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``top / z`` with 0 where ``z == 0`` (the original Caffe EB: no epsilon)."""
    nonzero = z != 0
    return torch.where(nonzero, top / torch.where(nonzero, z, torch.ones_like(z)), torch.zeros_like(top))


def eb_linear(x: torch.Tensor, weight: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """InnerProduct: ``x`` (B, ...) flattened to (B, K), ``weight`` (N, K), ``top`` (B, N)."""
    xf = x.float().flatten(1)
    wp = weight.float().clamp_min(0)
    s = safe_divide(top.float(), xf @ wp.t())
    return (xf * (s @ wp)).reshape(x.shape)


def eb_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    top: torch.Tensor,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """Convolution: convolve X with W+, divide, transposed convolution with W+, times X."""
    x = x.float()
    wp = weight.float().clamp_min(0)
    z = F.conv2d(x, wp, None, stride, padding, dilation, groups)
    s = safe_divide(top.float(), z)
    return x * conv2d_input(x.shape, wp, s, stride, padding, dilation, groups)


def eb_relu(x: torch.Tensor, top: torch.Tensor, negative_slope: float = 0.0) -> torch.Tensor:
    """ReLU: the ordinary backward (the signal passes where the input is positive)."""
    if negative_slope == 0.0:
        return torch.where(x > 0, top, torch.zeros_like(top))
    return torch.where(x > 0, top, top * negative_slope)


def eb_max_pool2d(x: torch.Tensor, top: torch.Tensor, kernel, stride, padding,
                  dilation=1, ceil_mode: bool = True) -> torch.Tensor:
    """Max pooling: every window's probability goes to its argmax (Caffe: ceil mode)."""
    _, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
    b, c, h, w = x.shape
    out = torch.zeros(b, c, h * w, dtype=torch.float32, device=x.device)
    out.scatter_add_(2, idx.flatten(2), top.float().flatten(2))
    return out.view(b, c, h, w)


def eb_avg_pool2d(x: torch.Tensor, top: torch.Tensor, kernel, stride, padding,
                  ceil_mode: bool = True, count_include_pad: bool = True) -> torch.Tensor:
    """Average pooling: each window splits its probability in proportion to its inputs."""
    x = x.float()
    z = F.avg_pool2d(x, kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    s = safe_divide(top.float(), z)
    back = torch.ops.aten.avg_pool2d_backward(s, x, _pair(kernel), _pair(stride), _pair(padding),
                                              ceil_mode, count_include_pad, None)
    return x * back


def eb_eltwise_sum(xs: list[torch.Tensor], top: torch.Tensor, coeffs=None) -> list[torch.Tensor]:
    """Eltwise SUM: each input gets the share it contributed to the sum."""
    coeffs = coeffs or [1.0] * len(xs)
    parts = [c * x.float() for c, x in zip(coeffs, xs)]
    s = safe_divide(top.float(), sum(parts))
    return [p * s for p in parts]


def one_hot_signal(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The top signal: a one-hot of ``classes`` (B,) over the logits' classes, float32."""
    sig = torch.zeros(logits.shape[0], logits[0].numel(), dtype=torch.float32, device=logits.device)
    sig.scatter_(1, classes.long().view(-1, 1), 1.0)
    return sig.view(logits.shape)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
