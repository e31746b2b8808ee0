"""Two gloo processes (no Ray): before validation every rank takes rank 0's BatchNorm
statistics, so the validation metrics are those of the model rank 0 exports."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def _rank(rank: int, world: int, init: str, out: str) -> None:
    from rayscreen.train.step import broadcast_buffers, predict, train_step

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2)))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard: its own running statistics
        for _ in range(2):
            train_step(model, opt, torch.rand(8, 1, 8, 8, generator=g) * (1 + rank), torch.randint(0, 2, (8,)))
        before = {k: v.clone() for k, v in model.module.state_dict().items()}
        broadcast_buffers(model)
        val = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(7))
        probs, *_ = predict(model, [(val, torch.zeros(6, dtype=torch.int64))])
        torch.save({"before": before, "after": model.module.state_dict(), "probs": torch.from_numpy(probs)},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_validation_uses_rank_0s_batchnorm_statistics_on_every_rank(tmp_path):
    init = f"file://{tmp_path / 'store'}"
    mp.start_processes(_rank, args=(2, init, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    key = "1.running_mean"
    assert not torch.allclose(r0["before"][key], r1["before"][key])  # the ranks' statistics had drifted apart
    for k, v in r0["before"].items():  # rank 0 unchanged, rank 1 now holds exactly rank 0's model
        assert torch.equal(r0["after"][k], v) and torch.equal(r1["after"][k], v), k
    assert torch.equal(r0["probs"], r1["probs"])  # the same validation batch scores the same on both
