"""The peers, run as their authors intend: fairscale AdaScale and AdaptDL (Pollux's library).

Each run is its own process (AdaptDL's state is process-global), started by :mod:`benchmarks.run`
with the peers' interpreter, so their pins (``setuptools<81``) never touch the main environment::

    python -m benchmarks.peers --method adascale --workload mnist1d-mlp --seed 0 --budget 96000 \
        --eval-every 4000 --out run.json

Both use the workload's model, data, optimizer (with its weight decay), base LR, LR schedule and
evaluation schedule through :class:`benchmarks.loops.Recorder`, so their figures are comparable
with the other methods'.

- AdaScale (Johnson et al. 2020): the batch is fixed at ``ADASCALE_ACCUMULATION`` micro-batches;
  AdaScale multiplies the LR by its gain r = (sigma^2 + |G|^2) / (sigma^2/S + |G|^2). As fairscale's
  docstring shows, the LR schedule runs in scale-invariant iterations: it is evaluated at the sum of
  the gains so far over the base batch's budget / B0 steps (so a run whose gain stays below S ends
  its sample budget before the end of its schedule). Same data order as the baselines. AdaScale is
  validated for SGD only (fairscale's docstring and the paper), so it is not run on Adam-family
  workloads (``PEER_OPTIMIZERS``).
- AdaptDL (Qiao et al. 2021): ``AdaptiveDataLoader`` with ``autoscale_batch_size`` and gradient
  accumulation, ``AdaptiveDataParallel`` over a one-process gloo group, its AdaScale rule (AdamScale
  for Adam-family optimizers, passed explicitly: in 0.2.11 the default path pairs AdamScale with the
  non-preconditioned noise estimator, ``parallel.py`` checks ``isinstance(scaling_rule, AdamScale)`` on
  the argument; and :func:`adaptdl_adam_step_as_tensor` lets its Adam state reset run on current
  torch). AdaptDL's tutorial and examples step the LR scheduler once per epoch, and under
  ``autoscale_batch_size`` an AdaptDL epoch ends when its progress in scale-invariant iterations
  (the sum of the gains) reaches another len(dataset) / base batch (``AdaptiveDataLoader.__iter__``
  in ``data.py``): so here too the schedule is evaluated at that progress over the base batch's
  budget / B0 steps. AdaptDL shuffles with its own sampler, so its data order differs from the other
  methods'. It fits its throughput model 30 s into training and every 30 s after
  (``profile_step_commit`` in ``_metrics.py``) and re-plans the batch at each pass over the data;
  until the first fit it trains at the initial batch, so a run shorter than 30 s never adapts.

Gradient accumulation in AdaptDL, and what we do about it. AdaptDL's documentation and examples
(``examples/pytorch-cifar/main.py``, ``docs/adaptdl-pytorch.rst``) call ``loss.backward()`` on each
micro-batch's *mean* loss with no division by the number of accumulated micro-batches; the
patched ``optimizer.zero_grad()`` skips zeroing while accumulating, so ``param.grad`` holds the sum
of k micro-batch means. The library is meant to average it: its noise-scale code divides by the
count (``adaptdl/torch/gradient_noise_scale.py``, ``GradientNoiseScale._final_callback``). But in
0.2.11, the last release (tag v0.2.11, 2022-04-20), that division is applied to a *copy*
(line 230: ``grad / mixed_precision_scale / self._accum_count``), and ``ScalingRuleBase.step``
(``scaling_rules.py``) steps the optimizer on ``param.grad`` as is: SGD takes a step k times too
large (on top of the AdaScale gain, which already accounts for the larger batch). Upstream fixed it
after that release, in commit 5b774c6 ("Bugfixes from Fairseq integration (#129)", 2022-08-02:
"divide actual grads and not copy"), which does ``param.grad.div_(self._accum_count)`` in place;
no release carries it. So we keep the authors' loop (unscaled loss) and, when the installed
AdaptDL does not divide in place (:func:`adaptdl_divides_in_place`), divide ``param.grad`` by the
accumulation count after the step's last backward pass, before ``optimizer.step()`` — exactly
what the fixed library does. The noise-scale statistics are unaffected (they are computed during
the backward pass from the divided copy, as in the fix). It matters where AdaptDL accumulates: on
one process that is only above its largest micro-batch (512 here), since accumulating more small
micro-batches gains it no throughput. On linreg-long (seed 0, 800,000 samples) it grew the batch
to 1,024, two micro-batches of 512, and ended at an excess risk of 0.0034 with the averaging and
0.0074 without it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import socket
import sys
from typing import Any, Iterable

import torch

from adabatch.lr import is_adaptive
from adabatch.workloads import get_workload, make_optimizer
from benchmarks.loops import Recorder, epochs

ADASCALE_ACCUMULATION = 4
PEERS = {"adascale": "fairscale.optim", "adaptdl": "adaptdl.torch"}
# Optimizers each peer is validated for (None: any).
PEER_OPTIMIZERS: dict[str, tuple[str, ...] | None] = {"adascale": ("sgd",), "adaptdl": None}
_IN_PLACE_DIVISION = re.compile(r"param\.grad\.div_\(\s*self\._accum_count\s*\)")


def peer_supports(peer: str, optimizer: str) -> bool:
    """Whether ``peer`` is meant to run with the workload's ``optimizer`` (AdaScale: SGD only).

    Example:
        >>> peer_supports("adascale", "sgd"), peer_supports("adascale", "adamw"), peer_supports("adaptdl", "adamw")
        (True, False, True)
    """
    allowed = PEER_OPTIMIZERS[peer]
    return allowed is None or optimizer in allowed


def divides_in_place(final_callback_source: str) -> bool:
    """Whether this source of AdaptDL's ``GradientNoiseScale._final_callback`` averages ``param.grad``.

    Example:
        >>> divides_in_place("grads[-1].append(grad / mixed_precision_scale / self._accum_count)")  # 0.2.11
        False
        >>> divides_in_place("param.grad.div_(self._accum_count)")  # upstream after 5b774c6
        True
    """
    return bool(_IN_PLACE_DIVISION.search(final_callback_source))


def adaptdl_divides_in_place() -> bool:
    """Whether the installed AdaptDL averages the accumulated gradient itself (0.2.11 does not)."""
    from adaptdl.torch.gradient_noise_scale import GradientNoiseScale

    return divides_in_place(inspect.getsource(GradientNoiseScale._final_callback))


def average_accumulated(params: Iterable[torch.Tensor], count: int) -> None:
    """Turn the sum of ``count`` accumulated micro-batch gradients into their mean, in place.

    Example:
        >>> p = torch.zeros(2, requires_grad=True)
        >>> p.grad = torch.tensor([2.0, 4.0])   # two micro-batches' mean gradients, summed
        >>> average_accumulated([p], 2); p.grad
        tensor([1., 2.])
    """
    for p in params:
        if p.grad is not None:
            p.grad.div_(count)


def adaptdl_adam_step_as_tensor() -> None:
    """Let AdaptDL's Adam noise estimator reset Adam's state on current torch.

    ``AdamGradientNoiseScale._reset_adam_state`` (0.2.11) rescales Adam's moments and sets
    ``state["step"]`` to a Python int whenever the batch scale changes; torch >= 1.12's Adam and AdamW
    reject that ("state_steps argument must contain a list of singleton tensors"). The reset is kept
    as AdaptDL does it; only the step is stored as the tensor torch expects.
    """
    from adaptdl.torch.gradient_noise_scale import AdamGradientNoiseScale

    reset = AdamGradientNoiseScale._reset_adam_state
    if getattr(reset, "step_as_tensor", False):
        return

    def _reset_adam_state(self, step=0):
        reset(self, step)
        for group in self._optimizer.param_groups:
            for p in group["params"]:
                state = self._optimizer.state[p]
                if "step" in state and not torch.is_tensor(state["step"]):
                    state["step"] = torch.tensor(float(state["step"]))

    _reset_adam_state.step_as_tensor = True
    AdamGradientNoiseScale._reset_adam_state = _reset_adam_state


def train_adascale(wl, data, seed: int, budget: int, eval_every: int) -> dict[str, Any]:
    from fairscale.optim import AdaScale

    torch.manual_seed(seed)
    model = wl.make_model()
    k, b = ADASCALE_ACCUMULATION, wl.micro_batch
    opt = AdaScale(make_optimizer(wl.optimizer, model.parameters(), wl.lr, wl.weight_decay),
                   num_gradients_to_accumulate=k)
    rec = Recorder(wl, data, "adascale", seed, budget, eval_every)
    x, y, n = data.x_train, data.y_train, len(data.x_train)
    base_steps = budget / b  # the schedule's length in scale-invariant iterations
    samples = steps = micro = 0
    progress = 0.0  # sum of the gains: scale-invariant iterations done
    for perm in epochs(n, seed):
        for i in range(0, n - b + 1, b):
            idx = perm[i:i + b]
            loss = wl.loss(model(x[idx]), y[idx])
            (loss / k).backward()  # is_scaled_loss=True: AdaScale expects the loss divided by k
            micro += 1
            if micro % k:
                continue
            gain = float(opt.gain())
            progress += gain
            for g in opt.param_groups:
                g["lr"] = wl.lr_at(progress / base_steps)  # AdaScale multiplies it by the gain in step()
            opt.step()
            opt.zero_grad()
            samples, steps = samples + k * b, steps + 1
            if rec.due(samples):
                rec.evaluate(model, samples, steps, k * b, loss.item(), gain=gain, progress=progress)
                if rec.done:
                    break
        if rec.done:
            break
    return rec.finish(accumulation=k)


def train_adaptdl(wl, data, seed: int, budget: int, eval_every: int, max_batch: int = 4096,
                  max_local_batch: int = 512) -> dict[str, Any]:
    """AdaptDL's loop; a batch above ``max_local_batch`` (AdaptDL's largest micro-batch) accumulates."""
    import adaptdl.torch as adl
    from adaptdl.torch.data import current_dataloader
    from adaptdl.torch.scaling_rules import AdamScale, AdaScale

    os.environ.setdefault("ADAPTDL_MASTER_PORT", str(_free_port()))
    adl.init_process_group("gloo")
    adaptdl_adam_step_as_tensor()
    torch.manual_seed(seed)
    model = wl.make_model()
    opt = make_optimizer(wl.optimizer, model.parameters(), wl.lr, wl.weight_decay)
    model = adl.AdaptiveDataParallel(model, opt, scaling_rule=AdamScale() if is_adaptive(opt) else AdaScale())
    dataset = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    max_batch = min(max_batch, len(dataset))
    loader = adl.AdaptiveDataLoader(dataset, batch_size=wl.micro_batch, shuffle=True, drop_last=True)
    loader.autoscale_batch_size(max_batch, local_bsz_bounds=(wl.micro_batch, min(max_local_batch, max_batch)),
                                gradient_accumulation=True)
    rec = Recorder(wl, data, "adaptdl", seed, budget, eval_every)
    divide = not adaptdl_divides_in_place()
    base_steps = budget / wl.micro_batch  # the schedule's length in scale-invariant iterations
    samples = steps = 0
    epochs_needed = math.ceil(budget / len(dataset)) + 1
    for _ in adl.remaining_epochs_until(epochs_needed):
        for xb, yb in loader:
            opt.zero_grad()  # AdaptDL's patched zero_grad keeps the gradient while accumulating
            stepping = current_dataloader().is_optim_step()  # the helper AdaptiveDataParallel consults
            loss = wl.loss(model(xb), yb)
            loss.backward()  # the unscaled loss, as in AdaptDL's examples
            samples += len(xb)
            if stepping:
                if divide:
                    average_accumulated(model.module.parameters(), model.gns.accum_count)
                progress = model.gns.get_progress() + model.gain  # scale-invariant iterations after this step
                for g in opt.param_groups:
                    g["lr"] = wl.lr_at(progress / base_steps)  # AdaptDL's step multiplies it by its LR rule
            opt.step()  # AdaptDL's patched step applies the update only on the last accumulated batch
            if not stepping:
                continue
            steps += 1
            if rec.due(samples):
                rec.evaluate(model.module, samples, steps, loader.current_batch_size, loss.item(),
                             gain=float(model.gain), progress=float(model.gns.get_progress()))
                if rec.done:
                    break
        if rec.done:
            break
    return rec.finish(grad_averaged_here=divide)


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
    p.add_argument("--max-batch", type=int, default=4096, help="AdaptDL's largest global batch")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    wl = get_workload(args.workload)
    data = wl.make_data(args.seed)
    if args.method == "adascale":
        result = train_adascale(wl, data, args.seed, args.budget, args.eval_every)
    else:
        result = train_adaptdl(wl, data, args.seed, args.budget, args.eval_every, max_batch=args.max_batch)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    sys.exit(main())
