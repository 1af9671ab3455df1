"""Data for exdrop: Caffe Datum LMDBs, dataset converters, and the batch sources of the data layers.

Public API::

    write_datum_lmdb(path, images, labels, encoded=False, names=None) -> Path
    DatumLMDB(path): len(), .shape, .read_all() -> (uint8 N,C,H,W, int64 labels), .records()
    prepare_cifar10(source, out_dir, val_size=None, seed=0, limit_per_class=None) -> dict
    prepare_cifar100(source, out_dir, val_size=None, seed=0, limit_per_class=None) -> dict
    prepare_caltech256(source, out_dir, split=0, train_per_class=50, test_per_class=20, size=128) -> dict
    prepare_image_dataset(source, out_dir, val_size=None, seed=0, resize=None, ...) -> dict
    prepare_imagenet(train_dir, val_dir, out_dir, val_labels=None, meta=None, resize=None, short_side=None,
                     lmdb=True, limit_per_class=None, seed=0) -> dict
    download_cifar10(dest) -> Path, download_cifar100(dest) -> Path
    official_source(source, dataset) -> str: source, or its official archive downloaded when missing
    make_source(layer_param, phase, device, seed=None, part=None, stream=None) -> BatchSource | StreamSource
        (StreamSource: read from disk batch by batch, for data sets larger than memory)
"""
from exdrop.data.caltech import CALTECH256_MD5, CALTECH256_SPLITS, CALTECH256_URL, caltech256_split, prepare_caltech256
from exdrop.data.cifar import (CIFAR10_CLASSES, CIFAR10_MD5, CIFAR10_URL, CIFAR100_MD5, CIFAR100_URL, download_cifar10,
                               download_cifar100, md5sum, official_source, prepare_cifar10, prepare_cifar100, read_cifar10_python,
                               read_cifar100_python)
from exdrop.data.imagenet import IMAGENET_URL, prepare_imagenet
from exdrop.data.images import open_image_source, prepare_image_dataset, read_image_list
from exdrop.data.lmdb_datum import CorruptRecordError, DatumLMDB, array_to_datum, datum_to_array, write_datum_lmdb
from exdrop.data.sources import BatchSource, DataTransformer, load_image_list_data, resolve_source
from exdrop.data.stream import StreamSource, make_source

__all__ = [
    "write_datum_lmdb", "DatumLMDB", "CorruptRecordError", "array_to_datum", "datum_to_array",
    "prepare_cifar10", "download_cifar10", "official_source", "read_cifar10_python", "md5sum",
    "CIFAR10_CLASSES", "CIFAR10_URL", "CIFAR10_MD5",
    "prepare_cifar100", "download_cifar100", "read_cifar100_python", "CIFAR100_URL", "CIFAR100_MD5",
    "prepare_caltech256", "caltech256_split", "CALTECH256_URL", "CALTECH256_MD5", "CALTECH256_SPLITS",
    "prepare_image_dataset", "open_image_source", "read_image_list", "prepare_imagenet", "IMAGENET_URL",
    "make_source", "BatchSource", "StreamSource", "DataTransformer", "resolve_source", "load_image_list_data",
]
