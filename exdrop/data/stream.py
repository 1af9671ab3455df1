"""Batches read from disk as training asks for them, for data sets whose decoded images do not
fit in memory (UCF101 frames, ImageNet): Caffe's Data layer reading its LMDB record by record (or
ImageData its list), with Caffe's prefetch, one batch decoded ahead in threads.

:func:`exdrop.data.make_source` picks a :class:`StreamSource` when the decoded images would take
more than :data:`RESIDENT_BYTES`; smaller data sets stay resident (:class:`BatchSource`, one
gather per batch on the device). Both read the same records in the same order: a ``Data`` layer
sequentially with wrap-around, an ``ImageData`` list in order or in a permutation drawn at each
epoch end. The crops and mirrors come from the same device generator as in :class:`BatchSource`,
so a ``Data`` layer gives the same batches either way. The shuffled order of ``ImageData``
comes from a separate CPU generator here, so the host never waits on the device.

Every record of one source must have one size (the batch is one tensor): convert with a fixed
size (UCF101's frames are; ImageNet at 256x256 as Caffe's create_imagenet.sh).
"""
from __future__ import annotations

import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import torch

from exdrop.proto import caffe_pb2

from exdrop.data.lmdb_datum import CorruptRecordError, close_shared, open_shared, read_image
from exdrop.data.sources import (TRAIN, BatchSource, DataTransformer, _load_lmdb, _phase, load_image_list_data,
                                 move_generator, read_list_entries, resolve_source, restore_generator)

# decoded images above this many bytes are read from disk batch by batch, below it held in memory
RESIDENT_BYTES = 4 << 30
DECODE_THREADS = max(1, min(8, os.cpu_count() or 1))


class LMDBRecords:
    """A Datum LMDB's records by position (key order); the labels are read with the images."""

    def __init__(self, path, force_color: bool = False, force_gray: bool = False):
        self.where = f"LMDB {path}"
        self.db = open_shared(path)
        self.force = (force_color, force_gray)
        with self.db._env.begin() as txn:
            self.keys = list(txn.cursor().iternext(keys=True, values=False))
        if not self.keys:
            raise ValueError(f"LMDB {path} is empty")
        self.labels = None   # known only record by record
        self._local = threading.local()

    def __len__(self) -> int:
        return len(self.keys)

    def name(self, i: int) -> str:
        return f"record {self.keys[i].decode(errors='replace')!r} of {self.where}"

    def read(self, i: int) -> tuple[np.ndarray, int]:
        txn = getattr(self._local, "txn", None)
        if txn is None:   # one read transaction per thread (LMDB's rule)
            txn = self._local.txn = self.db._env.begin(buffers=True)
        value = txn.get(self.keys[i])
        if value is None:
            raise CorruptRecordError(f"{self.name(i)} is gone (the LMDB changed while it was read)")
        return self.db._decode(self.keys[i], bytes(value), *self.force)

    def close(self) -> None:
        if self.db is not None:
            close_shared(self.db)
            self.db = None


class ListRecords:
    """An ImageData list file's images by position (``root_folder + path``, optional resize)."""

    def __init__(self, list_path, root_folder: str = "", new_height: int = 0, new_width: int = 0,
                 is_color: bool = True, layer_name: str = ""):
        self.where = f"list {list_path}"
        self.entries = read_list_entries(list_path, root_folder, layer_name, new_height, new_width)
        self.size = (new_height, new_width)
        self.color = is_color
        self.labels = np.asarray([e[1] for e in self.entries], np.int64)

    def __len__(self) -> int:
        return len(self.entries)

    def name(self, i: int) -> str:
        return f"image {self.entries[i][0]} (line {i + 1} of {self.where})"

    def read(self, i: int) -> tuple[np.ndarray, int]:
        import cv2
        img = read_image(self.entries[i][0], cv2.IMREAD_COLOR if self.color else cv2.IMREAD_GRAYSCALE, self.name(i))
        if img is None:
            raise FileNotFoundError(f"could not load {self.name(i)}")
        if self.size[0] > 0:
            img = cv2.resize(img, (self.size[1], self.size[0]))
        return (img[None] if img.ndim == 2 else img.transpose(2, 0, 1)), self.entries[i][1]

    def close(self) -> None:
        pass


class StreamSource(BatchSource):
    """A :class:`BatchSource` over records read from disk: its reading order (kept on the host),
    ``next_batch()``, ``state_dict()`` / ``load_state_dict()`` (the batch decoded ahead is part of
    the state, so a resume continues exactly) and ``to(device)`` of its own."""

    def __init__(self, records, batch_size: int, transform_param=None, phase=TRAIN, device="cpu",
                 shuffle: bool = False, rand_skip: int = 0, seed: int | None = None, name: str = "",
                 kind: str = "Data", part: slice | None = None, threads: int = DECODE_THREADS):
        if batch_size <= 0:
            raise ValueError(f"layer '{name}': batch_size must be positive")
        self.records, self.name, self.kind, self.part = records, name, kind, part
        self.batch_size, self.phase, self.shuffle = int(batch_size), _phase(phase), bool(shuffle)
        self.n = len(records)
        self.device = torch.device(device)
        first, _ = records.read(0)
        self.in_shape, self.dtype = tuple(first.shape), first.dtype
        self.labels = None if records.labels is None else torch.as_tensor(records.labels).to(self.device)
        self.transformer = DataTransformer(transform_param, self.phase, self.in_shape, self.device, name)
        self.seed = int(torch.randint(0, 2 ** 62, (1,)).item()) if seed is None else int(seed)
        self.gen = torch.Generator(device=self.device)   # crops and mirrors, as BatchSource
        self.gen.manual_seed(self.seed)
        self.order_gen = torch.Generator().manual_seed(self.seed)   # the epoch permutations, on the host
        self._ar_b = torch.arange(self.batch_size)   # BatchSource.next_indices on the host
        self.cursor, self.epoch, self.order = 0, 0, None
        if self.shuffle:
            self._reshuffle()
        if rand_skip:
            self.cursor = int(torch.randint(0, int(rand_skip), (1,), generator=self.order_gen).item()) % self.n
        own = range(self.batch_size)[part] if part is not None else range(self.batch_size)
        # the transformer gathers rows [idx[part]] of the decoded part: positions relative to its first image
        self._local_idx = torch.arange(self.batch_size, device=self.device) - own.start
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix=f"decode-{name}")
        self._ahead = ThreadPoolExecutor(1, thread_name_prefix=f"prefetch-{name}")
        self._pending_idx = self.next_indices().numpy()
        self._pending = self._ahead.submit(self._load, self._pending_idx)
        # a source dropped without close() gives its threads and its LMDB back too; nothing of it
        # runs then (a prefetch holds the source), so nothing is waited for (the last reference may
        # go in its own prefetch thread, which cannot join itself)
        self._finalizer = weakref.finalize(self, _release, self._ahead, self._pool, records, False)

    def _reshuffle(self):
        self.order = torch.randperm(self.n, generator=self.order_gen)

    def _load(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode this process's images of a batch (threads: OpenCV and LMDB release the GIL)."""
        own = idx if self.part is None else idx[self.part]
        out = np.empty((len(own),) + self.in_shape, self.dtype)
        labels = np.empty(len(own), np.int64)

        def one(k):
            img, label = self.records.read(int(own[k]))
            if img.shape != self.in_shape:
                raise CorruptRecordError(f"layer '{self.name}': {self.records.name(int(own[k]))} is "
                                         f"{img.shape[1]}x{img.shape[2]}, the first record is "
                                         f"{self.in_shape[1]}x{self.in_shape[2]}: the records of a data set "
                                         "read from disk must share one size (convert with a fixed size)")
            out[k], labels[k] = img, label
        list(self._pool.map(one, range(len(own))))
        data, lab = torch.from_numpy(out), torch.from_numpy(labels)
        if self.device.type == "cuda":
            data, lab = data.pin_memory(), lab.pin_memory()
        return data, lab

    def next_batch(self) -> list[torch.Tensor]:
        data, labels = self._pending.result()
        self._pending_idx = self.next_indices().numpy()
        self._pending = self._ahead.submit(self._load, self._pending_idx)
        data = data.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        return [self.transformer(data, self._local_idx, self.gen, self.part), labels]

    def state_dict(self) -> dict:
        return {"stream": True, "cursor": self.cursor, "epoch": self.epoch, "n": self.n, "seed": self.seed,
                "order": self.order, "order_rng": self.order_gen.get_state(), "pending": torch.from_numpy(
                    self._pending_idx.copy()), "rng_state": self.gen.get_state(), "rng_device": self.device.type}

    def load_state_dict(self, st: dict):
        if int(st["n"]) != self.n or not st.get("stream"):
            raise ValueError(f"layer '{self.name}': the saved data state is for "
                             f"{'a data set held in memory' if not st.get('stream') else str(st['n']) + ' records'}"
                             f", this source reads {self.n} records from disk")
        self._pending.result()   # let the old prefetch finish before its batch is replaced
        self.cursor, self.epoch = int(st["cursor"]), int(st["epoch"])
        self.order = st.get("order")
        self.order_gen.set_state(st["order_rng"])
        restore_generator(self.gen, st, self.device, self.name, self.cursor, self.epoch)
        self._pending_idx = st["pending"].numpy().astype(np.int64)
        self._pending = self._ahead.submit(self._load, self._pending_idx)

    def to(self, device):
        device = torch.device(device)
        if device == self.device:
            return self
        self.gen = move_generator(self.gen, self.device, device)
        self.device = device
        self.transformer.to(device)
        self._local_idx = self._local_idx.to(device)
        if self.labels is not None:
            self.labels = self.labels.to(device)
        return self

    def close(self) -> None:
        """Stop the prefetch (waiting for a batch in flight) and close the records."""
        if self._finalizer.detach() is not None:
            _release(self._ahead, self._pool, self.records, True)

    def __repr__(self):
        return (f"StreamSource({self.kind} '{self.name}', n={self.n}, batch={self.batch_size}, "
                f"top={self.top_shapes()[0]}, device={self.device}, read from disk)")


def _release(ahead: ThreadPoolExecutor, pool: ThreadPoolExecutor, records, wait: bool) -> None:
    ahead.shutdown(wait=wait, cancel_futures=True)
    pool.shutdown(wait=wait)
    records.close()


__all__ = ["StreamSource", "LMDBRecords", "ListRecords", "RESIDENT_BYTES"]


# ----------------------------------------------------------------------------------------------
# which source a data layer gets: resident or read from disk
# ----------------------------------------------------------------------------------------------
def _streams(first_image: np.ndarray, n: int, stream: bool | None) -> bool:
    """``stream`` as given, else whether ``n`` images like the first would take more than RESIDENT_BYTES."""
    return stream if stream is not None else int(first_image.nbytes) * int(n) > RESIDENT_BYTES


def _stream_source(records, batch_size, tp, phase, device, shuffle, rand_skip, seed, name, kind, part):
    try:
        return StreamSource(records, batch_size, tp, phase, device, shuffle=shuffle, rand_skip=rand_skip, seed=seed,
                            name=name, kind=kind, part=part)
    except BaseException:
        records.close()
        raise


def make_source(layer_param, phase, device="cpu", seed: int | None = None, source: str | None = None,
                batch_size: int | None = None, part: slice | None = None,
                stream: bool | None = None) -> BatchSource:
    """Build the batch source of a ``Data`` / ``ImageData`` layer (or, with ``source`` = an LMDB
    path, of an ``Input`` layer).  ``seed``: the source's RNG seed (crops, mirrors, shuffles);
    None draws one from torch's global generator. ``stream``: read the records from disk batch by
    batch (:class:`StreamSource`); None: when the decoded images would take more than
    :data:`RESIDENT_BYTES`, else hold them in memory."""
    lp = layer_param
    name, typ = lp.name, lp.type
    tp = lp.transform_param if lp.HasField("transform_param") else None
    if typ == "Data":
        dp = lp.data_param
        path = resolve_source(dp.source, name)
        is_lmdb = (path / "data.mdb").is_file() if path.is_dir() else path.is_file()
        if dp.backend != caffe_pb2.DataParameter.LMDB and (dp.HasField("backend") or not is_lmdb):
            raise ValueError(f"layer '{name}': only the LMDB backend is supported (source {dp.source}); "
                             "set `backend: LMDB` and convert the data to LMDB (exdrop.data.prepare_*)")
        if stream is not False:   # decided from the record count and the first record: no key listing
            db = open_shared(path)
            try:
                streams = _streams(next(db.records())[1], len(db), stream)
            finally:
                close_shared(db)
            if streams:
                records = LMDBRecords(path, bool(tp and tp.force_color), bool(tp and tp.force_gray))
                return _stream_source(records, batch_size or dp.batch_size, tp, phase, device, False, dp.rand_skip,
                                      seed, name, "Data", part)
        images, labels = _load_lmdb(path, tp, name)
        return BatchSource(images, labels, batch_size or dp.batch_size, tp, phase, device, shuffle=False,
                           rand_skip=dp.rand_skip, seed=seed, name=name, kind="Data", part=part)
    if typ == "ImageData":
        ip = lp.image_data_param
        path = resolve_source(ip.source, name)
        if stream is not False:
            records = ListRecords(path, ip.root_folder, ip.new_height, ip.new_width, ip.is_color, name)
            if _streams(records.read(0)[0], len(records), stream):
                return _stream_source(records, batch_size or ip.batch_size, tp, phase, device, ip.shuffle,
                                      ip.rand_skip, seed, name, "ImageData", part)
        images, labels = load_image_list_data(path, ip.root_folder, ip.new_height, ip.new_width, ip.is_color, name)
        return BatchSource(images, labels, batch_size or ip.batch_size, tp, phase, device, shuffle=ip.shuffle,
                           rand_skip=ip.rand_skip, seed=seed, name=name, kind="ImageData", part=part)
    if typ == "Input":
        if source is None:
            raise ValueError(f"layer '{name}': an Input layer has no data source; pass source=<LMDB path>")
        path = resolve_source(source, name)
        if batch_size is None:
            try:
                batch_size = int(lp.input_param.shape[0].dim[0])
            except (AttributeError, IndexError):
                raise ValueError(f"layer '{name}': give batch_size for the Input layer") from None
        images, labels = _load_lmdb(path, tp, name)
        return BatchSource(images, labels, batch_size, tp, phase, device, seed=seed, name=name, kind="Input",
                           part=part)
    raise ValueError(f"layer '{name}': no batch source for layer type {typ!r}")
