"""CIFAR-10 and CIFAR-100 to Caffe LMDBs.

Accepted sources: the official ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` (or the
extracted ``cifar-10-batches-py`` / ``cifar-100-python`` folder), an image tree
``<class>/<image>`` (or a .tar/.tgz of one, e.g. ``train/<class>/<n>.jpg``), or a ``path label``
list file.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import tarfile
import urllib.request
import warnings
from pathlib import Path

import numpy as np

from exdrop.data.images import (RawDataset, RawSplit, _is_image, _iter_tar, _prepare, _scan_tar, _tar_dataset, _unpickle,
                                open_image_source)

__all__ = ["CIFAR10_CLASSES", "CIFAR10_URL", "CIFAR10_MD5", "download_cifar10", "md5sum",
           "read_cifar10_python", "prepare_cifar10",
           "CIFAR100_URL", "CIFAR100_MD5", "download_cifar100", "read_cifar100_python", "prepare_cifar100"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_HINT = ("Get CIFAR-100 with exdrop.data.download_cifar100(<dir>) (needs network; fetches "
                 f"{CIFAR100_URL}, md5 {CIFAR100_MD5}), or point to the extracted cifar-100-python folder, "
                 "an image tree / .tgz or a list file (`make data-cifar100 CIFAR100=<path>`).")
CIFAR10_HINT = ("Get CIFAR-10 with exdrop.data.download_cifar10(<dir>) (needs network; fetches "
                f"{CIFAR10_URL}), or point to an image tree / .tgz such as "
                "shared/data/cifar10-jpg/train.tgz (`make data-cifar10`).")


def md5sum(path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


def download_cifar10(dest, url: str = CIFAR10_URL, md5: str = CIFAR10_MD5, progress: bool = True) -> Path:
    """Download ``cifar-10-python.tar.gz`` into the folder ``dest`` (kept if already there with
    the right md5) and return its path.  A wrong checksum raises ``ValueError``."""
    return _download(url, Path(dest) / "cifar-10-python.tar.gz", md5, "CIFAR-10", progress,
                     "(make train-cifar10 / make data-cifar10) or --data <path> (exdrop train); an image tree "
                     "or .tgz of CIFAR-10 JPEGs works too.")


def download_cifar100(dest, url: str = CIFAR100_URL, md5: str = CIFAR100_MD5, progress: bool = True) -> Path:
    """Download ``cifar-100-python.tar.gz`` into the folder ``dest`` (kept if already there with
    the right md5) and return its path.  A wrong checksum raises ``ValueError``."""
    return _download(url, Path(dest) / "cifar-100-python.tar.gz", md5, "CIFAR-100", progress,
                     "or CIFAR100=<path> (make data-cifar100) or exdrop data --dataset cifar100 <path>; an "
                     "image tree or .tgz of CIFAR-100 images works too.")


def _download(url: str, out: Path, md5: str, what: str, progress: bool, elsewhere: str) -> Path:
    """``url`` to ``out`` through ``out.part`` (renamed only once its md5 matches)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file() and md5sum(out) == md5:
        return out
    part = out.with_name(out.name + ".part")
    try:
        try:
            r = urllib.request.urlopen(url, timeout=60)
        except (OSError, http.client.HTTPException) as exc:   # URLError, timeouts, refused connections
            reason = getattr(exc, "reason", None) or exc
            raise OSError(
                f"could not download {what} from {url} ({reason}). Without a network: fetch that file "
                f"elsewhere (md5 {md5}) and put it at {out}, or point to a copy with DATA=<path> "
                f"{elsewhere}") from None
        with r, open(part, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            bar = None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=total, unit="B", unit_scale=True, desc=what.lower(), disable=None)
            while True:
                b = r.read(1 << 20)
                if not b:
                    break
                f.write(b)
                if bar is not None:
                    bar.update(len(b))
            if bar is not None:
                bar.close()
        got = md5sum(part)
        if got != md5:
            raise ValueError(f"md5 mismatch for {url} (downloaded for {out}): got {got}, expected {md5}; "
                             "the partial file was removed, try again or fetch it by hand")
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out


def _from_pickles(pickles: dict[str, bytes], where: str) -> RawDataset:
    def batch(name):
        what = f"{where}: member {name}"
        d = _unpickle(pickles[name], what)
        if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
            raise ValueError(f"{what}: no data / labels: not a CIFAR-10 batch")
        raw = np.asarray(d[b"data"], np.uint8)
        if raw.ndim != 2 or raw.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{what}: data of shape {raw.shape}; a CIFAR-10 batch holds rows of 3072 bytes "
                             "(32x32 pixels, R then G then B)")
        data = raw.reshape(-1, 3, 32, 32)[:, ::-1]   # RGB rows -> BGR CHW
        labels = np.asarray(d[b"labels"], np.int64)
        if labels.shape != (len(data),):
            raise ValueError(f"{what}: {labels.size} labels for {len(data)} images")
        names = [f.decode() if isinstance(f, bytes) else str(f) for f in d.get(b"filenames", [])]
        return np.ascontiguousarray(data), labels, names

    train_names = sorted((k for k in pickles if k.startswith("data_batch_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if not train_names:
        raise ValueError(f"no data_batch_* files in {where}")
    classes = CIFAR10_CLASSES
    if "batches.meta" in pickles:
        meta = _unpickle(pickles["batches.meta"], f"{where}: member batches.meta")
        classes = [c.decode() if isinstance(c, bytes) else c for c in meta[b"label_names"]]
    ds = RawDataset(classes=list(classes), fmt="cifar-python")
    for split, names in (("train", train_names), ("test", ["test_batch"] if "test_batch" in pickles else [])):
        if not names:
            continue
        parts = [batch(n) for n in names]
        data = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        fnames = sum((p[2] for p in parts), [])
        if len(fnames) != len(data):
            fnames = [f"{split}_{i}" for i in range(len(data))]
        ds.splits[split] = RawSplit(fnames, labels, (lambda a: lambda i: a[i])(data))
    return ds


def read_cifar10_python(source) -> RawDataset:
    """Read the official pickled CIFAR-10 (``cifar-10-python.tar.gz`` or the extracted folder)."""
    source = Path(source)
    if source.is_dir():
        d = source / "cifar-10-batches-py" if (source / "cifar-10-batches-py").is_dir() else source
        pickles = {p.name: p.read_bytes() for p in d.iterdir()
                   if p.name.startswith(("data_batch_", "test_batch", "batches.meta"))}
    else:
        _, pickles = _scan_tar(source, progress=False)
    return _from_pickles(pickles, str(source))


def _read_any(source: Path, progress=True) -> RawDataset:
    if source.is_dir():
        if (source / "data_batch_1").is_file() or (source / "cifar-10-batches-py" / "data_batch_1").is_file():
            return read_cifar10_python(source)
        return open_image_source(source, progress=progress)
    if tarfile.is_tarfile(source):
        images, pickles = _scan_tar(source, progress)
        if any(k.startswith("data_batch_") for k in pickles):
            return _from_pickles(pickles, str(source))
        return _tar_dataset(source, images)
    return open_image_source(source, progress=progress)


def _check(ds: RawDataset):
    if len(ds.classes) != 10:
        raise ValueError(f"CIFAR-10 source has {len(ds.classes)} classes ({ds.classes[:12]}), expected 10")


def prepare_cifar10(source, out_dir, val_size: int | None = None, seed: int = 0,
                    limit_per_class: int | None = None, force: bool = False, progress: bool = True) -> dict:
    """Convert CIFAR-10 once into ``out_dir/train_lmdb``, ``val_lmdb``, ``test_lmdb`` + ``meta.json``.

    Without a test split in the source (e.g. the 50k training JPEGs), ``val_size`` images
    (default 5000 = 10%, an equal share per class, seeded) are carved out of the training data:
    45k train / 5k val.  With the official pickled archive, the 10k test batch becomes
    ``test_lmdb``, nothing is carved by default (``val`` then points at the test LMDB), unless
    ``val_size`` is given.  The train LMDB is shuffled once with ``seed``.  Idempotent: a second
    call with the same source and parameters returns at once.  Returns dict(train, val, test,
    classes, counts, shape, meta, out_dir).
    """
    return _prepare(source, out_dir, lambda s: _read_any(s, progress), val_size=val_size, seed=seed,
                    limit_per_class=limit_per_class, resize=None, kind="CIFAR-10", force=force,
                    progress=progress, check=_check, missing_hint=CIFAR10_HINT)


# ----------------------------------------------------------------------------------------------
# CIFAR-100
# ----------------------------------------------------------------------------------------------
_CIFAR100_MEMBERS = ("train", "test", "meta")


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _cifar100_from_pickles(pickles: dict[str, bytes], where: str) -> RawDataset:
    """The pickled dicts of ``cifar-100-python``: ``meta`` (``fine_label_names``), ``train`` and
    ``test`` (``data``: N x 3072 uint8 rows, R then G then B planes of 32x32; ``fine_labels``;
    ``filenames``).  Only the 100 fine labels are kept (the paper's CIFAR-100 task)."""
    missing = [m for m in ("train", "meta") if m not in pickles]
    if missing:
        raise ValueError(f"{where}: no member {' or '.join(missing)} (cifar-100-python holds train, test and meta)")
    meta = _unpickle(pickles["meta"], f"{where}: member meta")
    if not isinstance(meta, dict) or b"fine_label_names" not in meta:
        raise ValueError(f"{where}: member meta has no fine_label_names: not a CIFAR-100 meta file")
    classes = [_text(c) for c in meta[b"fine_label_names"]]
    ds = RawDataset(classes=classes, fmt="cifar100-python")
    for split in ("train", "test"):
        if split not in pickles:
            continue
        what = f"{where}: member {split}"
        d = _unpickle(pickles[split], what)
        if not isinstance(d, dict) or b"data" not in d or b"fine_labels" not in d:
            raise ValueError(f"{what}: no data / fine_labels: not a CIFAR-100 batch")
        data = np.asarray(d[b"data"], np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{what}: data has shape {data.shape}, expected (N, 3072)")
        data = np.ascontiguousarray(data.reshape(-1, 3, 32, 32)[:, ::-1])   # RGB rows -> BGR CHW
        labels = np.asarray(d[b"fine_labels"], np.int64)
        if len(labels) != len(data):
            raise ValueError(f"{what}: {len(labels)} fine_labels for {len(data)} images")
        bad = labels[(labels < 0) | (labels >= len(classes))]
        if len(bad):
            raise ValueError(f"{what}: fine label {int(bad[0])} outside 0..{len(classes) - 1}")
        names = [_text(f) for f in d.get(b"filenames", [])]
        if len(names) != len(data):
            names = [f"{split}_{i}" for i in range(len(data))]
        ds.splits[split] = RawSplit(names, labels, (lambda a: lambda i: a[i])(data))
    return ds


def _cifar100_tar_pickles(source: Path) -> dict[str, bytes]:
    """The ``train``/``test``/``meta`` members of a tar; stops at the first image member (an
    archive of images, which the image reader then reads)."""
    pickles = {}
    for name, data in _iter_tar(source):
        if data is None:
            continue
        if _is_image(name):
            return {}
        base = name.rsplit("/", 1)[-1]
        if base in _CIFAR100_MEMBERS:
            pickles[base] = data
    return pickles


def read_cifar100_python(source) -> RawDataset:
    """Read the official pickled CIFAR-100 (``cifar-100-python.tar.gz`` or the extracted folder)."""
    source = Path(source)
    if source.is_dir():
        d = source / "cifar-100-python" if (source / "cifar-100-python").is_dir() else source
        pickles = {m: (d / m).read_bytes() for m in _CIFAR100_MEMBERS if (d / m).is_file()}
    else:
        pickles = _cifar100_tar_pickles(source)
    return _cifar100_from_pickles(pickles, str(source))


def _read_any100(source: Path, progress=True) -> RawDataset:
    if source.is_dir():
        d = source / "cifar-100-python" if (source / "cifar-100-python").is_dir() else source
        if (d / "train").is_file() and (d / "meta").is_file():
            return read_cifar100_python(source)
        return open_image_source(source, progress=progress)
    if tarfile.is_tarfile(source):
        pickles = _cifar100_tar_pickles(source)
        if pickles:
            if source.name == "cifar-100-python.tar.gz":
                _warn_md5(source, CIFAR100_MD5)
            return _cifar100_from_pickles(pickles, str(source))
    return open_image_source(source, progress=progress)


def _warn_md5(path: Path, md5: str):
    """A local copy is always converted; one that differs from the official archive is named."""
    got = md5sum(path)
    if got != md5:
        warnings.warn(f"{path}: md5 {got}, not the official archive's {md5}; converting this copy anyway",
                      stacklevel=3)


def _check100(ds: RawDataset):
    if len(ds.classes) != 100:
        raise ValueError(f"CIFAR-100 source has {len(ds.classes)} classes ({ds.classes[:12]}), expected 100")


def prepare_cifar100(source, out_dir, val_size: int | None = None, seed: int = 0,
                     limit_per_class: int | None = None, force: bool = False, progress: bool = True) -> dict:
    """Convert CIFAR-100 (100 fine classes, Krizhevsky 2009) once into ``out_dir/train_lmdb``,
    ``val_lmdb``, ``test_lmdb`` + ``meta.json``, exactly like :func:`prepare_cifar10`.

    The official archive's ``train`` (50k) and ``test`` (10k) become ``train_lmdb`` and
    ``test_lmdb``, the paper's standard split (Sec. 4.1); ``val_lmdb`` links to the test LMDB
    unless ``val_size`` carves a stratified, seeded validation set out of the training data
    (which an image tree without a test split gets by default: 10%).  Pixels are stored BGR CHW
    like Caffe; labels are the fine labels 0..99 in ``fine_label_names`` order (for an image
    tree: sorted folder names).  A local archive whose md5 is not the official one is converted
    with a warning.  Idempotent; returns dict(train, val, test, classes, counts, shape, meta,
    out_dir).
    """
    return _prepare(source, out_dir, lambda s: _read_any100(s, progress), val_size=val_size, seed=seed,
                    limit_per_class=limit_per_class, resize=None, kind="CIFAR-100", force=force,
                    progress=progress, check=_check100, missing_hint=CIFAR100_HINT)


def official_source(source: str, dataset: str = "cifar10") -> str:
    """``source``, or the official archive of ``dataset`` (cifar10, cifar100) fetched with its
    checksum when ``source`` is that archive's default path and missing."""
    archive, fetch, title = {"cifar10": ("cifar-10-python.tar.gz", download_cifar10, "CIFAR-10"),
                             "cifar100": ("cifar-100-python.tar.gz", download_cifar100, "CIFAR-100")}[dataset]
    path = Path(source)
    if not path.exists() and path.name == archive:
        print(f"{path} not found: downloading the official {title} archive (needs a network) ...")
        return str(fetch(path.parent))
    return source
