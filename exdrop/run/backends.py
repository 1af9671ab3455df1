"""The backends that the run loop (:mod:`exdrop.run.train`) drives: what one iteration, one test
pass and one snapshot are; the loop only schedules them.

* :class:`EngineBackend`: the engine, on PyTorch (DDP under torchrun); guided dropout runs its EB
  step inside the net's forward (:func:`exdrop.engine.step.training_step`, the step that
  ``exdrop bench`` times too). Its step never syncs with the host: losses stay on the device
  until a display or test point. Snapshots carry the RNG and data state for an exact resume.
* :class:`exdrop.caffe.backend.CaffeBackend`: real pycaffe (CPU), whose ExcitationDropout
  layers get p_EB through a hook.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import torch

from exdrop.caffe.backend import CaffeBackend
from exdrop.engine import distributed as dist
from exdrop.engine.backend import BACKENDS, Backend, TrainConfig, net_params, pick_device, prepare_solver
from exdrop.engine.net import Net
from exdrop.engine.pretrained import input_transform, load_pretrained
from exdrop.engine.pylayer import TEST, TRAIN
from exdrop.engine.snapshot import (SnapshotError, engine_state_path, load_weights, plain_state, plain_to,
                                    normal_file_mode, read_engine_state, save_weights, snapshot_model_path)
from exdrop.engine.solver import make_solver
from exdrop.engine.step import slow_cpu_autocast_warning, training_step
from exdrop.engine.utilization import METRICS, UtilizationMeter, utilization_target


class EngineBackend(Backend):
    """The engine: the nets on PyTorch, exdrop's solver, snapshots with the RNG/data state for an exact resume."""

    name = "engine"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.world = world = dist.world_from_env()
        sp, self.out = prepare_solver(cfg, write=world.main)
        self.sp = sp
        self.device = pick_device(cfg.device, world)
        dist.init(world, self.device)
        seed = sp.random_seed
        if world.active and seed < 0:   # one seed for all: the same fillers and data order everywhere
            seed = dist.broadcast(world, int(torch.randint(0, 2 ** 31 - 1, (1,)).item()))
        if seed >= 0:   # the CPU's generator (fillers, data order), and the GPUs' only when the run is on one
            torch.random.default_generator.manual_seed(seed)
            if self.device.type == "cuda":
                torch.cuda.manual_seed_all(seed)
        (train_param, train_src), tests = net_params(sp, cfg.solver)
        self.train_net = Net(train_param, TRAIN, self.device, train_src, batch_size=cfg.batch_size, world=world)
        self.test_nets = []
        for param, src in tests:
            tn = Net(param, TEST, self.device, src, batch_size=cfg.batch_size, world=world)
            tn.share_weights_from(self.train_net)
            self.test_nets.append(tn)
        if len(self.test_nets) and len(sp.test_iter) not in (1, len(self.test_nets)):
            raise ValueError(f"{cfg.solver}: give one test_iter per test net")
        if cfg.channels_last:
            for n in [self.train_net, *self.test_nets]:
                n.use_channels_last()
        if cfg.amp not in (None, "", "bf16", "fp16"):
            raise ValueError(f"--amp must be bf16 or fp16, got {cfg.amp!r}")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)) \
            if cfg.amp else contextlib.nullcontext
        if cfg.amp and self.device.type == "cpu" and world.main:
            slow = slow_cpu_autocast_warning(cfg.amp)
            if slow:   # shown under --quiet too: a sweep's stdout.log keeps it
                print(f"exdrop: warning: {slow}", file=sys.stderr, flush=True)
        if cfg.weights:   # Caffe's --weights: by layer name; a torchvision .pth by order, conv1 converted
            torch_file = str(cfg.weights).endswith((".pth", ".pt"))
            got = load_pretrained(self.train_net, cfg.weights, input_transform(train_param) if torch_file else None)
            partial = got["kept_filler"] or got["skipped"]
            if world.main and (cfg.progress or partial):   # a partial load is shown even under --quiet
                print(f"weights: {len(got['loaded'])} layers from {cfg.weights} ({got['format']})"
                      + (f"; from their fillers: {', '.join(got['kept_filler'])}" if got["kept_filler"] else "")
                      + (f"; skipped (shapes differ): {'; '.join(got['skipped'])}" if got["skipped"] else ""),
                      file=sys.stderr if partial else sys.stdout)
        self.solver = make_solver(sp, self.train_net.learnable(), cfg.solver)
        self.elapsed = 0.0
        self.loop_state: dict = {}   # the run loop's display window, saved with each snapshot
        self.ddp = None
        if world.active:
            torch.manual_seed(seed + world.rank)   # each process its own dropout masks; rank 0 as one process
            from torch.nn.parallel import DistributedDataParallel
            self.ddp = DistributedDataParallel(self.train_net, device_ids=[self.device.index] if self.device.type
                                               == "cuda" else None)
        if cfg.resume:
            self._restore(cfg.resume)
        self.outputs = sorted(set(self.train_net.outputs).union(*(tn.outputs for tn in self.test_nets)))
        self.utilization = utilization_target(self.test_nets[0].layer_params, cfg.utilization,
                                              self.test_nets[0].blob_shapes) if self.test_nets else None
        if self.utilization:
            self.outputs = sorted(set(self.outputs) | set(METRICS))

    def learning_rate(self) -> float:
        return self.solver.learning_rate()

    def step(self):
        """Forward, backward (iter_size times) and the update (:func:`exdrop.engine.step.training_step`);
        loss and outputs stay on the device."""
        return training_step(self.train_net, self.solver, iter_size=self.sp.iter_size, autocast=self.autocast,
                             ddp=self.ddp, world=self.world)

    @torch.no_grad()
    def test(self, k: int, tick=None) -> dict:
        tn = self.test_nets[k]
        n_iter = self.sp.test_iter[min(k, len(self.sp.test_iter) - 1)]
        sums: dict[str, torch.Tensor] = {}
        util = self.utilization[0] if self.utilization and k == 0 else None
        # the first images of the pass, as on one process: each process measures its part of those batches
        meter = UtilizationMeter(self.cfg.utilization_images, tn.blob_shapes[util][0] * self.world.size) \
            if util else None
        for i in range(n_iter):
            measure = meter is not None and i < meter.batches
            # float32 even under --amp: the figures do not depend on the training speed-up
            blobs = tn.forward(record=measure)
            for name in tn.outputs:
                v = blobs[name].detach().float()
                sums[name] = sums[name] + v if name in sums else v
            if measure:   # Table 5's metrics on the first images: EB over the head only
                meter.add(blobs[util], tn.excitation(util, self.utilization[1]))
                tn.records = None
            if tick is not None:
                tick()   # host only: no sync
        names = list(sums)
        means = dist.mean_over(self.world, [sums[name] / n_iter for name in names])
        out = {name: v.mean().item() for name, v in zip(names, means)}
        if meter is not None:
            meter.reduce(lambda ts: dist.sum_over(self.world, ts))
            out.update(meter.means())
        return out

    def snapshot(self, elapsed: float) -> Path:
        """``.caffemodel``, ``.engine.pt``, then ``.solverstate``: each written as ``.tmp`` first, renamed
        when all three are complete, the .solverstate last, so a kill leaves no .solverstate without its set."""
        base = f"{self.sp.snapshot_prefix}_iter_{self.solver.iter}"
        model, extra, state = Path(base + ".caffemodel"), Path(base + ".engine.pt"), Path(base + ".solverstate")
        rng = {"torch_rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        ranks = dist.gather(self.world, rng)   # many processes: each draws its own masks
        if not self.world.main:   # the weights, data cursors and solver are the same on every process
            dist.barrier(self.world)
            return model
        tmp = {path: Path(f"{path}.tmp") for path in (model, extra, state)}
        save_weights(self.train_net, tmp[model])
        # only what the .solverstate lacks: its history (Adam's m and v, float32) restores the solver exactly
        engine_state = {"iter": self.solver.iter, "elapsed": elapsed, **rng,
                        "data": {"train": self.train_net.data_state(),
                                 "test": [tn.data_state() for tn in self.test_nets]},
                        "loop": self.loop_state}
        if self.world.active:
            engine_state["ranks"] = ranks
        torch.save(plain_state(engine_state), tmp[extra])
        self.solver.save_solverstate(tmp[state], str(model))
        for path in (model, extra, state):
            normal_file_mode(tmp[path])
        for path in (model, extra, state):
            os.replace(tmp[path], path)
        dist.barrier(self.world)   # the set is complete before any process goes on (a resume reads it)
        return model

    def save_weights(self, path: Path) -> None:
        save_weights(self.train_net, path)

    def nonfinite_weights(self) -> str | None:
        layers = [layer for layer in self.train_net.layer_list if len(layer.blobs)]
        if not layers:
            return None
        finite = torch.stack([torch.stack([torch.isfinite(p).all() for p in layer.blobs]).all() for layer in layers])
        bad = (~finite).nonzero().flatten().tolist()   # one host sync, before a snapshot only
        return layers[bad[0]].name if bad else None

    def _restore(self, state_path: str) -> None:
        """Continue a run from ``X.solverstate``: the weights beside it, the solver state, and the RNG
        and data cursors of ``X.engine.pt``; without a usable engine state only if ``inexact_resume``."""
        model = snapshot_model_path(state_path)
        self.solver.restore_solverstate(state_path)
        load_weights(self.train_net, model)
        extra = engine_state_path(state_path)
        try:
            st = read_engine_state(extra)
            if int(st["iter"]) != self.solver.iter:
                raise SnapshotError(f"{extra} is for iteration {st['iter']}, {state_path} for {self.solver.iter}")
        except SnapshotError as exc:
            if not self.cfg.inexact_resume:
                raise SnapshotError(f"cannot resume {state_path} exactly: {exc}. Resume from an earlier snapshot, "
                                    "or pass --inexact-resume to continue without it") from None
            print(f"exdrop: warning: inexact resume from {state_path}: {exc}. What differs from the "
                  "uninterrupted run: the data order (every data layer starts again from its first record), the "
                  "random draws (dropout masks, mirrors, crops: torch's RNG as seeded at start-up), and the "
                  "elapsed time (counted from 0); the weights and the solver state are the snapshot's.",
                  file=sys.stderr)
            return
        # the solver (iter, current_step, history) is the .solverstate's, restored above; an older
        # engine state's copy of the history ("solver") equals it and is not needed
        rng = st
        if self.world.active or st.get("ranks"):
            saved = len(st.get("ranks") or [None])
            if saved != self.world.size:
                if not self.cfg.inexact_resume:
                    raise SnapshotError(f"cannot resume {state_path} exactly: it was written by {saved} process(es), "
                                        f"this run has {self.world.size} (the dropout masks' random state is per "
                                        "process). Resume with as many, or pass --inexact-resume")
                print(f"exdrop: warning: inexact resume from {state_path}: written by {saved} process(es), resumed "
                      f"with {self.world.size}; the dropout masks' random draws differ from the uninterrupted run",
                      file=sys.stderr)
                rng = {"torch_rng": torch.get_rng_state()}
            else:
                rng = st["ranks"][self.world.rank]
        try:
            torch.set_rng_state(rng["torch_rng"])
            if rng.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda_rng"])
            self.train_net.load_data_state(st["data"]["train"])
            for tn, ds in zip(self.test_nets, st["data"]["test"]):
                tn.load_data_state(ds)
            self.elapsed = float(st.get("elapsed", 0.0))
            self.loop_state = {k: plain_to(v, self.device) for k, v in st.get("loop", {}).items()}
        except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            if self.cfg.inexact_resume:
                print(f"exdrop: warning: inexact resume from {state_path}: {extra} holds an unusable RNG or data "
                      f"state ({type(exc).__name__}: {exc}); the data order and random draws differ from the "
                      "uninterrupted run", file=sys.stderr)
                return
            raise SnapshotError(f"cannot resume {state_path} exactly: {extra} holds an unusable RNG or data state "
                                f"({type(exc).__name__}: {exc}). Resume from an earlier snapshot, or pass "
                                "--inexact-resume to continue without it") from None

    def results_extra(self) -> dict:
        dev = self.device
        return {"net": self.train_net.source, "test_source": [tn.source for tn in self.test_nets],
                "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
                "guided_layers": [layer.name for layer in self.train_net.layer_list
                                  if getattr(layer, "saliency", None) == "excitation"]}


def make_backend(cfg: TrainConfig):
    if cfg.backend == "engine":
        return EngineBackend(cfg)
    if cfg.backend == "caffe":
        if dist.world_from_env().active:
            raise ValueError("the caffe backend runs one process (pycaffe on the CPU); many processes under "
                             "torchrun are the engine's: drop --backend caffe")
        return CaffeBackend(cfg)
    raise ValueError(f"unknown backend {cfg.backend!r}; choose from {', '.join(BACKENDS)}")


