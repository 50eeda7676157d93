"""The two-process worker of the synced-codebook test, in a module of its own: a spawned process unpickles the
worker by importing its module, and this one imports nothing of the test suite (a test module's
``from conftest import ...`` would find bench/conftest.py first on a spawned process's path)."""

from __future__ import annotations

import torch

from fastvae import nn as fnn


def ddp_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial codebook on each rank
    vq = fnn.VectorQuantize(3, 7, decay=0.7, kmeans_init=True, kmeans_iters=2, rotation_trick=False,
                            generator=torch.Generator().manual_seed(rank), backend="torch")
    assert vq.sync_codebook is None  # None: synced because torch.distributed runs with 2 processes
    for step in range(2):
        vq(torch.randn(20, 3, generator=torch.Generator().manual_seed(100 * step + rank)))
    torch.save({k: v.clone() for k, v in vq.state_dict().items()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()
