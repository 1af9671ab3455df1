"""Contracts of the sweep's data, weights and run commands that mutants of the source used to survive:
CIFAR-100's 100 classes in the held-back subset, the progress flag reaching the converter, each
Caltech-256 seed's own split and training order, the UCF101 branch of prepare_data, the
``--weights NET=FILE`` override and the Model Zoo default path, the training-set count behind
Information Dropout's KL weight, the final-test command of a Table 3 run (the snapshot the trainer
writes, a command `exdrop test` accepts, quiet), and a torchvision .pth saved on a GPU loading on
the CPU. Each test is small: converters are replaced by fakes where only their arguments matter."""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from exdrop import data as D
from exdrop.data import DatumLMDB, write_datum_lmdb
from exdrop.experiments import sweep as S
from exdrop.proto import io as cio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sweep import _plan_of  # noqa: E402

SUBSET = S.Budget("subset", "test budget: 10 train + 7 held-back images per class", train_per_class=10,
                  val_per_class=7, max_iter=4, stepvalue=2, test_interval=2, snapshot=2, display=1)
REDUCED = next(b for b in S.BUDGETS.values() if b.train_per_class is not None)   # a CPU budget: a subset per class
UCF_TINY = S.Budget("tiny-ucf", "test budget: 2 iterations at batch 2", max_iter=2, test_interval=0, snapshot=0,
                    display=1, batch_size=2, test_batch_size=3, test_iter=1)


def _fake_converter(calls: list, folder: Path):
    """A stand-in for prepare_cifar10/100: records its keyword arguments, converts nothing."""
    def convert(source, out_dir, **kw):
        calls.append({**kw, "out_dir": out_dir, "source": source})
        return {"train": str(folder / "train_lmdb"), "val": str(folder / "val_lmdb"), "counts": {"train": 1}}
    return convert


@pytest.fixture
def no_conversion(monkeypatch, tmp_path):
    """CIFAR converters and the per-seed LMDB copy replaced: prepare_data's calls are what is checked."""
    calls = []
    monkeypatch.setattr(D, "official_source", lambda source, dataset="cifar10": source)
    monkeypatch.setattr(D, "prepare_cifar10", _fake_converter(calls, tmp_path))
    monkeypatch.setattr(D, "prepare_cifar100", _fake_converter(calls, tmp_path))
    monkeypatch.setattr(S, "_seeded_order", lambda src, dst, seed: str(dst))
    return calls


# ---------------------------------------------------------------------- prepare_data
def test_cifar100_subset_holds_back_val_per_class_of_its_100_classes(no_conversion, tmp_path):
    """CIFAR-100 has 100 classes: a budget of 7 held-back images per class holds back 700 images, and
    each class contributes train + held-back = 17 images."""
    S.prepare_data("cifar100", "src", SUBSET, tmp_path / "data", [1], progress=False)
    (kw,) = no_conversion
    assert kw["val_size"] == 7 * 100
    assert kw["limit_per_class"] == 17


def test_a_subset_without_held_back_images_takes_train_per_class_alone(no_conversion, tmp_path):
    """train_per_class and no val_per_class: each class gives exactly its training images, and no
    validation set is carved out (the official test split is the held-out set)."""
    S.prepare_data("cifar10", "src", dataclasses.replace(SUBSET, val_per_class=None), tmp_path / "data", [1],
                   progress=False)
    (kw,) = no_conversion
    assert kw["limit_per_class"] == 10 and kw["val_size"] is None


def test_a_plan_with_no_source_reads_the_datasets_default_archive(no_conversion, tmp_path, monkeypatch):
    """No --data for a dataset: the plan converts its default source (DATASETS), data/<archive>."""
    monkeypatch.chdir(tmp_path)
    S.plan(tmp_path / "sw", ["cifar10"], ["none"], [0.5], [1], SUBSET, {}, device="cpu", progress=False)
    assert [Path(kw["out_dir"]).parent.name for kw in no_conversion] == ["cifar10_subset"]
    assert no_conversion[0]["source"] == "data/cifar-10-python.tar.gz"


def test_a_previous_plan_without_runs_keeps_nothing(tmp_path):
    """A plan.json of the same budget and recipe that lists no runs (cut short) leaves no run to keep."""
    budget = dataclasses.asdict(SUBSET)
    (tmp_path / "plan.json").write_text(json.dumps({"recipe": "paper", "budget": budget}))
    assert S._kept_runs(tmp_path, budget, "paper", set()) == []


@pytest.mark.parametrize("budget", [SUBSET, S.BUDGETS["paper"]], ids=["subset", "whole"])
def test_progress_flag_reaches_the_converter(no_conversion, tmp_path, budget):
    """`exdrop sweep` shows the conversion's progress unless told to be quiet, on a subset budget
    and on the whole split alike."""
    S.prepare_data("cifar10", "src", budget, tmp_path / "a", [1], progress=True)
    S.prepare_data("cifar10", "src", budget, tmp_path / "b", [1], progress=False)
    assert [bool(kw["progress"]) for kw in no_conversion] == [True, False]


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "caltech256"])
def test_each_dataset_hands_its_source_and_progress_flag_to_its_converter(monkeypatch, tmp_path, dataset):
    """A source that exists goes to the dataset's converter as it is (official_source looks the
    dataset up by its own name), with the progress flag, for CIFAR-10, CIFAR-100 and Caltech-256."""
    calls = []

    def convert(source, out_dir, progress=True, **kw):
        calls.append((source, progress))
        return {"train": _lmdb(Path(out_dir) / "train_lmdb", 4, 0), "val": "v", "counts": {"train": 4}}
    monkeypatch.setattr(D, {"cifar10": "prepare_cifar10", "cifar100": "prepare_cifar100",
                            "caltech256": "prepare_caltech256"}[dataset], convert)
    src = tmp_path / "archive.tar.gz"
    src.write_bytes(b"")
    for progress in (True, False):
        S.prepare_data(dataset, str(src), S.BUDGETS["paper"], tmp_path / f"data_{progress}", [1], progress=progress)
    assert calls == [(str(src), True), (str(src), False)]


def _lmdb(path: Path, n: int, first_label: int) -> str:
    """A tiny Datum LMDB whose labels (first_label, first_label + 1, ...) identify each record."""
    images = np.arange(n * 3 * 2 * 2, dtype=np.uint8).reshape(n, 3, 2, 2)
    write_datum_lmdb(path, images, np.arange(first_label, first_label + n))
    return str(path)


def test_caltech256_seed_trains_on_its_split_in_its_own_order(monkeypatch, tmp_path):
    """Seed k trains on the paper's split (k - 1) mod 5, in an order drawn from k, written to
    data/caltech256_<budget>/train_seed<k>_lmdb: seeds 1 and 6 share split 0 but not the order."""
    splits = []

    def fake_caltech(source, out_dir, split=0, progress=True, **kw):
        splits.append(split)
        out_dir = Path(out_dir)
        return {"train": _lmdb(out_dir / "train_lmdb", 12, 100 * split),
                "test": str(out_dir / "test_lmdb"), "counts": {"train": 12}}

    monkeypatch.setattr(D, "prepare_caltech256", fake_caltech)
    folder = tmp_path / "data" / "caltech256_paper"
    info = S.prepare_data("caltech256", "src", S.BUDGETS["paper"], tmp_path / "data", [1, 2, 6], progress=False)
    assert splits == [0, 1, 0]
    assert info["train"] == {s: str(folder / f"train_seed{s}_lmdb") for s in (1, 2, 6)}
    assert info["val"] == {s: str(folder / f"split{(s - 1) % 5}" / "test_lmdb") for s in (1, 2, 6)}
    assert info["counts"] == {"train": 12}
    orders = {}
    for s in (1, 2, 6):
        with DatumLMDB(info["train"][s]) as db:
            _, labels = db.read_all()
        split = (s - 1) % 5
        expected = 100 * split + np.random.default_rng(s).permutation(12)
        assert labels.tolist() == expected.tolist(), s
        orders[s] = labels.tolist()
    assert orders[1] != orders[6] and sorted(orders[1]) == sorted(orders[6])


def _converted_ucf101(src: Path) -> Path:
    """The layout `make data-ucf101` writes (train.txt, frames/, test_lmdb/, test_videos.json, meta.json),
    without any real frames: prepare_data only reads train.txt and meta.json."""
    (src / "frames").mkdir(parents=True)
    (src / "test_lmdb").mkdir()
    (src / "test_lmdb" / "data.mdb").write_bytes(b"")
    (src / "test_videos.json").write_text("{}")
    (src / "meta.json").write_text(json.dumps({"counts": {"train": 9}}))
    (src / "train.txt").write_text("".join(f"frames/v{i}/0001.jpg {i % 3}\n" for i in range(9)))
    return src


def test_ucf101_data_is_the_converted_folder_with_a_list_order_per_seed(tmp_path):
    """UCF101 uses the converted folder as it is: each seed its own order of train.txt, the test LMDB,
    the folder as the ImageData root and as the final test's data."""
    src = _converted_ucf101(tmp_path / "ucf101_conv")
    info = S.prepare_data("ucf101", str(src), S.BUDGETS["paper"], tmp_path / "data", [1, 2], progress=False)
    lists = {s: tmp_path / "data" / "ucf101" / f"train_seed{s}.txt" for s in (1, 2)}
    assert info["train"] == {s: str(p.resolve()) for s, p in lists.items()}
    assert info["val"] == {1: str(src / "test_lmdb"), 2: str(src / "test_lmdb")}
    assert info["root"] == str(src.resolve()) + "/" and info["evaluate"] == str(src.resolve())
    assert info["counts"] == {"train": 9}
    every = (src / "train.txt").read_text().splitlines()
    one, two = (lists[s].read_text().splitlines() for s in (1, 2))
    assert one != two and sorted(one) == sorted(two) == sorted(every)
    # a validation LMDB of its own beside the test LMDB (not the converter's link to it) is the one held out
    (src / "val_lmdb").mkdir()
    (src / "val_lmdb" / "data.mdb").write_bytes(b"")
    info = S.prepare_data("ucf101", str(src), S.BUDGETS["paper"], tmp_path / "data", [1], progress=False)
    assert info["val"] == {1: str(src / "val_lmdb")}


# ---------------------------------------------------------------------- pretrained_weights
def test_weights_override_is_the_file_given(monkeypatch, tmp_path):
    """`--weights vgg16=FILE` fine-tunes from FILE, whether or not the Model Zoo file is there."""
    monkeypatch.setattr(S, "WEIGHTS_DIR", str(tmp_path / "zoo_is_empty"))
    mine = tmp_path / "my_vgg16.caffemodel"
    mine.write_bytes(b"weights")
    assert S.pretrained_weights("vgg16", {"vgg16": str(mine)}) == str(mine.resolve())
    zoo = tmp_path / "zoo"
    (zoo / "VGG_ILSVRC_16_layers.caffemodel").parent.mkdir()
    (zoo / "VGG_ILSVRC_16_layers.caffemodel").write_bytes(b"zoo")
    monkeypatch.setattr(S, "WEIGHTS_DIR", str(zoo))
    assert S.pretrained_weights("vgg16", {"vgg16": str(mine)}) == str(mine.resolve())


def test_weights_default_to_the_model_zoo_file(monkeypatch, tmp_path):
    """Without an override for the net, its Model Zoo file in WEIGHTS_DIR; a net trained from scratch
    has none."""
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "bvlc_alexnet.caffemodel").write_bytes(b"zoo")
    monkeypatch.setattr(S, "WEIGHTS_DIR", str(zoo))
    expected = str((zoo / "bvlc_alexnet.caffemodel").resolve())
    assert S.pretrained_weights("alexnet") == expected
    assert S.pretrained_weights("alexnet", {"vgg16": str(tmp_path / "other.caffemodel")}) == expected
    assert S.pretrained_weights("cnn2", {"cnn2": "x"}) is None


# ---------------------------------------------------------------------- write_run
def test_information_kl_weight_is_set_from_the_training_set_count(tmp_path):
    """Information Dropout's KL term weighs beta / N_train with N_train the sweep's training images
    (the data's counts), not the prototxt's 50,000."""
    from exdrop.experiments.variants import information_kl_weight
    data = {"train": {1: str(tmp_path / "train_lmdb")}, "val": {1: str(tmp_path / "val_lmdb")},
            "counts": {"train": 1000, "val_per_class": [7] * 10}}
    run = S.write_run(S.Run("cifar10", "information", 0.5, 1, tmp_path / "r"), SUBSET, data)
    net = cio.read_net_prototxt(run.folder / "net.prototxt")
    (lp,) = [lp for lp in net.layer if lp.type == "Python" and lp.python_param.layer == "InformationDropout"]
    assert list(lp.loss_weight) == [0, pytest.approx(information_kl_weight(1000))]
    assert information_kl_weight(1000) != pytest.approx(information_kl_weight(50000))


def test_table3_final_test_command_is_a_quiet_exdrop_test_of_the_last_snapshot(tmp_path):
    """A fine-tuned run's second command: `python -m exdrop test SOLVER --weights <the final snapshot,
    named from the solver's snapshot_prefix as the trainer names it> --data <converted folder> --quiet`,
    a command line that `exdrop test` accepts."""
    from exdrop import cli
    conv = tmp_path / "ucf101_conv"
    data = {"train": {1: str(tmp_path / "train_seed1.txt")}, "val": {1: str(conv / "test_lmdb")},
            "root": str(conv) + "/", "evaluate": str(conv)}
    run = S.write_run(S.Run("ucf101", "ed", 0.5, 1, tmp_path / "r", net="alexnet"), UCF_TINY, data,
                      python="python3", device="cpu")
    sp = cio.read_solver_prototxt(run.solver)
    assert Path(sp.snapshot_prefix).name == "alexnet_ed" and sp.max_iter == 2
    ev = run.evaluate
    assert ev[:3] == ["python3", "-m", "exdrop"]
    args = cli.build_parser().parse_args(ev[3:])
    assert args.fn is cli._cmd_test
    assert args.quiet is True
    assert args.net == str(run.solver.resolve())
    assert args.weights == str(run.folder.resolve() / "snapshots" / "alexnet_ed_iter_2.caffemodel")
    assert args.data == str(conv) and args.out == str(run.folder.resolve() / S.FINAL_TEST)


# ---------------------------------------------------------------------- a torchvision .pth from a GPU
def _as_if_saved_on_gpu(path: Path) -> None:
    """Rewrite a torch.save zip so that its storages say they were saved on cuda:0 (as a .pth
    written on a GPU machine does); the tensor data is unchanged."""
    with zipfile.ZipFile(path) as z:
        items = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    cpu, gpu = b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0"   # protocol-2 BINUNICODE strings
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, blob in items:
            if name.endswith("data.pkl"):
                assert cpu in blob
                blob = blob.replace(cpu, gpu)
            z.writestr(name, blob)


def test_torchvision_pth_saved_on_a_gpu_loads_onto_the_cpu(tmp_path):
    """A torchvision-style state dict saved on another device (a GPU) loads into a CPU net: its
    storages are mapped to the CPU, not restored where they were saved."""
    from exdrop.engine.net import Net
    from exdrop.engine.pretrained import input_transform, load_pretrained
    from exdrop.engine.pylayer import TEST
    from exdrop.experiments.bench import with_input_layer
    param = cio.read_net_prototxt(S.ROOT / "prototxt/cnn2/cifar10/train_val_ed.prototxt")
    net = Net(with_input_layer(param, TEST, 1, (3, 32, 32)), TEST, torch.device("cpu"), "cnn2")
    g = torch.Generator().manual_seed(0)
    state, names = {}, []
    for kind, prefix in (("Convolution", "features"), ("InnerProduct", "classifier")):
        for i, layer in enumerate(lp for lp in net.layer_list if lp.type == kind and len(lp.blobs)):
            state[f"{prefix}.{i}.weight"] = torch.randn(tuple(layer.blobs[0].shape), generator=g)
            state[f"{prefix}.{i}.bias"] = torch.randn(tuple(layer.blobs[1].shape), generator=g)
            names.append(layer.name)
    pth = tmp_path / "cnn2_from_gpu.pth"
    torch.save(state, pth)
    _as_if_saved_on_gpu(pth)
    report = load_pretrained(net, pth, input_transform(param))
    assert report["format"] == "torchvision state dict" and report["loaded"] == names
    second = next(lp for lp in net.layer_list if lp.name == names[1])
    assert second.blobs[0].device.type == "cpu"
    assert torch.equal(second.blobs[0].detach(), state["features.1.weight"])


def test_execute_counts_finished_runs_and_gives_each_worker_its_threads(tmp_path):
    """The first line counts the runs already finished; each worker process gets the thread count
    in both OMP_NUM_THREADS and MKL_NUM_THREADS (torch's CPU kernels read either)."""
    done = [tmp_path / "done1", tmp_path / "done2"]
    for folder in done:
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"status": "finished", "iterations": 8, "max_iter": 8}))
    todo = tmp_path / "todo"
    todo.mkdir()
    record = ("import json, os, sys; folder = sys.argv[1]; "
              "open(folder + '/env.json', 'w').write(json.dumps({k: os.environ.get(k) for k in "
              "('OMP_NUM_THREADS', 'MKL_NUM_THREADS')})); "
              "open(folder + '/results.json', 'w').write(json.dumps({'status': 'finished', 'iterations': 8, "
              "'max_iter': 8}))")
    runs = [S.Run("cifar10", "none", 0.5, seed, folder, command=[sys.executable, "-c", "raise SystemExit(3)"])
            for seed, folder in enumerate(done, 1)]
    runs += [S.Run("cifar10", "ed", 0.5, 1, todo, command=[sys.executable, "-c", record, str(todo)])]
    said = []
    assert S.execute(runs, workers=1, threads=3, gpus=0, echo=said.append) == {"runs": 3, "ran": 1, "failed": []}
    assert said[0] == "sweep: 3 runs, 2 finished, 1 to run with 1 worker(s), 3 thread(s) each"
    assert json.loads((todo / "env.json").read_text()) == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}


def test_regime_thresholds_are_inclusive(tmp_path):
    """A No Dropout run exactly at the thresholds (train accuracy 0.95, last held-out loss 1.05 x its
    minimum) fits and rises, as the check's text says (">=")."""
    assert S.REGIME_TRAIN_ACCURACY == 0.95 and (1 + S.REGIME_LOSS_RISE) * 2.0 == 2.1
    _plan_of(tmp_path, {("none", 1): ([0.95], [(2, 0.5, 2.0), (4, 0.5, 2.1)]),
                        ("standard_fc1", 1): ([0.8], [(4, 0.60, 1.1)])})
    check = S.regime(S.collect(tmp_path))
    assert check["overfits"] is True and check["held_out_loss_rises"] is True and check["ok"] is True


def test_closing_a_record_reader_twice_is_harmless(tmp_path):
    from exdrop.data.stream import LMDBRecords
    write_datum_lmdb(tmp_path / "db", np.zeros((2, 1, 2, 2), np.uint8), [0, 1])
    records = LMDBRecords(tmp_path / "db")
    assert len(records) == 2
    records.close()
    records.close()
    assert records.db is None


def _figure_of(monkeypatch, draw):
    """The matplotlib figure that ``draw()`` saves and closes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    closed, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: closed.append(fig) or close(fig))
    draw()
    return closed[-1]


def test_fig3_draws_excitation_thicker_and_says_when_there_is_nothing(tmp_path, monkeypatch):
    _plan_of(tmp_path, {("none", 1): ([0.9], [(2, 0.40, 1.2), (4, 0.50, 1.3)]),
                        ("ed", 1): ([0.8], [(2, 0.45, 1.1), (4, 0.55, 1.0)]),
                        ("ed", 2): ([0.8], [(2, 0.43, 1.1), (4, 0.57, 1.0)])})
    summary = S.collect(tmp_path)
    fig = _figure_of(monkeypatch, lambda: S.plot_fig3(summary, "cifar10", tmp_path / "fig3.png"))
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    assert set(lines) == {"No Dropout (n=1)", "Excitation (n=2)"}
    assert lines["Excitation (n=2)"].get_linewidth() == 2.2 and lines["No Dropout (n=1)"].get_linewidth() == 1.4
    assert list(lines["Excitation (n=2)"].get_ydata()) == pytest.approx([44.0, 56.0])
    empty = _figure_of(monkeypatch, lambda: S.plot_fig3(summary, "cifar100", tmp_path / "none.png"))
    (note,) = empty.axes[0].texts
    assert note.get_text() == "no test results yet" and (note.get_ha(), note.get_va()) == ("center", "center")


def test_table_of_the_authors_recipe_keeps_its_budget_line(tmp_path):
    _plan_of(tmp_path, {("none", 1): ([0.9], [(4, 0.50, 1.3)]), ("ed", 1): ([0.8], [(4, 0.55, 1.0)])})
    summary = {**S.collect(tmp_path), "recipe": "authors"}
    lines = S.table_markdown(summary, "2").splitlines()
    assert lines[0] == S._budget_line(summary) and lines[0]
    assert lines[2] == f"Recipe: {S.RECIPE_LABELS['authors']}."
    assert "| cifar10 | 50.00 (n=1) [76.91] | 55.00 (n=1) [81.94] |" in lines


def test_ucf101_at_a_reduced_budget_says_how_to_run_it(tmp_path):
    src = _converted_ucf101(tmp_path / "ucf101_conv")
    with pytest.raises(ValueError, match=rf"budget '{REDUCED.name}' subsets the training images per class, which is "
                                         r"defined for CNN-2 only; fine-tune on UCF101 at BUDGET=paper \(a GPU's "
                                         r"work\), or stop the runs early with --max-iter N \(MAX_ITER=N\): a reduced "
                                         r"budget, labelled so$"):
        S.prepare_data("ucf101", str(src), REDUCED, tmp_path / "data", [1], progress=False)


def test_seeded_order_is_written_again_only_when_its_source_seed_or_size_changed(tmp_path):
    src = Path(_lmdb(tmp_path / "src", 12, 0))
    dst = tmp_path / "ordered"

    def labels():
        with DatumLMDB(dst) as db:
            return db.read_all()[1].tolist()

    S._seeded_order(src, dst, 1)
    first, stamp = labels(), (dst / "data.mdb").stat().st_mtime_ns
    assert json.loads((dst / "order.json").read_text()) == {"source": str(src.resolve()), "seed": 1, "records": 12}
    S._seeded_order(src, dst, 1)
    assert (dst / "data.mdb").stat().st_mtime_ns == stamp                        # kept
    S._seeded_order(src, dst, 2)
    assert sorted(labels()) == sorted(first) and labels() != first               # another seed: another order
    _lmdb(src, 13, 0)                                                            # the source converted again
    S._seeded_order(src, dst, 2)
    assert sorted(labels()) == list(range(13))


def test_plan_txt_is_one_command_line_per_run(no_conversion, tmp_path):
    runs = S.plan(tmp_path / "sweep", ["cifar10"], ["none", "ed"], [0.5], [1, 2], S.BUDGETS["paper"], {"cifar10": "src"},
                  progress=False)
    lines = (tmp_path / "sweep" / "plan.txt").read_text().splitlines(keepends=True)
    assert len(runs) == 4 and lines == [S._plan_line(r) for r in runs]
    assert all(line.startswith("cd ") and " -m exdrop train " in line for line in lines)


def test_caltech256_at_a_reduced_budget_says_why_not(tmp_path):
    with pytest.raises(ValueError, match=r"^the caltech256 data of the paper is already 50 train / 20 test images per "
                                         r"class; run it at BUDGET=paper \(no CPU budget is defined for 128x128 "
                                         r"CNN-2\)$"):
        S.prepare_data("caltech256", "src", REDUCED, tmp_path / "data", [1], progress=False)


def test_cifar100_converts_into_the_budgets_split_folder(no_conversion, tmp_path):
    S.prepare_data("cifar100", "src", SUBSET, tmp_path / "data", [1], progress=False)
    assert [Path(kw["out_dir"]) for kw in no_conversion] == [tmp_path / "data" / f"cifar100_{SUBSET.name}" / "split"]


def test_an_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"^unknown recipe 'adam': one of paper, authors$"):
        S.variant_paths("cifar10", "ed", recipe="adam")


def test_regime_reads_only_its_dataset_at_rate_half_and_names_the_paper_recipe_by_default(tmp_path):
    _plan_of(tmp_path, {("none", 1): ([0.99], [(2, 0.5, 1.2), (4, 0.5, 1.4)]),
                        ("standard_fc1", 1): ([0.8], [(4, 0.62, 1.1)])})
    summary = S.collect(tmp_path)
    summary.pop("recipe", None)
    other = [{**c, "dataset": "cifar100", "runs": [{**r, "accuracy": 0.0} for r in c["runs"]]}
             for c in summary["cells"] if c["method"] == "none"]
    summary["cells"] += other
    check = S.regime(summary)
    assert check["recipe"] == "paper"
    assert [s["held_out_accuracy"] for s in check["none"]] == [pytest.approx(0.5)]   # not cifar100's run


def test_fig3_is_saved_at_110_dpi(tmp_path):
    import matplotlib.image as mpimg
    _plan_of(tmp_path, {("ed", 1): ([0.8], [(2, 0.45, 1.1), (4, 0.55, 1.0)])})
    png = S.plot_fig3(S.collect(tmp_path), "cifar10", tmp_path / "fig3.png")
    assert mpimg.imread(png).shape[:2] == (round(4.5 * 110), 7 * 110)


def test_paired_differences_default_to_cifar10(tmp_path):
    _plan_of(tmp_path, {("standard_fc1", 1): ([0.8], [(4, 0.60, 1.1)]), ("ed", 1): ([0.7], [(4, 0.58, 1.2)])})
    summary = S.collect(tmp_path)
    assert S.paired(summary) == S.paired(summary, "cifar10") and S.paired(summary)


def test_a_missing_variant_names_the_dataset_and_the_fine_tuned_net():
    with pytest.raises(FileNotFoundError, match=r"^no prototxt for method 'adaptive' on ucf101 \(alexnet\): .*"
                                                r"prototxt/alexnet/ucf101/train_val_adaptive.prototxt$"):
        S.variant_paths("ucf101", "adaptive", "alexnet")
    with pytest.raises(FileNotFoundError, match=r"^no prototxt for method 'ed' on cifar100 under the authors recipe "
                                                r"\(defined for cifar10 only\): "):
        S.variant_paths("cifar100", "ed", recipe="authors")


def test_a_plan_without_a_recipe_is_a_paper_recipe_plan_and_keeps_its_finished_runs(no_conversion, tmp_path):
    """plan.json from before recipes were recorded: its finished runs are kept by a later paper-recipe plan."""
    out = tmp_path / "sweep"
    S.plan(out, ["cifar10"], ["none", "ed"], [0.5], [1], SUBSET, {"cifar10": "src"}, progress=False)
    (out / "cifar10" / "none" / "seed1" / "results.json").write_text(json.dumps({"status": "finished", "iterations": 4,
                                                                                "max_iter": 4}))
    old = json.loads((out / "plan.json").read_text())
    del old["recipe"]
    (out / "plan.json").write_text(json.dumps(old))
    S.plan(out, ["cifar10"], ["ed"], [0.5], [1], SUBSET, {"cifar10": "src"}, progress=False)
    assert [r["key"] for r in json.loads((out / "plan.json").read_text())["runs"]] == ["cifar10/ed_r0.5/seed1",
                                                                                      "cifar10/none_r0.5/seed1"]


def test_an_ablation_changes_only_the_excitation_dropout_layers(monkeypatch, tmp_path):
    """A net with another Python layer beside Excitation Dropout: the ablation's param_str goes to the
    Excitation Dropout layer alone."""
    net_path, solver = S.variant_paths("cifar10", "ed")
    text = net_path.read_text()
    extra = ('layer { name: "noise" type: "Python" bottom: "ip2" top: "ip2" python_param { module: "standard_dropout" '
             'layer: "StandardDropout" param_str: "{\'dropout_ratio\': 0.3}" } }\n')
    custom, own_solver = tmp_path / "train_val_ed.prototxt", tmp_path / "solver_ed.prototxt"
    custom.write_text(text + extra)
    own_solver.write_text(solver.read_text())
    monkeypatch.setattr(S, "variant_paths", lambda *a, **k: (custom, own_solver))
    monkeypatch.setattr(S, "ROOT", tmp_path)   # the run folder names its prototxts relative to the repository
    data = {"train": {1: str(tmp_path / "t")}, "val": {1: str(tmp_path / "v")}}
    run = S.write_run(S.Run("cifar10", "ed_norescale", 0.5, 1, tmp_path / "run"), SUBSET, data)
    written = cio.read_net_prototxt(run.folder / "net.prototxt")
    params = {lp.name: lp.python_param.param_str for lp in written.layer if lp.type == "Python"}
    assert params["noise"] == "{'dropout_ratio': 0.3}"
    assert [("'rescale': False" in p) for name, p in params.items() if name != "noise"] == [True]
    # an Excitation Dropout layer whose param_str cannot be read: the error names the file and the layer
    ed_name = next(name for name in params if name != "noise")
    custom.write_text(text.replace("param_str: \"{'dropout_ratio': 0.5}\"", "param_str: \"{'dropout_ratio': }\""))
    assert custom.read_text() != text
    with pytest.raises(ValueError, match=rf"^{re.escape(str(custom))}: layer '{ed_name}': cannot parse"):
        S.write_run(S.Run("cifar10", "ed_norescale", 0.5, 1, tmp_path / "run2"), SUBSET, data)


def test_execute_runs_each_command_in_the_repository_that_planned_it(tmp_path, monkeypatch):
    """`python -m exdrop` puts the working folder first on sys.path: run from the repository (a
    worktree's, say), the runs import its exdrop, whatever folder the sweep was started from."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "r"
    folder.mkdir()
    record = "import os, sys; open(sys.argv[1] + '/cwd.txt', 'w').write(os.getcwd())"
    S.execute([S.Run("cifar10", "ed", 0.5, 1, folder, command=[sys.executable, "-c", record, str(folder)])],
              workers=1, gpus=0, echo=lambda *a: None)
    assert (folder / "cwd.txt").read_text() == str(S.ROOT)


def test_execute_divides_the_cores_among_the_workers_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(S.os, "cpu_count", lambda: 8)
    record = ("import json, os, sys; open(sys.argv[1] + '/env.json', 'w').write(json.dumps(os.environ['OMP_NUM_THREADS']))")
    folders = [tmp_path / f"r{i}" for i in range(2)]
    runs = []
    for i, folder in enumerate(folders):
        folder.mkdir()
        runs.append(S.Run("cifar10", "ed", 0.5, i + 1, folder, command=[sys.executable, "-c", record, str(folder)]))
    said = []
    S.execute(runs, workers=2, gpus=0, echo=said.append)
    assert said[0] == "sweep: 2 runs, 0 finished, 2 to run with 2 worker(s), 4 thread(s) each"
    assert [json.loads((f / "env.json").read_text()) for f in folders] == ["4", "4"]
