"""Caltech-256 (Griffin, Holub & Perona 2007) to Caffe LMDBs, as the paper uses it (Sec. 4.1).

**Source.** The ``256_ObjectCategories`` folder (``001.ak47/001_0001.jpg`` ... ``256.toad/``,
``257.clutter/``), a folder holding it, or its tar ``256_ObjectCategories.tar`` (1.2 GB, from
the CaltechDATA record https://data.caltech.edu/records/nyy15-4j048, whose file list gives md5
``67b4f42ca05d46448c6bb8ecd2220f6d``). The official tar is uncompressed and is read in place,
member by member; a compressed tar is streamed twice and the chosen images are held in memory.
A local copy is always accepted; one named ``256_ObjectCategories.tar`` whose md5 differs is
converted with a warning.

**Classes.** The 256 object folders in sorted order, ``001.ak47`` -> label 0 ... ``256.toad``
-> 255; ``257.clutter`` (the background class) is left out. Only images directly inside a class
folder count: the official archive's stray subfolder ``056.dog/greg`` and its non-image file
``198.spider/RENAME2`` are skipped.

**Splits.** The paper trains on "five different random splits of 50 training images and 20
testing images for each class". Split ``s`` (0..4) ranks the images of class folder ``c`` by
``sha256(f"{s}/{c}/{file name}")``; the first 50 are the training images, the next 20 the test
images, the rest (Caltech-256 has 80 to 827 per class) are unused. The rank of an image depends
only on the split index and its own name, so a split is the same on any machine, and the five
splits differ. A class with fewer than 50 + 20 images is an error naming the class.

**Images.** Decoded by OpenCV as 3-channel BGR (``IMREAD_COLOR``: the grayscale images of
Caltech-256 get three equal channels), resized to 128x128 with ``cv2.resize``'s default
``INTER_LINEAR``, the aspect ratio not kept -- what Caffe's ``convert_imageset --resize_height
128 --resize_width 128`` does (``ReadImageToCVMat``). Stored raw (CHW uint8) in
``train_lmdb`` (shuffled once, seeded by the split index, since Caffe's Data layer reads in key
order) and ``test_lmdb``; ``val_lmdb`` links to ``test_lmdb``, the source the prototxts in
``prototxt/cnn2/caltech256/`` test on (their default folder is ``data/caltech256``).
"""
from __future__ import annotations

import hashlib
import os
import re
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np

from exdrop.data.cifar import _warn_md5
from exdrop.data.images import RawDataset, RawSplit, _decode, _imread, _is_image, _iter_tar, _prepare

__all__ = ["CALTECH256_URL", "CALTECH256_MD5", "CALTECH256_SPLITS", "prepare_caltech256", "caltech256_split"]

CALTECH256_URL = "https://data.caltech.edu/records/nyy15-4j048/files/256_ObjectCategories.tar"
CALTECH256_MD5 = "67b4f42ca05d46448c6bb8ecd2220f6d"   # the md5 listed on the CaltechDATA record
CALTECH256_SPLITS = 5
_CLASSES = 256
_CLUTTER = re.compile(r"^(\d+\.)?clutter$", re.IGNORECASE)


def _hint(source) -> str:
    return (f"Fetch 256_ObjectCategories.tar (1.2 GB, md5 {CALTECH256_MD5}) from {CALTECH256_URL} "
            f"(exdrop does not download it) and put it at {source}, or point to it or to the extracted "
            "256_ObjectCategories folder: make data-caltech256 CALTECH256=<path>, or "
            "exdrop data --dataset caltech256 <path>.")


def _visible(name: str) -> bool:
    return not name.startswith(".") and name != "__MACOSX"


class _Listing:
    """The image files (paths relative to the source, '/'-separated) and folders of a folder or
    tar, and a loader of the chosen ones (CHW uint8 BGR, resized to ``size`` x ``size``)."""

    def __init__(self, source: Path, size: int, progress: bool = True):
        self.source, self.resize = source, (size, size)
        self.offsets: dict[str, tuple[int, int]] | None = None   # uncompressed tar: (data offset, size)
        self._fd = None
        self.files: list[str] = []
        self.dirs: set[str] = set()
        if source.is_dir():
            for dirpath, dirnames, filenames in os.walk(source):
                rel = Path(dirpath).relative_to(source).as_posix()
                prefix = "" if rel == "." else rel + "/"
                self.dirs.update(prefix + d for d in dirnames)
                self.files += [prefix + f for f in filenames if _is_image(f)]
        elif tarfile.is_tarfile(source):
            self._scan_tar(progress)
        else:
            raise ValueError(f"{source} is neither a folder nor a tar archive: give the 256_ObjectCategories "
                             "folder or 256_ObjectCategories.tar")

    def _add(self, name: str, is_dir: bool, where: dict | None = None, value=None):
        name = name[2:] if name.startswith("./") else name
        name = name.rstrip("/")
        folder = name if is_dir else name.rpartition("/")[0]
        while folder:   # the folders of every member, whether the archive lists them or not
            self.dirs.add(folder)
            folder = folder.rpartition("/")[0]
        if not is_dir and _is_image(name):
            self.files.append(name)
            if where is not None:
                where[name] = value

    def _scan_tar(self, progress):
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(desc=f"listing {self.source.name}", unit="file", disable=None)
        try:
            tf = tarfile.open(self.source, "r:")   # uncompressed: headers only, members read in place later
        except tarfile.ReadError:
            tf = None
        if tf is not None:
            self.offsets = {}
            with tf:
                for m in tf:
                    if m.isfile() or m.isdir():
                        self._add(m.name, m.isdir(), self.offsets, (m.offset_data, m.size))
                    if bar is not None:
                        bar.update()
        else:
            for name, data in _iter_tar(self.source):
                self._add(name, data is None)
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()

    def loader(self, chosen: list[str]) -> Callable[[str], np.ndarray]:
        src = self.source
        if src.is_dir():
            return lambda rel: _imread(str(src / rel), self.resize)
        if self.offsets is not None:
            self._fd = fd = os.open(src, os.O_RDONLY)

            def read(rel):
                off, n = self.offsets[rel]
                buf = os.pread(fd, n, off)
                if len(buf) != n:
                    raise ValueError(f"{rel} in {src}: {len(buf)} of its {n} bytes: the tar is truncated")
                return _decode(buf, f"{rel} in {src}", self.resize)
            return read
        want = set(chosen)   # compressed tar: a second pass keeps the chosen members
        blobs = {}
        for name, data in _iter_tar(src):
            name = name[2:] if name.startswith("./") else name
            if data is not None and name in want:
                blobs[name] = data
        return lambda rel: _decode(blobs[rel], f"{rel} in {src}", self.resize)

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _layout(files: list[str], dirs: set[str], where: str, n_classes: int, need: int):
    """(root, class folders in label order, {class: its image file names, sorted}, images skipped).

    The root is the folder with the most class folders holding images; every visible folder in
    it is a class (an empty one too, so that it is reported rather than renumbering the classes
    after it), except the clutter folder."""
    by_root: dict[str, dict[str, list[str]]] = {}
    for f in files:
        parts = f.split("/")
        if len(parts) >= 2:
            by_root.setdefault("/".join(parts[:-2]), {}).setdefault(parts[-2], []).append(parts[-1])
    if not by_root:
        raise ValueError(f"no class folders with images in {where} "
                         "(expected 256_ObjectCategories/<NNN.name>/<image>.jpg)")
    root = max(sorted(by_root), key=lambda r: len(by_root[r]))
    found = by_root[root]
    for d in dirs:
        parent, _, name = d.rpartition("/")
        if parent == root and _visible(name):
            found.setdefault(name, [])
    skipped = len(files) - sum(len(v) for v in found.values())
    classes = sorted(c for c in found if _visible(c) and not _CLUTTER.match(c))
    at = f"{where}" + (f" (folder {root})" if root else "")
    if len(classes) != n_classes:
        raise ValueError(f"{at}: {len(classes)} class folders besides the clutter folder, expected {n_classes} "
                         f"(001.ak47 ... 256.toad); found {classes[:3]}{' ...' if len(classes) > 3 else ''}")
    short = [(c, len(found[c])) for c in classes if len(found[c]) < need]
    if short:
        listed = ", ".join(f"{c} ({n})" for c, n in short[:5]) + (" ..." if len(short) > 5 else "")
        raise ValueError(f"{at}: class folder {short[0][0]} has {short[0][1]} images, fewer than the {need} a "
                         f"split takes per class (train + test); short classes (images): {listed}")
    return root, classes, {c: sorted(found[c]) for c in classes}, skipped


def caltech256_split(split: int, class_folder: str, names, train_per_class: int = 50,
                     test_per_class: int = 20) -> tuple[list[str], list[str]]:
    """(train, test) file names of one class in split ``split``: the class's images ranked by
    ``sha256(f"{split}/{class_folder}/{name}")``, the first ``train_per_class`` for training, the
    next ``test_per_class`` for testing (each list sorted by name)."""
    ranked = sorted(names, key=lambda n: hashlib.sha256(f"{split}/{class_folder}/{n}".encode()).digest())
    return (sorted(ranked[:train_per_class]),
            sorted(ranked[train_per_class:train_per_class + test_per_class]))


def _prepare_caltech(source, out_dir, split: int, train_per_class: int, test_per_class: int, size: int,
                     force: bool, progress: bool, n_classes: int = _CLASSES) -> dict:
    if split not in range(CALTECH256_SPLITS):
        raise ValueError(f"split={split}: Caltech-256 has the paper's {CALTECH256_SPLITS} random splits, 0..4")
    for k, v in (("train_per_class", train_per_class), ("test_per_class", test_per_class), ("size", size)):
        if int(v) != v or v < 1:
            raise ValueError(f"{k}={v}: expected a positive integer")
    source = Path(source).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"Caltech-256 source not found: {source}. {_hint(source)}")
    listings = []

    def read(src: Path) -> RawDataset:
        if src.is_file() and src.name == "256_ObjectCategories.tar":
            _warn_md5(src, CALTECH256_MD5)
        lst = _Listing(src, size, progress)
        listings.append(lst)
        root, classes, images, _ = _layout(lst.files, lst.dirs, str(src), n_classes,
                                           train_per_class + test_per_class)
        prefix = root + "/" if root else ""
        picked = {"train": ([], []), "test": ([], [])}
        for label, c in enumerate(classes):
            tr, te = caltech256_split(split, c, images[c], train_per_class, test_per_class)
            for key, names in (("train", tr), ("test", te)):
                picked[key][0].extend(f"{c}/{n}" for n in names)
                picked[key][1].extend([label] * len(names))
        load = lst.loader([prefix + n for key in picked for n in picked[key][0]])
        ds = RawDataset(classes=classes, fmt="caltech256-" + ("folder" if src.is_dir() else "tar"))
        for key, (names, labels) in picked.items():
            ds.splits[key] = RawSplit(names, np.asarray(labels, np.int64),
                                      (lambda ns: lambda i: load(prefix + ns[i]))(names))
        return ds

    kind = f"Caltech-256 split {split}: {train_per_class} train + {test_per_class} test per class"
    if n_classes != _CLASSES:
        kind += f", {n_classes} classes"
    try:
        return _prepare(source, out_dir, read, val_size=None, seed=split, limit_per_class=None,
                        resize=(size, size), kind=kind, force=force, progress=progress)
    finally:
        for lst in listings:
            lst.close()


def prepare_caltech256(source, out_dir, split: int = 0, train_per_class: int = 50, test_per_class: int = 20,
                       size: int = 128, force: bool = False, progress: bool = True) -> dict:
    """Convert one of the paper's five Caltech-256 splits once into ``out_dir/train_lmdb``,
    ``test_lmdb``, ``val_lmdb`` (a link to ``test_lmdb``) + ``meta.json``.

    ``source``: the ``256_ObjectCategories`` folder, a folder holding it, or
    ``256_ObjectCategories.tar``. ``split`` (0..4) picks the split (see the module docstring:
    per class, the images ranked by a sha256 of the split index and the file name, the first
    ``train_per_class`` = 50 for training, the next ``test_per_class`` = 20 for testing; 256
    classes, 257.clutter left out, labels 0..255 in folder order). Images become
    ``size`` x ``size`` 3-channel BGR (cv2 INTER_LINEAR, aspect ratio not kept). A class with
    fewer than 70 images raises ``ValueError`` naming it. Idempotent: a second call with the same
    source and parameters returns at once (``force`` rebuilds); another split rebuilds
    ``out_dir``. Returns dict(train, val, test, classes, counts, shape, meta, out_dir).
    """
    return _prepare_caltech(source, out_dir, split, train_per_class, test_per_class, size, force, progress)
