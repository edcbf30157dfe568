"""
Turn text and conversations into token files (spec section 7): raw little-endian uint32 token ids, documents
joined by the tokenizer's eos id, with a meta.json beside them; for conversations also a uint8 loss mask.

    python data/prepare.py --tokenizer=DIR_or_tokenizer.json --input=FILE [FILE...] --out=DIR
        [--format=auto|chat|text] [--text_field=text] [--val_fraction=0.0] [--val_input=FILE [FILE...]]
        [--txt_split=file|paragraph|line] [--eos_token=TOKEN|none] [--num_proc=N] [--batch_size=1024]

Inputs, by extension:
  .jsonl, .jsonl.gz   one record per line: a document, the string in field --text_field (blank lines skipped),
                      or a conversation (below); --format=auto (default) decides per file from its first record
  .txt                --txt_split=file (default): the whole file is one document (at most 1 GiB);
                      =paragraph: documents are separated by blank lines; =line: one per line
Text: every document is stripped of trailing newlines, empty documents are skipped, and each document is
followed by the eos id (the layout eval_tiny's perplexity assumes, spec section 8). Nothing else is added:
encoding uses add_special_tokens=False, and a document's text is text: a special-token string inside it (a
literal "<|endoftext|>" or "<|im_start|>") is split as ordinary text (encode_texts), so the eos ids prepare.py
inserts are the only control tokens in a token file.
Chat (--format=chat, or auto on a record with "messages" or "conversations"; data/chat.py): {"messages":
[{"role", "content"}, ...]} or ShareGPT's {"conversations": [{"from", "value"}, ...]}, rendered with the
tokenizer's chat template (chat_template.jinja or tokenizer_config.json) exactly as transformers'
apply_chat_template(messages, tokenize=True) renders and tokenizes it (its control tokens are control tokens:
encode_texts(..., parse_special=True)), then the eos id unless the conversation already ends with it. Beside
{split}.bin, {split}.mask holds one uint8 per token: 1 on each assistant message's content and the end-of-turn
token that closes it, 0 on everything else (data/chat.py says exactly how that is found). The inputs of one
directory are all text or all chat: mix the two with train.py --data={dir: weight}.

Output in DIR: train.bin, val.bin (only with --val_fraction > 0 or --val_input), for chat train.mask and
val.mask, and meta.json:
  {"vocab_size", "eos_id", "tokenizer_sha256" (of the tokenizer.json bytes),
   "n_tokens": {"train": n, "val": m}, "n_documents": {...}, "dtype": "uint32", "byteorder": "little",
   "format": "text" | "chat", "tokenizer", "eos_token", "inputs", "val_inputs" (paths relative to DIR),
   "text_field", "txt_split", "val_fraction", "format_version": 1;
   chat only: "loss_mask" (a description of the mask files), "chat_template_sha256"}
A document (a conversation: its rendered text) goes to val when blake2b-64(its UTF-8 text) / 2**64 <
val_fraction: deterministic, independent of input order, --num_proc and --batch_size, and duplicated documents
land in the same split (no train/val leak).

Scale: inputs are streamed (memory stays flat whatever their size), tokenized by --num_proc processes and
appended in input order to DIR/{name}.partial; stderr shows documents, tokens, tokens/s and an ETA from the
input bytes read. After each input file DIR/progress.json is rewritten atomically with the byte size of each
partial file and the counts at that point, the settings and the identity (path, size, mtime) of the files
read. A killed preparation run again with the same settings and the same first files truncates the partial
files to the last completed file and reads on from the next one; other settings start over (it says which).
Only when every input is read are the partial files renamed into place, progress.json removed and meta.json
written, last: a directory with a meta.json is complete, and one without is not.

Readers use open_tokens(dir, split) -> np.memmap of uint32, which checks the file against meta.json, and
open_mask(dir, split) for the loss mask.
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
from contextlib import contextmanager
from datetime import datetime

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
FORMATS = ("auto", "chat", "text")
# what a hub id downloads: the tokenizer, its config, and where a chat template and special tokens may be
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"]
PROGRESS_FILE = "progress.json"  # the record of an unfinished preparation (resume)


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
    import huggingface_hub  # a hub id: fetch only the tokenizer's files
    try:
        local = huggingface_hub.snapshot_download(path, allow_patterns=TOKENIZER_FILES)
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
_OFFSET_COPIES = weakref.WeakKeyDictionary()  # the same for encode_texts(offsets=True): no post-processor


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


def encode_texts(tokenizer, texts, parse_special=False, offsets=False) -> list:
    """[token ids] of each text, adding no special tokens (add_special_tokens=False: no bos, no eos).

    parse_special=False, for documents, questions and prompts: added-token strings inside a text are split
    as ordinary text, so the only control tokens in a token stream are the ids a caller puts there itself
    (prepare.py's eos between documents).
    parse_special=True: added-token strings become their control tokens (tokenizers' default, and what
    transformers' apply_chat_template does with the text its chat template rendered): for a rendered chat
    template, whose <|im_start|> and <|im_end|> are meant.
    offsets=True: [(ids, [(start, end) character span of each token])] instead, the spans untrimmed (a
    ByteLevel post-processor would shrink a whitespace token to nothing; with add_special_tokens=False a
    post-processor adds no token, so the copy used here, without one, gives the same ids)."""
    texts = list(texts)
    if not texts:
        return []
    if offsets:
        if not parse_special:
            raise LRCError("encode_texts(offsets=True) is for text with control tokens: pass parse_special=True")
        encoder = _OFFSET_COPIES.get(tokenizer)
        if encoder is None:
            from tokenizers import Tokenizer
            encoder = _OFFSET_COPIES[tokenizer] = Tokenizer.from_str(tokenizer.to_str())
            encoder.post_processor = None
        return [(e.ids, e.offsets) for e in encoder.encode_batch(texts, add_special_tokens=False)]
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
# reading inputs: the main process only cuts raw bytes into batches; decoding, JSON parsing, chat rendering and
# tokenizing happen in the workers, so they scale with --num_proc.

def input_kind(path):
    name = path.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    raise LRCError(f"{path}: unknown extension; data/prepare.py reads .txt, .jsonl and .jsonl.gz files")


class _InputFile:
    """The documents of one input file as (line number, raw bytes), text still undecoded, read as a stream;
    tell() is how many of the file's bytes are read so far (compressed bytes for .gz, as its size counts them)."""

    def __init__(self, path, txt_split):
        self.path, self.txt_split, self.raw = path, txt_split, None

    def tell(self):
        return self.raw.tell() if self.raw is not None and not self.raw.closed else 0

    def __iter__(self):
        path, txt_split = self.path, self.txt_split
        kind = input_kind(path)
        try:
            with open(path, "rb") as self.raw:
                f = gzip.GzipFile(fileobj=self.raw, mode="rb") if path.lower().endswith(".gz") else self.raw
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


def _batches(files, txt_split, batch_size):
    """Yield (batch, index of its file, bytes of that file read so far) with batch = (path, kind, to_val,
    [(lineno, raw), ...]), and after each file's last batch (None, its index, its size): a batch never spans two
    files. files: [(index, path, kind, to_val)], kind "text" or "chat"."""
    for index, path, kind, to_val in files:
        reader, batch = _InputFile(path, txt_split), []
        for item in reader:
            batch.append(item)
            if len(batch) == batch_size:
                yield (path, kind, to_val, batch), index, reader.tell()
                batch = []
        if batch:
            yield (path, kind, to_val, batch), index, os.path.getsize(path)
        yield None, index, os.path.getsize(path)


def _first_record(path):
    """The first record of a .jsonl file, or None when it has none or it is not JSON."""
    for _, raw in _InputFile(path, "line"):
        try:
            return json.loads(raw)
        except ValueError:
            return None
    return None


def input_formats(paths, fmt, text_field):
    """"chat" or "text", the format of all of `paths` (--format, or detected per file from its first record:
    chat when it has "messages" or "conversations" and no --text_field); refuses a mixture of the two."""
    if fmt not in FORMATS:
        raise LRCError(f"--format={fmt!r} is not one of {', '.join(FORMATS)}")
    found = {}
    for path in paths:
        if input_kind(path) == "txt":
            if fmt == "chat":
                raise LRCError(f"{path}: a .txt file holds text, not chat records: write conversations as .jsonl "
                               f"records, or pass --format=text")
            found[path] = "text"
        elif fmt != "auto":
            found[path] = fmt
        else:
            record = _first_record(path)
            chat = isinstance(record, dict) and text_field not in record and any(k in record for k in chat_layouts())
            found[path] = "chat" if chat else "text"
    kinds = sorted(set(found.values()))
    if len(kinds) > 1:
        chat = next(p for p in paths if found[p] == "chat")
        text = next(p for p in paths if found[p] == "text")
        raise LRCError(f"{chat} holds chat records but {text} holds text: prepare them into two directories and "
                       f"mix them with train.py --data=\"{{'DIR_A': 0.9, 'DIR_B': 0.1}}\" (or pass --format=chat|text)")
    return kinds[0] if kinds else "text"


def chat_layouts():
    from data.chat import LAYOUTS
    return LAYOUTS


# -----------------------------------------------------------------------------
# the worker: one batch -> (tokens and, for chat, masks of each split, counts)

_worker_state = {}  # set once per worker process by _init_worker


def _init_worker(tokenizer_json, eos_id, text_field, val_fraction, chat):
    # One process per core already: a second level of threads inside tokenizers would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    _worker_state["encoder"] = _Encoder(tokenizer, eos_id, text_field, val_fraction, chat)


def _worker_encode(batch):
    return _worker_state["encoder"](batch)


class _Encoder:
    """Turns a batch into its result: encode_batch for text, encode_chat_batch for chat. chat: None, or
    (template source, special tokens, control tokens, clock) for data.chat.ChatTemplate, compiled here once."""

    def __init__(self, tokenizer, eos_id, text_field, val_fraction, chat=None):
        self.tokenizer, self.eos_id, self.text_field, self.val_fraction = tokenizer, eos_id, text_field, val_fraction
        self.template = None
        if chat is not None:
            from data.chat import ChatTemplate
            self.template = ChatTemplate(*chat)

    def __call__(self, batch):
        if batch[1] == "chat":
            return encode_chat_batch(self.tokenizer, self.template, self.eos_id, batch, self.val_fraction)
        return encode_batch(self.tokenizer, self.eos_id, batch, self.text_field, self.val_fraction)


def _json_record(path, lineno, raw):
    """(record, None) or (None, an error naming file and line)."""
    try:
        return json.loads(raw), None
    except UnicodeDecodeError as e:
        return None, f"{path}:{lineno}: not valid UTF-8 ({e.reason}): re-encode the file as UTF-8"
    except ValueError as e:
        return None, f"{path}:{lineno}: not valid JSON ({e}): fix or drop that line"


def _decode_document(path, jsonl, lineno, raw, text_field):
    """Document text from raw bytes (a .jsonl record's text_field when jsonl), or an error string naming file
    and line."""
    if jsonl:
        record, error = _json_record(path, lineno, raw)
        if error:
            return None, error
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
    path, _, to_val, items = batch
    texts, splits, n_empty, jsonl = [], [], 0, input_kind(path) == "jsonl"
    for lineno, raw in items:
        text, error = _decode_document(path, jsonl, lineno, raw, text_field)
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


def encode_chat_batch(tokenizer, template, eos_id, batch, val_fraction=0.0):
    """encode_batch for conversations: each record rendered with `template` (data.chat.ChatTemplate) and
    tokenized with its control tokens, then the eos id unless it already ends with it; the result also holds
    "train_mask" and "val_mask" (uint8, 1 on the assistant's tokens, 0 on the eos and everything else)."""
    from data.chat import ChatError, conversation_of, mask_of
    path, _, to_val, items = batch
    texts, spans, splits, n_empty = [], [], [], 0
    for lineno, raw in items:
        record, error = _json_record(path, lineno, raw)
        if error:
            return {"error": error}
        try:
            text, assistant = template.assistant_spans(conversation_of(record))
        except ChatError as e:
            return {"error": f"{path}:{lineno}: {e}"}
        if not text.strip():
            n_empty += 1
            continue
        texts.append(text)
        spans.append(assistant)
        splits.append("val" if to_val or goes_to_val(text, val_fraction) else "train")
    ids, masks = {"train": [], "val": []}, {"train": [], "val": []}
    for (tokens, offsets), assistant, split in zip(encode_texts(tokenizer, texts, parse_special=True, offsets=True),
                                                   spans, splits):
        ids[split].append(np.array(tokens, dtype=TOKEN_DTYPE))
        masks[split].append(mask_of(offsets, assistant, len(tokens)))
        if eos_id is not None and (not tokens or tokens[-1] != eos_id):  # a separator, as between documents
            ids[split].append(np.array([eos_id], dtype=TOKEN_DTYPE))
            masks[split].append(np.zeros(1, dtype=np.uint8))
    result = {"docs": {"train": splits.count("train"), "val": splits.count("val"), "empty": n_empty}}
    for split in ("train", "val"):
        result[split] = np.concatenate(ids[split]) if ids[split] else np.zeros(0, dtype=TOKEN_DTYPE)
        result[split + "_mask"] = np.concatenate(masks[split]) if masks[split] else np.zeros(0, dtype=np.uint8)
    return result


# -----------------------------------------------------------------------------
# the output of a preparation in progress, and its resume

class _Progress:
    """One \\r-rewritten status line on stderr, at most twice a second: documents, tokens, the tokens/s of this
    run, and an ETA from the input bytes read so far against all the input bytes."""

    def __init__(self, enabled, total_bytes, done_bytes=0, done_tokens=0):
        """done_bytes, done_tokens: what an interrupted run had done, which this run's rate does not count."""
        self.enabled, self.start, self.last = enabled, time.time(), 0.0
        self.total, self.first_bytes, self.first_tokens = total_bytes, done_bytes, done_tokens

    def update(self, docs, tokens, bytes_done, final=False):
        now = time.time()
        if not self.enabled or (not final and now - self.last < 0.5):
            return
        self.last, elapsed = now, max(now - self.start, 1e-9)
        rate = (tokens - self.first_tokens) / elapsed
        read = bytes_done - self.first_bytes
        eta = (self.total - bytes_done) * elapsed / read if read > 0 else float("nan")
        done = 100.0 * bytes_done / self.total if self.total else 100.0
        sys.stderr.write(f"\r{docs:,} docs  {tokens:,} tokens  {rate:,.0f} tokens/s  {done:.1f}% of the input  "
                         f"{elapsed:.0f} s" + (f"  ETA {_duration(eta)}" if not final and eta == eta else "")
                         + ("\n" if final else "  "))
        sys.stderr.flush()


def _duration(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _identity(path, to_val):
    """What tells a resumed preparation that an input file is the one it read before: role, path, size, mtime."""
    st = os.stat(path)
    return ["val" if to_val else "train", os.path.abspath(path), st.st_size, st.st_mtime_ns]


class _Output:
    """OUT/{split}.bin.partial (and .mask.partial), appended in input order, and OUT/progress.json, rewritten
    atomically after each input file: {"settings", "inputs" (identities of the files done), "files_done",
    "bytes" (each partial file's size then), "counts", "clock"}. On open, an interrupted preparation with the
    same settings whose files_done first inputs are the same is resumed: its partial files are cut back to
    those sizes (dropping a half-read file) and files_done says which input to read next."""

    def __init__(self, out, splits, masks, settings, identities, clock, log):
        names = [f"{s}.{ext}" for s in splits for ext in (("bin", "mask") if masks else ("bin",))]
        self.out, self.names, self.settings, self.identities = out, names, settings, identities
        self.paths = {name: os.path.join(out, name + ".partial") for name in names}
        self.record_path = os.path.join(out, PROGRESS_FILE)
        record, why = self._resumable()
        if record is None:
            if why:
                log(f"{out} holds an interrupted preparation, but {why}: starting over")
            if os.path.exists(self.record_path):  # it must never vouch for the new partial files
                os.remove(self.record_path)
            self.files_done, self.clock = 0, clock
            self.counts = {"tokens": {s: 0 for s in splits}, "documents": {s: 0 for s in splits}, "empty": 0}
            self.files = {name: open(path, "wb") for name, path in self.paths.items()}
        else:
            self.files_done, self.counts, self.clock = record["files_done"], record["counts"], record["clock"]
            log(f"resuming {out}: {self.files_done} of {len(identities)} input files were done "
                f"({sum(self.counts['tokens'].values()):,} tokens); reading on from the next one")
            self.files = {}
            for name, path in self.paths.items():
                self.files[name] = open(path, "r+b")
                self.files[name].truncate(record["bytes"][name])  # the half-written part of the next file
                self.files[name].seek(0, os.SEEK_END)

    def _resumable(self):
        """(the progress record to resume from, None) or (None, why not: None when there is none)."""
        if not os.path.exists(self.record_path):
            return None, None
        try:
            with open(self.record_path, encoding="utf-8") as f:
                record = json.load(f)
            done = int(record["files_done"])
            if record["settings"] != self.settings:
                changed = sorted(k for k in set(record["settings"]) | set(self.settings)
                                 if record["settings"].get(k) != self.settings.get(k))
                return None, f"its settings differ ({', '.join(changed)})"
            if done > len(self.identities) or record["inputs"] != self.identities[:done]:
                return None, f"its first {done} input files are not these (paths, sizes or times differ)"
            for name in self.names:
                if os.path.getsize(self.paths[name]) < record["bytes"][name]:
                    return None, f"{name}.partial is shorter than its progress record says"
            return record, None
        except (OSError, ValueError, KeyError, TypeError):
            return None, f"its {PROGRESS_FILE} or partial files are unreadable or missing"

    def write(self, result):
        for split in self.counts["tokens"]:
            result[split].tofile(self.files[f"{split}.bin"])
            if f"{split}.mask" in self.files:
                result[split + "_mask"].tofile(self.files[f"{split}.mask"])
            self.counts["tokens"][split] += len(result[split])
            self.counts["documents"][split] += result["docs"][split]
        self.counts["empty"] += result["docs"]["empty"]

    def file_done(self, index):
        """Input `index` is complete: its tokens on disk, then the record that says so (never the other way)."""
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
        record = {"settings": self.settings, "inputs": self.identities[:index + 1], "files_done": index + 1,
                  "bytes": {name: f.tell() for name, f in self.files.items()}, "counts": self.counts,
                  "clock": self.clock}
        with atomic_file(self.record_path) as f:
            json.dump(record, f, indent=1)
        self.files_done = index + 1

    def close(self):
        for f in self.files.values():
            f.close()

    def finish(self):
        """Every input read: the partial files become the token files and the progress record goes (meta.json,
        which marks the directory complete, is the caller's to write next)."""
        self.close()
        for name, path in self.paths.items():
            os.replace(path, os.path.join(self.out, name))
        for name in ("train.bin", "val.bin", "train.mask", "val.mask"):
            if name not in self.names and os.path.exists(os.path.join(self.out, name)):
                os.remove(os.path.join(self.out, name))  # from an earlier run: it would contradict meta.json
        os.remove(self.record_path)


@contextmanager
def _locked(out):
    """Hold an exclusive lock on the directory OUT, so that two preparations never write the same partial files."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise LRCError(f"another data/prepare.py is writing {out}: wait for it, or choose another --out") from None
        yield
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# prepare

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


def default_num_proc(total_bytes):
    """Every core this process may use, but one process per 64 MiB of input: worker start-up costs more than
    tokenizing a small input (which, in one process, still uses tokenizers' own threads)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 1 + total_bytes // (64 << 20)))


def prepare(tokenizer, inputs, out, text_field="text", val_fraction=0.0, num_proc=None, batch_size=1024,
            txt_split="file", val_inputs=(), eos_token=None, progress=True, format="auto"):
    """Tokenize `inputs` (and `val_inputs`, all of whose documents go to val) into OUT/train.bin,
    OUT/val.bin (with masks for chat) and OUT/meta.json; returns the meta dict. See the module docstring for the
    formats and the resume. num_proc: worker processes; None = default_num_proc(input bytes)."""
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
    fmt = input_formats(inputs + val_inputs, format, text_field)
    tok, eos_id, sha256 = load_tokenizer(tokenizer, eos_token)
    total_bytes = sum(os.path.getsize(p) for p in inputs + val_inputs)
    num_proc = default_num_proc(total_bytes) if num_proc is None else int(num_proc)
    if num_proc < 1:
        raise LRCError(f"--num_proc={num_proc} must be at least 1")
    chat = _chat_setup(tokenizer, tok, inputs + val_inputs) if fmt == "chat" else None
    out = str(out)
    check_writable_dir(out)
    os.makedirs(out, exist_ok=True)
    splits = ("train", "val") if val_fraction > 0 or val_inputs else ("train",)
    settings = {"format_version": FORMAT_VERSION, "tokenizer_sha256": sha256, "eos_id": eos_id, "format": fmt,
                "text_field": text_field, "txt_split": txt_split, "val_fraction": val_fraction, "splits": list(splits),
                "chat_template_sha256": chat["sha256"] if chat else None}
    with _locked(out):
        meta_path = os.path.join(out, "meta.json")
        if os.path.exists(meta_path):  # from here until the new meta.json lands, the directory reads as incomplete
            os.remove(meta_path)
        counts = _tokenize(tok, eos_id, inputs, val_inputs, out, splits, settings, chat,
                           dict(text_field=text_field, txt_split=txt_split, batch_size=int(batch_size),
                                val_fraction=val_fraction, num_proc=num_proc, progress=progress,
                                total_bytes=total_bytes))
        meta = {
            "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "eos_id": eos_id,
            "tokenizer_sha256": sha256,
            "n_tokens": counts["tokens"],
            "n_documents": counts["documents"],
            "dtype": "uint32",
            "byteorder": "little",
            "format": fmt,
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
        if chat:
            meta.update(loss_mask=LOSS_MASK, chat_template_sha256=chat["sha256"])
        with atomic_file(meta_path) as f:  # last: its presence marks the directory complete
            json.dump(meta, f, indent=2)
            f.write("\n")
    return meta


# meta.json's "loss_mask" of chat data: what {split}.mask holds (open_mask reads it)
LOSS_MASK = ("uint8 per token in {split}.mask: 1 on each assistant message's content and the end-of-turn token "
             "closing it, 0 elsewhere")


def _chat_setup(tokenizer, tok, paths):
    """What the workers need to render conversations: the template (refused before any work when missing or
    broken), the special tokens it sees, the tokenizer's control tokens, and the clock of strftime_now."""
    from data.chat import ChatTemplate, load_chat_template, template_sha256
    json_path, config_path = _tokenizer_files(str(tokenizer))
    try:
        template, special, _ = load_chat_template(json_path, config_path)
    except LRCError as e:
        raise LRCError(f"{paths[0]} holds chat records, but {e}") from None
    controls = [t.content for t in tok.get_added_tokens_decoder().values()]
    clock = datetime.now().isoformat(timespec="seconds")
    ChatTemplate(template, special, controls, clock)  # compiles: a broken template fails here, once
    return {"args": [template, special, controls, clock], "sha256": template_sha256(template)}


def _tokenize(tok, eos_id, inputs, val_inputs, out, splits, settings, chat, opt):
    """Encode every input (in worker processes when num_proc > 1, written in input order) into OUT's partial
    files, resuming an interrupted run of the same settings; returns {"tokens": {split: n}, "documents":
    {split: n}, "empty": n} once every input is read and each split holds tokens."""
    files = [(i, p, settings["format"], to_val) for i, (p, to_val) in
             enumerate([(p, False) for p in inputs] + [(p, True) for p in val_inputs])]
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if opt["progress"] else (lambda line: None)
    output = _Output(out, splits, chat is not None, settings, [_identity(p, v) for _, p, _, v in files],
                     chat["args"][3] if chat else None, log)
    if chat:
        chat["args"][3] = output.clock  # a resumed preparation renders dates as it did before
    offsets = np.cumsum([0] + [os.path.getsize(p) for _, p, _, _ in files])  # of each file in all the input bytes
    meter = _Progress(opt["progress"], opt["total_bytes"], int(offsets[output.files_done]),
                      sum(output.counts["tokens"].values()))
    pool, num_proc = None, opt["num_proc"]
    encoder_args = (eos_id, opt["text_field"], opt["val_fraction"], chat["args"] if chat else None)
    try:
        def finished(result, index, read):
            if result is None:
                output.file_done(index)
            elif "error" in result:
                raise LRCError(result["error"])
            else:
                output.write(result)
            counts = output.counts
            meter.update(sum(counts["documents"].values()), sum(counts["tokens"].values()), int(offsets[index]) + read)

        batches = _batches(files[output.files_done:], opt["txt_split"], opt["batch_size"])
        if num_proc == 1:
            encoder = _Encoder(tok, *encoder_args)
            for batch, index, read in batches:
                finished(encoder(batch) if batch is not None else None, index, read)
        else:
            # fork where available: workers start in milliseconds and do not re-run the caller's script
            # (train.py has no __main__ guard); spawn elsewhere.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            pool = multiprocessing.get_context(method).Pool(num_proc, initializer=_init_worker,
                                                            initargs=(tok.to_str(),) + encoder_args)
            # A bounded window of tasks, written in submission order: Pool.imap would read the whole
            # corpus into its queue ahead of the workers.
            pending = deque()
            for batch, index, read in batches:
                task = pool.apply_async(_worker_encode, (batch,)) if batch is not None else None  # None: end of file
                pending.append((task, index, read))
                while len(pending) >= 2 * num_proc or (pending and pending[0][0] is None):
                    task, index, read = pending.popleft()
                    finished(task.get() if task is not None else None, index, read)
            while pending:
                task, index, read = pending.popleft()
                finished(task.get() if task is not None else None, index, read)
        counts = output.counts
        meter.update(sum(counts["documents"].values()), sum(counts["tokens"].values()), opt["total_bytes"], final=True)
        _check_counts(counts, splits, opt["val_fraction"])
        output.finish()
        return counts
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        output.close()


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
    "eos_token": (str, None), "num_proc": (int, None), "batch_size": (int, 1024), "format": (str, "auto"),
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
                   txt_split=args["txt_split"], val_inputs=args["val_input"], eos_token=args["eos_token"],
                   format=args["format"])
    print(f"wrote {args['out']}: " + ", ".join(f"{s} {n:,} tokens" for s, n in meta["n_tokens"].items())
          + f" (vocab {meta['vocab_size']}, eos {meta['eos_token']!r}, {meta['format']}"
          + (", with loss masks)" if meta.get("loss_mask") else ")"))


if __name__ == "__main__":
    sys.exit(run_main(main))
