# Preset for experiments/toy_compare.py: what every student (lrc, kd, scratch) shares, and the toy teacher.
# Plain train.py keys, so `python train.py config/toy_compare.py --method=kd` runs one of the students alone
# (on data/toy.py's default toy world, the same world toy_compare.py builds).
# Sized so that the whole comparison (teacher + 3 methods x 3 seeds + evaluation) takes about 15 CPU-minutes on
# one core (less wall time on two).

# the students: the LRC student's exported shape for all three. Learning rate and KL temperature are chosen
# per method by an equal sweep (PER_METHOD in experiments/toy_compare.py): lrc lr=1e-2 tau=40, kd lr=3e-3 tau=1,
# scratch lr=3e-3; train.py alone uses its defaults (lr=1e-2, tau=40) unless told --lr / --tau.
student_hidden = 64
seq_len = 128
tokens_per_step = 2048    # small batches: more updates per token, which the facts need
micro_batch_size = 16
max_steps = 200
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
