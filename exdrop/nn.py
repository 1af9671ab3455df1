"""Drop-in PyTorch modules for models that never saw a prototxt.

``ExcitationDropout(head=..., p=0.5)`` sits where ``nn.Dropout`` would; it is
given the rest of the network above it (``head``, e.g. the remaining fully
connected layers up to the logits) and the targets::

    drop = ExcitationDropout(head=classifier_tail, p=0.5)
    h = drop(features(x), target=y)        # training: Eqn 3 masks from p_EB
    logits = classifier_tail(h)

The prototxt engine uses the very same classes (with ``head=None``: the engine
computes p_EB from the net's own layers and passes it as ``saliency``).
"""
from __future__ import annotations

import torch
from torch import nn

from . import eb
from .functional import activation_share, guided_dropout, standard_dropout


class _GuidedDropout(nn.Module):
    saliency: str | None = None
    is_dropout = True

    def __init__(self, p: float = 0.5, rescale: bool = True, grad_rescale: bool = True):
        super().__init__()
        if not 0.0 < p <= 1.0:
            raise ValueError(f"base retain probability p must be in (0, 1], got {p}")
        self.p, self.rescale, self.grad_rescale = float(p), bool(rescale), bool(grad_rescale)

    def extra_repr(self) -> str:
        return f"p={self.p}, rescale={self.rescale}, grad_rescale={self.grad_rescale}"

    def _drop(self, x: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        return guided_dropout(x, share, self.p, rescale=self.rescale, grad_rescale=self.grad_rescale)


class ExcitationDropout(_GuidedDropout):
    """Excitation Dropout (Eqn 3): drop units in proportion to their p_EB.

    Args:
        head: the layers from this point up to the logits (``nn.Sequential`` of
            Linear, Conv2d, ReLU, pooling, Flatten, Dropout, LRN). Needed unless
            ``saliency`` is passed to ``forward``.
        p: base retain probability P (retain probability when p_EB is uniform).
        rescale: divide each image by its kept fraction (the paper; the authors'
            2019 code did not).
        grad_rescale: let the gradient carry that 1/scale (autograd's natural
            answer); False reproduces the authors' code, which masks outside the graph.
        signal: ``"gt"`` (ground-truth class, training default), ``"pred"``
            (predicted class) or an int class index.
    """

    saliency = "excitation"

    def __init__(self, head: nn.Module | None = None, p: float = 0.5, rescale: bool = True,
                 grad_rescale: bool = True, signal: str | int = "gt"):
        super().__init__(p, rescale, grad_rescale)
        self.head = head
        self.signal = signal

    def forward(self, x: torch.Tensor, saliency: torch.Tensor | None = None,
                target: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training:
            return x
        if saliency is None:
            if self.head is None:
                raise ValueError("ExcitationDropout needs `head` (or an explicit `saliency`)")
            saliency = excitation_through(self.head, x, signal_classes(self.signal, target, self.head, x))
        return self._drop(x, saliency)


class ActivationDropout(_GuidedDropout):
    """Activation Dropout (Eqn 4): p_Act = a / sum(a) per image in place of p_EB."""

    saliency = "activation"

    def forward(self, x: torch.Tensor, saliency: torch.Tensor | None = None, target=None) -> torch.Tensor:
        if not self.training:
            return x
        return self._drop(x, activation_share(x if saliency is None else saliency))


class StandardDropout(nn.Module):
    """Standard dropout, keep probability p, scaled by 1/p.

    ``per_image=True`` is the paper's "Standard + Mask/Img" control (a new mask
    for every image); False shares one mask across the minibatch.
    """

    saliency = None
    is_dropout = True

    def __init__(self, p: float = 0.5, per_image: bool = True):
        super().__init__()
        self.p, self.per_image = float(p), bool(per_image)

    def extra_repr(self) -> str:
        return f"p={self.p}, per_image={self.per_image}"

    def forward(self, x: torch.Tensor, saliency=None, target=None) -> torch.Tensor:
        if not self.training or self.p == 1.0:
            return x
        return standard_dropout(x, self.p, per_image=self.per_image)


def signal_classes(signal, target, head, x) -> torch.Tensor:
    """Which class each image's top signal is on: ground truth, prediction, or fixed."""
    if signal == "gt":
        if target is None:
            raise ValueError("ExcitationDropout with signal='gt' needs `target` in training")
        return target
    if signal == "pred":
        with torch.no_grad():
            was = head.training
            head.eval()
            pred = head(x).flatten(1).argmax(1)
            head.train(was)
        return pred
    return torch.full((x.shape[0],), int(signal), dtype=torch.long, device=x.device)


@torch.no_grad()
def excitation_through(head: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """p_EB at ``x`` for ``classes`` through a sequential ``head`` (run in eval mode)."""
    modules = list(head) if isinstance(head, nn.Sequential) else [head]
    inputs, h = [], x.detach()
    for m in modules:
        inputs.append(h)
        h = _eval_forward(m, h)
    signal = eb.one_hot_signal(h, classes)
    for m, inp in zip(reversed(modules), reversed(inputs)):
        signal = _module_rule(m, inp, signal)
    return signal


def _eval_forward(m: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if isinstance(m, (nn.Dropout, _GuidedDropout, StandardDropout)):
        return h
    return m(h)


def _module_rule(m: nn.Module, x: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.Linear):
        return eb.eb_linear(x, m.weight, top)
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError(f"EB supports Conv2d with numeric zero padding, got {m}")
        return eb.eb_conv2d(x, m.weight, top, m.stride, m.padding, m.dilation, m.groups)
    if isinstance(m, (nn.ReLU, nn.LeakyReLU)):
        return eb.eb_relu(x, top, getattr(m, "negative_slope", 0.0))
    if isinstance(m, nn.MaxPool2d):
        return eb.eb_max_pool2d(x, top, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
    if isinstance(m, nn.AvgPool2d):
        if m.divisor_override:
            raise ValueError("EB does not support AvgPool2d with divisor_override")
        return eb.eb_avg_pool2d(x, top, m.kernel_size, m.stride or m.kernel_size, m.padding,
                                m.ceil_mode, m.count_include_pad)
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return top.reshape(x.shape)
    if isinstance(m, (nn.Dropout, nn.Identity, nn.LocalResponseNorm, _GuidedDropout, StandardDropout)):
        return top
    raise TypeError(f"Excitation Backprop has no rule for {type(m).__name__}")
