"""Running under PyTorch's own launcher: the process group from torchrun's environment, and the model wrapped.

adabatch has no scheduler or cluster manager of its own. ``torchrun`` starts the processes and sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init_from_env` joins the process group they
describe (NCCL when CUDA is available, else gloo), with a timeout on every collective, and
:func:`wrap` wraps the model in ``DistributedDataParallel`` or shards it with FSDP2
(``fully_shard``). The controller needs nothing more: it reads the world size from the process
group and keeps every rank's decisions identical.

Failing fast. Under torchrun the elastic agent tears the whole group down when one worker exits
with an error (and restarts it, with ``--max-restarts``). Processes started any other way
(``mp.spawn``, a cluster's own launcher) rely on the collective timeout: a rank that has raised
leaves the others waiting in their next all-reduce, which then fails after ``timeout_s`` seconds
instead of hanging (gloo always; NCCL with its default asynchronous error handling).

Example:
    >>> ctx = init_from_env()  # outside torchrun: one process, no group
    >>> ctx.world_size, ctx.is_main, ctx.backend
    (1, True, None)
    >>> type(wrap(torch.nn.Linear(2, 1), ctx)).__name__
    'Linear'
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

BACKENDS = ("gloo", "nccl")
SHARDINGS = ("ddp", "fsdp")
DEFAULT_TIMEOUT_S = 300.0  # long enough for a slow first step or an evaluation on rank 0, short against a hang


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank, the number of processes, its device and the backend."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def current() -> Context:
    """The context of the process group already joined, or of a single process without one."""
    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
        return Context(dist.get_rank(), dist.get_world_size(), local, device, backend)
    return Context(0, 1, 0, torch.device("cpu"), None)


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Context:
    """Join the process group torchrun describes in the environment; one process without it.

    ``backend``: ``nccl`` or ``gloo``; None picks NCCL when CUDA is available, else gloo. Under
    NCCL each process uses the GPU ``LOCAL_RANK``. ``timeout_s`` bounds every collective, so a rank
    that fails makes the others raise instead of waiting for ever.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: accepted {', '.join(BACKENDS)}, or None (NCCL with "
                         "CUDA, else gloo).")
    if not (isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and 0 < timeout_s < 1e7):
        raise ValueError(f"timeout_s={timeout_s!r} is invalid: accepted a number of seconds > 0.")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("backend='nccl' needs CUDA, which this process does not see; use gloo on CPU.")
    if (dist.is_available() and dist.is_initialized()) or not launched():
        return current()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return current()


def wrap(model: nn.Module, ctx: Context, sharding: str = "ddp") -> nn.Module:
    """The model on the context's device, wrapped for data parallelism when there are several processes.

    ``ddp``: ``DistributedDataParallel``. ``fsdp``: FSDP2, each submodule that holds parameters
    sharded on its own (so only one layer's weights are gathered at a time), then the root.
    One process: the model itself.
    """
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding={sharding!r} is invalid: accepted {', '.join(SHARDINGS)}.")
    model = model.to(ctx.device)
    if not ctx.distributed:
        return model
    if sharding == "ddp":
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    for module in list(model.modules())[1:]:
        if any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (an FSDP2 model is its own module)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def sharded(model: nn.Module) -> bool:
    """True for a model whose parameters are DTensors (FSDP2)."""
    return any(hasattr(p, "placements") for p in model.parameters())


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes (whole tensors: a sharded one is gathered; all ranks must call it)."""
    h = hashlib.sha256()
    for name, p in unwrap(model).named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):
            t = t.full_tensor()
        h.update(name.encode())
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def gather(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (a one-item list without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def digest(values: Sequence[Any]) -> str:
    """A short SHA-256 of a sequence's repr (batch trajectories compared across ranks)."""
    return hashlib.sha256(repr(list(values)).encode()).hexdigest()[:16]


def close() -> None:
    """Leave the process group (after a barrier: gloo aborts a peer still in its last collective).

    A DDP wrapper that is no longer used but sits in a reference cycle keeps its reducer, and with it
    the process group's backend, alive past ``destroy_process_group`` until the interpreter shuts
    down, where freeing it aborted the process ("terminate called without an active exception",
    about 1 exit in 15 on a loaded machine): the cycles are collected first.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
