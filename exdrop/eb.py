"""Excitation Backprop (Zhang et al. 2016), batched: the math kernels and the one walk.

EB replaces the backward pass of each layer with a probabilistic Winner-Take-
All step (Eqns 1-2 of the paper): a unit passes its top-down probability to
its children in proportion to ``x_i * w_ij^+``. For a layer with input X and
non-negative weights W+ this is, per image::

    Z = X W+            (the layer's forward on X with W+, no bias)
    S = top / Z         (0 where Z == 0: that mass is lost, never NaN)
    bottom = X * (S W+^T)

Probability is conserved wherever Z > 0. Every kernel runs in float32 (1e-20
style epsilons vanish in half precision) and under ``torch.no_grad``.

Which kernel a layer uses, with which geometry, is the layer type's rule in
:mod:`exdrop.layer_types` (one table keyed by Caffe type). The engine, the
real-Caffe backend and the drop-in modules all go through :func:`walk` with
those rules, start from :func:`top_signal`, and pick the class with
:func:`signal_classes`.
"""
from __future__ import annotations

from typing import Callable, Hashable, NamedTuple, Sequence

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


# ----------------------------------------------------------------- the top signal
def top_signal(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The top signal: a one-hot of ``classes`` (B,) over the logits' classes, float32."""
    sig = torch.zeros(logits.shape[0], logits[0].numel(), dtype=torch.float32, device=logits.device)
    sig.scatter_(1, classes.long().view(-1, 1).to(logits.device), 1.0)
    return sig.view(logits.shape)


one_hot_signal = top_signal


def signal_classes(signal, logits: torch.Tensor, labels=None, where: str = "ExcitationDropout") -> torch.Tensor:
    """The class of each image's top signal, ``(B,)`` long.

    ``signal``: ``"gt"`` the ground truth (``labels``, the paper's training
    signal), ``"pred"`` the predicted class (argmax of ``logits``), or an int
    class index for every image. ``where`` names the layer in errors.
    """
    if signal == "gt":
        if labels is None:
            raise ValueError(f"{where}: the ground-truth top signal (signal 'gt') needs the labels: "
                             "give the label blob (or `target`), or use signal 'pred' or a class index")
        return torch.as_tensor(labels).reshape(-1).long().to(logits.device)
    if signal == "pred":
        return logits.detach().flatten(1).argmax(1)
    if isinstance(signal, bool) or not isinstance(signal, (int, str)):
        raise ValueError(f"{where}: signal must be 'gt', 'pred' or a class index, got {signal!r}")
    try:
        k = int(signal)
    except ValueError:
        raise ValueError(f"{where}: signal must be 'gt', 'pred' or a class index, got {signal!r}") from None
    classes = logits[0].numel()
    if not 0 <= k < classes:
        raise ValueError(f"{where}: signal class {k} is outside the logits' {classes} classes")
    return torch.full((logits.shape[0],), k, dtype=torch.long, device=logits.device)


def signal_blobs(layer_params, params: dict, layer: str, source: str = "<net>") -> tuple[str, str | None]:
    """(logits blob, label blob) for a guided layer: ``params`` 'logits' / 'label', else the
    bottoms of the net's first SoftmaxWithLoss among ``layer_params`` (LayerParameters)."""
    loss = next((lp for lp in layer_params if lp.type == "SoftmaxWithLoss"), None)
    logits = params.get("logits") or (loss.bottom[0] if loss is not None else None)
    label = params.get("label") or (loss.bottom[1] if loss is not None and len(loss.bottom) > 1 else None)
    if logits is None:
        raise ValueError(f"{source}: layer '{layer}' needs the logits blob for Excitation Backprop: "
                         "add a SoftmaxWithLoss layer or set 'logits' in its param_str")
    return logits, label


# ----------------------------------------------------------------- the walk
class Step(NamedTuple):
    """One layer on the way down: its rule (bound to its geometry and weights), its input
    tensors, and the keys under which the walk files the signals of its bottoms and tops
    (blob names on the Caffe side, tensor ids in the engine, positions in a Sequential)."""

    rule: Callable[[list, list], list]
    bottoms: list
    bottom_keys: list
    top_keys: list


def walk(steps: Sequence[Step], signals: dict, target: Hashable) -> torch.Tensor | None:
    """Run ``steps`` backwards from ``signals`` (key -> top-down probability); p_EB at ``target``.

    A step whose tops carry no signal is skipped; signals reaching one key from several
    layers (a blob consumed twice) add up. Returns None when nothing reaches ``target``.
    """
    signals = dict(signals)
    for step in reversed(steps):
        top_sig = [signals.pop(k, None) for k in step.top_keys]
        if all(s is None for s in top_sig):
            continue
        for key, s in zip(step.bottom_keys, step.rule(step.bottoms, top_sig)):
            if s is not None:
                signals[key] = signals[key] + s if key in signals else s
    return signals.get(target)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
