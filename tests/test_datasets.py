"""CIFAR-100 and Caltech-256 to Datum LMDBs: fixtures in each dataset's native format (a pickled
cifar-100-python.tar.gz, a 256_ObjectCategories tree and its tar), built in tmp_path."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import tarfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("lmdb")

from exdrop.cli import main  # noqa: E402
from exdrop.data import (CALTECH256_MD5, CALTECH256_URL, CIFAR100_MD5, CIFAR100_URL, DatumLMDB,  # noqa: E402
                         caltech256_split, download_cifar100, md5sum, prepare_caltech256, prepare_cifar100)
from exdrop.data.caltech import _prepare_caltech  # noqa: E402
from make_dry import unquoted  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def records(path) -> dict[str, tuple[np.ndarray, int]]:
    """{record name (key without its index prefix): (CHW, label)}."""
    with DatumLMDB(path) as db:
        return {k.split("_", 1)[1]: (a.copy(), lab) for k, a, lab in db.records()}


def keys(path) -> list[str]:
    with DatumLMDB(path) as db:
        return [k.split("_", 1)[1] for k, _, _ in db.records()]


# ----------------------------------------------------------------------------------------------
# CIFAR-100
# ----------------------------------------------------------------------------------------------
# not in alphabetical order: the labels must follow meta's fine_label_names, not a sort
C100 = [f"c{(37 * i) % 100:02d}" for i in range(100)]


def make_cifar100(path: Path, train_per_class=2, test_per_class=1) -> dict:
    """cifar-100-python.tar.gz as the official one: pickled dicts with bytes keys (protocol 2),
    data rows of 3072 RGB bytes, fine and coarse labels, meta with fine_label_names.
    Returns {filename: (RGB CHW, fine label)}."""
    rng = np.random.default_rng(100)
    truth, members = {}, {}
    for split, k in (("train", train_per_class), ("test", test_per_class)):
        fine = [c for _ in range(k) for c in range(100)]   # interleaved classes
        data = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        if split == "train":
            data[0, 0], data[0, 1024], data[0, 2048] = 10, 20, 30   # pixel (0, 0) of image 0: R, G, B
        names = [f"{split}_{i:05d}.png".encode() for i in range(len(fine))]
        for n, row, lab in zip(names, data, fine):
            truth[n.decode()] = (row.reshape(3, 32, 32), lab)
        members[split] = pickle.dumps({b"filenames": names, b"batch_label": split.encode(), b"fine_labels": fine,
                                       b"coarse_labels": [c // 5 for c in fine], b"data": data}, protocol=2)
    members["meta"] = pickle.dumps({b"fine_label_names": [c.encode() for c in C100],
                                    b"coarse_label_names": [f"s{i}".encode() for i in range(20)]}, protocol=2)
    members["file.txt~"] = b"an editor's backup file, as in the official archive\n"
    with tarfile.open(path, "w:gz") as tf:
        d = tarfile.TarInfo("cifar-100-python")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, b in members.items():
            ti = tarfile.TarInfo(f"cifar-100-python/{name}")
            ti.size = len(b)
            tf.addfile(ti, io.BytesIO(b))
    return truth


@pytest.fixture(scope="module")
def c100(tmp_path_factory):
    d = tmp_path_factory.mktemp("c100")
    tgz = d / "cifar-100-python.tar.gz"
    return tgz, make_cifar100(tgz)


def test_cifar100_archive_labels_bgr_split_idempotent(c100, tmp_path):
    tgz, truth = c100
    out = tmp_path / "cifar100"
    with pytest.warns(UserWarning, match=f"{tgz}: md5 .* not the official archive's {CIFAR100_MD5}"):
        r = prepare_cifar100(tgz, out, progress=False)
    assert r["classes"] == C100 and r["shape"] == [3, 32, 32]
    assert r["counts"]["train_per_class"] == [2] * 100 and r["counts"]["test_per_class"] == [1] * 100
    assert "val" not in r["counts"]   # the official test split validates; val_lmdb links to it
    assert Path(r["val"]).name == "val_lmdb" and (out / "val_lmdb").is_symlink()
    assert Path(r["val"]).resolve() == (out / "test_lmdb").resolve() == Path(r["test"]).resolve()
    for split, n in (("train", 200), ("test", 100)):
        recs = records(r[split])
        assert len(recs) == n
        for name, (chw, lab) in recs.items():
            rgb, lab0 = truth[name]
            assert lab == lab0 and np.array_equal(chw, rgb[::-1])   # BGR planes
    assert records(r["train"])["train_00000.png"][0][:, 0, 0].tolist() == [30, 20, 10]
    assert keys(r["test"]) == sorted(keys(r["test"]))   # test in archive order
    assert keys(r["train"]) != sorted(keys(r["train"]))   # train shuffled once
    # idempotent: no second read (no md5 warning), nothing rewritten
    mtime = (out / "train_lmdb/data.mdb").stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prepare_cifar100(tgz, out, progress=False) == r
    assert (out / "train_lmdb/data.mdb").stat().st_mtime_ns == mtime
    # val_size carves a stratified validation set even with a test split
    with pytest.warns(UserWarning, match="md5"):
        r2 = prepare_cifar100(tgz, tmp_path / "v", val_size=100, seed=1, progress=False)
    assert r2["counts"]["val_per_class"] == [1] * 100 and r2["counts"]["train"] == 100
    assert not (tmp_path / "v/val_lmdb").is_symlink()


def test_cifar100_extracted_folder_equals_archive(c100, tmp_path):
    tgz, _ = c100
    with tarfile.open(tgz) as tf:
        tf.extractall(tmp_path / "x", filter="data")
    with pytest.warns(UserWarning):
        a = prepare_cifar100(tgz, tmp_path / "a", progress=False)
    for src in (tmp_path / "x", tmp_path / "x/cifar-100-python"):
        b = prepare_cifar100(src, tmp_path / f"b{len(src.parts)}", progress=False)
        assert b["classes"] == a["classes"] and b["counts"] == a["counts"]
        for split in ("train", "test"):
            ra, rb = records(a[split]), records(b[split])
            assert ra.keys() == rb.keys() and all(np.array_equal(ra[k][0], rb[k][0]) for k in ra)


def test_cifar100_image_tree_checks_100_classes(tmp_path):
    src = tmp_path / "src/train"
    names = [f"k{i:03d}" for i in range(100)]
    for i, c in enumerate(names):
        (src / c).mkdir(parents=True)
        for n in range(2):
            cv2.imwrite(str(src / c / f"{n}.png"), np.full((32, 32, 3), (i, n, 7), np.uint8))
    tgz = tmp_path / "train.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src, arcname="train")
    r = prepare_cifar100(tgz, tmp_path / "out", val_size=100, progress=False)
    assert r["classes"] == names and r["counts"]["val_per_class"] == [1] * 100 and r["counts"]["train"] == 100
    x, y = DatumLMDB(r["val"]).read_all()
    assert np.array_equal(x[:, 0, 0, 0], y)   # blue channel = class index as written
    shutil.rmtree(src / "k099")
    with pytest.raises(ValueError, match="CIFAR-100 source has 99 classes"):
        prepare_cifar100(src, tmp_path / "out2", progress=False)


def test_cifar100_pickle_cannot_run_code(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    tgz = tmp_path / "evil.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        for name, obj in (("meta", {b"fine_label_names": [b"a"] * 100}), ("train", Evil())):
            b = pickle.dumps(obj, protocol=2)
            ti = tarfile.TarInfo(f"cifar-100-python/{name}")
            ti.size = len(b)
            tf.addfile(ti, io.BytesIO(b))
    with pytest.raises(ValueError, match=r"evil.tar.gz: member train: refused: the pickle asks for (posix|os)\.system"):
        prepare_cifar100(tgz, tmp_path / "out", progress=False)
    assert not marker.exists()


def _offline(monkeypatch):
    def refuse(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_cifar100_download_md5_and_offline_messages(tmp_path, monkeypatch):
    fake = tmp_path / "served.tar.gz"
    fake.write_bytes(b"not cifar-100")
    with pytest.raises(ValueError) as e:
        download_cifar100(tmp_path / "d1", url=fake.as_uri(), progress=False)
    assert "md5 mismatch" in str(e.value) and str(tmp_path / "d1/cifar-100-python.tar.gz") in str(e.value)
    assert CIFAR100_MD5 in str(e.value) and not list((tmp_path / "d1").iterdir())
    got = download_cifar100(tmp_path / "d2", url=fake.as_uri(), md5=md5sum(fake), progress=False)
    assert got == tmp_path / "d2/cifar-100-python.tar.gz" and got.read_bytes() == b"not cifar-100"
    with pytest.raises(FileNotFoundError) as e:
        prepare_cifar100(tmp_path / "nope.tar.gz", tmp_path / "out")
    assert "nope.tar.gz" in str(e.value) and CIFAR100_URL in str(e.value) and "download_cifar100" in str(e.value)
    _offline(monkeypatch)
    with pytest.raises(OSError) as e:
        download_cifar100(tmp_path / "d3")
    for part in (CIFAR100_URL, CIFAR100_MD5, str(tmp_path / "d3/cifar-100-python.tar.gz"), "name resolution"):
        assert part in str(e.value)


def test_cli_cifar100(c100, tmp_path, monkeypatch, capsys):
    tgz, _ = c100
    out = tmp_path / "o"
    with pytest.warns(UserWarning):
        assert main(["data", "--dataset", "cifar100", str(tgz), "--out", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"]["train"] == 200 and info["classes"] == C100
    assert main(["data", "cifar100", str(tgz), "--out", str(out)]) == 0   # the positional form; converted already
    assert json.loads(capsys.readouterr().out) == info
    for argv, msg in ((["cifar10", str(tgz), "--dataset", "cifar100"], "two datasets given"),
                      (["--dataset", "cifar100", str(tgz), "--split", "1"], "--split picks one of Caltech-256"),
                      (["cifar100", str(tgz), "--resize", "16x16"], "cifar100 images stay 32x32")):
        assert main(["data", *argv, "--out", str(tmp_path / "x")]) == 1
        assert msg in capsys.readouterr().err
    _offline(monkeypatch)   # the default archive, missing and offline: URL and md5 named
    assert main(["data", "--dataset", "cifar100", str(tmp_path / "cifar-100-python.tar.gz"),
                 "--out", str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err
    assert CIFAR100_URL in err and CIFAR100_MD5 in err and "CIFAR100=" in err


# ----------------------------------------------------------------------------------------------
# Caltech-256
# ----------------------------------------------------------------------------------------------
def caltech_members(n_classes: int, counts=None, clutter=5, extras=True):
    """(classes, [(path, file bytes)]): 256_ObjectCategories/<NNN.cK>/<NNN>_<iiii>.(png|jpg) plus
    <n+1 or 257>.clutter, tiny images of varying sizes, a grayscale one per class, and the official
    archive's oddities (a stray subfolder of images, a non-image file). Classes in label order."""
    classes = [f"{k:03d}.c{k}" for k in range(1, n_classes + 1)]
    rng = np.random.default_rng(256)
    files = []
    for k, c in enumerate(classes + [f"{257 if n_classes == 256 else n_classes + 1:03d}.clutter"], 1):
        n = clutter if c.endswith("clutter") else (counts[k - 1] if counts else 70 + k % 3)
        for i in range(1, n + 1):
            h, w = (12, 16) if i % 2 else (16, 13)
            img = rng.integers(0, 256, (h, w) if i == 3 else (h, w, 3), dtype=np.uint8)   # 3: grayscale
            ext = ".jpg" if i == 5 else ".png"
            files.append((f"256_ObjectCategories/{c}/{k:03d}_{i:04d}{ext}", cv2.imencode(ext, img)[1].tobytes()))
    if extras:
        for i in range(3):
            files.append((f"256_ObjectCategories/{classes[1]}/greg/g{i}.jpg",
                          cv2.imencode(".jpg", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))[1].tobytes()))
        files.append((f"256_ObjectCategories/{classes[0]}/RENAME2", b"not an image\n"))
    return classes, files


def make_caltech(root: Path, n_classes: int, **kw) -> list[str]:
    classes, files = caltech_members(n_classes, **kw)
    for name, b in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b)
    return classes


def tar_of(root: Path, path: Path, mode="w") -> Path:
    with tarfile.open(path, mode) as tf:
        tf.add(root / "256_ObjectCategories", arcname="256_ObjectCategories")
    return path


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """256_ObjectCategories.tar with the 257 folders of the real one (256 classes + 257.clutter),
    70-72 tiny images each, written straight into the tar (no folder tree)."""
    tar = tmp_path_factory.mktemp("caltech") / "256_ObjectCategories.tar"
    classes, files = caltech_members(256)
    with tarfile.open(tar, "w") as tf:
        for name, b in files:
            ti = tarfile.TarInfo(name)
            ti.size = len(b)
            tf.addfile(ti, io.BytesIO(b))
    return classes, tar


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Four classes (+ clutter) as a folder tree, for the tests that need 128x128 images or several
    conversions."""
    d = tmp_path_factory.mktemp("small")
    classes = make_caltech(d, 4, counts=[70, 73, 75, 71])
    return d, classes


def test_caltech256_cli_labels_clutter_split_sizes(full, tmp_path, capsys):
    classes, tar = full
    out = tmp_path / "c"
    with pytest.warns(UserWarning, match=f"{tar}: md5 .* not the official archive's {CALTECH256_MD5}"):
        rc = main(["data", "--dataset", "caltech256", str(tar), "--split", "3", "--resize", "8x8", "--out", str(out)])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert prepare_caltech256(tar, out, split=3, size=8, progress=False) == r   # the API: converted already
    assert r["classes"] == classes and len(classes) == 256 and classes[0] == "001.c1"
    assert r["counts"]["train_per_class"] == [50] * 256 and r["counts"]["test_per_class"] == [20] * 256
    assert r["shape"] == [3, 8, 8] and Path(r["val"]).resolve() == (out / "test_lmdb").resolve()
    names = {}
    for split in ("train", "test"):
        recs = records(r[split])
        assert len(recs) == {"train": 12800, "test": 5120}[split]
        for name, (_, lab) in recs.items():
            cls, _, base = name.partition("/")
            assert cls == classes[lab] and "/" not in base and "clutter" not in name   # no greg/, no clutter
        names[split] = set(recs)
    assert not names["train"] & names["test"]
    files = sorted(m.rpartition("/")[2] for m in tarfile.open(tar).getnames()
                   if m.split("/")[1] == classes[200] and m.count("/") == 2 and not m.endswith("RENAME2"))
    tr, te = caltech256_split(3, classes[200], files)
    assert {f"{classes[200]}/{n}" for n in te} == {n for n in names["test"] if n.startswith(classes[200] + "/")}
    assert {f"{classes[200]}/{n}" for n in tr} == {n for n in names["train"] if n.startswith(classes[200] + "/")}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["params"]["kind"].startswith("Caltech-256 split 3: 50 train + 20 test per class")
    for argv, msg in ((["--seed", "1"], "--seed: not for caltech256"), (["--resize", "8x9"], "are square"),
                      (["--split", "5"], "split=5: Caltech-256 has the paper's 5 random splits")):
        assert main(["data", "caltech256", str(tar), "--out", str(tmp_path / "x"), *argv]) == 1
        assert msg in capsys.readouterr().err


def test_caltech256_128x128_bgr_gray_inter_linear(small, tmp_path):
    root, classes = small
    r = _prepare_caltech(root, tmp_path / "c", 0, 50, 20, 128, False, False, n_classes=4)
    assert r["shape"] == [3, 128, 128] and r["counts"]["train_per_class"] == [50] * 4
    recs = {**records(r["train"]), **records(r["test"])}
    cats = root / "256_ObjectCategories"
    checked = {"png": 0, "gray": 0, "jpg": 0}
    for name, (chw, lab) in recs.items():
        path = str(cats / name)
        expect = cv2.resize(cv2.imread(path, cv2.IMREAD_COLOR), (128, 128), interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(chw, expect.transpose(2, 0, 1)), name
        raw = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        kind = "jpg" if name.endswith(".jpg") else "gray" if raw.ndim == 2 else "png"
        if kind == "gray":
            assert np.array_equal(chw[0], chw[1]) and np.array_equal(chw[1], chw[2])
        elif kind == "png":   # channel order: the file's BGR, as written by cv2
            assert np.array_equal(chw, cv2.resize(raw, (128, 128)).transpose(2, 0, 1))
            assert not np.array_equal(chw, cv2.resize(raw, (128, 128), interpolation=cv2.INTER_NEAREST)
                                      .transpose(2, 0, 1))
        checked[kind] += 1
    assert min(checked.values()) >= 1, checked


def test_caltech256_splits_reproducible_distinct_tar_equals_tree(small, tmp_path):
    root, classes = small
    conv = {}
    for tag, src, split in (("s0", root, 0), ("s0again", root, 0), ("s1", root, 1),
                            ("tar", tar_of(root, tmp_path / "c.tar"), 0),
                            ("tgz", tar_of(root, tmp_path / "c.tgz", "w:gz"), 0)):
        r = _prepare_caltech(src, tmp_path / tag, split, 50, 20, 8, False, False, n_classes=4)
        conv[tag] = {s: records(r[s]) for s in ("train", "test")}
    for tag in ("s0again", "tar", "tgz"):   # the same split from the same images, whatever the container
        for s in ("train", "test"):
            a, b = conv["s0"][s], conv[tag][s]
            assert a.keys() == b.keys() and all(np.array_equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in a)
    assert conv["s0"]["test"].keys() != conv["s1"]["test"].keys()
    # the five splits: 50 + 20 distinct images of the class, reproducible, all different
    files = sorted(p.name for p in (root / "256_ObjectCategories" / classes[2]).iterdir())
    tests = []
    for s in range(5):
        tr, te = caltech256_split(s, classes[2], files)
        assert (tr, te) == caltech256_split(s, classes[2], list(reversed(files)))   # input order irrelevant
        assert len(tr) == 50 and len(te) == 20 and not set(tr) & set(te) and set(tr + te) <= set(files)
        tests.append(frozenset(te))
    assert len(set(tests)) == 5


def test_caltech256_idempotent_and_rebuilt_for_another_split(small, tmp_path, monkeypatch):
    root, _ = small
    out = tmp_path / "c"
    r = _prepare_caltech(root, out, 2, 50, 20, 8, False, False, n_classes=4)
    mtime = (out / "train_lmdb/data.mdb").stat().st_mtime_ns
    import exdrop.data.caltech as C

    def no_reading(*a, **k):
        raise AssertionError("read again")
    monkeypatch.setattr(C, "_Listing", no_reading)
    assert _prepare_caltech(root, out, 2, 50, 20, 8, False, False, n_classes=4) == r
    assert (out / "train_lmdb/data.mdb").stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="read again"):   # another split is a new conversion
        _prepare_caltech(root, out, 4, 50, 20, 8, False, False, n_classes=4)


def test_caltech256_malformed_copies(small, tmp_path):
    root, classes = small
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    cats = copy / "256_ObjectCategories"
    for p in sorted((cats / classes[1]).glob("*.png"))[:4]:   # 73 -> 69 images
        p.unlink()
    with pytest.raises(ValueError, match=rf"class folder {classes[1]} has 69 images, fewer than the 70"):
        _prepare_caltech(copy, tmp_path / "o", 0, 50, 20, 8, False, False, n_classes=4)
    (cats / "005.empty").mkdir()   # an empty class folder is a class with no images, not skipped
    with pytest.raises(ValueError, match="class folder 005.empty has 0 images"):
        _prepare_caltech(copy, tmp_path / "o", 0, 10, 5, 8, False, False, n_classes=5)
    with pytest.raises(ValueError, match="4 class folders besides the clutter folder, expected 256"):
        prepare_caltech256(root, tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError) as e:
        prepare_caltech256(tmp_path / "256_ObjectCategories.tar", tmp_path / "o")
    for part in (str(tmp_path / "256_ObjectCategories.tar"), CALTECH256_URL, CALTECH256_MD5, "CALTECH256="):
        assert part in str(e.value)


# ----------------------------------------------------------------------------------------------
# Makefile
# ----------------------------------------------------------------------------------------------
make = shutil.which("make")


@pytest.mark.skipif(make is None, reason="no make")
def test_make_data_targets():
    def n(*args):
        return unquoted(subprocess.run([make, "-n", "--no-print-directory", *args], cwd=ROOT, capture_output=True,
                                       text=True, check=True).stdout).strip()
    assert n("data-cifar100").endswith("-m exdrop data --dataset cifar100 data/cifar-100-python.tar.gz "
                                       "--out data/cifar100")
    assert " cifar100 a.tgz --out" in n("data-cifar100", "DATA=a.tgz")
    assert " cifar100 b --out" in n("data-cifar100", "CIFAR100=b", "DATA=a.tgz")
    assert n("data-caltech256").endswith("--dataset caltech256 data/256_ObjectCategories.tar --split 0 "
                                         "--out data/caltech256")
    assert "caltech256 /x/256_ObjectCategories --split 3 " in n("data-caltech256", "SPLIT=3",
                                                               "CALTECH256=/x/256_ObjectCategories")
    help_text = subprocess.run([make, "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout
    for part in ("make data-cifar100", "CIFAR100=", "make data-caltech256", "CALTECH256=", "SPLIT=0..4"):
        assert part in help_text
    # the prototxts read the default output folder
    proto = (ROOT / "prototxt/cnn2/caltech256/train_val_ed.prototxt").read_text()
    assert 'source: "data/caltech256/train_lmdb"' in proto and 'source: "data/caltech256/val_lmdb"' in proto
