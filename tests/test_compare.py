"""experiments/toy_compare.py at a tiny size: the one command runs end to end, every method gets the same
data, budget and learning-rate rule, the curves measure what eval_tiny measures, finished runs are reused,
and the table prints without matplotlib. A few seconds of training in all."""
import json
import math
import os
import sys

import pytest

import eval_tiny
import train
from configurator import run_main
from experiments import toy_compare

TINY = ["--seeds=2", "--sweep.lr=1e-2,3e-2", "--sweep.tau=1,40", "--threads=1",
        # toy world and teacher
        "--n_entities=8", "--fact_repeats=2", "--teacher_docs=60", "--student_docs=60", "--val_docs=12",
        "--vocab_size=300", "--toy_teacher_hidden=32", "--toy_teacher_layers=1", "--toy_teacher_ffn=64",
        "--toy_teacher_heads=2", "--toy_teacher_kv_heads=1", "--toy_teacher_steps=3",
        # students
        "--student_hidden=8", "--max_steps=4", "--seq_len=32", "--tokens_per_step=128", "--micro_batch_size=4",
        "--eval_tokens=256", "--eval_interval=1", "--log_interval=1"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("compare"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)  # as without the optional extra: importing it fails
        results = toy_compare.compare([f"--out={out}"] + TINY)
    return out, results


def test_tokens_to_reach():
    curve = [(100, 5.0), (200, 4.0), (300, 3.0), (400, 3.5)]
    assert toy_compare.tokens_to_reach(curve, 3.5) == pytest.approx(250)  # interpolated between 200 and 300
    assert toy_compare.tokens_to_reach(curve, 4.0) == 200
    assert toy_compare.tokens_to_reach(curve, 6.0) == 100                # already below at the first point
    assert toy_compare.tokens_to_reach(curve, 2.9) is None               # never reached
    assert toy_compare.mean_std([1.0, None, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert toy_compare.mean_std([None]) == (None, None)


def test_the_command_runs_every_method_on_equal_terms(compared):
    out, results = compared
    runs = results["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        (m, s) for m in ("lrc", "kd", "scratch") for s in (1337, 1338))
    for seed in (1337, 1338):
        configs = [dict(r["identity"]["config"]) for r in runs if r["seed"] == seed]
        for c in configs:  # everything but the method, its out_dir and its own settings is the same
            for key in ("method", "out_dir", "lr", "tau"):
                c.pop(key)
        assert configs[0] == configs[1] == configs[2]
        assert {r["curve"][-1][0] for r in runs if r["seed"] == seed} == {4 * 128}  # same token budget
        assert len({tuple(t for t, _ in r["curve"]) for r in runs}) == 1            # same evaluation points
    # the tuning rule, the same for every method: each one's grid on the first seed (tau only where there
    # is a KL term), its lowest final val loss wins, and every seed uses the winner
    grid = {"lrc": 4, "kd": 4, "scratch": 2}
    for method in ("lrc", "kd", "scratch"):
        tried = [s for s in results["sweep_runs"] if s["method"] == method]
        assert len(tried) == grid[method] and all(s["seed"] == 1337 for s in tried)
        assert sorted({s["settings"]["lr"] for s in tried}) == [1e-2, 3e-2]
        best = min(tried, key=lambda s: s["final_val_loss"])["settings"]
        assert results["settings"][method] == best
        assert all(r["settings"] == best for r in runs if r["method"] == method)
    # KD reaches its own final loss within the budget, by definition of the target
    assert all(r["tokens_to_kd"] is not None and r["tokens_to_kd"] <= 4 * 128 for r in runs if r["method"] == "kd")
    for r in runs + [{"eval": results["teacher"]}]:
        assert math.isfinite(r["eval"]["val_ppl"]) and r["eval"]["val_ppl"] > 1
        for key in ("facts_seen", "facts_unseen"):
            assert r["eval"][key]["n"] == 4 and 0 <= r["eval"][key]["acc"] <= 1
    # the printed table, the results file, and no plot without matplotlib
    for row in ("| teacher", "| lrc", "| kd", "| scratch"):
        assert row in results["table"]
    assert results["plot"] is None
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["table"] == results["table"]


def test_ablations_are_lrc_rows_with_their_keys_at_lrc_settings(tmp_path):
    no_sweep = [a for a in TINY if not a.startswith(("--seeds=", "--sweep."))]
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)
        results = toy_compare.compare([f"--out={tmp_path}", "--seeds=1", "--ablations"] + no_sweep)
    assert list(results["rows"]) == ["lrc", "kd", "scratch"] + list(toy_compare.ABLATIONS)
    runs = {r["method"]: r for r in results["runs"]}
    lrc_config = dict(runs["lrc"]["identity"]["config"])
    for name, keys in toy_compare.ABLATIONS.items():
        config = dict(runs[name]["identity"]["config"])
        assert config.pop("method") == "lrc" and {k: config[k] for k in keys} == keys
        different = {k for k in config if config[k] != lrc_config[k]}
        assert different == set(keys) | {"out_dir"}, name            # the same budget, seed, lr and tau
        assert f"| {name}" in results["table"]
    # what each one trained: no clone term at alpha = 0; attention-only and FFN-only clone something else
    clones = {}
    for name in ("lrc", "lrc-attn", "lrc-ffn", "lrc-alpha0"):
        with open(os.path.join(runs[name]["run_dir"], "metrics.jsonl")) as f:
            clones[name] = [json.loads(line)["clone"] for line in f if '"loss"' in line]
    assert all(c == 0.0 for c in clones["lrc-alpha0"]) and clones["lrc"][0] > 0
    assert clones["lrc-attn"][0] + clones["lrc-ffn"][0] == pytest.approx(clones["lrc"][0], rel=1e-4)


def test_curves_are_what_eval_tiny_measures(compared):
    """train.py's validation loss (the curves) equals eval_tiny's loss on the same windows for every method,
    LRC included (train-time student vs exported Qwen2): the methods are compared on one quantity."""
    out, results = compared
    cfg = dict(results["student_config"])
    paths = {key: os.path.join(out, "data", name) for key, name in (("student_tokens", "tokens/student"),
                                                                    ("facts_seen", "facts_seen.jsonl"),
                                                                    ("facts_unseen", "facts_unseen.jsonl"))}
    evaluate = toy_compare.Evaluator(cfg, paths, results["teacher"]["dir"])
    for r in results["runs"]:
        model = eval_tiny.load_any(r["run_dir"], teacher=results["teacher"]["dir"]).model
        ppl, _ = eval_tiny.perplexity(model, evaluate.curve_tokens, cfg["seq_len"])
        assert math.log(ppl) == pytest.approx(r["final_val_loss"], abs=1e-4), r["method"]


def test_finished_runs_are_reused(compared, monkeypatch, capsys):
    out, results = compared
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    again = toy_compare.compare([f"--out={out}"] + TINY)
    assert again["table"] == results["table"]
    printed = capsys.readouterr().out
    assert "teacher: reusing" in printed and "plot: skipped, matplotlib is not installed" in printed


@pytest.mark.parametrize("arg, words", [("--method=kd", "all three methods"), ("--out_dir=x", "--out=DIR"),
                                        ("--seeds=0", "at least one seed"), ("--sweep.lr=fast", "is not float"),
                                        ("--kd.method=lrc", "all three methods"), ("--sweep.lrr=1", "did you mean"),
                                        ("--eval_interval=0", "validation curves"), ("--n_entities=many", "integer"),
                                        ("--no_such_key=1", "unknown config key"),
                                        ("--out={tmp}/FILE", "is a file")])
def test_bad_arguments_are_one_line_errors(arg, words, capsys, tmp_path):
    (tmp_path / "FILE").write_text("a file where a directory belongs")
    assert run_main(toy_compare.main, [f"--out={tmp_path}", arg.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err


def test_plot_with_matplotlib(compared, tmp_path):
    pytest.importorskip("matplotlib")  # the optional extra; without it the table alone is the result
    out, results = compared
    png = toy_compare.plot(results["runs"], results["summary"], results["teacher"], str(tmp_path / "p.png"), "t")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_per_method_settings_and_overrides():
    _, _, cfg, settings, sweep = toy_compare.parse_args([])
    assert settings == toy_compare.PER_METHOD and sweep == {}
    _, _, cfg, settings, _ = toy_compare.parse_args(["--lr=0.005", "--kd.tau=4", "--max_steps=7"])
    assert cfg["max_steps"] == 7 and all(settings[m]["lr"] == 0.005 for m in settings)  # for everyone
    assert settings["kd"]["tau"] == 4.0 and settings["lrc"]["tau"] == toy_compare.PER_METHOD["lrc"]["tau"]
