"""``tp.compile``: an ordinary TP model (functional collectives, as gpt-fast and torchtitan
write them) whose all-reduces are compressed by compiling it. 2 CPU ranks on gloo; compiling
takes ~10-30 s on 2 cores.

    python examples/compile_tp_model.py

The compiled model equals the same model calling ``tp.all_reduce`` by hand, bit for bit.
``modules=`` globs are matched against the module whose ``forward`` calls the all-reduce
(here ``layers.0.down_proj``); ``tp.print_collectives`` lists that path for each call.
"""
import datetime
import socket

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import tp

WORLD, HIDDEN, FFN, TOKENS = 2, 64, 256, 512  # each all-reduce: 512 x 64 fp32 = 128 KiB (over min_bytes)
TIMEOUT = datetime.timedelta(seconds=120)


class RowParallel(nn.Module):
    """The second linear of a TP pair: a partial product over this rank's input slice, then
    the all-reduce, inside this module's forward (so ``*.down_proj`` selects it)."""

    def __init__(self, weight: torch.Tensor, reduce=None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.reduce = reduce or (lambda p: funcol.all_reduce(p, "sum", dist.group.WORLD))

    def forward(self, x):
        return self.reduce(F.linear(x, self.weight))


class MLP(nn.Module):
    def __init__(self, rank, world, seed, reduce=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        up, down = torch.randn(FFN, HIDDEN, generator=g) / HIDDEN**0.5, torch.randn(HIDDEN, FFN, generator=g) / FFN**0.5
        per = FFN // world  # column-parallel up_proj rows, row-parallel down_proj columns
        self.up_proj = nn.Parameter(up[rank * per:(rank + 1) * per].clone(), requires_grad=False)
        self.down_proj = RowParallel(down[:, rank * per:(rank + 1) * per].clone(), reduce)

    def forward(self, x):
        return x + self.down_proj(torch.relu(F.linear(x, self.up_proj)))


class Model(nn.Module):
    def __init__(self, rank, world, reduce=None):
        super().__init__()
        self.layers = nn.ModuleList(MLP(rank, world, seed, reduce) for seed in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def run(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        ids = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(0))
        model = Model(rank, world)
        policy = tp.CollectivePolicy("mxfp8_e4m3", modules=("*.down_proj",))  # min_bytes: 64 KiB
        compiled = tp.compile(model, policy, cache=False)   # torch.compile(fullgraph=True) + the rewrite pass
        logits = compiled(ids)
        # the eager reference: the same weights, calling the compressed all-reduce by hand
        by_hand = Model(rank, world, reduce=lambda p: tp.all_reduce(p, "mxfp8_e4m3", dist.group.WORLD))
        assert torch.equal(logits, by_hand(ids))
        if rank == 0:
            tp.print_collectives(compiled)                  # which collectives, formats, bytes before/after
            print("compiled == eager tp.all_reduce: True")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    mp.spawn(run, args=(WORLD, free_port()), nprocs=WORLD)
