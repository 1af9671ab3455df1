"""Training curves from a run folder's ``log.csv`` (see :mod:`exdrop.run.runlog`).

plot_run(folder)         -> folder/curves.png: training loss and test accuracy over iterations
plot_runs(folders, out)  -> out: several runs overlaid (test accuracy and loss), labelled by folder name

matplotlib is used with the Agg backend (no display needed).
"""
from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["read_log", "plot_run", "plot_runs"]


def _num(v):
    try:
        return None if v in (None, "") else float(v)
    except ValueError:
        return None


def read_log(folder) -> dict:
    """``{"train": [(iter, {column: value}), ...], "test": [...]}`` from ``folder/log.csv``.

    Raises ``FileNotFoundError`` naming the file when there is none."""
    path = Path(folder) / "log.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no log.csv in run folder {folder} (a run writes it at its first "
                                "display or test point)")
    out: dict[str, list] = {"train": [], "test": []}
    try:
        return _read_log_rows(path, out)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a text log.csv ({exc.reason} at byte {exc.start})") from None


def _read_log_rows(path: Path, out: dict) -> dict:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "iter" not in reader.fieldnames or "phase" not in reader.fieldnames:
            raise ValueError(f"{path}: not an exdrop log.csv (needs the columns iter and phase)")
        for row in reader:
            it = _num(row.get("iter"))
            if it is None:
                continue
            phase = "test" if str(row.get("phase", "")).startswith("test") else "train"
            vals = {k: _num(v) for k, v in row.items() if k not in ("iter", "phase") and k is not None}
            out[phase].append((it, vals))
    return out


def _series(rows, key):
    pts = [(it, v[key]) for it, v in rows if v.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _finish(ax, ylabel: str, empty_note: str, has_data: bool):
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if has_data:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, empty_note, ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_run(folder) -> Path:
    """Write ``folder/curves.png``: training loss (and test loss) and test accuracy over iterations."""
    folder = Path(folder)
    log = read_log(folder)
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        x, y = _series(log["train"], "loss")
        if x:
            ax_loss.plot(x, y, label="train loss (smoothed)")
        tx, ty = _series(log["test"], "loss")
        if tx:
            ax_loss.plot(tx, ty, "o-", ms=3, label="test loss")
        _finish(ax_loss, "loss", "no loss rows yet", bool(x or tx))
        ax_loss.set_title("loss")
        ax, ay = _series(log["test"], "accuracy")
        if ax:
            ax_acc.plot(ax, ay, "o-", ms=3, label="test accuracy")
        trx, tra = _series(log["train"], "accuracy")
        if trx:
            ax_acc.plot(trx, tra, alpha=0.6, label="train accuracy (smoothed)")
        _finish(ax_acc, "accuracy", "no test rows yet", bool(ax or trx))
        ax_acc.set_title("accuracy")
        fig.suptitle(folder.resolve().name)
        fig.tight_layout()
        out = folder / "curves.png"
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


def plot_runs(folders, out) -> Path:
    """Overlay several runs (label = folder name): test accuracy and loss (test loss, else the
    training loss) over iterations, written to ``out``."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise ValueError("plot_runs: no run folders given")
    logs = [(f, read_log(f)) for f in folders]
    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        any_acc = any_loss = False
        for f, log in logs:
            label = f.resolve().name
            x, y = _series(log["test"], "accuracy")
            if x:
                ax_acc.plot(x, y, "o-", ms=3, label=label)
                any_acc = True
            x, y = _series(log["test"], "loss")
            if x:
                ax_loss.plot(x, y, "o-", ms=3, label=f"{label} (test)")
                any_loss = True
            else:
                x, y = _series(log["train"], "loss")
                if x:
                    ax_loss.plot(x, y, label=f"{label} (train)")
                    any_loss = True
        _finish(ax_acc, "test accuracy", "no test rows", any_acc)
        ax_acc.set_title("test accuracy")
        _finish(ax_loss, "loss", "no loss rows", any_loss)
        ax_loss.set_title("loss")
        fig.tight_layout()
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out
