"""Golden outputs: a report, table or figure of hand-made inputs compared whole with the copy kept in
``tests/golden/``, so that any change to what a user reads (a word, a digit, a colour, a band) fails
a test and is looked at. After a change made on purpose, write the copies again (every test that
uses one has "golden" in its name or file) and review the diff:

    EXDROP_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests -k golden

A figure is compared through :func:`figure_record`: what each axes draws (its lines' data, colours
and widths, filled bands, texts, labels, limits, legend) and how it is saved, rounded to 6 digits,
not its pixels (which change with matplotlib's version and fonts)."""
from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("EXDROP_UPDATE_GOLDEN") == "1"


def _round(v):
    if isinstance(v, float):
        return float(f"{v:.6g}")
    if isinstance(v, (list, tuple)):
        return [_round(x) for x in v]
    if isinstance(v, dict):
        return {k: _round(x) for k, x in v.items()}
    return v


def _dumps(obj) -> str:
    """JSON, one key per line, each innermost list on one line (diffs stay readable)."""
    text = json.dumps(_round(obj), indent=1, sort_keys=True)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text) + "\n"


def check(name: str, got) -> None:
    """``got`` (text, or a JSON-able object) equals ``tests/golden/<name>``."""
    text = got if isinstance(got, str) else _dumps(got)
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        raise AssertionError(f"no golden copy {path}: write it with EXDROP_UPDATE_GOLDEN=1 and review it")
    want = path.read_text()
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), str(path), "got"))
        raise AssertionError(f"output differs from {path}:\n{diff}")


def check_close(name: str, got, rel: float = 1e-4, abs_: float = 1e-6) -> None:
    """``got`` (JSON-able) matches ``tests/golden/<name>``: the same keys, strings, booleans, None
    and list lengths, and each number within ``rel`` (numbers computed by a net: the last digits
    may differ between CPUs)."""
    import math
    path = GOLDEN / name
    got = json.loads(json.dumps(got))
    if UPDATE:
        check(name, got)
        return
    if not path.exists():
        raise AssertionError(f"no golden copy {path}: write it with EXDROP_UPDATE_GOLDEN=1 and review it")
    want = json.loads(path.read_text())
    diffs = []

    def walk(a, b, where):
        if isinstance(b, bool) or b is None or isinstance(b, str):
            if a != b:
                diffs.append(f"{where}: {a!r}, golden {b!r}")
        elif isinstance(b, (int, float)):
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not (
                    math.isclose(a, b, rel_tol=rel, abs_tol=abs_) or (math.isnan(a) and math.isnan(b))):
                diffs.append(f"{where}: {a!r}, golden {b!r}")
        elif isinstance(b, list):
            if not isinstance(a, list) or len(a) != len(b):
                diffs.append(f"{where}: {a!r}, golden {b!r}")
            else:
                for i, (x, y) in enumerate(zip(a, b)):
                    walk(x, y, f"{where}[{i}]")
        elif isinstance(b, dict):
            if not isinstance(a, dict) or sorted(a) != sorted(b):
                diffs.append(f"{where}: keys {list(a) if isinstance(a, dict) else a!r}, golden {list(b)}")
            else:
                for k in b:
                    walk(a[k], b[k], f"{where}.{k}")
    walk(got, want, "")
    if diffs:
        raise AssertionError(f"output differs from {path}:\n" + "\n".join(diffs[:30]))


def _color(c):
    from matplotlib.colors import to_hex
    return to_hex(c, keep_alpha=True)


def _kind(collection) -> str:
    """A collection's kind by its stable base class (matplotlib's subclasses change between versions)."""
    from matplotlib import collections as mc
    for base in (mc.PolyCollection, mc.LineCollection, mc.PathCollection, mc.QuadMesh):
        if isinstance(collection, base):
            return base.__name__
    return type(collection).__name__


def _fixed_ticks(axis):
    """Tick labels the code set itself (class names, say); automatic ticks vary with the version."""
    from matplotlib.ticker import FixedFormatter, FuncFormatter
    if not isinstance(axis.get_major_formatter(), (FixedFormatter, FuncFormatter)):   # set_ticklabels' (by version)
        return None
    return [[t.get_text(), t.get_rotation()] for t in axis.get_ticklabels()]


def _array(a) -> dict:
    """An image's values: listed when small, else their shape and a digest of the rounded values."""
    import hashlib
    import numpy as np
    a = np.asarray(a, float)
    if a.size <= 400:
        return {"values": a.tolist()}
    return {"shape": list(a.shape), "sha256": hashlib.sha256(np.round(a, 6).astype("<f8").tobytes()).hexdigest()}


def figure_record(fig, saved: dict | None = None) -> dict:
    """What a figure shows, as plain data (see the module's docstring); ``saved``: savefig's keywords."""
    import numpy as np
    axes = []
    for ax in fig.axes:
        grid = ax.xaxis.get_gridlines()
        legend = ax.get_legend()
        axes.append({
            "title": ax.get_title(), "title_size": ax.title.get_fontsize(),
            "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
            "xlim": list(ax.get_xlim()), "ylim": list(ax.get_ylim()),
            "xscale": ax.get_xscale(), "yscale": ax.get_yscale(),
            "xticklabels": _fixed_ticks(ax.xaxis), "yticklabels": _fixed_ticks(ax.yaxis),
            "grid": [bool(grid and grid[0].get_visible()), grid[0].get_alpha() if grid else None],
            "lines": [{"label": ln.get_label(), "x": np.asarray(ln.get_xdata(), float).tolist(),
                       "y": np.asarray(ln.get_ydata(), float).tolist(), "color": _color(ln.get_color()),
                       "lw": ln.get_linewidth(), "ls": ln.get_linestyle(), "marker": str(ln.get_marker())}
                      for ln in ax.lines],
            "collections": [{"type": _kind(c), "alpha": c.get_alpha(),
                             "facecolor": [_color(f) for f in c.get_facecolor()],
                             "lw": np.asarray(c.get_linewidth(), float).tolist(),
                             "points": len(c.get_paths()) if _kind(c) == "QuadMesh" else   # a colour bar's cells
                             [sorted({tuple(_round(v)) for v in np.asarray(p.vertices, float).tolist()})
                              for p in c.get_paths()]}
                            for c in ax.collections],
            "images": [{"data": _array(im.get_array()), "cmap": im.get_cmap().name,
                        "clim": list(im.get_clim())} for im in ax.images],
            "patches": [{"type": type(p).__name__, "xy": np.asarray(p.get_path().vertices, float).tolist(),
                         "facecolor": _color(p.get_facecolor())} for p in ax.patches],
            "texts": [{"text": t.get_text(), "xy": list(t.get_position()), "ha": t.get_ha(), "va": t.get_va(),
                       "size": t.get_fontsize(), "color": _color(t.get_color())} for t in ax.texts],
            "legend": None if legend is None else {
                "texts": [t.get_text() for t in legend.get_texts()], "loc": legend._loc,
                "size": legend.get_texts()[0].get_fontsize() if legend.get_texts() else None},
        })
    rec = {"size": list(fig.get_size_inches()), "suptitle": fig._suptitle.get_text() if fig._suptitle else None,
           "axes": axes}
    if saved is not None:
        rec["saved"] = {k: v for k, v in saved.items() if isinstance(v, (int, float, str, bool, type(None)))}
    return rec


def record_saved_figures(monkeypatch) -> list:
    """From now on, every ``Figure.savefig`` also appends its figure's record (with the keywords it
    was saved with) to the list returned."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    records, save = [], Figure.savefig

    def savefig(self, fname, *args, **kw):
        records.append(figure_record(self, kw))
        return save(self, fname, *args, **kw)
    monkeypatch.setattr(Figure, "savefig", savefig)
    return records
