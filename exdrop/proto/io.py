"""Reading and writing Caffe's files: prototxt, .caffemodel, .binaryproto.

Text files are parsed like Caffe's ``ReadProtoFromTextFile``
(src/caffe/util/io.cpp: ``google::protobuf::TextFormat::Parse``); binary files
like ``ReadProtoFromBinaryFile``.  Blob <-> array conversion follows
``Blob::FromProto``/``Blob::ToProto`` (src/caffe/blob.cpp).  Every write is
atomic (temporary file in the same folder, then ``os.replace``), so a crash
never leaves a half-written snapshot.
"""
from __future__ import annotations

import os
import re
import tempfile

import numpy as np
from google.protobuf import message as _message
from google.protobuf import text_format

from exdrop.proto import caffe_pb2

__all__ = [
    "PrototxtError", "V1NetError", "parse_net", "parse_solver", "read_net_prototxt",
    "read_solver_prototxt", "read_caffemodel", "write_caffemodel",
    "blob_to_array", "array_to_blob", "read_binaryproto_mean",
    "write_binaryproto", "read_binary_proto", "write_binary_proto", "atomic_write",
]

V1_MESSAGE = ("V1 nets (the old 'layers' field) are not supported; upgrade the file "
              "with Caffe's upgrade_net_proto_text (or upgrade_net_proto_binary)")


class PrototxtError(ValueError):
    """A prototxt that does not parse; ``str(e)`` is ``FILE:LINE:COL: message``."""

    def __init__(self, filename: str, line: int | None, column: int | None, message: str):
        self.filename, self.line, self.column, self.message = filename, line, column, message
        where = filename + "".join(f":{n}" for n in (line, column) if n is not None)
        super().__init__(f"{where}: {message}")


class V1NetError(ValueError):
    """A net in Caffe's old V1 format (``layers`` instead of ``layer``)."""

    def __init__(self, filename: str):
        super().__init__(f"{filename}: {V1_MESSAGE}")


# ---------------------------------------------------------------------------
# text (prototxt)

_LOC_PREFIX = re.compile(r"^\d+(:\d+)? : ")
_V1_TEXT = re.compile(r"(?:^|[\s{}])layers\s*\{")


def _strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _parse_text(text: str, msg, filename: str):
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as e:
        if _V1_TEXT.search(_strip_comments(text)):
            raise V1NetError(filename) from None
        line = e.GetLine() if hasattr(e, "GetLine") else None
        col = e.GetColumn() if hasattr(e, "GetColumn") else None
        raise PrototxtError(filename, line, col, _LOC_PREFIX.sub("", str(e))) from None
    return msg


def _check_not_v1(net, filename: str):
    if len(net.layers):
        raise V1NetError(filename)
    return net


def _read_text(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prototxt file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise PrototxtError(path, None, None, "the file is UTF-16 encoded, not a UTF-8 text prototxt: "
                                              "save it as UTF-8")
    if b"\0" in data:
        raise PrototxtError(path, None, None, "the file is binary, not a text prototxt (a .caffemodel, "
                                              ".solverstate or .binaryproto?)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise PrototxtError(path, line, None, f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                                              f"{e.start}); save the prototxt as UTF-8") from None


def parse_net(text: str, filename: str = "<string>") -> caffe_pb2.NetParameter:
    """Parse a net prototxt string (``layer`` format; V1 ``layers`` is refused)."""
    return _check_not_v1(_parse_text(text, caffe_pb2.NetParameter(), filename), filename)


def parse_solver(text: str, filename: str = "<string>") -> caffe_pb2.SolverParameter:
    """Parse a solver prototxt string."""
    sp = _parse_text(text, caffe_pb2.SolverParameter(), filename)
    for net in [sp.net_param, sp.train_net_param, *sp.test_net_param]:
        _check_not_v1(net, filename)
    try:
        solver_type(sp)   # Caffe upgrades solver_type on reading; an unknown type fails at creation
    except ValueError as e:
        raise ValueError(f"{filename}: {e}") from None
    return sp


# Caffe's solver types (exdrop.engine.solver implements each under this name) and the legacy enum's names
SOLVER_TYPE_NAMES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
_LEGACY_SOLVER_TYPES = {caffe_pb2.SolverParameter.SGD: "SGD", caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
                        caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad", caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
                        caffe_pb2.SolverParameter.ADADELTA: "AdaDelta", caffe_pb2.SolverParameter.ADAM: "Adam"}


def solver_type(param: caffe_pb2.SolverParameter) -> str:
    """The solver's type name from ``type`` or the legacy ``solver_type`` enum (Caffe's
    UpgradeSolverType in src/caffe/util/upgrade_proto.cpp); an unknown name raises ValueError."""
    name = param.type
    if param.HasField("solver_type"):
        if param.HasField("type"):
            raise ValueError("Failed to upgrade solver: old solver_type field (enum) and new "
                             "type field (string) cannot be both specified.")
        name = _LEGACY_SOLVER_TYPES[param.solver_type]
    if name not in SOLVER_TYPE_NAMES:
        raise ValueError(f"Unknown solver type: {name!r} (known types: {', '.join(SOLVER_TYPE_NAMES)})")
    return name


def read_net_prototxt(path) -> caffe_pb2.NetParameter:
    return parse_net(_read_text(path), os.fspath(path))


def read_solver_prototxt(path) -> caffe_pb2.SolverParameter:
    return parse_solver(_read_text(path), os.fspath(path))


# ---------------------------------------------------------------------------
# binary

def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder + os.replace."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_binary_proto(path, msg):
    """Parse the binary protobuf file ``path`` into ``msg`` (Caffe's ReadProtoFromBinaryFile)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"binary proto file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        msg.ParseFromString(data)
    except _message.DecodeError as e:
        raise ValueError(f"{path}: not a valid {msg.DESCRIPTOR.name} binary proto: {e}") from None
    return msg


def write_binary_proto(msg, path) -> None:
    atomic_write(path, msg.SerializeToString())


def read_caffemodel(path, allow_v1: bool = False) -> caffe_pb2.NetParameter:
    """A binary NetParameter (.caffemodel); V1 models (``layers``, the Model Zoo's VGG and AlexNet)
    are refused unless ``allow_v1`` (loading weights by name needs only names and blobs)."""
    net = read_binary_proto(path, caffe_pb2.NetParameter())
    return net if allow_v1 else _check_not_v1(net, os.fspath(path))


def write_caffemodel(net_param: caffe_pb2.NetParameter, path) -> None:
    write_binary_proto(net_param, path)


_LEGACY = ("num", "channels", "height", "width")


def blob_shape_text(blob: caffe_pb2.BlobProto) -> str:
    if any(blob.HasField(f) for f in _LEGACY):
        return f"{blob.num}/{blob.channels}/{blob.height}/{blob.width} (legacy num/channels/height/width)"
    return str(tuple(blob.shape.dim))


def shape_equals(blob: caffe_pb2.BlobProto, shape) -> bool:
    """Caffe's ``Blob::ShapeEquals``: a legacy 4-d blob (num/channels/height/width) matches a shape of at
    most 4 axes padded with leading 1s (a (10, 32) InnerProduct weight is 1/1/10/32, not 1/1/32/10);
    otherwise ``shape.dim`` must equal the shape exactly."""
    shape = tuple(int(d) for d in shape)
    if any(blob.HasField(f) for f in _LEGACY):
        return len(shape) <= 4 and (blob.num, blob.channels, blob.height, blob.width) == (1,) * (4 - len(shape)) + shape
    return tuple(blob.shape.dim) == shape


def blob_to_array(blob: caffe_pb2.BlobProto) -> np.ndarray:
    """BlobProto -> float32 array, as Blob::FromProto: legacy num/channels/height/width
    if any is set, else shape.dim; values from double_data if present, else data."""
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(blob.shape.dim)
    values = blob.double_data if len(blob.double_data) else blob.data
    arr = np.asarray(values, dtype=np.float32)
    count = int(np.prod(shape, dtype=np.int64))
    if arr.size != count:
        raise ValueError(f"BlobProto has {arr.size} values but shape {shape} needs {count}")
    return arr.reshape(shape)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _set_data(blob: caffe_pb2.BlobProto, arr: np.ndarray) -> None:
    """blob.data = arr, fast: merge the packed field's wire bytes (field 5, wire type 2)
    instead of appending millions of Python floats one by one."""
    del blob.data[:]
    raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
    blob.MergeFromString(b"\x2a" + _varint(len(raw)) + raw)


def array_to_blob(arr) -> caffe_pb2.BlobProto:
    """Array -> BlobProto with shape.dim and float data (Blob::ToProto)."""
    arr = np.asarray(arr, dtype=np.float32)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(int(d) for d in arr.shape)
    _set_data(blob, arr)
    return blob


def read_binaryproto_mean(path) -> np.ndarray:
    """A mean_file (.binaryproto BlobProto) as a float32 (C, H, W) array."""
    arr = blob_to_array(read_binary_proto(path, caffe_pb2.BlobProto()))
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"{os.fspath(path)}: mean blob has shape {arr.shape}, expected (1,C,H,W) or (C,H,W)")
    return arr


def write_binaryproto(arr, path) -> None:
    """Write a BlobProto.  A (C, H, W) array is written like Caffe's compute_image_mean
    (legacy num=1, channels, height, width); other shapes use shape.dim."""
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 3:
        blob = caffe_pb2.BlobProto(num=1, channels=arr.shape[0], height=arr.shape[1], width=arr.shape[2])
        _set_data(blob, arr)
    else:
        blob = array_to_blob(arr)
    write_binary_proto(blob, path)
