"""
Turn a training checkpoint into a standard Hugging Face Qwen2 directory (spec section 5).

    python convert.py --ckpt=out/toy --out=students/toy                   # latest checkpoint of a run
    python convert.py --ckpt=out/toy/ckpt_00000200 --out=students/step200 # any intermediate one
    python convert.py --ckpt=out/lrc --out=students/lrc --teacher=/models/Qwen2.5-3B-Instruct --dtype=bf16

For an LRC run the projections are multiplied into plain weights in float32 and then cast to --dtype
(default: the teacher's own dtype, bfloat16 for real teachers). The result holds config.json
(hidden_size = d_s, explicit head_dim, the right tie_word_embeddings, and an "lrc" record of how it
was made), safetensors weights (sharded with model.safetensors.index.json above --max_shard_size, as
Hugging Face does), and the teacher's tokenizer and generation config. transformers,
lm-evaluation-harness and vLLM (--model-impl transformers, because of the explicit head_dim) load it
with no custom code.

This file also owns load_checkpoint(), the one reader of the checkpoint format train.py writes;
eval_tiny.py and the tests import it from here.
"""
import argparse
import json
import os
import re
import shutil
import sys

import torch
from safetensors import safe_open

import lrc

# What a model directory needs besides its weights, copied from the teacher (spec section 5)
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "generation_config.json"]


# -----------------------------------------------------------------------------
# Reading checkpoints (the format is fixed by train.py: OUT_DIR/ckpt_{step:08d}/{model.safetensors,state.json})

def find_checkpoint(path: str) -> str:
    """A ckpt_* directory as is; a training output directory -> its latest ckpt_* by step."""
    if os.path.isfile(os.path.join(path, "state.json")):
        return path
    if not os.path.isdir(path):
        raise lrc.LRCError(f"checkpoint {path!r} does not exist: pass a training output directory or one of its "
                           f"ckpt_* directories")
    steps = {}
    for name in os.listdir(path):
        match = re.fullmatch(r"ckpt_(\d+)", name)
        if match and os.path.isfile(os.path.join(path, name, "state.json")):
            steps[int(match.group(1))] = os.path.join(path, name)
    if not steps:
        raise lrc.LRCError(f"{path!r} holds no ckpt_*/state.json: pass a training output directory (train.py "
                           f"--out_dir) or one of its ckpt_* directories")
    return steps[max(steps)]


def resolve_teacher(recorded: str, ckpt_dir: str, state: dict) -> str:
    """Where the teacher recorded in state.json lives now. An absolute path or hub id is used as is. A
    relative path (the toy teacher, written into the output directory) is tried, in order, relative to
    the current directory, to the directory training ran from (inferred from the recorded out_dir),
    to the output directory's parent, and to the output directory itself, so that converting works
    from the repository root, from elsewhere, and after the output directory was moved."""
    if os.path.isabs(recorded):
        return recorded
    out_dir = os.path.dirname(os.path.abspath(ckpt_dir))
    bases = [os.getcwd()]
    recorded_out = (state.get("config") or {}).get("out_dir")
    if recorded_out and not os.path.isabs(recorded_out):
        # out_dir was given relative to the training cwd: strip it from where the output lives now
        parts = os.path.normpath(recorded_out).split(os.sep)
        if out_dir.split(os.sep)[-len(parts):] == parts:
            bases.append(os.sep.join(out_dir.split(os.sep)[:-len(parts)]) or os.sep)
    bases += [os.path.dirname(out_dir), out_dir]
    for base in bases:
        candidate = os.path.join(base, recorded)
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    return recorded  # not found locally: a hub id (lrc.resolve_checkpoint downloads it or explains)


def read_state(ckpt_dir: str) -> dict:
    try:
        with open(os.path.join(ckpt_dir, "state.json")) as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise lrc.LRCError(f"cannot read {ckpt_dir}/state.json ({e}): the checkpoint is damaged, pick another "
                           f"ckpt_* directory") from None
    for key in ("method", "student_config"):
        if key not in state:
            raise lrc.LRCError(f"{ckpt_dir}/state.json has no {key!r}: it was not written by train.py")
    if state["method"] not in ("lrc", "kd", "scratch"):
        raise lrc.LRCError(f"{ckpt_dir}/state.json has method={state['method']!r}; known: lrc, kd, scratch")
    return state


def check_teacher_identity(teacher_dir: str, state: dict, teacher_ref: str, weights=True):
    """The teacher must be the one training used: its architecture fields must equal the recorded
    teacher_config (extra keys, like transformers_version, may differ), and its weight files the
    recorded teacher_fingerprint (train.py's: file names, sizes, first and last MiB), which tells apart
    teachers of one architecture (a base model and its instruct tune)."""
    if state.get("teacher_config"):
        config = lrc.Qwen2Config.from_pretrained(teacher_dir)
        recorded = lrc.Qwen2Config.from_dict(state["teacher_config"])
        for name in lrc.Qwen2Config.__dataclass_fields__:
            if name != "extra" and getattr(config, name) != getattr(recorded, name):
                raise lrc.LRCError(
                    f"teacher {teacher_ref!r} has {name}={getattr(config, name)!r} but this checkpoint was trained "
                    f"from teacher {state.get('teacher')!r} with {name}={getattr(recorded, name)!r}: pass the "
                    f"training teacher with --teacher=PATH_OR_ID")
    if weights and state.get("teacher_fingerprint"):
        from train import teacher_fingerprint  # the one definition, next to where it is recorded
        found = teacher_fingerprint(teacher_dir)
        if found != state["teacher_fingerprint"]:
            raise lrc.LRCError(
                f"teacher {teacher_ref!r} has other weights than the teacher {state.get('teacher')!r} this checkpoint "
                f"was trained from (fingerprint {found[:12]} vs {state['teacher_fingerprint'][:12]}): pass the "
                f"training teacher with --teacher=PATH_OR_ID")


def load_tensors(file: str, expected: dict, what: str) -> dict:
    """All tensors of a safetensors file, checked by name and shape against expected {name: shape}."""
    if not os.path.isfile(file):
        raise lrc.LRCError(f"{file} is missing: the checkpoint is incomplete, pick another ckpt_* directory")
    with safe_open(file, framework="pt") as f:
        names = set(f.keys())
        missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
        if missing or extra:
            raise lrc.LRCError(f"{file} does not match {what}: "
                               + (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}")
                               + f" ({len(missing)} missing, {len(extra)} unexpected): pass the training "
                               f"teacher with --teacher=PATH_OR_ID, or a checkpoint of this run")
        tensors = {name: f.get_tensor(name) for name in expected}
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise lrc.LRCError(f"{file}: {name!r} has shape {list(tensor.shape)} but {what} needs "
                               f"{list(expected[name])}: pass the training teacher with --teacher=PATH_OR_ID")
    return tensors


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
    weights_file = os.path.join(ckpt_dir, "model.safetensors")
    student_config = lrc.Qwen2Config.from_dict(state["student_config"])

    if state["method"] != "lrc":
        with torch.device("meta"):
            model = lrc.Qwen2(student_config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if student_config.tie_word_embeddings:
            expected.pop("lm_head.weight")
        tensors = load_tensors(weights_file, expected, f"the {state['method']} student of state.json")
        dtype = lrc.as_dtype(dtype) if dtype is not None else torch.float32
        model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()},
                              strict=False, assign=True)
        if student_config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        teacher_ref = teacher or state.get("teacher")
        if teacher_ref:  # only for its tokenizer files: the weights are not needed
            teacher_dir = teacher if teacher else resolve_teacher(teacher_ref, ckpt_dir, state)
            if os.path.isfile(os.path.join(teacher_dir, "config.json")):
                check_teacher_identity(teacher_dir, state, teacher_ref, weights=False)
            state["teacher_dir"] = teacher_dir
        return model.requires_grad_(False), state

    teacher_ref = teacher or state.get("teacher")
    if not teacher_ref:
        raise lrc.LRCError(f"{ckpt_dir}/state.json records no teacher: pass it with --teacher=PATH_OR_ID")
    teacher_dir = lrc.resolve_checkpoint(teacher if teacher else resolve_teacher(teacher_ref, ckpt_dir, state))
    check_teacher_identity(teacher_dir, state, teacher_ref)  # before loading gigabytes of weights
    teacher_model = lrc.load_qwen2(teacher_dir, device=device, dtype=dtype)
    model = lrc.LRC(teacher_model, state["student_hidden"], tie_proj=state["tie_proj"])
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tensors = load_tensors(weights_file, {k: p.shape for k, p in trainable.items()},
                           f"an LRC student of teacher {teacher_ref!r} with student_hidden="
                           f"{state['student_hidden']}, tie_proj={state['tie_proj']}")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(tensors[name])
    for name in lrc.Qwen2Config.__dataclass_fields__:
        if name != "extra" and getattr(model.student_config, name) != getattr(student_config, name):
            raise lrc.LRCError(f"this teacher makes a student with {name}={getattr(model.student_config, name)!r}, but "
                               f"{ckpt_dir}/state.json records {getattr(student_config, name)!r}: pass the training "
                               f"teacher with --teacher=PATH_OR_ID")
    state["teacher_dir"] = teacher_dir
    return model, state


def tokenizer_dir(ref: str) -> str:
    """A local directory holding the teacher's tokenizer files (hub ids: only those files are fetched)."""
    if os.path.isdir(ref):
        return ref
    try:
        import huggingface_hub
        return huggingface_hub.snapshot_download(ref, allow_patterns=TOKENIZER_FILES)
    except Exception as e:
        raise lrc.LRCError(f"cannot find the tokenizer of teacher {ref!r} ({type(e).__name__}): pass the teacher "
                           f"directory with --teacher=PATH") from None


# -----------------------------------------------------------------------------
# Converting

def parse_size(text) -> int:
    """'5GB' -> 5*10**9 and '5GiB' -> 5*2**30, as Hugging Face reads max_shard_size; a bare number is bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise lrc.LRCError(f"cannot read size {text!r}: write it like 5GB, 500MB, 2GiB or a number of bytes")
    unit = (match.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(float(match.group(1)) * scale)


def check_out_dir(out: str, protected: list):
    """--out is replaced, so it must not hold (or be inside of) anything else: refuse the training output,
    the teacher, or a non-empty directory that is not an earlier conversion."""
    real_out = os.path.realpath(out)
    for path in protected:
        real = os.path.realpath(path)
        if real == real_out or real.startswith(real_out + os.sep):  # OUT_DIR/student_hf is fine
            raise lrc.LRCError(f"--out={out!r} overlaps {path!r}, which converting must not overwrite: "
                               f"choose a new directory for --out")
    if os.path.isdir(out) and os.listdir(out):
        try:
            with open(os.path.join(out, "config.json")) as f:
                earlier = "lrc" in json.load(f)
        except (OSError, ValueError):
            earlier = False
        if not earlier:
            raise lrc.LRCError(f"--out={out!r} exists and is not an earlier conversion (it would be replaced): "
                               f"choose a new directory for --out")


def convert(ckpt: str, out: str, teacher=None, dtype=None, max_shard_size="5GB", device="cpu") -> str:
    """Write the student of checkpoint `ckpt` as a Hugging Face Qwen2 directory `out` (replaced if it holds
    an earlier conversion); returns `out`."""
    max_shard_bytes = parse_size(max_shard_size)
    check_out_dir(out, [os.path.dirname(os.path.abspath(find_checkpoint(ckpt)))])
    # merge in float32 whatever the teacher's dtype, then cast once (spec section 5)
    model, state = load_checkpoint(ckpt, teacher=teacher, device=device, dtype=torch.float32)
    if state.get("teacher_dir") and os.path.isdir(state["teacher_dir"]):
        check_out_dir(out, [state["teacher_dir"]])
    if state["method"] == "lrc":
        source_dtype = model.teacher.config.extra.get("torch_dtype") or model.teacher.config.extra.get("dtype")
        target = lrc.as_dtype(dtype or source_dtype or "float32")
        student = model.export_student(dtype=target)
        del model
    else:
        source_dtype = (state.get("teacher_config") or {}).get("torch_dtype")
        target = lrc.as_dtype(dtype or source_dtype or "float32")
        student = model.to(target)
    record = {"teacher": teacher or state.get("teacher"), "student_hidden": state.get("student_hidden"),
              "tie_proj": state.get("tie_proj"), "method": state["method"], "step": state.get("step"),
              "tokens_seen": state.get("tokens_seen"), "source_checkpoint": os.path.abspath(state["checkpoint"]),
              "lrc_version": state.get("lrc_version")}
    extra = {"lrc": record}
    if "dtype" in student.config.extra:  # newer config.json files name it dtype: keep it in step with torch_dtype
        extra["dtype"] = str(target).removeprefix("torch.")
    lrc.save_qwen2(student.to("cpu"), out, extra_config=extra, max_shard_bytes=max_shard_bytes)

    source = state.get("teacher_dir")
    copied = []
    if source:
        source = tokenizer_dir(source)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
                copied.append(name)
    if "tokenizer.json" not in copied:
        print(f"warning: no tokenizer.json found next to the teacher ({source!r}); copy the tokenizer files "
              f"into {out} by hand", file=sys.stderr)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Merge an LRC (or kd/scratch) checkpoint into a Hugging Face "
                                                 "Qwen2 directory (spec section 5).")
    parser.add_argument("--ckpt", required=True, help="training output directory (latest ckpt_*) or a ckpt_* dir")
    parser.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    parser.add_argument("--teacher", default=None, help="teacher path or hub id (default: the one in state.json)")
    parser.add_argument("--dtype", default=None, help="bf16 | fp32 | fp16 (default: the teacher's dtype)")
    parser.add_argument("--max_shard_size", default="5GB", help="shard above this size (default 5GB, as HF)")
    parser.add_argument("--device", default="cpu", help="where to merge: cpu (default) or cuda (faster, needs "
                                                          "the float32 teacher to fit)")
    args = parser.parse_args(argv)
    try:
        out = convert(args.ckpt, args.out, teacher=args.teacher, dtype=args.dtype,
                      max_shard_size=args.max_shard_size, device=args.device)
    except lrc.LRCError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    record = config["lrc"]
    print(f"wrote {out}: Qwen2 hidden_size={config['hidden_size']} head_dim={config['head_dim']} "
          f"tie_word_embeddings={config['tie_word_embeddings']} dtype={config['torch_dtype']} "
          f"({record['method']}, step {record['step']}, {record['tokens_seen']} tokens seen)")


if __name__ == "__main__":
    main()
