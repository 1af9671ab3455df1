"""The functional core of guided dropout: retain probabilities and masks.

Everything here is a pure function of tensors, shared by the prototxt Python
layers in ``layers/`` and by the drop-in modules in :mod:`exdrop.nn`.

Shapes: a fully connected blob is ``(B, N)``; a convolution blob is
``(B, N, H, W)`` where ``N`` counts feature maps (Sec. 4.2: p_EB is summed
over space and whole maps are dropped).
"""
from __future__ import annotations

import torch


def unit_saliency(saliency: torch.Tensor) -> torch.Tensor:
    """Collapse a saliency blob to one value per unit: ``(B, N)``.

    For a convolution blob the map is summed over space (Sec. 4.2); any other
    trailing axes of a fully connected blob are flattened into units.
    """
    if saliency.dim() == 4:
        return saliency.sum(dim=(2, 3))
    return saliency.flatten(1)


def retain_probability(p: torch.Tensor, base_retain: float) -> torch.Tensor:
    """Eqn 3 (and Eqn 4): retain probability of each unit from its share ``p``.

    ``p`` is ``(B, N)``: p_EB (Eqn 3) or p_Act (Eqn 4), a distribution over the
    N units of one image. With P the base retain probability::

        p_retain = 1 - (1-P)(N-1) p / (((1-P)N - 1) p + P)

    which gives 1 at p = 0, 0 at p = 1 and P at p = 1/N, and decreases in p.

    The result is always a valid Bernoulli probability in [0, 1]: a share outside
    [0, 1] is clamped into it first, and a NaN share gives 1 (the unit is kept, so a
    NaN input reaches the loss, where the run loop reports the divergence, instead of
    failing inside ``torch.bernoulli``). No host synchronisation.
    """
    if not 0.0 < base_retain <= 1.0:
        raise ValueError(f"base retain probability must be in (0, 1], got {base_retain}")
    n = p.shape[1]
    drop_rate = 1.0 - base_retain
    p = torch.where(torch.isnan(p), torch.zeros_like(p), p)   # NaN share: keep the unit
    p = p.clamp(0.0, 1.0)
    denom = (drop_rate * n - 1.0) * p + base_retain
    # denom >= min(P, (1-P)(N-1)) > 0 on [0, 1] when N > 1; guard N == 1 anyway.
    drop = drop_rate * (n - 1) * p / denom.clamp_min(torch.finfo(p.dtype).tiny)
    return (1.0 - drop).clamp(0.0, 1.0)


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
) -> torch.Tensor:
    """Excitation/Activation Dropout on one blob (training mode).

    ``share`` is the per-unit distribution (``(B, N)`` or the saliency blob of
    x's shape, which is then collapsed by :func:`unit_saliency`). ``p`` is the
    dropout probability as in ``torch.nn.functional.dropout``: the paper's base
    retain probability is P = 1 - p (the retain probability of a unit whose
    share is 1/N). A NaN share keeps its unit (:func:`retain_probability`).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability has to be in [0, 1), got {p} (base retain probability P = 1 - p)")
    retain = retain_probability(unit_saliency(share).float(), 1.0 - p)
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
