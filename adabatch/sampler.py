"""A batch sampler that lets the controller choose each micro-batch's size.

Pass it to ``DataLoader(dataset, batch_sampler=controller.batch_sampler(len(dataset)))``. Each time
the loader asks for the next micro-batch, the sampler asks the controller how many samples it
should hold (the controller plans ahead, so prefetching workers get the right sizes too) and the
controller remembers what it handed out, so ``controller.backward(loss)`` knows each micro-batch's
size without being told. Under DDP every process draws the same global micro-batch from the same
permutation and keeps its own stride of it, as ``DistributedSampler`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from adabatch.controller import AdaptiveBatchController


class AdaptiveBatchSampler:
    """Index lists over ``range(num_samples)`` whose sizes follow the controller's plan.

    ``shuffle`` draws a fresh permutation each epoch from ``seed + epoch``. ``drop_last`` drops a
    final micro-batch smaller than planned; without it that batch is yielded short (the controller
    still averages the step's gradient exactly).

    Example:
        >>> import torch
        >>> from adabatch import AdaptiveBatchController
        >>> model = torch.nn.Linear(2, 1)
        >>> ctl = AdaptiveBatchController(model, torch.optim.SGD(model.parameters(), lr=0.1), 4)
        >>> [len(idx) for idx in ctl.batch_sampler(10, shuffle=False, drop_last=False)]
        [4, 4, 2]
    """

    def __init__(self, controller: "AdaptiveBatchController", num_samples: int, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True, rank: int | None = None) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples} is invalid: the dataset must hold at least one sample.")
        self.controller = controller
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.world_size = controller.world_size
        self.rank = _rank(controller.process_group) if rank is None else rank
        self.epoch = 0
        self._current = (0, 0)  # (epoch, samples handed out) of the pass in progress
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict[str, int]:
        """Where the controller is in the data: the pass and the samples it has consumed from it.

        Micro-batches handed out but not yet consumed (prefetched) are not counted, so a resumed
        run sees them again. Take it between optimizer steps, with the controller's state.
        """
        epoch, handed = self._current
        pending = sum(self.controller.planner.issued) * self.world_size
        return {"epoch": epoch, "position": handed - pending, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the pass of ``state`` where the controller left it (the next iteration)."""
        if state["num_samples"] != self.num_samples or state["seed"] != self.seed:
            raise ValueError(f"sampler state of {state['num_samples']} samples, seed {state['seed']}, cannot resume a "
                             f"sampler of {self.num_samples} samples, seed {self.seed}.")
        self._resume = (state["epoch"], state["position"])

    def __iter__(self) -> Iterator[list[int]]:
        ctl = self.controller
        ctl.discard_issued()  # an earlier pass that was left early must not leave its sizes behind
        pos = 0
        if self._resume is not None:
            self.epoch, pos = self._resume
            self._resume = None
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        epoch = self.epoch
        self.epoch += 1
        world = self.world_size
        self._current = (epoch, pos)
        start = pos
        while pos < self.num_samples:
            n = ctl.next_micro_batch_size()
            left = (self.num_samples - pos) // world
            if left < n:  # the pass ends here: a short batch, or none
                ctl.discard_issued(last=1)
                if pos == start == 0 and (self.drop_last or left == 0):
                    raise ValueError(f"the controller planned a micro-batch of {n} samples per process, more than one "
                                     f"pass over {self.num_samples} samples on {world} process(es) holds; build the "
                                     "sampler with controller.batch_sampler(len(dataset)).")
                if self.drop_last or left == 0:
                    return
                n = ctl.next_micro_batch_size(left)
            chunk = order[pos:pos + n * world]
            pos += n * world
            self._current = (epoch, pos)
            yield chunk[self.rank::world].tolist()

    def __len__(self) -> int:
        """Micro-batches in one pass at the current micro-batch size (it may change on the way)."""
        per = self.controller.micro_batch_planned * self.world_size
        return self.num_samples // per if self.drop_last else -(-self.num_samples // per)


def _rank(group) -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group)
    return 0
