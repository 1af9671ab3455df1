"""NetParameter -> a PyTorch graph with Caffe's semantics.

``Net(net_param, phase)`` keeps the layers that Caffe would keep for that
phase (include/exclude rules), builds them in order with shape inference, and
runs them over a dictionary of named blobs, so in-place layers (``top ==
bottom``) overwrite the name exactly as in Caffe: after ``relu1`` the blob
``ip1`` holds the post-ReLU activation.

Training with a guided dropout layer follows the paper's Fig. 1 inside
``forward``: when the loop reaches the layer, the head above it is run once
without gradient and in test mode, Excitation Backprop goes from a one-hot top
signal at the logits down to the layer's bottom (p_EB), the layer masks its
bottom with it, and the forward continues with gradient. The backward is the
ordinary autograd backward.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from exdrop.data import make_source
from exdrop.engine import eb
from exdrop.engine.distributed import shard_slice
from exdrop.engine.graph import upstream
from exdrop.engine.layer_types import REGISTRY, LayerError, Python, bound_rule
from exdrop.engine.pylayer import TEST, TRAIN
from exdrop.engine.solver import ParamEntry
from exdrop.proto import caffe_pb2

DATA_TYPES = {"Data", "ImageData"}


def state_meets_rule(state, rule) -> bool:
    """Caffe's Net::StateMeetsRule (phase, level bounds, stages)."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def filter_layers(net_param, phase: int, stages=(), level: int = 0) -> list:
    """Caffe's Net::FilterNet: the layers included in this phase, in order."""
    state = caffe_pb2.NetState(phase=phase, level=level, stage=list(stages))
    kept = []
    for lp in net_param.layer:
        if lp.include and lp.exclude:
            raise LayerError(f"layer '{lp.name}': specify include or exclude rules, not both")
        if lp.include:
            ok = any(state_meets_rule(state, r) for r in lp.include)
        else:
            ok = not any(state_meets_rule(state, r) for r in lp.exclude)
        if ok:
            kept.append(lp)
    return kept


class UnderTheLogitsWarning(UserWarning):
    """Excitation Dropout placed directly under the logits (one learned layer between): it collapses
    the net (docs/dropout-layers.md)."""


class Net(nn.Module):
    """A Caffe net for one phase.

    Args:
        net_param: a parsed ``caffe_pb2.NetParameter``.
        phase: ``TRAIN`` (0) or ``TEST`` (1), or the strings.
        device: where parameters and data live.
        source: file name used in error messages.
        batch_size: overrides every data layer's batch size (benchmarks, tests).
        world: an :class:`exdrop.engine.distributed.World` of many processes: each data layer gives this
            process its part of the global batch (the prototxt's ``batch_size``).
    """

    def __init__(self, net_param, phase=TRAIN, device=None, source: str = "<net>",
                 stages=(), batch_size: int | None = None, search_paths: list[Path] | None = None,
                 world=None):
        super().__init__()
        self.world = world
        if net_param.layers:
            raise LayerError(f"{source}: V1 'layers' nets are not supported; upgrade with Caffe's upgrade_net_proto_text")
        self.phase = {"TRAIN": TRAIN, "TEST": TEST}.get(phase, phase)
        self.source, self.name = source, net_param.name
        self.device = torch.device(device or "cpu")
        try:
            self.layer_params = filter_layers(net_param, self.phase, stages)
        except LayerError as exc:
            raise LayerError(f"{source}: {exc}") from None
        self.layer_list = nn.ModuleList()
        self.sources = {}
        self.input_names: list[str] = []
        shapes: dict[str, tuple] = {}
        self._legacy_inputs(net_param, shapes, batch_size)
        producer: dict[str, str] = {name: "the net's input" for name in self.input_names}
        named: dict[str, int] = {}
        for k, lp in enumerate(self.layer_params):
            if lp.name in named:   # the first layer would never learn, or get the other's weights
                raise LayerError(f"{source}: layers {named[lp.name]} and {k} are both named '{lp.name}' "
                                 "(layer names must be unique: weights are saved and loaded by name)")
            named[lp.name] = k
            if lp.type in DATA_TYPES or lp.type == "Input":
                layer = self._data_layer(lp, batch_size)
            else:
                missing = [b for b in lp.bottom if b not in shapes]
                if missing:
                    raise LayerError(f"{source}: layer '{lp.name}' (type {lp.type}): bottom blob "
                                     f"'{missing[0]}' is not produced by any earlier layer")
                cls = REGISTRY.get(lp.type)
                if cls is None:
                    raise LayerError(f"{source}: layer '{lp.name}': unknown layer type '{lp.type}' "
                                     f"(known: {', '.join(sorted(REGISTRY) + ['Data', 'ImageData', 'Input'])})")
                bshapes = [shapes[b] for b in lp.bottom]
                try:
                    layer = cls(lp, bshapes, self.phase, search_paths) if cls is Python else cls(lp, bshapes, self.phase)
                except LayerError as exc:
                    raise LayerError(f"{source}: {exc}") from None
                if len(layer.top_shapes) != len(lp.top) and lp.type != "SoftmaxWithLoss":
                    raise LayerError(f"{source}: layer '{lp.name}' (type {lp.type}) produces "
                                     f"{len(layer.top_shapes)} tops, the prototxt names {len(lp.top)}")
            for j, (t, s) in enumerate(zip(lp.top, layer.top_shapes)):
                in_place = j < len(lp.bottom) and lp.bottom[j] == t
                if t in producer and not in_place:   # Caffe's Net::AppendTop
                    raise LayerError(f"{source}: top blob '{t}' of layer '{lp.name}' is also produced by "
                                     f"{_who(producer[t])} (Caffe: produced by multiple sources); "
                                     "write in place (top == bottom) or rename the top")
                shapes[t] = tuple(s)
                producer[t] = lp.name
            self.layer_list.append(layer)
        self.blob_shapes = shapes
        if self.phase == TRAIN:
            self._check_guided_layers()
        self._check_label_ranges()
        self._share_named_params()
        self.outputs = self._find_outputs()
        self.loss_weights = self._loss_weights()
        self.to(self.device)
        self.train(self.phase == TRAIN)
        self.blobs: dict[str, torch.Tensor] = {}
        self.records = None
        self.channels_last = False

    def use_channels_last(self, on: bool = True) -> "Net":
        """Keep 4-D weights and data blobs in NHWC (faster convolutions on recent GPUs)."""
        self.channels_last = on
        return self.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    _iteration_targets = None   # the Python layers' objects that take the solver's iteration

    def set_iteration(self, it: int) -> None:
        """Hand the solver's iteration ``it`` to every Python layer that asks for it.

        The torch module (or numpy layer object) of a Python layer whose class says
        ``needs_iteration = True`` gets ``.iteration = it`` (Curriculum Dropout's retain
        probability follows the iteration). The engine's training step calls this with its
        solver's iteration before each forward, so a resumed run continues the schedule.
        A Python int: no host synchronisation.
        """
        if self._iteration_targets is None:   # found once: the layers do not change after the build
            self._iteration_targets = [target for layer in self.layer_list if isinstance(layer, Python)
                                       for target in (layer.module, getattr(layer, "obj", None))
                                       if getattr(target, "needs_iteration", False)]
        it = int(it)
        for target in self._iteration_targets:
            target.iteration = it

    # ------------------------------------------------------------- building
    def _legacy_inputs(self, net_param, shapes, batch_size):
        for i, name in enumerate(net_param.input):
            if i < len(net_param.input_shape):
                dims = tuple(net_param.input_shape[i].dim)
            else:
                dims = tuple(net_param.input_dim[4 * i: 4 * i + 4])
            if batch_size:
                dims = (batch_size,) + dims[1:]
            shapes[name] = dims
            self.input_names.append(name)

    def _data_layer(self, lp, batch_size):
        if lp.type == "Input":
            p = lp.input_param
            if len(p.shape) not in (1, len(lp.top)) or any(d <= 0 for sh in p.shape for d in sh.dim):
                raise LayerError(f"{self.source}: layer '{lp.name}' (type Input): give one shape, or one per top, "
                                 f"with positive dims (got {[list(sh.dim) for sh in p.shape]})")
            layer = _InputLayer(lp, [tuple(p.shape[min(i, len(p.shape) - 1)].dim) for i in range(len(lp.top))], batch_size)
            self.input_names += list(lp.top)
            return layer
        try:
            if batch_size:
                lp = _with_batch_size(lp, batch_size)
            part = None
            if self.world is not None and self.world.active:
                batch = lp.data_param.batch_size if lp.type == "Data" else lp.image_data_param.batch_size
                part = shard_slice(self.world, batch, f"{self.source}: layer '{lp.name}'")
            src = make_source(lp, self.phase, self.device, part=part)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise LayerError(f"{self.source}: layer '{lp.name}' (type {lp.type}): {exc}") from exc
        self.sources[lp.name] = src
        return _DataLayer(lp, src)

    def _check_guided_layers(self):
        """A guided dropout layer needs p_EB from logits that depend on its blob (else p_EB is 0
        everywhere and nothing is dropped), existing logits / label blobs, and a valid class."""
        for i, layer in enumerate(self.layer_list):
            if getattr(layer, "saliency", None) != "excitation":
                continue
            where = f"{self.source}: layer '{layer.name}'"
            logits, label = self._signal_blobs(layer)
            signal = layer.params.get("signal", "gt")
            for what, blob in (("logits", logits), ("label", label if signal == "gt" else None)):
                if blob is not None and blob not in self.blob_shapes:
                    raise LayerError(f"{where}: {what} blob '{blob}' is not produced by any layer of the "
                                     f"{self.phase_name} net")
            if signal == "gt" and label is None:
                raise LayerError(f"{where}: the ground-truth top signal needs a label blob: set 'label' in "
                                 "its param_str, or use signal 'pred' or a class index")
            blob = layer.lp.top[0]
            if logits in (blob, layer.lp.bottom[0]):
                raise LayerError(f"{where}: it sits on the logits blob '{logits}' itself; Excitation Backprop "
                                 "needs layers between the dropout and the logits")
            if not self._logits_depend_on(i, blob, logits):
                raise LayerError(f"{where}: the logits blob '{logits}' does not depend on its blob '{blob}', so "
                                 "p_EB would be zero everywhere and nothing dropped; move it below the logits")
            learned = [j for j in self.head_layers(i, logits) if len(self.layer_list[j].blobs)]
            if len(learned) == 1 and self.phase == TRAIN:
                warnings.warn(f"{where}: Excitation Dropout directly under the logits (only "
                              f"'{self.layer_list[learned[0]].name}' between its blob '{blob}' and '{logits}') "
                              "collapses the net to chance: p_EB there is the positive evidence for the true "
                              "class, so the units supporting it are dropped most (docs/dropout-layers.md, "
                              "'Move the dropout layer'); the paper drops at the first fc layer or conv3",
                              UnderTheLogitsWarning, stacklevel=2)
            classes = int(np.prod(self.blob_shapes[logits][1:]))
            if isinstance(signal, int) and not 0 <= signal < classes:
                raise LayerError(f"{where}: signal class {signal} is outside the logits' {classes} classes "
                                 f"(blob '{logits}')")

    def _logits_depend_on(self, start: int, blob: str, logits: str) -> bool:
        """Whether blob ``logits`` is computed from ``blob`` as written by layer ``start``."""
        return blob in upstream(self._tops_bottoms(), {logits}, start)[1]

    def _tops_bottoms(self) -> list[tuple]:
        return [(layer.lp.top, layer.lp.bottom) for layer in self.layer_list]

    def _check_label_ranges(self):
        """Labels of a data layer feeding a SoftmaxWithLoss or an Accuracy must be classes of its logits."""
        label_source = {lp.top[1]: name for name, lp in ((n, self.layer(n).lp) for n in self.sources)
                        if len(lp.top) > 1}
        for layer in self.layer_list:
            if layer.type not in ("SoftmaxWithLoss", "Accuracy") or layer.lp.bottom[1] not in label_source:
                continue
            name = label_source[layer.lp.bottom[1]]
            labels = self.sources[name].labels
            if labels is None:   # read from disk: the labels come with each batch
                continue
            classes = self.blob_shapes[layer.lp.bottom[0]][layer.axis]
            bad = (labels < 0) | (labels >= classes)
            if layer.ignore is not None:
                bad &= labels != layer.ignore
            if bad.any():
                k = int(bad.nonzero()[0, 0])
                raise LayerError(f"{self.source}: layer '{name}' ({self.sources[name].kind}): record {k} (0-based, "
                                 f"in reading order) has label {int(labels[k])}, outside the {classes} classes of "
                                 f"layer '{layer.name}' (logits '{layer.lp.bottom[0]}')")

    def _share_named_params(self):
        """ParamSpec.name shares one blob between layers (Caffe's param sharing)."""
        owners: dict[str, tuple[nn.Module, int]] = {}
        for layer in self.layer_list:
            for i in range(len(layer.blobs)):
                _, _, pname = layer.param_spec(i)
                if not pname:
                    continue
                if pname in owners:
                    owner, j = owners[pname]
                    if owner.blobs[j].shape != layer.blobs[i].shape:
                        raise LayerError(f"{self.source}: layer '{layer.name}': shared param '{pname}' has shape "
                                         f"{tuple(layer.blobs[i].shape)}, owner '{owner.name}' has {tuple(owner.blobs[j].shape)}")
                    layer.blobs[i] = owner.blobs[j]
                else:
                    owners[pname] = (layer, i)

    def _find_outputs(self) -> list[str]:
        """Caffe's net outputs: blobs still unconsumed after the last layer (in-place tops count)."""
        available: set[str] = set(self.input_names)
        for layer in self.layer_list:
            available.difference_update(layer.lp.bottom)
            available.update(layer.lp.top)
        return sorted(available)

    def _loss_weights(self) -> dict[str, float]:
        weights = {}
        for layer in self.layer_list:
            lp = layer.lp
            for i, t in enumerate(lp.top):
                w = lp.loss_weight[i] if i < len(lp.loss_weight) else (1.0 if getattr(layer, "is_loss", False) and i == 0 else 0.0)
                if w:
                    weights[t] = float(w)
        return weights

    # ------------------------------------------------------------- parameters
    def learnable(self) -> list[ParamEntry]:
        """Every learnable blob once, with lr_mult / decay_mult, in Caffe's order."""
        seen, out = set(), []
        for layer in self.layer_list:
            for i, p in enumerate(layer.blobs):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                lr, decay, _ = layer.param_spec(i)
                out.append(ParamEntry(p, lr, decay, f"{layer.name}.{i}"))
        return out

    def layer(self, name: str):
        for layer in self.layer_list:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named '{name}' in {self.source} ({self.phase_name})")

    @property
    def phase_name(self) -> str:
        return "TRAIN" if self.phase == TRAIN else "TEST"

    def share_weights_from(self, other: "Net") -> None:
        """Use the same parameter tensors as ``other`` for layers of the same name (Caffe's test nets)."""
        theirs = {l.name: l for l in other.layer_list if len(l.blobs)}
        for layer in self.layer_list:
            src = theirs.get(layer.name)
            if src is None or not len(layer.blobs):
                continue
            if [tuple(p.shape) for p in layer.blobs] != [tuple(p.shape) for p in src.blobs]:
                raise LayerError(f"layer '{layer.name}': blob shapes differ between the {other.phase_name} and {self.phase_name} nets")
            layer.blobs = src.blobs

    # ------------------------------------------------------------- forward
    def forward(self, feed: dict[str, torch.Tensor] | None = None, record: bool = False,
                edit: dict | None = None) -> dict[str, torch.Tensor]:
        """Run the net; returns the blob dictionary (outputs included).

        ``feed`` fills Input blobs (and replaces data-layer tops when given).
        ``record`` keeps every layer's input and output tensors for
        :meth:`excitation` (analysis at test time). ``edit`` maps blob names to
        functions applied to the blob each time a layer writes it (e.g. units
        switched off at test time, Sec. 4.4); the edited tensor is what the
        following layers and :meth:`excitation` see.
        """
        blobs: dict[str, torch.Tensor] = dict(feed or {})
        records = [] if record else None
        self.run(blobs, range(len(self.layer_list)), records=records, edit=edit)
        self.blobs = blobs
        self.records = records
        return blobs

    def run(self, blobs: dict, indices, head: bool = False, records: list | None = None,
            edit: dict | None = None) -> dict:
        """The one graph runner: layers ``indices`` in order on ``blobs`` (updated in place).

        ``head``: the pass above a guided dropout layer for Excitation Backprop (Fig. 1, step 1):
        dropout layers are the identity (their test-mode value) and no saliency is computed.
        Otherwise a training net hands each guided dropout layer its saliency. ``records``
        collects ``(index, bottoms, tops)`` of the non-data layers (the EB walk reads them);
        ``edit`` maps blob names to functions applied each time a layer writes that blob.
        """
        for i in indices:
            layer = self.layer_list[i]
            lp = layer.lp
            if isinstance(layer, (_DataLayer, _InputLayer)):
                if all(t in blobs for t in lp.top):
                    continue
                if isinstance(layer, _InputLayer):
                    raise ValueError(f"{self.source}: input blob(s) {list(lp.top)} of layer '{lp.name}' must be fed")
                tops = layer()
                if self.channels_last:
                    tops = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in tops)
                bottoms = None
            else:
                bottoms = [blobs[b] for b in lp.bottom]
                tops = self._run_layer(i, layer, bottoms, blobs, head)
            if not isinstance(tops, tuple):
                tops = (tops,)
            if edit:
                tops = tuple(edit[t](v) if t in edit else v for t, v in zip(lp.top, tops))
            if records is not None and bottoms is not None:
                records.append((i, bottoms, tops))
            for t, v in zip(lp.top, tops):
                blobs[t] = v
        return blobs

    def _run_layer(self, i: int, layer, bottoms: list, blobs: dict, head: bool):
        if head and layer.is_dropout:
            # the identity in test mode; a second top (Information Dropout's KL) takes its test value
            return layer.test_mode_tops(*bottoms) if len(layer.lp.top) > 1 else bottoms[0]
        if not isinstance(layer, Python):
            return layer(*bottoms)
        saliency = None
        if self.training and not head and getattr(layer, "saliency", None):
            saliency = self._saliency(i, layer, blobs)
        return layer(*bottoms, saliency=saliency)

    def loss(self, blobs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        blobs = self.blobs if blobs is None else blobs
        terms = [w * blobs[t] for t, w in self.loss_weights.items() if t in blobs]
        if not terms:
            raise ValueError(f"{self.source}: the {self.phase_name} net has no loss output")
        return sum(terms)

    # ------------------------------------------------------------- excitation backprop
    def loss_layer(self):
        for layer in self.layer_list:
            if layer.type == "SoftmaxWithLoss":
                return layer
        return None

    def _signal_blobs(self, layer) -> tuple[str, str | None]:
        try:
            return eb.signal_blobs(self.layer_params, getattr(layer, "params", {}) or {}, layer.name, self.source)
        except ValueError as exc:
            raise LayerError(str(exc)) from None

    def head_layers(self, start: int, logits: str) -> list[int]:
        """Indices of the layers after ``start`` that the logits blob depends on."""
        return upstream(self._tops_bottoms(), {logits}, start)[0]

    per_image_saliency = False   # EB one image at a time, as the authors' numpy loop (Table 6's comparison)

    @torch.no_grad()
    def _saliency(self, i: int, layer, blobs: dict[str, torch.Tensor]) -> torch.Tensor:
        """What guided dropout layer ``i`` needs: p_EB of its bottom, or the bottom itself; image by
        image with :attr:`per_image_saliency` (to show what batching buys)."""
        if not self.per_image_saliency:
            return self._batched_saliency(i, layer, blobs)
        batch = blobs[layer.lp.bottom[0]].shape[0]
        return torch.cat([self._batched_saliency(i, layer, {k: v[b:b + 1] if v.dim() and v.shape[0] == batch else v
                                                            for k, v in blobs.items()}) for b in range(batch)])

    def _batched_saliency(self, i: int, layer, blobs: dict[str, torch.Tensor]) -> torch.Tensor:
        x = blobs[layer.lp.bottom[0]]
        if layer.saliency == "activation":
            return x.detach()
        # EB stays in float32 under mixed precision (a 1e-20-style epsilon is 0 in half precision).
        with torch.autocast(x.device.type, enabled=False):
            return self._excitation_step(i, layer, blobs, x.detach().float())

    def _excitation_step(self, i: int, layer, blobs, target: torch.Tensor) -> torch.Tensor:
        """Fig. 1, steps 1-2: the head above layer ``i`` in test mode, then EB down to its bottom."""
        logits_name, label_name = self._signal_blobs(layer)
        head = dict(blobs)
        head[layer.lp.bottom[0]] = target
        for t in layer.lp.top:
            head[t] = target  # the dropout layer itself is the identity for EB (test mode)
        records = []
        self.run(head, self.head_layers(i, logits_name), head=True, records=records)
        logits = head[logits_name]
        signal = (getattr(layer, "params", {}) or {}).get("signal", "gt")
        where = f"{self.source}: layer '{layer.name}'"
        try:
            classes = eb.signal_classes(signal, logits, blobs.get(label_name) if label_name else None, where)
        except ValueError as exc:
            raise LayerError(str(exc)) from None
        return self._walk(records, logits, classes, target)

    def _walk(self, records, logits: torch.Tensor, classes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """EB over recorded ``(layer index, bottoms, tops)`` from a one-hot at ``logits``; p_EB at ``target``."""
        steps = [eb.Step(self.layer_list[j].excite_rule(), bottoms, [id(b) for b in bottoms], [id(t) for t in tops])
                 for j, bottoms, tops in records]
        out = eb.walk(steps, {id(logits): eb.top_signal(logits, classes)}, id(target))
        return out if out is not None else torch.zeros_like(target, dtype=torch.float32)

    @torch.no_grad()
    def excitation(self, bottom: str, top: str | None = None, classes: torch.Tensor | None = None,
                   contrastive: bool = False) -> torch.Tensor:
        """p_EB at blob ``bottom`` after a ``forward(record=True)``.

        The top signal is a one-hot at blob ``top`` (default: the logits of the
        net's SoftmaxWithLoss) of ``classes`` (default: the label blob).
        ``contrastive``: contrastive EB (Zhang et al. 2016): the layer that writes
        ``top`` passes its EB signal minus the signal of its negated weights (the
        "other classes" of the one-hot), the walk goes on down with that
        difference, and the map keeps its positive part.
        """
        if self.records is None:
            raise ValueError("call forward(record=True) before excitation()")
        loss = self.loss_layer()
        top = top or (loss.lp.bottom[0] if loss is not None else None)
        if top is None or top not in self.blobs:
            raise KeyError(f"top blob {top!r} not found")
        if bottom not in self.blobs:
            raise KeyError(f"blob {bottom!r} not found in {self.source}")
        logits = self.blobs[top]
        if classes is None:
            labels = self.blobs.get(loss.lp.bottom[1]) if loss is not None else None
            classes = eb.signal_classes("gt", logits, labels, f"{self.source}: excitation({bottom!r})")
        target = self.blobs[bottom]
        # Walk only the layers after the last producer of the bottom blob.
        last = max((k for k, (j, _, tops) in enumerate(self.records) if any(t is target for t in tops)), default=-1)
        records = self.records[last + 1:]
        # Analysis, not training: a non-finite blob or weight on the walk is a named error.
        steps = [eb.Step(None, b, [id(x) for x in b], [id(x) for x in t]) for _, b, t in records]
        items = []
        for i in eb.walked(steps, [id(logits)]):
            layer = self.layer_list[records[i][0]]
            items += [(f"blob '{n}' (bottom of layer '{layer.name}')", x) for n, x in zip(layer.lp.bottom, records[i][1])]
            items += [(f"weight blob {w} of layer '{layer.name}'", p) for w, p in enumerate(layer.blobs)]
        eb.require_finite(items, f"{self.source}: excitation({bottom!r})")
        if not contrastive:
            return self._walk(records, logits, classes, target)
        steps = [eb.Step(self._contrastive_rule(self.layer_list[j]) if any(t is logits for t in tops)
                         else self.layer_list[j].excite_rule(), b, [id(x) for x in b], [id(t) for t in tops])
                 for j, b, tops in records]
        out = eb.walk(steps, {id(logits): eb.top_signal(logits, classes)}, id(target))
        return out.clamp_min(0) if out is not None else torch.zeros_like(target, dtype=torch.float32)

    @staticmethod
    def _contrastive_rule(layer):
        """The classifier's EB rule minus its rule with the weights negated (contrastive EB)."""
        if not layer.blobs:
            raise LayerError(f"contrastive EB: the scores' layer '{layer.name}' ({layer.type}) has no weights to negate")
        pos = layer.excite_rule()
        neg = bound_rule(type(layer), layer.g, [-layer.blobs[0], *layer.blobs[1:]],
                         f"layer '{layer.name}' (type {layer.type}, weights negated)")

        def rule(bottoms, signals):
            return [None if a is None else a - b for a, b in zip(pos(bottoms, signals), neg(bottoms, signals))]
        return rule

    # ------------------------------------------------------------- data
    def data_state(self) -> dict:
        return {name: src.state_dict() for name, src in self.sources.items()}

    def load_data_state(self, state: dict) -> None:
        for name, st in state.items():
            if name in self.sources:
                self.sources[name].load_state_dict(st)


class _InputLayer(nn.Module):
    is_dropout = False

    def __init__(self, lp, shapes, batch_size):
        super().__init__()
        self.lp, self.name, self.type = lp, lp.name, lp.type
        self.blobs = nn.ParameterList()
        self.top_shapes = [((batch_size,) + tuple(s[1:])) if batch_size else tuple(s) for s in shapes]

    def param_spec(self, i):
        return 1.0, 1.0, ""


class _DataLayer(nn.Module):
    is_dropout = False

    def __init__(self, lp, source):
        super().__init__()
        self.lp, self.name, self.type = lp, lp.name, lp.type
        self.source = source
        self.blobs = nn.ParameterList()
        self.top_shapes = [tuple(s) for s in source.top_shapes()][: len(lp.top)]

    def param_spec(self, i):
        return 1.0, 1.0, ""

    def forward(self):
        return tuple(self.source.next_batch()[: len(self.lp.top)])


def _who(producer: str) -> str:
    return producer if producer == "the net's input" else f"layer '{producer}'"


def _with_batch_size(lp, batch_size: int):
    lp2 = caffe_pb2.LayerParameter()
    lp2.CopyFrom(lp)
    if lp2.type == "Data":
        lp2.data_param.batch_size = batch_size
    elif lp2.type == "ImageData":
        lp2.image_data_param.batch_size = batch_size
    return lp2

