"""
Reading prepared token files (data/prepare.py, spec section 7) for training: which windows each rank
trains on at each step, and the cheap checks that run before any teacher is built or loaded.

Which windows step s reads is a pure function of (seed, s) and, for the default one-pass-per-epoch
sampler, of where the run started counting (SAMPLERS says each rule in words; state.json records it).
"""
import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from data.prepare import open_tokens, read_meta, tokenizer_sha256
from distributed import all_reduce
from lrc import LRCError

# How training reads its windows (train.py's `sampler` key), recorded in state.json. "epoch" is how the
# official LRC run read its data: one shuffled pass over non-overlapping chunks, then the next pass.
SAMPLERS = {
    "epoch": "the token stream cut into non-overlapping windows of seq_len + 1 tokens (window i starts at "
             "i * seq_len, so neighbours share one boundary token); pass e visits them in the order "
             "numpy.random.default_rng([seed, e]).permutation(n_windows); global window k of the run is "
             "window k % n_windows of pass k // n_windows; step s reads global windows s * W .. s * W + W - 1 "
             "(W = tokens_per_step // seq_len), rank r at micro-step m the micro_batch_size of them from row "
             "(m * world_size + r) * micro_batch_size",
    "random": "offsets = numpy.random.default_rng([seed, step]).integers(0, n_tokens - seq_len, tokens_per_step // "
              "seq_len), drawn with replacement; rank r, micro-step m reads rows (m * world_size + r) * "
              "micro_batch_size onwards",
}


@dataclass
class TokenData:
    path: str
    meta: dict
    train_tokens: np.ndarray          # read-only memmaps of uint32 ids
    val_tokens: Optional[np.ndarray]
    max_id: dict                      # {split: the largest token id in it}


def open_token_data(path, seq_len, want_val=True, rank=0, world_size=1, device="cpu") -> TokenData:
    """The train (and, when it holds more than seq_len tokens and want_val, val) split of a prepared
    directory, checked against its meta.json and scanned for its largest id (each rank scans its share;
    the maximum is all-reduced on `device`)."""
    if not os.path.isdir(path):
        raise LRCError(f"data directory {path!r} does not exist{' (it is a file)' if os.path.exists(path) else ''}: "
                       f"prepare token files with data/prepare.py (or use --data=toy)")
    meta = read_meta(path)
    train_tokens = open_tokens(path, "train")
    val_tokens = open_tokens(path, "val") if want_val and meta["n_tokens"].get("val", 0) > seq_len else None
    splits = {"train": train_tokens, "val": val_tokens}
    local = torch.tensor([largest_token_id(tokens, rank, world_size) for tokens in splits.values() if tokens is not None],
                         device=device)
    return TokenData(path, meta, train_tokens, val_tokens, dict(zip(splits, all_reduce(local, "max").tolist())))


def largest_token_id(tokens, rank=0, world_size=1):
    """The largest id in rank's 1/world_size share of a token file (-1 for an empty share), in 64M-token
    blocks so memory stays flat on a 20B-token file."""
    share = math.ceil(len(tokens) / world_size)
    local_max = -1
    for start in range(rank * share, min(len(tokens), (rank + 1) * share), 1 << 26):
        stop = min(start + (1 << 26), (rank + 1) * share, len(tokens))
        local_max = max(local_max, int(tokens[start:stop].max()))
    return local_max


def check_fits(data: TokenData, vocab_size, teacher_dir=None, strict_tokenizer=False, warn=print):
    """Refuse token ids >= the model's vocabulary; warn (or, strict_tokenizer, refuse) when the data was made
    with another tokenizer.json than the teacher's."""
    if data.meta["vocab_size"] > vocab_size:
        raise LRCError(f"{data.path!r} was tokenized with a {data.meta['vocab_size']}-token vocabulary but the model "
                       f"has {vocab_size}: prepare the data with the model's own tokenizer")
    for split, biggest in data.max_id.items():
        if biggest >= vocab_size:
            raise LRCError(f"{os.path.join(data.path, split + '.bin')} holds token id {biggest}, but the model's "
                           f"vocabulary has {vocab_size} ids: prepare the data with the teacher's tokenizer "
                           f"(data/prepare.py --tokenizer=TEACHER)")
    if teacher_dir is not None and os.path.isfile(os.path.join(teacher_dir, "tokenizer.json")):
        expected = tokenizer_sha256(teacher_dir)
        if data.meta["tokenizer_sha256"] != expected:
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


def pass_order(seed, epoch, n_windows):
    """sampler=epoch: the order in which pass `epoch` visits the n_windows non-overlapping windows."""
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


class TokenWindows:
    """The (x, y) micro-batches of one rank: x [micro_batch_size, seq_len] and y, the tokens that follow.

    Every rank computes the same global batch of step s and takes its own rows, so 1 process x 2
    micro-steps and 2 processes x 1 micro-step read the same windows. With sampler=epoch the global
    window counter continues from `start` = (step, windows read before it), which a resumed run takes
    from its checkpoint, so it reads exactly the windows the uninterrupted run would have read."""

    def __init__(self, tokens, seed, seq_len, micro_batch_size, rank, world_size, grad_accum, device,
                 sampler="epoch", start=(0, 0)):
        if sampler not in SAMPLERS:
            raise LRCError(f"sampler={sampler!r} is not one of {', '.join(map(repr, SAMPLERS))}")
        if len(tokens) < seq_len + 1:
            raise LRCError(f"the training data has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
                           f"use more data or a smaller --seq_len")
        self.tokens, self.seed, self.seq_len, self.mbs = tokens, seed, seq_len, micro_batch_size
        self.rank, self.world, self.device, self.sampler = rank, world_size, device, sampler
        self.per_step = micro_batch_size * world_size * grad_accum  # windows per optimizer step, all ranks
        self.n_windows = (len(tokens) - 1) // seq_len             # non-overlapping windows of one pass
        self.start_step, self.start_window = start
        self.orders = {}                                           # epoch -> pass_order, the latest two

    def windows_before(self, step):
        """Global windows read before `step` (sampler=epoch's counter)."""
        return self.start_window + (step - self.start_step) * self.per_step

    def epoch(self, step):
        """Passes over the data completed before `step`, as a fraction (1.5 = halfway through the second)."""
        return self.windows_before(step) / self.n_windows

    def starts(self, step, micro):
        """Token offsets of the windows of rank `rank` at micro-step `micro` of `step`."""
        first = (micro * self.world + self.rank) * self.mbs           # this rank's row in the global batch
        if self.sampler == "random":
            return window_offsets(self.seed, step, self.per_step, len(self.tokens), self.seq_len)[first:first + self.mbs]
        k = self.windows_before(step) + first + np.arange(self.mbs)    # global window counters
        epochs, index = np.divmod(k, self.n_windows)
        return np.array([self.order(e)[i] for e, i in zip(epochs, index)]) * self.seq_len

    def order(self, epoch):
        if epoch not in self.orders:
            self.orders = {e: o for e, o in self.orders.items() if e == epoch - 1}  # a step may straddle two
            self.orders[epoch] = pass_order(self.seed, int(epoch), self.n_windows)
        return self.orders[epoch]

    def batch(self, step, micro):
        return windows_at(self.tokens, self.starts(step, micro), self.seq_len, self.device)


def windows_at(tokens, starts, seq_len, device):
    """(x, y) on device for the windows of seq_len + 1 tokens starting at `starts`."""
    windows = tokens[np.asarray(starts)[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    return to_device(windows[:, :-1], device), to_device(windows[:, 1:], device)


def to_device(array, device):
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":  # pinned + non_blocking: the copy overlaps the GPU's work
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
