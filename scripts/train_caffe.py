#!/usr/bin/env python
"""Train a solver prototxt with real Caffe (pycaffe, CPU): `exdrop train --backend caffe SOLVER ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from exdrop.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", "--backend", "caffe", *sys.argv[1:]]))
