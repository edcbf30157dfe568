"""parallel=fsdp (FSDP2) and the memory planner (bench.py --plan): bad combinations refused with one line;
FSDP2 in one process is the same computation as no wrapper; two gloo processes (one torchrun launch running
several jobs) give the losses and checkpoints of one process, with and without shard_teacher, and resume across
world sizes and parallel modes; the planner's simulated peak matches the CPU allocator's real peak."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import bench
import distributed
import lrc
import train
from test_train import assert_one_line, config, make_chat_data, make_teacher, tensors
from test_train import one_thread, world  # noqa: F401  (test_train's fixtures, used here by name)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("model.safetensors", "optimizer.safetensors")


TINY = lrc.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e4)
# for the table: 4 layers and a small vocabulary, so that the teacher's layers (not its embedding, which the root
# unit keeps gathered) are most of it, as in a real teacher
TABLE = lrc.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e4)


def plan_config(**overrides):
    return dict(train.make_config(dict(teacher="tiny", student_hidden=32, seq_len=64, tokens_per_step=512,
                                       micro_batch_size=4, dtype="fp32", **overrides)), teacher_config="")


# generate='micro_step' here: generate='step' gathers every unit once more at the start of a step, and gloo's
# all-gathers allocate temporaries of their own (NCCL's do not, nor the planner's fake process group), which
# moved rank 0's real peak by 2-11% in three runs (micro_step: 3.5-6%). generate='step' is checked in one process.
PEAK_JOB = dict(teacher_config=TABLE.to_dict(), cfg=plan_config(generate="micro_step"), ac=False, mbs=4, micro_steps=2,
                shard_teacher=True)


def max_diff(a_dir, b_dir):
    """Largest |a - b| over every tensor of both checkpoint files (which must hold the same names)."""
    worst = 0.0
    for file in FILES:
        a, b = tensors(a_dir, file), tensors(b_dir, file)
        assert a.keys() == b.keys(), file
        worst = max(worst, max((a[k] - b[k]).abs().max().item() for k in a))
    return worst


def losses(out_dir):
    return {r["step"]: r for r in map(json.loads, open(os.path.join(out_dir, "metrics.jsonl"))) if "loss" in r}


# -----------------------------------------------------------------------------
# bad input

def test_bad_combinations_are_one_line(world, tmp_path):
    for overrides, words in [({"shard_teacher": True}, "add --parallel=fsdp"),
                             ({"parallel": "zero3"}, "not one of"),
                             ({"fsdp_grad_sync": "never"}, "not one of")]:
        with pytest.raises(lrc.LRCError) as e:
            train.train(config(world, tmp_path / "out", **overrides))
        assert words in assert_one_line(e), str(e.value)
    assert not os.path.exists(tmp_path / "out")  # refused before anything was written
    result = subprocess.run([sys.executable, "train.py", "--shard_teacher=True", f"--out_dir={tmp_path}"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--parallel=fsdp" in result.stderr


# -----------------------------------------------------------------------------
# one process: FSDP2 on a one-rank group is the same computation

def test_fsdp_in_one_process_is_the_plain_computation(world, tmp_path):
    """One rank holds every shard, so nothing may change: bit-identical checkpoints, with and without the
    teacher sharded, with either activation checkpointing (student layers, or whole layers: also under DDP);
    and a checkpoint of either parallel mode resumes in the other."""
    cfg = dict(max_steps=4, save_interval=2, eval_tokens=256)
    plain = train.train(config(world, tmp_path / "plain", **cfg))
    fsdp = train.train(config(world, tmp_path / "fsdp", parallel="fsdp", activation_checkpointing=True, **cfg))
    both = train.train(config(world, tmp_path / "both", parallel="fsdp", shard_teacher=True,
                              activation_checkpointing="layer", fsdp_grad_sync="step", **cfg))
    layer = train.train(config(world, tmp_path / "layer", activation_checkpointing="layer", **cfg))
    for run in (fsdp, both, layer):
        assert max_diff(plain["checkpoint"], run["checkpoint"]) == 0.0
        assert run["last"]["loss"] == plain["last"]["loss"] and run["val"] == plain["val"]
    shutil.rmtree(tmp_path / "fsdp" / "ckpt_00000004")     # fsdp resumes plain's format and the other way round
    train.train(config(world, tmp_path / "fsdp", parallel="fsdp", resume=True, **cfg))
    assert max_diff(plain["checkpoint"], str(tmp_path / "fsdp" / "ckpt_00000004")) == 0.0
    shutil.rmtree(tmp_path / "both" / "ckpt_00000004")
    train.train(config(world, tmp_path / "both", resume=True, **cfg))
    assert max_diff(plain["checkpoint"], str(tmp_path / "both" / "ckpt_00000004")) == 0.0


def test_fsdp_trains_the_plain_students_too(world, tmp_path):
    """method=kd, scratch and sft train a plain student: under FSDP2 each of its blocks is a unit (the kd teacher
    replicated, or sharded block by block). One rank: bit-identical to DDP, and resumes DDP's checkpoint."""
    chat = make_chat_data(str(tmp_path / "chat"))
    cfg = dict(max_steps=4, save_interval=2, eval_tokens=256)
    for method, extra in [("kd", {}), ("kd", {"shard_teacher": True}), ("scratch", {}),
                          ("sft", {"init_from": world["teacher"], "data": chat})]:
        name = method + ("_teacher" if extra.get("shard_teacher") else "")
        plain = train.train(config(world, tmp_path / f"{name}_ddp", method=method,
                                   **{k: v for k, v in extra.items() if k != "shard_teacher"}, **cfg))
        fsdp = train.train(config(world, tmp_path / name, method=method, parallel="fsdp", **extra, **cfg))
        assert max_diff(plain["checkpoint"], fsdp["checkpoint"]) == 0.0, name
        assert fsdp["last"]["loss"] == plain["last"]["loss"] and fsdp["val"] == plain["val"], name
    shutil.rmtree(tmp_path / "sft" / "ckpt_00000004")           # FSDP2 resumes the DDP run's format
    shutil.copytree(tmp_path / "sft_ddp" / "ckpt_00000002", tmp_path / "sft" / "ckpt_00000002", dirs_exist_ok=True)
    train.train(config(world, tmp_path / "sft", method="sft", parallel="fsdp", resume=True, init_from=world["teacher"],
                       data=chat, **cfg))
    assert max_diff(str(tmp_path / "sft_ddp" / "ckpt_00000004"), str(tmp_path / "sft" / "ckpt_00000004")) == 0.0


def test_fsdp_compiles_each_layer(world, tmp_path, monkeypatch):
    """torch.compile under FSDP2 compiles each LRC layer in place (each block, for a plain student), also with
    whole-layer checkpointing and the teacher sharded. Dynamo's graph capture with FSDP2's hooks is what can fail; Inductor's code generation is
    the same as without FSDP and takes a minute on this CPU, so the test compiles with aot_eager (same graphs,
    no code generation)."""
    torch._dynamo.reset()
    monkeypatch.setitem(distributed.COMPILE_OPTIONS, "backend", "aot_eager")
    teacher = make_teacher(str(tmp_path / "teacher"), layers=1)
    cfg = dict(teacher=teacher, max_steps=3, tokens_per_step=64)
    eager = train.train(config(world, tmp_path / "eager", **cfg))
    compiled = train.train(config(world, tmp_path / "compiled", parallel="fsdp", compile=True, **cfg))
    assert max_diff(eager["checkpoint"], compiled["checkpoint"]) < 1e-6
    both = train.train(config(world, tmp_path / "both", parallel="fsdp", shard_teacher=True, compile=True,
                              activation_checkpointing="layer", **cfg))
    layer = train.train(config(world, tmp_path / "layer", compile=True, activation_checkpointing="layer", **cfg))
    for run in (both, layer):
        assert max_diff(eager["checkpoint"], run["checkpoint"]) < 1e-6
    # a plain student (kd): its blocks, and the teacher's, compiled in place
    kd_eager = train.train(config(world, tmp_path / "kd_eager", method="kd", **cfg))
    kd = train.train(config(world, tmp_path / "kd", method="kd", parallel="fsdp", compile=True, **cfg))
    assert max_diff(kd_eager["checkpoint"], kd["checkpoint"]) < 1e-6
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really compiled
    torch._dynamo.reset()


# -----------------------------------------------------------------------------
# two gloo processes, one torchrun launch

def run_torchrun_jobs(jobs, tmp_path):
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(REPO, "tests", "torchrun_jobs.py"), str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_two_fsdp_processes_match_one_and_resume_across_modes(world, tmp_path):
    """1 process x 2 micro-steps against 2 gloo ranks x 1 micro-step, the same 128 tokens per step. The only
    differences allowed are float32 summation orders: the global gradient norm (clipped here, so it matters) is a
    sum of per-shard partial sums under FSDP2, and losses and gradients are averaged over ranks by a collective
    instead of over micro-steps by autograd. A few ulps of the norm change the clipped update by ~1e-8 per step:
    tolerance 1e-6 on tensors of size ~0.02-1 and on the logged losses (loss, lm ~4, clone ~0.1, kl ~1e-4; absolute,
    since kl is a small difference of large log-probabilities and its relative error is not meaningful)."""
    # generate='micro_step': a 2-rank x 1 micro-step run makes the weights in its one micro-step anyway
    steps = dict(max_steps=4, save_interval=2, log_interval=1, grad_clip=0.05, keep_last=3, generate="micro_step")
    root = tmp_path
    one = train.train(config(world, root / "one", **steps))                       # the uninterrupted reference
    assert one["first"]["grad_norm"] > 0.05                                      # clipping is active
    accum = dict(steps, tokens_per_step=256, max_steps=2, generate="step")      # 2 micro-steps per rank
    # the reference of grad accumulation: one process, 4 micro-steps, the weights generated in every one of them
    one_accum = train.train(config(world, root / "one_accum", **dict(accum, generate="micro_step")))
    sft = dict(steps, method="sft", init_from=world["teacher"], data=make_chat_data(str(root / "chat")))
    one_sft = train.train(config(world, root / "one_sft", **sft))
    stdout = run_torchrun_jobs([
        config(world, root / "fsdp", parallel="fsdp", **steps),
        config(world, root / "fsdp_teacher", parallel="fsdp", shard_teacher=True, **steps),
        config(world, root / "ddp_then_fsdp", stop_step=2, **steps),             # DDP(2) to step 2 ...
        config(world, root / "ddp_then_fsdp", parallel="fsdp", resume=True, **steps),  # ... FSDP(2) from there
        # 2 micro-steps per rank, the weights generated once per step (generate='step', the default) ...
        config(world, root / "accum_ddp", **accum),
        config(world, root / "accum_fsdp_sync_micro_step", parallel="fsdp", shard_teacher=True,
               activation_checkpointing="layer", **accum),
        config(world, root / "accum_fsdp_sync_step", parallel="fsdp", fsdp_grad_sync="step",
               activation_checkpointing=True, **accum),
        # ... and in every micro-step
        config(world, root / "accum_fsdp_generate_micro_step", parallel="fsdp", **dict(accum, generate="micro_step")),
        config(world, root / "sft_fsdp", parallel="fsdp", **sft),                  # a plain student: SFT
        {"real_peak": dict(PEAK_JOB, out=str(root / "peak.json"))},
    ], tmp_path)
    assert stdout.count("device cpu x 2 | fsdp + shard_teacher") == 2 and stdout.count("step 4/4 |") == 4
    assert stdout.count("4 seq x 16 tokens x 2 ranks x 2 micro-steps") == 4
    assert stdout.count("| generate step\n") == 3
    assert "resuming" in stdout
    # FSDP(2) -> 1 process: the 2-rank run's step-2 checkpoint, resumed by one process
    os.makedirs(root / "fsdp_then_one")
    shutil.copytree(root / "fsdp" / "ckpt_00000002", root / "fsdp_then_one" / "ckpt_00000002")
    train.train(config(world, root / "fsdp_then_one", resume=True, **steps))

    report = []
    for name in ("fsdp", "fsdp_teacher", "ddp_then_fsdp", "fsdp_then_one", "sft_fsdp"):
        reference = losses((one_sft if name == "sft_fsdp" else one)["out_dir"])
        diff = max_diff((one_sft if name == "sft_fsdp" else one)["checkpoint"], str(root / name / "ckpt_00000004"))
        rows = losses(str(root / name))
        assert set(rows) == ({3, 4} if name == "fsdp_then_one" else {1, 2, 3, 4}), (name, sorted(rows))
        loss_diff = max(abs(rows[s][k] - reference[s][k]) for s in rows for k in ("loss", "kl", "lm", "clone"))
        report.append(f"{name}: max |tensor diff| {diff:.2e}, max |logged loss diff| {loss_diff:.2e}")
        assert diff < 1e-6 and loss_diff < 1e-6, report[-1]
    # grad accumulation: DDP, FSDP2 reducing each micro-step or once per step, weights generated once or in every
    # micro-step. Generating once sums each micro-step's dW_S before W.T @ (.), not after: other float32 rounding,
    # which AdamW's m / sqrt(v) magnifies where the two steps' gradients nearly cancel (up to ~4e-6 here, at lr
    # 1e-2). AdamW does not see a gradient's scale, so the logged global gradient norms are compared too.
    reference = losses(one_accum["out_dir"])
    for name in ("accum_ddp", "accum_fsdp_sync_micro_step", "accum_fsdp_sync_step", "accum_fsdp_generate_micro_step"):
        diff = max_diff(one_accum["checkpoint"], str(root / name / "ckpt_00000002"))
        rows = losses(str(root / name))
        norm_diff = max(abs(rows[s]["grad_norm"] / reference[s]["grad_norm"] - 1) for s in (1, 2))
        report.append(f"{name}: max |tensor diff| {diff:.2e}, max relative grad norm diff {norm_diff:.1e} "
                      f"({rows[1]['grad_norm']:.9g}, {rows[2]['grad_norm']:.9g})")
        assert diff < 2e-5 and norm_diff < 1e-5, report[-1]
    # the planner on 2 ranks, against rank 0's real peak of the same sharded step (gloo)
    real = json.load(open(root / "peak.json"))
    estimate, _ = bench.estimate(TABLE, PEAK_JOB["cfg"], "fsdp", True, False, 4, 2, 2, torch.float32, round_to=1)
    report.append(f"planner, fsdp + shard_teacher on 2 ranks: estimate {estimate:,} B, real {real:,} B "
                  f"({estimate / real - 1:+.2%})")
    # gloo allocates a temporary the size of the whole buffer in every all-gather and reduce-scatter (the fake
    # process group allocates nothing; NCCL writes into FSDP's own buffers), and when it frees them depends on
    # the two processes' timing: the real peak moves by a few % from run to run
    assert abs(estimate - real) <= 0.10 * real, report[-1]
    print("\n" + "\n".join(report))


# -----------------------------------------------------------------------------
# the memory planner

@pytest.mark.parametrize("parallel, ac, generate", [("ddp", False, "step"), ("fsdp", True, "step"), ("ddp", "layer", "step"),
                                               ("ddp", False, "micro_step"), ("fsdp", "layer", "micro_step")])
def test_planner_peak_matches_the_real_cpu_peak(parallel, ac, generate):
    """The same two steps of 2 micro-steps (the second measured), simulated under FakeTensorMode and run for real:
    the estimate is within 10% of the most bytes the CPU allocator held (torch.profiler memory events), with the
    student weights generated once per step (their float32 gradient sums counted) and in every micro-step."""
    cfg = plan_config(generate=generate)
    estimate, parts = bench.estimate(TINY, cfg, parallel, False, ac, 4, 1, 2, torch.float32, round_to=1)
    real = bench.real_cpu_peak(TINY, cfg, parallel, ac, 4, 2)
    assert abs(estimate - real) <= 0.10 * real, (estimate, real)
    assert sum(parts.values()) == estimate and all(v > 0 for v in parts.values()), parts
    teacher_bytes = sum(p.numel() * 4 for p in lrc.Qwen2(TINY).parameters())  # tied: counted once
    assert parts["teacher"] == teacher_bytes
    print(f"\n{parallel} ac={ac} generate={generate}: estimate {estimate:,} B, real {real:,} B "
          f"({estimate / real - 1:+.2%})")


def test_planner_table_and_recommendation(tmp_path, capsys):
    """bench.py --plan at a tiny shape on 4 ranks: sharding lowers what it should, and the recommendation is
    the cheapest setting that fits, with a torchrun command that train.py accepts."""
    file = tmp_path / "config.json"
    file.write_text(json.dumps(TABLE.to_dict()))
    preset = tmp_path / "preset.py"
    preset.write_text("student_hidden = 32\nseq_len = 64\ntokens_per_step = 512\nmicro_batch_size = 4\n")
    argv = ["--plan", str(preset), f"--teacher_config={file}", "--world_size=4", "--plan_micro_batch_sizes=1",
            "--data=tokens/x"]
    rows, best = bench.plan_main(argv + ["--gpu_mem_gib=1"])
    # 2 micro-steps per step: each setting with the weights generated once per step and in every micro-step
    assert len(rows) == 18 and all(r["mbs"] == 1 and r["grad_accum"] == 2 for r in rows)
    by = {(r["parallel"], r["shard_teacher"], r["ac"]): r for r in rows if r["generate"] == "micro_step"}
    once = {(r["parallel"], r["shard_teacher"], r["ac"]): r for r in rows if r["generate"] == "step"}
    ddp, fsdp, sharded = (by[(p, s, False)]["parts"] for p, s in bench.SETTINGS)
    # trainable state: DDP holds params, gradient buckets and both moments (4 x float32 per parameter); FSDP2
    # a quarter of that plus the gathered copies of the unit in use
    assert fsdp["trainable"] < 0.5 * ddp["trainable"]
    # the teacher: whole under DDP and plain FSDP; sharded, at most its shard, the root unit (embedding and final
    # norm, kept gathered through the step) and two layers (the one in use and the one prefetched)
    teacher = lrc.Qwen2(TABLE)

    def bf16_blocks(params):  # bf16 bytes, each tensor in the CUDA allocator's 512-byte blocks (as the planner counts)
        return sum(-(-p.numel() * 2 // 512) * 512 for p in params)
    whole = bf16_blocks(teacher.parameters())
    root = bf16_blocks(p for n, p in teacher.named_parameters() if ".layers." not in n)
    layer = bf16_blocks(teacher.model.layers[0].parameters())
    assert ddp["teacher"] == fsdp["teacher"] == whole
    assert sharded["teacher"] <= whole / 4 + root + 2 * layer + 4096 and sharded["teacher"] < 0.9 * whole
    # checkpointing saves memory, whole layers more than student layers (generated weights, teacher activations)
    assert by[("ddp", False, "layer")]["peak"] < by[("ddp", False, True)]["peak"] < by[("ddp", False, False)]["peak"]
    assert by[("ddp", False, "layer")]["parts"]["generated"] < by[("ddp", False, True)]["parts"]["generated"]
    # generate='step' keeps every generated weight (bf16) and its float32 gradient sum through the step: exactly
    # that much more than whole-layer checkpointing without it, which keeps no generated weight between layers
    d_s, kept = 32, 0
    for block in teacher.model.layers:
        for name, P in lrc.GENERATED.items():
            w = getattr(block.weights(), name)
            shape = (w.shape[0], d_s) if P in lrc.INPUT_SIDE else (d_s, w.shape[1])
            kept += 3 * bf16_blocks([torch.empty(shape)])  # the bf16 weight and its float32 sum (512 B blocks)
    kept += 3 * bf16_blocks([torch.empty(TABLE.vocab_size, d_s)])  # the head, W_lm @ P_emb
    for setting in [("ddp", False, "layer"), ("fsdp", True, "layer")]:
        assert once[setting]["parts"]["generated"] - by[setting]["parts"]["generated"] == kept
    assert all(once[s]["peak"] > by[s]["peak"] and once[s]["flops"] < by[s]["flops"] for s in by)
    # 1 GiB: everything fits; the fewest FLOPs: no checkpointing, the weights generated once
    assert (best["parallel"], best["ac"], best["mbs"], best["generate"]) == ("ddp", False, 1, "step")
    out = capsys.readouterr().out
    assert "micro_batch_size 1, generate step (" in out  # the mode is named where there are several micro-steps
    command = out.split("fastest that fits:")[1].splitlines()[1].strip()
    assert command.startswith("torchrun --standalone --nproc_per_node=4 train.py") and "--data=tokens/x" in command
    cfg = train.parse_args(command.split()[4:])
    assert (cfg["parallel"], cfg["micro_batch_size"]) == ("ddp", 1) and train.schedule_length(cfg, 4)[0] == 2
    # a preset that shards the teacher and checkpoints: a plain row's command switches both off
    preset_cfg = dict(cfg, parallel="fsdp", shard_teacher=True, activation_checkpointing="layer")
    plain_row = by[("ddp", False, False)]
    switched = bench.plan_command(plain_row, 4, [], [], preset_cfg)
    assert "--shard_teacher=False" in switched and "--activation_checkpointing=False" in switched
    assert "--generate=micro_step" in switched and "--generate" not in command  # spelled out only if not the config's
    assert train.parse_args(switched.split()[4:])["parallel"] == "ddp"  # keys train.py accepts
    # a budget that only the smallest peak fits: that setting is recommended
    smallest = min(rows, key=lambda r: r["peak"])
    assert smallest["shard_teacher"] and smallest["ac"] == "layer"
    assert bench.recommend(rows, smallest["peak"] / 0.9 * 1.0001, 0.1) is smallest
    with pytest.raises(lrc.LRCError, match="--teacher_config=FILE"):
        bench.plan_main(["--plan", str(preset), "--teacher_config=missing.json"])


def test_large_presets_and_known_teachers():
    """config/lrc_14b.py and lrc_32b.py name teachers the planner knows without the hub, whose architectures
    count the published parameters (Qwen2.5-14B: 14.7B, 32B: 32.8B; Llama-3.2-3B, LRC-1.5B's teacher: 3.21B),
    and their batch divides on 8 GPUs."""
    expected = {"Qwen/Qwen2.5-3B-Instruct": 3_085_938_688, "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
                "Qwen/Qwen2.5-14B-Instruct": 14_770_033_664, "Qwen/Qwen2.5-32B-Instruct": 32_763_876_352,
                "meta-llama/Llama-3.2-3B-Instruct": 3_212_749_824}  # its card: 3.21B
    for hub_id, count in expected.items():
        with torch.device("meta"):
            model = lrc.Qwen2(lrc.Qwen2Config.from_dict(bench.KNOWN_TEACHERS[hub_id]))
        assert sum(p.numel() for p in model.parameters()) == count, hub_id
    for name, teacher, hidden in [("lrc_14b", "Qwen/Qwen2.5-14B-Instruct", 3072),
                                  ("lrc_32b", "Qwen/Qwen2.5-32B-Instruct", 4096)]:
        cfg = train.parse_args([os.path.join(REPO, "config", f"{name}.py")])
        assert (cfg["teacher"], cfg["student_hidden"], cfg["tie_proj"]) == (teacher, hidden, False)
        assert train.schedule_length(cfg, 8)[0] >= 1
        assert bench.plan_teacher_config(dict(cfg, teacher_config="")).hidden_size == 5120
