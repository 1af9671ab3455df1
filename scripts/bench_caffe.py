#!/usr/bin/env python
"""Seconds per CNN-2 iteration on CPU, real Caffe next to the engine: `exdrop bench caffe ...`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from exdrop.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "caffe", *sys.argv[1:]]))
