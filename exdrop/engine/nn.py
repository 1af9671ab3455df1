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
:mod:`exdrop.engine.layer_types`, so Excitation Backprop here uses the very rules and
walk of the prototxt engine and of the real-Caffe backend. The prototxt engine
uses these classes too (with ``head=None``: it computes p_EB from the net's own
layers and passes it as ``saliency``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from exdrop.engine import eb
from exdrop.engine.functional import (COUNTS, activation_share, adaptive_dropout, curriculum_dropout, curriculum_retain,
                                      guided_dropout, information_blobs, information_dropout, standard_dropout)
from exdrop.engine.layer_types import module_layer


class _GuidedDropout(nn.Module):
    saliency: str | None = None
    is_dropout = True

    def __init__(self, p: float = 0.5, rescale: bool = True, grad_rescale: bool = True, count: str = "all"):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability has to be in [0, 1), got {p} "
                             "(p is the probability of dropping, as in torch.nn.Dropout; "
                             "the paper's base retain probability is P = 1 - p)")
        if count not in COUNTS:
            raise ValueError(f"count must be one of {COUNTS} (what N of Eqn 3 counts), got {count!r}")
        self.p, self.rescale, self.grad_rescale = float(p), bool(rescale), bool(grad_rescale)
        self.count = count

    @property
    def base_retain(self) -> float:
        """The paper's P: the retain probability of a unit whose share is exactly 1/N."""
        return 1.0 - self.p

    def extra_repr(self) -> str:
        count = "" if self.count == "all" else f", count={self.count!r}"
        return f"p={self.p}, rescale={self.rescale}, grad_rescale={self.grad_rescale}{count}"

    def _drop(self, x: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
        return guided_dropout(x, share, self.p, rescale=self.rescale, grad_rescale=self.grad_rescale,
                              count=self.count)


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
        p: the base dropout probability (default 0.5): a unit whose share of the
            evidence is exactly 1/N is dropped with probability ``p`` (the paper's
            P = 1 - p). Units with a smaller share are kept more often, so the kept
            fraction is not ``1 - p`` as in ``torch.nn.Dropout``: with the evidence
            concentrated on few units (a sparse layer), most units are kept (0.7 to
            0.85 of them on ordinary data at p = 0.5) and the relevant ones dropped.
        rescale: divide each image by its kept fraction (the paper; the
            authors' 2019 code did not).
        grad_rescale: let the gradient carry that 1/scale (autograd's natural
            answer); False reproduces the authors' code, which masks outside
            the graph.
        signal: ``"gt"`` (ground-truth class, the paper's training signal),
            ``"pred"`` (predicted class) or an int class index.
        count: what N of Eqn 3 counts: ``"all"`` units of the layer (the
            paper, dead units included) or the ``"alive"`` ones of each image
            (an ablation, not the paper's formula).

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
                 grad_rescale: bool = True, signal: str | int = "gt", count: str = "all"):
        super().__init__(p, rescale, grad_rescale, count)
        # not a submodule: the model owns the head, so its weights are in state_dict() once
        self.__dict__["head"] = head
        self.signal = signal

    def forward(self, x: torch.Tensor, saliency: torch.Tensor | None = None,
                target: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training:
            return x
        if saliency is not None and (saliency.dim() < 2 or not saliency.dtype.is_floating_point):
            raise ValueError(f"ExcitationDropout: the second argument is the saliency (p_EB, shape "
                             f"{tuple(x.shape)} or ({x.shape[0]}, units)); got shape {tuple(saliency.shape)}, dtype "
                             f"{saliency.dtype}: give the labels as target=..., drop(x, target=y)")
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


class CurriculumDropout(nn.Module):
    """Curriculum Dropout (Morerio et al., ICCV 2017): a dropout rate that grows over training.

    At training iteration ``t`` every element is kept independently with
    probability ``theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar``,
    ``theta_bar = 1 - p``, and the kept ones are scaled by ``1/theta(t)``:
    no dropout at t = 0, plain dropout with rate ``p`` in the long run. In eval
    mode it is the identity.

    The iteration is the ``iteration`` attribute (an int; None until set), which
    the caller advances: the prototxt engine sets it from the solver's iteration
    before every forward (``Net.set_iteration``; the attribute
    ``needs_iteration`` asks for that); a stand-alone loop writes
    ``drop.iteration = step`` or passes ``iteration=step`` to the call. It is a
    Python int, so no host synchronisation. A training forward without an
    iteration is an error, as in the Caffe layer (it would silently keep
    every unit, theta(0) = 1).

    Args:
        p: the final dropout probability, as in ``torch.nn.Dropout`` (default 0.5).
        gamma: the schedule's rate (default 5e-4, the paper's Sec. 4.2).

    Shape:
        - Input: any shape (one draw per element).
        - Output: same shape as the input.

    Examples::

        >>> drop = CurriculumDropout(p=0.5, gamma=5e-4)
        >>> drop.retain_probability(0), round(drop.retain_probability(2000), 4)
        (1.0, 0.6839)
        >>> torch.equal(drop(torch.ones(4, 8), iteration=0), torch.ones(4, 8))
        True
        >>> drop.iteration = 100000          # theta(t) = 1 - p by now
        >>> out = drop(torch.ones(100, 1000))
        >>> round((out == 0).float().mean().item(), 1), out.max().item()
        (0.5, 2.0)
    """

    saliency = None
    is_dropout = True
    needs_iteration = True

    def __init__(self, p: float = 0.5, gamma: float = 5e-4):
        super().__init__()
        curriculum_retain(0, p, gamma)  # the argument checks
        self.p, self.gamma = float(p), float(gamma)
        self.iteration: int | None = None

    def extra_repr(self) -> str:
        return f"p={self.p}, gamma={self.gamma}, iteration={self.iteration}"

    def retain_probability(self, iteration: int | None = None) -> float:
        """theta(t) at ``iteration`` (default: the ``iteration`` attribute, 0 while unset)."""
        return curriculum_retain(iteration if iteration is not None else self.iteration or 0, self.p, self.gamma)

    def forward(self, x: torch.Tensor, saliency=None, target=None, iteration: int | None = None) -> torch.Tensor:
        if not self.training:
            return x
        t = self.iteration if iteration is None else iteration
        if t is None:
            raise ValueError("CurriculumDropout in training needs the iteration t for its retain probability theta(t): "
                             "set drop.iteration = step (or pass iteration=step)")
        return curriculum_dropout(x, t, self.p, self.gamma)


class AdaptiveDropout(nn.Module):
    """Adaptive Dropout, Standout (Ba and Frey, NIPS 2013): keep what is strongly active.

    Each element is kept with probability ``pi = sigmoid(alpha z + beta)``,
    z the layer's pre-activation (the standout network's weights tied to the
    layer's). Training: ``y = m * x``, ``m ~ Bernoulli(pi)``, no rescaling, and
    the mask is not differentiated (the gradient is ``m`` times the incoming
    one). Eval mode: ``y = pi * x``, the expected training output.

    ``z`` is ``pre_activation`` when given, else the input itself. After a
    ReLU (the prototxts' in-place dropout on ``ip1``) the input is
    ``a = relu(z)`` and pi(a) gives exactly the outputs of pi(z): where z > 0,
    a = z; where z <= 0, a = 0 and the output is 0 whatever the mask (and the
    ReLU passes no gradient there). After a leaky ReLU that is not so: pass
    ``pre_activation``.

    Not a dropout layer for Excitation Backprop (``is_dropout`` False): its
    test-mode output is scaled by pi, not the identity, so EB through it (an
    Excitation Dropout layer below it) is refused with an error naming it.

    Args:
        alpha: slope of the keep probability in z (default 1.0).
        beta: offset (default 0.0: pi = 1/2 at z = 0).

    Shape:
        - Input: any shape (one draw per element).
        - Output: same shape as the input.

    Examples::

        >>> drop = AdaptiveDropout(alpha=1.0, beta=0.0).eval()
        >>> drop(torch.tensor([[0.0, 2.0]]))       # x * sigmoid(x)
        tensor([[0.0000, 1.7616]])
        >>> out = drop.train()(torch.full((100, 1000), 2.0))
        >>> round((out != 0).float().mean().item(), 2), out.max().item()
        (0.88, 2.0)
    """

    saliency = None
    is_dropout = False

    def __init__(self, alpha: float = 1.0, beta: float = 0.0):
        super().__init__()
        for name, v in (("alpha", alpha), ("beta", beta)):
            if not math.isfinite(v):
                raise ValueError(f"AdaptiveDropout's {name} must be a finite number, got {v}")
        self.alpha, self.beta = float(alpha), float(beta)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}"

    def forward(self, x: torch.Tensor, saliency=None, target=None,
                pre_activation: torch.Tensor | None = None) -> torch.Tensor:
        return adaptive_dropout(x, self.alpha, self.beta, training=self.training, pre_activation=pre_activation)


@torch.no_grad()
def check_target(target, batch: int, classes: int, where: str = "ExcitationDropout") -> None:
    """``target`` must be what torch's classification losses take: class indices of shape
    ``(batch,)``, an integer dtype, each in ``[0, classes)``. The range is checked on the device
    (no host synchronisation on a GPU: a bad label fails at the next synchronising call)."""
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"{where}: target must be a tensor of class indices of shape ({batch},), got "
                         f"{type(target).__name__}")
    if target.dim() == 2 and target.shape == (batch, classes):
        raise ValueError(f"{where}: target of shape {tuple(target.shape)} looks one-hot; give class indices of "
                         f"shape ({batch},), e.g. target.argmax(1)")
    if target.shape != (batch,):
        raise ValueError(f"{where}: target must be class indices of shape ({batch},) for this batch, got shape "
                         f"{tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise ValueError(f"{where}: target must hold integer class indices (torch.long), got dtype {target.dtype}")
    torch._assert_async(((target >= 0) & (target < classes)).all(),
                        f"{where}: a target class index is outside [0, {classes}) (the head's outputs)")


def excitation_through(head: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
                       signal: str | int = "gt", check_finite: bool = True) -> torch.Tensor:
    """p_EB at ``x`` through a sequential ``head``, from a one-hot at its output.

    The class of each image's signal is ``target`` (``signal="gt"``), the
    head's prediction (``"pred"``) or a fixed index. Dropout layers in the head
    act as the identity (test mode), as in the prototxt engine.

    ``check_finite`` (default True): an input of a module or a parameter that
    holds inf or NaN raises :class:`exdrop.engine.eb.NonFiniteError` naming it (one host
    synchronisation). :class:`ExcitationDropout`'s training step passes False: a
    NaN there keeps its units and reaches the loss.
    """

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
    if signal == "gt" and target is not None:
        check_target(target, x.shape[0], h[0].numel())
    classes = eb.signal_classes(signal, h, target, "ExcitationDropout")
    out = eb.walk(steps, {len(modules): eb.top_signal(h, classes)}, 0)
    return out if out is not None else torch.zeros_like(x, dtype=torch.float32)


class InformationDropout(nn.Module):
    """Information Dropout (Achille & Soatto, TPAMI 2018): learned multiplicative log-normal noise.

    Training: ``y = f * exp(alpha(x) * eps)``, eps ~ N(0, 1) per element, with
    ``alpha(x) = 0.001 + max_alpha * sigmoid(x W^T + b)`` a learned map of the
    input ``x`` of the layer that produced ``f`` (default: of ``f`` itself). The
    loss adds ``beta * KL``, ``KL = mean over images of sum over units of
    -log(alpha / (max_alpha + 0.001))`` (the log-uniform prior): available as
    ``self.kl`` after each call, or returned with ``return_kl=True``. Eval mode:
    ``y = f`` (the KL is still computed). The authors' CIFAR code uses
    max_alpha 0.7, beta 3 and divides the KL by the number of training images.

    Args:
        units: N, the units of f (its channels C for a ``(B, C, H, W)`` f).
        in_features: D, the size of x per image (its channels C_x when
            ``spatial``); default ``units`` (alpha computed from f).
        max_alpha: the largest noise scale (default 0.7).
        weight_std: std of W's normal init (default msra: sqrt(2 / D)).
        bias: initial value of b (default 0).
        spatial: f is a convolution blob ``(B, C, H, W)``; alpha is then a 1x1
            convolution of x ``(B, C_x, H, W)``, one alpha per element.

    W has Caffe's InnerProduct layout ``(units, in_features)`` (``(C, C_x, 1, 1)``
    when spatial). With ``units=None`` the module has no parameters: the
    prototxt engine builds them from the blob shapes (:meth:`caffe_setup`) and
    holds them as the layer's learnable blobs.

    Shape:
        - f: ``(B, N)``, or ``(B, C, H, W)`` when spatial.
        - x: ``(B, ...)`` flattened to ``(B, D)``, or ``(B, C_x, H, W)``.
        - Output: the shape of f; KL: a 0-d tensor.

    Examples::

        >>> drop = InformationDropout(units=64, in_features=32, max_alpha=0.7)
        >>> x = torch.randn(8, 32)
        >>> f = torch.relu(torch.nn.Linear(32, 64)(x))
        >>> y, kl = drop(f, x, return_kl=True)
        >>> y.shape, kl.shape
        (torch.Size([8, 64]), torch.Size([]))
        >>> torch.equal(drop.eval()(f, x), f)
        True
    """

    saliency = None
    is_dropout = True            # the identity at test time, and so for Excitation Backprop
    caffe_bottoms = (1, 2)       # f (and x); the prototxt engine's protocol, see caffe_setup
    caffe_tops = (1, 2)          # y (and the KL term)

    def __init__(self, units: int | None = None, in_features: int | None = None, max_alpha: float = 0.7,
                 weight_std: float | None = None, bias: float = 0.0, spatial: bool = False):
        super().__init__()
        if not (isinstance(max_alpha, (int, float)) and 0.0 < max_alpha < float("inf")):
            raise ValueError(f"InformationDropout: max_alpha must be a finite number > 0, got {max_alpha!r}")
        self.max_alpha, self.weight_std, self.init_bias = float(max_alpha), weight_std, float(bias)
        self.spatial = bool(spatial)
        self.kl: torch.Tensor | None = None
        if units is None:
            self.weight = self.bias = None
            return
        d = units if in_features is None else in_features
        f_shape, x_shape = ((1, units, 1, 1), (1, d, 1, 1)) if spatial else ((1, units), (1, d))
        weight, b = information_blobs(f_shape, x_shape, weight_std, bias)
        self.weight, self.bias = nn.Parameter(weight), nn.Parameter(b)

    def extra_repr(self) -> str:
        shape = None if self.weight is None else tuple(self.weight.shape)
        return f"weight={shape}, max_alpha={self.max_alpha}, spatial={self.spatial}"

    def forward(self, f: torch.Tensor, x: torch.Tensor | None = None, return_kl: bool = False):
        if self.weight is None:
            raise ValueError("InformationDropout was built without `units`: its W and b live in the prototxt "
                             "engine's layer (caffe_forward); give units (and in_features) to use it directly")
        out, self.kl = information_dropout(f, x, self.weight, self.bias, self.max_alpha, self.training)
        return (out, self.kl) if return_kl else out

    # -- the prototxt engine's protocol for a Python layer with learnable blobs and several tops
    def caffe_setup(self, bottom_shapes, n_top: int):
        """``(top shapes, blobs)`` for bottoms f (and x): y has f's shape, the KL top is a scalar
        ``()`` like Caffe's loss tops; the blobs ``[W, b]``, filled, in Caffe's order."""
        blobs = information_blobs(bottom_shapes[0], bottom_shapes[-1], self.weight_std, self.init_bias)
        return [tuple(bottom_shapes[0]), ()][:n_top], list(blobs)

    def caffe_forward(self, bottoms, blobs, n_top: int, training: bool | None = None):
        """The layer's tops from its bottoms and its blobs (the engine's, shared by its nets)."""
        f, x = bottoms[0], bottoms[1] if len(bottoms) > 1 else None
        out, kl = information_dropout(f, x, blobs[0], blobs[1], self.max_alpha,
                                      self.training if training is None else training)
        return (out, kl)[:n_top] if n_top > 1 else out
