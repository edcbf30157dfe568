# LRC-1.7B: the released recipe (spec section 4; the LRC-1.7B-Base model card).
#   torchrun --standalone --nproc_per_node=8 train.py config/lrc_1.7b.py
# Data, as the card's "Mixed-1.1" (Qwen-teacher version): Fineweb-Edu (edu_score >= 4) 20B tokens and
# OpenHermes 2.5 450M tokens, the conversations rendered with the teacher's chat template. Both made with
# the teacher's tokenizer:
#   python data/prepare.py --tokenizer=Qwen/Qwen2.5-3B-Instruct --input fineweb_edu/*.parquet.jsonl \
#       --out=tokens/fineweb_edu --val_fraction=0.0005 --num_proc=32
#   python data/prepare.py --tokenizer=Qwen/Qwen2.5-3B-Instruct --input openhermes2_5.json.jsonl --format=chat \
#       --out=tokens/openhermes --num_proc=32
out_dir = "out/lrc_1.7b"
method = "lrc"
teacher = "Qwen/Qwen2.5-3B-Instruct"     # 36 layers, hidden 2048, tied embeddings
# each window drawn from one source by weight: the card's token counts, 20B : 0.45B = 0.978 : 0.022
data = {"tokens/fineweb_edu": 20.0 / 20.45, "tokens/openhermes": 0.45 / 20.45}
student_hidden = 1200
tie_proj = True                          # tied teacher + tie_proj: a tied student, like the release
alpha = 0.5
tau = 40.0
clone_attn_out = "teacher"               # the attention-output clone term of the official code, which trained
                                         # the released models: E(a_s W_o^T, a_t W_o^T) at teacher width (spec 4)
seq_len = 2048
tokens_per_step = 32768                  # 16 sequences of 2048 tokens per optimizer step
# 2 sequences per forward on each of 8 GPUs = 32,768 tokens: no accumulation on one 8-GPU node. The
# bf16 teacher (6 GB), the float32 projections with their Adam state and gradients (~10 GB) and the
# activations of 2 x 2048 tokens fit an 80 GB H800/H100 (67.3 GiB, the planner's fastest: docs/scaling.md).
# One GPU: grad_accum becomes 8 by itself, and the student weights are generated once per optimizer step
# (generate=step, the default): by FLOPs (bench.py --flops) 1.072x the floor instead of 1.232x.
# Two nodes (16 GPUs): pass --micro_batch_size=1 (2 micro-steps of one sequence: the same FLOPs per token).
micro_batch_size = 2
max_tokens = 20e9                        # 20B tokens = 610,352 steps
lr = 6.7e-5
min_lr = 0.0
warmup_ratio = 0.005
decay = "linear"
beta1 = 0.9
beta2 = 0.999
weight_decay = 0.0
grad_clip = 1.0
log_interval = 10
eval_interval = 2000
eval_tokens = 1048576
save_interval = 2000
keep_last = 3
overwrite = False                        # a restart without --resume is refused instead of starting over
