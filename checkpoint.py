"""
The training checkpoint format, owned here alone: train.py writes it, train.py (resume), convert.py,
eval_tiny.py and the experiments read it.

    OUT_DIR/ckpt_{step:08d}/
        model.safetensors      the trainable tensors in float32: an LRC student's projections and norms
                               (P_emb, layers.0.P_q, ...), or a kd / scratch student's whole Qwen2 state
                               with Hugging Face names (lm_head.weight omitted when tied)
        optimizer.safetensors  AdamW state as "{field}.{parameter name}" (exp_avg.P_emb, step.P_emb, ...)
        state.json             step, tokens seen, method, the teacher (as given, and where it was:
                               teacher_path, absolute, and teacher_in_run, relative to OUT_DIR when it lives
                               inside it) with its config and a fingerprint of its weights, the student's
                               config, the full run config, RNG states and how the data was read

A checkpoint is written to a temporary directory and renamed into place (lrc.atomic_directory): a kill
during a save leaves the previous checkpoint intact. Nothing is pickled. A run sharded by FSDP2
(parallel=fsdp) writes the same files: gather() collects full tensors on rank 0 with
torch.distributed.checkpoint.state_dict, and restore() hands them back to any world size or parallel mode.
"""
import base64
import glob
import hashlib
import json
import os
import re
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lrc
from distributed import is_sharded
from lrc import LRCError

CKPT_RE = re.compile(r"^ckpt_(\d{8})$")
METHODS = ("lrc", "kd", "scratch", "sft")
# what a model directory needs besides its weights, copied from the teacher (spec section 5)
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "generation_config.json"]


# -----------------------------------------------------------------------------
# Finding checkpoints

def list_checkpoints(out_dir):
    """The ckpt_* directories of a training output directory, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(os.path.join(out_dir, n) for n in os.listdir(out_dir) if CKPT_RE.match(n))


def latest_checkpoint(out_dir):
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def find_checkpoint(path: str) -> str:
    """A ckpt_* directory as is; a training output directory -> its latest ckpt_* that has a state.json."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    if not os.path.isdir(path):
        raise LRCError(f"checkpoint {path!r} {'is a file' if os.path.exists(path) else 'does not exist'}: pass a "
                       f"training output directory or one of its ckpt_* directories")
    found = [c for c in list_checkpoints(path) if os.path.isfile(os.path.join(c, "state.json"))]
    if not found:
        raise LRCError(f"{path!r} holds no ckpt_*/state.json: pass a training output directory (train.py "
                       f"--out_dir) or one of its ckpt_* directories")
    return found[-1]


# -----------------------------------------------------------------------------
# The output directory and writing

def check_out_dir(out_dir, resume=False, overwrite=True):
    """The latest checkpoint to resume from (or None), after refusing a training output directory that cannot
    hold a run: a regular file, or a path that cannot be created or written; a fresh run over an older run's
    checkpoints without overwrite; --resume with nothing to resume."""
    lrc.check_writable_dir(out_dir, "--out_dir")
    existing = latest_checkpoint(out_dir)
    if not resume and existing is not None and not overwrite:
        raise LRCError(f"{out_dir} already holds checkpoints (latest {os.path.basename(existing)}): pass --resume to "
                       f"continue, --overwrite=True to start over, or choose another --out_dir")
    if resume and existing is None:
        raise LRCError(f"--resume: no checkpoint in {out_dir!r} (ckpt_XXXXXXXX directories): run without --resume")
    return existing


def optimizer_tensors(optimizer, param_names):
    """{"{field}.{name}": float32 tensor} of an optimizer's per-parameter state; param_names maps each
    parameter to the name its weights are saved under."""
    tensors = {}
    for param, name in param_names.items():
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value):
                tensors[f"{key}.{name}"] = value.detach().float().contiguous().cpu()
    return tensors


def gather(model, optimizer, model_state, master):
    """(model tensors, optimizer tensors) of a checkpoint, full-sized on the master (empty elsewhere): every
    rank calls it. model_state is {checkpoint name: parameter}. An FSDP2-sharded model's parameters and AdamW
    state are gathered with torch.distributed.checkpoint.state_dict (full_state_dict: a collective, CPU copies
    on rank 0 only), under the same names, so the files are the same whatever the world size or parallel mode."""
    if not is_sharded(model):
        if not master:
            return {}, {}
        return model_state, optimizer_tensors(optimizer, {p: n for n, p in model_state.items()})
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)          # the frozen teacher is left out
    state = get_optimizer_state_dict(model, optimizer, options=options).get("state", {})
    if not master:
        return {}, {}
    fqn = module_names(model, model_state)
    missing = sorted(set(fqn.values()) - set(weights))
    assert not missing, missing[:3]
    name_of = {module_name: name for name, module_name in fqn.items()}
    # only the trainable tensors: a tied teacher's head can come through as a second name of its embedding
    optimizer_state = {f"{key}.{name_of[module_name]}": value.detach().float().contiguous()
                       for module_name, fields in state.items() for key, value in fields.items()
                       if torch.is_tensor(value)}
    return {name: weights[fqn[name]] for name in model_state}, optimizer_state


def module_names(model, model_state):
    """{checkpoint name: the parameter's name in `model`}, the names torch.distributed.checkpoint uses. The same
    for lrc.LRC; a Baseline's checkpoint names are its student's (Hugging Face names, without "student.")."""
    name_in_model = {id(p): n for n, p in model.named_parameters()}
    return {name: name_in_model[id(tensor)] for name, tensor in model_state.items()}


def run_identity(cfg, teacher, teacher_dir, teacher_config, student_config, init_dir, data) -> dict:
    """What a resumed run must match (check_resumable), recorded in every state.json: the method, the teacher as
    given with its config and weights' fingerprint (none for scratch), the student's shape, the data's sources."""
    distilled = teacher_config is not None and cfg["method"] != "scratch"
    return {"method": cfg["method"], "teacher": teacher, "sampler": cfg["sampler"],
            "teacher_config": teacher_config.to_dict() if distilled else None,
            "teacher_fingerprint": teacher_fingerprint(teacher_dir) if distilled else None,
            "student_config": student_config.to_dict(), "student_hidden": cfg["student_hidden"],
            "tie_proj": cfg["tie_proj"], "init_from": cfg["init_from"],
            "init_from_path": os.path.abspath(init_dir) if init_dir else None,
            "data_sources": [len(s.train_tokens) for s in data.sources]}


def run_state(step, tokens_seen, identity, cfg, teacher, device, data, **run) -> dict:
    """state.json of a checkpoint at `step`: the run's identity, where its teacher is (a copied run finds it),
    its whole config, the RNG states, how the data was read (data: loader.Mixture.record) and `run`'s facts
    (max_steps, world_size, grad_accum)."""
    return {"step": step, "tokens_seen": tokens_seen, **identity, **run, **teacher_location(teacher, cfg["out_dir"]),
            "config": dict(cfg, resume=False), "rng": rng_state(device), "data": data, "lrc_version": 1}


def save_checkpoint(out_dir, step, model_state, optimizer_state, state, keep_last):
    """Write OUT_DIR/ckpt_{step:08d} atomically (the same step saved again is swapped in whole), then
    delete all but the keep_last newest checkpoints. Returns the checkpoint's path."""
    final = os.path.join(out_dir, f"ckpt_{step:08d}")
    with lrc.atomic_directory(final) as tmp:
        tensors = {n: t.detach().float().contiguous().cpu() for n, t in model_state.items()}
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        save_file(optimizer_state, os.path.join(tmp, "optimizer.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(state, f, indent=1)
    for old in list_checkpoints(out_dir)[:-keep_last]:  # only after the new one is in place
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(out_dir):
    """What a save killed mid-way leaves behind (.tmp-* directories): never a checkpoint, safe to delete."""
    for stale in glob.glob(os.path.join(out_dir, ".tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)


def rng_state(device):
    """The RNG states a resumed run restores, as base64 text for state.json."""
    def b64(tensor):
        return base64.b64encode(tensor.cpu().numpy().tobytes()).decode()
    return {"torch_cpu": b64(torch.get_rng_state()),
            "torch_cuda": b64(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None}


def restore_rng_state(rng, device):
    def unb64(text):
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
    torch.set_rng_state(unb64(rng["torch_cpu"]))
    if device.type == "cuda" and rng.get("torch_cuda"):
        torch.cuda.set_rng_state(unb64(rng["torch_cuda"]), device)


# -----------------------------------------------------------------------------
# Reading

def read_checkpoint(path):
    """(state from state.json, {name: tensor} of model.safetensors, of optimizer.safetensors)."""
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


def read_state(ckpt_dir: str) -> dict:
    """state.json of a checkpoint, checked for what every reader needs."""
    try:
        with open(os.path.join(ckpt_dir, "state.json")) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LRCError(f"cannot read {ckpt_dir}/state.json ({e}): the checkpoint is damaged, pick another "
                       f"ckpt_* directory") from None
    for key in ("method", "student_config"):
        if key not in state:
            raise LRCError(f"{ckpt_dir}/state.json has no {key!r}: it was not written by train.py")
    if state["method"] not in METHODS:
        raise LRCError(f"{ckpt_dir}/state.json has method={state['method']!r}; known: {', '.join(METHODS)}")
    return state


def load_optimizer_state(optimizer, tensors, names):
    """Put optimizer.safetensors back into an optimizer whose parameters, in order, are called `names`."""
    index = {name: i for i, name in enumerate(names)}
    state_dict = optimizer.state_dict()
    state_dict["state"] = {}
    for key, tensor in tensors.items():
        field, _, name = key.partition(".")
        state_dict["state"].setdefault(index[name], {})[field] = tensor
    optimizer.load_state_dict(state_dict)


def restore(path, state, weights, optimizer_tensors, model_state, optimizer, params, device, model=None):
    """Continue from checkpoint `path` exactly (read_checkpoint's state, weights, optimizer tensors): copy the
    weights into model_state's tensors, the AdamW state into optimizer (whose parameters are params, in
    order) and the RNG states. A `model` sharded by FSDP2 gets them through torch.distributed.checkpoint's
    set_*_state_dict from the full tensors (every rank read the same files; each keeps its shard), so any
    world size and either parallel mode resumes any checkpoint (model=None: not sharded). Returns (step, tokens
    seen)."""
    missing = sorted(set(model_state) - set(weights))
    if missing:
        raise LRCError(f"cannot resume {path}: it lacks {missing[0]!r}; it was not written by this train.py")
    names = {p: n for n, p in model_state.items()}  # the tied head is saved under its embedding's name
    if model is not None and is_sharded(model):
        _restore_sharded(model, optimizer, weights, optimizer_tensors, module_names(model, model_state),
                         [names[p] for p in params])
    else:
        with torch.no_grad():
            for name, tensor in model_state.items():
                tensor.copy_(weights[name])
        load_optimizer_state(optimizer, optimizer_tensors, [names[p] for p in params])
    restore_rng_state(state["rng"], device)
    return state["step"], state["tokens_seen"]


def _restore_sharded(model, optimizer, weights, optimizer_tensors, fqn, names):
    """fqn: {checkpoint name: name in model} (module_names); names: the checkpoint names of the optimizer's
    parameters, in order."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, strict=False)  # strict=False: the frozen teacher is not in it
    set_model_state_dict(model, {fqn[n]: weights[n] for n in fqn}, options=options)
    per_param = {}
    for key, tensor in optimizer_tensors.items():
        field, _, name = key.partition(".")
        per_param.setdefault(fqn[name], {})[field] = tensor
    groups = [dict({k: v for k, v in group.items() if k != "params"}, params=[fqn[n] for n in names])
              for group in optimizer.state_dict()["param_groups"]]
    assert len(groups) == 1, "one parameter group"
    set_optimizer_state_dict(model, optimizer, {"state": per_param, "param_groups": groups}, options=options)


def check_resumable(state, path, now):
    """One-line refusal when checkpoint `path` (its state.json) was made by another run than `now`: a dict
    of method, sampler, student_hidden, tie_proj, teacher, teacher_config, teacher_fingerprint, student_config."""
    def refuse(detail, hint="pass the checkpoint's settings, or start a fresh run in another out_dir"):
        raise LRCError(f"cannot resume {path}: it was made with {detail}: {hint}")

    def first_difference(then, now):
        then, now = then or {}, now or {}
        keys = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
        return (keys[0], then.get(keys[0]), now.get(keys[0])) if keys else ("config", then, now)

    if state.get("method") != now["method"]:
        refuse(f"method={state.get('method')!r}, this run has {now['method']!r}", f"pass --method={state.get('method')}")
    if now["method"] == "lrc":
        for key in ("student_hidden", "tie_proj"):
            if state.get(key) != now[key]:
                refuse(f"{key}={state.get(key)!r}, this run has {now[key]!r}", f"pass --{key}={state.get(key)!r}")
    sampler = state.get("sampler", "random")  # checkpoints from before the epoch sampler drew at random
    if sampler != now["sampler"]:
        refuse(f"sampler={sampler!r}, this run has {now['sampler']!r} (its windows would not continue the run's)",
               f"pass --sampler={sampler}")
    if "data_sources" in state and len(state["data_sources"]) != len(now["data_sources"]):
        refuse(f"{len(state['data_sources'])} data source(s), this run has {len(now['data_sources'])} (the sampler "
               f"counts each source's windows)", "pass the checkpoint's --data")
    teacher_hint = f"pass --teacher={state.get('teacher')}, or start a fresh run in another out_dir"
    if json.dumps(state.get("teacher_config"), sort_keys=True) != json.dumps(now["teacher_config"], sort_keys=True):
        key, then, current = first_difference(state.get("teacher_config"), now["teacher_config"])
        refuse(f"a different teacher ({key} {then!r} in the checkpoint, {current!r} now)", teacher_hint)
    if state.get("teacher_fingerprint") != now["teacher_fingerprint"]:
        refuse("other teacher weights (same config.json, different safetensors)", teacher_hint)
    if json.dumps(state.get("student_config"), sort_keys=True) != json.dumps(now["student_config"], sort_keys=True):
        key, then, current = first_difference(state.get("student_config"), now["student_config"])
        refuse(f"another student shape ({key} {then!r} in the checkpoint, {current!r} now)")


# -----------------------------------------------------------------------------
# The teacher a checkpoint was trained from

def teacher_fingerprint(path):
    """A cheap identity of a checkpoint's weights: sha256 over each safetensors file's name and size and
    its first and last MiB (header, and the first and last tensor bytes). Tells apart teachers of one
    architecture (a base model and its instruct tune); resuming or converting with other weights is refused."""
    h = hashlib.sha256()
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        size = os.path.getsize(file)
        h.update(f"{os.path.basename(file)}:{size}".encode())
        with open(file, "rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            h.update(f.read(1 << 20))
    return h.hexdigest()


def is_model_dir(path) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "config.json"))


def looks_like_hub_id(ref) -> bool:
    """'owner/name' that is no local path (lrc.resolve_checkpoint's rule)."""
    return not os.path.exists(ref) and not ref.startswith((".", "/")) and ref.count("/") == 1


def teacher_location(teacher, out_dir) -> dict:
    """What state.json records, besides the teacher as given, so that a run copied or moved elsewhere finds
    its teacher (resolve_teacher): teacher_path, the absolute path of a local teacher directory (None for a
    hub id), and teacher_in_run, its path relative to the run directory when it lives inside it (the toy
    teacher: "teacher"), else None."""
    if not teacher or not os.path.isdir(teacher):
        return {"teacher_path": None, "teacher_in_run": None}
    path, run = os.path.abspath(teacher), os.path.abspath(out_dir)
    inside = path.startswith(run + os.sep)
    return {"teacher_path": path, "teacher_in_run": os.path.relpath(path, run) if inside else None}


def _legacy_bases(ckpt_dir, state) -> list:
    """Where a teacher recorded relative to the training directory may be, for checkpoints that record only
    the teacher as given: the current directory, the directory training ran from (inferred from the recorded
    out_dir), the output directory's parent and the output directory itself."""
    out_dir = os.path.dirname(os.path.abspath(ckpt_dir))
    bases = [os.getcwd()]
    recorded_out = (state.get("config") or {}).get("out_dir")
    if recorded_out and not os.path.isabs(recorded_out):
        # out_dir was given relative to the training cwd: strip it from where the output lives now
        parts = os.path.normpath(recorded_out).split(os.sep)
        if out_dir.split(os.sep)[-len(parts):] == parts:
            bases.append(os.sep.join(out_dir.split(os.sep)[:-len(parts)]) or os.sep)
    return bases + [os.path.dirname(out_dir), out_dir]


def resolve_teacher(ckpt_dir: str, state: dict, explicit=None, weights=True) -> str:
    """Where the teacher of checkpoint ckpt_dir lives now: a local directory, or a hub id for
    lrc.resolve_checkpoint to fetch. Tried in this order (docs/evaluation.md):
      1. explicit (--teacher), as given (checked by the caller);
      2. the absolute path recorded at training time (teacher_path);
      3. the path relative to the run directory (teacher_in_run), from where the checkpoint lives now: a run
         copied or moved with its teacher inside (the toy's OUT_DIR/teacher) finds it from any directory;
      4. the teacher as given: as is, or relative to the places _legacy_bases lists (checkpoints older than
         teacher_path record only this);
      5. the teacher as given as a hub id, unless training recorded it as a local directory.
    A local candidate counts only if it is the training teacher (check_teacher_identity; its weights too
    unless weights=False): a copied run whose original teacher was since retrained in place uses its own
    copy. None of them: one line naming --teacher=DIR."""
    if explicit:
        return explicit
    given = state.get("teacher")
    if not given:
        raise LRCError(f"{ckpt_dir}/state.json records no teacher: pass it with --teacher=DIR (or a hub id)")
    run_dir = os.path.dirname(os.path.abspath(ckpt_dir))
    candidates = [state.get("teacher_path")]
    if state.get("teacher_in_run"):
        candidates.append(os.path.join(run_dir, state["teacher_in_run"]))
    candidates += [given] if os.path.isabs(given) else [os.path.join(b, given) for b in _legacy_bases(ckpt_dir, state)]
    other = None  # the first local teacher found that is not the training teacher
    for candidate in filter(is_model_dir, candidates):
        try:
            check_teacher_identity(candidate, state, candidate, weights=weights)
            return candidate
        except LRCError as e:
            other = other or e
    if other is not None:
        raise other
    if not state.get("teacher_path") and looks_like_hub_id(given):
        return given
    where = f" (at training time {state['teacher_path']})" if state.get("teacher_path") not in (None, given) else ""
    raise LRCError(f"cannot find teacher {given!r}{where} of checkpoint {ckpt_dir}, neither where it was nor "
                   f"inside the run directory: pass the teacher directory with --teacher=DIR")


def check_teacher_identity(teacher_dir: str, state: dict, teacher_ref: str, weights=True):
    """The teacher must be the one training used: its architecture fields must equal the recorded
    teacher_config (extra keys, like transformers_version, may differ), and its weight files the
    recorded teacher_fingerprint."""
    if state.get("teacher_config"):
        config = lrc.Qwen2Config.from_pretrained(teacher_dir)
        recorded = lrc.Qwen2Config.from_dict(state["teacher_config"])
        for name in lrc.Qwen2Config.__dataclass_fields__:
            if name != "extra" and getattr(config, name) != getattr(recorded, name):
                raise LRCError(
                    f"teacher {teacher_ref!r} has {name}={getattr(config, name)!r} but this checkpoint was trained "
                    f"from teacher {state.get('teacher')!r} with {name}={getattr(recorded, name)!r}: pass the "
                    f"training teacher with --teacher=PATH_OR_ID")
    if weights and state.get("teacher_fingerprint"):
        found = teacher_fingerprint(teacher_dir)
        if found != state["teacher_fingerprint"]:
            raise LRCError(
                f"teacher {teacher_ref!r} has other weights than the teacher {state.get('teacher')!r} this checkpoint "
                f"was trained from (fingerprint {found[:12]} vs {state['teacher_fingerprint'][:12]}): pass the "
                f"training teacher with --teacher=PATH_OR_ID")


def tokenizer_dir(ref: str) -> str:
    """A local directory holding the teacher's tokenizer files (hub ids: only those files are fetched)."""
    if os.path.isdir(ref):
        return ref
    try:
        import huggingface_hub
        return huggingface_hub.snapshot_download(ref, allow_patterns=TOKENIZER_FILES)
    except Exception as e:
        raise LRCError(f"cannot find the tokenizer of teacher {ref!r} ({type(e).__name__}): pass the teacher "
                       f"directory with --teacher=DIR") from None


# -----------------------------------------------------------------------------
# A checkpoint as a model

def load_tensors(file: str, expected: dict, what: str) -> dict:
    """All tensors of a safetensors file, checked by name and shape against expected {name: shape}."""
    if not os.path.isfile(file):
        raise LRCError(f"{file} is missing: the checkpoint is incomplete, pick another ckpt_* directory")
    with safe_open(file, framework="pt") as f:
        names = set(f.keys())
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        if missing or extra:
            raise LRCError(f"{file} does not match {what}: "
                           + (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}")
                           + f" ({len(missing)} missing, {len(extra)} unexpected): pass the training "
                           f"teacher with --teacher=PATH_OR_ID, or a checkpoint of this run")
        tensors = {name: f.get_tensor(name) for name in expected}
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise LRCError(f"{file}: {name!r} has shape {list(tensor.shape)} but {what} needs "
                           f"{list(expected[name])}: pass the training teacher with --teacher=PATH_OR_ID")
    return tensors


def _load_baseline(ckpt_dir, state, teacher, device, dtype):
    """A kd / scratch / sft checkpoint: the student lrc.Qwen2 (default float32, as saved)."""
    returned = state
    student_config = lrc.Qwen2Config.from_dict(state["student_config"])
    with torch.device("meta"):
        model = lrc.Qwen2(student_config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if student_config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    tensors = load_tensors(os.path.join(ckpt_dir, "model.safetensors"), expected,
                           f"the {state['method']} student of state.json")
    dtype = lrc.as_dtype(dtype) if dtype is not None else torch.float32
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, strict=False, assign=True)
    if student_config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if state["method"] == "sft":  # the checkpoint it fine-tuned holds the tokenizer files: found like a teacher
        state = dict(state, teacher=state.get("init_from"), teacher_path=state.get("init_from_path"),
                     teacher_in_run=None)
    teacher_ref = teacher or state.get("teacher")
    if teacher_ref:  # only for its tokenizer files: the weights are not needed
        teacher_dir = resolve_teacher(ckpt_dir, state, teacher, weights=False)
        if is_model_dir(teacher_dir):
            check_teacher_identity(teacher_dir, state, teacher_ref, weights=False)
        returned["teacher_dir"] = teacher_dir
    return model.requires_grad_(False)


def _load_lrc(ckpt_dir, state, teacher, device, dtype):
    """An LRC checkpoint: lrc.LRC around its teacher, with the trained projections and norms."""
    teacher_ref = teacher or state.get("teacher")
    found = resolve_teacher(ckpt_dir, state, teacher)
    try:
        teacher_dir = lrc.resolve_checkpoint(found)
    except LRCError as e:  # a recorded hub id that cannot be fetched (offline): say how to pass a local copy
        if teacher:
            raise
        raise LRCError(f"cannot load teacher {found!r} of {ckpt_dir} ({e}): pass a local copy with "
                       f"--teacher=DIR") from None
    check_teacher_identity(teacher_dir, state, teacher_ref)  # before loading gigabytes of weights
    model = lrc.LRC(lrc.load_qwen2(teacher_dir, device=device, dtype=dtype), state["student_hidden"],
                    tie_proj=state["tie_proj"])
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tensors = load_tensors(os.path.join(ckpt_dir, "model.safetensors"), {k: p.shape for k, p in trainable.items()},
                           f"an LRC student of teacher {teacher_ref!r} with student_hidden="
                           f"{state['student_hidden']}, tie_proj={state['tie_proj']}")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(tensors[name])
    recorded = lrc.Qwen2Config.from_dict(state["student_config"])
    for name in lrc.Qwen2Config.__dataclass_fields__:
        if name != "extra" and getattr(model.student_config, name) != getattr(recorded, name):
            raise LRCError(f"this teacher makes a student with {name}={getattr(model.student_config, name)!r}, but "
                           f"{ckpt_dir}/state.json records {getattr(recorded, name)!r}: pass the training "
                           f"teacher with --teacher=PATH_OR_ID")
    state["teacher_dir"] = teacher_dir
    return model


def load_checkpoint(path: str, teacher=None, device="cpu", dtype=None):
    """(model, state) for a training output directory (-> its latest ckpt_*) or a ckpt_* directory.

    method lrc: model is an lrc.LRC around the teacher (loaded in `dtype`, default its own), with the
    trained projections and norms (float32 masters, as trained). `teacher` overrides the recorded one.
    method kd / scratch: model is the student lrc.Qwen2 in `dtype` (default float32, as saved).
    The returned state is state.json plus "checkpoint" (the ckpt directory) and, when a teacher was
    used, "teacher_dir" (the local directory it was loaded from: its tokenizer files live there)."""
    ckpt_dir = find_checkpoint(path)
    state = read_state(ckpt_dir)
    state["checkpoint"] = ckpt_dir
    load = _load_lrc if state["method"] == "lrc" else _load_baseline
    return load(ckpt_dir, state, teacher, device, dtype), state
