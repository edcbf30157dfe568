"""Run several train.train() jobs, one after the other, in each process of one torchrun launch (the
2-process tests: starting torchrun and importing torch costs more than a tiny job). Usage:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/torchrun_jobs.py JOBS.json

JOBS.json: a list of train.py config dicts. The process group is made once, here, and every job uses it
(distributed.init joins an existing group and then leaves it to its creator)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import train  # noqa: E402


def main(path):
    torch.set_num_threads(1)
    with open(path) as f:
        jobs = json.load(f)
    dist.init_process_group("gloo")
    try:
        for cfg in jobs:
            train.train(cfg)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
