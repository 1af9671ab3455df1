"""The training loop: Caffe's Solver::Solve, one loop for both backends.

solver prototxt -> the effective solver (command-line overrides applied, net
paths absolute, snapshots inside the run folder; written as the run folder's
``solver.prototxt``) -> a backend -> for each iteration: test when due, one
training step, display, snapshot -> the run folder: ``log.csv`` (every display
and test point), ``results.json`` and ``snapshots/``.

A backend (:class:`Backend`) runs the nets and the solver; this loop only
schedules: ``step() -> (loss, {output: value})``, ``test(k) -> {output: mean}``,
``snapshot(elapsed) -> Path``, ``learning_rate()``, ``results_extra()``, and
``sp`` (the effective SolverParameter), ``out`` (the run folder), ``iter``,
``outputs``, ``num_test_nets``, ``elapsed`` (seconds spent before a resume).

* :class:`EngineBackend` (here): the engine, on PyTorch; guided dropout runs
  its EB step inside the net's forward. Its step never syncs with the host:
  losses stay on the device until a display or test point.
* :class:`exdrop.caffe_backend.CaffeBackend`: real pycaffe (CPU), whose
  ExcitationDropout layers get p_EB through a hook.
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from google.protobuf import text_format

from . import io as cio
from .net import Net
from .pylayer import TEST, TRAIN
from .runlog import RunLog, budget, format_row
from .snapshot import load_weights, save_weights
from .solver import make_solver

BACKENDS = ("engine", "caffe")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    solver: str
    out: str | None = None
    backend: str = "engine"            # "engine" or "caffe" (real pycaffe, CPU)
    max_iter: int | None = None
    device: str = "auto"
    resume: str | None = None          # a .solverstate, as `caffe train --snapshot`
    weights: str | None = None         # a .caffemodel to start from, as `caffe train --weights`
    test_interval: int | None = None
    test_iter: int | None = None
    display: int | None = None
    snapshot: int | None = None
    seed: int | None = None
    batch_size: int | None = None
    progress: bool = True
    amp: str | None = None             # "bf16": autocast the forward (EB stays float32)
    channels_last: bool = False
    overrides: dict = field(default_factory=dict)


def pick_device(requested: str, solver_mode: int) -> torch.device:
    """``auto``: CUDA when there is one (solver_mode GPU or CPU alike), else CPU."""
    if requested and requested != "auto":
        dev = torch.device(requested)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------- the solver
def load_solver(cfg: TrainConfig):
    """The solver prototxt with the run's command-line overrides applied."""
    sp = cio.read_solver_prototxt(cfg.solver)
    for key, value in (("max_iter", cfg.max_iter), ("test_interval", cfg.test_interval),
                       ("display", cfg.display), ("snapshot", cfg.snapshot), ("random_seed", cfg.seed)):
        if value is not None:
            setattr(sp, key, value)
    if cfg.test_iter is not None:
        del sp.test_iter[:]
        sp.test_iter.append(cfg.test_iter)
    for key, value in cfg.overrides.items():
        setattr(sp, key, value)
    return sp


def prepare_solver(cfg: TrainConfig, **settings):
    """The solver this run uses, written to ``<run folder>/solver.prototxt``; returns (param, run folder).

    :func:`load_solver` plus ``settings`` (a backend's own, e.g. solver_mode), with the net
    paths made absolute and ``snapshot_prefix`` moved into ``<run folder>/snapshots/``.
    """
    sp = load_solver(cfg)
    for key, value in settings.items():
        setattr(sp, key, value)
    out = Path(cfg.out or Path("models") / Path(sp.snapshot_prefix or "run").parent.name)
    (out / "snapshots").mkdir(parents=True, exist_ok=True)
    for key in ("net", "train_net"):
        if sp.HasField(key):
            setattr(sp, key, _absolute(getattr(sp, key), cfg.solver))
    tests = [_absolute(p, cfg.solver) for p in sp.test_net]
    del sp.test_net[:]
    sp.test_net.extend(tests)
    prefix = Path(sp.snapshot_prefix).name if sp.snapshot_prefix else "snapshot"
    sp.snapshot_prefix = str((out / "snapshots" / prefix).resolve())
    (out / "solver.prototxt").write_text(text_format.MessageToString(sp))
    return sp, out


def net_params(sp, solver_path: str):
    """(train NetParameter, source), [(test NetParameter, source)] from net / net_param / train_net / test_net."""
    def read(path):
        return cio.read_net_prototxt(_resolve(path, solver_path)), path

    if sp.HasField("net"):
        train = read(sp.net)
    elif sp.HasField("net_param"):
        train = (sp.net_param, f"{solver_path}:net_param")
    elif sp.HasField("train_net"):
        train = read(sp.train_net)
    elif sp.HasField("train_net_param"):
        train = (sp.train_net_param, f"{solver_path}:train_net_param")
    else:
        raise ValueError(f"{solver_path}: the solver names no net (net, net_param or train_net)")
    tests = [read(p) for p in sp.test_net] + [(p, f"{solver_path}:test_net_param") for p in sp.test_net_param]
    if not tests and len(sp.test_iter) and (sp.HasField("net") or sp.HasField("net_param")):
        tests = [train]
    return train, tests


def _resolve(path: str, relative_to: str) -> str:
    """Caffe resolves paths against the working directory; fall back to the solver's folder."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    alt = Path(relative_to).parent / p
    return str(alt) if alt.exists() else str(p)


def _absolute(path: str, relative_to: str) -> str:
    return str(Path(_resolve(path, relative_to)).resolve())


# ---------------------------------------------------------------------- backends
class Backend:
    """What the run loop drives: a solver (``.iter``) and test nets, plus the methods below."""

    name = "?"
    sp = None          # the effective SolverParameter
    out: Path          # the run folder
    outputs: list      # names of the nets' output blobs
    elapsed = 0.0      # seconds spent before a resume
    solver = None
    test_nets: list = []

    @property
    def iter(self) -> int:
        return self.solver.iter

    @property
    def num_test_nets(self) -> int:
        return len(self.test_nets)

    def learning_rate(self) -> float:
        raise NotImplementedError

    def step(self):
        """One training iteration: ``(loss, {output: value})``."""
        raise NotImplementedError

    def test(self, k: int) -> dict:
        """One pass of test net ``k``: ``{output: mean}``."""
        raise NotImplementedError

    def snapshot(self, elapsed: float) -> Path:
        raise NotImplementedError

    def results_extra(self) -> dict:
        return {}


class EngineBackend(Backend):
    """The engine: the nets on PyTorch, exdrop's solver, snapshots with the RNG/data state for an exact resume."""

    name = "engine"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        sp, self.out = prepare_solver(cfg)
        self.sp = sp
        self.device = pick_device(cfg.device, sp.solver_mode)
        if sp.random_seed >= 0:
            torch.manual_seed(sp.random_seed)
        (train_param, train_src), tests = net_params(sp, cfg.solver)
        self.train_net = Net(train_param, TRAIN, self.device, train_src, batch_size=cfg.batch_size)
        self.test_nets = []
        for param, src in tests:
            tn = Net(param, TEST, self.device, src, batch_size=cfg.batch_size)
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
        if cfg.weights:
            load_weights(self.train_net, cfg.weights)
        self.solver = make_solver(sp, self.train_net.learnable())
        self.elapsed = 0.0
        if cfg.resume:
            self._restore(cfg.resume)
        self.outputs = sorted(set(self.train_net.outputs).union(*(tn.outputs for tn in self.test_nets)))

    def learning_rate(self) -> float:
        return self.solver.learning_rate()

    def step(self):
        """Forward, backward (iter_size times) and the update; loss and outputs stay on the device."""
        net, passes = self.train_net, max(1, self.sp.iter_size)
        for p in net.parameters():
            p.grad = None
        loss_sum, outputs_sum = None, {}
        for _ in range(passes):
            with self.autocast():
                blobs = net()
                loss = net.loss(blobs)
            loss.backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            for name in net.outputs:
                v = blobs[name].detach()
                outputs_sum[name] = outputs_sum[name] + v if name in outputs_sum else v
        self.solver.step_update()
        return loss_sum / passes, {k: v / passes for k, v in outputs_sum.items()}

    @torch.no_grad()
    def test(self, k: int) -> dict:
        tn = self.test_nets[k]
        n_iter = self.sp.test_iter[min(k, len(self.sp.test_iter) - 1)]
        sums: dict[str, torch.Tensor] = {}
        for _ in range(n_iter):
            with self.autocast():
                blobs = tn()
            for name in tn.outputs:
                v = blobs[name].detach().float()
                sums[name] = sums[name] + v if name in sums else v
        return {name: (v / n_iter).mean().item() for name, v in sums.items()}

    def snapshot(self, elapsed: float) -> Path:
        base = f"{self.sp.snapshot_prefix}_iter_{self.solver.iter}"
        model = Path(base + ".caffemodel")
        save_weights(self.train_net, model)
        self.solver.save_solverstate(base + ".solverstate", str(model))
        torch.save({"iter": self.solver.iter, "elapsed": elapsed, "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                    "solver": self.solver.state_dict(),
                    "data": {"train": self.train_net.data_state(),
                             "test": [tn.data_state() for tn in self.test_nets]}},
                   base + ".engine.pt.tmp")
        os.replace(base + ".engine.pt.tmp", base + ".engine.pt")
        return model

    def _restore(self, state_path: str) -> None:
        """Continue a run from ``X.solverstate`` (weights from its learned_net)."""
        if not Path(state_path).exists():
            raise FileNotFoundError(f"snapshot {state_path} not found")
        learned = self.solver.restore_solverstate(state_path)
        model = Path(learned) if learned else Path(state_path).with_suffix(".caffemodel")
        if not model.exists():
            model = Path(state_path).with_suffix(".caffemodel")
        load_weights(self.train_net, model)
        extra = Path(str(state_path).removesuffix(".solverstate") + ".engine.pt")
        if extra.exists():
            st = torch.load(extra, map_location="cpu", weights_only=False)
            self.solver.load_state_dict(st["solver"])
            torch.set_rng_state(st["torch_rng"])
            if st.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(st["cuda_rng"])
            self.train_net.load_data_state(st["data"]["train"])
            for tn, ds in zip(self.test_nets, st["data"]["test"]):
                tn.load_data_state(ds)
            self.elapsed = st.get("elapsed", 0.0)

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
        from .caffe_backend import CaffeBackend
        return CaffeBackend(cfg)
    raise ValueError(f"unknown backend {cfg.backend!r}; choose from {', '.join(BACKENDS)}")


# ---------------------------------------------------------------------- the loop
class Trainer:
    """Caffe's Solver::Solve over a backend (the engine unless ``cfg.backend`` says otherwise)."""

    def __init__(self, cfg: TrainConfig, backend=None):
        self.cfg = cfg
        self.backend = backend if backend is not None else make_backend(cfg)
        self.sp, self.out = self.backend.sp, self.backend.out
        self.elapsed = self.backend.elapsed
        self.last_snapshot: Path | None = None
        self.log = RunLog(self.out, self.backend.outputs, self.backend.iter if cfg.resume else None)

    def run(self) -> dict:
        sp, backend = self.sp, self.backend
        recent: list = []  # the last average_loss losses: Caffe's smoothed loss
        outputs_sum: dict = {}
        outputs_n = 0
        status, error = "finished", None
        bar = _progress(self.cfg.progress, backend.iter, sp.max_iter)
        stop = {"flag": False}
        old = signal.signal(signal.SIGINT, lambda *a: stop.__setitem__("flag", True)) if _main_thread() else None
        t0 = time.perf_counter() - self.elapsed
        try:
            while backend.iter < sp.max_iter and not stop["flag"]:
                it = backend.iter
                if sp.test_interval and it % sp.test_interval == 0 and (it > 0 or sp.test_initialization):
                    self.test(bar, time.perf_counter() - t0)
                rate = backend.learning_rate()
                loss, outputs = backend.step()
                recent = (recent + [loss])[-max(1, sp.average_loss):]
                for name, v in outputs.items():
                    outputs_sum[name] = outputs_sum[name] + v if name in outputs_sum else v
                outputs_n += 1
                if sp.display and it % sp.display == 0:
                    row = {"iter": it, "phase": "train", "lr": rate, "elapsed_s": time.perf_counter() - t0}
                    row.update({k: float(v / outputs_n) for k, v in outputs_sum.items()})
                    row["loss"] = float(sum(recent) / len(recent))
                    outputs_sum, outputs_n = {}, 0
                    if not math.isfinite(row["loss"]):
                        raise TrainingDiverged(
                            f"{self.cfg.solver}: loss is {row['loss']} at iteration {it} "
                            f"(net {sp.net or 'net_param'}, {backend.name} backend); "
                            "lower base_lr or check the data")
                    self._log(row, bar)
                if bar is not None:
                    bar.update(1)
                if sp.snapshot and backend.iter % sp.snapshot == 0:
                    self.snapshot(time.perf_counter() - t0)
            if stop["flag"]:
                status = "interrupted"
        except TrainingDiverged as exc:
            status, error = "diverged", str(exc)
        except KeyboardInterrupt:
            status = "interrupted"
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
            if bar is not None:
                bar.close()
        self.elapsed = time.perf_counter() - t0
        if status == "finished":
            if sp.snapshot_after_train and (not sp.snapshot or backend.iter % sp.snapshot):
                self.snapshot(self.elapsed)
            if backend.num_test_nets:  # always a final test (Caffe: only on a test_interval multiple)
                self.test(None, self.elapsed)
        elif status == "interrupted":
            self.snapshot(self.elapsed)  # Caffe snapshots on SIGINT too; nothing is lost
        results = self._results(status, error)
        if error:
            print(error)
            raise TrainingDiverged(error)
        return results

    def test(self, bar=None, elapsed: float = 0.0) -> list[dict]:
        rows = []
        n = self.backend.num_test_nets
        for k in range(n):
            row = {"iter": self.backend.iter, "phase": "test" if n == 1 else f"test{k}",
                   "lr": self.backend.learning_rate(), "elapsed_s": elapsed}
            row.update(self.backend.test(k))
            self._log(row, bar)
            rows.append(row)
        return rows

    def snapshot(self, elapsed: float) -> Path:
        self.last_snapshot = self.backend.snapshot(elapsed)
        return self.last_snapshot

    def _log(self, row: dict, bar) -> None:
        self.log.add(row)
        if bar is None:
            if self.cfg.progress:
                print(format_row(row), flush=True)
        elif row["phase"] == "train":
            bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k in self.log.columns[4:]}, refresh=False)
        else:
            bar.write(format_row(row))

    def _results(self, status: str, error: str | None) -> dict:
        iters = self.backend.iter
        res = {"status": status, "backend": self.backend.name, "solver": str(self.cfg.solver),
               "solver_used": str(self.out / "solver.prototxt"), "iterations": iters, "max_iter": self.sp.max_iter,
               "budget": budget(self.sp.max_iter, cio.read_solver_prototxt(self.cfg.solver).max_iter)}
        res.update(self.log.summary())
        res.update({"seconds": round(self.elapsed, 2), "seconds_per_iter": round(self.elapsed / max(1, iters), 4)})
        res.update(self.backend.results_extra())
        res.update({"torch": torch.__version__, "host": platform.node(),
                    "snapshot": str(self.last_snapshot or "")})
        if error:
            res["error"] = error
        return self.log.finish(res)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, smoothing=0.05)


def train(cfg: TrainConfig) -> dict:
    return Trainer(cfg).run()
