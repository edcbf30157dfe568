"""train.py: configuration, the three methods, checkpoints and exact resume, DDP equivalence, torch.compile,
and one-line refusals of bad input. Tiny teachers and token files are written here directly, so each run
takes a second or two on a CPU."""
import glob
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import lrc
import train
from data import loader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64


def make_teacher(path, hidden=32, seed=0, tokenizer_bytes=b'{"toy": "tokenizer"}', layers=2):
    torch.manual_seed(seed)
    config = lrc.Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             rope_theta=10000.0, max_position_embeddings=128)
    lrc.save_qwen2(lrc.Qwen2(config), path)
    with open(os.path.join(path, "tokenizer.json"), "wb") as f:  # only its sha256 matters to train.py
        f.write(tokenizer_bytes)
    return path


def make_data(path, tokenizer_bytes=b'{"toy": "tokenizer"}', n=6000, bad_id=None, vocab=VOCAB):
    """A learnable stream (a noisy deterministic successor rule) as uint32 token files + meta.json."""
    rng = np.random.default_rng(0)
    tokens = np.zeros(n, dtype=np.int64)
    for i in range(1, n):
        tokens[i] = (5 * tokens[i - 1] + 3) % VOCAB if rng.random() > 0.1 else rng.integers(VOCAB)
    if bad_id is not None:
        tokens[n // 2] = bad_id
    os.makedirs(path, exist_ok=True)
    tokens[: n - 1000].astype("<u4").tofile(os.path.join(path, "train.bin"))
    tokens[n - 1000:].astype("<u4").tofile(os.path.join(path, "val.bin"))
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"vocab_size": vocab, "eos_id": 0, "tokenizer_sha256": hashlib.sha256(tokenizer_bytes).hexdigest(),
                   "n_tokens": {"train": n - 1000, "val": 1000}}, f)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread only adds synchronisation, which a busy machine makes slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return {"teacher": make_teacher(str(root / "teacher")), "data": make_data(str(root / "data")), "root": root}


def config(world, out_dir, **overrides):
    cfg = dict(teacher=world["teacher"], data=world["data"], out_dir=str(out_dir), student_hidden=16, seq_len=16,
               tokens_per_step=128, micro_batch_size=4, max_steps=6, lr=1e-2, warmup_ratio=0.0, log_interval=2,
               eval_tokens=0, save_interval=0, keep_last=2)
    cfg.update(overrides)
    return cfg


def tensors(ckpt, file="model.safetensors"):
    return load_file(os.path.join(ckpt, file))


def assert_one_line(error):
    message = str(error.value)
    assert message and "\n" not in message
    return message


# -----------------------------------------------------------------------------
# configuration

def test_cli_and_config_files(tmp_path):
    cfg = train.parse_args(["--lr=1", "--tie_proj=0", "--compile=True", "--max_steps=1e3",
                            "--teacher=Qwen/Qwen2.5-3B-Instruct", "--out_dir=123", "--resume"])
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)        # int accepted for a float key
    assert cfg["tie_proj"] is False and cfg["compile"] is True and cfg["resume"] is True
    assert cfg["max_steps"] == 1000 and isinstance(cfg["max_steps"], int)
    assert cfg["teacher"] == "Qwen/Qwen2.5-3B-Instruct" and cfg["out_dir"] == "123"
    # the later of max_steps / max_tokens wins
    assert train.parse_args(["--max_tokens=1e6"])["max_steps"] is None
    file = tmp_path / "mine.py"
    file.write_text("import math\nstudent_hidden = 48\nlr = 2e-4\n_private = 1\n")
    cfg = train.parse_args([str(file), "--lr=3e-4"])
    assert cfg["student_hidden"] == 48 and cfg["lr"] == 3e-4      # later arguments override earlier ones

    for argv, expected in [(["--lrr=1"], "did you mean 'lr'"), (["--lr=abc"], "lr='abc'"),
                           (["--max_steps=True"], "max_steps=True"), (["--seq_len=1.5"], "seq_len=1.5"),
                           (["--method=distil"], "not one of"), (["--tie_proj=2"], "tie_proj=2"),
                           (["--lr"], "--key=value"), (["stray"], "unexpected argument"),
                           ([str(tmp_path / "missing.py")], "does not exist")]:
        with pytest.raises(lrc.LRCError) as e:
            train.parse_args(argv)
        assert expected in assert_one_line(e), (argv, str(e.value))
    bad = tmp_path / "bad.py"
    bad.write_text("student_hiden = 48\n")
    with pytest.raises(lrc.LRCError, match="did you mean 'student_hidden'"):
        train.parse_args([str(bad)])
    bad.write_text("lr = 'fast'\n")
    with pytest.raises(lrc.LRCError, match="lr='fast'"):
        train.parse_args([str(bad)])
    with pytest.raises(lrc.LRCError, match="both max_steps"):
        train.make_config({"max_steps": 10, "max_tokens": 1e6})


def test_presets_match_the_released_models():
    c = train.parse_args([os.path.join(REPO, "config", "lrc_1.7b.py")])
    assert (c["teacher"], c["student_hidden"], c["tie_proj"], c["alpha"], c["tau"]) == \
        ("Qwen/Qwen2.5-3B-Instruct", 1200, True, 0.5, 40.0)
    assert (c["lr"], c["warmup_ratio"], c["decay"], c["seq_len"], c["tokens_per_step"]) == \
        (6.7e-5, 0.005, "linear", 2048, 32768)
    assert (c["beta1"], c["beta2"], c["grad_clip"], c["max_tokens"], c["max_steps"]) == (0.9, 0.999, 1.0, 20e9, None)
    assert c["tokens_per_step"] % (c["seq_len"] * c["micro_batch_size"] * 8) == 0   # one 8-GPU node
    # the card's Mixed-1.1: Fineweb-Edu 20B and OpenHermes 2.5 450M tokens, drawn from by those shares
    assert c["data"] == {"tokens/fineweb_edu": pytest.approx(20 / 20.45), "tokens/openhermes": pytest.approx(0.45 / 20.45)}
    c = train.parse_args([os.path.join(REPO, "config", "lrc_4b.py")])
    assert (c["teacher"], c["student_hidden"], c["tie_proj"], c["max_tokens"]) == \
        ("Qwen/Qwen2.5-7B-Instruct", 2048, False, 18e9)
    assert c["tokens_per_step"] % (c["seq_len"] * c["micro_batch_size"] * 8) == 0
    assert c["clone_attn_out"] == "teacher"  # (lrc_4b.py)
    # LRC-1.5B, the reference README's command: Llama-3.2-3B-Instruct, 3 x 2048 tokens on each of 8 GPUs
    c = train.parse_args([os.path.join(REPO, "config", "lrc_1.5b.py")])
    assert (c["teacher"], c["student_hidden"], c["tie_proj"], c["alpha"], c["tau"], c["clone_attn_out"]) == \
        ("meta-llama/Llama-3.2-3B-Instruct", 1536, True, 0.2, 40.0, "teacher")
    assert (c["lr"], c["warmup_ratio"], c["seq_len"], c["max_steps"], c["max_tokens"], c["grad_clip"]) == \
        (1e-4, 0.005, 2048, 208000, None, 1.0)
    assert c["tokens_per_step"] == 3 * 2048 * 8 and train.schedule_length(c, 8)[0] * c["micro_batch_size"] == 3
    # the recipes use the official code's attention-output term, the toy keeps the paper's
    assert train.parse_args([os.path.join(REPO, "config", "lrc_1.7b.py")])["clone_attn_out"] == "teacher"
    c = train.parse_args([os.path.join(REPO, "config", "sft_ultrachat.py")])  # the LRC-4B-SFT card's setting
    assert (c["method"], c["lr"], c["max_tokens"]) == ("sft", 1e-5, 0.2e9)
    toy = train.parse_args([os.path.join(REPO, "config", "toy.py")])
    assert toy == train.DEFAULTS  # the toy preset is what `python train.py` runs
    assert toy["clone_attn_out"] == "student"


@pytest.mark.parametrize("clone_attn_out", ["student", "teacher"])
def test_clone_attn_out_reaches_the_model(world, clone_attn_out):
    cfg = train.make_config(config(world, "unused", clone_attn_out=clone_attn_out))
    run = type("Run", (), {"device": torch.device("cpu"), "compute_dtype": torch.float32})()
    model = train.build_model(cfg, world["teacher"], None, run)
    assert isinstance(model, lrc.LRC) and model.clone_attn_out == clone_attn_out
    with pytest.raises(lrc.LRCError):
        train.make_config({"clone_attn_out": "official"})


def test_schedule_warmup_then_decay():
    cfg = train.make_config({"lr": 1.0, "min_lr": 0.1, "warmup_ratio": 0.1})
    lrs = [train.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)          # 10 warmup steps
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] > 0.1
    assert lrs[55] == pytest.approx(0.1 + 0.9 * (1 - 45 / 90))                     # linear
    cos = [train.lr_at(s, 100, dict(cfg, decay="cosine")) for s in range(100)]
    assert cos[55] == pytest.approx(0.55) and cos[30] > lrs[30]


def mixture(*token_arrays, weights=None):
    sources = [loader.TokenData(f"src{i}", {}, tokens, None, {}) for i, tokens in enumerate(token_arrays)]
    weights = weights or [1.0] * len(sources)
    return loader.Mixture("x", sources, [w / sum(weights) for w in weights], [f"src{i}" for i in range(len(sources))])


def windows_read(tokens, steps, world_size=1, grad_accum=1, mbs=2, seq_len=4, sampler="epoch", start=(0, None),
                 seed=3, data=None):
    """Every window (source, start) read in `steps`, in the order of the global batch (micro-step, then rank);
    for one source just the starts."""
    data = data or mixture(tokens)
    ranks = [loader.TokenWindows(data, seed, seq_len, mbs, r, world_size, grad_accum, torch.device("cpu"),
                                 sampler, start) for r in range(world_size)]
    read = [(int(j), int(s)) for step in steps for m in range(grad_accum) for w in ranks
            for j, s in zip(*w.starts(step, m))]
    return [s for _, s in read] if len(data.sources) == 1 else read


def test_epoch_sampler_reads_every_window_once_per_pass():
    tokens = np.arange(4 * 12 + 1)                          # 12 non-overlapping windows of seq_len + 1 = 5 tokens
    read = windows_read(tokens, range(12))                  # 12 steps x 2 windows = two passes
    first, second = read[:12], read[12:]
    assert sorted(first) == sorted(second) == list(range(0, 48, 4))   # each window once per pass
    assert first != second and first != sorted(first)       # shuffled, and differently in each pass
    w = loader.TokenWindows(mixture(tokens), 3, 4, 2, 0, 1, 1, torch.device("cpu"))
    assert w.epoch(6) == [1.0] and w.epoch(9) == [1.5]
    x, y = w.batch(0, 0)
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (2, 4)     # y is x shifted by one token
    # the old sampler, for comparison: with replacement, so a pass can repeat and miss windows
    random = windows_read(tokens, range(6), sampler="random")
    assert random == windows_read(tokens, range(6), sampler="random") and random != first


def test_epoch_sampler_is_the_same_for_any_world_size_and_after_resume():
    tokens = np.arange(4 * 50 + 1)
    one = windows_read(tokens, range(10), world_size=1, grad_accum=4)
    assert windows_read(tokens, range(10), world_size=2, grad_accum=2) == one
    assert windows_read(tokens, range(10), world_size=4, grad_accum=1) == one
    # resumed at step 6 with the count its checkpoint records (6 steps x 8 windows), as train.py does
    assert windows_read(tokens, range(6, 10), world_size=2, grad_accum=2, start=(6, [48])) == one[48:]
    # a resumed run may change the batch: the count continues where the checkpoint left it
    assert windows_read(tokens, range(6, 8), world_size=1, grad_accum=2, start=(6, [48])) == one[48:56]
    # the old sampler, one source, is exactly the draws it always made
    random = windows_read(tokens, range(3), grad_accum=4, sampler="random")
    assert random == [int(s) for step in range(3) for s in loader.window_offsets(3, step, 8, len(tokens), 4)]


def test_a_mixture_draws_by_weight_and_keeps_a_pass_per_source():
    a, b = np.arange(4 * 30 + 1), np.arange(4 * 10 + 1)     # 30 and 10 windows
    data = mixture(a, b, weights=[3, 1])
    read = windows_read(None, range(100), grad_accum=4, data=data)                # 800 windows
    share = sum(j == 1 for j, _ in read) / len(read)
    assert abs(share - 0.25) < 0.05                                                # by weight
    for j, n in ((0, 30), (1, 10)):
        mine = [s for k, s in read if k == j]
        passes = [mine[i:i + n] for i in range(0, len(mine) - n + 1, n)]
        assert len(passes) >= 5 and all(sorted(p) == list(range(0, 4 * n, 4)) for p in passes)  # once per pass
    assert windows_read(None, range(100), world_size=2, grad_accum=2, data=data) == read   # any world size
    w = loader.TokenWindows(data, 3, 4, 2, 0, 1, 4, torch.device("cpu"))
    counts = w.windows_before(60)                                                  # resume from step 60's counts
    assert windows_read(None, range(60, 100), grad_accum=4, data=data, start=(60, counts.tolist())) == read[480:]
    assert sum(counts) == 480 and w.epoch(60) == [counts[0] / 30, counts[1] / 10]


def test_window_sampling_is_a_pure_function_of_seed_and_step():
    a = loader.window_offsets(1, 5, 8, 1000, 16)
    assert np.array_equal(a, loader.window_offsets(1, 5, 8, 1000, 16))
    assert not np.array_equal(a, loader.window_offsets(1, 6, 8, 1000, 16))
    assert a.min() >= 0 and a.max() <= 1000 - 17


# -----------------------------------------------------------------------------
# the three methods and the checkpoint format

def test_lrc_run_writes_the_checkpoint_format(world, tmp_path, capsys):
    summary = train.train(config(world, tmp_path, max_steps=12, log_interval=4, eval_tokens=256,
                                 wandb_project="nope"))
    out = capsys.readouterr().out
    assert "step 12/12 | epoch" in out and "tok/s" in out and "python convert.py --ckpt=" in out
    assert "wandb is not installed" in out or "wandb" in sys.modules
    assert summary["last"]["loss"] < summary["first"]["loss"]
    assert summary["last"]["clone"] < summary["first"]["clone"]
    ckpt = os.path.join(str(tmp_path), "ckpt_00000012")
    assert summary["checkpoint"] == ckpt and sorted(os.listdir(ckpt)) == \
        ["model.safetensors", "optimizer.safetensors", "state.json"]
    umask = os.umask(0)
    os.umask(umask)  # readable as the umask allows, like any directory this process makes (another user resumes it)
    assert all(os.stat(os.path.join(ckpt, f)).st_mode & 0o777 == 0o666 & ~umask for f in os.listdir(ckpt))
    assert os.stat(ckpt).st_mode & 0o777 == 0o777 & ~umask
    weights = tensors(ckpt)
    teacher = lrc.load_qwen2(world["teacher"])
    model = lrc.LRC(teacher, 16)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(weights) == expected and all(t.dtype == torch.float32 for t in weights.values())
    opt = tensors(ckpt, "optimizer.safetensors")
    assert {k.partition(".")[2] for k in opt} == expected and {k.partition(".")[0] for k in opt} == \
        {"exp_avg", "exp_avg_sq", "step"}
    state = json.load(open(os.path.join(ckpt, "state.json")))
    assert state["step"] == 12 and state["tokens_seen"] == 12 * 128 and state["method"] == "lrc"
    assert state["sampler"] == "epoch" and state["data"]["sources"][0]["windows_read"] == 12 * 128 // 16
    assert state["data"]["sources"][0]["epoch"] == pytest.approx(12 * 8 / ((5000 - 1) // 16))
    assert state["teacher"] == world["teacher"] and state["lrc_version"] == 1
    assert state["teacher_config"] == teacher.config.to_dict()
    assert state["student_config"] == model.student_config.to_dict()
    assert state["config"]["student_hidden"] == 16 and "torch_cpu" in state["rng"] and state["data"]["next_step"] == 12
    rows = [json.loads(line) for line in open(os.path.join(str(tmp_path), "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 4, 8, 12] and "val_lm" in rows[-1]
    # the checkpoint reproduces the trained student: load it into a fresh LRC and compare losses
    with torch.no_grad():
        model.load_state_dict({**teacher_state(model), **weights})
        x = torch.randint(0, VOCAB, (2, 16))
        assert torch.isfinite(model.student_logits(x)).all()


def teacher_state(model):
    return {n: p for n, p in model.state_dict().items() if n.startswith("teacher.")}


@pytest.mark.parametrize("method", ["kd", "scratch"])
def test_baselines_run_and_learn(world, tmp_path, method):
    summary = train.train(config(world, tmp_path, method=method, max_steps=12, log_interval=4, lr=3e-3))
    first, last = summary["first"], summary["last"]
    assert last["loss"] < first["loss"] and last["lm"] < first["lm"]
    assert last["clone"] == 0.0 and (last["kl"] == 0.0) == (method == "scratch")
    weights = tensors(summary["checkpoint"])
    # an ordinary Qwen2 of the exported shape (hidden 16, tied like the teacher), Hugging Face names
    assert weights["model.embed_tokens.weight"].shape == (VOCAB, 16) and "lm_head.weight" not in weights
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (32, 16)   # 4 heads x head_dim 8
    state = json.load(open(os.path.join(summary["checkpoint"], "state.json")))
    assert state["student_config"]["hidden_size"] == 16 and state["student_config"]["head_dim"] == 8
    assert (state["teacher_config"] is None) == (method == "scratch")


# -----------------------------------------------------------------------------
# checkpoints: exact resume, atomic saves, keep_last

@pytest.mark.parametrize("generate", ["step", "micro_step"])  # 2 micro-steps per step: the weights made once, or twice
def test_resume_is_bit_identical(world, tmp_path, generate, capsys):
    straight = train.train(config(world, tmp_path / "a", max_steps=8, save_interval=4, generate=generate))
    assert f"| generate {generate}\n" in capsys.readouterr().out
    train.train(config(world, tmp_path / "b", max_steps=8, stop_step=4, generate=generate))
    resumed = train.train(config(world, tmp_path / "b", max_steps=8, resume=True, generate=generate))
    assert resumed["step"] == 8
    for file in ("model.safetensors", "optimizer.safetensors"):
        a, b = tensors(straight["checkpoint"], file), tensors(resumed["checkpoint"], file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    # and it really trained on: the step-4 checkpoint differs from the final one
    mid = tensors(os.path.join(str(tmp_path / "a"), "ckpt_00000004"))
    assert not torch.equal(mid["P_emb"], tensors(straight["checkpoint"])["P_emb"])


def test_a_crash_during_a_save_leaves_the_previous_checkpoint(world, tmp_path, monkeypatch):
    straight = train.train(config(world, tmp_path / "straight", max_steps=6))
    calls = {"n": 0}
    real_save = checkpoint.save_file

    def failing_save(tensors_, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # model.safetensors of the second checkpoint (step 4)
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise OSError("disk full")
        return real_save(tensors_, path, metadata=metadata)

    out = tmp_path / "crash"
    monkeypatch.setattr(checkpoint, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train.train(config(world, out, max_steps=6, save_interval=2))
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(out))] == ["ckpt_00000002"]
    assert not glob.glob(str(out / ".tmp-*"))
    os.makedirs(out / ".tmp-ckpt-killed")  # what a kill -9 mid-save would leave: ignored, then cleaned up
    checkpoint.read_checkpoint(checkpoint.latest_checkpoint(str(out)))
    resumed = train.train(config(world, out, max_steps=6, resume=True))
    assert not glob.glob(str(out / ".tmp-*"))
    a, b = tensors(straight["checkpoint"]), tensors(resumed["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keep_last(world, tmp_path):
    train.train(config(world, tmp_path, max_steps=5, save_interval=1, keep_last=2))
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))] == ["ckpt_00000004", "ckpt_00000005"]


# -----------------------------------------------------------------------------
# bad input: a one-line error, nothing lost

def test_missing_or_unreadable_teacher(world, tmp_path):
    with pytest.raises(lrc.LRCError) as e:
        train.train(config(world, tmp_path / "out", teacher=str(tmp_path / "nowhere")))
    assert "nowhere" in assert_one_line(e)
    broken = make_teacher(str(tmp_path / "broken"))
    file = os.path.join(broken, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(lrc.LRCError) as e:
        train.train(config(world, tmp_path / "out", teacher=broken))
    assert "could not read the teacher" in assert_one_line(e)


def test_data_from_another_tokenizer(world, tmp_path, capsys):
    other = make_data(str(tmp_path / "other"), tokenizer_bytes=b"another tokenizer")
    with pytest.raises(lrc.LRCError) as e:
        train.train(config(world, tmp_path / "out", data=other, strict_tokenizer=True))
    assert "another tokenizer.json" in assert_one_line(e)
    summary = train.train(config(world, tmp_path / "out", data=other, max_steps=1))  # default: a warning
    assert "warning:" in capsys.readouterr().out and summary["step"] == 1


def test_token_ids_out_of_range(world, tmp_path):
    with pytest.raises(lrc.LRCError) as e:
        train.train(config(world, tmp_path / "out", data=make_data(str(tmp_path / "d1"), bad_id=VOCAB)))
    assert f"token id {VOCAB}" in assert_one_line(e)
    with pytest.raises(lrc.LRCError) as e:  # meta.json says a bigger vocabulary
        train.train(config(world, tmp_path / "out", data=make_data(str(tmp_path / "d2"), vocab=VOCAB + 1)))
    assert_one_line(e)


def test_batch_must_divide(world, tmp_path):
    with pytest.raises(lrc.LRCError) as e:
        train.train(config(world, tmp_path, tokens_per_step=100))
    assert "not a multiple" in assert_one_line(e)


def test_resume_refuses_another_teacher_or_student(world, tmp_path):
    out = tmp_path / "out"
    train.train(config(world, out, max_steps=2))
    before = sorted(os.listdir(out))
    other_shape = make_teacher(str(tmp_path / "wide"), hidden=48)
    other_weights = make_teacher(str(tmp_path / "reseeded"), seed=1)
    for overrides, expected in [({"student_hidden": 24}, "student_hidden=16"),
                                ({"teacher": other_shape}, "different teacher (head_dim 8 in the checkpoint, 12 now)"),
                                ({"teacher": other_weights}, "other teacher weights"),
                                ({"method": "kd"}, "method='lrc'"),
                                ({"sampler": "random"}, "sampler='epoch', this run has 'random'")]:
        with pytest.raises(lrc.LRCError) as e:
            train.train(config(world, out, max_steps=4, resume=True, **overrides))
        assert expected in assert_one_line(e), str(e.value)
    assert sorted(os.listdir(out)) == before
    with pytest.raises(lrc.LRCError, match="already holds checkpoints"):
        train.train(config(world, out, overwrite=False))
    with pytest.raises(lrc.LRCError, match="no checkpoint"):
        train.train(config(world, tmp_path / "empty", resume=True))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(world, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_forward = lrc.LRC.forward
    calls = {"n": 0}

    def blow_up_at_step_5(self, idx, targets):  # 2 micro-steps per step: calls 9 and 10 are step 5
        calls["n"] += 1
        loss, parts = real_forward(self, idx, targets)
        return (loss * float("nan"), parts) if calls["n"] >= 9 else (loss, parts)

    monkeypatch.setattr(lrc.LRC, "forward", blow_up_at_step_5)
    with pytest.raises(lrc.LRCError) as e:
        train.train(config(world, out, max_steps=8, save_interval=2, log_interval=100))
    message = assert_one_line(e)
    good = os.path.join(str(out), "ckpt_00000004")
    assert message.startswith(f"non-finite loss at step 5; the last good checkpoint is {good}")
    assert checkpoint.list_checkpoints(str(out)) == [os.path.join(str(out), "ckpt_00000002"), good]
    assert all(torch.isfinite(t).all() for t in tensors(good).values())


def test_command_line_errors_are_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "train.py", f"--teacher={tmp_path / 'nowhere'}", "--data=x",
                             f"--out_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


# -----------------------------------------------------------------------------
# distributed and compiled

def test_two_processes_match_one_with_the_same_global_batch(world, tmp_path):
    one = train.train(config(world, tmp_path / "one", max_steps=4))         # grad_accum 2
    args = [f"--{k}={v}" for k, v in config(world, tmp_path / "two", max_steps=4).items()]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "x 2 ranks x 1 micro-steps" in result.stdout
    assert result.stdout.count("step 4/4 |") == 1                           # only rank 0 logs
    a = tensors(one["checkpoint"])
    b = tensors(os.path.join(str(tmp_path / "two"), "ckpt_00000004"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_compiled_steps_on_cpu(world, tmp_path):
    torch._dynamo.reset()
    teacher = make_teacher(str(tmp_path / "teacher"), layers=1)  # one layer: fewer kernels to build
    summary = train.train(config(world, tmp_path / "out", teacher=teacher, compile=True, max_steps=3, log_interval=1,
                                 tokens_per_step=64))
    torch.manual_seed(1337)  # train() seeds with cfg["seed"] before building the model: the same initial P_emb
    init = lrc.LRC(lrc.load_qwen2(teacher), 16)
    trained = tensors(summary["checkpoint"])
    assert all(np.isfinite(summary["last"][k]) for k in ("loss", "kl", "lm", "clone"))
    assert not torch.equal(trained["P_emb"], init.P_emb.detach())


# -----------------------------------------------------------------------------
# the zero-argument toy path, shrunk: toy corpus, toy tokenizer, a teacher trained by method=scratch, cached

def test_toy_path_builds_caches_and_distils(tmp_path, capsys):
    tiny = dict(out_dir=str(tmp_path), toy_teacher_hidden=32, toy_teacher_layers=1, toy_teacher_ffn=64,
                toy_teacher_heads=2, toy_teacher_kv_heads=1, toy_teacher_steps=2, max_steps=2, seq_len=32,
                tokens_per_step=128, micro_batch_size=4, student_hidden=8, eval_tokens=256, log_interval=1)
    summary = train.train(tiny)
    out = capsys.readouterr().out
    assert "toy teacher: training" in out and "[teacher] step 2/2" in out and "step 2/2 | epoch" in out
    teacher = os.path.join(str(tmp_path), "teacher")
    assert summary["teacher"] == teacher and os.path.isfile(os.path.join(teacher, "tokenizer.json"))
    assert lrc.load_qwen2(teacher).config.hidden_size == 32
    data = os.path.join(str(tmp_path), "data")  # the next eval command: the toy val text and both fact sets
    assert (f"--data={os.path.join(data, 'val.txt')} --txt_split=paragraph --mc={os.path.join(data, 'facts_seen.jsonl')} "
            f"--mc={os.path.join(data, 'facts_unseen.jsonl')}") in out
    train.train(dict(tiny, max_steps=1))
    assert "toy teacher: reusing" in capsys.readouterr().out


def test_activation_checkpointing_changes_nothing_but_memory(world, tmp_path):
    plain = train.train(config(world, tmp_path / "plain", max_steps=2))
    recomputed = train.train(config(world, tmp_path / "ckpt", max_steps=2, activation_checkpointing=True))
    a, b = tensors(plain["checkpoint"]), tensors(recomputed["checkpoint"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    with pytest.raises(lrc.LRCError, match="method=lrc only"):
        train.train(config(world, tmp_path / "kd", method="kd", activation_checkpointing=True))


# -----------------------------------------------------------------------------
# bad input is refused before expensive work, with one line

def test_an_out_dir_that_is_a_file_is_one_line(world, tmp_path):
    file = tmp_path / "FILE"
    file.write_text("not a directory")
    for out_dir, words in [(file, "is a file"), (file / "sub", "is inside the file")]:
        with pytest.raises(lrc.LRCError) as e:
            train.train(config(world, out_dir))
        assert words in assert_one_line(e) and "--out_dir=DIR" in str(e.value)
    result = subprocess.run([sys.executable, "train.py", f"--out_dir={file}"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "is a file" in result.stderr


def test_broken_data_is_refused_before_the_toy_teacher_is_trained(tmp_path):
    broken = tmp_path / "tokens"
    broken.mkdir()                                            # a directory without meta.json
    with pytest.raises(lrc.LRCError) as e:
        train.train(dict(out_dir=str(tmp_path / "out"), data=str(broken)))  # teacher='toy', the default
    assert "no meta.json" in assert_one_line(e)
    assert not os.path.exists(tmp_path / "out" / "teacher") and not os.path.exists(tmp_path / "out" / "teacher_run")
    # and a vocabulary the toy teacher cannot hold is refused from its recipe, still before training it
    with pytest.raises(lrc.LRCError) as e:
        train.train(dict(out_dir=str(tmp_path / "out"), data=make_data(str(tmp_path / "big"), vocab=5000)))
    assert "5000-token vocabulary" in assert_one_line(e)
    assert not os.path.exists(tmp_path / "out" / "teacher")


# -----------------------------------------------------------------------------
# mixtures of prepared directories, and SFT on chat data (assistant tokens only)

def test_a_mixture_trains_by_weight_logs_each_source_and_resumes_exactly(world, tmp_path, capsys):
    other = make_data(str(tmp_path / "other"))
    mix = {world["data"]: 0.7, other: 0.3}
    assert train.parse_args([f"--data={mix!r}"])["data"] == mix                     # a dict literal on the CLI
    straight = train.train(config(world, tmp_path / "a", data=mix, max_steps=6, save_interval=3))
    out = capsys.readouterr().out
    assert "data data 70.0% + other 30.0%" in out and "other " in out and " tok ep " in out
    rows = [json.loads(line) for line in open(os.path.join(straight["out_dir"], "metrics.jsonl"))]
    reads = rows[-1]["sources"]
    assert set(reads) == {"data", "other"} and sum(r["tokens"] for r in reads.values()) == 6 * 128
    state = json.load(open(os.path.join(straight["checkpoint"], "state.json")))
    assert [s["weight"] for s in state["data"]["sources"]] == [0.7, 0.3]
    train.train(config(world, tmp_path / "b", data=mix, max_steps=6, stop_step=3))
    resumed = train.train(config(world, tmp_path / "b", data=mix, max_steps=6, resume=True))
    a, b = tensors(straight["checkpoint"]), tensors(resumed["checkpoint"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(lrc.LRCError) as e:
        train.train(config(world, tmp_path / "b", data=world["data"], max_steps=6, resume=True))
    assert "2 data source(s), this run has 1" in assert_one_line(e)
    for bad in ({world["data"]: 0}, {world["data"]: "a lot"}, {}):
        with pytest.raises(lrc.LRCError) as e:
            train.train(config(world, tmp_path / "c", data=bad))
        assert "positive weight" in assert_one_line(e) or "neither" in str(e.value)


def make_chat_data(path, n_turns=150, seed=0):
    """Conversations as token files with a loss mask: a user turn of random tokens, then an assistant turn
    that follows a rule (each token is the previous one + 1), mask 1 on the assistant's tokens only."""
    rng = np.random.default_rng(seed)
    tokens, mask = [], []
    for _ in range(n_turns):
        user = rng.integers(1, VOCAB, 6)
        start = int(rng.integers(1, VOCAB - 8))
        reply = np.arange(start, start + 6)
        tokens += [*user, *reply, 0]
        mask += [0] * 6 + [1] * 7                                     # the reply and its end-of-turn token
    tokens, mask = np.array(tokens), np.array(mask, dtype=np.uint8)
    split = len(tokens) * 4 // 5
    os.makedirs(path, exist_ok=True)
    for name, part in (("train", slice(0, split)), ("val", slice(split, None))):
        tokens[part].astype("<u4").tofile(os.path.join(path, f"{name}.bin"))
        mask[part].tofile(os.path.join(path, f"{name}.mask"))
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"vocab_size": VOCAB, "eos_id": 0, "tokenizer_sha256": hashlib.sha256(b'{"toy": "tokenizer"}').hexdigest(),
                   "n_tokens": {"train": split, "val": len(tokens) - split}, "loss_mask": "uint8"}, f)
    return path


def test_sft_windows_mask_everything_but_the_assistant(tmp_path):
    data = loader.open_mixture(make_chat_data(str(tmp_path / "chat")), seq_len=16)
    w = loader.TokenWindows(data, 1, 16, 4, 0, 1, 1, torch.device("cpu"), use_mask=True)
    x, y = w.batch(0, 0)
    starts = w.starts(0, 0)[1]
    source = data.sources[0]
    for row, start in enumerate(starts):
        predicted = source.train_mask[start + 1:start + 17]
        assert torch.equal(y[row] == -1, torch.from_numpy(predicted == 0))
        kept = y[row] != -1
        assert torch.equal(y[row][kept], torch.from_numpy(source.train_tokens[start + 1:start + 17].astype(np.int64))[kept])
    # no gradient flows from a masked position: the loss head's gradient rows there are exactly zero
    h = torch.randn(4, 16, 8, requires_grad=True)
    W = torch.randn(VOCAB, 8, requires_grad=True)
    lrc.distill_loss(h, W, y)[0].backward()
    masked = (y == -1)
    assert masked.any() and (~masked).any()
    assert torch.all(h.grad[masked] == 0) and torch.all(h.grad[~masked].abs().sum(-1) > 0)
    with pytest.raises(lrc.LRCError, match="has no loss mask"):
        loader.TokenWindows(loader.open_mixture(make_data(str(tmp_path / "plain")), 16), 1, 16, 4, 0, 1, 1,
                            torch.device("cpu"), use_mask=True)


def test_sft_lowers_the_assistant_loss_and_converts(world, tmp_path):
    from checkpoint import load_checkpoint
    chat = make_chat_data(str(tmp_path / "chat"))
    init = world["teacher"]                                        # any Hugging Face checkpoint of ours
    summary = train.train(config(world, tmp_path / "sft", method="sft", init_from=init, data=chat, max_steps=16,
                                 lr=3e-3, eval_tokens=512, log_interval=4))
    rows = [json.loads(line) for line in open(os.path.join(str(tmp_path / "sft"), "metrics.jsonl"))]
    assert summary["last"]["lm"] < summary["first"]["lm"] and summary["val"]["val_lm"] < rows[0]["lm"]
    assert summary["last"]["kl"] == 0.0 and summary["last"]["clone"] == 0.0
    state = json.load(open(os.path.join(summary["checkpoint"], "state.json")))
    assert state["method"] == "sft" and state["init_from"] == init and state["teacher"] is None
    assert not os.path.exists(tmp_path / "sft" / "data")            # no toy world for a run without a teacher
    assert state["student_config"] == lrc.load_qwen2(init).config.to_dict()
    model, loaded = load_checkpoint(summary["checkpoint"])
    assert loaded["teacher_dir"] == init                            # its tokenizer files come from init_from
    trained = tensors(summary["checkpoint"])
    assert not torch.equal(trained["model.embed_tokens.weight"], lrc.load_qwen2(init).model.embed_tokens.weight)
    from convert import convert                                    # the second stage's output: a standard HF directory
    out = convert(summary["out_dir"], str(tmp_path / "sft_hf"))
    converted = lrc.load_qwen2(out)
    assert torch.equal(converted.model.embed_tokens.weight, trained["model.embed_tokens.weight"])
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert json.load(open(os.path.join(out, "config.json")))["lrc"]["method"] == "sft"
    for bad, words in [(dict(init_from=None), "--init_from=DIR"), (dict(data=world["data"]), "has no loss mask")]:
        with pytest.raises(lrc.LRCError) as e:
            train.train(config(world, tmp_path / "bad", **{"method": "sft", "init_from": init, "data": chat, **bad}))
        assert words in assert_one_line(e)
