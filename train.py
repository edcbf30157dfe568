"""
Train a Low-Rank Clone student (or one of the two baselines it is compared with, or fine-tune the converted
student: the second stage) on prepared token files. One loop serves a laptop and a cluster:

    python train.py                                  # toy run: CPU, offline, a few minutes
    python train.py config/lrc_1.7b.py --data=DIR    # one process (one GPU, or the CPU)
    torchrun --standalone --nproc_per_node=8 train.py config/lrc_1.7b.py --data=DIR
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        train.py config/lrc_1.7b.py --data=DIR --micro_batch_size=1
    torchrun --standalone --nproc_per_node=8 train.py config/lrc_14b.py --data=DIR   # FSDP2 (bench.py --plan)

Configuration, nanoGPT style (configurator.py): DEFAULTS below (they are the toy preset), then each
config/NAME.py given, then --key=value. Unknown keys and wrongly typed values are refused. --resume
continues the latest checkpoint in out_dir exactly. train(cfg) runs the same thing from Python and
returns a summary dict.

Methods (one loop, spec section 4 for the losses):
  lrc      the LRC student: trainable projections of a frozen teacher; L = L_KL + L_LM + alpha * L_clone
  kd       an ordinary model of the exported student's shape, random init; L = L_KL + L_LM
  scratch  the same student trained on the data alone; L = L_LM
  sft      a Hugging Face checkpoint (--init_from, a converted student) on chat data; L = L_LM on the
           assistant's tokens only (the loss mask of data/prepare.py --format=chat)

The file reads top to bottom as the job runs: config -> setup (processes, devices, the output
directory) -> data (cheap checks before any teacher is touched) -> build (teacher, model, optimizer,
resume) -> the loop -> summary.
"""
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

# Before torch loads OpenMP: idle worker threads sleep instead of spinning. On a small CPU that is running
# anything else, spinning threads burn the time slices their partners need: on a 2-core machine with one
# other busy process, a toy micro-step took 4.2 s with the default and 0.39 s with PASSIVE (1 thread: 0.39 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoint  # noqa: E402
import distributed  # noqa: E402
import lrc  # noqa: E402
from configurator import Keys, run_main  # noqa: E402
from data import loader, toy  # noqa: E402
from lrc import LRCError, Qwen2, Qwen2Config  # noqa: E402

# -----------------------------------------------------------------------------
# Configuration. These defaults are the toy preset: `python train.py` distils a tiny teacher (itself
# trained from scratch by this script on first use) on a 2-core CPU in a few minutes.

DEFAULTS = dict(
    # what to train
    out_dir="out/toy",            # checkpoints, metrics.jsonl, and for the toy run its data and teacher
    method="lrc",                 # 'lrc' | 'kd' | 'scratch' | 'sft' (fine-tune init_from on chat data)
    teacher="toy",                # checkpoint dir or hub id; 'toy' = build/cache a tiny teacher in out_dir/teacher
    data="toy",                   # prepared token dir (data/prepare.py), a mixture {dir: weight}, or 'toy' (its corpus)
    init_from=None,               # sft: the Hugging Face checkpoint to fine-tune (a converted student)
    student_hidden=64,            # d_s, the student's residual width (spec section 3)
    tie_proj=True,                # one projection for embedding and head (tied student when the teacher is tied)
    alpha=0.5,                    # weight of L_clone (0: weight generation with L_KL + L_LM only)
    clone_terms="all",            # terms of L_clone: 'all', 'attn' (q,k,v,o), 'ffn' (gate,up,down) or a list 'q,k,v,o'
    tau=40.0,                     # temperature of L_KL
    init_std=0.02,                # projections ~ normal(0, init_std)
    clone_attn_out="student",     # attention-output clone term: 'student' (paper) | 'teacher' (official code); spec 4
    student_config=None,          # kd/scratch: dict of Qwen2Config fields; None = the LRC student's exported shape
    # batch and length of training
    seq_len=128,                  # tokens predicted per sequence
    tokens_per_step=2048,         # tokens per optimizer step, all ranks and micro-steps together
    micro_batch_size=16,          # sequences per forward pass per rank; grad_accum is derived
    max_steps=200,                # optimizer steps of the schedule (setting max_tokens clears it)
    max_tokens=None,              # alternative: steps = ceil(max_tokens / tokens_per_step) (clears max_steps)
    stop_step=None,               # end this invocation after this step, schedule unchanged (cluster time limits)
    # optimizer and schedule
    lr=1e-2,                      # peak learning rate
    min_lr=0.0,                   # the decay ends here
    warmup_ratio=0.05,            # warmup steps = ceil(warmup_ratio * max_steps), linear from 0
    decay="linear",               # 'linear' | 'cosine' after warmup
    beta1=0.9,
    beta2=0.999,
    weight_decay=0.0,
    grad_clip=1.0,                # max global gradient norm; 0 = off
    # logging, evaluation, checkpoints
    log_interval=10,              # steps between log lines (the only host syncs of the loop)
    eval_interval=0,              # steps between val evaluations; 0 = at the end only
    eval_tokens=65536,            # val tokens per evaluation (0 = no evaluation)
    save_interval=100,            # steps between checkpoints; 0 = at the end only
    keep_last=2,                  # checkpoints kept in out_dir
    resume=False,                 # continue from out_dir's latest checkpoint (also: --resume)
    overwrite=True,               # a fresh run in an out_dir with checkpoints deletes them (False: refuse)
    seed=1337,                    # initialisation and the window sampler
    sampler="epoch",              # 'epoch': shuffled passes over non-overlapping windows (the official run's); 'random':
                                  # windows drawn with replacement at every step
    # hardware
    device="auto",                # 'auto' = cuda:LOCAL_RANK if available, else cpu
    dtype="auto",                 # 'auto' = bf16 autocast and a bf16 teacher on cuda, fp32 on cpu; 'bf16' | 'fp32'
    compile="auto",               # torch.compile: 'auto' = on for cuda, off for cpu; or True / False
    activation_checkpointing=False,  # lrc only: True: recompute each student layer in backward; 'layer': each layer whole
    generate="step",              # lrc: student weights made once per optimizer step, or every 'micro_step' (1: same)
    parallel="ddp",               # 'ddp': every rank holds everything; 'fsdp': FSDP2 shards the trained weights, grads, AdamW
    shard_teacher=False,          # fsdp only: also shard the frozen teacher, each layer gathered while it is used
    fsdp_grad_sync="micro_step",  # fsdp: reduce-scatter every micro-step (sharded grads) or once per 'step'
    strict_tokenizer=False,       # data made with another tokenizer.json than the teacher's: False warns, True refuses
    wandb_project=None,           # log to Weights & Biases (only if wandb is installed)
    wandb_run_name=None,
    # the toy teacher (teacher='toy'): a tiny Qwen2 trained from scratch by this script (method=scratch)
    toy_teacher_hidden=128,
    toy_teacher_layers=4,
    toy_teacher_heads=4,
    toy_teacher_kv_heads=2,
    toy_teacher_ffn=384,
    toy_teacher_steps=400,
    toy_teacher_lr=3e-3,
)
KEYS = Keys(
    DEFAULTS,
    # keys whose value may be None (or, for compile, 'auto' or a bool), with the type they hold otherwise
    optional={"teacher": str, "data": (str, dict), "init_from": str, "max_steps": int, "max_tokens": float,
              "stop_step": int, "student_config": dict, "wandb_project": str, "wandb_run_name": str,
              "compile": (bool, str), "activation_checkpointing": (bool, str)},
    choices={"method": ("lrc", "kd", "scratch", "sft"), "decay": ("linear", "cosine"), "dtype": ("auto", "bf16", "fp32"),
             "sampler": tuple(loader.SAMPLERS), "compile": ("auto", True, False),
             "clone_attn_out": ("student", "teacher"), "activation_checkpointing": (False, True, "layer"),
             "parallel": distributed.PARALLEL, "fsdp_grad_sync": distributed.GRAD_SYNC,
             "generate": ("step", "micro_step")},
    exclusive={"max_steps": "max_tokens", "max_tokens": "max_steps"},  # setting one clears the other
    flags=("resume",), where_listed="DEFAULTS in train.py")


def parse_args(argv):
    """sys.argv[1:] -> full config dict: DEFAULTS, then config files, then --key=value, in order."""
    return KEYS.parse(argv, doc=__doc__)


def make_config(overrides=None):
    """DEFAULTS updated with a dict (what train() accepts from Python), each key checked."""
    return KEYS.from_dict(overrides)


# -----------------------------------------------------------------------------
# Setup: processes and devices (distributed.py), the batch arithmetic, numerics, the output directory

@dataclass
class Run:
    """Where and how this process trains; everything the loop needs that is not a tensor."""
    cfg: dict
    procs: distributed.Processes  # rank, world_size, device
    grad_accum: int               # micro-steps per optimizer step
    max_steps: int                # the schedule's length
    end_step: int                 # where this invocation stops (stop_step, else max_steps)
    dtype_name: str               # 'bf16' | 'fp32'
    use_compile: bool
    log_prefix: str = ""

    rank = property(lambda self: self.procs.rank)
    world_size = property(lambda self: self.procs.world_size)
    device = property(lambda self: self.procs.device)
    master = property(lambda self: self.procs.master)
    compute_dtype = property(lambda self: lrc.as_dtype(self.dtype_name))

    def log(self, msg):
        if self.master:
            print(self.log_prefix + msg, flush=True)

    def autocast(self):
        """bf16 autocast on GPU with float32 masters; nothing on CPU (float32)."""
        if self.compute_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)


def schedule_length(cfg, world_size):
    """(grad_accum, max_steps), refusing a batch that does not divide: tokens_per_step = seq_len *
    micro_batch_size * world_size * grad_accum, exactly."""
    per_micro = cfg["seq_len"] * cfg["micro_batch_size"] * world_size
    grad_accum = cfg["tokens_per_step"] // per_micro
    if cfg["tokens_per_step"] % per_micro or grad_accum < 1:
        raise LRCError(f"tokens_per_step={cfg['tokens_per_step']} is not a multiple of seq_len * micro_batch_size * "
                       f"world_size = {cfg['seq_len']} * {cfg['micro_batch_size']} * {world_size} = {per_micro}: "
                       f"change tokens_per_step or micro_batch_size")
    if cfg["max_steps"] is None and cfg["max_tokens"] is None:
        raise LRCError("set max_steps or max_tokens")
    max_steps = cfg["max_steps"]
    if max_steps is None:
        max_steps = math.ceil(cfg["max_tokens"] / cfg["tokens_per_step"])
    if max_steps < 1:
        raise LRCError(f"the run has {max_steps} steps: raise max_steps or max_tokens")
    if cfg["keep_last"] < 1:
        raise LRCError("keep_last must be at least 1")
    return grad_accum, max_steps


def setup(cfg, log_prefix=""):
    """The Run of this process: checks the batch arithmetic, then joins the process group under torchrun."""
    grad_accum, max_steps = schedule_length(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    distributed.check_parallel(cfg["parallel"], cfg["shard_teacher"])
    procs = distributed.init(cfg["device"], cfg["parallel"])
    cuda = procs.device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    end_step = min(max_steps, cfg["stop_step"]) if cfg["stop_step"] is not None else max_steps
    return Run(cfg, procs, grad_accum, max_steps, end_step,
               dtype_name=cfg["dtype"] if cfg["dtype"] != "auto" else ("bf16" if cuda else "fp32"),
               use_compile=cfg["compile"] if cfg["compile"] != "auto" else cuda, log_prefix=log_prefix)


# -----------------------------------------------------------------------------
# The toy world (data/toy.py): corpus, tokenizer and a tiny teacher, built on first use and cached

def toy_world(cfg, run):
    """For teacher='toy' / data='toy': the toy corpus (data/toy.py; built by rank 0 in seconds, cached)."""
    if cfg["data"] != "toy" and (cfg["teacher"] != "toy" or cfg["method"] == "sft"):  # sft has no teacher
        return None
    toy_dir = os.path.join(cfg["out_dir"], "data")
    if run.master:
        toy.build_toy(toy_dir)
    distributed.barrier()
    return toy.build_toy(toy_dir)  # rank 0 built it: only reads


def build_toy_teacher(cfg, paths, teacher_dir, run_dir, log=print, log_prefix="[teacher] "):
    """teacher_dir: a tiny Qwen2 with the toy tokenizer, trained from scratch by train() itself (method=scratch)
    on the toy teacher's text, unless a cached one has the same recipe. experiments/toy_compare.py builds its
    teacher here too. Returns train()'s summary, or None when the cache was used."""
    recipe = toy.toy_teacher_recipe(cfg, paths)
    if toy.is_cached_teacher(teacher_dir, recipe):
        log(f"toy teacher: reusing {teacher_dir} (delete it to retrain)")
        return None
    log(f"toy teacher: training a tiny Qwen2 from scratch ({recipe['spec']['num_hidden_layers']} layers, "
        f"hidden {recipe['spec']['hidden_size']}, {recipe['steps']} steps) with method=scratch")
    run_cfg = dict(cfg, method="scratch", teacher=None, data=paths["teacher_tokens"], student_config=recipe["spec"],
                   out_dir=run_dir, max_steps=recipe["steps"], max_tokens=None, stop_step=None, lr=recipe["lr"],
                   min_lr=0.0, resume=False, overwrite=True, save_interval=0, keep_last=1, wandb_project=None,
                   parallel="ddp", shard_teacher=False,  # a tiny Qwen2: nothing worth sharding
                   eval_interval=0, log_interval=max(cfg["log_interval"], recipe["steps"] // 8))
    summary = train(run_cfg, log_prefix=log_prefix)
    if int(os.environ.get("RANK", "0")) == 0:
        model, _ = checkpoint.load_checkpoint(summary["checkpoint"])
        lrc.save_qwen2(model, teacher_dir, extra_config={"lrc_toy_teacher": recipe})
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(paths["tokenizer_dir"], name), os.path.join(teacher_dir, name))
        log(f"toy teacher: saved to {teacher_dir} (built in {summary['wall_s']:.0f} s)")
    distributed.barrier()
    return summary


# -----------------------------------------------------------------------------
# Build: the teacher, the model being trained and its optimizer. Each model is an nn.Module whose
# forward(idx, targets) returns (loss, {"kl", "lm", "clone"}); the frozen teacher, when there is one, is
# its submodule `teacher` (requires_grad=False, excluded from DDP).

def teacher_config_of(cfg, teacher_dir, toy_paths):
    """The teacher's architecture from config.json alone (or the toy recipe), before any weight is read."""
    if cfg["teacher"] == "toy":
        spec = toy.toy_teacher_recipe(cfg, toy_paths)["spec"]
        return Qwen2Config.from_dict({"model_type": "qwen2", **spec})
    return Qwen2Config.from_pretrained(teacher_dir)


def student_config_of(cfg, teacher_config, init_dir=None):
    """The shape of the student: the LRC student's exported shape (shared by the baselines), kd/scratch's
    explicit student_config, or for sft the shape of the checkpoint it fine-tunes."""
    if cfg["method"] == "lrc" and cfg["student_config"] is not None:
        raise LRCError("student_config is for kd/scratch; an LRC student's shape is the teacher's with "
                       "hidden_size=student_hidden: drop student_config")
    lrc.clone_terms_of(cfg["clone_terms"])  # refuses an unknown term before anything is loaded
    if cfg["method"] != "lrc" and cfg["activation_checkpointing"]:
        raise LRCError(f"activation_checkpointing is implemented for method=lrc only: drop it for method={cfg['method']}")
    if (cfg["method"] == "sft") != (cfg["init_from"] is not None):
        raise LRCError("method=sft fine-tunes the checkpoint given as --init_from=DIR (and only sft takes one): "
                       "pass both, or neither")
    if init_dir is not None:
        return Qwen2Config.from_pretrained(init_dir)
    if cfg["student_config"] is not None:
        try:
            return Qwen2Config.from_dict({"model_type": "qwen2", **cfg["student_config"]})
        except TypeError as e:
            raise LRCError(f"student_config is not a valid Qwen2Config ({e}): use Qwen2Config field names") from None
    if teacher_config is None:
        raise LRCError("method=scratch without a teacher needs a shape: "
                       "student_config=dict(vocab_size=..., hidden_size=..., ...)")
    return lrc.student_shape(teacher_config, cfg["student_hidden"], cfg["tie_proj"])


def build_model(cfg, teacher_dir, student_config, run, init_dir=None):
    """The module being trained. Its float32 parameters are the trainable ones; a bf16 teacher on GPU is
    frozen, so it needs no float32 master copy. For FSDP2 it is built in host memory and each unit moves to
    the device as it is sharded (distributed.shard)."""
    torch.manual_seed(cfg["seed"])  # identical initialisation on every rank (DDP also broadcasts rank 0's)
    where = "cpu" if cfg["parallel"] == "fsdp" else run.device
    teacher = lrc.load_qwen2(teacher_dir, where, run.compute_dtype) if cfg["method"] in ("lrc", "kd") else None
    if cfg["method"] == "lrc":
        return lrc.LRC(teacher, cfg["student_hidden"], tie_proj=cfg["tie_proj"], alpha=cfg["alpha"], tau=cfg["tau"],
                       init_std=cfg["init_std"], checkpoint_layers=cfg["activation_checkpointing"] is True,
                       clone_attn_out=cfg["clone_attn_out"], clone_terms=cfg["clone_terms"])
    if cfg["method"] == "sft":  # float32 master weights of the checkpoint, all trainable; L_LM on masked targets
        return lrc.Baseline(lrc.load_qwen2(init_dir, where, torch.float32).requires_grad_(True), None)
    with torch.device(where):
        student = Qwen2(student_config)  # float32 master weights; autocast computes in bf16 on GPU
    return lrc.Baseline(student, teacher, tau=cfg["tau"])


def the_models(cfg, run, data, toy_paths):
    """(teacher as given, its local dir, its config, the student's config, init_from's local dir), every
    cheap check first: only then is the toy teacher trained, if the run needs one."""
    sft = cfg["method"] == "sft"
    teacher = None if sft else os.path.join(cfg["out_dir"], "teacher") if cfg["teacher"] == "toy" else cfg["teacher"]
    if cfg["method"] in ("lrc", "kd") and teacher is None:
        raise LRCError(f"method={cfg['method']} needs a teacher: pass --teacher=DIR or a hub id")
    teacher_dir = lrc.resolve_checkpoint(teacher) if teacher is not None and cfg["teacher"] != "toy" else None
    teacher_config = teacher_config_of(cfg, teacher_dir, toy_paths) if teacher is not None else None
    init_dir = lrc.resolve_checkpoint(cfg["init_from"]) if sft and cfg["init_from"] else None
    student_config = student_config_of(cfg, teacher_config, init_dir)
    loader.check_fits(data, student_config.vocab_size, teacher_dir or init_dir, cfg["strict_tokenizer"], run.log)
    if teacher is not None and cfg["teacher"] == "toy":  # the toy run's expensive part, once all else is right
        build_toy_teacher(cfg, toy_paths, teacher, os.path.join(cfg["out_dir"], "teacher_run"), run.log)
        teacher_dir = teacher
        teacher_config = Qwen2Config.from_pretrained(teacher_dir)  # as saved: what convert.py will compare
    return teacher, teacher_dir, teacher_config, student_config, init_dir


@dataclass
class Job:
    """Everything one training job holds once built: what the loop trains and what a checkpoint records."""
    run: Run
    data: loader.Mixture
    model: torch.nn.Module
    train_model: torch.nn.Module  # model, wrapped in DDP and/or compiled
    ddp: object
    optimizer: torch.optim.Optimizer
    params: list                  # the trainable parameters, in the optimizer's order
    model_state: dict             # {checkpoint name: tensor} (checkpoint.save_checkpoint's model_state)
    identity: dict                # what a resumed run must match (checkpoint.check_resumable)
    teacher: Optional[str]        # the teacher as given (a path or hub id), None for scratch
    toy_paths: Optional[dict]
    windows: Optional[loader.TokenWindows] = None  # the training windows of this rank, step by step
    step: int = 0
    tokens_seen: int = 0
    saved: Optional[str] = None   # the latest checkpoint written or resumed from
    t_start: float = field(default_factory=time.time)


def build(cfg, run):
    """Setup to a ready Job. Order matters: everything cheap that can refuse the run (output directory,
    data, vocabulary, resume compatibility) comes before the teacher is trained (toy) or loaded."""
    existing = checkpoint.check_out_dir(cfg["out_dir"], cfg["resume"], cfg["overwrite"])
    toy_paths = toy_world(cfg, run)
    data = loader.open_mixture(toy_paths["student_tokens"] if cfg["data"] == "toy" else cfg["data"],
                               cfg["seq_len"], bool(cfg["eval_tokens"]), run.rank, run.world_size, run.device)
    cfg = run.cfg = dict(cfg, data=data.spec)
    teacher, teacher_dir, teacher_config, student_config, init_dir = the_models(cfg, run, data, toy_paths)
    identity = checkpoint.run_identity(cfg, teacher, teacher_dir, teacher_config, student_config, init_dir, data)
    resume_from = None
    if cfg["resume"]:
        resume_from = checkpoint.read_checkpoint(existing)
        checkpoint.check_resumable(resume_from[0], existing, identity)

    model = build_model(cfg, teacher_dir, student_config, run, init_dir)
    # wrapped before the optimizer is made: FSDP2 replaces the parameters by their shards
    train_model, ddp = distributed.wrap(model, run.procs, run.use_compile, cfg["parallel"], cfg["shard_teacher"],
                                        run.compute_dtype, whole_layers=cfg["activation_checkpointing"] == "layer")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                                  weight_decay=cfg["weight_decay"], fused=run.device.type == "cuda")
    job = Job(run, data, model, train_model, ddp, optimizer, params, model.checkpoint_tensors(), identity,
              teacher, toy_paths)
    start = (0, None)  # (step, windows read from each source before it): where the sampler's counts start
    if resume_from is not None:
        job.step, job.tokens_seen = checkpoint.restore(existing, *resume_from, job.model_state, optimizer, params,
                                                       run.device, model)
        job.saved = existing
        start = (job.step, [s["windows_read"] for s in resume_from[0]["data"]["sources"]])
        run.log(f"resuming {existing} at step {job.step} ({job.tokens_seen:,} tokens seen)")
    job.windows = loader.TokenWindows(data, cfg["seed"], cfg["seq_len"], cfg["micro_batch_size"], run.rank,
                                      run.world_size, run.grad_accum, run.device, cfg["sampler"], start,
                                      use_mask=cfg["method"] == "sft")
    if run.master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
        checkpoint.remove_stale_temporaries(cfg["out_dir"])
        if not cfg["resume"]:
            for old in checkpoint.list_checkpoints(cfg["out_dir"]):  # overwrite=True: the older run's go
                shutil.rmtree(old)
    return job


# -----------------------------------------------------------------------------
# Learning-rate schedule: linear warmup from 0, then linear (or cosine) decay to min_lr. A pure function
# of the step, so a resumed run continues the same curve.

def lr_at(step, max_steps, cfg):
    warmup = math.ceil(cfg["warmup_ratio"] * max_steps)
    if step < warmup:
        return cfg["lr"] * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    scale = 1.0 - progress if cfg["decay"] == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg["min_lr"] + (cfg["lr"] - cfg["min_lr"]) * scale


# -----------------------------------------------------------------------------
# Evaluation on the val split: consecutive windows, the student's losses with the teacher's targets.

@torch.no_grad()
def evaluate(model, source, run):
    """The losses on `source`'s val split (method=sft: on its assistant tokens, as in training)."""
    seq_len, mbs, val_tokens = run.cfg["seq_len"], run.cfg["micro_batch_size"], source.val_tokens
    mask = source.val_mask if run.cfg["method"] == "sft" else None
    n_windows = min(run.cfg["eval_tokens"] // seq_len, (len(val_tokens) - 1) // seq_len)
    sums = torch.zeros(3, device=run.device)  # kl, lm, clone, each summed over windows
    mine = list(range(run.rank, n_windows, run.world_size))
    for i in range(0, len(mine), mbs):
        starts = np.array(mine[i:i + mbs]) * seq_len
        x, y = loader.windows_at(val_tokens, starts, seq_len, run.device, mask)
        with run.autocast():
            _, parts = model(x, y)
        sums += torch.stack([parts["kl"].float(), parts["lm"].float(), parts["clone"].float()]) * len(starts)
    count = torch.tensor([float(len(mine))], device=run.device)
    kl, lm, clone, n = distributed.all_reduce(torch.cat([sums, count])).tolist()
    if n == 0:
        return None
    return {"val_kl": kl / n, "val_lm": lm / n, "val_clone": clone / n, "val_ppl": math.exp(min(lm / n, 50)),
            "val_windows": int(n)}


# -----------------------------------------------------------------------------
# Metrics: metrics.jsonl (one JSON object per log or eval row), and Weights & Biases when asked. Rank 0 only.

class Metrics:
    def __init__(self, run, resume):
        self.file = self.wandb = None
        if not run.master:
            return
        self.file = open(os.path.join(run.cfg["out_dir"], "metrics.jsonl"), "a" if resume else "w")
        if run.cfg["wandb_project"]:
            try:
                import wandb
                self.wandb = wandb.init(project=run.cfg["wandb_project"], name=run.cfg["wandb_run_name"], config=run.cfg)
            except ImportError:
                run.log("warning: wandb_project is set but wandb is not installed: logging to metrics.jsonl only")

    def record(self, row):
        if self.file is not None:
            print(json.dumps(row), file=self.file, flush=True)
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


# -----------------------------------------------------------------------------
# The loop. Losses and the first non-finite step stay on the device and are read only at log intervals,
# so a step has no host sync.

class Accumulators:
    def __init__(self, device):
        self.sums = torch.zeros(4, device=device)  # total, kl, lm, clone summed over steps since the last log
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss
        self.steps = 0

    def add_micro(self, loss, parts, grad_accum):
        self.sums += torch.stack([t.detach().float() for t in (loss, parts["kl"], parts["lm"], parts["clone"])]) / grad_accum

    def end_step(self, step, grad_norm):
        """Remember the first step with a non-finite loss or gradient norm, still on the device."""
        finite = torch.isfinite(self.sums.sum() + grad_norm)
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, step, self.first_bad)
        self.steps += 1


def check_finite(job, acc):
    """All ranks agree whether any loss so far was non-finite; if so stop without saving."""
    never = torch.full_like(acc.first_bad, 2**62)
    bad = int(distributed.all_reduce(torch.where(acc.first_bad >= 0, acc.first_bad, never).clone(), "min").item())
    if bad < 2**62:
        where = f"the last good checkpoint is {job.saved}" if job.saved else "no checkpoint was written yet"
        raise LRCError(f"non-finite loss at step {bad}; {where} (resume it with a lower lr: --resume --lr=...)")


def save(job, acc):
    check_finite(job, acc)
    run = job.run
    weights, optimizer = checkpoint.gather(job.model, job.optimizer, job.model_state, run.master)
    if run.master:
        data = job.data.record(job.windows.windows_before(job.step), job.windows.epoch(job.step), job.step,
                               run.cfg["sampler"])
        state = checkpoint.run_state(job.step, job.tokens_seen, job.identity, run.cfg, job.teacher, run.device, data,
                                     max_steps=run.max_steps, world_size=run.world_size, grad_accum=run.grad_accum)
        job.saved = checkpoint.save_checkpoint(run.cfg["out_dir"], job.step, weights, optimizer, state,
                                               run.cfg["keep_last"])
    distributed.barrier()
    job.saved = os.path.join(run.cfg["out_dir"], f"ckpt_{job.step:08d}")


def log_step(job, acc, metrics, lr, grad_norm, elapsed):
    """One log line and metrics row: losses averaged over the steps since the last one, all ranks."""
    run, cfg = job.run, job.run.cfg
    check_finite(job, acc)
    loss, kl, lm, clone = (distributed.all_reduce(acc.sums.clone()) / (run.world_size * acc.steps)).tolist()
    dt = max(1e-9, elapsed)
    where, sources = job.data.progress(job.windows.windows_before(job.step), job.windows.epoch(job.step),
                                       cfg["seq_len"])
    row = {"step": job.step, "tokens": job.tokens_seen, "epoch": job.windows.epoch(job.step)[0], **sources,
           "loss": loss, "kl": kl, "lm": lm, "clone": clone, "lr": lr, "grad_norm": float(grad_norm),
           "tokens_per_s": acc.steps * cfg["tokens_per_step"] / dt, "ms_per_step": 1000 * dt / acc.steps,
           "time": round(time.time() - job.t_start, 2)}
    run.log(f"step {job.step:>{len(str(run.max_steps))}}/{run.max_steps} | {where} | "
            f"loss {loss:.4f} | kl {kl:.4f} | lm {lm:.4f} | clone {clone:.4f} | lr {lr:.2e} | "
            f"{row['tokens_per_s']:,.0f} tok/s | {row['ms_per_step']:.0f} ms/step")
    metrics.record(row)
    acc.sums.zero_()
    acc.steps = 0
    return row


def run_eval(job, metrics):
    result = evaluate(job.model, job.data.val, job.run) if job.data.val.val_tokens is not None else None
    if result is not None:
        job.run.log(f"eval step {job.step} | val lm {result['val_lm']:.4f} (ppl {result['val_ppl']:.2f}) | "
                    f"val kl {result['val_kl']:.4f} | val clone {result['val_clone']:.4f}")
        metrics.record({"step": job.step, **result})
    return result


def train_loop(job, metrics):
    """Optimizer steps from job.step to run.end_step. Returns (first log row, last log row, last val result)."""
    run, cfg = job.run, job.run.cfg
    windows = job.windows
    acc = Accumulators(run.device)
    first = last = val = None
    t_log, paused = time.time(), 0.0  # paused: seconds spent evaluating and saving since the last log line
    x, y = windows.batch(job.step, 0)
    job.train_model.train()
    while job.step < run.end_step:
        lr = lr_at(job.step, run.max_steps, cfg)
        for group in job.optimizer.param_groups:
            group["lr"] = lr
        with distributed.optimizer_step(job.model, cfg["generate"], run.grad_accum):  # generate='step': made here
            for micro in range(run.grad_accum):
                last_micro = micro == run.grad_accum - 1
                # DDP: gradient all-reduce only on the last micro-step; FSDP2: cfg["fsdp_grad_sync"]
                with distributed.micro_step(job.model, job.ddp, last_micro, cfg["fsdp_grad_sync"]):
                    with run.autocast():
                        loss, parts = job.train_model(x, y)
                    # fetch the next micro-batch while the device works
                    x, y = windows.batch(job.step, micro + 1) if not last_micro else windows.batch(job.step + 1, 0)
                    (loss / run.grad_accum).backward()
                acc.add_micro(loss, parts, run.grad_accum)
        # the global norm is computed (and logged) even without clipping: inf never clips
        grad_norm = distributed.clip_grad_norm(job.params, cfg["grad_clip"] or math.inf)
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
        job.step += 1
        job.tokens_seen += cfg["tokens_per_step"]
        acc.end_step(job.step, grad_norm)

        if job.step == 1 or job.step % cfg["log_interval"] == 0 or job.step == run.end_step:
            last = log_step(job, acc, metrics, lr, grad_norm, time.time() - t_log - paused)
            first = first or last
            t_log, paused = time.time(), 0.0
        t_pause = time.time()
        if cfg["eval_interval"] and job.step % cfg["eval_interval"] == 0 and job.step != run.max_steps:
            val = run_eval(job, metrics) or val
        if cfg["save_interval"] and job.step % cfg["save_interval"] == 0 and job.step != run.end_step:
            save(job, acc)
        paused += time.time() - t_pause
    if job.step == run.end_step and job.saved != os.path.join(cfg["out_dir"], f"ckpt_{job.step:08d}"):
        save(job, acc)
    if job.step == run.max_steps:
        val = run_eval(job, metrics) or val
    return first, last, val


# -----------------------------------------------------------------------------
# Training: config -> setup -> build -> the loop -> summary

def train(cfg=None, log_prefix=""):
    """Run one training job; cfg is a dict of overrides of DEFAULTS. Returns a summary dict."""
    cfg = make_config(cfg)
    run = setup(cfg, log_prefix)
    try:
        job = build(cfg, run)
        cfg = run.cfg
        source = f"init_from {cfg['init_from']}" if cfg["method"] == "sft" else f"teacher {job.teacher}"
        once = distributed.generates_once(job.model, cfg["generate"], run.grad_accum)  # not with one micro-step
        generate = "step" if once else "micro_step (= step at 1 micro-step)" if cfg["generate"] == "step" else "micro_step"
        run.log(f"method {cfg['method']} | {source} | data {job.data.describe()} | device {run.device} x "
                f"{run.world_size} | {cfg['parallel']}{' + shard_teacher' if cfg['shard_teacher'] else ''} | "
                f"dtype {run.dtype_name} | compile {run.use_compile}"
                + (f" | generate {generate}" if cfg["method"] == "lrc" else ""))
        run.log(f"{sum(p.numel() for p in job.params):,} trainable parameters | {cfg['micro_batch_size']} seq x "
                f"{cfg['seq_len']} tokens x {run.world_size} ranks x {run.grad_accum} micro-steps = "
                f"{cfg['tokens_per_step']:,} tokens/step | steps {job.step} -> {run.end_step} of {run.max_steps} | "
                f"lr {cfg['lr']:g} {cfg['decay']}")
        job.t_start = time.time()  # the run's own time: building the toy teacher is reported on its own
        metrics = Metrics(run, cfg["resume"])
        try:
            first, last, val = train_loop(job, metrics)
        finally:
            metrics.close()
    finally:
        distributed.close(run.procs)
    summary = {"method": cfg["method"], "out_dir": cfg["out_dir"], "checkpoint": job.saved, "step": job.step,
               "max_steps": run.max_steps, "tokens_seen": job.tokens_seen, "first": first, "last": last, "val": val,
               "wall_s": time.time() - job.t_start, "teacher": job.teacher or cfg["init_from"], "data": job.data.spec,
               "trainable_params": sum(p.numel() for p in job.params),
               "toy": job.toy_paths if job.toy_paths and job.data.spec == job.toy_paths["student_tokens"] else None}
    if not log_prefix:
        print_summary(summary, run.log)
    return summary


def print_summary(s, log):
    log("-" * 78)
    if s["first"] and s["last"]:
        f, l = s["first"], s["last"]
        log(f"done: {s['step']} steps, {s['tokens_seen']:,} tokens in {s['wall_s']:.0f} s | loss {f['loss']:.3f} -> "
            f"{l['loss']:.3f} (kl {f['kl']:.3f} -> {l['kl']:.3f}, lm {f['lm']:.3f} -> {l['lm']:.3f}, "
            f"clone {f['clone']:.3f} -> {l['clone']:.3f})")
    if s["val"]:
        log(f"val: lm {s['val']['val_lm']:.3f} (ppl {s['val']['val_ppl']:.2f}), kl {s['val']['val_kl']:.3f} over "
            f"{s['val']['val_windows']} windows")
    log(f"checkpoint: {s['checkpoint']}")
    if s["step"] < s["max_steps"]:
        log("continue:   python train.py <same arguments> --resume")
    student_hf = os.path.join(s["out_dir"], "student_hf")
    log("next:")
    log(f"  python convert.py --ckpt={s['out_dir']} --out={student_hf}")
    models = f"--model={s['teacher']} " if s["teacher"] else ""
    data = toy.eval_arguments(s["toy"]) if s["toy"] else "--data=VAL_TEXT_FILE"
    log(f"  python eval_tiny.py {models}--model={student_hf} {data}")


def main(argv):
    train(parse_args(argv))


if __name__ == "__main__":
    sys.exit(run_main(main))
