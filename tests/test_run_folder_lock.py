"""One writer per run folder, and no run silently written over another (issue: two `exdrop train`
into one --out both exited 0; a fresh run into a finished folder rewrote its log and results)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exdrop.cli import main as exdrop_main
from exdrop.run import lock
from exdrop.run.train import Trainer, TrainConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import write_tiny  # noqa: E402

HOLDER = ("import sys, time; from exdrop.run import lock; lock.acquire(sys.argv[1]); print('held', flush=True); "
          "time.sleep(600)")


@pytest.fixture
def tiny(tmp_path):
    return write_tiny(tmp_path)


def _hold(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken_over(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    holder = _hold(out)
    try:
        with pytest.raises(lock.RunFolderBusy, match=rf"{out}: another exdrop train \(pid {holder.pid}\) is writing"):
            Trainer(TrainConfig(str(tiny), out=str(out), max_iter=2, device="cpu", test_iter=1, progress=False))
        assert exdrop_main(["train", str(tiny), "--out", str(out), "--max-iter", "2", "--quiet"]) == 1
        assert f"pid {holder.pid}" in capsys.readouterr().err
        assert not (out / "log.csv").exists()   # the refused run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / lock.LOCK).read_text().strip() == str(holder.pid)   # a crashed holder leaves its file
    res = Trainer(TrainConfig(str(tiny), out=str(out), max_iter=2, device="cpu", test_iter=1, progress=False)).run()
    assert res["status"] == "finished"
    assert f"(pid {holder.pid}) is not running any more; taking over its lock" in capsys.readouterr().err
    assert not (out / lock.LOCK).exists()   # removed when the run ends


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", str(tiny), "--out", str(out), "--max-iter", "2", "--test-iter", "1", "--quiet"]
    assert exdrop_main(args) == 0
    before = {p: p.read_bytes() for p in (out / "log.csv", out / "results.json")}
    snaps = sorted(p.name for p in (out / "snapshots").iterdir())
    assert exdrop_main(args) == 1
    err = capsys.readouterr().err
    assert f"{out} holds a run" in err and "--snapshot auto" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in before} == before and sorted(p.name for p in (out / "snapshots").iterdir()) == snaps
    assert exdrop_main([*args, "--snapshot", "auto"]) == 0   # the finished run: nothing to do
    assert exdrop_main([*args[:-1], "--max-iter", "3", "--overwrite", "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["iterations"] == 3
