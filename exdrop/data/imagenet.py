"""ILSVRC-2012 (ImageNet; Russakovsky et al. 2015) for the paper's Sec. 5: AlexNet trained from
scratch with Standard or Activation Dropout at fc6 (``prototxt/alexnet/imagenet/``).

    prepare_imagenet(train_dir, val_dir, out_dir="data/ilsvrc12", val_labels=None, meta=None,
                     resize=None, short_side=None, lmdb=True, limit_per_class=None, seed=0) -> dict

**Layout.** ``train_dir`` holds the class folders ``n01440764/n01440764_10026.JPEG`` ...
(``ILSVRC2012_img_train.tar`` holds one tar per class: unpack each into a folder of its name).
``val_dir`` is flat, ``ILSVRC2012_val_00000001.JPEG`` ..., labelled by ``val_labels``; or it is
already sorted into the same ``<wnid>/`` folders, which then give the labels.

**Classes.** The wnid folders of ``train_dir`` in sorted order are labels 0, 1, ...: the order of
Caffe's ``synsets.txt`` and so of its ``train.txt`` / ``val.txt`` and of bvlc_alexnet's fc8.

**Validation labels** (``val_labels``), any of:

* the devkit's ``ILSVRC2012_validation_ground_truth.txt``: line k is the ILSVRC2012_ID of
  ``ILSVRC2012_val_{k:08d}.JPEG``; the devkit's ``meta.mat`` (``meta``; default: the one beside
  it; read with scipy) maps an ID to its wnid;
* Caffe's ``val.txt`` (``data/ilsvrc12/get_ilsvrc_aux.sh``): ``ILSVRC2012_val_00000001.JPEG 65``,
  the number a line of ``synsets.txt`` (``meta``; default: the one beside it; without one the
  train folders must be all 1000 classes); a wnid in place of the number is read too;
* Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, whose first word is the wnid).

Given with a sorted val folder too, the file and the folders must agree. Every labelled image
must be in the val folder and every image there must have a label.

**Output** in ``out_dir``: ``train.txt`` and ``val.txt``, Caffe ImageData lists (``path label``,
paths relative to ``train_dir`` / ``val_dir``: an ImageData layer's ``root_folder``), and
``synsets.txt``; with ``lmdb``, Datum LMDBs as Caffe's ``examples/imagenet/create_imagenet.sh``
makes them: ``train_lmdb`` shuffled once (seeded), ``test_lmdb`` the val images in ``val.txt``
order, ``val_lmdb`` a link to it (the source of the prototxts' TEST layer), and ``meta.json``.
A second call with the same sources and options returns at once (``force`` rebuilds).

**Images.** Decoded by OpenCV as 3-channel BGR (the few CMYK and PNG files among the train JPEGs
included) and resized to 256x256 with ``cv2.resize``'s INTER_LINEAR, the aspect ratio not kept:
``convert_imageset --resize_height 256 --resize_width 256``, what create_imagenet.sh does and
bvlc_alexnet was trained on (``resize=(h, w)`` for another size). ``short_side=S`` instead keeps
the aspect ratio: the short side becomes S, and the centre S x S is stored. An image OpenCV
cannot read stops the conversion with an error naming it.

Sizes: the full train LMDB at 256x256 is about 250 GB (1,281,167 x 196,608 bytes), the val one
10 GB; ``limit_per_class`` keeps a seeded subset of each class (train and val).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from exdrop.data.images import RawDataset, RawSplit, _finish, _imread, _is_image, _pick_per_class, _prepare, resize_short_side
from exdrop.data.lmdb_datum import read_image

__all__ = ["prepare_imagenet", "list_train", "read_val_labels", "list_val", "IMAGENET_URL"]

IMAGENET_URL = "https://image-net.org/download-images.php"
HINT = (f"ILSVRC-2012 is at {IMAGENET_URL} (a login is needed; exdrop does not download it): "
        "ILSVRC2012_img_train.tar (unpack it, then each class's n*.tar into a folder of its name), "
        "ILSVRC2012_img_val.tar, and ILSVRC2012_devkit_t12.tar.gz for the validation labels "
        "(data/ILSVRC2012_validation_ground_truth.txt with data/meta.mat); Caffe's val.txt and synsets.txt "
        "(caffe/data/ilsvrc12/get_ilsvrc_aux.sh) label the val images too")
CLASSES = 1000
_VAL_NAME = "ILSVRC2012_val_{:08d}.JPEG"


def _visible(name: str) -> bool:
    return not name.startswith(".") and name != "__MACOSX"


def list_train(train_dir) -> tuple[list[str], list[tuple[str, int]]]:
    """(the wnid folders of ``train_dir`` sorted, [(``wnid/file``, label)] sorted by path)."""
    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{train_dir}: no ILSVRC-2012 train folder; {HINT}")
    classes, tars = [], []
    for e in os.scandir(train_dir):
        if not _visible(e.name):
            continue
        if e.is_dir():
            classes.append(e.name)
        elif e.name.lower().endswith(".tar"):
            tars.append(e.name)
    if tars:
        raise ValueError(f"{train_dir} holds {len(tars)} per-class archive(s) ({sorted(tars)[0]}, ...): unpack "
                         f"each into a folder of its name, e.g. cd {train_dir} && for f in n*.tar; do "
                         'mkdir -p "${f%.tar}" && tar -xf "$f" -C "${f%.tar}" && rm "$f"; done')
    if not classes:
        raise ValueError(f"{train_dir}: no class folders (expected n01440764/n01440764_10026.JPEG ...); {HINT}")
    classes.sort()
    items = []
    for label, c in enumerate(classes):
        files = sorted(e.name for e in os.scandir(train_dir / c) if e.is_file() and _is_image(e.name))
        if not files:
            raise ValueError(f"class folder {train_dir / c} holds no images: every folder in {train_dir} is a "
                             "class (its label is its sorted position); add its images or remove it")
        items += [(f"{c}/{f}", label) for f in files]
    return classes, items


def _read_meta_mat(path: Path) -> dict[int, str]:
    """The devkit's meta.mat: ILSVRC2012_ID -> wnid (IDs 1..1000 are the classes)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError(f"{path}: reading the devkit's meta.mat needs scipy (pip install scipy); or label the "
                          "val images with Caffe's val.txt and synsets.txt (caffe/data/ilsvrc12/get_ilsvrc_aux.sh)"
                          ) from None
    try:
        synsets = np.atleast_1d(loadmat(str(path), squeeze_me=True)["synsets"])
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"{path}: not the devkit's meta.mat (a 'synsets' struct with ILSVRC2012_ID and WNID): "
                         f"{type(exc).__name__}: {exc}") from None


def _read_synsets(path: Path) -> list[str]:
    wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not wnids:
        raise ValueError(f"{path}: no wnids (expected one per line, as Caffe's synsets.txt)")
    return wnids


def read_val_labels(val_labels, classes: list[str], meta=None) -> dict[str, int]:
    """{val image file name: label} from a labels file (the formats of the module docstring);
    ``classes``: the train wnids in label order."""
    path = Path(val_labels)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no validation label file; {HINT}")
    index = {c: i for i, c in enumerate(classes)}
    rows = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not rows:
        raise ValueError(f"{path}: empty validation label file")
    out: dict[str, int] = {}

    def put(n: int, name: str, wnid: str):
        if wnid not in index:
            raise ValueError(f"{path}:{n}: {name} is class {wnid}, which has no folder among the {len(classes)} "
                             "train classes")
        if name in out:
            raise ValueError(f"{path}:{n}: {name} is labelled twice")
        out[name] = index[wnid]

    if rows[0][1].startswith("ImageId,"):   # Kaggle's LOC_val_solution.csv
        for n, line in rows[1:]:
            image, _, boxes = line.partition(",")
            if not boxes.split():
                raise ValueError(f"{path}:{n}: expected 'ImageId,wnid x y x y ...', got {line!r}")
            put(n, f"{image}.JPEG", boxes.split()[0])
        return out
    parts = [(n, line.split()) for n, line in rows]
    if all(len(p) == 1 for _, p in parts):   # the devkit's ground truth: one ILSVRC2012_ID per line
        meta = Path(meta) if meta is not None else path.with_name("meta.mat")
        if not meta.is_file():
            raise FileNotFoundError(f"{meta}: missing; the devkit's meta.mat maps the ILSVRC2012_IDs of {path.name} "
                                    f"to wnids (give it as meta / --meta); {HINT}")
        if meta.suffix.lower() != ".mat":
            raise ValueError(f"{meta}: {path.name} holds the devkit's ILSVRC2012_IDs, which only its meta.mat maps "
                             "to wnids")
        ids = _read_meta_mat(meta)
        for k, (n, (gt,)) in enumerate(parts, 1):
            if not gt.isdigit() or int(gt) not in ids:
                raise ValueError(f"{path}:{n}: {gt!r} is not an ILSVRC2012_ID of {meta.name}")
            put(n, _VAL_NAME.format(k), ids[int(gt)])
        return out
    synsets = None
    for n, p in parts:
        if len(p) != 2:
            raise ValueError(f"{path}:{n}: expected 'ILSVRC2012_val_00000001.JPEG label' (Caffe's val.txt), one "
                             "ILSVRC2012_ID per line (the devkit's ground truth) or Kaggle's LOC_val_solution.csv")
        name, label = Path(p[0]).name, p[1]
        if not label.isdigit():
            put(n, name, label)   # a wnid
            continue
        if synsets is None:
            listed = Path(meta) if meta is not None else path.with_name("synsets.txt")
            if listed.suffix.lower() == ".mat":
                raise ValueError(f"{path}: its numbers are lines of Caffe's synsets.txt, not the ILSVRC2012_IDs "
                                 f"of {listed.name}: give synsets.txt as meta (--meta)")
            if listed.is_file():
                synsets = _read_synsets(listed)
            elif meta is not None:
                raise FileNotFoundError(f"{listed}: no synsets.txt (one wnid per line, label order) to read the "
                                        f"numbers of {path.name} with")
            elif len(classes) == CLASSES:
                synsets = classes
            else:
                raise ValueError(f"{path}: its labels are numbers (Caffe's val.txt: lines of synsets.txt), but "
                                 f"there is no synsets.txt beside it and the train folder has {len(classes)} classes, "
                                 f"not {CLASSES}: give Caffe's synsets.txt as meta (--meta)")
        if int(label) >= len(synsets):
            raise ValueError(f"{path}:{n}: label {label} is past the {len(synsets)} classes")
        put(n, name, synsets[int(label)])
    return out


def list_val(val_dir, classes: list[str], labels: dict[str, int] | None = None,
             labels_file=None) -> list[tuple[str, int]]:
    """[(path relative to ``val_dir``, label)] in image-name order: from ``labels`` for a flat
    folder, from the class folders for a sorted one (checked against ``labels`` when given)."""
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise FileNotFoundError(f"{val_dir}: no ILSVRC-2012 val folder; {HINT}")
    index = {c: i for i, c in enumerate(classes)}
    flat, folders = [], []
    for e in os.scandir(val_dir):
        if not _visible(e.name):
            continue
        if e.is_dir():
            folders.append(e.name)
        elif e.is_file() and _is_image(e.name):
            flat.append(e.name)
    if flat and folders:
        raise ValueError(f"{val_dir} holds both images ({flat[0]}, ...) and folders ({folders[0]}, ...): "
                         "give a flat val folder or one sorted into class folders")
    items = []
    if folders:
        for c in sorted(folders):
            if c not in index:
                raise ValueError(f"{val_dir / c}: class {c} has no folder among the {len(classes)} train classes")
            for f in sorted(e.name for e in os.scandir(val_dir / c) if e.is_file() and _is_image(e.name)):
                if labels is not None and labels.get(f, index[c]) != index[c]:
                    raise ValueError(f"{val_dir / c / f}: in folder {c}, but {labels_file} says "
                                     f"{classes[labels[f]]}")
                items.append((f"{c}/{f}", index[c]))
    elif labels is None:
        raise ValueError(f"{val_dir} holds {len(flat)} images and no class folders: give their labels "
                         "(val_labels / --val-labels): the devkit's ILSVRC2012_validation_ground_truth.txt, "
                         "Caffe's val.txt or LOC_val_solution.csv")
    else:
        for f in flat:
            if f not in labels:
                raise ValueError(f"{val_dir / f}: no label in {labels_file}")
        items = [(f, labels[f]) for f in flat]
    if not items:
        raise ValueError(f"{val_dir}: no images; {HINT}")
    if labels is not None:
        have = {Path(r).name for r, _ in items}
        missing = sorted(set(labels) - have)
        if missing:
            raise FileNotFoundError(f"{val_dir / missing[0]}: labelled in {labels_file} but not in {val_dir} "
                                    f"({len(missing)} of its {len(labels)} images missing); {HINT}")
    items.sort(key=lambda it: Path(it[0]).name)
    return items


def _subset(items: list[tuple[str, int]], limit: int | None, rng) -> list[tuple[str, int]]:
    if not limit:
        return items
    keep = _pick_per_class(np.asarray([label for _, label in items], np.int64), limit, rng)
    return [items[i] for i in keep]


def _load_centre(path: str, side: int) -> np.ndarray:
    import cv2
    img = read_image(path, cv2.IMREAD_COLOR, path)
    if img is None:
        raise ValueError(f"cannot read image {path}")
    img = resize_short_side(img, side)
    h, w = img.shape[:2]
    y, x = (h - side) // 2, (w - side) // 2
    return _finish(img[y:y + side, x:x + side], None)


def _describe(path: Path | None) -> str:
    if path is None:
        return "class folders"
    st = path.stat()
    return f"{path.resolve()} ({st.st_size} bytes, mtime {int(st.st_mtime)})"


def prepare_imagenet(train_dir, val_dir, out_dir="data/ilsvrc12", val_labels=None, meta=None,
                     resize: tuple[int, int] | None = None, short_side: int | None = None, lmdb: bool = True,
                     limit_per_class: int | None = None, seed: int = 0, force: bool = False,
                     progress: bool = True) -> dict:
    """List files and (with ``lmdb``) Datum LMDBs of ILSVRC-2012 (see the module docstring).

    ``resize=(h, w)``: the stored size (default 256x256, aspect ratio not kept); ``short_side=S``
    instead: short side S, the centre S x S. ``limit_per_class``: at most N images per class
    (seeded by ``seed``, which also shuffles the train LMDB). Returns dict(train, val, test (the
    LMDB paths, None without ``lmdb``), lists (train, val, synsets), classes, counts, shape,
    meta, out_dir).
    """
    if resize is not None and short_side is not None:
        raise ValueError("give resize=(h, w) or short_side=S, not both")
    if short_side is not None and (int(short_side) != short_side or short_side < 1):
        raise ValueError(f"short_side={short_side}: expected a positive integer")
    if resize is None and short_side is None:
        resize = (256, 256)
    if resize is not None and (len(resize) != 2 or min(resize) < 1):
        raise ValueError(f"resize={resize}: expected (height, width)")
    if limit_per_class is not None and limit_per_class < 1:
        raise ValueError(f"limit_per_class={limit_per_class}: expected a positive integer")
    train_dir, val_dir, out_dir = Path(train_dir).expanduser(), Path(val_dir).expanduser(), Path(out_dir)
    labels_file = Path(val_labels).expanduser() if val_labels is not None else None
    classes, train = list_train(train_dir)
    labels = read_val_labels(labels_file, classes, meta) if labels_file is not None else None
    val = list_val(val_dir, classes, labels, labels_file)
    rng = np.random.default_rng(seed)
    train, val = _subset(train, limit_per_class, rng), _subset(val, limit_per_class, rng)

    out_dir.mkdir(parents=True, exist_ok=True)
    lists = {"train": out_dir / "train.txt", "val": out_dir / "val.txt", "synsets": out_dir / "synsets.txt"}
    for key, rows in (("train", train), ("val", val)):
        lists[key].write_text("".join(f"{p} {label}\n" for p, label in rows))
    lists["synsets"].write_text("".join(f"{c}\n" for c in classes))
    lists = {k: str(v) for k, v in lists.items()}
    counts = {"train": len(train), "val": len(val)}
    if not lmdb:
        return {"train": None, "val": None, "test": None, "lists": lists, "classes": classes, "counts": counts,
                "shape": None, "meta": None, "out_dir": str(out_dir)}

    size = f"{resize[0]}x{resize[1]}" if resize is not None else f"short side {short_side}, centre crop"
    kind = (f"ILSVRC-2012 {size}, val {val_dir.resolve()} ({len(val)} images, labels {_describe(labels_file)})"
            + (f", at most {limit_per_class} per class (seed {seed})" if limit_per_class else ""))

    def load(path: str) -> np.ndarray:
        return _imread(path, resize) if resize is not None else _load_centre(path, short_side)

    def read(_source: Path) -> RawDataset:
        ds = RawDataset(classes=classes, fmt="ilsvrc12-" + ("sorted-val" if labels_file is None else "flat-val"))
        for key, rows, root in (("train", train, train_dir), ("test", val, val_dir)):
            names = [p for p, _ in rows]
            ds.splits[key] = RawSplit(names, np.asarray([label for _, label in rows], np.int64),
                                      (lambda ns, r: lambda i: load(str(r / ns[i])))(names, root))
        return ds
    info = _prepare(train_dir, out_dir, read, val_size=None, seed=seed, limit_per_class=None, resize=resize,
                    kind=kind, force=force, progress=progress, missing_hint=HINT)
    info["lists"] = lists
    return info
