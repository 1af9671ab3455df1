"""Caffe's protobuf messages, built at import from a committed descriptor set.

``from exdrop.proto import caffe_pb2`` gives a module that looks like protoc's
generated ``caffe_pb2``: message classes (``caffe_pb2.NetParameter``, ...),
top-level enums (``caffe_pb2.Phase``, ``caffe_pb2.TRAIN``/``TEST``) and nested
enum values through the classes (``caffe_pb2.PoolingParameter.MAX``).

No generated code is used, so any protobuf runtime from 4.21 to 7.x works: the
classes come from ``caffe_descriptor.bin`` (a FileDescriptorSet made from
``caffe.proto`` by ``scripts/gen_proto.sh``) loaded into a *private*
DescriptorPool, so real pycaffe's own ``caffe_pb2`` (same ``caffe.*`` names,
default pool) can be imported into the same process without clashing.
"""
from __future__ import annotations

import os
import sys
import types

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal import enum_type_wrapper

_HERE = os.path.dirname(os.path.abspath(__file__))
DESCRIPTOR_SET_PATH = os.path.join(_HERE, "caffe_descriptor.bin")
PROTO_PATH = os.path.join(_HERE, "caffe.proto")


def _message_class(desc):
    get = getattr(message_factory, "GetMessageClass", None)
    if get is not None:  # protobuf >= 4.22
        return get(desc)
    return message_factory.MessageFactory(desc.file.pool).GetPrototype(desc)  # 4.21


def _build_module() -> types.ModuleType:
    with open(DESCRIPTOR_SET_PATH, "rb") as f:
        fds = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for fdp in fds.file:
        pool.Add(fdp)
    fdesc = pool.FindFileByName("caffe.proto")
    mod = types.ModuleType(__name__ + ".caffe_pb2",
                           "Caffe messages (private descriptor pool; see exdrop.proto).")
    mod.DESCRIPTOR = fdesc
    mod.POOL = pool
    for name, desc in fdesc.message_types_by_name.items():
        setattr(mod, name, _message_class(desc))
    for name, edesc in fdesc.enum_types_by_name.items():
        setattr(mod, name, enum_type_wrapper.EnumTypeWrapper(edesc))
        for v in edesc.values:
            setattr(mod, v.name, v.number)
    return mod


caffe_pb2 = _build_module()
sys.modules[caffe_pb2.__name__] = caffe_pb2

__all__ = ["caffe_pb2", "DESCRIPTOR_SET_PATH", "PROTO_PATH"]
