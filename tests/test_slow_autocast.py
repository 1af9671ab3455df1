"""bf16 autocast on a CPU without native bf16 is many times slower than float32 (29x for CNN-2 ED on
an AVX2-only AMD EPYC): a run and a sweep measure it and say so, once, at the start."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from exdrop.cli import main as exdrop_main
from exdrop.engine import step

sys.path.insert(0, str(Path(__file__).parent))
from caffe_nets import write_tiny  # noqa: E402


def test_the_probe_measures_a_ratio():
    ratio = step.cpu_autocast_slowdown(repeats=1)
    assert math.isfinite(ratio) and ratio > 0


@pytest.mark.parametrize("ratio, warned", [(20.0, True), (0.6, False), (2.9, False)])
def test_a_bf16_run_on_a_slow_cpu_is_warned(tmp_path, monkeypatch, capsys, ratio, warned):
    monkeypatch.setattr(step, "cpu_autocast_slowdown", lambda dtype=None, repeats=3: ratio)
    solver = write_tiny(tmp_path)
    assert exdrop_main(["train", str(solver), "--out", str(tmp_path / "run"), "--max-iter", "2", "--device", "cpu",
                        "--amp", "bf16", "--quiet"]) == 0
    err = capsys.readouterr().err
    said = "exdrop: warning: bf16 autocast is 20x slower than float32 on this CPU"
    assert (said in err) == warned, err
    if warned:
        assert "no --amp; a sweep: --amp ''" in err and err.count("autocast is") == 1
