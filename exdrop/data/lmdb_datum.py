"""Caffe ``Datum`` LMDBs: write them like ``convert_imageset`` does, read them back whole.

Layout (Caffe's): one record per image, key ``f"{i:08d}_{name}"`` (or ``f"{i:08d}"``), value a
serialized ``caffe.Datum`` holding the pixels as CHW uint8 in **BGR** channel order (or the
encoded image file bytes with ``encoded=true``).  Caffe's ``Data`` layer reads the records in key
order, which the zero-padded index prefix makes equal to the writing order.

``lmdb`` is imported lazily so that the rest of the package works on machines without it.
"""
from __future__ import annotations

import os
import shutil
import struct
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from exdrop.proto import caffe_pb2

__all__ = ["write_datum_lmdb", "DatumLMDB", "CorruptRecordError", "datum_to_array", "array_to_datum",
           "check_lmdb_file"]


class CorruptRecordError(ValueError):
    """A record of a Datum LMDB could not be decoded."""



def read_image(source, flag: int, what: str):
    """``cv2.imread`` (``source`` a path) or ``cv2.imdecode`` (bytes): the image, or None where OpenCV
    cannot decode it. What OpenCV raises instead (an empty buffer; a header claiming more pixels than
    its limit, CV_IO_MAX_IMAGE_PIXELS) becomes a ValueError naming ``what``."""
    import cv2
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if not len(source):
                raise ValueError(f"cannot decode image {what}: an empty file (0 bytes)")
            return cv2.imdecode(np.frombuffer(source, np.uint8), flag)
        return cv2.imread(str(source), flag)
    except cv2.error as exc:
        reason = ("its header claims more pixels than OpenCV decodes (CV_IO_MAX_IMAGE_PIXELS)"
                  if "MAX_IMAGE_PIXELS" in str(exc) else f"OpenCV refused it ({str(exc).strip().splitlines()[-1]})")
        raise ValueError(f"cannot decode image {what}: {reason}") from None

def _lmdb():
    try:
        import lmdb
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise ImportError("the 'lmdb' package is needed for Caffe LMDB data: pip install lmdb") from e
    return lmdb


def _pb():
    return caffe_pb2


# ----------------------------------------------------------------------------------------------
# Datum <-> array
# ----------------------------------------------------------------------------------------------
def array_to_datum(chw: np.ndarray, label: int, encoded: bool = False, datum=None):
    """Build a ``caffe.Datum`` from a CHW uint8 array (BGR).  With ``encoded`` the pixels are
    stored PNG-encoded (lossless); ``bytes`` input with ``encoded`` is stored as-is (file bytes)."""
    pb = _pb()
    d = datum if datum is not None else pb.Datum()
    d.Clear()
    d.label = int(label)
    if encoded and isinstance(chw, (bytes, bytearray, memoryview)):
        d.data = bytes(chw)
        d.encoded = True
        return d
    a = np.asarray(chw)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"expected a CHW image, got shape {a.shape}")
    c, h, w = a.shape
    d.channels, d.height, d.width = c, h, w
    if encoded:
        import cv2
        hwc = a.transpose(1, 2, 0) if c > 1 else a[0]
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(hwc.astype(np.uint8, copy=False)))
        if not ok:
            raise ValueError("cv2.imencode failed")
        d.data = buf.tobytes()
        d.encoded = True
    elif a.dtype == np.uint8:
        d.data = np.ascontiguousarray(a).tobytes()
    else:
        d.float_data.extend(np.asarray(a, np.float32).ravel().tolist())
    return d


def datum_to_array(d, force_color: bool = False, force_gray: bool = False) -> np.ndarray:
    """Decode a ``caffe.Datum`` to a CHW array: uint8 for byte data or encoded images, float32
    for ``float_data``.  Encoded images are decoded like Caffe's DataTransformer (native colour
    unless ``force_color``/``force_gray``)."""
    if d.encoded:
        import cv2
        flag = (cv2.IMREAD_COLOR if force_color else cv2.IMREAD_GRAYSCALE if force_gray
                else cv2.IMREAD_ANYCOLOR)
        img = read_image(d.data, flag, "of an encoded Datum")
        if img is None:
            raise ValueError("cv2.imdecode could not decode the encoded image")
        return img[None] if img.ndim == 2 else img.transpose(2, 0, 1)
    c, h, w = d.channels, d.height, d.width
    if d.data:
        if len(d.data) != c * h * w:
            raise ValueError(f"data has {len(d.data)} bytes, expected {c}x{h}x{w}={c * h * w}")
        return np.frombuffer(d.data, np.uint8).reshape(c, h, w)
    if len(d.float_data) != c * h * w or c * h * w == 0:
        raise ValueError(f"float_data has {len(d.float_data)} values, expected {c}x{h}x{w}")
    return np.asarray(d.float_data, np.float32).reshape(c, h, w)


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_tmp(path: Path):
    """Remove temp folders of earlier, killed conversions of ``path`` (and our own leftover)."""
    for t in path.parent.glob(f".{path.name}.tmp-*"):
        pid = t.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or not _pid_alive(int(pid)):
            shutil.rmtree(t, ignore_errors=True)


def write_datum_lmdb(path, images, labels, encoded: bool = False, names: Sequence[str] | None = None,
                     map_size: int | None = None, progress: bool | str = False,
                     total: int | None = None) -> Path:
    """Write images and labels to a Caffe Datum LMDB at ``path`` (replacing any existing one).

    ``images``: a uint8 array (N,C,H,W) or any iterable of CHW uint8 arrays -- already in Caffe's
    BGR channel order -- (or raw file ``bytes`` when ``encoded``).  ``labels``: ints, one per
    image.  ``names``: optional per-record names for keys ``f"{i:08d}_{name}"`` (like
    ``convert_imageset``), else keys are ``f"{i:08d}"``.  The LMDB is built in a sibling temp
    folder and renamed into place at the end, so an interrupted run never leaves a half LMDB.
    The map size starts at ``map_size`` (or an estimate) and doubles whenever it fills up.
    Returns the path.
    """
    lmdb = _lmdb()
    pb = _pb()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove_stale_tmp(path)
    labels = list(labels) if not isinstance(labels, np.ndarray) else labels
    n_expected = total if total is not None else (len(images) if hasattr(images, "__len__") else len(labels))
    if map_size is None:
        per = int(np.prod(images.shape[1:])) if isinstance(images, np.ndarray) else 4096
        map_size = max(1 << 24, int(n_expected * (per + 64) * 1.3))
    it: Iterable = images
    if progress:
        from tqdm import tqdm
        it = tqdm(images, total=n_expected, desc=progress if isinstance(progress, str) else path.name,
                  unit="img", disable=None)

    env = lmdb.open(str(tmp), map_size=map_size, subdir=True, meminit=False, map_async=True)
    n = 0
    try:
        pending: list[tuple[bytes, bytes]] = []
        datum = pb.Datum()

        def flush():
            nonlocal map_size
            while True:
                try:
                    with env.begin(write=True) as txn:
                        for k, v in pending:
                            txn.put(k, v)
                    break
                except lmdb.MapFullError:
                    map_size *= 2
                    env.set_mapsize(map_size)
            pending.clear()

        for i, img in enumerate(it):
            if i >= len(labels):
                raise ValueError(f"more images than labels ({len(labels)})")
            key = f"{i:08d}_{names[i]}" if names is not None else f"{i:08d}"
            array_to_datum(img, int(labels[i]), encoded=encoded, datum=datum)
            pending.append((key.encode(), datum.SerializeToString()))
            n += 1
            if len(pending) >= 2000:
                flush()
        flush()
        if n != len(labels):
            raise ValueError(f"{n} images but {len(labels)} labels")
        env.sync(True)
    except BaseException:
        env.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    env.close()
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------
_MDB_MAGIC = 0xBEEFC0DE
_PAGE_HEADER = 16   # mp_pgno (8), mp_pad, mp_flags, mp_lower, mp_upper (2 each)
_P_META = 0x08


def _read_meta(f, offset: int) -> dict | None:
    """One LMDB meta page (64-bit layout of mdb.c's MDB_meta) at ``offset``, None if it is not one."""
    f.seek(offset)
    raw = f.read(_PAGE_HEADER + 136)
    if len(raw) < _PAGE_HEADER + 136:
        return None
    flags = struct.unpack_from("<H", raw, 10)[0]
    magic, version = struct.unpack_from("<II", raw, _PAGE_HEADER)
    if not flags & _P_META or magic != _MDB_MAGIC:
        return None
    m = _PAGE_HEADER + 24                   # mm_dbs[0] (free DB): its md_pad holds the page size
    psize = struct.unpack_from("<I", raw, m)[0]
    entries = struct.unpack_from("<Q", raw, m + 48 + 32)[0]   # mm_dbs[1] (main DB): md_entries
    last_pg, txnid = struct.unpack_from("<QQ", raw, m + 96)
    return {"psize": psize, "entries": entries, "last_pg": last_pg, "txnid": txnid}


def check_lmdb_file(path) -> int:
    """Validate an LMDB's meta pages and size before mapping it; returns its record count.

    lmdb maps the file: a truncated ``data.mdb`` kills the process with SIGBUS on the first
    read past its end, and a zeroed meta page gives a bare ``lmdb.InvalidError``. Like
    ``mdb_env_read_header`` both meta pages must be valid; the newer one (higher txnid) must
    fit in the file: ``(last_pg + 1) * page_size`` bytes.
    """
    path = Path(path)
    data = path / "data.mdb" if path.is_dir() else path
    if not data.is_file():
        raise FileNotFoundError(f"LMDB {path}: no data.mdb in it")
    size = data.stat().st_size
    with open(data, "rb") as f:
        first = _read_meta(f, 0)
        if first is None:
            raise ValueError(f"LMDB {path}: {data.name} is not an LMDB file or its meta page 0 is "
                             f"corrupt (zeroed?); rebuild the LMDB")
        second = _read_meta(f, first["psize"]) if 512 <= first["psize"] <= 1 << 16 else None
    if second is None:
        raise ValueError(f"LMDB {path}: meta page 1 of {data.name} is corrupt (zeroed?); rebuild the LMDB")
    meta = max(first, second, key=lambda m: m["txnid"])
    need = (meta["last_pg"] + 1) * meta["psize"]
    if size < need:
        raise ValueError(f"LMDB {path}: {data.name} is truncated: {size} bytes, its meta page says "
                         f"{need} ({meta['last_pg'] + 1} pages of {meta['psize']}); rebuild the LMDB")
    return int(meta["entries"])


class DatumLMDB:
    """Read-only view of a Caffe Datum LMDB (records in key order, as Caffe's Data layer reads)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"LMDB not found: {self.path}")
        check_lmdb_file(self.path)
        lmdb = _lmdb()
        try:
            self._env = lmdb.open(str(self.path), readonly=True, lock=False, readahead=False,
                                  subdir=self.path.is_dir(), max_readers=64)
        except lmdb.Error as e:
            raise ValueError(f"LMDB {self.path}: cannot open it: {e}") from None
        self._shape = None

    def close(self):
        self._env.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return int(self._env.stat()["entries"])

    def _decode(self, key: bytes, value: bytes, force_color=False, force_gray=False):
        pb = _pb()
        d = pb.Datum()
        try:
            d.ParseFromString(value)
            return datum_to_array(d, force_color, force_gray), int(d.label)
        except Exception as e:
            raise CorruptRecordError(
                f"corrupt record in LMDB {self.path}: key {key.decode(errors='replace')!r}: {e}") from e

    def records(self, force_color=False, force_gray=False) -> Iterator[tuple[str, np.ndarray, int]]:
        """Yield ``(key, chw_array, label)`` in key order."""
        lmdb = _lmdb()
        try:
            with self._env.begin(buffers=False) as txn:
                for k, v in txn.cursor():
                    a, lab = self._decode(k, v, force_color, force_gray)
                    yield k.decode(errors="replace"), a, lab
        except lmdb.Error as e:
            raise ValueError(f"LMDB {self.path} is corrupt: {e}; rebuild the LMDB") from None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the first record."""
        if self._shape is None:
            for _, a, _ in self.records():
                self._shape = tuple(a.shape)
                break
            else:
                raise ValueError(f"LMDB {self.path} is empty")
        return self._shape

    def read_all(self, force_color=False, force_gray=False, progress=False):
        """All records as ``(images, labels)``: images (N,C,H,W) uint8 (float32 if the records
        hold ``float_data``), labels int64 (N,)."""
        n = len(self)
        if n == 0:
            raise ValueError(f"LMDB {self.path} is empty")
        out = None
        labels = np.empty(n, np.int64)
        it = self.records(force_color, force_gray)
        if progress:
            from tqdm import tqdm
            it = tqdm(it, total=n, desc=self.path.name, unit="img", disable=None)
        i = -1
        for i, (key, a, lab) in enumerate(it):
            if out is None:
                out = np.empty((n,) + a.shape, a.dtype)
                self._shape = tuple(a.shape)
            elif a.shape != out.shape[1:]:
                raise CorruptRecordError(f"record {key!r} of LMDB {self.path} has shape {a.shape}, "
                                         f"the first record has {out.shape[1:]}")
            if a.dtype != out.dtype and out.dtype == np.uint8:
                out = out.astype(np.float32)
            out[i] = a
            labels[i] = lab
        if out is None:
            raise ValueError(f"LMDB {self.path} says it holds {n} records but none can be read; rebuild it")
        if i + 1 != n:
            out, labels = out[: i + 1], labels[: i + 1]
        return out, labels


# LMDB opens an environment once per process: the sources reading one LMDB share it
_OPEN: dict[str, list] = {}
_OPEN_LOCK = threading.Lock()


def open_shared(path) -> DatumLMDB:
    """The process's one DatumLMDB of ``path`` (py-lmdb opens an environment once per process);
    give it back with :func:`close_shared`."""
    key = os.path.realpath(path)
    with _OPEN_LOCK:
        entry = _OPEN.get(key)
        if entry is None:
            entry = _OPEN[key] = [DatumLMDB(path), 0]
        entry[1] += 1
        return entry[0]


def close_shared(db: DatumLMDB) -> None:
    """Give back a DatumLMDB of :func:`open_shared`; the last user closes it."""
    key = os.path.realpath(db.path)
    with _OPEN_LOCK:
        entry = _OPEN.get(key)
        if entry is None or entry[0] is not db:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _OPEN[key]
            db.close()
