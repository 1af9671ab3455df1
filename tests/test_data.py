"""exdrop.data: Datum LMDBs, converters (CIFAR pickles, folders, tgz, list files), batch sources."""
import hashlib
import io
import json
import os
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")
pytest.importorskip("lmdb")

from exdrop.data import (CIFAR10_CLASSES, CorruptRecordError, DatumLMDB, download_cifar10, make_source,  # noqa: E402
                         md5sum, prepare_cifar10, prepare_image_dataset, write_datum_lmdb)
from exdrop.proto import caffe_pb2  # noqa: E402

REAL_CIFAR_TGZ = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10-jpg/train.tgz"


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------
def _img(seed, h=8, w=8):
    """A random HWC BGR uint8 image."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_tree(root: Path, classes=("cat", "ant", "bee"), per_class=4, h=8, w=8):
    """root/<class>/<n>.png (lossless); returns {relative path: (HWC BGR image, label)}."""
    out = {}
    for ci, c in enumerate(sorted(classes)):
        (root / c).mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            im = _img(ci * 1000 + n + zlib.crc32(str(root).encode()) % 997, h, w)
            cv2.imwrite(str(root / c / f"{n}.png"), im)
            out[f"{c}/{n}.png"] = (im, ci)
    return out


def make_fake_cifar_tgz(path: Path, per_class_batch=1, test_per_class=2):
    """cifar-10-python.tar.gz with the real layout: pickled dicts with bytes keys, RGB rows of 3072."""
    rng = np.random.default_rng(0)
    files = {}
    truth = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        k = test_per_class if name == "test_batch" else per_class_batch
        labels = [c for c in range(10) for _ in range(k)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        fnames = [f"{name}_{i}.png".encode() for i in range(len(labels))]
        for f, row, lab in zip(fnames, data, labels):
            truth[f.decode()] = (row.reshape(3, 32, 32), lab)   # RGB CHW
        files[name] = pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                                    b"filenames": fnames}, protocol=2)
    files["batches.meta"] = pickle.dumps({b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                                          b"num_vis": 3072}, protocol=2)
    with tarfile.open(path, "w:gz") as tf:
        for name, b in files.items():
            ti = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            ti.size = len(b)
            tf.addfile(ti, io.BytesIO(b))
    return truth


def lmdb_by_name(path):
    """{name (key without the index prefix): (CHW, label)} and the keys in order."""
    db = DatumLMDB(path)
    recs = {k.split("_", 1)[1]: (a.copy(), lab) for k, a, lab in db.records()}
    keys = [k for k, _, _ in db.records()]
    db.close()
    return recs, keys


def layer(typ, name="data", **kw):
    lp = caffe_pb2.LayerParameter(name=name, type=typ)
    lp.top.extend(["data", "label"])
    for k, v in kw.pop("transform", {}).items():
        if k == "mean_value":
            lp.transform_param.mean_value.extend(v)
        else:
            setattr(lp.transform_param, k, v)
    sub = lp.data_param if typ == "Data" else lp.image_data_param
    for k, v in kw.items():
        setattr(sub, k, v)
    return lp


@pytest.fixture
def small_lmdb(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (7, 3, 8, 10), dtype=np.uint8)
    labels = np.arange(7)
    p = write_datum_lmdb(tmp_path / "db", imgs, labels)
    return p, imgs, labels


# ----------------------------------------------------------------------------------------------
# Datum LMDB
# ----------------------------------------------------------------------------------------------
def test_lmdb_roundtrip_keys_and_formats(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 3, 4, 6), dtype=np.uint8)
    p = write_datum_lmdb(tmp_path / "a", imgs, [4, 3, 2, 1, 0], names=[f"f{i}.png" for i in range(5)])
    db = DatumLMDB(p)
    assert len(db) == 5 and db.shape == (3, 4, 6)
    x, y = db.read_all()
    assert x.dtype == np.uint8 and np.array_equal(x, imgs) and y.tolist() == [4, 3, 2, 1, 0]
    assert [k for k, _, _ in db.records()][:2] == ["00000000_f0.png", "00000001_f1.png"]
    assert not list(tmp_path.glob(".*tmp*"))   # temp folder renamed away
    # encoded (PNG) from an iterable, no names -> keys 00000000..
    p2 = write_datum_lmdb(tmp_path / "b", iter(list(imgs)), range(5), encoded=True)
    x2, _ = DatumLMDB(p2).read_all()
    assert np.array_equal(x2, imgs) and next(DatumLMDB(p2).records())[0] == "00000000"
    # float_data
    f = rng.standard_normal((2, 1, 3, 3)).astype(np.float32)
    x3, _ = DatumLMDB(write_datum_lmdb(tmp_path / "c", f, [0, 1])).read_all()
    assert x3.dtype == np.float32 and np.allclose(x3, f)
    # an interrupted write leaves neither a half LMDB nor its temp folder (stale ones are swept)
    (tmp_path / ".e.tmp-999999999").mkdir()

    def broken():
        yield imgs[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_datum_lmdb(tmp_path / "e", broken(), [0, 1])
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.tmp*"))
    # map_size grows when it fills up
    big = rng.integers(0, 256, (50, 3, 64, 64), dtype=np.uint8)
    x4, _ = DatumLMDB(write_datum_lmdb(tmp_path / "d", big, range(50), map_size=1 << 16)).read_all()
    assert np.array_equal(x4, big)


def test_corrupt_record_names_path_and_key(tmp_path, small_lmdb):
    import lmdb
    p, _, _ = small_lmdb
    env = lmdb.open(str(p), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"00000003", b"\xff\xff\xff garbage")
    env.close()
    with pytest.raises(CorruptRecordError) as e:
        DatumLMDB(p).read_all()
    assert str(p) in str(e.value) and "00000003" in str(e.value)


# ----------------------------------------------------------------------------------------------
# converters
# ----------------------------------------------------------------------------------------------
def test_cifar_python_tgz(tmp_path):
    truth = make_fake_cifar_tgz(tmp_path / "cifar-10-python.tar.gz")
    r = prepare_cifar10(tmp_path / "cifar-10-python.tar.gz", tmp_path / "out", progress=False)
    assert r["classes"] == CIFAR10_CLASSES
    assert r["counts"]["train"] == 50 and r["counts"]["test"] == 20 and "val" not in r["counts"]
    # validation is the official test split; the prototxts' val_lmdb links to it
    assert Path(r["val"]).name == "val_lmdb" and Path(r["val"]).resolve() == Path(r["test"]).resolve()
    assert Path(r["test"]).name == "test_lmdb"
    for split in ("train", "test"):
        recs, _ = lmdb_by_name(r[split])
        for name, (chw, lab) in recs.items():
            rgb, lab0 = truth[name]
            assert lab == lab0 and np.array_equal(chw, rgb[::-1])   # stored BGR
    _, keys = lmdb_by_name(r["test"])
    assert keys == sorted(keys) and keys[0].startswith("00000000_test_batch_0")
    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert meta["params"]["seed"] == 0 and meta["counts"]["test"] == 20
    # explicit val_size carves a stratified split even with a test split
    r2 = prepare_cifar10(tmp_path / "cifar-10-python.tar.gz", tmp_path / "out2", val_size=10, progress=False)
    assert r2["counts"]["val_per_class"] == [1] * 10 and r2["counts"]["train"] == 40


def test_image_folder_bgr_labels_split_idempotent(tmp_path):
    truth = make_tree(tmp_path / "tree", per_class=10)
    out = tmp_path / "out"
    r = prepare_image_dataset(tmp_path / "tree", out, val_size=6, seed=3, progress=False)
    assert r["classes"] == ["ant", "bee", "cat"] and r["test"] is None
    assert r["counts"]["val_per_class"] == [2, 2, 2] and r["counts"]["train_per_class"] == [8, 8, 8]
    recs = {}
    for split in ("train", "val"):
        rs, keys = lmdb_by_name(r[split])
        recs.update(rs)
    assert set(recs) == set(truth)
    for name, (chw, lab) in recs.items():
        assert lab == truth[name][1] and np.array_equal(chw, truth[name][0].transpose(2, 0, 1))
    # train order shuffled once at conversion
    tr, keys = lmdb_by_name(r["train"])
    order = [k.split("_", 1)[1] for k in keys]
    assert order != sorted(order)
    # idempotent: nothing rewritten
    mt = (out / "train_lmdb/data.mdb").stat().st_mtime_ns
    r_again = prepare_image_dataset(tmp_path / "tree", out, val_size=6, seed=3, progress=False)
    assert r_again == r and (out / "train_lmdb/data.mdb").stat().st_mtime_ns == mt
    # another seed -> rebuilt, same counts, other order
    r3 = prepare_image_dataset(tmp_path / "tree", out, val_size=6, seed=4, progress=False)
    _, keys3 = lmdb_by_name(r3["train"])
    assert r3["counts"] == r["counts"] and keys3 != keys


def test_tgz_tree_with_long_names_and_test_split(tmp_path):
    src = tmp_path / "src"
    make_tree(src / "data" / "train", per_class=3)
    te = make_tree(src / "data" / "test", per_class=2)
    long_dir = src / "data" / "train" / "ant"
    long_name = "x" * 120 + ".png"    # > 100 chars: pax/GNU long-name header
    cv2.imwrite(str(long_dir / long_name), _img(7))
    tgz = tmp_path / "ds.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src / "data", arcname="data")
    r = prepare_image_dataset(tgz, tmp_path / "out", progress=False)
    assert r["classes"] == ["ant", "bee", "cat"]
    assert r["counts"]["train"] == 10 and r["counts"]["test"] == 6
    assert Path(r["val"]).resolve() == Path(r["test"]).resolve()
    recs, _ = lmdb_by_name(r["test"])
    for name, (chw, lab) in recs.items():
        im, lab0 = te[name.split("/", 2)[2]]
        assert lab == lab0 and np.array_equal(chw, im.transpose(2, 0, 1))
    recs, _ = lmdb_by_name(r["train"])
    assert f"data/train/ant/{long_name}" in recs


def test_cifar_from_jpg_tgz_and_list_file(tmp_path):
    classes = CIFAR10_CLASSES
    src = tmp_path / "src"
    make_tree(src / "train", classes=classes, per_class=5, h=32, w=32)
    tgz = tmp_path / "train.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src / "train", arcname="train")
    r = prepare_cifar10(tgz, tmp_path / "out", val_size=10, progress=False)
    assert r["classes"] == classes and r["shape"] == [3, 32, 32]
    assert r["counts"]["val_per_class"] == [1] * 10 and r["counts"]["train"] == 40
    # list file: relative and absolute paths, resize
    lst = tmp_path / "list.txt"
    items = sorted((src / "train").rglob("*.png"))[:12]
    lines = [f"{p.relative_to(tmp_path)} {i % 3}" if i % 2 else f"{p} {i % 3}" for i, p in enumerate(items)]
    lst.write_text("\n".join(lines) + "\n")
    r2 = prepare_image_dataset(lst, tmp_path / "out2", val_size=3, resize=(16, 20), progress=False)
    x, y = DatumLMDB(r2["val"]).read_all()
    assert x.shape == (3, 3, 16, 20) and sorted(y.tolist()) == [0, 1, 2]
    recs, _ = lmdb_by_name(r2["train"])
    name, (chw, _) = next(iter(recs.items()))
    p = Path(name) if Path(name).is_absolute() else tmp_path / name
    assert np.array_equal(chw, cv2.resize(cv2.imread(str(p)), (20, 16)).transpose(2, 0, 1))


def test_missing_source_and_limit(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        prepare_cifar10(tmp_path / "nope.tgz", tmp_path / "out")
    assert "nope.tgz" in str(e.value) and "download_cifar10" in str(e.value)
    make_tree(tmp_path / "tree", per_class=6)
    r = prepare_image_dataset(tmp_path / "tree", tmp_path / "out", val_size=3, limit_per_class=4, progress=False)
    assert r["counts"]["train"] == 9 and r["counts"]["val"] == 3


def test_download_md5(tmp_path):
    fake = tmp_path / "fake.tar.gz"
    fake.write_bytes(b"not really cifar")
    good = hashlib.md5(b"not really cifar").hexdigest()
    assert md5sum(fake) == good
    with pytest.raises(ValueError, match="md5"):
        download_cifar10(tmp_path / "d1", url=fake.as_uri(), progress=False)
    assert not list((tmp_path / "d1").iterdir())   # nothing half-downloaded left behind
    out = download_cifar10(tmp_path / "d2", url=fake.as_uri(), md5=good, progress=False)
    assert out.name == "cifar-10-python.tar.gz" and out.read_bytes() == fake.read_bytes()


# ----------------------------------------------------------------------------------------------
# batch sources: transform semantics against numpy
# ----------------------------------------------------------------------------------------------
def test_data_sequential_wraparound_and_resume(small_lmdb):
    p, imgs, labels = small_lmdb
    src = make_source(layer("Data", source=str(p), batch_size=3, backend=caffe_pb2.DataParameter.LMDB),
                      caffe_pb2.TEST, "cpu", seed=0)
    assert src.top_shapes() == [(3, 3, 8, 10), (3,)]
    got = [src.next_batch()[1].tolist() for _ in range(4)]
    assert got == [[0, 1, 2], [3, 4, 5], [6, 0, 1], [2, 3, 4]]
    x, y = src.next_batch()
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert np.array_equal(x.numpy(), imgs[[5, 6, 0]].astype(np.float32))
    # exact resume, including the random crops/mirrors of TRAIN
    lp = layer("Data", source=str(p), batch_size=3, backend=caffe_pb2.DataParameter.LMDB, rand_skip=5,
               transform=dict(crop_size=5, mirror=True))
    a = make_source(lp, caffe_pb2.TRAIN, "cpu", seed=1)
    assert 0 <= a.cursor < 5
    a.next_batch()
    st = a.state_dict()
    ref = [a.next_batch() for _ in range(3)]
    b = make_source(lp, caffe_pb2.TRAIN, "cpu", seed=99)
    b.load_state_dict(st)
    for (x1, y1), (x2, y2) in zip(ref, [b.next_batch() for _ in range(3)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_center_crop_mean_value_scale(small_lmdb):
    p, imgs, _ = small_lmdb
    lp = layer("Data", source=str(p), batch_size=7, backend=caffe_pb2.DataParameter.LMDB,
               transform=dict(crop_size=5, mean_value=[10.0, 20.0, 30.0], scale=0.5))
    x, _ = make_source(lp, caffe_pb2.TEST, "cpu").next_batch()
    ho, wo = (8 - 5) // 2, (10 - 5) // 2
    ref = (imgs[:, :, ho:ho + 5, wo:wo + 5].astype(np.float32) - np.float32([10, 20, 30])[:, None, None]) * np.float32(0.5)
    assert x.shape == (7, 3, 5, 5) and np.array_equal(x.numpy(), ref)
    # one mean_value is broadcast to all channels
    lp = layer("Data", source=str(p), batch_size=7, backend=caffe_pb2.DataParameter.LMDB,
               transform=dict(mean_value=[100.0]))
    x, _ = make_source(lp, caffe_pb2.TEST, "cpu").next_batch()
    assert np.array_equal(x.numpy(), imgs.astype(np.float32) - 100)
    lp.transform_param.mean_value.extend([1.0])
    with pytest.raises(ValueError, match="mean_value"):
        make_source(lp, caffe_pb2.TEST, "cpu")


def _write_mean(path, mean):
    b = caffe_pb2.BlobProto()
    b.shape.dim.extend([1, *mean.shape])
    b.data.extend(mean.ravel().tolist())
    path.write_bytes(b.SerializeToString())


def test_random_crop_mirror_mean_file(tmp_path, small_lmdb):
    p, imgs, _ = small_lmdb
    mean = np.random.default_rng(5).uniform(0, 255, (3, 8, 10)).astype(np.float32)
    _write_mean(tmp_path / "mean.binaryproto", mean)
    lp = layer("Data", source=str(p), batch_size=7, backend=caffe_pb2.DataParameter.LMDB,
               transform=dict(crop_size=5, mirror=True, mean_file=str(tmp_path / "mean.binaryproto"), scale=0.25))
    src = make_source(lp, caffe_pb2.TRAIN, "cpu", seed=0)
    flips, offsets = set(), set()
    for _ in range(6):
        x, y = src.next_batch()
        for xi, yi in zip(x.numpy(), y.tolist()):
            diff = imgs[yi].astype(np.float32) - mean   # Caffe: (pixel - mean at the same source pixel) * scale
            found = [(h, w, f) for h in range(4) for w in range(6) for f in (0, 1)
                     if np.array_equal(xi, (diff[:, h:h + 5, w:w + 5][..., ::-1] if f else diff[:, h:h + 5, w:w + 5])
                                       * np.float32(0.25))]
            assert found, "output is not a crop/flip of (image - mean) * scale"
            flips.add(found[0][2])
            offsets.add(found[0][:2])
    assert flips == {0, 1} and len(offsets) > 5
    # TEST: centre crop, but Caffe still mirrors at random
    src = make_source(lp, caffe_pb2.TEST, "cpu", seed=0)
    seen = set()
    for _ in range(4):
        x, y = src.next_batch()
        for xi, yi in zip(x.numpy(), y.tolist()):
            c = ((imgs[yi].astype(np.float32) - mean)[:, 1:6, 2:7]) * np.float32(0.25)
            if np.array_equal(xi, c):
                seen.add(0)
            else:
                assert np.array_equal(xi, c[..., ::-1])
                seen.add(1)
    assert seen == {0, 1}


def test_imagedata_resize_shuffle(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    lines = []
    for i in range(5):
        cv2.imwrite(str(root / f"{i}.png"), _img(i, 6 + i, 9 - i))   # different sizes
        lines.append(f"{i}.png {i}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    lp = layer("ImageData", source=str(tmp_path / "list.txt"), root_folder=str(root) + "/", batch_size=3,
               new_height=7, new_width=4, shuffle=True)
    src = make_source(lp, caffe_pb2.TRAIN, "cpu", seed=0)
    assert src.top_shapes() == [(3, 3, 7, 4), (3,)]
    x, y = src.next_batch()
    for xi, yi in zip(x.numpy(), y.tolist()):
        ref = cv2.resize(cv2.imread(str(root / f"{yi}.png")), (4, 7)).transpose(2, 0, 1)
        assert np.array_equal(xi, ref.astype(np.float32))
    seq = y.tolist() + sum((src.next_batch()[1].tolist() for _ in range(9)), [])   # 30 = 6 epochs
    epochs = [seq[i:i + 5] for i in range(0, 30, 5)]
    assert all(sorted(e) == [0, 1, 2, 3, 4] for e in epochs)   # each epoch a permutation
    assert len({tuple(e) for e in epochs}) > 1                  # reshuffled every epoch
    src2 = make_source(lp, caffe_pb2.TRAIN, "cpu", seed=0)
    assert sum((src2.next_batch()[1].tolist() for _ in range(10)), []) == seq   # seeded
    # gray, no shuffle: list order
    lp = layer("ImageData", source=str(tmp_path / "list.txt"), root_folder=str(root) + "/", batch_size=2,
               new_height=5, new_width=5, is_color=False)
    src = make_source(lp, caffe_pb2.TEST, "cpu")
    assert src.top_shapes()[0] == (2, 1, 5, 5)
    assert [src.next_batch()[1].tolist() for _ in range(3)] == [[0, 1], [2, 3], [4, 0]]
    # different sizes without new_height/new_width -> clear error
    with pytest.raises(ValueError, match="new_height"):
        make_source(layer("ImageData", source=str(tmp_path / "list.txt"), root_folder=str(root) + "/"),
                    caffe_pb2.TEST, "cpu")


def test_source_errors(tmp_path, monkeypatch, small_lmdb):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        make_source(layer("Data", name="cifar", source="examples/cifar10/train_lmdb", batch_size=2,
                          backend=caffe_pb2.DataParameter.LMDB), caffe_pb2.TRAIN, "cpu")
    msg = str(e.value)
    assert "cifar" in msg and "examples/cifar10/train_lmdb" in msg and "make data-cifar10" in msg
    p, _, _ = small_lmdb
    rel = os.path.relpath(p, tmp_path)   # relative paths resolve against the current directory
    assert len(make_source(layer("Data", source=rel, batch_size=2, backend=caffe_pb2.DataParameter.LMDB),
                           caffe_pb2.TRAIN, "cpu")) == 7
    lp = caffe_pb2.LayerParameter(name="in", type="Input")
    lp.input_param.shape.add().dim.extend([4, 3, 8, 10])
    src = make_source(lp, caffe_pb2.TEST, "cpu", source=rel)
    assert src.top_shapes() == [(4, 3, 8, 10), (4,)] and src.next_batch()[1].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="LMDB"):
        make_source(layer("Data", source=rel, batch_size=2, backend=caffe_pb2.DataParameter.LEVELDB),
                    caffe_pb2.TRAIN, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resident_on_cuda(small_lmdb):
    p, imgs, _ = small_lmdb
    lp = layer("Data", source=str(p), batch_size=4, backend=caffe_pb2.DataParameter.LMDB,
               transform=dict(crop_size=5, mirror=True, mean_value=[1.0, 2.0, 3.0]))
    src = make_source(lp, caffe_pb2.TRAIN, "cuda", seed=0)
    x, y = src.next_batch()
    assert src.images.is_cuda and x.is_cuda and y.is_cuda and x.shape == (4, 3, 5, 5)


# ----------------------------------------------------------------------------------------------
# real data
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not REAL_CIFAR_TGZ.is_file(), reason="shared/data/cifar10-jpg/train.tgz not present")
def test_real_cifar10_jpg_slice(tmp_path):
    r = prepare_cifar10(REAL_CIFAR_TGZ, tmp_path / "c10", val_size=50, limit_per_class=20, progress=False)
    assert r["classes"] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert r["counts"]["train_per_class"] == [15] * 10 and r["counts"]["val_per_class"] == [5] * 10
    x, y = DatumLMDB(r["train"]).read_all()
    assert x.shape == (150, 3, 32, 32) and x.dtype == np.uint8 and sorted(set(y.tolist())) == list(range(10))
    # BGR: the pixels equal OpenCV's decoding of the original JPEG
    recs, _ = lmdb_by_name(r["train"])
    with tarfile.open(REAL_CIFAR_TGZ, "r|gz") as tf:   # stream until the first converted image
        m = next(m for m in tf if m.name in recs)
        jpg = tf.extractfile(m).read()
    ref = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR).transpose(2, 0, 1)
    assert np.array_equal(recs[m.name][0], ref)
