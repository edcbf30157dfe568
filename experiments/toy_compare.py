"""
LRC against KD and training from scratch, at equal tokens, in the toy world. One command:

    python experiments/toy_compare.py [--out=out/compare] [--seeds=3] [--threads=N] [--plot=PNG]
        [--ablations] [--n_entities=N ...toy sizes] [config/FILE.py] [--key=value ...] [--kd.key=value ...]
        [--sweep.key=V1,V2,... ...]

1. builds (or reuses) the toy world in OUT/data (data/toy.py: general text plus synthetic facts, half of
   them in the students' text too, half in the teacher's text only), and trains the toy teacher once
   (train.py, method=scratch, on the teacher's text; cached in OUT/teacher);
2. for each seed trains three students of one shape (the LRC student's exported shape) with the same
   token budget, batches (train.py's window order depends on the seed alone), initialisation seed and
   evaluation points:  lrc (projections of the frozen teacher), kd (random init, L_KL + L_LM) and
   scratch (random init, L_LM only); with --ablations also four LRC variants at lrc's settings
   (ABLATIONS below): without the FFN clone terms, without the attention clone terms, with alpha=0,
   and with the official code's attention-output term;
3. evaluates the teacher and every student with eval_tiny: perplexity on val.txt (spec section 8) and
   multiple-choice recall of the facts the students saw (facts_seen.jsonl) and of the teacher-only
   facts (facts_unseen.jsonl); chance is 25%;
4. prints one table (mean +- std over seeds) with the training tokens each method needed to reach the
   KD student's final validation loss, writes OUT/results.json and a PNG of validation loss against
   training tokens (if matplotlib is installed; without it the table still prints).

Settings. config/toy_compare.py holds what all students share (train.py keys); --key=value sets a
train.py key for every student alike. Learning rate and KL temperature are per method (PER_METHOD
below), the winners of one sweep with the same grid for every method; --kd.lr=X sets one method's.
--sweep.lr=1e-3,1e-2 --sweep.tau=1,40 reruns that tuning: on the first seed every method is trained at
every combination of the swept keys it uses, the lowest final validation loss wins, and the other seeds
use the winner (equal effort for every method, never LRC alone).
Finished runs are cached (OUT/runs/*/compare_run.json): rerunning the command with the same settings
only re-prints the table and redraws the plot. Delete OUT to start over.
"""
import contextlib
import itertools
import json
import math
import os
import sys
import time

if __name__ == "__main__":  # run as a script: make lrc.py, train.py and the data package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

import checkpoint
import eval_tiny
import train
from configurator import run_main
from data.prepare import load_tokenizer, read_meta
from data.toy import DEFAULT_SIZES, build_toy, toy_teacher_recipe
from lrc import LRCError, atomic_file, check_writable_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(REPO, "config", "toy_compare.py")
METHODS = ("lrc", "kd", "scratch")
# --ablations: LRC with parts of its objective switched off or replaced, each a row of its own, trained at the
# lrc row's settings (budget, seeds, lr, tau) with these train.py keys on top
ABLATIONS = {
    "lrc-attn": {"clone_terms": "attn"},              # L_clone without the FFN terms (gate, up, down)
    "lrc-ffn": {"clone_terms": "ffn"},                # L_clone without the attention terms (q, k, v, o)
    "lrc-alpha0": {"alpha": 0.0},                     # weight generation with L_KL + L_LM only
    "lrc-official-o": {"clone_attn_out": "teacher"},  # the official code's attention-output term (spec section 4)
}
# this script's own options (the rest are train.py keys or data/toy.py sizes); --ablations alone is a flag
OPTIONS = {"out": "out/compare", "seeds": "3", "threads": "0", "plot": None, "ablations": False}
# train.py keys this script sets itself for each run: overriding them would break the comparison
RESERVED = {"method": "all three methods are trained", "out_dir": "use --out=DIR",
            "teacher": "the toy teacher is trained here", "data": "the toy world is built here",
            "resume": "finished runs are reused automatically", "stop_step": "every run goes to max_steps"}
# Each method's learning rate and KL temperature: the winners of one equal sweep, the same grid for every
# method on the first seed at the preset's budget (README: the sweep's numbers), made with
#     python experiments/toy_compare.py --sweep.lr=1e-3,3e-3,1e-2,3e-2 --sweep.tau=1,40
# KD's best tau is 1; LRC's is the spec's 40. A --key=value on the command line replaces these for all
# methods; --kd.tau=4 replaces one method's.
PER_METHOD = {"lrc": {"lr": 1e-2, "tau": 40.0}, "kd": {"lr": 3e-3, "tau": 1.0}, "scratch": {"lr": 3e-3}}
# keys a method never reads (not swept for it): scratch has no KL term, only LRC has projections and L_clone
UNUSED = {"lrc": set(), "kd": {"alpha", "init_std"}, "scratch": {"tau", "alpha", "init_std"}}


def parse_args(argv):
    """(options, toy sizes, train config, per-method settings, sweep grid). Bad input: a one-line LRCError."""
    options, sizes, train_args = dict(OPTIONS), dict(DEFAULT_SIZES), [PRESET]
    overrides, sweep, shared = {m: {} for m in METHODS}, {}, set()
    for arg in argv:
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        prefix, dot, name = key.partition(".")
        if dot and (prefix in METHODS or prefix == "sweep"):
            if not eq or not value:
                raise LRCError(f"{arg!r}: write --{key}=VALUE{',VALUE...' if prefix == 'sweep' else ''}")
            if name in RESERVED:
                raise LRCError(f"--{key} cannot be set here ({RESERVED[name]})")
            if prefix == "sweep":
                sweep[name] = [_train_value(name, v, arg) for v in value.split(",") if v.strip()]
            else:
                overrides[prefix][name] = _train_value(name, value, arg)
        elif key == "ablations" and not eq:
            options["ablations"] = True
        elif key in OPTIONS or key in DEFAULT_SIZES:
            if not eq:
                raise LRCError(f"{arg!r}: write options as --{key}=VALUE")
            if key in DEFAULT_SIZES:
                sizes[key] = _int(key, value)
            else:
                options[key] = value
        elif key in RESERVED:
            raise LRCError(f"--{key} cannot be set here ({RESERVED[key]})")
        else:
            train_args.append(arg)  # a train.py key or config file: train.parse_args checks it
            if eq:
                shared.add(key)
    cfg = train.parse_args(train_args)
    for name, keys in ABLATIONS.items():  # checked now, not when the row's turn to train comes
        for key, value in keys.items():
            train.KEYS.check(key, value, f"the {name} ablation")
    seeds = options["seeds"]
    if "," in str(seeds):
        options["seeds"] = [_int("seeds", s) for s in str(seeds).split(",") if s.strip()]
    else:
        n = _int("seeds", seeds)
        if n < 1:
            raise LRCError(f"--seeds={seeds}: need at least one seed")
        options["seeds"] = [cfg["seed"] + i for i in range(n)]
    if len(set(options["seeds"])) != len(options["seeds"]):
        raise LRCError(f"--seeds={seeds} repeats a seed: give distinct seeds")
    options["threads"] = _int("threads", options["threads"])
    if cfg["eval_tokens"] < cfg["seq_len"] or cfg["eval_interval"] < 1:
        raise LRCError("the comparison needs validation curves: set --eval_interval >= 1 and --eval_tokens >= "
                       "--seq_len")
    if options["plot"] is None:
        options["plot"] = os.path.join(options["out"], "toy_compare.png")
    # each method's own settings: the sweep's winners (PER_METHOD), unless the command line sets the key
    # for everyone, then --METHOD.key=value
    settings = {m: {**{k: cfg[k] if k in shared else v for k, v in PER_METHOD[m].items()}, **overrides[m]}
                for m in METHODS}
    return options, sizes, cfg, settings, sweep


def _train_value(key, text, arg):
    """A --sweep.KEY / --METHOD.KEY value, parsed and checked as train.py parses --KEY=text."""
    return train.KEYS.parse_value(key, text.strip(), arg)


def _int(key, value):
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LRCError(f"--{key}={value!r} is not an integer") from None


# -----------------------------------------------------------------------------
# the teacher: trained once by train.py (method=scratch on the teacher's text), saved as a Qwen2 directory

def get_teacher(cfg, paths, out, say):
    """OUT/teacher (a Qwen2 directory with the toy tokenizer), trained by train.py's own toy-teacher function
    (method=scratch on the teacher's text, log in OUT/teacher_run/train.log) unless a cached one has this recipe."""
    teacher_dir, run_dir = os.path.join(out, "teacher"), os.path.join(out, "teacher_run")
    os.makedirs(run_dir, exist_ok=True)
    recipe = toy_teacher_recipe(cfg, paths)
    say(f"teacher: {recipe['spec']['num_hidden_layers']}-layer, hidden-{recipe['spec']['hidden_size']} Qwen2 from "
        f"scratch on the teacher's text, {recipe['steps']} steps x {cfg['tokens_per_step']:,} tokens "
        f"(log: {os.path.join(run_dir, 'train.log')})")
    with open(os.path.join(run_dir, "train.log"), "a") as log, contextlib.redirect_stdout(log):
        summary = train.build_toy_teacher(cfg, paths, teacher_dir, run_dir)
    say(f"teacher: reusing {teacher_dir}" if summary is None else
        f"teacher: {summary['tokens_seen']:,} tokens in {summary['wall_s']:.0f} s, saved to {teacher_dir}")
    return teacher_dir


def quiet_train(run_cfg, log_path):
    """train.train with its log lines in a file instead of the terminal."""
    with open(log_path, "w") as log, contextlib.redirect_stdout(log):
        return train.train(run_cfg)


# -----------------------------------------------------------------------------
# the students

def run_name(method, seed, settings):
    """kd_seed1337_lr0.003_tau1: the method, seed and the method's own settings."""
    parts = [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(settings.items())]
    return "_".join([method, f"seed{seed}"] + parts).replace("/", "-").replace(" ", "")


def read_curve(run_dir, tokens_per_step):
    """[(tokens, val loss)] from train.py's eval rows in metrics.jsonl: the student's LM cross-entropy
    on the same validation windows for every method (train.evaluate's val_lm)."""
    curve = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "val_lm" in row:
                curve.append((row["step"] * tokens_per_step, row["val_lm"]))
    return curve


def train_student(cfg, method, seed, settings, teacher_dir, paths, out, say=lambda msg: None):
    """Train (or reuse) one student (method: lrc, kd, scratch or an ABLATIONS row, which trains method=lrc with
    its keys in settings); returns its record (config, curve, training time)."""
    run_dir = os.path.join(out, "runs", run_name(method, seed, settings))
    # scratch gets the teacher too, for the student's shape only: train.py never reads its weights then
    run = dict(cfg, **settings, method="lrc" if method in ABLATIONS else method, seed=seed, teacher=teacher_dir, data=paths["student_tokens"],
               out_dir=run_dir, resume=False, overwrite=True, stop_step=None, save_interval=0, keep_last=1,
               wandb_project=None)
    # what makes a finished run reusable: the same settings, teacher weights and toy world
    identity = {"config": run, "teacher_fingerprint": checkpoint.teacher_fingerprint(teacher_dir),
                "toy": paths["manifest_data"]["sizes"]}
    marker = os.path.join(run_dir, "compare_run.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            record = json.load(f)
        if record.get("identity") == identity and os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
            return record
    os.makedirs(run_dir, exist_ok=True)
    if os.path.exists(marker):
        os.remove(marker)
    say(f"  {method:<7} seed {seed} {describe(settings)}: training (log: {os.path.join(run_dir, 'train.log')})")
    cpu = time.process_time()
    summary = quiet_train(run, os.path.join(run_dir, "train.log"))
    curve = read_curve(run_dir, cfg["tokens_per_step"])
    if not curve:
        raise LRCError(f"{run_dir}/metrics.jsonl has no validation rows: is --eval_tokens > 0?")
    record = {"method": method, "seed": seed, "settings": settings, "run_dir": run_dir, "identity": identity,
              "tokens": summary["tokens_seen"], "train_s": summary["wall_s"], "train_cpu_s": time.process_time() - cpu,
              "trainable_params": summary["trainable_params"], "curve": curve, "final_val_loss": curve[-1][1]}
    write_json(marker, record)
    return record


def write_json(path, obj):
    with atomic_file(path) as f:
        json.dump(obj, f, indent=1)


# -----------------------------------------------------------------------------
# evaluation with eval_tiny: the same code and the same tokens for the teacher and every student

class Evaluator:
    def __init__(self, cfg, paths, teacher_dir):
        self.teacher_dir, self.seq_len = teacher_dir, cfg["seq_len"]
        self.tokenizer, self.eos_id, _ = load_tokenizer(teacher_dir)
        meta = read_meta(paths["student_tokens"])
        # val.bin is val.txt tokenized per document with eos after each (spec sections 7 and 8)
        self.val = eval_tiny.bin_tokens(os.path.join(paths["student_tokens"], "val.bin"), meta["vocab_size"])
        self.facts = {key: eval_tiny.read_mc(paths[key]) for key in ("facts_seen", "facts_unseen")}
        # the windows train.py's evaluate() reads (its curves): the first eval_tokens // seq_len windows
        n_windows = min(cfg["eval_tokens"] // self.seq_len, (len(self.val) - 1) // self.seq_len)
        self.curve_tokens = self.val[:n_windows * self.seq_len + 1]

    @torch.no_grad()
    def __call__(self, path, curve_loss=False):
        model = eval_tiny.load_any(path, teacher=self.teacher_dir).model
        ppl, n_tokens = eval_tiny.perplexity(model, self.val, seq_len=self.seq_len, batch_size=16)
        result = {"val_ppl": ppl, "val_loss": math.log(ppl), "val_tokens": n_tokens}
        for key, items in self.facts.items():
            scores = eval_tiny.score_mc(model, self.tokenizer, items, batch_size=32, eos_id=self.eos_id,
                                        max_len=model.config.max_position_embeddings)
            result[key] = scores
        if curve_loss:  # the teacher's loss on the curves' windows: a reference line in the plot
            result["curve_val_loss"] = math.log(eval_tiny.perplexity(model, self.curve_tokens, self.seq_len)[0])
        return result


# -----------------------------------------------------------------------------
# tokens to reach a target loss, statistics and the table

def tokens_to_reach(curve, target):
    """Training tokens at which the validation curve [(tokens, loss)] first reaches `target`, linearly
    interpolated between the two evaluations around the crossing; None if it never does. A curve that
    is already below target at its first evaluation returns that evaluation's tokens (an upper bound)."""
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(tokens)
            t0, l0 = previous
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        previous = (tokens, loss)
    return None


def mean_std(values):
    """(mean, sample std) of the non-None values; std 0 for one value; (None, None) for none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarize(records, teacher_eval, names=METHODS):
    """Per row (each method or ablation, and the teacher): each metric's values over seeds, mean and std."""
    rows = {"teacher": {"val_ppl": [teacher_eval["val_ppl"]], "seen_acc": [teacher_eval["facts_seen"]["acc"]],
                        "unseen_acc": [teacher_eval["facts_unseen"]["acc"]]}}
    for method in names:
        mine = [r for r in records if r["method"] == method]
        rows[method] = {"val_ppl": [r["eval"]["val_ppl"] for r in mine],
                        "seen_acc": [r["eval"]["facts_seen"]["acc"] for r in mine],
                        "unseen_acc": [r["eval"]["facts_unseen"]["acc"] for r in mine],
                        "final_val_loss": [r["final_val_loss"] for r in mine],
                        "tokens_to_kd": [r["tokens_to_kd"] for r in mine],
                        "train_s": [r["train_s"] for r in mine]}
    return {name: {metric: {"values": values, "mean": mean_std(values)[0], "std": mean_std(values)[1]}
                   for metric, values in row.items()} for name, row in rows.items()}


def count(n):
    """A token count for people: 950, 12.3k, 410k, 1.23M."""
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e5:
        return f"{n / 1e3:.0f}k"
    return f"{n / 1e3:.1f}k" if n >= 1e3 else f"{n:.0f}"


def fmt(stat, kind):
    mean, std, values = stat["mean"], stat["std"], stat["values"]
    if kind == "tokens":
        reached = sum(v is not None for v in values)
        if mean is None:
            return f"not reached (0/{len(values)})"
        text = count(mean) + (f" ± {count(std)}" if len(values) > 1 else "")
        return text + (f" ({reached}/{len(values)} reached)" if reached < len(values) else "")
    if kind == "pct":
        return f"{100 * mean:.1f}%" + (f" ± {100 * std:.1f}" if len(values) > 1 else "")
    if kind == "s":
        return f"{mean:.0f}"
    return f"{mean:.3f}" + (f" ± {std:.3f}" if len(values) > 1 else "")


def table(summary, n_seeds, teacher_tokens, budget, bound=False):
    header = ["model", "val ppl", "seen facts acc", "teacher-only facts acc", "tokens to KD's final val loss",
              "train s/run"]
    rows = [["teacher", fmt(summary["teacher"]["val_ppl"], "f"), fmt(summary["teacher"]["seen_acc"], "pct"),
             fmt(summary["teacher"]["unseen_acc"], "pct"), f"(trained on {count(teacher_tokens)} teacher tokens)",
             "-"]]
    for method in (name for name in summary if name != "teacher"):
        s = summary[method]
        rows.append([method, fmt(s["val_ppl"], "f"), fmt(s["seen_acc"], "pct"), fmt(s["unseen_acc"], "pct"),
                     fmt(s["tokens_to_kd"], "tokens"), fmt(s["train_s"], "s")])
    widths = [max(len(r[j]) for r in [header] + rows) for j in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows]
    out.append(f"students: {count(budget)} training tokens each; mean ± std over {n_seeds} seed(s); "
               f"chance on the facts is 25%; val ppl on val.txt (spec section 8)")
    if bound:
        out.append("tokens to KD's final val loss: some runs were already there at their first evaluation, "
                   "so those counts are upper bounds (a smaller --eval_interval resolves them)")
    return "\n".join(out)


def plot(records, summary, teacher_eval, path, title):
    """Validation loss against training tokens, mean over seeds with the min-max band. Returns the path,
    or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = {"lrc": "tab:red", "kd": "tab:blue", "scratch": "tab:gray", "lrc-attn": "tab:orange",
              "lrc-ffn": "tab:green", "lrc-alpha0": "tab:purple", "lrc-official-o": "tab:brown"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in (name for name in summary if name != "teacher"):
        curves = [r["curve"] for r in records if r["method"] == method]
        n = min(len(c) for c in curves)
        tokens = [curves[0][i][0] / 1e3 for i in range(n)]
        losses = [[c[i][1] for c in curves] for i in range(n)]
        ax.plot(tokens, [sum(v) / len(v) for v in losses], color=colors[method], label=method, linewidth=2)
        if len(curves) > 1:
            ax.fill_between(tokens, [min(v) for v in losses], [max(v) for v in losses], color=colors[method],
                            alpha=0.2, linewidth=0)
    ax.axhline(teacher_eval["curve_val_loss"], color="black", linestyle="--", linewidth=1, label="teacher")
    kd_final = summary["kd"]["final_val_loss"]["mean"]
    ax.axhline(kd_final, color=colors["kd"], linestyle=":", linewidth=1, label="kd final (target)")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("validation loss (student LM cross-entropy, nats)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -----------------------------------------------------------------------------

def tune(student, settings, sweep, seed, say):
    """The same tuning for every method: each method's grid is the product of the swept values of the keys it
    uses; the lowest final validation loss on the first seed wins (its run is that seed's result). Updates
    settings in place; returns the sweep's rows for results.json."""
    sweep_rows = []
    for method in METHODS:
        keys = [k for k in sweep if k not in UNUSED[method]]
        if not keys:
            continue
        say(f"sweep {method} on seed {seed}: " + ", ".join(f"{k} in {sweep[k]}" for k in keys))
        tried = [student(method, seed, dict(settings[method], **dict(zip(keys, values))))
                 for values in itertools.product(*(sweep[k] for k in keys))]
        sweep_rows += [{"method": method, "seed": seed, "settings": r["settings"],
                        "final_val_loss": r["final_val_loss"]} for r in tried]
        settings[method] = min(tried, key=lambda r: r["final_val_loss"])["settings"]
    say("settings: " + "; ".join(f"{m} {describe(settings[m])}" for m in METHODS)
        + (" (sweep winners)" if sweep else ""))
    return sweep_rows


def evaluate_runs(records, evaluate, teacher_dir, seeds):
    """Evaluate the teacher and each run (cached in its compare_run.json), and the tokens each run took to
    reach its seed's KD student's final validation loss. Returns the teacher's evaluation."""
    teacher_eval = evaluate(teacher_dir, curve_loss=True)
    for record in records:
        if "eval" not in record:
            record["eval"] = evaluate(record["run_dir"])
            write_json(os.path.join(record["run_dir"], "compare_run.json"), record)
    for seed in seeds:
        target = next(r["final_val_loss"] for r in records if r["method"] == "kd" and r["seed"] == seed)
        for r in records:
            if r["seed"] == seed:
                r["tokens_to_kd"] = tokens_to_reach(r["curve"], target)
                # reached at the first evaluation: the count is an upper bound
                r["tokens_to_kd_bound"] = r["tokens_to_kd"] is not None and r["tokens_to_kd"] == r["curve"][0][0]
    return teacher_eval


def describe(settings):
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(settings.items()))


def compare(argv):
    t_start, cpu_start = time.time(), time.process_time()
    options, sizes, cfg, settings, sweep = parse_args(argv)
    if options["threads"] > 0:
        torch.set_num_threads(options["threads"])
    out, seeds = options["out"], options["seeds"]
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    check_writable_dir(out)
    os.makedirs(out, exist_ok=True)

    paths = build_toy(os.path.join(out, "data"), seed=cfg["seed"], **sizes)
    facts = paths["manifest_data"]["n_facts"]
    say(f"toy world: {paths['root']} ({facts['seen']} seen + {facts['unseen']} teacher-only facts, "
        f"{paths['manifest_data']['n_tokens']['student']['train']:,} student training tokens)")
    teacher_dir = get_teacher(cfg, paths, out, say)
    n_steps = cfg["max_steps"]
    if n_steps is None:
        n_steps = math.ceil(cfg["max_tokens"] / cfg["tokens_per_step"])
    budget = n_steps * cfg["tokens_per_step"]
    say(f"students: hidden {cfg['student_hidden']}, {n_steps} steps x {cfg['tokens_per_step']:,} tokens = "
        f"{budget:,} tokens each, validation every {cfg['eval_interval']} steps; seeds {seeds}")

    def student(method, seed, mine):
        record = train_student(cfg, method, seed, mine, teacher_dir, paths, out, say)
        say(f"  {method:<7} seed {seed} {describe(mine)}: val loss {record['final_val_loss']:.4f} after "
            f"{record['tokens']:,} tokens ({record['train_s']:.0f} s)")
        return record

    sweep_rows = tune(student, settings, sweep, seeds[0], say)
    rows = METHODS + (tuple(ABLATIONS) if options["ablations"] else ())
    for name in ABLATIONS:  # each ablation: the lrc row's settings with its keys on top
        settings[name] = {**settings["lrc"], **ABLATIONS[name]}
    records = [student(name, seed, settings[name]) for seed in seeds for name in rows]
    say("evaluating (eval_tiny: perplexity on val.txt, multiple choice on the facts)")
    teacher_eval = evaluate_runs(records, Evaluator(cfg, paths, teacher_dir), teacher_dir, seeds)
    summary = summarize(records, teacher_eval, rows)
    with open(os.path.join(teacher_dir, "config.json")) as f:
        recipe = json.load(f)["lrc_toy_teacher"]
    teacher_tokens = recipe["steps"] * recipe["tokens_per_step"]
    text = table(summary, len(seeds), teacher_tokens, budget, any(r["tokens_to_kd_bound"] for r in records))
    say("")
    say(text)
    say("settings: " + "; ".join(f"{m} {describe(settings[m])}" for m in rows))
    lrc_tokens, kd_tokens = summary["lrc"]["tokens_to_kd"]["mean"], summary["kd"]["tokens_to_kd"]["mean"]
    if lrc_tokens and kd_tokens and summary["lrc"]["tokens_to_kd"]["values"].count(None) == 0:
        say(f"LRC reaches the KD student's final validation loss after {lrc_tokens / kd_tokens:.0%} of KD's "
            f"tokens ({kd_tokens / lrc_tokens:.1f}x fewer)")
    title = (f"toy world: students of hidden {cfg['student_hidden']}, teacher hidden "
             f"{cfg['toy_teacher_hidden']}; mean and min-max over {len(seeds)} seed(s)")
    png = plot(records, summary, teacher_eval, options["plot"], title)
    say(f"plot: {png}" if png else "plot: skipped, matplotlib is not installed (pip install matplotlib); the "
                                   "table above and results.json hold every number")
    wall, cpu = time.time() - t_start, time.process_time() - cpu_start
    results = {"command": "python experiments/toy_compare.py " + " ".join(argv), "seeds": seeds, "rows": rows,
               "settings": settings, "sweep": sweep, "sweep_runs": sweep_rows, "toy_sizes": sizes, "student_config": cfg,
               "budget_tokens": budget, "teacher": {"dir": teacher_dir, "train_tokens": teacher_tokens, **teacher_eval},
               "runs": records, "summary": summary, "table": text, "plot": png, "wall_s": wall, "cpu_s": cpu,
               "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count()}}
    write_json(os.path.join(out, "results.json"), results)
    say(f"results: {os.path.join(out, 'results.json')} | wall {wall:.0f} s, this process's CPU time {cpu:.0f} s")
    return results


def main(argv):
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    compare(argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
