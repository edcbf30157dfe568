"""Tests for lrc.py. `transformers` is the independent oracle for the Qwen2 math and the
checkpoint format; the LRC losses are recomputed here from scratch with plain torch.

Tiny models only (hidden 32-64, 2 layers, vocab ~100) so the file runs in well under 3 minutes on 2 CPU
cores. Section numbers refer to docs/spec.md.
"""
import collections
import fnmatch
import json
import math
import os
import shutil
import socket

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import lrc

transformers = pytest.importorskip("transformers")



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine spinning worker threads cost
    several times the work; restored afterwards so other test files are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -----------------------------------------------------------------------------
# helpers

def hf_config(vocab=96, hidden=32, inter=64, layers=2, heads=4, kv=2, head_dim=None, tied=False,
              theta=10000.0, eps=1e-5):
    args = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                rope_parameters={"rope_type": "default", "rope_theta": theta}, rms_norm_eps=eps,
                max_position_embeddings=256)
    if head_dim is not None:
        args["head_dim"] = head_dim
    config = transformers.Qwen2Config(**args)
    config._attn_implementation = "eager"  # the plainest HF code path as the oracle
    return config


def randomize_(model, seed, scale=0.15):
    """Weights big enough that logits are O(1), non-zero biases, non-unit norm weights: zeros and ones
    would hide mistakes. Works for both transformers' and lrc's Qwen2 (same parameter names)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def make_hf(seed=0, **kw):
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(hf_config(**kw))
    return randomize_(model, seed).eval()


def hf_logits(model, idx):
    with torch.no_grad():
        return model(input_ids=idx).logits.float()


def edit_config(path, fn):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    fn(config)
    with open(file, "w") as f:
        json.dump(config, f)


def read_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def tiny_lrc_config(tied=False, **kw):
    args = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5, rope_theta=5000.0,
                tie_word_embeddings=tied, max_position_embeddings=256)
    args.update(kw)
    return lrc.Qwen2Config(**args)


def tiny_teacher(seed=0, tied=False, **kw):
    torch.manual_seed(seed)
    return randomize_(lrc.Qwen2(tiny_lrc_config(tied=tied, **kw)), seed).eval()


def tokens(B, T, V=96, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def num(x):
    """A Python float from a float or a 0-d tensor (detached: no autograd warning)."""
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def assert_one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip(), f"error message is not one non-empty line: {msg!r}"
    for word in words:
        assert word.lower() in msg.lower(), f"{word!r} not in error message {msg!r}"


class OpCounter(TorchDispatchMode):
    """Counts aten ops by name: proves what was (not) computed, independent of lrc's code structure."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def matmuls(self):
        return sum(self.counts[k] for k in ("mm", "addmm", "bmm", "matmul", "baddbmm"))


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    """An untied fp32 GQA checkpoint with head_dim 12 != 32/4, saved by transformers."""
    path = str(tmp_path_factory.mktemp("base") / "teacher")
    model = make_hf(seed=3, head_dim=12, theta=5000.0)
    model.save_pretrained(path)
    return path, model


@pytest.fixture
def ckpt_copy(base_ckpt, tmp_path):
    path = str(tmp_path / "ckpt")
    shutil.copytree(base_ckpt[0], path)
    return path


# -----------------------------------------------------------------------------
# Exactness against transformers (spec section 2)

EXACT_CASES = {
    # name: (hf_config kwargs, T)
    "mha-tied": (dict(hidden=32, heads=4, kv=4, tied=True, theta=10000.0), 70),
    "gqa2-headdim12-untied": (dict(hidden=32, heads=4, kv=2, head_dim=12, tied=False, theta=5000.0), 70),
    "gqa4-headdim16-untied": (dict(hidden=64, heads=8, kv=2, head_dim=16, tied=False, theta=1e6), 80),
    "gqa4-tied": (dict(hidden=48, heads=4, kv=1, tied=True, theta=300.0), 66),
}


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_qwen2_logits_match_transformers_fp32(case, tmp_path):
    kw, T = EXACT_CASES[case]
    hf = make_hf(seed=1, **kw)
    hf.save_pretrained(tmp_path)
    model = lrc.load_qwen2(str(tmp_path))
    assert model.config.tie_word_embeddings == kw["tied"]
    assert model.config.rope_theta == kw["theta"]
    assert model.config.rms_norm_eps == 1e-5
    assert model.config.head_dim == kw.get("head_dim", kw["hidden"] // kw["heads"])
    assert next(model.parameters()).dtype == torch.float32
    idx = tokens(2, T)
    ours = model(idx)
    ref = hf_logits(hf, idx)
    assert ours.shape == ref.shape == (2, T, 96)
    assert ref.abs().max() > 1.0  # the comparison is not trivially between near-zero numbers
    assert (ours - ref).abs().max().item() < 1e-4
    # the final-normed hidden states too
    with torch.no_grad():
        h_ref = hf.model(input_ids=idx).last_hidden_state
    assert (model.hidden(idx) - h_ref).abs().max().item() < 1e-4


def test_theta_matters(base_ckpt, ckpt_copy):
    """Guards the exactness tests: a wrong rope_theta would be visible at this sequence length."""
    edit_config(ckpt_copy, lambda c: c["rope_parameters"].update(rope_theta=10000.0))
    idx = tokens(1, 64)
    wrong = lrc.load_qwen2(ckpt_copy)(idx)
    assert (wrong - hf_logits(base_ckpt[1], idx)).abs().max() > 1e-2


@pytest.mark.parametrize("case", ["gqa2-headdim12-untied", "gqa4-tied"])
def test_qwen2_logits_bf16(case, tmp_path):
    """bf16 has an 8-bit mantissa (relative rounding 2^-9): bf16 logits cannot match fp32 to 1e-4, and the
    tolerance must tell a faithful bf16 implementation from one that rounds at other places. Two checks:
    1. against transformers' sdpa path in bf16, which runs the same bf16 ops in the same order (bitwise
       equal on torch 2.13 CPU): mean |diff| < 2e-3 (logits here are ~0.8 in mean magnitude). One extra
       or missing bf16 rounding per op, e.g. applying the norm weight before the cast back to bf16 as the
       spec forbids, gives a mean |diff| of ~7e-3, so it fails. (It holds for the same kernels: another
       device's summation order moves bf16 logits by as much; tests/test_cuda.py has the GPU's bar.)
    2. against the fp32 oracle: our bf16 error is no larger than transformers' own eager-bf16 error
       (at most 2x + 0.02)."""
    kw, T = EXACT_CASES[case]
    hf = make_hf(seed=2, **kw)
    hf.save_pretrained(tmp_path)
    idx = tokens(2, T)
    ref = hf_logits(hf, idx)
    # transformers' own bf16 load path (hf.to(bf16) would also round its RoPE inv_freq buffer to bf16)
    hf_bf16 = {impl: hf_logits(transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, attn_implementation=impl), idx) for impl in ("sdpa", "eager")}
    ours_bf16 = lrc.load_qwen2(str(tmp_path), dtype="bf16")(idx)
    assert ours_bf16.dtype == torch.bfloat16
    ours_bf16 = ours_bf16.float()
    diff = (ours_bf16 - hf_bf16["sdpa"]).abs()
    assert diff.mean().item() < 2e-3 and diff.max().item() < 0.02 * ref.abs().max().item()
    err_hf = (hf_bf16["eager"] - ref).abs().max().item()
    err_ours = (ours_bf16 - ref).abs().max().item()
    assert err_hf > 0  # transformers really ran in bf16
    assert err_ours <= 2 * err_hf + 0.02, (err_ours, err_hf)


# -----------------------------------------------------------------------------
# Loading (spec section 2)

def assert_same_params(a, b, exact=True):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k])


def test_sharded_checkpoint_from_transformers(base_ckpt, tmp_path):
    path, hf = base_ckpt
    sharded = str(tmp_path / "sharded")
    hf.save_pretrained(sharded, max_shard_size="20KB")
    shards = [f for f in os.listdir(sharded) if f.endswith(".safetensors")]
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json")) and len(shards) > 2
    assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
    assert_same_params(lrc.load_qwen2(sharded), lrc.load_qwen2(path))


def test_sharded_checkpoint_from_save_qwen2(tmp_path):
    teacher = tiny_teacher(seed=5, tied=True)
    path = str(tmp_path / "saved")
    lrc.save_qwen2(teacher, path, max_shard_bytes=6000)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(os.path.isfile(os.path.join(path, s)) for s in shards)
    assert "lm_head.weight" not in index["weight_map"]  # tied: the head is the embedding
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in teacher.parameters())
    loaded = lrc.load_qwen2(path)
    assert_same_params(loaded, teacher)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    idx = tokens(1, 16)
    assert torch.equal(loaded(idx), teacher(idx))
    # transformers reads lrc's sharded output too
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    assert (hf_logits(hf, idx) - teacher(idx)).abs().max() < 1e-4


def test_untied_checkpoint_keeps_separate_head(base_ckpt):
    path, hf = base_ckpt
    model = lrc.load_qwen2(path)
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_tied_checkpoint_shares_head(tmp_path):
    hf = make_hf(seed=4, tied=True)
    hf.save_pretrained(tmp_path)
    with safe_open(os.path.join(tmp_path, "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    model = lrc.load_qwen2(str(tmp_path))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, hf.model.embed_tokens.weight)
    # a tied checkpoint that still carries lm_head.weight (some exporters write it) loads the same
    if "lm_head.weight" not in names:
        state = load_file(os.path.join(tmp_path, "model.safetensors"))
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        save_file(state, os.path.join(tmp_path, "model.safetensors"), metadata={"format": "pt"})
        assert_same_params(lrc.load_qwen2(str(tmp_path)), model)


def test_bf16_file_and_dtype_conversion(base_ckpt, tmp_path):
    path, hf = base_ckpt
    fp32 = lrc.load_qwen2(path)
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    # fp32 file -> bf16 at load
    to_bf16 = lrc.load_qwen2(path, dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in to_bf16.parameters())
    for k, v in to_bf16.state_dict().items():
        assert torch.equal(v, fp32.state_dict()[k].to(torch.bfloat16)), k
    # bf16 file: default dtype is the file's, and fp32 at load converts exactly
    bf16_dir = str(tmp_path / "bf16")
    hf_bf16 = make_hf(seed=3, head_dim=12, theta=5000.0).to(torch.bfloat16)
    hf_bf16.save_pretrained(bf16_dir)
    with safe_open(os.path.join(bf16_dir, "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    native = lrc.load_qwen2(bf16_dir)
    assert all(p.dtype == torch.bfloat16 for p in native.parameters())
    up = lrc.load_qwen2(bf16_dir, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in up.parameters())
    for k, v in native.state_dict().items():
        assert torch.equal(up.state_dict()[k], v.float()), k
    idx = tokens(1, 12)
    # (a fresh fp32 load: .float() on a bf16 transformers model keeps its bf16-rounded RoPE inv_freq buffer)
    hf_up = transformers.AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32, attn_implementation="eager")
    assert (up(idx) - hf_logits(hf_up, idx)).abs().max() < 1e-4
    with pytest.raises(lrc.LRCError) as e:
        lrc.load_qwen2(path, dtype="float8")
    assert_one_line_error(e, "float8")


def test_top_level_rope_theta(base_ckpt, ckpt_copy):
    """Older hub files: rope_theta at the top level, no rope_parameters."""
    def old_style(c):
        c.pop("rope_parameters")
        c["rope_theta"] = 5000.0
    edit_config(ckpt_copy, old_style)
    model = lrc.load_qwen2(ckpt_copy)
    assert model.config.rope_theta == 5000.0
    idx = tokens(1, 64)
    assert (model(idx) - hf_logits(base_ckpt[1], idx)).abs().max() < 1e-4
    # and rope_parameters without rope_type (theta only) is also plain RoPE
    edit_config(ckpt_copy, lambda c: (c.pop("rope_theta"), c.update(rope_parameters={"rope_theta": 5000.0})))
    assert lrc.load_qwen2(ckpt_copy).config.rope_theta == 5000.0


def test_implied_and_explicit_head_dim(tmp_path):
    # implied: no head_dim in config.json -> hidden_size // heads
    hf = make_hf(seed=6, hidden=48, heads=4, kv=2)
    hf.save_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: c.pop("head_dim", None))
    assert "head_dim" not in read_config(tmp_path)
    model = lrc.load_qwen2(str(tmp_path))
    assert model.config.head_dim == 12
    idx = tokens(1, 20)
    assert (model(idx) - hf_logits(hf, idx)).abs().max() < 1e-4
    # explicit head_dim == implied value: same thing
    edit_config(tmp_path, lambda c: c.update(head_dim=12))
    assert (lrc.load_qwen2(str(tmp_path))(idx) - hf_logits(hf, idx)).abs().max() < 1e-4


def test_dropping_explicit_head_dim_is_a_shape_error(ckpt_copy):
    """head_dim 12 != 32/4: without it config.json implies other shapes, which must be refused clearly."""
    edit_config(ckpt_copy, lambda c: c.pop("head_dim"))
    with pytest.raises(lrc.LRCError) as e:
        lrc.load_qwen2(ckpt_copy)
    assert_one_line_error(e, "shape", "q_proj")


def test_hub_id_downloads_only_needed_files(base_ckpt, monkeypatch):
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []

    def stub(*args, **kwargs):
        calls.append((args, kwargs))
        return base_ckpt[0]

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", stub)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model = lrc.load_qwen2("someorg/tiny-qwen2")
    assert len(calls) == 1
    args, kwargs = calls[0]
    repo_id = args[0] if args else kwargs["repo_id"]
    assert repo_id == "someorg/tiny-qwen2"
    patterns = kwargs.get("allow_patterns")
    assert patterns, "snapshot_download must be restricted with allow_patterns"
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)

    def wanted(name):
        return any(fnmatch.fnmatch(name, p) for p in patterns)

    for name in ["config.json", "model.safetensors", "model-00001-of-00002.safetensors",
                 "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]:
        assert wanted(name), name
    for name in ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "training_args.bin", "optimizer.pt",
                 "model.pt", "consolidated.00.pth", "original/consolidated.00.pth", "tf_model.h5",
                 "flax_model.msgpack", "model.gguf", "onnx/model.onnx", "README.md", "rng_state.pth"]:
        assert not wanted(name), name
    for p in patterns:  # only config, safetensors and tokenizer files
        assert p.endswith((".json", ".safetensors")) or p in ("merges.txt", "vocab.txt", "tokenizer.model"), p
    assert_same_params(model, lrc.load_qwen2(base_ckpt[0]))


def test_local_dir_never_calls_the_hub(base_ckpt, monkeypatch):
    import huggingface_hub

    def stub(*args, **kwargs):
        raise AssertionError("snapshot_download called for a local directory")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", stub)
    lrc.load_qwen2(base_ckpt[0])
    with pytest.raises(lrc.LRCError) as e:  # a path that does not exist is not a hub id
        lrc.load_qwen2(os.path.join(base_ckpt[0], "nope"))
    assert_one_line_error(e, "nope")


def test_hub_failure_is_one_line_error(monkeypatch):
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def stub(*args, **kwargs):
        raise OSError("offline mode is enabled\nsecond line of detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", stub)
    with pytest.raises(lrc.LRCError) as e:
        lrc.load_qwen2("someorg/does-not-exist")
    assert_one_line_error(e, "someorg/does-not-exist")


# -----------------------------------------------------------------------------
# Clear one-line errors

@pytest.mark.parametrize("edit,words", [
    (lambda c: c.update(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"]),
     ["model_type", "qwen2_moe", "qwen2", "llama", "qwen3"]),
    (lambda c: c.update(model_type="mixtral", architectures=["MixtralForCausalLM"]), ["model_type", "mixtral", "MoE"]),
    (lambda c: c.update(model_type="gemma", architectures=["GemmaForCausalLM"]), ["model_type", "gemma"]),
    (lambda c: (c.pop("rope_parameters"), c.update(rope_theta=5000.0, rope_scaling={"type": "yarn", "factor": 4.0})),
     ["yarn"]),
    (lambda c: c.update(rope_parameters={"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}), ["linear"]),
    (lambda c: c.update(use_sliding_window=True, sliding_window=16), ["sliding"]),
    (lambda c: c.update(layer_types=["full_attention", "sliding_attention"]), ["sliding"]),
    (lambda c: c.update(hidden_act="gelu"), ["hidden_act", "gelu"]),
], ids=["qwen2_moe", "mixtral", "gemma", "rope_scaling-yarn", "rope_parameters-linear", "sliding-window",
        "layer_types-sliding", "gelu"])
def test_unsupported_config_is_refused(ckpt_copy, edit, words):
    edit_config(ckpt_copy, edit)
    with pytest.raises(lrc.LRCError) as e:
        lrc.load_qwen2(ckpt_copy)
    assert_one_line_error(e, *words)


@pytest.mark.parametrize("student_hidden", [0, -3, 33])
def test_bad_student_hidden(student_hidden):
    with pytest.raises(lrc.LRCError) as e:
        lrc.LRC(tiny_teacher(), student_hidden)
    assert_one_line_error(e, "student_hidden", str(student_hidden))


def test_missing_config_json(ckpt_copy):
    os.remove(os.path.join(ckpt_copy, "config.json"))
    with pytest.raises(lrc.LRCError) as e:
        lrc.load_qwen2(ckpt_copy)
    assert_one_line_error(e, "config.json")


def test_no_weights_file(ckpt_copy):
    os.remove(os.path.join(ckpt_copy, "model.safetensors"))
    with pytest.raises(lrc.LRCError) as e:
        lrc.load_qwen2(ckpt_copy)
    assert_one_line_error(e, "safetensors")


def test_missing_shard(base_ckpt, tmp_path):
    path = str(tmp_path / "sharded")
    base_ckpt[1].save_pretrained(path, max_shard_size="20KB")
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(os.path.join(path, shard))
    with pytest.raises(lrc.LRCError) as e:
        lrc.load_qwen2(path)
    assert_one_line_error(e, shard, "missing")


def _rewrite_weights(path, fn):
    file = os.path.join(path, "model.safetensors")
    state = load_file(file)
    fn(state)
    save_file(state, file, metadata={"format": "pt"})


def test_wrong_shape_tensor(ckpt_copy):
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_weights(ckpt_copy, lambda s: s.update({name: s[name][:-1].clone()}))
    with pytest.raises(lrc.LRCError) as e:
        lrc.load_qwen2(ckpt_copy)
    assert_one_line_error(e, name, "shape")


def test_missing_tensor(ckpt_copy):
    name = "model.layers.0.self_attn.k_proj.bias"
    _rewrite_weights(ckpt_copy, lambda s: s.pop(name))
    with pytest.raises(lrc.LRCError) as e:
        lrc.load_qwen2(ckpt_copy)
    assert_one_line_error(e, name, "missing")


def test_missing_untied_head(ckpt_copy):
    _rewrite_weights(ckpt_copy, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(lrc.LRCError) as e:
        lrc.load_qwen2(ckpt_copy)
    assert_one_line_error(e, "lm_head.weight", "missing")


# -----------------------------------------------------------------------------
# The LRC student: parameters, gradients, no-grad teacher, once-per-forward weights (spec 3, 4)

def expected_trainable(L, d, d_s, tie_proj):
    shapes = {"P_emb": (d, d_s), "final_norm": (d_s,)}
    if not tie_proj:
        shapes["P_lm"] = (d, d_s)
    for i in range(L):
        for name in ("P_q", "P_k", "P_v", "P_gate", "P_up"):
            shapes[f"layers.{i}.{name}"] = (d, d_s)
        for name in ("P_o", "P_down"):
            shapes[f"layers.{i}.{name}"] = (d_s, d)
        shapes[f"layers.{i}.attn_norm"] = (d_s,)
        shapes[f"layers.{i}.ffn_norm"] = (d_s,)
    return shapes


@pytest.mark.parametrize("tied_teacher,tie_proj", [(True, True), (False, True), (False, False), (True, False)])
def test_trainable_parameters(tied_teacher, tie_proj):
    L, d, d_s = 2, 32, 20
    teacher = tiny_teacher(tied=tied_teacher)
    model = lrc.LRC(teacher, d_s, tie_proj=tie_proj)
    assert model.alpha == 0.5 and model.tau == 40.0  # spec defaults
    trainable = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(L, d, d_s, tie_proj)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == 7 * L * d * d_s + (1 if tie_proj else 2) * d * d_s + (2 * L + 1) * d_s
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("teacher.") for n in frozen)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert model.teacher is teacher
    # the student norms start at 1 and projections at normal(0, 0.02)
    assert torch.equal(model.final_norm, torch.ones(d_s))
    assert 0.01 < model.layers[0].P_q.std().item() < 0.03
    # tie_proj shares P_emb for the head (spec 3)
    P = model.P_emb if tie_proj else model.P_lm
    assert torch.allclose(model.student_head(), teacher.lm_head.weight @ P)
    assert model.student_config.tie_word_embeddings == (tied_teacher and tie_proj)
    assert model.student_config.hidden_size == d_s and model.student_config.head_dim == 12


def test_gradients_reach_only_the_student():
    teacher = tiny_teacher(seed=1)
    model = lrc.LRC(teacher, 16, tie_proj=False)
    idx = tokens(2, 16)
    loss, parts = model(idx, tokens(2, 16, seed=2))
    assert loss.requires_grad
    loss.backward()
    for name, p in teacher.named_parameters():
        assert p.grad is None, name
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            assert torch.isfinite(p.grad).all(), name


def test_teacher_stream_runs_without_autograd(monkeypatch):
    d, d_s = 32, 16
    teacher = tiny_teacher(seed=1)
    model = lrc.LRC(teacher, d_s)
    calls = []
    real_layer = lrc.decoder_layer

    def spy(x, *args, **kwargs):
        out, acts = real_layer(x, *args, **kwargs)
        calls.append((x.shape[-1], torch.is_grad_enabled(), out.requires_grad,
                      any(a.requires_grad for a in acts)))
        return out, acts

    monkeypatch.setattr(lrc, "decoder_layer", spy)
    module_outputs = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: module_outputs.append(out.requires_grad))
             for m in teacher.modules() if not list(m.children())]
    try:
        loss, parts = model(tokens(2, 12), tokens(2, 12, seed=2))
    finally:
        for h in hooks:
            h.remove()
    teacher_calls = [c for c in calls if c[0] == d]
    student_calls = [c for c in calls if c[0] == d_s]
    assert len(teacher_calls) == len(student_calls) == 2
    for width, grad_mode, out_grad, acts_grad in teacher_calls:
        assert not grad_mode and not out_grad and not acts_grad
    for width, grad_mode, out_grad, acts_grad in student_calls:
        assert grad_mode and out_grad and acts_grad
    assert module_outputs and not any(module_outputs)  # embedding, final norm of the teacher
    assert loss.requires_grad


@pytest.mark.parametrize("T", [8, 64])
def test_weights_generated_once_per_forward(T, monkeypatch):
    teacher = tiny_teacher(seed=1)
    model = lrc.LRC(teacher, 16)
    calls = []
    real_generate = lrc.LRCLayer.generate

    def counting(self, weights):
        calls.append(self)
        return real_generate(self, weights)

    monkeypatch.setattr(lrc.LRCLayer, "generate", counting)
    loss, _ = model(tokens(2, T), tokens(2, T, seed=2))
    assert len(calls) == 2 and calls[0] is model.layers[0] and calls[1] is model.layers[1]
    calls.clear()
    model.student_logits(tokens(1, T))
    assert len(calls) == 2


def test_matmul_count_does_not_grow_with_sequence_length():
    """A per-token weight generation (or any per-token loop) would make the op count grow with T."""
    teacher = tiny_teacher(seed=1)
    model = lrc.LRC(teacher, 16)
    counts = []
    for T in (8, 64):
        counter = OpCounter()
        with counter:
            loss, _ = model(tokens(2, T), tokens(2, T, seed=2))
            loss.backward()
        counts.append((counter.matmuls(), sum(counter.counts.values())))
    assert counts[0][0] > 0
    assert counts[0] == counts[1]


def test_checkpoint_layers_changes_nothing_but_memory(monkeypatch):
    """LRC(checkpoint_layers=True) recomputes student layers in backward: same loss, parts and gradients,
    and still one generation per weight per forward (the recomputation must not generate again)."""
    teacher = tiny_teacher(seed=1)
    idx, targets = tokens(2, 16), tokens(2, 16, seed=2)
    results = []
    for checkpoint_layers in (False, True):
        torch.manual_seed(0)
        model = lrc.LRC(teacher, 16, tie_proj=False, init_std=0.2, checkpoint_layers=checkpoint_layers)
        calls = []
        real_generate = lrc.LRCLayer.generate
        monkeypatch.setattr(lrc.LRCLayer, "generate", lambda self, w: calls.append(self) or real_generate(self, w))
        loss, parts = model(idx, targets)
        loss.backward()
        monkeypatch.undo()
        assert len(calls) == teacher.config.num_hidden_layers
        results.append((loss.detach(), {k: num(v) for k, v in parts.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss0, parts0, grads0), (loss1, parts1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=0)
    assert parts1 == pytest.approx(parts0, rel=1e-6)
    assert grads1.keys() == grads0.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-8)


# -----------------------------------------------------------------------------
# Generating once per optimizer step (generate='step', spec section 3)

def one_optimizer_step(model, batches, generate_once, step_model=None):
    """The micro-steps of one optimizer step as train.train_loop runs them (distributed.optimizer_step and
    micro_step, loss / grad_accum); step_model: what is called (e.g. compiled). Returns the micro-steps'
    (loss, parts) and every trainable parameter's gradient."""
    import distributed
    results = []
    with distributed.optimizer_step(model, "step" if generate_once else "micro_step", len(batches)):
        for i, (idx, targets) in enumerate(batches):
            with distributed.micro_step(model, None, i == len(batches) - 1):
                loss, parts = (model if step_model is None else step_model)(idx, targets)
                (loss / len(batches)).backward()
            results.append((loss.detach(), {k: num(v) for k, v in parts.items()}))
    return results, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


GENERATE_CASES = {
    "tied": dict(),
    "untied-teacher-o-term": dict(tied=False, tie_proj=False, clone_attn_out="teacher"),
    "checkpoint_layers": dict(checkpoint_layers=True),
    "module-checkpoint-of-whole-layers": dict(whole_layers=True),
    "compiled": dict(compiled=True),
    "llama": dict(model_type="llama", tied=False),
    "qwen3": dict(model_type="qwen3", tie_proj=False),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generating_once_per_step_is_every_micro_step_to_rounding(case, monkeypatch):
    """4 micro-steps: the losses are bitwise those of generate='micro_step' (the forward reads the same
    weights), every projection's gradient equal to float32 rounding (W.T @ sum dW_m against sum W.T @ dW_m),
    and each weight is made once per optimizer step instead of once per micro-step."""
    kw = dict(GENERATE_CASES[case])
    compiled, whole_layers = kw.pop("compiled", False), kw.pop("whole_layers", False)
    model_kw = {k: kw.pop(k) for k in ("tie_proj", "clone_attn_out", "checkpoint_layers") if k in kw}
    teacher = tiny_teacher(seed=3, **kw)
    batches = [(tokens(2, 12, seed=10 + i), tokens(2, 12, seed=20 + i)) for i in range(4)]
    results = {}
    for generate_once in (False, True):
        torch.manual_seed(0)
        model = lrc.LRC(teacher, 16, init_std=0.2, **model_kw)
        if whole_layers:
            from torch.distributed._composable import checkpoint
            for layer in model.layers:
                checkpoint(layer)
        step_model = torch.compile(model, backend="aot_eager") if compiled else None
        calls = []
        real_generate = lrc.LRCLayer.generate
        monkeypatch.setattr(lrc.LRCLayer, "generate", lambda self, w: calls.append(self) or real_generate(self, w))
        results[generate_once] = one_optimizer_step(model, batches, generate_once, step_model)
        monkeypatch.undo()
        # (a whole-layer checkpoint recomputes what the layer's forward did: generating, in every micro-step)
        per_step = 1 if generate_once else len(batches) * (2 if whole_layers else 1)
        assert len(calls) == teacher.config.num_hidden_layers * per_step
        assert not model.step_weights_ready  # after the step, a forward (evaluation) makes its weights again
    (micro, grads_micro), (once, grads_once) = results[False], results[True]
    for (loss_m, parts_m), (loss_o, parts_o) in zip(micro, once):
        assert torch.equal(loss_m, loss_o) and parts_m == parts_o
    assert grads_once.keys() == grads_micro.keys()
    for name, grad in grads_micro.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads_once[name], grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item())
    if compiled:
        torch._dynamo.reset()


def test_generating_once_saves_the_generation_flops_of_all_but_one_micro_step():
    """Counted by torch's FlopCounterMode over one optimizer step of N micro-steps: generate='micro_step' spends
    N x (forward W @ P + backward W.T @ dW_S) = N x 4 x (teacher weight params) x d_s FLOPs on weights, 'step'
    spends it once; nothing else differs."""
    from torch.utils.flop_counter import FlopCounterMode
    teacher = tiny_teacher(seed=3)
    c, d_s, N = teacher.config, 16, 3
    batches = [(tokens(2, 12, seed=10 + i), tokens(2, 12, seed=20 + i)) for i in range(N)]
    flops = {}
    for generate_once in (False, True):
        model = lrc.LRC(teacher, d_s)
        with FlopCounterMode(display=False) as counter:
            one_optimizer_step(model, batches, generate_once)
        flops[generate_once] = counter.get_total_flops()
    generated = c.num_hidden_layers * sum(w.numel() for w in teacher.model.layers[0].weights()[:12]
                                          if w is not None and w.dim() == 2) + teacher.lm_head.weight.numel()
    assert flops[False] - flops[True] == (N - 1) * 4 * generated * d_s


def test_generating_once_in_bf16_is_as_close_to_float64_as_every_micro_step():
    """bf16 weights under autocast (the GPU recipe, here on the CPU): each micro-step's dW_S goes into a float32
    sum, rounded to bf16 once before W.T @ (.), where generate='micro_step' rounds each micro-step's dP to bf16
    before its float32 sum. Both against the float64 gradient of the same bf16 weights: the same order of error."""
    teacher = tiny_teacher(seed=3)
    batches = [(tokens(2, 12, seed=10 + i), tokens(2, 12, seed=20 + i)) for i in range(4)]
    torch.manual_seed(0)
    reference = lrc.LRC(teacher, 16, init_std=0.2).double()
    _, exact = one_optimizer_step(reference, batches, generate_once=False)
    errors = {}
    for generate_once in (False, True):
        torch.manual_seed(0)
        model = lrc.LRC(teacher, 16, init_std=0.2)
        model.teacher.to(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, grads = one_optimizer_step(model, batches, generate_once)
        errors[generate_once] = max(((grads[n].double() - g).norm() / g.norm()).item() for n, g in exact.items())
    assert errors[True] < 0.05 and errors[True] < 1.5 * errors[False], errors


# -----------------------------------------------------------------------------
# Losses recomputed from scratch (spec section 4)

def ref_rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def ref_rope(x, theta, inv_freq=None):  # x [B, heads, T, hd], rotate-half convention
    """inv_freq: given (e.g. transformers' own llama3-scaled frequencies), else plain RoPE from theta."""
    T, hd = x.shape[2], x.shape[3]
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]
    cos, sin = angles.cos().float(), angles.sin().float()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def ref_stream(x, layers, c, inv_freq=None):
    """Explicit decoder math. layers: list of dicts of weights (q/k/v biases and per-head q/k norm weights
    when present). Returns the last residual and per-layer activations (q, k, v as projected, before the
    q/k norm and RoPE, gate pre-SiLU, up, attention output before o_proj, after it, FFN output)."""
    B, T, _ = x.shape
    H, Hkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    acts = []
    for w in layers:
        h = ref_rms_norm(x, w["attn_norm"], c.rms_norm_eps)
        q, k, v = (h @ w[n].T + (w[n + "_bias"] if w.get(n + "_bias") is not None else 0) for n in "qkv")
        qh, kh = q.view(B, T, H, hd), k.view(B, T, Hkv, hd)
        if w.get("q_norm") is not None:  # Qwen3: per head, over hd
            qh, kh = ref_rms_norm(qh, w["q_norm"], c.rms_norm_eps), ref_rms_norm(kh, w["k_norm"], c.rms_norm_eps)
        qh = ref_rope(qh.transpose(1, 2), c.rope_theta, inv_freq)
        kh = ref_rope(kh.transpose(1, 2), c.rope_theta, inv_freq).repeat_interleave(H // Hkv, dim=1)
        vh = v.view(B, T, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
        scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(hd)
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = (att @ vh).transpose(1, 2).reshape(B, T, H * hd)
        o = attn @ w["o"].T
        x = x + o
        h2 = ref_rms_norm(x, w["ffn_norm"], c.rms_norm_eps)
        gate, up = h2 @ w["gate"].T, h2 @ w["up"].T
        ffn_out = (F.silu(gate) * up) @ w["down"].T
        x = x + ffn_out
        acts.append(dict(q=q, k=k, v=v, gate=gate, up=up, attn=attn, o=o, ffn_out=ffn_out))
    return x, acts


def teacher_layer_weights(teacher):
    sd = teacher.state_dict()
    out = []
    for i in range(teacher.config.num_hidden_layers):
        p = f"model.layers.{i}."
        out.append(dict(attn_norm=sd[p + "input_layernorm.weight"], ffn_norm=sd[p + "post_attention_layernorm.weight"],
                        q=sd[p + "self_attn.q_proj.weight"], q_bias=sd.get(p + "self_attn.q_proj.bias"),
                        k=sd[p + "self_attn.k_proj.weight"], k_bias=sd.get(p + "self_attn.k_proj.bias"),
                        v=sd[p + "self_attn.v_proj.weight"], v_bias=sd.get(p + "self_attn.v_proj.bias"),
                        q_norm=sd.get(p + "self_attn.q_norm.weight"), k_norm=sd.get(p + "self_attn.k_norm.weight"),
                        o=sd[p + "self_attn.o_proj.weight"], gate=sd[p + "mlp.gate_proj.weight"],
                        up=sd[p + "mlp.up_proj.weight"], down=sd[p + "mlp.down_proj.weight"]))
    return out


def student_layer_weights(model):
    """Spec section 3: W^S = W @ P on the input side, P @ W on the output side; biases and q/k norm weights
    reused unchanged."""
    return [dict(t, attn_norm=s.attn_norm, ffn_norm=s.ffn_norm, q=t["q"] @ s.P_q, k=t["k"] @ s.P_k,
                 v=t["v"] @ s.P_v, o=s.P_o @ t["o"], gate=t["gate"] @ s.P_gate, up=t["up"] @ s.P_up,
                 down=s.P_down @ t["down"]) for t, s in zip(teacher_layer_weights(model.teacher), model.layers)]


def reference_loss(model, idx, targets, inv_freq=None, terms=("q", "k", "v", "gate", "up", "o", "down")):
    """Every term of L = L_KL + L_LM + alpha * L_clone, from the definitions in spec section 4; L_clone over
    `terms` only. The attention-output term as model.clone_attn_out asks: E(o_s, o_t @ P_o.T) ('student')
    or, the official code's, E(a_s @ W_o.T, a_t @ W_o.T) at teacher width with the teacher's frozen W_o
    ('teacher')."""
    teacher, c = model.teacher, model.teacher.config
    E, W_lm, norm_t = teacher.model.embed_tokens.weight, teacher.lm_head.weight, teacher.model.norm.weight
    tw, sw = teacher_layer_weights(teacher), student_layer_weights(model)
    with torch.no_grad():
        x_t, acts_t = ref_stream(E[idx], tw, c, inv_freq)
        z_t = ref_rms_norm(x_t, norm_t, c.rms_norm_eps) @ W_lm.T
    x_s, acts_s = ref_stream(E[idx] @ model.P_emb, sw, c, inv_freq)
    P_head = model.P_emb if model.P_lm is None else model.P_lm
    z_s = ref_rms_norm(x_s, model.final_norm, c.rms_norm_eps) @ (W_lm @ P_head).T
    clone = 0.0
    for layer, t, a_s, a_t in zip(model.layers, tw, acts_s, acts_t):
        for name in ("q", "k", "v", "gate", "up"):
            if name in terms:
                clone = clone + ((a_s[name] - a_t[name]) ** 2).mean()
        if "o" in terms and model.clone_attn_out == "teacher":
            clone = clone + ((a_s["attn"] @ t["o"].T - a_t["attn"] @ t["o"].T) ** 2).mean()
        elif "o" in terms:
            clone = clone + ((a_s["o"] - a_t["o"] @ layer.P_o.T) ** 2).mean()
        if "down" in terms:
            clone = clone + ((a_s["ffn_out"] - a_t["ffn_out"] @ layer.P_down.T) ** 2).mean()
    B, tau = idx.shape[0], model.tau
    p = torch.softmax(z_t / tau, -1)
    kl = (p * (torch.log_softmax(z_t / tau, -1) - torch.log_softmax(z_s / tau, -1))).sum() / B
    lm = F.cross_entropy(z_s.reshape(-1, z_s.shape[-1]), targets.reshape(-1))
    return kl + lm + model.alpha * clone, dict(kl=kl, lm=lm, clone=clone, z_t=z_t, z_s=z_s)


def check_against_reference(model, idx, targets, teacher_oracle_logits, inv_freq=None):
    """model's loss, its parts and every trainable gradient equal reference_loss; the reference teacher
    equals an outside oracle (transformers' logits). Returns the parts."""
    with torch.no_grad():  # student norms away from 1 so that a swapped norm would show
        for n, p in model.named_parameters():
            if "norm" in n and p.requires_grad:
                p.copy_(0.5 + torch.rand(p.shape))
    loss, parts = model(idx, targets)
    assert set(parts) >= {"kl", "lm", "clone"}
    ref_loss, ref = reference_loss(model, idx, targets, inv_freq)
    # the explicit teacher math is itself checked against transformers
    assert (ref["z_t"] - teacher_oracle_logits).abs().max() < 1e-4
    assert (ref["z_s"] - model.student_logits(idx)).abs().max() < 1e-4
    for name in ("kl", "lm", "clone"):
        got, want = num(parts[name]), float(ref[name].detach())
        assert want > 0
        # at tau = 40 each position's KL is a difference of nearly equal fp32 logs (~1e-4 out of ~4.5):
        # cancellation leaves ~1e-8 absolute error per position, so KL gets an absolute tolerance
        assert got == pytest.approx(want, rel=1e-5, abs=2e-6 if name == "kl" else 1e-7), name
    assert num(loss) == pytest.approx(num(ref_loss), rel=1e-5)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(ref_loss, [p for _, p in trainable])
    loss.backward()
    for (name, p), g in zip(trainable, ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    return parts


@pytest.mark.parametrize("tie_proj,alpha,tau,clone_attn_out", [
    (True, 0.5, 40.0, "student"), (False, 0.5, 40.0, "student"), (True, 0.3, 2.0, "student"),
    (False, 1.7, 1.0, "student"), (True, 0.5, 40.0, "teacher"), (False, 1.7, 1.0, "teacher")])
def test_losses_and_gradients_match_reference(tie_proj, alpha, tau, clone_attn_out, base_ckpt):
    path, hf = base_ckpt
    teacher = lrc.load_qwen2(path)  # untied, GQA 2, head_dim 12 != 32/4
    torch.manual_seed(0)
    model = lrc.LRC(teacher, 20, tie_proj=tie_proj, alpha=alpha, tau=tau, init_std=0.25,
                    clone_attn_out=clone_attn_out)
    idx, targets = tokens(2, 24), tokens(2, 24, seed=7)
    check_against_reference(model, idx, targets, hf_logits(hf, idx))


def test_clone_attn_out_teacher_is_the_official_term():
    """clone_attn_out='teacher' changes exactly the attention-output term, to E(a_s W_o^T, a_t W_o^T): the
    difference of the two L_clone values is recomputed here from the layers' activations alone, and the
    student's forward (hence its logits and export) does not change."""
    teacher = tiny_teacher(seed=2)
    idx, targets = tokens(2, 16), tokens(2, 16, seed=3)
    results = {}
    for mode in ("student", "teacher"):
        torch.manual_seed(0)
        model = lrc.LRC(teacher, 16, init_std=0.2, clone_attn_out=mode)
        with torch.no_grad():
            results[mode] = (num(model(idx, targets)[1]["clone"]), model.student_logits(idx))
    with torch.no_grad():
        E = teacher.model.embed_tokens.weight
        _, acts_s = ref_stream(E[idx] @ model.P_emb, student_layer_weights(model), teacher.config)
        _, acts_t = ref_stream(E[idx], teacher_layer_weights(teacher), teacher.config)
    delta = 0.0
    for layer, block, a_s, a_t in zip(model.layers, teacher.model.layers, acts_s, acts_t):
        W_o = block.self_attn.o_proj.weight
        official = F.mse_loss(a_s["attn"] @ W_o.T, a_t["attn"] @ W_o.T)  # at teacher width d
        paper = F.mse_loss(a_s["o"], a_t["o"] @ layer.P_o.T)             # at student width d_s
        delta += num(official - paper)
    assert abs(delta) > 1e-3  # the two terms really differ here
    assert results["teacher"][0] - results["student"][0] == pytest.approx(delta, rel=1e-4, abs=1e-6)
    assert torch.equal(results["teacher"][1], results["student"][1])
    with pytest.raises(lrc.LRCError) as e:
        lrc.LRC(teacher, 16, clone_attn_out="official")
    assert_one_line_error(e, "clone_attn_out", "official", "student", "teacher")


@pytest.mark.parametrize("clone_terms, terms", [("attn", ("q", "k", "v", "o")), ("ffn", ("gate", "up", "down")),
                                               ("q,down", ("q", "down")), ("none", ())])
def test_selected_clone_terms_match_reference_and_cost_nothing_else(clone_terms, terms, base_ckpt, monkeypatch):
    path, _ = base_ckpt
    torch.manual_seed(0)
    model = lrc.LRC(lrc.load_qwen2(path), 20, tie_proj=False, init_std=0.25, clone_terms=clone_terms)
    assert model.clone_terms == tuple(t for t in lrc.CLONE_TERMS if t in terms)
    idx, targets = tokens(2, 16), tokens(2, 16, seed=7)
    calls = {"mse": 0}
    real_mse = F.mse_loss

    def counting_mse(*args, **kwargs):
        calls["mse"] += 1
        return real_mse(*args, **kwargs)
    monkeypatch.setattr(F, "mse_loss", counting_mse)
    loss, parts = model(idx, targets)
    assert calls["mse"] == len(terms) * model.teacher.config.num_hidden_layers  # unselected terms: not computed
    ref_loss, ref = reference_loss(model, idx, targets, terms=terms)
    assert num(parts["clone"]) == pytest.approx(float(ref["clone"]), rel=1e-5, abs=1e-9)
    assert (num(parts["clone"]) == 0) == (not terms)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(ref_loss, trainable)
    loss.backward()
    for p, g in zip(trainable, ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_alpha_zero_is_weight_generation_with_kl_and_lm_only(base_ckpt):
    path, _ = base_ckpt
    torch.manual_seed(0)
    model = lrc.LRC(lrc.load_qwen2(path), 20, alpha=0.0, init_std=0.25)
    assert model.clone_terms == ()
    idx, targets = tokens(2, 16), tokens(2, 16, seed=7)
    loss, parts = model(idx, targets)
    _, ref = reference_loss(model, idx, targets, terms=())
    assert num(parts["clone"]) == 0.0
    assert num(loss) == pytest.approx(float(ref["kl"] + ref["lm"]), rel=1e-5)
    with pytest.raises(lrc.LRCError, match="clone term 'gat'"):
        lrc.LRC(lrc.load_qwen2(path), 20, clone_terms="q,gat")


# -----------------------------------------------------------------------------
# The chunked loss head (lrc.distill_loss)

def plain_distill(h_s, W_s, targets, h_t=None, W_t=None, tau=40.0):
    B = h_s.shape[0]
    z_s = h_s @ W_s.T
    lm = F.cross_entropy(z_s.reshape(-1, z_s.shape[-1]), targets.reshape(-1), ignore_index=-1)
    if h_t is None:
        kl = torch.zeros(())
    else:
        z_t = h_t @ W_t.T
        log_p = torch.log_softmax(z_t / tau, -1)
        kl = (log_p.exp() * (log_p - torch.log_softmax(z_s / tau, -1))).sum() / B
    return kl + lm, kl, lm


def distill_inputs(with_teacher, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, T, d_s, d, V = 3, 9, 12, 20, 50
    h_s = torch.randn(B, T, d_s, generator=g).requires_grad_()
    W_s = torch.randn(V, d_s, generator=g).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :4] = -1
    targets[2, -1] = -1
    h_t = torch.randn(B, T, d, generator=g) if with_teacher else None
    W_t = torch.randn(V, d, generator=g) if with_teacher else None
    return h_s, W_s, targets, h_t, W_t


@pytest.mark.parametrize("with_teacher", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 5, 7, 27, 1000, None])
@pytest.mark.parametrize("tau", [40.0, 2.0])
def test_distill_loss_matches_plain(with_teacher, chunk_size, tau):
    h_s, W_s, targets, h_t, W_t = distill_inputs(with_teacher)
    total, kl, lm = lrc.distill_loss(h_s, W_s, targets, h_t, W_t, tau=tau, chunk_size=chunk_size)
    g_h, g_W = torch.autograd.grad(total, [h_s, W_s])
    ref_total, ref_kl, ref_lm = plain_distill(h_s, W_s, targets, h_t, W_t, tau=tau)
    r_h, r_W = torch.autograd.grad(ref_total, [h_s, W_s])
    assert num(lm) == pytest.approx(num(ref_lm), rel=1e-5)
    assert num(kl) == pytest.approx(num(ref_kl), rel=1e-5, abs=1e-7)
    assert num(total) == pytest.approx(num(ref_total), rel=1e-5)
    if with_teacher:
        assert num(kl) > 0
    else:
        assert num(kl) == 0.0
    torch.testing.assert_close(g_h, r_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_W, r_W, rtol=1e-5, atol=1e-7)


def test_distill_loss_gradient_is_scaled_by_upstream():
    """The fused head stores d total / d inputs; backward must scale it by the incoming gradient."""
    h_s, W_s, targets, h_t, W_t = distill_inputs(True, seed=3)
    total, _, _ = lrc.distill_loss(h_s, W_s, targets, h_t, W_t, chunk_size=4)
    (3.5 * total).backward()
    h2 = h_s.detach().clone().requires_grad_()
    W2 = W_s.detach().clone().requires_grad_()
    (3.5 * plain_distill(h2, W2, targets, h_t, W_t)[0]).backward()
    torch.testing.assert_close(h_s.grad, h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(W_s.grad, W2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("with_teacher", [True, False])
def test_distill_loss_no_grad_does_no_gradient_work(with_teacher):
    h_s, W_s, targets, h_t, W_t = distill_inputs(with_teacher, seed=1)
    chunk, N = 5, h_s.shape[0] * h_s.shape[1]
    n_chunks = math.ceil(N / chunk)
    with torch.no_grad():
        counter = OpCounter()
        with counter:
            total, kl, lm = lrc.distill_loss(h_s, W_s, targets, h_t, W_t, chunk_size=chunk)
    ref_total, ref_kl, ref_lm = plain_distill(h_s.detach(), W_s.detach(), targets, h_t, W_t)
    assert not total.requires_grad
    assert num(total) == pytest.approx(num(ref_total), rel=1e-5)
    assert num(lm) == pytest.approx(num(ref_lm), rel=1e-5)
    # only the logits matmuls: one per chunk for the student, one more with a teacher
    assert counter.matmuls() == n_chunks * (2 if with_teacher else 1)
    with_grad = OpCounter()
    with with_grad:
        lrc.distill_loss(h_s, W_s, targets, h_t, W_t, chunk_size=chunk)
    assert with_grad.matmuls() > counter.matmuls()  # the counter does see gradient matmuls


def test_distill_loss_bf16_inputs():
    """bf16 hidden states and head (the training dtype): values close to the fp32 computation and the
    gradients come back in the inputs' dtypes."""
    h_s, W_s, targets, h_t, W_t = distill_inputs(True, seed=2)
    hb = h_s.detach().to(torch.bfloat16).requires_grad_()
    Wb = W_s.detach().to(torch.bfloat16).requires_grad_()
    total, _, _ = lrc.distill_loss(hb, Wb, targets, h_t.to(torch.bfloat16), W_t.to(torch.bfloat16), chunk_size=4)
    total.backward()
    ref_total, _, _ = plain_distill(hb.detach().float(), Wb.detach().float(), targets, h_t.bfloat16().float(),
                                    W_t.bfloat16().float())
    assert num(total) == pytest.approx(num(ref_total), rel=2e-2)
    assert hb.grad.dtype == torch.bfloat16 and Wb.grad.dtype == torch.bfloat16


# -----------------------------------------------------------------------------
# Identity property (spec section 3): d_s = d and all projections = I reproduce the teacher

@pytest.mark.parametrize("tie_proj", [True, False])
def test_identity_projections_reproduce_teacher(tie_proj):
    teacher = tiny_teacher(seed=8)
    d = teacher.config.hidden_size
    model = lrc.LRC(teacher, d, tie_proj=tie_proj)
    eye = torch.eye(d)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("P_"):
                p.copy_(eye)
        for layer, block in zip(model.layers, teacher.model.layers):
            layer.attn_norm.copy_(block.input_layernorm.weight)
            layer.ffn_norm.copy_(block.post_attention_layernorm.weight)
        model.final_norm.copy_(teacher.model.norm.weight)
        idx = tokens(2, 20)
        teacher_logits = teacher(idx)
        assert (model.student_logits(idx) - teacher_logits).abs().max() < 1e-5
        loss, parts = model(idx, tokens(2, 20, seed=4))
    assert num(parts["clone"]) < 1e-9
    assert abs(num(parts["kl"])) < 1e-6
    lm = F.cross_entropy(teacher_logits.reshape(-1, 96), tokens(2, 20, seed=4).reshape(-1))
    assert num(parts["lm"]) == pytest.approx(num(lm), rel=1e-5)
    assert num(loss) == pytest.approx(num(lm), rel=1e-5, abs=1e-6)


# -----------------------------------------------------------------------------
# Export (spec section 5)

def trained_lrc(teacher, d_s, tie_proj, steps=3, seed=0):
    torch.manual_seed(seed)
    model = lrc.LRC(teacher, d_s, tie_proj=tie_proj)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and p.requires_grad:
                p.copy_(0.5 + torch.rand(p.shape))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        loss, _ = model(tokens(2, 16, seed=10 + step), tokens(2, 16, seed=20 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


EXPORT_CASES = {  # (teacher tied, tie_proj) -> student tied
    "tied-teacher-tie_proj": (True, True, True),
    "untied-teacher-tie_proj": (False, True, False),
    "tied-teacher-no-tie_proj": (True, False, False),
    "untied-teacher-no-tie_proj": (False, False, False),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_student(case, tmp_path):
    tied_teacher, tie_proj, student_tied = EXPORT_CASES[case]
    teacher = tiny_teacher(seed=9, tied=tied_teacher, head_dim=8)  # head_dim 8 = 32/4 but != 24/4
    d_s = 24
    model = trained_lrc(teacher, d_s, tie_proj)
    assert not torch.equal(model.layers[0].P_q, torch.zeros_like(model.layers[0].P_q))
    student = model.export_student()
    assert isinstance(student, lrc.Qwen2)
    c = student.config
    assert c.hidden_size == d_s and c.head_dim == 8 and c.tie_word_embeddings == student_tied
    assert c.num_hidden_layers == 2 and c.intermediate_size == 64 and c.vocab_size == 96
    assert student.model.embed_tokens.weight.shape == (96, d_s)
    assert student.model.layers[0].self_attn.q_proj.weight.shape == (4 * 8, d_s)
    assert student.model.layers[0].self_attn.o_proj.weight.shape == (d_s, 4 * 8)
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == student_tied
    assert all(not p.requires_grad for p in student.parameters())
    idx = tokens(2, 24, seed=5)
    with torch.no_grad():
        want = model.student_logits(idx)
        got = student(idx)
    assert (got - want).abs().max() < 1e-5

    # save_qwen2 -> load_qwen2 round-trips exactly
    path = str(tmp_path / "student")
    lrc.save_qwen2(student, path, extra_config={"lrc": {"teacher": "tiny", "student_hidden": d_s}})
    config = read_config(path)
    assert config["hidden_size"] == d_s and config["head_dim"] == 8
    assert config["tie_word_embeddings"] is student_tied
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["lrc"]["student_hidden"] == d_s
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in set(f.keys())) == (not student_tied)
    loaded = lrc.load_qwen2(path)
    assert_same_params(loaded, student)
    with torch.no_grad():
        assert torch.equal(loaded(idx), got)

    # transformers loads it with no custom code and agrees
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    assert hf.config.hidden_size == d_s and hf.config.head_dim == 8
    assert hf.model.layers[0].self_attn.q_proj.weight.shape == (32, d_s)
    assert (hf_logits(hf, idx) - want).abs().max() < 1e-4


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_saved_directories_get_the_modes_of_a_plain_mkdir_and_open(tmp_path, umask):
    """A model directory written atomically (a temporary directory renamed into place) ends with the modes the
    process's umask gives a plain mkdir (0777 & ~umask) and open (0666 & ~umask): readable by other users where
    the umask allows it, as transformers' save_pretrained leaves it, not mkdtemp's 0700 and safetensors' 0600.
    Replacing an existing directory too."""
    import stat
    model = tiny_teacher(seed=0)
    old = os.umask(umask)
    try:
        out = str(tmp_path / "model")
        for _ in range(2):  # a new directory, then one that replaces it
            lrc.save_qwen2(model, out, max_shard_bytes=30000)
            assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~umask
            files = os.listdir(out)
            assert len([f for f in files if f.endswith(".safetensors")]) > 1 and "config.json" in files
            for name in files:
                assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o666 & ~umask, name
    finally:
        os.umask(old)


def test_export_from_hf_teacher_and_sharded_save(base_ckpt, tmp_path):
    """A teacher saved by transformers (rope_parameters, dtype, layer_types in config.json) exports to a
    sharded student that both loaders read back."""
    path, hf_teacher = base_ckpt
    teacher = lrc.load_qwen2(path)
    model = trained_lrc(teacher, 16, tie_proj=False, steps=2)
    student = model.export_student()
    out = str(tmp_path / "student")
    lrc.save_qwen2(student, out, max_shard_bytes=3000)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 2
    assert not any(f.startswith(".tmp") for f in os.listdir(tmp_path))  # atomic write leaves no temp dir
    loaded = lrc.load_qwen2(out)
    assert_same_params(loaded, student)
    idx = tokens(2, 20)
    want = model.student_logits(idx).detach()
    assert (loaded(idx) - want).abs().max() < 1e-5
    assert read_config(out)["rope_theta"] == 5000.0 or read_config(out)["rope_parameters"]["rope_theta"] == 5000.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert hf.dtype == torch.float32
    assert (hf_logits(hf, idx) - want).abs().max() < 1e-4
    # overwriting an existing export replaces it
    lrc.save_qwen2(student, out)
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))


def test_save_writes_the_actual_dtype(base_ckpt, tmp_path):
    """A config.json written by transformers 5 carries "dtype"; after loading it in bf16 and saving, both
    dtype keys must say bfloat16, else transformers (which prefers "dtype") loads the bf16 file as fp32."""
    assert read_config(base_ckpt[0]).get("dtype", read_config(base_ckpt[0]).get("torch_dtype")) == "float32"
    model = lrc.load_qwen2(base_ckpt[0], dtype="bf16")
    out = str(tmp_path / "bf16")
    lrc.save_qwen2(model, out)
    config = read_config(out)
    assert config["torch_dtype"] == "bfloat16" and config.get("dtype", "bfloat16") == "bfloat16"
    assert next(lrc.load_qwen2(out).parameters()).dtype == torch.bfloat16
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa")
    assert hf.dtype == torch.bfloat16
    idx = tokens(1, 16)
    with torch.no_grad():
        assert (hf(input_ids=idx).logits.float() - model(idx).float()).abs().mean() < 2e-3


def test_export_dtype(base_ckpt):
    teacher = lrc.load_qwen2(base_ckpt[0])
    model = trained_lrc(teacher, 16, tie_proj=True, steps=1)
    student = model.export_student(dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())
    ref = model.export_student()
    for k, v in student.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k].to(torch.bfloat16)), k


# -----------------------------------------------------------------------------
# KV cache (incremental decoding)

@pytest.mark.parametrize("tied,kv", [(False, 2), (True, 4)])
def test_kv_cache_decoding_matches_full_forward(tied, kv):
    model = tiny_teacher(seed=11, tied=tied, num_key_value_heads=kv)
    B, T = 2, 21
    idx = tokens(B, T, seed=12)
    with torch.no_grad():
        full = model(idx)
        cache = lrc.KVCache(model.config, B, T, "cpu", torch.float32)
        pieces = [model(idx[:, :5], cache=cache)]   # prefill
        pieces.append(model(idx[:, 5:9], cache=cache))  # a multi-token step on top of a cache
        for t in range(9, T):
            pieces.append(model(idx[:, t:t + 1], cache=cache))
    assert cache.pos == T
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5
    with pytest.raises(lrc.LRCError) as e:
        model(idx[:, :1], cache=cache)
    assert_one_line_error(e, "cache")


# -----------------------------------------------------------------------------
# Config round trip

def test_config_round_trip(base_ckpt):
    c = lrc.Qwen2Config.from_pretrained(base_ckpt[0])
    d = c.to_dict()
    assert d["head_dim"] == 12 and d["rope_theta"] == 5000.0 and d["model_type"] == "qwen2"
    assert lrc.Qwen2Config.from_dict(d) == c
    assert json.loads(json.dumps(d)) == d
