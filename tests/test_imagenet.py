"""ILSVRC-2012 (Sec. 5): a small fixture written with OpenCV in the real layout (train/<wnid>/
<wnid>_<n>.JPEG, a flat val folder, the devkit's ground truth and meta.mat, Caffe's val.txt and
synsets.txt, Kaggle's LOC_val_solution.csv, a val folder sorted into wnid folders) -> list files
and LMDBs, checked record by record against cv2 and the fixture's own truth; the errors that name
a missing file; one training iteration of the ImageNet AlexNet with Activation and with Standard
Dropout at fc6 (batch 2, CPU) on the converted fixture."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exdrop.cli import main as exdrop_main
from exdrop.data import DatumLMDB, prepare_imagenet
from exdrop.data.imagenet import IMAGENET_URL, list_train, read_val_labels

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import one_iteration  # noqa: E402
from make_dry import unquoted  # noqa: E402
# devkit IDs in the devkit's own order, which is not the sorted one (ID 1 is the kit fox, as in meta.mat)
IDS = {1: "n02119789", 2: "n01443537", 3: "n01484850"}
WNIDS = sorted(IDS.values())                       # the class order: n01443537, n01484850, n02119789
COLOUR = {"n01443537": (200, 40, 40), "n01484850": (40, 200, 40), "n02119789": (40, 40, 200)}   # BGR
SIZES = [(300, 260), (280, 320), (257, 400), (333, 290)]   # (h, w), every side above the 227 crop
VAL_IDS = [1, 3, 2, 2, 1, 3, 2]                   # ground truth of ILSVRC2012_val_00000001 ... 07


def _image(colour, hw, seed):
    rng = np.random.default_rng(seed)
    img = np.empty((*hw, 3), np.uint8)
    img[:] = colour
    noise = rng.integers(-25, 26, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def _write(path: Path, img, fmt=".jpg"):
    import cv2
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(fmt, img)
    assert ok
    path.write_bytes(buf.tobytes())


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory):
    import cv2
    root = tmp_path_factory.mktemp("ilsvrc")
    train, val = root / "ILSVRC2012/train", root / "ILSVRC2012/val"
    truth = {}   # relative path under train/ or file name in val/ -> wnid
    for k, wnid in enumerate(WNIDS):
        for j, hw in enumerate(SIZES[: 3 + (k == 1)]):
            name = f"{wnid}/{wnid}_{1000 + 7 * j}.JPEG"
            img = _image(COLOUR[wnid], hw, 10 * k + j)
            if (k, j) == (2, 1):   # ILSVRC has PNG files named .JPEG, and grey ones: OpenCV reads both
                _write(train / name, img, ".png")
            elif (k, j) == (0, 2):
                _write(train / name, cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
            else:
                _write(train / name, img)
            truth[name] = wnid
    for n, gt in enumerate(VAL_IDS, 1):
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        _write(val / name, _image(COLOUR[IDS[gt]], SIZES[n % 4][::-1], 100 + n))
        truth[name] = IDS[gt]
        (root / "val_sorted" / IDS[gt]).mkdir(parents=True, exist_ok=True)
        shutil.copy(val / name, root / "val_sorted" / IDS[gt] / name)
    devkit = root / "ILSVRC2012_devkit_t12/data"
    devkit.mkdir(parents=True)
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{g}\n" for g in VAL_IDS))
    from scipy.io import savemat
    dt = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(i, w, f"class {i}", 0) for i, w in IDS.items()] + [(1001, "n00001740", "entity", 3)]
    savemat(devkit / "meta.mat", {"synsets": np.array(rows, dtype=dt).reshape(-1, 1)})
    caffe = root / "caffe_ilsvrc12"
    caffe.mkdir()
    # Caffe's synsets.txt lists every class; n01440764 (tench), which the fixture has no images of,
    # comes first, so each of val.txt's numbers is one more than the train label
    synsets = sorted([*WNIDS, "n01440764"])
    (caffe / "synsets.txt").write_text("".join(f"{w}\n" for w in synsets))
    (caffe / "val.txt").write_text("".join(f"ILSVRC2012_val_{n:08d}.JPEG {synsets.index(IDS[g])}\n"
                                           for n, g in enumerate(VAL_IDS, 1)))
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{n:08d},{IDS[g]} 10 20 100 200 {IDS[g]} 5 5 50 50\n" for n, g in enumerate(VAL_IDS, 1)))
    return {"root": root, "train": train, "val": val, "truth": truth,
            "gt": devkit / "ILSVRC2012_validation_ground_truth.txt", "caffe_val": caffe / "val.txt",
            "csv": root / "LOC_val_solution.csv", "val_sorted": root / "val_sorted"}


@pytest.fixture(scope="module")
def converted(ilsvrc, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "ilsvrc12"
    info = prepare_imagenet(ilsvrc["train"], ilsvrc["val"], out, val_labels=ilsvrc["gt"], progress=False)
    return out, info


def _label(wnid):
    return WNIDS.index(wnid)


def test_list_files_follow_caffe(ilsvrc, converted):
    out, info = converted
    truth = ilsvrc["truth"]
    train_lines = (out / "train.txt").read_text().splitlines()
    want = sorted(p for p in truth if "/" in p)
    assert train_lines == [f"{p} {_label(truth[p])}" for p in want]
    assert train_lines[0] == "n01443537/n01443537_1000.JPEG 0" and train_lines[-1].endswith(" 2")
    val_lines = (out / "val.txt").read_text().splitlines()
    # by hand: IDs 1, 3, 2, 2, 1, 3, 2 -> kit fox n02119789 (2), n01484850 (1), n01443537 (0), ...
    assert [int(line.split()[1]) for line in val_lines] == [2, 1, 0, 0, 2, 1, 0]
    assert val_lines[0] == "ILSVRC2012_val_00000001.JPEG 2"
    assert (out / "synsets.txt").read_text().split() == WNIDS
    assert info["classes"] == WNIDS and info["counts"]["train"] == 10 and info["counts"]["test"] == 7


def test_lmdb_records_match_cv2_and_the_truth(ilsvrc, converted):
    import cv2
    out, info = converted
    assert (out / "val_lmdb").resolve() == (out / "test_lmdb").resolve()
    seen = {}
    for split, root in (("train_lmdb", ilsvrc["train"]), ("test_lmdb", ilsvrc["val"])):
        with DatumLMDB(out / split) as db:
            records = list(db.records())
        assert len(records) == (10 if split == "train_lmdb" else 7)
        for key, chw, label in records:
            name = key.split("_", 1)[1]
            hand = cv2.resize(cv2.imread(str(root / name), cv2.IMREAD_COLOR), (256, 256)).transpose(2, 0, 1)
            assert chw.shape == (3, 256, 256) and np.array_equal(chw, hand), name
            assert label == _label(ilsvrc["truth"][name]), name
            if name != "n01443537/n01443537_1014.JPEG":   # colour pictures (not the grey one): the class shows
                mean = chw.reshape(3, -1).mean(1)
                assert np.abs(mean - COLOUR[WNIDS[label]]).max() < 10, (name, mean)
            seen.setdefault(split, []).append(name)
    # train shuffled once; val in image order, as create_imagenet.sh
    assert sorted(seen["train_lmdb"]) == sorted(p for p in ilsvrc["truth"] if "/" in p)
    assert seen["train_lmdb"] != sorted(seen["train_lmdb"])
    assert seen["test_lmdb"] == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in range(1, 8)]
    again = prepare_imagenet(ilsvrc["train"], ilsvrc["val"], out, val_labels=ilsvrc["gt"], progress=False)
    assert again["counts"] == info["counts"] and again["lists"] == info["lists"]


def test_every_label_source_gives_the_same_val_list(ilsvrc, tmp_path):
    def val_list(val, labels, name):
        info = prepare_imagenet(ilsvrc["train"], val, tmp_path / name, val_labels=labels, lmdb=False, progress=False)
        assert info["counts"] == {"train": 10, "val": 7} and info["train"] is None
        return [(Path(p).name, int(lab)) for p, lab in
                (line.split() for line in Path(info["lists"]["val"]).read_text().splitlines())]
    want = [(f"ILSVRC2012_val_{n:08d}.JPEG", _label(IDS[g])) for n, g in enumerate(VAL_IDS, 1)]
    assert val_list(ilsvrc["val"], ilsvrc["gt"], "gt") == want
    assert val_list(ilsvrc["val"], ilsvrc["caffe_val"], "caffe") == want   # numbers read through synsets.txt
    assert val_list(ilsvrc["val"], ilsvrc["csv"], "csv") == want
    assert val_list(ilsvrc["val_sorted"], None, "sorted") == want
    assert val_list(ilsvrc["val_sorted"], ilsvrc["gt"], "sorted_checked") == want
    lines = (tmp_path / "sorted/val.txt").read_text().splitlines()
    assert lines[0] == "n02119789/ILSVRC2012_val_00000001.JPEG 2"


def test_short_side_keeps_the_aspect_and_stores_the_centre(ilsvrc, tmp_path):
    import cv2
    info = prepare_imagenet(ilsvrc["train"], ilsvrc["val_sorted"], tmp_path / "s", short_side=40, progress=False)
    assert info["shape"] == [3, 40, 40]
    with DatumLMDB(tmp_path / "s/test_lmdb") as db:
        key, chw, label = next(db.records())
    img = cv2.imread(str(ilsvrc["val"] / "ILSVRC2012_val_00000001.JPEG"))   # 320 high, 280 wide -> 46 x 40
    assert img.shape[:2] == (320, 280)
    small = cv2.resize(img, (40, 46), interpolation=cv2.INTER_AREA)
    assert np.array_equal(chw, small[3:43].transpose(2, 0, 1)) and label == 2


def test_limit_per_class_keeps_the_lists_and_lmdbs_together(ilsvrc, tmp_path):
    info = prepare_imagenet(ilsvrc["train"], ilsvrc["val"], tmp_path / "l", val_labels=ilsvrc["gt"],
                            limit_per_class=2, resize=(64, 64), progress=False)
    assert info["counts"]["train_per_class"] == [2, 2, 2] and info["counts"]["test_per_class"] == [2, 2, 2]
    listed = sorted(line.split()[0] for line in (tmp_path / "l/train.txt").read_text().splitlines())
    with DatumLMDB(tmp_path / "l/train_lmdb") as db:
        stored = sorted(key.split("_", 1)[1] for key, _, _ in db.records())
    assert listed == stored and len(listed) == 6


def test_missing_and_broken_inputs_are_named(ilsvrc, tmp_path):
    train, val, gt = ilsvrc["train"], ilsvrc["val"], ilsvrc["gt"]
    with pytest.raises(FileNotFoundError, match=f"no ILSVRC-2012 train folder; ILSVRC-2012 is at {IMAGENET_URL}"):
        prepare_imagenet(tmp_path / "nothing", val, tmp_path / "o", val_labels=gt)
    with pytest.raises(FileNotFoundError, match="no validation label file"):
        prepare_imagenet(train, val, tmp_path / "o", val_labels=tmp_path / "gt.txt")
    lone = tmp_path / "gt" / "ILSVRC2012_validation_ground_truth.txt"
    lone.parent.mkdir()
    shutil.copy(gt, lone)
    with pytest.raises(FileNotFoundError, match=r"gt/meta\.mat: missing; the devkit's meta\.mat"):
        prepare_imagenet(train, val, tmp_path / "o", val_labels=lone)
    with pytest.raises(ValueError, match="holds 7 images and no class folders: give their labels"):
        prepare_imagenet(train, val, tmp_path / "o")
    # a labelled val image that is not there; an image without a label
    part = tmp_path / "val_part"
    shutil.copytree(val, part)
    (part / "ILSVRC2012_val_00000006.JPEG").unlink()
    with pytest.raises(FileNotFoundError, match=r"val_part/ILSVRC2012_val_00000006\.JPEG: labelled in .* but not in"):
        prepare_imagenet(train, part, tmp_path / "o", val_labels=gt)
    shutil.copy(val / "ILSVRC2012_val_00000001.JPEG", part / "ILSVRC2012_val_00000099.JPEG")
    with pytest.raises(ValueError, match=r"ILSVRC2012_val_00000099\.JPEG: no label in"):
        prepare_imagenet(train, part, tmp_path / "o", val_labels=gt)
    # a sorted val folder that the labels contradict
    wrong = tmp_path / "val_wrong"
    shutil.copytree(ilsvrc["val_sorted"], wrong)
    os.replace(wrong / "n02119789/ILSVRC2012_val_00000001.JPEG", wrong / "n01443537/ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ValueError, match="in folder n01443537, but .* says n02119789"):
        prepare_imagenet(train, wrong, tmp_path / "o", val_labels=gt)
    # Caffe's val.txt numbers without its synsets.txt, and fewer than 1000 train classes
    bare = tmp_path / "val.txt"
    shutil.copy(ilsvrc["caffe_val"], bare)
    with pytest.raises(ValueError, match="no synsets.txt beside it and the train folder has 3 classes"):
        read_val_labels(bare, WNIDS)
    # the train folder as ILSVRC2012_img_train.tar unpacks: one tar per class
    tars = tmp_path / "train_tars"
    tars.mkdir()
    (tars / "n01443537.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="per-class archive.*unpack each into a folder of its name"):
        list_train(tars)
    # an image OpenCV cannot read stops the conversion, naming it
    broken = tmp_path / "train_broken"
    shutil.copytree(train, broken)
    (broken / "n01443537/n01443537_1007.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image .*n01443537/n01443537_1007\.JPEG"):
        prepare_imagenet(broken, val, tmp_path / "b", val_labels=gt, resize=(32, 32), progress=False)


def test_cli_and_make_targets(ilsvrc, tmp_path, capsys):
    out = tmp_path / "cli"
    assert exdrop_main(["data", "--dataset", "imagenet", str(ilsvrc["train"]), "--val", str(ilsvrc["val"]),
                        "--val-labels", str(ilsvrc["caffe_val"]), "--lists-only", "--out", str(out)]) == 0
    assert (out / "val.txt").read_text().splitlines()[0] == "ILSVRC2012_val_00000001.JPEG 2"
    assert not (out / "train_lmdb").exists()
    capsys.readouterr()
    assert exdrop_main(["data", "imagenet", str(ilsvrc["train"]), "--out", str(out)]) == 1
    assert "give --val" in capsys.readouterr().err
    assert exdrop_main(["data", "cifar10", "x.tgz", "--val-labels", "v.txt"]) == 1
    assert "--val-labels: for imagenet" in capsys.readouterr().err
    make = shutil.which("make")
    if make is None:
        return

    def n(*args):
        out = subprocess.run([make, "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        return " ".join(unquoted(out.replace("\\\n", " ")).split())
    cmd = n("data-imagenet", "IMAGENET_TRAIN=/d/train", "IMAGENET_VAL=/d/val", "IMAGENET_LABELS=/d/gt.txt")
    assert cmd.endswith("-m exdrop data --dataset imagenet /d/train --val /d/val --val-labels /d/gt.txt "
                        "--out data/ilsvrc12")
    assert "--val-labels" not in n("data-imagenet")
    assert "train prototxt/alexnet/imagenet/solver_activation.prototxt --out models/alexnet_imagenet_activation" \
        in n("train-imagenet")
    std = n("train-imagenet", "VARIANT=standard", "WEIGHTS=w.caffemodel", "MAX_ITER=3")
    assert "solver_standard.prototxt --out models/alexnet_imagenet_standard" in std
    assert "--max-iter 3" in std and "--weights w.caffemodel" in std and "--backend" not in std
    assert n("train-imagenet", "BACKEND=caffe").endswith("--backend caffe")


@pytest.mark.parametrize("variant", ["activation", "standard"])
def test_one_training_iteration_of_the_sec5_alexnet(converted, tmp_path, variant):
    """The shipped ImageNet prototxt and solver (Adam 1e-5) on the converted fixture: its data
    layers read the LMDBs (256x256, crop 227), one iteration at batch 2, one test batch."""
    out, _ = converted
    # snapshot_after_train off: a 240 MB caffemodel and twice that of Adam state, seconds of disk
    _, sp, _ = one_iteration("prototxt/alexnet/imagenet", variant, "data/ilsvrc12/", out, tmp_path, snapshot=False)
    assert sp.base_lr == pytest.approx(1e-5) and sp.type == "Adam"
    import csv
    with open(tmp_path / "run/log.csv", newline="") as f:
        tests = [r for r in csv.DictReader(f) if r["phase"] == "test"]
    assert tests and {"accuracy", "accuracy_top5", "loss"} <= set(tests[-1])
    assert 0 <= float(tests[-1]["accuracy"]) <= float(tests[-1]["accuracy_top5"]) <= 1
