"""Drop-in PyTorch modules for models that never saw a prototxt.

``p`` means what it means in :class:`torch.nn.Dropout`: the probability of
dropping a unit. The paper's base retain probability is P = 1 - p.

``ExcitationDropout(head=..., p=0.5)`` sits where ``nn.Dropout`` would; it is
given the rest of the network above it (``head``, e.g. the remaining fully
connected layers up to the logits) and the targets::

    drop = ExcitationDropout(head=classifier_tail, p=0.5)
    h = drop(features(x), target=y)        # training: Eqn 3 masks from p_EB
    logits = classifier_tail(h)

The head's torch modules are mapped onto the Caffe layer types of
:mod:`exdrop.layer_types`, so Excitation Backprop here uses the very rules and
walk of the prototxt engine and of the real-Caffe backend. The prototxt engine
uses these classes too (with ``head=None``: it computes p_EB from the net's own
layers and passes it as ``saliency``).
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
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability has to be in [0, 1), got {p} "
                             "(p is the probability of dropping, as in torch.nn.Dropout; "
                             "the paper's base retain probability is P = 1 - p)")
        self.p, self.rescale, self.grad_rescale = float(p), bool(rescale), bool(grad_rescale)

    @property
    def base_retain(self) -> float:
        """The paper's P: the retain probability of a unit whose share is exactly 1/N."""
        return 1.0 - self.p

    def extra_repr(self) -> str:
        return f"p={self.p}, rescale={self.rescale}, grad_rescale={self.grad_rescale}"

    def _drop(self, x: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        return guided_dropout(x, share, self.p, rescale=self.rescale, grad_rescale=self.grad_rescale)


class ExcitationDropout(_GuidedDropout):
    """Excitation Dropout (Eqn 3): drop units in proportion to their p_EB.

    In training, Excitation Backprop through ``head`` from a one-hot top signal
    at the logits gives each unit's share p_EB of the evidence; the unit is kept
    with probability ``1 - (1-P)(N-1) p_EB / (((1-P)N - 1) p_EB + P)``,
    P = 1 - ``p``: P when p_EB = 1/N, 1 when p_EB = 0, 0 when p_EB = 1. Each
    image gets its own mask and is divided by its kept fraction. In eval mode
    it is the identity.

    Args:
        head: the layers from this point up to the logits (``nn.Sequential`` of
            Linear, Conv2d, ReLU, LeakyReLU, MaxPool2d, AvgPool2d, Flatten,
            Dropout, LocalResponseNorm). Needed unless ``saliency`` is passed.
        p: dropout probability, as in ``torch.nn.Dropout`` (default 0.5).
        rescale: divide each image by its kept fraction (the paper; the
            authors' 2019 code did not).
        grad_rescale: let the gradient carry that 1/scale (autograd's natural
            answer); False reproduces the authors' code, which masks outside
            the graph.
        signal: ``"gt"`` (ground-truth class, the paper's training signal),
            ``"pred"`` (predicted class) or an int class index.

    Shape:
        - Input: ``(N, C)`` (fully connected units) or ``(N, C, H, W)`` (whole
          feature maps are the units; p_EB is summed over space, Sec. 4.2).
        - Output: same shape as the input.
        - ``target``: ``(N,)`` class indices (needed in training with ``"gt"``).

    Examples::

        >>> head = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        >>> drop = ExcitationDropout(head=head, p=0.5)
        >>> h = torch.relu(torch.randn(8, 64))
        >>> out = drop(h, target=torch.randint(0, 10, (8,)))
        >>> out.shape
        torch.Size([8, 64])
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
            saliency = excitation_through(self.head, x, target, signal=self.signal, check_finite=False)
        return self._drop(x, saliency)


class ActivationDropout(_GuidedDropout):
    """Activation Dropout (Eqn 4): p_Act = a / sum(a) per image in place of p_EB.

    Same retain rule and rescaling as :class:`ExcitationDropout`, without a
    backward pass: the share of a unit is its activation over the image's total
    (post-ReLU inputs). An image whose activations sum to 0 is left untouched.

    Args:
        p: dropout probability, as in ``torch.nn.Dropout`` (default 0.5).
        rescale: divide each image by its kept fraction.
        grad_rescale: let the gradient carry that 1/scale (False: the authors' code).

    Shape:
        - Input: ``(N, C)`` or ``(N, C, H, W)`` (whole feature maps).
        - Output: same shape as the input.

    Examples::

        >>> drop = ActivationDropout(p=0.5)
        >>> out = drop(torch.relu(torch.randn(8, 64)))
        >>> out.shape
        torch.Size([8, 64])
    """

    saliency = "activation"

    def forward(self, x: torch.Tensor, saliency: torch.Tensor | None = None, target=None) -> torch.Tensor:
        if not self.training:
            return x
        return self._drop(x, activation_share(x if saliency is None else saliency))


class StandardDropout(nn.Module):
    """Standard dropout over units, with a choice of mask sharing.

    Units are dropped with probability ``p`` (as in ``torch.nn.Dropout``) and
    the kept ones scaled by ``1/(1-p)``. ``per_image=True`` is the paper's
    "Standard + Mask/Img" control (a new mask for every image); False shares
    one mask across the minibatch. On a convolution blob the units are whole
    feature maps. In eval mode it is the identity.

    Args:
        p: dropout probability (default 0.5).
        per_image: a new mask for every image (default True).

    Shape:
        - Input: ``(N, C)`` or ``(N, C, H, W)``.
        - Output: same shape as the input.

    Examples::

        >>> drop = StandardDropout(p=0.2)
        >>> out = drop(torch.ones(100, 1000))
        >>> round((out == 0).float().mean().item(), 1)
        0.2
    """

    saliency = None
    is_dropout = True

    def __init__(self, p: float = 0.5, per_image: bool = True):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, got {p}")
        self.p, self.per_image = float(p), bool(per_image)

    def extra_repr(self) -> str:
        return f"p={self.p}, per_image={self.per_image}"

    def forward(self, x: torch.Tensor, saliency=None, target=None) -> torch.Tensor:
        if not self.training:
            return x
        return standard_dropout(x, self.p, per_image=self.per_image)


@torch.no_grad()
def excitation_through(head: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
                       signal: str | int = "gt", check_finite: bool = True) -> torch.Tensor:
    """p_EB at ``x`` through a sequential ``head``, from a one-hot at its output.

    The class of each image's signal is ``target`` (``signal="gt"``), the
    head's prediction (``"pred"``) or a fixed index. Dropout layers in the head
    act as the identity (test mode), as in the prototxt engine.

    ``check_finite`` (default True): an input of a module or a parameter that
    holds inf or NaN raises :class:`exdrop.eb.NonFiniteError` naming it (one host
    synchronisation). :class:`ExcitationDropout`'s training step passes False: a
    NaN there keeps its units and reaches the loss.
    """
    from .layer_types import module_layer  # the rule table: Caffe layer types

    modules = list(head) if isinstance(head, nn.Sequential) else [head]
    steps, h, inputs = [], x.detach(), []
    for i, m in enumerate(modules):
        kind, rule = module_layer(m, h)
        steps.append(eb.Step(rule, [h], [i], [i + 1]))
        if check_finite:
            name = f"module {i} ({type(m).__name__})"
            inputs.append((f"the input of {name}", h))
            inputs += [(f"parameter '{p}' of {name}", v) for p, v in m.named_parameters()]
        h = h if kind.is_dropout else m(h)
    if check_finite:
        eb.require_finite(inputs, "excitation_through")
    classes = eb.signal_classes(signal, h, target, "ExcitationDropout")
    out = eb.walk(steps, {len(modules): eb.top_signal(h, classes)}, 0)
    return out if out is not None else torch.zeros_like(x, dtype=torch.float32)
