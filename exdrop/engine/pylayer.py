"""Caffe's Python-layer contract, on both sides.

A layer module in ``layers/`` defines ``class X(caffe.Layer)`` with Caffe's
``setup/reshape/forward/backward`` and ``param_str``, taking ``caffe`` from
:func:`caffe_module`: real pycaffe where it is importable, else the small stand-in
below, so the same file imports everywhere. The stand-in never enters
``sys.modules``; a layer module bound to it leaves ``sys.modules`` once its class
is loaded, so real Caffe in the same process imports it afresh against its own
``caffe.Layer``. A file that writes ``import caffe`` needs pycaffe.

A layer tells the engine how to run it on tensors with a static factory::

    @staticmethod
    def torch_module(params: dict, phase: str) -> torch.nn.Module

whose module is called as ``module(x, saliency)``; its ``saliency`` attribute
says what the training loop must hand it: ``"excitation"`` (p_EB of x for the
top signal), ``"activation"`` (x itself) or ``None``. Layers without the
factory run through the numpy bridge (``Python`` in :mod:`exdrop.engine.layer_types`)
like any Caffe Python layer.

Inside real Caffe a layer that needs p_EB asks for it with
:func:`request_saliency`; the Caffe backend answers through the hook it
installed on that layer with :func:`set_saliency_hook`.

A layer whose class says ``needs_iteration = True`` (Curriculum Dropout) gets the
solver's iteration as ``.iteration`` before each training step: from
``exdrop.engine.net.Net.set_iteration`` in the engine, from the Caffe backend on the
real layer object. A module with ``caffe_setup`` / ``caffe_forward`` (Information
Dropout) may take several bottoms and tops and own learnable blobs (see the
``Python`` layer type in :mod:`exdrop.engine.layer_types`).
"""
from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
import weakref
from pathlib import Path

from exdrop.paths import LAYERS

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
            "train with `exdrop train --backend caffe` (exdrop.caffe.backend installs the hook with "
            "exdrop.engine.pylayer.set_saliency_hook)")
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


LAYER_PATH_ENV = "EXDROP_LAYER_PATH"
REPO_LAYERS = LAYERS


def layer_search_paths(extra: list[Path] | None = None) -> list[Path]:
    """The folders exdrop itself adds for Python layer modules, in search order: the repo's
    ``layers/``, then the folders named in ``$EXDROP_LAYER_PATH`` (os.pathsep-separated), then
    ``extra`` (a net's ``search_paths``). Installed packages (sys.path) are searched between
    ``layers/`` and these; the current directory is never searched unless named here."""
    configured = [Path(p) for p in os.environ.get(LAYER_PATH_ENV, "").split(os.pathsep) if p]
    seen, out = set(), []
    for p in [REPO_LAYERS, *configured, *(Path(p) for p in extra or [])]:
        p = p.expanduser().resolve()
        if p not in seen and p.is_dir():
            seen.add(p)
            out.append(p)
    return out


def _module_search_order(extra: list[Path] | None) -> list[str]:
    """``layers/``, sys.path without the current directory, then the configured folders."""
    folders = [str(p) for p in layer_search_paths(extra)]
    repo = folders[:1] if folders and folders[0] == str(REPO_LAYERS.resolve()) else []
    configured = folders[len(repo):]
    cwd = Path.cwd().resolve()
    installed = [p for p in sys.path if p and Path(p).resolve() != cwd and p not in folders]
    return [*repo, *installed, *configured]


def _import_layer_module(module: str, order: list[str]):
    """Import ``module`` (its top-level package) from the folders ``order``, in that order."""
    top = module.split(".")[0]
    if top not in sys.modules:
        spec = importlib.machinery.PathFinder.find_spec(top, order)
        if spec is None or spec.loader is None:
            raise ModuleNotFoundError(f"No module named {top!r}", name=top)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[top] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(top, None)
            raise
    return importlib.import_module(module)


def load_layer_class(module: str, layer: str, layer_name: str, extra_paths: list[Path] | None = None):
    """Import ``module`` and return its class ``layer``.

    Looked up in the repo's ``layers/``, then installed packages, then ``$EXDROP_LAYER_PATH``
    and ``extra_paths``; never in the current directory by accident (``python -m`` puts it on
    sys.path: it is skipped unless configured). ``layers/`` goes first on sys.path and the
    configured folders last, so that a layer file can import its siblings.
    """
    repo = str(REPO_LAYERS.resolve())
    for p in map(str, layer_search_paths(extra_paths)):
        if p == repo and p not in sys.path:
            sys.path.insert(0, p)
        elif p not in sys.path:
            sys.path.append(p)
    order = _module_search_order(extra_paths)
    imported_before = set(sys.modules)
    try:
        mod = _import_layer_module(module, order)
    except ImportError as exc:
        where = f"layers/, installed packages, ${LAYER_PATH_ENV}" + (", search_paths" if extra_paths else "")
        if exc.name == "caffe":
            what = ("imports caffe, and pycaffe is not built here: write `caffe = caffe_module()` "
                    "(from exdrop.engine.pylayer) instead of `import caffe` to run the layer in the engine too, "
                    "or build pycaffe (make caffe)")
        elif exc.name in (module, module.split(".")[0]):
            what = (f"not found (looked in {where}; never in the current directory: name a folder in "
                    f"${LAYER_PATH_ENV} to use one)")
        else:
            what = f"failed to import: {exc}"
        raise ImportError(f"layer '{layer_name}': python_param module '{module}' {what}") from exc
    finally:
        _release_stand_in_modules(imported_before)
    try:
        cls = getattr(mod, layer)
    except AttributeError:
        raise ImportError(f"layer '{layer_name}': module '{module}' has no class '{layer}'") from None
    missing = [m for m in CONTRACT if not callable(getattr(cls, m, None))] if isinstance(cls, type) else None
    if missing is None or missing:
        what = (f"a {type(cls).__name__}, not a class" if missing is None
                else f"a class without {', '.join(missing)}")
        raise ImportError(f"layer '{layer_name}': python_param names {module}.{layer}, {what}: a Python layer is a "
                          f"class with Caffe's {' / '.join(CONTRACT)} (caffe.Layer); nothing else is loaded")
    return cls


def _release_stand_in_modules(imported_before: set) -> None:
    """Layer modules that this import bound to the stand-in ``caffe.Layer`` leave sys.modules again
    (the classes keep working): real Caffe, loaded later in the same process, imports them afresh
    against its own ``caffe.Layer``."""
    for name in set(sys.modules) - imported_before:
        mod = sys.modules[name]
        if any(v is _STAND_IN or (isinstance(v, type) and issubclass(v, _STAND_IN.Layer))
               for v in vars(mod).values()):
            del sys.modules[name]


# Caffe's Python-layer contract: what a class named by python_param must define
CONTRACT = ("setup", "reshape", "forward", "backward")
