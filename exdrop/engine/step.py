"""One training iteration of the engine (the body of Caffe's ``Solver::Step``): clear the
gradients, hand Curriculum Dropout the solver's iteration, forward and backward ``iter_size``
times (Excitation Backprop runs inside the forward of each guided dropout layer), one solver
update. The engine backend of ``exdrop train`` and the benches run this same function."""
from __future__ import annotations

import contextlib

import torch

from exdrop.engine import distributed as dist


def training_step(net, solver, *, feed: dict | None = None, iter_size: int = 1, autocast=contextlib.nullcontext,
                  ddp=None, world: dist.World = dist.ONE) -> tuple[torch.Tensor, dict]:
    """``(loss, {output: value})`` of one iteration, device tensors (no host sync), averaged over the
    ``iter_size`` passes and, under ``ddp``, over the processes. ``feed``: the net's input blobs
    (a net without data layers); ``autocast``: a context factory for the forward (bf16 training)."""
    passes = max(1, iter_size)
    for p in net.parameters():
        p.grad = None
    net.set_iteration(solver.iter)   # Curriculum Dropout's t: the solver's, restored on resume
    loss_sum, outputs_sum = None, {}
    for k in range(passes):
        # many processes: DDP averages the gradients in the last pass's backward (iter_size passes accumulate)
        sync = ddp is None or k == passes - 1
        with contextlib.nullcontext() if sync else ddp.no_sync():
            with autocast():
                module = net if ddp is None else ddp
                blobs = module(feed) if feed is not None else module()
                loss = net.loss(blobs)
            loss.backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        for name in net.outputs:
            v = blobs[name].detach()
            outputs_sum[name] = outputs_sum[name] + v if name in outputs_sum else v
    solver.step_update()
    net.blobs, net.records = {}, None   # nothing of the step (activations, gradients) is kept until the next
    for p in net.parameters():
        p.grad = None
    names = list(outputs_sum)
    loss, *outs = dist.mean_over(world, [loss_sum / passes] + [outputs_sum[k] / passes for k in names])
    return loss, dict(zip(names, outs))
