"""Standard dropout with a choice of mask sharing, as a Caffe Python layer.

param_str keys: dropout_ratio (probability of dropping a unit, default 0.5);
per_image (default True: a different mask for each image, the paper's
"Standard + Mask/Img" control; False: one mask for the whole minibatch). Units
are whole feature maps on a convolution blob. Kept units are scaled by
1/(1 - dropout_ratio); test: identity. Caffe's built-in `Dropout` layer (an
independent draw per element) remains the plain Standard Dropout of the prototxts.
"""
import torch

from _guided import DropoutLayerBase
from exdrop.nn import StandardDropout as _Module


class StandardDropout(DropoutLayerBase):
    defaults = {"dropout_ratio": 0.5, "per_image": True}

    @staticmethod
    def torch_module(params, phase):
        return _Module(p=params["dropout_ratio"], per_image=params["per_image"])

    def multiplier(self, x):
        ones = torch.ones_like(x)
        m = _Module(p=self.params["dropout_ratio"], per_image=self.params["per_image"]).train()(ones).numpy()
        return m, m
