"""exdrop.run.plot: curves.png from a run folder's log.csv, and several runs overlaid."""
from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest

from exdrop.run.plot import plot_run, plot_runs, read_log


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])   # IHDR width, height


def _write_log(folder, n=20, test_every=5, tests=True, shift=0.0):
    folder.mkdir(parents=True, exist_ok=True)
    cols = ["iter", "phase", "lr", "elapsed_s", "accuracy", "loss"]
    with open(folder / "log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for it in range(n):
            w.writerow({"iter": it, "phase": "train", "lr": 0.001, "elapsed_s": it * 0.1,
                        "accuracy": 0.1 + it / (2 * n) + shift, "loss": 2.3 - it / n - shift})
            if tests and it % test_every == 0:
                w.writerow({"iter": it, "phase": "test", "lr": 0.001, "elapsed_s": it * 0.1,
                            "accuracy": 0.1 + it / (1.5 * n) + shift, "loss": 2.2 - it / n - shift})
    return folder


def test_plot_run_writes_a_sane_png(tmp_path):
    run = _write_log(tmp_path / "run_ed")
    out = plot_run(run)
    assert out == run / "curves.png" and out.is_file()
    w, h = _png_size(out)
    assert 400 <= w <= 3000 and 200 <= h <= 2000
    assert 5_000 < out.stat().st_size < 2_000_000


def test_plot_run_without_test_rows(tmp_path):
    run = _write_log(tmp_path / "early", tests=False)
    assert read_log(run)["test"] == []
    out = plot_run(run)
    assert out.is_file() and _png_size(out)[0] > 0


def test_plot_run_with_header_only(tmp_path):
    run = _write_log(tmp_path / "empty", n=0)
    assert plot_run(run).is_file()


def test_plot_runs_overlays_several(tmp_path):
    runs = [_write_log(tmp_path / name, shift=s) for name, s in (("ed", 0.0), ("standard", 0.05))]
    runs.append(_write_log(tmp_path / "notest", tests=False))
    out = plot_runs(runs, tmp_path / "cmp" / "all.png")
    assert out == tmp_path / "cmp" / "all.png" and out.is_file()
    w, h = _png_size(out)
    assert 400 <= w <= 3000 and 200 <= h <= 2000


def test_missing_log_is_a_named_error(tmp_path):
    (tmp_path / "norun").mkdir()
    with pytest.raises(FileNotFoundError, match=r"norun.*log\.csv|log\.csv.*norun"):
        plot_run(tmp_path / "norun")
    with pytest.raises(FileNotFoundError, match="log.csv"):
        plot_runs([_write_log(tmp_path / "ok"), tmp_path / "norun"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_not_a_log_csv(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="iter and phase"):
        plot_run(tmp_path / "bad")


# ---------------------------------------------------------------------- exdrop plot --utilization
def _utilization_run(folder, variant, iters):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"status": "finished",
                                                     "net": f"prototxt/cnn2/cifar10/train_val_{variant}.prototxt"}))
    lines = ["iter,phase,accuracy,neurons_on,peak_peb,entropy_act,entropy_peb"]
    lines += [f"{it},test,0.5,{100 + it},{0.01},{5.0},{4.0}" for it in iters]
    (folder / "log.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_plot_utilization_groups_by_variant_and_warns(tmp_path, monkeypatch):
    """Runs under one parent (`OUT=models/...`) group by what they trained, never by the folder
    above them; runs that share no test point are drawn one by one, with a warning; a single point
    is drawn with a marker."""
    from exdrop.analysis import report
    runs = [_utilization_run(tmp_path / "models" / "a", "ed", [0, 100]),
            _utilization_run(tmp_path / "models" / "b", "ed", [0, 100, 200]),
            _utilization_run(tmp_path / "models" / "c", "standard", [100]),
            _utilization_run(tmp_path / "models" / "d", "none", [10]),
            _utilization_run(tmp_path / "models" / "e", "none", [20])]
    drawn, warnings = {}, []

    def keep(fig, plt, path):
        ax = fig.axes[0]
        drawn.update({line.get_label(): (list(line.get_xdata()), line.get_marker()) for line in ax.get_lines()})
        plt.close(fig)
        return Path(path)
    monkeypatch.setattr(report, "_save", keep)
    report.plot_logged_utilization(runs, tmp_path / "u.png", warn=warnings.append)
    assert set(drawn) == {"Excitation (n=2)", "standard (n=1)", "No Dropout: d", "No Dropout: e"}, drawn
    assert drawn["Excitation (n=2)"][0] == [0, 100]
    assert drawn["standard (n=1)"] == ([100], "o")
    assert any("share 2 of their test points" in w for w in warnings)
    assert any("No Dropout share no test point" in w for w in warnings)
