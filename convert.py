"""
Turn a training checkpoint into a standard Hugging Face directory of the teacher's family (Qwen2,
Llama or Qwen3; spec section 5).

    python convert.py --ckpt=out/toy --out=students/toy                   # latest checkpoint of a run
    python convert.py --ckpt=out/toy/ckpt_00000200 --out=students/step200 # any intermediate one
    python convert.py --ckpt=out/lrc --out=students/lrc --teacher=/models/Qwen2.5-3B-Instruct --dtype=bf16

For an LRC run the projections are multiplied into plain weights in float32 and then cast to --dtype
(default: the teacher's own dtype, bfloat16 for real teachers). The result holds config.json
(hidden_size = d_s, explicit head_dim, the right tie_word_embeddings, and an "lrc" record of how it
was made), safetensors weights (sharded with model.safetensors.index.json above --max_shard_size, as
Hugging Face does), and the teacher's tokenizer and generation config. transformers,
lm-evaluation-harness and vLLM load it with no custom code; vLLM only with --model-impl transformers
when head_dim != hidden_size / num_attention_heads (an LRC student's case), which convert.py then says.

The teacher is the one state.json records, found as checkpoint.resolve_teacher documents (so a run directory
copied or moved elsewhere still converts), or --teacher.

The checkpoint is read by checkpoint.py, the one owner of the format train.py writes.
"""
import json
import os
import re
import shutil
import sys

import torch

import lrc
from checkpoint import TOKENIZER_FILES, find_checkpoint, load_checkpoint, tokenizer_dir
from configurator import ArgumentParser, run_main

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
    lrc.check_writable_dir(out)
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
    """Write the student of checkpoint `ckpt` as a Hugging Face directory `out` (replaced if it holds
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
        # kd / scratch: the teacher's dtype; sft: the dtype of the checkpoint it fine-tuned
        source_dtype = (state.get("teacher_config") or state["student_config"]).get("torch_dtype")
        target = lrc.as_dtype(dtype or source_dtype or "float32")
        student = model.to(target)
    record = {"teacher": teacher or state.get("teacher"), "student_hidden": state.get("student_hidden"),
              "tie_proj": state.get("tie_proj"), "method": state["method"], "step": state.get("step"),
              "tokens_seen": state.get("tokens_seen"), "init_from": state.get("init_from"),
              "source_checkpoint": os.path.abspath(state["checkpoint"]),
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
    parser = ArgumentParser(description="Merge an LRC (or kd/scratch) checkpoint into a Hugging Face "
                                        "directory (spec section 5).")
    parser.add_argument("--ckpt", required=True, help="training output directory (latest ckpt_*) or a ckpt_* dir")
    parser.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    parser.add_argument("--teacher", default=None, help="teacher path or hub id (default: the one in state.json)")
    parser.add_argument("--dtype", default=None, help="bf16 | fp32 | fp16 (default: the teacher's dtype)")
    parser.add_argument("--max_shard_size", default="5GB", help="shard above this size (default 5GB, as HF)")
    parser.add_argument("--device", default="cpu", help="where to merge: cpu (default) or cuda (faster, needs "
                                                          "the float32 teacher to fit)")
    args = parser.parse_args(argv)
    out = convert(args.ckpt, args.out, teacher=args.teacher, dtype=args.dtype, max_shard_size=args.max_shard_size,
                  device=args.device)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    record = config["lrc"]
    family = config["architectures"][0].removesuffix("ForCausalLM")  # Qwen2, Llama, Qwen3
    print(f"wrote {out}: {family} hidden_size={config['hidden_size']} head_dim={config['head_dim']} "
          f"tie_word_embeddings={config['tie_word_embeddings']} dtype={config['torch_dtype']} "
          f"({record['method']}, step {record['step']}, {record['tokens_seen']} tokens seen)")
    note = vllm_note(config, out)
    if note:
        print(note)


def vllm_note(config: dict, out: str):
    """The one line a user serving the student with vLLM must see, or None: vLLM's own Qwen2 takes the head
    size from hidden_size / num_attention_heads and ignores an explicit head_dim, so on an LRC student (whose
    head_dim is the teacher's) it refuses the shape or, worse, loads trimmed weights and generates wrong tokens
    without a warning; its transformers backend reads head_dim (docs/evaluation.md, what was measured)."""
    hidden, heads, head_dim = config["hidden_size"], config["num_attention_heads"], config.get("head_dim")
    if head_dim is None or head_dim * heads == hidden:
        return None
    return (f"vLLM: serve it with --model-impl transformers (vllm serve {out} --model-impl transformers): "
            f"head_dim={head_dim} is not hidden_size/num_attention_heads={hidden}/{heads}, and vLLM's own Qwen2 "
            f"ignores head_dim (it refuses the shape or generates wrong tokens)")


if __name__ == "__main__":
    sys.exit(run_main(main))
