"""The shipped prototxts: every train_val parses and builds in TRAIN and TEST at its real input
size; the dropout variants of each net differ only in their dropout layers, which sit where
their names say; the UCF101 nets keep the ImageNet layer names for fine-tuning; the solvers
match the paper (Sec. 4.1); one training iteration of CNN-2 (Caltech-256), AlexNet and VGG16;
Excitation Backprop conserves probability mass through AlexNet (LRN, grouped convolutions)
and VGG16's head."""
import ast
import math
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from exdrop.proto import io
from exdrop.engine import layer_types
from exdrop.experiments.bench import with_input_layer
from exdrop.engine.net import Net, filter_layers
from exdrop.engine.pylayer import TEST, TRAIN
from exdrop.engine.solver import make_solver

ROOT = Path(__file__).resolve().parents[1]
PROTO = ROOT / "prototxt"
TRAIN_VALS = sorted(PROTO.rglob("train_val_*.prototxt"))
SOLVERS = sorted(PROTO.rglob("solver_*.prototxt"))
ALL_PROTOTXTS = sorted(PROTO.rglob("*.prototxt"))

# Side of the square images each dataset's Data layers deliver (a crop_size wins over it).
IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "caltech256": 128, "ucf101": 256, "imagenet": 256}
CLASSES = {"cifar10": 10, "cifar100": 100, "caltech256": 256, "ucf101": 101, "imagenet": 1000}
# the classifier's name where it is not the net's own: the ImageNet AlexNet keeps bvlc_alexnet's fc8
LOGITS = {"imagenet": "fc8"}
# Per net: the blob after the last pooling, its shape, and the (first, second) fully connected blobs.
NETS = {
    "cnn2": {"pool": "pool3", "first": "ip1", "second": "ip2", "logits": "ip3"},
    "alexnet": {"pool": "pool5", "pool_shape": (256, 6, 6), "first": "fc6", "second": "fc7", "logits": "fc8_ucf101"},
    "vgg16": {"pool": "pool5", "pool_shape": (512, 7, 7), "first": "fc6", "second": "fc7", "logits": "fc8_ucf101"},
    "vgg19": {"pool": "pool5", "pool_shape": (512, 7, 7), "first": "fc6", "second": "fc7", "logits": "fc8_ucf101"},
}
CNN2_POOL3 = {32: (256, 4, 4), 128: (256, 16, 16)}   # Caffe rounds pooling up: 32->16->8->4, 128->64->32->16

GUIDED = {"excitation_dropout": "ExcitationDropout", "activation_dropout": "ActivationDropout",
          "standard_dropout": "StandardDropout", "curriculum_dropout": "CurriculumDropout",
          "adaptive_dropout": "AdaptiveDropout", "information_dropout": "InformationDropout"}
# variant -> the dropout layers (kind, which fc blob) it must contain, in order
VARIANTS = {
    "none": [],
    "standard": [("Dropout", "first")],
    "standard_fc1": [("Dropout", "first")],
    "standard_fc6": [("Dropout", "first")],
    "standard_both": [("Dropout", "first"), ("Dropout", "second")],
    "activation": [("ActivationDropout", "first")],
    "ed": [("ExcitationDropout", "first")],
    "maskimg": [("StandardDropout", "first")],
    "curriculum": [("CurriculumDropout", "first")],
    "adaptive": [("AdaptiveDropout", "first")],
    "information": [("InformationDropout", "first")],
}
# the parameters each Python dropout layer of the shipped variants is written with
PARAM_STRS = {"ExcitationDropout": {"dropout_ratio": 0.5}, "ActivationDropout": {"dropout_ratio": 0.5},
              "StandardDropout": {"dropout_ratio": 0.5, "per_image": True},
              "CurriculumDropout": {"dropout_ratio": 0.5, "gamma": 0.0005},
              "AdaptiveDropout": {"alpha": 1.0, "beta": 0.0}, "InformationDropout": {"max_alpha": 0.7}}
# Information Dropout's KL top weighs beta / N_train (Achille and Soatto's code: beta 3)
TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "caltech256": 12800}
UCF101 = {  # net -> (crop, train batch, mean, max_iter)
    "alexnet": (227, 128, (104.0, 117.0, 123.0), 5000),
    "vgg16": (224, 50, (103.939, 116.779, 123.68), 30000),
    "vgg19": (224, 50, (103.939, 116.779, 123.68), 30000),
}


def rel(p: Path) -> str:
    return p.relative_to(PROTO).as_posix()


def method_of(variant: str) -> str:
    """The variant's method: ``ed_authors`` (the authors' recipe of ``ed``) -> ``ed``."""
    return variant.removesuffix("_authors")


def parts(path: Path) -> tuple[str, str, str]:
    """(net, dataset, variant) of prototxt/<net>/<dataset>/{train_val,solver}_<variant>.prototxt."""
    net, dataset = path.parent.relative_to(PROTO).parts[:2]
    variant = re.sub(r"^(train_val|solver)_", "", path.stem)
    return net, dataset, variant


def input_shape(param, path: Path) -> tuple[int, int, int]:
    crops = {lp.transform_param.crop_size for lp in param.layer if lp.type == "Data"}
    assert len(crops) == 1, f"{rel(path)}: TRAIN and TEST data layers crop differently: {crops}"
    crop = crops.pop()
    if crop:
        return (3, crop, crop)
    dataset = parts(path)[1]
    if dataset not in IMAGE_SIZE:
        pytest.fail(f"{rel(path)}: add the image size of dataset '{dataset}' to IMAGE_SIZE in {Path(__file__).name}")
    return (3, IMAGE_SIZE[dataset], IMAGE_SIZE[dataset])


def build(path: Path, phase: int, batch: int) -> Net:
    param = io.read_net_prototxt(path)
    return Net(with_input_layer(param, phase, batch, input_shape(param, path)), phase, source=rel(path))


@contextmanager
def unfilled_weights():
    """Skip the fillers (shape checks of nets with ~140M parameters stay fast)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layer_types, "fill", lambda shape, filler, generator=None: torch.empty(shape))
        yield


def dropout_layers(param) -> list[tuple[str, object]]:
    out = []
    for lp in param.layer:
        if lp.type == "Dropout":
            out.append(("Dropout", lp))
        elif lp.type == "Python" and lp.python_param.module in GUIDED:
            assert lp.python_param.layer == GUIDED[lp.python_param.module], lp.name
            out.append((lp.python_param.layer, lp))
    return out


def feed(batch, shape, classes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"data": torch.randn(batch, *shape, generator=g) * 50,
            "label": torch.randint(0, classes, (batch,), generator=g)}


# ------------------------------------------------------------------ files

def test_the_expected_files_exist():
    have = {rel(p) for p in ALL_PROTOTXTS}
    cnn2 = ("none", "standard_fc1", "standard_both", "maskimg", "curriculum", "adaptive", "information",
            "activation", "ed")
    for folder, variants in (("cnn2/caltech256", cnn2), ("cnn2/cifar100", cnn2),
                             ("cnn2/cifar10", tuple(v.replace("standard_fc1", "standard") for v in cnn2)),
                             *((f"{n}/ucf101", ("standard_fc6", "standard_both", "activation", "ed", "none"))
                               for n in ("alexnet", "vgg16", "vgg19")),
                             ("alexnet/imagenet", ("none", "standard", "activation"))):
        for v in variants:
            assert f"{folder}/train_val_{v}.prototxt" in have
            assert f"{folder}/solver_{v}.prototxt" in have


@pytest.mark.parametrize("path", ALL_PROTOTXTS, ids=rel)
def test_no_machine_paths(path):
    text = path.read_text()
    # no absolute machine paths: data and snapshots are relative to the repository root
    assert not any(f"/{d}/" in text for d in ("wo" "rk", "home", "tmp")), path
    for src in re.findall(r'(?:source|net|snapshot_prefix|mean_file): "([^"]*)"', text):
        assert not src.startswith("/"), f"absolute path {src!r}"


# ------------------------------------------------------------------ parse and build

@pytest.mark.parametrize("path", TRAIN_VALS, ids=rel)
def test_train_val_parses(path):
    param = io.read_net_prototxt(path)
    assert param.name and len(param.layer) > 5
    for phase in (TRAIN, TEST):
        kept = filter_layers(param, phase)
        assert sum(lp.type == "Data" for lp in kept) == 1
        names = [lp.name for lp in kept]
        assert len(names) == len(set(names)), f"duplicate layer names in {rel(path)}"
        assert [lp.type for lp in kept].count("SoftmaxWithLoss") == 1
    data = {lp.include[0].phase: lp for lp in param.layer if lp.type == "Data"}
    assert data[TRAIN].transform_param.mirror, "TRAIN data must mirror"
    assert data[TRAIN].data_param.source.endswith("train_lmdb") and data[TEST].data_param.source.endswith("val_lmdb")


@pytest.mark.parametrize("phase", [TRAIN, TEST], ids=["TRAIN", "TEST"])
@pytest.mark.parametrize("path", TRAIN_VALS, ids=rel)
def test_train_val_builds_at_full_size(path, phase):
    net_name, dataset, _ = parts(path)
    with unfilled_weights():
        net = build(path, phase, 1)
    info = NETS.get(net_name)
    if info is None:   # it builds; the shapes of the WRN nets are checked in tests/test_wrn.py
        return
    _, h, _ = input_shape(io.read_net_prototxt(path), path)
    pool_shape = info.get("pool_shape") or CNN2_POOL3[h]
    assert net.blob_shapes[info["pool"]] == (1, *pool_shape)
    assert net.blob_shapes[info["first"]] == (1, 4096 if net_name != "cnn2" else 2048)
    assert net.blob_shapes[LOGITS.get(dataset, info["logits"])] == (1, CLASSES[dataset])
    _, _, variant = parts(path)
    kl = {"drop_kl": pytest.approx(3.0 / TRAIN_IMAGES[dataset], rel=1e-5)} \
        if method_of(variant) == "information" else {}
    assert net.loss_weights == {"loss": 1.0, **kl}
    assert net.layer(info["first"]).blobs[0].shape[1] == math.prod(pool_shape)


# ------------------------------------------------------------------ variants
# the nets whose layout these tables describe (the WRN prototxts have their own tests: tests/test_wrn.py)
TABLED = [p for p in TRAIN_VALS if parts(p)[0] in NETS]


@pytest.mark.parametrize("path", TABLED, ids=rel)
def test_dropout_layers_match_the_variant(path):
    net_name, _, variant = parts(path)
    if method_of(variant) not in VARIANTS:
        pytest.skip(f"no expectation for variant '{variant}' of '{net_name}'")
    param = io.read_net_prototxt(path)
    got = dropout_layers(param)
    want = VARIANTS[method_of(variant)]
    # the authors' recipe: their mask is written outside the graph, so no 1/scale in the gradient
    no_rescale = {"grad_rescale": False} if variant.endswith("_authors") else {}
    assert [k for k, _ in got] == [k for k, _ in want]
    names = [lp.name for lp in param.layer]
    for (kind, lp), (_, which) in zip(got, want):
        blob = NETS[net_name][which]
        if kind == "InformationDropout":   # alpha(x) from the input of ip1; the KL term as a second top
            assert list(lp.bottom) == [blob, NETS[net_name]["pool"]] and list(lp.top) == [blob, f"{lp.name}_kl"]
        else:
            assert list(lp.bottom) == [blob] and list(lp.top) == [blob], f"{lp.name} is not in place on {blob}"
        before = param.layer[names.index(lp.name) - 1]
        assert before.type == "ReLU" and list(before.top) == [blob], f"{lp.name} must follow the ReLU of {blob}"
        if lp.type == "Dropout":
            assert lp.dropout_param.dropout_ratio == pytest.approx(0.5)
        else:
            extra = no_rescale if kind in ("ExcitationDropout", "ActivationDropout") else {}
            assert ast.literal_eval(lp.python_param.param_str) == {**PARAM_STRS[kind], **extra}


ED_FILES = [p for p in TABLED if parts(p)[2].split("_")[0] == "ed"]


@pytest.mark.parametrize("path", ED_FILES, ids=rel)
def test_ed_variants_have_one_excitation_dropout_at_the_first_fc(path):
    param = io.read_net_prototxt(path)
    ed = [lp for lp in param.layer if lp.type == "Python" and lp.python_param.layer == "ExcitationDropout"]
    assert len(ed) == 1
    assert list(ed[0].bottom) == list(ed[0].top) == [NETS[parts(path)[0]]["first"]]
    assert not any(lp.type == "Dropout" for lp in param.layer)


def _without_dropout(param) -> list[str]:
    drops = {lp.name for _, lp in dropout_layers(param)}
    return [str(lp) for lp in param.layer if lp.name not in drops]


FOLDERS = sorted({p.parent for p in TRAIN_VALS})


@pytest.mark.parametrize("folder", FOLDERS, ids=rel)
def test_variants_differ_only_in_dropout(folder):
    """Every variant of a net equals its no-dropout variant once the dropout layers are cut; the
    `_authors` variants (the authors' recipe) equal `train_val_none_authors.prototxt` so."""
    base = folder / "train_val_none.prototxt"
    if not base.exists():
        pytest.skip(f"{rel(folder)} has no train_val_none.prototxt")
    for p in sorted(folder.glob("train_val_*.prototxt")):
        ref = folder / ("train_val_none_authors.prototxt" if p.stem.endswith("_authors") else base.name)
        assert _without_dropout(io.read_net_prototxt(p)) == _without_dropout(io.read_net_prototxt(ref)), \
            f"{rel(p)} differs from {rel(ref)} beyond dropout"


METHODS_OF_TABLE2 = ("none", "standard", "standard_both", "maskimg", "curriculum", "adaptive", "information",
                     "activation", "ed")


def test_the_authors_recipe_exists_for_every_method():
    """CIFAR-10: every Table 2 method also under the authors' recipe (SGD, gaussian 0.01, raw pixels,
    biases decayed, last layer x10 / x20), its solver the same apart from net and snapshot prefix."""
    folder = PROTO / "cnn2/cifar10"
    solvers = {}
    for m in METHODS_OF_TABLE2:
        net = io.read_net_prototxt(folder / f"train_val_{m}_authors.prototxt")
        sp = io.read_solver_prototxt(folder / f"solver_{m}_authors.prototxt")
        assert sp.type == "SGD" and sp.momentum == pytest.approx(0.9) and sp.weight_decay == pytest.approx(0.005)
        learned = [lp for lp in net.layer if lp.type in ("Convolution", "InnerProduct")]
        fillers = [(lp.convolution_param if lp.type == "Convolution" else lp.inner_product_param).weight_filler
                   for lp in learned]
        assert [(f.type, round(f.std, 6)) for f in fillers] == [("gaussian", 0.01)] * len(learned)
        assert all(p.decay_mult == 1 for lp in learned for p in lp.param)
        assert [p.lr_mult for p in learned[-1].param] == [10, 20]
        assert all(not lp.transform_param.scale or lp.transform_param.scale == 1 for lp in net.layer
                   if lp.type == "Data")
        sp.ClearField("net")
        sp.ClearField("snapshot_prefix")
        solvers[m] = str(sp)
    assert len(set(solvers.values())) == 1


# ------------------------------------------------------------------ fine-tuning conventions

@pytest.mark.parametrize("net_name", sorted(UCF101))
def test_ucf101_nets_keep_the_imagenet_names(net_name):
    path = PROTO / net_name / "ucf101/train_val_none.prototxt"
    param = io.read_net_prototxt(path)
    crop, batch, mean, _ = UCF101[net_name]
    learnable = [lp for lp in param.layer if lp.type in ("Convolution", "InnerProduct")]
    if net_name == "alexnet":
        convs = [f"conv{i}" for i in range(1, 6)]
        assert [lp.convolution_param.group or 1 for lp in learnable[:5]] == [1, 2, 1, 2, 2]
        assert sum(lp.type == "LRN" for lp in param.layer) == 2
    else:
        per_block = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}[net_name]
        convs = [f"conv{b}_{i}" for b, n in enumerate(per_block, 1) for i in range(1, n + 1)]
        assert all(lp.convolution_param.kernel_size == [3] and lp.convolution_param.pad == [1]
                   for lp in learnable[:-3])
    assert [lp.name for lp in learnable] == convs + ["fc6", "fc7", "fc8_ucf101"]
    for lp in learnable:
        rates = [(p.lr_mult, p.decay_mult) for p in lp.param]
        assert rates == ([(10, 1), (20, 0)] if lp.name == "fc8_ucf101" else [(1, 1), (2, 0)]), lp.name
    assert learnable[-1].inner_product_param.num_output == 101
    data = {lp.include[0].phase: lp for lp in param.layer if lp.type == "Data"}
    for phase, lp in data.items():
        tp = lp.transform_param
        assert tp.crop_size == crop and list(tp.mean_value) == pytest.approx(mean)
        assert tp.mirror == (phase == TRAIN)
    assert data[TRAIN].data_param.batch_size == batch
    assert data[TRAIN].data_param.source == "data/ucf101/train_lmdb"
    assert data[TEST].data_param.source == "data/ucf101/val_lmdb"


def test_imagenet_alexnet_is_bvlc_alexnet_with_the_papers_batch():
    """Sec. 5: bvlc_alexnet's layers and fillers, 1000 classes, batch 50, its data from
    data/ilsvrc12 (make data-imagenet); the dropout only at fc6 (the variants' test above)."""
    param = io.read_net_prototxt(PROTO / "alexnet/imagenet/train_val_none.prototxt")
    learnable = [lp for lp in param.layer if lp.type in ("Convolution", "InnerProduct")]
    assert [lp.name for lp in learnable] == [f"conv{i}" for i in range(1, 6)] + ["fc6", "fc7", "fc8"]
    assert [lp.convolution_param.group or 1 for lp in learnable[:5]] == [1, 2, 1, 2, 2]
    assert [lp.convolution_param.num_output for lp in learnable[:5]] == [96, 256, 384, 384, 256]
    assert [lp.inner_product_param.num_output for lp in learnable[5:]] == [4096, 4096, 1000]
    assert [lp.name for lp in param.layer if lp.type == "LRN"] == ["norm1", "norm2"]
    for lp in learnable:
        assert [(p.lr_mult, p.decay_mult) for p in lp.param] == [(1, 1), (2, 0)], lp.name
    data = {lp.include[0].phase: lp for lp in param.layer if lp.type == "Data"}
    for phase, lp in data.items():
        tp = lp.transform_param
        assert tp.crop_size == 227 and list(tp.mean_value) == pytest.approx([104, 117, 123])
        assert tp.mirror == (phase == TRAIN) and lp.data_param.batch_size == 50
    assert data[TRAIN].data_param.source == "data/ilsvrc12/train_lmdb"
    assert data[TEST].data_param.source == "data/ilsvrc12/val_lmdb"
    top5 = [lp for lp in filter_layers(param, TEST) if lp.type == "Accuracy" and lp.accuracy_param.top_k == 5]
    assert len(top5) == 1 and not any(lp.accuracy_param.top_k == 5 for lp in filter_layers(param, TRAIN)
                                      if lp.type == "Accuracy")


@pytest.mark.parametrize("variant", ["none", "standard", "activation"])
def test_imagenet_solver_is_the_papers(variant):
    """Sec. 5: Adam, learning rate 1e-5 (batch 50 is the net's); the rest assumed as the solver says:
    a fixed rate, weight decay 0.005, bvlc_alexnet's 450K iterations; the val set once per test."""
    sp = io.read_solver_prototxt(PROTO / f"alexnet/imagenet/solver_{variant}.prototxt")
    assert sp.type == "Adam" and sp.base_lr == pytest.approx(1e-5) and sp.lr_policy == "fixed"
    assert sp.momentum == pytest.approx(0.9) and sp.momentum2 == pytest.approx(0.999)
    assert sp.weight_decay == pytest.approx(0.005) and sp.max_iter == 450000
    test = next(lp for lp in io.read_net_prototxt(ROOT / sp.net).layer
                if lp.type == "Data" and lp.include[0].phase == TEST)
    assert sp.test_iter[0] * test.data_param.batch_size == 50000


def test_caltech256_data_follows_the_authors():
    param = io.read_net_prototxt(PROTO / "cnn2/caltech256/train_val_none.prototxt")
    for lp in param.layer:
        if lp.type == "Data":
            tp = lp.transform_param
            assert tp.mirror and not tp.crop_size      # the authors mirror in TEST too
            assert list(tp.mean_value) == pytest.approx([103.939, 116.779, 123.68])
            assert lp.data_param.source.startswith("data/caltech256/")
            if lp.include[0].phase == TRAIN:
                assert lp.data_param.batch_size == 100


# ------------------------------------------------------------------ solvers

@pytest.mark.parametrize("path", SOLVERS, ids=rel)
def test_solver_points_at_its_train_val(path):
    sp = io.read_solver_prototxt(path)
    net_name, dataset, variant = parts(path)
    assert sp.net == f"prototxt/{net_name}/{dataset}/train_val_{variant}.prototxt"
    assert (ROOT / sp.net).is_file()
    assert sp.snapshot_prefix.startswith(f"models/{net_name}_{dataset}_{variant}/")
    assert sp.test_iter and sp.test_interval > 0 and sp.max_iter > 0
    make_solver(sp, [])


@pytest.mark.parametrize("folder", FOLDERS, ids=rel)
def test_every_train_val_has_a_solver(folder):
    nets = {parts(p)[2] for p in folder.glob("train_val_*.prototxt")}
    solvers = {parts(p)[2] for p in folder.glob("solver_*.prototxt")}
    assert nets == solvers


@pytest.mark.parametrize("path", [p for p in SOLVERS if parts(p)[:2] in
                                  {("cnn2", "caltech256"), ("alexnet", "ucf101"), ("vgg16", "ucf101"), ("vgg19", "ucf101")}],
                         ids=rel)
def test_solver_is_the_papers(path):
    """Sec. 4.1: Adam, 1e-3, weight decay 0.005; from scratch 100K iterations with 1e-3 -> 1e-4 at
    25K; fine-tuning a fixed rate, 5K iterations (AlexNet) or 30K (VGG16/19)."""
    sp = io.read_solver_prototxt(path)
    net_name, _, _ = parts(path)
    assert sp.type == "Adam" and sp.base_lr == pytest.approx(1e-3) and sp.weight_decay == pytest.approx(0.005)
    assert sp.momentum == pytest.approx(0.9) and sp.momentum2 == pytest.approx(0.999)
    if net_name == "cnn2":
        assert sp.lr_policy == "multistep" and list(sp.stepvalue) == [25000] and sp.gamma == pytest.approx(0.1)
        assert sp.max_iter == 100000 and sp.test_interval == 1000
    else:
        assert sp.lr_policy == "fixed" and sp.max_iter == UCF101[net_name][3]
        assert sp.test_interval == 500 and sp.display == 20


# ------------------------------------------------------------------ one training iteration
# The TRAIN nets (the prototxt's own fillers) are built once per module; the TEST nets of the
# Excitation Backprop checks share their weights, as Caffe's test nets do.

def _train_net(folder: str, batch: int) -> Net:
    torch.manual_seed(0)
    return build(PROTO / folder / "train_val_ed.prototxt", TRAIN, batch)


@pytest.fixture(scope="module")
def alexnet_train():
    return _train_net("alexnet/ucf101", 2)


@pytest.fixture(scope="module")
def vgg16_train():
    return _train_net("vgg16/ucf101", 1)


def _one_iteration(net: Net, folder: str):
    path = PROTO / folder / "train_val_ed.prototxt"
    net_name, dataset, _ = parts(path)
    entries = net.learnable()
    solver = make_solver(io.read_solver_prototxt(PROTO / folder / "solver_ed.prototxt"), entries)
    batch = net.blob_shapes["data"][0]
    blobs = net(feed(batch, net.blob_shapes["data"][1:], CLASSES[dataset]))
    assert net.layer("drop6" if net_name != "cnn2" else "drop").lp.python_param.layer == "ExcitationDropout"
    loss = net.loss(blobs)
    assert torch.isfinite(loss)
    for p in net.parameters():
        p.grad = None
    loss.backward()
    probes = []   # per blob, one element that must move: decayed weights always move; else the largest gradient
    for e in entries:
        g = e.tensor.grad
        assert g is not None and torch.isfinite(g).all(), e.name
        k = 0 if e.decay_mult else int(g.abs().argmax())
        probes.append((e, k, e.tensor.detach().flatten()[k].item(), bool(e.decay_mult or g.flatten()[k] != 0)))
    assert net.layer(NETS[net_name]["logits"]).blobs[0].grad.abs().sum() > 0
    solver.step_update()
    for e, k, old, moves in probes:
        if moves:
            assert e.tensor.detach().flatten()[k].item() != old, f"{e.name} was not updated"
    assert solver.iter == 1
    for p in net.parameters():
        p.grad = None


def test_one_training_iteration_cnn2_caltech256():
    _one_iteration(_train_net("cnn2/caltech256", 2), "cnn2/caltech256")


def test_one_training_iteration_alexnet_ucf101(alexnet_train):
    _one_iteration(alexnet_train, "alexnet/ucf101")


@pytest.mark.slow   # ~20 s on two busy cores, most of it the Adam update of 138M parameters
def test_one_training_iteration_vgg16_ucf101(vgg16_train):
    _one_iteration(vgg16_train, "vgg16/ucf101")


# ------------------------------------------------------------------ Excitation Backprop mass
# Random weights from the prototxts' gaussian fillers keep every activation non-zero (VGG's
# std 0.01 shrinks them layer by layer, to ~1e-6 at fc6: far above float32's smallest normal).

def _recorded(train_net: Net, folder: str, batch: int) -> Net:
    path = PROTO / folder / "train_val_ed.prototxt"
    with unfilled_weights():
        net = build(path, TEST, batch)
    net.share_weights_from(train_net)
    shape = input_shape(io.read_net_prototxt(path), path)
    with torch.no_grad():
        net(feed(batch, shape, CLASSES[parts(path)[1]], seed=2), record=True)
    return net


@pytest.fixture(scope="module")
def alexnet_test(alexnet_train):
    return _recorded(alexnet_train, "alexnet/ucf101", 2)


@pytest.fixture(scope="module")
def vgg16_test(vgg16_train):
    return _recorded(vgg16_train, "vgg16/ucf101", 2)


def _check_mass(net, blob):
    pe = net.excitation(blob)
    x = net.blobs[blob]
    assert pe.shape == x.shape
    assert torch.isfinite(pe).all() and (pe >= 0).all()
    assert (pe[x <= 0] == 0).all()
    assert (x > 0).float().mean() > 0.05, f"{blob}: activations died out"
    sums = pe.flatten(1).sum(1)
    assert torch.allclose(sums, torch.ones_like(sums), atol=1e-3), sums


@pytest.mark.parametrize("blob", ["fc6", "conv4", "conv2"])   # through fc7 / grouped conv5 / conv3, LRN, pooling
def test_alexnet_eb_conserves_mass(alexnet_test, blob):
    _check_mass(alexnet_test, blob)


@pytest.mark.parametrize("blob", ["fc7", "fc6"])
def test_vgg16_eb_conserves_mass_through_the_head(vgg16_test, blob):
    _check_mass(vgg16_test, blob)


def test_test_nets_run_at_the_inferred_shapes(alexnet_test, vgg16_test):
    for net in (alexnet_test, vgg16_test):
        for name, t in net.blobs.items():
            assert tuple(t.shape) == net.blob_shapes[name], name
