"""Caffe schema (exdrop.proto) and file IO (exdrop.proto.io)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from exdrop.proto import io
from exdrop.proto import DESCRIPTOR_SET_PATH, caffe_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CNN = """
name: "CIFAR10_quick"   # a comment
layer {
  name: "cifar"
  type: "Data"
  top: "data"
  top: "label"
  include { phase: TRAIN }
  transform_param { mean_file: "mean.binaryproto" mirror: true crop_size: 28 }
  data_param { source: "train_lmdb" batch_size: 100 backend: LMDB }
}
layer {
  name: "cifar"
  type: "Data"
  top: "data"
  top: "label"
  include { phase: TEST }
  transform_param { mean_value: 104 mean_value: 117 mean_value: 123 scale: 0.00390625 }
  data_param { source: "test_lmdb" batch_size: 100 backend: LMDB }
}
layer {
  name: "conv1"
  type: "Convolution"
  bottom: "data"
  top: "conv1"
  param { lr_mult: 1 decay_mult: 1 }
  param { lr_mult: 2 decay_mult: 0 }
  convolution_param {
    num_output: 32 pad: 2 kernel_size: 5 stride: 1 group: 1
    weight_filler { type: "gaussian" std: 0.0001 }
    bias_filler { type: "constant" }
  }
}
layer {
  name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 }
}
layer { name: "relu1" type: "ReLU" bottom: "pool1" top: "pool1" }
layer {
  name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
  lrn_param { local_size: 3 alpha: 5e-05 beta: 0.75 norm_region: WITHIN_CHANNEL }
}
layer {
  name: "ip1" type: "InnerProduct" bottom: "norm1" top: "ip1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  inner_product_param { num_output: 64 weight_filler { type: "xavier" } }
}
layer { name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.5 } }
layer {
  name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy"
  include { phase: TEST }
}
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
"""

SOLVER = """
net: "train_val.prototxt"
test_iter: 100
test_interval: 1000
base_lr: 0.001
momentum: 0.9
weight_decay: 0.0005
lr_policy: "multistep"
gamma: 0.1
stepvalue: 25000
stepvalue: 40000
display: 20
max_iter: 50000
snapshot: 5000
snapshot_prefix: "snapshots/exdrop"
solver_mode: GPU
type: "SGD"
"""


def test_parse_realistic_cnn():
    net = io.parse_net(CNN)
    assert net.name == "CIFAR10_quick"
    assert [l.name for l in net.layer][:3] == ["cifar", "cifar", "conv1"]
    assert net.layer[0].include[0].phase == caffe_pb2.TRAIN
    assert net.layer[1].include[0].phase == caffe_pb2.TEST
    assert list(net.layer[1].transform_param.mean_value) == [104, 117, 123]
    assert net.layer[0].data_param.backend == caffe_pb2.DataParameter.LMDB
    conv = net.layer[2]
    cp = conv.convolution_param
    assert (cp.num_output, list(cp.pad), list(cp.kernel_size), list(cp.stride)) == (32, [2], [5], [1])
    assert cp.bias_term and cp.weight_filler.type == "gaussian"
    assert cp.weight_filler.std == pytest.approx(1e-4)
    assert [p.lr_mult for p in conv.param] == [1, 2] and conv.param[1].decay_mult == 0
    assert net.layer[3].pooling_param.pool == caffe_pb2.PoolingParameter.MAX
    assert net.layer[3].pooling_param.pad == 0  # Caffe default
    assert net.layer[5].lrn_param.norm_region == caffe_pb2.LRNParameter.WITHIN_CHANNEL
    ip = net.layer[6]
    assert ip.param[0].decay_mult == 1.0  # ParamSpec default
    assert ip.inner_product_param.bias_term  # default true
    assert net.layer[7].dropout_param.dropout_ratio == 0.5
    # Caffe defaults of untouched messages
    assert caffe_pb2.LossParameter().normalization == caffe_pb2.LossParameter.VALID
    assert caffe_pb2.NetState().phase == caffe_pb2.TEST
    assert caffe_pb2.FillerParameter().type == "constant"
    assert caffe_pb2.ConvolutionParameter().group == 1


def test_parse_solver(tmp_path):
    p = tmp_path / "solver.prototxt"
    p.write_text(SOLVER)
    sp = io.read_solver_prototxt(p)
    assert sp.net == "train_val.prototxt" and list(sp.test_iter) == [100]
    assert sp.base_lr == pytest.approx(0.001) and sp.lr_policy == "multistep"
    assert list(sp.stepvalue) == [25000, 40000]
    assert sp.solver_mode == caffe_pb2.SolverParameter.GPU and sp.type == "SGD"
    # Caffe defaults
    assert sp.iter_size == 1 and sp.regularization_type == "L2" and sp.clip_gradients == -1
    assert sp.momentum2 == pytest.approx(0.999) and sp.delta == pytest.approx(1e-8)
    assert sp.rms_decay == pytest.approx(0.99) and sp.random_seed == -1
    assert sp.test_initialization and sp.snapshot_after_train and sp.average_loss == 1
    assert sp.snapshot_format == caffe_pb2.SolverParameter.BINARYPROTO


def test_schema_numbers_match_caffe():
    f = {m: {x.name: x.number for x in getattr(caffe_pb2, m).DESCRIPTOR.fields}
         for m in ("NetParameter", "LayerParameter", "SolverParameter", "SolverState", "BlobProto")}
    assert f["NetParameter"]["layer"] == 100 and f["NetParameter"]["layers"] == 2
    assert f["LayerParameter"]["convolution_param"] == 106 and f["LayerParameter"]["batch_norm_param"] == 139
    assert f["LayerParameter"]["transform_param"] == 100 and f["LayerParameter"]["python_param"] == 130
    assert f["SolverParameter"]["type"] == 40 and f["SolverParameter"]["solver_type"] == 30
    assert f["SolverParameter"]["stepvalue"] == 34 and f["SolverParameter"]["iter_size"] == 36
    assert f["SolverState"] == {"iter": 1, "learned_net": 2, "history": 3, "current_step": 4}
    assert f["BlobProto"]["shape"] == 7 and f["BlobProto"]["double_data"] == 8
    assert (caffe_pb2.TRAIN, caffe_pb2.TEST) == (0, 1)
    assert caffe_pb2.SolverParameter.ADAM == 5 and caffe_pb2.PoolingParameter.AVE == 1


def test_private_descriptor_pool():
    assert caffe_pb2.NetParameter.DESCRIPTOR.file.pool is not descriptor_pool.Default()
    import exdrop.proto.caffe_pb2 as again
    assert again is caffe_pb2


def test_syntax_error_reports_file_line_col(tmp_path):
    p = tmp_path / "bad.prototxt"
    p.write_text('name: "x"\nlayer {\n  name: "a"\n  tpye: "ReLU"\n}\n')
    with pytest.raises(io.PrototxtError) as ei:
        io.read_net_prototxt(p)
    e = ei.value
    assert isinstance(e, ValueError)
    assert (e.filename, e.line, e.column) == (str(p), 4, 3)
    assert str(e).startswith(f"{p}:4:3: ") and "tpye" in str(e)
    # a missing ':' -- column 14 is where the value '"a"' starts on line 2
    with pytest.raises(io.PrototxtError, match=r'^net\.prototxt:2:14: .*Expected ":"'):
        io.parse_net('name: "x"\nlayer { name "a" }', filename="net.prototxt")


def test_missing_file_named():
    with pytest.raises(FileNotFoundError, match="no_such_solver.prototxt"):
        io.read_solver_prototxt("no_such_solver.prototxt")
    with pytest.raises(FileNotFoundError, match="no_such.caffemodel"):
        io.read_caffemodel("no_such.caffemodel")


def test_v1_net_rejected(tmp_path):
    v1 = 'name: "old"\nlayers {\n  name: "conv1"\n  type: CONVOLUTION\n  blobs_lr: 1\n  bottom: "data"\n}\n'
    with pytest.raises(io.V1NetError, match="upgrade_net_proto_text"):
        io.parse_net(v1, "old.prototxt")
    with pytest.raises(ValueError, match="V1"):
        io.parse_net('layers { name: "a" bottom: "x" }')
    # a binary V1 caffemodel
    net = caffe_pb2.NetParameter(name="old")
    net.layers.add(name="conv1")
    p = tmp_path / "old.caffemodel"
    p.write_bytes(net.SerializeToString())
    with pytest.raises(io.V1NetError, match="old.caffemodel"):
        io.read_caffemodel(p)


def test_caffemodel_round_trip(tmp_path):
    net = io.parse_net(CNN)
    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((32, 3, 5, 5)).astype(np.float32), rng.standard_normal(32).astype(np.float32)
    net.layer[2].blobs.extend([io.array_to_blob(w), io.array_to_blob(b)])
    p = tmp_path / "m.caffemodel"
    io.write_caffemodel(net, p)
    assert os.listdir(tmp_path) == ["m.caffemodel"]  # no temp file left behind
    back = io.read_caffemodel(p)
    assert back == net
    assert list(back.layer[2].blobs[0].shape.dim) == [32, 3, 5, 5]
    np.testing.assert_array_equal(io.blob_to_array(back.layer[2].blobs[0]), w)
    np.testing.assert_array_equal(io.blob_to_array(back.layer[2].blobs[1]), b)
    with pytest.raises(ValueError, match="not a valid NetParameter"):
        (tmp_path / "junk").write_bytes(b"\xff\xff\xff")
        io.read_caffemodel(tmp_path / "junk")


def test_blob_legacy_dims_and_double_data():
    blob = caffe_pb2.BlobProto(num=2, channels=3, height=1, width=2)
    blob.data.extend(range(12))
    a = io.blob_to_array(blob)
    assert a.shape == (2, 3, 1, 2) and a.dtype == np.float32 and a[1, 2, 0, 1] == 11
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend([2, 2])
    blob.double_data.extend([0.5, 1.5, 2.5, 3.5])
    np.testing.assert_array_equal(io.blob_to_array(blob), np.array([[0.5, 1.5], [2.5, 3.5]], np.float32))
    scalar = caffe_pb2.BlobProto(data=[7.0])  # empty shape: a scalar
    assert io.blob_to_array(scalar).shape == () and io.blob_to_array(scalar) == 7
    bad = caffe_pb2.BlobProto(num=2, channels=2, height=1, width=1, data=[1.0])
    with pytest.raises(ValueError, match="needs 4"):
        io.blob_to_array(bad)


def test_mean_binaryproto_round_trip(tmp_path):
    mean = np.random.default_rng(1).uniform(0, 255, (3, 4, 5)).astype(np.float32)
    p = tmp_path / "mean.binaryproto"
    io.write_binaryproto(mean, p)
    blob = caffe_pb2.BlobProto.FromString(p.read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 4, 5)  # like compute_image_mean
    np.testing.assert_array_equal(io.read_binaryproto_mean(p), mean)
    # a mean written with shape.dim (1, C, H, W) reads the same
    io.write_binaryproto(mean[None], p)
    assert list(caffe_pb2.BlobProto.FromString(p.read_bytes()).shape.dim) == [1, 3, 4, 5]
    np.testing.assert_array_equal(io.read_binaryproto_mean(p), mean)


def _find_protoc():
    if shutil.which("protoc"):
        return ["protoc"]
    try:
        import grpc_tools.protoc  # noqa: F401
        return [sys.executable, "-m", "grpc_tools.protoc"]
    except ImportError:
        return None


def _normalized(fds: descriptor_pb2.FileDescriptorSet) -> descriptor_pb2.FileDescriptorSet:
    for f in fds.file:
        f.ClearField("source_code_info")
        if f.syntax == "proto2":  # some protoc versions write it, others leave it empty
            f.ClearField("syntax")
    return fds


def test_descriptor_bin_matches_proto(tmp_path):
    protoc = _find_protoc()
    if protoc is None:
        pytest.skip("no protoc (apt-get install protobuf-compiler) or grpcio-tools: "
                    "cannot check caffe_descriptor.bin against caffe.proto")
    out = tmp_path / "caffe_descriptor.bin"
    subprocess.run(protoc + [f"--proto_path={ROOT}/exdrop/proto", f"--descriptor_set_out={out}",
                             "caffe.proto"], check=True)
    fresh = _normalized(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()))
    with open(DESCRIPTOR_SET_PATH, "rb") as f:
        committed = _normalized(descriptor_pb2.FileDescriptorSet.FromString(f.read()))
    assert committed == fresh, "caffe_descriptor.bin is stale: run scripts/gen_proto.sh"
