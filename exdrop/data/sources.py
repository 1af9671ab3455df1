"""Batch sources behind Caffe's ``Data``, ``ImageData`` (and ``Input``-fed) layers.

The whole dataset is held as ONE uint8 tensor (N,C,H,W) on the device, plus int64 labels; a
batch is a single advanced-indexing gather that also does the crop and the mirror, followed by
Caffe's DataTransformer arithmetic ``(x - mean) * scale`` in float32:

* crop (``crop_size``): a random offset per image in TRAIN, the centre ``(H - crop) // 2`` in TEST;
* mirror (``mirror: true``): each image flipped with probability 1/2, in BOTH phases (as Caffe);
* mean: ``mean_file`` (a BlobProto of the full image size, cropped/flipped with the image) or
  ``mean_value`` (one per channel, or one for all channels);
* then multiplied by ``scale``.

Reading order is Caffe's: ``Data`` reads the records sequentially with wrap-around (the
shuffling happened at conversion); ``ImageData`` reads its list in order, or shuffled with a
seeded generator and reshuffled at every epoch end when ``shuffle: true``.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from exdrop.data.lmdb_datum import close_shared, open_shared, read_image
from exdrop.proto.io import read_binaryproto_mean

__all__ = ["BatchSource", "DataTransformer", "resolve_source", "load_image_list_data", "read_list_entries",
           "restore_generator"]

TRAIN, TEST = 0, 1
_MAKE_HINT = ("Create the data first (e.g. `make data-cifar10`, or exdrop.data.prepare_cifar10 / "
              "prepare_image_dataset) and run from the folder that the prototxt's relative paths start from.")


def _phase(phase) -> int:
    if isinstance(phase, str):
        return {"TRAIN": TRAIN, "TEST": TEST}[phase.upper()]
    return int(phase)


def resolve_source(path: str, layer_name: str = "", what: str = "source") -> Path:
    """Resolve a layer's data path like Caffe (relative to the current directory); a missing path
    raises FileNotFoundError naming the layer and saying how to create the data."""
    p = Path(path)
    full = p if p.is_absolute() else Path.cwd() / p
    if not path or not full.exists():
        raise FileNotFoundError(f"layer '{layer_name}': {what} '{path}' not found"
                                f"{'' if p.is_absolute() else ' (relative to the current directory ' + str(Path.cwd()) + ')'}. "
                                + _MAKE_HINT)
    return full


def _read_mean(path: Path) -> np.ndarray:
    return np.asarray(read_binaryproto_mean(str(path)), np.float32)


class DataTransformer:
    """Caffe's DataTransformer for whole batches, in torch on the device."""

    def __init__(self, transform_param, phase, shape_chw, device="cpu", layer_name: str = ""):
        tp = transform_param
        c, h, w = shape_chw
        self.phase = _phase(phase)
        self.crop = int(tp.crop_size) if tp is not None else 0
        self.do_mirror = bool(tp.mirror) if tp is not None else False
        self.scale = float(tp.scale) if tp is not None else 1.0
        self.in_shape = (c, h, w)
        if self.crop and (self.crop > h or self.crop > w):
            raise ValueError(f"layer '{layer_name}': crop_size {self.crop} is larger than the images ({h}x{w})")
        self.mean = None          # (C,H,W) mean image (mean_file)
        self.mean_values = None   # (1,C,1,1)
        has_file = tp is not None and tp.HasField("mean_file")
        if has_file and len(tp.mean_value):
            raise ValueError(f"layer '{layer_name}': cannot specify mean_file and mean_value at the same time")
        if has_file:
            m = _read_mean(resolve_source(tp.mean_file, layer_name, "mean_file"))
            m = m.reshape(m.shape[-3:]) if m.ndim > 3 else m
            if tuple(m.shape) != (c, h, w):
                raise ValueError(f"layer '{layer_name}': mean_file {tp.mean_file} has shape {tuple(m.shape)}, "
                                 f"the data is {(c, h, w)}")
            self.mean = torch.as_tensor(np.ascontiguousarray(m), dtype=torch.float32)
        elif tp is not None and len(tp.mean_value):
            mv = [float(v) for v in tp.mean_value]
            if len(mv) == 1:
                mv = mv * c
            if len(mv) != c:
                raise ValueError(f"layer '{layer_name}': specify either 1 mean_value or as many as channels ({c})")
            self.mean_values = torch.tensor(mv, dtype=torch.float32).view(1, c, 1, 1)
        self.to(device)

    def to(self, device):
        device = torch.device(device)
        self.device = device
        if self.mean is not None:
            self.mean = self.mean.to(device)
        if self.mean_values is not None:
            self.mean_values = self.mean_values.to(device)
        c, h, w = self.in_shape
        oh, ow = (self.crop, self.crop) if self.crop else (h, w)
        self._ar_c = torch.arange(c, device=device).view(1, c, 1, 1)
        self._ar_h = torch.arange(oh, device=device)
        self._ar_w = torch.arange(ow, device=device)
        return self

    def out_shape(self) -> tuple[int, int, int]:
        c, h, w = self.in_shape
        return (c, self.crop, self.crop) if self.crop else (c, h, w)

    def __call__(self, data: torch.Tensor, idx: torch.Tensor, gen: torch.Generator,
                 part: slice | None = None) -> torch.Tensor:
        """Transform ``data[idx]`` (data: (N,C,H,W) resident tensor, idx: (B,) int64) -> float32.
        ``part``: only these images of the batch, with the crops and mirrors drawn for the whole
        batch (a process's share of a global batch, :mod:`exdrop.engine.distributed`)."""
        c, h, w = self.in_shape
        b = idx.numel()
        dev = data.device
        mirror = h_off = w_off = None
        if self.do_mirror:   # Caffe: do_mirror = mirror && Rand(2), in every phase
            mirror = torch.randint(0, 2, (b,), generator=gen, device=dev).bool()
        if self.crop:
            cs = self.crop
            if self.phase == TRAIN:
                h_off = torch.randint(0, h - cs + 1, (b,), generator=gen, device=dev)
                w_off = torch.randint(0, w - cs + 1, (b,), generator=gen, device=dev)
            else:
                h_off = torch.full((b,), (h - cs) // 2, device=dev, dtype=torch.long)
                w_off = torch.full((b,), (w - cs) // 2, device=dev, dtype=torch.long)
        if part is not None:
            idx, mirror, h_off, w_off = (None if t is None else t[part] for t in (idx, mirror, h_off, w_off))
            b = idx.numel()
        if not self.crop and mirror is None:
            x = data.index_select(0, idx).float()
            if self.mean is not None:
                x = x - self.mean
        else:
            # one flat index per output element: image*CHW + (c*H + row)*W + col, with the crop
            # offset and the mirror folded into row/col; a 1-D index_select is far faster than
            # multi-tensor advanced indexing on CPU
            rows = (h_off[:, None] + self._ar_h) if self.crop else self._ar_h.expand(b, -1)
            cols = self._ar_w.expand(b, -1)
            if mirror is not None:
                cols = torch.where(mirror[:, None], cols.flip(1), cols)
            if self.crop:
                cols = w_off[:, None] + cols
            pix = (self._ar_c * h + rows[:, None, :, None]) * w + cols[:, None, None, :]   # (B,C,oh,ow)
            flat = idx.view(b, 1, 1, 1) * (c * h * w) + pix
            x = data.reshape(-1).index_select(0, flat.reshape(-1)).view(pix.shape).float()
            if self.mean is not None:   # mean taken at the same (cropped, flipped) source pixels
                x = x - self.mean.reshape(-1).index_select(0, pix.reshape(-1)).view(pix.shape)
        if self.mean_values is not None:
            x = x - self.mean_values
        if self.scale != 1.0:
            x = x * self.scale
        return x


def move_generator(gen: torch.Generator, old: torch.device, new: torch.device) -> torch.Generator:
    """A source's crop / mirror generator after its move from ``old`` to ``new``: the same one on
    the same device kind (``cpu`` and ``cpu:0`` alike); on another kind, a generator there seeded
    from one draw of the old one, so the crops go on deterministically."""
    if new.type == old.type:
        return gen
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen, device=old).item())
    moved = torch.Generator(device=new)
    moved.manual_seed(seed)
    return moved


def restore_generator(gen: torch.Generator, st: dict, device: torch.device, name: str, cursor: int,
                      epoch: int) -> None:
    """A saved source state's crop / mirror generator: set as saved on the same device kind; a state
    saved on another kind (whose generator state cannot be set here) reseeds it from the saved seed
    and the position (``cursor``, ``epoch``), the same for every resume, with a warning: the crops
    and mirrors then differ from the original run's."""
    if st.get("rng_device") == device.type:
        gen.set_state(st["rng_state"])
        return
    warnings.warn(f"layer '{name}': data RNG state saved on {st.get('rng_device')}, now on "
                  f"{device.type}; reseeding (crops/mirrors will differ from the original run)")
    gen.manual_seed((int(st["seed"]) * 1000003 + cursor + epoch) % 2 ** 62)


class BatchSource:
    """Batches from an in-memory dataset (uint8 or float32 (N,C,H,W) + int64 labels) on ``device``.

    ``next_batch()`` -> [float32 data (B,C,H',W'), int64 labels (B,)], both on ``device``.
    Sequential with wrap-around (``shuffle=False``, Caffe's Data layer), or a seeded permutation
    redrawn at every epoch end (``shuffle=True``, Caffe's ImageData layer).
    """

    def __init__(self, images, labels, batch_size: int, transform_param=None, phase=TRAIN, device="cpu",
                 shuffle: bool = False, rand_skip: int = 0, seed: int | None = None, name: str = "",
                 kind: str = "Data", part: slice | None = None):
        if batch_size <= 0:
            raise ValueError(f"layer '{name}': batch_size must be positive")
        self.part = part   # this process's images of each batch (many processes: exdrop.engine.distributed)
        self.name, self.kind = name, kind
        self.batch_size = int(batch_size)
        self.phase = _phase(phase)
        self.shuffle = bool(shuffle)
        device = torch.device(device)
        self.device = device
        self.images = torch.as_tensor(images).to(device).contiguous()
        self.labels = torch.as_tensor(labels, dtype=torch.int64).to(device)
        if self.images.ndim != 4 or self.images.shape[0] != self.labels.shape[0] or self.images.shape[0] == 0:
            raise ValueError(f"layer '{name}': need images (N,C,H,W) with N>0 matching labels, "
                             f"got {tuple(self.images.shape)} and {tuple(self.labels.shape)}")
        self.n = int(self.images.shape[0])
        self.transformer = DataTransformer(transform_param, self.phase, tuple(self.images.shape[1:]), device, name)
        self.seed = int(torch.randint(0, 2 ** 62, (1,)).item()) if seed is None else int(seed)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(self.seed)
        self._ar_b = torch.arange(self.batch_size, device=device)
        self.cursor = 0
        self.epoch = 0
        self.order = None
        if self.shuffle:
            self._reshuffle()
        if rand_skip:   # Caffe: skip caffe_rng_rand() % rand_skip records at start
            skip = int(torch.randint(0, int(rand_skip), (1,), generator=self.gen, device=device).item())
            self.cursor = skip % self.n

    def __len__(self):
        return self.n

    def _reshuffle(self):
        self.order = torch.randperm(self.n, generator=self.gen, device=self.device)

    def top_shapes(self) -> list[tuple]:
        b = len(range(self.batch_size)[self.part]) if self.part is not None else self.batch_size
        return [(b,) + self.transformer.out_shape(), (b,)]

    def next_indices(self) -> torch.Tensor:
        b, n = self.batch_size, self.n
        if not self.shuffle:
            idx = (self._ar_b + self.cursor) % n
            self.epoch += (self.cursor + b) // n
            self.cursor = (self.cursor + b) % n
            return idx
        parts, need = [], b
        while need:
            take = min(need, n - self.cursor)
            parts.append(self.order[self.cursor:self.cursor + take])
            self.cursor += take
            need -= take
            if self.cursor == n:   # Caffe reshuffles right after the last item of an epoch
                self.cursor = 0
                self.epoch += 1
                self._reshuffle()
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def next_batch(self) -> list[torch.Tensor]:
        idx = self.next_indices()
        labels = self.labels[idx] if self.part is None else self.labels[idx[self.part]]
        return [self.transformer(self.images, idx, self.gen, self.part), labels]

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "epoch": self.epoch, "n": self.n, "seed": self.seed,
                "order": None if self.order is None else self.order.cpu(),
                "rng_state": self.gen.get_state(), "rng_device": self.device.type}

    def load_state_dict(self, st: dict):
        if int(st["n"]) != self.n:
            raise ValueError(f"layer '{self.name}': state is for {st['n']} records, the source has {self.n}")
        self.cursor, self.epoch = int(st["cursor"]), int(st.get("epoch", 0))
        if st.get("order") is not None:
            self.order = st["order"].to(self.device)
        restore_generator(self.gen, st, self.device, self.name, self.cursor, self.epoch)

    def to(self, device):
        device = torch.device(device)
        if device == self.device:
            return self
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        if self.order is not None:
            self.order = self.order.to(device)
        self.transformer.to(device)
        self._ar_b = self._ar_b.to(device)
        self.gen = move_generator(self.gen, self.device, device)
        self.device = device
        return self

    def __repr__(self):
        return (f"BatchSource({self.kind} '{self.name}', n={self.n}, batch={self.batch_size}, "
                f"top={self.top_shapes()[0]}, device={self.device})")


# ----------------------------------------------------------------------------------------------
# layer types
# ----------------------------------------------------------------------------------------------
def _load_lmdb(path: Path, tp, layer_name: str):
    db = open_shared(path)   # one LMDB environment per process, shared with the streams
    try:
        fc = bool(tp.force_color) if tp is not None else False
        fg = bool(tp.force_gray) if tp is not None else False
        return db.read_all(force_color=fc, force_gray=fg)
    finally:
        close_shared(db)


def read_list_entries(list_path, root_folder: str = "", layer_name: str = "", new_height: int = 0,
                      new_width: int = 0) -> list[tuple[str, int]]:
    """An ImageData list file (``path label`` per line) as [(root_folder + path, label)]."""
    if (new_height > 0) != (new_width > 0):
        raise ValueError(f"layer '{layer_name}': new_height and new_width must be set together")
    entries = []
    try:
        text = Path(list_path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"layer '{layer_name}': list file {list_path} is not UTF-8 text "
                         "(expected 'path label' lines)") from None
    for ln, line in enumerate(text.splitlines(), 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        pos = line.rfind(" ")
        label = line[pos + 1:].strip()
        if pos < 0 or not label.lstrip("-").isdigit():
            raise ValueError(f"layer '{layer_name}': {list_path}:{ln}: expected 'path label' with an integer "
                             f"label, got {line!r}")
        entries.append((root_folder + line[:pos], int(label)))
    if not entries:
        raise ValueError(f"layer '{layer_name}': list file {list_path} is empty")
    return entries


def load_image_list_data(list_path, root_folder: str = "", new_height: int = 0, new_width: int = 0,
                         is_color: bool = True, layer_name: str = ""):
    """Decode every image of an ImageData list (``path label``; path = root_folder + path, like
    Caffe) into one (N,C,H,W) uint8 array (BGR) + int64 labels."""
    import cv2
    entries = read_list_entries(list_path, root_folder, layer_name, new_height, new_width)
    flag = cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE

    def load(e):
        img = read_image(e[0], flag, f"{e[0]} (layer '{layer_name}', listed in {list_path})")
        if img is None:
            raise FileNotFoundError(f"layer '{layer_name}': could not load image {e[0]} (listed in {list_path})")
        if new_height > 0:
            img = cv2.resize(img, (new_width, new_height))
        return img

    chunks = [entries[i:i + 256] for i in range(0, len(entries), 256)]
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as ex:   # cv2 releases the GIL
        imgs = [im for part in ex.map(lambda ch: [load(e) for e in ch], chunks) for im in part]
    shape = imgs[0].shape
    for (p, _), im in zip(entries, imgs):
        if im.shape != shape:
            raise ValueError(f"layer '{layer_name}': image {p} is {im.shape[:2]}, the first is {shape[:2]}: "
                             f"set new_height/new_width")
    arr = np.stack(imgs)
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(arr), np.asarray([e[1] for e in entries], np.int64)
