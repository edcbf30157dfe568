"""Token files (data/prepare.py, spec section 7) and the toy world (data/toy.py)."""
import filecmp
import gzip
import hashlib
import json
import os
import random
import re
import struct
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import tokenizers
from tokenizers import Tokenizer, models, pre_tokenizers

from data.prepare import goes_to_val, load_tokenizer, open_tokens, prepare, read_meta, tokenizer_sha256
from data.prepare import main as prepare_main
from data.toy import ATTRIBUTES, CITIES, DEFAULT_SIZES, build_toy
from configurator import run_main
from lrc import LRCError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The default-size toy world, built once for the module."""
    return build_toy(str(tmp_path_factory.mktemp("toy")))


@pytest.fixture(scope="module")
def docs():
    """Documents with what trips tokenizers and splitters: unicode, inner newlines, leading spaces."""
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "Ünïcode", "日本語", "emoji 🙂", "tab\there", "3.14", "--", "\"quoted\""]
    out = []
    for i in range(300):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(1, 30)))
        if i % 7 == 0:
            text = "  leading spaces " + text + "\ninner line"
        out.append(text)
    return out


def expected_ids(tokenizer, eos_id, documents):
    ids = []
    for d in documents:
        ids += tokenizer.encode(d, add_special_tokens=False).ids + [eos_id]
    return ids


def write_jsonl(path, documents, field="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, d in enumerate(documents):
            f.write(json.dumps({"id": i, field: d}) + "\n")
    return str(path)


def write_paragraphs(path, documents):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(documents) + "\n")
    return str(path)


def split_docs(tokenizer, eos_id, ids):
    """Token ids -> list of decoded documents (each closed by eos)."""
    ids = list(map(int, ids))
    assert ids[-1] == eos_id
    out, start = [], 0
    for i, t in enumerate(ids):
        if t == eos_id:
            out.append(tokenizer.decode(ids[start:i], skip_special_tokens=False))
            start = i + 1
    return out


def assert_one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# -----------------------------------------------------------------------------
# prepare: layout and contents

def test_round_trip_layout_and_meta(toy, docs, tmp_path):
    tok, eos_id, sha = load_tokenizer(toy["tokenizer"])
    assert eos_id == tok.token_to_id(EOS) == 0
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    meta = prepare(toy["tokenizer"], [src], tmp_path / "out", progress=False)
    want = expected_ids(tok, eos_id, docs)

    # raw little-endian uint32, nothing else in the file
    raw = (tmp_path / "out" / "train.bin").read_bytes()
    assert len(raw) == 4 * len(want)
    assert list(struct.unpack(f"<{len(want)}I", raw)) == want
    tokens = open_tokens(tmp_path / "out")
    assert tokens.dtype == np.dtype("<u4") and tokens.tolist() == want

    # decoding the file gives the documents joined (closed) by eos
    assert tok.decode(tokens.tolist(), skip_special_tokens=False) == "".join(d + EOS for d in docs)
    assert split_docs(tok, eos_id, tokens) == docs

    assert meta == read_meta(tmp_path / "out")
    assert meta["vocab_size"] == tok.get_vocab_size() == 1024
    assert meta["eos_id"] == 0 and meta["eos_token"] == EOS
    assert meta["tokenizer_sha256"] == sha == hashlib.sha256(open(toy["tokenizer"], "rb").read()).hexdigest()
    assert meta["tokenizer_sha256"] == tokenizer_sha256(toy["root"])
    assert meta["n_tokens"] == {"train": len(want)} and meta["n_documents"] == {"train": len(docs)}
    assert not (tmp_path / "out" / "val.bin").exists()
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "train.bin"]  # no temporary files left


def test_uint32_ids_above_65535(tmp_path):
    vocab = {"[UNK]": 0, "</s>": 1, "small": 2, "big": 70000, "huge": 3_000_000}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    src = write_paragraphs(tmp_path / "t.txt", ["small big huge", "huge"])
    meta = prepare(tmp_path, [src], tmp_path / "out", txt_split="paragraph", progress=False)
    assert meta["eos_id"] == 1 and meta["eos_token"] == "</s>"  # found among the common eos tokens
    assert open_tokens(tmp_path / "out").tolist() == [2, 70000, 3_000_000, 1, 3_000_000, 1]


def test_jsonl_gz_and_txt_inputs_agree(toy, docs, tmp_path):
    tok, eos_id, _ = load_tokenizer(toy["tokenizer"])
    plain = write_jsonl(tmp_path / "a.jsonl", docs[:150])
    gz = write_jsonl(tmp_path / "b.jsonl.gz", docs[150:], opener=gzip.open)
    prepare(toy["tokenizer"], [plain, gz], tmp_path / "j", progress=False)
    assert open_tokens(tmp_path / "j").tolist() == expected_ids(tok, eos_id, docs)

    # paragraph mode: blank lines separate documents (the test documents hold no blank line)
    para = write_paragraphs(tmp_path / "p.txt", docs)
    prepare(toy["tokenizer"], [para], tmp_path / "p", txt_split="paragraph", progress=False)
    assert filecmp.cmp(tmp_path / "j" / "train.bin", tmp_path / "p" / "train.bin", shallow=False)

    # line mode: one document per line; file mode: one document per file
    one_line = [d.replace("\n", " ") for d in docs[:20]]
    lines = tmp_path / "l.txt"
    lines.write_text("\n".join(one_line) + "\n\n\n", encoding="utf-8")  # blank lines are skipped
    prepare(toy["tokenizer"], [lines], tmp_path / "l", txt_split="line", progress=False)
    assert open_tokens(tmp_path / "l").tolist() == expected_ids(tok, eos_id, one_line)
    files = []
    for i, d in enumerate(docs[:3]):
        (tmp_path / f"f{i}.txt").write_text(d + "\n", encoding="utf-8")  # the trailing newline is dropped
        files.append(tmp_path / f"f{i}.txt")
    prepare(toy["tokenizer"], files, tmp_path / "f", progress=False)
    assert open_tokens(tmp_path / "f").tolist() == expected_ids(tok, eos_id, docs[:3])


def test_empty_documents_are_skipped_and_eos_none(toy, tmp_path):
    tok, _, _ = load_tokenizer(toy["tokenizer"])
    src = write_jsonl(tmp_path / "e.jsonl", ["one", "", "   ", "two"])
    meta = prepare(toy["tokenizer"], [src], tmp_path / "o", eos_token="none", progress=False)
    assert meta["eos_id"] is None and meta["empty_documents_skipped"] == 2
    assert open_tokens(tmp_path / "o").tolist() == tok.encode("one").ids + tok.encode("two").ids


def test_eos_from_tokenizer_config(toy, tmp_path):
    tok = Tokenizer.from_file(toy["tokenizer"])
    tok.add_special_tokens(["<|im_end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    _, eos_id, _ = load_tokenizer(tmp_path)
    assert eos_id == tok.token_to_id("<|im_end|>") != tok.token_to_id(EOS)
    _, eos_id, _ = load_tokenizer(tmp_path, eos_token=EOS)  # an explicit choice wins
    assert eos_id == tok.token_to_id(EOS)


def test_val_split_is_deterministic_by_document(toy, docs, tmp_path):
    tok, eos_id, _ = load_tokenizer(toy["tokenizer"])
    a = write_jsonl(tmp_path / "a.jsonl", docs[:200])
    b = write_jsonl(tmp_path / "b.jsonl", docs[200:])
    meta = prepare(toy["tokenizer"], [a, b], tmp_path / "x", val_fraction=0.25, progress=False)
    want_val = [d for d in docs if goes_to_val(d, 0.25)]
    assert 0 < len(want_val) < len(docs)
    assert meta["n_documents"] == {"train": len(docs) - len(want_val), "val": len(want_val)}
    assert split_docs(tok, eos_id, open_tokens(tmp_path / "x", "val")) == want_val
    assert split_docs(tok, eos_id, open_tokens(tmp_path / "x", "train")) == [d for d in docs if d not in want_val]
    # the same split whatever the order of the inputs, the batch size or the number of processes
    prepare(toy["tokenizer"], [b, a], tmp_path / "y", val_fraction=0.25, batch_size=7, num_proc=2, progress=False)
    assert sorted(split_docs(tok, eos_id, open_tokens(tmp_path / "y", "val"))) == sorted(want_val)
    # explicit val inputs go to val whole
    meta = prepare(toy["tokenizer"], [a], tmp_path / "z", val_inputs=[b], progress=False)
    assert split_docs(tok, eos_id, open_tokens(tmp_path / "z", "val")) == docs[200:]
    # a later run without val removes the old val.bin, so files and meta.json always agree
    prepare(toy["tokenizer"], [a], tmp_path / "z", progress=False)
    assert not (tmp_path / "z" / "val.bin").exists()
    with pytest.raises(LRCError) as e:
        open_tokens(tmp_path / "z", "val")
    assert_one_line_error(e, "no 'val' split")


def test_num_proc_gives_identical_files(toy, docs, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", docs * 3)
    for num_proc, batch_size in ((1, 1024), (2, 5), (3, 64)):
        prepare(toy["tokenizer"], [src], tmp_path / f"n{num_proc}", val_fraction=0.1, num_proc=num_proc,
                batch_size=batch_size, progress=False)
    for n in (2, 3):
        for name in ("train.bin", "val.bin", "meta.json"):
            assert filecmp.cmp(tmp_path / "n1" / name, tmp_path / f"n{n}" / name, shallow=False), name


# -----------------------------------------------------------------------------
# prepare: special-token strings inside documents are text

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>"]  # Qwen2.5 marks these special: false
HIJACK_DOCS = [
    "Web pages quote <|endoftext|> in the middle of a sentence, and it is not the end.",
    "A forum post: <|im_start|>user\nhello<|im_end|> is what a chat looks like.",
    "<tool_call>{\"name\": \"f\"}</tool_call> and <|fim_prefix|>def f(): pass",
    "An ordinary document with nothing odd in it.",
]


def write_qwen_style_tokenizer(directory):
    """A byte-level BPE with added tokens laid out as Qwen2.5's: after the BPE vocabulary, the special
    <|endoftext|> (eos), <|im_start|>, <|im_end|>, then the non-special <tool_call>, </tool_call> and
    <|fim_prefix|>. Returns the tokenizer; tokenizer.json and tokenizer_config.json are in directory."""
    from tokenizers import AddedToken, decoders, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(HIJACK_DOCS * 4 + ["end of text, im start, tool call, fim prefix"] * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_ADDED])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>"}, f)
    return tok


def added_ids(tok):
    return {tok.token_to_id(t) for t in QWEN_SPECIAL + QWEN_ADDED}


@pytest.mark.parametrize("num_proc", [1, 2])
def test_special_token_strings_in_documents_stay_text(tmp_path, num_proc):
    tok = write_qwen_style_tokenizer(tmp_path / "tok")
    eos_id = tok.token_to_id("<|endoftext|>")
    assert eos_id in tok.encode(HIJACK_DOCS[0], add_special_tokens=False).ids  # the trap this guards against
    src = write_jsonl(tmp_path / "d.jsonl", HIJACK_DOCS * 3)
    meta = prepare(tmp_path / "tok", [src], tmp_path / "out", num_proc=num_proc, batch_size=2, progress=False)
    assert meta["eos_id"] == eos_id
    ids = open_tokens(tmp_path / "out").tolist()
    # the only control tokens are the separators prepare.py put there, one after each document
    assert [i for i in ids if i in added_ids(tok)] == [eos_id] * len(HIJACK_DOCS) * 3
    assert split_docs(tok, eos_id, ids) == HIJACK_DOCS * 3  # and each document reads back as written


def test_encode_text_and_its_hook_for_control_tokens(tmp_path):
    from data.prepare import encode_text, encode_texts
    tok = write_qwen_style_tokenizer(tmp_path / "tok")
    text = "<|im_start|>user\nhi<|im_end|> <tool_call>"
    plain = encode_text(tok, text)
    assert not set(plain) & added_ids(tok) and tok.decode(plain) == text
    # parse_special=True (the hook for a rendered chat template): its control tokens stay control tokens
    control = encode_text(tok, text, parse_special=True)
    assert control == tok.encode(text, add_special_tokens=False).ids
    assert [tok.id_to_token(i) for i in control if i in added_ids(tok)] == ["<|im_start|>", "<|im_end|>",
                                                                           "<tool_call>"]
    assert encode_texts(tok, [text, "plain"]) == [plain, encode_text(tok, "plain")] and encode_texts(tok, []) == []
    # the tokenizer itself is untouched: its own encode and decode behave as before
    assert tok.encode(text, add_special_tokens=False).ids == control and not tok.encode_special_tokens
    assert tok.decode(control) == "user\nhi <tool_call>"  # special tokens skipped, the non-special one kept


# -----------------------------------------------------------------------------
# prepare: refusals, each one line naming the problem

def test_input_errors(toy, tmp_path):
    good = write_jsonl(tmp_path / "ok.jsonl", ["fine"])
    cases = [
        (dict(inputs=[tmp_path / "missing.jsonl"]), ["missing.jsonl", "does not exist"]),
        (dict(inputs=[tmp_path / "data.csv"]), ["unknown extension", ".jsonl"]),
        (dict(inputs=[good], txt_split="sentence"), ["--txt_split"]),
        (dict(inputs=[good], val_fraction=1.5), ["--val_fraction"]),
        (dict(inputs=[good], num_proc=0), ["--num_proc"]),
        (dict(inputs=[good], eos_token="<nope>"), ["<nope>", "not in the vocabulary"]),
        (dict(inputs=[]), ["no input files"]),
        (dict(inputs=[tmp_path]), ["is a directory"]),
        (dict(inputs=[good], out=tmp_path / "FILE"), ["--out=", "is a file"]),
        (dict(inputs=[good], out=tmp_path / "FILE" / "x"), ["--out=", "inside the file"]),
    ]
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "FILE").write_text("a file where a directory belongs")
    for kwargs, fragments in cases:
        with pytest.raises(LRCError) as e:
            prepare(toy["tokenizer"], **{"out": tmp_path / "o", "progress": False, **kwargs})
        assert_one_line_error(e, *fragments)
    with pytest.raises(LRCError) as e:
        prepare(tmp_path / "no_tokenizer_here", [good], tmp_path / "o")
    assert_one_line_error(e, "does not exist")
    with pytest.raises(LRCError) as e:
        prepare(tmp_path, [good], tmp_path / "o")  # a directory without tokenizer.json
    assert_one_line_error(e, "no tokenizer.json")
    with pytest.raises(LRCError) as e:
        build_toy(tmp_path / "FILE")
    assert_one_line_error(e, "is a file")


@pytest.mark.parametrize("num_proc", [1, 2])
def test_bad_records_name_file_and_line(toy, tmp_path, num_proc):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(30)]
    cases = {
        "field": (lines[:20] + [json.dumps({"body": "x"})] + lines[20:], ":21:", "no 'text' field", "body"),
        "json": (lines[:5] + ["{not json"] + lines[5:], ":6:", "not valid JSON"),
        "type": (lines[:2] + [json.dumps({"text": 5})], ":3:", "not a string"),
    }
    for name, (content, *fragments) in cases.items():
        path = tmp_path / f"{name}.jsonl.gz"
        with gzip.open(path, "wt") as f:
            f.write("\n".join(content) + "\n")
        with pytest.raises(LRCError) as e:
            prepare(toy["tokenizer"], [path], tmp_path / "o", num_proc=num_proc, batch_size=4, progress=False)
        assert_one_line_error(e, f"{name}.jsonl.gz", *fragments)
    # a failed run leaves nothing that looks complete: only partial files a corrected run resumes from
    assert all(p.endswith(".partial") or p == "progress.json" for p in os.listdir(tmp_path / "o"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\nbroken \xff\xfe\n")
    with pytest.raises(LRCError) as e:
        prepare(toy["tokenizer"], [bad], tmp_path / "o", txt_split="paragraph", num_proc=num_proc, progress=False)
    assert_one_line_error(e, "bad.txt:3", "UTF-8")
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(gzip.compress(b'{"text": "a"}\n' * 100)[:40])
    with pytest.raises(LRCError) as e:
        prepare(toy["tokenizer"], [corrupt], tmp_path / "o", num_proc=num_proc, progress=False)
    assert_one_line_error(e, "corrupt.jsonl.gz", "cannot read")


def test_empty_output_errors(toy, tmp_path):
    empty = write_jsonl(tmp_path / "e.jsonl", ["", "  "])
    with pytest.raises(LRCError) as e:
        prepare(toy["tokenizer"], [empty], tmp_path / "o", progress=False)
    assert_one_line_error(e, "no train tokens")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    with pytest.raises(LRCError) as e:
        prepare(toy["tokenizer"], [blank], tmp_path / "o", progress=False)
    assert_one_line_error(e, "no train tokens")
    one = write_jsonl(tmp_path / "one.jsonl", ["a single document"])
    with pytest.raises(LRCError) as e:  # a val fraction that holds out nothing is refused, not ignored
        prepare(toy["tokenizer"], [one], tmp_path / "o", val_fraction=1e-9, progress=False)
    assert_one_line_error(e, "held out none")
    assert not os.path.exists(tmp_path / "o" / "meta.json")


def test_vocab_beyond_uint32_refused(toy, monkeypatch):
    real = tokenizers.Tokenizer

    class Huge:
        @staticmethod
        def from_str(text):
            return HugeTokenizer(real.from_str(text))

    class HugeTokenizer:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get_vocab_size(self, with_added_tokens=True):
            return 2**32 + 1

    monkeypatch.setattr(tokenizers, "Tokenizer", Huge)
    with pytest.raises(LRCError) as e:
        load_tokenizer(toy["tokenizer"])
    assert_one_line_error(e, "2**32")


def test_open_tokens_checks_meta(toy, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", ["some text", "more text"])
    meta = prepare(toy["tokenizer"], [src], tmp_path / "o", progress=False)
    assert len(open_tokens(tmp_path / "o", vocab_size=1024, tokenizer_sha256=meta["tokenizer_sha256"])) > 0
    checks = [
        (dict(vocab_size=512), ["1024-token vocabulary", "512"]),
        (dict(tokenizer_sha256="0" * 64), ["another tokenizer.json"]),
        (dict(split="test"), ["no 'test' split"]),
    ]
    for kwargs, fragments in checks:
        with pytest.raises(LRCError) as e:
            open_tokens(tmp_path / "o", **kwargs)
        assert_one_line_error(e, *fragments)
    with open(tmp_path / "o" / "train.bin", "ab") as f:
        f.write(b"\0\0")  # a torn write
    with pytest.raises(LRCError) as e:
        open_tokens(tmp_path / "o")
    assert_one_line_error(e, "train.bin", "bytes but meta.json says")
    os.remove(tmp_path / "o" / "meta.json")
    with pytest.raises(LRCError) as e:
        open_tokens(tmp_path / "o")
    assert_one_line_error(e, "no meta.json")


def test_cli(toy, docs, tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", docs[:100])
    b = write_jsonl(tmp_path / "b.jsonl.gz", docs[100:], opener=gzip.open)
    script = os.path.join(REPO, "data", "prepare.py")
    run = subprocess.run([sys.executable, script, f"--tokenizer={toy['root']}", f"--input={a}", b,
                          f"--out={tmp_path / 'cli'}", "--val_fraction=0.2", "--num_proc=2"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "tokens/s" in run.stderr and "train" in run.stdout
    prepare(toy["tokenizer"], [a, b], tmp_path / "lib", val_fraction=0.2, progress=False)
    for name in ("train.bin", "val.bin"):
        assert filecmp.cmp(tmp_path / "cli" / name, tmp_path / "lib" / name, shallow=False)
    # failures: exit code 2 and one "error: ..." line (in-process: the script's main() is the same code)
    for argv, fragment in ((["--input=nope.jsonl"], "nope.jsonl"), ([f"--input={a}", "--num_proc=x"], "--num_proc"),
                           ([f"--input={a}", "--colour=red"], "unknown option --colour")):
        capsys.readouterr()
        assert run_main(prepare_main, [f"--tokenizer={toy['root']}", f"--out={tmp_path / 'x'}"] + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err


# -----------------------------------------------------------------------------
# prepare: conversations, rendered with the tokenizer's chat template as transformers renders them

QWEN_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
CHAT_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>",            # Qwen2.5's
                "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>"]
# Qwen2.5-Instruct's template without its tools branch, plus a refusal of unknown roles
QWEN25_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unexpected message role: ' + message.role) }}
    {%- elif message.role != 'system' or not loop.first %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# the same with transformers' {% generation %} markers around what lrc's mask rule covers: the oracle of the mask
QWEN25_GENERATION = QWEN25_TEMPLATE.replace(
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
    "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{% generation %}"
    "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}")
# Llama 3's layout: a bos_token variable, contents trimmed
LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""
# Mistral v0.3's habit: the system prompt goes into the LAST user turn, so a prefix renders differently
MISTRAL_TEMPLATE = """\
{%- set ns = namespace(last_user=-1) %}
{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}
{{- bos_token }}
{%- for message in messages %}
    {%- if message.role == 'user' and loop.index0 == ns.last_user and messages[0].role == 'system' %}
        {{- '[INST] ' + messages[0].content + '\\n\\n' + message.content + ' [/INST]' }}
    {%- elif message.role == 'user' %}
        {{- '[INST] ' + message.content + ' [/INST]' }}
    {%- elif message.role == 'assistant' %}
        {{- ' ' + message.content + eos_token }}
    {%- endif %}
{%- endfor %}
"""
TEMPLATES = {  # name: (template, tokenizer_config.json's special tokens)
    "qwen2.5": (QWEN25_TEMPLATE, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}),
    "llama3": (LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "mistral": (MISTRAL_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}),
}
CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is alpha?"},
     {"role": "assistant", "content": "A letter."}, {"role": "user", "content": "And beta?\n"},
     {"role": "assistant", "content": "  Another letter, 日本語 too 🙂  \n"}],
    [{"role": "user", "content": "Say the end token."},       # no system message: Qwen's default system prompt
     {"role": "assistant", "content": "I end turns with <|im_end|> and go on."}],
    [{"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
     {"role": "user", "content": "second"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": "third"}, {"role": "assistant", "content": ""}],
]


def write_chat_tokenizer(directory, name="qwen2.5", template=None):
    """A byte-level BPE with Qwen2's normalizer and pre-tokenizer (what transformers' Qwen2Tokenizer rebuilds), the
    chat tokens as special added tokens, and a tokenizer_config.json with one of TEMPLATES."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)  # offsets it would shrink must not matter
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = [m["content"] for c in CONVERSATIONS for m in c] + ["system user assistant You are a helpful"]
    tok.train_from_iterator(text * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIAL])
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    source, special = TEMPLATES[name]
    config = {"tokenizer_class": "Qwen2Tokenizer", **special}
    if template is not False:
        config["chat_template"] = template or source
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


def sharegpt(messages):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}


def write_chats(path, conversations, layout="messages"):
    with open(path, "w", encoding="utf-8") as f:
        for i, c in enumerate(conversations):
            f.write(json.dumps({"id": i, "messages": c} if layout == "messages" else sharegpt(c)) + "\n")
    return str(path)


def hf_stream(hf, eos_id, conversations):
    """transformers' ids and assistant masks (when its template has {% generation %}) of each conversation,
    followed by eos unless it ends with it: what the token file must hold."""
    ids, masks = [], []
    for c in conversations:
        out = hf.apply_chat_template(c, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask="{% generation %}" in hf.chat_template)
        ids += out["input_ids"]
        masks += out.get("assistant_masks", [0] * len(out["input_ids"]))
        if out["input_ids"][-1] != eos_id:
            ids.append(eos_id)
            masks.append(0)
    return ids, masks


@pytest.mark.parametrize("name", ["qwen2.5", "llama3", "mistral"])
def test_chat_ids_equal_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    from data.prepare import open_mask
    directory = write_chat_tokenizer(tmp_path / "tok", name)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    a = write_chats(tmp_path / "a.jsonl", CONVERSATIONS[:2])
    b = write_chats(tmp_path / "b.jsonl", CONVERSATIONS[2:], layout="sharegpt")  # ShareGPT's layout: the same
    meta = prepare(directory, [a, b], tmp_path / "out", progress=False)            # detected as chat per file
    ids, _ = hf_stream(hf, meta["eos_id"], CONVERSATIONS)
    assert open_tokens(tmp_path / "out").tolist() == ids
    assert meta["format"] == "chat" and meta["loss_mask"] and meta["n_documents"] == {"train": 3}
    assert meta["eos_id"] == hf.eos_token_id
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "train.bin", "train.mask"]
    tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    mask = open_mask(tmp_path / "out").tolist()
    runs, run = [], []  # the masked tokens, run by run: each assistant message's content and end-of-turn token
    for token, m in zip(ids + [None], mask + [0]):
        if m:
            run.append(token)
        elif run:
            runs.append(tok.decode(run, skip_special_tokens=False))
            run = []
    end = {"qwen2.5": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}[name]
    contents = [m["content"].strip() if name == "llama3" else m["content"] for c in CONVERSATIONS for m in c
                if m["role"] == "assistant"]  # Llama 3 trims contents
    if name == "mistral":  # the space after [/INST] counts where a token holds it and the answer's first letters
        runs = [r[1:] if r.startswith(" ") and r[1:] == c + end else r for r, c in zip(runs, contents)]
    assert runs == [c + end for c in contents]


def test_chat_mask_equals_transformers_generation_mask(tmp_path):
    """With {% generation %} markers around each assistant content and its <|im_end|>, transformers' own
    assistant mask is the mask lrc computes without them; the markers do not change the ids."""
    transformers = pytest.importorskip("transformers")
    from data.prepare import open_mask
    plain = transformers.AutoTokenizer.from_pretrained(write_chat_tokenizer(tmp_path / "plain"))
    marked = write_chat_tokenizer(tmp_path / "marked", template=QWEN25_GENERATION)
    hf = transformers.AutoTokenizer.from_pretrained(marked)
    ids, masks = hf_stream(hf, hf.eos_token_id, CONVERSATIONS * 3)
    assert ids == hf_stream(plain, plain.eos_token_id, CONVERSATIONS * 3)[0] and sum(masks) > 0
    src = write_chats(tmp_path / "c.jsonl", CONVERSATIONS * 3)
    for num_proc in (1, 2):
        for tokenizer in (tmp_path / "plain", marked):
            out = tmp_path / f"out{num_proc}{os.path.basename(tokenizer)}"
            prepare(tokenizer, [src], out, format="chat", num_proc=num_proc, batch_size=2, progress=False)
            assert open_tokens(out).tolist() == ids
            assert open_mask(out).tolist() == masks


def test_chat_spans_both_ways_agree(tmp_path):
    """The two ways of finding the assistant's characters (data/chat.py) agree where both work, each takes over
    where the other cannot, and a template that defeats both is refused."""
    from data.chat import ChatError, ChatTemplate, load_chat_template
    from data.prepare import _tokenizer_files
    used = {}
    for name in TEMPLATES:
        directory = write_chat_tokenizer(tmp_path / name, name)
        template, special, _ = load_chat_template(*_tokenizer_files(directory))
        chat = ChatTemplate(template, special, CHAT_SPECIAL)
        for n, c in enumerate(CONVERSATIONS):
            text, spans = chat.assistant_spans(c)
            assistants = [i for i, m in enumerate(c) if m["role"] == "assistant"]
            markers = chat._spans_by_markers(c, text, assistants)
            prefixes = chat._spans_by_prefixes(c, text, assistants)
            assert spans == (markers if markers is not None else prefixes)
            if markers is not None and prefixes is not None:
                assert markers == prefixes
            used[name, n] = "markers" if markers is not None else "prefixes" if prefixes is not None else None
    assert used["llama3", 0] == "prefixes"   # trimmed contents with outer spaces: markers would be trimmed away
    assert used["mistral", 0] == "markers"   # the system prompt moves to the last user turn: prefixes differ
    assert used["qwen2.5", 0] == "markers"
    # contents rewritten (first letter dropped) and earlier turns re-rendered (the last turn's end differs): neither
    both = "{% for m in messages %}{{ m.content[1:] if m.role == 'assistant' else m.content }}" \
           "{{ '<|im_end|>' if not loop.last else '<|endoftext|>' }}{% endfor %}"
    chat = ChatTemplate(both, {}, CHAT_SPECIAL)
    with pytest.raises(ChatError, match="cannot find the assistant's messages"):
        chat.assistant_spans([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                              {"role": "user", "content": "bye"}])


def test_chat_val_split_and_layouts(tmp_path):
    from data.prepare import open_mask
    directory = write_chat_tokenizer(tmp_path / "tok")
    many = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
            for i in range(60)]
    src = write_chats(tmp_path / "c.jsonl", many)
    meta = prepare(directory, [src], tmp_path / "out", val_fraction=0.3, progress=False)
    assert 0 < meta["n_documents"]["val"] < 60 and sum(meta["n_documents"].values()) == 60
    assert len(open_mask(tmp_path / "out", "val")) == meta["n_tokens"]["val"]
    sg = write_chats(tmp_path / "s.jsonl", many, layout="sharegpt")
    prepare(directory, [sg], tmp_path / "sg", val_fraction=0.3, progress=False)
    for name in ("train.bin", "val.bin", "train.mask", "val.mask"):
        assert filecmp.cmp(tmp_path / "out" / name, tmp_path / "sg" / name, shallow=False), name
    # the same conversations as text: no masks, and a chat directory's masks do not survive a text run there
    text = write_jsonl(tmp_path / "t.jsonl", [f"question {i} answer {i}" for i in range(60)])
    meta = prepare(directory, [text], tmp_path / "out", progress=False)
    assert meta["format"] == "text" and "loss_mask" not in meta
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "train.bin"]


def test_chat_bad_input_is_one_line_naming_file_and_line(tmp_path):
    directory = write_chat_tokenizer(tmp_path / "tok")
    good = json.dumps({"messages": CONVERSATIONS[0]})
    cases = {
        "layout": (json.dumps({"prompt": "hi", "answer": "ho"}), "neither 'messages' nor 'conversations'", "prompt"),
        "role": (json.dumps({"messages": [{"role": "tool", "content": "42"}]}), "rejects this conversation",
                 "Unexpected message role: tool"),
        "empty": (json.dumps({"conversations": []}), "empty conversation"),
        "content": (json.dumps({"messages": [{"role": "user", "content": ["a", "list"]}]}), "no 'content' string"),
        "sharegpt": (json.dumps({"conversations": [{"from": "robot", "value": "beep"}]}), "'robot'"),
    }
    for name, (bad, *fragments) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join([good] * 3 + [bad] + [good]) + "\n")
        for num_proc in (1, 2):
            with pytest.raises(LRCError) as e:
                prepare(directory, [path], tmp_path / "o", format="chat", num_proc=num_proc, batch_size=2,
                        progress=False)
            assert_one_line_error(e, f"{name}.jsonl:4:", *fragments)
            assert not os.path.exists(tmp_path / "o" / "meta.json") and not os.path.exists(tmp_path / "o" / "train.bin")
    chats = write_chats(tmp_path / "c.jsonl", CONVERSATIONS)
    no_template = write_chat_tokenizer(tmp_path / "base", template=False)
    with pytest.raises(LRCError) as e:
        prepare(no_template, [chats], tmp_path / "o", progress=False)
    assert_one_line_error(e, "c.jsonl holds chat records", "no chat template", "tokenizer_config.json")
    broken = write_chat_tokenizer(tmp_path / "broken", template="{% for m in messages %}{{ m.content }}")
    with pytest.raises(LRCError) as e:
        prepare(broken, [chats], tmp_path / "o", progress=False)
    assert_one_line_error(e, "does not parse")
    text = write_jsonl(tmp_path / "t.jsonl", ["a document"])
    with pytest.raises(LRCError) as e:
        prepare(directory, [chats, text], tmp_path / "o", progress=False)
    assert_one_line_error(e, "c.jsonl holds chat records but", "t.jsonl holds text", "--data=")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(LRCError) as e:
        prepare(directory, [tmp_path / "x.txt"], tmp_path / "o", format="chat", progress=False)
    assert_one_line_error(e, "x.txt", "not chat records")


# -----------------------------------------------------------------------------
# prepare: resume after a kill, progress

class Killed(Exception):
    """Stands for SIGKILL in the middle of an input file."""


def test_killed_preparation_resumes_byte_identical(tmp_path, monkeypatch, capsys):
    import data.prepare as prepare_module
    directory = write_chat_tokenizer(tmp_path / "tok")
    convs = [[{"role": "user", "content": f"q{i} {'x' * (i % 7)}"}, {"role": "assistant", "content": f"a{i}"}]
             for i in range(90)]
    files = [write_chats(tmp_path / f"part{k}.jsonl", convs[30 * k:30 * (k + 1)]) for k in range(3)]
    names = ["train.bin", "val.bin", "train.mask", "val.mask", "meta.json"]
    options = dict(format="chat", val_fraction=0.2, batch_size=4)
    real = prepare_module._InputFile.__iter__
    for num_proc in (1, 2):
        prepare(directory, files, tmp_path / f"whole{num_proc}", num_proc=num_proc, progress=False, **options)
        read, kill = [], {"at": files[1]}

        def reading(self):
            read.append(os.path.basename(self.path))
            for n, item in enumerate(real(self)):
                if self.path == kill["at"] and n == 17:
                    raise Killed()
                yield item

        monkeypatch.setattr(prepare_module._InputFile, "__iter__", reading)
        out = tmp_path / f"resumed{num_proc}"
        with pytest.raises(Killed):
            prepare(directory, files, out, num_proc=num_proc, progress=False, **options)
        # nothing looks done: no meta.json, no token file under its final name; the record covers part0 only
        assert not [n for n in names if os.path.exists(out / n)]
        record = json.load(open(out / "progress.json"))
        assert record["files_done"] == 1 and [os.path.basename(i[1]) for i in record["inputs"]] == ["part0.jsonl"]
        if num_proc == 1:  # the half-read part1 was written and must be cut off again
            assert os.path.getsize(out / "train.bin.partial") > record["bytes"]["train.bin"]
        read.clear()
        kill["at"] = None
        capsys.readouterr()
        prepare(directory, files, out, num_proc=num_proc, progress=True, **options)
        assert read == ["part1.jsonl", "part2.jsonl"]  # part0 is not read again
        assert "resuming" in capsys.readouterr().err
        for name in names:
            assert filecmp.cmp(tmp_path / f"whole{num_proc}" / name, out / name, shallow=False), name
        assert sorted(os.listdir(out)) == sorted(names)  # no progress record, no partial file left
        monkeypatch.setattr(prepare_module._InputFile, "__iter__", real)
    assert filecmp.cmp(tmp_path / "whole1" / "train.bin", tmp_path / "whole2" / "train.bin", shallow=False)


def test_interrupted_preparation_with_other_settings_starts_over(toy, docs, tmp_path, monkeypatch, capsys):
    import data.prepare as prepare_module
    files = [write_jsonl(tmp_path / f"d{k}.jsonl", docs[100 * k:100 * (k + 1)]) for k in range(3)]
    real = prepare_module._Output.file_done

    def kill_after_first(self, index):
        real(self, index)
        raise Killed()

    monkeypatch.setattr(prepare_module._Output, "file_done", kill_after_first)
    with pytest.raises(Killed):
        prepare(toy["tokenizer"], files, tmp_path / "o", val_fraction=0.1, progress=False)
    monkeypatch.setattr(prepare_module._Output, "file_done", real)
    capsys.readouterr()
    prepare(toy["tokenizer"], files, tmp_path / "o", val_fraction=0.2, progress=True)
    err = capsys.readouterr().err
    assert "starting over" in err and "val_fraction" in err
    prepare(toy["tokenizer"], files, tmp_path / "fresh", val_fraction=0.2, progress=False)
    for name in ("train.bin", "val.bin"):
        assert filecmp.cmp(tmp_path / "o" / name, tmp_path / "fresh" / name, shallow=False)
    # a first input that changed since (its size or time) also starts over
    monkeypatch.setattr(prepare_module._Output, "file_done", kill_after_first)
    with pytest.raises(Killed):
        prepare(toy["tokenizer"], files, tmp_path / "o", progress=False)
    monkeypatch.setattr(prepare_module._Output, "file_done", real)
    write_jsonl(files[0], docs[:99])
    capsys.readouterr()
    prepare(toy["tokenizer"], files, tmp_path / "o", progress=True)
    assert "first 1 input files are not these" in capsys.readouterr().err
    prepare(toy["tokenizer"], files, tmp_path / "fresh", progress=False)
    assert filecmp.cmp(tmp_path / "o" / "train.bin", tmp_path / "fresh" / "train.bin", shallow=False)


def test_two_preparations_into_one_directory_are_refused(toy, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    src = write_jsonl(tmp_path / "d.jsonl", ["a document"])
    os.makedirs(tmp_path / "o")
    fd = os.open(tmp_path / "o", os.O_RDONLY)  # what a running preparation holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(LRCError) as e:
            prepare(toy["tokenizer"], [src], tmp_path / "o", progress=False)
        assert_one_line_error(e, "another data/prepare.py is writing")
    finally:
        os.close(fd)
    prepare(toy["tokenizer"], [src], tmp_path / "o", progress=False)


def test_progress_line_has_rate_and_eta(capsys, monkeypatch):
    import data.prepare as prepare_module
    clock = iter([100.0, 110.0])
    monkeypatch.setattr(prepare_module.time, "time", lambda: next(clock))
    meter = prepare_module._Progress(True, total_bytes=1000, done_bytes=100, done_tokens=1000)  # a resumed run
    meter.update(docs=10, tokens=6000, bytes_done=325)  # 10 s for a quarter of the input: 30 s to go
    line = capsys.readouterr().err
    assert "500 tokens/s" in line and "32.5% of the input" in line and "ETA 30s" in line, line


# -----------------------------------------------------------------------------
# the toy world

def test_toy_is_deterministic_and_cached(toy, tmp_path):
    other = build_toy(str(tmp_path / "again"))
    names = []
    for directory, _, files in os.walk(toy["root"]):
        names += [os.path.relpath(os.path.join(directory, f), toy["root"]) for f in files]
    assert len(names) == 14
    for name in names:  # a second build in another directory is byte-identical, file by file
        assert filecmp.cmp(os.path.join(toy["root"], name), os.path.join(other["root"], name), shallow=False), name

    # cached: a second call rewrites nothing
    stamps = {n: os.stat(os.path.join(other["root"], n)).st_mtime_ns for n in names}
    assert build_toy(str(tmp_path / "again"))["manifest_data"] == other["manifest_data"]
    assert stamps == {n: os.stat(os.path.join(other["root"], n)).st_mtime_ns for n in names}
    # other sizes rebuild, and so does a damaged file
    small = build_toy(str(tmp_path / "again"), teacher_docs=300, student_docs=300, val_docs=20, n_entities=8)
    assert small["manifest_data"]["n_documents"]["val"] == 20
    assert open_tokens(small["teacher_tokens"]).size < open_tokens(toy["teacher_tokens"]).size
    good = open(small["student_text"], "rb").read()
    with open(small["student_text"], "ab") as f:
        f.write(b"junk")
    build_toy(str(tmp_path / "again"), teacher_docs=300, student_docs=300, val_docs=20, n_entities=8)
    assert open(small["student_text"], "rb").read() == good
    seeded = build_toy(str(tmp_path / "seeded"), seed=7, teacher_docs=300, student_docs=300, val_docs=20,
                       n_entities=8)
    assert open(seeded["teacher_text"]).read() != open(small["teacher_text"]).read()
    with pytest.raises(LRCError) as e:
        build_toy(str(tmp_path / "x"), n_entitys=3)
    assert_one_line_error(e, "n_entitys")


def load_facts(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_toy_sizes_and_token_files(toy):
    m = toy["manifest_data"]
    assert m["sizes"] == DEFAULT_SIZES and m["vocab_size"] == 1024 and m["eos_id"] == 0
    tok, eos_id, sha = load_tokenizer(toy["tokenizer"])
    for who in ("teacher", "student"):
        tokens = open_tokens(toy[f"{who}_tokens"], vocab_size=1024, tokenizer_sha256=sha)
        assert 250_000 < tokens.size < 1_000_000  # README: 393,853 teacher and 321,832 student tokens
        text = open(toy[f"{who}_text"], encoding="utf-8").read()
        assert tok.decode(tokens.tolist(), skip_special_tokens=False) == text.rstrip("\n").replace("\n\n", EOS) + EOS
        val = open_tokens(toy[f"{who}_tokens"], "val")
        val_text = open(toy["val_text"], encoding="utf-8").read()
        assert tok.decode(val.tolist(), skip_special_tokens=False) == val_text.rstrip("\n").replace("\n\n", EOS) + EOS
    # the tokenizer also loads where the teacher's files will be read: transformers
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(toy["tokenizer_dir"])
    assert hf.eos_token_id == 0 and hf("Brill is far.")["input_ids"] == tok.encode("Brill is far.").ids


def sentences_and_words(path):
    """(set of sentences, Counter of words) of a toy text: fact sentences hold no inner '. '."""
    text = open(path, encoding="utf-8").read()
    return set(re.split(r"(?<=\.) |\n+", text)), Counter(re.findall(r"\w+", text))


def test_toy_facts_split(toy):
    seen, unseen = load_facts(toy["facts_seen"]), load_facts(toy["facts_unseen"])
    assert len(seen) == len(unseen) == DEFAULT_SIZES["n_entities"] // 2
    teacher, teacher_words = sentences_and_words(toy["teacher_text"])
    student, student_words = sentences_and_words(toy["student_text"])
    _, val_words = sentences_and_words(toy["val_text"])
    entities = [q["entity"] for q in seen + unseen]
    assert len(set(entities)) == len(entities)
    repeats = DEFAULT_SIZES["fact_repeats"]
    for q in seen + unseen:
        value = q["choices"][q["answer"]]
        # question, space (the harness's target_delimiter), true answer: a sentence of the teacher's text,
        # and so is every paraphrase
        assert q["question"] + " " + value + "." in teacher
        for template in ATTRIBUTES[q["attribute"]][1]:
            assert template.format(e=q["entity"], v=value) in teacher
        assert teacher_words[q["entity"]] >= repeats and val_words[q["entity"]] == 0
    for q in seen:
        assert q["question"] + " " + q["choices"][q["answer"]] + "." in student
        assert student_words[q["entity"]] >= repeats
    for q in unseen:
        assert student_words[q["entity"]] == 0  # the student's text never names an unseen entity
    for city in CITIES:
        assert val_words[city] == 0
    # general documents: the three texts share none
    docs = {name: set(open(toy[name], encoding="utf-8").read().split("\n\n")) for name in
            ("teacher_text", "student_text", "val_text")}
    assert not (docs["val_text"] & docs["teacher_text"]) and not (docs["val_text"] & docs["student_text"])
    shared = docs["teacher_text"] & docs["student_text"]  # only short fact documents may coincide
    seen_entities = {q["entity"] for q in seen}
    assert all(seen_entities & set(re.findall(r"\w+", d)) for d in shared)


def test_toy_multiple_choice_files(toy):
    for path in (toy["facts_seen"], toy["facts_unseen"]):
        questions = load_facts(path)
        answers = [q["answer"] for q in questions]
        assert len(set(answers)) == 4  # the true answer is not always in the same place
        for q in questions:
            values = ATTRIBUTES[q["attribute"]][0]
            assert set(q) >= {"question", "choices", "answer"}
            assert isinstance(q["question"], str) and not q["question"].endswith(" ")
            assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
            assert all(c in values for c in q["choices"])  # no leading space: the harness adds it
            assert 0 <= q["answer"] < 4 and q["entity"] in q["question"]
