"""Weights in and out of the engine as Caffe ``.caffemodel`` files, and snapshot sets.

A caffemodel is a binary NetParameter whose layers carry their learnable
blobs in Caffe's order (weights, then bias). Loading matches layers by name,
like Caffe's ``Net::CopyTrainedLayersFrom``: layers of the file that the net
lacks are skipped; a blob count or shape mismatch is an error naming the layer.
"""
from __future__ import annotations

import glob
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from exdrop.proto import io as cio
from exdrop.proto import caffe_pb2


def to_net_param(net) -> caffe_pb2.NetParameter:
    """The net's layers with their current blobs, as Caffe's ``Net::ToProto`` writes them."""
    out = caffe_pb2.NetParameter()
    out.name = net.name or "net"
    for layer in net.layer_list:
        lp = out.layer.add()
        lp.CopyFrom(layer.lp)
        del lp.blobs[:]
        for p in layer.blobs:
            lp.blobs.append(cio.array_to_blob(p.detach().float().cpu().numpy()))
    return out


def save_weights(net, path) -> None:
    cio.write_caffemodel(to_net_param(net), path)


def load_weights(net, path, strict_missing: bool = False, allow_v1: bool = False) -> list[str]:
    """Copy blobs from a .caffemodel into ``net`` by layer name; returns the layers loaded.
    ``allow_v1``: V1 files too (pretrained Model Zoo weights; snapshots are always V2)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} not found")
    src = cio.read_caffemodel(path, allow_v1=allow_v1)
    # V1 files (the model zoo's VGG/AlexNet) keep name and blobs in `layers`: enough to load by name.
    by_name = {l.name: l for l in (src.layer if len(src.layer) else src.layers)}
    loaded = []
    for layer in net.layer_list:
        if not len(layer.blobs):
            continue
        lp = by_name.get(layer.name)
        if lp is None:
            if strict_missing:
                raise ValueError(f"{path}: has no layer '{layer.name}'")
            continue
        if len(lp.blobs) != len(layer.blobs):
            raise ValueError(f"{path}: layer '{layer.name}' has {len(lp.blobs)} blobs, the net expects {len(layer.blobs)}")
        for i, (blob, p) in enumerate(zip(lp.blobs, layer.blobs)):
            if not cio.shape_equals(blob, p.shape):   # as Caffe's CopyTrainedLayersFrom
                raise ValueError(f"{path}: layer '{layer.name}' blob {i} has shape {cio.blob_shape_text(blob)}, "
                                 f"the net expects {tuple(p.shape)}")
            arr = cio.blob_to_array(blob)
            with torch.no_grad():
                p.copy_(torch.from_numpy(np.ascontiguousarray(arr.reshape(tuple(p.shape)))).to(p.device))
        loaded.append(layer.name)
    return loaded


# ---------------------------------------------------------------------- snapshot sets
class SnapshotError(ValueError):
    """A snapshot file that cannot be used for an exact resume (missing, truncated, foreign)."""


def engine_state_path(state_path) -> Path:
    return Path(str(state_path).removesuffix(".solverstate") + ".engine.pt")


def snapshot_state_path(model_path) -> Path:
    """The ``.solverstate`` (``.solverstate.h5``) written with ``X.caffemodel`` (``X.caffemodel.h5``)."""
    s = str(model_path)
    for model, state in ((".caffemodel.h5", ".solverstate.h5"), (".caffemodel", ".solverstate")):
        if s.endswith(model):
            return Path(s[:-len(model)] + state)
    return Path(s)


SNAPSHOT_SUFFIXES = (".caffemodel", ".caffemodel.h5", ".solverstate", ".solverstate.h5", ".engine.pt")


def prune_snapshots(prefix, newest: int, keep: int) -> list[Path]:
    """Delete the snapshot sets of ``<prefix>_iter_N.*`` other than iteration ``newest`` (just
    completed) and the ``keep - 1`` others written most recently; ``keep`` 0 keeps them all.
    Returns the deleted files. Called only after the new set is complete (its .solverstate renamed)."""
    if keep <= 0:
        return []
    prefix = Path(prefix)
    folder, stem = prefix.parent, prefix.name + "_iter_"
    sets: dict[int, list[Path]] = {}
    for path in folder.glob(glob.escape(stem) + "*") if folder.is_dir() else []:
        rest = path.name[len(stem):]
        for suffix in SNAPSHOT_SUFFIXES:
            if rest.endswith(suffix) and rest[:-len(suffix)].isdigit():
                sets.setdefault(int(rest[:-len(suffix)]), []).append(path)
                break
    if newest not in sets:
        return []   # the new set is not where expected: delete nothing

    def written(it):
        return max((p.stat().st_mtime for p in sets[it] if p.exists()), default=0.0)

    others = sorted((it for it in sets if it != newest), key=lambda it: (written(it), it), reverse=True)
    removed = []
    for it in others[keep - 1:]:
        # the .solverstate first: a kill in between leaves no .solverstate without its set
        for path in sorted(sets[it], key=lambda p: not p.name.endswith((".solverstate", ".solverstate.h5"))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def normal_file_mode(path) -> None:
    """The mode ``open()`` gives a new file (0666 less the umask): temporary files are created 0600."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def snapshot_model_path(state_path) -> Path:
    """The weights of ``X.solverstate``: its learned_net's file name, beside the given .solverstate
    (the run folder may have moved since; the absolute path stored in it is not followed)."""
    state_path = Path(state_path)
    if not state_path.is_file():
        raise FileNotFoundError(f"snapshot {state_path} not found")
    learned = cio.read_binary_proto(state_path, caffe_pb2.SolverState()).learned_net
    model = state_path.parent / Path(learned).name if learned else state_path.with_suffix(".caffemodel")
    if not model.is_file():
        raise FileNotFoundError(f"{state_path}: its weights {model} are missing (the solver state names "
                                f"learned_net {learned or '(none)'}; Caffe's snapshots keep the .caffemodel "
                                "beside the .solverstate)")
    return model


def remove_unfinished_snapshots(folder: Path) -> list[Path]:
    """Delete the ``*.tmp`` files that a run killed while writing a snapshot leaves behind."""
    stale = sorted(Path(folder).glob("*.tmp")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def plain_state(value, where: str = "state"):
    """``value`` as tensors, numbers, strings, lists and dicts only: what ``torch.load(weights_only=True)`` reads."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {k: plain_state(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_state(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"engine state {where} is a {type(value).__name__}, not a plain value")


def plain_to(value, device):
    """A plain state's tensors moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: plain_to(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_to(v, device) for v in value]
    return value


# What the .solverstate cannot hold; the solver's history (Adam's m and v) comes from the .solverstate.
ENGINE_STATE_KEYS = ("iter", "elapsed", "torch_rng", "data")


def read_engine_state(path: Path) -> dict:
    """The ``.engine.pt`` beside a .solverstate, loaded as data only (nothing in it is run)."""
    if not path.is_file():
        raise SnapshotError(f"the engine state {path} is missing (a snapshot killed while being written, "
                            "or copied without it)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SnapshotError(f"{path}: refused: it holds objects other than tensors, numbers, strings, lists "
                            f"and dicts, which loading could run as code; nothing from it was run ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise SnapshotError(f"{path}: truncated or not an engine state ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ENGINE_STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise SnapshotError(f"{path}: incomplete engine state (no {', '.join(missing)})")
    return state
