"""Where the project's files are: the shipped prototxts and Python layers, and the checkout that
relative paths in them (``prototxt/...``, ``models/...``, ``data/...``) start from.

One setting: ``EXDROP_HOME``, a folder with ``prototxt/`` and ``layers/`` (a checkout of this
repository). Unset, it is the checkout this package was imported from; for an installed wheel
outside a checkout, the current folder when it has them, else the package's bundled copies
(``exdrop/_shipped``, built into the wheel).
"""
from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _home() -> Path:
    given = os.environ.get("EXDROP_HOME")
    if given:
        return Path(given).resolve()
    for candidate in (_PACKAGE.parent, Path.cwd(), _PACKAGE / "_shipped"):
        if (candidate / "prototxt").is_dir() and (candidate / "layers").is_dir():
            return candidate
    return _PACKAGE.parent


REPO_ROOT = _home()
PROTOTXT = REPO_ROOT / "prototxt"
LAYERS = REPO_ROOT / "layers"
