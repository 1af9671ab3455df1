"""Every bad input named: a corpus of broken prototxts, solvers, param_strs and data files.

Each case asserts the exception type, a fragment saying what is wrong, and where: the file,
and the layer, record, folder or line. Nothing here may end in a raw traceback (KeyError,
IndexError, ZeroDivisionError, lmdb.Error) or a SIGBUS.
"""
import os
import tarfile

import numpy as np
import pytest

from exdrop.proto import io as cio
from exdrop.engine.layer_types import LayerError
from exdrop.engine.net import Net
from exdrop.proto import caffe_pb2
from exdrop.engine.pylayer import TEST, TRAIN
from exdrop.engine.solver import ParamEntry, caffe_rate, make_solver

cv2 = pytest.importorskip("cv2")
lmdb = pytest.importorskip("lmdb")

from exdrop.data import (CorruptRecordError, DatumLMDB, array_to_datum, prepare_image_dataset,  # noqa: E402
                         write_datum_lmdb)


# ----------------------------------------------------------------------------------------------
# nets
# ----------------------------------------------------------------------------------------------
INPUT = ('layer { name: "in" type: "Input" top: "data" top: "label" '
         'input_param { shape { dim: 4 dim: 3 dim: 8 dim: 8 } shape { dim: 4 } } }\n')
IP1 = 'layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" inner_product_param { num_output: 6 } }\n'
RELU = 'layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }\n'
IP2 = 'layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 3 } }\n'
LOSS = 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }\n'


def layer(name, typ, bottom="data", top=None, body=""):
    bottoms = "".join(f'bottom: "{b}" ' for b in ([bottom] if isinstance(bottom, str) else bottom))
    return f'layer {{ name: "{name}" type: "{typ}" {bottoms}top: "{top or name}" {body} }}\n'


def guided(param_str="", bottom="ip1", top=None, module="excitation_dropout", cls="ExcitationDropout",
           name="drop"):
    ps = f' param_str: "{param_str}"' if param_str else ""
    return layer(name, "Python", bottom, top or bottom,
                 f'python_param {{ module: "{module}" layer: "{cls}"{ps} }}')


def ed_net(param_str="", **kw):
    return INPUT + IP1 + RELU + guided(param_str, **kw) + IP2 + LOSS


CONV = "convolution_param {{ {} }}"
POOL = "pooling_param {{ {} }}"

# (case id, prototxt text, phase, exception, [fragments of the message besides the file])
NET_CASES = [
    # -- layer geometry (Caffe's CHECKs in LayerSetUp)
    ("ip-num-output-0", INPUT + layer("fc", "InnerProduct", body="inner_product_param { num_output: 0 }"),
     TEST, LayerError, ["layer 'fc'", "num_output must be positive"]),
    ("ip-axis-out-of-range", INPUT + layer("fc", "InnerProduct", body="inner_product_param { num_output: 2 axis: 5 }"),
     TEST, LayerError, ["layer 'fc'", "axis 5 is out of range"]),
    ("conv-kernel-0", INPUT + layer("c", "Convolution", body=CONV.format("num_output: 2 kernel_size: 0")),
     TEST, LayerError, ["layer 'c'", "kernel size must be positive"]),
    ("conv-stride-0", INPUT + layer("c", "Convolution", body=CONV.format("num_output: 2 kernel_size: 3 stride: 0")),
     TEST, LayerError, ["layer 'c'", "stride must be positive"]),
    ("conv-dilation-0", INPUT + layer("c", "Convolution", body=CONV.format("num_output: 2 kernel_size: 3 dilation: 0")),
     TEST, LayerError, ["layer 'c'", "dilation must be positive"]),
    ("conv-group-0", INPUT + layer("c", "Convolution", body=CONV.format("num_output: 2 kernel_size: 3 group: 0")),
     TEST, LayerError, ["layer 'c'", "group must be positive"]),
    ("conv-group-not-dividing", INPUT + layer("c", "Convolution", body=CONV.format("num_output: 2 kernel_size: 3 group: 2")),
     TEST, LayerError, ["layer 'c'", "divisible by group"]),
    ("conv-num-output-0", INPUT + layer("c", "Convolution", body=CONV.format("num_output: 0 kernel_size: 3")),
     TEST, LayerError, ["layer 'c'", "num_output must be positive"]),
    ("conv-no-kernel", INPUT + layer("c", "Convolution", body=CONV.format("num_output: 2")),
     TEST, LayerError, ["layer 'c'", "kernel_size is required"]),
    ("conv-kernel-size-and-h", INPUT + layer("c", "Convolution",
                                             body=CONV.format("num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3")),
     TEST, LayerError, ["layer 'c'", "not both"]),
    ("conv-kernel-h-without-w", INPUT + layer("c", "Convolution", body=CONV.format("num_output: 2 kernel_h: 3")),
     TEST, LayerError, ["layer 'c'", "kernel_h and kernel_w must be given together"]),
    ("conv-3d-kernel", INPUT + layer("c", "Convolution",
                                     body=CONV.format("num_output: 2 kernel_size: 3 kernel_size: 3 kernel_size: 3")),
     TEST, LayerError, ["layer 'c'", "only 2-D geometry"]),
    ("conv-kernel-larger-than-input", INPUT + layer("c", "Convolution", body=CONV.format("num_output: 2 kernel_size: 9")),
     TEST, LayerError, ["layer 'c'", "smaller than the kernel"]),
    ("conv-unknown-filler", INPUT + layer("c", "Convolution",
                                          body=CONV.format('num_output: 2 kernel_size: 3 weight_filler { type: "he" }')),
     TEST, LayerError, ["layer 'c'", "unknown filler type 'he'"]),
    ("pool-stride-0", INPUT + layer("p", "Pooling", body=POOL.format("kernel_size: 2 stride: 0")),
     TEST, LayerError, ["layer 'p'", "stride must be positive"]),
    ("pool-kernel-0", INPUT + layer("p", "Pooling", body=POOL.format("kernel_size: 0")),
     TEST, LayerError, ["layer 'p'", "kernel size must be positive"]),
    ("pool-no-kernel", INPUT + layer("p", "Pooling", body=POOL.format("stride: 2")),
     TEST, LayerError, ["layer 'p'", "kernel_size (or kernel_h and kernel_w) is required"]),
    ("pool-global-with-kernel", INPUT + layer("p", "Pooling", body=POOL.format("global_pooling: true kernel_size: 2")),
     TEST, LayerError, ["layer 'p'", "global_pooling"]),
    ("pool-stride-h-only", INPUT + layer("p", "Pooling", body=POOL.format("kernel_size: 2 stride_h: 2")),
     TEST, LayerError, ["layer 'p'", "stride_h and stride_w must be given together"]),
    ("pool-pad-not-below-kernel", INPUT + layer("p", "Pooling", body=POOL.format("kernel_size: 2 pad: 2")),
     TEST, LayerError, ["layer 'p'", "must be smaller than kernel"]),
    ("pool-stochastic", INPUT + layer("p", "Pooling", body=POOL.format("pool: STOCHASTIC kernel_size: 2")),
     TEST, LayerError, ["layer 'p'", "STOCHASTIC"]),
    ("lrn-even-size", INPUT + layer("n", "LRN", body="lrn_param { local_size: 4 }"),
     TEST, LayerError, ["layer 'n'", "local_size must be odd"]),
    ("dropout-ratio-1", INPUT + layer("d", "Dropout", body="dropout_param { dropout_ratio: 1.0 }"),
     TEST, LayerError, ["layer 'd'", "dropout_ratio must be in [0, 1)"]),
    ("softmax-axis", INPUT + layer("s", "Softmax", body="softmax_param { axis: 4 }"),
     TEST, LayerError, ["layer 's'", "axis 4 is out of range"]),
    ("flatten-axis", INPUT + layer("f", "Flatten", body="flatten_param { axis: 7 }"),
     TEST, LayerError, ["layer 'f'", "axis 7 is out of range"]),
    ("concat-axis", INPUT + layer("cat", "Concat", ["data", "data"], body="concat_param { axis: 9 }"),
     TEST, LayerError, ["layer 'cat'", "axis 9 is out of range"]),
    ("reshape-two-inferred", INPUT + layer("r", "Reshape", body="reshape_param { shape { dim: -1 dim: -1 } }"),
     TEST, LayerError, ["layer 'r'", "at most one -1"]),
    ("reshape-negative-dim", INPUT + layer("r", "Reshape", body="reshape_param { shape { dim: 4 dim: -3 } }"),
     TEST, LayerError, ["layer 'r'", "dims must be >= 0"]),
    ("reshape-wrong-count", INPUT + layer("r", "Reshape", body="reshape_param { shape { dim: 4 dim: 7 } }"),
     TEST, LayerError, ["layer 'r'", "cannot reshape"]),
    ("eltwise-coeff-prod", INPUT + layer("e", "Eltwise", ["data", "data"],
                                         body="eltwise_param { operation: PROD coeff: 1 coeff: 2 }"),
     TEST, LayerError, ["layer 'e'", "coeff is only for the SUM"]),
    ("accuracy-top-k-0", INPUT + IP1 + IP2 + layer("acc", "Accuracy", ["ip2", "label"], body="accuracy_param { top_k: 0 }"),
     TEST, LayerError, ["layer 'acc'", "top_k must be positive"]),
    ("accuracy-top-k-too-big", INPUT + IP1 + IP2 + layer("acc", "Accuracy", ["ip2", "label"],
                                                         body="accuracy_param { top_k: 5 }"),
     TEST, LayerError, ["layer 'acc'", "top_k 5 is more than the 3 classes"]),
    ("loss-label-count", INPUT + IP1 + IP2 + layer("loss", "SoftmaxWithLoss", ["ip2", "data"]),
     TEST, LayerError, ["layer 'loss'", "label count"]),
    ("loss-one-bottom", INPUT + IP1 + IP2 + layer("loss", "SoftmaxWithLoss", "ip2"),
     TEST, LayerError, ["layer 'loss'", "takes 2..2 bottoms"]),
    # -- the graph
    ("unknown-type", INPUT + layer("x", "Frobnicate"), TEST, LayerError, ["layer 'x'", "unknown layer type 'Frobnicate'"]),
    ("missing-bottom", INPUT + layer("fc", "InnerProduct", "nope", body="inner_product_param { num_output: 2 }"),
     TEST, LayerError, ["layer 'fc'", "bottom blob 'nope'"]),
    ("top-two-sources", INPUT + IP1 + layer("ip1b", "InnerProduct", "data", "ip1", "inner_product_param { num_output: 6 }"),
     TEST, LayerError, ["top blob 'ip1'", "layer 'ip1b'", "layer 'ip1'", "multiple sources"]),
    ("top-overwrites-input", INPUT + layer("fc", "InnerProduct", "data", "label", "inner_product_param { num_output: 2 }"),
     TEST, LayerError, ["top blob 'label'", "layer 'fc'", "layer 'in'", "multiple sources"]),
    ("top-overwrites-legacy-input", 'input: "data" input_shape { dim: 4 dim: 3 }\n' +
     layer("fc", "InnerProduct", "data", "x", "inner_product_param { num_output: 3 }") +
     layer("r", "ReLU", "x", "data"),
     TEST, LayerError, ["top blob 'data'", "layer 'r'", "the net's input", "multiple sources"]),
    ("in-place-on-other-bottom", INPUT + IP1 + layer("e", "Eltwise", ["ip1", "ip1"], "ip1x") +
     layer("e2", "Eltwise", ["ip1x", "ip1"], "ip1"),
     TEST, LayerError, ["top blob 'ip1'", "layer 'e2'", "multiple sources"]),
    ("duplicate-layer-name", INPUT + IP1 + layer("ip1", "InnerProduct", "ip1", "ip1c", "inner_product_param { num_output: 2 }"),
     TEST, LayerError, ["layers 1 and 2 are both named 'ip1'"]),
    ("include-and-exclude", INPUT + 'layer { name: "r" type: "ReLU" bottom: "data" top: "data" '
                                    'include { phase: TRAIN } exclude { phase: TEST } }\n',
     TEST, LayerError, ["layer 'r'", "include or exclude"]),
    ("input-no-shape", 'layer { name: "in" type: "Input" top: "data" }\n',
     TEST, LayerError, ["layer 'in'", "give one shape"]),
    ("input-zero-dim", 'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 4 dim: 0 } } }\n',
     TEST, LayerError, ["layer 'in'", "positive dims"]),
    ("python-module-missing", INPUT + layer("py", "Python", body='python_param { module: "no_such_mod" layer: "X" }'),
     TEST, LayerError, ["layer 'py'", "'no_such_mod' not found"]),
    ("python-class-missing", INPUT + layer("py", "Python", body='python_param { module: "excitation_dropout" layer: "X" }'),
     TEST, LayerError, ["layer 'py'", "has no class 'X'"]),
    # python_param loads Python-layer classes only: a function is never called, a class without the contract refused
    ("python-not-a-class", INPUT + layer("py", "Python", body='python_param { module: "os" layer: "abort" }'),
     TEST, LayerError, ["layer 'py'", "names os.abort", "not a class", "setup / reshape / forward / backward"]),
    ("python-not-a-layer", INPUT + layer("py", "Python", body='python_param { module: "collections" layer: "OrderedDict" }'),
     TEST, LayerError, ["layer 'py'", "collections.OrderedDict", "a class without setup, reshape, forward, backward"]),
    # -- guided dropout placement (TRAIN)
    ("ed-on-logits", INPUT + IP1 + IP2 + guided(bottom="ip2") + LOSS,
     TRAIN, LayerError, ["layer 'drop'", "on the logits blob 'ip2'"]),
    ("ed-logits-independent", INPUT + IP1 + IP2 + layer("side", "InnerProduct", "data", "side",
                                                        "inner_product_param { num_output: 5 }") +
     guided(bottom="side") + LOSS,
     TRAIN, LayerError, ["layer 'drop'", "does not depend on its blob 'side'", "nothing dropped"]),
    ("ed-after-logits-producer", INPUT + IP1 + IP2 + guided(bottom="ip1") + LOSS,
     TRAIN, LayerError, ["layer 'drop'", "does not depend on its blob 'ip1'"]),
    ("ed-no-loss", INPUT + IP1 + guided() + IP2,
     TRAIN, LayerError, ["layer 'drop'", "needs the logits blob"]),
    ("ed-unknown-logits", ed_net("{'logits': 'scores'}"),
     TRAIN, LayerError, ["layer 'drop'", "logits blob 'scores' is not produced"]),
    ("ed-unknown-label", ed_net("{'label': 'target'}"),
     TRAIN, LayerError, ["layer 'drop'", "label blob 'target' is not produced"]),
    ("ed-class-out-of-range", ed_net("{'signal': 3}"),
     TRAIN, LayerError, ["layer 'drop'", "signal class 3 is outside the logits' 3 classes"]),
    ("ed-class-way-out", ed_net("{'signal': 1000}"),
     TRAIN, LayerError, ["layer 'drop'", "signal class 1000"]),
    ("guided-two-bottoms", INPUT + IP1 + layer("drop", "Python", ["ip1", "data"], "ip1",
                                               'python_param { module: "standard_dropout" layer: "StandardDropout" }'),
     TRAIN, LayerError, ["layer 'drop'", "exactly one bottom"]),
]

# param_str values: (case id, module, class, param_str, fragments)
ED = ("excitation_dropout", "ExcitationDropout")
AD = ("activation_dropout", "ActivationDropout")
SD = ("standard_dropout", "StandardDropout")
PARAM_CASES = [
    ("rescale-string", *ED, "{'rescale': 'no'}", ["rescale must be True or False", "'no'"]),
    ("rescale-int", *ED, "{'rescale': 0}", ["rescale must be True or False"]),
    ("grad-rescale-string", *ED, "{'grad_rescale': 'False'}", ["grad_rescale must be True or False"]),
    ("ratio-string", *ED, "{'dropout_ratio': '0.5'}", ["dropout_ratio must be in [0, 1)", "'0.5'"]),
    ("ratio-1.5", *ED, "{'dropout_ratio': 1.5}", ["dropout_ratio must be in [0, 1)", "1.5"]),
    ("ratio-negative", *ED, "{'dropout_ratio': -0.1}", ["dropout_ratio must be in [0, 1)"]),
    ("ratio-bool", *ED, "{'dropout_ratio': True}", ["dropout_ratio must be in [0, 1)"]),
    ("ratio-none", *ED, "{'dropout_ratio': None}", ["dropout_ratio must be in [0, 1)"]),
    ("signal-negative", *ED, "{'signal': -1}", ["signal must be 'gt', 'pred' or a class index", "-1"]),
    ("signal-word", *ED, "{'signal': 'best'}", ["signal must be 'gt', 'pred' or a class index", "'best'"]),
    ("signal-float", *ED, "{'signal': 1.5}", ["signal must be"]),
    ("signal-bool", *ED, "{'signal': True}", ["signal must be"]),
    ("logits-int", *ED, "{'logits': 5}", ["logits must be a blob name"]),
    ("label-list", *ED, "{'label': ['label']}", ["label must be a blob name"]),
    ("unknown-key", *ED, "{'ratio': 0.5}", ["unknown param_str keys ['ratio']"]),
    ("key-p", *ED, "{'p': 0.8}", ["unknown param_str keys ['p']", "'dropout_ratio'"]),
    ("unparsable", *ED, "{'dropout_ratio': }", ["cannot parse"]),
    ("activation-rescale", *AD, "{'rescale': 'yes'}", ["ActivationDropout", "rescale must be True or False"]),
    ("activation-ratio", *AD, "{'dropout_ratio': '0.3'}", ["ActivationDropout", "dropout_ratio must be in"]),
    ("activation-signal", *AD, "{'signal': 'gt'}", ["ActivationDropout", "unknown param_str keys ['signal']"]),
    ("standard-per-image", *SD, "{'per_image': 'yes'}", ["StandardDropout", "per_image must be True or False"]),
    ("standard-ratio", *SD, "{'dropout_ratio': [0.5]}", ["StandardDropout", "dropout_ratio must be in"]),
]


def build(tmp_path, text, phase=TEST, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return Net(cio.read_net_prototxt(path), phase, source=str(path)), str(path)


def check(info, exc, path, fragments):
    assert info.type is exc, (info.type, info.value)
    msg = str(info.value)
    for f in [path, *fragments]:
        assert f in msg, f"{f!r} not in {msg!r}"


@pytest.mark.parametrize("text, phase, exc, fragments", [c[1:] for c in NET_CASES], ids=[c[0] for c in NET_CASES])
def test_bad_net(tmp_path, text, phase, exc, fragments):
    path = tmp_path / "net.prototxt"
    with pytest.raises(Exception) as info:
        build(tmp_path, text, phase)
    check(info, exc, str(path), fragments)


@pytest.mark.parametrize("module, cls, param_str, fragments", [c[1:] for c in PARAM_CASES],
                         ids=[c[0] for c in PARAM_CASES])
def test_bad_param_str(tmp_path, module, cls, param_str, fragments):
    text = INPUT + IP1 + RELU + guided(param_str.replace('"', '\\"'), module=module, cls=cls) + IP2 + LOSS
    with pytest.raises(Exception) as info:
        build(tmp_path, text, TRAIN)
    check(info, LayerError, str(tmp_path / "net.prototxt"), ["layer 'drop'", *fragments])


def test_numpy_python_layer_setup_error_is_named(tmp_path, monkeypatch):
    (tmp_path / "picky_layer.py").write_text(
        "class Picky:\n"
        "    def setup(self, bottom, top):\n"
        "        raise Exception('Picky needs two bottoms')\n"
        "    reshape = forward = backward = setup\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = INPUT + layer("py", "Python", body='python_param { module: "picky_layer" layer: "Picky" }')
    with pytest.raises(LayerError) as info:
        build(tmp_path, text, TEST)
    check(info, LayerError, str(tmp_path / "net.prototxt"), ["layer 'py'", "Picky needs two bottoms"])


def test_unfed_input_is_named(tmp_path):
    net, path = build(tmp_path, INPUT + IP1, TEST)
    with pytest.raises(ValueError, match=f"{path}: input blob.*of layer 'in' must be fed"):
        net({})


def test_good_net_still_builds(tmp_path):
    """The controls: the same snippets, put right, build in both phases."""
    for phase in (TRAIN, TEST):
        net, _ = build(tmp_path, ed_net("{'signal': 2, 'rescale': False, 'dropout_ratio': 0}"), phase)
        assert net.blob_shapes["ip2"] == (4, 3)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------
def _caffemodel_bytes():
    return cio.array_to_blob(np.arange(6, dtype=np.float32)).SerializeToString()


FILE_CASES = [
    ("binary-net", "net", lambda: _caffemodel_bytes(), ValueError, ["binary, not a text prototxt"]),
    ("utf16-net", "net", lambda: (INPUT + IP1).encode("utf-16"), ValueError, ["UTF-16", "save it as UTF-8"]),
    ("latin1-net", "net", lambda: ('name: "caf\u00e9"\n' + INPUT).encode("latin-1"), ValueError,
     [":1: not UTF-8 text", "0xe9"]),
    ("syntax-error", "net", lambda: b'layer { name: "a" type: }\n', ValueError, [":1:"]),
    ("v1-net", "net", lambda: b'layers { name: "a" type: RELU }\n', ValueError, ["V1 nets"]),
    ("unknown-field", "net", lambda: b'layer { name: "a" colour: 3 }\n', ValueError, [":1:", "colour"]),
    ("binary-solver", "solver", lambda: b"\x08\x01\x12\x00\x00\xff", ValueError, ["binary, not a text prototxt"]),
    ("utf16-solver", "solver", lambda: 'base_lr: 0.1\n'.encode("utf-16"), ValueError, ["UTF-16"]),
    ("unknown-solver-type", "solver", lambda: b'type: "Adamax" base_lr: 0.1\n', ValueError,
     ["Unknown solver type: 'Adamax'", "known types: SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam"]),
    ("solver-type-lowercase", "solver", lambda: b'type: "adam"\n', ValueError, ["Unknown solver type: 'adam'"]),
    ("solver-type-and-enum", "solver", lambda: b'type: "Adam" solver_type: SGD\n', ValueError,
     ["cannot be both specified"]),
    ("solver-syntax", "solver", lambda: b'base_lr: fast\n', ValueError, [":1:"]),
]


@pytest.mark.parametrize("kind, data, exc, fragments", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_file(tmp_path, kind, data, exc, fragments):
    path = tmp_path / f"{kind}.prototxt"
    path.write_bytes(data())
    read = cio.read_net_prototxt if kind == "net" else cio.read_solver_prototxt
    with pytest.raises(Exception) as info:
        read(path)
    assert isinstance(info.value, exc), (info.type, info.value)
    for f in [str(path), *fragments]:
        assert f in str(info.value), f"{f!r} not in {str(info.value)!r}"


def test_missing_prototxt_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.prototxt"):
        cio.read_net_prototxt(tmp_path / "no_such.prototxt")


@pytest.mark.parametrize("reader, msg", [(cio.read_caffemodel, "NetParameter"),
                                         (cio.read_binaryproto_mean, "BlobProto")])
def test_bad_binary_proto(tmp_path, reader, msg):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError) as info:
        reader(path)
    assert str(path) in str(info.value) and msg in str(info.value)


@pytest.mark.parametrize("fields, fragment", [
    (dict(type="Adamax"), "Unknown solver type: 'Adamax'"),
    (dict(type="AdaGrad", momentum=0.9), "Momentum cannot be used with AdaGrad"),
    (dict(type="SGD", regularization_type="L3"), "Unknown regularization type"),
])
def test_make_solver_names_the_file(fields, fragment):
    sp = caffe_pb2.SolverParameter(base_lr=0.1, **fields)
    with pytest.raises(ValueError) as info:
        make_solver(sp, [ParamEntry(__import__("torch").nn.Parameter(__import__("torch").zeros(2)))], "s.prototxt")
    assert str(info.value).startswith("s.prototxt: ") and fragment in str(info.value)


@pytest.mark.parametrize("fields, fragment", [(dict(lr_policy="cosine"), "Unknown learning rate policy"),
                                              (dict(lr_policy="step"), "stepsize > 0"),
                                              (dict(lr_policy="poly"), "max_iter > 0")])
def test_bad_lr_policy(fields, fragment):
    with pytest.raises(ValueError, match=fragment):
        caffe_rate(caffe_pb2.SolverParameter(base_lr=0.1, **fields), 1, 0)


# ----------------------------------------------------------------------------------------------
# data: LMDBs and Datum records
# ----------------------------------------------------------------------------------------------
def small_lmdb(path, n=40, labels=None):
    images = np.random.default_rng(0).integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
    return write_datum_lmdb(path, images, labels if labels is not None else [i % 3 for i in range(n)])


def put(path, key: bytes, value: bytes):
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(key, value)
    env.close()


def zero_page(path, page):
    with open(path / "data.mdb", "r+b") as f:
        f.seek(page * 4096)
        f.write(b"\0" * 4096)


def truncate(path, keep):
    with open(path / "data.mdb", "r+b") as f:
        f.truncate(keep)


def _wrong_length(path):
    d = caffe_pb2.Datum(channels=3, height=8, width=8, data=b"\1" * 10, label=1)
    put(path, b"00000005", d.SerializeToString())


def _bad_encoded(path):
    d = caffe_pb2.Datum(encoded=True, data=b"not a png", label=1)
    put(path, b"00000007", d.SerializeToString())


def _other_shape(path):
    put(path, b"00000009", array_to_datum(np.zeros((3, 4, 4), np.uint8), 1).SerializeToString())


def _junk_record(path):
    put(path, b"00000003", b"\xff\xff\xff\xff")


def _empty_record(path):
    put(path, b"00000002", b"")


# (case id, damage(path), exception, fragments (the LMDB path is always checked))
LMDB_CASES = [
    ("truncated-half", lambda p: truncate(p, os.path.getsize(p / "data.mdb") // 2), ValueError, ["truncated"]),
    ("truncated-to-metas", lambda p: truncate(p, 8192), ValueError, ["truncated"]),
    ("truncated-one-page", lambda p: truncate(p, 4096), ValueError, ["meta page 1"]),
    ("truncated-empty-file", lambda p: truncate(p, 0), ValueError, ["not an LMDB file"]),
    ("zeroed-meta-0", lambda p: zero_page(p, 0), ValueError, ["meta page 0", "corrupt"]),
    ("zeroed-meta-1", lambda p: zero_page(p, 1), ValueError, ["meta page 1", "corrupt"]),
    ("junk-data-mdb", lambda p: (p / "data.mdb").write_bytes(os.urandom(3 * 4096)), ValueError, ["not an LMDB"]),
    ("no-data-mdb", lambda p: (p / "data.mdb").unlink(), FileNotFoundError, ["no data.mdb"]),
    ("junk-record", _junk_record, CorruptRecordError, ["key '00000003'"]),
    ("wrong-length-record", _wrong_length, CorruptRecordError, ["key '00000005'", "expected 3x8x8"]),
    ("bad-encoded-record", _bad_encoded, CorruptRecordError, ["key '00000007'", "could not decode"]),
    ("empty-record", _empty_record, CorruptRecordError, ["key '00000002'"]),
    ("other-shape-record", _other_shape, CorruptRecordError, ["record '00000009'", "has shape (3, 4, 4)"]),
]


@pytest.mark.parametrize("damage, exc, fragments", [c[1:] for c in LMDB_CASES], ids=[c[0] for c in LMDB_CASES])
def test_bad_lmdb(tmp_path, damage, exc, fragments):
    path = small_lmdb(tmp_path / "db")
    damage(path)
    with pytest.raises(Exception) as info:
        with DatumLMDB(path) as db:
            db.read_all()
    check(info, exc, str(path), fragments)


def test_empty_lmdb(tmp_path):
    path = write_datum_lmdb(tmp_path / "empty", np.zeros((0, 3, 8, 8), np.uint8), [])
    with pytest.raises(ValueError, match=f"LMDB {path} is empty"):
        DatumLMDB(path).read_all()


def data_net(source, classes=3, loss_body="", extra=""):
    return (f'layer {{ name: "data" type: "Data" top: "data" top: "label" '
            f'data_param {{ source: "{source}" batch_size: 4 backend: LMDB }} }}\n'
            + f'layer {{ name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
              f'inner_product_param {{ num_output: {classes} }} }}\n'
            + f'layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" {loss_body} }}\n'
            + extra)


@pytest.mark.parametrize("labels, fragments", [
    ([0, 1, 2, 3] * 10, ["record 3", "label 3", "outside the 3 classes of layer 'loss'"]),
    ([0, 1, -1, 2] * 10, ["record 2", "label -1"]),
    ([0, 1, 2] * 13 + [7], ["record 39", "label 7"]),
])
def test_label_outside_the_classes(tmp_path, labels, fragments):
    path = small_lmdb(tmp_path / "db", labels=labels)
    with pytest.raises(LayerError) as info:
        build(tmp_path, data_net(path), TRAIN)
    check(info, LayerError, str(tmp_path / "net.prototxt"), ["layer 'data'", *fragments])


def test_label_check_for_accuracy_and_ignore_label(tmp_path):
    path = small_lmdb(tmp_path / "db", labels=[0, 1, 2, 255] * 10)
    net, _ = build(tmp_path, data_net(path, loss_body="loss_param { ignore_label: 255 }"), TRAIN)  # ignored: fine
    acc = 'layer { name: "acc" type: "Accuracy" bottom: "fc" bottom: "label" top: "acc" }\n'
    with pytest.raises(LayerError, match="label 255, outside the 3 classes of layer 'acc'"):
        build(tmp_path, data_net(path, loss_body="loss_param { ignore_label: 255 }", extra=acc), TEST)


@pytest.mark.parametrize("damage, fragments", [
    (lambda p: truncate(p, os.path.getsize(p / "data.mdb") - 4096), ["truncated"]),
    (lambda p: zero_page(p, 0), ["meta page 0"]),
    (_junk_record, ["key '00000003'"]),
])
def test_bad_lmdb_in_a_net_names_the_layer(tmp_path, damage, fragments):
    path = small_lmdb(tmp_path / "db")
    damage(path)
    with pytest.raises(LayerError) as info:
        build(tmp_path, data_net(path), TRAIN)
    check(info, LayerError, str(tmp_path / "net.prototxt"), ["layer 'data'", str(path), *fragments])


def test_truncated_lmdb_does_not_kill_the_process(tmp_path):
    """Without the check lmdb maps the short file and the first read dies with SIGBUS."""
    import subprocess
    import sys
    path = small_lmdb(tmp_path / "db", n=200)
    truncate(path, 4 * 4096)
    code = f"from exdrop.data import DatumLMDB; DatumLMDB({str(path)!r}).read_all()"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "truncated" in r.stderr, (r.returncode, r.stderr[-500:])


# ----------------------------------------------------------------------------------------------
# data: ImageData lists and image trees
# ----------------------------------------------------------------------------------------------
def png(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8))


def image_data_net(list_path):
    return (f'layer {{ name: "imgs" type: "ImageData" top: "data" top: "label" '
            f'image_data_param {{ source: "{list_path}" batch_size: 2 }} }}\n')


@pytest.mark.parametrize("content, fragments", [
    (lambda d: f"{d}/a.png one\n", [":1:", "integer label"]),
    (lambda d: f"{d}/a.png 0\n{d}/a.png\n", [":2:", "expected 'path label'"]),
    (lambda d: "", ["is empty"]),
    (lambda d: f"{d}/a.png 0\n{d}/missing.png 1\n", ["could not load image", "missing.png"]),
    (lambda d: "\xff\xfe".encode("latin-1") + "a 0".encode("utf-16-le"), ["not UTF-8 text"]),
])
def test_bad_image_list(tmp_path, content, fragments):
    png(tmp_path / "img" / "a.png")
    lst = tmp_path / "list.txt"
    data = content(tmp_path / "img")
    lst.write_bytes(data if isinstance(data, bytes) else data.encode())
    with pytest.raises(Exception) as info:
        build(tmp_path, image_data_net(lst), TRAIN)
    check(info, LayerError, str(tmp_path / "net.prototxt"), ["layer 'imgs'", str(lst), *fragments])


def test_image_list_labels_checked_against_the_net(tmp_path):
    png(tmp_path / "img" / "a.png")
    lst = tmp_path / "list.txt"
    lst.write_text(f"{tmp_path}/img/a.png 0\n{tmp_path}/img/a.png 5\n")
    text = image_data_net(lst) + data_net("x").split("\n", 1)[1]
    with pytest.raises(LayerError, match="layer 'imgs' .*record 1 .*label 5, outside the 3 classes"):
        build(tmp_path, text, TRAIN)


def _tree(root, empty=None):
    for k, c in enumerate(("ant", "bee", "cat")):
        if c == empty:
            (root / c).mkdir(parents=True)
        else:
            for n in range(3):
                png(root / c / f"{n}.png", 10 * k + n)


def _tgz(tmp_path, root):
    out = tmp_path / "tree.tgz"
    with tarfile.open(out, "w:gz") as tf:
        tf.add(root, arcname="train")
    return out


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "tgz"])
@pytest.mark.parametrize("empty", ["ant", "bee"])
def test_empty_class_folder_is_named(tmp_path, archive, empty):
    root = tmp_path / "tree"
    _tree(root, empty)
    src = _tgz(tmp_path, root) if archive else root
    with pytest.raises(ValueError) as info:
        prepare_image_dataset(src, tmp_path / "out", val_size=0, progress=False)
    msg = str(info.value)
    assert str(src) in msg and (f"'{empty}'" in msg or f"'train/{empty}'" in msg) and "hold no images" in msg, msg


def test_class_folder_with_only_other_files_is_named(tmp_path):
    root = tmp_path / "tree"
    _tree(root)
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("todo")
    with pytest.raises(ValueError, match=r"\['dog'\].*hold no images"):
        prepare_image_dataset(root, tmp_path / "out", val_size=0, progress=False)


def test_hidden_folders_are_not_classes(tmp_path):
    root = tmp_path / "tree"
    _tree(root)
    (root / ".ipynb_checkpoints").mkdir()
    r = prepare_image_dataset(root, tmp_path / "out", val_size=0, progress=False)
    assert r["classes"] == ["ant", "bee", "cat"]


def test_corrupt_image_in_tree_is_named(tmp_path):
    root = tmp_path / "tree"
    _tree(root)
    (root / "bee" / "1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*bee/1.png"):
        prepare_image_dataset(root, tmp_path / "out", val_size=0, progress=False)


def test_list_file_bad_label_is_named(tmp_path):
    png(tmp_path / "a.png")
    lst = tmp_path / "list.txt"
    lst.write_text("a.png 0\na.png cat\n")
    with pytest.raises(ValueError, match=f"{lst}:2: label 'cat' is not an integer"):
        prepare_image_dataset(lst, tmp_path / "out", val_size=0, progress=False)


def test_a_run_that_fails_to_start_leaves_no_run_folder(tmp_path):
    """A bad prototxt (here: data that is not there) stops the run before its first iteration; it
    leaves no solver.prototxt and no empty snapshots/ behind. A folder with a run's records stays."""
    from exdrop.run.train import Trainer, TrainConfig
    solver = tmp_path / "solver.prototxt"
    solver.write_text('net: "net.prototxt"\nbase_lr: 0.1\nlr_policy: "fixed"\nmax_iter: 2\n')
    (tmp_path / "net.prototxt").write_text(
        'layer { name: "data" type: "Data" top: "data" top: "label" data_param { source: "no/such_lmdb" '
        'batch_size: 2 backend: LMDB } }\n')
    out = tmp_path / "run"
    with pytest.raises(LayerError, match="no/such_lmdb"):
        Trainer(TrainConfig(str(solver), out=str(out), progress=False))
    assert not out.exists()
    kept = tmp_path / "old_run"
    kept.mkdir()
    (kept / "log.csv").write_text("iter,phase\n")
    with pytest.raises(LayerError):
        Trainer(TrainConfig(str(solver), out=str(kept), progress=False))
    assert sorted(p.name for p in kept.iterdir()) == ["log.csv", "snapshots", "solver.prototxt"]
