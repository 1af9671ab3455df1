"""Convert image datasets (folder tree, .tar/.tgz of a tree, or a ``path label`` list file) to
Caffe Datum LMDBs: ``out_dir/{train,val,test}_lmdb`` + ``out_dir/meta.json``.

Images are decoded with OpenCV (BGR, like Caffe's ``convert_imageset``) and stored raw (CHW
uint8).  The train LMDB is shuffled once at conversion with the seed, because Caffe's ``Data``
layer reads records sequentially.  A validation split is carved out of the training data
(stratified: an equal share per class, fixed seed) when the source has no test split.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tarfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from exdrop.data.lmdb_datum import read_image, write_datum_lmdb

__all__ = ["prepare_image_dataset", "open_image_source", "read_image_list", "RawDataset", "RawSplit",
           "IMAGE_EXTS", "resize_short_side"]

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".jpe"}
_META_VERSION = 1
_TEST_NAMES = ("test", "val", "valid", "validation")


@dataclass
class RawSplit:
    """One split of a source: per-item name (for LMDB keys), label, and a loader giving CHW uint8 BGR."""
    names: list[str]
    labels: np.ndarray
    load: Callable[[int], np.ndarray]

    def __len__(self):
        return len(self.names)

    def subset(self, idx) -> "RawSplit":
        idx = np.asarray(idx, np.int64)
        load = self.load
        return RawSplit([self.names[i] for i in idx], self.labels[idx], lambda i: load(int(idx[i])))


@dataclass
class RawDataset:
    classes: list[str]
    splits: dict[str, RawSplit] = field(default_factory=dict)   # 'train' and optionally 'test'
    fmt: str = ""


# ----------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------
def _decode(buf: bytes, what: str, resize=None, gray=False) -> np.ndarray:
    import cv2
    img = read_image(buf, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR, what)
    if img is None:
        raise ValueError(f"cannot decode image {what}")
    return _finish(img, resize)


def _imread(path: str, resize=None, gray=False) -> np.ndarray:
    import cv2
    img = read_image(path, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR, path)
    if img is None:
        raise ValueError(f"cannot read image {path}")
    return _finish(img, resize)


def _finish(img: np.ndarray, resize) -> np.ndarray:
    if resize is not None:
        import cv2
        h, w = resize
        img = cv2.resize(img, (int(w), int(h)))   # INTER_LINEAR, as Caffe's ReadImageToCVMat
    return img[None] if img.ndim == 2 else np.ascontiguousarray(img.transpose(2, 0, 1))


def resize_short_side(img: np.ndarray, side: int) -> np.ndarray:
    """``img`` (HWC or HW) scaled so that its short side is ``side``, the aspect ratio kept
    (cv2 INTER_AREA when shrinking, INTER_LINEAR when enlarging)."""
    import cv2
    h, w = img.shape[:2]
    s = side / min(h, w)
    if s == 1:
        return img
    return cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


def _is_visible(path: str) -> bool:
    return not any(part.startswith(".") or part == "__MACOSX" for part in path.split("/"))


def _is_image(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    if base.startswith(".") or "__MACOSX/" in name:   # hidden files, macOS AppleDouble "._x.jpg"
        return False
    return os.path.splitext(base)[1].lower() in IMAGE_EXTS


# ----------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------
def _tree_splits(rel_paths: list[str], load_rel: Callable[[str], np.ndarray], where: str,
                 dirs=()) -> RawDataset:
    """Find the folder whose subfolders (the classes) hold the images; ``train``/``test`` (or
    ``val``) sibling roots give a train and a test split. ``dirs``: every folder of the tree
    (relative paths), so that a class folder without images is an error, not a silent
    renumbering of the classes after it."""
    roots: dict[str, dict[str, list[str]]] = {}
    for p in rel_paths:
        parts = p.split("/")
        if len(parts) < 2:
            continue   # an image not inside a class folder
        root, cls = "/".join(parts[:-2]), parts[-2]
        roots.setdefault(root, {}).setdefault(cls, []).append(p)
    if not roots:
        raise ValueError(f"no class folders with images found in {where} (expected <class>/<image> files)")
    if len(roots) == 1:
        split_roots = {"train": next(iter(roots))}
    else:
        by_base = {r.rsplit("/", 1)[-1].lower(): r for r in roots}
        test = next((by_base[t] for t in _TEST_NAMES if t in by_base), None)
        if "train" not in by_base or len(roots) != 1 + (test is not None):
            raise ValueError(f"ambiguous image tree in {where}: class folders found under "
                             f"{sorted(r or '.' for r in roots)}; point to one of them")
        split_roots = {"train": by_base["train"]}
        if test is not None:
            split_roots["test"] = test
    for root in split_roots.values():
        empty = sorted(d for d in dirs if d and d.rpartition("/")[0] == root and _is_visible(d)
                       and d.rpartition("/")[2] not in roots[root])
        if empty:
            raise ValueError(f"class folder(s) {empty} in {where} hold no images: every folder next to "
                             "the other classes is a class (its index is its sorted position); add images "
                             "or remove the folder")
    classes = sorted(roots[split_roots["train"]])
    cidx = {c: i for i, c in enumerate(classes)}
    ds = RawDataset(classes=classes)
    for split, root in split_roots.items():
        names, labels = [], []
        for cls in sorted(roots[root]):
            if cls not in cidx:
                raise ValueError(f"class {cls!r} of the {split} split in {where} is not a training class")
            for p in sorted(roots[root][cls]):
                names.append(p)
                labels.append(cidx[cls])
        ds.splits[split] = RawSplit(names, np.asarray(labels, np.int64),
                                    (lambda n: lambda i: load_rel(n[i]))(names))
    return ds


def _read_folder(root: Path, resize=None, gray=False) -> RawDataset:
    rel, dirs = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        dirs += [Path(dirpath, d).relative_to(root).as_posix() for d in dirnames]
        for f in filenames:
            if _is_image(f):
                rel.append(Path(dirpath, f).relative_to(root).as_posix())
    ds = _tree_splits(rel, lambda r: _imread(str(root / r), resize, gray), str(root), dirs)
    ds.fmt = "folder"
    return ds


def _open_stream(path: Path):
    """Decompressing binary stream of a (possibly gzip/bz2/xz-compressed) file."""
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] == b"\x1f\x8b":
        import gzip
        return io.BufferedReader(gzip.open(path, "rb"), 1 << 20)
    if magic[:3] == b"BZh":
        import bz2
        return io.BufferedReader(bz2.open(path, "rb"), 1 << 20)
    if magic == b"\xfd7zXZ\x00":
        import lzma
        return io.BufferedReader(lzma.open(path, "rb"), 1 << 20)
    return open(path, "rb", buffering=1 << 20)


class _TarFallback(Exception):
    pass


def _iter_tar_fast(path: Path):
    """Yield (name, read_fn) of the regular files of a ustar/GNU/pax tar, in archive order.
    A plain header walk (tarfile's per-member Python overhead dominates on 50k tiny files);
    raises _TarFallback on anything unusual."""
    with _open_stream(path) as f:
        long_name = None
        pax_name = None
        while True:
            hdr = f.read(512)
            if len(hdr) < 512 or hdr == b"\0" * 512:
                return
            try:
                size = int(hdr[124:136].rstrip(b"\0 ").decode() or "0", 8)
            except ValueError:
                raise _TarFallback from None
            typ = hdr[156:157]
            name = hdr[0:100].split(b"\0", 1)[0]
            if hdr[257:263] == b"ustar\x00" and hdr[345:346] != b"\0":   # POSIX prefix field
                name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
            padded = (size + 511) // 512 * 512
            if typ in (b"L", b"x", b"g"):
                body = f.read(padded)[:size]
                if typ == b"L":
                    long_name = body.split(b"\0", 1)[0]
                elif typ == b"x":
                    for rec in body.split(b"\n"):
                        kv = rec.split(b" ", 1)[-1]
                        if kv.startswith(b"path="):
                            pax_name = kv[5:]
                        elif kv.startswith(b"size="):
                            raise _TarFallback   # pax size override: let tarfile handle it
                continue
            if typ in (b"0", b"\0", b"7"):
                name = pax_name or long_name or name
                long_name = pax_name = None
                data = f.read(padded)
                if len(data) < size:
                    raise _TarFallback
                yield name.decode("utf-8", "surrogateescape"), data[:size]
            elif typ in (b"1", b"2", b"3", b"4", b"5", b"6"):
                name = pax_name or long_name or name
                long_name = pax_name = None
                f.read(padded)
                if typ == b"5":
                    yield name.decode("utf-8", "surrogateescape").rstrip("/") + "/", None
            else:
                raise _TarFallback


def _iter_tar(path: Path):
    try:
        yield from _iter_tar_fast(path)
        return
    except _TarFallback:
        pass
    with tarfile.open(path, "r|*") as tf:   # slow but general
        for m in tf:
            if m.isfile():
                yield m.name, tf.extractfile(m).read()
            elif m.isdir():
                yield m.name.rstrip("/") + "/", None


class _Members(dict):
    """Image member -> bytes, plus ``dirs``: every folder of the archive."""
    dirs: set


def _scan_tar(path: Path, progress=True) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """One streaming pass over a tar: (image member -> bytes, cifar pickle member -> bytes)."""
    images, pickles = _Members(), {}
    images.dirs = set()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc=f"reading {path.name}", unit="file", disable=None)
    for name, data in _iter_tar(path):
        if name.startswith("./"):
            name = name[2:]
        base = name.rsplit("/", 1)[-1]
        folder = name.rstrip("/").rpartition("/")[0]
        while folder:   # the folders of every member, whether the archive lists them or not
            images.dirs.add(folder)
            folder = folder.rpartition("/")[0]
        if data is None:
            images.dirs.add(name.rstrip("/"))
        elif _is_image(name):
            images[name] = data
        elif base.startswith(("data_batch_", "test_batch", "batches.meta")):
            pickles[base] = data
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return images, pickles


def _tar_dataset(path: Path, images: dict[str, bytes], resize=None, gray=False) -> RawDataset:
    ds = _tree_splits(sorted(images), lambda r: _decode(images[r], f"{r} in {path}", resize, gray), str(path),
                      sorted(getattr(images, "dirs", ())))
    ds.fmt = "tar"
    return ds


def read_image_list(list_file, root: str | None = None) -> tuple[list[str], np.ndarray]:
    """Parse a Caffe ``path label`` list file (split at the last whitespace, like Caffe's
    ImageData layer).  Relative paths are resolved against ``root`` (default: the list's folder)."""
    list_file = Path(list_file)
    base = Path(root) if root is not None else list_file.parent
    paths, labels = [], []
    try:
        text = list_file.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{list_file} is neither a folder, a .tar/.tgz archive nor a 'path label' "
                         "list file") from None
    for ln, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise ValueError(f"{list_file}:{ln}: expected 'path label', got {line!r}")
        try:
            lab = int(parts[1])
        except ValueError:
            raise ValueError(f"{list_file}:{ln}: label {parts[1]!r} is not an integer") from None
        if lab < 0:
            raise ValueError(f"{list_file}:{ln}: label {lab} is negative (a class index: 0, 1, ...)")
        p = Path(parts[0])
        paths.append(str(p if p.is_absolute() else base / p))
        labels.append(lab)
    if not paths:
        raise ValueError(f"list file {list_file} has no entries")
    return paths, np.asarray(labels, np.int64)


def _read_list(path: Path, resize=None, gray=False) -> RawDataset:
    paths, labels = read_image_list(path)
    # Caffe's list labels are class indices: a list using 0..8 and 99 has 100 classes, most of them empty
    ds = RawDataset(classes=[str(u) for u in range(int(labels.max()) + 1)], fmt="list")
    base = str(path.parent.resolve()) + os.sep
    names = [os.path.abspath(p) for p in paths]
    names = [n[len(base):] if n.startswith(base) else n for n in names]
    ds.splits["train"] = RawSplit([n.replace(os.sep, "/") for n in names], labels,
                                  lambda i: _imread(paths[i], resize, gray))
    return ds


def open_image_source(source, resize=None, gray=False, progress=True) -> RawDataset:
    """Open a folder tree, a .tar/.tgz of a tree, or a ``path label`` list file."""
    source = Path(source)
    if source.is_dir():
        return _read_folder(source, resize, gray)
    if tarfile.is_tarfile(source):
        images, _ = _scan_tar(source, progress)
        return _tar_dataset(source, images, resize, gray)
    return _read_list(source, resize, gray)


# ----------------------------------------------------------------------------------------------
# conversion
# ----------------------------------------------------------------------------------------------
def _fingerprint(source: Path) -> dict:
    st = source.stat()
    if not source.is_dir():
        return {"size": st.st_size, "mtime": int(st.st_mtime)}
    n = size = 0
    mtime = st.st_mtime
    for dirpath, _, filenames in os.walk(source):
        for f in filenames:
            s = os.stat(os.path.join(dirpath, f))
            n, size, mtime = n + 1, size + s.st_size, max(mtime, s.st_mtime)
    return {"files": n, "size": size, "mtime": int(mtime)}


def _check_labels(ds: RawDataset, source) -> None:
    """Every label a class index of ``ds.classes``: refused at conversion, naming the record, not later
    inside training."""
    for split, part in ds.splits.items():
        bad = np.flatnonzero((part.labels < 0) | (part.labels >= len(ds.classes)))
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"{source}: {split} record {part.names[i]!r} has label {int(part.labels[i])}, outside "
                             f"0..{len(ds.classes) - 1} ({len(ds.classes)} classes); {len(bad)} such record(s)")


def _pick_per_class(labels: np.ndarray, limit: int, rng) -> np.ndarray:
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) > limit:
            idx = np.sort(rng.choice(idx, limit, replace=False))
        keep.append(idx)
    return np.sort(np.concatenate(keep))


def _stratified_split(labels: np.ndarray, val_size: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): an equal share of ``val_size`` per class (remainder to the first classes)."""
    classes = np.unique(labels)
    share, rem = divmod(val_size, len(classes))
    val = []
    for k, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        want = share + (k < rem)
        if want >= len(idx):
            raise ValueError(f"val_size={val_size} asks {want} images of class {c}, which has only "
                             f"{len(idx)}: use a smaller val_size")
        val.append(rng.permutation(idx)[:want])
    val = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


def _write_split(split: RawSplit, path: Path, desc: str, progress=True):
    first_shape = [None]

    def load_chunk(rng):
        return [split.load(i) for i in rng]

    def gen():   # decode chunks in threads (cv2 releases the GIL), keeping the order
        n, chunk = len(split), 128
        chunks = [range(s, min(n, s + chunk)) for s in range(0, n, chunk)]
        workers = max(1, min(4, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as ex:
            pending = deque(ex.submit(load_chunk, c) for c in chunks[:2 * workers])   # bounded read-ahead
            for k, rng in enumerate(chunks):
                arrays = pending.popleft().result()
                if k + 2 * workers < len(chunks):
                    pending.append(ex.submit(load_chunk, chunks[k + 2 * workers]))
                for i, a in zip(rng, arrays):
                    if first_shape[0] is None:
                        first_shape[0] = a.shape
                    elif a.shape != first_shape[0]:
                        raise ValueError(f"image {split.names[i]} has shape {a.shape} (CHW), the first one "
                                         f"has {first_shape[0]}: pass resize=(h, w)")
                    yield a

    write_datum_lmdb(path, gen(), split.labels, names=split.names, total=len(split),
                     progress=desc if progress else False)
    return first_shape[0]


def _load_meta(out_dir: Path, params: dict):
    mp = out_dir / "meta.json"
    if not mp.is_file():
        return None
    try:
        meta = json.loads(mp.read_text())
    except ValueError:
        return None
    if meta.get("params") != params:
        return None
    for k in ("train", "val", "test"):
        if meta.get(k) and not (out_dir / meta[k]).is_dir():
            return None
    return meta


def _result(out_dir: Path, meta: dict) -> dict:
    r = {k: (str(out_dir / meta[k]) if meta.get(k) else None) for k in ("train", "val", "test")}
    r.update(classes=meta["classes"], counts=meta["counts"], shape=meta.get("shape"),
             meta=str(out_dir / "meta.json"), out_dir=str(out_dir))
    return r


def _prepare(source, out_dir, reader: Callable[[Path], RawDataset], *, val_size, seed, limit_per_class,
             resize, kind, force=False, progress=True, check: Callable[[RawDataset], None] | None = None,
             missing_hint: str = "") -> dict:
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{kind} source not found: {source}. {missing_hint}".strip())
    out_dir = Path(out_dir)
    params = {"version": _META_VERSION, "kind": kind, "source": str(source.resolve()),
              "fingerprint": _fingerprint(source), "val_size": val_size, "seed": seed,
              "limit_per_class": limit_per_class, "resize": list(resize) if resize else None}
    if not force:
        meta = _load_meta(out_dir, params)
        if meta is not None:
            return _result(out_dir, meta)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)   # written last: marks a finished conversion

    ds = reader(source)
    if check is not None:
        check(ds)
    _check_labels(ds, source)
    rng = np.random.default_rng(seed)
    train = ds.splits["train"]
    test = ds.splits.get("test")
    if limit_per_class:
        train = train.subset(_pick_per_class(train.labels, limit_per_class, rng))
        if test is not None:
            test = test.subset(_pick_per_class(test.labels, limit_per_class, rng))
    # validation: carved from train when there is no test split (or when asked explicitly)
    n_val = val_size if val_size is not None else (0 if test is not None else round(0.1 * len(train)))
    val = None
    if n_val:
        tr_idx, va_idx = _stratified_split(train.labels, n_val, rng)
        val = train.subset(rng.permutation(va_idx))
        train = train.subset(tr_idx)
    train = train.subset(rng.permutation(len(train)))   # Caffe's Data layer reads sequentially

    files = {"train": "train_lmdb", "val": "val_lmdb" if val is not None else None,
             "test": "test_lmdb" if test is not None else None}
    for k in ("val", "test"):
        stale = out_dir / f"{k}_lmdb"
        if files[k] is None and (stale.is_symlink() or stale.exists()):
            stale.unlink() if stale.is_symlink() else shutil.rmtree(stale)
    shape = _write_split(train, out_dir / files["train"], "train", progress)
    counts = {"train": len(train), "train_per_class": np.bincount(train.labels, minlength=len(ds.classes)).tolist()}
    if val is not None:
        _write_split(val, out_dir / files["val"], "val", progress)
        counts.update(val=len(val), val_per_class=np.bincount(val.labels, minlength=len(ds.classes)).tolist())
    if test is not None:
        _write_split(test, out_dir / files["test"], "test", progress)
        counts.update(test=len(test), test_per_class=np.bincount(test.labels, minlength=len(ds.classes)).tolist())
    if val is None and test is not None:
        # No carved validation: validate on the official test split. The prototxts read
        # `val_lmdb`, so it is a link to the test LMDB.
        (out_dir / "val_lmdb").symlink_to("test_lmdb", target_is_directory=True)
        files["val"] = "val_lmdb"
    meta = {"params": params, "format": ds.fmt, "classes": list(ds.classes), "counts": counts,
            "shape": list(shape) if shape is not None else None, **files}
    tmp = out_dir / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out_dir / "meta.json")
    return _result(out_dir, meta)


def prepare_image_dataset(source, out_dir, val_size: int | None = None, seed: int = 0,
                          resize: tuple[int, int] | None = None, limit_per_class: int | None = None,
                          gray: bool = False, force: bool = False, progress: bool = True) -> dict:
    """Convert an image dataset once into ``out_dir/{train,val,test}_lmdb`` + ``meta.json``.

    ``source``: a folder tree ``<class>/<image>`` (class index = sorted folder order; a
    ``train/`` + ``test/`` (or ``val/``) pair of such trees gives a test split), a .tar/.tgz of
    such a tree (the folder whose subfolders hold the images is found inside), or a list file
    of ``path label`` lines (paths relative to the list's folder, or absolute).
    ``val_size``: images carved (stratified, seeded) from the training data for validation;
    None = 10% of it when the source has no test split, none when it has one (then ``val`` is
    the test LMDB).  ``resize=(h, w)`` resizes every image (cv2 INTER_LINEAR).
    A second call with the same source and parameters returns at once (``force`` rebuilds).
    Returns dict(train, val, test (paths or None), classes, counts, shape, meta, out_dir).
    """
    return _prepare(source, out_dir, lambda s: open_image_source(s, resize, gray, progress),
                    val_size=val_size, seed=seed, limit_per_class=limit_per_class, resize=resize,
                    kind="image dataset" if not gray else "image dataset (gray)", force=force,
                    progress=progress,
                    missing_hint="Give a folder of <class>/<image> files, a .tar/.tgz of one, or a "
                                 "'path label' list file.")


def _unpickle(buf: bytes, where: str = "pickle"):
    """A CIFAR batch pickle: dicts, lists, bytes and numpy arrays only. Any other global (a
    function a crafted pickle would call) is refused before it is looked up, so nothing runs.
    (Python 3 writes bytes at protocol 2 as ``_codecs.encode(text, "latin1")``: admitted for
    latin1 only.)"""
    allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def latin1_bytes(text, encoding):
        if encoding not in ("latin1", "latin-1"):
            raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}: only latin1 is read")
        return text.encode("latin1")

    class CifarUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise ValueError(f"{where}: refused: the pickle asks for {module}.{name}, which a CIFAR-10 "
                                 "batch never holds (only numpy arrays, dicts, lists and bytes are read)")
            if name == "encode":
                return latin1_bytes
            if name == "_reconstruct":
                return np.ndarray.__reduce__(np.zeros(0))[0]   # numpy's own _reconstruct, whatever its module
            return getattr(np, name)

    try:
        return CifarUnpickler(io.BytesIO(buf), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{where}: not a readable CIFAR-10 batch pickle ({type(exc).__name__}: {exc})") from None
