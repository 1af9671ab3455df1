"""Contracts of the analysis (Secs. 4.3-4.4) that mutants of the source used to survive: the header of
an analysis (the data it read, its timing and where the keys stand), the device asked for, the std over
images of the p_EB mass, the axis labels of the Fig. 7 curves, the random compression curve drawn from
the seed alone, a sweep's run found inside a moved sweep folder, and the note of a video list that does
not match the frames evaluated. Each test is small: one tiny net with random weights, no training."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exdrop.analysis import analyze as A
from exdrop.proto import io as cio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import write_tiny  # noqa: E402

UNITS = 130          # more than RANDOM_STEP (128): the random curve has k = 0, 128, 130


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """write_tiny's LMDB (6 held-out images) and net with ip1 widened to 130 units, at a TEST batch of
    3 and of 1; random weights. {"b3", "b1": net paths, "weights", "val": the TEST LMDB}."""
    from exdrop.engine.net import Net
    from exdrop.engine.pylayer import TRAIN
    from exdrop.engine.snapshot import save_weights
    tmp = tmp_path_factory.mktemp("wide")
    write_tiny(tmp)
    text = (tmp / "tiny_ed.prototxt").read_text()
    for old in ("num_output: 16", "batch_size: 3 backend: LMDB"):
        assert text.count(old) == 1, old
    text = text.replace("num_output: 16", f"num_output: {UNITS}")
    nets = {}
    for batch in (3, 1):
        nets[f"b{batch}"] = tmp / f"wide_b{batch}.prototxt"
        nets[f"b{batch}"].write_text(text.replace("batch_size: 3 backend: LMDB", f"batch_size: {batch} backend: LMDB"))
    torch.manual_seed(0)
    net = Net(cio.read_net_prototxt(nets["b3"]), TRAIN, "cpu", "wide")
    nets["weights"] = tmp / "w.caffemodel"
    save_weights(net, nets["weights"])
    test = [lp for lp in cio.read_net_prototxt(nets["b3"]).layer
            if lp.type == "Data" and any(r.phase == 1 for r in lp.include)]
    nets["val"] = Path(test[0].data_param.source)
    return nets


@pytest.fixture
def full(wide):
    """One full analysis (compression included) of the wide net at batch 3. Made for each test (0.7 s):
    mutation testing runs, for a mutant, only the tests during which the mutated function ran, and a
    module-scoped fixture runs during the first test only."""
    return A.analyze(wide["b3"], wide["weights"])


# ---------------------------------------------------------------------- the header of an analysis
def test_analysis_names_the_lmdb_the_net_reads(wide, full):
    """Without --data the analysis reads the TEST layer's own source, and says so in "data"."""
    assert full["data"] == str(wide["val"])
    assert full["images"] == 6 and full["units"] == UNITS and full["blob"] == "ip1"


def test_analysis_of_a_net_whose_source_is_missing_names_it(wide, tmp_path):
    """A TEST source that does not exist: a FileNotFoundError naming the layer and its source."""
    net = tmp_path / "missing.prototxt"
    net.write_text(wide["b3"].read_text().replace(str(wide["val"]), str(tmp_path / "gone_lmdb")))
    with pytest.raises(FileNotFoundError, match=r"TEST data layer 'data' reads '.*gone_lmdb', which does not exist"):
        A.analyze(net, wide["weights"], compression=False)


def test_analysis_header_keys_and_timing(full):
    """analysis.json opens with its header in a fixed order (seconds among it, not appended after
    the numbers), has no other spelling of a key, and records the seconds the pass took."""
    assert list(full)[:8] == ["weights", "net", "data", "blob", "units", "images", "seconds", "device"]
    assert len({k.lower() for k in full}) == len(full)
    assert isinstance(full["seconds"], float) and full["seconds"] >= 0


def test_analysis_seconds_are_the_pass_rounded_to_hundredths(wide):
    import time
    t0 = time.perf_counter()
    r = A.analyze(wide["b3"], wide["weights"], images=3, compression=False)
    took = time.perf_counter() - t0
    assert isinstance(r["seconds"], float) and 0 <= r["seconds"] <= took + 0.01
    assert r["seconds"] == round(r["seconds"], 2)


def test_analysis_shows_its_progress_when_asked(wide, capsys):
    A.analyze(wide["b3"], wide["weights"], images=3, compression=False, progress=True)
    assert "test" in capsys.readouterr().err
    A.analyze(wide["b3"], wide["weights"], images=3, compression=False)
    assert capsys.readouterr().err == ""


def test_analysis_reads_a_data_layer_from_its_first_record_whatever_its_rand_skip(wide, tmp_path):
    """Caffe's rand_skip skips a random number of records at the start of training; an analysis of
    the test set starts at record 0, so it reads the same images with or without it."""
    text = wide["b3"].read_text()
    skipped = tmp_path / "skip.prototxt"
    skipped.write_text(text.replace("batch_size: 3 backend: LMDB", "batch_size: 3 backend: LMDB rand_skip: 5"))
    assert skipped.read_text().count("rand_skip: 5") == 1   # the TEST layer
    plain = A.analyze(wide["b3"], wide["weights"], images=3, compression=False)
    other = A.analyze(skipped, wide["weights"], images=3, compression=False)
    for key in ("neurons_on", "peak_peb", "entropy_act", "accuracy", "nll"):
        assert other[key] == pytest.approx(plain[key], rel=1e-6), key


def test_analysis_runs_on_the_device_asked_for(wide):
    """The device given is the one used: "cpu" is reported as such, and a CUDA device that does not
    exist is refused rather than replaced by a default."""
    assert A.analyze(wide["b3"], wide["weights"], images=3, compression=False, device="cpu")["device"] == "cpu"
    with pytest.raises(ValueError, match="--device cuda:999"):
        A.analyze(wide["b3"], wide["weights"], images=3, compression=False, device="cuda:999")


# ---------------------------------------------------------------------- the numbers
def test_std_over_images_does_not_depend_on_the_batch(wide):
    """Every *_std_images is the std over the images of a per-image value (p_EB mass included: one
    number per image, at most 1), so a TEST batch of 3 and a batch of 1 give the same."""
    r3 = A.analyze(wide["b3"], wide["weights"], compression=False)
    r1 = A.analyze(wide["b1"], wide["weights"], compression=False)
    assert 0 <= r3["peb_mass_std_images"] <= 0.5 + 1e-6
    keys = [k for k in r1 if k.endswith("_std_images")]
    assert "peb_mass_std_images" in keys
    for key in keys:
        assert r3[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-3), key


def test_compression_curves_carry_their_axis_labels(full):
    """Fig. 7's x axes: p_c for the most- and least-relevant-first curves, k units for the random one."""
    comp = full["compression"]
    assert {m: comp[m]["x_label"] for m in ("most", "least", "random")} == \
        {"most": "p_c", "least": "p_c", "random": "k units"}
    assert comp["most"]["x"] == list(A.P_C) and comp["random"]["x"] == [0, 128, UNITS]


def test_random_compression_curve_is_drawn_from_the_seed_alone(wide, full):
    """The random units switched off come from ``seed``: the same seed gives the same curve whatever
    the global torch RNG holds, and another seed another curve."""
    torch.manual_seed(1)
    a = A.analyze(wide["b3"], wide["weights"], seed=0)["compression"]["random"]
    torch.manual_seed(2)
    b = A.analyze(wide["b3"], wide["weights"], seed=0)["compression"]["random"]
    assert a["gt_prob"] == b["gt_prob"] == full["compression"]["random"]["gt_prob"]
    other = A.analyze(wide["b3"], wide["weights"], seed=5)["compression"]["random"]
    assert other["gt_prob"][1] != a["gt_prob"][1]           # k = 128 of 130 units: which 2 stay matters


# ---------------------------------------------------------------------- run folders and videos
def test_run_info_finds_a_run_inside_a_moved_sweep(tmp_path):
    """A sweep committed on one machine and read on another: plan.json's absolute folder is stale, the
    run is found by its place inside the sweep folder, and its plan entry and budget are returned."""
    sweep = tmp_path / "sweep"
    run = sweep / "cifar10" / "ed" / "seed1"
    run.mkdir(parents=True)
    budget = {"name": "cpu", "reduced": True}
    entry = {"dataset": "cifar10", "method": "ed", "rate": 0.5, "seed": 1,
             "folder": "/elsewhere/old-machine/sweep/cifar10/ed/seed1", "in_sweep": "cifar10/ed/seed1"}
    (sweep / "plan.json").write_text(json.dumps({"budget": budget, "runs": [entry]}))
    assert A.run_info(run) == {"dataset": "cifar10", "method": "ed", "rate": 0.5, "seed": 1, "budget": budget}


def test_video_list_not_matching_the_frames_gives_a_note(tmp_path):
    """test_videos.json listing 5 frames while 4 were evaluated: no video accuracy, and a note that
    gives both counts (not an exception)."""
    from exdrop.analysis.evaluate import video_accuracy
    path = tmp_path / "test_videos.json"
    path.write_text(json.dumps({"videos": [{"frames": 2, "label": 0}, {"frames": 3, "label": 1}]}))
    probs = np.full((4, 3), 1 / 3)
    res = video_accuracy(tmp_path / "test_lmdb", probs, np.zeros(4, int), each_image_once=True)
    assert res == {"video_accuracy": None, "video_note": f"{path}: 5 frames listed, 4 evaluated"}


def test_run_info_of_a_run_its_nearest_plan_does_not_list_is_empty(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({"runs": [{"key": "k", "dataset": "cifar10", "method": "ed",
                                                              "rate": 0.5, "seed": 1, "folder": "elsewhere"}]}))
    (tmp_path / "mine").mkdir()
    assert A.run_info(tmp_path / "mine") == {}
    (tmp_path / "plan.json").write_text("{ not json")
    assert A.run_info(tmp_path / "mine") == {}
