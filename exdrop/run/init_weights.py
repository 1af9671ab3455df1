"""A run's iteration-0 weights, kept as a record instead of a second full copy of the net.

The weights a run starts from are its fillers, drawn after the solver's ``random_seed`` (and any
``--weights`` file loaded over them): the run folder's ``solver.prototxt`` and that seed
reproduce them. So a run writes ``RUN/init.json`` (the backend, the seed, the weights file and
the SHA-256 of the ``.caffemodel`` the weights make) and no ``init.caffemodel``, unless it
cannot be rebuilt (``random_seed`` < 0) or the user asked for it (``--keep-init``).

:func:`iteration0_weights` gives the analysis (conservative filters, the iteration-0 point of
Figs. 4-5) the file: the kept one, or one rebuilt through the same backend, on the CPU, and
checked byte for byte against the recorded SHA-256. A rebuild that differs (the net prototxt or
the weights file changed since) is refused, never used.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from exdrop.engine.backend import INIT_WEIGHTS, TrainConfig
from exdrop.engine.snapshot import normal_file_mode
from exdrop.proto import io as cio
from exdrop.run.backends import make_backend

INIT_RECORD = "init.json"

__all__ = ["INIT_RECORD", "InitWeightsError", "init_identity", "iteration0_weights", "record_init"]


class InitWeightsError(RuntimeError):
    """A run's iteration-0 weights cannot be had (no record, or a rebuild that differs from it)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def record_init(backend, out: Path, cfg: TrainConfig, keep: bool = False) -> dict:
    """Write ``out/init.json`` for the weights ``backend`` holds now (iteration 0), and
    ``out/init.caffemodel`` too where ``keep`` or the seed is random. Each file is written complete
    or not at all. Returns the record."""
    out = Path(out)
    tmp = out / (INIT_WEIGHTS + ".tmp")
    backend.save_weights(tmp)
    seed = int(backend.sp.random_seed)
    keep = keep or seed < 0
    record = {"format": 1, "backend": cfg.backend, "random_seed": seed,
              "weights": str(Path(cfg.weights).resolve()) if cfg.weights else None,
              "sha256": _sha256(tmp), "bytes": tmp.stat().st_size, "kept": keep,
              "why_kept": ("random_seed < 0: the fillers cannot be drawn again" if seed < 0 else
                           "--keep-init" if keep else None)}
    if keep:
        normal_file_mode(tmp)
        os.replace(tmp, out / INIT_WEIGHTS)
    else:
        tmp.unlink()
    cio.atomic_write(out / INIT_RECORD, (json.dumps(record, indent=1) + "\n").encode())
    normal_file_mode(out / INIT_RECORD)
    return record


def _record(run: Path) -> dict | None:
    path = run / INIT_RECORD
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InitWeightsError(f"{path}: not JSON ({exc})") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or rec.get("backend") not in ("engine", "caffe"):
        raise InitWeightsError(f"{path}: not a record of iteration-0 weights (needs backend and sha256)")
    return rec


def init_identity(run) -> str | None:
    """What names the run's iteration-0 weights (for caches): the recorded SHA-256, else the kept
    file's path and modification time; None when the run has neither."""
    run = Path(run)
    rec = _record(run)
    if rec is not None:
        return rec["sha256"]
    kept = run / INIT_WEIGHTS
    return f"{kept}@{kept.stat().st_mtime_ns}" if kept.is_file() else None


def _rebuild(run: Path, rec: dict, dest: Path) -> None:
    """Draw the run's iteration-0 weights again through its backend (CPU) into ``dest``."""
    if rec["weights"] and not Path(rec["weights"]).is_file():
        raise InitWeightsError(f"{run / INIT_RECORD}: the run started from --weights {rec['weights']}, which is not "
                               "there any more: its iteration-0 weights cannot be rebuilt")
    with tempfile.TemporaryDirectory(prefix="exdrop-init-") as scratch, torch.random.fork_rng(devices=[]):
        cfg = TrainConfig(solver=str(run / "solver.prototxt"), out=scratch, backend=rec["backend"], device="cpu",
                          weights=rec["weights"], progress=False, utilization=None)
        try:
            make_backend(cfg).save_weights(dest)
        except Exception as exc:   # the net, its data or pycaffe is not there as it was at training time
            raise InitWeightsError(f"{run}: its iteration-0 weights could not be rebuilt from solver.prototxt "
                                   f"({type(exc).__name__}: {exc})") from exc
    if _sha256(dest) != rec["sha256"]:
        raise InitWeightsError(
            f"{run}: the iteration-0 weights rebuilt from solver.prototxt (random_seed {rec['random_seed']}"
            f"{', --weights ' + rec['weights'] if rec['weights'] else ''}) differ from the ones the run recorded in "
            f"{INIT_RECORD}: the net prototxt or the weights file changed since it trained (train with --keep-init "
            "to keep the file itself)")


@contextlib.contextmanager
def iteration0_weights(run):
    """The run's iteration-0 weights as a ``.caffemodel`` path, for the ``with`` block: the kept
    ``init.caffemodel``, or one rebuilt from ``init.json`` into a temporary folder (removed after).
    None when the run has neither (runs from before the record was written)."""
    run = Path(run)
    kept = run / INIT_WEIGHTS
    if kept.is_file():
        yield kept
        return
    rec = _record(run)
    if rec is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="exdrop-init-") as folder:
        dest = Path(folder) / INIT_WEIGHTS
        _rebuild(run, rec, dest)
        yield dest
