"""Excitation Dropout (Zunino et al., IJCV 2021, Eqn 3) as a Caffe Python layer.

    layer { name: "drop1" type: "Python" bottom: "ip1" top: "ip1"
      python_param { module: "excitation_dropout" layer: "ExcitationDropout"
                     param_str: "{'p': 0.5}" } }

param_str keys: p (base retain probability P, default 0.5); signal ('gt',
'pred' or a class index: where the top signal of Excitation Backprop sits);
logits / label (blob names; default: the bottoms of the net's SoftmaxWithLoss);
rescale (divide each image by its kept fraction, default True); grad_rescale
(gradient carries 1/scale, default True; False = the authors' code).

Training: p_EB of the bottom blob, from a one-hot top signal at the logits,
gives each unit's retain probability (Eqn 3); a new mask per image; on a
convolution blob whole feature maps are dropped. Test: identity.
In the engine the training loop computes p_EB; inside real Caffe the driver
(scripts/train_caffe.py) computes it in numpy and sets `self.saliency`.
"""
import numpy as np

from _guided import TRAIN, DropoutLayerBase
from exdrop import functional as Fx
from exdrop.nn import ExcitationDropout as _Module

DEFAULTS = {"p": 0.5, "signal": "gt", "logits": None, "label": None, "rescale": True, "grad_rescale": True}


class ExcitationDropout(DropoutLayerBase):
    defaults = DEFAULTS
    saliency = None  # numpy p_EB of the bottom, for this forward
    provider = None  # set by scripts/train_caffe.py: provider(layer) -> p_EB, runs the head + EB

    def forward(self, bottom, top):
        if self.phase == TRAIN and self.provider is not None:
            top[0].data[...] = bottom[0].data  # the head above sees the unmasked blob
            self.saliency = self.provider(self)
        super().forward(bottom, top)

    @staticmethod
    def torch_module(params, phase):
        return _Module(p=params["p"], rescale=params["rescale"], grad_rescale=params["grad_rescale"],
                       signal=params["signal"])

    def multiplier(self, x):
        if self.saliency is None:
            raise Exception("ExcitationDropout in TRAIN needs p_EB: train with scripts/train_caffe.py, "
                            "which runs Excitation Backprop before this layer")
        import torch
        share = Fx.unit_saliency(torch.from_numpy(np.asarray(self.saliency, dtype=np.float32)))
        return _masks(x, Fx.retain_probability(share, float(self.params["p"])), self.params)


def _masks(x, retain, params):
    """Sample the unit mask and return (forward multiplier, gradient multiplier) in numpy."""
    mask = Fx.sample_unit_mask(retain)
    ones = x.new_ones(x.shape)
    fwd = Fx.apply_unit_mask(ones, mask, rescale=params["rescale"])
    grad = fwd if params["grad_rescale"] else Fx.apply_unit_mask(ones, mask, rescale=False)
    return fwd.numpy(), grad.numpy()
