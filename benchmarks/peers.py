"""The peers, run as they ship: fairscale AdaScale (fixed accumulation) and AdaptDL (Pollux's library).

Each run is its own process (AdaptDL's state is process-global), started by :mod:`benchmarks.run`
with the peers' interpreter, so their pins (``setuptools<81``) never touch the main environment::

    python -m benchmarks.peers --method adascale --workload mnist1d-mlp --seed 0 --out run.json

Both use the workload's model, data, base LR and evaluation schedule through
:class:`benchmarks.loops.Recorder`, so their figures are comparable with the other methods'.

- AdaScale (Johnson et al. 2020): the batch is fixed at ``ADASCALE_ACCUMULATION`` micro-batches;
  AdaScale multiplies the base LR by its gain r = (sigma^2 + |G|^2) / (sigma^2/S + |G|^2). The same
  data order as the baselines.
- AdaptDL (Qiao et al. 2021): ``AdaptiveDataLoader`` with ``autoscale_batch_size`` and gradient
  accumulation, ``AdaptiveDataParallel`` over a one-process gloo group. AdaptDL shuffles with its
  own sampler, so its data order differs from the other methods'. It re-plans the batch every 30 s
  and at epoch ends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
from typing import Any

import torch

from adabatch.workloads import get_workload, make_optimizer
from benchmarks.loops import Recorder, _epochs

ADASCALE_ACCUMULATION = 4
PEERS = {"adascale": "fairscale.optim", "adaptdl": "adaptdl.torch"}


def train_adascale(wl, data, seed: int, budget: int, eval_every: int) -> dict[str, Any]:
    from fairscale.optim import AdaScale

    torch.manual_seed(seed)
    model = wl.make_model()
    k, b = ADASCALE_ACCUMULATION, wl.micro_batch
    opt = AdaScale(make_optimizer(wl.optimizer, model.parameters(), wl.lr), num_gradients_to_accumulate=k)
    rec = Recorder(wl, data, "adascale", seed, budget, eval_every)
    gen = torch.Generator().manual_seed(seed)
    x, y, n = data.x_train, data.y_train, len(data.x_train)
    samples = steps = micro = 0
    for perm in _epochs(n, gen):
        for i in range(0, n - b + 1, b):
            idx = perm[i:i + b]
            loss = wl.loss(model(x[idx]), y[idx])
            (loss / k).backward()  # is_scaled_loss=True: AdaScale expects the loss divided by k
            micro += 1
            if micro % k:
                continue
            opt.step()
            opt.zero_grad()
            samples, steps = samples + k * b, steps + 1
            if rec.due(samples):
                rec.evaluate(model, samples, steps, k * b, loss.item(), gain=float(opt.gain()))
                if rec.done:
                    break
        if rec.done:
            break
    return rec.finish(accumulation=k)


def train_adaptdl(wl, data, seed: int, budget: int, eval_every: int, max_batch: int = 4096) -> dict[str, Any]:
    import adaptdl.torch as adl
    from adaptdl.torch.data import current_dataloader

    os.environ.setdefault("ADAPTDL_MASTER_PORT", str(_free_port()))
    adl.init_process_group("gloo")
    torch.manual_seed(seed)
    model = wl.make_model()
    opt = make_optimizer(wl.optimizer, model.parameters(), wl.lr)
    model = adl.AdaptiveDataParallel(model, opt)
    dataset = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    loader = adl.AdaptiveDataLoader(dataset, batch_size=wl.micro_batch, shuffle=True, drop_last=True)
    loader.autoscale_batch_size(max_batch, local_bsz_bounds=(wl.micro_batch, 512), gradient_accumulation=True)
    rec = Recorder(wl, data, "adaptdl", seed, budget, eval_every)
    samples = steps = 0
    epochs = math.ceil(budget / len(dataset)) + 1
    for _ in adl.remaining_epochs_until(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss = wl.loss(model(xb), yb)
            stepping = current_dataloader().is_optim_step()  # the helper AdaptiveDataParallel consults
            loss.backward()
            opt.step()  # AdaptDL's patched step applies the update only on the last accumulated batch
            samples += len(xb)
            if not stepping:
                continue
            steps += 1
            if rec.due(samples):
                rec.evaluate(model.module, samples, steps, loader.current_batch_size, loss.item())
                if rec.done:
                    break
        if rec.done:
            break
    return rec.finish()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=sorted(PEERS), required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--eval-every", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    wl = get_workload(args.workload)
    data = wl.make_data(args.seed)
    run = train_adascale if args.method == "adascale" else train_adaptdl
    result = run(wl, data, args.seed, args.budget, args.eval_every)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    sys.exit(main())
