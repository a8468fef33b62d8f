"""Process-group helpers on top of accelerate (works unchanged for a single plain process).

Training keeps the whole global batch's randomness on every process (one shared generator) and gives
each process a contiguous slice of rows; these helpers provide the few collectives the loop needs:
sum-reduce, gather along the batch, gather that keeps the local gradient, and gradient sum-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as td
from accelerate import PartialState


class Dist:
    """rank, world_size, device and collectives; `Dist.init()` starts accelerate's process group."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None, state=None):
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = device or torch.device("cpu")
        self._state = state

    @classmethod
    def init(cls, cpu: bool = False) -> Dist:
        state = PartialState(cpu=cpu)
        return cls(state.process_index, state.num_processes, state.device, state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return t

        out = t.detach().clone()
        td.all_reduce(out, op=td.ReduceOp.SUM)
        return out

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped local tensors of all processes along dim 0 (rank order), no gradient."""
        if not self.distributed:
            return t.detach()

        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        td.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts, dim=0)

    def gather_with_grad(self, t: torch.Tensor) -> torch.Tensor:
        """Like `gather`, but the local slice is `t` itself, so gradients reach this process's rows.

        A loss over the gathered tensor then yields, summed over processes (see `all_reduce_grads`), the
        gradient of that loss with respect to the whole global batch.
        """
        if not self.distributed:
            return t
        full = self.gather(t)
        n = t.shape[0]
        return torch.cat([full[: self.rank * n], t, full[(self.rank + 1) * n:]], dim=0)

    def all_reduce_grads(self, params) -> None:
        """Sum .grad of `params` over processes (in one flat buffer)."""
        if not self.distributed:
            return

        params = [p for p in params if p.requires_grad]
        if not params:
            return
        for p in params:  # every process must contribute the same layout
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        td.all_reduce(flat, op=td.ReduceOp.SUM)
        i = 0
        for p in params:
            n = p.grad.numel()
            p.grad.copy_(flat[i:i + n].view_as(p.grad))
            i += n

    def barrier(self) -> None:
        if self.distributed:

            td.barrier()
