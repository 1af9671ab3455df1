"""Activation Dropout (Zunino et al., IJCV 2021, Sec. 5, Eqn 4) as a Caffe Python layer.

p_Act = a / sum(a) per image (post-ReLU activations of the bottom blob) takes
the place of p_EB in Eqn 3; no backward pass is needed to build the mask.
param_str keys: dropout_ratio (probability of dropping; the paper's base retain
probability is P = 1 - dropout_ratio; default 0.5), rescale, grad_rescale.
"""
from _guided import DropoutLayerBase
from excitation_dropout import _masks
from exdrop.engine import functional as Fx
from exdrop.nn import ActivationDropout as _Module


class ActivationDropout(DropoutLayerBase):
    defaults = {"dropout_ratio": 0.5, "rescale": True, "grad_rescale": True}

    @staticmethod
    def torch_module(params, phase):
        return _Module(p=params["dropout_ratio"], rescale=params["rescale"], grad_rescale=params["grad_rescale"])

    def multiplier(self, x):
        return _masks(x, Fx.retain_probability(Fx.activation_share(x), 1.0 - float(self.params["dropout_ratio"])),
                      self.params)
