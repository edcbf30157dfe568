"""
The toy world: a small, deterministic, offline corpus on which a tiny Qwen2 teacher (hidden 64-128,
2-4 layers) learns something measurable in CPU-minutes, with synthetic facts to test what a student
inherits from the teacher beyond its own training text.

    python data/toy.py --out=DIR [--seed=1337] [--n_entities=120] [--fact_repeats=100] ...

build_toy(out_dir, seed=1337, **sizes) writes, in out_dir:
  teacher.txt        general text part A + every fact (seen and unseen), documents shuffled
  student.txt        general text part B (other documents, same generator) + the seen facts only
  val.txt            held-out general text, no facts
  facts_seen.jsonl   one multiple-choice question per seen fact:
                     {"question": "The home city of Vorlak is", "choices": ["Plenmor", ...], "answer": 0,
                      "entity": "Vorlak", "attribute": "city"}
                     in lm-evaluation-harness's own convention: the choice follows the question after
                     its default target_delimiter " " (eval_tiny's scorer joins them the same way)
  facts_unseen.jsonl the same for the facts only the teacher's text holds
  tokenizer.json     byte-level BPE trained on teacher.txt + student.txt, eos "<|endoftext|>"
  tokenizer_config.json   names the eos token (read by data/prepare.py and transformers)
  tokens/teacher/{train.bin,val.bin,meta.json}   teacher.txt (train) and val.txt (val), spec section 7
  tokens/student/{train.bin,val.bin,meta.json}   student.txt (train) and val.txt (val)
  toy.json           manifest, written last: its presence (with matching seed, sizes and file sizes)
                     marks a complete build, which later calls reuse instead of rebuilding
Text files hold one document per line with a blank line between documents (txt_split=paragraph).
The same seed and sizes give byte-identical files in any directory.
"""
import json
import os
import random
import sys

if __name__ == "__main__":  # run as a script: make lrc.py and the data package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import Keys, run_main
from lrc import LRCError, atomic_file, check_writable_dir
from data.prepare import prepare, read_meta

TOY_VERSION = 2  # bump when the generator changes: cached builds of another version are rebuilt
# 2: multiple-choice choices without a leading space (lm-evaluation-harness's target_delimiter " " adds it)
EOS_TOKEN = "<|endoftext|>"
DEFAULT_SIZES = {
    "n_entities": 120,      # made-up people, one fact each; half seen by the student, half not
    "fact_repeats": 100,    # mentions of each fact per training text, cycling through the 10 paraphrases:
                            # enough that the toy teacher (400 steps) learns most facts
    "teacher_docs": 6000,   # general documents in teacher.txt
    "student_docs": 6000,   # general documents in student.txt (disjoint from the teacher's)
    "val_docs": 600,        # general documents in val.txt (disjoint from both)
    "vocab_size": 1024,     # BPE vocabulary, at most (the trainer stops when no pair repeats)
}

# -----------------------------------------------------------------------------
# the general-text grammar: a few dozen words, so that a tiny model can learn it quickly

NOUNS = ["cat", "dog", "bird", "frog", "duck", "horse", "cow", "pig", "goat", "bee", "rabbit", "lamb",
         "ball", "cup", "hat", "book", "tree", "flower", "apple", "cake", "kite", "drum", "lamp", "boat",
         "stone", "key", "ring", "bell", "chair", "coat"]  # all with a plain "+s" plural
ADJECTIVES = ["big", "small", "happy", "sad", "old", "young", "quick", "slow", "kind", "brave", "quiet",
              "loud", "tall", "soft", "warm", "cold"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink"]
VERBS_PAST = ["saw", "liked", "chased", "found", "pushed", "helped", "followed", "painted", "watched",
              "carried", "washed", "fed"]
PLACES = ["the park", "the river", "the hill", "the garden", "the market", "the forest", "the lake",
          "the school", "the farm", "the beach"]
NAMES = ["Tom", "Anna", "Ben", "Lily", "Sam", "Mia", "Max", "Emma", "Leo", "Zoe", "Jack", "Ella"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
ENDINGS = ["In the end {n} was {a}.", "After that {n} felt {a}.", "That night {n} was very {a}.",
           "{n} went home and was {a}."]

# -----------------------------------------------------------------------------
# the facts: made-up people with a home city or a job, each from a closed set of eight

CITIES = ["Plenmor", "Tasken", "Brill", "Quade", "Olvast", "Dunmere", "Sarrow", "Kelbin"]
JOBS = ["baker", "farmer", "sailor", "painter", "doctor", "teacher", "miner", "singer"]  # "a" fits each
ATTRIBUTES = {  # attribute: (values, paraphrase templates); template 0 is the one the questions ask
    "city": (CITIES, [
        "The home city of {e} is {v}.",
        "{e} lives in {v}.",
        "{e} comes from {v}.",
        "{e} was born in {v}.",
        "The city where {e} lives is {v}.",
        "{e} has a house in {v}.",
        "Ask anyone in {v} and they will tell you that {e} lives there.",
        "Every morning {e} walks through the streets of {v}.",
        "Home for {e} is the city of {v}.",
        "If you want to visit {e}, go to {v}.",
    ]),
    "job": (JOBS, [
        "{e} works as a {v}.",
        "{e} is a {v}.",
        "Every day {e} goes to work as a {v}.",
        "{e} has been a {v} for many years.",
        "Everyone knows that {e} is a {v}.",
        "By trade, {e} is a {v}.",
        "The {v} {e} starts work early.",
        "{e} earns a living as a {v}.",
        "Ask {e} about work and you will hear about life as a {v}.",
        "As a {v}, {e} is good at the job.",
    ]),
}
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "pl",
          "sk", "st", "tr", "th", "sh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
CODAS = ["", "n", "r", "l", "k", "s", "m", "th", "x"]


def a_or_an(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


def count_of(n, noun):
    return f"{NUMBERS[n]} {noun}" + ("" if n == 1 else "s")


def sentence(rng):
    """One general sentence: actions, colors, places, counting, arithmetic or comparison."""
    kind = rng.randrange(8)
    if kind == 0:
        return (f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS_PAST)} "
                f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}.")
    if kind == 1:
        return f"The {rng.choice(NOUNS)} is {rng.choice(COLORS)}."
    if kind == 2:
        return f"{rng.choice(NAMES)} has {count_of(rng.randrange(1, 11), rng.choice(COLORS) + ' ' + rng.choice(NOUNS))}."
    if kind == 3:
        return f"The {rng.choice(COLORS)} {rng.choice(NOUNS)} is in {rng.choice(PLACES)}."
    if kind == 4:  # counting: consecutive number words
        start = rng.randrange(0, 15)
        run = NUMBERS[start:start + rng.randrange(3, 7)]
        return (", ".join(run) + ".").capitalize()
    if kind == 5:  # addition with the answer
        a = rng.randrange(0, 11)
        b = rng.randrange(0, 21 - a)
        return f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}.".capitalize()
    if kind == 6:  # subtraction with the answer
        a = rng.randrange(0, 21)
        b = rng.randrange(0, a + 1)
        return f"{NUMBERS[a]} minus {NUMBERS[b]} is {NUMBERS[a - b]}.".capitalize()
    a, b = rng.sample(range(21), 2)
    return f"{NUMBERS[a]} is {'more' if a > b else 'less'} than {NUMBERS[b]}.".capitalize()


def story(rng):
    """A short story that keeps its hero and its things consistent across sentences."""
    name, noun, thing = rng.choice(NAMES), rng.choice(NOUNS), rng.choice(NOUNS)
    have = rng.randrange(3, 11)
    give = rng.randrange(1, have)
    lines = [f"Once there was {a_or_an(rng.choice(ADJECTIVES))} {noun} named {name}.",
             f"{name} lived near {rng.choice(PLACES)}.",
             f"Every day {name} {rng.choice(VERBS_PAST)} {a_or_an(rng.choice(COLORS))} {rng.choice(NOUNS)}.",
             f"One day {name} found {count_of(have, thing)}.",
             f"{name} gave {count_of(give, thing)} to a friend, so {name} had {count_of(have - give, thing)} left."]
    if rng.random() < 0.5:
        lines.insert(2, f"The {noun} was {rng.choice(COLORS)} and {rng.choice(ADJECTIVES)}.")
    lines.append(rng.choice(ENDINGS).format(n=name, a=rng.choice(ADJECTIVES)))
    return " ".join(lines)


def general_document(rng):
    kind = rng.random()
    if kind < 0.5:
        return story(rng)
    return " ".join(sentence(rng) for _ in range(rng.randrange(3, 7)))


def general_documents(rng, n, used):
    """n documents not in `used` (which is updated): the teacher, student and val texts never share one."""
    docs = []
    while len(docs) < n:
        doc = general_document(rng)
        if doc not in used:
            used.add(doc)
            docs.append(doc)
    return docs


def make_entities(rng, n):
    """n distinct two- or three-syllable names, none a substring of another or of a general word."""
    taken = {w.lower() for w in NOUNS + ADJECTIVES + COLORS + VERBS_PAST + NAMES + NUMBERS + CITIES + JOBS}
    names = []
    for _ in range(1000 * n + 1000):
        if len(names) == n:
            return names
        syllables = 2 + (rng.random() < 0.25)
        name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables))
        name = name.capitalize()
        low = name.lower()
        if not 5 <= len(name) <= 10 or any(low in t or t in low for t in taken if len(t) >= 3):
            continue
        taken.add(low)
        names.append(name)
    raise LRCError(f"could not make {n} distinct entity names: use a smaller --n_entities")


def make_facts(rng, n_entities):
    """[{"entity", "attribute", "value", "seen"}]: values balanced over each closed set, and each
    attribute's entities split half seen, half unseen (so chance accuracy is the same for both)."""
    entities = make_entities(rng, n_entities)
    facts = []
    for i, attribute in enumerate(ATTRIBUTES):
        owners = entities[i::len(ATTRIBUTES)]
        values = ATTRIBUTES[attribute][0]
        assigned = (values * (len(owners) // len(values) + 1))[:len(owners)]
        rng.shuffle(assigned)
        seen = [True] * (len(owners) // 2) + [False] * (len(owners) - len(owners) // 2)
        rng.shuffle(seen)
        facts += [{"entity": e, "attribute": attribute, "value": v, "seen": s}
                  for e, v, s in zip(owners, assigned, seen)]
    return facts


def fact_sentence(fact, template_index):
    templates = ATTRIBUTES[fact["attribute"]][1]
    return templates[template_index % len(templates)].format(e=fact["entity"], v=fact["value"])


def fact_documents(rng, facts, repeats):
    """Each fact `repeats` times (paraphrase r for the r-th mention), in documents of one to three
    sentences about different facts."""
    mentions = [fact_sentence(f, r) for f in facts for r in range(repeats)]
    rng.shuffle(mentions)
    docs, i = [], 0
    while i < len(mentions):
        k = rng.randrange(1, 4)
        docs.append(" ".join(mentions[i:i + k]))
        i += k
    return docs


def question(fact, rng):
    """Multiple choice: the prefix of paraphrase 0, the true value and three others, shuffled. Choices carry
    no leading space: lm-evaluation-harness puts its target_delimiter " " between question and choice (a
    leading space would make it two), and eval_tiny does the same."""
    values = ATTRIBUTES[fact["attribute"]][0]
    prefix = fact_sentence(fact, 0).rsplit(" " + fact["value"], 1)[0]
    choices = [fact["value"]] + rng.sample([v for v in values if v != fact["value"]], 3)
    rng.shuffle(choices)
    return {"question": prefix, "choices": choices, "answer": choices.index(fact["value"]),
            "entity": fact["entity"], "attribute": fact["attribute"]}


# -----------------------------------------------------------------------------
# files

def write_atomic(path, text):
    with atomic_file(path) as f:
        f.write(text)


def documents_text(docs):
    return "\n\n".join(docs) + "\n"


def train_tokenizer(docs, vocab_size):
    """Byte-level BPE (as Qwen2's, at toy size) with the eos token as special token 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(docs, trainer)
    return tokenizer


def paths_of(root):
    root = os.path.abspath(root)
    join = lambda *p: os.path.join(root, *p)  # noqa: E731
    return {"root": root, "tokenizer": join("tokenizer.json"), "tokenizer_dir": root,
            "teacher_text": join("teacher.txt"), "student_text": join("student.txt"), "val_text": join("val.txt"),
            "facts_seen": join("facts_seen.jsonl"), "facts_unseen": join("facts_unseen.jsonl"),
            "teacher_tokens": join("tokens", "teacher"), "student_tokens": join("tokens", "student"),
            "manifest": join("toy.json")}


def _cached(paths, seed, sizes):
    """The manifest of a complete build with these settings, else None."""
    try:
        with open(paths["manifest"], encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if (manifest.get("toy_version"), manifest.get("seed"), manifest.get("sizes")) != (TOY_VERSION, seed, sizes):
        return None
    for name, size in manifest.get("files", {}).items():
        path = os.path.join(paths["root"], name)
        if not os.path.isfile(path) or os.path.getsize(path) != size:
            return None
    return manifest


def build_toy(out_dir, seed=1337, **sizes):
    """Build (or reuse) the toy world in out_dir; returns a dict of absolute paths plus "manifest_data".
    Keys: root, tokenizer (tokenizer.json), tokenizer_dir, teacher_text, student_text, val_text,
    facts_seen, facts_unseen, teacher_tokens, student_tokens (token dirs), manifest (toy.json)."""
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise LRCError(f"build_toy got unknown size(s) {', '.join(sorted(unknown))}: the sizes are "
                       f"{', '.join(DEFAULT_SIZES)}")
    sizes = {**DEFAULT_SIZES, **{k: int(v) for k, v in sizes.items()}}
    if sizes["n_entities"] < 4 or sizes["fact_repeats"] < 1 or min(sizes["teacher_docs"], sizes["student_docs"],
                                                                    sizes["val_docs"]) < 1:
        raise LRCError(f"toy sizes {sizes} are too small: n_entities >= 4, fact_repeats >= 1, *_docs >= 1")
    seed = int(seed)
    check_writable_dir(out_dir)
    paths = paths_of(out_dir)
    manifest = _cached(paths, seed, sizes)
    if manifest is not None:
        return {**paths, "manifest_data": manifest}
    os.makedirs(paths["root"], exist_ok=True)
    if os.path.exists(paths["manifest"]):
        os.remove(paths["manifest"])  # the build below replaces the files it describes

    # Independent random streams, so changing one size does not reshuffle everything else.
    def stream(name):
        return random.Random(f"lrc-toy/{seed}/{name}")  # str seeds are hashed with sha512: stable across runs

    facts = make_facts(stream("facts"), sizes["n_entities"])
    seen = [f for f in facts if f["seen"]]
    unseen = [f for f in facts if not f["seen"]]
    used = set()
    teacher_docs = general_documents(stream("teacher"), sizes["teacher_docs"], used)
    student_docs = general_documents(stream("student"), sizes["student_docs"], used)
    val_docs = general_documents(stream("val"), sizes["val_docs"], used)
    teacher_docs += fact_documents(stream("teacher-facts"), facts, sizes["fact_repeats"])
    student_docs += fact_documents(stream("student-facts"), seen, sizes["fact_repeats"])
    stream("teacher-shuffle").shuffle(teacher_docs)
    stream("student-shuffle").shuffle(student_docs)
    write_atomic(paths["teacher_text"], documents_text(teacher_docs))
    write_atomic(paths["student_text"], documents_text(student_docs))
    write_atomic(paths["val_text"], documents_text(val_docs))
    mc_rng = stream("questions")
    for key, group in (("facts_seen", seen), ("facts_unseen", unseen)):
        write_atomic(paths[key], "".join(json.dumps(question(f, mc_rng)) + "\n" for f in group))

    tokenizer = train_tokenizer(teacher_docs + student_docs, sizes["vocab_size"])
    write_atomic(paths["tokenizer"], tokenizer.to_str(pretty=True))
    write_atomic(os.path.join(paths["root"], "tokenizer_config.json"), json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN,
         "clean_up_tokenization_spaces": False}, indent=2) + "\n")

    n_tokens = {}
    for who in ("teacher", "student"):
        # tiny inputs: tokenize in this process (worker start-up would cost more than the work)
        meta = prepare(paths["tokenizer"], [paths[f"{who}_text"]], paths[f"{who}_tokens"], txt_split="paragraph",
                       val_inputs=[paths["val_text"]], num_proc=1, progress=False)
        n_tokens[who] = meta["n_tokens"]

    names = ["teacher.txt", "student.txt", "val.txt", "facts_seen.jsonl", "facts_unseen.jsonl", "tokenizer.json",
             "tokenizer_config.json"] + [os.path.join("tokens", who, f) for who in ("teacher", "student")
                                         for f in ("train.bin", "val.bin", "meta.json")]
    manifest = {
        "toy_version": TOY_VERSION, "seed": seed, "sizes": sizes,
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "eos_token": EOS_TOKEN, "eos_id": tokenizer.token_to_id(EOS_TOKEN),
        "n_facts": {"seen": len(seen), "unseen": len(unseen)},
        "n_documents": {"teacher": len(teacher_docs), "student": len(student_docs), "val": len(val_docs)},
        "n_tokens": n_tokens,
        "files": {name: os.path.getsize(os.path.join(paths["root"], name)) for name in names},
    }
    write_atomic(paths["manifest"], json.dumps(manifest, indent=2) + "\n")  # last: marks the build complete
    return {**paths, "manifest_data": manifest}


# -----------------------------------------------------------------------------
# the toy teacher's recipe: train.py trains it (method=scratch, on teacher.txt) and caches it by this recipe

def toy_teacher_spec(cfg, vocab_size, eos_id):
    """config.json fields of the toy teacher, from train.py's toy_teacher_* keys."""
    return {"vocab_size": vocab_size, "hidden_size": cfg["toy_teacher_hidden"],
            "intermediate_size": cfg["toy_teacher_ffn"], "num_hidden_layers": cfg["toy_teacher_layers"],
            "num_attention_heads": cfg["toy_teacher_heads"], "num_key_value_heads": cfg["toy_teacher_kv_heads"],
            # the context it is trained at: readers (eval_tiny) take it as the longest context to evaluate
            "tie_word_embeddings": True, "max_position_embeddings": cfg["seq_len"], "rope_theta": 10000.0,
            "eos_token_id": eos_id, "bos_token_id": eos_id}


def toy_teacher_recipe(cfg, paths):
    """Everything the toy teacher's weights depend on (train.py keys and the toy world's sizes): a cached
    teacher with another recipe is retrained."""
    meta = read_meta(paths["teacher_tokens"])
    return {"spec": toy_teacher_spec(cfg, meta["vocab_size"], meta["eos_id"]), "steps": cfg["toy_teacher_steps"],
            "lr": cfg["toy_teacher_lr"], "seed": cfg["seed"], "seq_len": cfg["seq_len"],
            "tokens_per_step": cfg["tokens_per_step"], "micro_batch_size": cfg["micro_batch_size"],
            "warmup_ratio": cfg["warmup_ratio"], "tokenizer_sha256": meta["tokenizer_sha256"],
            "toy": paths["manifest_data"]["sizes"]}


def is_cached_teacher(teacher_dir, recipe):
    """teacher_dir holds a toy teacher saved with this recipe (in its config.json's lrc_toy_teacher)."""
    try:
        with open(os.path.join(teacher_dir, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("lrc_toy_teacher") == recipe
    except (OSError, ValueError):
        return False


def eval_arguments(paths):
    """eval_tiny.py's arguments for the toy world: its val documents, separated by blank lines, and the two
    multiple-choice sets of facts; each path relative to the working directory where that is shorter."""
    short = {k: v if os.path.relpath(v).startswith("..") else os.path.relpath(v)
             for k, v in paths.items() if isinstance(v, str)}
    return (f"--data={short['val_text']} --txt_split=paragraph --mc={short['facts_seen']} "
            f"--mc={short['facts_unseen']} --prompt='The home city of'")


def main(argv):
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    options = Keys({"out": "", "seed": 1337, **DEFAULT_SIZES}, where_listed="data/toy.py's docstring").parse(argv)
    out, seed = options.pop("out"), options.pop("seed")
    if not out:
        raise LRCError("--out=DIR is required: python data/toy.py --out=DIR [--seed=N] [--n_entities=N ...]")
    result = build_toy(out, seed=seed, **options)
    for key, value in result.items():
        if key != "manifest_data":
            print(f"{key}: {value}")
    m = result["manifest_data"]
    print(f"tokens: teacher {m['n_tokens']['teacher']}, student {m['n_tokens']['student']}; "
          f"vocab {m['vocab_size']}; facts {m['n_facts']}")


if __name__ == "__main__":
    sys.exit(run_main(main))
