"""
How close one LRC training step comes to its floor, measured side by side in one run.

An LRC step can never cost less than a teacher forward pass plus one training step of the plain
student it produces: that sum is the floor. On random weights and random tokens bench.py times, with
warm-up, for one shape:
  (a) the teacher forward (to logits) in inference mode
  (b) one training step of the plain student with the exported shape: forward, cross-entropy,
      backward, gradient clipping, AdamW (fp32 master weights, bf16 autocast on GPU)
  (c) one LRC training step: lrc.LRC forward (teacher and student streams, clone loss, fused loss
      head), backward, clipping, AdamW over the projections and norms
  (d) the same step computed the way the reference implementation computes attention: the
      student's q/k/v per token as W @ (P @ x) instead of with generated weights
  (e) with --grad_accum=N > 1 (each variant's step then runs N micro-steps): (c) with the student weights
      generated once per optimizer step (train.py's generate='step') instead of in every micro-step
and prints ms/step, tokens/s, the floor ratios c/(a+b) and e/(a+b), c/d, peak memory and, on GPU, MFU.

  python bench.py --shape=mid                         # CPU-sized shape
  python bench.py --shape=qwen2.5-3b                  # one H100/H200: Qwen2.5-3B -> d_s 1200 at seq 2048
  python bench.py --shape=mid --checkpoint=True       # also (c) with activation checkpointing
  python bench.py --head_mem=True                     # loss-head peak memory at V=151936, T=2048
  python bench.py --kl_precision=True --head_seq=256   # the official run's bf16 KL against float32, V=151936
  python bench.py --shape=mid --hidden_size=768 ...   # a shape's dims can be overridden one by one
  python bench.py --shape=mid --grad_accum=4          # 4 micro-steps per step, and (e)
  python bench.py --plan config/lrc_4b.py --world_size=8 --gpu_mem_gib=80   # memory planner: what fits
  python bench.py --flops                             # FLOPs of (a), (b), (c) at the presets' real shapes, no GPU

The memory planner (--plan CONFIG [--key=value ...]: train.py's config and keys, plus --world_size,
--gpu_mem_gib, --headroom, --teacher_config=FILE, --plan_micro_batch_sizes) estimates the peak memory per
rank of one training step for DDP, FSDP2 and FSDP2 with the teacher sharded, with and without activation
checkpointing, at micro-batches of 1, 2, 4 and 8, by running the step under FakeTensorMode; see
docs/scaling.md and the section "The memory planner" below.

MFU counts model FLOPs only, per token: 2 x teacher params + 6 x student params + attention, where
"params" are those that take part in a matmul (the layers and the LM head; an embedding lookup is
free) and attention is 2 * 2 * L * H * hd * T / 2 for a causal forward (QK^T and AV over T/2 keys on
average), times 1 for the teacher and 3 for the student (forward + backward). The LRC-only work
(generating the weights, the clone loss, the KL head) is overhead, not model FLOPs. Peak FLOP/s come
from a small table of known GPUs (dense bf16) or --peak_tflops.

Peak memory of a variant = the bytes it keeps between steps (teacher weights for a/c/d, its trainable
weights and optimizer state) + the most bytes allocated at once during one step above that (activations,
gradients, temporaries). The latter is torch.cuda.max_memory_allocated on GPU and, on CPU, the running
sum of the CPU allocator's allocations and frees recorded by torch.profiler(profile_memory=True).
"""
import contextlib
import gc
import math
import os
import shutil
import statistics
import sys
import time
import weakref

# Large CPU temporaries (a [tokens, vocab] float32 block is tens of MB) are mmap'd by glibc and
# page-faulted afresh every step, which can triple the cost of an elementwise pass. Raising the
# thresholds lets malloc reuse them; it applies to every variant alike. Set before torch is imported.
if __name__ == "__main__" and os.environ.get("LRC_BENCH_MALLOC", "1") == "1" \
        and "MALLOC_MMAP_THRESHOLD_" not in os.environ and sys.platform.startswith("linux"):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="17179869184", MALLOC_TRIM_THRESHOLD_="17179869184",
               MALLOC_TOP_PAD_="1073741824")
    os.execve(sys.executable, [sys.executable] + sys.argv, env)

import torch
import torch.nn.functional as F
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

import distributed
import lrc
import train
from configurator import Keys, run_main

# -----------------------------------------------------------------------------
# config: defaults, overridden by --key=value (nanoGPT style)
shape = "mid"            # toy | mid | qwen2.5-3b | qwen2.5-7b (dims below override the shape's)
vocab_size = 0           # 0: the shape's value, for every dim below
hidden_size = 0
intermediate_size = 0
num_layers = 0
num_heads = 0
num_kv_heads = 0
student_hidden = 0
batch_size = 0
seq_len = 0
variants = "abcde"       # which of (a)..(e) to run ((e) only with grad_accum > 1)
checkpoint = False       # also time (c) with LRC(checkpoint_layers=True)
grad_accum = 1           # micro-steps of batch_size x seq_len tokens per timed step, for every variant
steps = 10               # timed steps per round
warmup = 3               # untimed steps first (includes compilation)
rounds = 0               # 0: 3 on CPU (variants interleaved round by round, against contention), 1 on GPU
device = "auto"          # auto | cpu | cuda | cuda:N
threads = 0              # CPU: torch intra-op threads (0: torch's default)
dtype = "auto"           # auto: bf16 weights on GPU, fp32 on CPU
compile = True           # torch.compile each variant's forward (+ loss)
peak_tflops = 0.0        # 0: look the GPU up in PEAK_TFLOPS
lr = 6.7e-5              # AdamW as in training (spec section 4); the value does not change timings
grad_clip = 1.0
memory = True            # measure peak memory (one extra step per variant)
head_mem = False         # instead: loss-head peak memory, lrc.distill_loss vs the plain computation
head_vocab = 151936
head_seq = 2048
head_batch = 1
head_hidden = 0          # 0: 2048 on GPU (Qwen2.5-3B), 256 on CPU (memory does not depend on it)
head_student_hidden = 0  # 0: 1200 on GPU, 128 on CPU
kl_precision = False     # instead: how far the official run's bf16 KL is from the float32 one (head_vocab, head_seq)
gpu_report = ""          # instead: write the GPU report (markdown) to this file (see "The GPU report" below)
tiny = False             # gpu_report at tiny shapes, on any device: the report's own test on the CPU
seed = 1337
# -----------------------------------------------------------------------------
_DEFAULTS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, str))}

SHAPES = {
    # dims: vocab, hidden, FFN, layers, heads, kv heads, student hidden, tied embeddings; default B, T
    # train.py's toy run (config/toy.py): its teacher, student_hidden 64, micro-batch 16 x 128 (the toy
    # tokenizer has at most 1024 tokens)
    "toy": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                num_kv_heads=2, student_hidden=64, tie=True, batch_size=16, seq_len=128),
    "mid": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=4, num_heads=8,
                num_kv_heads=2, student_hidden=320, tie=True, batch_size=16, seq_len=256),
    # Qwen2.5-3B(-Instruct) -> LRC-1.7B; B=2 x 2048 = 4096 tokens per GPU, what the reference ran per
    # GPU per optimizer step (32,768 tokens over 8 GPUs)
    "qwen2.5-3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                       num_heads=16, num_kv_heads=2, student_hidden=1200, tie=True, batch_size=2, seq_len=2048),
    # Qwen2.5-7B(-Instruct) -> LRC-4B (untied)
    "qwen2.5-7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                       num_heads=28, num_kv_heads=4, student_hidden=2048, tie=False, batch_size=1, seq_len=2048),
}

# dense bf16 tensor-core peak, TFLOP/s, from NVIDIA's data sheets; first matching name wins
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
               ("H800 PCIe", 756.0), ("H800", 989.4), ("GH200", 989.4), ("B200", 2250.0),
               ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0)]


# -----------------------------------------------------------------------------
# FLOPs and peak FLOP/s

def matmul_params(c: lrc.Qwen2Config) -> int:
    """Parameters that take part in a matmul for each token: the layers and the LM head."""
    d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    H, Hkv = c.num_attention_heads, c.num_key_value_heads
    per_layer = d * H * hd + 2 * d * Hkv * hd + H * hd * d + 3 * d * f
    return c.num_hidden_layers * per_layer + c.vocab_size * d


def attention_flops(c: lrc.Qwen2Config, T: int) -> float:
    """Forward FLOPs per token of QK^T and AV under a causal mask (T/2 keys on average)."""
    return 2 * 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * T / 2


def model_flops_per_token(teacher_cfg, student_cfg, T, kind):
    teacher = 2 * matmul_params(teacher_cfg) + attention_flops(teacher_cfg, T)
    student = 6 * matmul_params(student_cfg) + 3 * attention_flops(student_cfg, T)
    return {"a": teacher, "b": student}.get(kind, teacher + student)


def gpu_peak_tflops(dev):
    name = torch.cuda.get_device_name(dev)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops, name
    return 0.0, name


# -----------------------------------------------------------------------------
# (d): the reference implementation's attention, q/k/v per token as W @ (P @ x)

def reference_layer(x, layer, t: lrc.LayerWeights, cos, sin, c):
    """lrc.qwen2_layer for a student layer, except q/k/v: two matmuls per token through the
    teacher's width d instead of one with the generated [out, d_s] weight. o/gate/up/down generated."""
    dt = t.q.dtype
    o_w, gate_w, up_w, down_w = layer.P_o.to(dt) @ t.o, t.gate @ layer.P_gate.to(dt), \
        t.up @ layer.P_up.to(dt), layer.P_down.to(dt) @ t.down
    h = lrc.rms_norm(x, layer.attn_norm.to(dt), c.rms_norm_eps)
    q = F.linear(F.linear(h, layer.P_q.to(dt)), t.q, t.q_bias)
    k = F.linear(F.linear(h, layer.P_k.to(dt)), t.k, t.k_bias)
    v = F.linear(F.linear(h, layer.P_v.to(dt)), t.v, t.v_bias)
    o = F.linear(lrc.attention(q, k, v, cos, sin, c.head_dim), o_w)
    x = x + o
    h = lrc.rms_norm(x, layer.ffn_norm.to(dt), c.rms_norm_eps)
    gate, up = F.linear(h, gate_w), F.linear(h, up_w)
    ffn_out = F.linear(F.silu(gate) * up, down_w)
    return x + ffn_out, lrc.Activations(q, k, v, o, gate, up, ffn_out)


class ReferenceStyleLRC(lrc.LRC):
    """Same parameters, losses and head as lrc.LRC; only the student's q/k/v are computed per token."""

    def side_by_side(self, idx, with_teacher=True):
        teacher, c = self.teacher, self.teacher.config
        cos, sin = lrc.rope_cos_sin(torch.arange(idx.shape[1], device=idx.device), c.head_dim, c.rope_theta)
        with torch.no_grad():
            x_t = teacher.model.embed_tokens(idx)
        x_s = x_t @ self.P_emb.to(x_t.dtype)
        clone = torch.zeros((), device=idx.device)
        for block, layer in zip(teacher.model.layers, self.layers):
            teacher_weights = block.weights()
            x_s, act_s = reference_layer(x_s, layer, teacher_weights, cos, sin, c)
            with torch.no_grad():
                x_t, act_t = lrc.qwen2_layer(x_t, teacher_weights, cos, sin, c)
            clone = clone + layer.clone_loss(act_s, act_t)
        h_s = lrc.rms_norm(x_s, self.final_norm.to(x_s.dtype), c.rms_norm_eps)
        return h_s, teacher.model.norm(x_t), clone


# -----------------------------------------------------------------------------
# the variants: each is built on demand, so that on GPU only one lives at a time next to the teacher

def plain_student_loss(student, idx, targets):
    logits = student(idx)
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def lrc_loss(model, idx, targets):
    return model(idx, targets)[0]


def make_optimizer(params, dev):
    # as train.py: AdamW(0.9, 0.999), no weight decay, fused on GPU
    return torch.optim.AdamW(list(params), lr=lr, betas=(0.9, 0.999), weight_decay=0.0, fused=dev.type == "cuda")


class Variant:
    def __init__(self, key, label, step, keep, flops_per_token, free=()):
        self.key, self.label, self.step, self.keep = key, label, step, keep
        self.flops_per_token, self.free = flops_per_token, list(free)
        self.times, self.cpu_times, self.compile_s, self.peak_bytes = [], [], None, None


def build_variant(key, teacher, student_cfg, idx, targets, dev, amp, tie):
    """Returns a Variant whose step() runs one full step of grad_accum micro-steps (train.py's optimizer step:
    distributed.optimizer_step and micro_step). keep() lists the tensors it keeps."""
    maybe_compile = torch.compile if compile else (lambda f: f)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    T = idx.shape[1]
    flops = model_flops_per_token(teacher.config, student_cfg, T, "c" if key == "e" else key[0])

    if key == "a":
        forward = maybe_compile(teacher)

        def step():
            for _ in range(grad_accum):
                with torch.inference_mode(), autocast():
                    forward(idx)
        return Variant("a", "(a) teacher forward, inference mode", step, lambda: list(teacher.parameters()), flops)

    if key == "b":
        with torch.device(dev):
            student = lrc.Qwen2(student_cfg)  # fp32 master weights, like the LRC projections
        opt = make_optimizer(student.parameters(), dev)
        params = list(student.parameters())
        loss_fn = maybe_compile(plain_student_loss)
        label = "(b) plain student train step"
    else:
        cls = ReferenceStyleLRC if key == "d" else lrc.LRC
        model = cls(teacher, student_cfg.hidden_size, tie_proj=tie, checkpoint_layers=key == "c_ckpt")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, dev)
        student = model
        loss_fn = maybe_compile(lrc_loss)
        label = {"c": "(c) LRC train step", "c_ckpt": "(c) LRC step, checkpoint_layers",
                 "d": "(d) reference-style LRC step", "e": "(e) LRC step, generate=step"}[key]
    generate = "step" if key == "e" else "micro_step"

    def step():
        with distributed.optimizer_step(student, generate, grad_accum):
            for micro in range(grad_accum):
                with distributed.micro_step(student, None, micro == grad_accum - 1):
                    with autocast():
                        loss = loss_fn(student, idx, targets)
                    (loss / grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)  # no host sync
        opt.step()
        opt.zero_grad(set_to_none=True)

    def keep():
        state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
        step_weights = student.step_weight_tensors() if isinstance(student, lrc.LRC) else []
        return list(student.parameters()) + state + step_weights
    return Variant(key, label, step, keep, flops, free=[student, opt])


# -----------------------------------------------------------------------------
# timing and memory

def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_steps(step, n, dev):
    """(wall seconds, CPU seconds) per step. GPU: CUDA events around each step, read after one sync at
    the end (no host sync between steps, so launch overhead is hidden exactly as in training). CPU: wall
    clock, and the process's CPU time (all threads), which other processes on the machine inflate less."""
    if dev.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(dev)
        return [start.elapsed_time(end) / 1e3 for start, end in events], []
    times, cpu_times = [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return times, cpu_times


def storage_bytes(tensors):
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[(s.device, s.data_ptr())] = s.nbytes()
    return sum(storages.values())


def cpu_peak_transient_bytes(fn):
    """Most bytes held at once by allocations made during fn() (net of its frees), from the CPU
    allocator events torch.profiler records with profile_memory=True."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)
    allocations = sorted((e.start_time_ns, e.extra_fields.alloc_size)
                         for e in walk(prof.profiler.kineto_results.experimental_event_tree())
                         if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu")
    current = peak = 0
    for _, size in allocations:
        current += size
        peak = max(peak, current)
    return peak


def peak_transient_bytes(fn, dev):
    if dev.type == "cuda":
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        sync(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    try:
        return cpu_peak_transient_bytes(fn)
    except Exception as e:  # private profiler API: degrade to "not measured", never fail the benchmark
        print(f"note: CPU memory not measured ({type(e).__name__}: {e})")
        return None


def run_variant_warmup(v, dev):
    for i in range(warmup):
        t0 = time.perf_counter()
        v.step()
        sync(dev)
        if i == 0:
            v.compile_s = time.perf_counter() - t0


def measure_memory(v, dev):
    if memory:
        transient = peak_transient_bytes(v.step, dev)
        v.peak_bytes = None if transient is None else storage_bytes(v.keep()) + transient


def release(v, dev):
    v.step = v.keep = None
    v.free.clear()
    if compile and dev.type == "cuda":
        torch._dynamo.reset()  # compiled graphs hold references to the modules they were built for
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# loss-head memory: lrc.distill_loss (chunked, fused) against the plain computation

def plain_head_loss(h_s, W_s, targets, h_t, W_t, tau):
    """KL + LM with full [B*T, V] float32 logits and autograd: what the chunked head replaces."""
    B, V = h_s.shape[0], W_s.shape[0]
    z_s = (h_s @ W_s.T).float()
    with torch.no_grad():
        log_p = torch.log_softmax((h_t @ W_t.T).float() / tau, dim=-1)
    log_q = torch.log_softmax(z_s / tau, dim=-1)
    kl = F.kl_div(log_q.view(-1, V), log_p.view(-1, V), log_target=True, reduction="sum") / B
    lm = F.cross_entropy(z_s.view(-1, V), targets.view(-1), ignore_index=-1)
    return kl + lm


def bench_head_memory(dev, wdtype):
    V, T, B = head_vocab, head_seq, head_batch
    d = head_hidden or (2048 if dev.type == "cuda" else 256)
    d_s = head_student_hidden or (1200 if dev.type == "cuda" else 128)
    g = torch.Generator(device=dev).manual_seed(seed)
    h_s = torch.randn(B, T, d_s, device=dev, generator=g).to(wdtype).requires_grad_()
    W_s = (torch.randn(V, d_s, device=dev, generator=g) * 0.02).to(wdtype).requires_grad_()
    h_t = torch.randn(B, T, d, device=dev, generator=g).to(wdtype)
    W_t = (torch.randn(V, d, device=dev, generator=g) * 0.02).to(wdtype)
    targets = torch.randint(V, (B, T), device=dev, generator=g)
    full = B * T * V * 4
    print(f"loss head at V={V}, B={B}, T={T}, d={d}, d_s={d_s}, {wdtype}, {dev.type}; "
          f"one [B*T, V] float32 tensor = {full / 2**20:.0f} MiB")
    print(f"{'head':<38}{'peak extra MiB':>15}{'x [B*T,V]':>11}{'ms fwd+bwd':>12}")

    def fused():
        lrc.distill_loss(h_s, W_s, targets, h_t, W_t, tau=40.0)[0].backward()

    def plain():
        plain_head_loss(h_s, W_s, targets, h_t, W_t, 40.0).backward()

    chunk = max(1, 2**26 // V)
    for label, fn in ((f"lrc.distill_loss (chunks of {chunk} rows)", fused), ("plain log_softmax KL + CE", plain)):
        h_s.grad = W_s.grad = None
        fn()  # warm-up
        h_s.grad = W_s.grad = None
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ms = (time.perf_counter() - t0) * 1e3
        h_s.grad = W_s.grad = None
        peak = peak_transient_bytes(fn, dev)
        peak_s = "n/a" if peak is None else f"{peak / 2**20:.0f}"
        ratio = "n/a" if peak is None else f"{peak / full:.2f}"
        print(f"{label:<38}{peak_s:>15}{ratio:>11}{ms:>12.0f}")
    print("peak extra = most bytes allocated at once during forward + backward above what was allocated "
          "before (includes the input gradients, same for both)")


def kl_in(z_s, z_t, tau, dtype):
    """L_KL (spec section 4) computed in `dtype` from the same logits [B, T, V]: log_softmax of both, kl_div with
    log_target and batchmean (sum / B). bf16 is the official code's computation (bf16 logits, no autocast, so
    the forward and its backward run in bf16); float32 this project's loss head; float64 the reference."""
    log_q = F.log_softmax(z_s.to(dtype) / tau, dim=-1)
    log_p = F.log_softmax(z_t.to(dtype) / tau, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def bench_kl_precision():
    """The official run computed L_KL in bf16 (spec section 4, differences); this project computes its loss head
    in float32. Both are compared with float64 on the same bf16 logits, the value and dL/dz_s: synthetic logits
    at V = head_vocab (a teacher z_t ~ 2.5 N(0, 1) with one token per position raised by 12, a peaked
    next-token distribution; a student z_s = z_t + gap N(0, 1), early (gap 2) and late (gap 0.5) in training)."""
    V, T = head_vocab, head_seq
    g = torch.Generator().manual_seed(seed)
    print(f"L_KL and its gradient dL/dz_s at V={V}, {T} positions (B=1), against float64 on the same bf16 logits")
    print(f"{'tau':>5}{'gap':>6}{'L_KL float64':>14}{'float32 rel err':>17}{'bf16 rel err':>14}"
          f"{'grad f32 rel err':>18}{'grad bf16 rel err':>19}{'bf16 cosine':>13}")
    for tau in (1.0, 40.0):
        for gap in (2.0, 0.5):
            z_t = 2.5 * torch.randn(1, T, V, generator=g)
            z_t[0, torch.arange(T), torch.randint(V, (T,), generator=g)] += 12.0
            z_s = z_t + gap * torch.randn(1, T, V, generator=g)
            z_t, z_s = z_t.bfloat16(), z_s.bfloat16()
            results = {}
            for name, dtype in (("f64", torch.float64), ("f32", torch.float32), ("bf16", torch.bfloat16)):
                s = z_s.clone().requires_grad_()
                loss = kl_in(s, z_t, tau, dtype)
                loss.backward()
                results[name] = (loss.double().item(), s.grad.double())
                del s, loss
            ref_loss, ref_grad = results["f64"]
            rel = {k: abs(v[0] - ref_loss) / ref_loss for k, v in results.items()}
            grad_rel = {k: ((v[1] - ref_grad).norm() / ref_grad.norm()).item() for k, v in results.items()}
            cosine = F.cosine_similarity(results["bf16"][1].flatten(), ref_grad.flatten(), dim=0).item()
            print(f"{tau:>5g}{gap:>6g}{ref_loss:>14.5g}{rel['f32']:>17.1e}{rel['bf16']:>14.1e}"
                  f"{grad_rel['f32']:>18.1e}{grad_rel['bf16']:>19.1e}{cosine:>13.4f}")
            del results, ref_grad, z_t, z_s
    print("rel err = |x - x_float64| / |x_float64| (for the gradient, of the L2 norm over all [T, V] entries)")


# -----------------------------------------------------------------------------

def pick_device():
    """(device, weight dtype, autocast for the plain student) from --device / --dtype."""
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise lrc.LRCError("--device=cuda but torch sees no CUDA device: use --device=cpu or auto")
    wdtype = lrc.as_dtype(dtype) if dtype != "auto" else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    amp = dev.type == "cuda" and wdtype != torch.float32  # plain student: fp32 masters + bf16 autocast
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev, wdtype, amp


def build_teacher(config, dev, wdtype):
    """(shape dict, random-weight teacher built on the device in the weight dtype, exported student config)."""
    if shape not in SHAPES:
        raise lrc.LRCError(f"unknown --shape={shape}: use one of {', '.join(SHAPES)}")
    s = dict(SHAPES[shape])
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "student_hidden", "batch_size", "seq_len"):
        if config[key]:
            s[key] = config[key]
    teacher = random_teacher(s, dev, wdtype)
    return s, teacher, lrc.student_shape(teacher.config, s["student_hidden"], s["tie"])


def shape_config(s) -> lrc.ModelConfig:
    return lrc.Qwen2Config(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                           intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
                           num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
                           tie_word_embeddings=s["tie"], max_position_embeddings=max(s["seq_len"], 32768))


def random_teacher(s, dev, wdtype):
    """Random weights, built on the device directly in the weight dtype (no 2x copy of a 7B model)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(wdtype)
    try:
        with torch.device(dev):
            teacher = lrc.CausalLM(shape_config(s))
    finally:
        torch.set_default_dtype(default_dtype)
    return teacher.requires_grad_(False).eval()


def run_variants(keys, build, dev, n_rounds):
    """Warm up, time and measure each variant. One round: one variant at a time, so that on GPU only the
    teacher and that variant are resident. Several: all resident, interleaved round by round so that
    contention hits them alike."""
    done = []
    if n_rounds == 1:
        for key in keys:
            v = None
            try:
                v = build(key)
                run_variant_warmup(v, dev)
                wall, cpu = time_steps(v.step, steps, dev)
                v.times += wall
                v.cpu_times += cpu
                measure_memory(v, dev)
                done.append(v)
            except torch.OutOfMemoryError:
                print(f"note: ({key}) ran out of memory at batch_size={batch_size or 'default'}: skipped (try "
                      f"--batch_size=1 or --checkpoint=True)")
            if v is not None:
                release(v, dev)
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        return done
    done = [build(key) for key in keys]
    for v in done:
        run_variant_warmup(v, dev)
    for _ in range(n_rounds):
        for v in done:
            wall, cpu = time_steps(v.step, steps, dev)
            v.times += wall
            v.cpu_times += cpu
    for v in done:
        measure_memory(v, dev)
        release(v, dev)
    return done


def report(done, dev, tokens_per_step, flops_c):
    """The table (ms/step, tokens/s, peak memory, MFU) and the ratios against the floor."""
    peak = peak_tflops
    if dev.type == "cuda" and not peak:
        peak, name = gpu_peak_tflops(dev)
        if not peak:
            print(f"note: no peak FLOP/s known for {name!r}: pass --peak_tflops for MFU")
    stats = {"median wall": {v.key: statistics.median(v.times) for v in done},
             "min wall": {v.key: min(v.times) for v in done}}
    cpu_col = dev.type == "cpu"
    if cpu_col:
        stats["median CPU time"] = {v.key: statistics.median(v.cpu_times) for v in done}
    median = stats["median wall"]
    print(f"{'variant':<36}{'ms/step':>9}{'min':>9}" + (f"{'CPU ms':>9}" if cpu_col else "")
          + f"{'tokens/s':>10}{'peak MiB':>10}{'MFU':>7}{'1st step s':>11}")
    for v in done:
        tps = tokens_per_step / median[v.key]
        mem = "n/a" if v.peak_bytes is None else f"{v.peak_bytes / 2**20:.0f}"
        mfu = f"{100 * v.flops_per_token * tps / (peak * 1e12):.1f}%" if peak else "-"
        cpu_ms = f"{1e3 * stats['median CPU time'][v.key]:>9.1f}" if cpu_col else ""
        first = "-" if v.compile_s is None else f"{v.compile_s:.1f}"
        print(f"{v.label:<36}{1e3 * median[v.key]:>9.1f}{1e3 * min(v.times):>9.1f}{cpu_ms}{tps:>10.0f}{mem:>10}"
              f"{mfu:>7}{first:>11}")
    print("ms/step, tokens/s and MFU from the median wall time per step" +
          ("; CPU ms = median CPU time of this process per step (all threads)" if cpu_col else ""))
    for name, t in stats.items():
        parts = []
        for lrc_step in ("c", "e"):
            if {"a", "b", lrc_step} <= t.keys():
                parts.append(f"floor ratio {lrc_step}/(a+b) = {t[lrc_step] / (t['a'] + t['b']):.3f}")
        if {"c", "d"} <= t.keys():
            parts.append(f"c/d = {t['c'] / t['d']:.3f}")
        if {"c", "c_ckpt"} <= t.keys():
            parts.append(f"checkpointing costs {t['c_ckpt'] / t['c']:.3f}x (c)")
        if parts:
            print(f"from {name:<16}: " + ", ".join(parts))
    if hasattr(os, "getloadavg"):
        print(f"load average at end {os.getloadavg()[0]:.2f} (above the thread count: timings contended)")
    memory = {v.key: v.peak_bytes for v in done if v.peak_bytes is not None}
    if {"c", "e"} <= memory.keys():
        print(f"generate=step (e) holds {(memory['e'] - memory['c']) / 2**20:+.0f} MiB at its peak against (c): the "
              f"weights of the step and their float32 gradient sums")
    print(f"model FLOPs/token: 2*teacher + 6*student matmul params + causal attention = {flops_c / 1e9:.3f} GFLOP "
          "(c, d, e); reference LRC-1.7B: ~8.7k tokens/s per H800")


# -----------------------------------------------------------------------------
# The memory planner: python bench.py --plan CONFIG [--key=value ...] --world_size=N --gpu_mem_gib=80
#
# For each setting it runs one real training step of lrc.LRC as train.py runs it (forward, backward,
# clipping, AdamW; wrapped by distributed.wrap exactly as train.py wraps it) under FakeTensorMode, where
# tensors have shapes and no memory, and replays the bytes of every tensor storage that op produced,
# freed and resized. World size N is a fake process group on rank 0 (torch.testing's FakeStore, as
# torchtitan's memory estimation does): collectives do nothing, but every buffer FSDP2 allocates for them is
# counted. It runs on the CPU device with bf16 weights and autocast, as the GPU run would (CUDA itself cannot
# be faked on a CPU-only build); storages are rounded up to the CUDA caching allocator's 512-byte blocks, which
# is what torch.cuda.max_memory_allocated counts. Not counted: the CUDA context and NCCL buffers (~1-2 GB),
# allocator fragmentation, kernels' private workspaces (what the 10% headroom is for); torch.compile is not
# simulated (eager; compiling usually lowers activation memory).

# Teachers whose config.json is known without the hub (the fields lrc reads), from the files published at
# https://huggingface.co/<id>/blob/main/config.json (3B and 7B are also bench.SHAPES). 32B: checked against a
# verbatim copy of its config.json; 14B: against its model card (48 layers,
# 40 query / 8 kv heads, 14.7B parameters: these numbers give 14,770,033,664) and copies of hidden 5120,
# intermediate 13824, vocabulary 152064. Untied, rms_norm_eps 1e-6, rope_theta 1e6, 32768 positions in both.
_QWEN25 = dict(model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
               use_sliding_window=False, torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645)
KNOWN_TEACHERS = {
    "Qwen/Qwen2.5-3B-Instruct": dict(_QWEN25, vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                     num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                                     tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(_QWEN25, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                     tie_word_embeddings=False),
    "Qwen/Qwen2.5-14B-Instruct": dict(_QWEN25, vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                                      num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                                      tie_word_embeddings=False),
    "Qwen/Qwen2.5-32B-Instruct": dict(_QWEN25, vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                                      num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                                      tie_word_embeddings=False),
    # the LRC-1.5B teacher (config/lrc_1.5b.py): llama3 rope scaling, explicit head_dim, tied
    "meta-llama/Llama-3.2-3B-Instruct": dict(model_type="llama", vocab_size=128256, hidden_size=3072,
                                             intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                                             num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                                             rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                                             rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                               high_freq_factor=4.0,
                                                               original_max_position_embeddings=8192),
                                             torch_dtype="bfloat16", bos_token_id=128000, eos_token_id=128009),
}
PLAN_KEYS = dict(plan=False, world_size=8, gpu_mem_gib=80.0, teacher_config="", headroom=0.1,
                 plan_micro_batch_sizes="1,2,4,8")
SETTINGS = [("ddp", False), ("fsdp", False), ("fsdp", True)]   # parallel, shard_teacher
CHECKPOINTING = (False, True, "layer")                         # activation_checkpointing: off, student, layer
AC_NAMES = {False: "off", True: "student", "layer": "layer"}
GENERATE = ("step", "micro_step")                              # generate: once per optimizer step, every micro-step
GENERATE_NAMES = {"step": "once", "micro_step": "micro"}
PLAN_MICRO_BATCHES = (1, 2, 4, 8)
COLUMNS = ("teacher", "trainable", "generated", "activations")


def plan_teacher_config(cfg) -> lrc.ModelConfig:
    """--teacher_config (a config.json, or a name in KNOWN_TEACHERS), else the preset's teacher: a local
    checkpoint directory, a known hub id, or config.json alone fetched from the hub (never weights)."""
    ref = cfg["teacher_config"] or cfg["teacher"]
    if ref in KNOWN_TEACHERS:
        return lrc.ModelConfig.from_dict(KNOWN_TEACHERS[ref])
    if cfg["teacher_config"] and os.path.isfile(ref):
        import json
        with open(ref) as f:
            return lrc.ModelConfig.from_dict(json.load(f))
    if os.path.isdir(ref):
        return lrc.ModelConfig.from_pretrained(ref)
    if ref == "toy" or cfg["teacher_config"] or ref.count("/") != 1:
        raise lrc.LRCError(f"cannot read the teacher's config.json from {ref!r}: pass --teacher_config=FILE (a "
                           f"config.json) or one of {', '.join(KNOWN_TEACHERS)}")
    try:
        import huggingface_hub
        return lrc.ModelConfig.from_pretrained(os.path.dirname(huggingface_hub.hf_hub_download(ref, "config.json")))
    except Exception as e:
        raise lrc.LRCError(f"could not fetch config.json of {ref!r} from the hub ({type(e).__name__}): pass "
                           f"--teacher_config=FILE, a local teacher directory, or one of {', '.join(KNOWN_TEACHERS)}") \
            from None


class LiveStorages(TorchDispatchMode):
    """Every tensor storage that an op returns, with its bytes, until it is freed (a weak reference) or resized
    (FSDP2 frees and refills its gathered parameters with UntypedStorage.resize_). Storages are labelled by
    what holds them (label()) or, failing that, by the code that made them (context); the timeline is
    replayed at the end, so a label given late (an optimizer state made in step 1) counts from the start."""

    def __init__(self, round_to=512):
        super().__init__()
        self.round_to, self.keys, self.size, self.refs = round_to, WeakIdKeyDictionary(), {}, {}
        self.events, self.labels, self.made_in, self.context, self.marks = [], {}, {}, None, []

    def _bytes(self, nbytes):
        return -(-nbytes // self.round_to) * self.round_to

    def _key(self, storage):
        """The storage's number, registering a new one; an existing one's size is re-read (aten.resize_)."""
        key = self.keys.get(storage)
        if key is None:
            key = self.keys[storage] = len(self.made_in) + 1
            self.size[key] = 0
            self.made_in[key] = self.context
            self.refs[key] = weakref.ref(storage, lambda _, k=key: self._resize(k, 0))
        self._resize(key, storage.nbytes())
        return key

    def _resize(self, key, nbytes):
        new = self._bytes(nbytes) if nbytes else 0
        if key in self.size and new != self.size[key]:
            self.events.append((key, new - self.size[key]))
            self.size[key] = new

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                for storage in get_untyped_storages(t):
                    self._key(storage)
        return out

    def __enter__(self):
        tracker, resize = self, torch.UntypedStorage.resize_

        def tracked_resize(storage, nbytes):
            out = resize(storage, nbytes)
            tracker._resize(tracker._key(storage), nbytes)
            return out
        self._resize_impl, torch.UntypedStorage.resize_ = resize, tracked_resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize_impl
        return super().__exit__(*exc)

    def label(self, tensors, label):
        for t in tensors:
            if isinstance(t, torch.Tensor):
                for storage in get_untyped_storages(t):
                    self.labels[self._key(storage)] = label

    @contextlib.contextmanager
    def making(self, label):
        outer, self.context = self.context, label
        try:
            yield
        finally:
            self.context = outer

    def mark(self):
        self.marks.append(len(self.events))

    def peak(self, start, end):
        """(peak bytes, {label: bytes at the peak}) over events[start:end], everything live counted."""
        current = dict.fromkeys(COLUMNS, 0)
        best = None
        for i, (key, delta) in enumerate(self.events[:end]):
            current[self.labels.get(key) or self.made_in[key] or "activations"] += delta
            if i >= start and (best is None or sum(current.values()) > sum(best.values())):
                best = dict(current)
        return sum(best.values()), best


def _label_gathered(tracker, model):
    """FSDP2's gathered (unsharded) parameters, seen right after FSDP's own pre-forward hook has gathered them
    (its hooks run first): the teacher's as teacher, the projections' as trainable state."""
    def label_args(module, args):
        for m in [module] + [a for a in args if isinstance(a, torch.nn.Module)]:
            tracker.label([p for p in m.parameters() if p.requires_grad], "trainable")
            tracker.label([p for p in m.parameters() if not p.requires_grad], "teacher")
    return [m.register_forward_pre_hook(label_args) for m in [model, *model.layers]]


def _label_fsdp_grads(tracker, model):
    """Unsharded gradients FSDP2 keeps between micro-steps (fsdp_grad_sync='step'): its private state, read
    as torch.distributed._tools.FSDPMemTracker reads it."""
    for module in model.modules():
        state = getattr(module, "_get_fsdp_state", None)
        for group in (state()._fsdp_param_groups if state is not None else []):
            for fp in group.fsdp_params:
                tracker.label([getattr(fp, "unsharded_accumulated_grad", None),
                               getattr(getattr(fp, "_unsharded_param", None), "grad", None)], "trainable")


def _emulate_ddp_buckets(params):
    """What DDP's C++ reducer (which cannot run on fake tensors) holds: one float32 bucket the size of all
    gradients, for the whole run; each gradient is copied into its view, which becomes p.grad
    (gradient_as_bucket_view=True, as distributed.wrap asks)."""
    bucket = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype)
    views, start = {}, 0
    for p in params:
        views[p] = bucket[start:start + p.numel()].view_as(p)
        start += p.numel()

    def into_bucket(p):
        if p.grad is not views[p]:
            views[p].copy_(p.grad)
            p.grad = views[p]
    for p in params:
        p.register_post_accumulate_grad_hook(into_bucket)
    return bucket


def plan_build(teacher_cfg, cfg, parallel, shard_teacher, ac, mbs, world_size, dtype, mesh=None):
    """The step's state as train.py builds it: a random teacher in `dtype`, lrc.LRC over it (float32
    projections), the wrapper of distributed.wrap (DDP emulated above world size 1), AdamW, one batch."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        teacher = lrc.CausalLM(teacher_cfg)
    finally:
        torch.set_default_dtype(default)
    model = lrc.LRC(teacher, cfg["student_hidden"], tie_proj=cfg["tie_proj"], alpha=cfg["alpha"], tau=cfg["tau"],
                    init_std=cfg["init_std"], checkpoint_layers=ac is True, clone_attn_out=cfg["clone_attn_out"],
                    clone_terms=cfg["clone_terms"])
    # DDP itself is left out (its reducer reads real memory) and emulated by _emulate_ddp_buckets
    procs = distributed.Processes(0, 0, world_size if parallel == "fsdp" else 1, torch.device("cpu"), False)
    train_model, _ = distributed.wrap(model, procs, False, parallel, shard_teacher, dtype, mesh,
                                      whole_layers=ac == "layer")
    params = [p for p in model.parameters() if p.requires_grad]
    bucket = _emulate_ddp_buckets(params) if parallel == "ddp" and world_size > 1 else None
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]),
                                  weight_decay=cfg["weight_decay"])
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(teacher_cfg.vocab_size, (mbs, cfg["seq_len"]), generator=g) for _ in range(2))
    return dict(model=model, train_model=train_model, params=params, optimizer=optimizer, batch=(x, y),
                bucket=bucket, dtype=dtype)


def plan_step(state, micro_steps, cfg, tracker=None):
    """One optimizer step as train.train_loop runs it: the weights made once (generate='step'), micro-steps of
    forward and backward under autocast, the global-norm clip, AdamW, zero_grad(set_to_none=True)."""
    model, params, optimizer = state["model"], state["params"], state["optimizer"]
    amp = torch.autocast("cpu", dtype=state["dtype"]) if state["dtype"] != torch.float32 else contextlib.nullcontext()
    with distributed.optimizer_step(model, cfg["generate"], micro_steps):
        for micro in range(micro_steps):
            with distributed.micro_step(model, None, micro == micro_steps - 1, cfg["fsdp_grad_sync"]):
                with amp:
                    loss, _ = state["train_model"](*state["batch"])
                (loss / micro_steps).backward()
            del loss
            if tracker is not None:
                _label_fsdp_grads(tracker, model)
    distributed.clip_grad_norm(params, cfg["grad_clip"] or math.inf)
    if tracker is not None:
        tracker.label([p.grad for p in params], "trainable")
    optimizer.step()
    if tracker is not None:
        tracker.label([t for st in optimizer.state.values() for t in st.values()], "trainable")
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def fake_world(world_size):
    """A fake process group of world_size ranks in this one process (this is rank 0); a real one in use is
    left alone (the planner then refuses)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise lrc.LRCError("bench.py --plan runs alone: it makes its own fake process group (do not start it "
                           "with torchrun)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def estimate(teacher_cfg, cfg, parallel, shard_teacher, ac, mbs, world_size, micro_steps, dtype, round_to=512):
    """(peak bytes, {column: bytes}) of the second of two simulated steps (the first makes AdamW's state)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with fake_world(world_size):
        mesh = distributed.device_mesh("cpu", world_size) if parallel == "fsdp" else None
        tracker = LiveStorages(round_to)
        with FakeTensorMode(), tracker, _labelled_generation(tracker):
            state = plan_build(teacher_cfg, cfg, parallel, shard_teacher, ac, mbs, world_size, dtype, mesh)
            model = state["model"]
            tracker.label(model.teacher.parameters(), "teacher")
            tracker.label([state["bucket"], *state["params"]], "trainable")
            hooks = _label_gathered(tracker, model)
            plan_step(state, micro_steps, cfg, tracker)
            tracker.mark()
            plan_step(state, micro_steps, cfg, tracker)
            tracker.mark()
            for h in hooks:
                h.remove()
            del state, model
    return tracker.peak(*tracker.marks)


@contextlib.contextmanager
def _labelled_generation(tracker):
    """Storages made while the student's weights are generated (LRCLayer.generate, LRC.student_head) count
    as generated weights; so do generate='step''s weights and their float32 gradient sums (lrc.StepWeights)."""
    saved = lrc.LRCLayer.generate, lrc.LRC.student_head, lrc.StepWeights.make

    def labelled(method):
        def run(*args):
            with tracker.making("generated"):
                return method(*args)
        return run
    lrc.LRCLayer.generate, lrc.LRC.student_head, lrc.StepWeights.make = map(labelled, saved)
    try:
        yield
    finally:
        lrc.LRCLayer.generate, lrc.LRC.student_head, lrc.StepWeights.make = saved


def real_cpu_peak(teacher_cfg, cfg, parallel, ac, mbs, micro_steps, shard_teacher=False):
    """The same two steps for real on this CPU, float32: the most bytes the CPU allocator held during the
    second step, counting everything allocated since the build began (torch.profiler memory events), to check
    estimate() against. One process (parallel=fsdp on a one-rank gloo group), or this rank of the process
    group torchrun made (parallel=fsdp only: DDP is emulated by the planner, not run)."""
    import torch.distributed as dist
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function
    made = parallel == "fsdp" and not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    assert parallel == "fsdp" or world == 1, "DDP's peak is measured in one process"
    try:
        mesh = distributed.device_mesh("cpu", world) if parallel == "fsdp" else None
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            state = plan_build(teacher_cfg, cfg, parallel, shard_teacher, ac, mbs, world, torch.float32, mesh)
            plan_step(state, micro_steps, cfg)
            with record_function("measured step"):
                plan_step(state, micro_steps, cfg)
            del state
    finally:
        if made:
            dist.destroy_process_group()

    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)
    events = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    window = next(e for e in events if e.name == "measured step")
    current = peak = 0
    for t, size in sorted((e.start_time_ns, e.extra_fields.alloc_size) for e in events
                          if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"):
        current += size
        if window.start_time_ns <= t <= window.end_time_ns:
            peak = max(peak, current)
    return peak


def layer_matmul_params(c: lrc.Qwen2Config) -> int:
    """matmul_params without the LM head: what one pass through the layers multiplies by."""
    return matmul_params(c) - c.vocab_size * c.hidden_size


def step_costs(teacher_cfg, student_cfg, cfg, parallel, shard_teacher, ac, mbs, world_size, grad_accum, once=False):
    """(FLOPs per token, communication bytes per rank per optimizer step): arithmetic, to rank the settings that
    fit. FLOPs: the model FLOPs of MFU (2 x teacher + 6 x student matmul parameters + attention), plus generating
    the weights (W @ P forward and P's gradient backward, 4 * d_s FLOPs per teacher matmul parameter, once per
    micro-step, so spread over mbs * seq_len tokens, or with `once` (generate='step') once per optimizer step, over
    grad_accum times as many), plus what activation checkpointing recomputes: the student layers (True), or whole
    layers (teacher layer, the weight generation unless `once`, and student layer: 'layer'). Bytes: ring
    collectives move (N-1)/N of the data; DDP all-reduces float32 gradients once per step; FSDP2 gathers the bf16
    layers for forward and again for backward, the root once, and reduce-scatters float32 gradients every
    micro-step (fsdp_grad_sync='micro_step') or once; shard_teacher gathers the teacher the same way."""
    T, d, d_s = cfg["seq_len"], teacher_cfg.hidden_size, student_cfg.hidden_size
    tokens_per_generation = mbs * T * (grad_accum if once else 1)
    generate = 2 * d_s * matmul_params(teacher_cfg) / tokens_per_generation   # one forward of W @ P
    flops = model_flops_per_token(teacher_cfg, student_cfg, T, "c") + 2 * generate
    if ac:
        flops += 2 * layer_matmul_params(student_cfg) + attention_flops(student_cfg, T)
    if ac == "layer":
        flops += 2 * layer_matmul_params(teacher_cfg) + attention_flops(teacher_cfg, T)
        if not once:
            flops += generate * layer_matmul_params(teacher_cfg) / matmul_params(teacher_cfg)
    ring = (world_size - 1) / world_size
    layers = teacher_cfg.num_hidden_layers * (7 * d * d_s + 2 * d_s)   # the projections and norms of the layers
    root = (1 if cfg["tie_proj"] else 2) * d * d_s + d_s
    if parallel == "ddp":
        return flops, 2 * 4 * (layers + root) * ring
    reduces = grad_accum if cfg["fsdp_grad_sync"] == "micro_step" else 1
    comm = grad_accum * 2 * (2 * layers + root) * ring + reduces * 4 * (layers + root) * ring
    if shard_teacher:
        teacher_root = teacher_cfg.vocab_size * d * (1 if teacher_cfg.tie_word_embeddings else 2)
        comm += grad_accum * 2 * (2 * layer_matmul_params(teacher_cfg) + teacher_root) * ring
    return flops, comm


def plan(cfg, world_size, round_to=512, settings=SETTINGS, micro_batches=PLAN_MICRO_BATCHES, log=print):
    """One row per setting: its estimate, whether the batch arithmetic allows it, and its costs. A setting with
    several micro-steps per optimizer step has two rows, the weights generated once per step (generate='step',
    which also keeps their float32 gradient sums) and in every micro-step; with one micro-step the two are one."""
    teacher_cfg = plan_teacher_config(cfg)
    student_cfg = lrc.student_shape(teacher_cfg, cfg["student_hidden"], cfg["tie_proj"])
    dtype = torch.float32 if cfg["dtype"] == "fp32" else torch.bfloat16
    rows = []
    for parallel, shard_teacher in settings:
        for ac in CHECKPOINTING:
            for mbs in micro_batches:
                try:
                    grad_accum, _ = train.schedule_length(dict(cfg, micro_batch_size=mbs), world_size)
                except lrc.LRCError:
                    grad_accum = None  # estimated anyway (memory depends on the micro-batch), never recommended
                for generate in GENERATE if (grad_accum or 1) > 1 else ("micro_step",):
                    t0 = time.perf_counter()
                    peak, parts = estimate(teacher_cfg, dict(cfg, generate=generate), parallel, shard_teacher, ac, mbs,
                                           world_size, min(grad_accum or 1, 2), dtype, round_to)
                    flops, comm = step_costs(teacher_cfg, student_cfg, cfg, parallel, shard_teacher, ac, mbs,
                                             world_size, grad_accum or 1, once=generate == "step")
                    rows.append(dict(parallel=parallel, shard_teacher=shard_teacher, ac=ac, mbs=mbs,
                                     grad_accum=grad_accum, generate=generate, peak=peak, parts=parts, flops=flops,
                                     comm=comm, seconds=time.perf_counter() - t0))
                    log(f"  simulated {setting_name(rows[-1]):<20} ac={AC_NAMES[ac]:<7} mbs={mbs} "
                        f"generate={generate:<10}: {peak / 2**30:.2f} GiB ({rows[-1]['seconds']:.1f} s)")
    return teacher_cfg, rows


def setting_name(row):
    return row["parallel"] + (" + shard_teacher" if row["shard_teacher"] else "")


def generate_choice(row):
    """The row's generation mode where it is a choice (several micro-steps per step), else None: with one
    micro-step generate='step' and 'micro_step' are the same computation."""
    return row["generate"] if (row["grad_accum"] or 1) > 1 else None


def recommend(rows, gpu_bytes, headroom):
    """The fastest row that fits with headroom: the fewest FLOPs per token (to 3 significant digits: equal work
    is a tie), then the simplest parallel mode (DDP's one all-reduce per step overlaps the backward; FSDP2 adds
    all-gathers that the forward waits for, and shard_teacher gathers the teacher too), then the fewest bytes,
    then the fewest micro-steps (larger matmuls, fewer launches), then the lower peak."""
    fitting = [r for r in rows if r["grad_accum"] and r["peak"] <= (1 - headroom) * gpu_bytes]
    order = {setting: i for i, setting in enumerate(SETTINGS)}
    return min(fitting, key=lambda r: (float(f"{r['flops']:.3g}"), order[(r["parallel"], r["shard_teacher"])],
                                       r["comm"], r["grad_accum"], r["peak"])) if fitting else None


def plan_command(row, world_size, config_files, overrides, cfg):
    """The torchrun command of a row (one node up to 8 ranks, else nodes of 8). The row's settings are spelled
    out, all but a False that the config (preset and overrides) already has."""
    settings = dict(parallel=row["parallel"], shard_teacher=row["shard_teacher"], activation_checkpointing=row["ac"],
                    micro_batch_size=row["mbs"])
    keys = [f"--{key}={value}" for key, value in settings.items() if value is not False or cfg[key] is not False]
    generate = generate_choice(row)
    keys += [f"--generate={generate}"] if generate not in (None, cfg["generate"]) else []
    keys = overrides + [k for k in keys if k.split("=")[0] not in {o.split("=")[0] for o in overrides}]
    launch = (f"torchrun --standalone --nproc_per_node={world_size}" if world_size <= 8 else
              f"torchrun --nnodes={world_size // 8} --node_rank=$NODE_RANK --nproc_per_node=8 --rdzv_backend=c10d "
              f"--rdzv_endpoint=$MASTER_HOST:29500")
    return " ".join([launch, "train.py", *config_files, *keys])


def print_plan(rows, teacher_cfg, cfg, world_size, gpu_gib, headroom, config_files, overrides):
    gib = 2**30
    budget = (1 - headroom) * gpu_gib * gib
    print(f"teacher {cfg['teacher_config'] or cfg['teacher']}: L={teacher_cfg.num_hidden_layers} "
          f"d={teacher_cfg.hidden_size} f={teacher_cfg.intermediate_size} V={teacher_cfg.vocab_size} "
          f"-> student_hidden {cfg['student_hidden']}; seq_len {cfg['seq_len']}, tokens_per_step "
          f"{cfg['tokens_per_step']:,}, {world_size} ranks x {gpu_gib:g} GiB ({100 * headroom:g}% headroom: "
          f"fits <= {budget / gib:.1f} GiB)")
    print(f"{'parallel':<22}{'AC':<8}{'mbs':>4}{'accum':>6}{'gen':>6}{'teacher':>9}{'trainable':>10}{'generated':>10}"
          f"{'activ.':>9}{'peak GiB':>10}{'fits':>6}{'GFLOP/tok':>11}{'comm GB/step':>13}")
    for r in rows:
        fits = "n/a" if not r["grad_accum"] else ("yes" if r["peak"] <= budget else "no")
        print(f"{setting_name(r):<22}{AC_NAMES[r['ac']]:<8}{r['mbs']:>4}{r['grad_accum'] or '-':>6}"
              f"{GENERATE_NAMES.get(generate_choice(r), '-'):>6}"
              + "".join(f"{r['parts'][c] / gib:>{w}.2f}" for c, w in zip(COLUMNS, (9, 10, 10, 9)))
              + f"{r['peak'] / gib:>10.2f}{fits:>6}{r['flops'] / 1e9:>11.1f}{r['comm'] / 1e9:>13.1f}")
    print("GiB per rank at the peak of one step (rank 0): teacher weights (shards, and layers gathered at that "
          "moment), trainable state (projections and norms, their gradients and AdamW moments, gathered copies), "
          "generated student weights (with generate='step' also their float32 gradient sums), activations and every "
          "other transient; AC = activation_checkpointing (student: True, layer: 'layer'); accum = micro-steps per "
          "step ('-': tokens_per_step does not divide, n/a); gen = student weights generated once per optimizer step "
          "(generate='step') or in every micro-step ('-': one micro-step, where the two are the same)")
    best = recommend(rows, gpu_gib * gib, headroom)
    if best is None:
        low = min(rows, key=lambda r: r["peak"])
        fixed = (low["parts"]["generated"] + low["parts"]["activations"]) / gib
        print(f"nothing fits {gpu_gib:g} GiB with {100 * headroom:g}% headroom; the smallest peak is "
              f"{low['peak'] / gib:.1f} GiB ({setting_name(low)}, AC {AC_NAMES[low['ac']]}, mbs {low['mbs']}), of which "
              f"{fixed:.1f} GiB (generated weights and activations) do not shrink with more ranks: a larger GPU "
              f"(--gpu_mem_gib) or a shorter seq_len")
        return None
    generate = f", generate {generate_choice(best)}" if generate_choice(best) else ""
    print(f"fastest that fits: {setting_name(best)}, activation checkpointing {AC_NAMES[best['ac']]}, "
          f"micro_batch_size {best['mbs']}{generate} ({best['peak'] / gib:.1f} GiB):")
    print("  " + plan_command(best, world_size, config_files, overrides, cfg))
    return best


def plan_main(argv):
    keys = Keys(dict(train.KEYS.defaults, **PLAN_KEYS), optional=train.KEYS.optional, choices=train.KEYS.choices,
                exclusive=train.KEYS.exclusive, flags=("plan",), where_listed="DEFAULTS in train.py and PLAN_KEYS "
                "in bench.py")
    cfg = keys.parse(argv, doc=__doc__)
    try:
        micro_batches = tuple(int(m) for m in cfg["plan_micro_batch_sizes"].split(","))
    except ValueError:
        micro_batches = ()
    if cfg["world_size"] < 1 or cfg["gpu_mem_gib"] <= 0 or not 0 <= cfg["headroom"] < 1 or not micro_batches \
            or min(micro_batches) < 1:
        raise lrc.LRCError("--world_size must be >= 1, --gpu_mem_gib > 0, 0 <= --headroom < 1 and "
                           "--plan_micro_batch_sizes a list like 1,2,4,8")
    if cfg["method"] != "lrc":
        raise lrc.LRCError(f"bench.py --plan plans method=lrc runs; this config has method={cfg['method']}")
    config_files = [a for a in argv if a.endswith(".py") and not a.startswith("--")]
    overrides = [a for a in argv if a.startswith("--") and a != "--plan" and a.partition("=")[0][2:] not in
                 PLAN_KEYS and a.partition("=")[0][2:] not in ("parallel", "shard_teacher", "activation_checkpointing",
                                                              "micro_batch_size", "generate")]
    print(f"torch {torch.__version__}: simulating one training step per setting under FakeTensorMode "
          f"(world size {cfg['world_size']}, rank 0)")
    teacher_cfg, rows = plan(cfg, cfg["world_size"], micro_batches=micro_batches)
    best = print_plan(rows, teacher_cfg, cfg, cfg["world_size"], cfg["gpu_mem_gib"], cfg["headroom"], config_files,
                      overrides)
    return rows, best


# -----------------------------------------------------------------------------
# FLOPs at the real shapes: python bench.py --flops [CONFIG ...] [--key=value ...]
#
# torch.utils.flop_counter.FlopCounterMode counts every matmul and attention call by its shapes. Under
# FakeTensorMode the tensors have shapes and no memory, so one optimizer step of a 3B or 7B teacher is counted on
# any CPU in seconds. (a), (b) and (c) as in the timed benchmark, one optimizer step of grad_accum micro-steps of
# micro_batch_size x seq_len tokens each, built as train.py builds them (plan_build, plan_step), without activation
# checkpointing (which adds its recomputation; see the planner). The hand formula beside each count is written
# independently of the code, from the shapes (hand_flops); they agree to the FLOP.

FLOPS_KEYS = dict(flops=False, teacher_config="", flops_grad_accum="1,8")
FLOPS_PRESETS = ("config/lrc_1.7b.py", "config/lrc_4b.py")


def _count_uncounted_ops():
    """Ops FlopCounterMode has no formula for, counted as their counterparts: on the CPU
    F.scaled_dot_product_attention runs aten._scaled_dot_product_flash_attention_for_cpu, the work of the CUDA
    attention kernels it knows; the loss head accumulates dL/dW_s with the in-place addmm_, addmm's work."""
    from torch.utils import flop_counter
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(aten.addmm_)
    def addmm_in_place(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
        return flop_counter.mm_flop(a_shape, b_shape)

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def counted_flops(teacher_cfg, cfg, grad_accum, generate):
    """{'a', 'b', 'c'}: FLOPs of one optimizer step, counted under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    _count_uncounted_ops()

    def count(fn):
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()
    with FakeTensorMode():
        state = plan_build(teacher_cfg, cfg, "ddp", False, False, cfg["micro_batch_size"], 1, torch.bfloat16)
        x, y = state["batch"]
        with torch.device("cpu"):
            student = lrc.CausalLM(lrc.student_shape(teacher_cfg, cfg["student_hidden"], cfg["tie_proj"]))
        with torch.no_grad():
            teacher_forward = count(lambda: state["model"].teacher(x))
        student_step = count(lambda: plain_student_loss(student, x, y).backward())
        lrc_step = count(lambda: plan_step(state, grad_accum, dict(cfg, generate=generate)))
    return {"a": grad_accum * teacher_forward, "b": grad_accum * student_step, "c": lrc_step}


def hand_flops(teacher_cfg, cfg, grad_accum, generate):
    """The same three numbers from the shapes alone. Per token: (a) 2 x teacher matmul params + attention, (b)
    6 x student matmul params + 3.5 x attention (forward, and backward: 2.5 x forward, as a flash kernel
    recomputes QK^T), with attention QK^T and AV over all T keys (4 * L * H * hd * T, as the counter counts it:
    a causal kernel skips half of it; the MFU formula counts causal attention and 3 x for training). (c) = a + b +
    the LRC work: the embedding's projection x_t @ P_emb and its gradient (4 d d_s), the clone loss's o and down
    terms (teacher outputs brought to d_s by P_o / P_down, and their gradients: 4 d d_s each; clone_attn_out=
    'teacher' computes a_s @ W_o.T and its input gradient instead: 4 d H hd), and per generation of the weights
    W @ P and W.T @ dW_S, 4 d_s per teacher matmul parameter: once per micro-step, or once (generate='step')."""
    student_cfg = lrc.student_shape(teacher_cfg, cfg["student_hidden"], cfg["tie_proj"])
    T, d, d_s, L = cfg["seq_len"], teacher_cfg.hidden_size, student_cfg.hidden_size, teacher_cfg.num_hidden_layers
    tokens = cfg["micro_batch_size"] * T * grad_accum

    def attention(c):
        return 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * T
    a = tokens * (2 * matmul_params(teacher_cfg) + attention(teacher_cfg))
    b = tokens * (6 * matmul_params(student_cfg) + 3.5 * attention(student_cfg))
    terms = lrc.clone_terms_of(cfg["clone_terms"]) if cfg["alpha"] != 0 else ()
    o_term = 4 * d * teacher_cfg.num_attention_heads * teacher_cfg.head_dim if cfg["clone_attn_out"] == "teacher" \
        else 4 * d * d_s
    lrc_per_token = 4 * d * d_s + L * (o_term * ("o" in terms) + 4 * d * d_s * ("down" in terms))
    generations = 1 if generate == "step" and grad_accum > 1 else grad_accum
    return {"a": a, "b": b, "c": a + b + tokens * lrc_per_token + generations * 4 * d_s * matmul_params(teacher_cfg)}


def flops_main(argv):
    keys = Keys(dict(train.KEYS.defaults, **FLOPS_KEYS), optional=train.KEYS.optional, choices=train.KEYS.choices,
                exclusive=train.KEYS.exclusive, flags=("flops",), where_listed="DEFAULTS in train.py and FLOPS_KEYS "
                "in bench.py")
    files = [a for a in argv if not a.startswith("--")] or list(FLOPS_PRESETS)
    overrides = [a for a in argv if a.startswith("--")]
    try:
        grad_accums = [int(g) for g in keys.parse(overrides, doc=__doc__)["flops_grad_accum"].split(",")]
    except ValueError:
        grad_accums = []
    if not grad_accums or min(grad_accums) < 1:
        raise lrc.LRCError("--flops_grad_accum must be a list of micro-step counts like 1,8")
    print(f"torch {torch.__version__}: FLOPs of one optimizer step, counted by FlopCounterMode under FakeTensorMode "
          f"(TFLOP; a = teacher forward, b = plain student train step, c = LRC train step; no activation checkpointing)")
    print(f"{'preset':<22}{'teacher -> d_s':<34}{'B x T':>10}{'accum':>6}  {'generate':<11}{'(a)':>8}{'(b)':>8}"
          f"{'(c)':>8}{'c-(a+b)':>9}{'c/(a+b)':>9}  hand formula")
    results = []
    for file in files:
        cfg = keys.parse([file, *overrides], doc=__doc__)
        teacher_cfg = plan_teacher_config(cfg)
        for grad_accum in grad_accums:
            for generate in GENERATE[::-1]:
                t0 = time.perf_counter()
                counted = counted_flops(teacher_cfg, cfg, grad_accum, generate)
                hand = hand_flops(teacher_cfg, cfg, grad_accum, generate)
                ratio = counted["c"] / (counted["a"] + counted["b"])
                agree = "equal" if counted == hand else \
                    "differs: " + ", ".join(f"{k} {counted[k] / hand[k] - 1:+.2e}" for k in "abc" if counted[k] != hand[k])
                shape = f"{cfg['teacher'].split('/')[-1]} -> {cfg['student_hidden']}"
                print(f"{os.path.basename(file):<22}{shape:<34}{cfg['micro_batch_size']:>4} x {cfg['seq_len']:<4}"
                      f"{grad_accum:>6}  {generate:<11}" + "".join(f"{counted[k] / 1e12:>8.1f}" for k in "abc")
                      + f"{(counted['c'] - counted['a'] - counted['b']) / 1e12:>9.1f}{ratio:>9.3f}  {agree} "
                      f"({time.perf_counter() - t0:.0f} s)")
                results.append(dict(file=file, grad_accum=grad_accum, generate=generate, counted=counted, hand=hand,
                                    ratio=ratio))
    print("c/(a+b) = the floor ratio by FLOPs. Attention is counted over all T keys, as FlopCounterMode counts it; a "
          "causal kernel (and the MFU formula) does half of it")
    return results


# -----------------------------------------------------------------------------
# The GPU report: python bench.py --gpu_report=OUT.md (one GPU, under 10 minutes; --tiny: the same on the CPU)
#
# For the real shapes of both released students it writes random-init teachers with lrc.save_model and reads
# them back with lrc.load_model (the path of a hub checkpoint, with no hub), times (a), (b), (c) and (c) with
# checkpoint_layers at micro-batches of 1, 2 and 4 x 2048 tokens, one at a time next to the teacher (a row that
# runs out of memory says so), and sets each (c)'s peak memory beside the planner's estimate of the same step
# (estimate(): ddp, one rank, one micro-step), computed meanwhile in other processes on the CPU. Eager, with 2
# warm-up and 5 timed steps per row, unless --compile, --warmup or --steps say otherwise: compiling every row
# would not fit the 10 minutes. (b) of the 7B shape (a 4B plain student's float32 weights, gradients and AdamW
# state, 64 GB, beside the 15 GB teacher) does not fit an 80 GB GPU: its rows say "out of memory".

REPORT_SHAPES = ("qwen2.5-3b", "qwen2.5-7b")
TINY_SHAPES = {  # the same two kinds of student, tied and untied, small enough for a CPU test
    "tiny-tied": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, student_hidden=32, tie=True, seq_len=64),
    "tiny-untied": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, student_hidden=48, tie=False, seq_len=64),
}
REPORT_VARIANTS = ("a", "b", "c", "c_ckpt")


def planned_peak(teacher_config: dict, student_hidden, tie, seq_len, mbs, checkpoint_layers, dtype_name):
    """The planner's peak bytes for bench's (c) step (one process in a pool: top level, plain arguments)."""
    torch.set_num_threads(1)  # fake tensors compute nothing; the cores are the timed process's
    cfg = train.make_config(dict(student_hidden=student_hidden, tie_proj=tie, seq_len=seq_len, micro_batch_size=mbs,
                                 tokens_per_step=seq_len * mbs, lr=lr, grad_clip=grad_clip))
    peak, _ = estimate(lrc.ModelConfig.from_dict(teacher_config), cfg, "ddp", False, checkpoint_layers, mbs, 1, 1,
                       lrc.as_dtype(dtype_name))
    return peak


def report_teacher(s, dev, wdtype, directory):
    """A random-init teacher of shape s, saved and loaded back as a real checkpoint (no hub)."""
    teacher = random_teacher(s, dev, wdtype)
    lrc.save_model(teacher, directory)
    del teacher
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    loaded = lrc.load_model(directory, dev, wdtype).requires_grad_(False).eval()
    shutil.rmtree(directory)  # 15 GB for the 7B teacher
    return loaded


def bench_gpu_report(dev, wdtype, amp, out_path):
    import concurrent.futures
    import multiprocessing
    import tempfile
    shapes = TINY_SHAPES if tiny else {name: SHAPES[name] for name in REPORT_SHAPES}
    batches = (1, 2) if tiny else (1, 2, 4)
    dtype_name = str(wdtype).removeprefix("torch.")
    peak_flops = peak_tflops or (gpu_peak_tflops(dev)[0] if dev.type == "cuda" else 0.0)
    t_start = time.perf_counter()
    rows, planned = [], {}
    workers = max(1, min(len(shapes) * len(batches) * 2, (os.cpu_count() or 2) - 2))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool, \
            tempfile.TemporaryDirectory(prefix="lrc-gpu-report-") as scratch:
        for name, s in shapes.items():
            teacher_cfg = shape_config(s)
            for B in batches:
                for key in ("c", "c_ckpt"):
                    planned[name, B, key] = pool.submit(planned_peak, teacher_cfg.to_dict(), s["student_hidden"],
                                                        s["tie"], s["seq_len"], B, key == "c_ckpt", dtype_name)
        for name, s in shapes.items():
            t0 = time.perf_counter()
            teacher = report_teacher(s, dev, wdtype, os.path.join(scratch, name))
            print(f"{name}: teacher saved and loaded in {time.perf_counter() - t0:.0f} s")
            student_cfg = lrc.student_shape(teacher.config, s["student_hidden"], s["tie"])
            for B in batches:
                g = torch.Generator(device=dev).manual_seed(seed)
                tokens = torch.randint(teacher.config.vocab_size, (B, s["seq_len"] + 1), device=dev, generator=g)
                idx, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
                done = {v.key: v for v in run_variants(list(REPORT_VARIANTS), lambda key: build_variant(
                    key, teacher, student_cfg, idx, targets, dev, amp, s["tie"]), dev, 1)}
                for key in REPORT_VARIANTS:
                    v = done.get(key)
                    row = dict(shape=name, B=B, key=key, label=REPORT_LABELS[key], ms=None, tokens_s=None, mfu=None,
                               peak=None if v is None else v.peak_bytes)
                    if v is not None:
                        seconds = statistics.median(v.times)
                        row.update(ms=1e3 * seconds, tokens_s=B * s["seq_len"] / seconds)
                        if peak_flops:
                            row["mfu"] = v.flops_per_token * row["tokens_s"] / (peak_flops * 1e12)
                    rows.append(row)
            del teacher
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        for row in rows:
            future = planned.get((row["shape"], row["B"], row["key"]))
            row["planned"] = future.result() if future is not None else None
    text = report_markdown(rows, shapes, dev, wdtype, time.perf_counter() - t_start)
    with lrc.atomic_file(out_path) as f:
        f.write(text)
    print(text)
    return rows


REPORT_LABELS = {"a": "(a) teacher forward", "b": "(b) plain student step", "c": "(c) LRC step",
                 "c_ckpt": "(c) LRC step, checkpoint_layers"}


def amp_on(dev, wdtype):
    return dev.type == "cuda" and wdtype != torch.float32


def report_markdown(rows, shapes, dev, wdtype, seconds):
    mib = 2**20
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{os.cpu_count()}-core CPU"
    cuda = f", CUDA {torch.version.cuda}" if dev.type == "cuda" else ""
    kind = "tiny teachers" if tiny else "teachers of the released models' configs"
    measured = "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "the CPU allocator's events"
    lines = [f"# lrc GPU report: {machine}", "",
             f"`python bench.py --gpu_report=OUT.md{' --tiny=True' if tiny else ''}` on {machine}, torch "
             f"{torch.__version__}{cuda}, {time.strftime('%Y-%m-%d')}, {seconds / 60:.1f} min in all. Random-init "
             f"{kind}, written with `lrc.save_model` and read with `lrc.load_model`; weights "
             f"{str(wdtype).removeprefix('torch.')}, float32 projections and masters"
             f"{', bf16 autocast' if amp_on(dev, wdtype) else ''}; {'compiled' if compile else 'eager'}; one "
             f"micro-step per step; {warmup} warm-up and {steps} timed steps per row (median); peak = what the "
             f"variant keeps + the most allocated during a step ({measured}); planned = `bench.py --plan`'s "
             f"estimate of the same step (ddp, one rank). MFU: model FLOPs (2 x teacher + 6 x student matmul "
             f"parameters + causal attention) against the GPU's dense bf16 peak.", ""]
    for name, s in shapes.items():
        lines += [f"## {name} -> {s['student_hidden']} ({'tied' if s['tie'] else 'untied'}), B x {s['seq_len']} tokens",
                  "", "| B | variant | ms/step | tokens/s | MFU | peak MiB | planned MiB | planned / peak |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["shape"] == name):
            if r["ms"] is None:
                timing = "out of memory | | |"
            else:
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
                timing = f"{r['ms']:.1f} | {r['tokens_s']:,.0f} | {mfu} |"
            peak = f"{r['peak'] / mib:,.1f}" if r["peak"] else "-"
            plan = f"{r['planned'] / mib:,.1f}" if r["planned"] else ""
            ratio = f"{r['planned'] / r['peak']:.3f}" if r["planned"] and r["peak"] else ""
            lines.append(f"| {r['B']} | {r['label']} | {timing} {peak} | {plan} | {ratio} |")
        by = {(r["B"], r["key"]): r for r in rows if r["shape"] == name and r["ms"] is not None}
        ratios = [f"B={B} {by[B, 'c']['ms'] / (by[B, 'a']['ms'] + by[B, 'b']['ms']):.3f}" for B in sorted({b for b, _ in by})
                  if {(B, "a"), (B, "b"), (B, "c")} <= by.keys()]
        lines += ["", f"Floor ratio c/(a+b) by time: {', '.join(ratios) or 'n/a'}."]
        best = max((r for r in rows if r["shape"] == name and r["key"] == "c" and r["mfu"] is not None),
                   key=lambda r: r["mfu"], default=None)
        if best is not None:
            lines.append(f"Best MFU of (c): {100 * best['mfu']:.1f}% at B={best['B']} ({best['tokens_s']:,.0f} tokens/s; "
                         f"the reference LRC-1.7B run: ~8.7k tokens/s per H800).")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--plan" in argv:
        plan_main(argv)
        return None
    if "--flops" in argv or "--flops=True" in argv:
        flops_main([a for a in argv if a not in ("--flops", "--flops=True")])
        return None
    config = Keys(_DEFAULTS, where_listed="the config block at the top of bench.py").parse(argv, doc=__doc__)
    globals().update(config)
    dev, wdtype, amp = pick_device()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    machine = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
               else f"{os.cpu_count()}-core {os.uname().machine} CPU, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {machine}, weights {wdtype}, compile={compile}")
    if head_mem:
        return bench_head_memory(dev, wdtype)
    if kl_precision:
        return bench_kl_precision()
    if gpu_report:  # eager and 2 + 5 steps per row unless asked otherwise: see "The GPU report"
        given = {a.partition("=")[0] for a in argv}
        globals().update({k: v for k, v in dict(compile=False, warmup=2, steps=5).items() if f"--{k}" not in given})
        bench_gpu_report(dev, wdtype, amp, gpu_report)
        return None

    s, teacher, student_cfg = build_teacher(config, dev, wdtype)
    teacher_cfg, B, T = teacher.config, s["batch_size"], s["seq_len"]
    g = torch.Generator(device=dev).manual_seed(seed)
    tokens = torch.randint(teacher_cfg.vocab_size, (B, T + 1), device=dev, generator=g)
    idx, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    n_rounds = rounds or (1 if dev.type == "cuda" else 3)
    keys = [k for k in "abcde" if k in variants and (k != "e" or grad_accum > 1)] + (["c_ckpt"] if checkpoint else [])
    print(f"shape {shape}: V={teacher_cfg.vocab_size} d={teacher_cfg.hidden_size} f={teacher_cfg.intermediate_size} "
          f"L={teacher_cfg.num_hidden_layers} H={teacher_cfg.num_attention_heads} Hkv={teacher_cfg.num_key_value_heads} "
          f"hd={teacher_cfg.head_dim} tied={teacher_cfg.tie_word_embeddings} -> d_s={student_cfg.hidden_size}; "
          f"B={B} T={T} x {grad_accum} micro-steps ({B * T * grad_accum} tokens/step); matmul params teacher "
          f"{matmul_params(teacher_cfg) / 1e6:.1f}M, "
          f"student {matmul_params(student_cfg) / 1e6:.1f}M")
    print(f"{warmup} warm-up + {n_rounds} round(s) x {steps} timed steps per variant; "
          f"load average at start {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "")
    done = run_variants(keys, lambda key: build_variant(key, teacher, student_cfg, idx, targets, dev, amp, s["tie"]),
                        dev, n_rounds)
    report(done, dev, B * T * grad_accum, model_flops_per_token(teacher_cfg, student_cfg, T, "c"))


if __name__ == "__main__":
    sys.exit(run_main(main))
