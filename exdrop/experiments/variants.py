"""The dropout variants of the shipped nets, written from one base file per net body.

``prototxt/<net>/<dataset>/train_val_<variant>.prototxt`` and ``solver_<variant>.prototxt``
are generated, and stay committed so that Caffe users can run them as they are. Do not edit
them: edit the folder's base instead (``base.prototxt`` for the net, ``base_solver.prototxt``
for the solver; CIFAR-10 also has ``base_authors.prototxt`` and ``base_solver_authors.prototxt``
for the authors' recipe, written for every method as ``<variant>_authors``), then run ``make prototxt`` (``python -m exdrop.experiments.variants``).
``python -m exdrop.experiments.variants --check`` writes nothing and lists the files that are out of date.

Each variant (``TABLE``) is its base with its own header comment, its ``name:`` (solvers: its
``net:`` and ``snapshot_prefix:``), and its dropout layers, each put in place on the blob of
the ReLU it follows. The edit is done on the text, so the base's comments survive.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from exdrop.paths import REPO_ROOT
from exdrop.proto import io

ROOT = REPO_ROOT   # the checkout: prototxt/, layers/ (exdrop.paths)
PROTO = ROOT / "prototxt"

# kind -> (module, layer, param_str) of the Python layers in layers/
PYTHON_DROPOUTS = {
    "excitation": ("excitation_dropout", "ExcitationDropout", "{'dropout_ratio': 0.5}"),
    "activation": ("activation_dropout", "ActivationDropout", "{'dropout_ratio': 0.5}"),
    "maskimg": ("standard_dropout", "StandardDropout", "{'dropout_ratio': 0.5, 'per_image': True}"),
    "curriculum": ("curriculum_dropout", "CurriculumDropout", "{'dropout_ratio': 0.5, 'gamma': 0.0005}"),
    "adaptive": ("adaptive_dropout", "AdaptiveDropout", "{'alpha': 1.0, 'beta': 0.0}"),
    "information": ("information_dropout", "InformationDropout", "{'max_alpha': 0.7}"),
}
# Information Dropout's KL term (its second top, averaged over the batch) enters the loss with
# weight beta / N_train, as in Achille and Soatto's CIFAR code (loss = Lx + beta * KL / N_train,
# beta 3.0); Caffe weighs a loss top by its loss_weight, so that is where beta / N_train goes.
INFORMATION_BETA = 3.0
TRAIN_IMAGES = {"cnn2/cifar10": 50000, "cnn2/cifar100": 50000, "cnn2/caltech256": 256 * 50}


def information_kl_weight(train_images: int, beta: float = INFORMATION_BETA) -> float:
    return beta / train_images


@dataclass(frozen=True)
class Drop:
    kind: str    # "standard" (Caffe's Dropout layer) or a key of PYTHON_DROPOUTS
    after: str   # name of the ReLU layer it follows
    name: str    # the dropout layer's name
    authors: bool = False   # the authors' recipe: guided dropout without the 1/scale gradient


# The authors' recipe (base_authors.prototxt / base_solver_authors.prototxt, CIFAR-10): every
# method's variant is also written under this suffix (ed -> ed_authors, standard -> standard_authors).
AUTHORS_SUFFIX = "_authors"
# the guided layers whose mask the authors' script wrote outside the graph (its gradient has no
# 1/scale): under their recipe these get grad_rescale False
NO_GRAD_RESCALE = ("excitation", "activation")


@dataclass(frozen=True)
class Variant:
    header: tuple[str, ...]          # the train_val's leading comment lines
    solver_header: tuple[str, ...]   # the solver's leading comment lines
    drops: tuple[Drop, ...] = ()
    base: str = "base.prototxt"
    solver_base: str = "base_solver.prototxt"


def dropout_block(kind: str, name: str, blob: str, source: str | None = None, train_images: int = 50000,
                  authors: bool = False) -> str:
    """The prototxt text of a dropout layer acting in place on ``blob``. ``source``: the input
    blob of the layer that produced ``blob`` (Information Dropout computes its alpha(x) from it;
    its KL weight is beta / ``train_images``). ``authors``: Excitation / Activation Dropout with
    ``grad_rescale: False``, as the authors' script (reference-facts, step 5)."""
    if kind == "standard":
        return (f'layer {{ name: "{name}" type: "Dropout" bottom: "{blob}" top: "{blob}" '
                f'dropout_param {{ dropout_ratio: 0.5 }} }}\n')
    if kind not in PYTHON_DROPOUTS:
        raise ValueError(f"unknown dropout kind {kind!r}: 'standard' or one of {sorted(PYTHON_DROPOUTS)}")
    module, layer, param_str = PYTHON_DROPOUTS[kind]
    if authors and kind in NO_GRAD_RESCALE:
        param_str = param_str[:-1] + ", 'grad_rescale': False}"
    if kind == "information":
        if source is None:
            raise ValueError(f"Information Dropout '{name}' needs the input blob of the layer that produced '{blob}'")
        return (f'layer {{\n  name: "{name}" type: "Python" bottom: "{blob}" bottom: "{source}" '
                f'top: "{blob}" top: "{name}_kl"\n'
                f'  loss_weight: 0 loss_weight: {information_kl_weight(train_images):.6g}   '
                f'# the KL term, weight beta / N_train = {INFORMATION_BETA:g} / {train_images}\n'
                f'  param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}   # alpha(x) = W x + b\n'
                f'  python_param {{ module: "{module}" layer: "{layer}" param_str: "{param_str}" }}\n}}\n')
    return (f'layer {{\n  name: "{name}" type: "Python" bottom: "{blob}" top: "{blob}"\n'
            f'  python_param {{ module: "{module}" layer: "{layer}" param_str: "{param_str}" }}\n}}\n')


# ---------------------------------------------------------------------------- the table

# sweep method -> (what the header says, the solver's words, the dropout layers); CNN-2's ReLUs
# relu4 (on ip1) and relu5 (on ip2). The CIFAR-10 folder names Standard at ip1 "standard".
def _cnn2_methods() -> dict[str, tuple[str, str, tuple[Drop, ...]]]:
    ip1, ip2 = Drop("standard", "relu4", "drop"), Drop("standard", "relu5", "drop2")

    def at_ip1(kind):
        return (Drop(kind, "relu4", "drop"),)

    return {
        "none": ("none", "no dropout", ()),
        "standard_fc1": ("Standard Dropout (Caffe's Dropout layer, ratio 0.5) after ip1 only",
                         "Standard Dropout at ip1", (ip1,)),
        "standard_both": ("Standard Dropout (Caffe's Dropout layer, ratio 0.5) after ip1 and ip2",
                          "Standard Dropout at ip1 and ip2", (ip1, ip2)),
        "maskimg": ("Standard Dropout after ip1, one mask per image (the paper's Standard + Mask/Img control)",
                    "Standard Dropout + Mask/Img", at_ip1("maskimg")),
        "curriculum": ("Curriculum Dropout (Morerio et al. 2017; retain 1 -> 0.5, gamma 5e-4) after ip1",
                       "Curriculum Dropout", at_ip1("curriculum")),
        "adaptive": ("Adaptive Dropout (Standout, Ba and Frey 2013; alpha 1, beta 0) after ip1",
                     "Adaptive Dropout", at_ip1("adaptive")),
        "information": ("Information Dropout (Achille and Soatto 2018; max_alpha 0.7, beta 3) after ip1",
                        "Information Dropout", at_ip1("information")),
        "activation": ("Activation Dropout (Eqn 4) after ip1", "Activation Dropout", at_ip1("activation")),
        "ed": ("Excitation Dropout after ip1", "Excitation Dropout", at_ip1("excitation")),
    }


def _cifar(classes: int) -> dict[str, Variant]:
    data = f"CIFAR-{classes}"
    move = ('# To move the dropout, copy this file and its solver (point the copy\'s net: at yours), cut the',
            '# "drop" layer and paste it after another ReLU (relu5 -> bottom/top "ip2", relu3 -> "conv3").')

    def header(what):
        return (f"# CNN-2 (Table 1 of the paper) on {data} ({classes} classes).",
                *_dropout_lines(what, "relu4 and relu5"),
                "# Init and input scale: msra weights, pixels (BGR - mean) / 256. The paper gives no init;",
                "# the authors' Caltech script (gaussian 0.01, raw 0..255) learns far slower under the",
                "# paper's Adam solver (see README)" + (". Every method also has a *_authors twin (their recipe)."
                                                         if classes == 10 else "."),
                *move)

    def solver(what):
        return (f"# The paper's solver (Sec. 4.1): CNN-2 on {data}, {what}; Adam, batch 100, 100K iterations.",)

    def authors_header(what):
        return (f"# CNN-2 on {data} under the authors' recipe (their training script), {what}.",
                *_dropout_lines(what, "relu4 and relu5"),
                "# Recipe: gaussian std 0.01 weights, raw 0..255 pixels minus the mean, weight decay on",
                "# biases too (decay_mult 1), the last layer's rates x10 / x20. Guided dropout layers set",
                "# grad_rescale: False (their mask is written outside the graph: no 1/scale in the gradient).",
                *move)

    out, authors = {}, {}
    for method, (what, words, drops) in _cnn2_methods().items():
        name = "standard" if classes == 10 and method == "standard_fc1" else method
        out[name] = Variant(header(what), solver(words), drops)
        if classes == 10:
            authors[f"{name}{AUTHORS_SUFFIX}"] = Variant(
                authors_header(what),
                (f"# The authors' real recipe (their training script) for CNN-2 on {data}, {words}: SGD with "
                 "momentum 0.9,", "# biases decayed, last layer x10 / x20."),
                tuple(Drop(d.kind, d.after, d.name, authors=True) for d in drops),
                base="base_authors.prototxt", solver_base="base_solver_authors.prototxt")
    return {**out, **authors}


def _dropout_lines(what: str, relus: str) -> tuple[str, ...]:
    if what == "none":
        return ("# Dropout: none.",)
    return (f"# Dropout: {what}.", f"# It acts in place on the post-ReLU blob ({relus} are in place).")


def _caltech256() -> dict[str, Variant]:
    def header(what):
        return ("# CNN-2 (Table 1 of the paper) on Caltech-256: 128x128 images, 256 classes.",
                *_dropout_lines(what, "relu4 and relu5"),
                "# Pooling rounds up as in Caffe: 128 -> 64 -> 32 -> 16, so ip1 sees 256 x 16 x 16 inputs.",
                "# Data as in the authors' setup: images resized to 128x128 (BGR, 0..255) minus the mean",
                "# (103.939, 116.779, 123.68), random mirror in TRAIN and also in TEST (their TEST layer mirrors).")

    def solver(what):
        return (f"# The paper's solver (Sec. 4.1): CNN-2 on Caltech-256, {what}; Adam, batch 100, 100K iterations.",)

    return {method: Variant(header(what), solver(words), drops)
            for method, (what, words, drops) in _cnn2_methods().items()}


def _ucf101(title: str, weights: str, crop: int, mean: str, solver_title: str, recipe: str) -> dict[str, Variant]:
    def header(what):
        return (f"# {title} fine-tuned on UCF101 frames, 101 classes",
                "# (paper Sec. 4.1, Table 3).",
                *_dropout_lines(what, "relu6 and relu7"),
                "# Fine-tuning: every layer up to fc7 keeps its ImageNet name, so pretrained weights",
                f"# (e.g. {weights}, given with --weights) load by name; the classifier",
                "# is renamed fc8_ucf101 (rates x10 / x20), so it starts from its filler. The Model",
                "# Zoo's V1 caffemodels load as they are (real Caffe's --weights: upgrade_net_proto_binary first).",
                "# Data: Datum LMDBs of frames (BGR, 0..255), e.g. resized to 256x256; a random",
                f"# {crop}x{crop} crop and mirror in TRAIN, the centre crop in TEST;",
                f"# {mean}.")

    def solver(what):
        return (f"# The paper's fine-tuning solver (Sec. 4.1): {solver_title} on UCF101, {what};",
                f"# Adam, fixed rate 1e-3, {recipe}.",
                f"# Start from the ImageNet weights: exdrop train <this solver> --weights {weights}")

    fc6, fc7 = Drop("standard", "relu6", "drop6"), Drop("standard", "relu7", "drop7")
    return {
        "none": Variant(header("none"), solver("no dropout")),
        "standard_fc6": Variant(header("Standard Dropout (Caffe's Dropout layer, ratio 0.5) after fc6 only"),
                                solver("Standard Dropout at fc6"), (fc6,)),
        "standard_both": Variant(header("Standard Dropout (Caffe's Dropout layer, ratio 0.5) after fc6 and fc7, "
                                        "as in the ImageNet net"),
                                 solver("Standard Dropout at fc6 and fc7"), (fc6, fc7)),
        "curriculum": Variant(header("Curriculum Dropout (Morerio et al. 2017; retain 1 -> 0.5, gamma 5e-4) after fc6"),
                              solver("Curriculum Dropout at fc6"), (Drop("curriculum", "relu6", "drop6"),)),
        "activation": Variant(header("Activation Dropout (Eqn 4) after fc6"), solver("Activation Dropout at fc6"),
                              (Drop("activation", "relu6", "drop6"),)),
        "ed": Variant(header("Excitation Dropout after fc6"), solver("Excitation Dropout at fc6"),
                      (Drop("excitation", "relu6", "drop6"),)),
    }


def _imagenet() -> dict[str, Variant]:
    """Sec. 5: AlexNet from scratch on ILSVRC-2012, Standard or Activation Dropout at fc6 only."""
    def header(what):
        return ("# AlexNet (bvlc_alexnet's train_val: LRN, grouped conv2/4/5, 1000 classes) trained from",
                "# scratch on ILSVRC-2012 (paper Sec. 5).",
                *_dropout_lines(what, "relu6 and relu7"),
                *(() if what == "none" else
                  ("# Unlike bvlc_alexnet (dropout after fc6 and fc7), fc7 has none: the paper drops at fc6 only.",)),
                "# Data: Datum LMDBs of the images resized to 256x256 (BGR, 0..255; make data-imagenet);",
                "# a random 227x227 crop and mirror in TRAIN, the centre crop in TEST; minus the ILSVRC",
                "# BGR mean (104, 117, 123) per channel (bvlc_alexnet subtracts its mean image instead).",
                "# Batch 50 (the paper's); TEST: batch 50 x test_iter 1000 = the 50,000 val images.")

    def solver(what):
        return (f"# The paper's ImageNet solver (Sec. 5): AlexNet from scratch on ILSVRC-2012, {what};",
                "# from the paper: Adam, learning rate 1e-5, batch 50. Assumed where it is silent: a fixed rate,",
                "# Adam's 0.9 / 0.999 and weight decay 0.005 (its Sec. 4.1 runs), and bvlc_alexnet's 450K",
                "# iterations: at batch 50 that is 22.5M images, about 17.6 epochs (90 epochs at batch 50",
                "# would be 2,306,101 iterations: exdrop train --max-iter, or MAX_ITER= with make).")

    return {
        "none": Variant(header("none"), solver("no dropout")),
        "standard": Variant(header("Standard Dropout (Caffe's Dropout layer, ratio 0.5) after fc6 only"),
                            solver("Standard Dropout at fc6"), (Drop("standard", "relu6", "drop6"),)),
        "activation": Variant(header("Activation Dropout (Eqn 4, ratio 0.5) after fc6"),
                              solver("Activation Dropout at fc6"), (Drop("activation", "relu6", "drop6"),)),
    }


VGG_MEAN = "minus VGG's ILSVRC BGR mean (103.939, 116.779, 123.68)"

# folder under prototxt/ -> variant -> Variant
TABLE: dict[str, dict[str, Variant]] = {
    "cnn2/cifar10": _cifar(10),
    "cnn2/cifar100": _cifar(100),
    "cnn2/caltech256": _caltech256(),
    "alexnet/ucf101": _ucf101("AlexNet (the BVLC ILSVRC-2012 net)", "bvlc_alexnet.caffemodel", 227,
                              "minus the ILSVRC BGR mean (104, 117, 123) per channel", "AlexNet",
                              "batch 128, 5K iterations"),
    "alexnet/imagenet": _imagenet(),
    "vgg16/ucf101": _ucf101("VGG16 (VGG's ILSVRC 16-layer net, configuration D)", "VGG_ILSVRC_16_layers.caffemodel",
                            224, VGG_MEAN, "VGG16", "batch 50, 30K iterations"),
    "vgg19/ucf101": _ucf101("VGG19 (VGG's ILSVRC 19-layer net, configuration E)", "VGG_ILSVRC_19_layers.caffemodel",
                            224, VGG_MEAN, "VGG19", "batch 50, 30K iterations"),
}


# ---------------------------------------------------------------------------- text edits

_STRING_OR_COMMENT = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*')


def _blank(text: str, strings: bool) -> str:
    """`text` with its comments (and strings, if `strings`) turned to spaces, positions kept."""
    return _STRING_OR_COMMENT.sub(
        lambda m: " " * len(m.group()) if strings or m.group().startswith("#") else m.group(), text)


def _with_header(text: str, header: tuple[str, ...], base: str) -> str:
    """`text` with its leading comment lines replaced by `header` and a note of its source."""
    lines = text.splitlines(keepends=True)
    n = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    note = f"# Generated from {base} by `make prototxt` (exdrop/experiments/variants.py): edit the base, not this file."
    return "".join(f"{h}\n" for h in (*header, note)) + "".join(lines[n:])


def _set_field(text: str, field: str, value: str, where: str) -> str:
    """Set the top-level `field: "..."` line (at the start of a line) to `value`."""
    text, n = re.subn(rf'^{field}:[^\n]*', f'{field}: "{value}"', text, flags=re.M)
    if n != 1:
        raise ValueError(f"{where}: expected one top-level '{field}:' line, found {n}")
    return text


def _insert_after_layer(text: str, layer: str, block: str, where: str) -> str:
    """`block` inserted on the line after the end of the `layer { ... }` block named `layer`."""
    names = list(re.finditer(rf'\bname:\s*"{re.escape(layer)}"', _blank(text, strings=False)))
    if len(names) != 1:
        raise ValueError(f"{where}: expected one layer named {layer!r}, found {len(names)}")
    code = _blank(text, strings=True)   # braces in strings or comments do not count
    depth, start = 0, names[0].start()
    while depth >= 0:            # back to the '{' that opens the enclosing layer
        start -= 1
        if start < 0:
            raise ValueError(f"{where}: layer {layer!r} is not inside a 'layer {{ ... }}' block")
        depth += {"}": 1, "{": -1}.get(code[start], 0)
    depth = 0
    for end in range(start, len(code)):   # forward to its matching '}'
        depth += {"{": 1, "}": -1}.get(code[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"{where}: the layer block of {layer!r} is not closed")
    eol = text.find("\n", end)
    eol = len(text) if eol < 0 else eol + 1
    return text[:eol] + block + text[eol:]


# ---------------------------------------------------------------------------- generation

def _net_text(folder: str, variant: str, v: Variant, proto: Path) -> str:
    base = proto / folder / v.base
    where = f"{base.relative_to(proto.parent).as_posix()} (variant {variant!r})"
    text = base.read_text()
    layers = {lp.name: lp for lp in io.parse_net(text, str(base)).layer}
    net, dataset = folder.split("/")
    text = _set_field(_with_header(text, v.header, v.base), "name", f"{net}_{dataset}_{variant}".upper(), where)
    for d in v.drops:
        relu = layers.get(d.after)
        if relu is None or relu.type != "ReLU":
            raise ValueError(f"{where}: no ReLU layer named {d.after!r} to put dropout {d.name!r} after")
        blob = relu.top[0]
        producer = next((lp for lp in layers.values() if blob in lp.top and lp.type != "ReLU"), None)
        source = producer.bottom[0] if producer is not None and producer.bottom else None
        block = dropout_block(d.kind, d.name, blob, source, TRAIN_IMAGES.get(folder, 50000), d.authors)
        text = _insert_after_layer(text, d.after, block, where)
    return text


def _solver_text(folder: str, variant: str, v: Variant, proto: Path) -> str:
    base = proto / folder / v.solver_base
    where = f"{base.relative_to(proto.parent).as_posix()} (variant {variant!r})"
    net, dataset = folder.split("/")
    text = _with_header(base.read_text(), v.solver_header, v.solver_base)
    text = _set_field(text, "net", f"{proto.name}/{folder}/train_val_{variant}.prototxt", where)
    return _set_field(text, "snapshot_prefix", f"models/{net}_{dataset}_{variant}/{net}_{variant}", where)


def generate(table: dict[str, dict[str, Variant]] = TABLE, proto: Path = PROTO) -> dict[Path, str]:
    """Every variant file's expected text, by path; writes nothing."""
    out = {}
    for folder, variants in table.items():
        for name, v in variants.items():
            out[proto / folder / f"train_val_{name}.prototxt"] = _net_text(folder, name, v, proto)
            out[proto / folder / f"solver_{name}.prototxt"] = _solver_text(folder, name, v, proto)
    return out


def _stale(texts: dict[Path, str]) -> list[Path]:
    return [p for p, text in texts.items() if not p.is_file() or p.read_bytes() != text.encode()]


def check(table: dict[str, dict[str, Variant]] = TABLE, proto: Path = PROTO) -> list[Path]:
    """The variant files that are missing or differ from what `generate` makes."""
    return _stale(generate(table, proto))


def write(table: dict[str, dict[str, Variant]] = TABLE, proto: Path = PROTO) -> list[Path]:
    """Write the variant files that are missing or changed; returns them."""
    texts = generate(table, proto)
    stale = _stale(texts)
    for p in stale:
        p.write_bytes(texts[p].encode())
    return stale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m exdrop.experiments.variants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="write nothing; list stale files, exit 1 if any")
    args = ap.parse_args(argv)
    try:
        paths = check() if args.check else write()
    except (OSError, ValueError) as exc:
        print(f"exdrop.experiments.variants: error: {exc}", file=sys.stderr)
        return 1
    for p in paths:
        print(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
    if args.check and paths:
        print(f"{len(paths)} file(s) out of date: edit the base files, not these, and run `make prototxt`",
              file=sys.stderr)
        return 1
    print(f"{len(paths)} file(s) {'out of date' if args.check else 'written'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
