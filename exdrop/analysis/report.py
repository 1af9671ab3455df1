"""A sweep's analysis as the paper lays it out: Table 5, Figs. 4-5 (metrics over training),
Fig. 7 (compression), calibration, and one report page (HTML with every figure embedded, and
Markdown).

    analyze_sweep(sweep, methods, ...) -> summary   every run's RUN/analysis/analysis.json, then
                                                    the summary (analysis.json in the sweep folder)
    table5_markdown(summary), calibration_markdown(summary)
    plot_fig7(summary, dataset, path), plot_over_training(summary, dataset, path),
    plot_reliability(summary, dataset, path), plot_fig2(path, n, base_retain)
    write_report(sweep, out) -> (report.html, report.md)

Mean +- std are over the runs (seeds) of a method; with one seed the std is over the test
images (said so where it is shown).
"""
from __future__ import annotations

import base64
import html
import json
import sys
import warnings
from pathlib import Path

import numpy as np

from exdrop import paper
from exdrop.analysis.analyze import (ANALYSIS, METRIC_TITLES, METRICS, NoSnapshots, analyze_run, run_info,
                                    run_snapshots_trained)
from exdrop.analysis.saliency import figure
from exdrop.engine.functional import retain_probability
from exdrop.experiments.sweep import METHOD_LABELS, METHODS, collect, table_markdown, _budget_line
from exdrop.experiments.sweep import plot_fig3
from exdrop.run.plot import _pyplot
from exdrop.run.plot import read_log
from exdrop.run.runlog import plan_run_folder, read_results

# Table 5 and Fig. 7 compare these (the paper: Standard, Curriculum, Excitation; the issue adds none)
TABLE5_METHODS = ("none", "standard_fc1", "curriculum", "ed")
TABLE5_ROWS = (*METRICS, "conservative", "moved_median")   # the last: not in the paper, the scale of Delta

COLORS = {"none": "tab:gray", "standard_fc1": "tab:blue", "standard_both": "tab:cyan", "maskimg": "tab:olive",
          "curriculum": "tab:green", "adaptive": "tab:brown", "information": "tab:pink", "activation": "tab:orange",
          "ed": "tab:purple"}   # the paper draws Excitation Dropout in purple


# ---------------------------------------------------------------------- the sweep's analysis
def analyze_sweep(sweep, methods=TABLE5_METHODS, data=None, blob=None, over_training=True, training_images=1000,
                  device="cpu", force=False, echo=print) -> dict:
    """Analyse every finished run of ``methods`` in the sweep folder; the summary, also written as
    ``<sweep>/analysis.json``."""
    sweep = Path(sweep)
    plan = sweep / "plan.json"
    if not plan.is_file():
        raise FileNotFoundError(f"{sweep}: not a sweep folder (no plan.json; `exdrop sweep` writes one)")
    try:
        doc = json.loads(plan.read_text())
        runs = [r for r in doc["runs"] if r["method"] in methods]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{plan}: not a sweep plan ({type(exc).__name__}: {exc}); `exdrop sweep` writes it") from None
    if not runs:
        raise ValueError(f"{sweep}: no run of the methods {', '.join(methods)} in plan.json")
    cells: dict = {}
    skipped, without_weights = [], []
    for r in runs:
        folder = plan_run_folder(sweep, r)
        res = folder / "results.json"
        if not res.is_file() or json.loads(res.read_text()).get("status") != "finished":
            skipped.append(str(folder))
            continue
        try:
            a = analyze_run(folder, data=(data or {}).get(r["dataset"]) if isinstance(data, dict) else data,
                            blob=blob, over_training=over_training, training_images=training_images, device=device,
                            force=force, echo=echo)
        except NoSnapshots:
            without_weights.append(str(folder))
            continue
        cells.setdefault((cell_dataset(r), r["method"], r["rate"]), []).append(a)
    if skipped:
        echo(f"analyze: {len(skipped)} run(s) not finished, left out: {', '.join(skipped)}")
    if without_weights:
        echo(f"analyze: {len(without_weights)} finished run(s) have neither snapshots nor a kept analysis here (a "
             f"clone holds only their small files), left out: {', '.join(without_weights)}")
    if not cells:
        raise FileNotFoundError(f"{sweep}: no finished run of {', '.join(methods)} has snapshots or a kept analysis")
    summary = {"budget": doc["budget"], "reduced": doc["budget"].get("reduced", True), "sweep": str(sweep),
               "left_out_without_weights": without_weights,
               "methods": [m for m in METHODS if any(k[1] == m for k in cells)],
               "cells": [summarize_cell(d, m, rate, runs) for (d, m, rate), runs in sorted(cells.items())]}
    (sweep / "analysis.json").write_text(json.dumps(summary, indent=1))
    return summary


def cell_dataset(run: dict) -> str:
    """A plan entry's data set as the analysis groups it: CNN-2's data set, or ``ucf101-vgg16`` for
    a fine-tuned net (the nets of one data set are separate cells)."""
    net = run.get("net", "cnn2")
    return run["dataset"] if net == "cnn2" else f"{run['dataset']}-{net}"


def _mean_std(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def summarize_cell(dataset, method, rate, runs) -> dict:
    finals = [r["final"] for r in runs]
    cell = {"dataset": dataset, "method": method, "rate": rate, "seeds": len(runs),
            "runs": [r["run"] for r in runs], "delta": finals[0].get("delta"), "blob": finals[0]["blob"],
            "units": finals[0]["units"], "images": finals[0]["images"]}
    for key in (*METRICS, "conservative", "moved_median", "accuracy", "nll", "ece", "peb_mass"):
        m, s = _mean_std([f.get(key) for f in finals])
        cell[key] = {"mean": m, "std": s,
                     "std_images": finals[0].get(key + "_std_images") if len(finals) == 1 else None}
    comp = {}
    for mode in ("most", "least", "random"):
        c0 = finals[0]["compression"][mode]
        entry = {"x": c0["x"], "x_label": c0["x_label"]}
        for what in ("gt_prob", "accuracy"):
            ys = np.array([f["compression"][mode][what] for f in finals])
            entry[what] = ys.mean(0).tolist()
            entry[what + "_std_models"] = ys.std(0, ddof=1).tolist() if len(finals) > 1 else None
            entry[what + "_std_images"] = (np.mean([f["compression"][mode][what + "_std_images"] for f in finals], 0)
                                           .tolist())
        comp[mode] = entry
    cell["compression"] = comp
    # the bins' sums over the runs, back from each run's per-bin means (None: an empty bin)
    count = np.array([f["reliability"]["count"] for f in finals], float)
    conf, acc = (np.nansum(np.array([f["reliability"][k] for f in finals], float) * count, 0)
                 for k in ("confidence", "accuracy"))
    rel = count.sum(0)
    cell["reliability"] = {"count": rel.astype(int).tolist(),
                           "confidence": [float(c / n) if n else None for c, n in zip(conf, rel)],
                           "accuracy": [float(a / n) if n else None for a, n in zip(acc, rel)]}
    curves = [r.get("over_training") for r in runs if r.get("over_training")]
    if curves:
        iters = sorted(set.intersection(*({row["iter"] for row in c["rows"]} for c in curves)))
        entry = {"iter": iters, "images": curves[0]["images"]}
        for key in (*METRICS, "accuracy", "conservative"):
            ys = np.array([[next(r[key] for r in c["rows"] if r["iter"] == it) if key in c["rows"][0] else np.nan
                            for it in iters] for c in curves], dtype=float)
            with warnings.catch_warnings():   # a metric the runs did not measure (no Delta): NaN, said once
                warnings.simplefilter("ignore", RuntimeWarning)
                entry[key] = np.nanmean(ys, 0).tolist() if ys.size else []
                entry[key + "_std"] = np.nanstd(ys, 0, ddof=1).tolist() if len(curves) > 1 else None
        cell["over_training"] = entry
    return cell


# ---------------------------------------------------------------------- tables
def _fmt(v, key):
    if v is None:
        return "-"
    if key == "peak_peb":
        return f"{v:.4f}"
    if key in ("neurons_on", "conservative"):
        return f"{v:.0f}"
    if key == "moved_median":
        return f"{v:.3f}"
    return f"{v:.2f}"


def _cell_text(stat, key, paper=None):
    if stat["mean"] is None:
        text = "-"
    else:
        text = _fmt(stat["mean"], key)
        if stat["std"] is not None:
            text += f" +- {_fmt(stat['std'], key)}"
        elif stat.get("std_images") is not None and key not in ("conservative", "moved_median"):
            text += f" (images: +- {_fmt(stat['std_images'], key)})"
    if paper:
        text += f" [{_fmt(paper[0], key)} +- {_fmt(paper[1], key)}]"
    return text


def table5_markdown(summary: dict) -> str:
    """Table 5: a row per data set and metric, a column per method; the paper's numbers in brackets."""
    cells = {(c["dataset"], c["method"]): c for c in summary["cells"] if c["rate"] == 0.5}
    methods = [m for m in TABLE5_METHODS if any(k[1] == m for k in cells)] + \
              [m for m in summary["methods"] if m not in TABLE5_METHODS]
    datasets = sorted({d for d, _ in cells})
    seeds = sorted({c["seeds"] for c in cells.values()})
    lines = [_budget_line(summary), "",
             f"Measured at the first fc layer's output (blob `{next(iter(cells.values()))['blob']}`, "
             "after its ReLU), over the held-out test images, guided layers off; entropies in nats; "
             + ("mean +- std over seeds" if seeds != [1] else "one seed: the +- in parentheses is the std over "
                "the test images") + "; the paper's figure (five models, full protocol) in [brackets].", "",
             "| Dataset | Metric | " + " | ".join(METHOD_LABELS.get(m, m) for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for d in datasets:
        delta = next((c["delta"] for (dd, _), c in cells.items() if dd == d), None)
        for key in TABLE5_ROWS:
            title = METRIC_TITLES[key] + (f" (Delta = {delta:g})" if key == "conservative" and delta else "")
            row = []
            for m in methods:
                c = cells.get((d, m))
                printed = paper.TABLE5.get(paper.TABLE5_NETS.get(d, d), {}).get(key, {}).get(m)
                row.append(_cell_text(c[key], key, printed) if c else "")
            lines.append(f"| {d} | {title} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def calibration_markdown(summary: dict) -> str:
    order = {m: i for i, m in enumerate(METHODS)}
    cells = sorted((c for c in summary["cells"] if c["rate"] == 0.5), key=lambda c: (c["dataset"], order.get(c["method"], len(order))))

    def cell(stat, scale=1.0, digits=2):
        if stat["mean"] is None:
            return "-"
        text = f"{stat['mean'] * scale:.{digits}f}"
        return text + (f" +- {stat['std'] * scale:.{digits}f}" if stat["std"] is not None else "")
    lines = ["Calibration on the held-out test images: accuracy, test NLL (nats, the mean of -ln p(ground truth)) "
             "and the expected calibration error (15 equal-width confidence bins), mean +- std over seeds.", "",
             "| Dataset | Method | Accuracy (%) | NLL | ECE |", "|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['dataset']} | {METHOD_LABELS.get(c['method'], c['method'])} | {cell(c['accuracy'], 100)} | "
                     f"{cell(c['nll'])} | {cell(c['ece'], digits=3)} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- figures
def _band(ax, x, mean, std, method, label, alpha=0.18, marker=None):
    mean = np.asarray(mean, float)
    line, = ax.plot(x, mean, color=COLORS.get(method), lw=2.2 if method == "ed" else 1.4, label=label,
                    marker=marker, ms=4)
    if std is not None:
        std = np.asarray(std, float)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=alpha, lw=0)


def _title(summary, text):
    b = summary["budget"]
    return f"{text} ({'reduced budget ' if summary['reduced'] else ''}'{b['name']}')"


def plot_fig7(summary: dict, dataset: str, path, what: str = "gt_prob") -> Path:
    """Fig. 7: the ground-truth probability (or accuracy) as units are switched off: most relevant
    first, least relevant first, random; mean curve and std band per method."""
    plt = _pyplot()
    cells = [c for c in summary["cells"] if c["dataset"] == dataset and c["rate"] == 0.5]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    titles = {"most": "most relevant first", "least": "least relevant first", "random": "random units"}
    band_over = "models"
    for ax, mode in zip(axes, ("most", "least", "random")):
        for c in cells:
            e = c["compression"][mode]
            std, alpha = e.get(what + "_std_models"), 0.18
            if std is None:   # one model: the spread over the images, wide, so drawn fainter
                std, alpha, band_over = e.get(what + "_std_images"), 0.07, "images (one model)"
            _band(ax, e["x"], e[what], std, c["method"], f"{METHOD_LABELS.get(c['method'], c['method'])} (n={c['seeds']})", alpha)
        ax.set_title(titles[mode], fontsize=10)
        ax.set_xlabel("p_c (cumulative p_EB switched off)" if mode != "random" else "k units switched off")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("predicted GT probability" if what == "gt_prob" else "accuracy")
    axes[-1].legend(fontsize=8)
    fig.suptitle(_title(summary, f"Fig. 7, {dataset}: CNN-2 units of '{cells[0]['blob']}' switched off at test "
                                 f"time; band: std over {band_over}") if cells else dataset, fontsize=10)
    return _save(fig, plt, path)


def plot_over_training(summary: dict, dataset: str, path) -> Path:
    """Figs. 4-5: # Neurons ON, Peak p_EB, the two entropies over training iterations per method."""
    plt = _pyplot()
    cells = [c for c in summary["cells"] if c["dataset"] == dataset and c["rate"] == 0.5 and c.get("over_training")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, key in zip(axes, METRICS):
        for c in cells:
            e = c["over_training"]
            _band(ax, e["iter"], e[key], e.get(key + "_std"), c["method"], f"{METHOD_LABELS.get(c['method'], c['method'])} (n={c['seeds']})")
        ax.set_title(METRIC_TITLES[key], fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    if cells:
        axes[0].legend(fontsize=8)
        images = cells[0]["over_training"]["images"]
        fig.suptitle(_title(summary, f"Figs. 4-5, {dataset}: utilization of '{cells[0]['blob']}' over training, from "
                                     f"each kept snapshot on the first {images} test images"), fontsize=10)
    return _save(fig, plt, path)


def run_variant(run) -> str:
    """What a run trained, to group runs by: the sweep's method (plan.json), else the variant its files
    name (``train_val_<v>.prototxt``, ``solver_<v>.prototxt``, the snapshot prefix), else the folder's
    own name. Never the parent folder's name (every ``OUT=models/...`` run would be "models")."""
    method = run_info(run).get("method")
    if method:
        return method
    res = read_results(run)
    for key, prefix in (("net", "train_val_"), ("solver", "solver_")):
        stem = Path(str(res.get(key) or "")).stem
        if stem.startswith(prefix):
            return stem.removeprefix(prefix)
    snapshot = Path(str(res.get("snapshot") or "")).name
    if "_iter_" in snapshot:
        return snapshot.rsplit("_iter_", 1)[0]
    return Path(run).resolve().name


def plot_logged_utilization(runs, path, warn=None) -> Path:
    """Figs. 4-5 from the runs' own log.csv (the trainer's utilization columns at each test point):
    runs of one method or variant (:func:`run_variant`) give one mean curve with a std band over the
    test points they share; a group whose runs share no test point is drawn run by run, with a warning."""
    warn = warn or (lambda text: print(f"exdrop: warning: {text}", file=sys.stderr))
    plt = _pyplot()
    groups: dict = {}
    for run in runs:
        tests = read_log(run)["test"]
        if not any(v.get("neurons_on") is not None for _, v in tests):
            raise ValueError(f"{run}: log.csv has no utilization columns (runs log them with --utilization, the "
                             "default since this release; for older runs: exdrop analyze RUN)")
        groups.setdefault(run_variant(run), []).append(
            (str(run), {it: v for it, v in tests if v.get("neurons_on") is not None}))
    curves = []   # (label, method, iterations, mean, std or None)
    for method, members in groups.items():
        label = METHOD_LABELS.get(method, method)
        iters = sorted(set.intersection(*(set(c) for _, c in members)))
        if not iters:
            warn(f"the runs of {label} share no test point ({', '.join(r for r, _ in members)}): drawn one by one")
            curves += [(f"{label}: {Path(r).name}", method, sorted(c), np.array([[c[i][k] for i in sorted(c)]
                        for k in METRICS]), None) for r, c in members]
            continue
        if any(len(c) > len(iters) for _, c in members):
            warn(f"the runs of {label} share {len(iters)} of their test points: the mean is drawn at those only")
        ys = np.array([[[c[i][k] for i in iters] for k in METRICS] for _, c in members])
        curves.append((f"{label} (n={len(members)})", method, iters, ys.mean(0),
                       ys.std(0, ddof=1) if len(members) > 1 else None))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for j, (ax, key) in enumerate(zip(axes, METRICS)):
        for label, method, iters, mean, std in curves:
            _band(ax, iters, mean[j], None if std is None else std[j], method, label, marker="o")
        ax.set_title(METRIC_TITLES[key], fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Figs. 4-5: utilization at each test point (the runs' log.csv); band: std over runs", fontsize=10)
    return _save(fig, plt, path)


def plot_reliability(summary: dict, dataset: str, path) -> Path:
    """A reliability diagram per method: accuracy against confidence per bin, the gap shaded."""
    plt = _pyplot()
    cells = [c for c in summary["cells"] if c["dataset"] == dataset and c["rate"] == 0.5]
    fig, axes = plt.subplots(1, max(1, len(cells)), figsize=(3.2 * max(1, len(cells)), 3.4), squeeze=False)
    for ax, c in zip(axes[0], cells):
        r = c["reliability"]
        bins = len(r["count"])
        centers = (np.arange(bins) + 0.5) / bins
        acc = np.array([a if a is not None else np.nan for a in r["accuracy"]])
        conf = np.array([x if x is not None else np.nan for x in r["confidence"]])
        ax.bar(centers, np.nan_to_num(acc), width=1 / bins, edgecolor="k", lw=0.4, color=COLORS.get(c["method"]),
               alpha=0.8, label="accuracy")
        ax.bar(centers, np.nan_to_num(conf - acc), bottom=np.nan_to_num(acc), width=1 / bins, color="red",
               alpha=0.25, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_title(f"{METHOD_LABELS.get(c['method'], c['method'])}\nECE {c['ece']['mean']:.3f}, NLL {c['nll']['mean']:.2f}",
                     fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    fig.suptitle(_title(summary, f"Reliability, {dataset}"), fontsize=10)
    return _save(fig, plt, path)


def plot_fig2(path, n: int = 10, base_retain: float = 0.5) -> Path:
    """Fig. 2: the retain probability of Eqn. 3 against p_EB for N units and base retain P."""
    import torch

    plt = _pyplot()
    p = torch.linspace(0, 1, 501, dtype=torch.float64).view(-1, 1).expand(-1, n).contiguous()
    retain = retain_probability(p, base_retain)[:, 0].numpy()
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    ax.plot(p[:, 0].numpy(), retain, color=COLORS["ed"], lw=2)
    ax.plot([1 / n], [base_retain], "ko", ms=4)
    ax.annotate(f"p_EB = 1/N, p = P = {base_retain:g}", (1 / n, base_retain), xytext=(0.25, base_retain + 0.2),
                fontsize=8, arrowprops={"arrowstyle": "->", "lw": 0.6})
    ax.set_xlabel("p_EB")
    ax.set_ylabel("retain probability p")
    ax.set_title(f"Fig. 2: Eqn. 3, N = {n}, P = {base_retain:g}", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, plt, path)


def _save(fig, plt, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------- outputs and the report
def write_analysis_outputs(summary: dict, out) -> list[Path]:
    """table5.md/.json, fig7_<d>.png (+ accuracy), fig4_<d>.png (over training), reliability_<d>.png."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    md = out / "table5.md"
    md.write_text("# Table 5: utilization of the first fc layer, CNN-2\n\n" + table5_markdown(summary) + "\n"
                  + calibration_markdown(summary))
    js = out / "table5.json"
    js.write_text(json.dumps(summary, indent=1))
    written += [md, js]
    for d in sorted({c["dataset"] for c in summary["cells"]}):
        written.append(plot_fig7(summary, d, out / f"fig7_{d}.png"))
        written.append(plot_fig7(summary, d, out / f"fig7_{d}_accuracy.png", what="accuracy"))
        if any(c.get("over_training") for c in summary["cells"] if c["dataset"] == d):
            written.append(plot_over_training(summary, d, out / f"fig4_{d}.png"))
        written.append(plot_reliability(summary, d, out / f"reliability_{d}.png"))
    return written


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).name)}" style="max-width:100%">'


def _md_table_html(md: str) -> str:
    """The Markdown tables and paragraphs of this module as HTML (only what they use)."""
    out, rows = [], []

    def flush():
        if rows:
            head, body = rows[0], rows[2:]
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
            rows.clear()
    for line in md.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.startswith("# "):
            out.append(f"<h2>{html.escape(line[2:])}</h2>")
        elif line.strip():
            text = html.escape(line).replace("**", "")
            out.append(f"<p>{text}</p>")
    flush()
    return "\n".join(out)


def write_report(sweep, out=None, saliency: Path | None = None, saliency_images=(0, 1), device="cpu") -> tuple[Path, Path]:
    """``report.html`` (self-contained: every figure embedded) and ``report.md`` (figures beside it) for
    a sweep folder whose analysis has run (``exdrop analyze``); Table 2 and Fig. 3 from the sweep.
    Fig. 6: ``saliency`` (a PNG), else drawn here for ``saliency_images`` from the first run of each
    analysed method of the first data set (none: ``saliency_images`` empty)."""
    sweep = Path(sweep)
    out = Path(out) if out else sweep
    if not (sweep / "plan.json").is_file() and (sweep / "solver.prototxt").is_file():
        return write_run_report(sweep, out)
    summary_path = sweep / "analysis.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path}: run the analysis first (make table5 RUNS={sweep}, or "
                                f"exdrop analyze {sweep})")
    try:
        summary = json.loads(summary_path.read_text())
    except ValueError as exc:   # UnicodeDecodeError included
        raise ValueError(f"{summary_path}: not JSON ({exc}); run `exdrop analyze {sweep}` again") from None
    if not isinstance(summary, dict) or "cells" not in summary:
        raise ValueError(f"{summary_path}: not a sweep's analysis (no 'cells'); run `exdrop analyze {sweep}` again")
    figures = write_analysis_outputs(summary, out)
    table2 = collect(sweep)
    fig3 = [plot_fig3(table2, d, out / f"fig3_{d}.png") for d in sorted({c["dataset"] for c in table2["cells"]})]
    fig2 = plot_fig2(out / "fig2.png")
    saliency_note = ""
    if saliency is None and saliency_images and summary["cells"]:
        first = summary["cells"][0]["dataset"]
        order = {m: i for i, m in enumerate(TABLE5_METHODS)}
        cells = sorted((c for c in summary["cells"] if c["dataset"] == first and c["rate"] == 0.5),
                       key=lambda c: order.get(c["method"], len(order)))
        runs = [next((r for r in c["runs"] if run_snapshots_trained(r)), None) for c in cells]
        if all(runs):
            saliency = figure(runs, list(saliency_images), out=out / f"fig6_{first}.png", device=device)
        else:
            saliency_note = ("Not drawn: the runs' snapshots are not here (a clone holds only their small files); "
                             "`exdrop saliency RUN ...` on trained run folders draws it.")
    elif saliency is not None and Path(saliency).resolve().parent != out.resolve():
        import shutil
        saliency = Path(shutil.copy(saliency, out / Path(saliency).name))
    sections = [("Table 2: test accuracy", table_markdown(table2, "2"), fig3),
                ("Table 5: utilization of the first fc layer", table5_markdown(summary),
                 [f for f in figures if f.name.startswith("fig4_")]),
                ("Fig. 7: resilience to compression", "Units of the first fc layer switched off at test time "
                 "(Sec. 4.4): the predicted probability of the ground-truth class and the accuracy.",
                 [f for f in figures if f.name.startswith("fig7_")]),
                ("Calibration", calibration_markdown(summary), [f for f in figures if f.name.startswith("reliability_")]),
                ("Fig. 2: the retain probability of Eqn. 3", "", [fig2])]
    if saliency is not None and Path(saliency).is_file():
        sections.insert(4, ("Fig. 6: saliency as the most relevant units are switched off", "", [Path(saliency)]))
    elif saliency_note:
        sections.insert(4, ("Fig. 6: saliency as the most relevant units are switched off", saliency_note, []))
    if summary.get("left_out_without_weights"):
        sections.insert(1, ("Runs left out of the analysis", "Finished runs without snapshots or a kept analysis "
                            "here: " + ", ".join(f"`{r}`" for r in summary["left_out_without_weights"]), []))
    return _write_pages(f"exdrop report: {sweep.name}", _budget_line(summary), sections, out)


def write_run_report(run, out=None) -> tuple[Path, Path]:
    """``report.html`` / ``report.md`` of one run folder whose analysis has run (``exdrop analyze RUN``):
    its Table 5 row, calibration, Fig. 7 and its training curves."""
    run = Path(run)
    out = Path(out) if out else run
    path = run / ANALYSIS / "analysis.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run the analysis first (exdrop analyze {run})")
    try:
        a = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not JSON ({exc}); run `exdrop analyze {run} --force` again") from None
    if not isinstance(a, dict) or not isinstance(a.get("final"), dict):
        raise ValueError(f"{path}: not an analysis of a run (no 'final' entry); run `exdrop analyze {run} --force`")
    method = a.get("method") or run.name
    budget = a.get("budget")
    if not (isinstance(budget, dict) and "name" in budget and "description" in budget):
        told = str(read_results(run).get("budget", ""))
        budget = {"name": run.name, "reduced": not told.startswith("full"),
                  "description": f"one run, iteration {a.get('iteration')}" + (f", {told}" if told else "")}
    summary = {"budget": budget, "reduced": budget.get("reduced", True), "sweep": str(run), "methods": [method],
               "cells": [summarize_cell(a.get("dataset") or "run", method, a.get("rate") or 0.5, [a])]}
    figures = write_analysis_outputs(summary, out)
    curves = run / "curves.png"
    sections = [("Table 5: utilization of the first fc layer", table5_markdown(summary),
                 [f for f in figures if f.name.startswith("fig4_")]),
                ("Fig. 7: resilience to compression", "Units of the first fc layer switched off at test time "
                 "(Sec. 4.4): the predicted probability of the ground-truth class and the accuracy.",
                 [f for f in figures if f.name.startswith("fig7_")]),
                ("Calibration", calibration_markdown(summary), [f for f in figures if f.name.startswith("reliability_")]),
                ("Training curves", "", [curves] if curves.is_file() else [])]
    return _write_pages(f"exdrop report: {run.name}", _budget_line(summary), sections, out)


def _write_pages(title: str, budget: str, sections: list, out: Path) -> tuple[Path, Path]:
    md_lines = [f"# {title}", "", budget, ""]
    html_parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                  "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
                  "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #bbb;"
                  "padding:3px 7px}th{background:#eee}img{display:block;margin:1em 0}</style></head><body>",
                  f"<h1>{html.escape(title)}</h1>", f"<p><b>{html.escape(budget.replace('**', ''))}</b></p>"]
    for head, text, figs in sections:
        md_lines += [f"## {head}", "", text, ""] + [f"![{f.name}]({f.name})" for f in figs] + [""]
        html_parts += [f"<h2>{html.escape(head)}</h2>", _md_table_html(text)] + [_img(f) for f in figs]
    html_parts.append("</body></html>")
    md = out / "report.md"
    md.write_text("\n".join(md_lines))
    page = out / "report.html"
    page.write_text("\n".join(html_parts))
    return page, md
