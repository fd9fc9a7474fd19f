"""A compressed all-reduce across processes, checked against the one-process emulator.

    python examples/all_reduce.py                               # starts 2 CPU ranks (gloo) itself
    torchrun --nproc-per-node 2 examples/all_reduce.py          # or let torchrun start them

Every rank contributes a partial sum of shape [16, 4096]; ``tp.all_reduce`` sums them with the
mxfp4 format on the wire (two_shot: the Flash Communication algorithm). Every rank ends with
the same bits, and ``tp.emulate_all_reduce`` computes them exactly in one process.
"""
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tp

WORLD = 2  # ranks started by `python examples/all_reduce.py`
TIMEOUT = datetime.timedelta(seconds=60)  # a rank that never arrives fails the run, never hangs it


def partial(rank: int) -> torch.Tensor:
    return torch.randn(16, 4096, generator=torch.Generator().manual_seed(rank))


def run(rank=None, world=None, port=None):
    if rank is None:  # under torchrun: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are set
        dist.init_process_group("gloo", timeout=TIMEOUT)
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=TIMEOUT)
    try:
        group = dist.group.WORLD                    # the TP group: here every rank
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        x = partial(rank)                           # this rank's partial sum
        y = tp.all_reduce(x, "mxfp4", group, algorithm="two_shot")     # or "gather", or fmt=None
        y_emulated = tp.emulate_all_reduce([partial(r) for r in range(world)], "mxfp4", "two_shot")
        assert torch.equal(y, y_emulated)           # bit-identical, one process

        exact = sum(partial(r) for r in range(world))
        sent = tp.wire_bytes(x.shape, x.dtype, "mxfp4", "two_shot", world)
        if rank == 0:
            print(f"rank 0 of {world}: all_reduce(mxfp4, two_shot) == emulate_all_reduce: True")
            print(f"relative error vs. the exact sum: {((y - exact).norm() / exact.norm()).item():.4f}")
            print(f"bytes sent per rank: {sent.sent_bytes} ({sent.plain_bytes} for the plain fp32 all-reduce)")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    if "RANK" in os.environ:
        run()
    else:
        mp.spawn(run, args=(WORLD, free_port()), nprocs=WORLD)
