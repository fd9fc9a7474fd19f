"""A DTensor TP model (torch.distributed.tensor.parallel) whose row-parallel reduction is
compressed by tp.styles.CompressedRowwiseParallel, eager and compiled.

    torchrun --nproc-per-node 2 examples/dtensor_mlp.py          # gloo on CPU
"""
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from tp.styles import CompressedRowwiseParallel

mesh = init_device_mesh("cpu", (2,))  # joins torchrun's gloo group; "cuda" for NCCL
torch.manual_seed(0)  # the same full weights on every rank before sharding
mlp = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256))
parallelize_module(mlp, mesh, {"0": ColwiseParallel(), "2": CompressedRowwiseParallel("mxfp8_e4m3")})
with torch.no_grad():
    x = torch.randn(8, 256)
    y = mlp(x)                                      # the sum of the partials went out as MXFP8
    y_compiled = torch.compile(mlp, fullgraph=True)(x)
print(torch.equal(y, y_compiled))                   # True: one torch.ops.qformats.all_reduce per layer
