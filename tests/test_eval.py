"""Tests for eval_tiny.py: perplexity exactly as spec section 8 (checked against transformers),
lm-evaluation-harness style multiple choice on a hand-made task whose answers are known, greedy
generation with a KV cache equal to generation without it and to transformers' generate, and the
command line end to end on teacher, converted student and training output side by side.
Tiny models only: the file runs in well under a minute on 2 CPU cores.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import lrc
from convert import convert
from eval_tiny import (continuation_of, encode_pair, generate, loglikelihoods, model_names, perplexity, read_mc,
                       score_mc)
from test_convert import (CORPUS, make_lrc, make_teacher, read_json, run_cli, tiny_config, write_checkpoint,
                          write_tokenizer)

transformers = pytest.importorskip("transformers")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def hf_model(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


# -----------------------------------------------------------------------------
# perplexity (spec section 8)

def test_perplexity_equals_transformers(tmp_path):
    make_teacher(tmp_path / "teacher", tied=False)
    ours, theirs = lrc.load_qwen2(str(tmp_path / "teacher")), hf_model(tmp_path / "teacher")
    tokens = torch.randint(0, 320, (100,), generator=torch.Generator().manual_seed(0))
    seq_len = 16  # windows start at 0, 16, ..., 80: (100 - 1) // 16 = 6 windows, 96 predicted tokens

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - seq_len, seq_len):  # independent: one window at a time
            window = tokens[start:start + seq_len + 1]
            logits = theirs(input_ids=window[None, :-1]).logits[0]
            nll += F.cross_entropy(logits.double(), window[1:], reduction="sum").item()
            count += seq_len
    assert count == 96

    ppl, n_tokens = perplexity(ours, tokens, seq_len=seq_len, batch_size=4)  # batches of 4 and 2 windows
    assert n_tokens == 96
    assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    # the remainder (tokens 97..99) is dropped, and the batch size changes nothing
    changed = tokens.clone()
    changed[97:] = (changed[97:] + 1) % 320
    assert perplexity(ours, changed, seq_len=seq_len, batch_size=1)[0] == pytest.approx(ppl, rel=1e-6)
    assert ppl > 10  # a random model is far from certain: the test would notice a loss of ~0
    with pytest.raises(lrc.LRCError, match="seq_len"):
        perplexity(ours, tokens[:16], seq_len=16)


# -----------------------------------------------------------------------------
# multiple choice, as lm-evaluation-harness scores it

WORDS = ["<eos>", "color", "of", "sky", "grass", "coal", "blue", "green", "black", "very", "dark", "pale"]


def bigram_model(logit_table):
    """A Qwen2 with no layers is a bigram model: logits(next) = table[previous token]. Embeddings are
    one-hot, so after the final RMSNorm the hidden state is e_i / sqrt(1/V + eps)."""
    V = len(WORDS)
    config = lrc.Qwen2Config(vocab_size=V, hidden_size=V, intermediate_size=4, num_hidden_layers=0,
                             num_attention_heads=1, num_key_value_heads=1, rms_norm_eps=1e-6)
    model = lrc.Qwen2(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(V))
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.copy_(logit_table.T * math.sqrt(1 / V + 1e-6))
    return model.eval()


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def test_multiple_choice_on_hand_made_task_with_known_answers():
    V, ix = len(WORDS), {w: i for i, w in enumerate(WORDS)}
    table = torch.zeros(V, V)
    table[ix["sky"], ix["blue"]] = table[ix["grass"], ix["green"]] = table[ix["coal"], ix["black"]] = 4.0
    table[ix["sky"], ix["very"]] = -1.0
    table[ix["very"], ix["dark"]] = table[ix["dark"], ix["blue"]] = 6.0
    model, tokenizer = bigram_model(table), word_tokenizer()
    items = [
        {"question": "color of sky", "choices": ["blue", "green", "black"], "answer": 0},   # both right
        {"question": "color of grass", "choices": ["blue", "green"], "answer": 1},          # both right
        {"question": "color of coal", "choices": ["black", "green"], "answer": 1},          # both wrong (bad key)
        # summed: "green" (about -4.6) beats "very dark blue" (about -5.6); per character the long one wins
        {"question": "color of sky", "choices": ["green", "very dark blue"], "answer": 1},
    ]
    result = score_mc(model, tokenizer, items, batch_size=3)
    assert (result["acc"], result["acc_norm"], result["n"]) == (0.5, 0.75, 4)
    assert result["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 3))

    # the log-likelihoods themselves, from the table by hand
    log_p = table.log_softmax(-1)
    expected = log_p[ix["sky"], ix["very"]] + log_p[ix["very"], ix["dark"]] + log_p[ix["dark"], ix["blue"]]
    context, continuation = encode_pair(tokenizer, "color of sky", " very dark blue")
    assert (context, continuation) == ([1, 2, 3], [9, 10, 6])
    assert loglikelihoods(model, [(context, continuation)])[0] == pytest.approx(expected.item(), abs=1e-5)


def test_loglikelihoods_batched_equal_transformers(tmp_path):
    """Right padding and batching change nothing; values equal transformers' own log-softmax."""
    make_teacher(tmp_path / "teacher")
    ours, theirs = lrc.load_qwen2(str(tmp_path / "teacher")), hf_model(tmp_path / "teacher")
    g = torch.Generator().manual_seed(1)
    requests = [(torch.randint(0, 320, (n,), generator=g).tolist(), torch.randint(0, 320, (k,), generator=g).tolist())
                for n, k in [(3, 1), (9, 4), (5, 2), (1, 6), (12, 3)]]
    batched = loglikelihoods(ours, requests, batch_size=3)
    for (context, continuation), value in zip(requests, batched):
        with torch.no_grad():
            logits = theirs(input_ids=torch.tensor([context + continuation])).logits[0].double()
        log_p = logits.log_softmax(-1)[len(context) - 1:-1].gather(1, torch.tensor(continuation)[:, None])
        assert value == pytest.approx(log_p.sum().item(), abs=1e-4)
    assert loglikelihoods(ours, requests, batch_size=1) == pytest.approx(batched, abs=1e-5)


def test_encode_pair_handles_the_bpe_boundary_as_lm_eval(tmp_path):
    tokenizer = write_tokenizer(str(tmp_path / "tok"))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    context, continuation = encode_pair(tokenizer, "The capital of France is ", "Paris")
    # the trailing space moves to the continuation: " Paris" is one byte-level word, as in training text
    assert context == encode("The capital of France is")
    assert context + continuation == encode("The capital of France is Paris")
    assert tokenizer.decode(continuation) == " Paris"
    assert continuation_of("The sky is", "blue") == " blue"  # lm-eval's target_delimiter
    assert continuation_of("The sky is", " blue") == " blue"  # data/toy.py choices carry their space
    assert continuation_of("Q: sky?\nA: ", "blue") == "blue"


# -----------------------------------------------------------------------------
# generation with a KV cache

def generation_teacher(directory):
    """No eos in config.json and no generation_config.json, so transformers generates every token."""
    torch.manual_seed(0)
    from test_lrc import randomize_
    model = randomize_(lrc.Qwen2(tiny_config(tied=False)), seed=4, scale=0.3)
    model.config.extra = {}
    lrc.save_qwen2(model, str(directory))
    return lrc.load_qwen2(str(directory))


def test_greedy_generation_with_cache_equals_without_and_transformers(tmp_path):
    model = generation_teacher(tmp_path / "teacher")
    prompt = torch.randint(0, 320, (2, 5), generator=torch.Generator().manual_seed(3))

    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[1]))
    cached = generate(model, prompt, max_new_tokens=40, use_cache=True)
    hook.remove()
    assert calls == [5] + [1] * 39  # the prompt once, then one position per new token

    uncached = generate(model, prompt, max_new_tokens=40, use_cache=False)
    assert cached.shape == (2, 45) and torch.equal(cached, uncached)
    assert len(set(cached[0, 5:].tolist())) > 3  # not a degenerate repeat of one token

    with torch.no_grad():
        theirs = hf_model(tmp_path / "teacher").generate(prompt, attention_mask=torch.ones_like(prompt),
                                                         max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, theirs)


def test_generation_stops_at_eos_and_samples_reproducibly(tmp_path):
    model = generation_teacher(tmp_path / "teacher")
    prompt = torch.randint(0, 320, (1, 4), generator=torch.Generator().manual_seed(7))
    free = generate(model, prompt, max_new_tokens=30)
    eos = free[0, 4 + 9].item()  # the token greedy decoding produces tenth
    first = free[0, 4:].tolist().index(eos)
    stopped = generate(model, prompt, max_new_tokens=30, eos_id=[eos, 319])
    assert torch.equal(stopped, free[:, :4 + first + 1])  # up to and including the first eos

    # top_k=1 sampling is greedy; a seeded generator makes sampling reproducible
    assert torch.equal(generate(model, prompt, 30, temperature=0.8, top_k=1), free)
    a = generate(model, prompt, 30, temperature=1.5, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, 30, temperature=1.5, generator=torch.Generator().manual_seed(1))
    c = generate(model, prompt, 30, temperature=1.5, use_cache=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, free)


def test_model_names_disambiguate():
    assert model_names(["out/toy/teacher", "students/toy", "out/toy"]) == ["teacher", "students/toy", "out/toy"]
    assert model_names(["a/x/", "b/x"]) == ["a/x", "b/x"]
    assert model_names(["x", "x"]) == ["x", "x#2"]


# -----------------------------------------------------------------------------
# the command line: teacher, converted student and training output side by side

def test_eval_cli_side_by_side(tmp_path):
    from data.prepare import open_tokens, prepare
    teacher = make_teacher(tmp_path / "teacher", tied=True)
    model = make_lrc(teacher, student_hidden=16)
    write_checkpoint(tmp_path / "run", model, str(tmp_path / "teacher"), step=9, tokens_seen=576)
    convert(str(tmp_path / "run"), str(tmp_path / "student"))
    with open(tmp_path / "val.txt", "w") as f:
        f.write("\n\n".join(CORPUS[:4]) + "\n")
    prepare(str(tmp_path / "teacher"), [str(tmp_path / "val.txt")], str(tmp_path / "tokens"),
            txt_split="paragraph", progress=False)
    with open(tmp_path / "mc.jsonl", "w") as f:
        for question, choices, answer in [("The sky is", ["blue", "green"], 0), ("Snow is", [" white", " red"], 0),
                                          ("The capital of Italy is", ["Rome", "Paris", "Madrid"], 0)]:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")

    models = [f"--model={tmp_path / 'teacher'}", f"--model={tmp_path / 'student'}", f"--model={tmp_path / 'run'}"]
    result = run_cli("eval_tiny.py", *models, f"--data={tmp_path / 'val.txt'}", "--txt_split=paragraph",
                     f"--mc={tmp_path / 'mc.jsonl'}", "--prompt=The sky is", "--max_new_tokens=8", "--seq_len=16",
                     "--batch_size=3", f"--json={tmp_path / 'eval.json'}")
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    lines = result.stdout.strip().splitlines()
    assert [cell.strip() for cell in lines[0].split("|")[1:-1]] == ["metric", "teacher", "student", "run"]
    assert any(line.startswith("| ppl val.txt (seq_len 16) ") for line in lines)
    assert any(line.startswith("| mc.jsonl acc_norm ") for line in lines)
    report = read_json(tmp_path / "eval.json")
    teacher_r, student_r, run_r = report["models"]
    assert [r["hidden_size"] for r in report["models"]] == [32, 16, 16]
    assert run_r["kind"] == "lrc step 9" and student_r["kind"] == "lrc step 9 (converted)"

    # perplexity on the text equals perplexity on the .bin prepare.py makes of it, computed here
    tokens = torch.from_numpy(open_tokens(str(tmp_path / "tokens"), "train").astype("int64"))
    expected_ppl, expected_n = perplexity(lrc.load_qwen2(str(tmp_path / "teacher")), tokens, seq_len=16)
    assert teacher_r["ppl"]["tokens"] == expected_n == (len(tokens) - 1) // 16 * 16
    assert teacher_r["ppl"]["value"] == pytest.approx(expected_ppl, rel=1e-6)
    # the training output, exported in memory, is the converted student: same numbers
    assert run_r["ppl"]["value"] == pytest.approx(student_r["ppl"]["value"], rel=1e-6)
    assert run_r["ppl"]["value"] != pytest.approx(teacher_r["ppl"]["value"], rel=1e-3)
    mc = str(tmp_path / "mc.jsonl")
    assert run_r["mc"][mc]["n"] == 3
    assert run_r["mc"][mc]["acc"] == student_r["mc"][mc]["acc"]
    assert run_r["generation"]["text"] == student_r["generation"]["text"]
    assert 1 <= run_r["generation"]["new_tokens"] <= 8

    # a prepared .bin directly gives the same number
    result = run_cli("eval_tiny.py", f"--model={tmp_path / 'teacher'}",
                     f"--data={tmp_path / 'tokens' / 'train.bin'}", "--seq_len=16", f"--json={tmp_path / 'bin.json'}")
    assert result.returncode == 0, result.stderr
    assert read_json(tmp_path / "bin.json")["models"][0]["ppl"]["value"] == pytest.approx(expected_ppl, rel=1e-6)


def test_eval_cli_refuses_tokens_of_another_tokenizer(tmp_path):
    from data.prepare import prepare
    make_teacher(tmp_path / "teacher")
    write_tokenizer(str(tmp_path / "other"), vocab_size=300)
    with open(tmp_path / "val.txt", "w") as f:
        f.write(CORPUS[0])
    prepare(str(tmp_path / "other"), [str(tmp_path / "val.txt")], str(tmp_path / "tokens"), progress=False)
    result = run_cli("eval_tiny.py", f"--model={tmp_path / 'teacher'}", f"--data={tmp_path / 'tokens' / 'train.bin'}",
                     "--seq_len=8")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "another tokenizer" in error[0]

    result = run_cli("eval_tiny.py", f"--model={tmp_path / 'teacher'}")
    assert result.returncode == 2 and "nothing to evaluate" in result.stderr


def test_malformed_inputs_are_one_line_before_any_model_loads(tmp_path):
    good = '{"question": "Q", "choices": [" a", " b"], "answer": 1}\n'
    cases = {"bad_json": good + "{not json\n", "not_a_dict": "[1, 2]\n", "missing_key": '{"question": "Q"}\n',
             "answer_range": '{"question": "Q", "choices": [" a"], "answer": 3}\n',
             "choices_type": '{"question": "Q", "choices": " a b", "answer": 0}\n', "empty": "\n"}
    expected = {"bad_json": ":2 is not valid JSON", "not_a_dict": ":1 needs question", "missing_key": ":1 needs question",
                "answer_range": ":1: answer 3", "choices_type": "list of non-empty strings", "empty": "holds no questions"}
    for name, text in cases.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
        with pytest.raises(lrc.LRCError) as e:
            read_mc(str(tmp_path / f"{name}.jsonl"))
        assert expected[name] in str(e.value) and "\n" not in str(e.value), name
    with pytest.raises(lrc.LRCError, match="cannot be read"):
        read_mc(str(tmp_path))                                    # a directory
    # the command line: no model is needed to refuse these (the --model does not even exist)
    (tmp_path / "x.csv").write_text("a,b\n")
    for args, words in [([f"--mc={tmp_path / 'bad_json.jsonl'}"], "is not valid JSON"),
                        ([f"--mc={tmp_path / 'nowhere.jsonl'}"], "cannot be read"),
                        ([f"--data={tmp_path}"], "is a directory"), ([f"--data={tmp_path / 'x.csv'}"], "unknown extension"),
                        (["--prompt=hi", "--max_new_tokens=-1"], "--max_new_tokens=-1"),
                        ([f"--data={tmp_path / 'empty.jsonl'}", "--seq_len=0"], "--seq_len=0"),
                        (["--prompt=hi", f"--json={tmp_path}"], "is a directory"), (["--prompt=hi", "--bogus=1"], "--bogus")]:
        result = run_cli("eval_tiny.py", f"--model={tmp_path / 'no_model'}", *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and words in result.stderr, (args, result.stderr)


# -----------------------------------------------------------------------------
# special-token strings in eval text are text, as in data/prepare.py

def test_eval_text_paths_read_special_token_strings_as_text(tmp_path, monkeypatch):
    import eval_tiny
    from test_data import HIJACK_DOCS, added_ids, write_qwen_style_tokenizer
    tok = write_qwen_style_tokenizer(tmp_path / "tok")
    eos_id, control = tok.token_to_id("<|endoftext|>"), added_ids(tok)
    # perplexity text, .txt and .jsonl: eos only after each document
    (tmp_path / "val.txt").write_text("\n\n".join(HIJACK_DOCS) + "\n")
    with open(tmp_path / "val.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in HIJACK_DOCS)
    for file, split in (("val.txt", "paragraph"), ("val.jsonl", "file")):
        ids = eval_tiny.text_tokens(str(tmp_path / file), str(tmp_path / "tok"), txt_split=split).tolist()
        assert [i for i in ids if i in control] == [eos_id] * len(HIJACK_DOCS), file
    # multiple choice: no control token in any context or continuation the scorer asks about
    asked = []
    monkeypatch.setattr(eval_tiny, "loglikelihoods", lambda model, requests, **kw: asked.extend(requests)
                        or [0.0] * len(requests))
    items = [{"question": "<|im_start|>user\nWhich one?<|im_end|>", "choices": ["<|endoftext|>", "<tool_call>"],
              "answer": 0}]
    score_mc(None, tok, items)
    assert len(asked) == 2 and all(not set(c + k) & control for c, k in asked)
    assert tok.decode(asked[0][0] + asked[0][1]) == items[0]["question"] + " <|endoftext|>"
    # the generation prompt
    prompt = eval_tiny.encode_prompt(tok, "<|im_start|>assistant\n<|endoftext|>", eos_id)
    assert not set(prompt) & control and eval_tiny.encode_prompt(tok, "", eos_id) == [eos_id]
