"""Performance properties that can be checked without a clock: the loss head's memory stays
bounded at a 152k vocabulary, activation checkpointing changes nothing but memory, the step has no
host-syncing ops, and bench.py measures what it says. Speed itself is measured by bench.py, never here."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bench
import lrc

QWEN_VOCAB = 151936


def tiny_teacher(seed=0, tied=True, vocab=96):
    torch.manual_seed(seed)
    config = lrc.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                             rope_theta=10000.0)
    teacher = lrc.Qwen2(config)
    with torch.no_grad():  # non-trivial norms and biases, so that every term of the loss is exercised
        for name, p in teacher.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return teacher


def tokens(B, T, V=96, seed=1):
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


class OpRecorder(TorchDispatchMode):
    """Records every aten op and the shapes/dtypes of the tensors it returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.ops, self.outputs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((tuple(t.shape), t.dtype))
        return out

    def largest_float32(self):
        return max((torch.Size(s).numel() for s, dt in self.outputs if dt == torch.float32), default=0)


def head_inputs(N_batch, T, V, d_s=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N_batch, T, d_s, generator=g, requires_grad=True)
    W_s = (torch.randn(V, d_s, generator=g) * 0.1).requires_grad_()
    h_t = torch.randn(N_batch, T, d, generator=g)
    W_t = torch.randn(V, d, generator=g) * 0.1
    targets = torch.randint(V, (N_batch, T), generator=g)
    targets[0, :3] = -1  # ignored positions take the same path
    return h_s, W_s, targets, h_t, W_t


# -----------------------------------------------------------------------------
# The loss head at a Qwen-sized vocabulary

def test_head_under_autocast_casts_the_head_once_and_accumulates_its_gradient_in_float32():
    """Under bf16 autocast (the GPU recipe; here the CPU's) the head runs its matmuls in the dtypes it names: a
    float32 W_s (kd, scratch, sft masters) is cast to bf16 once, not once per chunk, the logits are bf16
    matmuls, and dL/dW_s is a float32 product of the float32 chunk gradient, as autocast would not leave it."""
    h_s, W_s, targets, h_t, W_t = head_inputs(2, 16, 96)
    recorder = OpRecorder()
    with recorder, torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = lrc.distill_loss(h_s.bfloat16(), W_s, targets, h_t.bfloat16(), W_t.bfloat16(), chunk_size=5)
        loss.backward()
    casts_of_W = [a for f, a in recorder.ops if f is torch.ops.aten._to_copy.default and a[0].numel() == W_s.numel()
                  and a[0].dtype == torch.float32]  # W_s or its transpose
    assert len(casts_of_W) == 1  # 7 chunks of 5 rows, one cast
    products = [(a[0].dtype, a[1].dtype, tuple(a[0].shape), tuple(a[1].shape)) for f, a in
                [(f, a[1:] if f is torch.ops.aten.addmm_.default else a) for f, a in recorder.ops]
                if f in (torch.ops.aten.mm.default, torch.ops.aten.addmm_.default)]
    grad_W = [p for p in products if p[2][0] == 96 and p[3][1] == 8]           # [V, n] @ [n, d_s], added in place
    logits = [p for p in products if p[3] == (8, 96)]                            # [n, d_s] @ [d_s, V]
    assert len(grad_W) == len(logits) == 7
    assert all(p[:2] == (torch.float32, torch.float32) for p in grad_W)
    assert all(p[:2] == (torch.bfloat16, torch.bfloat16) for p in logits)


def test_head_holds_at_most_one_chunk_of_logits_at_qwen_vocab():
    """Default chunking at V=151936: every float32 tensor made in forward and backward is at most
    [chunk, V] (chunk = 2**26 // V = 441 rows), never the [B*T, V] = [448, V] of the plain computation."""
    B, T, V = 1, 448, QWEN_VOCAB
    h_s, W_s, targets, h_t, W_t = head_inputs(B, T, V)
    chunk = 2**26 // V
    assert chunk < B * T  # so that the bound below is one the plain computation would break
    rec = OpRecorder()
    with rec:
        loss, kl, lm = lrc.distill_loss(h_s, W_s, targets, h_t, W_t, tau=40.0)
        loss.backward()
    assert torch.isfinite(loss) and W_s.grad is not None and h_s.grad is not None
    assert rec.largest_float32() == chunk * V
    assert (B * T, V) not in [s for s, _ in rec.outputs]


def test_op_recorder_sees_the_plain_computation_materialize_full_logits():
    """The recorder can fail: the plain KL + CE (bench.plain_head_loss) does make [B*T, V] float32 tensors."""
    B, T, V, chunk = 1, 64, QWEN_VOCAB, 32  # chunk > d = 16: the transposed weights [d, V] are smaller
    h_s, W_s, targets, h_t, W_t = head_inputs(B, T, V)
    rec = OpRecorder()
    with rec:
        bench.plain_head_loss(h_s, W_s, targets, h_t, W_t, 40.0).backward()
    assert rec.largest_float32() == B * T * V
    rec = OpRecorder()
    with rec:
        lrc.distill_loss(h_s, W_s, targets, h_t, W_t, tau=40.0, chunk_size=chunk)[0].backward()
    assert rec.largest_float32() == chunk * V


def test_head_peak_memory_is_bounded_by_chunks_not_positions():
    """Allocator-level peak (torch.profiler memory events, the CPU measure bench.py uses) during forward
    and backward at V=151936: a handful of [chunk, V] float32 blocks plus the input-sized gradients,
    far below a single [B*T, V] float32 tensor. The plain computation on the same inputs needs several."""
    B, T, V, chunk = 1, 256, QWEN_VOCAB, 8
    h_s, W_s, targets, h_t, W_t = head_inputs(B, T, V)
    full = B * T * V * 4
    block = chunk * V * 4
    inputs = sum(t.numel() * 4 for t in (h_s, W_s, h_t, W_t))

    def fused():
        lrc.distill_loss(h_s, W_s, targets, h_t, W_t, tau=40.0, chunk_size=chunk)[0].backward()

    fused()  # warm-up: one-time allocations do not count
    h_s.grad = W_s.grad = None
    peak = bench.cpu_peak_transient_bytes(fused)
    assert W_s.grad is not None
    assert 0 < peak <= 8 * block + 2 * inputs
    assert peak < full / 3

    small = head_inputs(1, 32, V)  # the plain head, kept small: its peak is a multiple of [B*T, V]
    small[0].grad = small[1].grad = None
    plain_peak = bench.cpu_peak_transient_bytes(lambda: bench.plain_head_loss(*small, 40.0).backward())
    assert plain_peak >= 3 * 32 * V * 4


# -----------------------------------------------------------------------------
# Activation checkpointing of the student stream

def loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    loss, parts = model(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), {k: torch.as_tensor(v).detach() for k, v in parts.items()}, grads


@pytest.mark.parametrize("tie_proj", [True, False])
def test_checkpoint_layers_gives_identical_losses_and_gradients(tie_proj):
    teacher = tiny_teacher(seed=3, tied=tie_proj)
    model = lrc.LRC(teacher, 16, tie_proj=tie_proj)
    idx, targets = tokens(2, 24), tokens(2, 24, seed=2)
    loss0, parts0, grads0 = loss_and_grads(model, idx, targets)
    model.checkpoint_layers = True
    loss1, parts1, grads1 = loss_and_grads(model, idx, targets)
    assert torch.equal(loss0, loss1)
    for key in ("kl", "lm", "clone"):
        assert torch.equal(parts0[key], parts1[key]), key
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for name in grads0:
        assert torch.equal(grads0[name], grads1[name]), name
    assert lrc.LRC(teacher, 16, checkpoint_layers=True).checkpoint_layers


def saved_bytes(model, idx, targets):
    """Bytes autograd saves for backward during the forward (what checkpointing is meant to cut)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model(idx, targets)
    return total[0]


def test_checkpoint_layers_saves_less_and_generates_weights_once(monkeypatch):
    teacher = tiny_teacher(seed=4)
    model = lrc.LRC(teacher, 16)
    idx, targets = tokens(2, 32), tokens(2, 32, seed=2)
    plain = saved_bytes(model, idx, targets)
    model.checkpoint_layers = True
    checkpointed = saved_bytes(model, idx, targets)
    assert checkpointed < 0.8 * plain

    calls = []
    real_generate = lrc.LRCLayer.generate
    monkeypatch.setattr(lrc.LRCLayer, "generate", lambda self, w: calls.append(self) or real_generate(self, w))
    loss, _ = model(idx, targets)
    loss.backward()  # recomputation in backward must not generate the weights again
    assert len(calls) == teacher.config.num_hidden_layers


def test_checkpoint_layers_inert_without_grad():
    teacher = tiny_teacher(seed=5)
    model = lrc.LRC(teacher, 16, checkpoint_layers=True)
    idx = tokens(1, 8)
    with torch.no_grad():
        a = model.student_logits(idx)
    model.checkpoint_layers = False
    with torch.no_grad():
        b = model.student_logits(idx)
    assert torch.equal(a, b)


# -----------------------------------------------------------------------------
# No host sync in the step

SYNCING_OPS = {"nonzero", "_local_scalar_dense", "masked_select", "item", "is_nonzero", "equal", "unique",
               "_unique2", "masked_scatter"}


def test_lrc_step_has_no_host_syncing_ops():
    """Ops whose output size or value the host must wait for (nonzero, .item(), boolean-mask indexing)
    stall a GPU pipeline; the LRC forward and backward use none."""
    teacher = tiny_teacher(seed=6)
    model = lrc.LRC(teacher, 16)
    idx, targets = tokens(2, 16), tokens(2, 16, seed=2)
    targets[0, :4] = -1  # ignored positions: the path that used boolean indexing
    rec = OpRecorder()
    with rec:
        loss, parts = model(idx, targets)
        loss.backward()
    names = [func._schema.name.split("::")[-1] for func, _ in rec.ops]
    assert "mm" in names or "addmm" in names  # the recorder saw the step
    assert not SYNCING_OPS & set(names), SYNCING_OPS & set(names)
    for func, args in rec.ops:
        if func._schema.name in ("aten::index", "aten::index_put", "aten::index_put_"):
            indices = args[1]
            assert not any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices), func


# -----------------------------------------------------------------------------
# bench.py measures what it says

def test_reference_style_step_computes_the_same_losses():
    """(d) differs from (c) only in how q/k/v are computed (per token through width d), so with the same
    parameters it gives the same losses and gradients up to rounding: the comparison c/d is fair."""
    teacher = tiny_teacher(seed=7)
    model = lrc.LRC(teacher, 16)
    reference = bench.ReferenceStyleLRC(teacher, 16)
    reference.load_state_dict(model.state_dict())
    idx, targets = tokens(2, 16), tokens(2, 16, seed=2)
    loss0, parts0, grads0 = loss_and_grads(model, idx, targets)
    loss1, parts1, grads1 = loss_and_grads(reference, idx, targets)
    assert float(loss1) == pytest.approx(float(loss0), rel=1e-5)
    for key in ("kl", "lm", "clone"):
        assert float(parts1[key]) == pytest.approx(float(parts0[key]), rel=1e-5, abs=1e-7), key
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_matmul_params_counts_every_matmul_weight(tied):
    config = lrc.Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = lrc.Qwen2(config)
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    if tied:  # the head is the embedding matrix: its matmul counts once
        matrices += config.vocab_size * config.hidden_size
    assert bench.matmul_params(config) == matrices


def test_qwen25_3b_shape_matches_the_published_model():
    s = bench.SHAPES["qwen2.5-3b"]
    config = lrc.Qwen2Config(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                             intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
                             num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
                             tie_word_embeddings=s["tie"])
    with torch.device("meta"):
        model = lrc.Qwen2(config)
    total = sum(p.numel() for p in model.parameters())  # tied: counted once
    assert 3.08e9 < total < 3.10e9  # Qwen2.5-3B: 3.09B parameters


def run_bench(argv):
    """bench.main(argv), then bench's module globals (main() writes the parsed options there, nanoGPT style)
    and the thread count as they were."""
    saved = {k: v for k, v in vars(bench).items() if not k.startswith("_") and isinstance(v, (int, float, str))}
    threads = torch.get_num_threads()
    try:
        return bench.main(argv)
    finally:
        vars(bench).update(saved)
        torch.set_num_threads(threads)


TOY_BENCH = ["--shape=toy", "--compile=False", "--steps=1", "--warmup=1", "--rounds=1", "--batch_size=2",
             "--seq_len=16", "--vocab_size=128", "--hidden_size=32", "--intermediate_size=64", "--num_layers=1",
             "--student_hidden=16", "--threads=1"]


def test_bench_runs_the_toy_shape(capsys):
    run_bench(TOY_BENCH + ["--checkpoint=True"])
    out = capsys.readouterr().out
    for label in ("(a) teacher forward", "(b) plain student", "(c) LRC train step", "(d) reference-style",
                  "checkpoint_layers", "floor ratio c/(a+b) =", "c/d ="):
        assert label in out, label
    assert "(e)" not in out  # one micro-step per step: generate=step is (c)


def test_bench_times_generate_step_with_micro_steps(capsys):
    run_bench(TOY_BENCH + ["--grad_accum=3", "--variants=abce"])
    out = capsys.readouterr().out
    for label in ("x 3 micro-steps (96 tokens/step)", "(e) LRC step, generate=step", "floor ratio e/(a+b) =",
                  "generate=step (e) holds"):
        assert label in out, label


@pytest.mark.parametrize("tied, clone_attn_out", [(True, "teacher"), (False, "student")])
def test_flops_counted_at_any_shape_equal_the_hand_formula(tmp_path, capsys, tied, clone_attn_out):
    """bench.py --flops: FlopCounterMode's count of (a), (b) and (c) under FakeTensorMode equals hand_flops, written
    from the shapes alone, to the FLOP; generate='step' is micro_step with one micro-step and cheaper with three."""
    import json
    teacher = tiny_teacher(tied=tied, vocab=128).config
    (tmp_path / "config.json").write_text(json.dumps(teacher.to_dict()))
    preset = tmp_path / "preset.py"
    preset.write_text(f"student_hidden = 16\nseq_len = 32\nmicro_batch_size = 2\ntie_proj = {tied}\n"
                      f"clone_attn_out = {clone_attn_out!r}\n")
    rows = bench.flops_main([str(preset), f"--teacher_config={tmp_path / 'config.json'}", "--flops_grad_accum=1,3"])
    assert [(r["grad_accum"], r["generate"]) for r in rows] == [(1, "micro_step"), (1, "step"), (3, "micro_step"),
                                                               (3, "step")]
    assert all(r["counted"] == r["hand"] for r in rows) and capsys.readouterr().out.count(" equal ") == 4
    assert rows[0]["counted"] == rows[1]["counted"] and rows[3]["ratio"] < rows[2]["ratio"]
    assert rows[2]["counted"]["a"] == 3 * rows[0]["counted"]["a"]


def test_gpu_report_runs_end_to_end_at_tiny_shapes(tmp_path):
    """bench.py --gpu_report --tiny: the GPU report's whole path on the CPU (teachers saved and loaded, every
    variant timed and measured, the planner in other processes, the markdown written), so that on a GPU only
    what is CUDA's can fail. The planner's estimate of each (c) step is within 5% of its measured peak."""
    out = tmp_path / "report.md"
    run_bench([f"--gpu_report={out}", "--tiny=True", "--steps=1", "--warmup=1", "--threads=1"])
    text = out.read_text()
    assert text.startswith("# lrc GPU report") and "--gpu_report=OUT.md --tiny=True" in text
    for name in bench.TINY_SHAPES:
        section = text.split(f"## {name}")[1].split("##")[0]
        rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
        assert len(rows) == 2 * len(bench.REPORT_VARIANTS)
        planned = [float(r[-1].rstrip(" |")) for r in rows if "(c)" in r[1]]
        assert len(planned) == 4 and all(0.95 < ratio < 1.05 for ratio in planned), planned
        assert "Floor ratio c/(a+b) by time: B=1" in section


def test_bench_rejects_unknown_options(monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench.py", "--shap=mid"])
    with pytest.raises(lrc.LRCError, match="unknown config key 'shap'.*did you mean 'shape'"):
        bench.main()
    monkeypatch.setattr("sys.argv", ["bench.py", "--steps=ten"])
    with pytest.raises(lrc.LRCError, match="steps='ten' in the command line is not int"):
        bench.main()


def test_kl_precision_compares_the_official_formula_with_ours():
    """bench.py --kl_precision: the official code's KL (log_softmax + kl_div batchmean) is spec section 4's L_KL,
    and in bf16 at tau = 40 and V = 151,936 it is far from float32, which is close to float64."""
    g = torch.Generator().manual_seed(0)
    z_t = 2.5 * torch.randn(1, 4, 151936, generator=g, dtype=torch.float64)
    z_s = z_t + 0.5 * torch.randn(1, 4, 151936, generator=g, dtype=torch.float64)
    p, log_p, log_q = (z_t / 40).softmax(-1), (z_t / 40).log_softmax(-1), (z_s / 40).log_softmax(-1)
    by_hand = (p * (log_p - log_q)).sum()  # summed over [B, T, V], divided by B = 1
    torch.testing.assert_close(bench.kl_in(z_s, z_t, 40.0, torch.float64), by_hand, rtol=1e-10, atol=0)
    student_bf16, teacher_bf16 = z_s.bfloat16(), z_t.bfloat16()
    truth = bench.kl_in(student_bf16, teacher_bf16, 40.0, torch.float64)
    assert abs(bench.kl_in(student_bf16, teacher_bf16, 40.0, torch.float32) - truth) / truth < 1e-2
    assert abs(bench.kl_in(student_bf16, teacher_bf16, 40.0, torch.bfloat16).double() - truth) / truth > 0.1
