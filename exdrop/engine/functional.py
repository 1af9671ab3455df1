"""The functional core of guided dropout: retain probabilities and masks.

Everything here is a pure function of tensors, shared by the prototxt Python
layers in ``layers/`` and by the drop-in modules in :mod:`exdrop.engine.nn`.

Shapes: a fully connected blob is ``(B, N)``; a convolution blob is
``(B, N, H, W)`` where ``N`` counts feature maps (Sec. 4.2: p_EB is summed
over space and whole maps are dropped).
"""
from __future__ import annotations

import math

import torch


def unit_saliency(saliency: torch.Tensor) -> torch.Tensor:
    """Collapse a saliency blob to one value per unit: ``(B, N)``.

    For a convolution blob the map is summed over space (Sec. 4.2); any other
    trailing axes of a fully connected blob are flattened into units.
    """
    if saliency.dim() == 4:
        return saliency.sum(dim=(2, 3))
    return saliency.flatten(1)


def retain_probability(p: torch.Tensor, base_retain: float, units: torch.Tensor | None = None) -> torch.Tensor:
    """Eqn 3 (and Eqn 4): retain probability of each unit from its share ``p``.

    ``p`` is ``(B, N)``: p_EB (Eqn 3) or p_Act (Eqn 4), a distribution over the
    N units of one image. With P the base retain probability::

        p_retain = 1 - (1-P)(N-1) p / (((1-P)N - 1) p + P)

    which gives 1 at p = 0, 0 at p = 1 and P at p = 1/N, and decreases in p.
    ``units``: a ``(B, 1)`` count used as N per image instead of the layer's
    width (:func:`alive_units`; an ablation, not the paper's formula).

    The result is always a valid Bernoulli probability in [0, 1]: a share outside
    [0, 1] is clamped into it first, and a NaN share gives 1 (the unit is kept, so a
    NaN input reaches the loss, where the run loop reports the divergence, instead of
    failing inside ``torch.bernoulli``). No host synchronisation.
    """
    if not 0.0 < base_retain <= 1.0:
        raise ValueError(f"base retain probability must be in (0, 1], got {base_retain}")
    n = p.shape[1] if units is None else units.to(p.dtype).clamp_min(1.0)
    drop_rate = 1.0 - base_retain
    p = torch.where(torch.isnan(p), torch.zeros_like(p), p)   # NaN share: keep the unit
    p = p.clamp(0.0, 1.0)
    denom = (drop_rate * n - 1.0) * p + base_retain
    # denom >= min(P, (1-P)(N-1)) > 0 on [0, 1] when N > 1; guard N == 1 anyway.
    drop = drop_rate * (n - 1) * p / denom.clamp_min(torch.finfo(p.dtype).tiny)
    return (1.0 - drop).clamp(0.0, 1.0)


COUNTS = ("all", "alive")   # what N of Eqn 3 counts: every unit of the layer (the paper), or the alive ones


def alive_units(x: torch.Tensor) -> torch.Tensor:
    """``(B, 1)``: the units of each image with a positive activation (a feature map counts when
    any of its positions is positive): the N of Eqn 3 under ``count='alive'``, an ablation that
    is not the paper's formula (the paper's N is the layer's width, dead units included)."""
    return (unit_saliency(x) > 0).sum(dim=1, keepdim=True)


def activation_share(x: torch.Tensor) -> torch.Tensor:
    """Eqn 4's p_Act: each unit's activation over the image's total, ``(B, N)``.

    Activations are post-ReLU (non-negative). An image whose activations sum
    to zero gets all zeros, hence retain probability 1: it is not dropped.
    """
    a = unit_saliency(x).clamp_min(0.0)
    total = a.sum(dim=1, keepdim=True)
    return torch.where(total > 0, a / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(a))


def sample_unit_mask(retain: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bernoulli keep mask, one draw per (image, unit): ``(B, N)`` of 0/1."""
    return torch.bernoulli(retain, generator=generator)


class _ScaledMask(torch.autograd.Function):
    """y = x * m, where the gradient w.r.t. x is ``grad * m_grad`` (a different mask).

    The authors' Caffe code writes the rescaled activation into the blob
    outside the graph, so retained units back-propagate with the bare 0/1 mask
    rather than mask/scale. This Function reproduces that when asked.
    """

    @staticmethod
    def forward(ctx, x, m_fwd, m_grad):
        ctx.save_for_backward(m_grad)
        return x * m_fwd

    @staticmethod
    def backward(ctx, grad):
        (m_grad,) = ctx.saved_tensors
        return grad * m_grad, None, None


def apply_unit_mask(
    x: torch.Tensor,
    mask: torch.Tensor,
    rescale: bool = True,
    grad_rescale: bool = True,
) -> torch.Tensor:
    """Zero dropped units and rescale each image by its kept fraction.

    ``mask`` is ``(B, N)``; for a convolution blob it drops whole feature maps.
    With ``rescale`` each image is divided by mean(mask) of that image (the
    paper: "activations are rescaled according to the fraction of dropped
    neurons"); an image with every unit dropped stays zero. ``grad_rescale``
    False gives the authors' code's gradient (mask without the 1/scale).
    """
    m = mask.to(x.dtype)
    if rescale:
        kept = m.mean(dim=1, keepdim=True)
        m_fwd = m / torch.where(kept > 0, kept, torch.ones_like(kept))
    else:
        m_fwd = m
    view = _mask_view(x, mask)
    m_fwd = m_fwd.reshape(view)
    if grad_rescale or not rescale or not x.requires_grad:
        return x * m_fwd
    return _ScaledMask.apply(x, m_fwd, m.reshape(view))


def _mask_view(x: torch.Tensor, mask: torch.Tensor) -> tuple[int, ...]:
    """How a ``(B, N)`` unit mask broadcasts over x: feature maps or units."""
    if x.dim() == 4:
        return (mask.shape[0], mask.shape[1], 1, 1)
    return (mask.shape[0],) + tuple(x.shape[1:])


def guided_dropout(
    x: torch.Tensor,
    share: torch.Tensor,
    p: float = 0.5,
    rescale: bool = True,
    grad_rescale: bool = True,
    generator: torch.Generator | None = None,
    count: str = "all",
) -> torch.Tensor:
    """Excitation/Activation Dropout on one blob (training mode).

    ``share`` is the per-unit distribution (``(B, N)`` or the saliency blob of
    x's shape, which is then collapsed by :func:`unit_saliency`). ``p`` is the
    dropout probability as in ``torch.nn.functional.dropout``: the paper's base
    retain probability is P = 1 - p (the retain probability of a unit whose
    share is 1/N). A NaN share keeps its unit (:func:`retain_probability`).
    ``count``: N of Eqn 3, ``"all"`` units of the layer (the paper) or the
    ``"alive"`` ones of each image (:func:`alive_units`, an ablation).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability has to be in [0, 1), got {p} (base retain probability P = 1 - p)")
    if count not in COUNTS:
        raise ValueError(f"count must be one of {COUNTS} (what N of Eqn 3 counts), got {count!r}")
    units = alive_units(x) if count == "alive" else None
    retain = retain_probability(unit_saliency(share).float(), 1.0 - p, units)
    mask = sample_unit_mask(retain, generator)
    return apply_unit_mask(x, mask, rescale=rescale, grad_rescale=grad_rescale)


def standard_dropout(
    x: torch.Tensor,
    p: float = 0.5,
    per_image: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Standard dropout: units dropped with probability ``p``, kept ones scaled by 1/(1-p).

    ``p`` means what it means in ``torch.nn.functional.dropout``. ``per_image``
    True draws a different mask for each image (the paper's "Standard +
    Mask/Img" control); False draws one mask shared by the whole minibatch
    (the paper's description of Standard Dropout, Sec. 4.2). Units are whole
    feature maps for a convolution blob, as in the guided layers.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, got {p}")
    if p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    retain = 1.0 - p
    b = x.shape[0] if per_image else 1
    units = x.shape[1] if x.dim() == 4 else x[0].numel()
    keep = torch.full((b, units), retain, device=x.device, dtype=torch.float32)
    mask = sample_unit_mask(keep, generator).to(x.dtype) / retain
    return x * mask.reshape(_mask_view(x, mask))


def curriculum_retain(iteration: int, p: float = 0.5, gamma: float = 5e-4) -> float:
    """Curriculum Dropout's retain probability at iteration ``t`` (Morerio et al., ICCV 2017)::

        theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar,    theta_bar = 1 - p

    1 at t = 0 (no unit dropped), decreasing to the final retain probability
    theta_bar (``p`` is the final dropout probability, as in
    ``torch.nn.Dropout``); the paper uses gamma = 5e-4 (Sec. 4.2). A Python
    float from Python numbers: no tensor, no host synchronisation.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability has to be in [0, 1), got {p} (final retain probability 1 - p)")
    if not gamma >= 0.0 or gamma == float("inf"):
        raise ValueError(f"Curriculum Dropout's gamma must be a finite number >= 0, got {gamma}")
    if iteration < 0:
        raise ValueError(f"Curriculum Dropout's iteration must be >= 0, got {iteration}")
    theta_bar = 1.0 - p
    return (1.0 - theta_bar) * math.exp(-gamma * iteration) + theta_bar


def curriculum_dropout(
    x: torch.Tensor,
    iteration: int,
    p: float = 0.5,
    gamma: float = 5e-4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Curriculum Dropout at iteration ``t`` (training mode).

    Every element is kept independently with probability theta(t)
    (:func:`curriculum_retain`), as Caffe's ``Dropout`` layer draws its mask,
    and the kept ones are scaled by 1/theta(t); the gradient is the same
    multiplier times the incoming gradient.
    """
    theta = curriculum_retain(iteration, p, gamma)
    if theta == 1.0:
        return x
    mask = torch.empty_like(x).bernoulli_(theta, generator=generator)
    return x * mask.mul_(1.0 / theta)


def standout_keep_probability(z: torch.Tensor, alpha: float = 1.0, beta: float = 0.0) -> torch.Tensor:
    """Standout's keep probability (Ba and Frey, NIPS 2013): ``pi = sigmoid(alpha z + beta)``.

    ``z`` is the layer's pre-activation; with the standout network's weights
    tied to the layer's (``alpha W``, ``alpha b + beta``), ``alpha z + beta``
    is the standout network's own pre-activation.
    """
    return torch.sigmoid(z * alpha + beta)


def adaptive_dropout(
    x: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 0.0,
    training: bool = True,
    pre_activation: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Adaptive Dropout (Standout, Ba and Frey 2013) on one blob.

    ``pi = sigmoid(alpha z + beta)`` (:func:`standout_keep_probability`) with
    ``z = pre_activation`` (default: ``x`` itself). Training: each element is
    kept with probability pi, ``y = m * x`` with ``m ~ Bernoulli(pi)`` and no
    rescaling; the mask is not differentiated (dy/dx = m). Test: the expected
    output ``y = pi * x`` (pi from the test input, not differentiated either).

    After a ReLU, ``x = relu(z)`` gives the outputs of pi(z): where z > 0,
    x = z; where z <= 0, x = 0 and the output is 0 whatever the mask.
    """
    z = (x if pre_activation is None else pre_activation).detach()
    keep = standout_keep_probability(z, alpha, beta)
    if not training:
        return x * keep.to(x.dtype)
    return x * torch.bernoulli(keep, generator=generator).to(x.dtype)


# ----------------------------------------------------------------- Information Dropout
INFORMATION_ALPHA_FLOOR = 0.001  # alpha = 0.001 + max_alpha * sigmoid(.), as in Achille & Soatto's code


def information_blobs(f_shape, x_shape=None, weight_std: float | None = None, bias: float = 0.0):
    """The learnable blobs of Information Dropout's alpha map, filled: ``(weight, bias)``.

    ``f_shape`` is the shape of the blob that is noised, ``x_shape`` that of the
    input alpha is computed from (default: f itself). A fully connected f
    ``(B, N)`` gets Caffe's InnerProduct layout, weight ``(N, D)`` with D the
    flattened size of x; a convolution f ``(B, C, H, W)`` gets a 1x1
    convolution from x ``(B, C_x, H, W)`` (one alpha per element), weight
    ``(C, C_x, 1, 1)``. The weight is drawn from N(0, weight_std^2) with torch's
    global generator (default std: msra, sqrt(2 / fan_in)); the bias is the
    constant ``bias``. A shape that fits neither raises ValueError.
    """
    f_shape = tuple(int(d) for d in f_shape)
    x_shape = f_shape if x_shape is None else tuple(int(d) for d in x_shape)
    if len(f_shape) not in (2, 4):
        raise ValueError(f"Information Dropout needs a (B, N) or (B, C, H, W) blob to noise, got {f_shape}")
    if len(x_shape) < 2 or x_shape[0] != f_shape[0]:
        raise ValueError(f"alpha's input {x_shape} must have the batch size of the noised blob {f_shape}")
    if len(f_shape) == 2:
        fan_in = int(math.prod(x_shape[1:]))
        shape = (f_shape[1], fan_in)
    else:
        if len(x_shape) != 4 or x_shape[2:] != f_shape[2:]:
            raise ValueError(f"on a convolution blob {f_shape} alpha is a 1x1 convolution of its input, which "
                             f"must be (B, C_x, {f_shape[2]}, {f_shape[3]}), got {x_shape}")
        fan_in = x_shape[1]
        shape = (f_shape[1], fan_in, 1, 1)
    std = math.sqrt(2.0 / fan_in) if weight_std is None else float(weight_std)
    if not (std >= 0.0 and math.isfinite(std)):
        raise ValueError(f"weight_std must be a finite number >= 0, got {weight_std}")
    weight = torch.empty(shape, dtype=torch.float32).normal_(0.0, std)
    return weight, torch.full((shape[0],), float(bias), dtype=torch.float32)


def information_alpha(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_alpha: float,
                      with_gate: bool = False):
    """Information Dropout's noise scale ``alpha(x) = 0.001 + max_alpha * sigmoid(x W^T + b)``.

    ``weight`` ``(N, D)``: x is flattened to ``(B, D)`` (InnerProduct); ``(C, C_x,
    1, 1)``: a 1x1 convolution of x (one alpha per element). alpha lies in
    [0.001, 0.001 + max_alpha], computed in float32 (float64 stays float64). ``with_gate`` also returns
    the sigmoid, for a hand-written backward.
    """
    if weight.dim() == 4:
        pre = torch.nn.functional.conv2d(x, weight, bias)
    else:
        pre = torch.nn.functional.linear(x.flatten(1), weight, bias)
    gate = torch.sigmoid(pre if pre.dtype == torch.float64 else pre.float())
    alpha = INFORMATION_ALPHA_FLOOR + max_alpha * gate
    return (alpha, gate) if with_gate else alpha


def information_kl(alpha: torch.Tensor, max_alpha: float) -> torch.Tensor:
    """The KL term of Information Dropout with the log-uniform prior (Achille & Soatto, Sec. 5)::

        KL = mean over images of  sum over units of  -log(alpha / (max_alpha + 0.001))

    A 0-d tensor; 0 when every alpha is at its maximum, and it grows as alpha
    shrinks (less noise = more information kept about the input).
    """
    return -(torch.log(alpha) - math.log(max_alpha + INFORMATION_ALPHA_FLOOR)).flatten(1).sum(1).mean()


def information_noise(f: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """eps ~ N(0, 1), one per element of ``f``, float32, on f's device (torch's global generator by default)."""
    return torch.randn(f.shape, device=f.device, dtype=torch.float32, generator=generator)


def information_dropout(
    f: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    max_alpha: float = 0.7,
    training: bool = True,
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Information Dropout (Achille & Soatto, TPAMI 2018) on one blob: ``(output, KL)``.

    Training: ``output = f * exp(alpha(x) * eps)``, eps ~ N(0, 1) per element
    (log-normal multiplicative noise, differentiable in f, x, W and b through
    the reparametrisation); eval: ``output = f``. alpha is
    :func:`information_alpha` of ``x`` (default: f itself), the KL term
    :func:`information_kl`, returned in both modes (the training loss adds
    beta times it). ``eps`` may be given (tests); else it is drawn by
    :func:`information_noise`.
    """
    if not max_alpha > 0.0:
        raise ValueError(f"max_alpha must be > 0, got {max_alpha}")
    alpha = information_alpha(f if x is None else x, weight, bias, max_alpha)
    kl = information_kl(alpha, max_alpha)
    if not training:
        return f, kl
    if eps is None:
        eps = information_noise(f, generator)
    return f * torch.exp(alpha * eps.reshape(f.shape)), kl
