# The toy preset: what `python train.py` runs with no arguments (these values restate train.py's DEFAULTS).
# A tiny Qwen2 teacher is trained from scratch on the toy corpus on first use (cached in out_dir/teacher),
# then distilled into a narrower LRC student. Finishes in a few minutes on a 2-core CPU, offline.
out_dir = "out/toy"
method = "lrc"
teacher = "toy"
data = "toy"
student_hidden = 64
clone_attn_out = "student"   # the paper's attention-output clone term (the recipes use the official 'teacher')
seq_len = 128
tokens_per_step = 2048
micro_batch_size = 16
max_steps = 200
lr = 1e-2
warmup_ratio = 0.05
log_interval = 10
save_interval = 100
toy_teacher_steps = 400
