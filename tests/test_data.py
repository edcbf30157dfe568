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
    assert not [p for p in os.listdir(tmp_path / "o") if "tmp" in p]  # failed runs leave no temporary files
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
