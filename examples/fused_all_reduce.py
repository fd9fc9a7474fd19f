"""The fused (symmetric-memory) compressed all-reduce on GPUs with peer access.

    torchrun --nproc-per-node 2 examples/fused_all_reduce.py       # 2+ CUDA GPUs, NCCL

The buffer is a collective allocation: every rank creates the FusedAllReduce together, once,
before the first call (and before any CUDA-graph capture). Its result has the same bits as
the NCCL-path algorithm it fuses ("gather" at TP <= 3, "two_shot" at TP >= 4).
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist

import tp
from tp.comm.call import wire_algorithm

if __name__ == "__main__":
    if "RANK" not in os.environ or torch.cuda.device_count() < 2:
        sys.exit("needs 2 or more CUDA GPUs: torchrun --nproc-per-node 2 examples/fused_all_reduce.py")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=120))
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(rank))
    from tp.fused import FusedAllReduce
    ar = FusedAllReduce(group, max_tokens=8192, hidden=4096, fmts=["mxfp4"])  # on every rank
    try:
        y = tp.all_reduce(x, "mxfp4", group, algorithm="fused")  # same bits as "gather" at TP<=3, "two_shot" at TP>=4
        assert torch.equal(y, tp.all_reduce(x, "mxfp4", group, algorithm=wire_algorithm("fused", world)))
        if rank == 0:
            print(f"fused mxfp4 all-reduce at TP={world} == {wire_algorithm('fused', world)}: True")
    finally:
        ar.close()
        dist.destroy_process_group()
