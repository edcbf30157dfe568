"""Tests for convert.py: checkpoints of the train.py format become standard Hugging Face Qwen2
directories that transformers loads with no custom code and that give the training-time student's
logits (spec section 5).

Checkpoints are written by hand in the exact train.py format (OUT_DIR/ckpt_{step:08d}/model.safetensors
+ state.json), and one comes from a real few-step run of train.py. Tiny models only (hidden 32, 2
layers, vocab 320): the file runs in well under a minute on 2 CPU cores. The helpers here are reused by
test_eval.py.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lrc
from checkpoint import load_checkpoint, teacher_fingerprint
from convert import convert, parse_size
from test_lrc import randomize_

transformers = pytest.importorskip("transformers")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CORPUS = [
    "The sky is blue. The grass is green. Blood is red. Snow is white. Coal is black.",
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.",
    "Answer: the sun rises in the east and sets in the west. Water boils at one hundred degrees.",
    "A cat sat on the mat. A dog sat on the log. Birds fly, fish swim, and people walk.",
] * 4


# -----------------------------------------------------------------------------
# helpers (test_eval.py imports them)

def write_tokenizer(directory, vocab_size=320):
    """A small byte-level BPE (the kind Qwen uses) trained here, with <|endoftext|> as eos, plus the
    tokenizer_config.json and generation_config.json a teacher directory carries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "model_max_length": 128}, f)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos, "do_sample": False}, f)
    return tokenizer


def tiny_config(tied=False, hidden=32, theta=10000.0, vocab=320, layers=2, **kw):
    return lrc.Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=theta,
                           tie_word_embeddings=tied, max_position_embeddings=128,
                           extra={"bos_token_id": None, "eos_token_id": 0}, **kw)


def make_teacher(directory, seed=0, dtype=torch.float32, tokenizer=True, **kw):
    """A tiny random Qwen2 teacher directory, as a hub checkpoint looks (weights, config, tokenizer)."""
    torch.manual_seed(seed)
    model = randomize_(lrc.Qwen2(tiny_config(**kw)), seed).to(dtype)
    lrc.save_qwen2(model, str(directory))
    if tokenizer:
        write_tokenizer(str(directory))
    return lrc.load_qwen2(str(directory), dtype=torch.float32)


def make_lrc(teacher, student_hidden=16, tie_proj=True, seed=1):
    torch.manual_seed(seed)
    model = lrc.LRC(teacher, student_hidden, tie_proj=tie_proj)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # projections of a trained-looking size: init_std 0.02 makes near-zero students
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_((1 + 0.3 * torch.randn(p.shape, generator=g)) if "norm" in name
                        else 0.3 * torch.randn(p.shape, generator=g))
    return model


def write_checkpoint(out_dir, model, teacher_ref, step, tokens_seen=None, method="lrc", teacher_config=None,
                     teacher_dir=None):
    """OUT_DIR/ckpt_{step:08d} exactly as train.py writes it (the shared plan's format)."""
    ckpt = os.path.join(str(out_dir), f"ckpt_{step:08d}")
    os.makedirs(ckpt, exist_ok=True)
    if method == "lrc":
        tensors = {n: p.detach().float().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        student_config = model.student_config
        teacher_config = model.teacher.config.to_dict()
        extra = {"student_hidden": model.student_hidden, "tie_proj": model.tie_proj}
    else:
        tensors = {n: p.detach().float().contiguous() for n, p in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            tensors.pop("lm_head.weight")
        student_config = model.config
        extra = {"student_hidden": model.config.hidden_size, "tie_proj": None}
    save_file(tensors, os.path.join(ckpt, "model.safetensors"))
    save_file({}, os.path.join(ckpt, "optimizer.safetensors"))
    state = {"step": step, "tokens_seen": tokens_seen if tokens_seen is not None else step * 64,
             "method": method, "teacher": teacher_ref, "teacher_config": teacher_config,
             "teacher_fingerprint": teacher_fingerprint(teacher_dir or teacher_ref) if method != "scratch" else None,
             "student_config": student_config.to_dict(), **extra,
             "config": {"out_dir": str(out_dir), "method": method}, "rng": {}, "data": {}, "lrc_version": 1}
    with open(os.path.join(ckpt, "state.json"), "w") as f:
        json.dump(state, f)
    return ckpt


def hf_logits(directory, idx):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=idx).logits.float()


def read_json(path):
    with open(path) as f:
        return json.load(f)


def run_cli(script, *args, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


IDX = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(5))


# -----------------------------------------------------------------------------
# conversion of an LRC checkpoint, the ecosystem check

@pytest.mark.parametrize("teacher_tied, tie_proj", [(True, True), (False, False), (False, True)])
def test_converted_student_loads_in_transformers_with_training_logits(tmp_path, teacher_tied, tie_proj):
    teacher = make_teacher(tmp_path / "teacher", tied=teacher_tied)
    model = make_lrc(teacher, student_hidden=16, tie_proj=tie_proj)
    write_checkpoint(tmp_path / "run", model, str(tmp_path / "teacher"), step=30, tokens_seen=1920)
    out = str(tmp_path / "student")
    convert(str(tmp_path / "run"), out)

    config = read_json(os.path.join(out, "config.json"))
    assert config["hidden_size"] == 16 and config["head_dim"] == 8  # 16 // 4 heads would be 4: explicit
    assert config["tie_word_embeddings"] == (teacher_tied and tie_proj)  # spec section 3
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["model_type"] == "qwen2"
    assert config["torch_dtype"] == "float32"  # the teacher's dtype by default
    assert config["lrc"]["teacher"] == str(tmp_path / "teacher")
    assert (config["lrc"]["student_hidden"], config["lrc"]["tie_proj"]) == (16, tie_proj)
    assert (config["lrc"]["method"], config["lrc"]["step"], config["lrc"]["tokens_seen"]) == ("lrc", 30, 1920)
    assert config["lrc"]["source_checkpoint"].endswith("ckpt_00000030")
    with safe_open(os.path.join(out, "model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not config["tie_word_embeddings"])
        assert f.get_tensor("model.embed_tokens.weight").shape == (320, 16)

    with torch.no_grad():
        expected = model.student_logits(IDX)
    # transformers, with no custom code, gives the training-time student's logits
    torch.testing.assert_close(hf_logits(out, IDX), expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(lrc.load_qwen2(out)(IDX), expected, atol=1e-4, rtol=1e-4)


def test_tokenizer_and_generation_config_copied(tmp_path):
    teacher = make_teacher(tmp_path / "teacher")
    write_checkpoint(tmp_path / "run", make_lrc(teacher), str(tmp_path / "teacher"), step=1)
    out = convert(str(tmp_path / "run"), str(tmp_path / "student"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        with open(tmp_path / "teacher" / name, "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), name
    assert not os.path.exists(os.path.join(out, "vocab.json"))  # only files the teacher has
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, "tokenizer.json"))
    assert tokenizer.decode(tokenizer.encode("The sky is blue.")) == "The sky is blue."


def test_intermediate_and_latest_checkpoints(tmp_path):
    teacher = make_teacher(tmp_path / "teacher")
    early, late = make_lrc(teacher, seed=1), make_lrc(teacher, seed=2)
    write_checkpoint(tmp_path / "run", early, str(tmp_path / "teacher"), step=10)
    write_checkpoint(tmp_path / "run", late, str(tmp_path / "teacher"), step=200)  # step 200 > 10 by number
    os.makedirs(tmp_path / "run" / ".tmp-ckpt")  # an interrupted write: ignored
    with torch.no_grad():
        early_logits, late_logits = early.student_logits(IDX), late.student_logits(IDX)

    latest = convert(str(tmp_path / "run"), str(tmp_path / "latest"))
    inter = convert(str(tmp_path / "run" / "ckpt_00000010"), str(tmp_path / "inter"))
    assert read_json(os.path.join(latest, "config.json"))["lrc"]["step"] == 200
    assert read_json(os.path.join(inter, "config.json"))["lrc"]["step"] == 10
    torch.testing.assert_close(hf_logits(latest, IDX), late_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hf_logits(inter, IDX), early_logits, atol=1e-4, rtol=1e-4)

    loaded, state = load_checkpoint(str(tmp_path / "run" / "ckpt_00000010"))
    assert isinstance(loaded, lrc.LRC) and state["step"] == 10
    with torch.no_grad():
        torch.testing.assert_close(loaded.student_logits(IDX), early_logits, atol=1e-6, rtol=1e-6)


def test_sharded_output_above_threshold(tmp_path):
    teacher = make_teacher(tmp_path / "teacher", tied=False)
    model = make_lrc(teacher, tie_proj=False)
    write_checkpoint(tmp_path / "run", model, str(tmp_path / "teacher"), step=3)
    out = convert(str(tmp_path / "run"), str(tmp_path / "student"), max_shard_size="8KB")
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    index = read_json(os.path.join(out, "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(os.path.isfile(os.path.join(out, s)) for s in shards)
    for shard in shards:  # each shard respects the limit unless it holds a single larger tensor
        with safe_open(os.path.join(out, shard), framework="pt") as f:
            sizes = [f.get_tensor(k).numel() * 4 for k in f.keys()]
        assert sum(sizes) <= 8000 or len(sizes) == 1
    with torch.no_grad():
        expected = model.student_logits(IDX)
        torch.testing.assert_close(lrc.load_qwen2(out)(IDX), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hf_logits(out, IDX), expected, atol=1e-4, rtol=1e-4)


def test_parse_size_like_hugging_face():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6 and parse_size("8KB") == 8000 and parse_size("1234") == 1234
    with pytest.raises(lrc.LRCError, match="5GB"):
        parse_size("five gigs")


# -----------------------------------------------------------------------------
# refusing a teacher that is not the training teacher

def test_refuses_teacher_of_another_shape(tmp_path):
    teacher = make_teacher(tmp_path / "teacher")
    make_teacher(tmp_path / "wide", hidden=48)
    write_checkpoint(tmp_path / "run", make_lrc(teacher), str(tmp_path / "teacher"), step=5)
    with pytest.raises(lrc.LRCError, match=r"hidden_size=48.*hidden_size=32.*--teacher="):
        convert(str(tmp_path / "run"), str(tmp_path / "student"), teacher=str(tmp_path / "wide"))
    assert not os.path.exists(tmp_path / "student")


def test_refuses_teacher_of_other_recorded_identity(tmp_path):
    """Same shapes, so the tensors would load, but not the teacher training used (rope_theta differs)."""
    teacher = make_teacher(tmp_path / "teacher")
    make_teacher(tmp_path / "other", theta=500000.0)
    write_checkpoint(tmp_path / "run", make_lrc(teacher), str(tmp_path / "teacher"), step=5)
    result = run_cli("convert.py", f"--ckpt={tmp_path / 'run'}", f"--out={tmp_path / 'student'}",
                     f"--teacher={tmp_path / 'other'}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "rope_theta" in lines[0], result.stderr
    assert "--teacher=" in lines[0] and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "student")


def test_refuses_teacher_with_other_weights(tmp_path):
    """Same config (a base model and its instruct tune look alike): the recorded fingerprint tells."""
    teacher = make_teacher(tmp_path / "teacher", seed=0)
    make_teacher(tmp_path / "twin", seed=9)
    write_checkpoint(tmp_path / "run", make_lrc(teacher), str(tmp_path / "teacher"), step=5)
    with pytest.raises(lrc.LRCError, match=r"other weights.*--teacher="):
        load_checkpoint(str(tmp_path / "run"), teacher=str(tmp_path / "twin"))
    # the same teacher moved elsewhere is accepted
    os.rename(tmp_path / "teacher", tmp_path / "moved")
    model, state = load_checkpoint(str(tmp_path / "run"), teacher=str(tmp_path / "moved"))
    assert state["teacher_dir"] == str(tmp_path / "moved")


def test_refuses_checkpoint_tensors_that_do_not_fit(tmp_path):
    """state.json and model.safetensors disagree (another student width): one line, no traceback."""
    teacher = make_teacher(tmp_path / "teacher")
    ckpt = write_checkpoint(tmp_path / "run", make_lrc(teacher, student_hidden=16), str(tmp_path / "teacher"), 5)
    state = read_json(os.path.join(ckpt, "state.json"))
    state["student_hidden"] = 12
    with open(os.path.join(ckpt, "state.json"), "w") as f:
        json.dump(state, f)
    with pytest.raises(lrc.LRCError, match=r"shape \[32, 16\].*\[32, 12\]"):
        load_checkpoint(str(tmp_path / "run"))


def test_refuses_an_out_dir_it_would_destroy(tmp_path):
    teacher = make_teacher(tmp_path / "teacher")
    write_checkpoint(tmp_path / "run", make_lrc(teacher), str(tmp_path / "teacher"), step=5)
    for out in (tmp_path / "run", tmp_path, tmp_path / "teacher"):
        with pytest.raises(lrc.LRCError, match="choose a new directory"):
            convert(str(tmp_path / "run"), str(out))
    os.makedirs(tmp_path / "notes")
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(lrc.LRCError, match="not an earlier conversion"):
        convert(str(tmp_path / "run"), str(tmp_path / "notes"))
    assert os.listdir(tmp_path / "run" / "ckpt_00000005") and os.path.isfile(tmp_path / "teacher" / "config.json")
    # inside the training output (train.py suggests OUT_DIR/student_hf), and again over an earlier conversion
    convert(str(tmp_path / "run"), str(tmp_path / "run" / "student_hf"))
    convert(str(tmp_path / "run"), str(tmp_path / "run" / "student_hf"))
    assert read_json(tmp_path / "run" / "student_hf" / "config.json")["lrc"]["step"] == 5


def test_missing_checkpoint_is_one_line(tmp_path):
    os.makedirs(tmp_path / "empty")
    result = run_cli("convert.py", f"--ckpt={tmp_path / 'empty'}", f"--out={tmp_path / 'x'}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "ckpt_" in result.stderr


# -----------------------------------------------------------------------------
# the command line, a relative toy teacher, dtype, kd/scratch students

def test_cli_bf16_teacher_default_dtype_and_relative_teacher_path(tmp_path):
    """The toy layout, as a checkpoint older than teacher_path records it: the teacher lives in OUT_DIR/teacher
    and state.json records it relative to the directory training ran from; converting from another directory
    still finds it. The teacher is
    bfloat16, so the student is too unless --dtype says otherwise."""
    train_cwd = tmp_path / "project"
    out_dir = train_cwd / "out" / "toy"
    teacher = make_teacher(out_dir / "teacher", dtype=torch.bfloat16, tied=True)
    model = make_lrc(teacher)
    ckpt = write_checkpoint(out_dir, model, "out/toy/teacher", step=7, teacher_dir=out_dir / "teacher")
    state = read_json(os.path.join(ckpt, "state.json"))
    state["config"]["out_dir"] = "out/toy"  # as given on the training command line
    with open(os.path.join(ckpt, "state.json"), "w") as f:
        json.dump(state, f)

    result = run_cli("convert.py", f"--ckpt={out_dir}", "--out=student", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "hidden_size=16" in result.stdout and "step 7" in result.stdout
    assert "--model-impl transformers" in result.stdout.splitlines()[1]  # head_dim 8 != 16 / 4 heads
    config = read_json(tmp_path / "student" / "config.json")
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    with safe_open(tmp_path / "student" / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert os.path.isfile(tmp_path / "student" / "tokenizer.json")

    result = run_cli("convert.py", f"--ckpt={out_dir}", f"--out={tmp_path / 'fp32'}", "--dtype=fp32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():  # fp32 export of a bf16 teacher: merged in float32, equal to the float32 student
        expected = model.student_logits(IDX)
    torch.testing.assert_close(hf_logits(str(tmp_path / "fp32"), IDX), expected, atol=1e-4, rtol=1e-4)
    # the bf16 student is the same up to bf16 rounding
    bf16 = lrc.load_qwen2(str(tmp_path / "student"), dtype=torch.float32)
    with torch.no_grad():
        assert (bf16(IDX) - expected).abs().max() < 0.1 * expected.abs().max()


@pytest.mark.parametrize("method", ["kd", "scratch"])
def test_kd_and_scratch_checkpoints(tmp_path, method):
    make_teacher(tmp_path / "teacher")
    student = randomize_(lrc.Qwen2(tiny_config(hidden=24, tied=True)), seed=3)
    teacher_config = tiny_config().to_dict() if method == "kd" else None
    write_checkpoint(tmp_path / "run", student, str(tmp_path / "teacher"), step=4, method=method,
                     teacher_config=teacher_config)
    out = convert(str(tmp_path / "run"), str(tmp_path / "student"))
    config = read_json(os.path.join(out, "config.json"))
    assert config["lrc"]["method"] == method and config["hidden_size"] == 24
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    with torch.no_grad():
        torch.testing.assert_close(hf_logits(out, IDX), student(IDX), atol=1e-4, rtol=1e-4)


# -----------------------------------------------------------------------------
# a real (few-step) training run of train.py, converted: the ecosystem check

def test_real_training_run_converts_and_loads_in_transformers(tmp_path):
    import train
    from data.prepare import prepare
    make_teacher(tmp_path / "teacher", tied=True)
    with open(tmp_path / "text.txt", "w") as f:
        f.write("\n\n".join(CORPUS * 2))
    prepare(str(tmp_path / "teacher"), [str(tmp_path / "text.txt")], str(tmp_path / "tokens"),
            txt_split="paragraph", progress=False)
    summary = train.train({"out_dir": str(tmp_path / "run"), "teacher": str(tmp_path / "teacher"),
                           "data": str(tmp_path / "tokens"), "student_hidden": 16, "seq_len": 16,
                           "tokens_per_step": 64, "micro_batch_size": 4, "max_steps": 4, "save_interval": 2,
                           "eval_tokens": 0, "device": "cpu", "dtype": "fp32", "compile": False, "lr": 1e-2})
    assert summary["checkpoint"].endswith("ckpt_00000004")

    trained, state = load_checkpoint(str(tmp_path / "run"))
    assert state["step"] == 4 and state["tokens_seen"] == 256
    init = lrc.LRC(trained.teacher, 16)
    moved = [n for n, p in trained.named_parameters() if p.requires_grad
             and not torch.equal(p, dict(init.named_parameters())[n])]
    assert moved, "the checkpoint holds the initial projections"

    out = str(tmp_path / "student")
    result = run_cli("convert.py", f"--ckpt={tmp_path / 'run'}", f"--out={out}")
    assert result.returncode == 0, result.stderr
    config = read_json(os.path.join(out, "config.json"))
    assert (config["hidden_size"], config["head_dim"], config["tie_word_embeddings"]) == (16, 8, True)
    assert (config["lrc"]["step"], config["lrc"]["tokens_seen"]) == (4, 256)
    idx = torch.from_numpy(train_tokens(tmp_path / "tokens")[:40].astype("int64")).view(2, 20)
    with torch.no_grad():
        expected = trained.student_logits(idx)
    torch.testing.assert_close(hf_logits(out, idx), expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(lrc.load_qwen2(out)(idx), expected, atol=1e-4, rtol=1e-4)

    # the intermediate checkpoint of the same run converts too, to another student
    inter = convert(str(tmp_path / "run" / "ckpt_00000002"), str(tmp_path / "step2"))
    assert read_json(os.path.join(inter, "config.json"))["lrc"]["step"] == 2
    assert not torch.allclose(hf_logits(inter, idx), expected, atol=1e-4)


def train_tokens(directory):
    from data.prepare import open_tokens
    return open_tokens(str(directory), "train")


def test_a_file_where_a_directory_belongs_is_one_line(tmp_path):
    teacher = make_teacher(tmp_path / "teacher")
    write_checkpoint(tmp_path / "run", make_lrc(teacher), str(tmp_path / "teacher"), step=5)
    (tmp_path / "FILE").write_text("not a directory")
    for args, words in [([f"--ckpt={tmp_path / 'run'}", f"--out={tmp_path / 'FILE'}"], "is a file"),
                        ([f"--ckpt={tmp_path / 'run'}", f"--out={tmp_path / 'FILE' / 'x'}"], "inside the file"),
                        ([f"--ckpt={tmp_path / 'FILE'}", f"--out={tmp_path / 'x'}"], "is a file"),
                        ([f"--ckpt={tmp_path / 'run'}"], "required: --out")]:
        result = run_cli("convert.py", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and words in result.stderr, result.stderr
    assert (tmp_path / "FILE").read_text() == "not a directory"


# -----------------------------------------------------------------------------
# a run that travels: copied elsewhere (cp -r), used from another directory

def test_a_copied_run_converts_and_evaluates_from_anywhere(tmp_path, monkeypatch):
    """The toy layout, with a relative out_dir and the teacher inside the run directory: the copy finds its
    teacher through teacher_in_run once the original is gone, or retrained in place, and gives the
    original's logits."""
    import shutil
    import train
    from checkpoint import read_state, resolve_teacher
    from data.prepare import prepare
    project = tmp_path / "project"
    make_teacher(project / "out" / "run" / "teacher", tied=True)
    (project / "text.txt").write_text("\n\n".join(CORPUS * 2))
    prepare(str(project / "out" / "run" / "teacher"), [str(project / "text.txt")], str(project / "tokens"),
            txt_split="paragraph", progress=False)
    monkeypatch.chdir(project)
    train.train({"out_dir": "out/run", "teacher": "out/run/teacher", "data": "tokens", "student_hidden": 16,
                 "seq_len": 16, "tokens_per_step": 64, "micro_batch_size": 4, "max_steps": 2, "save_interval": 2,
                 "eval_tokens": 0, "device": "cpu", "dtype": "fp32", "compile": False, "lr": 1e-2})
    state = read_json(project / "out" / "run" / "ckpt_00000002" / "state.json")
    assert state["teacher"] == "out/run/teacher"  # as given, and where it was:
    assert state["teacher_path"] == str(project / "out" / "run" / "teacher") and state["teacher_in_run"] == "teacher"
    original = convert("out/run", str(tmp_path / "original_student"))

    shutil.copytree(project / "out" / "run", tmp_path / "x" / "copy")  # cp -r
    copy = str(tmp_path / "x" / "copy")
    copy_ckpt = os.path.join(copy, "ckpt_00000002")
    os.makedirs(tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path / "elsewhere")
    os.rename(project, tmp_path / "gone")  # the recorded absolute and relative paths lead nowhere
    assert resolve_teacher(copy_ckpt, read_state(copy_ckpt)) == os.path.join(copy, "teacher")
    os.rename(tmp_path / "gone", project)
    shutil.rmtree(project / "out" / "run" / "teacher")  # the original teacher retrained in place:
    make_teacher(project / "out" / "run" / "teacher", seed=9, tied=True)  # same config, other weights
    result = run_cli("convert.py", f"--ckpt={copy}", "--out=student", cwd=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        assert torch.equal(lrc.load_qwen2(str(tmp_path / "elsewhere" / "student"))(IDX),
                           lrc.load_qwen2(original)(IDX))
    (tmp_path / "val.txt").write_text("\n\n".join(CORPUS[:4]) + "\n")
    result = run_cli("eval_tiny.py", f"--model={copy}", f"--model={original}", f"--data={tmp_path / 'val.txt'}",
                     "--txt_split=paragraph", "--seq_len=16", "--prompt=The sky is", "--max_new_tokens=6",
                     f"--json={tmp_path / 'eval.json'}", cwd=tmp_path / "elsewhere")
    assert result.returncode == 0, result.stderr
    from_copy, from_original = read_json(tmp_path / "eval.json")["models"]
    assert from_copy["kind"] == "lrc step 2" and from_copy["tokenizer"] == os.path.join(copy, "teacher")
    assert from_copy["ppl"]["value"] == pytest.approx(from_original["ppl"]["value"], rel=1e-6)
    assert from_copy["generation"]["text"] == from_original["generation"]["text"]

    # no teacher anywhere: one line naming --teacher=DIR; passing it works
    os.rename(tmp_path / "x" / "copy" / "teacher", tmp_path / "teacher_alone")
    shutil.rmtree(project)
    result = run_cli("convert.py", f"--ckpt={copy}", f"--out={tmp_path / 's2'}", cwd=tmp_path / "elsewhere")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--teacher=DIR" in result.stderr
    assert "out/run/teacher" in result.stderr and "Traceback" not in result.stderr
    convert(copy, str(tmp_path / "s2"), teacher=str(tmp_path / "teacher_alone"))
    with torch.no_grad():
        assert torch.equal(lrc.load_qwen2(str(tmp_path / "s2"))(IDX), lrc.load_qwen2(original)(IDX))


def test_checkpoint_without_the_new_teacher_fields_and_a_hub_id(tmp_path, monkeypatch):
    """Checkpoints written before teacher_path existed resolve as before; a recorded hub id is left to the
    hub (here refused offline, with --teacher=DIR in the line)."""
    from checkpoint import resolve_teacher
    teacher = make_teacher(tmp_path / "teacher")
    ckpt = write_checkpoint(tmp_path / "run", make_lrc(teacher), str(tmp_path / "teacher"), step=3)
    state = read_json(os.path.join(ckpt, "state.json"))
    assert "teacher_path" not in state and resolve_teacher(ckpt, state) == str(tmp_path / "teacher")
    assert resolve_teacher(ckpt, {"teacher": "Qwen/Qwen2.5-3B-Instruct"}) == "Qwen/Qwen2.5-3B-Instruct"
    assert resolve_teacher(ckpt, state, explicit="elsewhere/model") == "elsewhere/model"
    # recorded as a local directory at training time: never mistaken for a hub id
    with pytest.raises(lrc.LRCError, match="--teacher=DIR"):
        resolve_teacher(ckpt, {"teacher": "toy/teacher", "teacher_path": "/nowhere/toy/teacher"})
    def offline(ref):
        raise lrc.LRCError(f"could not download {ref!r} from the Hugging Face hub")
    monkeypatch.setattr(lrc, "resolve_checkpoint", offline)
    state["teacher"] = "Qwen/Qwen2.5-3B-Instruct"
    with open(os.path.join(ckpt, "state.json"), "w") as f:
        json.dump(state, f)
    with pytest.raises(lrc.LRCError, match=r"could not download.*--teacher=DIR"):
        load_checkpoint(ckpt)


def test_vllm_note_for_a_head_dim_vllm_would_ignore():
    from convert import vllm_note
    note = vllm_note({"hidden_size": 16, "num_attention_heads": 4, "head_dim": 8}, "students/s")
    assert "--model-impl transformers" in note and "head_dim=8" in note and "\n" not in note
    assert vllm_note({"hidden_size": 24, "num_attention_heads": 4, "head_dim": 6}, "s") is None
