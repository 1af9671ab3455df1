"""Table 3 through the sweep runner: AlexNet / VGG16 / VGG19 fine-tuned on UCF101 (exdrop.experiments.sweep,
`exdrop sweep --table 3`, `make table3`, `make finetune-ucf101`).

The UCF101 fixture videos (tests/ucf101_videos.py) are converted with prepare_ucf101 at the
prototxts' frame size; a tiny generated weights file (conv1 only) stands for the ImageNet
weights. One AlexNet run trains for real (2 iterations at batch 2) and is tested on every
test frame; the tables are checked on run folders with known numbers.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from exdrop.proto import io as cio
from exdrop.experiments import sweep as S
from exdrop.data.ucf101 import prepare_ucf101
from exdrop.proto import caffe_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ucf101_videos import ucf  # noqa: E402,F401  (the fixture)
from make_dry import unquoted  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = S.Budget("tiny-ucf", "test budget: 2 iterations at batch 2, tests of 3 frames", max_iter=2, test_interval=0,
                snapshot=0, display=1, batch_size=2, test_batch_size=3, test_iter=1)
FIRST_CONV = {"alexnet": ("conv1", (96, 3, 11, 11)), "vgg16": ("conv1_1", (64, 3, 3, 3)),
              "vgg19": ("conv1_1", (64, 3, 3, 3))}


@pytest.fixture(scope="module")
def converted(ucf) -> Path:
    videos, lists, root = ucf
    out = root / "ucf101_256"   # short side 256: the prototxts crop 227 / 224
    prepare_ucf101(videos, lists, out, split=1, every=5, short_side=256, progress=False)
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict:
    """{net: a .caffemodel holding only the net's first convolution, drawn from a seed}."""
    folder = tmp_path_factory.mktemp("weights")
    out = {}
    for i, (net, (name, shape)) in enumerate(FIRST_CONV.items()):
        rng = np.random.default_rng(i)
        param = caffe_pb2.NetParameter(name=f"tiny_{net}")
        lp = param.layer.add(name=name, type="Convolution")
        lp.blobs.append(cio.array_to_blob(rng.normal(0, 0.01, shape).astype(np.float32)))
        lp.blobs.append(cio.array_to_blob(np.full(shape[0], 0.5, np.float32)))
        out[net] = folder / f"tiny_{net}.caffemodel"   # not a Model Zoo name: no sha1 check
        cio.write_caffemodel(param, out[net])
    return out


def _layer(net, typ, phase):
    return next(lp for lp in net.layer if lp.type == typ and any(r.phase == phase for r in lp.include))


def test_plan_lists_per_seed_weights_and_final_test(converted, weights, tmp_path):
    runs = S.plan(tmp_path, ["ucf101"], ["standard_fc1", "ed"], [0.5], [1, 2], TINY, {"ucf101": str(converted)},
                  nets=["alexnet", "vgg16"], weights=weights, progress=False)
    assert len(runs) == 8 and {r.net for r in runs} == {"alexnet", "vgg16"}
    by = {(r.net, r.method, r.seed): r for r in runs}
    r = by[("alexnet", "ed", 2)]
    assert r.folder == tmp_path / "ucf101/alexnet/ed/seed2" and r.key == "ucf101/alexnet/ed_r0.5/seed2"
    net = cio.read_net_prototxt(r.folder / "net.prototxt")
    train = _layer(net, "ImageData", 0)   # the TRAIN Data layer became an ImageData layer on the seed's list
    ip = train.image_data_param
    assert ip.source == str(tmp_path / "data/ucf101/train_seed2.txt") and ip.root_folder == f"{converted}/"
    assert (ip.batch_size, ip.shuffle) == (2, False)
    original = cio.read_net_prototxt(ROOT / "prototxt/alexnet/ucf101/train_val_ed.prototxt")
    assert train.transform_param == _layer(original, "Data", 0).transform_param   # crop 227, mirror, mean
    test = _layer(net, "Data", 1)
    assert Path(test.data_param.source) == (converted / "val_lmdb").resolve() and test.data_param.batch_size == 3
    assert [lp.type for lp in net.layer].count("Data") == 1
    # the sweep's standard_fc1 is the UCF101 nets' standard_fc6: Caffe's Dropout after fc6
    std = cio.read_net_prototxt(by[("vgg16", "standard_fc1", 1)].folder / "net.prototxt")
    assert [lp.name for lp in std.layer if lp.type == "Dropout"] == ["drop6"]
    # seeds: the same frames, each seed its own order
    lists = [(tmp_path / f"data/ucf101/train_seed{s}.txt").read_text().splitlines() for s in (1, 2)]
    every = (converted / "train.txt").read_text().splitlines()
    assert lists[0] != lists[1] and lists[0] != every and Counter(lists[0]) == Counter(lists[1]) == Counter(every)
    # the recipe is the prototxts' (Adam, lr 1e-3 fixed, weight decay 0.005), the budget's length
    sp = cio.read_solver_prototxt(r.solver)
    assert (sp.type, sp.base_lr, sp.lr_policy, sp.weight_decay) == ("Adam", pytest.approx(1e-3), "fixed",
                                                                   pytest.approx(0.005))
    assert (sp.random_seed, sp.max_iter, list(sp.test_iter)) == (2, 2, [1])
    # the weights go into the training command; the final test reads every test frame of the folder
    cmd = r.command
    assert cmd[cmd.index("--weights") + 1] == str(weights["alexnet"].resolve()) and "--snapshot" in cmd
    assert by[("vgg16", "ed", 1)].command[by[("vgg16", "ed", 1)].command.index("--weights") + 1] == \
        str(weights["vgg16"].resolve())
    ev = r.evaluate
    assert ev[3] == "test" and ev[ev.index("--data") + 1] == str(converted.resolve())
    assert ev[ev.index("--weights") + 1] == str(r.folder / "snapshots/alexnet_ed_iter_2.caffemodel")
    lines = (tmp_path / "plan.txt").read_text().splitlines()
    assert len(lines) == 8 and all(" exdrop train " in ln and " && " in ln and " exdrop test " in ln for ln in lines)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert {(x["net"], x["weights"] is not None) for x in plan["runs"]} == {("alexnet", True), ("vgg16", True)}


def test_paper_budget_keeps_the_recipes(converted, weights, tmp_path):
    """The paper's budget is the prototxts' recipe: AlexNet 5K iterations at batch 128, VGG16/19 30K at
    batch 50; Adam 1e-3 fixed, weight decay 0.005; every variant of Table 3."""
    runs = S.plan(tmp_path, ["ucf101"], list(S.TABLE_METHODS["3"]), [0.5], [1], S.BUDGETS["paper"],
                  {"ucf101": str(converted)}, weights=weights, progress=False)
    assert len(runs) == 15
    for r in runs:
        sp = cio.read_solver_prototxt(r.solver)
        net = cio.read_net_prototxt(r.folder / "net.prototxt")
        batch = _layer(net, "ImageData", 0).image_data_param.batch_size
        assert (sp.max_iter, batch) == ((5000, 128) if r.net == "alexnet" else (30000, 50)), r.key
        assert (sp.type, sp.base_lr, sp.lr_policy, sp.weight_decay) == ("Adam", pytest.approx(1e-3), "fixed",
                                                                       pytest.approx(0.005))
    budget = json.loads((tmp_path / "plan.json").read_text())["budget"]
    assert not budget["reduced"] and "AlexNet fine-tuned from ImageNet: 5K iterations, batch 128" in \
        budget["description"] and "VGG19 fine-tuned from ImageNet: 30K iterations, batch 50" in budget["description"]
    assert "CNN-2" not in budget["description"]


def test_missing_weights_and_data_fail_at_plan_time(converted, tmp_path, monkeypatch, capsys):
    from exdrop import cli
    monkeypatch.setattr(S, "WEIGHTS_DIR", str(tmp_path / "none_here"))
    with pytest.raises(FileNotFoundError, match=r"bvlc_alexnet.caffemodel \(http://dl.caffe.berkeleyvision.org"):
        S.plan(tmp_path / "sw", ["ucf101"], ["ed"], [0.5], [1], TINY, {"ucf101": str(converted)}, nets=["alexnet"])
    assert not (tmp_path / "sw").exists()   # nothing written
    with pytest.raises(ValueError) as info:   # no net of the dataset's among those asked for
        S.plan(tmp_path / "sw", ["cifar10"], ["ed"], [0.5], [1], TINY, {}, nets=["alexnet", "vgg16"])
    assert str(info.value) == "--nets alexnet,vgg16: cifar10 runs cnn2" and not (tmp_path / "sw").exists()
    # a sweep on real Caffe that its runs could not train: refused before anything is written
    with pytest.raises(ValueError, match=r"^--backend caffe --device cuda: the Caffe backend runs on CPU only"):
        S.plan(tmp_path / "sw", ["cifar10"], ["ed"], [0.5], [1], TINY, {}, device="cuda", backend="caffe")
    with pytest.raises(ValueError, match=r"^--backend caffe: budget cpu-200ep trains with --amp bf16, which the Caffe "
                                         r"backend does not support; give --amp '' \(float32\)"):
        S.plan(tmp_path / "sw", ["cifar10"], ["ed"], [0.5], [1], S.BUDGETS["cpu-200ep"], {}, backend="caffe")
    assert not (tmp_path / "sw").exists()
    assert cli.main(["sweep", "--table", "3", "--nets", "vgg19", "--data", f"ucf101={converted}", "--plan-only",
                     "--weights", f"vgg19={tmp_path / 'missing.caffemodel'}", "--out", str(tmp_path / "sw")]) == 1
    err = capsys.readouterr().err
    assert "missing.caffemodel are not there" in err and "VGG_ILSVRC_19_layers.caffemodel" in err
    with pytest.raises(FileNotFoundError, match="not a converted UCF101 folder.*make data-ucf101"):
        S.prepare_data("ucf101", str(tmp_path), TINY, tmp_path / "d", [1])
    with pytest.raises(ValueError, match="--max-iter"):
        S.prepare_data("ucf101", str(converted), S.BUDGETS["cpu"], tmp_path / "d", [1])
    assert cli.main(["sweep", "--table", "3", "--datasets", "cifar10", "--plan-only"]) == 1
    assert "Table 3 is the nets fine-tuned on ucf101" in capsys.readouterr().err
    assert cli.main(["sweep", "--table", "3", "--weights", "cnn2=x", "--plan-only"]) == 1
    assert "NET=FILE with NET one of alexnet, vgg16, vgg19" in capsys.readouterr().err


def test_one_run_end_to_end_into_table3(converted, weights, tmp_path):
    """AlexNet + Excitation Dropout, seed 1: trained from the weights file (2 iterations, batch 2), its
    final snapshot tested on every test frame, the number in Table 3's cell beside the paper's."""
    runs = S.plan(tmp_path, ["ucf101"], ["standard_fc1", "ed"], [0.5], [1, 2], TINY, {"ucf101": str(converted)},
                  device="cpu", nets=["alexnet"], weights=weights, progress=False)
    run = next(r for r in runs if r.method == "ed" and r.seed == 1)
    said = []
    assert S.execute([run], workers=1, threads=1, gpus=0, echo=said.append) == {"runs": 1, "ran": 1, "failed": []}
    log = (run.folder / "stdout.log").read_text()
    res = json.loads((run.folder / "results.json").read_text())
    assert res["status"] == "finished" and res["iterations"] == 2, log
    # the ImageNet weights were loaded: conv1 at iteration 0 is the file's
    from exdrop.run.init_weights import iteration0_weights
    with iteration0_weights(run.folder) as path:
        init = {lp.name: lp for lp in cio.read_caffemodel(path).layer}
    tiny = cio.read_caffemodel(weights["alexnet"]).layer[0]
    assert np.array_equal(cio.blob_to_array(init["conv1"].blobs[0]), cio.blob_to_array(tiny.blobs[0]))
    test = S.final_test(run.folder)
    assert test is not None and test["images"] == 9 and test["each_image_once"] and test["videos"] == 3, log
    assert any(line.startswith("sweep: test  ucf101/alexnet/ed_r0.5/seed1") for line in said)
    # again: nothing to do; without its test.json (or with one of another snapshot) only the test runs
    assert S.execute([run], workers=1, threads=1, gpus=0, echo=lambda *a: None)["ran"] == 0
    saved = (run.folder / S.FINAL_TEST / "test.json").read_text()
    (run.folder / S.FINAL_TEST / "test.json").write_text(json.dumps({**test, "weights": "x_iter_1.caffemodel"}))
    assert S._steps(run) == [run.evaluate]
    (run.folder / S.FINAL_TEST / "test.json").write_text(saved)
    written = S.write_outputs(tmp_path, "3")
    assert [p.name for p in written] == ["table3.md", "table3.json"]
    md = (tmp_path / "table3.md").read_text()
    assert "**Reduced budget** (`tiny-ucf`)" in md and md.startswith("# Table 3: AlexNet fine-tuned from ImageNet")
    frame, video = [line for line in md.splitlines() if line.startswith("| AlexNet |")]
    cells = frame.split(" | ")
    assert cells[1] == "not yet"   # standard_fc1: planned, not run
    assert cells[2] == f"{100 * test['accuracy']:.2f} (n=1) [67.56] |"
    assert video.split(" | ")[2] == f"{100 * test['video_accuracy']:.2f} (n=1) |"
    summary = json.loads((tmp_path / "table3.json").read_text())
    ed = next(c for c in summary["cells"] if c["method"] == "ed")
    assert ed["net"] == "alexnet" and ed["paper"] == 67.56 and ed["runs"][0]["last_accuracy"] is not None
    assert (ed["runs"][0]["test_images"], ed["runs"][0]["videos"]) == (9, 3)   # what the final test read


def _fake(folder: Path, acc: float, video: float, max_iter: int = 4):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.csv").write_text(f"iter,phase,lr,elapsed_s,accuracy,loss\n{max_iter},test,0.001,1,0.1,2\n")
    (folder / "results.json").write_text(json.dumps({"status": "finished", "iterations": max_iter,
                                                     "max_iter": max_iter}))
    (folder / S.FINAL_TEST).mkdir()
    (folder / S.FINAL_TEST / "test.json").write_text(json.dumps({
        "accuracy": acc, "video_accuracy": video, "images": 9, "videos": 3,
        "weights": str(folder / f"snapshots/x_iter_{max_iter}.caffemodel")}))


def test_table3_layout_paper_figures_and_video_accuracy(tmp_path):
    runs = []
    for net, method, seeds in (("alexnet", "ed", {1: (0.60, 0.7), 2: (0.64, 0.8)}), ("vgg16", "none", {1: (0.5, 0.5)}),
                               ("vgg19", "curriculum", {1: (0.4, 0.4), 2: (0.42, 0.45)})):
        for seed, (acc, video) in seeds.items():
            folder = tmp_path / "ucf101" / net / method / f"seed{seed}"
            _fake(folder, acc, video)
            runs.append({"key": "k", "dataset": "ucf101", "net": net, "method": method, "rate": 0.5, "seed": seed,
                         "folder": str(folder), "command": [], "evaluate": ["exdrop", "test"]})
    folder = tmp_path / "ucf101/vgg16/ed/seed1"   # trained, its final test of an older, shorter run
    _fake(folder, 0.9, 0.9, max_iter=2)
    (folder / "results.json").write_text(json.dumps({"status": "finished", "iterations": 4, "max_iter": 4}))
    runs.append({"key": "k", "dataset": "ucf101", "net": "vgg16", "method": "ed", "rate": 0.5, "seed": 1,
                 "folder": str(folder), "command": [], "evaluate": ["exdrop", "test"]})
    budget = dataclasses.replace(S.BUDGETS["paper"], description=S.describe(S.BUDGETS["paper"], ["alexnet"]))
    (tmp_path / "plan.json").write_text(json.dumps({"budget": dataclasses.asdict(budget), "runs": runs}))
    S.write_outputs(tmp_path, "3")
    md = (tmp_path / "table3.md").read_text()
    assert "**The paper's protocol** (`paper`)" in md and "AlexNet fine-tuned from ImageNet: 5K iterations" in md
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows[0] == "| UCF101 (fine-tuned) | No Dropout | Curriculum | Excitation |"
    # the paper's row order (VGG16, VGG19, AlexNet), frame accuracy (the log's 10% is not used)
    assert rows[1] == "| VGG16 | 50.00 (n=1) [69.37] | not yet | not yet |"
    assert rows[2] == "| VGG19 | not yet | 41.00 +- 1.41 [73.18] | not yet |"
    assert rows[3] == "| AlexNet | not yet | not yet | 62.00 +- 2.83 [67.56] |"
    assert rows[5:] == ["| VGG16 | 50.00 (n=1) | not yet | not yet |",
                        "| VGG19 | not yet | 42.50 +- 3.54 | not yet |",
                        "| AlexNet | not yet | not yet | 75.00 +- 7.07 |"]
    assert S.paper_figure("ucf101", "vgg19", "ed", 0.5) == 74.34 and S.paper_figure("ucf101", "vgg16", "ed", 0.25) \
        == 73.56 and S.paper_figure("ucf101", "alexnet", "information", 0.5) == 64.21
    assert S.paper_figure("cifar10", "cnn2", "ed", 0.5) == 81.94


make = __import__("shutil").which("make")


@pytest.mark.skipif(make is None, reason="no make")
def test_make_table3_and_finetune_ucf101():
    def run(*args):
        return unquoted(subprocess.run([make, "--no-print-directory", "-n", *args], cwd=ROOT, capture_output=True,
                                       text=True, check=True).stdout.replace("\\\n", " "))   # continued lines
    out = run("table3", "SEEDS=5")
    cmd = shlex.split(next(line for line in out.splitlines() if " exdrop sweep " in line))
    assert cmd[1:6] == ["-m", "exdrop", "sweep", "--table", "3"]
    args = dict(zip(cmd[6::2], cmd[7::2]))
    assert (args["--datasets"], args["--nets"], args["--seeds"], args["--budget"]) == (
        "ucf101", "alexnet,vgg16,vgg19", "5", "paper")
    assert args["--data"] == "ucf101=data/ucf101" and args["--out"] == "results/table3_ucf101_paper"
    assert args["--weights"] == ("alexnet=data/weights/bvlc_alexnet.caffemodel,vgg16=data/weights/"
                                 "VGG_ILSVRC_16_layers.caffemodel,vgg19=data/weights/VGG_ILSVRC_19_layers.caffemodel")
    assert "cp results/table3_ucf101_paper/table3.md results/table3_ucf101_paper/table3.json results/" in out
    cmd = shlex.split(next(line for line in run("table3", "NETS=vgg16", "MAX_ITER=500", "UCF101_DIR=/u").splitlines()
                           if " exdrop sweep " in line))
    args = dict(zip(cmd[6::2], cmd[7::2]))
    assert (args["--nets"], args["--max-iter"], args["--data"], args["--out"]) == (
        "vgg16", "500", "ucf101=/u", "results/table3_ucf101_paper-500it")
    out = run("finetune-ucf101", "NET=vgg16", "VARIANT=ed", "WEIGHTS=path/to/VGG_ILSVRC_16_layers.caffemodel")
    cmd = shlex.split(next(line for line in out.splitlines() if " exdrop train " in line))
    assert cmd[1:5] == ["-m", "exdrop", "train", "prototxt/vgg16/ucf101/solver_ed.prototxt"]
    args = dict(zip(cmd[5::2], cmd[6::2]))
    assert args["--weights"] == "path/to/VGG_ILSVRC_16_layers.caffemodel"
    assert args["--out"] == "models/vgg16_ucf101_ed"
    cmd = shlex.split(next(line for line in run("finetune-ucf101", "VARIANT=standard_fc1").splitlines()
                           if " exdrop train " in line))
    assert cmd[4] == "prototxt/alexnet/ucf101/solver_standard_fc6.prototxt"
    assert dict(zip(cmd[5::2], cmd[6::2]))["--weights"] == "data/weights/bvlc_alexnet.caffemodel"
    assert "for net in cnn2 vgg16;" in run("bench-table6", "DEVICE=cpu")   # NETS keeps its bench default
    help_text = subprocess.run([make, "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout
    assert "make table3" in help_text and "make finetune-ucf101" in help_text and "WEIGHTS=" in help_text
