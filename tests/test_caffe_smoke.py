"""Smoke test of the real pycaffe oracle (built by `make caffe`).

Input -> Convolution -> Pooling(MAX) -> InnerProduct -> Python layer (doubles) -> SoftmaxWithLoss,
one forward and one backward pass; checks the Python layer really ran both ways.
"""

from __future__ import annotations

import sys
import textwrap
import uuid
import warnings

import numpy as np
import pytest

from exdrop.caffe.env import caffe_unavailable_reason, import_caffe

pytestmark = pytest.mark.caffe

_REASON = caffe_unavailable_reason()
if _REASON is not None:
    _MSG = f"PYCAFFE NOT AVAILABLE, caffe tests skipped: {_REASON}"
    warnings.warn(_MSG, UserWarning, stacklevel=1)
    pytest.skip(_MSG, allow_module_level=True)


DOUBLE_LAYER_SRC = textwrap.dedent(
    """
    import caffe

    CALLS = {"setup": 0, "forward": 0, "backward": 0}


    class DoubleLayer(caffe.Layer):
        def setup(self, bottom, top):
            if len(bottom) != 1 or len(top) != 1:
                raise Exception("DoubleLayer takes one bottom and one top")
            self.factor = float(self.param_str or 2.0)
            CALLS["setup"] += 1

        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)

        def forward(self, bottom, top):
            top[0].data[...] = self.factor * bottom[0].data
            CALLS["forward"] += 1

        def backward(self, top, propagate_down, bottom):
            if propagate_down[0]:
                bottom[0].diff[...] = self.factor * top[0].diff
            CALLS["backward"] += 1
    """
)

NET_TEMPLATE = """
name: "caffe_smoke"
layer {{ name: "data" type: "Input" top: "data" top: "label"
  input_param {{ shape {{ dim: 2 dim: 1 dim: 8 dim: 8 }} shape {{ dim: 2 }} }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 3 kernel_size: 3
    weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
  inner_product_param {{ num_output: 4
    weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "constant" value: 0 }} }} }}
layer {{ name: "double" type: "Python" bottom: "fc" top: "double"
  python_param {{ module: "{module}" layer: "DoubleLayer" param_str: "2" }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "double" bottom: "label" top: "loss" }}
"""


@pytest.fixture
def caffe():
    return import_caffe()


@pytest.fixture
def double_module(tmp_path, monkeypatch):
    name = f"exdrop_smoke_double_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(DOUBLE_LAYER_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_python_layer_registered(caffe):
    assert "Python" in list(caffe.layer_type_list())


def test_prototxt_parses_with_venv_protobuf(caffe):
    from google.protobuf import text_format

    from caffe.proto import caffe_pb2

    net = text_format.Parse(NET_TEMPLATE.format(module="m"), caffe_pb2.NetParameter())
    assert [layer.type for layer in net.layer] == [
        "Input", "Convolution", "Pooling", "InnerProduct", "Python", "SoftmaxWithLoss"
    ]
    assert net.layer[2].pooling_param.pool == caffe_pb2.PoolingParameter.MAX
    again = caffe_pb2.NetParameter.FromString(net.SerializeToString())
    assert again == net


def test_forward_backward_through_python_layer(caffe, double_module, tmp_path):
    caffe.set_mode_cpu()
    caffe.set_random_seed(0)
    proto = tmp_path / "smoke.prototxt"
    proto.write_text(NET_TEMPLATE.format(module=double_module))
    net = caffe.Net(str(proto), caffe.TRAIN)
    layer_mod = sys.modules[double_module]  # caffe imported it by name to build the layer
    assert layer_mod.CALLS["setup"] == 1

    assert list(net.blobs) == ["data", "label", "conv", "pool", "fc", "double", "loss"]
    assert net.blobs["double"].data.shape == (2, 4)

    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    net.blobs["label"].data[...] = np.array([0, 3], dtype=np.float32)

    out = net.forward()
    assert layer_mod.CALLS["forward"] == 1
    fc = net.blobs["fc"].data.copy()
    doubled = net.blobs["double"].data.copy()
    assert np.abs(fc).max() > 0
    np.testing.assert_allclose(doubled, 2.0 * fc, rtol=1e-6, atol=0)

    # SoftmaxWithLoss on the doubled logits, recomputed in numpy.
    z = doubled.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    expected_loss = -(logp[0, 0] + logp[1, 3]) / 2
    np.testing.assert_allclose(float(out["loss"]), expected_loss, rtol=1e-5)

    net.backward()
    assert layer_mod.CALLS["backward"] == 1
    top_diff = net.blobs["double"].diff.copy()
    # d loss / d logits = (softmax - onehot) / N
    onehot = np.zeros_like(z)
    onehot[0, 0] = onehot[1, 3] = 1
    np.testing.assert_allclose(top_diff, (np.exp(logp) - onehot) / 2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(net.blobs["fc"].diff, 2.0 * top_diff, rtol=1e-6, atol=0)
    assert np.abs(net.params["conv"][0].diff).max() > 0
    assert np.abs(net.params["fc"][0].diff).max() > 0
