"""The paper's analysis of trained nets (Secs. 4.3-4.4): how much of a layer a net uses
(Table 5, Figs. 4-5), how it survives switching units off (Fig. 7), and how calibrated it is.

The metrics are measured at one blob (default: the first fully connected layer, after its
in-place ReLU: the input of the dropout layer) over a test set, in test mode (every dropout
layer is the identity), with p_EB from the ground-truth class as in training. Per image, with
``a`` the blob's activations and ``p`` its p_EB, both ``(N,)`` over the N units (a
convolution blob's units are its channels, summed over space as for dropout at a conv layer)::

    neurons_on    = #{j : a_j > 0}                           # Neurons ON
    peak_peb      = max_j p_j                                 Peak p_EB
    entropy_act   = -sum_j q_j ln q_j,  q = a / sum(a)        Entropy of activations (nats)
    entropy_peb   = -sum_j q_j ln q_j,  q = p / sum(p)        Entropy of p_EB (nats)

each averaged over the images (0 ln 0 = 0; an image whose activations or p_EB are all zero
has entropy 0). Conservative filters (Ma et al. 2017): units whose incoming weight vector
(the producing InnerProduct / Convolution layer's row or filter, without the bias) moved less
than ``delta`` in L2 norm from the run's iteration-0 weights (:mod:`exdrop.run.init_weights`);
``delta`` per data set as in Table 5 (:data:`DELTA`).

Compression (Fig. 7): units of the blob are switched off (set to 0) at test time and the
rest of the net is run again: (a) the most relevant first, the fewest units of largest p_EB
whose p_EB sums to at least p_c, for p_c in 0, 0.05, ..., 0.95; (b) the least relevant first,
likewise from the smallest p_EB; (c) k units drawn at random per image, k = 0, 128, ..., N.
Recorded: the predicted probability of the ground-truth class and the accuracy, each mean over
the images (and the std over the images).

Calibration: the test NLL (the mean of -ln softmax of the ground truth), and the expected
calibration error over 15 equal-width confidence bins (top-1 confidence against top-1
accuracy), with the bins for a reliability diagram.

Functional core (tensors in, tensors out; tested on hand-made values)::

    neurons_on(a), peak(p), entropy(x)               (B, N) -> (B,)
    moved_norms(w0, w), conservative_units(w0, w, delta)
    relevance_keep_masks(p, thresholds, most_first)  (T, B, N) bool
    random_keep_masks(batch, n, ks, generator)       (K, B, N) bool
    calibration_bins(confidence, correct, bins)      counts, confidence sums, correct sums

Over a net: :func:`analyze` (one .caffemodel, one pass over the data), :func:`analyze_run`
(a run folder: its last snapshot in full, every snapshot on the first images for the curves
over training), :func:`exdrop.analysis.report.analyze_sweep` (every run of a sweep folder, then the tables and
figures of :mod:`exdrop.analysis.report`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exdrop.analysis import evaluate as ev
from exdrop.engine.backend import INIT_WEIGHTS
from exdrop.engine.functional import unit_saliency
from exdrop.engine.graph import last_writer
from exdrop.paper import DELTA, P_C  # noqa: F401 (re-exported: the analysis's defaults)
from exdrop.proto import io as cio
from exdrop.run.init_weights import INIT_RECORD, InitWeightsError, init_identity, iteration0_weights
from exdrop.run.runlog import plan_run_folder, read_results
# the per-image metrics and the meter of the training runs' test passes; re-exported here
from exdrop.engine.utilization import (METRICS, UtilizationMeter, default_blob, entropy, neurons_on, peak,  # noqa: F401
                                       utilization)

__all__ = ["neurons_on", "peak", "entropy", "utilization", "UtilizationMeter", "moved_norms", "conservative_units", "relevance_keep_masks",
           "random_keep_masks", "calibration_bins", "expected_calibration_error", "METRICS", "DELTA",
           "P_C", "analyze", "analyze_run", "default_blob", "run_snapshots"]

METRIC_TITLES = {"neurons_on": "# Neurons ON", "peak_peb": "Peak p_EB", "entropy_act": "Entropy of activations",
                 "entropy_peb": "Entropy of p_EB", "conservative": "Conservative filters",
                 "moved_median": "Median L2 distance of a unit's weights from their init"}
RANDOM_STEP = 128                                       # k = 0, 128, ..., N (Fig. 7, right)
ECE_BINS = 15
ANALYSIS = "analysis"                                   # RUN/analysis/
FORMAT = 1                                              # of analysis.json; a new one recomputes


def moved_norms(w0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """How far each unit's incoming weights moved: ``||w_k - w0_k||_2`` per output unit (row of an
    InnerProduct weight, filter of a Convolution weight)."""
    if w0.shape != w.shape:
        raise ValueError(f"initial weights {tuple(w0.shape)} and trained weights {tuple(w.shape)} differ in shape")
    return (w.double() - w0.double()).flatten(1).norm(dim=1)


def conservative_units(w0: torch.Tensor, w: torch.Tensor, delta: float) -> int:
    """Conservative filters (Ma et al. 2017): units whose weights moved less than ``delta``."""
    return int((moved_norms(w0, w) < delta).sum())


def relevance_keep_masks(p: torch.Tensor, thresholds, most_first: bool = True) -> torch.Tensor:
    """Keep masks ``(T, B, N)`` that switch off, per image, the fewest units taken in order of
    p_EB (largest first, or smallest first) whose p_EB sums to at least each threshold p_c
    (p_c = 0: none). A unit is off when the p_EB of the units before it sums to less than p_c."""
    p = unit_saliency(p).float()
    order = p.argsort(dim=1, descending=most_first)
    sorted_p = p.gather(1, order)
    before = sorted_p.cumsum(1) - sorted_p                     # the mass of the units ahead of each
    t = torch.as_tensor(list(thresholds), dtype=p.dtype, device=p.device).view(-1, 1, 1)
    off_sorted = before.unsqueeze(0) < t - 1e-7 * (t > 0)      # (T, B, N), in sorted order
    off_sorted &= t > 0
    off = torch.zeros_like(off_sorted)
    off.scatter_(2, order.unsqueeze(0).expand_as(off_sorted), off_sorted)
    return ~off


def random_keep_masks(batch: int, n: int, ks, generator: torch.Generator | None = None,
                      device=None) -> torch.Tensor:
    """Keep masks ``(K, B, N)``: for each k, k units off per image, drawn uniformly at random."""
    ranks = torch.rand(batch, n, generator=generator).argsort(1).argsort(1).to(device)  # a random rank per unit
    k = torch.as_tensor(list(ks), device=ranks.device).view(-1, 1, 1)
    return ranks.unsqueeze(0) >= k


def calibration_bins(confidence: torch.Tensor, correct: torch.Tensor, bins: int = ECE_BINS):
    """Per equal-width confidence bin ((i/bins, (i+1)/bins], the first closed): image count, sum of
    the confidences and of the correct predictions; numpy arrays."""
    idx = (confidence.float() * bins).ceil().long().clamp(1, bins) - 1
    count = torch.bincount(idx, minlength=bins)
    conf = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx.cpu(), confidence.double().cpu())
    acc = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx.cpu(), correct.double().cpu())
    return count.cpu().numpy(), conf.numpy(), acc.numpy()


def expected_calibration_error(count, conf_sum, correct_sum) -> float:
    """ECE = sum over bins of (n_b / n) |accuracy_b - confidence_b|."""
    count = np.asarray(count, float)
    n = count.sum()
    if n == 0:
        return float("nan")
    nz = count > 0
    return float(np.sum(np.abs(np.asarray(correct_sum)[nz] - np.asarray(conf_sum)[nz])) / n)


# ---------------------------------------------------------------------- over a net
def _producer(net, blob: str):
    """The learnable layer that writes ``blob`` first (InnerProduct / Convolution)."""
    for layer in net.layer_list:
        if blob in layer.lp.top and layer.type in ("InnerProduct", "Convolution"):
            return layer
    return None


def _last_writer(net, blob: str) -> int:
    i = last_writer([layer.lp.top for layer in net.layer_list], blob)
    if i is None:
        raise ValueError(f"{net.source}: no layer writes blob '{blob}' in the TEST net")
    return i


@dataclass
class _Head:
    """The layers after the last writer of the blob that the scores depend on, re-run on an edited blob."""
    net: object
    blob: str
    scores: str
    layers: list

    @classmethod
    def of(cls, net, blob, scores):
        return cls(net, blob, scores, net.head_layers(_last_writer(net, blob), scores))

    def __call__(self, blobs: dict, value: torch.Tensor) -> torch.Tensor:
        h = dict(blobs)
        h[self.blob] = value
        self.net.run(h, self.layers, head=True)
        return h[self.scores]


def _gt_prob(scores: torch.Tensor, labels: torch.Tensor, with_confidence: bool = False):
    """(probability of the ground truth, correct top-1[, top-1 confidence]), ``(B,)`` each."""
    probs = scores.flatten(1).float().softmax(1)
    top = probs.max(1)
    out = (probs.gather(1, labels.view(-1, 1)).squeeze(1), top.indices == labels)
    return (*out, top.values) if with_confidence else out


class _Sums:
    """Sums over images on the device (no host sync per batch): name -> tensor."""

    def __init__(self):
        self.sums, self.squares, self.n = {}, {}, 0

    def add(self, name: str, values: torch.Tensor):
        """``values``: (..., B), summed over the images (the last axis)."""
        v = values.double()
        s, q = v.sum(-1), (v * v).sum(-1)
        self.sums[name] = self.sums[name] + s if name in self.sums else s
        self.squares[name] = self.squares[name] + q if name in self.squares else q

    def mean_std(self, name):
        n = max(self.n, 1)
        m = self.sums[name] / n
        var = (self.squares[name] / n - m * m).clamp_min(0)
        return m.cpu().numpy(), var.sqrt().cpu().numpy()


def analyze(net_or_solver, weights, data=None, blob: str | None = None, init_weights=None, delta: float | None = None,
            images: int | None = None, compression: bool = True, device="cpu", seed: int = 0,
            progress: bool = False) -> dict:
    """One pass over the test data with ``weights``: the utilization metrics, calibration and
    (``compression``) the Fig. 7 curves at ``blob``. ``images``: the first N images only (all by
    default). ``init_weights`` (+ ``delta``): the conservative filters. JSON-ready dict."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such .caffemodel")
    tn = ev.load_test_net(net_or_solver)
    lp = ev._test_data_layer(tn)
    score = ev._scoring(tn)
    if data is not None:
        lmdb, _ = ev.resolve_data(data)
        ev.set_data_source(lp, lmdb)
    else:
        lmdb = ev._check_source(tn, lp)
    if lp.type == "Data":
        lp.data_param.rand_skip = 0
    records = ev._record_count(lp)
    if not records:
        raise ValueError(f"{tn.source}: TEST data layer '{lp.name}' reads {lmdb}, which holds no images")
    total = min(records, images) if images else records
    batch = ev._batch_size(lp)
    sizes = [batch] * (total // batch) + ([total % batch] if total % batch else [])
    net = ev.engine_test_net(tn, weights, device)
    dev = net.device
    blob = blob or default_blob(tn.param)
    if blob not in net.blob_shapes:
        raise ValueError(f"{tn.source}: no blob '{blob}' in the TEST net (blobs: {', '.join(net.blob_shapes)})")
    if len(net.blob_shapes[blob]) < 2:
        raise ValueError(f"{tn.source}: blob '{blob}' has shape {tuple(net.blob_shapes[blob])}: not a layer of units "
                         "(batch, units, ...)")
    head = _Head.of(net, blob, score.scores)
    n_units = int(net.blob_shapes[blob][1])
    ks = list(range(0, n_units, RANDOM_STEP)) + [n_units]
    gen = torch.Generator().manual_seed(seed)
    src = net.sources[lp.name]
    sums = _Sums()
    bins = [np.zeros(ECE_BINS, np.int64), np.zeros(ECE_BINS), np.zeros(ECE_BINS)]
    t0 = time.perf_counter()
    bar = ev._progress(progress, len(sizes))
    with torch.no_grad():
        for n in sizes:
            if n == src.batch_size:
                blobs = net.forward(record=True)
            else:
                x, y = src.next_batch()
                blobs = net.forward({lp.top[0]: x[:n], lp.top[1]: y[:n]}, record=True)
            labels = blobs[score.label].reshape(-1).long()
            a = blobs[blob].float()
            p = net.excitation(blob, score.scores)
            sums.n += n
            sums.add("neurons_on", neurons_on(a))
            sums.add("peak_peb", peak(p))
            sums.add("entropy_act", entropy(a))
            sums.add("entropy_peb", entropy(p))
            sums.add("peb_mass", unit_saliency(p).sum(1))
            prob, correct, conf = _gt_prob(blobs[score.scores], labels, with_confidence=True)
            sums.add("nll", -prob.clamp_min(torch.finfo(torch.float32).tiny).log())
            for acc, new in zip(bins, calibration_bins(conf, correct)):
                acc += new
            sums.add("accuracy", correct.float())
            if compression:
                masks = {"most": relevance_keep_masks(p, P_C, True), "least": relevance_keep_masks(p, P_C, False),
                         "random": random_keep_masks(n, n_units, ks, gen, a.device)}
                shape = (1, n, n_units) + (1,) * (a.dim() - 2)
                for mode, keep in masks.items():
                    probs, hits = [], []
                    for m in keep:   # one re-run of the head per setting (a few fc layers)
                        pr, c = _gt_prob(head(blobs, a * m.view(shape[1:]).to(a.dtype)), labels)
                        probs.append(pr)
                        hits.append(c.float())
                    sums.add(f"gt_prob_{mode}", torch.stack(probs))
                    sums.add(f"accuracy_{mode}", torch.stack(hits))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    out = {"weights": str(weights), "net": tn.source, "data": str(lmdb), "blob": blob, "units": n_units,
           "images": int(sum(sizes)), "seconds": None, "device": str(dev)}
    for name in (*METRICS, "peb_mass", "accuracy", "nll"):
        m, s = sums.mean_std(name)
        out[name], out[name + "_std_images"] = float(m), float(s)
    out["ece"] = expected_calibration_error(*bins)
    out["reliability"] = {"bins": ECE_BINS, "count": bins[0].tolist(),
                          "confidence": [float(c / k) if k else None for c, k in zip(bins[1], bins[0])],
                          "accuracy": [float(c / k) if k else None for c, k in zip(bins[2], bins[0])]}
    if init_weights is not None:
        out.update(conservative(net, blob, init_weights, delta))
    if compression:
        comp = {"most": {"x": list(P_C), "x_label": "p_c"}, "least": {"x": list(P_C), "x_label": "p_c"},
                "random": {"x": ks, "x_label": "k units"}}
        for mode in comp:
            for what in ("gt_prob", "accuracy"):
                m, s = sums.mean_std(f"{what}_{mode}")
                comp[mode][what], comp[mode][what + "_std_images"] = m.tolist(), s.tolist()
        out["compression"] = comp
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def conservative(net, blob: str, init_weights, delta: float | None) -> dict:
    """Moved norms of the units of ``blob`` from ``init_weights`` to the net's weights."""
    layer = _producer(net, blob)
    if layer is None:
        raise ValueError(f"{net.source}: blob '{blob}' is not written by an InnerProduct or Convolution layer: "
                         "no incoming weights to compare")
    init = cio.read_caffemodel(init_weights)
    src = next((lp for lp in (init.layer if len(init.layer) else init.layers) if lp.name == layer.name), None)
    if src is None or not len(src.blobs):
        raise ValueError(f"{init_weights}: no weights for layer '{layer.name}'")
    w = layer.blobs[0].detach().float().cpu()
    w0 = torch.as_tensor(np.asarray(src.blobs[0].data, np.float32)).view(w.shape)
    moved = moved_norms(w0, w)
    res = {"init_weights": str(init_weights), "moved_median": float(moved.quantile(0.5)),
           "moved_quantiles": {q: float(moved.quantile(float(q))) for q in ("0.05", "0.25", "0.75", "0.95")}}
    if delta is not None:
        res["delta"] = delta
        res["conservative"] = int((moved < delta).sum())
    return res


# ---------------------------------------------------------------------- run folders
_ITER = re.compile(r"_iter_(\d+)\.caffemodel$")


def _dataset_of(run) -> str | None:
    """A run outside a sweep: the data set its net's path names (``prototxt/cnn2/cifar10/...``), if one
    with a Table 5 Delta."""
    parts = Path(str(read_results(run).get("net") or "")).parts
    return next((p for p in reversed(parts) if p in DELTA), None)


class NoSnapshots(FileNotFoundError):
    """A run folder without trained weights (a clone holds only a run's small files)."""


def run_snapshots_trained(run) -> bool:
    """Whether ``run`` holds a trained snapshot (``snapshots/*.caffemodel``)."""
    return bool(run_snapshots(run))


def run_snapshots(run) -> list[tuple[int, Path]]:
    """(iteration, .caffemodel) of every snapshot a run kept, by iteration."""
    run = Path(run)
    found = []
    for path in (run / "snapshots").glob("*.caffemodel"):
        m = _ITER.search(path.name)
        if m:
            found.append((int(m.group(1)), path))
    return sorted(set(found))


def run_info(run) -> dict:
    """What the sweep knows of a run (dataset, method, rate, seed, budget) from the nearest plan.json."""
    run = Path(run).resolve()
    for folder in run.parents:
        plan = folder / "plan.json"
        if plan.is_file():
            try:
                doc = json.loads(plan.read_text())
            except ValueError:
                break
            for r in doc.get("runs", []):
                if plan_run_folder(folder, r).resolve() == run:
                    return {**{k: r.get(k) for k in ("dataset", "method", "rate", "seed")},
                            "budget": doc.get("budget")}
            break
    return {}


def analyze_run(run, data=None, blob: str | None = None, delta: float | None = None, over_training: bool = True,
                training_images: int = 1000, device="cpu", force: bool = False, progress: bool = False,
                echo=print) -> dict:
    """``RUN/analysis/analysis.json``: the last snapshot over the whole test set (metrics,
    calibration, compression, conservative filters) and, with ``over_training``, every kept
    snapshot on the first ``training_images`` images (Figs. 4-5). Reused when its inputs (the
    snapshots, data, blob, delta) are unchanged, unless ``force``."""
    run = Path(run)
    solver = run / "solver.prototxt"
    if not solver.is_file():
        raise FileNotFoundError(f"{run}: not a run folder (no solver.prototxt; `exdrop train` writes one)")
    trained = run_snapshots(run)
    out_path = run / ANALYSIS / "analysis.json"
    if not trained and out_path.is_file() and not force:
        # a run committed without its snapshots (a sweep's small files): its analysis as it was made
        try:
            kept = json.loads(out_path.read_text())
        except ValueError as exc:
            raise ValueError(f"{out_path}: not JSON ({exc}); without snapshots it cannot be made again") from None
        if isinstance(kept, dict) and "final" in kept:
            echo(f"analyze: {run}: no snapshots here; the analysis kept in {out_path} is used as it is")
            return kept
    if not trained:
        raise NoSnapshots(f"{run}: no snapshot in {run / 'snapshots'} to analyse")
    info = run_info(run)
    if delta is None:
        delta = DELTA.get(info.get("dataset") or _dataset_of(run) or "")
    try:
        init_id, init_note = init_identity(run), None
    except InitWeightsError as exc:
        init_id, init_note = None, str(exc)
    common = {"format": FORMAT, "data": str(data) if data else None, "blob": blob, "delta": delta}
    last_it, last = trained[-1]
    key_final = {**common, "weights": [str(last), last.stat().st_mtime_ns], "init": init_id}
    key_over = {**common, "snapshots": [[0, "iteration 0", init_id]] * bool(init_id)
                + [[it, str(p), p.stat().st_mtime_ns] for it, p in trained], "images": training_images}
    old = {}
    if out_path.is_file() and not force:
        try:
            old = json.loads(out_path.read_text())
        except ValueError:
            old = {}
        old = old if isinstance(old, dict) else {}   # a damaged cache is recomputed
    final_done = old.get("key_final") == key_final
    over_done = old.get("key_over") == key_over
    if final_done and (over_done or not over_training):
        return old
    result = {"run": str(run), **info, "iteration": last_it}
    with contextlib.ExitStack() as stack:
        init = None
        if init_id is not None:   # the kept init.caffemodel, or one drawn again from init.json
            try:
                init = stack.enter_context(iteration0_weights(run))
            except InitWeightsError as exc:
                init_note = str(exc)
                key_final["init"] = None   # tried again next time
                key_over["snapshots"] = key_over["snapshots"][1:]
        snaps = [(0, init)] * bool(init) + trained
        if final_done:
            result.update(key_final=key_final, final=old["final"])
        else:
            echo(f"analyze: {run}: iteration {last_it}, every test image")
            final = analyze(solver, last, data, blob, init, delta, device=device, progress=progress)
            if init is None:
                final["conservative_note"] = (f"no conservative filters: {init_note}" if init_note else
                                              f"{run} has neither init.json nor init.caffemodel (runs from before "
                                              "the iteration-0 weights were recorded): no conservative filters")
            else:
                final["init_weights"] = str(run / INIT_WEIGHTS) if init.parent == run else \
                    f"drawn again from {run / INIT_RECORD} (sha256 {init_id[:12]}...)"
                if delta is None:
                    final["conservative_note"] = ("no conservative filters: Table 5's Delta is per data set "
                                                  f"({', '.join(f'{d} {v:g}' for d, v in DELTA.items())}) and this "
                                                  "run's data set is not known: give --delta")
            result.update(key_final=key_final, final=final)
        if over_done:
            result.update(key_over=key_over, over_training=old["over_training"])
        elif over_training:
            echo(f"analyze: {run}: {len(snaps)} snapshots over training, {training_images} images each")
            rows = []
            for it, path in snaps:
                r = analyze(solver, path, data, blob, init, delta, images=training_images, compression=False,
                            device=device)
                rows.append({"iter": it, **{k: r.get(k) for k in (*METRICS, "accuracy", "nll", "ece", "conservative")}})
            result.update(key_over=key_over, over_training={"images": training_images, "rows": rows})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out_path)
    return result
