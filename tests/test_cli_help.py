"""The command line: help strings, the messages of common mistakes, data reuse, `exdrop plot`,
and the Makefile knobs that feed it."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import exdrop.data
import exdrop.run.train
from exdrop.cli import build_parser, main
from exdrop.data.cifar import CIFAR10_MD5, CIFAR10_URL, download_cifar10
from make_dry import unquoted  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOLVER = str(ROOT / "prototxt/cnn2/cifar10/solver_ed.prototxt")
NET = str(ROOT / "prototxt/cnn2/cifar10/train_val_ed.prototxt")


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise AssertionError("no subcommands")


@pytest.mark.parametrize("cmd", sorted(_subparsers(build_parser())))
def test_every_option_has_help(cmd):
    sub = _subparsers(build_parser())[cmd]
    missing = [a.option_strings or [a.dest] for a in sub._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help and a.help.strip())]
    assert not missing, f"exdrop {cmd}: no help for {missing}"


def test_top_level_help_is_plain_text(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "``" not in out
    for cmd in ("train", "data", "bench", "plot"):
        assert cmd in out


def test_train_help_lists_the_new_options(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for opt in ("--net", "--keep-snapshots", "--display", "--data-dir"):
        assert opt in out


def test_net_prototxt_given_as_solver(capsys):
    assert main(["train", NET, "--max-iter", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{NET} is a net prototxt, not a solver: give a solver and --net {NET}" in err
    assert "solver_ed.prototxt --net" in err
    assert "has no field named" not in err


def test_a_broken_solver_keeps_its_own_error(tmp_path, capsys):
    bad = tmp_path / "s.prototxt"
    bad.write_text('net: "x.prototxt"\nbase_lr: oops\n')
    assert main(["train", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "not a solver" not in err and "s.prototxt" in err


def _offline(monkeypatch):
    def refuse(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_download_offline_names_url_md5_place_and_DATA(tmp_path, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(OSError) as ei:
        download_cifar10(tmp_path / "data")
    msg = str(ei.value)
    for part in (CIFAR10_URL, CIFAR10_MD5, str(tmp_path / "data" / "cifar-10-python.tar.gz"), "DATA=",
                 "name resolution"):
        assert part in msg
    assert not list((tmp_path / "data").glob("*.part"))


def test_train_offline_without_converted_data(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    rc = main(["train", SOLVER, "--data", str(tmp_path / "cifar-10-python.tar.gz"),
               "--data-dir", str(tmp_path / "cifar10")])
    assert rc == 1
    err = capsys.readouterr().err
    assert CIFAR10_URL in err and CIFAR10_MD5 in err and "DATA=" in err


class _FakeTrainer:
    seen = []

    def __init__(self, cfg):
        self.cfg = cfg
        self.out = Path(cfg.out or ".")
        _FakeTrainer.seen.append(cfg)

    def run(self):
        return {"iterations": 1, "seconds": 0.1, "device": "cpu", "test_accuracy": 0.5, "budget": "reduced"}


def _tiny_lmdbs(data_dir: Path):
    from exdrop.data.lmdb_datum import write_datum_lmdb
    imgs = np.zeros((4, 3, 32, 32), np.uint8)
    for k in ("train_lmdb", "val_lmdb"):
        write_datum_lmdb(data_dir / k, imgs, [0, 1, 2, 3])


def test_train_reuses_converted_lmdbs_offline(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    data_dir = tmp_path / "cifar10"
    _tiny_lmdbs(data_dir)

    def no_conversion(*a, **k):
        raise AssertionError("converted again")
    monkeypatch.setattr(exdrop.data, "prepare_cifar10", no_conversion)
    monkeypatch.setattr(exdrop.run.train, "Trainer", _FakeTrainer)
    _FakeTrainer.seen.clear()
    rc = main(["train", SOLVER, "--data", str(tmp_path / "cifar-10-python.tar.gz"), "--data-dir", str(data_dir),
               "--net", NET, "--keep-snapshots", "3", "--display", "7", "--out", str(tmp_path / "run")])
    assert rc == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if "converted LMDBs" in ln]
    assert len(line) == 1 and str(data_dir) in line[0]
    cfg = _FakeTrainer.seen[-1]
    assert cfg.net == NET and cfg.keep_snapshots == 3 and cfg.display == 7


def test_keep_snapshots_default_is_the_trainers(tmp_path, monkeypatch):
    monkeypatch.setattr(exdrop.run.train, "Trainer", _FakeTrainer)
    _FakeTrainer.seen.clear()
    assert main(["train", SOLVER, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    cfg = _FakeTrainer.seen[-1]
    assert cfg.keep_snapshots == exdrop.run.train.TrainConfig(solver="x").keep_snapshots and cfg.net is None


def test_missing_net_is_named(tmp_path, capsys):
    assert main(["train", SOLVER, "--net", str(tmp_path / "nonet.prototxt")]) == 1
    assert "nonet.prototxt" in capsys.readouterr().err


def test_conversion_prints_one_summary_line(tmp_path, monkeypatch, capsys):
    src = tmp_path / "train.tgz"
    src.write_bytes(b"x")
    info = {"train": str(tmp_path / "d/train_lmdb"), "val": str(tmp_path / "d/val_lmdb"), "test": None,
            "classes": [str(i) for i in range(10)], "counts": {"train": 45000, "train_per_class": [4500] * 10,
                                                               "val": 5000, "val_per_class": [500] * 10},
            "shape": [3, 32, 32], "meta": str(tmp_path / "d/meta.json"), "out_dir": str(tmp_path / "d")}
    monkeypatch.setattr(exdrop.data, "prepare_cifar10", lambda *a, **k: info)
    monkeypatch.setattr(exdrop.run.train, "Trainer", _FakeTrainer)
    assert main(["train", SOLVER, "--data", str(src), "--data-dir", str(tmp_path / "d"), "--quiet"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("data:")]
    assert lines == [f"data: {tmp_path / 'd'}: train 45000, val 5000 images, 10 classes, 3x32x32 "
                     f"(details: {tmp_path / 'd/meta.json'})"]


def _log(folder: Path, tests=True):
    folder.mkdir(parents=True)
    rows = ["iter,phase,lr,elapsed_s,accuracy,loss"]
    for it in range(0, 10):
        rows.append(f"{it},train,0.001,{it},0.{it},{2.3 - it / 10}")
        if tests and it % 3 == 0:
            rows.append(f"{it},test,0.001,{it},0.{it},{2.2 - it / 10}")
    (folder / "log.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_plot_cli(tmp_path, capsys):
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b", tests=False)
    assert main(["plot", str(a)]) == 0
    assert (a / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(a), str(b), "--out", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(b), "--out", str(tmp_path / "one" / "b.png")]) == 0
    assert (tmp_path / "one" / "b.png").is_file() and (b / "curves.png").is_file()
    capsys.readouterr()
    assert main(["plot", str(tmp_path / "nothing")]) == 1
    assert "log.csv" in capsys.readouterr().err


make = shutil.which("make")


def _make_n(*args, env=None):
    return unquoted(subprocess.run([make, "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True,
                                   text=True, check=True, env=env).stdout)


@pytest.mark.skipif(make is None, reason="no make")
def test_makefile_knobs():
    import os
    env = {**os.environ, "DISPLAY": ":0"}   # X11's variable is not a display interval
    out = _make_n("train-cifar10", "NET=my.prototxt", "KEEP=2", "MAX_ITER=30", env=env)
    assert "--net my.prototxt" in out and "--keep-snapshots 2" in out and "--display" not in out
    assert "--display 5" in _make_n("train-cifar10", "DISPLAY=5", env=env)
    t6 = _make_n("bench-table6", "ITERS=3", "DEVICE=cpu", "NETS=cnn2")
    assert "--iters 3" in t6 and "table6_${net}_${dev%%:*}.json" in t6 and "_auto" not in t6
    assert "--iters 4" in _make_n("bench-table6", "T6_ITERS=4", "DEVICE=cpu")
    assert "--iters 20" in _make_n("bench")
    help_text = subprocess.run([make, "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout
    for knob in ("ITERS=", "BACKEND=", "DATA_DIR=", "NET=", "DISPLAY=", "KEEP="):
        assert knob in help_text


def test_long_make_targets_say_how_long_and_top_help_lists_every_subcommand(capsys):
    helptext = subprocess.run(["make", "help"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    block = helptext[helptext.index("make bench-table6"):].split("\nmake ", 1)[0]
    assert "minutes" in block, block
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name in subcommands:
        assert f"    exdrop {name} " in out, f"`exdrop --help` does not describe {name}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "engine backend)" not in capsys.readouterr().out   # --utilization is logged by both backends
