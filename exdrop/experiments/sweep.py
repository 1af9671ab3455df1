"""The paper's comparisons as sweeps: method x dataset x net x dropout rate x seed (Tables 2, 3
and 4, Fig. 3).

One sweep is one folder (``results/table2_cifar10_cpu``)::

    plan.txt        one shell command per run, the same for a fresh start and a resume
                    (a cluster's job array runs line $SLURM_ARRAY_TASK_ID of it unchanged)
    plan.json       every run: method, dataset, net, rate, seed, budget, folder, command
    data/           the converted data of the budget, one train LMDB order per seed
                    (UCF101: one train list order per seed, see below)
    <dataset>/<method>[_r<rate>]/seed<k>/   a normal run folder (exdrop train), with the run's
                    net.prototxt and sweep_solver.prototxt; a fine-tuned net's runs are in
                    <dataset>/<net>/<method>[_r<rate>]/seed<k>/
    table2.md / table3.md / table4.md, their .json, fig3_<dataset>.png   (``collect``)

A run whose ``results.json`` says finished is skipped; one with a snapshot resumes from it
(``exdrop train --snapshot auto``). Seeds change the initialisation (the solver's
``random_seed``) and the data order (Caffe's Data layer reads its LMDB in order, so each seed
gets the training LMDB shuffled with that seed, as the paper shuffles the training images for
each model). Budgets (:data:`BUDGETS`): ``paper`` is the paper's protocol as the prototxts
state it; ``cpu`` is a reduced protocol that fits a 2-core machine (its numbers are labelled
"reduced budget" everywhere); so is any budget cut short (``exdrop sweep --max-iter``).

The net axis (:data:`NETS`): CNN-2 trains from scratch on CIFAR-10/100 and Caltech-256; AlexNet,
VGG16 and VGG19 are fine-tuned on UCF101 (Table 3) from the Model Zoo's ImageNet weights, one
file per net (``weights``: a missing file fails at plan time, naming where to get it). The
run's command carries ``--weights FILE`` on every line of plan.txt: on a resume the trainer
loads it first and then the snapshot's weights and solver state over it, so the snapshot wins.

UCF101 data per seed, without a copy of the frames: the converted folder of ``make data-ucf101``
(``train.txt``, ``frames/``, ``test_lmdb`` and ``test_videos.json``) is used as it is. Each seed
gets ``train.txt`` shuffled with that seed (a text file, ``data/ucf101/train_seed<k>.txt``) and
the run's TRAIN ``Data`` layer becomes an ``ImageData`` layer reading that list in order
(``shuffle: false``, ``root_folder``: the converted folder, the same batch size and
transform_param): the seeded order that a per-seed LMDB copy would give (the LMDB holds the
same decoded JPEG frames), and the same order in real Caffe, whose ImageData layer reads
``root_folder + path`` lines in order. The TEST layer keeps the converted test LMDB (in video
order), as the prototxts say.

UCF101 accuracy: the prototxts test ``test_iter`` x batch = 10,000 frames at each test point
(log.csv, the curves), a window of the video-ordered test LMDB. The table's number is therefore
each run's final snapshot evaluated once more on every test frame (``exdrop test ... --data
<converted folder>``, a second command of the run, written to ``RUN/final_test/test.json``):
the frame accuracy (the paper's Table 3 measure) and the video accuracy (the frames' softmax
averaged per video), from one pass.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exdrop import paper
from exdrop import data as D
from exdrop.caffe.backend import check_cpu_device
from exdrop.data import DatumLMDB, write_datum_lmdb
from exdrop.engine.pretrained import MODEL_ZOO
from exdrop.engine.pylayer import parse_param_str
from exdrop.experiments.variants import information_kl_weight
from exdrop.paper import paper_figure
from exdrop.paths import REPO_ROOT
from exdrop.proto import io as cio
from exdrop.run.runlog import plan_run_folder as run_folder, read_results

ROOT = REPO_ROOT   # the checkout: prototxt/, layers/ (exdrop.paths)
PROTO = ROOT / "prototxt"

# ------------------------------------------------------------------ what a sweep can run

# Ablations of Excitation Dropout (README "Does it reproduce?", phase C): the `ed` variant with
# these param_str values over its own; each is a method of its own in a sweep
ABLATIONS = {
    "ed_norescale": {"rescale": False},        # the authors' 2019 code: no per-image rescale
    "ed_gradmask": {"grad_rescale": False},    # the authors' gradient: the bare mask, no 1/scale
    "ed_gradscale": {"grad_rescale": True},    # the autograd gradient (the ablation under their recipe)
    "ed_ratio025": {"dropout_ratio": 0.25},    # base retain probability 0.75
    "ed_alive": {"count": "alive"},            # N of Eqn 3 over each image's alive units: not the paper's
}
METHODS = ("none", "standard_fc1", "standard_both", "maskimg", "curriculum", "adaptive", "information",
           "activation", "ed", *ABLATIONS)
METHOD_LABELS = {
    "none": "No Dropout", "standard_fc1": "Standard first fc", "standard_both": "Standard both fcs",
    "maskimg": "Standard + Mask/Img", "curriculum": "Curriculum", "adaptive": "Adaptive",
    "information": "Information", "activation": "Activation", "ed": "Excitation",
    "ed_norescale": "ED, no rescale", "ed_gradmask": "ED, mask gradient", "ed_gradscale": "ED, 1/scale gradient",
    "ed_ratio025": "ED, ratio 0.25", "ed_alive": "ED, N = alive units (not the paper's)",
}
# methods whose dropout rate a sweep can set (Table 4); the others run at their own parameters
RATED = ("standard_fc1", "standard_both", "maskimg", "curriculum", "activation", "ed")
TABLE_METHODS = {
    "2": METHODS,
    "3": ("none", "standard_fc1", "standard_both", "curriculum", "ed"),
    "4": ("standard_fc1", "standard_both", "ed"),
}
TABLE_RATES = {"2": (0.5,), "3": (0.5,), "4": (0.25, 0.5, 0.75)}
TABLE_DATASETS = {"2": "cifar10", "3": "ucf101", "4": "cifar10"}   # the CLI's default

DATASETS = {   # dataset -> prototxt folder ("{net}": the net's folder), default source
    "cifar10": ("cnn2/cifar10", "data/cifar-10-python.tar.gz"),
    "cifar100": ("cnn2/cifar100", "data/cifar-100-python.tar.gz"),
    "caltech256": ("cnn2/caltech256", "data/256_ObjectCategories.tar"),
    "ucf101": ("{net}/ucf101", "data/ucf101"),   # the converted folder of `make data-ucf101`
}
# net -> the ImageNet weights it is fine-tuned from (exdrop.engine.pretrained.MODEL_ZOO), None: from scratch
NETS = {"cnn2": None, "alexnet": "bvlc_alexnet.caffemodel", "vgg16": "VGG_ILSVRC_16_layers.caffemodel",
        "vgg19": "VGG_ILSVRC_19_layers.caffemodel"}
NET_LABELS = {"cnn2": "CNN-2", "alexnet": "AlexNet", "vgg16": "VGG16", "vgg19": "VGG19"}
DATASET_NETS = {"ucf101": ("alexnet", "vgg16", "vgg19")}   # the others: cnn2
WEIGHTS_DIR = "data/weights"   # where exdrop.engine.pretrained.fetch puts the Model Zoo files
TABLE3_ROWS = ("vgg16", "vgg19", "alexnet")   # the paper's row order
FINAL_TEST = "final_test"      # RUN/final_test/test.json: a fine-tuned run's final snapshot on every test frame
VARIANT_ALIASES = {("cnn2/cifar10", "standard_fc1"): "standard",
                   # the sweep's first fc is the fine-tuned nets' fc6
                   **{(f"{n}/ucf101", "standard_fc1"): "standard_fc6" for n in DATASET_NETS["ucf101"]}}

def nets_of(dataset: str) -> tuple:
    return DATASET_NETS.get(dataset, ("cnn2",))


@dataclass(frozen=True)
class Budget:
    """A training protocol. ``None`` fields keep what the prototxts say (the paper's protocol)."""
    name: str
    description: str
    train_per_class: int | None = None   # a stratified subset of the training split
    val_per_class: int | None = None     # held back from the training split for evaluation
    max_iter: int | None = None
    stepvalue: int | None = None         # the 10x learning-rate drop
    test_interval: int | None = None
    snapshot: int | None = None
    display: int | None = None
    amp: str | None = None               # "bf16": autocast the forward (EB stays float32)
    keep_snapshots: int = 1              # snapshot sets each run keeps (0: all, for the analysis over training)
    reduced: bool = True
    batch_size: int | None = None        # the TRAIN data layer's batch
    test_batch_size: int | None = None   # the TEST data layer's batch
    test_iter: int | None = None         # test batches per test pass


def describe(budget: Budget, nets) -> str:
    """The budget's description with ``{recipes}`` filled in: the paper's recipe of each net."""
    recipes = "; ".join(paper.RECIPES[n] for n in NETS if n in set(nets))
    return budget.description.replace("{recipes}", recipes)


# cpu: 24 epochs of the 5,000-image subset, tests at 400 / 800 / 1,200; a snapshot every 200 iterations,
# all kept, for the analysis over training (utilization metrics from each snapshot)
_CPU_SCHEDULE = dict(max_iter=1200, stepvalue=800, test_interval=400, snapshot=200, display=100, amp="bf16",
                     keep_snapshots=0)
BUDGETS = {
    "paper": Budget("paper", "the paper's protocol (Sec. 4.1), the prototxts' solvers as they are: {recipes}",
                    reduced=False),
    # the two reduced designs tried for a 2-core CPU (README, "Table 2 at a CPU budget"); cpu is
    # the one where the net without dropout overfits inside the budget
    "cpu": Budget("cpu", "reduced budget for a 2-core CPU: a stratified subset of 500 training images per "
                  "class, evaluated on 500 per class held back from the training split; batch 100, 1,200 "
                  "iterations (24 epochs), lr 1e-3 -> 1e-4 at 800, bf16 autocast of the training forward",
                  train_per_class=500, val_per_class=500, **_CPU_SCHEDULE),
    # as measured (README): the first, longer schedule of the cpu design, on the whole training split
    "cpu-full": Budget("cpu-full", "reduced budget for a 2-core CPU: the whole training split less 500 images "
                       "per class held back for evaluation; batch 100, 1,500 iterations (3.3 epochs of CIFAR), "
                       "lr 1e-3 -> 1e-4 at 1,000, bf16 autocast of the training forward",
                       train_per_class=100000, val_per_class=500, max_iter=1500, stepvalue=1000,
                       test_interval=250, snapshot=500, display=100, amp="bf16"),
    # the paper's shape on a small subset: 200 epochs and the lr drop at 25% of the iterations, as the
    # paper's 100K iterations x 100 images on 50K images with the drop at 25K; chosen so that dropout
    # has something to fix (the regime check, `regime`); none / Standard / ED x 3 seeds fit in about
    # 4 hours of a 2-core machine
    "cpu-200ep": Budget("cpu-200ep", "reduced budget shaped like the paper's protocol: a stratified subset of "
                        "200 training images per class, evaluated on 500 per class held back from the training "
                        "split; batch 100, 4,000 iterations (200 epochs, as the paper's 100K x 100 on 50K images), "
                        "lr 1e-3 -> 1e-4 at 1,000 (25%, as the paper's 25K of 100K), bf16 autocast of the "
                        "training forward", train_per_class=200, val_per_class=500, max_iter=4000, stepvalue=1000,
                        test_interval=500, snapshot=500, display=100, amp="bf16"),
}


@dataclass
class Run:
    dataset: str
    method: str
    rate: float
    seed: int
    folder: Path
    solver: Path = None   # written by `write_run`
    command: list = None
    net: str = "cnn2"
    weights: str | None = None    # the .caffemodel a fine-tuned net starts from
    evaluate: list = None         # a fine-tuned run's second command: its final snapshot on every test frame
    recipe: str = "paper"         # a key of RECIPES

    @property
    def key(self) -> str:
        net = "" if self.net == "cnn2" else f"{self.net}/"
        return f"{self.dataset}/{net}{self.method}_r{self.rate:g}/seed{self.seed}"


def pretrained_weights(net: str, given: dict | None = None) -> str | None:
    """The absolute path of the ImageNet weights ``net`` starts from (``given[net]``, else the Model
    Zoo file in :data:`WEIGHTS_DIR`); None for a net trained from scratch. A missing file raises
    FileNotFoundError naming the file and where to get it."""
    zoo = NETS[net]
    if zoo is None:
        return None
    path = Path((given or {}).get(net) or Path(WEIGHTS_DIR) / zoo)
    if not path.is_file():
        url, digest = MODEL_ZOO[zoo]
        raise FileNotFoundError(
            f"{net}: the ImageNet weights {path} are not there. Get the Model Zoo's {zoo} ({url}, sha1 {digest}) "
            f"into {WEIGHTS_DIR}/ (with a network: python -c \"from exdrop.engine.pretrained import fetch; "
            f"fetch('{zoo}')\"), or give its path: --weights {net}=FILE (make: {net.upper()}_WEIGHTS=FILE)")
    return str(path.resolve())


# ------------------------------------------------------------------ data

def prepare_data(dataset: str, source: str, budget: Budget, out: Path, seeds, progress: bool = True) -> dict:
    """The budget's converted data under ``out``: {"train": {seed: LMDB or list}, "val": {seed: LMDB},
    "counts"}; for image lists also "root" (their root_folder) and "evaluate" (the converted folder
    a run's final snapshot is tested on).

    CIFAR: the split is converted once (seed 0: the same subset and held-back images for every
    seed and method); each seed then gets its own copy of the training LMDB in an order drawn
    from that seed. Caltech-256: seed k uses the paper's random split (k - 1) mod 5. UCF101: the
    folder converted by `make data-ucf101`, each seed its own order of train.txt (module docstring).
    """
    if dataset == "ucf101":
        return _ucf101_lists(Path(source), budget, out / "ucf101", seeds)
    folder = out / f"{dataset}_{budget.name}"
    if budget.train_per_class is not None:
        per_class = budget.train_per_class + (budget.val_per_class or 0)
        classes = {"cifar10": 10, "cifar100": 100, "caltech256": 256}[dataset]
        val_size = (budget.val_per_class or 0) * classes or None
        kw = dict(val_size=val_size, seed=0, limit_per_class=per_class, progress=progress)
    else:
        kw = dict(seed=0, progress=progress)
    if dataset == "caltech256":
        if budget.train_per_class is not None:
            raise ValueError("the caltech256 data of the paper is already 50 train / 20 test images per class; "
                             "run it at BUDGET=paper (no CPU budget is defined for 128x128 CNN-2)")
        # the paper's five random splits: seed k trains on split (k - 1) mod 5, in its own order
        trains, vals, counts = {}, {}, None
        for s in seeds:
            info = D.prepare_caltech256(source, folder / f"split{(int(s) - 1) % 5}", split=(int(s) - 1) % 5,
                                        progress=progress)
            trains[int(s)] = _seeded_order(Path(info["train"]), folder / f"train_seed{s}_lmdb", int(s))
            vals[int(s)], counts = info.get("test") or info["val"], info.get("counts")
        return {"val": vals, "train": trains, "counts": counts}
    if dataset == "cifar10":
        info = D.prepare_cifar10(D.official_source(source, "cifar10"), folder / "split", **kw)
    elif dataset == "cifar100":
        info = D.prepare_cifar100(D.official_source(source, "cifar100"), folder / "split", **kw)
    else:
        raise ValueError(f"unknown dataset {dataset!r}: one of {sorted(DATASETS)}")
    val = info.get("val") or info.get("test")
    trains = {int(s): _seeded_order(Path(info["train"]), folder / f"train_seed{s}_lmdb", int(s)) for s in seeds}
    return {"val": {int(s): val for s in seeds}, "train": trains, "counts": info.get("counts")}


def _ucf101_lists(src: Path, budget: Budget, out: Path, seeds) -> dict:
    """The converted UCF101 folder ``src`` as it is, and one order of its train.txt per seed."""
    if budget.train_per_class is not None:
        raise ValueError(f"budget {budget.name!r} subsets the training images per class, which is defined for "
                         "CNN-2 only; fine-tune on UCF101 at BUDGET=paper (a GPU's work), or stop the runs early "
                         "with --max-iter N (MAX_ITER=N): a reduced budget, labelled so")
    test = next((src / s for s in ("val_lmdb", "test_lmdb") if (src / s / "data.mdb").is_file()), None)
    missing = [name for name, ok in (("train.txt", (src / "train.txt").is_file()),
                                     ("frames/", (src / "frames").is_dir()),
                                     ("test_lmdb/ or val_lmdb/", test is not None),
                                     ("test_videos.json", (src / "test_videos.json").is_file()),
                                     ("meta.json", (src / "meta.json").is_file())) if not ok]
    if missing:
        raise FileNotFoundError(f"{src}: not a converted UCF101 folder (no {', '.join(missing)}); convert the videos "
                                "once with `make data-ucf101 UCF101=path/to/UCF-101 SPLITS=path/to/ucfTrainTestlist` "
                                "(writes data/ucf101) and give that folder (--data ucf101=DIR)")
    counts = json.loads((src / "meta.json").read_text()).get("counts")
    trains = {int(s): _seeded_list(src / "train.txt", out / f"train_seed{s}.txt", int(s)) for s in seeds}
    return {"train": trains, "val": {int(s): str(test) for s in seeds}, "counts": counts,
            "root": str(src.resolve()) + "/", "evaluate": str(src.resolve())}


def _seeded_order(src: Path, dst: Path, seed: int) -> str:
    """``dst``: the records of LMDB ``src`` in an order drawn from ``seed`` (written again only when
    the source, the seed or the record count differs from the one it was written from)."""
    done = dst / "order.json"
    with DatumLMDB(src) as db:
        stamp = {"source": str(src.resolve()), "seed": seed, "records": len(db)}
        if done.is_file() and json.loads(done.read_text()) == stamp:
            return str(dst)
        images, labels = db.read_all()
    order = np.random.default_rng(seed).permutation(len(labels))
    write_datum_lmdb(dst, images[order], labels[order])
    done.write_text(json.dumps(stamp))
    return str(dst)


def _seeded_list(src: Path, dst: Path, seed: int) -> str:
    """``dst``: the lines of list file ``src`` in an order drawn from ``seed`` (written again only
    when ``src`` changed)."""
    st = src.stat()
    stamp = {"source": str(src.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "seed": seed}
    done = dst.with_suffix(".json")
    if dst.is_file() and done.is_file() and json.loads(done.read_text()) == stamp:
        return str(dst.resolve())
    lines = [line for line in src.read_text().splitlines() if line.strip()]
    order = np.random.default_rng(seed).permutation(len(lines))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.write_text("".join(lines[i] + "\n" for i in order))
    tmp.replace(dst)
    done.write_text(json.dumps(stamp))
    return str(dst.resolve())


# ------------------------------------------------------------------ runs

# The recipes (Issue: which init / solver / input scale a method is trained with): "paper" is the
# prototxts' own (Adam, msra, pixels / 256), "authors" the authors' training script's (SGD momentum
# 0.9, gaussian 0.01, raw pixels, biases decayed, last layer x10 / x20; the *_authors variants).
RECIPES = {"paper": "", "authors": "_authors"}
RECIPE_LABELS = {"paper": "the paper's recipe (Adam, msra init, pixels / 256)",
                 "authors": "the authors' recipe (SGD momentum 0.9, gaussian 0.01 init, raw pixels, biases decayed, "
                            "last layer x10 / x20, no 1/scale in the guided dropouts' gradient)"}


def variant_paths(dataset: str, method: str, net: str = "cnn2", recipe: str = "paper") -> tuple[Path, Path]:
    folder = DATASETS[dataset][0].format(net=net)
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}: one of {', '.join(RECIPES)}")
    base = "ed" if method in ABLATIONS else method
    name = VARIANT_ALIASES.get((folder, base), base) + RECIPES[recipe]
    net_path, solver = PROTO / folder / f"train_val_{name}.prototxt", PROTO / folder / f"solver_{name}.prototxt"
    if not net_path.is_file():
        on = dataset if net == "cnn2" else f"{dataset} ({net})"
        recipe_note = f" under the {recipe} recipe (defined for cifar10 only)" if recipe != "paper" else ""
        raise FileNotFoundError(f"no prototxt for method {method!r} on {on}{recipe_note}: {net_path}")
    return net_path, solver


def set_rate(net_param, rate: float, where: str) -> int:
    """Set the dropout rate of every dropout layer of ``net_param``; returns how many were set."""
    n = 0
    for lp in net_param.layer:
        if lp.type == "Dropout":
            lp.dropout_param.dropout_ratio = rate
            n += 1
        elif lp.type == "Python":
            params = parse_param_str(lp.python_param.param_str, f"{where}: layer '{lp.name}'")
            if "dropout_ratio" in params:
                params["dropout_ratio"] = rate
                lp.python_param.param_str = repr(params)
                n += 1
    return n


def _to_image_data(lp, source: str, root: str) -> None:
    """A Data layer made an ImageData layer reading the list ``source`` in order, paths under ``root``
    (its batch size and transform_param kept)."""
    batch = lp.data_param.batch_size
    lp.type = "ImageData"
    lp.ClearField("data_param")
    ip = lp.image_data_param
    ip.source, ip.root_folder, ip.batch_size, ip.shuffle = source, root, batch, False


def write_run(run: Run, budget: Budget, data: dict, python: str = sys.executable, device: str = "auto",
              backend: str = "engine") -> Run:
    """Write the run folder's net.prototxt and sweep_solver.prototxt; set the run's command (and, for
    data with a converted folder to evaluate on, its final-test command)."""
    from google.protobuf import text_format
    net_path, solver_path = variant_paths(run.dataset, run.method, run.net, run.recipe)
    net = cio.read_net_prototxt(net_path)
    if run.method in RATED:
        if not set_rate(net, run.rate, str(net_path)):
            raise ValueError(f"{net_path}: method {run.method} has no dropout layer whose rate can be set")
    elif run.rate != 0.5:
        raise ValueError(f"method {run.method} has no dropout rate to sweep (rated methods: {', '.join(RATED)})")
    if run.method in ABLATIONS:
        eds = [lp for lp in net.layer if lp.type == "Python" and lp.python_param.layer == "ExcitationDropout"]
        if not eds:
            raise ValueError(f"{net_path}: ablation {run.method} needs an ExcitationDropout layer")
        for lp in eds:
            params = parse_param_str(lp.python_param.param_str, f"{net_path}: layer '{lp.name}'")
            lp.python_param.param_str = repr({**params, **ABLATIONS[run.method]})
    n_train = (data.get("counts") or {}).get("train")
    test_batch = None
    for lp in net.layer:
        if n_train and lp.type == "Python" and lp.python_param.layer == "InformationDropout" \
                and len(lp.loss_weight) == 2:
            lp.loss_weight[1] = information_kl_weight(int(n_train))
        if lp.type != "Data":
            continue
        phases = {r.phase for r in lp.include if r.HasField("phase")}
        source = str(Path(data["train" if phases == {0} else "val"][run.seed]).resolve())
        if phases == {0}:
            if budget.batch_size:
                lp.data_param.batch_size = budget.batch_size
            if data.get("root"):
                _to_image_data(lp, source, data["root"])
                continue
        else:
            if budget.test_batch_size:
                lp.data_param.batch_size = budget.test_batch_size
            test_batch = lp.data_param.batch_size
        lp.data_param.source = source
    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "net.prototxt").write_text(
        f"# {run.key}: {net_path.relative_to(ROOT)} with the sweep's data and rate\n"
        + text_format.MessageToString(net))
    sp = cio.read_solver_prototxt(solver_path)
    sp.net = str((run.folder / "net.prototxt").resolve())
    sp.random_seed = run.seed
    for key in ("max_iter", "test_interval", "snapshot", "display"):
        if getattr(budget, key) is not None:
            setattr(sp, key, getattr(budget, key))
    if budget.stepvalue is not None:
        del sp.stepvalue[:]
        sp.stepvalue.append(budget.stepvalue)
    if budget.test_iter is not None:
        del sp.test_iter[:]
        sp.test_iter.append(budget.test_iter)
    elif budget.train_per_class is not None and test_batch:   # evaluate the whole held-back split
        n_val = sum((data.get("counts") or {}).get("val_per_class") or []) or 0
        if n_val:
            del sp.test_iter[:]
            sp.test_iter.append(math.ceil(n_val / test_batch))
    run.solver = run.folder / "sweep_solver.prototxt"
    run.solver.write_text(f"# {run.key}, budget {budget.name}: {solver_path.relative_to(ROOT)} with the "
                          f"sweep's seed and budget\n" + text_format.MessageToString(sp))
    folder = run.folder.resolve()
    run.command = [python, "-m", "exdrop", "train", str(run.solver.resolve()), "--out", str(folder),
                   "--snapshot", "auto", "--quiet", "--device", device, "--backend", backend]
    if run.weights:
        run.command += ["--weights", str(run.weights)]
    if budget.amp:
        run.command += ["--amp", budget.amp]
    if budget.keep_snapshots != 1:
        run.command += ["--keep-snapshots", str(budget.keep_snapshots)]
    run.evaluate = None
    if data.get("evaluate"):
        prefix = Path(sp.snapshot_prefix).name if sp.snapshot_prefix else "snapshot"   # as the trainer names it
        final = folder / "snapshots" / f"{prefix}_iter_{sp.max_iter}.caffemodel"
        run.evaluate = [python, "-m", "exdrop", "test", str(run.solver.resolve()), "--weights", str(final),
                        "--data", data["evaluate"], "--out", str(folder / FINAL_TEST), "--quiet",
                        "--device", device if backend == "engine" else "cpu", "--backend", backend]
    return run


def _plan_line(r: Run) -> str:
    log = shlex.quote(str(r.folder / "stdout.log"))
    line = f"cd {shlex.quote(str(ROOT))} && {shlex.join(r.command)} > {log} 2>&1"
    return line + (f" && {shlex.join(r.evaluate)} >> {log} 2>&1" if r.evaluate else "") + "\n"


def plan(out: Path, datasets, methods, rates, seeds, budget: Budget, sources: dict, device="auto",
         backend="engine", progress=True, nets=None, weights: dict | None = None, recipe: str = "paper") -> list[Run]:
    """Prepare the data, write every run folder and ``plan.txt`` / ``plan.json``; returns the runs.
    ``nets``: the nets to run where a dataset has several (default: all of the dataset's);
    ``weights``: {net: .caffemodel} for the fine-tuned nets (default: the Model Zoo file in
    :data:`WEIGHTS_DIR`), checked before anything is written; ``recipe``: a key of :data:`RECIPES`
    (every variant is checked to exist before anything is written)."""
    out = Path(out)
    if backend == "caffe":
        try:
            check_cpu_device(device)
        except ValueError as exc:
            raise ValueError(f"--backend caffe --device {device}: {exc}") from None
    if backend == "caffe" and budget.amp:
        raise ValueError(f"--backend caffe: budget {budget.name} trains with --amp {budget.amp}, which the Caffe "
                         "backend does not support; give --amp '' (float32) or use the engine backend")
    for dataset in datasets:
        for net in nets_of(dataset):
            if nets is None or net in nets:
                for method in methods:
                    variant_paths(dataset, method, net, recipe)
    chosen = {}
    for dataset in datasets:
        own = nets_of(dataset)
        chosen[dataset] = [n for n in own if nets is None or n in nets]
        if not chosen[dataset]:
            raise ValueError(f"--nets {','.join(nets)}: {dataset} runs {', '.join(own)}")
    paths = {n: pretrained_weights(n, weights) for d in datasets for n in chosen[d]}
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for dataset in datasets:
        data = prepare_data(dataset, sources.get(dataset) or DATASETS[dataset][1], budget, out / "data", seeds,
                            progress)
        for net in chosen[dataset]:
            base = out / dataset if net == "cnn2" else out / dataset / net
            for method in methods:
                for rate in (rates if method in RATED else (0.5,)):
                    for seed in seeds:
                        name = method if len(rates) == 1 else f"{method}_r{rate:g}"
                        run = Run(dataset, method, float(rate), int(seed), base / name / f"seed{seed}", net=net,
                                  weights=paths[net], recipe=recipe)
                        runs.append(write_run(run, budget, data, device=device, backend=backend))
    (out / "plan.txt").write_text("".join(_plan_line(r) for r in runs))
    info = dict(dataclasses.asdict(budget), description=describe(budget, {r.net for r in runs}))
    entries = [{"key": r.key, "dataset": r.dataset, "net": r.net, "method": r.method, "rate": r.rate,
                "seed": r.seed, "folder": str(r.folder), "in_sweep": r.folder.relative_to(out).as_posix(),
                "command": r.command, "weights": r.weights, "evaluate": r.evaluate} for r in runs]
    (out / "plan.json").write_text(json.dumps({
        "budget": info, "root": str(ROOT), "recipe": recipe, "recipe_description": RECIPE_LABELS[recipe],
        "runs": entries + _kept_runs(out, info, recipe, {e["key"] for e in entries})}, indent=1))
    return runs


def _kept_runs(out: Path, budget: dict, recipe: str, planned: set) -> list[dict]:
    """The finished runs of the sweep's previous plan.json that this plan leaves out (a later call
    with fewer methods or seeds), when that plan had the same budget and recipe: a sweep folder
    keeps every run it finished."""
    try:
        old = json.loads((out / "plan.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict) or old.get("recipe", "paper") != recipe or \
            {k: v for k, v in (old.get("budget") or {}).items() if k != "description"} != \
            {k: v for k, v in budget.items() if k != "description"}:
        return []
    return [e for e in old.get("runs", []) if isinstance(e, dict) and e.get("key") not in planned
            and status(run_folder(out, e)) == "finished"]



def status(run_folder: Path) -> str:
    """``finished``, ``started`` (a snapshot or a log to resume from) or ``new``."""
    r = read_results(run_folder)
    if r.get("status") == "finished" and r.get("iterations") == r.get("max_iter"):
        return "finished"
    return "started" if any((run_folder / "snapshots").glob("*.solverstate")) else "new"


def final_test(run_folder: Path) -> dict | None:
    """A finished run's ``final_test/test.json`` when it is of the run's last snapshot, else None."""
    try:
        test = json.loads((Path(run_folder) / FINAL_TEST / "test.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(test, dict):
        return None
    return test if str(test.get("weights", "")).endswith(f"_iter_{read_results(run_folder).get('max_iter')}.caffemodel") \
        else None


def _steps(run: Run) -> list[list]:
    """The commands a run still needs: training unless finished, then its final test unless done."""
    steps = [run.command] if status(run.folder) != "finished" else []
    if run.evaluate and (steps or final_test(run.folder) is None):
        steps.append(run.evaluate)
    return steps


def execute(runs: list[Run], workers: int = 1, threads: int | None = None, gpus: int | None = None,
            echo=print) -> dict:
    """Run the plan with ``workers`` local processes; finished runs are skipped. On CPU each
    process gets ``threads`` torch threads (default: the cores divided among the workers); with
    GPUs the runs go round-robin over them (several runs share a GPU when workers > GPUs). A
    fine-tuned run's final test follows its training in the same worker slot."""
    import torch
    gpus = torch.cuda.device_count() if gpus is None else gpus
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    queue = [(r, s) for r in runs if (s := _steps(r))]
    echo(f"sweep: {len(runs)} runs, {len(runs) - len(queue)} finished, {len(queue)} to run with {workers} "
         f"worker(s)" + (f" on {gpus} GPU(s)" if gpus else f", {threads} thread(s) each"))
    todo = len(queue)
    running: list[tuple[subprocess.Popen, Run, float, object, list]] = []
    failed, slot = [], 0
    try:
        while queue or running:
            while queue and len(running) < workers:
                run, steps = queue.pop(0)
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                if gpus:
                    env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
                slot += 1
                log = open(run.folder / "stdout.log", "ab")
                if steps[0] is run.evaluate:
                    echo(f"sweep: test  {run.key} (the final snapshot on every test image)")
                else:
                    echo(f"sweep: start {run.key}" + (" (resuming)" if status(run.folder) == "started" else ""))
                proc = subprocess.Popen(steps[0], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                running.append((proc, run, time.perf_counter(), log, steps[1:]))
            time.sleep(0.5)
            for item in list(running):
                proc, run, t0, log, rest = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                log.close()
                took = time.perf_counter() - t0
                if proc.returncode == 0 and status(run.folder) != "finished":
                    # a run stopped by a signal of its own (SIGTERM from a scheduler, Ctrl-C to it alone) exits 0
                    # after its snapshot: not done, and not tested
                    failed.append(run.key)
                    echo(f"sweep: stopped {run.key} before max_iter after {took:.0f} s (interrupted; its snapshot is "
                         "kept: the same sweep again resumes it)")
                elif proc.returncode == 0:
                    echo(f"sweep: done  {run.key} in {took:.0f} s")
                    if rest:
                        queue.insert(0, (run, rest))
                else:
                    failed.append(run.key)
                    echo(f"sweep: FAILED {run.key} (exit {proc.returncode}; see {run.folder / 'stdout.log'})")
    except KeyboardInterrupt:
        # Ctrl-C reached the runs too (one process group): each snapshots and stops; wait for that
        echo(f"sweep: interrupted; waiting for {len(running)} run(s) to write their snapshots ...")
        for proc, run, _, log, _ in running:
            try:
                proc.wait(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
        echo("sweep: stopped; the same command again skips the finished runs and resumes the others")
        raise
    return {"runs": len(runs), "ran": todo, "failed": failed}


# ------------------------------------------------------------------ results

def _final_test(folder: Path) -> tuple[float | None, float | None, list[tuple[int, float]]]:
    """(final test accuracy, final test loss, the test-accuracy curve) from a run's log.csv."""
    import csv
    log = folder / "log.csv"
    if not log.is_file():
        return None, None, []
    with open(log, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("phase") == "test" and r.get("accuracy") not in (None, "")]
    curve = sorted({int(r["iter"]): float(r["accuracy"]) for r in rows}.items())
    if not rows:
        return None, None, []
    last = max(rows, key=lambda r: int(r["iter"]))
    loss = float(last["loss"]) if last.get("loss") not in (None, "") else None
    return float(last["accuracy"]), loss, curve


def _mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample std (ddof 1) in %, None where there are too few values."""
    return (float(np.mean(values)) * 100 if values else None,
            float(np.std(values, ddof=1)) * 100 if len(values) > 1 else None)


def collect(out: Path) -> dict:
    """Every number of the sweep in ``out`` (from plan.json and the run folders). A run with a
    final-test command counts with its final test (frame and video accuracy on every test image
    once); the others with the last test pass of their log.csv."""
    out = Path(out)
    p = json.loads((out / "plan.json").read_text())
    budget = p["budget"]
    cells: dict = {}
    for r in p["runs"]:
        folder = run_folder(out, r)
        acc, loss, curve = _final_test(folder)
        st = status(folder)
        res = read_results(folder)
        entry = {"seed": r["seed"], "status": st, "accuracy": acc if st == "finished" else None,
                 "last_accuracy": acc, "loss": loss, "curve": curve, "iterations": res.get("iterations"),
                 "seconds": res.get("seconds"), "folder": str(folder)}
        if r.get("evaluate"):
            test = final_test(folder) if st == "finished" else None
            entry.update(accuracy=test and test["accuracy"], video_accuracy=test and test.get("video_accuracy"),
                         test_images=test and test["images"], videos=test and test.get("videos"),
                         accuracy_from=f"{FINAL_TEST}/test.json")
        key = (r["dataset"], r.get("net", "cnn2"), r["method"], r["rate"])
        cells.setdefault(key, []).append(entry)
    summary = []
    for (dataset, net, method, rate), runs in sorted(cells.items()):
        accs = [x["accuracy"] for x in runs if x["accuracy"] is not None]
        mean, std = _mean_std(accs)
        cell = {"dataset": dataset, "net": net, "method": method, "rate": rate, "seeds": len(accs),
                "planned_seeds": len(runs), "mean": mean, "std": std,
                "paper": paper_figure(dataset, net, method, rate), "runs": runs}
        if any("video_accuracy" in x for x in runs):
            videos = [x["video_accuracy"] for x in runs if x.get("video_accuracy") is not None]
            cell["video_mean"], cell["video_std"] = _mean_std(videos)
            cell["video_seeds"] = len(videos)
        summary.append(cell)
    return {"budget": budget, "reduced": budget.get("reduced", True), "recipe": p.get("recipe", "paper"),
            "cells": summary}


def paired_interval(a: dict, b: dict, level: float = 0.95) -> dict:
    """The paired difference a - b over the seeds both have ({seed: value}, values in %): its mean,
    the sample std of the differences and Student's t interval at ``level`` (None below 2 seeds)."""
    from scipy import stats
    seeds = sorted(set(a) & set(b))
    d = np.array([a[k] - b[k] for k in seeds], dtype=float)
    out = {"seeds": seeds, "n": len(seeds), "mean": float(d.mean()) if len(d) else None, "sd": None,
           "low": None, "high": None, "level": level}
    if len(d) > 1:
        sd = float(d.std(ddof=1))
        half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1)) * sd / math.sqrt(len(d))
        out.update(sd=sd, low=out["mean"] - half, high=out["mean"] + half)
    return out


def format_interval(p: dict) -> str:
    """``-6.0 +- 1.2 [95% CI -9.0, -3.0], seeds 1,2,3`` (points)."""
    if p["mean"] is None:
        return "not yet"
    seeds = ",".join(str(s) for s in p["seeds"])
    if p["low"] is None:
        return f"{p['mean']:+.2f} (one seed: {seeds}; no interval)"
    return (f"{p['mean']:+.2f} +- {p['sd']:.2f} [{p['level'] * 100:.0f}% CI {p['low']:+.2f}, {p['high']:+.2f}], "
            f"seeds {seeds}")


# The comparisons the README's "Does it reproduce?" table reports, as (a, b): a - b paired by seed
PAIRED = (("ed", "standard_fc1"), ("standard_fc1", "none"), ("activation", "standard_fc1"), ("ed", "none"))
# The regime check's thresholds: No Dropout fits its training subset (train accuracy over the last
# display rows), its held-out loss rises after its minimum, and Standard beats it by more than the
# seed noise: on every seed by more than one seed's noise (the 1.9-point gap of two runs from one
# mask distribution in the `cpu` sweep, Standard vs Standard + Mask/Img), or with a paired interval
# above 0. (Two seeds' t interval is 12.7 standard errors wide, too wide to decide alone: a check
# that one seed passed must not fail when a second seed agrees with it.)
REGIME_TRAIN_ACCURACY = 0.95
REGIME_LOSS_RISE = 0.05     # the last held-out loss at least 5% above its minimum
SINGLE_SEED_NOISE = 1.9


def _by_seed(cell: dict | None, key: str = "accuracy") -> dict:
    return {r["seed"]: r[key] * 100 for r in (cell or {}).get("runs", []) if r.get(key) is not None}


def paired(summary: dict, dataset: str = "cifar10", rate: float = 0.5) -> list[dict]:
    """The :data:`PAIRED` differences of a sweep's summary (``collect``) that it has both cells of."""
    cells = {(c["dataset"], c["method"]): c for c in summary["cells"] if c["rate"] == rate}
    out = []
    for a, b in PAIRED:
        if (dataset, a) in cells and (dataset, b) in cells:
            out.append({"a": a, "b": b, **paired_interval(_by_seed(cells[(dataset, a)]),
                                                          _by_seed(cells[(dataset, b)]))})
    return out


def _train_rows(folder: Path) -> list[dict]:
    import csv
    try:
        with open(Path(folder) / "log.csv", newline="") as f:
            return [r for r in csv.DictReader(f)]
    except OSError:
        return []


def regime(summary: dict, dataset: str = "cifar10") -> dict:
    """Is this a regime where dropout helps? No Dropout near 100% training accuracy with its held-out
    loss rising, and Standard (first fc) ahead of No Dropout by more than the seed noise. Per seed of
    No Dropout: its final train accuracy (the mean of the last 3 display rows) and its held-out loss
    curve; then the Standard - none difference, paired by seed: beyond the noise when every seed's
    gap exceeds :data:`SINGLE_SEED_NOISE` or its interval lies above 0. ``ok`` is None while a part
    is missing."""
    cells = {c["method"]: c for c in summary["cells"] if c["dataset"] == dataset and c["rate"] == 0.5}
    none = cells.get("none")
    seeds = []
    for r in (none or {}).get("runs", []):
        if r.get("status") != "finished":
            continue
        rows = _train_rows(r["folder"])
        train = [float(x["accuracy"]) for x in rows if x["phase"] == "train" and x.get("accuracy")][-3:]
        tests = [(int(x["iter"]), float(x["loss"])) for x in rows if x["phase"] == "test" and x.get("loss")]
        min_iter, min_loss = min(tests, key=lambda t: t[1]) if tests else (None, None)
        last = tests[-1][1] if tests else None
        seeds.append({"seed": r["seed"], "train_accuracy": float(np.mean(train)) if train else None,
                      "held_out_loss_min": min_loss, "held_out_loss_min_iter": min_iter, "held_out_loss_last": last,
                      "held_out_accuracy": r["accuracy"]})
    fits = [s["train_accuracy"] is not None and s["train_accuracy"] >= REGIME_TRAIN_ACCURACY for s in seeds]
    rises = [s["held_out_loss_last"] is not None and s["held_out_loss_last"] >= (1 + REGIME_LOSS_RISE)
             * s["held_out_loss_min"] for s in seeds]
    gap, gaps = None, []
    if "standard_fc1" in cells:
        standard, without = _by_seed(cells["standard_fc1"]), _by_seed(none)
        gap = paired_interval(standard, without)
        gaps = [round(standard[k] - without[k], 6) for k in gap["seeds"]]
    if not gaps:
        helps = None
    else:
        helps = min(gaps) > SINGLE_SEED_NOISE or (gap["low"] is not None and gap["low"] > 0)
    parts = [all(fits) if seeds else None, all(rises) if seeds else None, helps]
    ok = None if any(p is None for p in parts) else all(parts)
    return {"dataset": dataset, "recipe": summary.get("recipe", "paper"), "budget": summary["budget"]["name"],
            "none": seeds, "overfits": parts[0], "held_out_loss_rises": parts[1], "standard_minus_none": gap,
            "standard_minus_none_by_seed": gaps,
            "dropout_helps": helps, "ok": ok,
            "thresholds": {"train_accuracy": REGIME_TRAIN_ACCURACY, "loss_rise": REGIME_LOSS_RISE,
                           "single_seed_noise": SINGLE_SEED_NOISE}}


def regime_markdown(check: dict) -> str:
    def yes(v):
        return "not yet" if v is None else ("yes" if v else "**no**")
    lines = [f"Regime check ({check['dataset']}, budget `{check['budget']}`, {check['recipe']} recipe): "
             f"**{'passes' if check['ok'] else 'not yet decided' if check['ok'] is None else 'fails'}**", "",
             "| No Dropout seed | train accuracy | held-out loss min (iter) | held-out loss last | held-out accuracy |",
             "|---|---|---|---|---|"]
    for s in check["none"]:
        def f(v, fmt):
            return "-" if v is None else format(v, fmt)
        lines.append(f"| {s['seed']} | {f(s['train_accuracy'], '.3f')} | {f(s['held_out_loss_min'], '.3f')} "
                     f"({s['held_out_loss_min_iter']}) | {f(s['held_out_loss_last'], '.3f')} | "
                     f"{f(s['held_out_accuracy'], '.4f')} |")
    gap = check["standard_minus_none"]
    gaps = check.get("standard_minus_none_by_seed") or []
    per_seed = f" (per seed: {', '.join(f'{g:+.2f}' for g in gaps)})" if len(gaps) > 1 else ""
    t = check["thresholds"]
    lines += ["",
              f"- No Dropout fits its training subset (train accuracy >= {t['train_accuracy']:g}): "
              f"{yes(check['overfits'])}",
              f"- its held-out loss rises (last >= {1 + t['loss_rise']:g} x its minimum): "
              f"{yes(check['held_out_loss_rises'])}",
              f"- Standard first fc - No Dropout (points): {format_interval(gap) if gap else 'not yet'}"
              f"{per_seed}; beyond the seed noise (every seed's gap > {t['single_seed_noise']:g} points, or the "
              f"interval above 0): {yes(check['dropout_helps'])}"]
    return "\n".join(lines) + "\n"


def _cell(c: dict, video: bool = False) -> str:
    if c is None:
        return "not yet"
    mean, std, n = (c.get("video_mean"), c.get("video_std"), c.get("video_seeds")) if video else \
        (c["mean"], c["std"], c["seeds"])
    if mean is None:
        return "not yet"
    s = f"{mean:.2f}" + (f" +- {std:.2f}" if std is not None else "")
    s += f" (n={n})" if n != c["planned_seeds"] or n == 1 else ""
    return s + (f" [{c['paper']:.2f}]" if c["paper"] is not None and not video else "")


def _budget_line(summary: dict) -> str:
    b = summary["budget"]
    head = "**Reduced budget**" if summary["reduced"] else "**The paper's protocol**"
    return f"{head} (`{b['name']}`): {b['description']}."


def _row_label(dataset: str, net: str) -> str:
    return dataset if net == "cnn2" else f"{dataset} ({NET_LABELS[net]})"


def table_markdown(summary: dict, table: str) -> str:
    """Table 2 (methods as columns, datasets as rows), Table 3 (methods as columns, the fine-tuned
    nets as rows, then the same for the video accuracy) or Table 4 (rates as columns)."""
    cells = {(c["dataset"], c["net"], c["method"], c["rate"]): c for c in summary["cells"]}
    rows = sorted({(c["dataset"], c["net"]) for c in summary["cells"]},
                  key=lambda dn: (list(DATASETS).index(dn[0]), list(NETS).index(dn[1])))
    scratch = all(n == "cnn2" for _, n in rows)
    lines = [_budget_line(summary), ""]
    if summary.get("recipe", "paper") != "paper":
        lines += [f"Recipe: {RECIPE_LABELS[summary['recipe']]}.", ""]
    if scratch:
        lines += ["Test accuracy (%), mean +- std over seeds (n = seeds finished), the paper's figure in "
                  "[brackets]. ", ""]
    else:
        lines += ["Test accuracy (%), mean +- std over seeds (n = seeds finished), the paper's figure in [brackets] "
                  "(a mean of five models; the paper gives no std). Fine-tuned nets: the frame accuracy of each "
                  f"run's final snapshot on every test frame once (`RUN/{FINAL_TEST}/test.json`).", ""]
    if not rows:
        return "\n".join(lines + ["No run in this sweep's plan.json yet."]) + "\n"
    first = "Dataset (CNN-2)" if scratch else "Dataset (net)"

    def methods_of(keep) -> list:
        return [m for m in METHODS if any(c["method"] == m and keep(c) for c in summary["cells"])]

    if table == "2":
        methods = methods_of(lambda c: True)
        lines += [f"| {first} | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for d, n in rows:
            lines.append(f"| {_row_label(d, n)} | " + " | ".join(_cell(cells.get((d, n, m, 0.5))) for m in methods)
                         + " |")
    elif table == "3":
        methods = methods_of(lambda c: True)
        head = ["| UCF101 (fine-tuned) | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |",
                "|---|" + "---|" * len(methods)]
        order = sorted(rows, key=lambda dn: (TABLE3_ROWS + tuple(NETS)).index(dn[1]))
        lines += head + [f"| {NET_LABELS[n]} | " + " | ".join(_cell(cells.get((d, n, m, 0.5))) for m in methods)
                         + " |" for d, n in order]
        if any("video_mean" in c for c in summary["cells"]):
            lines += ["", "Video accuracy (%) of the same snapshots: the softmax of a test video's frames averaged, "
                          "then the argmax (the paper reports no video accuracy).", ""]
            lines += head + [f"| {NET_LABELS[n]} | " + " | ".join(_cell(cells.get((d, n, m, 0.5)), video=True)
                                                               for m in methods) + " |" for d, n in order]
    else:
        rates = sorted({c["rate"] for c in summary["cells"]})
        lines += [f"| {first} | Dropout scheme | " + " | ".join(f"{r:g}" for r in rates) + " |",
                  "|---|---|" + "---|" * len(rates)]
        for d, n in rows:
            for m in methods_of(lambda c: c["dataset"] == d and c["net"] == n):
                lines.append(f"| {_row_label(d, n)} | {METHOD_LABELS[m]} | "
                             + " | ".join(_cell(cells.get((d, n, m, r))) for r in rates) + " |")
    return "\n".join(lines) + "\n"


def plot_fig3(summary: dict, dataset: str, path: Path, rate: float = 0.5) -> Path:
    """Fig. 3: test accuracy over iterations, the mean curve and a +-std band per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    nets = []
    for c in summary["cells"]:
        if c["dataset"] != dataset or c["rate"] != rate:
            continue
        curves = [dict(r["curve"]) for r in c["runs"] if r["curve"]]
        if not curves:
            continue
        iters = sorted(set.intersection(*(set(k) for k in curves)))
        if not iters:
            continue
        ys = np.array([[cv[i] for i in iters] for cv in curves]) * 100
        mean, std = ys.mean(0), ys.std(0)
        net = c["net"]
        nets += [net] if net not in nets else []
        label = METHOD_LABELS[c["method"]] + ("" if net == "cnn2" else f", {NET_LABELS[net]}")
        line, = ax.plot(iters, mean, label=f"{label} (n={len(curves)})", lw=2.2 if c["method"] == "ed" else 1.4)
        if len(curves) > 1:
            ax.fill_between(iters, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    b = summary["budget"]
    ax.set_title(f"{dataset}: test accuracy, {', '.join(NET_LABELS[n] for n in nets) or 'CNN-2'} "
                 f"({'reduced budget ' if summary['reduced'] else ''}'{b['name']}')", fontsize=10)
    ax.set_xlabel("iteration")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no test results yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(out: Path, table: str) -> list[Path]:
    """table<N>.md, table<N>.json and (Table 2) fig3_<dataset>.png in the sweep folder."""
    out = Path(out)
    summary = collect(out)
    md = out / f"table{table}.md"
    nets = [NET_LABELS[n] for n in NETS if any(c["net"] == n for c in summary["cells"])] or ["CNN-2"]
    tuned = " fine-tuned from ImageNet" if any(c["net"] != "cnn2" for c in summary["cells"]) else ""
    md.write_text(f"# Table {table}: " + ", ".join([", ".join(nets) + tuned]
                                                   + sorted({c['dataset'] for c in summary['cells']})) + "\n\n"
                  + table_markdown(summary, table))
    js = out / f"table{table}.json"
    written = [md, js]
    if table == "2" and all(c["net"] == "cnn2" for c in summary["cells"]):
        extra = []
        for d in sorted({c["dataset"] for c in summary["cells"]}):
            summary.setdefault("paired", {})[d] = pairs = paired(summary, d)
            if pairs:
                extra += ["", f"Paired differences on {d} (points, a - b over the seeds both have; mean +- std of "
                              "the differences, Student's t interval):", ""]
                extra += [f"- {METHOD_LABELS[p['a']]} - {METHOD_LABELS[p['b']]}: {format_interval(p)}" for p in pairs]
            if any(c["dataset"] == d and c["method"] == "none" for c in summary["cells"]):
                summary.setdefault("regime", {})[d] = check = regime(summary, d)
                extra += ["", regime_markdown(check)]
        with open(md, "a") as f:
            f.write("\n".join(extra) + ("\n" if extra else ""))
    js.write_text(json.dumps(summary, indent=1))
    if table == "2":
        for d in sorted({c["dataset"] for c in summary["cells"]}):
            written.append(plot_fig3(summary, d, out / f"fig3_{d}.png"))
    return written
