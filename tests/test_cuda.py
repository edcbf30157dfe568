"""The GPU recipe on a CUDA device: bf16 weights and bf16 autocast, torch.compile, fused AdamW, FSDP2 over NCCL.

Every other test file runs on the CPU in float32 (plus a few bf16 checks on the CPU). This one runs what only
a GPU run does: our Qwen2 / Llama / Qwen3 forward against transformers' in bf16; the LRC losses and gradients
in bf16 autocast against the float32 CPU result; the loss head's peak memory at V=151,936; export; and
train.py itself compiled, bf16, with fused AdamW, under parallel=fsdp on a one-rank NCCL group, and resumed.

A GPU may be lent for a few minutes only, so the file must be right the first time it sees one:
LRC_TEST_CUDA_ON_CPU=1 runs every test here on the CPU instead (bf16 autocast on the CPU, gloo instead of NCCL,
the profiler's allocator events instead of torch.cuda.max_memory_allocated), so that all but the few
CUDA-only lines are exercised on any machine. Without CUDA and without the variable the module is skipped.
A CUDA device, when there is one, always wins over the variable.

    LRC_TEST_CUDA_ON_CPU=1 python -m pytest -q tests/test_cuda.py   # the dry run (a few minutes on 2 cores)
    python -m pytest -q tests/test_cuda.py                          # on a GPU machine (well under 5 minutes)
"""
import copy
import math
import os
import warnings

import pytest
import torch

import bench
import lrc
import train
from test_convert import make_lrc
from test_families import CASES as FAMILY_CASES, LLAMA3, T_LONG, make_hf as make_family_hf
from test_lrc import (EXACT_CASES, assert_same_params, hf_logits, make_hf as make_qwen2_hf, plain_distill,
                      tiny_teacher, tokens)
from test_train import config, make_teacher, tensors
from test_train import one_thread, world  # noqa: F401  (test_train's fixtures, used here by name)

transformers = pytest.importorskip("transformers")

CUDA = torch.cuda.is_available()
DRY_RUN = not CUDA and os.environ.get("LRC_TEST_CUDA_ON_CPU") == "1"
# an explicit index: tensors report cuda:0, and torch.device("cuda") != torch.device("cuda:0")
DEVICE = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu") if DRY_RUN else None

pytestmark = pytest.mark.cuda
if DEVICE is None:  # the whole module, one line in the summary
    pytest.skip("needs a CUDA GPU (LRC_TEST_CUDA_ON_CPU=1 dry-runs it on the CPU)", allow_module_level=True)

QWEN_VOCAB = 151936


@pytest.fixture(autouse=True)
def restore_tf32():
    """train.setup switches TF32 on for the whole process on CUDA (the training recipe): the float32 paths of the
    other tests (transformers' RoPE angles are a float32 matmul) must not depend on which test ran before."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def rel_err(got, want):
    """||got - want|| / ||want|| in float64 on the CPU (the reference may live on another device)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return ((got - want).norm() / want.norm()).item()


# -----------------------------------------------------------------------------
# The forward against transformers, in bf16 on the device

FORWARDS = {  # name: (make the transformers model, T)
    "qwen2": (lambda: make_qwen2_hf(seed=2, **EXACT_CASES["gqa2-headdim12-untied"][0]),
              EXACT_CASES["gqa2-headdim12-untied"][1]),
    "llama": (lambda: make_family_hf("llama", seed=1, **FAMILY_CASES["llama-llama3rope-untied-gqa2"][1]), T_LONG),
    "qwen3": (lambda: make_family_hf("qwen3", seed=1, **FAMILY_CASES["qwen3-tied-headdim16"][1]), T_LONG),
}


def assert_bf16_peers(got, peer, truth, max_bar, what):
    """got and peer: two bf16 computations of the same function (logits, as float32 on the CPU); truth: its float32
    value. bf16 logits are chaotic: one rounding that flips by an ulp spreads through every later op. Measured on
    the CPU (the forward cases below, T = 70, bf16 itself 7.5e-3 to 9.9e-3 from float32 in mean |diff|): flipping
    one ulp in 0.01%, 0.1% or 5% of SDPA's outputs, as another kernel's float32 accumulation order would, moves the
    logits by a mean 2e-4 to 1.4e-3, 2.5e-3, and 5e-3 to 6e-3. test_lrc's bar (mean |diff| < 2e-3 from transformers'
    sdpa path) therefore holds only where both run bitwise the same kernels, as on the CPU, and that is where the
    placement of the roundings is checked (the same Python on every device). Here, with e = the peer's mean error:
    got and peer at most 1.5 e apart (measured 0 on the CPU, bitwise equal; 0.9 to 0.97 e for a computation that
    rounds at other places throughout, the norm weight applied before the cast back to bf16), got's own mean error
    at most 1.25 e (<= 1.03 e under any of the flips above), its largest error within max_bar. What fails: a
    device-specific mistake in what is computed (simulated: k/v heads tiled instead of repeated for GQA, no causal
    mask, RoPE rotating the wrong way give 45 to 97 e, mean 0.37 to 0.82). What does not: a precision loss of the
    size of bf16's own (SDPA run in fp16 gives 0.7 to 0.8 e)."""
    e_peer, e_got = (peer - truth).abs().mean().item(), (got - truth).abs().mean().item()
    apart = (got - peer).abs().mean().item()
    assert e_peer > 0, what  # the peer really ran in bf16
    assert apart <= 1.5 * e_peer and e_got <= 1.25 * e_peer, (what, apart, e_got, e_peer)
    assert (got - truth).abs().max().item() <= max_bar, (what, (got - truth).abs().max().item(), max_bar)


@pytest.mark.parametrize("family", list(FORWARDS))
def test_forward_matches_transformers_in_bf16(family, tmp_path):
    """Our bf16 forward on the device against transformers' sdpa path in bf16 on the device, both against the
    float32 CPU oracle (assert_bf16_peers); the largest error as in test_lrc: within 2x transformers' eager-bf16
    largest error + 0.02. Measured on the CPU: bitwise equal to transformers' sdpa path."""
    make, T = FORWARDS[family]
    hf = make()
    hf.save_pretrained(tmp_path)
    idx = tokens(2, T)
    ref = hf_logits(hf, idx)  # float32 on the CPU: independent of the device's TF32 setting
    # transformers' own bf16 load path (hf.to(bf16) would round its RoPE inv_freq buffer to bf16), then moved
    theirs = {impl: hf_logits(transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, attn_implementation=impl).to(DEVICE), idx.to(DEVICE)).cpu()
        for impl in ("sdpa", "eager")}
    model = lrc.load_model(str(tmp_path), device=str(DEVICE), dtype="bf16")
    assert {p.device for p in model.parameters()} == {DEVICE} and model.config.model_type == family
    with torch.no_grad():
        ours = model(idx.to(DEVICE))
    assert ours.dtype == torch.bfloat16 and ours.device == DEVICE
    assert_bf16_peers(ours.float().cpu(), theirs["sdpa"], ref, 2 * (theirs["eager"] - ref).abs().max().item() + 0.02,
                      family)


# -----------------------------------------------------------------------------
# LRC losses and gradients: bf16 autocast on the device against float32 on the CPU

LOSS_CASES = {  # name: (tiny_teacher kwargs, LRC kwargs)
    "qwen2-tie_proj": (dict(), dict(tie_proj=True)),
    "qwen2-untied-teacher-o-term": (dict(), dict(tie_proj=False, clone_attn_out="teacher")),
    "llama3-rope": (dict(model_type="llama", rope_scaling=LLAMA3), dict(tie_proj=False)),
    "qwen3": (dict(model_type="qwen3"), dict(tie_proj=True)),
}


def lrc_losses_and_grads(base, idx, targets, device, bf16):
    """A copy of `base` on `device`, run as train.py runs it: with bf16, a bf16 teacher, float32 projections
    (masters) and the forward under bf16 autocast; else float32 throughout. Returns ({loss, kl, lm, clone} as
    floats, {name: float32 gradient on the CPU})."""
    model = copy.deepcopy(base).to(device)
    if bf16:
        model.teacher.to(torch.bfloat16)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, parts = model(idx.to(device), targets.to(device))
    loss.backward()
    assert next(model.parameters()).device == device and model.P_emb.dtype == torch.float32
    values = {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}
    return values, {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_lrc_losses_and_gradients_in_bf16_autocast(case):
    """bf16 keeps 8 mantissa bits: each rounding is off by up to 2^-9 ~ 2e-3 relative. The loss head computes in
    float32 from bf16 hidden states and a bf16 head, mse_loss runs in float32 under autocast, so each loss carries
    the error of the bf16 activations it is made of: the dozen roundings in sequence of 2 layers, averaged over
    80 positions. Measured on the CPU (these 4 cases x 3 seeds, T = 40): relative error of the loss <= 1.2e-3,
    L_LM <= 1e-3, L_clone <= 1.5e-3, L_KL <= 3e-3 (a difference of two O(1e-2) distributions, so the worst). Bar:
    1e-2 for each, 3x above the worst seen, far below a real mistake (a wrong term or scale is O(1)).

    Gradients flow back through bf16 activations and through dP = W^T dW_S, a bf16 matmul summing over the
    teacher's width, so they are noisier: relative Frobenius error per parameter 6e-3 to 3.8e-2 measured on the
    CPU (the worst parameter of each case 2.4e-2 to 3.8e-2). Bar: every parameter below 0.1, and no worse than 2x
    the CPU's own bf16 error on the same inputs + 0.01, so that a device rounding at more places than the CPU (or
    in bf16 where float32 was asked) fails inside the absolute bar too. A device whose kernels merely round
    otherwise stays inside, simulated on the CPU by flipping one ulp in 1% or 5% of every bf16 F.linear and SDPA
    output: losses <= 2.6e-3 off, every gradient's error at least 4.7e-3 below 2x the CPU's."""
    teacher_kw, lrc_kw = LOSS_CASES[case]
    teacher = tiny_teacher(seed=3, **teacher_kw)  # float32 on the CPU, weights of O(1)-logit size
    torch.manual_seed(0)
    base = lrc.LRC(teacher, 20, init_std=0.25, **lrc_kw)
    with torch.no_grad():  # student norms away from 1, as in test_lrc.check_against_reference
        for n, p in base.named_parameters():
            if "norm" in n and p.requires_grad:
                p.copy_(0.5 + torch.rand(p.shape, generator=torch.Generator().manual_seed(1)))
    idx, targets = tokens(2, 40), tokens(2, 40, seed=7)
    cpu = torch.device("cpu")
    want, want_grads = lrc_losses_and_grads(base, idx, targets, cpu, bf16=False)
    _, cpu_bf16_grads = lrc_losses_and_grads(base, idx, targets, cpu, bf16=True)
    got, got_grads = lrc_losses_and_grads(base, idx, targets, DEVICE, bf16=True)
    for name in ("loss", "kl", "lm", "clone"):
        assert want[name] > 0 and got[name] == pytest.approx(want[name], rel=1e-2), (name, got[name], want[name])
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 0
    errors = {}
    for name, want_grad in want_grads.items():
        assert want_grad.abs().max() > 0, name
        errors[name] = err = rel_err(got_grads[name], want_grad)
        cpu_err = rel_err(cpu_bf16_grads[name], want_grad)
        assert err < 0.1 and err <= 2 * cpu_err + 0.01, (name, err, cpu_err)
    assert max(errors.values()) > 0  # it really ran in bf16


# -----------------------------------------------------------------------------
# The loss head at Qwen's vocabulary: peak memory bounded by its chunks

def peak_bytes(fn):
    """Most bytes held at once during fn() beyond what was held before: the CUDA caching allocator's own count,
    or on the CPU the profiler's allocator events (bench.cpu_peak_transient_bytes, as in test_perf)."""
    if DEVICE.type != "cuda":
        return bench.cpu_peak_transient_bytes(fn)
    sync()
    torch.cuda.reset_peak_memory_stats(DEVICE)
    base = torch.cuda.memory_allocated(DEVICE)
    fn()
    sync()
    return torch.cuda.max_memory_allocated(DEVICE) - base


def head_inputs(N, V, d_s=16, d=32, dtype=torch.bfloat16, seed=0):
    """bf16 hidden states and heads, as autocast hands them to the head in training; targets with ignored rows."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(1, N, d_s, generator=g).to(DEVICE, dtype).requires_grad_()
    W_s = (torch.randn(V, d_s, generator=g) * 0.1).to(DEVICE, dtype).requires_grad_()
    h_t = torch.randn(1, N, d, generator=g).to(DEVICE, dtype)
    W_t = (torch.randn(V, d, generator=g) * 0.1).to(DEVICE, dtype)
    targets = torch.randint(V, (1, N), generator=g)
    targets[0, :3] = -1
    return h_s, W_s, targets.to(DEVICE), h_t, W_t


def test_loss_head_peak_memory_is_bounded_by_chunks_at_qwen_vocab():
    """lrc.distill_loss at V=151,936 over N = 24 chunks of positions, forward and backward. Per chunk the head holds at
    most four float32 [chunk, V] blocks at once (the gradient, log q_tau, the teacher's log p and p; the bf16 matmul
    outputs, half a block, live only while fewer are), besides the gradients of its inputs (grad_W in float32,
    grad_h, their bf16 copies). Measured on the CPU: 4.0 blocks + 1.0x the float32 size of the inputs' gradients.
    Bar: 5 blocks + 3x that size, and below a third of one float32 [N, V] tensor (8 blocks), of which the plain
    computation makes several (checked last, so that the measure is seen to fail). On CUDA the chunk is the default,
    2**26 // V = 441 rows (a 268 MB block; N = 10,584 positions, [N, V] float32 = 6.4 GB); on the CPU 8 rows, since
    the CPU takes seconds per [441, V] block and the bound is the same in blocks."""
    V = QWEN_VOCAB
    chunk = 2**26 // V if DEVICE.type == "cuda" else 8
    N = 24 * chunk
    h_s, W_s, targets, h_t, W_t = head_inputs(N, V)
    block, full = chunk * V * 4, N * V * 4
    input_grads = (h_s.numel() + W_s.numel()) * 4

    def step():  # chunk_size=None on CUDA: the default chunking is what is measured
        loss, _, _ = lrc.distill_loss(h_s, W_s, targets, h_t, W_t, tau=40.0,
                                      chunk_size=None if DEVICE.type == "cuda" else chunk)
        loss.backward()

    step()  # warm-up: cuBLAS workspaces and other one-time allocations do not count
    h_s.grad = W_s.grad = None
    peak = peak_bytes(step)
    assert h_s.grad is not None and W_s.grad is not None
    assert h_s.grad.dtype == W_s.grad.dtype == torch.bfloat16
    assert torch.isfinite(h_s.grad.float()).all() and torch.isfinite(W_s.grad.float()).all()
    assert 0 < peak <= 5 * block + 3 * input_grads, (peak / block, input_grads / block)
    assert peak < full / 3, peak / full

    # the measure can fail: the plain computation (test_lrc.plain_distill, float32) of a few chunks' positions
    # holds several [n, V] float32 tensors at once
    n = 2 * chunk
    small = [t.detach()[:, :n].float() if t.dim() == 3 else t.detach().float() for t in (h_s, W_s)]
    small = [small[0].requires_grad_(), small[1].requires_grad_(), targets[:, :n], h_t[:, :n].float(), W_t.float()]
    plain_peak = peak_bytes(lambda: plain_distill(*small, tau=40.0)[0].backward())
    assert plain_peak >= 3 * n * V * 4, plain_peak / (n * V * 4)


def test_compiled_loss_head_stays_chunked_at_qwen_vocab():
    """On CUDA train.py compiles the whole model, head included (parallel=ddp, compile='auto'): Inductor plans the
    head's buffers itself, with its own fusions and frees, so the eager bound above does not carry over. Measured
    with Inductor on the CPU: 2.5 [chunk, V] float32 blocks more than eager (6.5 against 4.0, besides the inputs'
    gradients), the same with 8, 12 or 16 chunks of positions: still a per-chunk peak. Bar, with N = 12 chunks:
    at most 4 blocks above the eager peak on the same inputs. A compiled head that held every chunk's logits at
    once would need at least one float32 [N, V] tensor, 12 blocks, 8 above the eager peak's 4. 12 chunks, not 24:
    the chunk loop is unrolled into the graph, and the compile time grows with it (about a minute cold on 2 CPU cores)."""
    V = QWEN_VOCAB
    chunk = 2**26 // V if DEVICE.type == "cuda" else 8
    h_s, W_s, targets, h_t, W_t = head_inputs(12 * chunk, V)
    block = chunk * V * 4
    chunk_size = None if DEVICE.type == "cuda" else chunk
    torch._dynamo.reset()
    compiled = torch.compile(lambda *inputs: lrc.distill_loss(*inputs, tau=40.0, chunk_size=chunk_size)[0])
    peaks = {}
    for name, head in (("eager", lambda *inputs: lrc.distill_loss(*inputs, tau=40.0, chunk_size=chunk_size)[0]),
                       ("compiled", compiled)):
        def step():
            head(h_s, W_s, targets, h_t, W_t).backward()
        step()  # compiles, and allocates what is allocated once
        h_s.grad = W_s.grad = None
        peaks[name] = peak_bytes(step)
        assert h_s.grad is not None and torch.isfinite(W_s.grad.float()).all(), name
        h_s.grad = W_s.grad = None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really compiled
    assert 0 < peaks["compiled"] <= peaks["eager"] + 4 * block, {k: v / block for k, v in peaks.items()}
    torch._dynamo.reset()


# -----------------------------------------------------------------------------
# Export on the device in bf16

EXPORT_CASES = {  # name: (tiny_teacher kwargs, tie_proj)
    "qwen2-tied": (dict(tied=True, head_dim=8), True),
    "llama3-untied": (dict(model_type="llama", rope_scaling=LLAMA3, tied=False), False),
    "qwen3-tied-no-tie_proj": (dict(model_type="qwen3", tied=True), False),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_in_bf16_on_the_device(case, tmp_path):
    """The exported student (bf16, on the device) against the training-time student (student_logits, bf16, on the
    device), both against the same LRC in float32 on the CPU (assert_bf16_peers; largest error within 2x the
    training-time student's + 0.02); saved by lrc.save_model and loaded by transformers on the device, the same.
    The generated weights are the same bf16 matmuls in both (LRCLayer.generate); only the embedding is computed
    otherwise, E[idx] @ P_emb in training, (E @ P_emb)[idx] exported. Measured on the CPU: all three bitwise
    equal; the bf16 error itself is 2.6e-2 to 3.5e-2 (mean, logits ~1 in mean magnitude: these trained-looking
    projections amplify), asserted below 0.1 of the logits' mean magnitude."""
    teacher_kw, tie_proj = EXPORT_CASES[case]
    model = make_lrc(tiny_teacher(seed=9, **teacher_kw), 24, tie_proj)  # trained-looking projections: O(1) logits
    idx = tokens(2, T_LONG, seed=5)
    with torch.no_grad():
        truth = model.student_logits(idx)
    model.to(DEVICE).teacher.to(torch.bfloat16)
    student = model.export_student()
    assert {(p.device, p.dtype) for p in student.parameters()} == {(DEVICE, torch.bfloat16)}
    assert student.config.hidden_size == 24 and student.config.model_type == teacher_kw.get("model_type", "qwen2")
    with torch.no_grad():
        trained = model.student_logits(idx.to(DEVICE)).float().cpu()
        exported = student(idx.to(DEVICE)).float().cpu()
    assert truth.abs().max() > 1.0 and (trained - truth).abs().mean() < 0.1 * truth.abs().mean()
    max_bar = 2 * (trained - truth).abs().max().item() + 0.02
    assert_bf16_peers(exported, trained, truth, max_bar, "export_student")
    out = str(tmp_path / "student")
    lrc.save_model(student, out)  # from device tensors (safetensors copies them to the host)
    loaded = lrc.load_model(out, device=str(DEVICE))
    assert next(loaded.parameters()).dtype == torch.bfloat16  # the file's dtype
    assert_same_params(loaded, student)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").to(DEVICE)
    assert hf.dtype == torch.bfloat16
    assert_bf16_peers(hf_logits(hf, idx.to(DEVICE)).cpu(), trained, truth, max_bar, "transformers")


# -----------------------------------------------------------------------------
# train.py: compiled, bf16, fused AdamW; parallel=fsdp on one NCCL rank; resume

@pytest.fixture(scope="module")
def teacher1(tmp_path_factory):
    """One layer: half the kernels for torch.compile to build; the loop's logic does not depend on the depth."""
    return make_teacher(str(tmp_path_factory.mktemp("teacher1") / "teacher"), layers=1)


def gpu_config(world, teacher, out_dir, **overrides):
    """test_train's tiny run (seq_len 16, 4 sequences per micro-step, 2 micro-steps per step: generate='step'
    makes the weights once and the last micro-step forms the gradients) with the GPU recipe spelled out."""
    return config(world, out_dir, **{"teacher": teacher, "device": DEVICE.type, "dtype": "bf16", "compile": True,
                                     "log_interval": 1, **overrides})


def run_train(cfg):
    """train.train with Dynamo's caches cleared first: every run compiles its own graphs (from Inductor's cache
    after the first), so that the many tiny models of this file never reach Dynamo's recompile limit and fall
    back to eager unnoticed. Returns the summary and whether anything was compiled."""
    torch._dynamo.reset()
    summary = train.train(cfg)
    return summary, torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


def initial_projections(teacher, device, seed=1337):
    """The trainable tensors train.py starts from (on the CPU): it seeds with cfg['seed'] right before building
    the model, and LRC draws its projections from the CPU's generator, then moves them to the teacher's device:
    the same on every device, for parallel=ddp (teacher on the device) and fsdp (in host memory until sharded)."""
    torch.manual_seed(seed)
    model = lrc.LRC(lrc.load_model(teacher, device=str(device)), 16)
    return {n: p.detach().cpu().clone() for n, p in model.checkpoint_tensors().items()}


def update_error(a, b, init):
    """||a - b|| / ||a - init|| over all tensors: how far two runs' updates differ, relative to the update. Adam
    moves an element with a near-zero gradient by ~lr either way, so a max |diff| is no measure; a norm is."""
    diff = math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in a))
    step = math.sqrt(sum(((a[k].double() - init[k].double()) ** 2).sum().item() for k in a))
    return diff / step


def test_two_compiled_bf16_steps_with_fused_adamw(world, teacher1, tmp_path, capsys, monkeypatch):
    """Two optimizer steps of train.py as it runs on a GPU: the teacher loaded in bf16 on the device, bf16 autocast,
    torch.compile of the whole LRC model, fused AdamW. Against the float32 eager run on the same device (so from the
    same initial projections, see initial_projections; on CUDA its matmuls run in TF32, which train.py switches on:
    2^-11 relative, 4x finer than bf16, still the reference for these bars): step 1's losses (before any update) to
    the bf16 bar of the loss test above, 1e-2 relative, and the two updates within update_error < 0.25."""
    made = []

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            made.append(self)
    monkeypatch.setattr(torch.optim, "AdamW", SpyAdamW)
    fp32, _ = run_train(config(world, tmp_path / "fp32", teacher=teacher1, device=DEVICE.type, dtype="fp32",
                               compile=False, max_steps=2, log_interval=1))
    capsys.readouterr()
    summary, compiled = run_train(gpu_config(world, teacher1, tmp_path / "gpu", max_steps=2))
    out = capsys.readouterr().out
    assert compiled, "torch.compile built no graph"
    assert summary["step"] == 2 and summary["checkpoint"].endswith("ckpt_00000002")
    assert f"device {DEVICE}" in out and "dtype bf16 | compile True" in out and "x 2 micro-steps" in out
    # train.py asks for the fused kernel on CUDA only; AdamW itself refuses fused=True for non-CUDA parameters
    opt = made[-1]
    assert opt.defaults["fused"] is (DEVICE.type == "cuda")
    assert all(p.device == DEVICE and p.dtype == torch.float32 for g in opt.param_groups for p in g["params"])
    for key in ("loss", "kl", "lm", "clone"):
        got, want = summary["first"][key], fp32["first"][key]
        assert math.isfinite(summary["last"][key]) and want > 0, key
        assert got == pytest.approx(want, rel=1e-2), (key, got, want)
    trained, init = tensors(summary["checkpoint"]), initial_projections(teacher1, DEVICE)
    assert all(torch.equal(init[k], v) for k, v in initial_projections(teacher1, "cpu").items())  # any device
    assert trained.keys() == init.keys() and all(t.dtype == torch.float32 for t in trained.values())
    assert not torch.equal(trained["P_emb"], init["P_emb"])
    # bf16 gradients (~2e-2 relative, the loss test above) through Adam's per-element normalisation: the update
    # stays within a few percent of the float32 one; a wrong update is O(1) away
    assert update_error(trained, tensors(fp32["checkpoint"]), init) < 0.25


def test_fsdp_on_one_rank(world, teacher1, tmp_path, monkeypatch):
    """parallel=fsdp in one process: train.py's own one-rank group (an in-memory store), NCCL on CUDA, gloo on the
    CPU; FSDP2's bf16 mixed precision (projections gathered in bf16, gradients reduced in float32) and each LRC
    layer compiled in place. The reference: the float32 eager run on the CPU, from the same initial projections
    (initial_projections). Bars of the test above: step 1's losses to 1e-2 relative, the updates within
    update_error < 0.25."""
    backends = []
    real_init = torch.distributed.init_process_group

    def spy(*args, **kwargs):
        backends.append(kwargs.get("backend", args[0] if args else None))
        return real_init(*args, **kwargs)
    monkeypatch.setattr(torch.distributed, "init_process_group", spy)
    fsdp, compiled = run_train(gpu_config(world, teacher1, tmp_path / "fsdp", max_steps=2, parallel="fsdp"))
    assert compiled, "torch.compile built no graph"
    assert backends == ["nccl" if DEVICE.type == "cuda" else "gloo"]
    assert not torch.distributed.is_initialized()  # train.py destroyed the group it made
    fp32, _ = run_train(config(world, tmp_path / "fp32", teacher=teacher1, device="cpu", dtype="fp32", compile=False,
                               max_steps=2, log_interval=1))
    assert len(backends) == 1  # parallel=ddp in one process makes no group
    for key in ("loss", "kl", "lm", "clone"):
        assert fsdp["first"][key] == pytest.approx(fp32["first"][key], rel=1e-2), key
    a, b = tensors(fsdp["checkpoint"]), tensors(fp32["checkpoint"])
    assert a.keys() == b.keys()
    assert update_error(a, b, initial_projections(teacher1, "cpu")) < 0.25
    for file in ("model.safetensors", "optimizer.safetensors"):  # FSDP2 writes the plain format, full tensors
        assert {k: (v.shape, v.dtype) for k, v in tensors(fsdp["checkpoint"], file).items()} == \
            {k: (v.shape, v.dtype) for k, v in tensors(fp32["checkpoint"], file).items()}, file


def test_resume_on_the_device_is_the_straight_run(world, teacher1, tmp_path):
    """4 steps straight against 2 steps, stop, and --resume for 2 more, all compiled in bf16. Resume itself is exact
    on any device: the checkpoint holds float32 masters and AdamW state, the schedule is a function of the step, the
    windows of the data a function of seed and step. So the resumed run differs from the straight one only by
    what two straight runs differ by: the device's run-to-run nondeterminism. At these sizes there is none to
    expect on CUDA either (cuBLAS and Inductor's Triton kernels are deterministic for a fixed shape and GPU; the
    head's scatter_add has one index per row; SDPA's backward at T = 16 has one key block per head, so no
    atomics race), so the straight run is repeated and: if the two straight runs are bitwise equal, the resumed
    one must be too; if not (some kernel is nondeterministic here), the resumed run may differ from the straight
    one by at most 4x as much as the two straight runs do, measured as a norm (update_error's reason), and a
    warning says so. torch.use_deterministic_algorithms stays off: it is not what training runs with."""
    cfg = dict(max_steps=4)
    straight, compiled = run_train(gpu_config(world, teacher1, tmp_path / "a", save_interval=2, **cfg))
    assert compiled
    again, _ = run_train(gpu_config(world, teacher1, tmp_path / "a2", **cfg))
    first, _ = run_train(gpu_config(world, teacher1, tmp_path / "b", stop_step=2, **cfg))
    assert first["step"] == 2
    resumed, _ = run_train(gpu_config(world, teacher1, tmp_path / "b", resume=True, **cfg))
    assert resumed["step"] == 4
    mid = tensors(os.path.join(str(tmp_path / "a"), "ckpt_00000002"))
    assert not torch.equal(mid["P_emb"], tensors(straight["checkpoint"])["P_emb"])  # it trained on after step 2
    for file in ("model.safetensors", "optimizer.safetensors"):
        a, a2, r = (tensors(run["checkpoint"], file) for run in (straight, again, resumed))
        assert a.keys() == a2.keys() == r.keys(), file
        noise = math.sqrt(sum(((a[k].double() - a2[k].double()) ** 2).sum().item() for k in a))
        diff = math.sqrt(sum(((a[k].double() - r[k].double()) ** 2).sum().item() for k in a))
        if noise == 0:
            assert diff == 0, (file, [k for k in a if not torch.equal(a[k], r[k])])
        else:
            warnings.warn(f"{file}: two straight runs on {DEVICE} differ (norm {noise:.3g}): not bitwise")
            assert diff <= 4 * noise, (file, diff, noise)
