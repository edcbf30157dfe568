"""Llama 3.x and dense Qwen3 teachers (issue 13; spec section 2): one decoder layer with a few switches
serves every family. transformers' LlamaForCausalLM and Qwen3ForCausalLM are the oracles for the forward
pass and the exported checkpoints; the LRC losses are recomputed by test_lrc's reference, fed with
transformers' own RoPE frequencies.

Tiny random models (hidden 32, 2 layers, vocab 96 or 320). Llama 3 scaling is only visible beyond
original_max_position_embeddings, so that is set to 32 and the sequences are longer (T = 70): with
theta 5000 and head_dim 12 the six frequencies fall in all three bands (kept, blended, divided by factor).
"""
import os

import pytest
import torch

import lrc
from test_convert import make_lrc
from test_lrc import (assert_one_line_error, assert_same_params, check_against_reference, edit_config, hf_logits,
                      num, randomize_, read_config, tokens)

transformers = pytest.importorskip("transformers")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
T_LONG = 70  # > original_max_position_embeddings: positions where the scaled frequencies matter


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def hf_config(family, vocab=96, hidden=32, heads=4, kv=2, head_dim=12, tied=False, theta=5000.0, rope=LLAMA3):
    cls = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[family]
    config = cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, tie_word_embeddings=tied,
                 rms_norm_eps=1e-5, max_position_embeddings=256,
                 rope_parameters={"rope_theta": theta, **(rope or {"rope_type": "default"})})
    config._attn_implementation = "eager"
    return config


def make_hf(family, seed=0, **kw):
    torch.manual_seed(seed)
    cls = {"llama": transformers.LlamaForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[family]
    return randomize_(cls(hf_config(family, **kw)), seed).eval()


CASES = {  # name: (family, hf_config kwargs)
    "llama-llama3rope-untied-gqa2": ("llama", dict(tied=False)),
    "llama-llama3rope-tied-mha": ("llama", dict(tied=True, kv=4, head_dim=8)),
    "llama-plainrope-tied-gqa4": ("llama", dict(tied=True, kv=1, rope=None)),
    "qwen3-untied-gqa2": ("qwen3", dict(tied=False, rope=None)),
    "qwen3-tied-headdim16": ("qwen3", dict(tied=True, head_dim=16, rope=None, theta=1e6)),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each case's transformers model and the directory transformers saved it to, built once."""
    cache = {}

    def get(case):
        if case not in cache:
            family, kw = CASES[case]
            hf = make_hf(family, seed=1, **kw)
            path = str(tmp_path_factory.mktemp(case))
            hf.save_pretrained(path)
            cache[case] = path, hf
        return cache[case]
    return get


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_fp32(case, saved):
    path, hf = saved(case)
    family, kw = CASES[case]
    model = lrc.load_model(path)
    c = model.config
    assert (c.model_type, c.head_dim, c.tie_word_embeddings) == (family, kw.get("head_dim", 12), kw["tied"])
    assert c.qkv_bias is False and c.qk_norm == (family == "qwen3")
    assert c.rope_scaling == (LLAMA3 if kw.get("rope", LLAMA3) else None)
    names = set(model.state_dict())
    assert not any(n.endswith("_proj.bias") for n in names)
    assert ("model.layers.0.self_attn.q_norm.weight" in names) == (family == "qwen3")
    idx = tokens(2, T_LONG)
    ours, ref = model(idx), hf_logits(hf, idx)
    assert ref.abs().max() > 1.0
    assert (ours - ref).abs().max().item() < 1e-4
    with torch.no_grad():
        h_ref = hf.model(input_ids=idx).last_hidden_state
    assert (model.hidden(idx) - h_ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", ["llama-llama3rope-untied-gqa2", "qwen3-untied-gqa2"])
def test_bf16_runs_transformers_ops(case, saved):
    """In bf16 (the training dtype) the llama3 cos/sin and the q/k norm round where transformers' sdpa
    path rounds (bitwise equal on torch 2.13 CPU when written); asserted with the bar of test_lrc's
    bf16 test, mean |diff| < 2e-3."""
    path, _ = saved(case)
    idx = tokens(2, T_LONG)
    theirs = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                                         attn_implementation="sdpa"), idx)
    ours = lrc.load_model(path, dtype="bf16")(idx)
    assert ours.dtype == torch.bfloat16
    diff = (ours.float() - theirs).abs()
    assert diff.mean().item() < 2e-3 and diff.max().item() < 0.02 * theirs.abs().max().item()


def test_llama3_frequencies_are_transformers_and_matter(saved, tmp_path):
    """Our llama3 frequencies equal transformers' bitwise and cover all three bands; a model loaded
    without the scaling (plain RoPE) is visibly wrong at T > original_max_position_embeddings, so the
    exactness test above would catch a missing or wrong scaling."""
    path, hf = saved("llama-llama3rope-untied-gqa2")
    ours = lrc.rope_inv_freq(12, 5000.0, LLAMA3)
    theirs = hf.model.rotary_emb.inv_freq
    assert torch.equal(ours, theirs)
    plain = lrc.rope_inv_freq(12, 5000.0)
    kept, divided = ours == plain, torch.isclose(ours, plain / 8)
    assert kept.any() and divided.any() and (~kept & ~divided).any(), (ours, plain)
    unscaled = str(tmp_path / "unscaled")
    hf.save_pretrained(unscaled)
    edit_config(unscaled, lambda c: c.update(rope_parameters={"rope_type": "default", "rope_theta": 5000.0}))
    idx = tokens(1, T_LONG)
    assert (lrc.load_model(unscaled)(idx) - hf_logits(hf, idx)).abs().max() > 1e-2
    assert (lrc.load_model(path)(idx) - hf_logits(hf, idx)).abs().max() < 1e-4


def test_config_forms_of_released_files():
    """A Llama-3.2 config.json as released (rope_scaling and top-level rope_theta) and as transformers 5
    writes it (rope_parameters) are the same config; to_dict writes the released form and reads back."""
    base = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5,
                tie_word_embeddings=True, attention_bias=False, mlp_bias=False, pretraining_tp=1)
    released = lrc.ModelConfig.from_dict(dict(base, rope_theta=500000.0, rope_scaling={**LLAMA3, "factor": 32}))
    new = lrc.ModelConfig.from_dict(dict(base, rope_parameters={**LLAMA3, "factor": 32.0, "rope_theta": 500000.0}))
    assert released == new and released.rope_scaling["factor"] == 32.0
    d = released.to_dict()
    assert d["rope_scaling"] == {**LLAMA3, "factor": 32.0} and d["rope_theta"] == 500000.0
    assert (d["architectures"], d["model_type"], d["attention_bias"], d["mlp_bias"]) == \
        (["LlamaForCausalLM"], "llama", False, False)
    assert lrc.ModelConfig.from_dict(d) == released
    # qwen3 without head_dim: 128, as transformers' Qwen3Config (not hidden_size // heads)
    qwen3 = dict(base, model_type="qwen3")
    qwen3.pop("head_dim")
    assert lrc.ModelConfig.from_dict(qwen3).head_dim == transformers.Qwen3Config().head_dim == 128
    assert lrc.ModelConfig.from_dict(dict(qwen3, model_type="llama")).head_dim == 8
    assert lrc.Qwen2Config is lrc.ModelConfig and lrc.Qwen2 is lrc.CausalLM  # the old names still work


LLAMA = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("config,words", [
    (dict(LLAMA, attention_bias=True), ["attention_bias", "llama"]),
    (dict(LLAMA, mlp_bias=True), ["mlp_bias"]),
    (dict(LLAMA, model_type="qwen3", attention_bias=True), ["attention_bias", "qwen3"]),
    (dict(LLAMA, model_type="qwen3", use_sliding_window=True, sliding_window=16), ["sliding"]),
    (dict(LLAMA, model_type="qwen3", layer_types=["full_attention", "sliding_attention"]), ["sliding"]),
    (dict(LLAMA, model_type="qwen3_moe", num_experts=4), ["qwen3_moe", "qwen2", "llama", "qwen3", "MoE"]),
    (dict(LLAMA, model_type="mistral"), ["mistral"]),
    (dict(LLAMA, rope_scaling={"rope_type": "yarn", "factor": 4.0}), ["yarn", "llama3"]),
    (dict(LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0}), ["low_freq_factor"]),
    (dict(LLAMA, rope_theta=5e5, rope_parameters={"rope_type": "default"}, rope_scaling=LLAMA3), ["rope_scaling"]),
    (dict(LLAMA, partial_rotary_factor=0.5), ["partial"]),
], ids=["llama-attention_bias", "llama-mlp_bias", "qwen3-attention_bias", "qwen3-sliding", "qwen3-layer_types",
        "qwen3_moe", "mistral", "yarn", "llama3-incomplete", "rope-disagree", "partial-rotary"])
def test_unsupported_is_refused(config, words):
    with pytest.raises(lrc.LRCError) as e:
        lrc.ModelConfig.from_dict(config)
    assert_one_line_error(e, *words)


def test_unsupported_checkpoint_is_refused_on_load(saved, tmp_path):
    hf = saved("qwen3-untied-gqa2")[1]
    hf.save_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: c.update(use_sliding_window=True, sliding_window=8))
    with pytest.raises(lrc.LRCError) as e:
        lrc.load_model(str(tmp_path))
    assert_one_line_error(e, "sliding")


# -----------------------------------------------------------------------------
# The LRC pipeline on each family: losses, identity, export (spec sections 3-5)

@pytest.mark.parametrize("case,clone_attn_out", [("llama-llama3rope-untied-gqa2", "student"),
                                                 ("llama-llama3rope-tied-mha", "teacher"),
                                                 ("qwen3-untied-gqa2", "student"), ("qwen3-tied-headdim16", "teacher")])
def test_losses_and_gradients_match_reference(case, clone_attn_out, saved):
    path, hf = saved(case)
    teacher = lrc.load_model(path)
    torch.manual_seed(0)
    model = lrc.LRC(teacher, 20, tie_proj=True, init_std=0.25, clone_attn_out=clone_attn_out)
    idx, targets = tokens(2, 40), tokens(2, 40, seed=7)
    check_against_reference(model, idx, targets, hf_logits(hf, idx), inv_freq=hf.model.rotary_emb.inv_freq)
    # the student reuses the teacher's q/k norm weights, frozen (spec section 3)
    assert not any("q_norm" in n or "k_norm" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("case", ["llama-llama3rope-untied-gqa2", "qwen3-tied-headdim16"])
def test_identity_projections_reproduce_teacher(case, saved):
    teacher = lrc.load_model(saved(case)[0])
    d = teacher.config.hidden_size
    model = lrc.LRC(teacher, d)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("P_"):
                p.copy_(torch.eye(d))
        for layer, block in zip(model.layers, teacher.model.layers):
            layer.attn_norm.copy_(block.input_layernorm.weight)
            layer.ffn_norm.copy_(block.post_attention_layernorm.weight)
        model.final_norm.copy_(teacher.model.norm.weight)
        idx = tokens(2, T_LONG)
        assert (model.student_logits(idx) - teacher(idx)).abs().max() < 1e-5
        _, parts = model(idx, tokens(2, T_LONG, seed=4))
    assert num(parts["clone"]) < 1e-9 and abs(num(parts["kl"])) < 1e-6


@pytest.mark.parametrize("case,tie_proj", [("llama-llama3rope-tied-mha", True), ("llama-llama3rope-untied-gqa2", False),
                                           ("qwen3-tied-headdim16", True), ("qwen3-untied-gqa2", True)])
def test_export_loads_in_transformers(case, tie_proj, saved, tmp_path):
    family, kw = CASES[case]
    teacher = lrc.load_model(saved(case)[0])
    model = make_lrc(teacher, 20, tie_proj)  # projections of a trained-looking size: O(1) logits
    student = model.export_student()
    out = str(tmp_path / "student")
    lrc.save_model(student, out)
    config = read_config(out)
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    assert (config["model_type"], config["architectures"], config["hidden_size"]) == (family, [arch], 20)
    assert config["head_dim"] == kw.get("head_dim", 12)  # explicit: 20 // 4 would be 5
    assert config["tie_word_embeddings"] == (kw["tied"] and tie_proj)
    assert config.get("rope_scaling") == (LLAMA3 if family == "llama" else None)
    if family == "qwen3":  # the teacher's q/k norm weights, copied into the export unchanged
        state = student.state_dict()
        assert torch.equal(state["model.layers.1.self_attn.k_norm.weight"],
                           teacher.model.layers[1].self_attn.k_norm.weight)
    assert_same_params(lrc.load_model(out), student)
    idx = tokens(2, T_LONG, seed=5)
    with torch.no_grad():
        want = model.student_logits(idx)
        assert want.abs().max() > 1.0 and (student(idx) - want).abs().max() < 1e-5
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert type(hf).__name__ == arch and hf.config.head_dim == config["head_dim"]
    assert (hf_logits(hf, idx) - want).abs().max() < 1e-4


# -----------------------------------------------------------------------------
# convert.py and eval_tiny.py on a Llama and a Qwen3 teacher

@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_convert_and_eval(family, tmp_path):
    from convert import convert
    from eval_tiny import generate, load_any, perplexity
    from test_convert import hf_logits as hf_dir_logits, write_checkpoint, write_tokenizer
    hf = make_hf(family, seed=2, vocab=320, tied=True, rope=LLAMA3 if family == "llama" else None)
    teacher_dir = str(tmp_path / "teacher")
    hf.save_pretrained(teacher_dir)
    write_tokenizer(teacher_dir)
    model = make_lrc(lrc.load_model(teacher_dir), student_hidden=16, tie_proj=True)
    write_checkpoint(tmp_path / "run", model, teacher_dir, step=5)
    out = convert(str(tmp_path / "run"), str(tmp_path / "student"))
    assert read_config(out)["model_type"] == family and os.path.isfile(os.path.join(out, "tokenizer.json"))
    idx = torch.randint(0, 320, (2, T_LONG), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.student_logits(idx)
    assert want.abs().max() > 1.0 and (hf_dir_logits(out, idx) - want).abs().max() < 1e-4

    # eval_tiny: the training output (exported in memory) and the converted directory are one model, and
    # its perplexity is the one transformers' logits give
    from_run, from_dir = load_any(str(tmp_path / "run")), load_any(out)
    assert from_run.kind.startswith("lrc") and from_dir.tokenizer is not None
    stream = torch.randint(0, 320, (3 * T_LONG + 1,), generator=torch.Generator().manual_seed(1))
    ppl, n = perplexity(from_dir.model, stream, seq_len=T_LONG, batch_size=2)
    assert perplexity(from_run.model, stream, seq_len=T_LONG)[0] == pytest.approx(ppl, rel=1e-5)
    windows = stream[:3 * T_LONG + 1].unfold(0, T_LONG + 1, T_LONG)
    logits = hf_dir_logits(out, windows[:, :-1])
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 320).double(), windows[:, 1:].reshape(-1))
    assert n == 3 * T_LONG and ppl == pytest.approx(torch.exp(nll).item(), rel=1e-5)
    # greedy generation with the KV cache past original_max_position_embeddings equals transformers'
    prompt = idx[:1, :30]
    ours = generate(from_dir.model, prompt, max_new_tokens=12)
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, eos_token_id=None,
            pad_token_id=0)
    assert torch.equal(ours, theirs[:, :ours.shape[1]])
