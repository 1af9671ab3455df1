"""A run's iteration-0 weights: recorded (init.json), drawn again from the seed, byte for byte, and
refused where the rebuild would differ (exdrop.run.init_weights)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from exdrop.analysis import analyze as A
from exdrop.cli import main as exdrop_main
from exdrop.run.init_weights import InitWeightsError, init_identity, iteration0_weights

sys.path.insert(0, str(Path(__file__).parent))
from caffe_nets import write_tiny  # noqa: E402


def _train(solver, out, *extra):
    return exdrop_main(["train", str(solver), "--out", str(out), "--max-iter", "2", "--test-interval", "2",
                        "--device", "cpu", "--quiet", *extra])


@pytest.fixture(scope="module")
def solver(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("init"))


def test_the_record_rebuilds_the_kept_file_byte_for_byte(solver, tmp_path):
    assert _train(solver, tmp_path / "rec", "--seed", "7") == 0
    assert _train(solver, tmp_path / "kept", "--seed", "7", "--keep-init") == 0
    rec = json.loads((tmp_path / "rec" / "init.json").read_text())
    assert not (tmp_path / "rec" / "init.caffemodel").exists()
    assert rec["backend"] == "engine" and rec["random_seed"] == 7 and rec["kept"] is False and rec["weights"] is None
    kept = tmp_path / "kept" / "init.caffemodel"
    assert json.loads((tmp_path / "kept" / "init.json").read_text())["why_kept"] == "--keep-init"
    state = torch.get_rng_state()
    with iteration0_weights(tmp_path / "rec") as path:
        assert path.read_bytes() == kept.read_bytes()
        assert init_identity(tmp_path / "rec") == rec["sha256"] == init_identity(tmp_path / "kept")
        scratch = path.parent
    assert not scratch.exists()                          # the rebuilt file is temporary
    assert torch.equal(torch.get_rng_state(), state)     # and drawing it left the caller's RNG alone
    with iteration0_weights(tmp_path / "kept") as path:  # a kept file is used as it is
        assert path == kept


def test_a_random_seed_keeps_the_file(solver, tmp_path):
    assert _train(solver, tmp_path / "run", "--seed", "-1") == 0
    rec = json.loads((tmp_path / "run" / "init.json").read_text())
    assert rec["kept"] and "random_seed < 0" in rec["why_kept"]
    assert (tmp_path / "run" / "init.caffemodel").stat().st_size == rec["bytes"]


def test_a_changed_net_is_refused_never_used(solver, tmp_path):
    run = tmp_path / "run"
    assert _train(solver, run, "--seed", "7", "--snapshot-every", "2") == 0
    net = solver.parent / "tiny_ed.prototxt"   # the net the run's solver.prototxt names
    text = net.read_text()
    try:
        net.write_text(text.replace('std: 0.1', 'std: 0.3', 1))
        assert net.read_text() != text
        with pytest.raises(InitWeightsError, match=r"differ from the ones the run recorded in init\.json") as info:
            with iteration0_weights(run):
                pass
        assert str(run) in str(info.value) and "--keep-init" in str(info.value)
        # the analysis goes on without the conservative filters and says why
        res = A.analyze_run(run, delta=0.05, over_training=False, echo=lambda *a: None)
        assert "conservative" not in res["final"] and "differ from the ones" in res["final"]["conservative_note"]
        # over training too, without iteration 0; the cache's key names exactly the snapshots analysed
        res = A.analyze_run(run, delta=0.05, training_images=2, echo=lambda *a: None)
        assert [r["iter"] for r in res["over_training"]["rows"]] == [2]
        assert [s[0] for s in res["key_over"]["snapshots"]] == [2] and res["key_final"]["init"] is None
        cached = json.loads((run / "analysis" / "analysis.json").read_text())
        assert cached["key_over"] == res["key_over"] and set(cached["key_over"]) == {"format", "data", "blob",
                                                                                     "delta", "snapshots", "images"}
    finally:
        net.write_text(text)


def test_a_missing_weights_file_or_a_bad_record_is_named(solver, tmp_path):
    assert _train(solver, tmp_path / "base", "--seed", "7", "--snapshot-every", "2") == 0
    weights = tmp_path / "w.caffemodel"
    weights.write_bytes((tmp_path / "base" / "snapshots" / "tiny_ed_iter_2.caffemodel").read_bytes())
    run = tmp_path / "run"
    assert _train(solver, run, "--seed", "7", "--weights", str(weights)) == 0
    with iteration0_weights(run) as path:   # the weights file over the fillers, as the run started
        assert path.read_bytes() == weights.read_bytes()
    weights.unlink()
    with pytest.raises(InitWeightsError, match=f"--weights {weights}, which is not there any more"):
        with iteration0_weights(run):
            pass
    (run / "init.json").write_text("[1, 2]")
    with pytest.raises(InitWeightsError, match=f"{run / 'init.json'}: not a record"):
        init_identity(run)
    (run / "init.json").write_bytes(b"\xff\xfe")
    with pytest.raises(InitWeightsError, match=f"{run / 'init.json'}: not JSON"):
        init_identity(run)
    (run / "init.json").unlink()
    assert init_identity(run) is None
    with iteration0_weights(run) as path:   # a run from before the record: nothing, and no error
        assert path is None


def test_a_folder_holding_only_the_record_is_a_run(solver, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "init.json").write_text("{}")
    assert _train(solver, run, "--seed", "7") == 1
    assert "holds a run (init.json)" in capsys.readouterr().err
