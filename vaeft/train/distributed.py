"""One code path for 1 and N processes: torchrun's RANK / WORLD_SIZE / LOCAL_RANK, or none.

Data parallel by hand rather than through ``DistributedDataParallel``: the adaptive GAN weight
takes ``torch.autograd.grad`` at the decoder's last layer, which DDP's gradient hooks neither see
nor tolerate well, and gradient accumulation would need ``no_sync``. Instead every rank computes
its local gradients and they are averaged with one flattened all-reduce per optimizer step
(what DDP does, minus bucketing overlap). Identical initial weights + identical averaged
gradients keep the replicas identical, which :func:`replica_digests` checks at the end.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    main_rank: int = 0  # the rank that writes outputs, logs and checkpoints

    @property
    def is_main(self) -> bool:
        return self.rank == self.main_rank

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistContext:
    """Join the process group torchrun set up (NCCL on GPU, gloo on CPU); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world)
    main = 0
    if world > 1:
        where: list[tuple[str | None, int] | None] = [None] * world
        dist.all_gather_object(where, (os.environ.get("VAEFT_NODE_RANK") or None, local))
        main = main_rank(where)
    return DistContext(rank, world, local, device, main)


def main_rank(where: list) -> int:
    """The rank that writes the stage's outputs: local rank 0 of node 0, where DVC runs.

    ``where[r]`` is rank r's (VAEFT_NODE_RANK or None, local rank). torchrun's c10d rendezvous
    numbers nodes in its own order, so global rank 0 may sit on another node than the one whose
    checkout DVC records; the node index the platform gave (an Indexed Job's completion index)
    decides instead. Without node indices (one node, or set by hand) it is rank 0.
    """
    for rank, (node, local) in enumerate(where):
        if node is not None and int(node) == 0 and local == 0:
            return rank
    return 0


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_true(ctx: DistContext, flag: bool) -> bool:
    """True only if ``flag`` is true on every rank (so all ranks skip or take a step together)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def average_gradients(ctx: DistContext, params: Iterable[torch.nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in one flattened all-reduce (missing grads count as zero)."""
    if not ctx.enabled:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def average_buffers(ctx: DistContext, module: torch.nn.Module) -> None:
    """Average floating buffers (BatchNorm running statistics), which each rank updates locally."""
    if not ctx.enabled:
        return
    for b in module.buffers():
        if b.is_floating_point():
            dist.all_reduce(b)
            b /= ctx.world_size


def replica_digests(ctx: DistContext, tensors: dict[str, torch.Tensor]) -> list[str]:
    """sha256 of this rank's tensors, gathered from every rank (rank order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        # reshape(-1): a channels_last 1x1 conv weight counts as contiguous yet has stride(-1) != 1.
        h.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    mine = h.hexdigest()
    if not ctx.enabled:
        return [mine]
    out: list[str | None] = [None] * ctx.world_size
    dist.all_gather_object(out, mine)
    return [str(d) for d in out]
