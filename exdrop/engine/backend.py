"""What a training backend is, and what both backends and the tools after training share: the
run's configuration (:class:`TrainConfig`), the device, the effective solver and its nets, the
:class:`Backend` interface that the training loop (:mod:`exdrop.run.train`) schedules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from google.protobuf import text_format

from exdrop.engine import distributed as dist
from exdrop.paths import REPO_ROOT
from exdrop.proto import io as cio

BACKENDS = ("engine", "caffe")

# The run folder keeps the weights the run started from (iteration 0): the analysis measures how far
# each unit's weights moved (Table 5's conservative filters).
INIT_WEIGHTS = "init.caffemodel"


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
    amp: str | None = None             # "bf16": autocast the training forward (EB and tests stay float32)
    channels_last: bool = False
    inexact_resume: bool = False       # resume even without the engine state (other data order and RNG)
    net: str | None = None             # a net prototxt replacing the solver's net (train and test phases)
    keep_snapshots: int = 1            # snapshot sets kept: the newest N (0: all)
    keep_init: bool = False            # init.caffemodel too, not only init.json (the seed redraws it)
    # Table 5's metrics at a blob at each test point (log.csv columns): "auto" the first fc of a test
    # net with a SoftmaxWithLoss, a blob name, or None (off); on the first utilization_images images
    utilization: str | None = "auto"
    utilization_images: int = 1000
    tensorboard: str | None = None     # a folder for TensorBoard event files (every log.csv row's numbers)
    overrides: dict = field(default_factory=dict)
    command: tuple = ()                # the `exdrop train` arguments as given (the resume line repeats them)
    dense_short_runs: bool = False     # with max_iter: display / test often enough to draw (the command line's)


def pick_device(requested: str, world: dist.World = dist.ONE) -> torch.device:
    """``auto``: CUDA when there is one (whatever the solver's solver_mode says), else CPU. Under torchrun
    each process takes the GPU of its LOCAL_RANK (``cuda`` or ``auto``; ``cuda:N`` is refused)."""
    if world.active and requested in (None, "", "auto", "cuda") and torch.cuda.is_available():
        if world.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {world.local_rank}: torch sees {torch.cuda.device_count()} CUDA device(s); "
                             "start at most one process per GPU (torchrun --nproc_per_node)")
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    if world.active and requested and requested.startswith("cuda:"):
        raise ValueError(f"--device {requested}: under torchrun each process uses the GPU of its LOCAL_RANK; "
                         "give --device cuda (or auto)")
    if requested and requested != "auto":
        try:
            dev = torch.device(requested)
        except RuntimeError as exc:
            raise ValueError(f"--device {requested}: not a device torch knows ({exc}); use auto, cpu or cuda") from None
        if dev.type == "cuda":
            seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if not seen:
                build = (f"built for CUDA {torch.version.cuda}, but torch.cuda.is_available() is False"
                         if torch.version.cuda else "a CPU-only build")
                raise ValueError(f"--device {requested}: torch {torch.__version__} sees no CUDA device ({build}); "
                                 "use --device cpu or auto")
            if dev.index is not None and dev.index >= seen:
                raise ValueError(f"--device {requested}: torch sees {seen} CUDA device(s), numbered 0 to {seen - 1}")
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
    if cfg.max_iter is not None and cfg.dense_short_runs:
        _log_densely(sp, display=cfg.display is None, test=cfg.test_interval is None)
    for key, value in cfg.overrides.items():
        setattr(sp, key, value)
    if cfg.net:
        # one net for both phases, as the solver's `net:` (Caffe filters it by phase); the
        # solver's own net fields would otherwise win (train_net) or add test nets
        for key in ("net_param", "train_net", "train_net_param"):
            sp.ClearField(key)
        del sp.test_net[:]
        del sp.test_net_param[:]
        sp.net = str(cfg.net)
    check_solver(sp, cfg.solver)
    return sp


# A run whose length, given on the command line (TrainConfig.dense_short_runs), is too short for the solver's
# display or test_interval gets this many display and test points (the solver's display 100 and test_interval
# 1000 would leave a 60-iteration run a line and a dot).
SHORT_RUN_DISPLAYS, SHORT_RUN_TESTS = 20, 4


def _log_densely(sp, display: bool, test: bool) -> None:
    """``--max-iter N`` without ``--display`` / ``--test-interval``, too short for the solver's schedule
    (fewer than 2 display rows, or no test point before the end): log and test often enough to draw a
    curve. What is logged changes, not what is trained (test passes use no training randomness); a
    schedule that already gives a curve is left as the solver says."""
    n = sp.max_iter
    if display and sp.display and n // sp.display < 2:
        sp.display = max(1, n // SHORT_RUN_DISPLAYS)
    if test and sp.test_interval and len(sp.test_iter) and n // sp.test_interval < 1:
        sp.test_interval = max(1, n // SHORT_RUN_TESTS)


def check_solver(sp, source: str) -> None:
    """Counts the run loop relies on, refused with the solver file named (command-line overrides included)."""
    problems = [f"max_iter is {sp.max_iter}, it must be positive"] if sp.max_iter <= 0 else []
    problems += [f"{key} is {getattr(sp, key)}, it must be 0 (off) or positive"
                 for key in ("test_interval", "display", "snapshot") if getattr(sp, key) < 0]
    problems += [f"test_iter is {n}, it must be 0 or positive" for n in sp.test_iter if n < 0]
    policies = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
    if sp.lr_policy not in policies:
        problems.append(f"lr_policy {sp.lr_policy!r} is not one of Caffe's: {', '.join(policies)}")
    elif sp.lr_policy == "step" and sp.stepsize <= 0:
        problems.append(f"lr_policy 'step' needs stepsize > 0 (it is {sp.stepsize})")
    problems += [f"{key} is {getattr(sp, key)}, it must be at least 1"
                 for key in ("average_loss", "iter_size") if getattr(sp, key) < 1]
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems) + " (command-line overrides included)")


def prepare_solver(cfg: TrainConfig, write: bool = True, **settings):
    """The solver this run uses, written to ``<run folder>/solver.prototxt``; returns (param, run folder).

    :func:`load_solver` plus ``settings`` (a backend's own, e.g. solver_mode), with the net
    paths made absolute and ``snapshot_prefix`` moved into ``<run folder>/snapshots/``.
    ``write``: False on the processes of a many-process run other than rank 0.
    """
    sp = load_solver(cfg)
    for key, value in settings.items():
        setattr(sp, key, value)
    out = Path(cfg.out or Path("models") / Path(sp.snapshot_prefix or "run").parent.name)
    if write:
        (out / "snapshots").mkdir(parents=True, exist_ok=True)
    for key in ("net", "train_net"):
        if sp.HasField(key):
            setattr(sp, key, _absolute(getattr(sp, key), cfg.solver))
    tests = [_absolute(p, cfg.solver) for p in sp.test_net]
    del sp.test_net[:]
    sp.test_net.extend(tests)
    prefix = Path(sp.snapshot_prefix).name if sp.snapshot_prefix else "snapshot"
    sp.snapshot_prefix = str((out / "snapshots" / prefix).resolve())
    if write:
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
    """Caffe resolves paths against the working directory; fall back to the solver's folder, then
    to the project's home (the shipped ``prototxt/...`` of an installed package: exdrop.paths)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return str(p)
    for alt in (Path(relative_to).parent / p, REPO_ROOT / p):
        if alt.exists():
            return str(alt)
    return str(p)


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
    test_nets: list    # each backend sets its own in __init__

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

    def test(self, k: int, tick=None) -> dict:
        """One pass of test net ``k``: ``{output: mean}``; ``tick()`` (if given) after each iteration."""
        raise NotImplementedError

    def snapshot(self, elapsed: float) -> Path:
        raise NotImplementedError

    def save_weights(self, path: Path) -> None:
        """The training net's weights as a ``.caffemodel`` (the run's iteration-0 weights)."""
        raise NotImplementedError

    def nonfinite_weights(self) -> str | None:
        """The first layer whose learnable blobs hold NaN or inf, or None (checked before a snapshot)."""
        return None

    def results_extra(self) -> dict:
        return {}
