"""Table 5's per-image utilization metrics of a layer (# Neurons ON, peak p_EB, the entropies of
the activations and of p_EB) and the meter that both backends' test passes log them with
(``log.csv`` columns); :mod:`exdrop.analysis.analyze` measures them over whole test sets and snapshots.
"""
from __future__ import annotations

import math

import torch

from exdrop.engine.functional import unit_saliency
from exdrop.engine.net import filter_layers
from exdrop.engine.pylayer import TEST

METRICS = ("neurons_on", "peak_peb", "entropy_act", "entropy_peb")


def neurons_on(a: torch.Tensor) -> torch.Tensor:
    """# Neurons ON: per image, the units with a non-zero activation, ``(B,)`` float."""
    return (unit_saliency(a) != 0).sum(1).float()


def peak(p: torch.Tensor) -> torch.Tensor:
    """Peak p_EB: per image, the largest unit value, ``(B,)``."""
    return unit_saliency(p).max(1).values.float()


def entropy(x: torch.Tensor) -> torch.Tensor:
    """Per image, the entropy (nats) of the non-negative values normalised to sum to 1, ``(B,)``.

    0 ln 0 = 0; an image whose values are all 0 has entropy 0 (nothing is spread)."""
    u = unit_saliency(x).float().clamp_min(0)
    total = u.sum(1, keepdim=True)
    q = u / torch.where(total > 0, total, torch.ones_like(total))
    return -(q * torch.where(q > 0, q.log(), torch.zeros_like(q))).sum(1)


def utilization(a: torch.Tensor, p: torch.Tensor) -> dict:
    """The four per-image metrics of activations ``a`` and p_EB ``p``, each summed over the batch
    (device tensors: no host sync)."""
    return {"neurons_on": neurons_on(a).sum(), "peak_peb": peak(p).sum(), "entropy_act": entropy(a).sum(),
            "entropy_peb": entropy(p).sum()}


class UtilizationMeter:
    """The utilization columns of one test pass (both backends): the first ``images`` images of
    the pass, batch by batch; sums stay where the tensors are (no host sync until ``means``)."""

    def __init__(self, images: int, batch: int):
        self.batches = math.ceil(images / max(1, batch))
        self.sums: dict = {}
        self.images = 0

    def add(self, a: torch.Tensor, p: torch.Tensor) -> None:
        for name, v in utilization(a, p).items():
            self.sums[name] = self.sums[name] + v if name in self.sums else v
        self.images += a.shape[0]

    def reduce(self, sum_over) -> None:
        """Add up the meters of many processes; ``sum_over``: a list of tensors -> their sums over the processes."""
        names = list(self.sums)
        if not names:
            return
        device = torch.as_tensor(self.sums[names[0]]).device
        *sums, images = sum_over([torch.as_tensor(self.sums[k], device=device).double() for k in names]
                                 + [torch.tensor(float(self.images), dtype=torch.float64, device=device)])
        self.sums, self.images = dict(zip(names, sums)), int(round(float(images)))

    def means(self) -> dict:
        return {name: float(v) / self.images for name, v in self.sums.items()}



def _test_layers(param) -> list:
    """A NetParameter's TEST-phase layers (a list of LayerParameters is taken as it is)."""
    return filter_layers(param, TEST) if hasattr(param, "layer") else list(param)


def default_blob(param) -> str:
    """The first fully connected layer's top (Table 5 measures fc1 / fc6), of a NetParameter (TEST
    phase) or a list of LayerParameters."""
    for lp in _test_layers(param):
        if lp.type == "InnerProduct":
            return lp.top[0]
    raise ValueError(f"net '{getattr(param, 'name', '')}': no InnerProduct layer; name the blob to analyse (--blob)")


def utilization_target(param, wanted: str | None, blob_shapes: dict) -> tuple[str, str, str] | None:
    """(blob, scores, label) whose utilization a training run's test passes log, from the TEST net
    ``param`` (a NetParameter, or its TEST layers): ``wanted`` "auto" the first fc (None when the net has no SoftmaxWithLoss with a
    label or no InnerProduct), a blob name (errors name what is missing), or None / "" (off)."""
    if not wanted:
        return None
    loss = next((lp for lp in _test_layers(param) if lp.type == "SoftmaxWithLoss"), None)
    if loss is None or len(loss.bottom) < 2:
        if wanted == "auto":
            return None
        raise ValueError(f"--utilization {wanted}: the test net has no SoftmaxWithLoss with a label, which p_EB of "
                         "the ground-truth class needs")
    if wanted == "auto":
        try:
            wanted = default_blob(param)
        except ValueError:
            return None
    if wanted not in blob_shapes or len(blob_shapes[wanted]) < 2:
        raise ValueError(f"--utilization {wanted}: no blob of units by that name in the test net "
                         f"(blobs: {', '.join(blob_shapes)})")
    return wanted, loss.bottom[0], loss.bottom[1]
