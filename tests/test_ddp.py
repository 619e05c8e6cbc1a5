"""Two gloo processes: SwitchNorm averages each training step's usage across ranks; eval runs
no collective; a DDP-wrapped switched model trains."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynconv import SwitchedConv2d, SwitchNorm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probs(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.rand(2, 3, 4, 4, generator=g).softmax(1)


def _worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        norm = SwitchNorm(3, buffer_size=2).train()
        norm(_probs(rank))
        if rank == 0:  # rank-0-only eval must not hang waiting for rank 1
            norm.eval()
            norm(_probs(7))
            norm.train()
        dist.barrier()
        torch.manual_seed(0)
        layer = SwitchedConv2d(3, 4, 3, padding=1, breadth=3)
        model = torch.nn.parallel.DistributedDataParallel(layer)
        torch.manual_seed(rank)
        model(torch.randn(2, 3, 6, 6)).square().mean().backward()
        results[rank] = (norm.usage[0].clone(), layer.weight.grad.clone(), layer.norm.usage[0].clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_switch_norm_syncs_usage_across_ranks():
    world = 2
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(world, _free_port(), results), nprocs=world, join=True)
    expected = (SwitchNorm.step_usage(_probs(0)) + SwitchNorm.step_usage(_probs(1))) / 2
    for rank in range(world):
        torch.testing.assert_close(results[rank][0], expected)
    torch.testing.assert_close(results[0][1], results[1][1])  # DDP averaged the gradients
    torch.testing.assert_close(results[0][2], results[1][2])  # layer's SwitchNorm in sync too
