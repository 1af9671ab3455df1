"""Curriculum Dropout (Morerio et al., ICCV 2017) as a Caffe Python layer.

    layer { name: "drop" type: "Python" bottom: "ip1" top: "ip1"
      python_param { module: "curriculum_dropout" layer: "CurriculumDropout"
                     param_str: "{'dropout_ratio': 0.5, 'gamma': 0.0005}" } }

param_str keys: dropout_ratio (the final probability of dropping, default 0.5;
the final retain probability is theta_bar = 1 - dropout_ratio); gamma (the
schedule's rate, default 5e-4 as in the paper's Sec. 4.2).

Training at solver iteration t: every element is kept independently with
probability theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar (like Caffe's
Dropout, one draw per element), kept ones are scaled by 1/theta(t), and the
gradient is the same multiplier times the top diff. Test: identity.

The layer needs t (class attribute ``needs_iteration``): whoever drives the
solver sets ``layer.iteration`` before each step. The engine does it through
``exdrop.engine.net.Net.set_iteration`` from its solver's iteration; the Caffe backend
(exdrop.caffe.backend) sets ``layer.iteration = solver.iter`` on this object
before every ``solver.step(1)``. A TRAIN forward inside Caffe with no iteration
set is an error rather than a silent theta = 1 (no dropout at all).
"""
from _guided import DropoutLayerBase
from exdrop.engine import functional as Fx
from exdrop.nn import CurriculumDropout as _Module


class CurriculumDropout(DropoutLayerBase):
    defaults = {"dropout_ratio": 0.5, "gamma": 0.0005}
    needs_iteration = True
    iteration = None  # the solver's iteration, set by the driver before each step

    @staticmethod
    def torch_module(params, phase):
        return _Module(p=params["dropout_ratio"], gamma=params["gamma"])

    def multiplier(self, x):
        if self.iteration is None:
            raise RuntimeError(
                "CurriculumDropout in TRAIN needs the solver's iteration t for its retain probability theta(t): "
                "train with `exdrop train --backend caffe` (exdrop.caffe.backend sets layer.iteration = "
                "solver.iter before each step), or set the layer's `iteration` attribute yourself")
        m = Fx.curriculum_dropout(x.new_ones(x.shape), int(self.iteration), float(self.params["dropout_ratio"]),
                                  float(self.params["gamma"])).numpy()
        return m, m
