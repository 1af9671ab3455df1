"""One run on many processes: ``torchrun ... -m exdrop train SOLVER`` (DistributedDataParallel).

Caffe's multi-GPU training (``caffe train -gpu 0,1``, P2PSync) gives every GPU the prototxt's
batch and averages the gradients. Here the prototxt's ``batch_size`` stays the run's *global*
batch, as on one process: a process of rank r out of W takes images ``[r B/W, (r+1) B/W)`` of each
batch that one process would read, with the same crop and mirror, so the union over the processes
is the one-process batch. DDP averages the gradients of the W per-process means, which is the mean
over the global batch; without dropout the run follows the one-process run up to the order of
float sums. Each process draws its own dropout masks (torch's RNG seeded ``random_seed + rank``;
rank 0 keeps ``random_seed``), so each image keeps its own mask as on one process, with different
draws. Excitation Backprop is per image, so each image's p_EB and retain probabilities are the
one-process values.

The losses and outputs of a step and the sums of a test pass are averaged over the processes
(one all-reduce each, no host sync), so every process sees the same numbers and takes the same
decisions (divergence, snapshot, stop). Rank 0 writes the run folder (log.csv, results.json,
snapshots, TensorBoard); a snapshot carries every rank's RNG state, so a resume with the same
number of processes continues exactly.

NCCL on CUDA, gloo on CPU. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them a run is
one process and nothing here is used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# the stop flag (Ctrl-C, a scheduler's SIGINT) is agreed on every this many iterations, on the host
STOP_CHECK_EVERY = 10


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


ONE = World()


def world_from_env(env=None) -> World:
    """The process's place in a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK), else one process."""
    env = os.environ if env is None else env
    size = int(env.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return ONE
    try:
        return World(int(env["RANK"]), size, int(env.get("LOCAL_RANK", env["RANK"])))
    except KeyError:
        raise RuntimeError(f"WORLD_SIZE={size} but RANK is not set: start many processes with torchrun "
                           "(torchrun --nproc_per_node=N -m exdrop train SOLVER ...)") from None


def init(world: World, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU); a CPU gloo group for host-side flags."""
    import torch.distributed as dist
    global _host_group
    if not world.active or dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _host_group = dist.new_group(backend="gloo") if device.type == "cuda" else None


_host_group = None


def shard_slice(world: World, batch: int, what: str) -> slice:
    """This process's part of a global batch of ``batch`` images."""
    if batch % world.size:
        raise ValueError(f"{what}: batch_size {batch} does not split over {world.size} processes "
                         f"(the prototxt's batch_size is the global batch; make it a multiple of {world.size})")
    part = batch // world.size
    return slice(world.rank * part, (world.rank + 1) * part)


def sum_over(world: World, tensors: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
    """Each tensor summed over the processes, times ``scale`` (one all-reduce, on their device)."""
    if not world.active or not tensors:
        return tensors
    import torch.distributed as dist
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    if scale != 1.0:
        flat *= scale
    out, at = [], 0
    for t in tensors:
        out.append(flat[at:at + t.numel()].view(t.shape).to(t.dtype))
        at += t.numel()
    return out


def mean_over(world: World, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor averaged over the processes (one all-reduce)."""
    return sum_over(world, tensors, 1.0 / world.size)


def any_over(world: World, flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a host-side all-reduce)."""
    if not world.active:
        return flag
    import torch.distributed as dist
    t = torch.tensor([int(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group)
    return bool(t.item())


def gather(world: World, obj) -> list:
    """``obj`` from every process, in rank order (snapshots only)."""
    if not world.active:
        return [obj]
    import torch.distributed as dist
    out = [None] * world.size
    dist.all_gather_object(out, obj, group=_host_group)
    return out


def broadcast(world: World, obj):
    """Rank 0's ``obj`` on every process."""
    if not world.active:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_host_group)
    return box[0]


def barrier(world: World) -> None:
    if world.active:
        import torch.distributed as dist
        dist.barrier(group=_host_group)


def close(world: World) -> None:
    import torch.distributed as dist
    if world.active and dist.is_initialized():
        dist.destroy_process_group()
