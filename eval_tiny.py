"""
A small, honest evaluator: teacher and students side by side in one table.

    python eval_tiny.py --model=out/toy/teacher --model=students/toy --model=out/toy \
        --data=out/toy/data/val.txt --txt_split=paragraph --mc=out/toy/data/facts_seen.jsonl \
        --mc=out/toy/data/facts_unseen.jsonl --prompt="The home city of" --json=eval_toy.json

Each --model may be a Hugging Face Qwen2, Llama or Qwen3 directory or hub id (a teacher, a converted
student), a training output directory or one of its ckpt_* directories (an LRC student is exported in
memory with export_student(), exactly what convert.py writes, so every model runs through the same code).
Reported, per model:
  - perplexity on --data (.txt, .jsonl or a prepared .bin) exactly as spec section 8, with the token count;
  - zero-shot multiple choice on each --mc jsonl ({"question", "choices", "answer"}), scored as
    lm-evaluation-harness does: acc (summed log-likelihood of the choice) and acc_norm (per character);
  - a generation from --prompt (greedy by default; --temperature / --top_k to sample), with a KV cache.
All text (documents, questions, choices, the prompt) is text: a special-token string inside it, such as a
literal "<|endoftext|>", is split as ordinary text, never read as the control token (data.prepare.encode_text).
A training output directory finds its teacher as checkpoint.resolve_teacher documents, also after it was
copied or moved elsewhere; --teacher overrides it.
bfloat16 on GPU, float32 on CPU unless --dtype says otherwise. --json=FILE writes every number.
perplexity(), score_mc() and generate() are importable.
"""
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

import lrc
from checkpoint import find_checkpoint, load_checkpoint, tokenizer_dir
from configurator import ArgumentParser, run_main
from data.prepare import TXT_SPLITS, encode_text, input_kind, load_tokenizer, open_tokens, prepare


# -----------------------------------------------------------------------------
# Progress on long work: a line on stderr at most every few seconds

class Progress:
    def __init__(self, label, total, every_s=5.0):
        self.label, self.total, self.every_s = label, total, every_s
        self.start = self.last = time.time()

    def update(self, done):
        now = time.time()
        if now - self.last >= self.every_s and done < self.total:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            eta = (self.total - done) / max(rate, 1e-9)
            print(f"  {self.label}: {done}/{self.total} ({100 * done / self.total:.0f}%, ~{eta:.0f}s left)",
                  file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Loading any model as a plain lrc.Qwen2, with its tokenizer

class Loaded:
    """A model ready to evaluate: model (lrc.Qwen2, eval mode, no grad), tokenizer (tokenizers.Tokenizer,
    or None when the directory has no tokenizer.json), token_dir (where tokenizer.json lives),
    tokenizer_sha256, doc_eos (the id joining documents, found as data/prepare.py finds it, so text
    and prepared .bin files give the same tokens), eos_ids (generation stops at any of them: the
    generation config's list plus doc_eos), kind (a short description) and the path it came from."""

    def __init__(self, model, token_dir, kind, path):
        self.model, self.token_dir, self.kind, self.path = model, token_dir, kind, path
        self.tokenizer, self.doc_eos, self.tokenizer_sha256 = None, None, None
        if token_dir and os.path.isfile(os.path.join(token_dir, "tokenizer.json")):
            self.tokenizer, self.doc_eos, self.tokenizer_sha256 = load_tokenizer(token_dir)
        self.eos_ids = read_eos_ids(token_dir)
        if self.doc_eos is not None and self.doc_eos not in self.eos_ids:
            self.eos_ids.append(self.doc_eos)


def is_training_output(path) -> bool:
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, "state.json")):
        return True
    return not os.path.isfile(os.path.join(path, "config.json")) and any(
        name.startswith("ckpt_") for name in os.listdir(path))


def read_eos_ids(directory) -> list:
    """eos ids from generation_config.json (it may hold a list), else config.json; empty when unknown."""
    ids = []
    for name in ("generation_config.json", "config.json"):
        file = os.path.join(directory, name) if directory else None
        if file and os.path.isfile(file):
            with open(file) as f:
                value = json.load(f).get("eos_token_id")
            for i in (value if isinstance(value, list) else [value]):
                if isinstance(i, int) and i not in ids:
                    ids.append(i)
    return ids


def load_any(path, teacher=None, device="cpu", dtype=None) -> Loaded:
    """Any model directory, hub id or training output as a Loaded (see the class)."""
    dtype = lrc.as_dtype(dtype) if dtype is not None else torch.float32
    if is_training_output(path):
        lrc_or_student, state = load_checkpoint(path, teacher=teacher, device=device, dtype=torch.float32)
        if state["method"] == "lrc":
            # export in memory, merged in float32 and cast once: exactly the model convert.py writes
            model = lrc_or_student.export_student(dtype=dtype)
            del lrc_or_student
        else:
            model = lrc_or_student.to(dtype)
        kind = f"{state['method']} step {state.get('step')}"
        token_dir = state.get("teacher_dir")
        if token_dir and not os.path.isdir(token_dir):
            token_dir = tokenizer_dir(token_dir)
    else:
        token_dir = lrc.resolve_checkpoint(path)
        model = lrc.load_qwen2(token_dir, device=device, dtype=dtype)
        record = model.config.extra.get("lrc")
        kind = f"{record.get('method')} step {record.get('step')} (converted)" if isinstance(record, dict) \
            else model.config.model_type
    return Loaded(model.eval().requires_grad_(False), token_dir, kind, path)


def model_max_len(path) -> int:
    """max_position_embeddings from config.json or state.json, without loading weights (None if unknown)."""
    try:
        if is_training_output(path):
            with open(os.path.join(find_checkpoint(path), "state.json")) as f:
                return json.load(f)["student_config"].get("max_position_embeddings")
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("max_position_embeddings")
    except (OSError, KeyError, ValueError, lrc.LRCError):
        return None


# -----------------------------------------------------------------------------
# Perplexity (spec section 8)

def text_tokens(file, token_dir, text_field="text", txt_split="file") -> torch.Tensor:
    """A .txt / .jsonl file tokenized by data/prepare.py itself (per document, no special tokens added,
    special-token strings in the text split as text, eos after each document: spec sections 7 and 8), so
    perplexity on text equals perplexity on the .bin that prepare.py makes of it. .txt: --txt_split=file
    (one document), paragraph or line."""
    with tempfile.TemporaryDirectory() as tmp:
        prepare(token_dir, [file], tmp, text_field=text_field, txt_split=txt_split, progress=False)
        return torch.from_numpy(open_tokens(tmp, "train").astype(np.int64))


def bin_tokens(file, vocab_size, tokenizer_sha256=None) -> torch.Tensor:
    """A prepared DIR/{split}.bin (spec section 7), checked against its meta.json: refused when made
    with another tokenizer.json than the model's."""
    directory, name = os.path.split(os.path.abspath(file))
    return torch.from_numpy(open_tokens(directory, name.removesuffix(".bin"), vocab_size=vocab_size,
                                        tokenizer_sha256=tokenizer_sha256).astype(np.int64))


@torch.no_grad()
def perplexity(model, tokens, seq_len=1024, batch_size=8, chunk_size=1024, label="perplexity"):
    """(exp(mean NLL), number of predicted tokens): windows of seq_len + 1 tokens start at 0, seq_len,
    2*seq_len, ...; the remainder that does not fill a window is dropped; each window predicts its last
    seq_len tokens from the ones before them (spec section 8). Log-probabilities in float32, summed in
    float64; the head runs over chunks of positions so a 152k vocabulary never needs [B*T, V] at once."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise lrc.LRCError(f"{len(tokens)} tokens are fewer than seq_len + 1 = {seq_len + 1}: pass more text "
                           f"or a smaller --seq_len")
    device = model.lm_head.weight.device
    head = model.lm_head.weight
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    progress = Progress(label, n_windows)
    for first in range(0, n_windows, batch_size):
        starts = range(first * seq_len, min(first + batch_size, n_windows) * seq_len, seq_len)
        window = torch.stack([tokens[s:s + seq_len + 1] for s in starts]).to(device)
        hidden = model.hidden(window[:, :-1]).flatten(0, 1)
        targets = window[:, 1:].flatten()
        for c in range(0, len(targets), chunk_size):
            logits = (hidden[c:c + chunk_size] @ head.T).float()
            total_nll += F.cross_entropy(logits, targets[c:c + chunk_size], reduction="sum").double()
        progress.update(first + len(starts))
    n_tokens = n_windows * seq_len
    return math.exp(total_nll.item() / n_tokens), n_tokens


# -----------------------------------------------------------------------------
# Zero-shot multiple choice, as lm-evaluation-harness scores it

def encode_pair(tokenizer, context, continuation):
    """lm-evaluation-harness's _encode_pair: trailing spaces of the context move to the continuation, the
    whole string is encoded once, and the continuation is what follows the context's own tokens, so a
    BPE merge across the boundary is scored as the model would see it. Questions and choices are text: a
    special-token string in them is split as ordinary text (data.prepare.encode_text)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode_text(tokenizer, context + continuation)
    context_ids = encode_text(tokenizer, context)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def loglikelihoods(model, requests, batch_size=8, max_len=None, label="loglikelihood"):
    """Summed log p(continuation | context) for each (context_ids, continuation_ids), batched with
    right padding (causal attention never looks at the padding), longest first, and truncated on the
    left to max_len tokens as lm-evaluation-harness does."""
    device = model.lm_head.weight.device
    results = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    progress = Progress(label, len(requests))
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        inputs, spans = [], []
        for i in batch:
            context, continuation = requests[i]
            if not continuation:
                raise lrc.LRCError("a choice tokenizes to nothing: every choice must be non-empty text")
            full = (context + continuation)
            if max_len:
                full = full[-(max_len + 1):]
            inputs.append(full[:-1])
            spans.append((len(full) - 1 - len(continuation), continuation))
        width = max(len(x) for x in inputs)
        idx = torch.zeros(len(inputs), width, dtype=torch.long)
        for row, x in enumerate(inputs):
            idx[row, :len(x)] = torch.tensor(x)
        hidden = model.hidden(idx.to(device))
        for row, (start, continuation) in enumerate(spans):
            logits = (hidden[row, start:start + len(continuation)] @ model.lm_head.weight.T).float()
            target = torch.tensor(continuation, device=device)
            results[batch[row]] = logits.log_softmax(-1).gather(1, target[:, None]).sum().item()
        progress.update(first + len(batch))
    return results


def read_mc(file) -> list:
    """The questions of a multiple-choice jsonl file; any malformed line is a one-line error naming it."""
    example = '{"question": "...", "choices": ["...", "..."], "answer": 0}'
    try:
        with open(file, encoding="utf-8") as f:
            lines = list(enumerate(f, 1))
    except (OSError, UnicodeDecodeError) as e:
        raise lrc.LRCError(f"--mc={file!r} cannot be read ({type(e).__name__}: {e}): pass a jsonl file with one "
                           f"{example} per line") from None
    items = []
    for line_no, line in lines:
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise lrc.LRCError(f"{file}:{line_no} is not valid JSON ({e}): write one {example} per line") from None
        if not isinstance(item, dict) or not {"question", "choices", "answer"} <= set(item):
            raise lrc.LRCError(f"{file}:{line_no} needs question, choices and answer: write one {example} per line")
        if not isinstance(item["question"], str) or not isinstance(item["choices"], list) or not item["choices"] \
                or not all(isinstance(c, str) and c for c in item["choices"]):
            raise lrc.LRCError(f"{file}:{line_no}: the question must be a string and choices a list of non-empty "
                               f"strings: write one {example} per line")
        if isinstance(item["answer"], bool) or not isinstance(item["answer"], int) \
                or not 0 <= item["answer"] < len(item["choices"]):
            raise lrc.LRCError(f"{file}:{line_no}: answer {item['answer']!r} is not an index into its "
                               f"{len(item['choices'])} choices")
        items.append(item)
    if not items:
        raise lrc.LRCError(f"{file} holds no questions")
    return items


def continuation_of(question, choice, delimiter=" "):
    """lm-evaluation-harness joins question and choice with its default target_delimiter " " (data/toy.py's
    files: "Paris" after "The capital of France is"). Files that already put whitespace between them (choices
    like " Paris", a harness task run with target_delimiter "", or toy files before TOY_VERSION 2) are
    accepted as they are: no second space is added."""
    if question[-1:].isspace() or choice[:1].isspace():
        return choice
    return delimiter + choice


def score_mc(model, tokenizer, items, batch_size=8, max_len=None, eos_id=None, delimiter=" ", label="mc"):
    """Zero-shot multiple choice as lm-evaluation-harness's multiple_choice tasks: context = question,
    continuation = the choice after a space (continuation_of); acc = argmax of the summed log-likelihood
    of the continuation's tokens, acc_norm = argmax of that / len(choice) in characters (ties: the
    first choice). An empty question is scored from the eos token, as lm-evaluation-harness does.
    Returns {"acc", "acc_norm", "n", "acc_stderr", "acc_norm_stderr"}."""
    requests = []
    for item in items:
        for choice in item["choices"]:
            context_ids, continuation_ids = encode_pair(tokenizer, item["question"],
                                                        continuation_of(item["question"], choice, delimiter))
            if not context_ids:
                if eos_id is None:
                    raise lrc.LRCError("a question is empty and the model has no eos token to start from")
                context_ids = [eos_id]
            requests.append((context_ids, continuation_ids))
    scores = loglikelihoods(model, requests, batch_size=batch_size, max_len=max_len, label=label)
    correct = correct_norm = 0
    position = 0
    for item in items:
        k = len(item["choices"])
        ll = scores[position:position + k]
        position += k
        norm = [s / len(c) for s, c in zip(ll, item["choices"])]
        correct += max(range(k), key=lambda j: ll[j]) == item["answer"]
        correct_norm += max(range(k), key=lambda j: norm[j]) == item["answer"]
    n = len(items)
    stderr = lambda p: math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")  # noqa: E731 (as lm-eval)
    acc, acc_norm = correct / n, correct_norm / n
    return {"acc": acc, "acc_norm": acc_norm, "n": n, "acc_stderr": stderr(acc), "acc_norm_stderr": stderr(acc_norm)}


# -----------------------------------------------------------------------------
# Generation with a KV cache: after the prompt, each new token costs one position

@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=0.0, top_k=None, eos_id=None, use_cache=True,
             generator=None):
    """idx [B,T] -> [B, T + up to max_new_tokens]. Greedy when temperature == 0, else softmax sampling
    at that temperature over the top_k logits. Stops when every row has produced an eos (eos_id: an
    id or a list of ids); rows that stopped early are padded with their eos."""
    model_dtype = model.lm_head.weight.dtype
    B, T = idx.shape
    eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id or []), device=idx.device)
    cache = lrc.KVCache(model.config, B, T + max_new_tokens, idx.device, model_dtype) if use_cache else None
    logits = model(idx, cache)[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
    pad = torch.full((B,), eos[0].item() if len(eos) else 0, device=idx.device)
    for step in range(max_new_tokens):
        logits = logits.float()
        if temperature > 0:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        else:
            next_token = logits.argmax(-1)
        next_token = torch.where(finished, pad, next_token)
        idx = torch.cat([idx, next_token[:, None]], dim=1)
        finished |= torch.isin(next_token, eos)
        if finished.all() or step == max_new_tokens - 1:
            break
        logits = model(next_token[:, None], cache)[:, -1] if use_cache else model(idx)[:, -1]
    return idx


def encode_prompt(tokenizer, prompt, eos_id=None) -> list:
    """--prompt's token ids: text, as documents are (a special-token string in it is split as ordinary text;
    a chat template's control tokens would go through data.prepare.encode_text(..., parse_special=True));
    an empty prompt starts from the eos token, as a document would."""
    ids = encode_text(tokenizer, prompt)
    if not ids:
        if eos_id is None:
            raise lrc.LRCError("--prompt is empty and the model has no eos token to start from: give a prompt")
        ids = [eos_id]
    return ids


# -----------------------------------------------------------------------------
# The command line: evaluate each model in turn, print one table

def model_names(paths) -> list:
    """Directory basenames; where two collide, more of the path until they do not."""
    parts = [os.path.normpath(p).split(os.sep) for p in paths]
    names = []
    for i, p in enumerate(parts):
        for depth in range(1, len(p) + 1):
            name = "/".join(p[-depth:])
            if sum("/".join(q[-depth:]) == name for q in parts) == 1:
                break
        if name in names:
            name = f"{name}#{i + 1}"
        names.append(name)
    return names


def short(text, width=48):
    text = text.replace("\n", "\\n").replace("|", "/")
    return text if len(text) <= width else text[:width - 3] + "..."


def print_table(results, out=sys.stdout):
    """Markdown table: rows are metrics, columns are models (teacher and students side by side)."""
    rows = [("kind", [r["kind"] for r in results]),
            ("params", [f"{r['params']:,}" for r in results]),
            ("hidden_size", [str(r["hidden_size"]) for r in results])]
    if any("ppl" in r for r in results):
        first = next(r for r in results if "ppl" in r)["ppl"]
        label = f"{os.path.basename(first['file'])} (seq_len {first['seq_len']})"
        rows.append((f"ppl {label}", [f"{r['ppl']['value']:.3f}" if "ppl" in r else "-" for r in results]))
        rows.append(("ppl tokens", [str(r["ppl"]["tokens"]) if "ppl" in r else "-" for r in results]))
    for file in results[0].get("mc", {}):
        label = os.path.basename(file)
        for metric in ("acc", "acc_norm"):
            rows.append((f"{label} {metric}", [f"{r['mc'][file][metric]:.3f}" for r in results]))
        rows.append((f"{label} n", [str(r["mc"][file]["n"]) for r in results]))
    if any("generation" in r for r in results):
        rows.append(("generation", [short(r["generation"]["text"]) for r in results]))
    header = ["metric"] + [r["name"] for r in results]
    table = [header] + [[label] + values for label, values in rows]
    widths = [max(len(row[j]) for row in table) for j in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(header), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for row in table[1:]:
        print(line(row), file=out)


def evaluate(args) -> list:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = lrc.as_dtype(args.dtype or ("bf16" if device.startswith("cuda") else "fp32"))
    # one seq_len for every model so their perplexities are comparable
    limits = [m for m in (model_max_len(p) for p in args.model) if m]
    seq_len = args.seq_len or min([1024] + limits)
    mc_sets = {file: read_mc(file) for file in args.mc or []}  # before any model is loaded
    token_cache = {}
    results = []
    for path, name in zip(args.model, model_names(args.model)):
        print(f"loading {name} ({path})", file=sys.stderr, flush=True)
        loaded = load_any(path, teacher=args.teacher, device=device, dtype=dtype)
        model = loaded.model
        result = {"name": name, "path": path, "kind": loaded.kind, "device": device,
                  "dtype": str(dtype).removeprefix("torch."), "tokenizer": loaded.token_dir,
                  "params": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
                  "hidden_size": model.config.hidden_size}
        needs_tokenizer = (args.data and not args.data.endswith(".bin")) or mc_sets or args.prompt is not None
        if needs_tokenizer and loaded.tokenizer is None:
            raise lrc.LRCError(f"no tokenizer.json for {path!r}: copy the teacher's tokenizer files into it")
        if args.data:
            started = time.time()
            # models sharing a tokenizer (a teacher and its students) share the tokens
            key = (loaded.tokenizer_sha256, loaded.doc_eos, model.config.vocab_size)
            if key not in token_cache:
                if args.data.endswith(".bin"):
                    token_cache[key] = bin_tokens(args.data, model.config.vocab_size, loaded.tokenizer_sha256)
                else:
                    token_cache[key] = text_tokens(args.data, loaded.token_dir, args.text_field, args.txt_split)
            if int(token_cache[key].max()) >= model.config.vocab_size:
                raise lrc.LRCError(f"{args.data} holds token ids >= vocab_size {model.config.vocab_size} of "
                                   f"{path!r}: prepare it with the model's own tokenizer")
            ppl, n_tokens = perplexity(model, token_cache[key], seq_len, args.batch_size, label=f"ppl {name}")
            result["ppl"] = {"file": args.data, "value": ppl, "tokens": n_tokens, "seq_len": seq_len,
                             "seconds": time.time() - started}
        for file, items in mc_sets.items():
            started = time.time()
            scores = score_mc(model, loaded.tokenizer, items, batch_size=args.batch_size,
                              max_len=model.config.max_position_embeddings, eos_id=loaded.doc_eos,
                              label=f"{os.path.basename(file)} {name}")
            result.setdefault("mc", {})[file] = {**scores, "seconds": time.time() - started}
        if args.prompt is not None:
            started = time.time()
            prompt_ids = encode_prompt(loaded.tokenizer, args.prompt, loaded.doc_eos)
            generator = torch.Generator(device=device).manual_seed(args.seed)
            out = generate(model, torch.tensor([prompt_ids], device=device), args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, eos_id=loaded.eos_ids,
                           generator=generator)
            new_ids = out[0, len(prompt_ids):].tolist()
            while new_ids and new_ids[-1] in loaded.eos_ids:
                new_ids.pop()
            seconds = time.time() - started
            result["generation"] = {"prompt": args.prompt, "text": loaded.tokenizer.decode(new_ids),
                                    "new_tokens": len(new_ids), "seconds": seconds,
                                    "temperature": args.temperature, "top_k": args.top_k}
        results.append(result)
        del loaded, model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def check_args(args):
    """Everything about the command line that can be refused before a model is loaded."""
    if not (args.data or args.mc or args.prompt is not None):
        raise lrc.LRCError("nothing to evaluate: pass --data=FILE, --mc=FILE.jsonl and/or --prompt=TEXT")
    for name in ("seq_len", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "max_new_tokens" else 1):
            raise lrc.LRCError(f"--{name}={value} must be at least {0 if name == 'max_new_tokens' else 1}")
    if args.temperature < 0 or (args.top_k is not None and args.top_k < 1):
        raise lrc.LRCError("--temperature must be >= 0 (0 = greedy) and --top_k >= 1")
    if args.data:
        directory, name = os.path.split(os.path.abspath(args.data))
        if args.data.endswith(".bin"):
            open_tokens(directory, name.removesuffix(".bin"))  # checks meta.json and the file's size
        elif not os.path.isfile(args.data):
            raise lrc.LRCError(f"--data={args.data!r} {'is a directory' if os.path.isdir(args.data) else 'does not exist'}"
                               f": pass a .txt, .jsonl or prepared .bin file")
        else:
            input_kind(args.data)  # refuses other extensions
        if args.txt_split not in TXT_SPLITS:
            raise lrc.LRCError(f"--txt_split={args.txt_split!r} is not one of {', '.join(TXT_SPLITS)}")
    if args.json:
        lrc.check_writable_dir(os.path.dirname(os.path.abspath(args.json)), "--json's directory")
        if os.path.isdir(args.json):
            raise lrc.LRCError(f"--json={args.json!r} is a directory: pass a file name")


def main(argv=None):
    parser = ArgumentParser(description="Evaluate teacher and students side by side.")
    parser.add_argument("--model", action="append", required=True,
                        help="HF directory or hub id, or a training output / ckpt_* directory (repeatable)")
    parser.add_argument("--data", help="perplexity text: .txt, .jsonl (--text_field) or a prepared DIR/SPLIT.bin")
    parser.add_argument("--mc", action="append", help="multiple-choice jsonl (repeatable)")
    parser.add_argument("--prompt", help="generate from this prompt")
    parser.add_argument("--json", help="write every number to this file")
    parser.add_argument("--teacher", help="teacher for training output directories (default: the recorded one)")
    parser.add_argument("--seq_len", type=int, default=None,
                        help="perplexity window (default: 1024, or less if a model's max position is smaller)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--text_field", default="text", help="field of a .jsonl --data holding the text")
    parser.add_argument("--txt_split", default="file", help="documents of a .txt --data: file (the whole file, "
                                                            "default), paragraph or line, as data/prepare.py")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1337, help="for sampling")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="default: bf16 on GPU, fp32 on CPU")
    args = parser.parse_args(argv)
    check_args(args)
    results = evaluate(args)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"models": results, "settings": vars(args)}, f, indent=2)


if __name__ == "__main__":
    sys.exit(run_main(main))
