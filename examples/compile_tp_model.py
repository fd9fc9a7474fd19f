"""``tp.compile``: an ordinary TP model (functional collectives, as gpt-fast and torchtitan
write them) whose all-reduces are compressed by compiling it. 2 CPU ranks on gloo; compiling
takes ~10-30 s on 2 cores.

    python examples/compile_tp_model.py

The compiled model equals the same model calling ``tp.all_reduce`` by hand, bit for bit.
The all-reduce is written in the block's ``forward``, as gpt-fast does; ``modules=`` globs are
matched against the module that issues a collective and the one that computed its input, so
``"*.down_proj"`` selects it. ``tp.print_collectives`` lists each collective's module.
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


def functional_all_reduce(partial):
    return funcol.all_reduce(partial, "sum", dist.group.WORLD)


class MLP(nn.Module):
    """A TP MLP: column-parallel up_proj (this rank's rows), row-parallel down_proj (this
    rank's columns), then the all-reduce of down_proj's partial output."""

    def __init__(self, rank, world, seed, all_reduce=functional_all_reduce):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        up, down = torch.randn(FFN, HIDDEN, generator=g) / HIDDEN**0.5, torch.randn(HIDDEN, FFN, generator=g) / FFN**0.5
        per = FFN // world
        self.up_proj = nn.Linear(HIDDEN, per, bias=False)
        self.down_proj = nn.Linear(per, HIDDEN, bias=False)
        with torch.no_grad():
            self.up_proj.weight.copy_(up[rank * per:(rank + 1) * per])
            self.down_proj.weight.copy_(down[:, rank * per:(rank + 1) * per])
        self.all_reduce = all_reduce

    def forward(self, x):
        return x + self.all_reduce(self.down_proj(F.relu(self.up_proj(x))))


class Model(nn.Module):
    def __init__(self, rank, world, all_reduce=functional_all_reduce):
        super().__init__()
        self.layers = nn.ModuleList(MLP(rank, world, seed, all_reduce) for seed in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def run(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(0))  # hidden states
        model = Model(rank, world).requires_grad_(False)
        policy = tp.CollectivePolicy("mxfp8_e4m3", modules=("*.down_proj",))  # min_bytes: 64 KiB
        compiled = tp.compile(model, policy, cache=False)   # torch.compile(fullgraph=True) + the rewrite pass
        y = compiled(x)
        # the eager reference: the same weights, calling the compressed all-reduce by hand
        by_hand = Model(rank, world, lambda p: tp.all_reduce(p, "mxfp8_e4m3", dist.group.WORLD)).requires_grad_(False)
        assert torch.equal(y, by_hand(x))
        assert tp.compile_report(compiled).count() == len(model.layers)  # every down_proj all-reduce
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
