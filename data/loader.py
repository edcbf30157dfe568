"""
Reading prepared token files (data/prepare.py, spec section 7) for training: which windows each rank
trains on at each step, from one prepared directory or a weighted mixture of several, and the cheap
checks that run before any teacher is built or loaded.

Which windows step s reads is a pure function of (seed, s) and, for the default one-pass-per-epoch
sampler, of where the run started counting (SAMPLERS says each rule in words; state.json records it).
"""
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from data.prepare import open_mask, open_tokens, read_meta, tokenizer_sha256
from distributed import all_reduce
from lrc import LRCError

# How training reads its windows (train.py's `sampler` key), recorded in state.json. "epoch" is how the
# official LRC run read its data: one shuffled pass over non-overlapping chunks, then the next pass.
SAMPLERS = {
    "epoch": "each source's token stream cut into non-overlapping windows of seq_len + 1 tokens (window i "
             "starts at i * seq_len, so neighbours share one boundary token); source j's pass e visits them in "
             "the order numpy.random.default_rng([seed, j, e]).permutation(n_windows_j), and its k-th window of "
             "the run is window k % n_windows_j of pass k // n_windows_j; step s reads W = tokens_per_step // "
             "seq_len windows, row w from source MIX[s][w] (one source: 0), rank r at micro-step m the "
             "micro_batch_size rows from (m * world_size + r) * micro_batch_size",
    "random": "one source: offsets = numpy.random.default_rng([seed, step]).integers(0, n_tokens - seq_len, W), "
              "drawn with replacement; a mixture: row w from source MIX[s][w] at offset default_rng([seed, "
              "step]).integers(0, n_tokens[MIX[s]] - seq_len); rank r, micro-step m reads rows "
              "(m * world_size + r) * micro_batch_size onwards",
}
# MIX[s] = numpy.random.default_rng([seed, s, 1]).choice(n_sources, W, p=weights): each window of a mixture
# is drawn from one source by weight, a pure function of the step


@dataclass
class TokenData:
    """One prepared directory."""
    path: str
    meta: dict
    train_tokens: np.ndarray          # read-only memmaps of uint32 ids
    val_tokens: Optional[np.ndarray]
    max_id: dict                      # {split: the largest token id in it}
    train_mask: Optional[np.ndarray] = None  # uint8 per token, 1 = train on it (chat data: assistant tokens)
    val_mask: Optional[np.ndarray] = None


@dataclass
class Mixture:
    """The training data: one prepared directory, or several drawn from by weight (`data` as a dict)."""
    spec: object                      # the data key as given: a path, or {path: weight}
    sources: list                     # [TokenData]
    weights: list                     # normalised to sum to 1
    names: list                       # short names for the log: directory basenames (longer where they clash)

    @property
    def val(self):
        """The source evaluation reads: the first listed one."""
        return self.sources[0]

    def describe(self):
        """For the log: the directory, or each source's name and share."""
        if len(self.sources) == 1:
            return self.sources[0].path
        return " + ".join(f"{name} {100 * w:.1f}%" for name, w in zip(self.names, self.weights))

    def record(self, windows_read, epochs, step, sampler):
        """state.json's "data" of a checkpoint at `step` (train.py): where each source is and how far it was read."""
        return {"spec": self.spec, "next_step": step, "sampler_rule": SAMPLERS[sampler],
                "sources": [{"path": s.path, "weight": w, "tokenizer_sha256": s.meta["tokenizer_sha256"],
                             "n_tokens": len(s.train_tokens), "windows_read": int(n), "epoch": e}
                            for s, w, n, e in zip(self.sources, self.weights, windows_read, epochs)]}

    def progress(self, windows_read, epochs, seq_len):
        """(log text, metrics fields) of how far training has read: the pass over one source, or each source's
        tokens read and its own pass."""
        if len(self.sources) == 1:
            return f"epoch {epochs[0]:.3f}", {}
        tokens = [int(n) * seq_len for n in windows_read]
        text = ", ".join(f"{name} {tokens_text(n)} tok ep {e:.2f}" for name, n, e in zip(self.names, tokens, epochs))
        return text, {"sources": {name: {"tokens": n, "epoch": e} for name, n, e in zip(self.names, tokens, epochs)}}


def tokens_text(n):
    """950, 12.3k, 410k, 1.23M, 20.5B: a token count at a glance."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def mixture_of(data):
    """[(path, weight)] from the data key: a path, or a dict {path: weight} with positive weights."""
    if isinstance(data, str):
        return [(data, 1.0)]
    example = "--data=\"{'tokens/fineweb': 0.978, 'tokens/openhermes': 0.022}\""
    if not isinstance(data, dict) or not data:
        raise LRCError(f"data={data!r} is neither a prepared directory nor a dict of them with weights: e.g. {example}")
    for path, weight in data.items():
        if not isinstance(path, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                or not weight > 0 or not math.isfinite(weight):
            raise LRCError(f"data={data!r}: each source needs a directory and a positive weight, e.g. {example}")
    return [(path, float(weight)) for path, weight in data.items()]


def open_mixture(data, seq_len, want_val=True, rank=0, world_size=1, device="cpu") -> Mixture:
    pairs = mixture_of(data)
    sources = [open_token_data(path, seq_len, want_val and i == 0, rank, world_size, device)
               for i, (path, _) in enumerate(pairs)]
    total = sum(w for _, w in pairs)
    parts = [os.path.normpath(p).split(os.sep) for p, _ in pairs]
    names = []
    for p in parts:
        depth = 1
        while depth < len(p) and sum(q[-depth:] == p[-depth:] for q in parts) > 1:
            depth += 1
        names.append("/".join(p[-depth:]))
    return Mixture(data, sources, [w / total for _, w in pairs], names)


def open_token_data(path, seq_len, want_val=True, rank=0, world_size=1, device="cpu") -> TokenData:
    """The train (and, when it holds more than seq_len tokens and want_val, val) split of a prepared
    directory, with their loss masks when it has them, checked against its meta.json and scanned for its
    largest id (each rank scans its share; the maximum is all-reduced on `device`)."""
    if not os.path.isdir(path):
        raise LRCError(f"data directory {path!r} does not exist{' (it is a file)' if os.path.exists(path) else ''}: "
                       f"prepare token files with data/prepare.py (or use --data=toy)")
    meta = read_meta(path)
    train_tokens = open_tokens(path, "train")
    val_tokens = open_tokens(path, "val") if want_val and meta["n_tokens"].get("val", 0) > seq_len else None
    splits = {"train": train_tokens, "val": val_tokens}
    local = torch.tensor([largest_token_id(tokens, rank, world_size) for tokens in splits.values() if tokens is not None],
                         device=device)
    masks = {split: open_mask(path, split) if meta.get("loss_mask") and splits[split] is not None else None
             for split in splits}
    return TokenData(path, meta, train_tokens, val_tokens, dict(zip(splits, all_reduce(local, "max").tolist())),
                     masks["train"], masks["val"])


def largest_token_id(tokens, rank=0, world_size=1):
    """The largest id in rank's 1/world_size share of a token file (-1 for an empty share), in 64M-token
    blocks so memory stays flat on a 20B-token file."""
    share = math.ceil(len(tokens) / world_size)
    local_max = -1
    for start in range(rank * share, min(len(tokens), (rank + 1) * share), 1 << 26):
        stop = min(start + (1 << 26), (rank + 1) * share, len(tokens))
        local_max = max(local_max, int(tokens[start:stop].max()))
    return local_max


def check_fits(mixture: Mixture, vocab_size, teacher_dir=None, strict_tokenizer=False, warn=print):
    """Refuse token ids >= the model's vocabulary; warn (or, strict_tokenizer, refuse) when a source was made
    with another tokenizer.json than the teacher's."""
    expected = None
    if teacher_dir is not None and os.path.isfile(os.path.join(teacher_dir, "tokenizer.json")):
        expected = tokenizer_sha256(teacher_dir)
    for data in mixture.sources:
        if data.meta["vocab_size"] > vocab_size:
            raise LRCError(f"{data.path!r} was tokenized with a {data.meta['vocab_size']}-token vocabulary but the "
                           f"model has {vocab_size}: prepare the data with the model's own tokenizer")
        for split, biggest in data.max_id.items():
            if biggest >= vocab_size:
                raise LRCError(f"{os.path.join(data.path, split + '.bin')} holds token id {biggest}, but the model's "
                               f"vocabulary has {vocab_size} ids: prepare the data with the teacher's tokenizer "
                               f"(data/prepare.py --tokenizer=TEACHER)")
        if expected is not None and data.meta["tokenizer_sha256"] != expected:
            msg = (f"{data.path!r} was tokenized with another tokenizer.json than the teacher's (sha256 "
                   f"{data.meta['tokenizer_sha256'][:12]}... vs {expected[:12]}...): prepare it with "
                   f"data/prepare.py --tokenizer={teacher_dir}")
            if strict_tokenizer:
                raise LRCError(msg)
            warn(f"warning: {msg} (strict_tokenizer=True refuses)")


def window_offsets(seed, step, n_windows, n_tokens, seq_len):
    """sampler=random: start offsets of the global batch of optimizer step `step`, windows of seq_len + 1
    tokens drawn with replacement."""
    return np.random.default_rng([seed, step]).integers(0, n_tokens - seq_len, size=n_windows)


def pass_order(seed, source, epoch, n_windows):
    """sampler=epoch: the order in which pass `epoch` of source `source` visits its n_windows windows."""
    return np.random.default_rng([seed, source, epoch]).permutation(n_windows)


class TokenWindows:
    """The (x, y) micro-batches of one rank: x [micro_batch_size, seq_len] and y, the tokens that follow
    (-1 where a loss mask says not to train, when asked).

    Every rank computes the same global batch of step s and takes its own rows, so 1 process x 2
    micro-steps and 2 processes x 1 micro-step read the same windows. With sampler=epoch each source's
    window counter continues from `start` = (step, windows read from each source before it), which a
    resumed run takes from its checkpoint, so it reads exactly the windows the uninterrupted run would."""

    def __init__(self, mixture, seed, seq_len, micro_batch_size, rank, world_size, grad_accum, device,
                 sampler="epoch", start=(0, None), use_mask=False):
        if sampler not in SAMPLERS:
            raise LRCError(f"sampler={sampler!r} is not one of {', '.join(map(repr, SAMPLERS))}")
        for name, source in zip(mixture.names, mixture.sources):
            if len(source.train_tokens) < seq_len + 1:
                raise LRCError(f"the training data {name} has {len(source.train_tokens)} tokens, fewer than "
                               f"seq_len + 1 = {seq_len + 1}: use more data or a smaller --seq_len")
            if use_mask and source.train_mask is None:
                raise LRCError(f"{source.path!r} has no loss mask: prepare chat data with data/prepare.py "
                               f"--format=chat (method=sft trains on assistant tokens only)")
        self.mixture, self.seed, self.seq_len, self.mbs = mixture, seed, seq_len, micro_batch_size
        self.rank, self.world, self.device, self.sampler, self.use_mask = rank, world_size, device, sampler, use_mask
        self.per_step = micro_batch_size * world_size * grad_accum  # windows per optimizer step, all ranks
        self.n_windows = np.array([(len(s.train_tokens) - 1) // seq_len for s in mixture.sources])  # per pass
        n = len(mixture.sources)
        self.start = (start[0], np.array(start[1] if start[1] is not None else [0] * n, dtype=np.int64))
        self.counted = self.start                                  # the latest (step, counts) computed
        self.orders = {}                                           # (source, epoch) -> pass_order, kept small

    def sources_of(self, step):
        """The source of each of the step's per_step global rows (MIX in SAMPLERS)."""
        if len(self.mixture.sources) == 1:
            return np.zeros(self.per_step, dtype=np.int64)
        rng = np.random.default_rng([self.seed, step, 1])
        return rng.choice(len(self.mixture.sources), self.per_step, p=self.mixture.weights)

    def windows_before(self, step):
        """Windows read from each source before `step` (sampler=epoch's counters), counted on from `start`."""
        first, counts = self.counted if step >= self.counted[0] else self.start  # steps come in order: count on
        if step < first:
            raise LRCError(f"the window counters start at step {first}; step {step} is before them")
        for s in range(first, step):
            counts = counts + np.bincount(self.sources_of(s), minlength=len(counts))
        self.counted = (step, counts)
        return counts

    def epoch(self, step):
        """Passes over each source completed before `step`, as fractions (1.5 = halfway through the second)."""
        return (self.windows_before(step) / self.n_windows).tolist()

    def starts(self, step, micro):
        """(source, token offset) of each window of rank `rank` at micro-step `micro` of `step`."""
        first = (micro * self.world + self.rank) * self.mbs           # this rank's row in the global batch
        rows = slice(first, first + self.mbs)
        sources = self.sources_of(step)
        if self.sampler == "random":
            if len(self.mixture.sources) == 1:
                n_tokens = len(self.mixture.sources[0].train_tokens)
                return sources[rows], window_offsets(self.seed, step, self.per_step, n_tokens, self.seq_len)[rows]
            highs = np.array([len(s.train_tokens) - self.seq_len for s in self.mixture.sources])[sources]
            return sources[rows], np.random.default_rng([self.seed, step]).integers(0, highs)[rows]
        # each row's counter within its own source: the windows that source gave before this step, plus
        # the rows of this step before it that came from the same source
        before = self.windows_before(step)
        k = np.array([before[j] + np.count_nonzero(sources[:w] == j) for w, j in enumerate(sources)])[rows]
        epochs, index = np.divmod(k, self.n_windows[sources[rows]])
        offsets = [self.order(j, e)[i] for j, e, i in zip(sources[rows], epochs, index)]
        return sources[rows], np.array(offsets) * self.seq_len

    def order(self, source, epoch):
        if (source, epoch) not in self.orders:
            if len(self.orders) > 2 * len(self.mixture.sources):  # a step may straddle two passes per source
                self.orders.clear()
            self.orders[(source, epoch)] = pass_order(self.seed, int(source), int(epoch), self.n_windows[source])
        return self.orders[(source, epoch)]

    def batch(self, step, micro):
        sources, starts = self.starts(step, micro)
        xs, ys = [], []
        for j, start in zip(sources, starts):
            source = self.mixture.sources[j]
            x, y = window(source.train_tokens, start, self.seq_len, source.train_mask if self.use_mask else None)
            xs.append(x)
            ys.append(y)
        return stack_to_device(xs, self.device), stack_to_device(ys, self.device)


def window(tokens, start, seq_len, mask=None):
    """x, y (int64 arrays) of the window of seq_len + 1 tokens at `start`; y is -1 where mask is 0 at the
    predicted token, so that only masked-in tokens (an assistant's, for SFT) are trained on."""
    ids = tokens[start:start + seq_len + 1].astype(np.int64)
    x, y = ids[:-1], ids[1:].copy()
    if mask is not None:
        y[mask[start + 1:start + seq_len + 1] == 0] = -1
    return x, y


def windows_at(tokens, starts, seq_len, device, mask=None):
    """(x, y) on device for the windows of seq_len + 1 tokens starting at `starts` (see window)."""
    pairs = [window(tokens, start, seq_len, mask) for start in starts]
    return stack_to_device([x for x, _ in pairs], device), stack_to_device([y for _, y in pairs], device)


def stack_to_device(rows, device):
    """The equal-length int64 rows (window's x or y) as one [len(rows), seq_len] tensor on `device`.

    On CUDA the rows are stacked straight into page-locked (pinned) host memory, with no pageable copy in
    between, and copied with non_blocking=True: the copy is only queued on the current stream and the host
    goes on at once. train_loop fetches the next micro-batch right after queueing a forward, then queues the
    backward while the GPU is still busy; a blocking .to() would make the host wait for that forward (PyTorch
    synchronizes the stream after it), and from pageable memory the driver stages the copy through a buffer
    of its own instead of a direct DMA. Dropping the pinned tensor when this returns is safe: PyTorch's
    caching host allocator hands its block out again only once the copy that reads it has completed."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.from_numpy(np.stack(rows)).to(device)
    pinned = torch.empty((len(rows), len(rows[0])), dtype=torch.int64, pin_memory=True)
    np.stack(rows, out=pinned.numpy())
    return pinned.to(device, non_blocking=True)
