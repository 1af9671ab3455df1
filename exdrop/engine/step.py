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


def cpu_autocast_slowdown(dtype: torch.dtype = torch.bfloat16, repeats: int = 3) -> float:
    """How many times slower a convolution's forward (CNN-2's kind, small) runs under CPU autocast to
    ``dtype`` than in float32: the median of ``repeats`` timed passes each, interleaved, after one
    warm-up; about a second at most. Below 1 where the CPU has native bf16 (AVX512-BF16, AMX); about
    10 where it has none and oneDNN emulates it (AVX2 only, an AMD EPYC: 10x for this convolution,
    29x for a whole CNN-2 ED training iteration, `exdrop bench precision`)."""
    import time

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, 16, 16, generator=gen)
    weight = torch.randn(64, 64, 5, 5, generator=gen)

    def once(cast: bool) -> float:
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=cast):
            torch.nn.functional.conv2d(x, weight, padding=2)
        return time.perf_counter() - t0

    times = {cast: [] for cast in (False, True)}
    for _ in range(repeats + 1):   # the first of each a warm-up
        for cast in times:
            times[cast].append(once(cast))
    median = {cast: sorted(t[1:])[len(t[1:]) // 2] for cast, t in times.items()}
    return median[True] / max(median[False], 1e-9)


SLOW_AUTOCAST = 3.0   # a CPU autocast this many times slower than float32 is warned about


def slow_cpu_autocast_warning(amp: str) -> str | None:
    """The warning for ``--amp`` on this CPU where :func:`cpu_autocast_slowdown` finds it slow, else None."""
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    ratio = cpu_autocast_slowdown(dtype)
    if ratio < SLOW_AUTOCAST:
        return None
    return (f"{amp} autocast is {ratio:.0f}x slower than float32 on this CPU (a convolution, measured now): it has "
            f"no native {amp} instructions and oneDNN emulates them, so the run takes many times longer than its "
            "budget says. Training in float32 (no --amp; a sweep: --amp '') is another protocol: compare and pool "
            "runs of one precision only (a float32 sweep gets its own folder)")
