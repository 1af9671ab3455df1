"""The train_val_/solver_ variants are generated from the base files (exdrop/experiments/variants.py):
the committed files are up to date, parse, hold exactly the table's dropout layers right
after their ReLUs and are their base otherwise; the bases are complete nets and solvers."""
import ast
import shutil
from dataclasses import replace

import pytest
import torch

from exdrop.proto import io
from exdrop.engine import layer_types
from exdrop.experiments import variants
from exdrop.experiments.bench import with_input_layer
from exdrop.engine.net import Net
from exdrop.engine.pylayer import TEST, TRAIN
from exdrop.engine.solver import make_solver
from exdrop.experiments.variants import PROTO, TABLE, Drop

GENERATED = variants.generate()
VARIANTS = [(folder, name) for folder, vs in TABLE.items() for name in vs]
BASE_NETS = sorted({PROTO / f / v.base for f, vs in TABLE.items() for v in vs.values()})
BASE_SOLVERS = sorted({PROTO / f / v.solver_base for f, vs in TABLE.items() for v in vs.values()})


def rel(p):
    return p.relative_to(PROTO).as_posix()


def ids(fv):
    return "/".join(fv)


def test_committed_files_are_regenerated_unchanged():
    for path, text in GENERATED.items():
        assert path.read_bytes() == text.encode(), f"{rel(path)} is stale: run `make prototxt`"
    assert variants.check() == []


def test_every_committed_variant_comes_from_the_table():
    from exdrop.experiments.wrn import DROPOUT, OUT   # the WRN prototxts have their own generator (tests/test_wrn.py)
    wrn = {OUT / f"{kind}_{v}.prototxt" for v in DROPOUT for kind in ("train_val", "solver")}
    on_disk = set(PROTO.rglob("train_val_*.prototxt")) | set(PROTO.rglob("solver_*.prototxt"))
    assert on_disk == set(GENERATED) | wrn
    assert not any(p.name.startswith(("train_val_", "solver_")) for p in BASE_NETS + BASE_SOLVERS)


@pytest.mark.parametrize("fv", VARIANTS, ids=ids)
def test_generated_variant_parses_and_points_at_its_net(fv):
    folder, name = fv
    net = io.parse_net(GENERATED[PROTO / folder / f"train_val_{name}.prototxt"])
    assert net.name == f"{folder.replace('/', '_')}_{name}".upper()
    sp = io.parse_solver(GENERATED[PROTO / folder / f"solver_{name}.prototxt"])
    assert sp.net == f"prototxt/{folder}/train_val_{name}.prototxt"


def _without(param, names):
    kept = [lp for lp in param.layer if lp.name not in names]
    del param.layer[:]
    param.layer.extend(kept)
    param.ClearField("name")
    return param


@pytest.mark.parametrize("fv", VARIANTS, ids=ids)
def test_dropout_follows_its_relu_in_place(fv):
    folder, name = fv
    v = TABLE[folder][name]
    net = io.parse_net(GENERATED[PROTO / folder / f"train_val_{name}.prototxt"])
    names = [lp.name for lp in net.layer]
    for d in v.drops:
        lp = net.layer[names.index(d.name)]
        relu = net.layer[names.index(d.name) - 1]
        assert relu.name == d.after and relu.type == "ReLU"
        if d.kind == "information":   # alpha(x) from the producer's input (pool3); the KL term as a second top
            assert list(lp.bottom) == [*relu.top, "pool3"] and list(lp.top) == [*relu.top, f"{d.name}_kl"]
        else:
            assert list(lp.bottom) == list(lp.top) == list(relu.top)
        if d.kind == "standard":
            assert lp.type == "Dropout" and lp.dropout_param.dropout_ratio == pytest.approx(0.5)
        else:
            module, layer, _ = variants.PYTHON_DROPOUTS[d.kind]
            assert (lp.type, lp.python_param.module, lp.python_param.layer) == ("Python", module, layer)
            params = ast.literal_eval(lp.python_param.param_str)
            # the authors' recipe: ED / Activation without the 1/scale gradient (their mask is
            # written outside the graph)
            authors = {"grad_rescale": False} if d.authors and d.kind in ("excitation", "activation") else {}
            assert name.endswith("_authors") == d.authors
            assert params == {**ast.literal_eval(variants.PYTHON_DROPOUTS[d.kind][2]), **authors}
            assert params == {**{"maskimg": {"dropout_ratio": 0.5, "per_image": True},
                                 "curriculum": {"dropout_ratio": 0.5, "gamma": 0.0005},
                                 "adaptive": {"alpha": 1.0, "beta": 0.0},
                                 "information": {"max_alpha": 0.7}}.get(d.kind, {"dropout_ratio": 0.5}), **authors}
    # and nothing else moved: without its dropout layers the variant is its base
    base = io.read_net_prototxt(PROTO / folder / v.base)
    assert _without(net, {d.name for d in v.drops}) == _without(base, set())


def test_missing_relu_is_named():
    bad = replace(TABLE["cnn2/cifar10"]["ed"], drops=(Drop("excitation", "relu9", "drop"),))
    with pytest.raises(ValueError, match=r"prototxt/cnn2/cifar10/base\.prototxt.*'relu9'"):
        variants.generate({"cnn2/cifar10": {"ed": bad}})
    not_relu = replace(bad, drops=(Drop("excitation", "ip1", "drop"),))
    with pytest.raises(ValueError, match=r"no ReLU layer named 'ip1'"):
        variants.generate({"cnn2/cifar10": {"ed": not_relu}})


def test_text_edit_keeps_comments_and_skips_braces_in_them(tmp_path):
    proto = tmp_path / "prototxt"
    (proto / "n/d").mkdir(parents=True)
    (proto / "n/d/base.prototxt").write_text(
        '# base header\nname: "X"\n'
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"  # see name: "r" {\n'
        '  inner_product_param { num_output: 2 } }\n'
        'layer {\n  name: "r" type: "ReLU"  # a brace } in a comment\n  bottom: "ip" top: "ip"\n}\n'
        '# trailing comment\nlayer { name: "loss" type: "Softmax" bottom: "ip" top: "loss" }\n')
    (proto / "n/d/base_solver.prototxt").write_text('# s\nnet: "x"\nsnapshot_prefix: "y"\nbase_lr: 0.1\n')
    table = {"n/d": {"v": variants.Variant(("# v header",), ("# v solver",), (Drop("standard", "r", "drop"),))}}
    net = variants.generate(table, proto)[proto / "n/d/train_val_v.prototxt"]
    assert net.startswith('# v header\n# Generated from base.prototxt by `make prototxt`')
    assert '\nname: "N_D_V"\n' in net
    assert ('  bottom: "ip" top: "ip"\n}\nlayer { name: "drop" type: "Dropout" bottom: "ip" top: "ip" '
            'dropout_param { dropout_ratio: 0.5 } }\n# trailing comment\n') in net
    assert "# see name: \"r\" {" in net
    assert [lp.name for lp in io.parse_net(net).layer] == ["ip", "r", "drop", "loss"]


def test_check_lists_stale_files_and_write_fixes_them(tmp_path):
    proto = tmp_path / "prototxt"
    shutil.copytree(PROTO / "cnn2/cifar10", proto / "cnn2/cifar10")
    table = {"cnn2/cifar10": TABLE["cnn2/cifar10"]}
    assert variants.check(table, proto) == []
    stale = proto / "cnn2/cifar10/train_val_ed.prototxt"
    stale.write_text(stale.read_text().replace("0.5", "0.3"))
    (proto / "cnn2/cifar10/solver_none.prototxt").unlink()
    assert sorted(variants.check(table, proto)) == sorted([stale, proto / "cnn2/cifar10/solver_none.prototxt"])
    assert len(variants.write(table, proto)) == 2
    assert variants.check(table, proto) == []


def test_cli_check_passes_on_the_committed_files():
    assert variants.main(["--check"]) == 0


# ------------------------------------------------------------------ the bases themselves

IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "caltech256": 128, "ucf101": 256}


@pytest.mark.parametrize("phase", [TRAIN, TEST], ids=["TRAIN", "TEST"])
@pytest.mark.parametrize("path", BASE_NETS, ids=rel)
def test_base_net_builds(path, phase, monkeypatch):
    monkeypatch.setattr(layer_types, "fill", lambda shape, filler, generator=None: torch.empty(shape))
    param = io.read_net_prototxt(path)
    assert not [lp for lp in param.layer if lp.type in ("Dropout", "Python")]
    crop = next(lp.transform_param.crop_size for lp in param.layer if lp.type == "Data")
    side = crop or IMAGE_SIZE[path.parent.name]
    net = Net(with_input_layer(param, phase, 1, (3, side, side)), phase, source=rel(path))
    assert "loss" in net.loss_weights


@pytest.mark.parametrize("path", BASE_SOLVERS, ids=rel)
def test_base_solver_is_valid(path):
    sp = io.read_solver_prototxt(path)
    assert (PROTO.parent / sp.net).is_file() and sp.snapshot_prefix and sp.max_iter > 0
    make_solver(sp, [])
