"""``exdrop test``: evaluate a trained snapshot on a data source, like Caffe's ``caffe test``.

    evaluate(net_or_solver, weights, data=None, iterations=None, device="cpu", backend="engine") -> dict
    write_report(result, out_dir) -> {"json": Path, "png": Path}   test.json and confusion.png
    format_table(result) -> str                                     the short table printed by the CLI
    default_out(weights) -> Path                                    RUN/test_<stem> for RUN/snapshots/<stem>.caffemodel

The net is the TEST phase of a net prototxt, or of a solver's test net (its ``test_net``, else
its ``net``, as :func:`exdrop.run.train.net_params` resolves it). ``data`` replaces the TEST data
layer's source: a converted LMDB folder, or a converted dataset folder (``test_lmdb``, else
``val_lmdb``; the result says which).

How many images:

* a count of batches (``iterations``, or the solver's ``test_iter`` on the TEST layer's own
  source): read as Caffe's ``caffe test`` and the trainer's test passes read them, sequentially
  from the first record, wrapping around at the end of the source, so an image can count twice.
  The accuracy and loss are then computed as the trainer computes them (the mean over the
  batches of the net's outputs), so a snapshot evaluated on the same data with the same
  ``test_iter`` gives the run's own logged test accuracy and loss;
* otherwise (a net prototxt, or ``data`` given): every image exactly once, ceil(N / batch)
  batches, the last one cut to the N mod batch images left (Caffe's ``caffe test`` would wrap
  around and count the first images again). Each batch's outputs are weighted by its images.

Accuracy: the net's top-1 ``Accuracy`` layer; without one, top-1 of the scores of the
``SoftmaxWithLoss`` (its first bottom) against its label. Loss: Caffe's net loss, the sum of
the loss outputs, each weighted by its ``loss_weight``, averaged over the images as above
(None without a loss layer). Per-class accuracy and the confusion matrix (rows: true class,
columns: predicted class) are top-1: ``argmax`` of the same scores.

Random transforms at test time: a TEST data layer with ``mirror: true`` (the Caltech-256
prototxts, as the authors' nets) flips each image with probability 1/2, in Caffe as here. The
flips are drawn from a generator seeded with the solver's ``random_seed`` (0 for a net
prototxt), not from the trainer's, whose test-net generator was drawn after the training net's
initialisation and has advanced through every earlier test pass: such a net's accuracy differs
from the trainer's logged one by the flips. Without random test-time transforms the result is
exactly the trainer's (same weights, data, batches and float32 arithmetic).
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from google.protobuf import text_format

from exdrop.caffe.backend import check_cpu_device, load_caffe
from exdrop.data import DatumLMDB
from exdrop.engine.backend import net_params, pick_device
from exdrop.engine.net import DATA_TYPES, Net, filter_layers
from exdrop.engine.pylayer import TEST
from exdrop.engine.snapshot import load_weights
from exdrop.proto import io as cio
from exdrop.proto import caffe_pb2
from exdrop.run.plot import _pyplot

__all__ = ["evaluate", "write_report", "confusion_figure", "format_table", "default_out", "is_converted",
           "resolve_data", "set_data_source", "load_test_net", "EvalNet", "BACKENDS"]

BACKENDS = ("engine", "caffe")
DATA_HINT = ("convert the data once with `exdrop data DATASET SOURCE --out DIR` (`exdrop data --help` lists the "
             "datasets) and pass --data DIR")
SPLITS = ("test_lmdb", "val_lmdb")        # a converted dataset folder: the first one present is evaluated
CELL_TEXT_MAX_CLASSES = 99                # from 100 classes on, the confusion image has no per-cell text


# ---------------------------------------------------------------------- the net
@dataclass
class EvalNet:
    """The TEST net to evaluate: ``param`` (a copy, free to rewrite), ``source`` (for messages), the
    solver's ``test_iter`` for its own TEST source (None for a net prototxt) and the seed of the
    test-time random transforms."""
    param: caffe_pb2.NetParameter
    source: str
    test_iter: int | None = None
    seed: int = 0


def load_test_net(path) -> EvalNet:
    """A net prototxt, or a solver (its first test net, else its net, in the TEST phase)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such solver or net prototxt")
    net_err = solver_err = None
    try:
        net = cio.read_net_prototxt(path)
        if len(net.layer) or len(net.layers):
            return EvalNet(_copy(net), str(path))
    except ValueError as exc:
        if isinstance(exc, cio.V1NetError):
            raise
        net_err = exc
    try:
        sp = cio.read_solver_prototxt(path)
    except ValueError as exc:
        solver_err = exc
    if solver_err is None and sp.ListFields():
        (train, train_src), tests = net_params(sp, str(path))
        test_iter = int(sp.test_iter[0]) if len(sp.test_iter) else None
        param, src = tests[0] if tests else (train, train_src)
        if not tests:
            test_iter = None   # the solver's test_iter belongs to test nets it does not have
        return EvalNet(_copy(param), f"{src} ({'test net' if tests else 'net'} of {path})", test_iter,
                       int(sp.random_seed) if sp.random_seed >= 0 else 0)
    if net_err is None:
        raise ValueError(f"{path}: a net prototxt without layers")
    raise ValueError(f"{path}: neither a net nor a solver prototxt (as a net: {net_err}; as a solver: {solver_err})")


def _copy(param):
    out = caffe_pb2.NetParameter()
    out.CopyFrom(param)
    return out


def _test_data_layer(tn: EvalNet):
    """The one Data / ImageData layer of the TEST phase, with a data and a label top."""
    kept = filter_layers(tn.param, TEST)   # the messages of tn.param itself: edits go into it
    inputs = [lp for lp in kept if lp.type == "Input"] + ([None] if len(tn.param.input) else [])
    if inputs:
        name = f"layer '{inputs[0].name}'" if inputs[0] is not None else "its 'input' fields"
        raise ValueError(f"{tn.source}: {name} is an Input (a deploy net): it has no data source and no "
                         "transform_param (mean, scale) to read images with; evaluate the train_val prototxt, "
                         "whose TEST data layer has them")
    data = [lp for lp in kept if lp.type in DATA_TYPES]
    if not data:
        raise ValueError(f"{tn.source}: the TEST phase has no Data or ImageData layer to read images from")
    if len(data) > 1:
        raise ValueError(f"{tn.source}: the TEST phase has {len(data)} data layers "
                         f"({', '.join(repr(lp.name) for lp in data)}); exdrop test evaluates nets with one")
    if len(data[0].top) < 2:
        raise ValueError(f"{tn.source}: TEST data layer '{data[0].name}' has no label top; exdrop test needs "
                         "the labels (top: \"data\" top: \"label\")")
    return data[0]


def _batch_size(lp) -> int:
    return int(lp.data_param.batch_size if lp.type == "Data" else lp.image_data_param.batch_size)


def _layer_source(lp) -> str:
    return lp.data_param.source if lp.type == "Data" else lp.image_data_param.source


def set_data_source(lp, lmdb) -> None:
    """Point the data layer ``lp`` (Data or ImageData) at the Datum LMDB ``lmdb``, keeping its batch
    size and transform_param; an ImageData layer becomes a Data layer (an LMDB is not a list file)."""
    batch = _batch_size(lp)
    if lp.type == "ImageData":
        lp.ClearField("image_data_param")
        lp.type = "Data"
        lp.data_param.batch_size = batch
    lp.data_param.source = str(lmdb)
    lp.data_param.backend = caffe_pb2.DataParameter.LMDB


def _scoring(tn: EvalNet) -> SimpleNamespace:
    """Which blobs hold the class scores and the labels, and which output is the accuracy."""
    kept = filter_layers(tn.param, TEST)
    accs = [lp for lp in kept if lp.type == "Accuracy"]
    losses = [lp for lp in kept if lp.type == "SoftmaxWithLoss"]
    top1 = next((lp for lp in accs if lp.accuracy_param.top_k == 1), None)
    lp = top1 or (losses[0] if losses else accs[0] if accs else None)
    if lp is None:
        raise ValueError(f"{tn.source}: the TEST net has neither an Accuracy nor a SoftmaxWithLoss layer, so "
                         "no blob holds class scores next to a label; add one, e.g. layer { name: \"accuracy\" "
                         "type: \"Accuracy\" bottom: \"<scores>\" bottom: \"label\" top: \"accuracy\" }")
    if len(lp.bottom) < 2:
        raise ValueError(f"{tn.source}: layer '{lp.name}' ({lp.type}) needs a scores and a label bottom")
    param = lp.accuracy_param if lp.type == "Accuracy" else lp.loss_param
    ignore = int(param.ignore_label) if param.HasField("ignore_label") else None
    axis = int(lp.accuracy_param.axis if lp.type == "Accuracy" else lp.softmax_param.axis)
    if axis != 1:
        raise ValueError(f"{tn.source}: layer '{lp.name}' scores along axis {axis}; exdrop test scores one class "
                         "vector per image (axis 1)")
    return SimpleNamespace(scores=lp.bottom[0], label=lp.bottom[1], ignore=ignore,
                           accuracy=top1.top[0] if top1 is not None else None,
                           accuracy_from=(f"layer '{top1.name}' (Accuracy, top-1)" if top1 is not None else
                                          f"top-1 of '{lp.bottom[0]}' against '{lp.bottom[1]}' (no top-1 "
                                          f"Accuracy layer; the scores of layer '{lp.name}')"))


# ---------------------------------------------------------------------- the data
def is_converted(data) -> bool:
    """Whether ``data`` is a Datum LMDB folder or a converted dataset folder (test_lmdb / val_lmdb)."""
    p = Path(data)
    return p.is_dir() and ((p / "data.mdb").is_file() or any((p / s / "data.mdb").is_file() for s in SPLITS))


def resolve_data(data) -> tuple[Path, str | None]:
    """(the LMDB to read, the split used: 'test_lmdb' / 'val_lmdb', or None for an LMDB given as such)."""
    p = Path(data)
    if not p.exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder; {DATA_HINT}")
    if p.is_dir() and (p / "data.mdb").is_file():
        return p, None
    for split in SPLITS:
        if p.is_dir() and (p / split / "data.mdb").is_file():
            return p / split, split
    what = "a folder without data.mdb, test_lmdb/ or val_lmdb/" if p.is_dir() else "a file"
    raise ValueError(f"--data {data}: {what}, not a converted LMDB or dataset folder; {DATA_HINT} "
                     "(`exdrop test --data` converts a CIFAR-10 source itself)")


def _check_source(tn: EvalNet, lp) -> Path:
    """The TEST layer's own source, which must exist (Caffe resolves it against the current folder)."""
    src = _layer_source(lp)
    p = Path(src)
    if not src or not (p if p.is_absolute() else Path.cwd() / p).exists():
        raise FileNotFoundError(f"{tn.source}: TEST data layer '{lp.name}' reads '{src}', which does not exist "
                                f"(relative to the current folder {Path.cwd()}); {DATA_HINT}, or run from the "
                                "folder that the prototxt's relative paths start from")
    return p


def _record_count(lp) -> int:
    if lp.type == "Data":
        with DatumLMDB(lp.data_param.source) as db:
            return len(db)
    text = Path(lp.image_data_param.source).read_text(encoding="utf-8", errors="replace")
    return sum(1 for line in text.splitlines() if line.strip())


def _class_names(lmdb: Path, classes: int) -> list[str] | None:
    """The class names of the converted dataset the LMDB belongs to (its folder's meta.json)."""
    meta = Path(lmdb).parent / "meta.json"
    try:
        names = json.loads(meta.read_text()).get("classes")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(c) for c in names] if isinstance(names, list) and len(names) == classes else None


# ---------------------------------------------------------------------- evaluation
def evaluate(net_or_solver, weights, data=None, iterations: int | None = None, device="cpu",
             backend: str = "engine", progress: bool = False) -> dict:
    """Evaluate ``weights`` (a .caffemodel) with the TEST net of ``net_or_solver`` (see the module
    docstring for the net, the data and how many images). Returns a JSON-ready dict: accuracy,
    loss, outputs (every net output's mean), per_class_accuracy, per_class_images, classes
    (names, when the data folder's meta.json has them), confusion (rows true, columns predicted),
    images, records, batch_size, iterations, each_image_once, and where everything came from."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"--weights {weights}: no such file (give a .caffemodel, e.g. "
                                "RUN/snapshots/NAME_iter_N.caffemodel)")
    if iterations is not None and iterations <= 0:
        raise ValueError(f"--iterations {iterations}: give a positive number of batches")
    tn = load_test_net(net_or_solver)
    lp = _test_data_layer(tn)
    score = _scoring(tn)
    split = None
    if data is not None:
        lmdb, split = resolve_data(data)
        set_data_source(lp, lmdb)
    else:
        lmdb = _check_source(tn, lp)
    if iterations is None and data is None and tn.test_iter is not None:
        iterations = tn.test_iter
        if iterations <= 0:
            raise ValueError(f"{tn.source}: the solver's test_iter is {iterations}; give --iterations")
    once = iterations is None
    if once and lp.type == "Data":
        lp.data_param.rand_skip = 0   # from the first record: each image once
    batch = _batch_size(lp)
    records = _record_count(lp)
    if not records:
        raise ValueError(f"{tn.source}: TEST data layer '{lp.name}' reads {_layer_source(lp)}, which holds no images")
    n_iter = math.ceil(records / batch) if once else int(iterations)
    sizes = [batch] * n_iter
    if once:
        sizes[-1] = records - batch * (n_iter - 1)
    t0 = time.perf_counter()
    run = _run_engine if backend == "engine" else _run_caffe
    outputs, loss_weights, probs, labels, classes, dev = run(tn, lp, score, weights, sizes, device, progress)
    seconds = time.perf_counter() - t0
    preds = probs.argmax(1)

    valid = (labels != score.ignore) if score.ignore is not None else np.ones(labels.shape, bool)
    bad = valid & ((labels < 0) | (labels >= classes))
    if bad.any():
        raise ValueError(f"{tn.source}: label {int(labels[bad][0])} is outside the {classes} classes of "
                         f"'{score.scores}'")
    confusion = np.bincount(labels[valid] * classes + preds[valid], minlength=classes * classes)
    confusion = confusion.reshape(classes, classes)
    per_class = confusion.sum(1)
    if score.accuracy is not None:
        accuracy = outputs[score.accuracy]
    else:
        accuracy = float(np.trace(confusion) / max(1, int(valid.sum())))
    losses = [(outputs[b], w) for b, w in loss_weights.items() if b in outputs]
    loss = (losses[0][0] if len(losses) == 1 and losses[0][1] == 1.0
            else float(sum(v * w for v, w in losses))) if losses else None
    return {
        "accuracy": accuracy, "loss": loss, "outputs": outputs, "accuracy_from": score.accuracy_from,
        "images": int(sum(sizes)), "scored_images": int(valid.sum()), "records": records, "batch_size": batch,
        "iterations": n_iter, "each_image_once": once,
        "reading": ("each image once, the last batch cut to the images left" if once else
                    "in record order, wrapping around at the end, as Caffe's test"),
        "classes": _class_names(lmdb, classes), "num_classes": classes,
        "per_class_accuracy": [float(confusion[c, c] / per_class[c]) if per_class[c] else None
                               for c in range(classes)],
        "per_class_images": per_class.tolist(), "confusion": confusion.tolist(),
        "confusion_rows": "true class", "confusion_columns": "predicted class (top-1)",
        "net": tn.source, "weights": str(weights), "data": str(lmdb), "data_split": split,
        "data_layer": lp.name, "scores_blob": score.scores, "label_blob": score.label,
        "backend": backend, "device": dev, "seed": tn.seed, "seconds": round(seconds, 3),
        **video_accuracy(lmdb, probs, labels, once),
    }


def video_accuracy(lmdb, probs: np.ndarray, labels: np.ndarray, each_image_once: bool) -> dict:
    """UCF101's video accuracy: with a ``test_videos.json`` beside the LMDB (exdrop.data.ucf101) whose
    videos hold every image evaluated, in order, the softmax of each video's frames is averaged and
    its argmax scored against the video's label. {} otherwise."""
    path = Path(lmdb).parent / "test_videos.json"
    if not each_image_once or not path.is_file():
        return {}
    videos = json.loads(path.read_text())["videos"]
    counts = [int(v["frames"]) for v in videos]
    if sum(counts) != len(probs):
        return {"video_accuracy": None, "video_note": f"{path}: {sum(counts)} frames listed, {len(probs)} evaluated"}
    bounds = np.cumsum([0, *counts])
    mean = np.add.reduceat(probs, bounds[:-1], axis=0) / np.asarray(counts)[:, None]
    truth = np.asarray([int(v["label"]) for v in videos])
    if not np.array_equal(labels[bounds[:-1]], truth):
        raise ValueError(f"{path}: the videos' labels do not match the LMDB's frames (another split or order?)")
    return {"video_accuracy": float((mean.argmax(1) == truth).mean()), "videos": len(videos)}


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc="test", unit="batch", leave=False, dynamic_ncols=True)


def _summed(outputs, score) -> list[str]:
    """The net's outputs, and the accuracy blob even where a later layer consumes it."""
    return list(outputs) + ([score.accuracy] if score.accuracy and score.accuracy not in outputs else [])


def _means(sums: dict, sizes: list[int]) -> dict:
    """The trainer's mean over batches when every batch is full, else the mean over images."""
    full = all(s == sizes[0] for s in sizes)
    return {k: (v / len(sizes) if full else v / sum(sizes)) for k, v in sums.items()}


def engine_test_net(tn: EvalNet, weights, device="cpu") -> Net:
    """The engine's TEST net of ``tn`` (:func:`load_test_net`, its data layer as set) on ``device``
    with the ``.caffemodel`` ``weights``: what ``exdrop test``, the analysis and the saliency maps
    run. The data source's generator (mirrors) is drawn from the solver's seed, as in training."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(tn.seed)   # the CPU's alone: a GPU's stays the caller's
        net = Net(tn.param, TEST, pick_device(device), tn.source)
    try:
        load_weights(net, weights, strict_missing=True)
    except ValueError as exc:
        raise ValueError(f"the weights {weights} do not fit the net {tn.source}: {exc}") from None
    return net


def _run_engine(tn, lp, score, weights, sizes, device, progress):
    net = engine_test_net(tn, weights, device)
    src = net.sources[lp.name]
    full = all(s == sizes[0] for s in sizes)
    sums: dict[str, torch.Tensor] = {}
    preds, labels = [], []
    bar = _progress(progress, len(sizes))
    with torch.no_grad():
        for n in sizes:
            if n == src.batch_size:
                blobs = net()
            else:   # the last images: a smaller batch, so that no image counts twice
                x, y = src.next_batch()
                blobs = net({lp.top[0]: x[:n], lp.top[1]: y[:n]})
            for name in _summed(net.outputs, score):   # summed on the device: no host sync per batch
                v = blobs[name].detach().float()
                v = v if full else v * n
                sums[name] = sums[name] + v if name in sums else v
            s = blobs[score.scores]
            preds.append(s.reshape(s.shape[0], -1).float().softmax(1))   # per image: the video accuracy averages them
            labels.append(blobs[score.label].reshape(-1).long())
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    outputs = {k: v.mean().item() for k, v in _means(sums, sizes).items()}
    classes = int(np.prod(net.blob_shapes[score.scores][1:]))
    return (outputs, dict(net.loss_weights), torch.cat(preds).cpu().numpy(), torch.cat(labels).cpu().numpy(),
            classes, str(net.device))


class _CaffeParams:
    """A ``caffe.Net``'s learnable blobs as :func:`exdrop.engine.snapshot.load_weights` sees a net: tensors
    that share Caffe's memory, so the weights are checked (with its errors) and copied in place."""

    def __init__(self, net):
        self.layer_list = [SimpleNamespace(name=name, blobs=[torch.from_numpy(b.data) for b in blobs])
                           for name, blobs in net.params.items()]


def _run_caffe(tn, lp, score, weights, sizes, device, progress):
    check_cpu_device(device)
    caffe = load_caffe()
    caffe.set_random_seed(tn.seed)
    with tempfile.TemporaryDirectory(prefix="exdrop_test_") as tmp:
        path = Path(tmp) / "test_net.prototxt"
        path.write_text(text_format.MessageToString(tn.param))
        net = caffe.Net(str(path), caffe.TEST)
    try:
        load_weights(_CaffeParams(net), weights, strict_missing=True)   # Caffe's copy_from aborts on a misfit
    except ValueError as exc:
        raise ValueError(f"the weights do not fit the net {tn.source}: {exc}") from None
    names = list(net._layer_names)
    after_data = names[names.index(lp.name) + 1]
    full = all(s == sizes[0] for s in sizes)
    sums: dict[str, float] = {}
    preds, labels = [], []
    bar = _progress(progress, len(sizes))
    for n in sizes:
        net.forward()
        if n != _batch_size(lp):   # the last images: rerun the layers above the data on them alone
            blobs = {t: net.blobs[t].data[:n].copy() for t in lp.top[:2]}
            for t, v in blobs.items():
                net.blobs[t].reshape(*v.shape)
                net.blobs[t].data[...] = v
            net.forward(start=after_data)
        for o in _summed(net.outputs, score):   # as CaffeBackend.test: float means, summed
            v = float(np.mean(net.blobs[o].data))
            sums[o] = sums.get(o, 0.0) + (v if full else v * n)
        s = net.blobs[score.scores].data[:n]
        preds.append(torch.from_numpy(s.reshape(s.shape[0], -1).astype(np.float32)).softmax(1).numpy())
        labels.append(net.blobs[score.label].data.reshape(-1).astype(np.int64))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    outputs = {k: float(v) for k, v in _means(sums, sizes).items()}
    loss_weights = {b: float(w) for b, w in net.blob_loss_weights.items() if w}
    classes = int(np.prod(net.blobs[score.scores].data.shape[1:]))
    return outputs, loss_weights, np.concatenate(preds), np.concatenate(labels), classes, "cpu (Caffe)"


# ---------------------------------------------------------------------- the report
def default_out(weights) -> Path:
    """``RUN/test_<stem>`` for ``RUN/snapshots/<stem>.caffemodel``; else ``test_<stem>`` beside the file."""
    p = Path(weights)
    stem = p.name
    for suffix in (".caffemodel.h5", ".caffemodel"):
        if stem.endswith(suffix):
            stem = stem[:-len(suffix)]
            break
    else:
        stem = p.stem
    base = p.parent.parent if p.parent.name == "snapshots" else p.parent
    return base / f"test_{stem}"


def confusion_figure(confusion, classes: list[str] | None = None, title: str = ""):
    """A matplotlib figure of the row-normalised confusion matrix (each true class's row sums to 1;
    a class without images is a row of 0), labelled axes; per-cell text below 100 classes."""
    plt = _pyplot()
    cm = np.asarray(confusion, dtype=np.float64)
    k = cm.shape[0]
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    text = k <= CELL_TEXT_MAX_CLASSES
    side = min(30.0 if text else 12.0, max(5.0, 0.32 * k + 2.5))   # room for the cells' text, else a fixed size
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(norm, vmin=0.0, vmax=1.0, cmap="Blues", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    names = classes if classes is not None and len(classes) == k else [str(i) for i in range(k)]
    if k <= 40:
        ax.set_xticks(range(k))
        ax.set_yticks(range(k))
        ax.set_xticklabels(names, rotation=90 if k > 10 or max(map(len, names)) > 4 else 0)
        ax.set_yticklabels(names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if text:
        size = max(4.0, min(10.0, 200.0 / k))
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=size,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def write_report(result: dict, out_dir) -> dict:
    """``out_dir/test.json`` (the result) and ``out_dir/confusion.png``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "test.json"
    tmp = out_dir / "test.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(js)
    png = out_dir / "confusion.png"
    title = (f"{Path(result['weights']).name} on {Path(result['data']).name}: accuracy "
             f"{result['accuracy']:.4f}, {result['images']} images")
    fig = confusion_figure(result["confusion"], result.get("classes"), title)
    try:
        fig.savefig(png, dpi=100)
    finally:
        _pyplot().close(fig)
    return {"json": js, "png": png}


def format_table(result: dict, max_rows: int = 20) -> str:
    """The summary and the per-class accuracy (all classes up to ``max_rows``, else the lowest and
    highest few)."""
    loss = result.get("loss")
    split = f" ({result['data_split']})" if result.get("data_split") else ""
    lines = [f"net:      {result['net']}", f"weights:  {result['weights']}",
             f"data:     {result['data']}{split}: {result['images']} images "
             f"({result['iterations']} batches of {result['batch_size']}; {result['reading']})",
             f"accuracy: {result['accuracy']:.4f}   loss: {'n/a' if loss is None else f'{loss:.4f}'}   "
             f"[{result['backend']}, {result['device']}]"]
    if result.get("video_accuracy") is not None:
        lines.append(f"video accuracy: {result['video_accuracy']:.4f} over {result['videos']} videos "
                     "(each video's frame softmax averaged)")
    names = result.get("classes") or [str(i) for i in range(result["num_classes"])]
    rows = list(zip(names, result["per_class_images"], result["per_class_accuracy"]))
    width = max(5, *(len(n) for n in names)) if names else 5
    shown = list(enumerate(rows))
    if len(rows) > max_rows:
        ranked = sorted((r for r in shown if r[1][2] is not None), key=lambda r: r[1][2])
        half = max_rows // 4
        shown = ranked[:half] + [None] + ranked[-half:]
    lines.append(f"  {'class':<{width}}  images  accuracy")
    for item in shown:
        if item is None:
            lines.append(f"  {'...':<{width}}")
            continue
        _, (name, n, acc) = item
        lines.append(f"  {name:<{width}}  {n:>6}  {'-' if acc is None else f'{acc:.4f}'}")
    return "\n".join(lines)
