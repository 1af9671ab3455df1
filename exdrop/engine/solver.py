"""Caffe's solvers (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam) on PyTorch tensors.

One call of :meth:`Solver.step_update` is Caffe's ``SGDSolver::ApplyUpdate``
(src/caffe/solvers/sgd_solver.cpp) followed by ``++iter_`` (src/caffe/solver.cpp,
``Solver::Step``):

1. ``GetLearningRate``  (lr_policy; sgd_solver.cpp)
2. ``ClipGradients``    (global L2 norm of all diffs, before normalization; sgd_solver.cpp)
3. per parameter: ``Normalize`` (divide by iter_size), ``Regularize`` (L2/L1 weight
   decay), ``ComputeUpdateValue`` (the solver type's rule; src/caffe/solvers/*.cpp)
4. ``Net::Update``      (w -= diff; src/caffe/blob.cpp ``Blob::Update``)

Everything runs as grouped ``torch._foreach_*`` ops with Python scalars: no
``.item()``/``.cpu()`` and no host sync.  The gradients in ``p.grad`` are overwritten
(as Caffe overwrites the diff) with the final update value.

Parameters with lr_mult == 0 get a zero gradient (Caffe sets param_propagate_down
false for them, so their diff stays 0), their history is updated like Caffe's
(weight decay can still move Adam/AdaGrad/... history), and their weights are never
touched.  Histories are kept in Caffe's order: ``history[i]`` for parameter ``i``, and
for Adam/AdaDelta a second set ``history[n + i]`` (Caffe's ``AdamPreSolve`` /
``AdaDeltaPreSolve``), which is also the order written to a ``.solverstate``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from exdrop.proto import io as caffe_io
from exdrop.proto import caffe_pb2

__all__ = ["ParamEntry", "Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver",
           "RMSPropSolver", "AdaDeltaSolver", "AdamSolver", "make_solver", "solver_class", "SOLVER_TYPES"]


def _f32(x) -> float:
    """Round to float32 (Caffe's Dtype) and return a Python float."""
    return float(np.float32(x))


@dataclass
class ParamEntry:
    """One learnable blob (Caffe's learnable_params_[i] with its ParamSpec multipliers)."""
    tensor: torch.nn.Parameter
    lr_mult: float = 1.0
    decay_mult: float = 1.0
    name: str = ""


def caffe_rate(p, it: int, step: int) -> tuple[float, int]:
    """Caffe's SGDSolver::GetLearningRate at iteration ``it`` -> (rate, new current_step)."""
    base_lr, gamma, power = _f32(p.base_lr), _f32(p.gamma), _f32(p.power)
    policy = p.lr_policy
    if policy == "fixed":
        rate = base_lr
    elif policy == "step":
        if p.stepsize <= 0:
            raise ValueError("lr_policy 'step' needs stepsize > 0")
        step = it // p.stepsize
        rate = base_lr * math.pow(gamma, step)
    elif policy == "exp":
        rate = base_lr * math.pow(gamma, it)
    elif policy == "inv":
        rate = base_lr * math.pow(1.0 + gamma * it, -power)
    elif policy == "multistep":
        # one step per call, exactly like Caffe's `if` (not `while`)
        if step < len(p.stepvalue) and it >= p.stepvalue[step]:
            step += 1
        rate = base_lr * math.pow(gamma, step)
    elif policy == "poly":
        if p.max_iter <= 0:
            raise ValueError("lr_policy 'poly' needs max_iter > 0")
        rate = base_lr * math.pow(1.0 - it / float(p.max_iter), power)
    elif policy == "sigmoid":
        rate = base_lr * (1.0 / (1.0 + math.exp(-gamma * (it - float(p.stepsize)))))
    else:
        raise ValueError(f"Unknown learning rate policy: {policy!r}")
    return _f32(rate), step


class Solver:
    """Base: Caffe's SGDSolver minus ComputeUpdateValue (see module docstring).

    ``Solver(param, params)`` returns the subclass named by ``param`` (as make_solver).
    Create it after the parameters are on their final device (history lives there).
    """

    type_name = ""
    n_history_sets = 1

    def __new__(cls, param=None, params=None):
        if cls is Solver:
            cls = solver_class(param)
        return super().__new__(cls)

    def __init__(self, param: caffe_pb2.SolverParameter, params: list[ParamEntry]) -> None:
        self.param = param
        self.params = list(params)
        self.iter = 0           # Caffe's iter_
        self.current_step = 0   # Caffe's current_step_ (step / multistep policies)
        self._w = [e.tensor for e in self.params]
        self._lr_mult = [_f32(e.lr_mult) for e in self.params]
        self._frozen = [lr == 0.0 for lr in self._lr_mult]
        self._upd_idx = [i for i, fr in enumerate(self._frozen) if not fr]
        wd = _f32(param.weight_decay)
        self._decay = [_f32(np.float32(wd) * np.float32(e.decay_mult)) for e in self.params]
        self._decay_idx = [i for i, d in enumerate(self._decay) if d != 0.0]
        if param.regularization_type not in ("L1", "L2"):
            raise ValueError(f"Unknown regularization type: {param.regularization_type}")
        self.history = [torch.zeros_like(w, memory_format=torch.contiguous_format).detach()
                        for _ in range(self.n_history_sets) for w in self._w]

    # ---------------------------------------------------------------- learning rate
    def _rate(self) -> tuple[float, int]:
        """Caffe's SGDSolver::GetLearningRate at self.iter -> (rate, new current_step)."""
        return caffe_rate(self.param, self.iter, self.current_step)

    def learning_rate(self) -> float:
        """The rate the next step_update will use (no bookkeeping side effects)."""
        return self._rate()[0]

    # ---------------------------------------------------------------- update
    def _grads(self) -> list[torch.Tensor]:
        gs = []
        for w, frozen in zip(self._w, self._frozen):
            g = w.grad
            if frozen or g is None:
                g = torch.zeros_like(w).detach()
            gs.append(g)
        return gs

    def _clip(self, grads) -> None:
        """ClipGradients: if ||all diffs||_2 > clip_gradients, scale them by clip/norm."""
        clip = _f32(self.param.clip_gradients)
        if clip < 0 or not grads:
            return
        norms = torch._foreach_norm(grads)
        l2 = torch.stack([n.float() for n in norms]).square().sum().sqrt()
        scale = torch.clamp(clip / l2, max=1.0)   # norm <= clip (or 0) -> exactly 1
        torch._foreach_mul_(grads, scale)

    def _normalize_and_regularize(self, grads) -> None:
        """Normalize (diff /= iter_size) and Regularize (diff += local_decay * w or * sign(w))."""
        if self.param.iter_size != 1:
            torch._foreach_mul_(grads, _f32(1.0 / np.float32(self.param.iter_size)))
        if not self._decay_idx:
            return
        l1 = self.param.regularization_type == "L1"
        for i in self._decay_idx:  # in place: no copy of the weights (134M floats for CNN-2 at 128x128)
            w = self._w[i].detach()
            grads[i].add_(torch.sign(w) if l1 else w, alpha=self._decay[i])

    def _compute_update(self, grads, rate: float) -> list[torch.Tensor]:
        """ComputeUpdateValue for all parameters; returns the update values (diffs)."""
        raise NotImplementedError

    def _rms_scaled(self, grads, num, h, rate: float, factor=np.float32(1)) -> list[torch.Tensor]:
        """diff = local_rate * factor * num / (sqrt(h) + delta), built in the gradient buffers
        (AdaGrad, RMSProp, Adam); no copy of the parameters is allocated."""
        delta = _f32(self.param.delta)
        for g, n, hi, lr in zip(grads, num, h, self._local_rates(rate)):
            if n is g:
                g.div_(hi.sqrt().add_(delta))
            else:
                torch.sqrt(hi, out=g)
                g.add_(delta)
                torch.div(n, g, out=g)
            g.mul_(_f32(np.float32(lr) * factor))
        return grads

    def _local_rates(self, rate: float) -> list[float]:
        r = np.float32(rate)
        return [_f32(r * np.float32(lr)) for lr in self._lr_mult]

    @torch.no_grad()
    def step_update(self) -> float:
        """ApplyUpdate then iter += 1; returns the learning rate used."""
        rate, self.current_step = self._rate()
        if self._w:
            grads = self._grads()
            self._clip(grads)
            self._normalize_and_regularize(grads)
            upd = self._compute_update(grads, rate)
            if self._upd_idx:
                torch._foreach_sub_([self._w[i] for i in self._upd_idx],
                                    [upd[i] for i in self._upd_idx])
        self.iter += 1
        return rate

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"type": self.type_name, "iter": self.iter, "current_step": self.current_step,
                "history": [h.detach().clone() for h in self.history]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if state.get("type", self.type_name) != self.type_name:
            raise ValueError(f"solver state is for {state['type']}, this solver is {self.type_name}")
        hist = state["history"]
        if len(hist) != len(self.history):
            raise ValueError(f"solver state has {len(hist)} history blobs, expected {len(self.history)}")
        for h, s in zip(self.history, hist):
            h.copy_(torch.as_tensor(s).reshape(h.shape))
        self.iter, self.current_step = int(state["iter"]), int(state["current_step"])

    def save_solverstate(self, path, learned_net: str) -> None:
        """Caffe's SGDSolver::SnapshotSolverStateToBinaryProto (binary SolverState)."""
        st = caffe_pb2.SolverState(iter=self.iter, learned_net=learned_net,
                                   current_step=self.current_step)
        for h in self.history:
            st.history.append(caffe_io.array_to_blob(h.detach().float().cpu().numpy()))
        caffe_io.write_binary_proto(st, path)

    def restore_solverstate(self, path) -> str:
        """Caffe's SGDSolver::RestoreSolverStateFromBinaryProto; returns learned_net
        (the caller loads those weights, as Caffe's CopyTrainedLayersFrom does)."""
        if str(path).endswith(".h5"):
            raise ValueError(f"{path}: HDF5 solver states are not supported")
        st = caffe_io.read_binary_proto(path, caffe_pb2.SolverState())
        if len(st.history) != len(self.history):
            raise ValueError(f"{path}: {len(st.history)} history blobs, this {self.type_name} "
                             f"solver needs {len(self.history)}")
        arrays = []
        for i, (blob, h) in enumerate(zip(st.history, self.history)):
            a = caffe_io.blob_to_array(blob)
            if a.size != h.numel():
                raise ValueError(f"{path}: history blob {i} has {a.size} values, expected {h.numel()}")
            arrays.append(torch.from_numpy(a.reshape(tuple(h.shape))))
        self.load_state_dict({"iter": st.iter, "current_step": st.current_step, "history": arrays})
        return st.learned_net


class SGDSolver(Solver):
    """sgd_solver.cpp: history = momentum * history + local_rate * diff; diff = history."""
    type_name = "SGD"

    def _compute_update(self, grads, rate):
        h = self.history
        torch._foreach_mul_(grads, self._local_rates(rate))
        torch._foreach_mul_(h, _f32(self.param.momentum))
        torch._foreach_add_(h, grads)
        return h


class NesterovSolver(Solver):
    """nesterov_solver.cpp: h' = momentum*h + local_rate*diff; diff = (1+momentum)*h' - momentum*h."""
    type_name = "Nesterov"

    def _compute_update(self, grads, rate):
        m = _f32(self.param.momentum)
        h = self.history
        old = torch._foreach_mul(h, -m)
        torch._foreach_mul_(grads, self._local_rates(rate))
        torch._foreach_mul_(h, m)
        torch._foreach_add_(h, grads)
        torch._foreach_add_(old, h, alpha=_f32(1.0 + np.float32(m)))
        return old


class AdaGradSolver(Solver):
    """adagrad_solver.cpp: h += diff^2; diff = local_rate * diff / (sqrt(h) + delta)."""
    type_name = "AdaGrad"

    def __init__(self, param, params):
        if param.momentum != 0:
            raise ValueError("Momentum cannot be used with AdaGrad.")
        super().__init__(param, params)

    def _compute_update(self, grads, rate):
        h = self.history
        torch._foreach_addcmul_(h, grads, grads)
        return self._rms_scaled(grads, grads, h, rate)


class RMSPropSolver(Solver):
    """rmsprop_solver.cpp: h = rms_decay*h + (1-rms_decay)*diff^2;
    diff = local_rate * diff / (sqrt(h) + delta)."""
    type_name = "RMSProp"

    def __init__(self, param, params):
        if param.momentum != 0:
            raise ValueError("Momentum cannot be used with RMSProp.")
        if not 0 <= param.rms_decay < 1:
            raise ValueError("rms_decay should lie between 0 and 1.")
        super().__init__(param, params)

    def _compute_update(self, grads, rate):
        d = np.float32(self.param.rms_decay)
        h = self.history
        torch._foreach_mul_(h, _f32(d))
        torch._foreach_addcmul_(h, grads, grads, value=_f32(np.float32(1) - d))
        return self._rms_scaled(grads, grads, h, rate)


class AdaDeltaSolver(Solver):
    """adadelta_solver.cpp (history[i]: E[g^2], history[n+i]: E[dx^2]):
    h1 = m*h1 + (1-m)*g^2; dx = g*sqrt((h2+delta)/(h1+delta)); h2 = m*h2 + (1-m)*dx^2;
    diff = local_rate * dx."""
    type_name = "AdaDelta"
    n_history_sets = 2

    def _compute_update(self, grads, rate):
        n = len(grads)
        m = np.float32(self.param.momentum)
        one_m, delta = _f32(np.float32(1) - m), _f32(self.param.delta)
        h1, h2 = self.history[:n], self.history[n:]
        torch._foreach_mul_(h1, _f32(m))
        torch._foreach_addcmul_(h1, grads, grads, value=one_m)
        num = torch._foreach_add(h2, delta)
        den = torch._foreach_add(h1, delta)
        torch._foreach_div_(num, den)
        torch._foreach_sqrt_(num)
        torch._foreach_mul_(grads, num)
        torch._foreach_mul_(h2, _f32(m))
        torch._foreach_addcmul_(h2, grads, grads, value=one_m)
        torch._foreach_mul_(grads, self._local_rates(rate))
        return grads


class AdamSolver(Solver):
    """adam_solver.cpp (history[i]: m, history[n+i]: v; b1 = momentum, b2 = momentum2):
    m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; t = iter+1;
    diff = local_rate * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + delta)."""
    type_name = "Adam"
    n_history_sets = 2

    def _compute_update(self, grads, rate):
        n = len(grads)
        b1, b2 = np.float32(self.param.momentum), np.float32(self.param.momentum2)
        t = self.iter + 1
        correction = np.float32(math.sqrt(1.0 - math.pow(b2, t)) / (1.0 - math.pow(b1, t)))
        m, v = self.history[:n], self.history[n:]
        torch._foreach_mul_(m, _f32(b1))
        torch._foreach_add_(m, grads, alpha=_f32(np.float32(1) - b1))
        torch._foreach_mul_(v, _f32(b2))
        torch._foreach_addcmul_(v, grads, grads, value=_f32(np.float32(1) - b2))
        return self._rms_scaled(grads, m, v, rate, correction)


SOLVER_TYPES = {c.type_name: c for c in (SGDSolver, NesterovSolver, AdaGradSolver,
                                         RMSPropSolver, AdaDeltaSolver, AdamSolver)}
assert tuple(SOLVER_TYPES) == caffe_io.SOLVER_TYPE_NAMES


def solver_class(param: caffe_pb2.SolverParameter) -> type:
    """The class for ``type`` or the legacy ``solver_type`` enum (:func:`exdrop.proto.io.solver_type`)."""
    return SOLVER_TYPES[caffe_io.solver_type(param)]


def make_solver(param: caffe_pb2.SolverParameter, params: list[ParamEntry], source: str | None = None) -> Solver:
    """Build the solver named by ``param.type`` (or legacy ``solver_type``); ``source``, the
    solver file, prefixes error messages."""
    try:
        return solver_class(param)(param, params)
    except ValueError as e:
        if source is None:
            raise
        raise ValueError(f"{source}: {e}") from None
