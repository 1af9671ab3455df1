"""Which layers a blob depends on: the one backward walk over a net's layers (by their top and
bottom names, or any keys) that the engine's net, the Excitation Backprop walk, the analysis and
the Caffe backend share."""
from __future__ import annotations

from typing import Iterable, Sequence


def upstream(layers: Sequence[tuple[Iterable, Iterable]], wanted: Iterable, after: int = -1) -> tuple[list[int], set]:
    """Walk ``layers`` (each ``(tops, bottoms)``, in forward order) backwards from the blobs
    ``wanted`` down to, not including, index ``after``: the indices of the layers the wanted blobs
    are computed by (forward order), and the blobs they still need from before that point. An
    in-place layer (a top that is also a bottom) keeps its blob needed."""
    needed, picked = set(wanted), []
    for j in range(len(layers) - 1, after, -1):
        tops, bottoms = layers[j]
        tops, bottoms = list(tops), list(bottoms)
        if any(t in needed for t in tops):
            picked.append(j)
            needed.difference_update(t for t in tops if t not in bottoms)
            needed.update(bottoms)
    return picked[::-1], needed


def last_writer(tops: Sequence[Iterable], blob, before: int | None = None) -> int | None:
    """The index of the last layer before ``before`` (default: all) whose tops include ``blob``."""
    end = len(tops) if before is None else before
    return next((i for i in range(end - 1, -1, -1) if blob in tops[i]), None)
