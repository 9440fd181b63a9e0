"""Data-parallel training: the processes ``torchrun`` (or ``accelerate launch``) starts, and what they share.

``slmstack train`` run as ``torchrun --nproc_per_node N $(which slmstack) train ...`` trains each stage on N
processes: every process builds the same batches (same data, seed and order), takes rows ``rank::N`` of each, and
the gradients are summed over the processes before each optimiser step, as DDP does (gloo on a CPU, NCCL on
GPUs), with the loss of each process divided by the batch's target tokens over all processes. So a step on N
processes is the step one process takes on the whole batch, up to the order of float sums. Only rank 0 writes
(checkpoints, metrics, adapters, the summary and the trained stack); the others wait at the end of each stage.

Why not ``DistributedDataParallel`` itself: the loss runs the base model's decoder and computes the output layer
only at target positions (:func:`slmstack.training.trainer._masked_loss`), so the forward does not go through the
wrapped module that DDP needs to see; the gradient sum is the same collective DDP runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from slmstack.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["Processes", "processes"]


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """The device this process trains on: its own GPU (``cuda:LOCAL_RANK``) where GPUs are asked for."""
        if self.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes, in place."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Every parameter's gradient summed over the processes (one flat buffer: one collective)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads]))
        at = 0
        for p, g in zip(params, grads, strict=True):
            p.grad = flat[at : at + g.numel()].view_as(g).clone()
            at += g.numel()

    def barrier(self) -> None:
        """Wait for every process."""
        if self.world > 1:
            torch.distributed.barrier()

    def shard(self, rows: list[Any]) -> list[Any]:
        """This process's rows of a batch.

        Raises:
            ConfigError: the batch has fewer rows than there are processes.
        """
        if self.world > 1 and len(rows) < self.world:
            raise ConfigError(f"a batch of {len(rows)} rows cannot be split over {self.world} processes; raise "
                              f"batch_size to at least {self.world}")  # fmt: skip
        return rows[self.rank :: self.world]


def processes(device: str = "auto") -> Processes:
    """This process's place, from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    The process group is joined on the first call (NCCL where this process trains on a GPU, else gloo).

    Raises:
        ConfigError: the environment names an impossible place.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ConfigError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} WORLD_SIZE={world}: not a place among the processes; start with torchrun")
    here = Processes(rank, world, local)
    if world > 1 and not torch.distributed.is_initialized():
        gpu = here.device(device).startswith("cuda")
        if gpu:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend="nccl" if gpu else "gloo")
        logger.info("training process %d of %d (%s)", rank, world, "nccl" if gpu else "gloo")
    return here
