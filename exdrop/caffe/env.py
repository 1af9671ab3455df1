"""Locate and import the real pycaffe built by ``scripts/build_caffe.sh`` (``make caffe``).

pycaffe is an optional oracle: nothing in exdrop needs it except the differential tests.

Search order for the build directory (the one holding ``python/caffe/_caffe.so``):

1. ``$EXDROP_CAFFE_DIR`` if set (only that; it may also point straight at the ``python``
   folder, i.e. the one holding ``caffe/_caffe.so``);
2. ``<repo>/build/caffe``.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from exdrop.paths import REPO_ROOT

ENV_VAR = "EXDROP_CAFFE_DIR"
DEFAULT_BUILD_DIR = REPO_ROOT / "build" / "caffe"
BUILD_HINT = "run `make caffe` (scripts/build_caffe.sh) to build it"

_unavailable: str | None = None
_checked = False


def _candidate_dirs() -> list[Path]:
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env).expanduser()]
    return [DEFAULT_BUILD_DIR]


def find_pycaffe() -> Path | None:
    """Return the folder to put on ``sys.path`` (it holds ``caffe/_caffe.so``), or None."""
    for base in _candidate_dirs():
        for py_dir in (base / "python", base):
            if (py_dir / "caffe" / "_caffe.so").exists() and (py_dir / "caffe" / "__init__.py").exists():
                return py_dir.resolve()
    return None


def _where() -> str:
    env = os.environ.get(ENV_VAR)
    if env:
        return f"${ENV_VAR}={env}"
    return str(DEFAULT_BUILD_DIR)


def import_caffe():
    """Import and return the ``caffe`` module from the exdrop build.

    Puts the build's ``python`` folder first on ``sys.path`` and sets ``GLOG_minloglevel=2``
    (unless already set) before the import, so Caffe's logging stays quiet.
    Raises ImportError with instructions if pycaffe is not built or fails to import.
    """
    mod = sys.modules.get("caffe")
    if mod is not None and hasattr(mod, "Net"):
        return mod
    py_dir = find_pycaffe()
    if py_dir is None:
        raise ImportError(f"pycaffe is not built (looked in {_where()}); {BUILD_HINT}")
    os.environ.setdefault("GLOG_minloglevel", "2")
    p = str(py_dir)
    if p in sys.path:
        sys.path.remove(p)
    sys.path.insert(0, p)
    try:
        caffe = importlib.import_module("caffe")
    except Exception as exc:  # ImportError, protobuf TypeError, missing shared libs, ...
        sys.modules.pop("caffe", None)
        raise ImportError(
            f"pycaffe found at {py_dir} but `import caffe` failed: {type(exc).__name__}: {exc}. "
            f"Re-run `make caffe` (it reinstalls missing python packages and checks the build)."
        ) from exc
    if not str(getattr(caffe, "__file__", "")).startswith(p):
        raise ImportError(
            f"`import caffe` picked up {getattr(caffe, '__file__', '?')} instead of the build at {py_dir}"
        )
    return caffe


def caffe_unavailable_reason() -> str | None:
    """None if pycaffe imports (with the ``Python`` layer), else a human-readable reason."""
    global _unavailable, _checked
    if _checked:
        return _unavailable
    try:
        caffe = import_caffe()
        if "Python" not in list(caffe.layer_type_list()):
            _unavailable = (
                "pycaffe was built without the Python layer (-DWITH_PYTHON_LAYER); "
                "delete the build folder and run `make caffe` again"
            )
        else:
            _unavailable = None
    except ImportError as exc:
        _unavailable = str(exc)
    _checked = True
    return _unavailable
