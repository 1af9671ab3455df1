"""Bad values on the command line and in converted data: refused at once, saying what was expected,
naming the option, the file and the record (issue: nothing silent, no raw traceback)."""
import json
import pickle

import cv2
import numpy as np
import pytest

from caffe_nets import train_tiny, write_tiny
from exdrop.cli import main as exdrop_main
from test_reliability import _cifar_archive


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("cli"), 2)


@pytest.mark.parametrize("argv, fragment", [
    (["saliency", "RUN", "--k", "-5"], "argument --k: '-5': each value must be an integer >= 0"),
    (["saliency", "RUN", "--images", "-1"], "argument --images: '-1': each value must be an integer >= 0"),
    (["saliency", "RUN", "--images", "a,b"], "expected integers separated by commas"),
    (["data", "ucf101", "V", "--splits", "S", "--every", "0"], "argument --every: 0: must be at least 1"),
    (["plot", "--fig2", "f.png", "--n", "0"], "argument --n: 0: must be at least 1"),
])
def test_bad_numbers_on_the_command_line(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        exdrop_main(argv)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_ucf101_resize_zero_is_refused(tmp_path, capsys):
    assert exdrop_main(["data", "ucf101", str(tmp_path), "--splits", str(tmp_path), "--resize", "0"]) == 1
    assert "--resize 0: for ucf101 the short side of the frames, a positive integer" in capsys.readouterr().err


def test_saliency_images_beyond_the_data_k_beyond_the_units_and_unknown_blob(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "s.png")
    assert exdrop_main(["saliency", str(tiny_run), "--images", "99999", "--k", "0,1", "--out", out]) == 1
    err = capsys.readouterr().err
    assert "--images 99999: the test data of layer 'data' holds 6 images (indices 0 to 5)" in err
    assert exdrop_main(["saliency", str(tiny_run), "--images", "0", "--k", "0,17", "--out", out]) == 1
    assert "--k 17: blob 'ip1' has 16 units to switch off" in capsys.readouterr().err
    assert exdrop_main(["saliency", str(tiny_run), "--images", "0", "--k", "0,1", "--blob", "nosuch",
                        "--out", out]) == 1
    assert "--blob 'nosuch': no such blob in the test net" in capsys.readouterr().err


def _batch(labels, rows):
    return pickle.dumps({b"labels": labels, b"data": rows}, protocol=2)


def test_cifar_labels_outside_the_classes_are_refused_at_conversion(tmp_path, capsys):
    rows = np.zeros((10, 3072), np.uint8)
    archive = _cifar_archive(tmp_path / "c.tar.gz", _batch([0, 1, 2, 3, 42, 5, 6, 7, 8, 9], rows))
    assert exdrop_main(["data", "cifar10", str(archive), "--out", str(tmp_path / "db")]) == 1
    err = capsys.readouterr().err
    assert "train record 'train_4' has label 42, outside 0..9 (10 classes)" in err and str(archive) in err
    assert not (tmp_path / "db" / "meta.json").exists()


@pytest.mark.parametrize("labels, rows, fragment", [
    (list(range(9)), np.zeros((10, 3072), np.uint8), "member data_batch_1: 9 labels for 10 images"),
    (list(range(10)), np.zeros((10, 3000), np.uint8), "member data_batch_1: data of shape (10, 3000); a CIFAR-10 "
                                                      "batch holds rows of 3072 bytes"),
])
def test_a_malformed_cifar_batch_is_named(tmp_path, capsys, labels, rows, fragment):
    archive = _cifar_archive(tmp_path / "c.tar.gz", _batch(labels, rows))
    assert exdrop_main(["data", "cifar10", str(archive), "--out", str(tmp_path / "db")]) == 1
    assert fragment in capsys.readouterr().err


def _list_file(tmp_path, labels):
    lines = []
    for i, lab in enumerate(labels):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((8, 8, 3), i * 20, np.uint8))
        lines.append(f"{i}.png {lab}")
    path = tmp_path / "list.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_list_file_label_outside_cifar10_is_refused_at_conversion(tmp_path, capsys):
    listing = _list_file(tmp_path, [*range(9), 99])
    assert exdrop_main(["data", "cifar10", str(listing), "--out", str(tmp_path / "db")]) == 1
    assert "CIFAR-10 source has 100 classes" in capsys.readouterr().err


def test_a_negative_list_label_names_the_line(tmp_path, capsys):
    listing = _list_file(tmp_path, [0, 1, -3])
    assert exdrop_main(["data", "images", str(listing), "--out", str(tmp_path / "db")]) == 1
    assert f"{listing}:3: label -3 is negative" in capsys.readouterr().err


# ---------------------------------------------------------------------- images OpenCV refuses
def _huge_png() -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


def _tree(tmp_path, bad_name, bad_bytes):
    import tarfile
    root = tmp_path / "tree" / "train"
    for c in "ab":
        (root / c).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(root / c / f"{i}.png"), np.full((8, 8, 3), 40 * i, np.uint8))
    (root / "a" / bad_name).write_bytes(bad_bytes)
    archive = tmp_path / "tree.tgz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="train")
    return root, archive


@pytest.mark.parametrize("bad_name, bad_bytes, fragment", [
    ("empty.jpg", b"", "an empty file (0 bytes)"),
    ("huge.png", _huge_png(), "its header claims more pixels than OpenCV decodes"),
])
def test_images_opencv_refuses_are_named_on_every_path(tmp_path, capsys, bad_name, bad_bytes, fragment):
    from exdrop.data.sources import load_image_list_data
    root, archive = _tree(tmp_path, bad_name, bad_bytes)
    assert exdrop_main(["data", "images", str(archive), "--out", str(tmp_path / "db1")]) == 1
    assert f"cannot decode image train/a/{bad_name} in {archive}: {fragment}" in capsys.readouterr().err
    if bad_bytes:   # a plain folder: an empty file is already named by cv2.imread's None
        assert exdrop_main(["data", "images", str(root), "--out", str(tmp_path / "db2")]) == 1
        assert f"{root / 'a' / bad_name}: {fragment}" in capsys.readouterr().err
        listing = tmp_path / "list.txt"
        listing.write_text(f"{root / 'a' / '0.png'} 0\n{root / 'a' / bad_name} 1\n")
        with pytest.raises(ValueError, match=rf"layer 'data', listed in {listing}.*{fragment}"):
            load_image_list_data(listing, "", 0, 0, True, "data")


# ---------------------------------------------------------------------- run records that are not what they say
def test_snapshot_auto_with_a_mistyped_results_json(tiny_run, tmp_path, capsys):
    """results.json that is not a finished run's dict (a list; iterations as text) does not say
    "finished": --snapshot auto resumes from the newest snapshot instead of failing on it."""
    import shutil
    solver = str(tiny_run.parent / "solver.prototxt")
    for damage in ("[1, 2]", "iterations"):
        run = tmp_path / damage.strip("[], ")
        shutil.copytree(tiny_run, run)
        res = json.loads((run / "results.json").read_text())
        (run / "results.json").write_text(damage if damage.startswith("[") else json.dumps({**res, "iterations": "two"}))
        assert exdrop_main(["train", solver, "--out", str(run), "--snapshot", "auto", "--max-iter", "3",
                            "--device", "cpu", "--quiet"]) == 0
        out = capsys.readouterr()
        assert "resuming from tiny_ed_iter_2.solverstate" in out.out and "Traceback" not in out.err
        assert json.loads((run / "results.json").read_text())["iterations"] == 3


def test_an_engine_state_with_a_wrong_rng_is_named(tiny_run, tmp_path, capsys):
    import shutil
    import torch
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    extra = run / "snapshots" / "tiny_ed_iter_2.engine.pt"
    state = torch.load(extra, weights_only=True)
    state["torch_rng"] = torch.zeros(7, dtype=torch.uint8)
    torch.save(state, extra)
    solver = str(tiny_run.parent / "solver.prototxt")
    assert exdrop_main(["train", solver, "--out", str(run), "--snapshot", str(extra.with_suffix("").with_suffix(
        ".solverstate")), "--max-iter", "4", "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{extra} holds an unusable RNG or data state" in err and "--inexact-resume" in err


def test_a_non_dict_analysis_json_is_recomputed(tiny_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "analysis").mkdir(exist_ok=True)
    (run / "analysis" / "analysis.json").write_text("[1, 2, 3]")
    assert exdrop_main(["analyze", str(run), "--training-images", "3", "--quiet", "--no-over-training"]) == 0
    assert isinstance(json.loads((run / "analysis" / "analysis.json").read_text()), dict)


# ---------------------------------------------------------------------- unlocated errors, located
@pytest.mark.parametrize("edit, fragment", [
    (("base_lr: 0.01", 'base_lr: 0.01\nlr_policy: "stepp"'), "lr_policy 'stepp' is not one of Caffe's"),
    (('lr_policy: "fixed"', 'lr_policy: "step"'), "lr_policy 'step' needs stepsize > 0 (it is 0)"),
])
def test_a_bad_lr_policy_names_the_solver(tmp_path, capsys, edit, fragment):
    solver = write_tiny(tmp_path)
    text = solver.read_text().replace('lr_policy: "fixed"\n', "") if "stepp" in edit[1] else solver.read_text()
    solver.write_text(text.replace(*edit))
    assert exdrop_main(["train", str(solver), "--out", str(tmp_path / "r"), "--max-iter", "1", "--device", "cpu",
                        "--quiet"]) == 1
    assert f"{solver}: {fragment}" in capsys.readouterr().err


def test_binary_records_are_named(tiny_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "log.csv").write_bytes(b"\xff\xfe\x00binary")
    assert exdrop_main(["plot", str(run), "--out", str(tmp_path / "p.png")]) == 1
    assert f"{run / 'log.csv'}: not a text log.csv" in capsys.readouterr().err
    solver = str(tiny_run.parent / "solver.prototxt")
    assert exdrop_main(["train", solver, "--out", str(run), "--snapshot", str(run / "snapshots" /
                        "tiny_ed_iter_2.solverstate"), "--max-iter", "3", "--device", "cpu", "--quiet"]) == 1
    assert f"{run / 'log.csv'}: the run's log cannot be read to resume it" in capsys.readouterr().err


def test_a_one_column_class_index_is_located(tmp_path, capsys):
    from exdrop.data.ucf101 import read_split_lists
    (tmp_path / "classInd.txt").write_text("1 ApplyEyeMakeup\nApplyLipstick\n")
    for name in ("trainlist01.txt", "testlist01.txt"):
        (tmp_path / name).write_text("")
    with pytest.raises(ValueError, match=r"classInd\.txt:2: expected 'index name'"):
        read_split_lists(tmp_path, 1)


@pytest.mark.parametrize("rates", ["1.5", "0", "-0.5", "half"])
def test_sweep_rates_are_checked_at_plan_time(rates, capsys):
    with pytest.raises(SystemExit) as exc:
        exdrop_main(["sweep", "--rates", rates])
    assert exc.value.code == 2 and "argument --rates" in capsys.readouterr().err
