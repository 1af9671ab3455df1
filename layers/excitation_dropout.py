"""Excitation Dropout (Zunino et al., IJCV 2021, Eqn 3) as a Caffe Python layer.

    layer { name: "drop" type: "Python" bottom: "ip1" top: "ip1"
      python_param { module: "excitation_dropout" layer: "ExcitationDropout"
                     param_str: "{'dropout_ratio': 0.5}" } }

param_str keys: dropout_ratio (probability of dropping, Caffe's DropoutParameter
name; the paper's base retain probability is P = 1 - dropout_ratio; default
0.5); signal ('gt', 'pred' or a class index: where the top signal of Excitation
Backprop sits); logits / label (blob names; default: the bottoms of the net's
SoftmaxWithLoss); rescale (divide each image by its kept fraction, default
True); grad_rescale (gradient carries 1/scale, default True; False = the
authors' code); count ('all': N of Eqn 3 is the layer's width, the paper;
'alive': the units with a positive activation in each image, an ablation).

Training: p_EB of the bottom blob, from a one-hot top signal at the logits,
gives each unit's retain probability (Eqn 3); a new mask per image; on a
convolution blob whole feature maps are dropped. Test: identity.
In the engine the net computes p_EB before calling the layer; inside real
Caffe the Caffe backend (exdrop.caffe.backend) installs a saliency hook on the
layer, which runs the layers above it and Excitation Backprop on Caffe's blobs.
"""
import numpy as np
import torch

from _guided import TRAIN, DropoutLayerBase
from exdrop.engine import functional as Fx
from exdrop.nn import ExcitationDropout as _Module
from exdrop.engine.pylayer import request_saliency

DEFAULTS = {"dropout_ratio": 0.5, "signal": "gt", "logits": None, "label": None, "rescale": True,
            "grad_rescale": True, "count": "all"}


class ExcitationDropout(DropoutLayerBase):
    defaults = DEFAULTS
    saliency = "excitation"  # what the backend's hook hands this layer: p_EB of its bottom

    def forward(self, bottom, top):
        if self.phase == TRAIN:
            top[0].data[...] = bottom[0].data  # the head above sees the unmasked blob
            self.p_eb = request_saliency(self)
        super().forward(bottom, top)

    @staticmethod
    def torch_module(params, phase):
        return _Module(p=params["dropout_ratio"], rescale=params["rescale"],
                       grad_rescale=params["grad_rescale"], signal=params["signal"], count=params["count"])

    def multiplier(self, x):
        share = Fx.unit_saliency(torch.from_numpy(np.asarray(self.p_eb, dtype=np.float32)))
        units = Fx.alive_units(x) if self.params["count"] == "alive" else None
        return _masks(x, Fx.retain_probability(share, 1.0 - float(self.params["dropout_ratio"]), units), self.params)


def _masks(x, retain, params):
    """Sample the unit mask and return (forward multiplier, gradient multiplier) in numpy."""
    mask = Fx.sample_unit_mask(retain)
    ones = x.new_ones(x.shape)
    fwd = Fx.apply_unit_mask(ones, mask, rescale=params["rescale"])
    grad = fwd if params["grad_rescale"] else Fx.apply_unit_mask(ones, mask, rescale=False)
    return fwd.numpy(), grad.numpy()
