"""One process's share of a global batch under data parallelism, and random draws that do not depend on it.

Process ``rank`` of ``world`` owns rows ``rank, rank + world, ...`` of every global batch. Every random tensor a
training step needs (t, eps, the TBS cache noise) is drawn for the *whole* global batch from a generator that all
processes seed alike, then sliced to this process's rows. So a step's draws per sample are the same for any number of
processes, and with one process they are exactly the draws of a plain single-process run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchShard:
    """Rows ``rank::world`` of a global batch of ``n`` rows."""

    n: int
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not (self.world >= 1 and 0 <= self.rank < self.world and self.n >= 1):
            raise ValueError(f"bad shard: n={self.n}, rank={self.rank}, world={self.world}")

    @property
    def size(self) -> int:
        """Rows this process owns."""
        return len(range(self.rank, self.n, self.world))

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global-batch tensor (dim 0 has ``n`` rows)."""
        if x.shape[0] != self.n:
            raise ValueError(f"expected a global batch of {self.n} rows, got {x.shape[0]}")
        return x[self.rank :: self.world]

    def randn(self, sample_shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """N(0, I) of shape [size, *sample_shape]: this process's rows of one global draw, on the generator's
        device."""
        return self.take(torch.randn((self.n, *sample_shape), generator=generator, device=generator.device))


def whole(x: torch.Tensor) -> BatchShard:
    """The shard of a single process owning all of batch ``x``."""
    return BatchShard(x.shape[0])


def chunks(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[int]:
    """Start indices of the sampling chunks [s, s + batch_size) of ``n`` images that process ``rank`` generates:
    chunk k goes to process k mod world, so each image's chunk (hence its noise) is the same for any world."""
    return list(range(0, n, batch_size))[rank::world]


def process_group_world() -> int:
    """The world size of the initialised default process group (1 when there is none)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_vector_norm(x: torch.Tensor, dim: tuple[int, ...], keepdim: bool = False) -> torch.Tensor:
    """``torch.linalg.vector_norm(x, dim=dim)`` where ``dim`` includes the batch dim and the batch is split across
    the processes of the default group: the norm over the *global* batch. The sum of squares goes through a
    differentiable all-reduce, whose backward sums the (identical) upstream gradients of the W processes, so DDP's
    average of the processes' gradients is exactly the gradient of the global-batch loss. A norm over the batch (as
    SPD's) is not a mean over samples: without this its value and gradient would depend on the process count.
    With one process this is ``vector_norm`` itself."""
    if process_group_world() == 1:
        return torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim)
    from torch.distributed.nn.functional import all_reduce

    total = all_reduce(x.float().square().sum(dim=dim, keepdim=keepdim))
    return total.clamp_min(torch.finfo(torch.float32).tiny).sqrt() * (total > 0)


def is_main_process() -> bool:
    """False on the non-zero ranks of a process group (initialised, or launched: the launchers' ``RANK``)."""
    import os

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0
