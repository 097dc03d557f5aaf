"""Data parallel search on PyTorch's own engine (torchrun; nccl on CUDA, gloo on the CPU): the process group,
gradient and metric averaging, and the checks that keep every rank on the same architecture."""
from __future__ import annotations

import hashlib
import os

import torch
import torch.nn as nn

from ktnas.cache.errors import KtnasError

from ktnas.engine.spaces import genotype_str


def active():
    """``torch.distributed`` when a process group of more than one rank is initialised, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def init_distributed(device: torch.device) -> tuple[torch.device, int, int, bool]:
    """Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment) initialise the default process group,
    nccl with ``device`` cuda:LOCAL_RANK on CUDA, gloo on the CPU, unless one is initialised already. Returns
    (device, rank, world_size, whether this call created the group: then the caller destroys it)."""
    import torch.distributed as dist

    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not (launched or (dist.is_available() and dist.is_initialized())):
        return device, 0, 1, False
    if not dist.is_available():
        raise KtnasError("launched by torchrun, but this PyTorch build has no torch.distributed: run one process")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size(), created


def all_reduce_mean(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Average ``tensors`` over the ranks in place with one ``all_reduce`` of a flattened bucket (a sum, then
    divided by the world size); returns them. A no-op outside a process group of several ranks."""
    dist = active()
    if dist is None or not tensors:
        return tensors
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.detach().copy_(chunk.view_as(t))
    return tensors


def all_reduce_grads(params) -> None:
    """Average the ``.grad`` of ``params`` over the ranks in place (one all_reduce; DDP's semantics: each rank's
    loss is the mean over its batch, the step follows the mean over the ranks). A gradient missing on some rank
    counts as zero there; a parameter without one on every rank keeps ``grad=None``."""
    params = list(params)
    if active() is None or not params:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
    all_reduce_mean(grads + [present])
    for p, g, used in zip(params, grads, present.tolist()):
        if p.grad is None and used > 0:
            p.grad = g


def sum_over_ranks(values, device) -> list[float]:
    """``values`` summed over the ranks (float64; themselves outside a process group)."""
    dist = active()
    if dist is None:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def from_rank0(fn):
    """``fn()`` evaluated on rank 0 and broadcast to every rank; a KtnasError raised there is raised on every
    rank (so no rank waits for a failed one). Plain ``fn()`` outside a process group."""
    dist = active()
    if dist is None:
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (True, fn())
        except KtnasError as e:
            box[0] = (False, str(e))
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise KtnasError(value)
    return value


def broadcast_model(model: nn.Module) -> None:
    """Rank 0's parameters and buffers onto every rank (as DDP's construction)."""
    dist = active()
    if dist is not None:
        with torch.no_grad():
            for t in model.state_dict().values():
                dist.broadcast(t, src=0)


def tensor_hash(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_ranks_agree(model: nn.Module, genotype, epoch: int) -> list[str]:
    """Hash of the architecture parameters per rank (gathered); KtnasError unless every rank holds the same
    architecture parameters, weights and genotype."""
    mine = (tensor_hash(model.arch_parameters()), tensor_hash(model.weight_parameters()),
            None if genotype is None else genotype_str(genotype))
    dist = active()
    every = [mine]
    if dist is not None:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    bad = [r for r, e in enumerate(every) if e != every[0]]
    if bad:
        raise KtnasError(f"the ranks disagree after epoch {epoch + 1}: rank {bad[0]} holds alphas {every[bad[0]][0]}, "
                         f"weights {every[bad[0]][1]}, rank 0 alphas {every[0][0]}, weights {every[0][1]}"
                         f"{'' if every[bad[0]][2] == every[0][2] else ' and another genotype'}: their gradients "
                         f"were not synchronised")
    return [e[0] for e in every]


def min_over_ranks(value: int, device) -> int:
    """The smallest ``value`` of the ranks (itself outside a process group)."""
    dist = active()
    if dist is None:
        return int(value)
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
