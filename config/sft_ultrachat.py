# The second stage: SFT of a converted LRC student on UltraChat, as LRC-4B-SFT was made (its model card).
#   python convert.py --ckpt=out/lrc_4b --out=students/lrc_4b --dtype=bf16
#   python data/prepare.py --tokenizer=students/lrc_4b --input ultrachat_200k/train_sft.jsonl --format=chat \
#       --out=tokens/ultrachat --val_fraction=0.002 --num_proc=32
#   torchrun --standalone --nproc_per_node=8 train.py config/sft_ultrachat.py
#   python convert.py --ckpt=out/sft_ultrachat --out=students/lrc_4b_sft
# The loss is the next-token cross-entropy on the assistant's tokens only (the loss mask prepare.py writes
# for chat data); the user's and system's tokens are context, never targets.
#
# Stated by the card: the dataset (UltraChat, ultrachat_200k), about 0.2B tokens, learning rate 1e-5.
# Not stated by the card, chosen here: everything else below (the pre-training recipe's sequence length,
# batch, optimizer and schedule; one pass over the data).
out_dir = "out/sft_ultrachat"
method = "sft"
init_from = "students/lrc_4b"           # the converted LRC-4B student (any Hugging Face Qwen2/Llama/Qwen3 dir)
data = "tokens/ultrachat"               # chat data with its loss mask (data/prepare.py --format=chat)
lr = 1e-5                               # the card's
max_tokens = 0.2e9                      # the card's "0.2B tokens": one pass over UltraChat
seq_len = 2048
tokens_per_step = 32768
micro_batch_size = 2
# every weight is trained: LRC-4B's 4.35B parameters hold 16 bytes each in float32 weights, gradients and AdamW
# moments, 70 GB per GPU under DDP before any activation; FSDP2 splits them over the 8 GPUs (8.7 GB each)
parallel = "fsdp"
sampler = "epoch"
min_lr = 0.0
warmup_ratio = 0.03
decay = "linear"
beta1 = 0.9
beta2 = 0.999
weight_decay = 0.0
grad_clip = 1.0
log_interval = 10
eval_interval = 500
eval_tokens = 1048576
save_interval = 500
keep_last = 2
overwrite = False
