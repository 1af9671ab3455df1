"""UCF101 fixture videos (for test_ucf101.py and test_table3.py): small videos written with OpenCV's
VideoWriter in the official layout (UCF-101/<Class>/v_<Class>_gXX_cYY.avi, classInd.txt,
trainlist01.txt, testlist01.txt); groups 2 and 8 train, group 1 tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

CLASSES = ["ApplyEyeMakeup", "Basketball", "YoYo"]


def write_video(path: Path, frames: int, colour, size=(40, 30)):
    import cv2
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, size)
    assert writer.isOpened()
    rng = np.random.default_rng(len(str(path)))
    for k in range(frames):
        img = np.full((size[1], size[0], 3), colour, np.uint8)
        img[:, : (k * 3) % size[0]] = rng.integers(0, 255, 3)   # something that moves
        writer.write(img)
    writer.release()


def write_ucf101(root: Path) -> tuple[Path, Path]:
    """The fixture dataset under ``root``: (the UCF-101 video folder, the split lists folder)."""
    videos, lists = root / "UCF-101", root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(CLASSES, 1)))
    train, test = [], []
    for i, c in enumerate(CLASSES):
        for g in (1, 2, 8):
            name = f"{c}/v_{c}_g{g:02d}_c01.avi"
            write_video(videos / name, 11 + g, (40 * i, 80, 200 - 50 * i))
            (test if g == 1 else train).append(name)
    (lists / "trainlist01.txt").write_text("".join(f"{n} {CLASSES.index(n.split('/')[0]) + 1}\n" for n in train))
    (lists / "testlist01.txt").write_text("".join(f"{n}\n" for n in test))
    return videos, lists


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    """(videos, lists, root): the fixture dataset in a module-wide temporary folder."""
    root = tmp_path_factory.mktemp("ucf")
    videos, lists = write_ucf101(root)
    return videos, lists, root
