"""Data read from disk batch by batch (exdrop/data/stream.py), for data sets too large to hold in
memory (UCF101 frames, ImageNet): the same batches as the resident source for a Data layer, one
batch decoded ahead, exact resume, a process's part of a global batch, clear errors."""
import threading
import time

import numpy as np
import pytest
import torch

from exdrop.data import make_source, write_datum_lmdb
from exdrop.data import lmdb_datum as L
from exdrop.data import stream as S
from exdrop.data.sources import BatchSource
from exdrop.proto import caffe_pb2


def _lp(kind: str, source: str, batch: int = 5, crop: int = 6, mirror: bool = True, shuffle: bool = False,
        root: str = ""):
    lp = caffe_pb2.LayerParameter(name="data", type=kind)
    lp.top.extend(["data", "label"])
    lp.transform_param.crop_size = crop
    lp.transform_param.mirror = mirror
    lp.transform_param.mean_value.extend([10, 20, 30])
    if kind == "Data":
        lp.data_param.source, lp.data_param.batch_size = source, batch
        lp.data_param.backend = caffe_pb2.DataParameter.LMDB
    else:
        lp.image_data_param.source, lp.image_data_param.batch_size = source, batch
        lp.image_data_param.shuffle, lp.image_data_param.root_folder = shuffle, root
    return lp


@pytest.fixture(scope="module")
def lmdb(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (13, 3, 9, 8), dtype=np.uint8)
    labels = rng.integers(0, 4, 13)
    write_datum_lmdb(tmp / "db", images, labels)
    return tmp / "db", images, labels


def test_stream_gives_the_resident_batches(lmdb):
    """Data layer, TRAIN, random crop + mirror, 13 records in batches of 5 (wrap-around): the
    stream's batches equal the resident source's, over three epochs."""
    path, images, labels = lmdb
    resident = make_source(_lp("Data", str(path)), 0, seed=5, stream=False)
    streamed = make_source(_lp("Data", str(path)), 0, seed=5, stream=True)
    assert isinstance(resident, BatchSource) and isinstance(streamed, S.StreamSource)
    assert streamed.top_shapes() == resident.top_shapes() == [(5, 3, 6, 6), (5,)]
    for _ in range(8):
        (x1, y1), (x2, y2) = resident.next_batch(), streamed.next_batch()
        torch.testing.assert_close(x2, x1, rtol=0, atol=0)
        torch.testing.assert_close(y2, y1)
    streamed.close()


def test_stream_decodes_by_hand(lmdb):
    """TEST phase, centre crop, no mirror: record k minus the mean, by numpy."""
    path, images, labels = lmdb
    src = make_source(_lp("Data", str(path), mirror=False), 1, stream=True)
    x, y = src.next_batch()
    want = images[:5, :, 1:7, 1:7].astype(np.float32) - np.array([10, 20, 30], np.float32)[:, None, None]
    np.testing.assert_array_equal(x.numpy(), want)
    np.testing.assert_array_equal(y.numpy(), labels[:5])
    src.close()


def test_stream_resumes_exactly(lmdb):
    """A state taken mid-run (with a batch decoded ahead) continues as the uninterrupted source."""
    path, _, _ = lmdb
    a = make_source(_lp("Data", str(path)), 0, seed=3, stream=True)
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    rest = [a.next_batch() for _ in range(4)]
    b = make_source(_lp("Data", str(path)), 0, seed=99, stream=True)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(rest, (b.next_batch() for _ in range(4))):
        torch.testing.assert_close(x2, x1, rtol=0, atol=0)
        torch.testing.assert_close(y2, y1)
    with pytest.raises(ValueError, match="held in memory"):
        b.load_state_dict(make_source(_lp("Data", str(path)), 0, stream=False).state_dict())
    with pytest.raises(ValueError, match=f"the saved data state is for 7 records, this source reads {b.n} records"):
        b.load_state_dict({**state, "n": 7})
    a.close()
    b.close()


def test_stream_part_of_a_global_batch(lmdb):
    """Rank 1 of 2 (a batch of 6 split 3 + 3): the second half of the one-process batch."""
    path, _, _ = lmdb
    whole = make_source(_lp("Data", str(path), batch=6), 0, seed=4, stream=True)
    half = make_source(_lp("Data", str(path), batch=6), 0, seed=4, stream=True, part=slice(3, 6))
    assert half.top_shapes()[0][0] == 3
    for _ in range(4):
        (x1, y1), (x2, y2) = whole.next_batch(), half.next_batch()
        torch.testing.assert_close(x2, x1[3:], rtol=0, atol=0)
        torch.testing.assert_close(y2, y1[3:])
    whole.close()
    half.close()


def test_image_list_stream_shuffles_per_epoch_and_resumes(tmp_path):
    import cv2
    rng = np.random.default_rng(2)
    lines = []
    for k in range(7):
        cv2.imwrite(str(tmp_path / f"{k}.png"), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        lines.append(f"{k}.png {k % 3}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    lp = _lp("ImageData", str(tmp_path / "list.txt"), batch=7, crop=0, mirror=False, shuffle=True,
             root=str(tmp_path) + "/")
    src = make_source(lp, 0, seed=1, stream=True)
    assert src.labels.tolist() == [k % 3 for k in range(7)]   # known from the list: Net checks their range
    epochs = [src.next_batch()[1].tolist() for _ in range(3)]
    assert all(sorted(e) == sorted(k % 3 for k in range(7)) for e in epochs)   # each epoch every image once
    firsts = [src.next_batch()[0] for _ in range(2)]
    assert not torch.equal(firsts[0], firsts[1])   # a new permutation per epoch
    state = src.state_dict()
    nxt = src.next_batch()
    again = make_source(lp, 0, seed=1, stream=True)
    again.load_state_dict(state)
    torch.testing.assert_close(again.next_batch()[0], nxt[0])
    src.close()
    again.close()


def test_stream_errors_name_the_record(tmp_path):
    rng = np.random.default_rng(0)
    write_datum_lmdb(tmp_path / "a", rng.integers(0, 256, (4, 3, 8, 8), dtype=np.uint8), np.zeros(4, int))
    import lmdb as lmdb_mod
    env = lmdb_mod.open(str(tmp_path / "a"))
    with env.begin(write=True) as txn:
        key = list(txn.cursor().iternext(values=False))[2]
        d = caffe_pb2.Datum(channels=3, height=9, width=8, data=bytes(3 * 9 * 8), label=1)
        txn.put(key, d.SerializeToString())
    env.close()
    src = make_source(_lp("Data", str(tmp_path / "a"), batch=4, crop=0, mirror=False), 1, stream=True)
    with pytest.raises(ValueError, match=f"record {key.decode()!r} of LMDB .*a is 9x8, the first record is 8x8"):
        src.next_batch()
    src.close()


def test_net_streams_when_the_data_would_not_fit(lmdb, monkeypatch, tmp_path):
    """Above RESIDENT_BYTES a Net's Data layer reads from disk, and a step trains on it."""
    from exdrop.engine.net import Net
    path, _, _ = lmdb
    net = caffe_pb2.NetParameter()
    net.layer.add().CopyFrom(_lp("Data", str(path), batch=4))
    ip = net.layer.add(name="ip", type="InnerProduct", bottom=["data"], top=["ip"])
    ip.inner_product_param.num_output = 4
    ip.inner_product_param.weight_filler.type = "xavier"
    net.layer.add(name="loss", type="SoftmaxWithLoss", bottom=["ip", "label"], top=["loss"])
    monkeypatch.setattr(S, "RESIDENT_BYTES", 0)
    n = Net(net, 0, "cpu", "stream-net")
    assert isinstance(n.sources["data"], S.StreamSource)
    loss = n.loss(n())
    loss.backward()
    assert torch.isfinite(loss) and n.layer("ip").blobs[0].grad.abs().sum() > 0
    monkeypatch.setattr(S, "RESIDENT_BYTES", 1 << 40)
    assert isinstance(Net(net, 0, "cpu", "stream-net").sources["data"], BatchSource)
    del n   # a dropped net's stream gives its LMDB back, once its prefetch thread lets go of it
    import gc
    import time
    deadline = time.time() + 30
    while str(path.resolve()) in L._OPEN and time.time() < deadline:
        gc.collect()
        time.sleep(0.1)
    assert str(path.resolve()) not in L._OPEN


def test_a_source_dropped_mid_prefetch_closes_quietly(tmp_path, monkeypatch):
    """The last reference to a source can go in its own prefetch thread (the batch decoded ahead
    finishing after the source was dropped): its LMDB still closes, and nothing raises there."""
    import gc
    import sys
    import time
    rng = np.random.default_rng(0)
    write_datum_lmdb(tmp_path / "db", rng.integers(0, 256, (300, 3, 64, 64), dtype=np.uint8), np.zeros(300, int))
    errors = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: errors.append(u.exc_value))
    for _ in range(20):
        src = make_source(_lp("Data", str(tmp_path / "db"), batch=100, crop=0, mirror=False), 1, stream=True)
        src.next_batch()
        del src   # the next batch is being decoded
    deadline = time.time() + 30
    while str((tmp_path / "db").resolve()) in L._OPEN and time.time() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert str((tmp_path / "db").resolve()) not in L._OPEN and not errors, errors


def test_stream_rand_skip_starts_at_a_seeded_record_below_the_skip(lmdb):
    """Caffe's rand_skip: the first batch starts at a record drawn in [0, rand_skip), the same for
    the same seed, and not always the first."""
    path, images, _ = lmdb
    mean = np.array([10, 20, 30], np.float32)[:, None, None]
    starts = {}
    for seed in list(range(10)) + [3]:
        lp = _lp("Data", str(path), mirror=False)
        lp.data_param.rand_skip = 7
        src = make_source(lp, 1, seed=seed, stream=True)   # TEST: centre crop, the records themselves
        x = src.next_batch()[0].numpy()
        src.close()
        start = [s for s in range(13) if np.array_equal(
            x, images[(s + np.arange(5)) % 13, :, 1:7, 1:7].astype(np.float32) - mean)]
        assert len(start) == 1 and starts.setdefault(seed, start[0]) == start[0]
    assert all(0 <= s < 7 for s in starts.values()) and len(set(starts.values())) > 2


def test_stream_resumed_on_another_device_kind_reseeds_from_its_seed(lmdb):
    """A state saved on one device kind (its crop/mirror generator cannot be set on another) is
    resumed with a generator seeded from the saved seed and position: the same for every resume."""
    path, _, _ = lmdb
    a = make_source(_lp("Data", str(path)), 0, seed=3, stream=True)
    a.next_batch()
    state = a.state_dict()
    state["rng_device"] = "elsewhere"
    resumed = []
    for _ in range(2):
        b = make_source(_lp("Data", str(path)), 0, seed=99, stream=True)
        with pytest.warns(UserWarning, match="reseeding"):
            b.load_state_dict(state)
        resumed.append([b.next_batch()[0] for _ in range(3)])
        b.close()
    for x1, x2 in zip(*resumed):
        torch.testing.assert_close(x2, x1, rtol=0, atol=0)
    a.close()


@pytest.mark.parametrize("stream", [True, False])
def test_a_state_from_another_device_kind_reseeds_by_one_rule_and_says_so(lmdb, stream):
    """Streamed or resident, a state saved on another device kind reseeds the crop / mirror generator
    from the saved seed and position (seed * 1000003 + cursor + epoch), with a warning naming the layer."""
    path, _, _ = lmdb
    a = make_source(_lp("Data", str(path)), 0, seed=3, stream=stream)
    for _ in range(4):   # past an epoch: cursor and epoch both count
        a.next_batch()
    state = {**a.state_dict(), "rng_device": "elsewhere"}
    assert state["epoch"] >= 1 and state["cursor"] > 0
    b = make_source(_lp("Data", str(path)), 0, seed=99, stream=stream)
    with pytest.warns(UserWarning, match="layer 'data': data RNG state saved on elsewhere, now on cpu; reseeding"):
        b.load_state_dict(state)
    want = torch.Generator().manual_seed((3 * 1000003 + state["cursor"] + state["epoch"]) % 2 ** 62)
    assert torch.equal(b.gen.get_state(), want.get_state())
    for s in (a, b):
        getattr(s, "close", lambda: None)()


def test_a_streamed_source_is_on_the_device_it_is_given(lmdb):
    path, _, _ = lmdb
    src = make_source(_lp("Data", str(path)), 0, device="cpu:0", seed=1, stream=True)
    assert src.device == torch.device("cpu", 0) and src.next_batch()[0].device == torch.device("cpu")
    src.close()
    resident = make_source(_lp("Data", str(path)), 0, device="cpu:0", seed=1, stream=False)
    assert isinstance(resident, S.BatchSource) and resident.device == torch.device("cpu", 0)


def test_a_move_within_the_device_kind_keeps_the_crops_of_both_sources(lmdb):
    """``cpu`` to ``cpu:0`` keeps the crop / mirror generator, streamed or resident (one rule,
    ``sources.move_generator``): the moved sources draw the crops of one never moved."""
    path, _, _ = lmdb
    unmoved = make_source(_lp("Data", str(path)), 0, seed=1, stream=False)
    want = [unmoved.next_batch()[0] for _ in range(3)]
    for stream in (True, False):
        src = make_source(_lp("Data", str(path)), 0, seed=1, stream=stream)
        gen = src.gen
        assert src.to("cpu:0") is src and src.gen is gen and src.device == torch.device("cpu", 0)
        for batch in want:
            assert torch.equal(src.next_batch()[0], batch)
        if stream:
            src.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_streamed_source_on_cuda_crops_there_and_moves_as_a_resident_one(lmdb):
    path, _, _ = lmdb
    streamed = make_source(_lp("Data", str(path)), 0, device="cuda", seed=1, stream=True)
    resident = make_source(_lp("Data", str(path)), 0, device="cuda", seed=1, stream=False)
    assert streamed.gen.device.type == "cuda"
    for _ in range(2):
        a, b = streamed.next_batch()[0], resident.next_batch()[0]
        assert a.is_cuda and torch.equal(a, b)
    streamed.to("cpu"), resident.to("cpu")   # another kind: both reseed from one draw, alike
    assert torch.equal(streamed.next_batch()[0], resident.next_batch()[0])
    streamed.close()


def test_stream_decodes_in_the_records_dtype(lmdb):
    """The batch decoded ahead keeps the records' uint8 (a quarter of float32's host memory and copy)."""
    path, _, _ = lmdb
    src = make_source(_lp("Data", str(path)), 0, seed=1, stream=True)
    data, _ = src._load(np.arange(5))
    assert data.dtype == torch.uint8 and tuple(data.shape) == (5, 3, 9, 8)
    src.close()


def test_stream_force_gray_and_force_color_reach_the_records(tmp_path):
    """An encoded (PNG) LMDB read with transform_param force_gray is one channel, streamed as
    resident; without it, the colour records stay three channels."""
    import cv2
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (6, 3, 8, 8), dtype=np.uint8)
    pngs = [cv2.imencode(".png", im.transpose(1, 2, 0))[1].tobytes() for im in images]
    write_datum_lmdb(tmp_path / "db", pngs, [k % 2 for k in range(6)], encoded=True)
    for gray, channels in ((True, 1), (False, 3)):
        lp = _lp("Data", str(tmp_path / "db"), batch=3, crop=0, mirror=False)
        del lp.transform_param.mean_value[:]
        lp.transform_param.force_gray = gray
        streamed = make_source(lp, 1, seed=2, stream=True)
        resident = make_source(lp, 1, seed=2, stream=False)
        assert isinstance(streamed, S.StreamSource)
        assert streamed.top_shapes()[0] == (3, channels, 8, 8)
        for _ in range(3):
            torch.testing.assert_close(streamed.next_batch()[0], resident.next_batch()[0], rtol=0, atol=0)
        streamed.close()


def test_image_list_stream_errors_name_the_image_and_its_line(tmp_path):
    import cv2
    rng = np.random.default_rng(3)
    for k in range(4):
        size = 9 if k == 2 else 8
        cv2.imwrite(str(tmp_path / f"{k}.png"), rng.integers(0, 256, (size, 8, 3), dtype=np.uint8))
    (tmp_path / "list.txt").write_text("".join(f"{k}.png {k % 2}\n" for k in range(4)))
    lp = _lp("ImageData", str(tmp_path / "list.txt"), batch=4, crop=0, mirror=False, root=str(tmp_path) + "/")
    src = make_source(lp, 1, stream=True)
    with pytest.raises(ValueError, match=r"layer 'data': image .*2.png \(line 3 of list .*list.txt\) is 9x8, the first record is 8x8"):
        src.next_batch()
    src.close()


@pytest.mark.parametrize("stream", [True, False])
def test_a_data_layer_without_backend_reads_an_lmdb_folder(lmdb, tmp_path, stream):
    """Caffe's DataParameter defaults to LEVELDB; a layer that leaves `backend` out but names an LMDB
    folder is read as LMDB, and one naming a folder that is not an LMDB is refused by name."""
    path, images, labels = lmdb
    lp = _lp("Data", str(path), mirror=False)
    lp.data_param.ClearField("backend")
    src = make_source(lp, 1, stream=stream)
    np.testing.assert_array_equal(src.next_batch()[1].numpy(), labels[:5])
    if stream:
        src.close()
    lp.data_param.source = str(tmp_path)
    with pytest.raises(ValueError, match=r"layer 'data': only the LMDB backend is supported"):
        make_source(lp, 1, stream=stream)


def test_an_input_layer_reads_the_lmdb_it_is_given_at_its_shapes_batch(lmdb):
    """An Input layer (a deploy net) fed from an LMDB: its batch is the first dim of its shape unless given."""
    path, images, labels = lmdb
    lp = caffe_pb2.LayerParameter(name="data", type="Input")
    lp.top.extend(["data"])
    lp.input_param.shape.add().dim.extend([4, 3, 9, 8])
    src = make_source(lp, 1, source=str(path))
    x, y = src.next_batch()
    assert tuple(x.shape) == (4, 3, 9, 8)
    np.testing.assert_array_equal(x.numpy(), images[:4].astype(np.float32))
    np.testing.assert_array_equal(y.numpy(), labels[:4])
    assert make_source(lp, 1, source=str(path), batch_size=2).next_batch()[0].shape[0] == 2
    with pytest.raises(ValueError, match="layer 'data': an Input layer has no data source"):
        make_source(lp, 1)


def test_stream_counts_epochs_as_the_resident_source(lmdb):
    """The epoch in the saved state starts at 0 and counts as the resident source's does, one batch
    ahead (the stream has already drawn the batch it decodes ahead)."""
    path, _, _ = lmdb
    resident = make_source(_lp("Data", str(path)), 0, seed=2, stream=False)
    streamed = make_source(_lp("Data", str(path)), 0, seed=2, stream=True)
    assert streamed.state_dict()["epoch"] == 0
    epochs = []
    for _ in range(8):
        resident.next_batch()
        epochs.append((streamed.state_dict()["epoch"], resident.state_dict()["epoch"]))
        streamed.next_batch()
    assert all(s == r for s, r in epochs) and epochs[-1][0] == 3   # 40 of 13 records drawn
    streamed.close()


def test_a_record_gone_from_the_lmdb_is_named_whatever_its_key_bytes(lmdb):
    path, _, _ = lmdb
    records = S.LMDBRecords(path)
    records.keys[2] = b"gone\xff"   # a key that is not UTF-8, no longer in the LMDB
    with pytest.raises(L.CorruptRecordError, match="record 'gone\ufffd' of LMDB .* is gone "
                                                   r"\(the LMDB changed while it was read\)"):
        records.read(2)
    records.close()


def test_records_keep_one_read_transaction_per_thread(lmdb):
    """LMDB's rule: a thread reads through one transaction, opened at its first read and reused."""
    import threading
    path, _, _ = lmdb
    records = S.LMDBRecords(path)
    opened, env = [], records.db._env
    records.db._env = type("Env", (), {"begin": lambda self, **kw: opened.append(kw) or env.begin(**kw)})()
    try:
        for i in (0, 1, 2):
            records.read(i)
        worker = threading.Thread(target=records.read, args=(3,))
        worker.start()
        worker.join()
    finally:
        records.db._env = env
    assert opened == [{"buffers": True}] * 2   # one for this thread, one for the worker
    records.close()


def test_a_one_record_lmdb_streams_that_record(tmp_path):
    image = np.random.default_rng(5).integers(0, 256, (1, 3, 6, 6), dtype=np.uint8)
    write_datum_lmdb(tmp_path / "one", image, np.array([3]))
    src = make_source(_lp("Data", str(tmp_path / "one"), batch=3, crop=0, mirror=False), 1, stream=True)
    x, y = src.next_batch()
    want = image[0].astype(np.float32) - np.array([10, 20, 30], np.float32)[:, None, None]
    np.testing.assert_array_equal(x.numpy(), np.stack([want] * 3))
    assert y.tolist() == [3, 3, 3]
    src.close()


class _SlowRecords:
    """Records whose reads take a while, counting the reads still running when close() comes."""

    def __init__(self, records):
        self.records, self.running, self.running_at_close = records, 0, None
        self.labels, self.name = records.labels, records.name
        self.lock = threading.Lock()

    def __len__(self):
        return len(self.records)

    def read(self, i):
        with self.lock:
            self.running += 1
        time.sleep(0.05)
        try:
            return self.records.read(i)
        finally:
            with self.lock:
                self.running -= 1

    def close(self):
        self.running_at_close = self.running
        self.records.close()


def test_close_waits_for_the_batch_in_flight_and_the_threads_are_named_for_the_layer(lmdb):
    """close() lets the batch being decoded ahead finish before it closes the records (an LMDB
    closed under a reading thread), and the prefetch thread carries the layer's name (what a
    stack dump of a stuck run shows)."""
    path, _, _ = lmdb
    records = _SlowRecords(S.LMDBRecords(path))
    src = S.StreamSource(records, 5, name="slowdata", threads=1)
    assert any(t.name.startswith("prefetch-slowdata") for t in threading.enumerate())
    src.next_batch()   # the next batch is being decoded now
    src.close()
    assert records.running_at_close == 0
    assert not any(t.name.startswith(("prefetch-slowdata", "decode-slowdata")) for t in threading.enumerate())


def test_list_records_without_a_root_resize_and_name_an_image_they_cannot_decode(tmp_path):
    """An image list of absolute paths needs no root folder; new_height x new_width resizes each
    image; an image OpenCV cannot decode is named with its line."""
    import cv2
    rng = np.random.default_rng(3)
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"{k}.png")
        cv2.imwrite(str(paths[-1]), rng.integers(0, 256, (8, 9, 3), dtype=np.uint8))
    (tmp_path / "list.txt").write_text("".join(f"{p} {k}\n" for k, p in enumerate(paths)))
    records = S.ListRecords(tmp_path / "list.txt")
    img, label = records.read(2)
    assert img.shape == (3, 8, 9) and label == 2
    resized = S.ListRecords(tmp_path / "list.txt", new_height=5, new_width=7)
    assert resized.read(0)[0].shape == (3, 5, 7)
    paths[1].write_bytes(b"not an image")
    with pytest.raises(FileNotFoundError, match=f"^could not load image {paths[1]} \\(line 2 of list "):
        records.read(1)
    from test_bad_inputs_cli import _huge_png
    paths[2].write_bytes(_huge_png())   # a header past OpenCV's pixel limit: OpenCV raises, named here
    with pytest.raises(ValueError, match=f"^cannot decode image image {paths[2]} \\(line 3 of list .*list.txt\\): "
                                         "its header claims more pixels"):
        records.read(2)
