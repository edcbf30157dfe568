# LRC-4B: teacher Qwen2.5-7B-Instruct, d_s = 2048, untied, 18B tokens (the LRC-4B model card). The card
# gives no other pre-training hyperparameters; the rest follows the LRC-1.7B recipe (config/lrc_1.7b.py).
#   torchrun --standalone --nproc_per_node=8 train.py config/lrc_4b.py --data=DIR
# DIR: python data/prepare.py --tokenizer=Qwen/Qwen2.5-7B-Instruct --input=... --out=DIR --val_fraction=0.0005
out_dir = "out/lrc_4b"
method = "lrc"
teacher = "Qwen/Qwen2.5-7B-Instruct"     # 28 layers, hidden 3584, untied embeddings
# the card's "Mixed-2.0": Fineweb-Edu, OpenHermes 2.5, DCLM and Cosmopedia v2, in proportions the card does
# not give: one prepared directory here, or a mixture such as --data="{'tokens/fineweb_edu': 0.6, ...}"
data = "tokens/qwen2.5"
student_hidden = 2048
tie_proj = False                         # separate P_emb and P_lm: an untied student, like the release
alpha = 0.5
tau = 40.0
clone_attn_out = "teacher"               # the attention-output clone term of the official code, which trained
                                         # the released models: E(a_s W_o^T, a_t W_o^T) at teacher width (spec 4)
seq_len = 2048
tokens_per_step = 32768
# The planner's fastest setting that fits 8 x 80 GB with 10% headroom (docs/scaling.md): with every rank holding
# everything, one sequence per forward needs 77.5 GiB without activation checkpointing (the bf16 teacher 14.2 GiB,
# ~1.45B float32 projections with gradients and Adam state 21.7 GiB, generated weights 7.0 GiB, activations), and
# 2 sequences fit only with the student layers recomputed (57.6 GiB, 62.0 GFLOP per token). Sharding the teacher
# and the projections' state (FSDP2) leaves room for no recomputation at one sequence per micro-step, 2 micro-steps
# per step, the student weights generated once per step (generate=step, the default; their float32 gradient sums
# 15.1 GiB): 64.0 GiB and 54.2 GFLOP per token, 13% fewer, for 69.8 GB of gathers and reduce-scatters per rank and
# step instead of 10.2 (FSDP2 overlaps them with compute; not measured on GPUs).
#   python bench.py --plan config/lrc_4b.py --world_size=8 --gpu_mem_gib=80
parallel = "fsdp"
shard_teacher = True
activation_checkpointing = False
micro_batch_size = 1
max_tokens = 18e9                        # 18B tokens = 549,317 steps
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
