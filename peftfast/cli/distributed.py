"""Data-parallel training for ``peftfast train`` under ``torchrun`` / ``accelerate launch``.

The launchers set ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; with more than one process the job joins a
process group (NCCL on CUDA, gloo on CPU), wraps the patched model in DistributedDataParallel and gives
each rank its rows of every global micro-batch. Losses are weighted by the *global* count of target
tokens, so N ranks with ``--batch-size b`` compute the same step as one process with ``N * b``. Only
rank 0 prints, writes checkpoints and saves the adapter.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional

import torch


class Ranks:
    """This process's place in the job (a single process when no launcher set WORLD_SIZE > 1)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self.rank = int(os.environ.get("RANK", "0") or 0)
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.enabled = self.world > 1
        self._devnull: Optional[object] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> str:
        if torch.cuda.is_available():
            if self.enabled:
                torch.cuda.set_device(self.local_rank)
                return f"cuda:{self.local_rank}"
            return "cuda"
        return "cpu"

    def start(self) -> None:
        """Silence stdout on ranks other than 0 (errors still reach stderr)."""
        if self.enabled and not self.is_main:
            self._devnull = open(os.devnull, "w")
            sys.stdout = self._devnull

    def join(self) -> None:
        """Join the process group. Called once the base model is loaded: transformers' save_pretrained,
        which the embedded base goes through on every rank, writes nothing off rank 0 once a group exists."""
        if not self.enabled:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    def stop(self) -> None:
        if not self.enabled:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        if self._devnull is not None:
            sys.stdout = sys.__stdout__
            self._devnull.close()

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def total(self, value: float) -> float:
        """Sum of ``value`` over ranks."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return float(t.item())

    def shard(self, batch: dict) -> dict:
        """This rank's rows of a global batch (rows ``rank, rank + world, ...``)."""
        if not self.enabled:
            return batch
        return {k: v[self.rank::self.world] for k, v in batch.items()}

    def wrap(self, model: torch.nn.Module, device: str) -> torch.nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.local_rank] if device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=ids)

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. writes files), the others wait, then run it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()
