"""Run several train.train() jobs, one after the other, in each process of one torchrun launch (the
2-process tests: starting torchrun and importing torch costs more than a tiny job). Usage:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/torchrun_jobs.py JOBS.json

JOBS.json: a list of train.py config dicts, or of {"real_peak": {...}}: bench.real_cpu_peak of this rank
(the keyword arguments below), written by rank 0 to the given "out" file. The process group is made once,
here, and every job uses it (distributed.init joins an existing group and then leaves it to its creator)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import bench  # noqa: E402
import lrc  # noqa: E402
import train  # noqa: E402


def real_peak(job):
    peak = bench.real_cpu_peak(lrc.Qwen2Config.from_dict(job["teacher_config"]), job["cfg"], "fsdp", job["ac"],
                               job["mbs"], job["micro_steps"], job["shard_teacher"])
    if dist.get_rank() == 0:
        with open(job["out"], "w") as f:
            json.dump(peak, f)


def main(path):
    torch.set_num_threads(1)
    with open(path) as f:
        jobs = json.load(f)
    dist.init_process_group("gloo")
    try:
        for job in jobs:
            if "real_peak" in job:
                real_peak(job["real_peak"])
            else:
                train.train(job)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
