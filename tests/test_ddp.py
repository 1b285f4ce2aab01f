"""Two real processes under DistributedDataParallel (gloo, CPU): decisions and weights stay in lockstep."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adabatch import AdaptiveBatchController, ControllerConfig

DIM, MICRO, STEPS = 16, 8, 1200
CFG = dict(initial_batch=16, min_batch=16, max_batch=512, lr_rule="none")  # the default cadence and decisions;
# a fixed small LR keeps |w - w*| (hence the true noise scale) nearly constant


def _rendezvous(tmp_path) -> str:
    """A fresh file for the process group to meet at: no port to race another test's processes for."""
    return str(tmp_path / "rendezvous")


def _batches(rank: int, world: int):
    """Noisy linear regression at fixed weights; every rank draws its own micro-batches."""
    g = torch.Generator().manual_seed(100 + rank)
    while True:
        x = torch.randn(MICRO, DIM, generator=g)
        yield x, 3.0 * torch.randn(MICRO, generator=g)


def _model() -> nn.Module:
    model = nn.Linear(DIM, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0 / math.sqrt(DIM))
    return model


def _worker(rank: int, world: int, rendezvous: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        ddp = nn.parallel.DistributedDataParallel(_model())
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-4)
        ctl = AdaptiveBatchController(ddp, opt, MICRO, ControllerConfig(**CFG))
        data = _batches(rank, world)
        trajectory = []
        while ctl.steps < STEPS:
            x, y = next(data)
            ctl.backward(0.5 * ((ddp(x).squeeze(1) - y) ** 2).mean())
            if ctl.step():
                trajectory.append(ctl.batch_size)
        # the opt-in timed measurement cadence: each rank times itself, yet they must stay in lockstep
        timed = AdaptiveBatchController(ddp, opt, MICRO, ControllerConfig(**{**CFG, "measure_budget": 0.005,
                                                                                "max_measure_every": 16}))
        while timed.steps < 300:
            x, y = next(data)
            timed.backward(0.5 * ((ddp(x).squeeze(1) - y) ** 2).mean())
            timed.step()
        timed.flush()
        # the opt-in goodput policy prices batches from each rank's clock; the ranks share one profile
        goodput = AdaptiveBatchController(ddp, opt, MICRO, ControllerConfig(**{**CFG, "policy": "goodput"}))
        while goodput.steps < 600:
            x, y = next(data)
            goodput.backward(0.5 * ((ddp(x).squeeze(1) - y) ** 2).mean())
            goodput.step()
        goodput.flush()
        torch.save({"trajectory": trajectory, "weight": ddp.module.weight.detach().clone(),
                    "goodput": [r.batch for r in goodput.history], "profile": goodput.policy.profile.state_dict(),
                    "noise": ctl.noise_scale, "granularity": ctl.granularity,
                    "timed": [(r.batch, r.measured) for r in timed.history],
                    "interval": timed.measure_interval}, f"{out}/rank{rank}.pt")
        dist.barrier()  # tearing gloo down while the peer is still in its last collective aborts it
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_agree_on_every_decision_and_on_the_weights(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _rendezvous(tmp_path), str(tmp_path)), nprocs=world, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(world))
    assert r0["granularity"] == MICRO * world
    assert r0["trajectory"] == r1["trajectory"]
    assert len(set(r0["trajectory"])) > 1, "the batch should have grown (B_simple ~ 160, start 16)"
    assert all(b % (MICRO * world) == 0 for b in r0["trajectory"])
    assert torch.equal(r0["weight"], r1["weight"])
    # exact B_simple = (d (|delta|^2 + sigma^2) + |delta|^2) / |delta|^2, sigma^2 = 9, w* = 0
    delta_sq = float(r0["weight"].pow(2).sum())
    exact = (DIM * (delta_sq + 9.0) + delta_sq) / delta_sq
    assert 0.7 * exact < r0["noise"] < 1.3 * exact
    assert r0["noise"] == r1["noise"]
    assert r0["timed"] == r1["timed"] and r0["interval"] == r1["interval"]
    assert r0["goodput"] == r1["goodput"] and r0["profile"] == r1["profile"]
    assert r0["profile"]["time"], "the goodput profile should have timed some steps"
    assert r0["interval"] > 1, "measuring a 16-weight model costs more than 0.5 % of its steps"
