"""The Caffe backend: real pycaffe (CPU) trains the prototxt; exdrop only answers p_EB.

Each iteration is one ``solver.step(1)`` (the paper's five steps, Fig. 1):
Caffe's forward runs up to an ExcitationDropout layer, whose forward asks for
p_EB of its bottom (:func:`exdrop.engine.pylayer.request_saliency`); the hook
installed here (1) runs the layers above it to the logits on the unmasked
blob, (2) computes p_EB there with the engine's EB rules on Caffe's blobs
(:class:`exdrop.caffe.eb.CaffeExcitation`); the layer (3) masks its blob; then
(4) Caffe's forward continues and (5) Caffe's backward and its own update
follow. Tests, display and snapshots are scheduled by the shared run loop
(:class:`exdrop.run.train.Trainer`); snapshots are Caffe's own
``.caffemodel``/``.solverstate``.
"""
from __future__ import annotations

import sys
import tempfile
import weakref
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format

from exdrop.caffe.eb import CaffeExcitation
from exdrop.caffe.env import import_caffe
from exdrop.engine.backend import Backend, net_params, prepare_solver
from exdrop.engine.eb import signal_blobs, signal_classes
from exdrop.engine.net import filter_layers
from exdrop.engine.pretrained import check_caffemodel_names
from exdrop.engine.pylayer import TRAIN, layer_search_paths, parse_param_str, set_saliency_hook
from exdrop.engine.snapshot import snapshot_model_path
from exdrop.engine.solver import caffe_rate
from exdrop.engine.utilization import METRICS, UtilizationMeter, utilization_target
from exdrop.proto import io as cio
from exdrop.proto import caffe_pb2

CPU = caffe_pb2.SolverParameter.CPU


def check_cpu_device(device) -> None:
    """pycaffe here is built without CUDA: any device but the CPU (or none, "auto") is refused."""
    if device not in (None, "", "auto", "cpu"):
        raise ValueError(f"the Caffe backend runs on CPU only (`make caffe` builds pycaffe without CUDA); "
                         f"drop --device {device} or use the engine backend")


def load_caffe():
    """pycaffe in CPU mode, able to load the Python layers of ``layers/``."""
    caffe = import_caffe()
    caffe.set_mode_cpu()
    for folder in reversed(layer_search_paths()):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    return caffe


# ---------------------------------------------------------------------- p_EB hooks
class ExcitationHook:
    """p_EB of one ExcitationDropout layer's bottom in a ``caffe.Net`` (Fig. 1, steps 1-2).

    The walker (each layer's geometry, parsed once) holds the net weakly: the net holds
    the layer, and the hook registry keeps the hook as long as the layer lives, so a
    strong reference would keep the net forever.
    """

    def __init__(self, net, net_param, index: int, layer_name: str, blob: str, logits: str,
                 label: str | None, signal, source: str = "<net>"):
        self.walker = CaffeExcitation(weakref.proxy(net), net_param, source)
        self.index, self.layer_name, self.blob = index, layer_name, blob
        self.logits, self.label, self.signal = logits, label, signal
        self.where = f"{source}: layer '{layer_name}'"
        try:
            self.head_end = self.walker.producer(logits)
        except KeyError:
            self.head_end = -1
        if self.head_end <= index:
            raise ValueError(f"{self.where}: no layer above it computes the logits blob '{logits}'")

    def __call__(self, layer) -> np.ndarray:
        net = self.walker.net
        try:
            net._forward(self.index + 1, self.head_end)  # the head, on the unmasked blob
        except ReferenceError:
            raise RuntimeError(f"{self.where}: the caffe.Net its p_EB hook was installed on is gone; keep a "
                               "reference to the net object passed to install_saliency_hooks") from None
        logits = net.blobs[self.logits].data
        labels = net.blobs[self.label].data if self.label else None
        classes = signal_classes(self.signal, torch.from_numpy(logits), labels, where=self.where)
        return self.walker.excitation(self.blob, self.logits, classes.numpy(), stop_after=self.index,
                                      check_finite=False)  # a NaN reaches the loss, where the run loop names it


def install_saliency_hooks(net, net_param, source: str = "<net>") -> list[str]:
    """Give each layer of the TRAIN ``net`` that needs p_EB (its class says ``saliency =
    "excitation"``) an :class:`ExcitationHook`; returns the names of the hooked layers.

    ``net_param`` is the prototxt ``net`` was built from; ``source`` names it in errors
    (a net without a loss layer and without 'logits' in the layer's param_str, say).
    """
    layer_params = filter_layers(net_param, TRAIN)
    by_name = {lp.name: lp for lp in layer_params}
    hooked = []
    for i, (name, layer) in enumerate(zip(net._layer_names, net.layers)):
        if getattr(type(layer), "saliency", None) != "excitation":
            continue
        lp = by_name.get(name)
        if lp is None:
            raise ValueError(f"{source}: layer '{name}' of the Caffe net is not in this prototxt's TRAIN phase")
        params = parse_param_str(lp.python_param.param_str, f"{source}: layer '{name}' param_str")
        logits, label = signal_blobs(layer_params, params, name, source)
        set_saliency_hook(layer, ExcitationHook(net, net_param, i, name, lp.top[0], logits, label,
                                                params.get("signal", "gt"), source))
        hooked.append(name)
    return hooked


def iteration_layers(net) -> list:
    """The Python layers of a ``caffe.Net`` whose class asks for the solver's iteration
    (``needs_iteration``, e.g. Curriculum Dropout). Caffe does not tell a Python layer the
    iteration: the driver sets ``layer.iteration = solver.iter`` on each before every step."""
    return [layer for layer in net.layers if getattr(type(layer), "needs_iteration", False)]


def caffe_solver(caffe, sp):
    """pycaffe's solver for the SolverParameter ``sp``, with Caffe's own test, display and
    snapshot schedule off: inside ``solver.step`` Caffe would test and snapshot again."""
    run = caffe_pb2.SolverParameter()
    run.CopyFrom(sp)
    run.display, run.snapshot = 0, 0
    # Caffe requires test_interval > 0 when there are test nets: one it never reaches
    run.test_interval, run.test_initialization = 2**31 - 1, False
    with tempfile.TemporaryDirectory(prefix="exdrop_caffe_") as tmp:
        path = Path(tmp) / "solver.prototxt"
        path.write_text(text_format.MessageToString(run))
        return caffe.get_solver(str(path))


# ---------------------------------------------------------------------- training
class CaffeBackend(Backend):
    """Real Caffe behind the shared run loop (:class:`exdrop.run.train.Trainer`)."""

    name = "caffe"

    def __init__(self, cfg):
        check_cpu_device(cfg.device)
        unsupported = [flag for flag, on in (("--amp", cfg.amp), ("--channels-last", cfg.channels_last),
                                             ("batch_size", cfg.batch_size)) if on]
        if unsupported:
            raise ValueError(f"the Caffe backend does not support {', '.join(unsupported)}")
        for path in (cfg.resume, cfg.weights):
            if path and not Path(path).exists():  # Caffe would abort the process
                raise FileNotFoundError(f"{path} not found")
        if cfg.weights and str(cfg.weights).endswith((".pth", ".pt")):
            raise ValueError(f"--weights {cfg.weights}: the Caffe backend reads .caffemodel files only; train on the "
                             "engine, or pass the engine's converted weights (RUN/init.caffemodel of an engine run "
                             "trained with --keep-init)")
        caffe = load_caffe()
        self.cfg = cfg
        sp, self.out = prepare_solver(cfg, solver_mode=CPU)
        self.sp = sp
        (train_param, self.source), tests = net_params(sp, cfg.solver)
        self.test_sources = [src for _, src in tests]
        if sp.random_seed >= 0:  # Caffe seeds itself from the solver; the masks are drawn with torch
            np.random.seed(sp.random_seed)
            torch.random.default_generator.manual_seed(sp.random_seed)   # CPU mode: no GPU generator to touch
        self.solver = caffe_solver(caffe, sp)
        self.net = self.solver.net  # kept: the hooks hold it weakly
        self.test_nets = list(self.solver.test_nets)
        if cfg.weights:
            learnable = [name for name, blobs in self.net.params.items() if len(blobs)]
            found = check_caffemodel_names(cfg.weights, learnable)
            if len(found) < len(learnable):
                print(f"weights: {len(found)} layers from {cfg.weights}; from their fillers: "
                      f"{', '.join(n for n in learnable if n not in found)}", file=sys.stderr)
            self.net.copy_from(str(cfg.weights))
        if cfg.resume:
            restore_beside(self.solver, cfg.resume)
        self.guided_layers = install_saliency_hooks(self.net, train_param, self.source)
        self.iteration_layers = iteration_layers(self.net)
        self.outputs = sorted(set(self.net.outputs).union(*(tn.outputs for tn in self.test_nets)))
        self.utilization, self.test_walker = None, None
        if self.test_nets:   # Table 5's metrics at each test point: the engine's walk over the Caffe test net
            test_param, test_src = tests[0]
            shapes = {name: tuple(b.data.shape) for name, b in self.test_nets[0].blobs.items()}
            self.utilization = utilization_target(test_param, cfg.utilization, shapes)
            if self.utilization:
                self.test_walker = CaffeExcitation(self.test_nets[0], test_param, test_src)
                self.outputs = sorted(set(self.outputs) | set(METRICS))
        self.loss_weights = {blob: w for blob, w in self.net.blob_loss_weights.items() if w}
        self.elapsed = 0.0

    def learning_rate(self) -> float:
        """Caffe's rate at this iteration (for the log; Caffe's solver applies its own)."""
        it = self.solver.iter
        return caffe_rate(self.sp, it, sum(1 for v in self.sp.stepvalue if it >= v))[0]

    def step(self):
        for layer in self.iteration_layers:
            layer.iteration = self.solver.iter   # restored with the .solverstate on a resume
        self.solver.step(1)
        blobs = self.net.blobs
        loss = sum(w * float(blobs[b].data.sum()) for b, w in self.loss_weights.items())
        return loss, {o: float(np.mean(blobs[o].data)) for o in self.net.outputs}

    def test(self, k: int, tick=None) -> dict:
        tn = self.test_nets[k]
        tn.share_with(self.net)  # Caffe's Solver::Test does this first; else the test net keeps its fillers
        n_iter = self.sp.test_iter[min(k, len(self.sp.test_iter) - 1)]
        sums: dict[str, float] = {}
        util = self.utilization if k == 0 else None
        meter = UtilizationMeter(self.cfg.utilization_images, tn.blobs[util[0]].data.shape[0]) if util else None
        for i in range(n_iter):
            tn.forward()
            for o in tn.outputs:
                sums[o] = sums.get(o, 0.0) + float(np.mean(tn.blobs[o].data))
            if meter is not None and i < meter.batches:
                blob, scores, label = util
                meter.add(torch.from_numpy(tn.blobs[blob].data.copy()),
                          torch.from_numpy(self.test_walker.excitation(blob, scores, tn.blobs[label].data)))
            if tick is not None:
                tick()
        out = {o: v / n_iter for o, v in sums.items()}
        if meter is not None:
            out.update(meter.means())
        return out

    def snapshot(self, elapsed: float) -> Path:
        self.solver.snapshot()
        ext = ".caffemodel.h5" if self.sp.snapshot_format == caffe_pb2.SolverParameter.HDF5 else ".caffemodel"
        return Path(f"{self.sp.snapshot_prefix}_iter_{self.solver.iter}{ext}")

    def save_weights(self, path: Path) -> None:
        self.net.save(str(path))

    def nonfinite_weights(self) -> str | None:
        for name, blobs in self.net.params.items():
            if not all(np.isfinite(b.data).all() for b in blobs):
                return name
        return None

    def results_extra(self) -> dict:
        return {"net": self.source, "test_source": self.test_sources, "device": "cpu (Caffe)",
                "guided_layers": self.guided_layers}


def restore_beside(solver, state_path) -> None:
    """Caffe's ``solver.restore``, with the weights taken from beside the given .solverstate (not the
    absolute learned_net path stored in it, which names the original run folder)."""
    if str(state_path).endswith(".h5"):
        solver.restore(str(state_path))
        return
    model = snapshot_model_path(state_path)   # named errors where Caffe would abort the process
    state = cio.read_binary_proto(state_path, caffe_pb2.SolverState())
    if state.learned_net == str(model):
        solver.restore(str(state_path))
        return
    state.learned_net = str(model)
    with tempfile.TemporaryDirectory(prefix="exdrop_resume_") as tmp:
        moved = Path(tmp) / Path(state_path).name
        cio.write_binary_proto(state, moved)
        solver.restore(str(moved))


# ---------------------------------------------------------------------- benchmark
class CaffeBenchVariant:
    """pycaffe's solver on an Input-layer net, fed the same arrays before every step
    (the Caffe side of ``exdrop bench caffe``)."""

    def __init__(self, net_path, solver_param, data: np.ndarray, label: np.ndarray, seed: int = 1):
        caffe = load_caffe()
        sp = caffe_pb2.SolverParameter()
        sp.CopyFrom(solver_param)
        sp.net = str(net_path)
        del sp.test_iter[:]
        sp.snapshot_after_train = False
        sp.solver_mode = CPU
        caffe.set_random_seed(seed)
        self.solver = caffe_solver(caffe, sp)
        self.net = self.solver.net
        self.guided_layers = install_saliency_hooks(self.net, cio.read_net_prototxt(net_path), str(net_path))
        self.iteration_layers = iteration_layers(self.net)
        self.data, self.label = data, label

    def step(self):
        self.net.blobs["data"].data[...] = self.data
        self.net.blobs["label"].data[...] = self.label
        for layer in self.iteration_layers:
            layer.iteration = self.solver.iter
        self.solver.step(1)

    @property
    def last_loss(self) -> float:
        return float(self.net.blobs["loss"].data)
