"""Caffe's Python-layer contract, on both sides.

A layer module in ``layers/`` defines ``class X(caffe.Layer)`` with Caffe's
``setup/reshape/forward/backward`` and ``param_str``. Inside real pycaffe,
``caffe`` is the real module; in the engine (no pycaffe needed) it is the small
stand-in below, so the same file imports everywhere.

A layer tells the engine how to run it on tensors with a static factory::

    @staticmethod
    def torch_module(params: dict, phase: str) -> torch.nn.Module

whose module is called as ``module(x, saliency)``; its ``saliency`` attribute
says what the training loop must hand it: ``"excitation"`` (p_EB of x for the
top signal), ``"activation"`` (x itself) or ``None``. Layers without the
factory run through the numpy bridge (``Python`` in :mod:`exdrop.layer_types`)
like any Caffe Python layer.

Inside real Caffe a layer that needs p_EB asks for it with
:func:`request_saliency`; the Caffe backend answers through the hook it
installed on that layer with :func:`set_saliency_hook`.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import sys
import types
import weakref
from pathlib import Path

TRAIN, TEST = 0, 1


class _StandInLayer:
    """The engine's stand-in for ``caffe.Layer`` (no C++ behind it)."""

    param_str: str = ""
    phase: int = TRAIN

    def setup(self, bottom, top):  # pragma: no cover - overridden
        pass

    def reshape(self, bottom, top):  # pragma: no cover - overridden
        pass


def _stand_in_caffe() -> types.ModuleType:
    mod = types.ModuleType("caffe")
    mod.Layer = _StandInLayer
    mod.TRAIN, mod.TEST = TRAIN, TEST
    mod.__exdrop_stand_in__ = True
    return mod


def caffe_module():
    """Real pycaffe where it is loaded or on the path, else the stand-in.

    Layer files call this instead of ``import caffe`` so they import in both
    worlds; a process that has already imported real caffe gets real caffe.
    """
    if "caffe" in sys.modules:
        return sys.modules["caffe"]
    if importlib.util.find_spec("caffe") is not None:
        try:
            return importlib.import_module("caffe")
        except ImportError:
            pass
    return _STAND_IN


_STAND_IN = _stand_in_caffe()


_SALIENCY_HOOKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def set_saliency_hook(layer, hook) -> None:
    """Install ``hook(layer) -> numpy p_EB of the layer's bottom`` on one Caffe Python layer."""
    _SALIENCY_HOOKS[layer] = hook


def request_saliency(layer):
    """What ``layer`` needs for this forward (p_EB of its bottom), from its backend's hook."""
    hook = _SALIENCY_HOOKS.get(layer)
    if hook is None:
        raise RuntimeError(
            f"{type(layer).__name__} in TRAIN needs p_EB of its bottom, which the Caffe backend computes: "
            "train with `exdrop train --backend caffe` (exdrop.caffe_backend installs the hook with "
            "exdrop.pylayer.set_saliency_hook)")
    return hook(layer)


def parse_param_str(text: str, where: str = "param_str") -> dict:
    """Parse a ``python_param.param_str``: a dict literal, JSON, or ``k: v, k2=v2``."""
    text = (text or "").strip()
    if not text:
        return {}
    if text.startswith("{"):
        for loader in (json.loads, ast.literal_eval):
            try:
                value = loader(text)
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, dict):
                return value
        raise ValueError(f"{where}: cannot parse {text!r} as a dict")
    out = {}
    for item in text.replace(";", ",").split(","):
        if not item.strip():
            continue
        sep = ":" if ":" in item and ("=" not in item or item.index(":") < item.index("=")) else "="
        if sep not in item:
            raise ValueError(f"{where}: expected key: value in {item!r}")
        key, raw = item.split(sep, 1)
        raw = raw.strip()
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out[key.strip()] = value
    return out


def layer_search_paths(extra: list[Path] | None = None) -> list[Path]:
    """Folders where Python layer modules are found: ``layers/`` first, as in Caffe's PYTHONPATH."""
    root = Path(__file__).resolve().parents[1]
    paths = list(extra or []) + [root / "layers", Path.cwd() / "layers", Path.cwd()]
    seen, out = set(), []
    for p in paths:
        if p not in seen and p.is_dir():
            seen.add(p)
            out.append(p)
    return out


def load_layer_class(module: str, layer: str, layer_name: str, extra_paths: list[Path] | None = None):
    """Import ``module`` (from ``layers/`` or sys.path) and return its class ``layer``."""
    for p in reversed(layer_search_paths(extra_paths)):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    # A classic layer file starts with `import caffe`: without pycaffe it gets the stand-in.
    lend = "caffe" not in sys.modules and importlib.util.find_spec("caffe") is None
    if lend:
        sys.modules["caffe"] = _STAND_IN
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        what = ("not found (looked in layers/ and on sys.path)" if exc.name == module
                else f"failed to import: {exc}")
        raise ImportError(f"layer '{layer_name}': python_param module '{module}' {what}") from exc
    finally:
        if lend and sys.modules.get("caffe") is _STAND_IN:
            del sys.modules["caffe"]
    try:
        return getattr(mod, layer)
    except AttributeError:
        raise ImportError(f"layer '{layer_name}': module '{module}' has no class '{layer}'") from None
