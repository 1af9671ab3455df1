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
:mod:`exdrop.engine.layer_types` (one table keyed by Caffe type). The engine, the
real-Caffe backend and the drop-in modules all go through :func:`walk` with
those rules, start from :func:`top_signal`, and pick the class with
:func:`signal_classes`.
"""
from __future__ import annotations

import math
from typing import Callable, Hashable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair  # torch's (h, w) helper
from torch.nn.grad import conv2d_input

from exdrop.engine.graph import upstream


def safe_divide(top: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``top / z`` with 0 where ``z == 0`` (the original Caffe EB: no epsilon)."""
    nonzero = z != 0
    return torch.where(nonzero, top / torch.where(nonzero, z, torch.ones_like(z)), torch.zeros_like(top))


# ----------------------------------------------------------------- float32 range
# Caffe's EB evaluates bottom = X * ((top / (X W+)) W+^T) in float32 as written: Z overflows
# past ~1e38 (S = 0: the mass is silently lost), a subnormal Z makes S = top / Z overflow
# (inf, then inf * 0 = NaN), and products of small inputs underflow to Z = 0. The kernels
# below evaluate the very same expression on operands rescaled by powers of two, which is
# exact in binary floating point:
#
#   Xs = X * 2**-a            per image (per image and channel for pooling): max |Xs| ~ 1
#   Wn = W+ * 2**-c           per output unit / channel: max Wn ~ 1, so 0 <= Z < 16 * fan-in
#   S' = (top * 2**-k) / Z    per image, k from the exponent fields of top and Z such that
#                             |S'| * fan-out < 2**(_HEAD + 23): the back product cannot overflow
#   bottom = (Xs * (S' Wn^T)) * 2**k
#
# The factors cancel exactly, so wherever Caffe's float32 arithmetic neither overflows nor
# underflows the result is bit for bit Caffe's (Z == 0 -> 0, no epsilon); elsewhere it is the
# EB value rounded to float32 instead of inf, NaN or a silent 0. For every finite input the
# result is finite; for non-negative inputs (activations after a ReLU) every unit lies in
# [0, 1] up to rounding and the bottom's mass is the top mass that met Z > 0 (what is lost is
# only what lies more than ~2**-149 below the largest activation of an image or weight of a
# unit). A few batched elementwise ops, no host synchronisation. Non-finite inputs give
# unspecified (typically NaN) results: the analysis entry points refuse them
# (:func:`require_finite`) and guided dropout keeps a unit whose share is NaN.
_HEAD = 64
_NO_EXP = -1024


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """``2**e`` exactly, float32, for int32 ``e`` in [-126, 127] (built from the bits)."""
    return ((e + 127) << 23).view(torch.float32)


def _ldexp(t: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``t * 2**e`` for int32 ``e`` in [-252, 254], in two exact steps (no spurious under/overflow)."""
    h = e >> 1                       # floor(e / 2)
    return t * _pow2(h) * _pow2(e - h)


def _biased_exponent(t: torch.Tensor) -> torch.Tensor:
    """The float32 exponent field of ``t`` (int32): ``|t| < 2**(field - 126)``, and
    ``|t| >= 2**(field - 127)`` for normal numbers; 0 for zero and subnormals."""
    return (t.view(torch.int32) >> 23) & 0xFF


def _normalise(t: torch.Tensor, dims, nonneg: bool = False) -> torch.Tensor:
    """``t`` times a power of two per slice (``dims`` reduced) so that its max |value| lies in
    [1/2, 1) (in [2**-22, 4) at the ends of float32's range)."""
    m = (t if nonneg else t.abs()).amax(dim=dims, keepdim=True)
    e = torch.frexp(m)[1].clamp(-127, 126)        # 0 where m is 0, inf or NaN
    return t * _pow2(-e)


def _ceil_log2(n: int) -> int:
    return max(int(n) - 1, 0).bit_length()


def _ratio(top: torch.Tensor, z: torch.Tensor, fan_out: int, dims) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S', k)``: ``S' = top / z * 2**-k``, 0 where ``z == 0``, one int32 ``k`` per slice of
    ``dims`` (None: per element), chosen so that ``|S'| * fan_out <= 2**(_HEAD + 23)``."""
    nonzero = z != 0
    # |top / z| < 2**(d + 1) with d the difference of the exponent fields (a subnormal z,
    # field 0, may be up to 2**23 smaller than that says: the head room absorbs it)
    d = torch.where(nonzero, _biased_exponent(top) - _biased_exponent(z), torch.full_like(z, _NO_EXP, dtype=torch.int32))
    e_max = d if dims is None else d.amax(dim=dims, keepdim=True)
    k = torch.where(e_max > _NO_EXP, e_max + (1 + _ceil_log2(fan_out) - _HEAD), torch.zeros_like(e_max))
    k = k.clamp(-252, 252)
    s = torch.where(nonzero, _ldexp(top, -k) / torch.where(nonzero, z, torch.ones_like(z)), torch.zeros_like(top))
    return s, k


def eb_linear(x: torch.Tensor, weight: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """InnerProduct: ``x`` (B, ...) flattened to (B, K), ``weight`` (N, K), ``top`` (B, N)."""
    xs = _normalise(x.float().flatten(1), 1)
    wn = _normalise(weight.float().clamp_min(0), 1, nonneg=True)
    s, k = _ratio(top.float(), xs @ wn.t(), wn.shape[0], 1)
    return _ldexp(xs * (s @ wn), k).reshape(x.shape)


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
    xs = _normalise(x.float(), (1, 2, 3))
    wn = _normalise(weight.float().clamp_min(0), (1, 2, 3), nonneg=True)
    z = F.conv2d(xs, wn, None, stride, padding, dilation, groups)
    o, _, kh, kw = wn.shape
    s, k = _ratio(top.float(), z, (o // groups) * kh * kw, (1, 2, 3))
    return _ldexp(xs * conv2d_input(xs.shape, wn, s, stride, padding, dilation, groups), k)


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
    xs = _normalise(x.float(), (2, 3))      # channels are independent: per image and channel
    z = F.avg_pool2d(xs, kernel, stride, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad)
    kh, kw = _pair(kernel)
    s, k = _ratio(top.float(), z, kh * kw, (2, 3))
    back = torch.ops.aten.avg_pool2d_backward(s, xs, _pair(kernel), _pair(stride), _pair(padding),
                                              ceil_mode, count_include_pad, None)
    return _ldexp(xs * back, k)


def eb_eltwise_sum(xs: list[torch.Tensor], top: torch.Tensor, coeffs=None) -> list[torch.Tensor]:
    """Eltwise SUM: each input gets the share it contributed to the sum."""
    coeffs = [float(c) for c in (coeffs or [1.0] * len(xs))]
    xf = [x.float() for x in xs]
    m = xf[0].abs()
    for x in xf[1:]:
        m = torch.maximum(m, x.abs())
    scale = _pow2(-torch.frexp(m)[1].clamp(-127, 126))          # per element, over the inputs
    cmax = max(abs(c) for c in coeffs)
    shift = math.frexp(cmax)[1] if math.isfinite(cmax) else 0   # the coefficients by a power of two too
    parts = [x * scale * math.ldexp(c, -shift) for c, x in zip(coeffs, xf)]
    s, k = _ratio(top.float(), sum(parts), 1, None)
    return [_ldexp(p * s, k) for p in parts]


# ----------------------------------------------------------------- the top signal
def top_signal(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """The top signal: a one-hot of ``classes`` (B,) over the logits' classes, float32."""
    sig = torch.zeros(logits.shape[0], logits[0].numel(), dtype=torch.float32, device=logits.device)
    sig.scatter_(1, classes.long().view(-1, 1).to(logits.device), 1.0)
    return sig.view(logits.shape)




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
        labels = torch.as_tensor(labels)
        if labels.numel() != logits.shape[0]:
            raise ValueError(f"{where}: {labels.numel()} label(s) of shape {tuple(labels.shape)} for a batch of "
                             f"{logits.shape[0]}: give one class index per image, shape ({logits.shape[0]},)")
        return labels.reshape(-1).long().to(logits.device)
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


def walked(steps: Sequence[Step], start) -> list[int]:
    """Indices of the ``steps`` that :func:`walk` runs from signals at the keys ``start``
    (those whose tops carry a signal), without computing anything."""
    return upstream([(step.top_keys, step.bottom_keys) for step in steps], start)[0]


class NonFiniteError(ValueError):
    """An input of Excitation Backprop (a blob or a layer's weights) holds inf or NaN."""


def require_finite(items, where: str) -> None:
    """Raise :class:`NonFiniteError` naming the first of ``items`` ((description, tensor or
    array) pairs) that holds inf or NaN. One host synchronisation for all of them: for the
    analysis entry points, not for a training step."""
    items = [(name, torch.as_tensor(t)) for name, t in items if t is not None]
    if not items:
        return
    flags = [torch.isfinite(t).all() for _, t in items]
    if all(f.device == flags[0].device for f in flags):
        flags = torch.stack(flags).tolist()
    else:
        flags = [bool(f) for f in flags]
    for ok, (name, t) in zip(flags, items):
        if not ok:
            nan = int(torch.isnan(t).sum())
            inf = int(torch.isinf(t).sum())
            raise NonFiniteError(f"{where}: {name} is not finite ({nan} NaN, {inf} inf of {t.numel()} values); "
                                 "Excitation Backprop needs finite activations and weights")
