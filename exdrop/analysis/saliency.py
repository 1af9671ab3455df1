"""Fig. 6: Excitation Backprop saliency maps at a convolution blob while the k most relevant
units of the dropout blob (highest p_EB, from the intact net) are switched off at test time.

    maps(net, x, y, units_blob, conv_blob, ks, contrastive) -> (K, B, H, W) maps, (B,) GT prob per k
    figure(runs, images, ks, ...) -> PNG: a row per run and image (the image, then one map per k),
                                     and the histograms of the first and last maps

A map is the conv blob's p_EB summed over channels, upsampled to the image (bilinear) and
drawn over it; every map of a row shares one colour scale, so a fading map reads as lost
evidence. The image is the TEST data layer's input (scale and mean values undone; BGR shown as
RGB).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from exdrop.analysis import evaluate as ev
from exdrop.analysis.analyze import _gt_prob, default_blob, run_info, run_snapshots
from exdrop.engine.functional import unit_saliency
from exdrop.experiments.sweep import METHOD_LABELS
from exdrop.run.plot import _pyplot

__all__ = ["maps", "figure", "default_conv_blob"]

MIN_SIDE = 8   # the default conv blob: the last Convolution top at least this many pixels on a side


def default_conv_blob(net) -> str:
    """The last Convolution top at least MIN_SIDE on a side; else the last of the largest."""
    convs = [(min(net.blob_shapes[layer.lp.top[0]][2:]), layer.lp.top[0]) for layer in net.layer_list
             if layer.type == "Convolution"]
    if not convs:
        raise ValueError(f"{net.source}: no Convolution layer; name the blob of the maps (--blob)")
    big = [name for side, name in convs if side >= MIN_SIDE]
    if big:
        return big[-1]
    largest = max(side for side, _ in convs)
    return [name for side, name in convs if side == largest][-1]


@torch.no_grad()
def maps(net, feed: dict, units_blob: str, conv_blob: str, ks, scores: str, label: str, contrastive=False):
    """Saliency at ``conv_blob`` with the ``k`` highest-p_EB units of ``units_blob`` off, for each k."""
    net.forward(feed, record=True)
    p = unit_saliency(net.excitation(units_blob, scores))
    order = p.argsort(1, descending=True)
    out, probs = [], []
    for k in ks:
        keep = torch.ones_like(p, dtype=torch.bool)
        keep.scatter_(1, order[:, :k], False)

        def switch_off(t, keep=keep):
            return t * keep.view(keep.shape + (1,) * (t.dim() - 2)).to(t.dtype)
        blobs = net.forward(feed, record=True, edit={units_blob: switch_off})
        m = net.excitation(conv_blob, scores, contrastive=contrastive)
        out.append(m.sum(1))
        probs.append(_gt_prob(blobs[scores], blobs[label].reshape(-1).long())[0])
    return torch.stack(out), torch.stack(probs)


def _images(net, lp, indices):
    """The TEST data layer's (transformed) images and labels at ``indices`` (record order)."""
    src = net.sources[lp.name]
    try:
        total = len(src)
    except TypeError:
        total = None
    beyond = [i for i in indices if i < 0 or (total is not None and i >= total)]
    if beyond:
        raise ValueError(f"{net.source}: --images {','.join(map(str, beyond))}: the test data of layer '{lp.name}' "
                         f"holds {total} images (indices 0 to {total - 1})")
    need, xs, ys, seen = set(indices), {}, {}, 0
    while need:
        x, y = src.next_batch()
        for i in range(x.shape[0]):
            if seen + i in need:
                xs[seen + i], ys[seen + i] = x[i], y[i]
                need.discard(seen + i)
        seen += x.shape[0]
        if seen > 10 ** 7:
            raise ValueError("image index beyond the data")
    return torch.stack([xs[i] for i in indices]), torch.stack([ys[i] for i in indices])


def _display(x: torch.Tensor, lp) -> np.ndarray:
    """An image of the data layer's input, for display: the mean values added back, BGR -> RGB, 0..1."""
    img = x.float().cpu().numpy().transpose(1, 2, 0)
    tp = lp.transform_param   # Caffe: (pixel - mean) * scale
    if tp.HasField("scale") and tp.scale:
        img = img / tp.scale
    if len(tp.mean_value):
        img = img + np.resize(np.asarray(tp.mean_value, np.float32), img.shape[2])
    img = img[..., ::-1] if img.shape[2] == 3 else img[..., :1].repeat(3, 2)
    lo, hi = img.min(), img.max()
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


DEFAULT_KS = (0, 100, 200, 300, 400, 500)   # the paper's Fig. 6 columns


def figure(runs, images, ks=None, blob=None, units_blob=None, data=None,
           contrastive=False, out="saliency.png", device="cpu") -> Path:
    """Fig. 6 for the last snapshot of each run folder. ``ks`` (default: the paper's 0, 100, ..., 500,
    scaled down to a blob of fewer than 500 units)."""
    given_ks = ks
    plt = _pyplot()
    rows = []
    for run in runs:
        run = Path(run)
        snaps = [p for it, p in run_snapshots(run) if p.parent.name == "snapshots"]
        if not snaps:
            raise FileNotFoundError(f"{run}: no snapshot to draw saliency from")
        tn = ev.load_test_net(run / "solver.prototxt")
        lp = ev._test_data_layer(tn)
        score = ev._scoring(tn)
        if data is not None:
            ev.set_data_source(lp, ev.resolve_data(data)[0])
        if lp.type == "Data":
            lp.data_param.rand_skip = 0
        net = ev.engine_test_net(tn, snaps[-1], device)
        units = units_blob or default_blob(tn.param)
        conv = blob or default_conv_blob(net)
        for what, name in (("--blob", conv), ("the units blob", units)):
            if name not in net.blob_shapes:
                raise ValueError(f"{net.source}: {what} '{name}': no such blob in the test net "
                                 f"(blobs: {', '.join(net.blob_shapes)})")
        width = net.blob_shapes[units][1]
        if given_ks is None:
            step = max(1, min(DEFAULT_KS[-1], width) // (len(DEFAULT_KS) - 1))
            ks = [i * step for i in range(len(DEFAULT_KS))]
        if max(ks) > width:
            raise ValueError(f"{net.source}: --k {max(ks)}: blob '{units}' has {width} units to switch off")
        x, y = _images(net, lp, list(images))
        m, probs = maps(net, {lp.top[0]: x, lp.top[1]: y}, units, conv, list(ks), score.scores, score.label,
                        contrastive)
        m = F.interpolate(m.float().transpose(0, 1), size=x.shape[2:], mode="bilinear", align_corners=False)
        label = METHOD_LABELS.get(run_info(run).get("method"), f"{run.parent.name}/{run.name}")
        for b, i in enumerate(images):
            rows.append((label, i, _display(x[b], lp), m[b].cpu().numpy(), probs[:, b].cpu().numpy(), int(y[b])))
    cols = len(ks) + 3
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.9 * cols, 2.0 * len(rows)), squeeze=False)
    for r, (label, i, img, ms, probs, cls) in enumerate(rows):
        ax = axes[r]
        ax[0].imshow(img)
        ax[0].set_ylabel(f"{label}\nimage {i} (class {cls})", fontsize=7)
        vmax = float(ms.max()) or 1.0
        for c, k in enumerate(ks):
            ax[c + 1].imshow(img)
            ax[c + 1].imshow(ms[c], cmap="jet", alpha=0.5, vmin=0, vmax=vmax)
            ax[c + 1].set_title(f"k={k}: p(GT) {probs[c]:.2f}", fontsize=7)
        for c, which in ((len(ks) + 1, 0), (len(ks) + 2, -1)):
            ax[c].hist(ms[which].ravel() / vmax, bins=30, range=(0, 1), color="tab:purple")
            ax[c].set_title(f"histogram, k={ks[which]}", fontsize=7)
            ax[c].tick_params(labelsize=6)
        for a in ax[:len(ks) + 1]:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(f"Fig. 6: {'contrastive ' if contrastive else ''}EB saliency at '{conv}' with the k most relevant "
                 f"units of '{units}' switched off", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
