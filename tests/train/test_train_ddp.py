"""DDP through Accelerate: two CPU processes with gloo train the same run; both ranks end with
identical weights, only rank 0 writes checkpoints and logs, and the result matches a single
process training on the same global batches."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dynconv.config import config_from_dict
from dynconv.train import Trainer
from dynconv.train import checkpoint as ckpt

from helpers import make_sr_data, sr_config  # noqa: E402  (tests/ is on sys.path under pytest)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw(root: Path, batch_size: int) -> dict:
    return sr_config(root, train={"steps": 3, "batch_size": batch_size, "ema": 0.5},
                     eval={"every": 3}, log={"checkpoint_every": 2, "every": 1})


def _worker(rank: int, world: int, port: int, root: str, run_dir: str, results) -> None:
    # what `accelerate launch` / torchrun set for every process
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        trainer = Trainer(config_from_dict(_raw(Path(root), batch_size=1)), run_dir)
        result = trainer.fit()
        results[rank] = {
            "world": trainer.world,
            "weights": {k: v.clone() for k, v in trainer.raw.state_dict().items()},
            "metrics": result.metrics,
        }
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_process_gloo_ddp(tmp_path):
    root = make_sr_data(tmp_path / "data")
    run_dir = tmp_path / "ddp"
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _free_port(), str(root), str(run_dir), results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    assert r0["world"] == r1["world"] == 2
    for key in r0["weights"]:
        assert torch.equal(r0["weights"][key], r1["weights"][key]), key  # DDP kept the ranks in sync
    assert r0["metrics"] == r1["metrics"]  # eval sharded over ranks, then reduced
    # only rank 0 wrote: one start event, one TensorBoard-free log, checkpoints of rank 0's weights
    events = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events].count("start") == 1
    assert events[0]["world_size"] == 2
    assert sorted(s for s, _ in ckpt.list_checkpoints(run_dir / "checkpoints")) == [2, 3]
    saved = ckpt.load_weights(ckpt.latest_checkpoint(run_dir / "checkpoints") / ckpt.MODEL_FILE)
    for key, value in saved.items():
        assert torch.equal(value, r0["weights"][key]), key
    state = ckpt.load_state(ckpt.latest_checkpoint(run_dir / "checkpoints"))
    assert len(state["rng"]) == 2 and state["world_size"] == 2  # every rank's RNG state
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    # the same global batches in one process give the same weights (up to float summation order)
    single = Trainer(config_from_dict(_raw(root, batch_size=2)), tmp_path / "single")
    single.fit()
    for key, value in single.raw.state_dict().items():
        torch.testing.assert_close(r0["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key)
