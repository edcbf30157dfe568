# LRC-1.5B: the reference repository's main example (its README's training command), from Llama-3.2-3B-Instruct.
#   torchrun --standalone --nproc_per_node=8 train.py config/lrc_1.5b.py --data=DIR
# DIR: token files made with the teacher's tokenizer, e.g.
#   python data/prepare.py --tokenizer=meta-llama/Llama-3.2-3B-Instruct --input=... --out=DIR --val_fraction=0.0005
# (the reference trained on its own general mix, tokenized for Llama 3; its composition is not given there)
out_dir = "out/lrc_1.5b"
method = "lrc"
teacher = "meta-llama/Llama-3.2-3B-Instruct"  # 28 layers, hidden 3072, 24 / 8 heads, head_dim 128, tied,
                                              # llama3 RoPE scaling (spec section 2); a gated hub repository
data = "tokens/llama3"                   # made by data/prepare.py; or --data=DIR
student_hidden = 1536                    # --target_hidden_size 1536
tie_proj = True                          # --tie_word_emb_proj 1: tied teacher + tie_proj, a tied student
alpha = 0.2                              # --aux_loss_scale_factor 0.2, the clone-loss weight
tau = 40.0                               # --kl_temperature 40
clone_attn_out = "teacher"               # the official code's attention-output term, which trained the released
                                         # models: E(a_s W_o^T, a_t W_o^T) at teacher width (spec 4)
seq_len = 2048                           # --data-max-len 2048
# --batch-size 3 per GPU on 8 GPUs: 3 x 2048 x 8 = 49,152 tokens per optimizer step, here as 3 micro-steps of one
# sequence (the same loss: L_KL's sum over positions / B and the means of L_LM and L_clone average alike).
# One GPU: grad_accum becomes 24 by itself. 929,650,176 trainable parameters (spec section 3).
tokens_per_step = 49152
# The planner's fastest setting that fits 8 x 80 GB with 10% headroom (docs/scaling.md): 3 sequences per forward
# without activation checkpointing need 76.3 GiB per GPU with every rank holding everything (the reference ran
# under DeepSpeed ZeRO stage 2, accel_ds_8h800_gas1.yaml: gradients and optimizer state sharded), 63.8 GiB with
# the projections' state sharded by FSDP2. One sequence per micro-step with the student weights generated once
# per optimizer step (generate=step, the default) costs the same FLOPs per token as 3 in one forward, and fits
# every rank holding everything: 48.0 GiB, with DDP's one all-reduce per step.
#   python bench.py --plan config/lrc_1.5b.py --world_size=8 --gpu_mem_gib=80 --plan_micro_batch_sizes=1,3
micro_batch_size = 1
parallel = "ddp"
max_steps = 208000                       # --max_steps 208000: 10.2B tokens
lr = 1e-4                                # --learning-rate 1e-4
min_lr = 0.0
warmup_ratio = 0.005                     # --warmup-ratio 0.005
decay = "linear"
beta1 = 0.9
beta2 = 0.999
weight_decay = 0.0
grad_clip = 1.0                          # --max_grad_norm 1.0
log_interval = 10
eval_interval = 2000
eval_tokens = 1048576
save_interval = 2000
keep_last = 3
overwrite = False
