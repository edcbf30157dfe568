# Preset for data/toy_compare.py (issue 6): what every student (lrc, kd, scratch) shares, and the toy teacher.
# Plain train.py keys, so `python train.py config/toy_compare.py --method=kd` runs one of the students alone
# (on data/toy.py's default toy world; toy_compare.py builds its own, with more fact repetitions).
# Sized so that the whole comparison (teacher + 3 methods x 3 seeds + evaluation) takes ~15 minutes on a
# 2-core CPU.

# the students: the LRC student's exported shape for all three
student_hidden = 64
seq_len = 128
tokens_per_step = 2048    # small batches: more updates per token, which the facts need
micro_batch_size = 16
max_steps = 200
lr = 1e-2                 # one rate for all three methods (see the README for the equal sweep behind it)
warmup_ratio = 0.02
eval_interval = 10        # validation curve points
eval_tokens = 8192        # validation tokens per curve point (the same windows for every method)
log_interval = 25
save_interval = 0         # one checkpoint, at the end
keep_last = 1
seed = 1337               # students use seed, seed + 1, ... (init and batch order); the teacher uses seed

# the toy teacher, trained once on the teacher's text (facts seen and teacher-only) with method=scratch
toy_teacher_hidden = 128
toy_teacher_layers = 4
toy_teacher_heads = 4
toy_teacher_kv_heads = 2
toy_teacher_ffn = 384
toy_teacher_steps = 600
toy_teacher_lr = 3e-3
