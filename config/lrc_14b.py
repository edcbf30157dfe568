# LRC from Qwen2.5-14B-Instruct (48 layers, hidden 5120, untied) to a student of hidden 3072: no released model
# or recipe; everything but the teacher, student_hidden and how it is spread over the GPUs follows LRC-4B
# (config/lrc_4b.py). Its memory on 8 x 80 GB, by the planner (docs/scaling.md):
#   python bench.py --plan config/lrc_14b.py --world_size=8 --gpu_mem_gib=80
#   torchrun --standalone --nproc_per_node=8 train.py config/lrc_14b.py --data=DIR
# DIR: python data/prepare.py --tokenizer=Qwen/Qwen2.5-14B-Instruct --input=... --out=DIR --val_fraction=0.0005
out_dir = "out/lrc_14b"
method = "lrc"
teacher = "Qwen/Qwen2.5-14B-Instruct"    # 48 layers, hidden 5120, 40 heads / 8 kv heads, untied embeddings
data = "tokens/qwen2.5"                  # made by data/prepare.py; or --data=DIR
student_hidden = 3072
tie_proj = False                         # an untied student, like LRC-4B
alpha = 0.5
tau = 40.0
clone_attn_out = "teacher"               # the official code's attention-output clone term, as the other recipes
seq_len = 2048
tokens_per_step = 32768
# The planner's fastest setting that fits 8 x 80 GB with 10% headroom (docs/scaling.md): 53.3 GiB per GPU. With
# DDP the trainable state alone is 79.2 GiB per GPU (~5.3B float32 projections with gradients and Adam state);
# FSDP2 without sharding the teacher (27.5 GiB bf16 on every GPU) needs 74.0 GiB at 2 sequences, over the budget.
# Generating the student weights once per step for 2 micro-steps of one sequence would hold 47.2 GiB of them and
# their float32 gradient sums per GPU: it fits only with whole layers recomputed, 168.6 against 141.2 GFLOP/token.
parallel = "fsdp"
shard_teacher = True
activation_checkpointing = True
micro_batch_size = 2
max_tokens = 18e9
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
overwrite = False
