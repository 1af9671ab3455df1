"""UCF101: small videos written with OpenCV's VideoWriter in the official layout (UCF-101/<Class>/
v_<Class>_gXX_cYY.avi, classInd.txt, trainlist01.txt, testlist01.txt) -> frames -> list files and
LMDBs -> `exdrop test` with the frame and the video accuracy (checked by hand)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exdrop.cli import main as exdrop_main
from exdrop.data import DatumLMDB
from exdrop.data.ucf101 import prepare_ucf101, read_split_lists
from exdrop.analysis.evaluate import evaluate
from exdrop.engine.net import Net
from exdrop.engine.pylayer import TEST
from exdrop.engine.snapshot import save_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import one_iteration  # noqa: E402
from ucf101_videos import CLASSES, ucf  # noqa: E402,F401  (ucf: the fixture)


def test_videos_to_frames_lists_and_lmdbs(ucf, tmp_path):
    videos, lists, _ = ucf
    out = tmp_path / "ucf101"
    info = prepare_ucf101(videos, lists, out, split=1, every=5, short_side=24, progress=False)
    classes, train, test = read_split_lists(lists, 1)
    assert classes == CLASSES and len(train) == 6 and len(test) == 3 and test[1] == ("Basketball/v_Basketball_g01_c01.avi", 1)
    # every 5th frame from the first: g01 has 12 frames -> 0, 5, 10; g02 13 -> 3; g08 19 -> 0, 5, 10, 15
    lines = (out / "test.txt").read_text().splitlines()
    assert lines[:3] == [f"frames/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01/{k:05d}.jpg 0" for k in (0, 5, 10)]
    assert len((out / "train.txt").read_text().splitlines()) == 3 * (3 + 4)
    vids = json.loads((out / "test_videos.json").read_text())["videos"]
    assert [(v["video"], v["label"], v["frames"]) for v in vids] == [
        (f"v_{c}_g01_c01", i, 3) for i, c in enumerate(CLASSES)]
    import cv2
    assert cv2.imread(str(out / lines[0].split()[0])).shape == (24, 32, 3)   # short side 24, 4:3 kept
    with DatumLMDB(out / "test_lmdb") as db:
        assert len(db) == 9
    with DatumLMDB(out / "train_lmdb") as db:
        assert len(db) == 21
    assert (out / "val_lmdb").resolve() == (out / "test_lmdb").resolve()
    assert info["counts"]["train"] == 21
    # again: nothing to do (the frames and the LMDBs are kept)
    again = prepare_ucf101(videos, lists, out, split=1, every=5, short_side=24, progress=False)
    assert again["counts"] == info["counts"]


def test_exdrop_test_reports_frame_and_video_accuracy(ucf, tmp_path):
    videos, lists, _ = ucf
    out = tmp_path / "ucf101"
    assert exdrop_main(["data", "ucf101", str(videos), "--splits", str(lists), "--every", "5", "--resize", "24",
                        "--out", str(out)]) == 0
    net_path = tmp_path / "net.prototxt"
    net_path.write_text(f"""name: "tiny_ucf"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ crop_size: 20 scale: 0.0039 mean_value: 104 mean_value: 117 mean_value: 123 }}
  data_param {{ source: "{out / 'val_lmdb'}" batch_size: 4 backend: LMDB }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.05 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }}
""")
    from exdrop.proto import io as cio
    torch.manual_seed(0)
    net = Net(cio.read_net_prototxt(net_path), TEST, "cpu", str(net_path))
    weights = tmp_path / "w.caffemodel"
    save_weights(net, weights)
    res = evaluate(net_path, weights)
    assert res["images"] == 9 and res["videos"] == 3
    # by hand: every frame's softmax (the LMDB in order), averaged per video of 3 frames
    feed_x, feed_y = [], []
    src = net.sources["data"]
    for _ in range(3):
        x, y = src.next_batch()
        feed_x.append(x)
        feed_y.append(y)
    x, y = torch.cat(feed_x)[:9], torch.cat(feed_y)[:9]
    w, b = (p.detach() for p in net.layer("fc").blobs)
    probs = (x.flatten(1) @ w.t() + b).softmax(1).numpy()
    assert res["accuracy"] == pytest.approx(float((probs.argmax(1) == y.numpy()).mean()))
    video = probs.reshape(3, 3, 3).mean(1).argmax(1)
    assert res["video_accuracy"] == pytest.approx(float((video == np.arange(3)).mean()))


def test_missing_lists_and_videos_name_what_to_fetch(ucf, tmp_path):
    videos, lists, _ = ucf
    with pytest.raises(FileNotFoundError, match="trainlist02.txt: missing; UCF101 is https://www.crcv.ucf.edu"):
        read_split_lists(lists, 2)
    broken = tmp_path / "lists"
    broken.mkdir()
    for f in lists.iterdir():
        (broken / f.name).write_text(f.read_text())
    (broken / "testlist01.txt").write_text("YoYo/v_YoYo_g99_c01.avi\n")
    with pytest.raises(FileNotFoundError, match="v_YoYo_g99_c01.avi: listed in the split files but not in"):
        prepare_ucf101(videos, broken, tmp_path / "out", progress=False)


@pytest.mark.parametrize("arch", ["alexnet", "vgg16"])
def test_one_fine_tuning_iteration_then_frame_and_video_accuracy(ucf, tmp_path_factory, arch):
    """The fixture's frames at the prototxts' size (short side 256: crops of 227 / 224), one
    training iteration of the UCF101 prototxt with Excitation Dropout at fc6 (batch 2: CPU time),
    a snapshot, then `exdrop test` on the converted folder: frame and video accuracy."""
    videos, lists, root = ucf
    out = root / "ucf101_256"
    prepare_ucf101(videos, lists, out, split=1, every=5, short_side=256, progress=False)
    net_path, _, res = one_iteration(f"prototxt/{arch}/ucf101", "ed", "data/ucf101/", out, tmp_path_factory.mktemp(arch))
    snap = Path(res["snapshot"])
    result = evaluate(net_path, snap, data=out)
    assert result["images"] == 9 and result["each_image_once"] and result["videos"] == 3
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["video_accuracy"] <= 1
