"""
Train a Low-Rank Clone student (or one of the two baselines it is compared with) on prepared token files.
One loop serves a laptop and a cluster:

    python train.py                                  # toy run: CPU, offline, a few minutes
    python train.py config/lrc_1.7b.py --data=DIR    # one process (one GPU, or the CPU)
    torchrun --standalone --nproc_per_node=8 train.py config/lrc_1.7b.py --data=DIR
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        train.py config/lrc_1.7b.py --data=DIR --micro_batch_size=1

Configuration, nanoGPT style: DEFAULTS below (they are the toy preset), then each config/NAME.py given
(plain Python, executed; its top-level names override), then --key=value (a Python literal, or a bare
string). Unknown keys and wrongly typed values are refused. --resume continues the latest checkpoint
in out_dir exactly. train(cfg) runs the same thing from Python and returns a summary dict.

Methods (one loop, spec section 4 for the losses):
  lrc      the LRC student: trainable projections of a frozen teacher; L = L_KL + L_LM + alpha * L_clone
  kd       an ordinary Qwen2 of the exported student's shape, random init; L = L_KL + L_LM
  scratch  the same student trained on the data alone; L = L_LM
"""
import ast
import base64
import difflib
import glob
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace

# Before torch loads OpenMP: idle worker threads sleep instead of spinning. On a small CPU that is running
# anything else, spinning threads burn the time slices their partners need: on a 2-core machine with one
# other busy process, a toy micro-step took 4.2 s with the default and 0.39 s with PASSIVE (1 thread: 0.39 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import lrc  # noqa: E402
from lrc import LRCError, Qwen2, Qwen2Config  # noqa: E402

# -----------------------------------------------------------------------------
# Configuration. These defaults are the toy preset: `python train.py` distils a tiny teacher (itself
# trained from scratch by this script on first use) on a 2-core CPU in a few minutes.

DEFAULTS = dict(
    # what to train
    out_dir="out/toy",            # checkpoints, metrics.jsonl, and for the toy run its data and teacher
    method="lrc",                 # 'lrc' | 'kd' | 'scratch'
    teacher="toy",                # checkpoint dir or hub id; 'toy' = build/cache a tiny teacher in out_dir/teacher
    data="toy",                   # prepared token dir (data/prepare.py); 'toy' = the toy corpus's student split
    student_hidden=64,            # d_s, the student's residual width (spec section 3)
    tie_proj=True,                # one projection for embedding and head (tied student when the teacher is tied)
    alpha=0.5,                    # weight of L_clone
    tau=40.0,                     # temperature of L_KL
    init_std=0.02,                # projections ~ normal(0, init_std)
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
    # hardware
    device="auto",                # 'auto' = cuda:LOCAL_RANK if available, else cpu
    dtype="auto",                 # 'auto' = bf16 autocast and a bf16 teacher on cuda, fp32 on cpu; 'bf16' | 'fp32'
    compile="auto",               # torch.compile: 'auto' = on for cuda, off for cpu; or True / False
    activation_checkpointing=False,  # lrc only: recompute each student layer in backward (less memory, ~1 more forward)
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
# keys whose value may be None (or, for compile, 'auto' or a bool), with the type they hold otherwise
OPTIONAL_TYPES = {"teacher": str, "max_steps": int, "max_tokens": float, "stop_step": int, "student_config": dict,
                  "wandb_project": str, "wandb_run_name": str, "compile": (bool, str)}
CHOICES = {"method": ("lrc", "kd", "scratch"), "decay": ("linear", "cosine"), "dtype": ("auto", "bf16", "fp32"),
           "compile": ("auto", True, False)}
EXCLUSIVE = {"max_steps": "max_tokens", "max_tokens": "max_steps"}  # setting one clears the other


def _type_name(t):
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else t.__name__


def check_value(key, value, where="config"):
    """The value converted to the key's type (int -> float, 0/1 -> bool), or a one-line LRCError."""
    if key not in DEFAULTS:
        close = difflib.get_close_matches(key, DEFAULTS, n=3)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        raise LRCError(f"unknown config key {key!r} in {where}{hint}: the keys are listed in DEFAULTS in train.py")
    expected = OPTIONAL_TYPES.get(key, type(DEFAULTS[key]))
    types = expected if isinstance(expected, tuple) else (expected,)
    optional = key in OPTIONAL_TYPES
    converted = _BAD
    if value is None:
        converted = None if optional else _BAD
    elif isinstance(value, bool):                            # bool is an int to Python, not to us
        converted = value if bool in types else _BAD
    elif isinstance(value, types):
        converted = value
    elif float in types and isinstance(value, int):
        converted = float(value)
    elif int in types and isinstance(value, float) and value.is_integer():
        converted = int(value)                               # --max_steps=1e4
    elif bool in types and isinstance(value, int) and value in (0, 1):
        converted = bool(value)
    if converted is _BAD:
        raise LRCError(f"{key}={value!r} in {where} is not {_type_name(expected)}{' or None' if optional else ''}: "
                       f"e.g. --{key}={DEFAULTS[key]!r}")
    if key in CHOICES and converted not in CHOICES[key]:
        raise LRCError(f"{key}={converted!r} in {where} is not one of {', '.join(map(repr, CHOICES[key]))}")
    return converted


_BAD = object()


def set_key(cfg, key, value, where):
    value = check_value(key, value, where)
    if value is not None and key in EXCLUSIVE:
        cfg[EXCLUSIVE[key]] = None  # the later of max_steps / max_tokens wins
    cfg[key] = value


def load_config_file(path, cfg):
    """Execute a config file (plain Python) and apply its top-level names to cfg."""
    if not os.path.isfile(path):
        raise LRCError(f"config file {path!r} does not exist: see config/ for the presets")
    namespace = {"__file__": path}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), namespace)
    except SyntaxError as e:
        raise LRCError(f"config file {path}, line {e.lineno}: {e.msg}") from None
    except Exception as e:
        raise LRCError(f"config file {path} failed ({type(e).__name__}: {e})") from None
    for key, value in namespace.items():
        if key.startswith("_") or callable(value) or type(value).__name__ == "module":
            continue
        set_key(cfg, key, value, path)


def parse_args(argv):
    """sys.argv[1:] -> full config dict: DEFAULTS, then config files, then --key=value, in order."""
    cfg = dict(DEFAULTS)
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__ + "\nkeys and defaults:\n" + "\n".join(f"  --{k}={v!r}" for k, v in DEFAULTS.items()))
            sys.exit(0)
        if arg == "--resume":
            cfg["resume"] = True
        elif arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise LRCError(f"{arg!r}: write options as --key=value (e.g. --max_steps=100); "
                               f"--resume alone is a flag")
            if key not in DEFAULTS:
                check_value(key, None, "the command line")  # raises, with close matches
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text                                 # a bare word: --method=kd, --teacher=Qwen/...
            if OPTIONAL_TYPES.get(key, type(DEFAULTS[key])) is str and value is not None:
                value = text                                 # --out_dir=123 is a name, not a number
            set_key(cfg, key, value, "the command line")
        elif arg.endswith(".py"):
            load_config_file(arg, cfg)
        else:
            raise LRCError(f"unexpected argument {arg!r}: pass config/NAME.py files and --key=value options")
    return cfg


def make_config(overrides=None):
    """DEFAULTS updated with a dict (what train() accepts from Python), each key checked."""
    cfg = dict(DEFAULTS)
    for key, value in (overrides or {}).items():
        cfg[key] = check_value(key, value, "the config dict")
    if cfg["max_steps"] is not None and cfg["max_tokens"] is not None:
        raise LRCError(f"both max_steps={cfg['max_steps']} and max_tokens={cfg['max_tokens']} are set: set one, "
                       f"the other to None")
    return cfg


# -----------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python train.py` is rank 0 of 1.

def setup_distributed(cfg):
    """(rank, local_rank, world_size, device, created_group)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg["device"]
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise LRCError(f"device={cfg['device']!r} but torch sees no CUDA GPU: use --device=cpu")
    if want == "cuda":
        want = f"cuda:{local_rank}"
    device = torch.device(want)
    created = False
    if world_size > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            created = True
        if device.type == "cpu":  # several processes on one CPU: share the cores instead of oversubscribing
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return rank, local_rank, world_size, device, created


def all_reduce(tensor, op="sum"):
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                    "min": dist.ReduceOp.MIN}[op])
    return tensor


def barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# -----------------------------------------------------------------------------
# Data: memory-mapped uint32 token files (spec section 7). The windows of step s are a pure function of
# (seed, s): every rank computes the same global batch and takes its own rows, so 1 process x 2
# micro-steps and 2 processes x 1 micro-step read the same windows, and a resumed run reads exactly the
# windows the uninterrupted run would have read.

def window_offsets(seed, step, n_windows, n_tokens, seq_len):
    """Start offsets of the global batch of optimizer step `step`: windows of seq_len + 1 tokens."""
    return np.random.default_rng([seed, step]).integers(0, n_tokens - seq_len, size=n_windows)


class TokenWindows:
    def __init__(self, tokens, cfg, rank, world_size, grad_accum, device):
        self.tokens, self.seed, self.seq_len = tokens, cfg["seed"], cfg["seq_len"]
        self.mbs, self.rank, self.world, self.grad_accum = cfg["micro_batch_size"], rank, world_size, grad_accum
        self.device, self.cached = device, (None, None)
        if len(tokens) < self.seq_len + 1:
            raise LRCError(f"the training data has {len(tokens)} tokens, fewer than seq_len + 1 = {self.seq_len + 1}: "
                           f"use more data or a smaller --seq_len")

    def batch(self, step, micro):
        """(x, y) of rank `rank` at micro-step `micro` of `step`: rows (micro * world + rank) of the global batch."""
        if self.cached[0] != step:
            n = self.mbs * self.world * self.grad_accum
            self.cached = (step, window_offsets(self.seed, step, n, len(self.tokens), self.seq_len))
        first = (micro * self.world + self.rank) * self.mbs
        offsets = self.cached[1][first:first + self.mbs]
        windows = self.tokens[offsets[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)
        return to_device(windows[:, :-1], self.device), to_device(windows[:, 1:], self.device)


def to_device(array, device):
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":  # pinned + non_blocking: the copy overlaps the GPU's work
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def check_token_range(tokens, vocab_size, path, rank, world_size, device):
    """Refuse token ids >= the model's vocabulary: each rank scans its share, the maximum is all-reduced."""
    share = math.ceil(len(tokens) / world_size)
    local_max = -1
    for start in range(rank * share, min(len(tokens), (rank + 1) * share), 1 << 26):
        stop = min(start + (1 << 26), (rank + 1) * share, len(tokens))
        local_max = max(local_max, int(tokens[start:stop].max()))
    biggest = int(all_reduce(torch.tensor([local_max], device=device), "max").item())
    if biggest >= vocab_size:
        raise LRCError(f"{path} holds token id {biggest}, but the model's vocabulary has {vocab_size} ids: "
                       f"prepare the data with the teacher's tokenizer (data/prepare.py --tokenizer=TEACHER)")


def read_data_meta(data):
    """meta.json of the token directory: checked before the (possibly large) teacher is loaded."""
    from data.prepare import read_meta
    if not os.path.isdir(data):
        raise LRCError(f"data directory {data!r} does not exist: prepare token files with data/prepare.py "
                       f"(or use --data=toy)")
    return read_meta(data)


def open_data(cfg, vocab_size, teacher_dir, log):
    """(train memmap, val memmap or None, meta). Checks the vocabulary and the tokenizer hash."""
    from data.prepare import open_tokens, tokenizer_sha256
    data = cfg["data"]
    meta = read_data_meta(data)
    if teacher_dir is not None and os.path.isfile(os.path.join(teacher_dir, "tokenizer.json")):
        expected = tokenizer_sha256(teacher_dir)
        if meta["tokenizer_sha256"] != expected:
            msg = (f"{data!r} was tokenized with another tokenizer.json than the teacher's (sha256 "
                   f"{meta['tokenizer_sha256'][:12]}... vs {expected[:12]}...): prepare it with "
                   f"data/prepare.py --tokenizer={teacher_dir}")
            if cfg["strict_tokenizer"]:
                raise LRCError(msg)
            log(f"warning: {msg} (strict_tokenizer=True refuses)")
    train_tokens = open_tokens(data, "train", vocab_size=vocab_size)
    val_tokens = None
    if cfg["eval_tokens"] and "val" in meta["n_tokens"] and meta["n_tokens"]["val"] > cfg["seq_len"]:
        val_tokens = open_tokens(data, "val", vocab_size=vocab_size)
    return train_tokens, val_tokens, meta


# -----------------------------------------------------------------------------
# Models. Each is an nn.Module whose forward(idx, targets) returns (loss, {"kl", "lm", "clone"}); the frozen
# teacher, when there is one, is its submodule `teacher` (requires_grad=False, excluded from DDP).

class Baseline(nn.Module):
    """kd and scratch: an ordinary Qwen2 student. kd: L_KL + L_LM against the teacher; scratch: L_LM."""

    def __init__(self, student: Qwen2, teacher: Qwen2 = None, tau: float = 40.0):
        super().__init__()
        self.student, self.teacher, self.tau = student, teacher, tau
        if teacher is not None:
            teacher.requires_grad_(False)

    def forward(self, idx, targets):
        h_s = self.student.hidden(idx)
        h_t = W_t = None
        if self.teacher is not None:
            with torch.no_grad():
                h_t, W_t = self.teacher.hidden(idx), self.teacher.lm_head.weight
        loss, kl, lm = lrc.distill_loss(h_s, self.student.lm_head.weight, targets, h_t, W_t, tau=self.tau)
        return loss, {"kl": kl, "lm": lm, "clone": torch.zeros((), device=idx.device)}


def exported_shape(teacher_config: Qwen2Config, cfg) -> Qwen2Config:
    """The LRC student's exported shape (spec section 5), which the kd and scratch baselines share."""
    if cfg["student_config"] is not None:
        try:
            return Qwen2Config.from_dict({"model_type": "qwen2", **cfg["student_config"]})
        except TypeError as e:
            raise LRCError(f"student_config is not a valid Qwen2Config ({e}): use Qwen2Config field names") from None
    if teacher_config is None:
        raise LRCError("method=scratch without a teacher needs a shape: "
                       "student_config=dict(vocab_size=..., hidden_size=..., ...)")
    if not 1 <= cfg["student_hidden"] <= teacher_config.hidden_size:
        raise LRCError(f"student_hidden={cfg['student_hidden']} must be between 1 and the teacher's hidden_size "
                       f"{teacher_config.hidden_size}: pick a smaller student_hidden")
    return replace(teacher_config, hidden_size=cfg["student_hidden"], head_dim=teacher_config.head_dim,
                   tie_word_embeddings=teacher_config.tie_word_embeddings and cfg["tie_proj"],
                   extra=dict(teacher_config.extra))


def load_teacher(path, device, dtype):
    """load_qwen2, with any read failure turned into a one-line error."""
    try:
        return lrc.load_qwen2(path, device=device, dtype=dtype)
    except LRCError:
        raise
    except Exception as e:  # truncated safetensors, unreadable file, malformed config.json
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise LRCError(f"could not read the teacher {path!r} ({type(e).__name__}: {first}): "
                       f"re-download or re-save the checkpoint") from None


def teacher_fingerprint(path):
    """A cheap identity of a checkpoint's weights: sha256 over each safetensors file's size and its first and
    last MiB (header, and the first and last tensor bytes). Resuming with other weights is refused."""
    h = hashlib.sha256()
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        size = os.path.getsize(file)
        h.update(f"{os.path.basename(file)}:{size}".encode())
        with open(file, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()


def build_model(cfg, teacher_path, device, compute_dtype):
    """(model, teacher_config or None, student_config). The model's float32 parameters are the trainable ones."""
    method = cfg["method"]
    teacher = teacher_config = None
    if method in ("lrc", "kd"):
        # bf16 teacher on GPU: it is frozen, so it needs no float32 master copy
        teacher = load_teacher(teacher_path, device, compute_dtype)
        teacher_config = teacher.config
    elif teacher_path is not None:  # scratch: the teacher fixes the shape only; its weights are not read
        teacher_config = Qwen2Config.from_pretrained(lrc.resolve_checkpoint(teacher_path))
    if method == "lrc":
        if cfg["student_config"] is not None:
            raise LRCError("student_config is for kd/scratch; an LRC student's shape is the teacher's with "
                           "hidden_size=student_hidden: drop student_config")
        model = lrc.LRC(teacher, cfg["student_hidden"], tie_proj=cfg["tie_proj"], alpha=cfg["alpha"],
                        tau=cfg["tau"], init_std=cfg["init_std"], checkpoint_layers=cfg["activation_checkpointing"])
        return model, teacher_config, model.student_config
    if cfg["activation_checkpointing"]:
        raise LRCError(f"activation_checkpointing is implemented for method=lrc only: drop it for method={method}")
    student_config = exported_shape(teacher_config, cfg)
    with torch.device(device):
        student = Qwen2(student_config)  # float32 master weights; autocast computes in bf16 on GPU
    return Baseline(student, teacher if method == "kd" else None, tau=cfg["tau"]), teacher_config, student_config


def trainable_state(model, method):
    """The checkpoint's model tensors by name: LRC's trainable parameters, or the whole student Qwen2
    state dict with Hugging Face names (lm_head.weight omitted when tied)."""
    if method == "lrc":
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = dict(model.student.state_dict(keep_vars=True))
    if model.student.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    return state


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
# Checkpoints: OUT/ckpt_{step:08d}/ with model.safetensors, optimizer.safetensors and state.json, written
# to a temporary directory and renamed into place, so a kill during a save leaves the previous checkpoint
# intact. Nothing is pickled.

CKPT_RE = re.compile(r"^ckpt_(\d{8})$")


def list_checkpoints(out_dir):
    if not os.path.isdir(out_dir):
        return []
    return sorted(os.path.join(out_dir, n) for n in os.listdir(out_dir) if CKPT_RE.match(n))


def latest_checkpoint(out_dir):
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def _b64(tensor):
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()


def _unb64(text):
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def save_checkpoint(out_dir, step, model_state, optimizer, param_names, state, keep_last):
    final = os.path.join(out_dir, f"ckpt_{step:08d}")
    tmp = tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=out_dir)
    try:
        tensors = {n: t.detach().float().contiguous().cpu() for n, t in model_state.items()}
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        opt = {}
        for param, name in param_names.items():
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value):
                    opt[f"{key}.{name}"] = value.detach().float().contiguous().cpu()
        save_file(opt, os.path.join(tmp, "optimizer.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=1)
        for name in os.listdir(tmp):  # on disk before the rename makes the checkpoint visible
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if os.path.exists(final):  # the same step saved again (a rerun): swap, never a half-state
            old = tempfile.mkdtemp(prefix=".tmp-old-", dir=out_dir)
            os.replace(final, os.path.join(old, "ckpt"))
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out_dir)[:-keep_last]:  # only after the new one is in place
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path):
    """(state dict from state.json, {name: tensor} of model.safetensors, of optimizer.safetensors)."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        tensors = []
        for file in ("model.safetensors", "optimizer.safetensors"):
            with safe_open(os.path.join(path, file), framework="pt") as f:
                tensors.append({k: f.get_tensor(k) for k in f.keys()})
    except (OSError, ValueError) as e:
        raise LRCError(f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e)[:200]}): delete it to resume "
                       f"from the one before") from None
    except Exception as e:  # safetensors' own error type
        raise LRCError(f"checkpoint {path} is unreadable ({type(e).__name__}): delete it to resume from the one "
                       f"before") from None
    return state, tensors[0], tensors[1]


def check_resumable(state, path, cfg, teacher_config, student_config, fingerprint):
    """One-line refusal when the checkpoint was made with another teacher, method or student shape."""
    fix = f"pass the checkpoint's settings, or start a fresh run in another out_dir"

    def first_difference(then, now):
        then, now = then or {}, now or {}
        keys = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
        return (keys[0], then.get(keys[0]), now.get(keys[0])) if keys else ("config", then, now)

    def refuse(detail, hint=fix):
        raise LRCError(f"cannot resume {path}: it was made with {detail}: {hint}")

    if state.get("method") != cfg["method"]:
        refuse(f"method={state.get('method')!r}, this run has {cfg['method']!r}",
               f"pass --method={state.get('method')}")
    if cfg["method"] == "lrc":
        for key in ("student_hidden", "tie_proj"):
            if state.get(key) != cfg[key]:
                refuse(f"{key}={state.get(key)!r}, this run has {cfg[key]!r}", f"pass --{key}={state.get(key)!r}")
    then_t = state.get("teacher_config")
    now_t = teacher_config.to_dict() if teacher_config is not None and cfg["method"] != "scratch" else None
    teacher_hint = f"pass --teacher={state.get('teacher')}, or start a fresh run in another out_dir"
    if json.dumps(then_t, sort_keys=True) != json.dumps(now_t, sort_keys=True):
        key, then, now = first_difference(then_t, now_t)
        refuse(f"a different teacher ({key} {then!r} in the checkpoint, {now!r} now)", teacher_hint)
    if state.get("teacher_fingerprint") != fingerprint:
        refuse(f"other teacher weights (same config.json, different safetensors)", teacher_hint)
    then_s, now_s = state.get("student_config"), student_config.to_dict()
    if json.dumps(then_s, sort_keys=True) != json.dumps(now_s, sort_keys=True):
        key, then, now = first_difference(then_s, now_s)
        refuse(f"another student shape ({key} {then!r} in the checkpoint, {now!r} now)")


# -----------------------------------------------------------------------------
# The toy world: data, tokenizer and teacher built on first use, cached under out_dir.

def toy_teacher_spec(cfg, vocab_size, eos_id):
    return {"vocab_size": vocab_size, "hidden_size": cfg["toy_teacher_hidden"],
            "intermediate_size": cfg["toy_teacher_ffn"], "num_hidden_layers": cfg["toy_teacher_layers"],
            "num_attention_heads": cfg["toy_teacher_heads"], "num_key_value_heads": cfg["toy_teacher_kv_heads"],
            # the context it is trained at: readers (eval_tiny) take it as the longest context to evaluate
            "tie_word_embeddings": True, "max_position_embeddings": cfg["seq_len"], "rope_theta": 10000.0,
            "eos_token_id": eos_id, "bos_token_id": eos_id}


def prepare_toy(cfg, rank, log):
    """Resolve teacher='toy' / data='toy': (teacher path, data dir, toy paths dict or None)."""
    teacher, data, paths = cfg["teacher"], cfg["data"], None
    if teacher != "toy" and data != "toy":
        return teacher, data, None
    from data.toy import build_toy
    toy_dir = os.path.join(cfg["out_dir"], "data")
    if rank == 0:
        paths = build_toy(toy_dir)
    barrier()
    if rank != 0:
        paths = build_toy(toy_dir)  # cached by rank 0: only reads
    if data == "toy":
        data = paths["student_tokens"]
    if teacher == "toy":
        teacher = os.path.join(cfg["out_dir"], "teacher")
        from data.prepare import read_meta
        meta = read_meta(paths["teacher_tokens"])
        recipe = {"spec": toy_teacher_spec(cfg, meta["vocab_size"], meta["eos_id"]), "steps": cfg["toy_teacher_steps"],
                  "lr": cfg["toy_teacher_lr"], "seed": cfg["seed"], "seq_len": cfg["seq_len"],
                  "tokens_per_step": cfg["tokens_per_step"], "tokenizer_sha256": meta["tokenizer_sha256"]}
        cached = None
        if os.path.isfile(os.path.join(teacher, "config.json")):
            with open(os.path.join(teacher, "config.json")) as f:
                cached = json.load(f).get("lrc_toy_teacher")
        if cached == recipe:
            log(f"toy teacher: reusing {teacher} (delete it to retrain)")
        else:
            log(f"toy teacher: training a tiny Qwen2 from scratch ({recipe['spec']['num_hidden_layers']} layers, "
                f"hidden {recipe['spec']['hidden_size']}, {recipe['steps']} steps) with method=scratch")
            run = dict(cfg, method="scratch", teacher=None, data=paths["teacher_tokens"], student_config=recipe["spec"],
                       out_dir=os.path.join(cfg["out_dir"], "teacher_run"), max_steps=recipe["steps"], max_tokens=None,
                       stop_step=None, lr=recipe["lr"], min_lr=0.0, resume=False, overwrite=True, save_interval=0,
                       keep_last=1, wandb_project=None, eval_interval=0,
                       log_interval=max(cfg["log_interval"], recipe["steps"] // 8))  # a shorter log before the main run
            summary = train(run, _prefix="[teacher] ")
            if rank == 0:
                _, weights, _ = read_checkpoint(summary["checkpoint"])
                with torch.device("meta"):
                    model = Qwen2(Qwen2Config.from_dict({"model_type": "qwen2", **recipe["spec"]}))
                if model.config.tie_word_embeddings:
                    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
                model.load_state_dict(weights, assign=True)
                lrc.save_qwen2(model, teacher, extra_config={"lrc_toy_teacher": recipe})
                for name in ("tokenizer.json", "tokenizer_config.json"):
                    src = os.path.join(os.path.dirname(paths["tokenizer"]), name)
                    if os.path.isfile(src):
                        shutil.copy(src, os.path.join(teacher, name))
                log(f"toy teacher: saved to {teacher} (built in {summary['wall_s']:.0f} s)")
            barrier()
    return teacher, data, paths


# -----------------------------------------------------------------------------
# Evaluation on the val split: consecutive windows, the student's losses with the teacher's targets.

@torch.no_grad()
def evaluate(model, val_tokens, cfg, rank, world_size, device, autocast):
    seq_len, mbs = cfg["seq_len"], cfg["micro_batch_size"]
    n_windows = min(cfg["eval_tokens"] // seq_len, (len(val_tokens) - 1) // seq_len)
    sums = torch.zeros(4, device=device)  # kl, lm, clone, windows
    mine = list(range(rank, n_windows, world_size))
    for i in range(0, len(mine), mbs):
        starts = np.array(mine[i:i + mbs]) * seq_len
        windows = val_tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
        x, y = to_device(windows[:, :-1], device), to_device(windows[:, 1:], device)
        with autocast:
            _, parts = model(x, y)
        sums += torch.stack([parts["kl"].float(), parts["lm"].float(), parts["clone"].float(),
                             torch.tensor(1.0, device=device)]) * len(starts)
    sums[3] = len(mine)
    kl, lm, clone, n = all_reduce(sums).tolist()
    if n == 0:
        return None
    return {"val_kl": kl / n, "val_lm": lm / n, "val_clone": clone / n, "val_ppl": math.exp(min(lm / n, 50)),
            "val_windows": int(n)}


# -----------------------------------------------------------------------------
# Training

def train(cfg=None, _prefix=""):
    """Run one training job; cfg is a dict of overrides of DEFAULTS. Returns a summary dict."""
    cfg = make_config(cfg)
    rank, local_rank, world_size, device, created_group = setup_distributed(cfg)
    master = rank == 0

    def log(msg):
        if master:
            print(_prefix + msg, flush=True)

    try:
        return _train(cfg, rank, world_size, device, master, log, _prefix)
    finally:
        if created_group:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(cfg, rank, world_size, device, master, log, prefix):
    method, out_dir = cfg["method"], cfg["out_dir"]
    # the batch: tokens_per_step = seq_len * micro_batch_size * world_size * grad_accum, exactly
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

    # A fresh run must not silently mix with an older run's checkpoints
    existing = latest_checkpoint(out_dir)
    if not cfg["resume"] and existing is not None and not cfg["overwrite"]:
        raise LRCError(f"{out_dir} already holds checkpoints (latest {os.path.basename(existing)}): pass --resume to "
                       f"continue, --overwrite=True to start over, or choose another --out_dir")
    if cfg["resume"] and existing is None:
        raise LRCError(f"--resume: no checkpoint in {out_dir!r} (ckpt_XXXXXXXX directories): run without --resume")

    cfg_data_was_toy = cfg["data"] == "toy"
    teacher_path, data_dir, toy = prepare_toy(cfg, rank, log)
    t_start = time.time()  # the run's own time: building the toy world is reported by prepare_toy
    cfg = dict(cfg, data=data_dir)
    read_data_meta(data_dir)
    if method in ("lrc", "kd") and teacher_path is None:
        raise LRCError(f"method={method} needs a teacher: pass --teacher=DIR or a hub id")

    # numerics: bf16 autocast on GPU (float32 masters), float32 on CPU
    dtype_name = cfg["dtype"] if cfg["dtype"] != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    compute_dtype = lrc.as_dtype(dtype_name)
    autocast = (torch.autocast(device.type, dtype=compute_dtype) if compute_dtype != torch.float32 else nullcontext())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_compile = cfg["compile"] if cfg["compile"] != "auto" else device.type == "cuda"

    torch.manual_seed(cfg["seed"])  # identical initialisation on every rank (DDP also broadcasts rank 0's)
    local_teacher = lrc.resolve_checkpoint(teacher_path) if teacher_path is not None else None
    model, teacher_config, student_config = build_model(cfg, local_teacher, device, compute_dtype)
    fingerprint = teacher_fingerprint(local_teacher) if method != "scratch" else None
    vocab_size = student_config.vocab_size
    train_tokens, val_tokens, meta = open_data(cfg, vocab_size, local_teacher, log)
    check_token_range(train_tokens, vocab_size, os.path.join(data_dir, "train.bin"), rank, world_size, device)
    if val_tokens is not None:
        check_token_range(val_tokens, vocab_size, os.path.join(data_dir, "val.bin"), rank, world_size, device)

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model_state = trainable_state(model, method)
    param_names = {p: n for n, p in model_state.items()}  # the tied head is saved under its embedding's name
    n_trainable = sum(p.numel() for p in params.values())
    optimizer = torch.optim.AdamW(list(params.values()), lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                                  weight_decay=cfg["weight_decay"], fused=device.type == "cuda")

    step, tokens_seen = 0, 0
    if cfg["resume"]:
        state, weights, opt_tensors = read_checkpoint(existing)
        check_resumable(state, existing, cfg, teacher_config, student_config, fingerprint)
        missing = sorted(set(model_state) - set(weights))
        if missing:
            raise LRCError(f"cannot resume {existing}: it lacks {missing[0]!r}; it was not written by this train.py")
        with torch.no_grad():
            for name, tensor in model_state.items():
                tensor.copy_(weights[name])
        opt_sd = optimizer.state_dict()
        index = {name: i for i, name in enumerate(param_names[p] for p in params.values())}
        opt_sd["state"] = {}
        for key, tensor in opt_tensors.items():
            field, _, name = key.partition(".")
            opt_sd["state"].setdefault(index[name], {})[field] = tensor
        optimizer.load_state_dict(opt_sd)
        step, tokens_seen = state["step"], state["tokens_seen"]
        torch.set_rng_state(_unb64(state["rng"]["torch_cpu"]))
        if device.type == "cuda" and state["rng"].get("torch_cuda"):
            torch.cuda.set_rng_state(_unb64(state["rng"]["torch_cuda"]), device)
        log(f"resuming {existing} at step {step} ({tokens_seen:,} tokens seen)")

    # DDP over the trainable parameters only: the frozen teacher is neither broadcast nor bucketed
    train_model = model
    ddp = None
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        frozen = [n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=False, gradient_as_bucket_view=True)
        train_model = ddp
    if use_compile:
        train_model = torch.compile(train_model)

    if master:
        os.makedirs(out_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(out_dir, ".tmp-*")):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        if not cfg["resume"]:
            for old in list_checkpoints(out_dir):  # overwrite=True: the previous run's checkpoints go
                shutil.rmtree(old)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    metrics = open(metrics_path, "a" if cfg["resume"] else "w") if master else None
    wandb_run = None
    if master and cfg["wandb_project"]:
        try:
            import wandb
            wandb_run = wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg)
        except ImportError:
            log("warning: wandb_project is set but wandb is not installed: logging to metrics.jsonl only")

    def record(row):
        if master:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if wandb_run is not None:
                wandb_run.log(row, step=row["step"])

    end_step = min(max_steps, cfg["stop_step"]) if cfg["stop_step"] is not None else max_steps
    log(f"method {method} | teacher {teacher_path} | data {data_dir} | device {device} x {world_size} | "
        f"dtype {dtype_name} | compile {use_compile}")
    log(f"{n_trainable:,} trainable parameters | {cfg['micro_batch_size']} seq x {cfg['seq_len']} tokens x "
        f"{world_size} ranks x {grad_accum} micro-steps = {cfg['tokens_per_step']:,} tokens/step | "
        f"steps {step} -> {end_step} of {max_steps} | lr {cfg['lr']:g} {cfg['decay']}")

    windows = TokenWindows(train_tokens, cfg, rank, world_size, grad_accum, device)
    # Device-side accumulators, read only at log intervals: no host sync inside a step
    sums = torch.zeros(4, device=device)            # total, kl, lm, clone summed over steps since the last log
    first_bad = torch.full((), -1, dtype=torch.long, device=device)   # first step with a non-finite loss
    grad_norm = torch.zeros((), device=device)
    steps_since, t_log = 0, time.time()
    first = last = val = None
    saved = existing if cfg["resume"] else None

    def check_finite():
        """All ranks agree whether any loss so far was non-finite; if so stop without saving."""
        bad = all_reduce(torch.where(first_bad >= 0, first_bad, torch.full_like(first_bad, 2**62)).clone(), "min")
        if int(bad.item()) < 2**62:
            where = f"the last good checkpoint is {saved}" if saved else "no checkpoint was written yet"
            raise LRCError(f"non-finite loss at step {int(bad.item())}; {where} (resume it with a lower lr: "
                           f"--resume --lr=...)")

    def save(step_now):
        nonlocal saved
        check_finite()
        if master:
            state = {"step": step_now, "tokens_seen": tokens_seen, "method": method, "teacher": teacher_path,
                     "teacher_config": teacher_config.to_dict() if method != "scratch" else None,
                     "teacher_fingerprint": fingerprint, "student_config": student_config.to_dict(),
                     "student_hidden": cfg["student_hidden"], "tie_proj": cfg["tie_proj"],
                     "max_steps": max_steps, "config": dict(cfg, resume=False),
                     "rng": {"torch_cpu": _b64(torch.get_rng_state()),
                             "torch_cuda": _b64(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None},
                     "data": {"path": data_dir, "tokenizer_sha256": meta["tokenizer_sha256"],
                              "n_tokens": len(train_tokens), "next_step": step_now,
                              "sampler": "offsets = numpy.random.default_rng([seed, step]).integers(0, n_tokens - "
                                         "seq_len, tokens_per_step // seq_len); rank r, micro-step m reads rows "
                                         "(m * world_size + r) * micro_batch_size onwards"},
                     "world_size": world_size, "grad_accum": grad_accum, "lrc_version": 1}
            saved = save_checkpoint(out_dir, step_now, model_state, optimizer, param_names, state, cfg["keep_last"])
        barrier()
        saved = saved if master else os.path.join(out_dir, f"ckpt_{step_now:08d}")

    def run_eval():
        result = evaluate(model, val_tokens, cfg, rank, world_size, device, autocast)
        if result is not None:
            log(f"eval step {step} | val lm {result['val_lm']:.4f} (ppl {result['val_ppl']:.2f}) | "
                f"val kl {result['val_kl']:.4f} | val clone {result['val_clone']:.4f}")
            record({"step": step, **result})
        return result

    train_model.train()
    paused = 0.0  # seconds spent evaluating and saving since the last log line: not training throughput
    x, y = windows.batch(step, 0)
    try:
        while step < end_step:
            lr = lr_at(step, max_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(grad_accum):
                last_micro = micro == grad_accum - 1
                # gradient all-reduce only on the last micro-step
                sync = ddp.no_sync() if ddp is not None and not last_micro else nullcontext()
                with sync:
                    with autocast:
                        loss, parts = train_model(x, y)
                    # fetch the next micro-batch while the device works
                    x, y = windows.batch(step, micro + 1) if not last_micro else windows.batch(step + 1, 0)
                    (loss / grad_accum).backward()
                sums += torch.stack([loss.detach().float(), parts["kl"].detach().float(),
                                     parts["lm"].detach().float(), parts["clone"].detach().float()]) / grad_accum
            # the global norm is computed (and logged) even without clipping: inf never clips
            grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg["grad_clip"] or math.inf,
                                                       foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # remember the first step with a non-finite loss or gradient norm, still on the device
            finite = torch.isfinite(sums.sum() + grad_norm)
            first_bad = torch.where((first_bad < 0) & ~finite, step + 1, first_bad)
            step += 1
            tokens_seen += cfg["tokens_per_step"]
            steps_since += 1

            if step == 1 or step % cfg["log_interval"] == 0 or step == end_step:
                check_finite()
                values = (all_reduce(sums.clone()) / (world_size * steps_since)).tolist()
                dt = max(1e-9, time.time() - t_log - paused)
                row = {"step": step, "tokens": tokens_seen, "loss": values[0], "kl": values[1], "lm": values[2],
                       "clone": values[3], "lr": lr, "grad_norm": float(grad_norm),
                       "tokens_per_s": steps_since * cfg["tokens_per_step"] / dt,
                       "ms_per_step": 1000 * dt / steps_since, "time": round(time.time() - t_start, 2)}
                log(f"step {step:>{len(str(max_steps))}}/{max_steps} | loss {row['loss']:.4f} | kl {row['kl']:.4f} | "
                    f"lm {row['lm']:.4f} | clone {row['clone']:.4f} | lr {lr:.2e} | "
                    f"{row['tokens_per_s']:,.0f} tok/s | {row['ms_per_step']:.0f} ms/step")
                record(row)
                first = first or row
                last = row
                sums.zero_()
                steps_since, t_log, paused = 0, time.time(), 0.0
            t_pause = time.time()
            if val_tokens is not None and cfg["eval_interval"] and step % cfg["eval_interval"] == 0 \
                    and step != max_steps:
                val = run_eval()
            if cfg["save_interval"] and step % cfg["save_interval"] == 0 and step != end_step:
                save(step)
            paused += time.time() - t_pause

        if step == end_step and (saved is None or not saved.endswith(f"ckpt_{step:08d}")):
            save(step)
        if val_tokens is not None and step == max_steps:
            val = run_eval()
    finally:
        if master:
            metrics.close()
            if wandb_run is not None:
                wandb_run.finish()
    wall = time.time() - t_start
    summary = {"method": method, "out_dir": out_dir, "checkpoint": saved, "step": step, "max_steps": max_steps,
               "tokens_seen": tokens_seen, "first": first, "last": last, "val": val, "wall_s": wall,
               "teacher": teacher_path, "data": data_dir, "trainable_params": n_trainable,
               "toy": toy if cfg_data_was_toy else None}
    if not prefix:
        print_summary(summary, log)
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
        log(f"continue:   python train.py <same arguments> --resume")
    student_hf = os.path.join(s["out_dir"], "student_hf")
    log("next:")
    log(f"  python convert.py --ckpt={s['out_dir']} --out={student_hf}")
    models = f"--model={s['teacher']} " if s["teacher"] else ""
    if s["toy"]:  # the toy world's val documents are separated by blank lines; its facts make two MC tasks
        toy = {k: v if os.path.relpath(v).startswith("..") else os.path.relpath(v)  # short where it is clearer
               for k, v in s["toy"].items() if isinstance(v, str)}
        data = (f"--data={toy['val_text']} --txt_split=paragraph --mc={toy['facts_seen']} "
                f"--mc={toy['facts_unseen']} --prompt='The home city of'")
    else:
        data = "--data=VAL_TEXT_FILE"
    log(f"  python eval_tiny.py {models}--model={student_hf} {data}")


def main(argv):
    try:
        train(parse_args(argv))
    except LRCError as e:
        rank = int(os.environ.get("RANK", "0"))
        print(f"error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
