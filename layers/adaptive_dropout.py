"""Adaptive Dropout, Standout (Ba and Frey, NIPS 2013), as a Caffe Python layer.

    layer { name: "drop" type: "Python" bottom: "ip1" top: "ip1"
      python_param { module: "adaptive_dropout" layer: "AdaptiveDropout"
                     param_str: "{'alpha': 1.0, 'beta': 0.0}" } }

param_str keys: alpha (default 1.0), beta (default 0.0). Each element is kept
with probability pi = sigmoid(alpha z + beta), z the layer's pre-activation
(the standout network's weights tied to the layer's). Training: top = m * bottom,
m ~ Bernoulli(pi) per element, no rescaling; the mask is not differentiated:
bottom diff = m * top diff. Test: top = pi * bottom (the expected training
output, pi computed from the test input), in Caffe's TEST phase as in the
engine's TEST net.

pi is computed from the bottom. In the prototxts the layer sits in place after
the in-place ReLU on ip1, so the bottom is a = relu(z), and that gives exactly
the outputs of pi(z): where z > 0, a = z and pi(a) = pi(z); where z <= 0, a = 0
and the output is 0 whatever the mask or pi (and Caffe's ReLU passes no gradient
there, so the diffs below agree too). On a blob that is not post-ReLU the bottom
is the pre-activation itself. (After a ReLU with a negative_slope neither holds:
put the layer on the pre-activation there.)

For Excitation Backprop this is not a dropout layer (``is_dropout`` False): in
test mode it scales by pi instead of passing its bottom through, so EB through it
(an ExcitationDropout layer below it) stops with an error naming the layer, in
the engine and in the Caffe backend alike, instead of computing p_EB on a head
that is not the test-mode net. The shipped prototxts never put it above an
ExcitationDropout layer.
"""
import numpy as np
import torch

from _guided import TRAIN, DropoutLayerBase
from exdrop.engine import functional as Fx
from exdrop.nn import AdaptiveDropout as _Module


class AdaptiveDropout(DropoutLayerBase):
    defaults = {"alpha": 1.0, "beta": 0.0}
    is_dropout = False  # test mode scales by pi: no pass-through for EB

    @staticmethod
    def torch_module(params, phase):
        return _Module(alpha=params["alpha"], beta=params["beta"])

    def forward(self, bottom, top):
        x = bottom[0].data
        self.mult, self.grad_mult = self.multiplier(torch.from_numpy(np.ascontiguousarray(x)))
        top[0].data[...] = x * self.mult

    def multiplier(self, x):
        """TRAIN: the 0/1 mask; TEST: pi. The same array scales the top diff."""
        m = Fx.adaptive_dropout(x.new_ones(x.shape), float(self.params["alpha"]), float(self.params["beta"]),
                                training=self.phase == TRAIN, pre_activation=x).numpy()
        return m, m
