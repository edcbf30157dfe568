"""
Turn text into token files (spec section 7): raw little-endian uint32 token ids, documents joined by
the tokenizer's eos id, with a meta.json beside them.

    python data/prepare.py --tokenizer=DIR_or_tokenizer.json --input=FILE [FILE...] --out=DIR
        [--text_field=text] [--val_fraction=0.0] [--val_input=FILE [FILE...]]
        [--txt_split=file|paragraph|line] [--eos_token=TOKEN|none] [--num_proc=N] [--batch_size=1024]

Inputs, by extension:
  .jsonl, .jsonl.gz   one document per line: the string in field --text_field (blank lines skipped)
  .txt                --txt_split=file (default): the whole file is one document;
                      =paragraph: documents are separated by blank lines; =line: one per line
Every document is stripped of trailing newlines, empty documents are skipped, and each document is
followed by the eos id (the layout eval_tiny's perplexity assumes, spec section 8). Nothing else is
added: encoding uses add_special_tokens=False, and a document's text is text: a special-token string
inside it (a literal "<|endoftext|>" or "<|im_start|>") is split as ordinary text (encode_texts), so the
eos ids prepare.py inserts are the only control tokens in a token file.

Output in DIR: train.bin, val.bin (only with --val_fraction > 0 or --val_input) and meta.json:
  {"vocab_size", "eos_id", "tokenizer_sha256" (of the tokenizer.json bytes),
   "n_tokens": {"train": n, "val": m}, "n_documents": {...}, "dtype": "uint32", "byteorder": "little",
   "tokenizer", "eos_token", "inputs", "val_inputs" (paths relative to DIR), "text_field",
   "txt_split", "val_fraction", "format_version": 1}
A document goes to val when blake2b-64(its UTF-8 text) / 2**64 < val_fraction: deterministic,
independent of input order, --num_proc and --batch_size, and duplicated documents land in the same
split (no train/val leak). Files are written under temporary names and renamed into place, meta.json
last, so a directory with a meta.json is complete.

Readers use open_tokens(dir, split) -> np.memmap of uint32, which checks the file against meta.json.
"""
import gzip
import hashlib
import json
import multiprocessing
import os
import sys
import time
import weakref
import zlib
from collections import deque

import numpy as np

if __name__ == "__main__":  # run as a script: make lrc.py (in the repository root) importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import run_main
from lrc import LRCError, atomic_file, check_writable_dir

FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype("<u4")  # little-endian uint32 whatever the machine (spec section 7)
# tried in this order when tokenizer_config.json names no eos token
COMMON_EOS_TOKENS = ("<|endoftext|>", "</s>", "<eos>")
TXT_SPLITS = ("file", "paragraph", "line")
MAX_WHOLE_FILE_BYTES = 1 << 30  # --txt_split=file reads a file into memory: refuse beyond 1 GiB


# -----------------------------------------------------------------------------
# tokenizer and meta helpers (also used by train.py, eval_tiny.py and data/toy.py)

def _tokenizer_files(path):
    """(tokenizer.json path, tokenizer_config.json path or None) for a directory, a file or a hub id."""
    if os.path.isdir(path):
        json_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(json_path):
            raise LRCError(f"no tokenizer.json in {path!r}: pass the model directory that holds it, "
                           f"or the tokenizer.json file itself")
        config_path = os.path.join(path, "tokenizer_config.json")
        return json_path, (config_path if os.path.isfile(config_path) else None)
    if os.path.isfile(path):
        config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        return path, (config_path if os.path.isfile(config_path) else None)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise LRCError(f"tokenizer {path!r} does not exist: pass a directory with tokenizer.json, the file "
                       f"itself, or a hub id like 'Qwen/Qwen2.5-3B-Instruct'")
    import huggingface_hub  # a hub id: fetch only the two tokenizer files
    try:
        local = huggingface_hub.snapshot_download(path, allow_patterns=["tokenizer.json", "tokenizer_config.json"])
    except Exception as e:
        raise LRCError(f"could not download the tokenizer of {path!r} from the Hugging Face hub "
                       f"({type(e).__name__}): check the id and your network, or pass a local directory") from None
    return _tokenizer_files(local)


def _eos_from_config(config_path):
    """The eos token string named in tokenizer_config.json, or None."""
    if config_path is None:
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):  # older files store {"content": "</s>", ...}
        eos = eos.get("content")
    return eos if isinstance(eos, str) else None


def load_tokenizer(path, eos_token=None):
    """(tokenizers.Tokenizer, eos id or None, sha256 hex of the tokenizer.json bytes).

    path: a directory holding tokenizer.json, the tokenizer.json file, or a hub id.
    eos_token: None = detect (tokenizer_config.json's eos_token, else the first of COMMON_EOS_TOKENS
    in the vocabulary); "none" = no eos; any other string must be a token of the vocabulary.
    """
    from tokenizers import Tokenizer
    json_path, config_path = _tokenizer_files(str(path))
    with open(json_path, "rb") as f:
        raw = f.read()
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:
        raise LRCError(f"{json_path} is not a tokenizers tokenizer.json ({str(e).splitlines()[0][:200]}): "
                       f"pass the tokenizer.json of a Hugging Face fast tokenizer") from None
    # Token files hold whole documents: a truncation or padding setting saved in tokenizer.json
    # would silently cut or pad them.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab_size > 2**32:
        raise LRCError(f"{json_path} has {vocab_size} tokens, more than uint32 token files can hold (2**32)")
    if eos_token is not None and str(eos_token).lower() == "none":
        eos_id = None
    elif eos_token is not None:
        eos_id = tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise LRCError(f"eos token {eos_token!r} is not in the vocabulary of {json_path}: pass one of its "
                           f"tokens, or --eos_token=none to join documents without a separator")
    else:
        eos_id = None
        for candidate in (_eos_from_config(config_path),) + COMMON_EOS_TOKENS:
            if candidate is not None and tokenizer.token_to_id(candidate) is not None:
                eos_id = tokenizer.token_to_id(candidate)
                break
    return tokenizer, eos_id, hashlib.sha256(raw).hexdigest()


# Encoding text. A document's characters are text: the string of an added token inside it (a literal
# "<|endoftext|>" or "<|im_start|>" in web text, or Qwen2.5's non-special "<tool_call>") must not become that
# control token, or pretraining text would inject fake document ends and chat turns. tokenizers' own
# encode_special_tokens covers only the tokens marked special, so the text copy marks every added token special.

# tokenizer -> its text copy, made on first use (a tokenizer changed after that keeps its old copy)
_TEXT_COPIES = weakref.WeakKeyDictionary()


def text_tokenizer(tokenizer):
    """A copy of `tokenizer` that reads the string of every added token, special or not, as ordinary text (the
    model's normalizer, pre-tokenizer and BPE see it). Only for encoding: decode with the original, whose
    special flags are untouched."""
    from tokenizers import Tokenizer
    if not hasattr(Tokenizer, "encode_special_tokens"):  # else setting it below would be a silent no-op
        raise LRCError("this tokenizers is too old to encode special-token text as text: pip install "
                       "'tokenizers>=0.15.1'")
    spec = json.loads(tokenizer.to_str())
    for token in spec.get("added_tokens") or []:
        token["special"] = True
    copy = Tokenizer.from_str(json.dumps(spec))
    copy.encode_special_tokens = True  # not saved by to_str(): set on every copy
    return copy


def encode_texts(tokenizer, texts, parse_special=False) -> list:
    """[token ids] of each text, adding no special tokens (add_special_tokens=False: no bos, no eos).

    parse_special=False, for documents, questions and prompts: added-token strings inside a text are split
    as ordinary text, so the only control tokens in a token stream are the ids a caller puts there itself
    (prepare.py's eos between documents).
    parse_special=True: added-token strings become their control tokens (tokenizers' default). The hook for
    text whose control tokens are meant, such as a rendered chat template; nothing in lrc renders one yet."""
    texts = list(texts)
    if not texts:
        return []
    encoder = tokenizer
    if not parse_special:
        encoder = _TEXT_COPIES.get(tokenizer)
        if encoder is None:
            encoder = _TEXT_COPIES[tokenizer] = text_tokenizer(tokenizer)
    encode = getattr(encoder, "encode_batch_fast", encoder.encode_batch)  # _fast: skips offsets
    return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]


def encode_text(tokenizer, text, parse_special=False) -> list:
    """encode_texts for one text."""
    return encode_texts(tokenizer, [text], parse_special)[0]


def tokenizer_sha256(path):
    """sha256 of a tokenizer's tokenizer.json bytes (what meta.json records), without parsing it."""
    json_path, _ = _tokenizer_files(str(path))
    with open(json_path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_meta(directory):
    """meta.json of a prepared token directory, checked for the fields spec section 7 requires."""
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.isfile(meta_path):
        raise LRCError(f"no meta.json in {directory!r}: prepare it with data/prepare.py (an interrupted "
                       f"prepare leaves no meta.json: run it again)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except ValueError as e:
        raise LRCError(f"{meta_path} is not valid JSON ({e}): prepare the directory again") from None
    missing = [k for k in ("vocab_size", "eos_id", "tokenizer_sha256", "n_tokens") if k not in meta]
    if missing:
        raise LRCError(f"{meta_path} lacks {', '.join(missing)}: prepare the directory again with data/prepare.py")
    if not isinstance(meta["n_tokens"], dict):  # spec section 7 allows a bare number: one train split
        meta["n_tokens"] = {"train": meta["n_tokens"]}
    return meta


def open_tokens(directory, split="train", vocab_size=None, tokenizer_sha256=None):
    """Read-only np.memmap (uint32, little-endian) of DIR/{split}.bin, checked against meta.json.

    vocab_size: the model's vocabulary (embedding rows); refuse token files made with a larger one.
    tokenizer_sha256: refuse token files made with another tokenizer.json.
    """
    meta = read_meta(directory)
    if split not in meta["n_tokens"]:
        raise LRCError(f"{directory!r} has no {split!r} split (it has {', '.join(sorted(meta['n_tokens']))}): "
                       f"prepare it with --val_fraction > 0 or --val_input for a val split")
    if meta.get("dtype", "uint32") != "uint32" or meta.get("byteorder", "little") != "little":
        raise LRCError(f"{directory!r} holds {meta.get('byteorder')}-endian {meta.get('dtype')} tokens; lrc reads "
                       f"little-endian uint32 (spec section 7): prepare it again with data/prepare.py")
    n_tokens = int(meta["n_tokens"][split])
    path = os.path.join(directory, f"{split}.bin")
    if not os.path.isfile(path):
        raise LRCError(f"{path} is missing although meta.json lists {n_tokens} {split} tokens: prepare again")
    size = os.path.getsize(path)
    if size != n_tokens * TOKEN_DTYPE.itemsize:
        raise LRCError(f"{path} has {size} bytes but meta.json says {n_tokens} tokens ({n_tokens * 4} bytes): "
                       f"the file is truncated or from another run; prepare again")
    if n_tokens == 0:
        raise LRCError(f"{path} holds no tokens: prepare it from non-empty text")
    if vocab_size is not None and meta["vocab_size"] > vocab_size:
        raise LRCError(f"{directory!r} was tokenized with a {meta['vocab_size']}-token vocabulary but the model has "
                       f"{vocab_size}: prepare the data with the model's own tokenizer")
    if tokenizer_sha256 is not None and meta["tokenizer_sha256"] != tokenizer_sha256:
        raise LRCError(f"{directory!r} was tokenized with another tokenizer.json (sha256 "
                       f"{meta['tokenizer_sha256'][:12]}..., expected {tokenizer_sha256[:12]}...): prepare the data "
                       f"with the model's own tokenizer")
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(n_tokens,))


def open_mask(directory, split="train"):
    """Read-only np.memmap (uint8) of DIR/{split}.mask, the per-token loss mask of chat data (meta.json's
    "loss_mask"): 1 on the tokens an SFT step trains on (the assistant's), 0 elsewhere; one byte per token of
    {split}.bin."""
    meta = read_meta(directory)
    n_tokens = int(meta["n_tokens"][split])
    path = os.path.join(directory, f"{split}.mask")
    if not os.path.isfile(path) or os.path.getsize(path) != n_tokens:
        raise LRCError(f"{path} is missing or does not hold one byte per token of {split}.bin ({n_tokens}), although "
                       f"meta.json lists a loss mask: prepare the directory again")
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(n_tokens,))


# -----------------------------------------------------------------------------
# reading inputs: the main process only cuts raw bytes into batches; decoding, JSON parsing and
# tokenizing happen in the workers, so they scale with --num_proc.

def input_kind(path):
    name = path.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    raise LRCError(f"{path}: unknown extension; data/prepare.py reads .txt, .jsonl and .jsonl.gz files")


def _raw_documents(path, txt_split):
    """Yield (line number, raw bytes) per document of one input file, text still undecoded."""
    kind = input_kind(path)
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            if kind == "jsonl" or txt_split == "line":
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        yield lineno, line
            elif txt_split == "paragraph":
                lines, first = [], 0
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        if not lines:
                            first = lineno
                        lines.append(line)
                    elif lines:
                        yield first, b"".join(lines)
                        lines = []
                if lines:
                    yield first, b"".join(lines)
            else:  # "file": the whole file is one document
                size = os.path.getsize(path)
                if size > MAX_WHOLE_FILE_BYTES:
                    raise LRCError(f"{path} is {size / 2**30:.1f} GiB, too big to read as ONE document "
                                   f"(--txt_split=file): use --txt_split=paragraph or --txt_split=line")
                yield 1, f.read()
    except (OSError, EOFError, zlib.error) as e:  # unreadable file, corrupt or truncated gzip
        raise LRCError(f"{path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
                       f"check the file") from None


def _batches(inputs, val_inputs, txt_split, batch_size):
    """Yield (path, kind, all_to_val, [(lineno, raw), ...]); a batch never spans two files."""
    for paths, to_val in ((inputs, False), (val_inputs, True)):
        for path in paths:
            kind, batch = input_kind(path), []
            for item in _raw_documents(path, txt_split):
                batch.append(item)
                if len(batch) == batch_size:
                    yield path, kind, to_val, batch
                    batch = []
            if batch:
                yield path, kind, to_val, batch


# -----------------------------------------------------------------------------
# the worker: text of one batch -> (train tokens, val tokens, counts)

_worker_state = {}  # set once per worker process by _init_worker


def _init_worker(tokenizer_json, eos_id, text_field, val_fraction):
    # One process per core already: a second level of threads inside tokenizers would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    _worker_state.update(tokenizer=tokenizer, eos_id=eos_id, text_field=text_field, val_fraction=val_fraction)


def _worker_encode(batch):
    s = _worker_state
    return encode_batch(s["tokenizer"], s["eos_id"], batch, s["text_field"], s["val_fraction"])


def _decode_document(path, kind, lineno, raw, text_field):
    """Document text from raw bytes, or an error string naming file and line."""
    if kind == "jsonl":
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as e:
            return None, f"{path}:{lineno}: not valid UTF-8 ({e.reason}): re-encode the file as UTF-8"
        except ValueError as e:
            return None, f"{path}:{lineno}: not valid JSON ({e}): fix or drop that line"
        if not isinstance(record, dict) or text_field not in record:
            keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            return None, (f"{path}:{lineno}: record has no {text_field!r} field (it has: {keys}): "
                          f"pass --text_field=NAME")
        text = record[text_field]
        if not isinstance(text, str):
            return None, (f"{path}:{lineno}: field {text_field!r} is a {type(text).__name__}, not a string: "
                          f"pass the --text_field that holds the text")
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return None, f"{path}:{lineno}: not valid UTF-8 ({e.reason}): re-encode the file as UTF-8"
    return text.rstrip("\r\n"), None


def goes_to_val(text, val_fraction):
    """The deterministic val split: a hash of the document's text, not its position."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def encode_batch(tokenizer, eos_id, batch, text_field="text", val_fraction=0.0):
    """Tokenize one batch. Returns {"error": str} or {"train": uint32 array, "val": uint32 array,
    "docs": {"train", "val", "empty"}}; errors are returned, not raised, so a worker's message reaches
    the main process intact and in input order."""
    path, kind, to_val, items = batch
    texts, splits, n_empty = [], [], 0
    for lineno, raw in items:
        text, error = _decode_document(path, kind, lineno, raw, text_field)
        if error:
            return {"error": error}
        if not text.strip():
            n_empty += 1
            continue
        texts.append(text)
        splits.append("val" if to_val or goes_to_val(text, val_fraction) else "train")
    ids = {"train": [], "val": []}
    for document, split in zip(encode_texts(tokenizer, texts), splits):  # documents are text: no control tokens
        ids[split].extend(document)
        if eos_id is not None:
            ids[split].append(eos_id)  # the one control token a token file holds
    return {"train": np.array(ids["train"], dtype=TOKEN_DTYPE), "val": np.array(ids["val"], dtype=TOKEN_DTYPE),
            "docs": {"train": splits.count("train"), "val": splits.count("val"), "empty": n_empty}}


# -----------------------------------------------------------------------------
# prepare

class _Progress:
    """One \\r-rewritten status line on stderr, at most twice a second."""

    def __init__(self, enabled):
        self.enabled, self.start, self.last = enabled, time.time(), 0.0

    def update(self, docs, tokens, final=False):
        now = time.time()
        if not self.enabled or (not final and now - self.last < 0.5):
            return
        self.last = now
        rate = tokens / max(now - self.start, 1e-9)
        sys.stderr.write(f"\r{docs:,} docs  {tokens:,} tokens  {rate:,.0f} tokens/s  "
                         f"{now - self.start:.0f} s" + ("\n" if final else ""))
        sys.stderr.flush()


def _check_inputs(paths, what):
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [str(p) for p in paths]
    for path in paths:
        if not os.path.isfile(path):
            state = "is a directory" if os.path.isdir(path) else "does not exist"
            raise LRCError(f"{what} file {path!r} {state}: pass text files (.txt, .jsonl, .jsonl.gz)")
        input_kind(path)
    return paths


def prepare(tokenizer, inputs, out, text_field="text", val_fraction=0.0, num_proc=None, batch_size=1024,
            txt_split="file", val_inputs=(), eos_token=None, progress=True):
    """Tokenize `inputs` (and `val_inputs`, all of whose documents go to val) into OUT/train.bin,
    OUT/val.bin and OUT/meta.json; returns the meta dict. See the module docstring for the formats.

    num_proc: worker processes; None = min(8, cpu count, 1 + input size / 64 MiB), so small inputs
    are tokenized in this process (where tokenizers still uses its own threads).
    """
    inputs = _check_inputs(inputs, "input")
    val_inputs = _check_inputs(val_inputs or [], "val input")
    if not inputs:
        raise LRCError("no input files: pass --input=FILE [FILE...]")
    if txt_split not in TXT_SPLITS:
        raise LRCError(f"--txt_split={txt_split!r} is not one of {', '.join(TXT_SPLITS)}")
    val_fraction = float(val_fraction)
    if not 0.0 <= val_fraction < 1.0:
        raise LRCError(f"--val_fraction={val_fraction} must be in [0, 1): it is the share of documents held out")
    if int(batch_size) < 1:
        raise LRCError(f"--batch_size={batch_size} must be at least 1 (documents per worker task)")
    tok, eos_id, sha256 = load_tokenizer(tokenizer, eos_token)
    if num_proc is None:
        total_bytes = sum(os.path.getsize(p) for p in inputs + val_inputs)
        num_proc = min(8, os.cpu_count() or 1, 1 + total_bytes // (64 << 20))
    if int(num_proc) < 1:
        raise LRCError(f"--num_proc={num_proc} must be at least 1")
    out = str(out)
    check_writable_dir(out)
    os.makedirs(out, exist_ok=True)
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path):  # from here until the new meta.json lands, the directory reads as incomplete
        os.remove(meta_path)
    splits = ("train", "val") if val_fraction > 0 or val_inputs else ("train",)
    counts = _tokenize(tok, eos_id, _batches(inputs, val_inputs, txt_split, int(batch_size)), out, splits,
                       text_field, val_fraction, int(num_proc), progress)
    meta = {
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "eos_id": eos_id,
        "tokenizer_sha256": sha256,
        "n_tokens": counts["tokens"],
        "n_documents": counts["documents"],
        "dtype": "uint32",
        "byteorder": "little",
        # paths relative to OUT, so that the same build in another directory is byte-identical
        "tokenizer": os.path.relpath(str(tokenizer), out) if os.path.exists(str(tokenizer)) else str(tokenizer),
        "eos_token": tok.id_to_token(eos_id) if eos_id is not None else None,
        "inputs": [os.path.relpath(p, out) for p in inputs],
        "val_inputs": [os.path.relpath(p, out) for p in val_inputs],
        "text_field": text_field,
        "txt_split": txt_split,
        "val_fraction": val_fraction,
        "empty_documents_skipped": counts["empty"],
        "format_version": FORMAT_VERSION,
    }
    with atomic_file(meta_path) as f:  # last: its presence marks the directory complete
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta


def _tokenize(tok, eos_id, batches, out, splits, text_field, val_fraction, num_proc, progress):
    """Encode every batch (in worker processes when num_proc > 1, written in input order) into OUT/{split}.bin
    through temporary files, renamed into place only when every input was read and each split holds tokens.
    Returns {"tokens": {split: n}, "documents": {split: n}, "empty": n}."""
    tmp_paths = {s: os.path.join(out, f".{s}.bin.tmp{os.getpid()}") for s in splits}
    counts = {"tokens": {s: 0 for s in splits}, "documents": {s: 0 for s in splits}, "empty": 0}
    meter = _Progress(progress)
    pool = None
    files = {s: open(tmp_paths[s], "wb") for s in splits}
    try:
        def write(result):
            if "error" in result:
                raise LRCError(result["error"])
            for s in splits:
                result[s].tofile(files[s])
                counts["tokens"][s] += len(result[s])
                counts["documents"][s] += result["docs"][s]
            counts["empty"] += result["docs"]["empty"]
            meter.update(sum(counts["documents"].values()), sum(counts["tokens"].values()))

        if num_proc == 1:
            for batch in batches:
                write(encode_batch(tok, eos_id, batch, text_field, val_fraction))
        else:
            # fork where available: workers start in milliseconds and do not re-run the caller's script
            # (train.py has no __main__ guard); spawn elsewhere.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(method).Pool(
                num_proc, initializer=_init_worker, initargs=(tok.to_str(), eos_id, text_field, val_fraction))
            # A bounded window of tasks, written in submission order: Pool.imap would read the whole
            # corpus into its queue ahead of the workers.
            pending = deque()
            for batch in batches:
                pending.append(pool.apply_async(_worker_encode, (batch,)))
                if len(pending) >= 2 * num_proc:
                    write(pending.popleft().get())
            while pending:
                write(pending.popleft().get())
        for f in files.values():
            f.close()
        meter.update(sum(counts["documents"].values()), sum(counts["tokens"].values()), final=True)
        _check_counts(counts, splits, val_fraction)
        for s in splits:
            os.replace(tmp_paths[s], os.path.join(out, f"{s}.bin"))
        if "val" not in splits and os.path.exists(os.path.join(out, "val.bin")):
            os.remove(os.path.join(out, "val.bin"))  # a stale val.bin from an earlier run would contradict meta
        return counts
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for s in splits:
            files[s].close()
            if os.path.exists(tmp_paths[s]):
                os.remove(tmp_paths[s])


def _check_counts(counts, splits, val_fraction):
    n_tokens, n_docs = counts["tokens"], counts["documents"]
    if n_tokens["train"] == 0:
        raise LRCError(f"no train tokens: the inputs hold no non-empty document ({counts['empty']} empty ones"
                       f"{', and every document went to val' if sum(n_docs.values()) else ''}): check the "
                       f"inputs, --text_field and --val_fraction")
    if "val" in splits and n_tokens["val"] == 0:
        raise LRCError(f"--val_fraction={val_fraction} held out none of the {n_docs['train']} documents: "
                       f"raise it, or pass --val_input=FILE")


# -----------------------------------------------------------------------------
# command line

OPTIONS = {  # name: (type, default); the list-valued ones take several words after --name=
    "tokenizer": (str, None), "input": (list, []), "out": (str, None), "text_field": (str, "text"),
    "val_fraction": (float, 0.0), "val_input": (list, []), "txt_split": (str, "file"),
    "eos_token": (str, None), "num_proc": (int, None), "batch_size": (int, 1024),
}


def parse_args(argv):
    """--key=value (or --key value) options; --input and --val_input take every word up to the next option."""
    args = {name: (list(default) if kind is list else default) for name, (kind, default) in OPTIONS.items()}

    def set_option(name, value):
        kind = OPTIONS[name][0]
        if kind is list:
            args[name].append(value)
            return name  # keep collecting words for this option
        try:
            args[name] = kind(value)
        except ValueError:
            raise LRCError(f"--{name}={value!r} is not a valid {kind.__name__}") from None
        return None

    key = None  # the option that takes the next bare word
    for word in argv:
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            if name not in OPTIONS:
                raise LRCError(f"unknown option --{name}: the options are " + ", ".join(f"--{k}" for k in OPTIONS))
            key = set_option(name, value) if eq else name
        elif key is not None:
            key = set_option(key, word)
        else:
            raise LRCError(f"unexpected argument {word!r}: options look like --name=value")
    if key is not None and OPTIONS[key][0] is not list:
        raise LRCError(f"--{key} needs a value: --{key}=VALUE")
    for required in ("tokenizer", "out"):
        if args[required] is None:
            raise LRCError(f"--{required} is required: python data/prepare.py --tokenizer=DIR --input=FILE --out=DIR")
    if not args["input"]:
        raise LRCError("--input is required: python data/prepare.py --tokenizer=DIR --input=FILE --out=DIR")
    return args


def main(argv):
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    args = parse_args(argv)
    meta = prepare(args["tokenizer"], args["input"], args["out"], text_field=args["text_field"],
                   val_fraction=args["val_fraction"], num_proc=args["num_proc"], batch_size=args["batch_size"],
                   txt_split=args["txt_split"], val_inputs=args["val_input"], eos_token=args["eos_token"])
    print(f"wrote {args['out']}: " + ", ".join(f"{s} {n:,} tokens" for s, n in meta["n_tokens"].items())
          + f" (vocab {meta['vocab_size']}, eos {meta['eos_token']!r})")


if __name__ == "__main__":
    sys.exit(run_main(main))
