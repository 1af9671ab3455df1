"""``python -m exdrop.data cifar10 SOURCE OUT_DIR`` / ``python -m exdrop.data images SOURCE OUT_DIR``."""
import argparse
import json
import sys

from .cifar import prepare_cifar10
from .images import prepare_image_dataset


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m exdrop.data", description="convert a dataset to Caffe LMDBs")
    ap.add_argument("kind", choices=["cifar10", "images"])
    ap.add_argument("source", help="cifar-10-python.tar.gz, an image folder tree, a .tgz of one, or a list file")
    ap.add_argument("out_dir")
    ap.add_argument("--val-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-per-class", type=int, default=None)
    ap.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"), default=None)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    kw = dict(val_size=a.val_size, seed=a.seed, limit_per_class=a.limit_per_class, force=a.force)
    if a.kind == "cifar10":
        r = prepare_cifar10(a.source, a.out_dir, **kw)
    else:
        r = prepare_image_dataset(a.source, a.out_dir, resize=tuple(a.resize) if a.resize else None, **kw)
    json.dump(r, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
