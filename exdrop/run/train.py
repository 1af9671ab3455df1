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

* :class:`exdrop.run.backends.EngineBackend`: the engine, on PyTorch; guided dropout runs
  its EB step inside the net's forward. Its step never syncs with the host:
  losses stay on the device until a display or test point.
* :class:`exdrop.caffe.backend.CaffeBackend`: real pycaffe (CPU), whose
  ExcitationDropout layers get p_EB through a hook.
"""
from __future__ import annotations

import math
import os
import platform
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from exdrop.engine import distributed as dist
# the backend interface and the run configuration; re-exported: exdrop.run.train is where users find them
from exdrop.engine.backend import (BACKENDS, INIT_WEIGHTS, Backend, TrainConfig, net_params,  # noqa: F401
                                   pick_device, prepare_solver)
from exdrop.engine.eb import NonFiniteError
from exdrop.engine.snapshot import (prune_snapshots, remove_unfinished_snapshots,
                                    snapshot_state_path)
from exdrop.proto import io as cio
from exdrop.run import lock as run_lock
from exdrop.run.backends import EngineBackend, make_backend  # noqa: F401 (EngineBackend re-exported)
from exdrop.run.init_weights import INIT_RECORD, record_init
from exdrop.run.plot import plot_run
from exdrop.run.runlog import RunLog, budget, format_row

# Caffe's SoftmaxWithLoss takes -log(max(prob, FLT_MIN)): a loss that sits here has saturated.
CLAMPED_LOSS = -math.log(float(np.finfo(np.float32).tiny))   # 87.3365

# The progress bar's loss is read from the device (a host sync) at most this often, between display points.
PROGRESS_SECONDS = 1.0


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite, or the loss sat at Caffe's clamp."""


class SnapshotWriteError(OSError):
    """A snapshot could not be written (a full disk, a lost mount): the file, the iteration and the last
    complete snapshot named."""


# ---------------------------------------------------------------------- the loop
class DivergenceWatch:
    """Every iteration's loss, watched on its own device: :meth:`add` never syncs with the host;
    :meth:`read` syncs once (the run loop reads it before it writes or shows anything).

    Keeps the first iteration whose loss is NaN or inf, and whether every loss since the last
    :meth:`new_window` sat at Caffe's clamp (a saturated softmax: Adam's runaway case)."""

    def __init__(self):
        self.first_bad = None   # int64 scalar: the first non-finite iteration, -1 while there is none
        self.clamped = None     # bool scalar: every loss of the window at the clamp
        self.window = 0         # iterations in the window

    def add(self, it: int, loss) -> None:
        loss = torch.as_tensor(loss).detach()
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.int64, device=loss.device)
        if self.clamped is None:
            self.clamped = torch.ones((), dtype=torch.bool, device=loss.device)
        self.first_bad.masked_fill_(~torch.isfinite(loss) & (self.first_bad < 0), it)
        self.clamped &= loss.float() >= CLAMPED_LOSS * (1 - 1e-5)
        self.window += 1

    def read(self) -> tuple[int | None, bool]:
        """(first non-finite iteration or None, whether the whole window sat at the clamp)."""
        if self.first_bad is None:
            return None, False
        clamped = self.clamped if self.clamped is not None else torch.zeros_like(self.first_bad)
        first_bad, clamped = torch.stack([self.first_bad, clamped.long()]).tolist()
        return (first_bad if first_bad >= 0 else None), bool(clamped) and self.window > 0

    def new_window(self) -> None:
        self.clamped, self.window = None, 0


def discard_unstarted_run_folder(cfg: TrainConfig) -> None:
    """A fresh run that failed before its first iteration (a bad prototxt, missing data) leaves no
    run folder behind: the ``solver.prototxt`` and empty ``snapshots/`` that the set-up wrote go,
    and the folder if that leaves it empty. A folder holding a run's records is left alone."""
    try:
        out = prepare_solver(cfg, write=False)[1]
    except Exception:   # the solver itself did not parse: nothing was written
        return
    if any((out / name).exists() for name in ("log.csv", "results.json", INIT_WEIGHTS, INIT_RECORD)):
        return
    snapshots = out / "snapshots"
    if snapshots.is_dir() and not any(snapshots.iterdir()):
        snapshots.rmdir()
    if not snapshots.exists():
        (out / "solver.prototxt").unlink(missing_ok=True)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()


class Trainer:
    """Caffe's Solver::Solve over a backend (the engine unless ``cfg.backend`` says otherwise)."""

    def __init__(self, cfg: TrainConfig, backend=None):
        self.cfg = cfg
        self._locked = None
        if backend is None and dist.world_from_env().main:   # rank 0 writes the run folder: one writer
            self._locked = prepare_solver(cfg, write=False)[1]
            run_lock.acquire(self._locked)
        try:
            self.backend = backend if backend is not None else make_backend(cfg)
        except BaseException:
            self.release()
            if not cfg.resume:
                discard_unstarted_run_folder(cfg)
            raise
        self.sp, self.out = self.backend.sp, self.backend.out
        # many processes: each runs this loop on the same averaged numbers; rank 0 writes the run folder
        self.world = getattr(self.backend, "world", dist.ONE)
        self.main = self.world.main
        if not self.main:
            cfg.progress = False
        self.elapsed = self.backend.elapsed
        self.last_snapshot: Path | None = None
        self.last_good: Path | None = Path(cfg.resume) if cfg.resume else None   # the newest finite snapshot
        self.watch = DivergenceWatch()
        if self.main:
            remove_unfinished_snapshots(self.out / "snapshots")
        # the loss smoothing and output sums of the display window, carried by the engine's snapshots
        carried = getattr(self.backend, "loop_state", None) or {}
        self.recent: list = list(carried.get("recent_losses", []))   # the last average_loss losses
        self.outputs_sum: dict = dict(carried.get("outputs_sum", {}))
        self.outputs_n: int = int(carried.get("outputs_n", 0))
        self.log = RunLog(self.out, self.backend.outputs, self.backend.iter if cfg.resume else None,
                          retest_at_resume=self._tests_at(self.backend.iter), display=self.sp.display,
                          write=self.main)
        self.bar = None
        self._shown_at = time.perf_counter()
        self._last_rate = 0.0
        self.tb = self._tensorboard(cfg.tensorboard if self.main else None, self.backend.iter if cfg.resume else None)

    def _tests_at(self, it: int) -> bool:
        """Whether this run tests at iteration ``it`` (on schedule, or the final test at max_iter)."""
        sp = self.sp
        scheduled = bool(sp.test_interval) and it % sp.test_interval == 0 and (it > 0 or sp.test_initialization)
        return self.backend.num_test_nets > 0 and (scheduled or it >= sp.max_iter)

    def release(self) -> None:
        """Give the run folder's lock back (:mod:`exdrop.run.lock`); run() does at its end."""
        if self._locked is not None:
            run_lock.release(self._locked)
            self._locked = None

    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.release()

    def _run(self) -> dict:
        sp, backend = self.sp, self.backend
        status, error, failure = "finished", None, None
        bar = self.bar = _progress(self.cfg.progress, backend.iter, sp.max_iter)
        stop = {"flag": False}
        # Ctrl-C, and SIGTERM (a scheduler's stop; torchrun's to the survivors of a failed process): stop at
        # the next iteration, snapshot, say how to resume
        old = {sig: signal.signal(sig, lambda *a: stop.__setitem__("flag", True))
               for sig in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
        t0 = time.perf_counter() - self.elapsed
        start_iter = backend.iter
        if start_iter == 0 and self.main:
            self.save_init_weights()
        try:
            while backend.iter < sp.max_iter and not self._stopping(stop, start_iter):
                it = backend.iter
                if sp.test_interval and it % sp.test_interval == 0 and (it > 0 or sp.test_initialization):
                    self.check_finite()
                    self.test(bar, time.perf_counter() - t0)
                rate = self._last_rate = backend.learning_rate()
                try:
                    loss, outputs = backend.step()
                except NonFiniteError as exc:   # EB met inf/NaN activations before the loss showed it
                    raise TrainingDiverged(self._diverged(f"a value became non-finite at iteration {it} ({exc})")) \
                        from None
                self.watch.add(it, loss)
                self.recent = (self.recent + [loss])[-max(1, sp.average_loss):]   # Caffe's smoothed loss
                for name, v in outputs.items():
                    self.outputs_sum[name] = self.outputs_sum[name] + v if name in self.outputs_sum else v
                self.outputs_n += 1
                if sp.display and it % sp.display == 0:
                    self.check_finite(window_end=it)
                    row = self._train_row(it, rate, time.perf_counter() - t0)
                    self.outputs_sum, self.outputs_n = {}, 0
                    self._log(row, bar)
                elif bar is not None and self._progress_due(it == start_iter):
                    self._show_loss(bar)   # one host sync, at most every PROGRESS_SECONDS
                if bar is not None:
                    bar.update(1)
                if sp.snapshot and backend.iter % sp.snapshot == 0:
                    self.snapshot(time.perf_counter() - t0)
            self.check_finite(window_end=backend.iter - 1 if not sp.display else None)
            if self.world.active:
                stop["flag"] = dist.any_over(self.world, stop["flag"])
            if stop["flag"]:
                status = "interrupted"
            self._final_train_row(start_iter, time.perf_counter() - t0, bar)
        except TrainingDiverged as exc:
            status, error = "diverged", str(exc)
        except SnapshotWriteError as exc:
            status, error, failure = "failed", str(exc), exc
        except KeyboardInterrupt:
            status = "interrupted"
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            if bar is not None:
                bar.close()
            self.bar = None
        self.elapsed = time.perf_counter() - t0
        if self.world.active:   # the same run time everywhere: results.json and snapshots say rank 0's
            self.elapsed = dist.broadcast(self.world, self.elapsed)
        try:
            if status == "finished":
                if sp.snapshot_after_train and (not sp.snapshot or backend.iter % sp.snapshot):
                    self.snapshot(self.elapsed)
                if backend.num_test_nets:  # always a final test (Caffe: only on a test_interval multiple)
                    self.test(None, self.elapsed)
            elif status == "interrupted":
                self.snapshot(self.elapsed)  # Caffe snapshots on SIGINT too; nothing is lost
                if self.main:
                    self._say_how_to_resume()
        except TrainingDiverged as exc:
            status, error = "diverged", str(exc)
        except SnapshotWriteError as exc:
            status, error, failure = "failed", str(exc), exc
        try:
            results = self._results(status, error)
        except OSError as exc:
            if failure is None:
                raise
            print(f"exdrop: warning: results.json could not be written either ({exc})", file=sys.stderr)
            results = {"status": status, "error": error}
        if self.main:
            self._plot()
        if failure is not None:
            raise failure
        if error:
            raise TrainingDiverged(error)
        return results

    def _stopping(self, stop: dict, start_iter: int) -> bool:
        """Whether Ctrl-C (SIGINT) stops the run now. Many processes agree on it every
        STOP_CHECK_EVERY iterations, so that all stop at the same iteration."""
        if not self.world.active:
            return stop["flag"]
        it = self.backend.iter
        if it == start_iter or it % dist.STOP_CHECK_EVERY:
            return False
        stop["flag"] = dist.any_over(self.world, stop["flag"])
        return stop["flag"]

    def save_init_weights(self) -> dict:
        """``RUN/init.json``: the record of the weights at iteration 0 (and ``init.caffemodel`` where
        they cannot be drawn again, or with ``--keep-init``): :mod:`exdrop.run.init_weights`."""
        return record_init(self.backend, self.out, self.cfg, keep=self.cfg.keep_init)

    def _smoothed_loss(self) -> float:
        """Caffe's smoothed loss: the mean of the last ``average_loss`` losses (one host sync)."""
        return float(sum(self.recent) / len(self.recent))

    def _train_row(self, it: int, rate: float, elapsed: float) -> dict:
        row = {"iter": it, "phase": "train", "lr": rate, "elapsed_s": elapsed}
        if self.outputs_n:
            row.update({k: float(v / self.outputs_n) for k, v in self.outputs_sum.items()})
        row["loss"] = self._smoothed_loss()
        return row

    def _progress_due(self, first: bool) -> bool:
        """Whether the bar's loss is due for a refresh: at the first iteration, then every
        PROGRESS_SECONDS (a host-side clock: deciding costs no device sync)."""
        now = time.perf_counter()
        if first or now - self._shown_at >= PROGRESS_SECONDS:
            self._shown_at = now
            return True
        return False

    def _show_loss(self, bar) -> None:
        bar.set_postfix({"loss": f"{self._smoothed_loss():.4f}"}, refresh=False)

    def _final_train_row(self, start_iter: int, elapsed: float, bar) -> None:
        """A train row at the run's last iteration when the display schedule did not log one, so that
        log.csv, the bar and results.json end on the same smoothed loss. The display window's output
        sums are left as they are (a snapshot after this carries them on, as without this row)."""
        last = self.backend.iter - 1
        if last < start_iter or not self.recent:
            return
        if self.sp.display and last % self.sp.display == 0:
            return
        self._log(self._train_row(last, self._last_rate, elapsed), bar)

    def _say_how_to_resume(self) -> None:
        """The command that resumes this run exactly: its own arguments (display, test interval,
        precision, data...) with ``--snapshot`` the newest snapshot."""
        if not self.last_snapshot:
            return
        state = snapshot_state_path(self.last_snapshot)
        cfg = self.cfg
        args = list(cfg.command) or self._arguments_from_config()
        if "--out" not in args and not any(a.startswith("--out=") for a in args):
            args += ["--out", str(self.out)]
        args += ["--snapshot", str(state)]
        if self.world.active:   # the same number of processes resumes exactly
            per_node = int(os.environ.get("LOCAL_WORLD_SIZE", self.world.size))
            nodes = [f"--nnodes={self.world.size // per_node}"] if per_node < self.world.size else []
            launch = ["torchrun", *nodes, f"--nproc_per_node={per_node}"]
        else:
            python = Path(sys.executable)
            try:
                python = python.relative_to(Path.cwd())
            except ValueError:
                pass
            launch = [str(python)]
        print(f"exdrop: interrupted at iteration {self.backend.iter}; snapshot {state}\n"
              f"  resume with: {shlex.join([*launch, '-m', 'exdrop', 'train', *args])}", file=sys.stderr, flush=True)

    def _arguments_from_config(self) -> list[str]:
        """For a Trainer built in Python (no command line): the options that change what the run does."""
        cfg = self.cfg
        args = [str(cfg.solver)]
        for flag, value, default in (("--backend", cfg.backend, "engine"), ("--max-iter", cfg.max_iter, None),
                                     ("--device", cfg.device, "auto"), ("--net", cfg.net, None),
                                     ("--test-interval", cfg.test_interval, None), ("--test-iter", cfg.test_iter, None),
                                     ("--display", cfg.display, None), ("--snapshot-every", cfg.snapshot, None),
                                     ("--seed", cfg.seed, None), ("--amp", cfg.amp, None),
                                     ("--keep-snapshots", cfg.keep_snapshots, 1), ("--weights", cfg.weights, None)):
            if value is not None and value != default:
                args += [flag, str(value)]
        return args

    def _plot(self) -> None:
        """``<run folder>/curves.png`` by :func:`exdrop.run.plot.plot_run`; a plotting problem is a
        one-line warning, never a lost run."""
        try:
            plot_run(self.out)
        except Exception as exc:  # noqa: BLE001 - the run's records are already written
            print(f"exdrop: warning: no training curves for {self.out} ({type(exc).__name__}: {exc})",
                  file=sys.stderr)

    def check_finite(self, window_end: int | None = None) -> None:
        """Raise :class:`TrainingDiverged` if a loss since the start was NaN/inf, or (at the end of a
        display window, ``window_end`` its last iteration) every loss of the window sat at the clamp."""
        first_bad, clamped = self.watch.read()
        if first_bad is not None:
            raise TrainingDiverged(self._diverged(f"the loss is not finite (NaN or inf) at iteration {first_bad}"))
        if window_end is not None:
            if clamped:
                start = window_end - self.watch.window + 1
                raise TrainingDiverged(self._diverged(
                    f"the loss sat at Caffe's clamp -log(FLT_MIN) = {CLAMPED_LOSS:.4f} at every iteration from "
                    f"{start} to {window_end} (the softmax saturated)"))
            self.watch.new_window()

    def _diverged(self, what: str) -> str:
        good = f"last good snapshot: {self.last_good}" if self.last_good else "no snapshot was written before it"
        return (f"{self.cfg.solver}: {what} (net {self.sp.net or 'net_param'}, {self.backend.name} backend); "
                f"{good}; no snapshot after it was written. Lower base_lr or check the data")

    def test(self, bar=None, elapsed: float = 0.0) -> list[dict]:
        rows = []
        n = self.backend.num_test_nets
        for k in range(n):
            row = {"iter": self.backend.iter, "phase": "test" if n == 1 else f"test{k}",
                   "lr": self.backend.learning_rate(), "elapsed_s": elapsed}
            row.update(self._run_test(k, n))
            self._log(row, bar)
            rows.append(row)
        return rows

    def _run_test(self, k: int, n: int) -> dict:
        """Test net ``k``, with its own transient bar (one tick per test iteration, host side only)."""
        if not self.cfg.progress:
            return self.backend.test(k)
        sp = self.sp
        total = sp.test_iter[min(k, len(sp.test_iter) - 1)] if len(sp.test_iter) else None
        from tqdm import tqdm
        with tqdm(total=total, desc="test" if n == 1 else f"test{k}", unit="it", leave=False,
                  dynamic_ncols=True, position=1 if self.bar is not None else 0) as tbar:
            return self.backend.test(k, tick=lambda: tbar.update(1))

    def snapshot(self, elapsed: float) -> Path:
        """A snapshot, only of finite weights after finite losses (else :class:`TrainingDiverged`)."""
        self.check_finite()
        bad_layer = self.backend.nonfinite_weights()
        if bad_layer:
            raise TrainingDiverged(self._diverged(
                f"the weights of layer '{bad_layer}' are not finite (NaN or inf) at iteration {self.backend.iter}"))
        self.backend.loop_state = {"recent_losses": self.recent, "outputs_sum": self.outputs_sum,
                                   "outputs_n": self.outputs_n}
        try:
            snap = self.backend.snapshot(elapsed)
        except OSError as exc:
            where = exc.filename or f"{self.sp.snapshot_prefix}_iter_{self.backend.iter}.*"
            last = f"last complete snapshot: {self.last_good}" if self.last_good else "no complete snapshot before it"
            raise SnapshotWriteError(exc.errno, f"{where}: {exc.strerror or exc} while writing the snapshot of "
                                                f"iteration {self.backend.iter}; {last}") from exc
        self.last_snapshot = self.last_good = snap
        if self.cfg.keep_snapshots > 0 and self.main:   # the new set is complete: the older ones may go
            prune_snapshots(self.sp.snapshot_prefix, self.backend.iter, self.cfg.keep_snapshots)
        return self.last_snapshot

    @staticmethod
    def _tensorboard(folder: str | None, resume_iter: int | None):
        """A TensorBoard SummaryWriter for ``folder`` (None: off); a resumed run hides the steps after its snapshot."""
        if not folder:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(f"--tensorboard needs the tensorboard package (`make setup` installs it; or "
                              f"pip install tensorboard): {exc}") from None
        return SummaryWriter(str(folder), purge_step=resume_iter)

    def _log(self, row: dict, bar) -> None:
        self.log.add(row)
        if self.tb is not None:   # the row's numbers: train/loss, train/lr, test/accuracy, test/neurons_on, ...
            for key, value in row.items():
                if key in ("iter", "phase", "elapsed_s") or value is None or isinstance(value, (bool, str)):
                    continue
                if math.isfinite(float(value)):
                    self.tb.add_scalar(f"{row['phase']}/{key}", float(value), int(row["iter"]))
            self.tb.flush()
        if bar is None:
            if self.cfg.progress:
                print(format_row(row), flush=True)
        elif row["phase"] == "train":
            bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k in self.log.columns[4:]}, refresh=False)
            self._shown_at = time.perf_counter()
        else:
            bar.write(format_row(row))

    def _results(self, status: str, error: str | None) -> dict:
        iters = self.backend.iter
        res = {"status": status, "backend": self.backend.name, "solver": str(self.cfg.solver),
               "solver_used": str(self.out / "solver.prototxt"), "iterations": iters, "max_iter": self.sp.max_iter,
               "budget": budget(self.sp.max_iter, cio.read_solver_prototxt(self.cfg.solver).max_iter),
               "net_override": str(self.cfg.net) if self.cfg.net else None,
               "keep_snapshots": self.cfg.keep_snapshots, "processes": self.world.size}
        res.update(self.log.summary())
        res.update({"seconds": round(self.elapsed, 2), "seconds_per_iter": round(self.elapsed / max(1, iters), 4)})
        res.update(self.backend.results_extra())
        res.update({"torch": torch.__version__, "host": platform.node(),
                    "snapshot": str(self.last_snapshot or "")})
        if error:
            res["error"] = error
        if self.tb is not None:
            self.tb.close()
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
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        dist.close(trainer.world)
