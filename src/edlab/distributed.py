"""Data-parallel training through PyTorch's own engine: ``torchrun --nproc_per_node=K -m edlab train …``.

torchrun starts K processes and sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR/PORT); ``setup``
reads them and joins the process group (NCCL on GPUs, gloo on CPUs). Every rank holds the whole
dataset on its device and draws the same seeded batch order, then trains on its own slice of every
batch (``shard``); DDP averages the gradients, so K ranks take the same optimizer steps as one process
with the full batch (exactly so with ``sync_bn`` on GPUs; BN statistics are per slice otherwise).
Rank 0 alone validates, tests and writes the run directory; the other ranks receive its decisions.
Without torchrun nothing here does anything: ``world == 1``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import EdlabError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> Dist:
    """Join the process group torchrun described in the environment (a no-op when not under torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return d
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(d.local_rank)
    # torch._dynamo, imported for the first time once the process group exists (DistributedDataParallel's
    # constructor imports it), keeps references to that group: destroy_process_group() in teardown then
    # leaves it alive with its gloo worker threads. One of those still freeing a finished collective's
    # tensors when the interpreter shuts down needs the GIL, is stopped by the shutdown, and the rank dies
    # of SIGABRT ("terminate called without an active exception") after a successful run; more likely on
    # a loaded machine, where that thread lags behind. Imported first, it holds none: teardown ends them.
    importlib.import_module("torch._dynamo")
    try:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    except Exception as e:  # a missing peer or a port in use: one line, not a wall of C++ frames
        raise EdlabError(f"could not join the torchrun process group ({type(e).__name__}: {e})") from None
    return d


def rank_device(d: Dist, device: torch.device) -> torch.device:
    """Under torchrun each rank takes the GPU of its local rank."""
    if d.active and device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return device


def shard(d: Dist, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's contiguous slice of a global batch (equal slices: the batch divides by the world)."""
    if not d.active:
        return tensors
    return tuple(t.tensor_split(d.world)[d.rank] for t in tensors)


def all_sum(d: Dist, *tensors: torch.Tensor) -> None:
    """Sum tensors over ranks in place (per-epoch training metrics: one collective per epoch)."""
    if d.active:
        for t in tensors:
            dist.all_reduce(t)


def broadcast(d: Dist, obj):
    """Rank 0's Python object on every rank (validation results, the run directory)."""
    if not d.active:
        return obj
    box = [obj if d.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(d: Dist, model: torch.nn.Module, device: torch.device, sync_bn: bool = False) -> torch.nn.Module:
    """The model the training step calls: DDP around it under torchrun, the model itself otherwise."""
    if not d.active:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise EdlabError("sync_bn needs GPUs (PyTorch's SyncBatchNorm has no CPU kernel); set sync_bn=false")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unsync_bn(module: torch.nn.Module) -> torch.nn.Module:
    """SyncBatchNorm back to BatchNorm2d (same parameters and statistics), so the saved model is plain."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.SyncBatchNorm):
            bn = torch.nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats)
            bn.weight, bn.bias = child.weight, child.bias
            bn.running_mean, bn.running_var = child.running_mean, child.running_var
            bn.num_batches_tracked = child.num_batches_tracked
            bn.train(child.training)
            setattr(module, name, bn)
        else:
            unsync_bn(child)
    return module


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def teardown(d: Dist) -> None:
    """Destroy the process group; its gloo threads end here, while the interpreter is still whole (see setup)."""
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
