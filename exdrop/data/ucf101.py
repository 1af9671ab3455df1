"""UCF101 (Soomro et al. 2012) for the paper's fine-tuning (Tables 2-4, UCF101 columns): videos to
frames with OpenCV, the official split lists, frame-level list files and Datum LMDBs.

    prepare_ucf101(videos, splits, out_dir, split=1, every=5, short_side=256) -> result

``videos`` is the ``UCF-101`` folder (``<Class>/v_<Class>_gXX_cYY.avi``); ``splits`` the folder of
the official lists (``classInd.txt``, ``trainlist0N.txt``, ``testlist0N.txt``). Every
``every``-th frame of each video is kept (from the first), resized so that its short side is
``short_side`` (the prototxts crop 224 or 227 from it), and written as a JPEG under
``out_dir/frames/<Class>/<video>/<k>.jpg``; then:

    out_dir/train.txt, test.txt     frame list files (Caffe's ImageData format: path label)
    out_dir/test_videos.json        the test videos in list order: name, label, frames
    out_dir/train_lmdb, test_lmdb   Datum LMDBs (train shuffled; test in list order, a video's frames
                                    together), val_lmdb -> test_lmdb (the prototxts' TEST source)

``exdrop test`` reports the frame accuracy and, from ``test_videos.json`` beside the LMDB, the
video accuracy (the softmax of a video's frames averaged, then the argmax).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from exdrop.data.images import RawDataset, RawSplit, _imread, _prepare, resize_short_side

__all__ = ["prepare_ucf101", "read_split_lists", "extract_frames"]

SPLITS = (1, 2, 3)
HINT = ("UCF101 is https://www.crcv.ucf.edu/data/UCF101/UCF101.rar and its lists "
        "https://www.crcv.ucf.edu/data/UCF101/UCF101TrainTestSplits-RecognitionTask.zip (unpack both; "
        "pass the UCF-101 folder and the ucfTrainTestlist folder)")


def read_split_lists(splits, split: int = 1) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, int]]]:
    """(class names in classInd order, train [(video path, label)], test [(video path, label)]); labels
    0-based (classInd counts from 1; a test line has no label: its folder names the class)."""
    if split not in SPLITS:
        raise ValueError(f"split={split}: UCF101 has the official splits 1, 2, 3")
    splits = Path(splits)
    files = {"classes": splits / "classInd.txt", "train": splits / f"trainlist0{split}.txt",
             "test": splits / f"testlist0{split}.txt"}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; {HINT}")
    classes = []
    for n, line in enumerate(files["classes"].read_text().splitlines(), 1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                raise ValueError(f"{files['classes']}:{n}: expected 'index name' (e.g. '1 ApplyEyeMakeup'), got {line!r}")
            idx, name = parts
            if int(idx) != len(classes) + 1:
                raise ValueError(f"{files['classes']}:{n}: class {idx} out of order (expected {len(classes) + 1})")
            classes.append(name)
    index = {c: i for i, c in enumerate(classes)}

    def read(path: Path, with_label: bool):
        out = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            video = parts[0].replace("\\", "/")
            cls = video.split("/")[0]
            if cls not in index:
                raise ValueError(f"{path}:{n}: class folder '{cls}' is not in {files['classes'].name}")
            if with_label and len(parts) > 1 and not parts[1].isdigit():
                raise ValueError(f"{path}:{n}: label {parts[1]!r} is not a class number")
            if with_label and len(parts) > 1 and int(parts[1]) - 1 != index[cls]:
                raise ValueError(f"{path}:{n}: label {parts[1]} does not match the folder '{cls}'")
            out.append((video, index[cls]))
        return out
    return classes, read(files["train"], True), read(files["test"], False)


def extract_frames(video: Path, out_folder: Path, every: int = 5, short_side: int = 256) -> list[Path]:
    """Every ``every``-th frame of ``video`` as JPEGs in ``out_folder`` (kept when already there)."""
    import cv2
    done = out_folder / ".done"
    if done.is_file():
        return sorted(out_folder.glob("*.jpg"))
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise ValueError(f"{video}: OpenCV cannot open this video")
    out_folder.mkdir(parents=True, exist_ok=True)
    written, k = [], 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if k % every == 0:
                frame = resize_short_side(frame, short_side)
                path = out_folder / f"{k:05d}.jpg"
                if not cv2.imwrite(str(path), frame, [cv2.IMWRITE_JPEG_QUALITY, 95]):
                    raise OSError(f"{path}: cannot write the frame")
                written.append(path)
            k += 1
    finally:
        cap.release()
    if not written:
        raise ValueError(f"{video}: no frame could be decoded")
    done.write_text(str(len(written)))
    return written


def prepare_ucf101(videos, splits, out_dir="data/ucf101", split: int = 1, every: int = 5, short_side: int = 256,
                   force: bool = False, progress: bool = True) -> dict:
    """Frames, list files and LMDBs of one official split (see the module docstring)."""
    videos, out_dir = Path(videos), Path(out_dir)
    if not videos.is_dir():
        raise FileNotFoundError(f"{videos}: no UCF-101 video folder; {HINT}")
    classes, train, test = read_split_lists(splits, split)
    frames_root = out_dir / "frames"
    items = {}
    listing = [(key, v, label) for key, vids in (("train", train), ("test", test)) for v, label in vids]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(listing), desc="UCF101 videos -> frames", unit="video")
    test_videos = []
    for key, video, label in listing:
        src = videos / video
        if not src.is_file():
            raise FileNotFoundError(f"{src}: listed in the split files but not in {videos}; {HINT}")
        frames = extract_frames(src, frames_root / Path(video).with_suffix(""), every, short_side)
        rel = [str(f.relative_to(out_dir)) for f in frames]
        items.setdefault(key, []).extend((r, label) for r in rel)
        if key == "test":
            test_videos.append({"video": Path(video).stem, "label": label, "frames": len(rel)})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    for key, rows in items.items():
        (out_dir / f"{key}.txt").write_text("".join(f"{p} {label}\n" for p, label in rows))
    (out_dir / "test_videos.json").write_text(json.dumps({"split": split, "every": every, "classes": classes,
                                                          "videos": test_videos}, indent=1))

    def read(_source: Path) -> RawDataset:
        ds = RawDataset(classes=classes, fmt=f"ucf101-split{split}-frames")
        for key, rows in items.items():
            names = [p for p, _ in rows]
            ds.splits[key] = RawSplit(names, np.asarray([label for _, label in rows], np.int64),
                                      (lambda ns: lambda i: _imread(str(out_dir / ns[i])))(names))
        return ds
    return _prepare(videos, out_dir, read, val_size=None, seed=split, limit_per_class=None, resize=None,
                    kind=f"UCF101 split {split}, every {every}th frame, short side {short_side}", force=force,
                    progress=progress)
