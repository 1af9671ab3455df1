"""One run on many processes (issue 12, item 6): ``torchrun -m exdrop train`` with
DistributedDataParallel, here 2 gloo processes on the CPU.

The prototxt's batch is the global batch, split over the processes: a dropout-free net follows
the one-process run up to float sums (the same crops and mirrors, the averaged gradients); a
guided net gives each image the one-process p_EB, with its own mask draws. Rank 0 writes the run
folder once; a resume with the same number of processes continues exactly.
"""
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exdrop.engine import distributed as dist
from exdrop.proto.io import read_caffemodel
from exdrop.engine.net import Net
from exdrop.engine.pylayer import TRAIN

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from caffe_nets import TINY_LOSS, TINY_NET  # noqa: E402


def _net(data: Path, guided: bool) -> str:
    """tests/caffe_nets.py's tiny net on the fixture: a random 8x8 crop and mirror in TRAIN (both
    processes must draw the one-process crops), batches of 8 and 6 that split over 2 processes,
    with its Excitation Dropout layer or without it."""
    text = TINY_NET.format(train=f"{data}/train_lmdb", val=f"{data}/val_lmdb", loss=TINY_LOSS)
    text = text.replace("transform_param { scale: 0.00390625 }",
                        "transform_param { scale: 0.00390625 crop_size: 8 mirror: true }", 1)   # TRAIN's
    text = text.replace("transform_param { scale: 0.00390625 }", "transform_param { scale: 0.00390625 crop_size: 8 }")
    text = text.replace("batch_size: 4", "batch_size: 8").replace("batch_size: 3", "batch_size: 6")
    if not guided:
        text, n = re.subn(r'layer \{ name: "drop".*?\} \}\n', "", text, flags=re.S)
        assert n == 1
    return text


SOLVER = """net: "{net}"
test_iter: 2
test_interval: 6
display: 1
average_loss: 1
max_iter: 12
type: "SGD"
base_lr: 0.05
momentum: 0.9
weight_decay: 0.001
lr_policy: "fixed"
snapshot: 6
snapshot_prefix: "models/ddp/tiny"
solver_mode: CPU
random_seed: 3
"""


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    """48 train / 12 val 10x10 images in 3 classes (one channel darker per class), and the two nets."""
    from exdrop.data import write_datum_lmdb
    tmp = tmp_path_factory.mktemp("ddp")
    rng = np.random.default_rng(0)
    for name, n in (("train", 48), ("val", 12)):
        labels = rng.integers(0, 3, n)
        images = rng.integers(0, 256, (n, 3, 10, 10), dtype=np.uint8)
        images[np.arange(n), labels] //= 3
        write_datum_lmdb(tmp / f"{name}_lmdb", images, labels)
    solvers = {}
    for kind in ("plain", "ed"):
        net = tmp / f"{kind}.prototxt"
        net.write_text(_net(tmp, guided=kind == "ed"))
        solvers[kind] = tmp / f"solver_{kind}.prototxt"
        solvers[kind].write_text(SOLVER.format(net=net))
    return solvers


def _train(solver, out, processes: int, *extra):
    """`exdrop train` as one process, or under torchrun with ``processes`` gloo processes."""
    launch = [sys.executable, "-m", "exdrop"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
         "-m", "exdrop"]
    cmd = launch + ["train", str(solver), "--out", str(out), "--device", "cpu", "--quiet",
                    "--keep-snapshots", "0", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _log(out):
    with open(Path(out) / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _series(rows, phase, key):
    return np.array([float(r[key]) for r in rows if r["phase"] == phase])


def _weights(path):
    return {lp.name: [np.asarray(b.data, np.float32) for b in lp.blobs] for lp in read_caffemodel(path).layer}


def test_two_processes_follow_one_process_without_dropout(fixture, tmp_path):
    """The same global batch of 8 split 4 + 4: the loss at every iteration, the test numbers and
    the final weights of the one-process run, up to float sums; the run folder is written once."""
    _train(fixture["plain"], tmp_path / "one", 1)
    proc = _train(fixture["plain"], tmp_path / "two", 2)
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [(r["iter"], r["phase"]) for r in one] == [(r["iter"], r["phase"]) for r in two]   # no row twice
    for phase, key in (("train", "loss"), ("train", "accuracy"), ("test", "loss"), ("test", "accuracy"),
                       ("test", "entropy_act"), ("test", "neurons_on")):
        np.testing.assert_allclose(_series(two, phase, key), _series(one, phase, key), rtol=1e-5, atol=1e-6,
                                   err_msg=f"{phase} {key}")
    assert len(_series(one, "train", "loss")) == 12
    # the training moved the weights, identically
    from exdrop.run.init_weights import iteration0_weights
    with iteration0_weights(tmp_path / "one") as init:   # the many-process run's, drawn again in this process
        w0 = _weights(init)
    w1, w2 = (_weights(p) for p in (tmp_path / "one/snapshots/tiny_iter_12.caffemodel",
                                    tmp_path / "two/snapshots/tiny_iter_12.caffemodel"))
    assert np.abs(w1["ip1"][0] - w0["ip1"][0]).max() > 1e-3
    for name in w1:
        for a, b in zip(w2[name], w1[name]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    snaps = sorted(p.name for p in (tmp_path / "two/snapshots").iterdir())
    assert snaps == sorted(f"tiny_iter_{i}.{ext}" for i in (6, 12) for ext in ("caffemodel", "engine.pt", "solverstate"))
    import json
    res = json.loads((tmp_path / "two/results.json").read_text())
    assert res["processes"] == 2 and res["status"] == "finished" and res["iterations"] == 12
    assert proc.stdout.count("final: 12 iterations") == 1   # rank 0 speaks


def test_two_processes_resume_exactly(fixture, tmp_path):
    """Excitation Dropout on 2 processes, stopped at 6 and resumed (`--snapshot auto`: a run finished
    at 6 goes on to the solver's 12): the uninterrupted run's losses and weights (each process's
    mask RNG is in the snapshot); 1 process may not resume it exactly."""
    _train(fixture["ed"], tmp_path / "whole", 2)
    _train(fixture["ed"], tmp_path / "parts", 2, "--max-iter", "6")
    _train(fixture["ed"], tmp_path / "parts", 2, "--snapshot", "auto")   # finished at 6, the solver says 12
    whole, parts = _log(tmp_path / "whole"), _log(tmp_path / "parts")
    assert [(r["iter"], r["phase"]) for r in whole] == [(r["iter"], r["phase"]) for r in parts]
    np.testing.assert_array_equal(_series(parts, "train", "loss"), _series(whole, "train", "loss"))
    a = _weights(tmp_path / "whole/snapshots/tiny_iter_12.caffemodel")
    b = _weights(tmp_path / "parts/snapshots/tiny_iter_12.caffemodel")
    for name in a:
        for x, y in zip(a[name], b[name]):
            np.testing.assert_array_equal(x, y, err_msg=name)
    # the masks differ from one process's: the losses are not the one-process losses
    _train(fixture["ed"], tmp_path / "one", 1)
    assert not np.allclose(_series(_log(tmp_path / "one"), "train", "loss")[1:], _series(whole, "train", "loss")[1:])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "exdrop", "train", str(fixture["ed"]), "--out", str(tmp_path / "x"),
                           "--device", "cpu", "--quiet", "--snapshot",
                           str(tmp_path / "whole/snapshots/tiny_iter_6.solverstate")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "written by 2 process(es), this run has 1" in proc.stderr


def test_guided_dropout_gets_each_images_one_process_p_eb(fixture, monkeypatch):
    """In process, the nets of rank 0 and rank 1 of 2 against the one-process net (same seed): each
    reads its half of the same batch (the same crops and mirrors), and Excitation Dropout gets the
    one-process p_EB for each of its images; only the mask draws are the process's own."""
    from exdrop.proto.io import read_net_prototxt
    param = read_net_prototxt(str(fixture["ed"]).replace("solver_ed", "ed"))
    seen = {}
    saliency = Net._saliency

    def record(self, i, layer, blobs):
        p = saliency(self, i, layer, blobs)
        seen[self.world] = (blobs["data"].clone(), blobs["label"].clone(), p.clone())
        return p
    monkeypatch.setattr(Net, "_saliency", record)
    for world in (None, dist.World(0, 2), dist.World(1, 2)):
        torch.manual_seed(7)
        net = Net(param, TRAIN, "cpu", "ed", world=world, search_paths=[ROOT / "layers"])
        assert net.blob_shapes["data"][0] == (8 if world is None else 4)
        net()
    for k, part in ((0, slice(0, 4)), (1, slice(4, 8))):
        data, label, p = seen[dist.World(k, 2)]
        torch.testing.assert_close(data, seen[None][0][part])
        torch.testing.assert_close(label, seen[None][1][part])
        torch.testing.assert_close(p, seen[None][2][part], rtol=1e-5, atol=1e-7)


def test_global_batch_must_split(fixture):
    from exdrop.proto.io import read_net_prototxt
    from exdrop.engine.net import LayerError
    param = read_net_prototxt(str(fixture["plain"]).replace("solver_plain", "plain"))
    with pytest.raises((ValueError, LayerError), match="batch_size 8 does not split over 3 processes"):
        Net(param, TRAIN, "cpu", "plain", world=dist.World(0, 3))


def test_world_from_torchrun_environment():
    assert dist.world_from_env({}) == dist.ONE
    assert dist.world_from_env({"WORLD_SIZE": "", "RANK": "0"}) == dist.ONE   # set but empty: one process
    assert dist.world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == dist.World(3, 4, 1)
    with pytest.raises(RuntimeError, match="torchrun"):
        dist.world_from_env({"WORLD_SIZE": "2"})


def test_slurm_array_runs_one_plan_line_unchanged(tmp_path):
    """scripts/slurm_sweep.sbatch: array task N runs line N of a sweep's plan.txt as it is."""
    plan = tmp_path / "plan.txt"
    plan.write_text("".join(f"cd {tmp_path} && echo run{k} > out{k}.txt\n" for k in (1, 2, 3)))
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="2")
    proc = subprocess.run(["bash", str(ROOT / "scripts/slurm_sweep.sbatch"), str(plan)], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.glob("out*.txt")) == ["out2.txt"]
    assert (tmp_path / "out2.txt").read_text() == "run2\n"
    env["SLURM_ARRAY_TASK_ID"] = "4"
    proc = subprocess.run(["bash", str(ROOT / "scripts/slurm_sweep.sbatch"), str(plan)], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "has no line 4" in proc.stderr
    for script in ("scripts/slurm_sweep.sbatch", "scripts/slurm_torchrun.sbatch"):
        assert subprocess.run(["bash", "-n", str(ROOT / script)]).returncode == 0


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_every_process_at_one_iteration(fixture, tmp_path, signame):
    """SIGINT or SIGTERM to torchrun (which passes it to its processes): both agree on one iteration (a
    multiple of STOP_CHECK_EVERY), rank 0 writes one snapshot there and says how to resume."""
    import json
    import signal
    import time
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "exdrop",
           "train", str(fixture["plain"]), "--out", str(out), "--device", "cpu", "--quiet", "--max-iter", "1000000",
           "--snapshot-every", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:   # wait until it trains
        if (out / "log.csv").is_file() and len((out / "log.csv").read_text().splitlines()) > 30:
            break
        time.sleep(0.5)
    proc.send_signal(getattr(signal, signame))
    text = proc.communicate(timeout=120)[0]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "interrupted" and res["processes"] == 2, text[-2000:]
    it = res["iterations"]
    assert it % dist.STOP_CHECK_EVERY == 0 and it > 0
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == \
        [f"tiny_iter_{it}.{ext}" for ext in ("caffemodel", "engine.pt", "solverstate")]
    assert text.count(f"interrupted at iteration {it}") == 1
    assert "resume with: torchrun --nproc_per_node=2 -m exdrop train" in text


def test_host_collectives_call_torch_distributed_as_rank_0_sends(monkeypatch):
    """broadcast / gather / any_over / barrier of an active world, with torch.distributed's
    collectives stood in for (the torchrun tests above run them for real, in subprocesses): each
    names rank 0 as the source and the host group, and returns what the collective delivered."""
    import torch.distributed as tdist
    calls = []
    marker = object()
    monkeypatch.setattr(dist, "_host_group", marker)

    def broadcast_object_list(box, src, group):
        calls.append(("broadcast", src, group))
        box[0] = "rank 0's object"

    def all_gather_object(out, obj, group):
        calls.append(("gather", group))
        out[:] = [f"from {r}" for r in range(len(out))]

    def all_reduce(t, op, group):
        calls.append(("all_reduce", op, group))
        t.fill_(1)

    def barrier(group):
        calls.append(("barrier", group))

    for name, fake in (("broadcast_object_list", broadcast_object_list), ("all_gather_object", all_gather_object),
                       ("all_reduce", all_reduce), ("barrier", barrier)):
        monkeypatch.setattr(tdist, name, fake)
    world = dist.World(rank=1, size=3, local_rank=1)
    assert dist.broadcast(world, "rank 1's object") == "rank 0's object"
    assert dist.gather(world, "mine") == ["from 0", "from 1", "from 2"]
    assert dist.any_over(world, False) is True
    dist.barrier(world)
    assert calls == [("broadcast", 0, marker), ("gather", marker), ("all_reduce", tdist.ReduceOp.MAX, marker),
                     ("barrier", marker)]
    calls.clear()
    assert dist.broadcast(dist.ONE, "mine") == "mine" and dist.gather(dist.ONE, "mine") == ["mine"]
    assert dist.any_over(dist.ONE, True) is True and dist.any_over(dist.ONE, False) is False
    dist.barrier(dist.ONE)
    assert calls == []
    # init: NCCL on CUDA with a gloo group for the host-side flags, gloo alone on the CPU
    monkeypatch.setattr(tdist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(tdist, "new_group", lambda backend: calls.append(("group", backend)) or "host group")
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    for device, want, host in (("cuda", [("init", "nccl"), ("group", "gloo")], "host group"),
                               ("cpu", [("init", "gloo")], None)):
        calls.clear()
        dist.init(world, torch.device(device))
        assert calls == want and dist._host_group == host, device
    calls.clear()
    dist.init(dist.ONE, torch.device("cpu"))   # one process: no group
    assert calls == []
    # close ends only a group this launch made: never one that a single process's caller set up
    monkeypatch.setattr(tdist, "destroy_process_group", lambda: calls.append("destroy"))
    for initialized, w, destroys in ((True, dist.ONE, False), (False, world, False), (True, world, True)):
        monkeypatch.setattr(tdist, "is_initialized", lambda: initialized)
        calls.clear()
        dist.close(w)
        assert calls == ["destroy"] * destroys, (initialized, w)


def test_sum_and_mean_over_an_active_world_keep_each_tensors_shape_and_dtype(monkeypatch):
    """sum_over packs the tensors into one float32 all-reduce and unpacks them in order, each in its
    own shape and dtype, times ``scale``; mean_over scales by 1 / size (torch.distributed stood in for:
    three processes holding the same values)."""
    import torch.distributed as tdist
    reduced = []
    monkeypatch.setattr(tdist, "all_reduce", lambda t: reduced.append(t.numel()) or t.mul_(3))
    world = dist.World(rank=2, size=3)
    a = torch.arange(6, dtype=torch.float64).view(2, 3)
    b = torch.tensor([1.5, -2.0, 0.25, 4.0])
    c = torch.tensor(7, dtype=torch.int64)
    sa, sb, sc = dist.sum_over(world, [a, b, c])
    assert reduced == [11]
    for got, want in ((sa, 3 * a), (sb, 3 * b), (sc, 3 * c)):
        assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
    ma, mb = dist.mean_over(world, [a, b])
    assert torch.equal(ma, a) and torch.equal(mb, b) and ma.dtype == torch.float64
    assert dist.sum_over(world, [a], scale=0.5)[0].tolist() == (1.5 * a).tolist()
    assert dist.sum_over(dist.ONE, [a])[0] is a and dist.sum_over(world, []) == [] and reduced == [11, 10, 6]
