"""
Processes and devices for train.py: torchrun's environment, the process group, the two collectives the
loop needs, and wrapping the model for data-parallel training: DDP (every rank holds everything) or
FSDP2 (`torch.distributed.fsdp.fully_shard`: the projections, their gradients and AdamW state, and with
shard_teacher the frozen teacher too, are split across ranks). A plain `python train.py` is rank 0 of 1,
and every function here is then a no-op (except parallel=fsdp, which runs FSDP2 on a one-rank group).

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE (and LOCAL_WORLD_SIZE); the backend is NCCL on GPUs, gloo on
the CPU, so the same code runs a 2-process test on a laptop and 16 GPUs on two nodes.

FSDP units (docs/scaling.md): a student weight is generated from a teacher weight and a projection
(W_q^S = W_q P_q, spec section 3), so both must be gathered at the same time. LRCLayer.forward reads
everything layer i needs, so layer i is one unit: fully_shard([teacher block i, LRC layer i]) with
shard_teacher, fully_shard(LRC layer i) without (the teacher is then replicated and left out of FSDP).
The root unit holds the rest: P_emb, P_lm, the final norm (and the teacher's embedding, norm and head).
The baselines and SFT train a plain student: each of its blocks is a unit.
"""
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lrc import LRC, LRCError

PARALLEL = ("ddp", "fsdp")
GRAD_SYNC = ("micro_step", "step")
COMPILE_OPTIONS = {}  # torch.compile options of each LRC layer under FSDP2 (Inductor by default; tests pick aot_eager)


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


def check_parallel(parallel, shard_teacher):
    """One-line refusals of combinations that cannot run, before any process group or teacher."""
    if parallel not in PARALLEL:
        raise LRCError(f"parallel={parallel!r} is not one of {', '.join(PARALLEL)}")
    if shard_teacher and parallel != "fsdp":
        raise LRCError("shard_teacher=True shards the teacher with FSDP2, but parallel='ddp' keeps a full copy on "
                       "every rank: add --parallel=fsdp, or drop shard_teacher")


def init(device="auto", parallel="ddp") -> Processes:
    """Join torchrun's process group (if started by torchrun) and pick this rank's device: 'auto' =
    cuda:LOCAL_RANK when a GPU is visible, else the CPU. parallel=fsdp in one process gets a one-rank
    group of its own, since FSDP2 shards over a process group even when there is nothing to split."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise LRCError(f"device={device!r} but torch sees no CUDA GPU: use --device=cpu")
    device = torch.device(f"cuda:{local_rank}" if want == "cuda" else want)
    created = False
    if (world_size > 1 or parallel == "fsdp") and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if world_size > 1:
            dist.init_process_group(backend=backend)
        else:  # no torchrun: an in-memory store, no port to pick
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        created = True
    if world_size > 1 and device.type == "cpu":  # several processes on one CPU: share the cores
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


# -----------------------------------------------------------------------------
# Wrapping the model: DDP or FSDP2

def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def device_mesh(device_type, world_size):
    """The 1-D mesh FSDP2 shards over. Made before any FakeTensorMode (bench.py --plan): building a mesh
    reads real rank values."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (world_size,))


def shard(model, mesh, shard_teacher, compute_dtype, device):
    """FSDP2 over an lrc.LRC or lrc.Baseline, in place (units: see the top of this file, and layer_units). Mixed precision is FSDP2's own
    policy: the sharded parameters stay float32 masters, each unit is gathered in compute_dtype (bf16 on
    GPU; None = as stored) and gradients are reduce-scattered in float32. Every unit but the root frees
    its gathered parameters after forward and gathers them again for backward. The model may sit on the CPU:
    fully_shard moves each unit to `device` as it shards it, so the device never holds more than one
    full unit at a time."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    teacher = model.teacher  # None for method=scratch and sft
    policy = MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)
    replicated = teacher is not None and not shard_teacher
    if replicated and any(p.device != device for p in teacher.parameters()):
        teacher.to(device)  # a replicated frozen teacher, outside FSDP (ignored_params are never moved)
    for unit in layer_units(model, shard_teacher):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=set(teacher.parameters()) if replicated else None)
    return model


def layer_units(model, shard_teacher):
    """The FSDP units below the root. lrc.LRC: layer i, with teacher block i when the teacher is sharded (both
    are read by LRCLayer.forward). lrc.Baseline (kd, scratch, sft: a plain student): each student block, and
    with shard_teacher each teacher block on its own, since no student weight is made from a teacher's."""
    teacher = model.teacher
    if hasattr(model, "layers"):
        return [[block, layer] if shard_teacher else layer for block, layer in zip(teacher.model.layers, model.layers)]
    units = list(model.student.model.layers)
    return units + (list(teacher.model.layers) if shard_teacher and teacher is not None else [])


def layer_modules(model):
    """The modules whose forward runs one layer, compiled in place under FSDP2: lrc.LRC's LRC layers (each runs
    its teacher block inside), or a Baseline's student blocks and, for kd, its teacher's."""
    if hasattr(model, "layers"):
        return list(model.layers)
    return list(model.student.model.layers) + (list(model.teacher.model.layers) if model.teacher is not None else [])


def wrap(model, processes: Processes, use_compile: bool, parallel="ddp", shard_teacher=False,
         compute_dtype=torch.float32, mesh=None, whole_layers=False):
    """(the module the loop calls, the DDP wrapper or None). DDP covers the trainable parameters only: the
    frozen teacher is neither broadcast nor bucketed; torch.compile goes around DDP, as PyTorch advises.
    FSDP2 shards in place (shard()); torch.compile then compiles each LRC layer in place, as torchtitan
    does with FSDP2 (and so does whole_layers, under DDP too), so that hooks stay outside the graphs.

    whole_layers (activation_checkpointing='layer'): PyTorch's module checkpoint (torch.distributed._composable,
    in place, names unchanged, made to compose with fully_shard) on each LRC layer: backward recomputes the
    whole LRCLayer.forward (the generated weights, the teacher layer, the student layer and its clone loss),
    so a layer keeps only its inputs between forward and backward. LRC(checkpoint_layers=True) instead
    recomputes the student layer only and keeps the generated weights and the teacher's activations."""
    if whole_layers:
        from torch.distributed._composable import checkpoint
        for layer in model.layers:
            checkpoint(layer)
    if parallel == "fsdp":
        shard(model, mesh or device_mesh(processes.device.type, processes.world_size), shard_teacher, compute_dtype,
              processes.device)
    if use_compile and (parallel == "fsdp" or whole_layers):
        # each layer in place: FSDP2's hooks, and the module checkpoint's recomputation (which under one
        # whole-model graph would pick another graph than the forward's), stay outside the compiled graphs
        for layer in layer_modules(model):
            layer.compile(**COMPILE_OPTIONS)
        use_compile = False
    if parallel == "fsdp":
        return model, None
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


def generates_once(model, generate, micro_steps) -> bool:
    """generate='step' makes an LRC student's weights once per optimizer step; with one micro-step per optimizer
    step that is what 'micro_step' does, which keeps no gradient sums."""
    return generate == "step" and micro_steps > 1 and isinstance(model, LRC)


def optimizer_step(model, generate, micro_steps):
    """The context of one optimizer step's micro-steps. With generate='step' (lrc.LRC.generated_once) every student
    weight is made on entry, once for all the micro-steps, one FSDP2 unit gathered at a time."""
    return model.generated_once(gathered) if generates_once(model, generate, micro_steps) else nullcontext()


@contextmanager
def gathered(module):
    """A module's parameters whole inside the block: FSDP2 all-gathers its unit, and reshards it after."""
    if not is_sharded(module):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def micro_step(model, ddp, last, grad_sync="micro_step"):
    """The context of one micro-step's forward and backward. DDP all-reduces only on the last micro-step
    (no_sync before). FSDP2 with grad_sync='micro_step' reduce-scatters every micro-step, so gradients stay
    sharded (1/world_size of float32 gradients per rank); 'step' keeps an unsharded float32 gradient of every
    projection on each rank until the last micro-step and reduce-scatters once (fewer collectives, the
    memory of DDP's gradients). With generate='step' the last micro-step's backward also forms the projections'
    gradients of the whole step (lrc.FinishGeneration), before they are all-reduced or reduce-scattered."""
    if hasattr(model, "last_micro_step"):  # lrc.LRC
        model.last_micro_step = last
    if ddp is not None:
        return ddp.no_sync() if not last else nullcontext()
    if is_sharded(model) and grad_sync == "step":
        model.set_requires_gradient_sync(last)
    return nullcontext()


def clip_grad_norm(params, max_norm):
    """The global gradient norm (clipping to max_norm; inf never clips) as a plain tensor on this rank's
    device. FSDP2's gradients are sharded DTensors: their norm is a DTensor, reduced over ranks here."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
