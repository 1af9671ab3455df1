"""The analysis of Secs. 4.3-4.4: each metric on hand-made values with known answers, then a tiny
trained run whose p_EB, metrics, compression curves, conservative filters and calibration are
recomputed by hand (numpy) from its own activations and weights; contrastive EB and the
switched-off units of Net.forward; a sweep's Table 5, figures and report."""
from __future__ import annotations

import base64
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exdrop.analysis import analyze as A
from exdrop.proto import io as cio
from exdrop.analysis import report as R
from exdrop.cli import main as exdrop_main
from exdrop.engine.net import Net
from exdrop.engine.pylayer import TEST

sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import write_tiny  # noqa: E402
import golden  # noqa: E402
from make_dry import unquoted  # noqa: E402


# ---------------------------------------------------------------------- metrics on hand-made values
def test_neurons_on_counts_non_zero_units_and_conv_channels():
    a = torch.tensor([[0.0, 1.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    assert A.neurons_on(a).tolist() == [2.0, 1.0]
    conv = torch.zeros(1, 3, 2, 2)
    conv[0, 0, 1, 1] = 0.5          # channel 0 has one active pixel, channel 2 two
    conv[0, 2] = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert A.neurons_on(conv).tolist() == [2.0]


def test_peak_and_entropy_known_values():
    p = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.7, 0.0]])
    assert A.peak(p).tolist() == pytest.approx([0.5, 0.7])
    h = A.entropy(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0],
                                [1.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    assert h.tolist() == pytest.approx([math.log(4), 0.0, math.log(2), 1.5 * math.log(2), 0.0])


def test_conservative_units_by_moved_norm():
    w0 = torch.zeros(3, 2)
    w = torch.tensor([[3.0, 4.0], [0.0, 0.1], [0.0, 0.0]])
    assert A.moved_norms(w0, w).tolist() == pytest.approx([5.0, 0.1, 0.0])
    assert A.conservative_units(w0, w, 0.2) == 2
    assert A.conservative_units(w0, w, 0.05) == 1
    conv0 = torch.zeros(2, 1, 2, 2)     # a filter per output channel
    conv = conv0.clone()
    conv[1] = 1.0
    assert A.moved_norms(conv0, conv).tolist() == pytest.approx([0.0, 2.0])
    with pytest.raises(ValueError, match="differ in shape"):
        A.moved_norms(w0, w.t())


def test_relevance_masks_switch_off_the_fewest_units_reaching_p_c():
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    most = A.relevance_keep_masks(p, [0.0, 0.4, 0.5, 0.8, 0.95], most_first=True)
    off = [set(np.flatnonzero(~m[0].numpy())) for m in most]
    assert off == [set(), {0}, {0}, {0, 1}, {0, 1, 2}]
    least = A.relevance_keep_masks(p, [0.0, 0.1, 0.4, 0.95], most_first=False)
    off = [set(np.flatnonzero(~m[0].numpy())) for m in least]
    # ascending p_EB: unit 3 (0), unit 2 (0.2), unit 1 (0.3), unit 0 (0.5)
    assert off == [set(), {3, 2}, {3, 2, 1}, {3, 2, 1, 0}]
    # a mass ahead that reaches p_c only up to float32 rounding has reached it: the mass ahead of 0.92 is
    # (0.01 + 0.07 + 0.92) - 0.92, 0.0799999833 in float32, below 0.08's 0.0799999982
    p = torch.tensor([[0.01, 0.07, 0.92]])
    assert float(p.cumsum(1)[0, 2] - p[0, 2]) < float(torch.tensor(0.08))
    assert A.relevance_keep_masks(p, [0.08], most_first=False)[0, 0].tolist() == [False, False, True]


def test_random_masks_switch_off_exactly_k_units_per_image():
    g = torch.Generator().manual_seed(0)
    keep = A.random_keep_masks(5, 8, [0, 3, 8], g)
    assert keep.shape == (3, 5, 8)
    assert (~keep).sum(2).tolist() == [[0] * 5, [3] * 5, [8] * 5]
    assert len({tuple(r.tolist()) for r in keep[1]}) > 1      # images differ


def test_calibration_bins_and_ece_by_hand():
    conf = torch.tensor([0.95, 0.95, 0.55, 0.55, 1.0, 0.0])
    correct = torch.tensor([True, False, True, True, True, False])
    count, conf_sum, acc_sum = A.calibration_bins(conf, correct, bins=15)
    assert count[14] == 3 and count[8] == 2 and count[0] == 1 and count.sum() == 6
    # bins: (0.95, 0.95, 1.0) -> acc 2/3, conf 0.9667; (0.55, 0.55) -> acc 1, conf 0.55; (0.0) -> 0, 0
    want = (3 * abs(2 / 3 - 2.9 / 3) + 2 * abs(1 - 0.55) + 0) / 6
    assert A.expected_calibration_error(count, conf_sum, acc_sum) == pytest.approx(want)
    # a confidence a rounding above 1 (a float32 softmax can give one) still falls in the last bin
    above = torch.nextafter(torch.tensor([1.0]), torch.tensor([2.0]))
    assert A.calibration_bins(above, torch.tensor([True]), bins=15)[0].tolist() == [0] * 14 + [1]


# ---------------------------------------------------------------------- a tiny run, by hand
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    solver = write_tiny(tmp)
    out = tmp / "run"
    assert exdrop_main(["train", str(solver), "--out", str(out), "--max-iter", "4", "--snapshot-every", "2",
                        "--keep-snapshots", "0", "--test-interval", "2", "--seed", "3", "--device", "cpu",
                        "--quiet"]) == 0
    return out


def _by_hand(run):
    """Activations of ip1, the classifier's weights, labels: from the engine's forward; the rest numpy."""
    from exdrop.analysis.evaluate import _test_data_layer, load_test_net
    from exdrop.engine.snapshot import load_weights
    tn = load_test_net(run / "solver.prototxt")
    _test_data_layer(tn).data_param.rand_skip = 0
    net = Net(tn.param, TEST, torch.device("cpu"), tn.source)
    load_weights(net, run / "snapshots" / "tiny_ed_iter_4.caffemodel")
    acts, labels = [], []
    for _ in range(2):     # 6 held-out images, batch 3
        blobs = net()
        acts.append(blobs["ip1"].detach().numpy().copy())
        labels.append(blobs["label"].numpy().astype(int))
    a, y = np.concatenate(acts), np.concatenate(labels)
    w2, b2 = (x.detach().numpy() for x in net.layer("ip2").blobs)
    return a.astype(np.float64), y, w2.astype(np.float64), b2.astype(np.float64)


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _entropy(x):
    q = x / x.sum(1, keepdims=True)
    return -np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0).sum(1)


def test_run_analysis_matches_sums_by_hand(tiny_run):
    res = A.analyze_run(tiny_run, delta=0.05, over_training=True, training_images=3, echo=lambda *a: None)
    f = res["final"]
    a, y, w2, b2 = _by_hand(tiny_run)
    assert (f["blob"], f["units"], f["images"], res["iteration"]) == ("ip1", 16, 6, 4)
    # p_EB at ip1 from the ground-truth class: the classifier's EB step, by hand
    wp = np.maximum(w2[y], 0)                       # (images, 16): W+ row of each image's class
    z = (a * wp).sum(1, keepdims=True)
    p = np.divide(a * wp, z, out=np.zeros_like(a), where=z != 0)
    assert f["neurons_on"] == pytest.approx((a > 0).sum(1).mean())
    assert f["peak_peb"] == pytest.approx(p.max(1).mean(), rel=1e-5)
    assert f["entropy_act"] == pytest.approx(_entropy(a).mean(), rel=1e-5)
    assert f["entropy_peb"] == pytest.approx(_entropy(p).mean(), rel=1e-5)
    assert f["peb_mass"] == pytest.approx(((a * wp).sum(1) > 0).mean(), abs=1e-5)   # 1, or 0 where Z = 0
    probs = _softmax(a @ w2.T + b2)
    assert f["accuracy"] == pytest.approx((probs.argmax(1) == y).mean())
    assert f["nll"] == pytest.approx(-np.log(probs[np.arange(6), y]).mean(), rel=1e-5)
    # compression: p_c = 0 and k = 0 leave the net intact; k = all units leaves the biases
    comp = f["compression"]
    gt = probs[np.arange(6), y]
    assert comp["most"]["gt_prob"][0] == pytest.approx(gt.mean(), rel=1e-5)
    assert comp["random"]["x"] == [0, 16] and comp["random"]["gt_prob"][0] == pytest.approx(gt.mean(), rel=1e-5)
    assert comp["random"]["gt_prob"][-1] == pytest.approx(_softmax(np.tile(b2, (6, 1)))[np.arange(6), y].mean(),
                                                          rel=1e-5)
    i = A.P_C.index(0.5)                               # the most relevant units up to half the mass, by hand
    keep = np.ones_like(p, bool)
    for n in range(6):
        order = np.argsort(-p[n], kind="stable")
        before = np.cumsum(p[n][order]) - p[n][order]
        keep[n, order[before < 0.5]] = False
    want = _softmax((a * keep) @ w2.T + b2)[np.arange(6), y]
    assert comp["most"]["gt_prob"][i] == pytest.approx(want.mean(), rel=1e-4)
    assert comp["most"]["gt_prob_std_images"][i] == pytest.approx(want.std(), rel=1e-3, abs=1e-6)
    # conservative filters: ip1's rows against the iteration-0 weights, drawn here by hand from the run's
    # seed (3) as the trainer drew them; the run folder holds only their record (init.json)
    def ip1(path):
        layer = next(l for l in cio.read_caffemodel(path).layer if l.name == "ip1")
        return np.asarray(layer.blobs[0].data, np.float64).reshape(16, -1)
    from exdrop.engine.pylayer import TRAIN
    from exdrop.run.train import net_params
    assert not (tiny_run / "init.caffemodel").exists() and (tiny_run / "init.json").is_file()
    torch.manual_seed(3)
    (train_param, src), _ = net_params(cio.read_solver_prototxt(tiny_run / "solver.prototxt"), str(tiny_run / "solver.prototxt"))
    w0 = Net(train_param, TRAIN, torch.device("cpu"), src).layer("ip1").blobs[0].detach().double().numpy()
    moved = np.linalg.norm(ip1(tiny_run / "snapshots" / "tiny_ed_iter_4.caffemodel") - w0, axis=1)
    assert f["init_weights"].startswith(f"drawn again from {tiny_run / 'init.json'}")
    assert f["conservative"] == int((moved < 0.05).sum()) and f["delta"] == 0.05
    assert f["moved_median"] == pytest.approx(np.median(moved), rel=1e-4)
    # over training: init (0) and both snapshots, on the first 3 images; nothing moved at iteration 0
    rows = res["over_training"]["rows"]
    assert [r["iter"] for r in rows] == [0, 2, 4] and rows[0]["conservative"] == 16
    assert rows[-1]["neurons_on"] == pytest.approx((a[:3] > 0).sum(1).mean())
    # the trainer logged the same metrics at its test point of iteration 4 (both batches: the same 6 images)
    import csv
    with open(tiny_run / "log.csv", newline="") as fh:
        logged = [r for r in csv.DictReader(fh) if r["phase"] == "test" and r["iter"] == "4"][0]
    for key in A.METRICS:
        assert float(logged[key]) == pytest.approx(f[key], rel=1e-5), key
    # saved, and reused while nothing changed
    saved = json.loads((tiny_run / "analysis" / "analysis.json").read_text())
    assert saved["final"]["entropy_peb"] == f["entropy_peb"]
    # the over-training cache names the iteration-0 weights its first row was computed from
    from exdrop.run.init_weights import init_identity
    assert saved["key_over"]["snapshots"][0] == [0, "iteration 0", init_identity(tiny_run)]
    snaps = [tiny_run / "snapshots" / f"tiny_ed_iter_{it}.caffemodel" for it in (2, 4)]
    assert saved["key_over"]["snapshots"][1:] == [[it, str(p), p.stat().st_mtime_ns] for it, p in zip((2, 4), snaps)]
    assert saved["key_final"]["format"] == saved["key_over"]["format"] == A.FORMAT
    # every over-training row carries the held-out metrics beside Table 5's, of its own 3 images
    assert all(set(r) == {"iter", *A.METRICS, "accuracy", "nll", "ece", "conservative"} for r in rows)
    assert all(r[k] is not None for r in rows for k in ("accuracy", "nll", "ece"))
    assert rows[-1]["accuracy"] == pytest.approx((probs[:3].argmax(1) == y[:3]).mean())
    assert rows[-1]["nll"] == pytest.approx(-np.log(probs[np.arange(3), y[:3]]).mean(), rel=1e-5)
    calls = []
    again = A.analyze_run(tiny_run, delta=0.05, training_images=3, echo=calls.append)
    assert calls == [] and again["final"] == saved["final"]


def test_contrastive_eb_and_switched_off_units_by_hand(tiny_run):
    from exdrop.analysis.evaluate import load_test_net
    from exdrop.engine.snapshot import load_weights
    tn = load_test_net(tiny_run / "solver.prototxt")
    net = Net(tn.param, TEST, torch.device("cpu"), tn.source)
    load_weights(net, tiny_run / "snapshots" / "tiny_ed_iter_4.caffemodel")
    with torch.no_grad():
        blobs = net.forward(record=True)
    a = blobs["ip1"].double().numpy()
    y = blobs["label"].long().numpy()
    w2 = net.layer("ip2").blobs[0].detach().double().numpy()[y]
    pos, neg = np.maximum(w2, 0), np.maximum(-w2, 0)
    def share(w):    # EB's step: x w / sum(x w), 0 where the sum is 0 (no epsilon)
        z = (a * w).sum(1, keepdims=True)
        return np.divide(a * w, z, out=np.zeros_like(a), where=z != 0)
    want = np.maximum(share(pos) - share(neg), 0)
    got = net.excitation("ip1", contrastive=True).double().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # units switched off: the following layers and EB see the edited blob
    keep = torch.ones(a.shape[1])
    keep[:8] = 0
    with torch.no_grad():
        blobs = net.forward({"data": blobs["data"], "label": blobs["label"]}, record=True,
                            edit={"ip1": lambda t: t * keep})
    assert float(blobs["ip1"][:, :8].abs().sum()) == 0.0
    z = (a * keep.numpy()) @ net.layer("ip2").blobs[0].detach().double().numpy().T \
        + net.layer("ip2").blobs[1].detach().double().numpy()
    np.testing.assert_allclose(blobs["ip2"].double().numpy(), z, rtol=1e-5, atol=1e-6)
    p = net.excitation("ip1").numpy()
    assert float(np.abs(p[:, :8]).sum()) == 0.0 and p.sum(1) == pytest.approx(np.ones(3), abs=1e-5)


def test_analysis_errors_name_the_problem(tiny_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        A.analyze_run(tmp_path)
    missing = tiny_run / "snapshots" / "tiny_ed_iter_99.caffemodel"
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(str(missing))}: no such .caffemodel$"):
        A.analyze(tiny_run / "solver.prototxt", missing)
    with pytest.raises(ValueError, match="no blob 'nope'"):
        A.analyze(tiny_run / "solver.prototxt", tiny_run / "snapshots" / "tiny_ed_iter_4.caffemodel", blob="nope")
    with pytest.raises(ValueError, match="blob 'label' has shape .*not a layer of units"):
        A.analyze(tiny_run / "solver.prototxt", tiny_run / "snapshots" / "tiny_ed_iter_4.caffemodel", blob="label")
    with pytest.raises(ValueError, match="not written by an InnerProduct or Convolution"):
        A.analyze(tiny_run / "solver.prototxt", tiny_run / "snapshots" / "tiny_ed_iter_4.caffemodel", blob="data",
                  init_weights=tiny_run / "snapshots" / "tiny_ed_iter_2.caffemodel", compression=False)


# ---------------------------------------------------------------------- a sweep: Table 5, figures, report
def _fake_sweep(tiny_run, tmp_path):
    """A sweep folder whose plan lists the tiny run as two methods of cifar10."""
    import shutil
    runs = []
    for method in ("ed", "standard_fc1"):
        folder = tmp_path / "sweep" / "cifar10" / method / "seed1"
        shutil.copytree(tiny_run, folder, ignore=shutil.ignore_patterns("analysis"))
        runs.append({"dataset": "cifar10", "method": method, "rate": 0.5, "seed": 1, "folder": str(folder),
                     "command": ["true"]})
    budget = {"name": "cpu", "description": "a tiny test budget", "reduced": True}
    (tmp_path / "sweep" / "plan.json").write_text(json.dumps({"budget": budget, "runs": runs}))
    return tmp_path / "sweep"


def test_sweep_table5_figures_and_report(tiny_run, tmp_path):
    sweep = _fake_sweep(tiny_run, tmp_path)
    assert exdrop_main(["analyze", str(sweep), "--training-images", "3", "--quiet"]) == 0
    summary = json.loads((sweep / "analysis.json").read_text())
    assert [c["method"] for c in summary["cells"]] == ["ed", "standard_fc1"]
    assert summary["cells"][0]["delta"] == 0.25          # Table 5's CIFAR-10 threshold, from the plan
    md = (sweep / "table5.md").read_text()
    assert "Reduced budget" in md and "a tiny test budget" in md
    assert re.search(r"\| cifar10 \| Peak p_EB \| .*\[0\.0110 \+- 0\.0040\].*\[0\.0030 \+- 0\.0002\]", md)
    assert "Conservative filters (Delta = 0.25)" in md and "| Excitation |" in md
    for name in ("fig7_cifar10.png", "fig7_cifar10_accuracy.png", "fig4_cifar10.png", "reliability_cifar10.png"):
        assert (sweep / name).stat().st_size > 10_000, name
    page, mdfile = R.write_report(sweep, tmp_path / "out", saliency_images=(0,))
    text = page.read_text()
    imgs = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(imgs) >= 7                                # Figs. 3, 4, 7 (x2), reliability, 6, 2
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in imgs)
    assert "Reduced budget" in text and "<table>" in text and "Fig. 6" in text
    report_md = mdfile.read_text()
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", report_md):
        assert (mdfile.parent / link).is_file(), link


def test_a_sweeps_nets_are_separate_cells(tiny_run, tmp_path):
    """Table 3's sweep: one method on two nets of ucf101 gives two cells, named by the net."""
    sweep = _fake_sweep(tiny_run, tmp_path)
    plan = json.loads((sweep / "plan.json").read_text())
    for r, net in zip(plan["runs"], ("vgg16", "alexnet")):
        r.update(dataset="ucf101", net=net, method="ed")
    (sweep / "plan.json").write_text(json.dumps(plan))
    summary = R.analyze_sweep(sweep, methods=("ed",), over_training=False, echo=lambda *a: None)
    assert sorted(c["dataset"] for c in summary["cells"]) == ["ucf101-alexnet", "ucf101-vgg16"]
    assert all(c["seeds"] == 1 for c in summary["cells"])
    md = R.table5_markdown(summary)
    assert re.search(r"\| ucf101-vgg16 \| Peak p_EB \| .*\[", md)        # the paper's UCF101 (VGG16) figure
    assert not re.search(r"\| ucf101-alexnet \| Peak p_EB \| .*\[", md)   # none for AlexNet


def test_plot_of_the_logged_utilization(tiny_run, tmp_path):
    import shutil
    runs = []
    for seed in (1, 2):     # two "seeds" of one method: a mean curve with a band
        folder = tmp_path / "ed" / f"seed{seed}"
        shutil.copytree(tiny_run, folder, ignore=shutil.ignore_patterns("snapshots", "analysis"))
        runs.append(str(folder))
    out = tmp_path / "u.png"
    assert exdrop_main(["plot", *runs, "--utilization", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    (tmp_path / "ed" / "seed2" / "log.csv").write_text("iter,phase,lr,elapsed_s,accuracy,loss\n2,test,0.1,1,0.5,1\n")
    assert exdrop_main(["plot", *runs, "--utilization", "--out", str(out)]) == 1


def test_fig2_retain_probability(tmp_path):
    out = R.plot_fig2(tmp_path / "fig2.png", n=10, base_retain=0.5)
    assert out.stat().st_size > 5_000
    assert exdrop_main(["plot", "--fig2", str(tmp_path / "f.png"), "--n", "20", "--base-retain", "0.6"]) == 0


def test_make_targets_name_the_analysis(tmp_path):
    import subprocess
    root = Path(__file__).resolve().parents[1]
    for target, want in (("table5", "exdrop analyze results/x"), ("fig7", "--no-over-training"),
                         ("report", "exdrop report results/x")):
        out = subprocess.run(["make", "-n", "-C", str(root), target, "RUNS=results/x"], capture_output=True,
                             text=True, check=True).stdout
        out = unquoted(out)
        assert want in out, (target, out)


def test_analyze_one_run_writes_its_report_and_says_why_no_conservative(tiny_run, tmp_path, capsys):
    """A run outside a sweep whose data set is unknown: no Delta, and the output says so (not a silent
    null); its report (Table 5 row, Fig. 7, calibration) is written beside the analysis."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "analysis", ignore_errors=True)
    capsys.readouterr()
    assert exdrop_main(["analyze", str(run), "--training-images", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "no conservative filters: Table 5's Delta is per data set" in out and "give --delta" in out
    assert (run / "report.html").is_file() and "fig7" in (run / "report.md").read_text()
    assert exdrop_main(["analyze", str(run), "--training-images", "3", "--quiet", "--delta", "0.5", "--force"]) == 0
    assert "Conservative" in capsys.readouterr().out


def test_a_run_without_snapshots_reuses_its_kept_analysis_or_names_the_missing_folder(tmp_path):
    """A committed run (small files only): its analysis.json is returned as kept when it holds a final
    analysis; otherwise the error names the run's snapshots folder."""
    from exdrop.analysis.analyze import NoSnapshots, analyze_run
    run = tmp_path / "run"
    (run / "analysis").mkdir(parents=True)
    (run / "solver.prototxt").write_text('net: "net.prototxt"\n')
    kept = {"final": {"accuracy": 0.5}, "over_training": []}
    (run / "analysis" / "analysis.json").write_text(json.dumps(kept))
    said = []
    assert analyze_run(run, echo=said.append) == kept
    assert said and "no snapshots here" in said[0]
    (run / "analysis" / "analysis.json").write_text(json.dumps({"over_training": []}))
    with pytest.raises(NoSnapshots, match=re.escape(f"no snapshot in {run / 'snapshots'} to analyse")):
        analyze_run(run, echo=said.append)


@pytest.fixture
def run(tiny_run, tmp_path):
    """A copy of the tiny run that a test may analyse again, rename in, or cache into."""
    import shutil
    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path / "run"


def test_run_analysis_cache_keeps_what_it_reused_and_the_blob_reaches_every_part(run):
    """The final analysis reused while the over-training curve is added is still reused next time; a
    blob given is the blob of the final analysis and of every over-training row."""
    from exdrop.run.init_weights import init_identity
    quiet = lambda *a: None   # noqa: E731
    first = A.analyze_run(run, delta=0.05, over_training=False, force=True, echo=quiet)
    assert first["final"]["init_weights"] == (f"drawn again from {run / 'init.json'} "
                                              f"(sha256 {init_identity(run)[:12]}...)")
    said = []
    second = A.analyze_run(run, delta=0.05, over_training=True, training_images=3, echo=said.append)
    assert len(said) == 1 and "snapshots over training" in said[0]   # the final analysis reused
    assert second["final"] == first["final"]
    said.clear()
    A.analyze_run(run, delta=0.05, over_training=True, training_images=3, echo=said.append)
    assert said == []
    res = A.analyze_run(run, blob="conv1", delta=0.05, over_training=True, training_images=3, force=True, echo=quiet)
    assert res["final"]["blob"] == "conv1"
    direct = A.analyze(run / "solver.prototxt", run / "snapshots" / "tiny_ed_iter_4.caffemodel", None, "conv1", None,
                       0.05, images=3, compression=False)
    assert res["over_training"]["rows"][-1]["neurons_on"] == pytest.approx(direct["neurons_on"])


def test_run_analysis_runs_every_pass_on_the_device_asked_for(run, monkeypatch):
    devices, real = [], A.analyze

    def analyze(*args, **kw):
        devices.append(kw.get("device"))
        return real(*args, **kw)

    monkeypatch.setattr(A, "analyze", analyze)
    A.analyze_run(run, delta=0.05, over_training=True, training_images=3, device="cpu", force=True,
                  echo=lambda *a: None)
    assert devices == ["cpu"] * 4          # the final pass, then iteration 0 and both snapshots


def test_run_analysis_whole_against_its_golden_copy(tiny_run, run):
    """Every key and number of analysis.json for the tiny run (final and over training), within 1e-4:
    the checks above by hand cover the formulas, this one every field a report or figure reads."""
    from exdrop.run.init_weights import init_identity
    res = A.analyze_run(run, delta=0.05, over_training=True, training_images=3, force=True, echo=lambda *a: None)
    init = init_identity(run)   # a digest of init.json, which names this machine's paths
    text = json.dumps(res).replace(str(run), "<run>").replace(str(tiny_run.parent), "<tmp>")
    text = text.replace(init, "<init sha256>").replace(init[:12], "<init sha256>")
    res = json.loads(text)
    res["final"]["seconds"] = None
    res["key_final"]["weights"][1] = 0
    for snap in res["key_over"]["snapshots"]:
        snap[2] = 0 if isinstance(snap[2], int) else snap[2]
    golden.check_close("analysis_tiny_run.json", res)


def test_analysis_of_a_convolution_blob_on_a_few_images_against_its_golden_copy(tiny_run):
    """analyze() at conv1 (a 4-d blob: units are feature maps) on the first 4 images, with the
    iteration-0 weights for the conservative filters, within 1e-4 of the copy kept."""
    from exdrop.run.init_weights import iteration0_weights
    with iteration0_weights(tiny_run) as init:
        res = A.analyze(tiny_run / "solver.prototxt", tiny_run / "snapshots" / "tiny_ed_iter_2.caffemodel", None,
                        "conv1", init, 0.01, images=4)
    assert res.pop("init_weights") == str(init) and res["seconds"] >= 0
    res["seconds"] = None
    text = json.dumps(res).replace(str(tiny_run), "<run>").replace(str(tiny_run.parent), "<tmp>")
    golden.check_close("analysis_tiny_conv1_4_images.json", json.loads(text))


def test_analysis_of_one_image_is_that_images_values(tiny_run):
    a, y, w2, b2 = _by_hand(tiny_run)
    f = A.analyze(tiny_run / "solver.prototxt", tiny_run / "snapshots" / "tiny_ed_iter_4.caffemodel", images=1,
                  compression=False)
    assert f["images"] == 1 and f["neurons_on"] == (a[0] > 0).sum() and f["neurons_on_std_images"] == 0
    assert f["entropy_act"] == pytest.approx(_entropy(a[:1])[0], rel=1e-5)


def test_run_analysis_shows_progress_only_when_asked_and_says_why_a_run_has_no_conservative_filters(run, capsys):
    """A run folder from before the iteration-0 weights were recorded (neither init.json nor
    init.caffemodel): its final analysis says so in place of the conservative filters."""
    (run / "init.json").unlink()
    capsys.readouterr()
    res = A.analyze_run(run, delta=0.05, over_training=False, force=True, progress=True, echo=lambda *a: None)
    assert "test" in capsys.readouterr().err
    assert res["final"]["conservative_note"] == (f"{run} has neither init.json nor init.caffemodel (runs from before the "
                                                 "iteration-0 weights were recorded): no conservative filters")
    A.analyze_run(run, delta=0.05, over_training=False, force=True, echo=lambda *a: None)
    assert capsys.readouterr().err == ""


def test_run_analysis_takes_delta_from_the_data_set_its_net_path_names(run):
    """A run outside a sweep whose net is prototxt/cnn2/cifar10/...: Table 5's CIFAR-10 Delta."""
    results = json.loads((run / "results.json").read_text())
    results["net"] = str(run / "prototxt" / "cnn2" / "cifar10" / "train_val_ed.prototxt")
    (run / "results.json").write_text(json.dumps(results))
    res = A.analyze_run(run, over_training=False, force=True, echo=lambda *a: None)
    assert res["final"]["delta"] == A.DELTA["cifar10"] and res["final"]["conservative"] is not None


def test_run_analysis_is_redone_for_another_last_snapshot_and_says_when_delta_is_unknown(run):
    """The cache key names the last snapshot's file, not only its time; a run whose data set is not
    known and no --delta gets no conservative filters, and is told why."""
    first = A.analyze_run(run, over_training=False, force=True, echo=lambda *a: None)
    assert first["final"]["conservative_note"].startswith("no conservative filters: Table 5's Delta is per data set (")
    assert first["final"]["conservative_note"].endswith("and this run's data set is not known: give --delta")
    (run / "snapshots" / "tiny_ed_iter_4.caffemodel").rename(run / "snapshots" / "tiny_ed_iter_5.caffemodel")
    said = []
    again = A.analyze_run(run, over_training=False, echo=said.append)
    assert again["iteration"] == 5 and any("iteration 5" in line for line in said)
