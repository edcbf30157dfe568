"""
Processes and devices for train.py: torchrun's environment, the process group, the two collectives the
loop needs, and wrapping the model for data-parallel training. A plain `python train.py` is rank 0 of 1,
and every function here is then a no-op.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE (and LOCAL_WORLD_SIZE); the backend is NCCL on GPUs, gloo on
the CPU, so the same code runs a 2-process test on a laptop and 16 GPUs on two nodes.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lrc import LRCError


@dataclass
class Processes:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    created_group: bool  # this call created the process group (and close() destroys it)

    @property
    def master(self):
        return self.rank == 0


def init(device="auto") -> Processes:
    """Join torchrun's process group (if started by torchrun) and pick this rank's device: 'auto' =
    cuda:LOCAL_RANK when a GPU is visible, else the CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise LRCError(f"device={device!r} but torch sees no CUDA GPU: use --device=cpu")
    device = torch.device(f"cuda:{local_rank}" if want == "cuda" else want)
    created = False
    if world_size > 1:
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            created = True
        if device.type == "cpu":  # several processes on one CPU: share the cores instead of oversubscribing
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Processes(rank, local_rank, world_size, device, created)


def close(processes: Processes):
    if processes.created_group:
        dist.destroy_process_group()


def all_reduce(tensor, op="sum"):
    """In place over all ranks (sum, max or min); the tensor itself with one process."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return tensor


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap(model, processes: Processes, use_compile: bool):
    """(the module the loop calls, the DDP wrapper or None). DDP covers the trainable parameters only: the
    frozen teacher is neither broadcast nor bucketed. torch.compile goes around DDP, as PyTorch advises."""
    train_model, ddp = model, None
    if processes.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        frozen = [n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
        device = processes.device
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=False, gradient_as_bucket_view=True)
        train_model = ddp
    if use_compile:
        train_model = torch.compile(train_model)
    return train_model, ddp
