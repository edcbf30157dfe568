# LRC from Qwen2.5-32B-Instruct (64 layers, hidden 5120, untied) to a student of hidden 4096: no released model
# or recipe; everything but the teacher, student_hidden and how it is spread over the GPUs follows LRC-4B
# (config/lrc_4b.py). Its memory on 8 x 80 GB, by the planner (docs/scaling.md):
#   python bench.py --plan config/lrc_32b.py --world_size=8 --gpu_mem_gib=80
#   torchrun --standalone --nproc_per_node=8 train.py config/lrc_32b.py --data=DIR
# DIR: python data/prepare.py --tokenizer=Qwen/Qwen2.5-32B-Instruct --input=... --out=DIR --val_fraction=0.0005
out_dir = "out/lrc_32b"
method = "lrc"
teacher = "Qwen/Qwen2.5-32B-Instruct"    # 64 layers, hidden 5120, 40 heads / 8 kv heads, untied embeddings
data = "tokens/qwen2.5"                  # made by data/prepare.py; or --data=DIR
student_hidden = 4096
tie_proj = False                         # an untied student, like LRC-4B
alpha = 0.5
tau = 40.0
clone_attn_out = "teacher"               # the official code's attention-output clone term, as the other recipes
seq_len = 2048
tokens_per_step = 32768
# the planner's fastest setting that fits 8 x 80 GB with 10% headroom (docs/scaling.md)
parallel = "fsdp"
shard_teacher = True
activation_checkpointing = "layer"          # the generated weights alone (64 layers) would take 46.5 GiB
# (with generate=step over several micro-steps, 143.7 GiB with their float32 gradient sums: it never fits here)
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
